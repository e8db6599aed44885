"""UsageService over a real port: summaries equal the records, pages lose and repeat nothing,
the CSV parses back to the records, and bad requests name their field."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from billing.v1 import types_pb2, usage_pb2
from billing_service import usage
from billing_service.storage.tables import ledger_entries, usage_records
from tests.support.grpc_errors import rich_error
from tests.usage.conftest import Client

JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


async def direct_sums(
    client: Client, tenant_id: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """The period's totals, per model and per user, summed in Python over the records."""
    async with client.app.engine.connect() as conn:
        rows = list(
            await conn.execute(select(usage_records).where(usage_records.c.tenant_id == tenant_id))
        )
    totals: dict[str, dict[str, list[int]]] = {"all": defaultdict(lambda: [0] * 6)}
    totals["model"] = defaultdict(lambda: [0] * 6)
    totals["user"] = defaultdict(lambda: [0] * 6)
    for row in rows:
        if not start <= row.committed_at < end:
            continue
        values = (
            1,
            row.input_tokens,
            row.cached_input_tokens,
            row.output_tokens,
            row.cost_micros,
            row.charged_micros,
        )
        for group, key in (("all", ""), ("model", row.model), ("user", row.user_id)):
            totals[group][key] = [a + b for a, b in zip(totals[group][key], values, strict=True)]
    return {group: dict(values) for group, values in totals.items()}


def as_list(totals: usage_pb2.UsageTotals) -> list[int]:
    tokens = totals.tokens
    return [
        totals.call_count,
        tokens.input_tokens,
        tokens.cached_input_tokens,
        tokens.output_tokens,
        totals.cost_micros,
        totals.charged_micros,
    ]


async def summary(client: Client, tenant_id: str, **period: datetime) -> Any:
    request = usage_pb2.GetUsageSummaryRequest(
        tenant_id=tenant_id, **{key: stamp(value) for key, value in period.items()}
    )
    return await client.usage.GetUsageSummary(request)


async def assert_summary_matches_records(
    client: Client, tenant_id: str, start: datetime, end: datetime
) -> usage_pb2.GetUsageSummaryResponse:
    answer = await summary(client, tenant_id, start_time=start, end_time=end)
    expected = await direct_sums(client, tenant_id, start, end)
    assert answer.start_time.ToDatetime(tzinfo=UTC) == start
    assert answer.end_time.ToDatetime(tzinfo=UTC) == end
    assert as_list(answer.totals) == expected["all"].get("", [0] * 6)
    assert {m.model: as_list(m.totals) for m in answer.by_model} == expected["model"]
    assert {u.user_id: as_list(u.totals) for u in answer.by_user} == expected["user"]
    costs = [m.totals.cost_micros for m in answer.by_model]
    assert costs == sorted(costs, reverse=True)
    return answer


async def test_summaries_equal_the_records_across_midnight_and_month_ends(client: Client) -> None:
    await client.create_tenant("acme")
    # 23:59:59.5 on Jan 31, then the last microsecond of January, then midnight and after.
    await client.call("acme", model="gpt-4o", user_id="ann")
    client.clock.now = FEB - timedelta(microseconds=1)
    await client.call("acme", model="gpt-4o-mini", user_id="bob", input_tokens=300)
    client.clock.now = FEB
    await client.call("acme", model="gpt-4o", user_id="bob", output_tokens=40)
    client.clock.advance(microseconds=1)
    await client.call("acme", model="o3", user_id="ann", input_tokens=5000)
    client.clock.now = MAR - timedelta(seconds=1)
    await client.call("acme", model="gpt-4o", user_id="cy")
    client.clock.now = MAR
    await client.call("acme", model="gpt-4o-mini", user_id="cy")
    await client.call("acme", model="gpt-4o", user_id="ann")

    january = await assert_summary_matches_records(client, "acme", JAN, FEB)
    assert january.totals.call_count == 2
    february = await assert_summary_matches_records(client, "acme", FEB, MAR)
    assert february.totals.call_count == 3
    assert await assert_summary_matches_records(client, "acme", MAR, MAR + timedelta(days=1))
    whole = await assert_summary_matches_records(client, "acme", JAN, MAR + timedelta(days=1))
    assert whole.totals.call_count == 7 == await client.records_count("acme")
    one_day = await assert_summary_matches_records(client, "acme", FEB, FEB + timedelta(days=1))
    assert one_day.totals.call_count == 2
    included = next(m for m in whole.by_model if m.model == "gpt-4o-mini")
    assert included.totals.charged_micros == 0 < included.totals.cost_micros

    # Unset period: the calendar month (UTC) of the clock, which is now March 1st.
    default = await client.usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(tenant_id="acme"))
    assert default.start_time.ToDatetime(tzinfo=UTC) == MAR
    assert default.end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 4, 1, tzinfo=UTC)
    assert default.totals.call_count == 2
    # Only a start: up to the first day of the next month.
    from_mid_feb = await summary(client, "acme", start_time=FEB + timedelta(days=14))
    assert from_mid_feb.end_time.ToDatetime(tzinfo=UTC) == MAR
    assert from_mid_feb.totals.call_count == 1


async def test_summary_reports_the_account_and_the_share_of_the_limit_used(
    client: Client,
) -> None:
    await client.create_tenant("acme")
    record = await client.call("acme", input_tokens=100_000, output_tokens=10_000)
    answer = await summary(client, "acme", start_time=JAN, end_time=MAR)
    assert answer.tenant.tenant_id == "acme"
    balance = answer.tenant.balance
    assert balance.balance_micros == -record.charged_micros
    assert balance.exposure_micros == record.charged_micros
    # 350,009 of 1,000,000,000 micros: 3.50009 basis points, rounded down.
    assert record.charged_micros == 350_009
    assert answer.limit_used_basis_points == 3
    # The payments side's profile: this tenant never saved a card.
    assert answer.billing_profile.tenant_id == "acme"
    assert not answer.billing_profile.HasField("payment_method")
    assert not answer.by_user_truncated


@pytest.mark.parametrize(
    ("period", "field"),
    [
        ({"start_time": JAN + timedelta(hours=1)}, "start_time"),
        ({"start_time": JAN, "end_time": FEB + timedelta(seconds=1)}, "end_time"),
        ({"start_time": FEB, "end_time": JAN}, "end_time"),
        ({"start_time": FEB, "end_time": FEB}, "end_time"),
        ({"start_time": JAN, "end_time": JAN + timedelta(days=367)}, "end_time"),
    ],
)
async def test_a_bad_summary_period_names_its_field(
    client: Client, period: dict[str, datetime], field: str
) -> None:
    await client.create_tenant("acme")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await summary(client, "acme", **period)
    error = rich_error(raised.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.fields) == ("FIELD_INVALID", [field])


async def test_a_full_leap_year_is_a_valid_period(client: Client) -> None:
    await client.create_tenant("acme")
    start = datetime(2028, 1, 1, tzinfo=UTC)
    answer = await summary(client, "acme", start_time=start, end_time=start + timedelta(days=366))
    assert answer.totals.call_count == 0


async def test_unknown_tenants_and_bad_ids_are_refused_by_every_method(client: Client) -> None:
    calls = [
        lambda t: client.usage.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(tenant_id=t)),
        lambda t: client.usage.ListUsageRecords(usage_pb2.ListUsageRecordsRequest(tenant_id=t)),
        lambda t: client.usage.ListLedgerEntries(usage_pb2.ListLedgerEntriesRequest(tenant_id=t)),
        lambda t: export(client, t, JAN, FEB),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call("nobody")
        error = rich_error(raised.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call("")
        error = rich_error(raised.value)
        assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["tenant_id"])


# Pagination


async def all_pages(
    client: Client, request: usage_pb2.ListUsageRecordsRequest, between: Any = None
) -> list[types_pb2.UsageRecord]:
    records: list[types_pb2.UsageRecord] = []
    while True:
        page = await client.usage.ListUsageRecords(request)
        assert len(page.usage_records) <= (request.page_size or 100)
        records.extend(page.usage_records)
        if not page.next_page_token:
            return records
        if between is not None:
            await between()
        request.page_token = page.next_page_token


def newest_first(records: list[types_pb2.UsageRecord]) -> bool:
    keys = [(r.commit_time.ToDatetime(), r.reservation_id) for r in records]
    return keys == sorted(keys, reverse=True)


async def test_pages_lose_and_repeat_nothing_while_usage_is_written(client: Client) -> None:
    await client.create_tenant("acme")
    before: list[str] = []
    for number in range(23):
        # Three records per instant: ties on the commit time are broken by the record's id.
        if number % 3 == 0:
            client.clock.advance(seconds=1)
        before.append((await client.call("acme", user_id=f"u{number % 4}")).reservation_id)

    async def write_more() -> None:
        client.clock.advance(seconds=1)
        for _ in range(2):
            await client.call("acme")

    request = usage_pb2.ListUsageRecordsRequest(tenant_id="acme", page_size=5)
    paged = await all_pages(client, request, write_more)
    ids = [r.reservation_id for r in paged]
    assert len(ids) == len(set(ids)) == 23
    assert set(ids) == set(before)
    assert newest_first(paged)
    assert await client.records_count("acme") == 23 + 2 * 4

    everything = await all_pages(client, usage_pb2.ListUsageRecordsRequest(tenant_id="acme"))
    assert len(everything) == 31
    assert newest_first(everything)


async def test_filters_select_by_model_user_and_period(client: Client) -> None:
    await client.create_tenant("acme")
    await client.create_tenant("other")
    await client.call("other", user_id="ann")
    for number in range(9):
        client.clock.advance(hours=5)
        await client.call(
            "acme", model=("gpt-4o", "o3")[number % 2], user_id=("ann", "bob", "cy")[number % 3]
        )
    records = await all_pages(client, usage_pb2.ListUsageRecordsRequest(tenant_id="acme"))
    assert len(records) == 9
    start, end = records[6].commit_time, records[1].commit_time
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"model": "o3"}, lambda r: r.model == "o3"),
        ({"user_id": "bob"}, lambda r: r.user_id == "bob"),
        ({"model": "o3", "user_id": "ann"}, lambda r: (r.model, r.user_id) == ("o3", "ann")),
        (
            {"start_time": start, "end_time": end},
            lambda r: start.ToDatetime() <= r.commit_time.ToDatetime() < end.ToDatetime(),
        ),
    ]
    for filters, wanted in cases:
        request = usage_pb2.ListUsageRecordsRequest(tenant_id="acme", page_size=2, **filters)
        got = await all_pages(client, request)
        assert [r.reservation_id for r in got] == [r.reservation_id for r in records if wanted(r)]
        assert got


async def test_bad_page_requests_name_their_field(client: Client) -> None:
    await client.create_tenant("acme")
    for _ in range(3):
        await client.call("acme", user_id="ann")
    first = await client.usage.ListUsageRecords(
        usage_pb2.ListUsageRecordsRequest(tenant_id="acme", user_id="ann", page_size=1)
    )
    assert first.next_page_token
    bad_requests = [
        ({"user_id": "bob", "page_token": first.next_page_token}, "page_token"),
        ({"page_token": first.next_page_token}, "page_token"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "eyJmIjoxfQ"}, "page_token"),
        ({"page_size": -1}, "page_size"),
        ({"start_time": stamp(FEB), "end_time": stamp(JAN)}, "end_time"),
        ({"model": "has space"}, "model"),
    ]
    for fields, field in bad_requests:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.usage.ListUsageRecords(
                usage_pb2.ListUsageRecordsRequest(tenant_id="acme", **fields)
            )
        error = rich_error(raised.value)
        assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), fields
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.usage.ListLedgerEntries(
            usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", page_token=first.next_page_token)
        )
    assert rich_error(raised.value).fields == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.usage.ListLedgerEntries(
            usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", kinds=[42])  # type: ignore[list-item]
        )
    assert rich_error(raised.value).fields == ["kinds"]


async def test_the_ledger_statement_pages_newest_first_and_filters_kinds(client: Client) -> None:
    await client.create_tenant("acme")
    for _ in range(4):
        client.clock.advance(seconds=1)
        await client.call("acme")

    async def write_more() -> None:
        await client.call("acme")

    async def pages(request: usage_pb2.ListLedgerEntriesRequest, between: Any = None) -> list[Any]:
        entries: list[Any] = []
        while True:
            page = await client.usage.ListLedgerEntries(request)
            entries.extend(page.ledger_entries)
            if not page.next_page_token:
                return entries
            if between is not None:
                await between()
            request.page_token = page.next_page_token

    async with client.app.engine.connect() as conn:
        stored = list(
            await conn.execute(select(ledger_entries).order_by(ledger_entries.c.entry_id.desc()))
        )
    entries = await pages(
        usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", page_size=3), write_more
    )
    assert [e.ledger_entry_id for e in entries] == [row.entry_id for row in stored]
    assert [e.balance_after_micros for e in entries] == [row.balance_after_micros for row in stored]
    assert entries[0].kind == usage_pb2.LEDGER_ENTRY_KIND_DEBIT
    assert entries[-1].kind == usage_pb2.LEDGER_ENTRY_KIND_HOLD
    assert all(e.reservation_id.startswith("rsv_") for e in entries)
    debits = await pages(
        usage_pb2.ListLedgerEntriesRequest(
            tenant_id="acme", kinds=[usage_pb2.LEDGER_ENTRY_KIND_DEBIT], page_size=2
        )
    )
    assert len(debits) == 4 + 2  # two more calls were written while paging
    assert {e.kind for e in debits} == {usage_pb2.LEDGER_ENTRY_KIND_DEBIT}
    assert sum(e.balance_delta_micros for e in entries) + sum(
        e.balance_delta_micros for e in debits[:2]
    ) == sum(e.balance_delta_micros for e in debits)


# CSV


async def export(client: Client, tenant_id: str, start: datetime, end: datetime) -> list[bytes]:
    stream = client.usage.ExportUsageCsv(
        usage_pb2.ExportUsageCsvRequest(
            tenant_id=tenant_id, start_time=stamp(start), end_time=stamp(end)
        )
    )
    return [chunk.csv_data async for chunk in stream]


def iso(value: Timestamp) -> str:
    return usage.iso_utc(value.ToDatetime(tzinfo=UTC))


async def test_the_csv_export_parses_back_to_the_records(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks and batches, so that a few records cross both boundaries.
    monkeypatch.setattr(usage, "CSV_CHUNK_BYTES", 600)
    monkeypatch.setattr(usage, "EXPORT_BATCH", 4)
    await client.create_tenant("acme")
    for number in range(11):
        client.clock.advance(minutes=7)
        model = ("gpt-4o", "o3")[number % 2]
        await client.call("acme", user_id=f'u"{number}",quoted', model=model)
    chunks = await export(client, "acme", JAN, MAR)
    assert len(chunks) > 2
    assert all(chunk.endswith(b"\r\n") for chunk in chunks)
    assert all(len(chunk) < 600 + 400 for chunk in chunks)
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode(), newline="")))
    assert tuple(rows[0]) == usage.CSV_HEADER
    records = await all_pages(client, usage_pb2.ListUsageRecordsRequest(tenant_id="acme"))
    expected = [
        [
            r.reservation_id,
            r.tenant_id,
            r.user_id,
            r.model,
            str(r.usage.input_tokens),
            str(r.usage.cached_input_tokens),
            str(r.usage.output_tokens),
            str(r.cost_micros),
            str(r.charged_micros),
            str(r.uncollected_micros),
            str(r.held_micros),
            "credit",
            iso(r.reserve_time),
            iso(r.commit_time),
        ]
        for r in reversed(records)
    ]
    assert rows[1:] == expected
    assert len(expected) == 11
    # Half-open period: the end excludes a record committed exactly then.
    last = records[0].commit_time.ToDatetime(tzinfo=UTC)
    bounded = await export(client, "acme", JAN, last)
    assert len(list(csv.reader(io.StringIO(b"".join(bounded).decode())))) == 1 + 10


async def test_an_empty_export_is_the_header_alone_and_a_period_is_required(
    client: Client,
) -> None:
    await client.create_tenant("acme")
    chunks = await export(client, "acme", JAN, FEB)
    assert b"".join(chunks) == (",".join(usage.CSV_HEADER) + "\r\n").encode()
    stream = client.usage.ExportUsageCsv(
        usage_pb2.ExportUsageCsvRequest(tenant_id="acme", start_time=stamp(JAN))
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [chunk async for chunk in stream]
    assert rich_error(raised.value).fields == ["end_time"]


async def test_a_boundary_a_nanosecond_past_midnight_is_refused(client: Client) -> None:
    await client.create_tenant("acme")
    start = stamp(JAN)
    start.nanos = 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.usage.GetUsageSummary(
            usage_pb2.GetUsageSummaryRequest(tenant_id="acme", start_time=start)
        )
    assert rich_error(raised.value).fields == ["start_time"]
