"""Audience names → Gist property keys; the only module that imports ``inflection``."""

from __future__ import annotations

import re
from collections.abc import Iterable

import inflection

from audience_sync.errors import ConfigError

KEY_PATTERN = re.compile(r"^[a-z0-9_]+$")


def property_key(name: str) -> str:
    """Snake-case an audience name the way Segment Engage does.

    "Order Completed Last 30days" → "order_completed_last_30days",
    "firstTimeShopper" → "first_time_shopper". May return "" for names with no
    Latin letters or digits; callers treat that as a config error.
    """
    return str(inflection.parameterize(inflection.underscore(name), "_"))


def is_valid_key(key: str) -> bool:
    """True when ``key`` may be used as written as a Gist property key."""
    return bool(KEY_PATTERN.fullmatch(key))


def check_unique_keys(named_keys: Iterable[tuple[str, str]]) -> None:
    """Raise ConfigError naming both audiences when two of them map to one key."""
    seen: dict[str, str] = {}
    for name, key in named_keys:
        if key in seen:
            raise ConfigError(
                f"audiences {seen[key]!r} and {name!r} both use the property key {key!r}; "
                "rename one or give it an explicit `key`"
            )
        seen[key] = name
