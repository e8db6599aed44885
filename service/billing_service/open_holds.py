"""Operators and open holds: one tenant's holds still keeping credit, oldest first (AIP-158)."""

from __future__ import annotations

from billing_service.domain.commands import check_id
from billing_service.domain.errors import InvalidArgument
from billing_service.domain.page_tokens import (
    PageTokens,
    filters_fingerprint,
    position_text,
    position_time,
)
from billing_service.storage.open_holds import OpenHold, OpenHoldStore

_PAGE_SIZE_DEFAULT = 100
_PAGE_SIZE_MAX = 1000


class OpenHoldListing:
    def __init__(self, store: OpenHoldStore, page_tokens: PageTokens) -> None:
        self._store = store
        self._page_tokens = page_tokens

    async def list_open_holds(
        self, tenant_id: str, user_id: str, api_key_id: str, page_size: int, page_token: str
    ) -> tuple[list[OpenHold], str]:
        """One page of the tenant's open holds, oldest first, of one user and one API key
        when given."""
        check_id("tenant_id", tenant_id)
        if user_id:
            check_id("user_id", user_id)
        if api_key_id:
            check_id("api_key_id", api_key_id)
        if not 0 <= page_size <= _PAGE_SIZE_MAX:
            raise InvalidArgument("page_size", f"must be 0 to {_PAGE_SIZE_MAX}")
        size = page_size or _PAGE_SIZE_DEFAULT
        filters = filters_fingerprint(tenant=tenant_id, user=user_id, api_key=api_key_id)
        position = await self._page_tokens.read(page_token, filters, 2)
        after = (
            None if position is None else (position_time(position[0]), position_text(position[1]))
        )
        found = await self._store.list_open_holds(
            tenant_id, user_id or None, api_key_id or None, after, size + 1
        )
        page = found[:size]
        next_token = ""
        if len(found) > size:
            last = page[-1]
            next_token = await self._page_tokens.make(
                filters, [last.created_at.isoformat(), last.hold_id]
            )
        return page, next_token
