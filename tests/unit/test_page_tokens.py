"""Page tokens: a position round-trips under one key; a token is refused with other filters,
under another key, edited, forged, oversized, or holding a position no list writes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.page_tokens import (
    TOKEN_LENGTH_MAX,
    PageTokens,
    filters_fingerprint,
    position_count,
    position_text,
    position_time,
)

KEY = b"k" * 32
FILTERS = filters_fingerprint(tenant_id="acme", scope="user")


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def signed(body: str, key: bytes = KEY) -> str:
    """A token as this service would make it from `body`: what a forger with the key makes."""
    payload = body.encode()
    mac = hmac.digest(key, payload, hashlib.sha256)
    encode = base64.urlsafe_b64encode
    return f"{encode(payload).decode().rstrip('=')}.{encode(mac).decode().rstrip('=')}"


async def test_a_position_round_trips_with_the_same_filters_and_key() -> None:
    token = await PageTokens(KEY).make(FILTERS, ["user", "ann"])
    again = filters_fingerprint(scope="user", tenant_id="acme")
    assert await PageTokens(KEY).read(token, again, 2) == ["user", "ann"]
    assert await PageTokens(KEY).read("", FILTERS, 2) is None


async def test_a_key_loaded_on_first_use_is_loaded_once() -> None:
    loads = []

    async def source() -> bytes:
        loads.append(1)
        return KEY

    tokens = PageTokens(source)
    token = await tokens.make(FILTERS, [1])
    assert await tokens.read(token, FILTERS, 1) == [1]
    assert await PageTokens(KEY).read(token, FILTERS, 1) == [1]
    assert loads == [1]


async def test_a_token_made_for_other_filters_is_refused() -> None:
    token = await PageTokens(KEY).make(filters_fingerprint(tenant_id="acme"), ["x"])
    with pytest.raises(InvalidArgument, match="other filters") as raised:
        await PageTokens(KEY).read(token, filters_fingerprint(tenant_id="globex"), 1)
    assert raised.value.field == "page_token"


async def test_a_token_made_under_another_key_is_refused() -> None:
    token = await PageTokens(b"o" * 32).make(FILTERS, ["x"])
    with pytest.raises(InvalidArgument, match="not a token") as raised:
        await PageTokens(KEY).read(token, FILTERS, 1)
    assert raised.value.field == "page_token"


async def test_an_edited_token_is_refused_even_with_a_well_formed_position() -> None:
    token = await PageTokens(KEY).make(FILTERS, ["user", "ann"])
    body, mac = token.split(".")
    edited = json.dumps({"f": FILTERS, "p": ["user", "bob"]}, separators=(",", ":"))
    forged = base64.urlsafe_b64encode(edited.encode()).decode().rstrip("=")
    for bad in (f"{forged}.{mac}", forged, body, f"{body}.{mac}.{mac}", f"{body}.{mac[:-2]}"):
        with pytest.raises(InvalidArgument, match="not a token"):
            await PageTokens(KEY).read(bad, FILTERS, 2)


@pytest.mark.parametrize(
    "body",
    [
        '{"f": "%s", "p": ["a"], "x": 1}' % FILTERS,  # noqa: UP031
        '{"f": "%s"}' % FILTERS,  # noqa: UP031
        '{"f": "%s", "p": "a"}' % FILTERS,  # noqa: UP031
        '{"f": "%s", "p": ["a", "b", "c"]}' % FILTERS,  # noqa: UP031
        '["f", "p"]',
        "not json",
        '{"f": "%s", "p": %s}' % (FILTERS, "[" * 5000 + "]" * 5000),  # noqa: UP031
    ],
)
async def test_a_signed_body_that_is_not_a_position_of_the_right_length_is_refused(
    body: str,
) -> None:
    with pytest.raises(InvalidArgument, match="not a token"):
        await PageTokens(KEY).read(signed(body), FILTERS, 2)


async def test_an_oversized_token_is_refused_before_anything_is_read() -> None:
    with pytest.raises(InvalidArgument, match="not a token"):
        await PageTokens(KEY).read("A" * (TOKEN_LENGTH_MAX + 1), FILTERS, 1)


@pytest.mark.parametrize(
    "value", ["", " ", "a b", "x" * 129, "é", "a\x00", 7, None, True, ["a"], {"a": 1}]
)
def test_an_id_position_is_1_to_128_printable_ascii(value: object) -> None:
    with pytest.raises(InvalidArgument):
        position_text(value)


@pytest.mark.parametrize("value", [0, -1, 2**63, 2**200, True, False, 1.0, "1", None, [1]])
def test_a_count_position_is_a_positive_int64(value: object) -> None:
    with pytest.raises(InvalidArgument):
        position_count(value)


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-01T00:00:00",  # no offset
        "0001-01-01T00:00:00+14:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-14:00",  # after year 9999 in UTC
        "not a time",
        "2026-13-01T00:00:00+00:00",
        "2026-01-01T00:00:00+00:00" + " " * 40,
        1_767_225_600,
        None,
    ],
)
def test_a_time_position_is_an_instant_with_its_offset_within_the_years_1_to_9999(
    value: object,
) -> None:
    with pytest.raises(InvalidArgument):
        position_time(value)


def test_good_positions_are_read_back() -> None:
    assert position_text("rsv_" + "0" * 32) == "rsv_" + "0" * 32
    assert position_count(2**63 - 1) == 2**63 - 1
    moment = datetime(2026, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)
    assert position_time(moment.isoformat()) == moment


@given(st.text(max_size=300) | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
def test_any_token_is_a_position_or_invalid_argument_page_token(token: str) -> None:
    def refused_field() -> str | None:
        try:
            run(PageTokens(KEY).read(token, FILTERS, 1))
        except InvalidArgument as error:
            return error.field
        return None

    assert refused_field() in (None, "page_token")


def test_a_key_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        PageTokens(b"short")
