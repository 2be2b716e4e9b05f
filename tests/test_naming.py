"""Tests for audience names → Gist property keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audience_sync.errors import ConfigError
from audience_sync.naming import check_unique_keys, is_valid_key, property_key

KEY_RE = re.compile(r"^[a-z0-9_]+$")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("firstTimeShopper", "first_time_shopper"),
        ("HTMLParser", "html_parser"),
        ("VIP!!! (gold) - tier #1", "vip_gold_tier_1"),
        ("  VIP   Customers  ", "vip_customers"),
        ("a--b", "a_b"),
        ("__x__", "x"),
        ("Café Lovers", "cafe_lovers"),
        ("ﬁrst buyers", "first_buyers"),
        ("already_snake_42", "already_snake_42"),
        ("顧客", ""),
        ("!!!", ""),
        ("", ""),
    ],
    ids=[
        "segment-example",
        "camel-case",
        "acronym",
        "punctuation",
        "extra-spaces",
        "repeated-dashes",
        "edge-underscores",
        "accent",
        "ligature",
        "already-a-key",
        "non-latin",
        "only-punctuation",
        "empty",
    ],
)
def test_property_key(name: str, key: str) -> None:
    assert property_key(name) == key


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("order_completed_last_30days", True),
        ("x", True),
        ("42", True),
        ("", False),
        ("Bad-Key", False),
        ("UPPER", False),
        ("has space", False),
        ("café", False),
        ("trailing_newline\n", False),
    ],
    ids=["snake", "one-letter", "digits", "empty", "dash-upper", "upper", "space", "accent", "nl"],
)
def test_is_valid_key(key: str, valid: bool) -> None:
    assert is_valid_key(key) is valid


def test_check_unique_keys_accepts_distinct_keys() -> None:
    check_unique_keys([("VIP", "vip"), ("Churned", "churned")])
    check_unique_keys([])


def test_check_unique_keys_names_both_audiences() -> None:
    with pytest.raises(ConfigError) as info:
        check_unique_keys(
            [
                ("VIP Customers", "vip_customers"),
                ("Other", "other"),
                ("vipCustomers", "vip_customers"),
            ]
        )
    message = str(info.value)
    assert "'VIP Customers'" in message
    assert "'vipCustomers'" in message
    assert "'vip_customers'" in message


@given(st.text())
def test_property_key_is_a_clean_idempotent_key(name: str) -> None:
    key = property_key(name)
    if key == "":
        return
    assert KEY_RE.match(key), key
    assert not key.startswith("_")
    assert not key.endswith("_")
    assert "__" not in key
    assert is_valid_key(key)
    assert property_key(key) == key
