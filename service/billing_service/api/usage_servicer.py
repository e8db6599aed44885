"""gRPC servicer of billing.v1.UsageService: converts, calls the dashboard, converts back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from billing.v1 import account_pb2, usage_pb2, usage_pb2_grpc
from billing_service.api import usage_convert
from billing_service.api.errors import maps_errors, rich_status
from billing_service.api.fields import optional_time
from billing_service.domain.errors import BillingError
from billing_service.usage import UsageDashboard

Dashboard = UsageDashboard[account_pb2.BillingProfile]


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, dashboard: Dashboard) -> None:
        self._dashboard = dashboard

    @maps_errors
    async def GetUsageSummary(
        self,
        request: usage_pb2.GetUsageSummaryRequest,
        context: grpc.aio.ServicerContext[
            usage_pb2.GetUsageSummaryRequest, usage_pb2.GetUsageSummaryResponse
        ],
    ) -> usage_pb2.GetUsageSummaryResponse:
        summary = await self._dashboard.summary(
            request.tenant_id,
            optional_time(request, "start_time"),
            optional_time(request, "end_time"),
        )
        return usage_convert.summary_response(summary)

    @maps_errors
    async def ListUsageRecords(
        self,
        request: usage_pb2.ListUsageRecordsRequest,
        context: grpc.aio.ServicerContext[
            usage_pb2.ListUsageRecordsRequest, usage_pb2.ListUsageRecordsResponse
        ],
    ) -> usage_pb2.ListUsageRecordsResponse:
        page = await self._dashboard.usage_records(
            usage_convert.usage_filter(request), request.page_size, request.page_token
        )
        return usage_convert.usage_records_response(page)

    @maps_errors
    async def ListLedgerEntries(
        self,
        request: usage_pb2.ListLedgerEntriesRequest,
        context: grpc.aio.ServicerContext[
            usage_pb2.ListLedgerEntriesRequest, usage_pb2.ListLedgerEntriesResponse
        ],
    ) -> usage_pb2.ListLedgerEntriesResponse:
        page = await self._dashboard.ledger_entries(
            usage_convert.ledger_filter(request), request.page_size, request.page_token
        )
        return usage_convert.ledger_entries_response(page)

    async def ExportUsageCsv(
        self,
        request: usage_pb2.ExportUsageCsvRequest,
        context: grpc.aio.ServicerContext[
            usage_pb2.ExportUsageCsvRequest, usage_pb2.ExportUsageCsvResponse
        ],
    ) -> AsyncIterator[usage_pb2.ExportUsageCsvResponse]:
        try:
            chunks = await self._dashboard.export_csv(
                request.tenant_id,
                optional_time(request, "start_time"),
                optional_time(request, "end_time"),
            )
            async for chunk in chunks:
                yield usage_pb2.ExportUsageCsvResponse(csv_data=chunk)
        except BillingError as error:
            # maps_errors wraps unary handlers only; a stream reports its error the same way.
            status = rich_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
