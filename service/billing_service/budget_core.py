"""BudgetService's use cases: set, read, list and remove budgets inside a tenant."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from billing_service.domain.budgets import (
    Budget,
    BudgetScope,
    BudgetUsage,
    DeleteBudget,
    SetBudget,
    validate_budget_key,
    validate_delete_budget,
    validate_set_budget,
)
from billing_service.domain.commands import check_id, check_range, fingerprint
from billing_service.domain.errors import ErrorReason, NotFound, request_id_reused
from billing_service.domain.page_tokens import (
    PageTokens,
    bad_page_token,
    filters_fingerprint,
    position_text,
)

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000


class BudgetPort(Protocol):
    async def tenant_exists(self, tenant_id: str) -> bool: ...

    async def set_budget(
        self, budget: Budget, request_id: str, request_fingerprint: str, now: datetime
    ) -> tuple[BudgetUsage, str] | None: ...

    async def delete_budget(
        self,
        tenant_id: str,
        scope: BudgetScope,
        scope_id: str,
        request_id: str,
        request_fingerprint: str,
        now: datetime,
    ) -> tuple[BudgetUsage, str] | None: ...

    async def get_budget(
        self, tenant_id: str, scope: BudgetScope, scope_id: str, now: datetime
    ) -> BudgetUsage | None: ...

    async def list_budgets(
        self,
        tenant_id: str,
        scope: BudgetScope | None,
        after: tuple[str, str] | None,
        limit: int,
        now: datetime,
    ) -> list[BudgetUsage]: ...


class BudgetCore:
    def __init__(
        self, store: BudgetPort, clock: Callable[[], datetime], page_tokens: PageTokens
    ) -> None:
        self._store = store
        self._clock = clock
        self._page_tokens = page_tokens

    async def set_budget(self, command: SetBudget) -> BudgetUsage:
        budget = validate_set_budget(command)
        request_fingerprint = fingerprint(command)
        stored = await self._store.set_budget(
            budget, command.request_id, request_fingerprint, self._clock()
        )
        if stored is None:
            raise _tenant_not_found(budget.tenant_id)
        return _checked(stored, request_fingerprint, command.request_id)

    async def delete_budget(self, command: DeleteBudget) -> BudgetUsage:
        scope = validate_delete_budget(command)
        request_fingerprint = fingerprint(command)
        removed = await self._store.delete_budget(
            command.tenant_id,
            scope,
            command.scope_id,
            command.request_id,
            request_fingerprint,
            self._clock(),
        )
        if removed is None:
            await self._require_tenant(command.tenant_id)
            raise _budget_not_found(scope, command.scope_id)
        return _checked(removed, request_fingerprint, command.request_id)

    async def get_budget(
        self, tenant_id: str, scope: BudgetScope | None, scope_id: str
    ) -> BudgetUsage:
        checked = validate_budget_key(tenant_id, scope, scope_id)
        usage = await self._store.get_budget(tenant_id, checked, scope_id, self._clock())
        if usage is None:
            await self._require_tenant(tenant_id)
            raise _budget_not_found(checked, scope_id)
        return usage

    async def list_budgets(
        self, tenant_id: str, scope: BudgetScope | None, page_size: int, page_token: str
    ) -> tuple[list[BudgetUsage], str]:
        check_id("tenant_id", tenant_id)
        check_range("page_size", page_size, 0, PAGE_SIZE_MAX)
        after = await self._resume_after(page_token, tenant_id, scope)
        await self._require_tenant(tenant_id)
        limit = page_size or PAGE_SIZE_DEFAULT
        found = await self._store.list_budgets(tenant_id, scope, after, limit + 1, self._clock())
        page = found[:limit]
        token = ""
        if len(found) > limit:
            last = page[-1].budget
            position = [last.scope.value, last.scope_id]
            token = await self._page_tokens.make(_scope_filters(tenant_id, scope), position)
        return page, token

    async def _resume_after(
        self, token: str, tenant_id: str, scope: BudgetScope | None
    ) -> tuple[BudgetScope, str] | None:
        position = await self._page_tokens.read(token, _scope_filters(tenant_id, scope), 2)
        if position is None:
            return None
        try:
            after_scope = BudgetScope(position_text(position[0]))
        except ValueError:
            raise bad_page_token() from None
        return after_scope, position_text(position[1])

    async def _require_tenant(self, tenant_id: str) -> None:
        if not await self._store.tenant_exists(tenant_id):
            raise _tenant_not_found(tenant_id)


def _scope_filters(tenant_id: str, scope: BudgetScope | None) -> str:
    return filters_fingerprint(tenant_id=tenant_id, scope=None if scope is None else scope.value)


def _checked(
    stored: tuple[BudgetUsage, str], request_fingerprint: str, request_id: str
) -> BudgetUsage:
    usage, stored_fingerprint = stored
    if stored_fingerprint != request_fingerprint:
        raise request_id_reused(request_id)
    return usage


def _tenant_not_found(tenant_id: str) -> NotFound:
    return NotFound(ErrorReason.TENANT_NOT_FOUND, f"tenant {tenant_id} does not exist")


def _budget_not_found(scope: BudgetScope, scope_id: str) -> NotFound:
    return NotFound(
        ErrorReason.BUDGET_NOT_FOUND, f"no budget on {scope.value} {scope_id!r} in this tenant"
    )
