"""Tests for the Gist client over ``httpx.MockTransport``: wire format and error classes."""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from audience_sync.config import GistConfig
from audience_sync.errors import (
    ApiError,
    AuthError,
    FatalApiError,
    RetriableApiError,
)
from audience_sync.gist import (
    MAX_MESSAGE,
    GistClient,
    build_contact,
    check_response,
    make_http_client,
    parse_retry_after,
)

API_KEY = "sk-SECRET-gist-7c1e"
BASE_URL = "https://gist.test"
NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response]


def _push(
    handler: Handler,
    base_url: str = BASE_URL,
    properties: dict[str, Any] | None = None,
) -> int:
    """Push one contact through a client whose transport is ``handler``."""
    config = GistConfig(api_key=SecretStr(API_KEY), base_url=base_url)

    async def go() -> int:
        async with make_http_client(config, transport=httpx.MockTransport(handler)) as http:
            return await GistClient(http).push_contact(
                "42", "a@example.com", {"k": True} if properties is None else properties
            )

    return asyncio.run(go())


def _push_error(handler: Handler) -> ApiError:
    with pytest.raises(ApiError) as info:
        _push(handler)
    assert API_KEY not in str(info.value)
    return info.value


def _answer(status: int, **kwargs: Any) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, **kwargs)

    return handler


def test_wire_format() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"contact": {"id": 1}})

    assert _push(handler) == 200

    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "https://gist.test/contacts"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == "audience-sync"
    assert json.loads(request.content) == {
        "user_id": "42",
        "email": "a@example.com",
        "custom_properties": {"k": True},
    }


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("https://gist.test/", "https://gist.test/contacts"),
        ("https://gist.test/api/v1", "https://gist.test/api/v1/contacts"),
        ("https://gist.test/api/v1/", "https://gist.test/api/v1/contacts"),
    ],
    ids=["trailing-slash", "path-prefix", "path-prefix-trailing-slash"],
)
def test_base_url_joins_contacts(base_url: str, expected: str) -> None:
    urls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        urls.append(str(request.url))
        return httpx.Response(204)

    _push(handler, base_url=base_url)

    assert urls == [expected]


def test_removal_sends_false_and_null() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200)

    _push(handler, properties={"vip": False, "gone": None})

    assert bodies[0]["custom_properties"] == {"vip": False, "gone": None}


def test_build_contact() -> None:
    assert build_contact("7", "b@example.com", {"x": 1}) == {
        "user_id": "7",
        "email": "b@example.com",
        "custom_properties": {"x": 1},
    }


def test_build_contact_leaves_out_an_email_not_known() -> None:
    assert build_contact("7", "", {"x": 1}) == {"user_id": "7", "custom_properties": {"x": 1}}


@pytest.mark.parametrize("status", [200, 201, 204], ids=["200", "201", "204"])
def test_success_statuses(status: int) -> None:
    assert _push(_answer(status)) == status
    check_response(httpx.Response(status))


FATAL = [400, 404, 409, 422]
AUTH = [401, 403]
RETRIABLE = [408, 429, 500, 502, 503, 504]


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(s, FatalApiError) for s in FATAL]
    + [(s, AuthError) for s in AUTH]
    + [(s, RetriableApiError) for s in RETRIABLE],
    ids=[f"{s}-fatal" for s in FATAL]
    + [f"{s}-auth" for s in AUTH]
    + [f"{s}-retriable" for s in RETRIABLE],
)
def test_status_classification(status: int, error_class: type[ApiError]) -> None:
    body = {"errors": [{"message": f"gist says {status}"}]}

    error = _push_error(_answer(status, json=body))

    assert type(error) is error_class
    assert error.status == status
    assert f"gist says {status}" in str(error)
    assert f"HTTP {status}" in str(error)
    if error_class is FatalApiError:
        assert not isinstance(error, AuthError)
    if error_class is RetriableApiError:
        assert isinstance(error, RetriableApiError)
        assert error.retry_after is None
    else:
        assert not isinstance(error, RetriableApiError)

    # The same answer classified directly, without the client.
    with pytest.raises(error_class) as direct:
        check_response(httpx.Response(status, json=body))
    assert type(direct.value) is error_class
    assert direct.value.status == status


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"Retry-After": " 12 "}, 12.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
    ids=["seconds", "float", "padded", "negative", "garbage", "absent"],
)
def test_429_retry_after(headers: dict[str, str], expected: float | None) -> None:
    error = _push_error(_answer(429, headers=headers, json={"errors": [{"message": "slow"}]}))

    assert isinstance(error, RetriableApiError)
    assert error.retry_after == expected


def test_503_retry_after_http_date() -> None:
    # check_response reads the real clock, so only bound the answer.
    when = datetime.now(UTC) + timedelta(hours=1)
    header = email.utils.format_datetime(when, usegmt=True)

    error = _push_error(_answer(503, headers={"Retry-After": header}))

    assert isinstance(error, RetriableApiError)
    assert error.retry_after is not None
    assert 3500 < error.retry_after <= 3600


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("-1", 0.0),
        ("Tue, 04 Mar 2025 12:00:30 GMT", 30.0),
        ("Tue, 04 Mar 2025 13:00:00 +0000", 3600.0),
        ("Tue, 04 Mar 2025 11:59:00 GMT", 0.0),
        ("Tue, 04 Mar 2025 12:02:00 -0000", 120.0),
        ("garbage", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
    ids=[
        "seconds",
        "float",
        "zero",
        "negative",
        "date-30s",
        "date-1h-offset",
        "date-past",
        "date-naive",
        "garbage",
        "empty",
        "blank",
        "none",
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("exc_class", "fragment"),
    [
        (httpx.ConnectError, "connection failed: ConnectError"),
        (httpx.ReadTimeout, "timed out: ReadTimeout"),
        (httpx.ConnectTimeout, "timed out: ConnectTimeout"),
        (httpx.RemoteProtocolError, "connection failed: RemoteProtocolError"),
        (httpx.ReadError, "connection failed: ReadError"),
    ],
    ids=["connect", "read-timeout", "connect-timeout", "protocol", "read"],
)
def test_transport_errors_are_retriable(
    exc_class: type[httpx.TransportError], fragment: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_class("peer went away", request=request)

    error = _push_error(handler)

    assert type(error) is RetriableApiError
    assert error.status is None
    assert error.retry_after is None
    assert fragment in str(error)
    assert isinstance(error.__cause__, exc_class)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(502, text="<html>Bad gateway</html>"),
            "HTTP 502: <html>Bad gateway</html>",
        ),
        (httpx.Response(400, text="  plain words \n"), "HTTP 400: plain words"),
        (httpx.Response(503), "HTTP 503: Service Unavailable"),
        (httpx.Response(422, json={"message": "email is invalid"}), "HTTP 422: email is invalid"),
        (
            httpx.Response(422, json={"errors": [{"message": "a"}, {"message": "b"}]}),
            "HTTP 422: a; b",
        ),
        (httpx.Response(422, json={"errors": ["plain"]}), "HTTP 422: plain"),
        (httpx.Response(404, json=["not", "a", "dict"]), 'HTTP 404: ["not","a","dict"]'),
        (httpx.Response(400, content=b"\xff\xfe bytes"), "HTTP 400: "),
    ],
    ids=[
        "html",
        "text",
        "empty",
        "top-level-message",
        "several-errors",
        "string-errors",
        "json-list",
        "undecodable",
    ],
)
def test_error_message(response: httpx.Response, message: str) -> None:
    with pytest.raises(ApiError) as info:
        check_response(response)

    assert str(info.value).startswith(message)


def test_error_message_is_truncated() -> None:
    error = _push_error(_answer(400, text="x" * 5000))

    assert str(error) == f"HTTP 400: {'x' * MAX_MESSAGE}"


def test_non_json_error_body_through_client() -> None:
    error = _push_error(_answer(500, text="upstream exploded"))

    assert isinstance(error, RetriableApiError)
    assert str(error) == "HTTP 500: upstream exploded"


def test_api_key_not_in_repr_of_config() -> None:
    config = GistConfig(api_key=SecretStr(API_KEY))

    assert API_KEY not in repr(config)
    assert API_KEY not in str(config)
