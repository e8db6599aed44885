"""gRPC servicer of billing.v1.BudgetService: converts, calls the budget core, converts back."""

from __future__ import annotations

from typing import Any

import grpc

from billing.v1 import budget_pb2, budget_pb2_grpc
from billing_service.api import convert
from billing_service.api.errors import maps_errors
from billing_service.budget_core import BudgetCore

_Context = grpc.aio.ServicerContext[Any, Any]


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, core: BudgetCore) -> None:
        self._core = core

    @maps_errors
    async def SetBudget(
        self, request: budget_pb2.SetBudgetRequest, context: _Context
    ) -> budget_pb2.SetBudgetResponse:
        usage = await self._core.set_budget(convert.set_budget(request))
        return budget_pb2.SetBudgetResponse(budget=convert.budget_usage(usage))

    @maps_errors
    async def GetBudget(
        self, request: budget_pb2.GetBudgetRequest, context: _Context
    ) -> budget_pb2.GetBudgetResponse:
        usage = await self._core.get_budget(
            request.tenant_id, convert.budget_scope("scope", request.scope), request.scope_id
        )
        return budget_pb2.GetBudgetResponse(budget=convert.budget_usage(usage))

    @maps_errors
    async def ListBudgets(
        self, request: budget_pb2.ListBudgetsRequest, context: _Context
    ) -> budget_pb2.ListBudgetsResponse:
        page, token = await self._core.list_budgets(
            request.tenant_id,
            convert.budget_scope("scope", request.scope),
            request.page_size,
            request.page_token,
        )
        return budget_pb2.ListBudgetsResponse(
            budgets=[convert.budget_usage(usage) for usage in page], next_page_token=token
        )

    @maps_errors
    async def DeleteBudget(
        self, request: budget_pb2.DeleteBudgetRequest, context: _Context
    ) -> budget_pb2.DeleteBudgetResponse:
        usage = await self._core.delete_budget(convert.delete_budget(request))
        return budget_pb2.DeleteBudgetResponse(budget=convert.budget_usage(usage))
