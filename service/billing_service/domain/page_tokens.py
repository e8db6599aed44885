"""Page tokens (AIP-158), one format for every list: opaque, bound to the filters they serve.

A token is base64url JSON of the last position returned and a fingerprint of the filters; a
token sent with other filters is refused rather than silently paging another listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from billing_service.domain.errors import InvalidArgument


def filters_fingerprint(**filters: Any) -> str:
    encoded = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def make_page_token(fingerprint: str, position: list[Any]) -> str:
    body = json.dumps({"f": fingerprint, "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def read_page_token(token: str, fingerprint: str) -> list[Any] | None:
    """The position a token resumes after; None for the first page (empty token)."""
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise bad_page_token() from None
    if not isinstance(body, dict) or not isinstance(body.get("p"), list):
        raise bad_page_token()
    if body.get("f") != fingerprint:
        raise InvalidArgument(
            "page_token", "was made for other filters; send the first page's filters again"
        )
    position: list[Any] = body["p"]
    return position


def bad_page_token() -> InvalidArgument:
    return InvalidArgument("page_token", "is not a token this service returned")
