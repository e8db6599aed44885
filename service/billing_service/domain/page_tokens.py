"""Page tokens (AIP-158), one format for every list: opaque, authenticated, bound to the filters.

A token is `base64url(body) "." base64url(HMAC-SHA256(key, body))`, where the body is the JSON
`{"f": fingerprint of the filters, "p": the last position returned}`. Only a token made with
the service's key verifies, so a caller can neither forge nor edit one; every replica signs
with the same key (BILLING_PAGE_TOKEN_SECRET, or the random key the migrations store in the
database). A token sent with other filters is refused rather than silently paging another
listing. The MAC is checked before anything is parsed, and the position is still checked
completely (its length, and each element by the list's own reader below), so that a token is
never more than a position this service wrote.

Every refusal is InvalidArgument on `page_token`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from billing_service.domain.commands import ID_LENGTH_MAX
from billing_service.domain.errors import InvalidArgument

# Tokens this service makes are a few hundred characters; an id position is at most 128.
TOKEN_LENGTH_MAX = 1024
KEY_BYTES_MIN = 32
ENTRY_ID_MAX = 2**63 - 1
_PART = re.compile(r"[A-Za-z0-9_-]+")
_ID = re.compile(rf"[\x21-\x7e]{{1,{ID_LENGTH_MAX}}}")

KeySource = Callable[[], Awaitable[bytes]]


def filters_fingerprint(**filters: Any) -> str:
    encoded = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def bad_page_token() -> InvalidArgument:
    return InvalidArgument("page_token", "is not a token this service returned")


class PageTokens:
    """Makes and reads page tokens under one key, given or loaded once on first use."""

    def __init__(self, key: bytes | KeySource) -> None:
        self._key: bytes | None = None
        self._source: KeySource | None = None
        if isinstance(key, bytes):
            self._key = _checked_key(key)
        else:
            self._source = key
        self._loading = asyncio.Lock()

    @classmethod
    def random(cls) -> PageTokens:
        """Tokens only this process accepts (tests, tools): never for a server."""
        return cls(secrets.token_bytes(KEY_BYTES_MIN))

    async def _signing_key(self) -> bytes:
        if self._key is None:
            async with self._loading:
                if self._key is None:
                    assert self._source is not None
                    self._key = _checked_key(await self._source())
        return self._key

    async def make(self, fingerprint: str, position: Sequence[str | int]) -> str:
        body = json.dumps({"f": fingerprint, "p": list(position)}, separators=(",", ":"))
        payload = body.encode()
        mac = hmac.digest(await self._signing_key(), payload, "sha256")
        return f"{_encode(payload)}.{_encode(mac)}"

    async def read(self, token: str, fingerprint: str, length: int) -> list[object] | None:
        """The `length` elements of the position a token resumes after, unchecked beyond their
        count (read each with position_text/position_count/position_time); None for the first
        page (empty token)."""
        if not token:
            return None
        if len(token) > TOKEN_LENGTH_MAX:
            raise bad_page_token()
        parts = token.split(".")
        if len(parts) != 2 or not all(_PART.fullmatch(part) for part in parts):
            raise bad_page_token()
        payload, mac = _decode(parts[0]), _decode(parts[1])
        expected = hmac.digest(await self._signing_key(), payload, "sha256")
        if not hmac.compare_digest(mac, expected):
            raise bad_page_token()
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):
            raise bad_page_token() from None
        if not isinstance(body, dict) or set(body) != {"f", "p"}:
            raise bad_page_token()
        if body["f"] != fingerprint:
            raise InvalidArgument(
                "page_token", "was made for other filters; send the first page's filters again"
            )
        position = body["p"]
        if not isinstance(position, list) or len(position) != length:
            raise bad_page_token()
        return position


def _checked_key(key: bytes) -> bytes:
    if len(key) < KEY_BYTES_MIN:
        raise ValueError(f"a page-token key has at least {KEY_BYTES_MIN} bytes")
    return key


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise bad_page_token() from None


# The elements of a position, each read by exactly what a list writes there.


def position_text(value: object) -> str:
    """An id (tenant, scope id, reservation id): 1-128 printable ASCII characters."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise bad_page_token()
    return value


def position_count(value: object) -> int:
    """A positive database id (a ledger entry)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= ENTRY_ID_MAX:
        raise bad_page_token()
    return value


def position_time(value: object) -> datetime:
    """An instant written with its UTC offset, within the years 1 to 9999 in UTC."""
    if not isinstance(value, str) or len(value) > 40:
        raise bad_page_token()
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError("no offset")
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise bad_page_token() from None
