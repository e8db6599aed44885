"""No request, valid protobuf or not, gets an answer it should not: a generated test over every
method of every service in the contract, against a real server on a real port.

For each method (found from the descriptors, so a new RPC is covered without editing this
file), hypothesis sends generated requests as raw bytes, authenticated as an operator, with
Stripe at localstripe, and checks each answer:

- its status code is OK or one the method's documentation names; never UNKNOWN, INTERNAL or
  DATA_LOSS;
- a request holding an undefined enum number, an UNSPECIFIED among a repeated enum's values or
  a Duration or Timestamp out of its type's range is INVALID_ARGUMENT, never silently taken;
- its message names no exception class and holds no traceback, SQL or file path;
- an error carries an ErrorInfo, and INVALID_ARGUMENT a BadRequest naming a field of the
  request (or the request itself, for bytes that are not one), first in the message;
- after an error every table holds exactly the rows it held before.

BILLING_TEST_EXAMPLES sets the examples per method (default 12, kept small for CI); set it to
a few hundred for a longer run.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.v1 import (
    admin_pb2,
    billing_pb2,
    budget_pb2,
    types_pb2,
    usage_pb2,
)
from billing_service.app import Application
from billing_service.config import Settings
from billing_service.storage.database import create_engine
from billing_service.storage.tables import metadata
from tests.support.clock import FakeClock
from tests.support.contract import Rpc, contract_rpcs, documented_codes, field_exists
from tests.support.localstripe import API_KEY, LocalStripe
from tests.support.postgres import PostgresServer
from tests.support.request_strategies import (
    Hints,
    describe,
    edited_tokens,
    invalid_values,
    request_strings,
    requests,
)

EXAMPLES = int(os.environ.get("BILLING_TEST_EXAMPLES", "12"))
OPERATOR_TOKEN = "operator-token-for-generated-requests"
AUTH = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
CALL_TIMEOUT_S = 30.0
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS})
# Codes the service answers with an ErrorInfo of its own.
OURS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
    }
)

# What an answer must never show: Python internals, SQL, paths.
LEAKS = re.compile(
    r"Traceback|<class |\b[A-Z]\w*(?:Error|Exception|Warning)\b|\bFile \"|\.py\b|"
    r"\b(?:SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|WHERE|RETURNING)\b|"
    r"sqlalchemy|asyncpg|aiosqlite|sqlite3|psycopg|site-packages|/usr/|/tmp/|/home/|/work/",
)
MESSAGE_LENGTH_MAX = 1000

_databases = itertools.count()


@dataclass
class Target:
    """One server under test, its own event loop (hypothesis calls tests synchronously), and a
    second engine that reads every table between calls."""

    loop: asyncio.AbstractEventLoop
    app: Application
    channel: grpc.aio.Channel
    reader: AsyncEngine
    stripe: bool
    hints: Hints = field(default_factory=Hints)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)


async def database_rows(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for table in metadata.sorted_tables:
            order = list(table.primary_key.columns) or list(table.columns)
            result = await conn.execute(select(table).order_by(*order))
            rows[table.name] = [tuple(row) for row in result]
    return rows


def _start(url: str, stripe: LocalStripe | None) -> Target:
    loop = asyncio.new_event_loop()
    values: dict[str, Any] = {
        "database_url": url,
        "listen_address": "127.0.0.1:0",
        "auth_tokens": f"operator={OPERATOR_TOKEN}",
        # Nothing changes the tables between calls: holds expire only when the test's clock
        # moves, and no tenant has a card for the charge worker to charge.
        "expiry_sweep_interval_s": 3600.0,
        "charge_worker_interval_s": 3600.0,
        "reconcile_interval_s": 3600.0,
        "access_log": False,
        "log_level": "WARNING",
    }
    if stripe is not None:
        values.update(stripe_api_key=API_KEY, stripe_api_base=stripe.url)
    clock = FakeClock(datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC))
    app = loop.run_until_complete(Application.start(Settings(**values), clock=clock))
    channel = loop.run_until_complete(_open_channel(app.port))
    reader = create_engine(url, pool_size=1)
    target = Target(loop, app, channel, reader, stripe is not None)
    loop.run_until_complete(_seed(target))
    return target


async def _open_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _stop(target: Target) -> None:
    target.run(target.channel.close())
    target.run(target.app.stop(grace_s=0))
    target.run(target.reader.dispose())
    target.loop.close()


async def _call(target: Target, path: str, request: Any, response_class: Any) -> Any:
    method = target.channel.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return await method(request, metadata=AUTH, timeout=CALL_TIMEOUT_S)


async def _set_budget(target: Target, request_id: str, budget: types_pb2.Budget) -> None:
    await _call(
        target,
        "/billing.v1.BudgetService/SetBudget",
        budget_pb2.SetBudgetRequest(request_id=request_id, budget=budget),
        budget_pb2.SetBudgetResponse,
    )


async def _seed(target: Target) -> None:
    """Tenants, a budget, open and committed reservations, usage and ledger entries, so that
    generated requests can name things that exist."""
    hints = target.hints
    admin, billing = "/billing.v1.AdminService", "/billing.v1.BillingService"
    tenants = ["acme", "globex", "initech"]
    for tenant_id in tenants:
        await _call(
            target,
            f"{admin}/CreateTenant",
            admin_pb2.CreateTenantRequest(
                request_id=f"create-{tenant_id}",
                tenant_id=tenant_id,
                payment_method_on_file=tenant_id != "initech",
            ),
            admin_pb2.CreateTenantResponse,
        )
    await _call(
        target,
        f"{admin}/GrantCredit",
        admin_pb2.GrantCreditRequest(
            request_id="grant-acme", tenant_id="acme", amount_micros=5_000_000, reason="seed"
        ),
        admin_pb2.GrantCreditResponse,
    )
    await _set_budget(
        target,
        "budget-ann",
        types_pb2.Budget(
            tenant_id="acme",
            scope=types_pb2.BUDGET_SCOPE_USER,
            scope_id="ann",
            limit_micros=3_000_000,
            period=types_pb2.BUDGET_PERIOD_MONTH,
        ),
    )
    reservations = []
    for number in range(4):
        reserved = await _call(
            target,
            f"{billing}/ReserveCredit",
            billing_pb2.ReserveCreditRequest(
                request_id=f"reserve-{number}",
                tenant_id="acme",
                user_id="ann" if number % 2 else "bob",
                model="gpt-4o",
                amount_micros=50_000,
            ),
            billing_pb2.ReserveCreditResponse,
        )
        reservations.append(reserved.reservation.reservation_id)
    for number, reservation_id in enumerate(reservations[:2]):
        await _call(
            target,
            f"{billing}/Commit",
            billing_pb2.CommitRequest(
                request_id=f"commit-{number}",
                reservation_id=reservation_id,
                usage=types_pb2.TokenUsage(input_tokens=1000, output_tokens=500),
            ),
            billing_pb2.CommitResponse,
        )
    hints.add("tenant_id", *tenants)
    hints.add("reservation_id", *reservations)
    hints.add("user_id", "ann", "bob")
    hints.add("scope_id", "ann", "bob")
    hints.add("api_key_id", "key-1")
    hints.add("model", "gpt-4o", "gpt-4o-mini", "claude-haiku-4-5", "no-such-model")
    hints.add("request_id", "create-acme", "grant-acme", "reserve-0", "commit-0", "budget-ann")
    hints.add("charge_id", "chg_" + uuid.uuid4().hex)
    hints.add("setup_intent_id", "seti_" + uuid.uuid4().hex[:24])
    hints.add("reason", "goodwill", "")
    await _seed_page_tokens(target)


async def _seed_page_tokens(target: Target) -> None:
    """A real next_page_token of every list, and outsiders' edits of it."""
    pages: list[tuple[str, Any, Any]] = [
        (
            "/billing.v1.AdminService/ListTenants",
            admin_pb2.ListTenantsRequest(page_size=1),
            admin_pb2.ListTenantsResponse,
        ),
        (
            "/billing.v1.AdminService/ListOpenHolds",
            admin_pb2.ListOpenHoldsRequest(tenant_id="acme", page_size=1),
            admin_pb2.ListOpenHoldsResponse,
        ),
        (
            "/billing.v1.UsageService/ListUsageRecords",
            usage_pb2.ListUsageRecordsRequest(tenant_id="acme", page_size=1),
            usage_pb2.ListUsageRecordsResponse,
        ),
        (
            "/billing.v1.UsageService/ListLedgerEntries",
            usage_pb2.ListLedgerEntriesRequest(tenant_id="acme", page_size=1),
            usage_pb2.ListLedgerEntriesResponse,
        ),
        (
            "/billing.v1.BudgetService/ListBudgets",
            budget_pb2.ListBudgetsRequest(tenant_id="acme", page_size=1),
            budget_pb2.ListBudgetsResponse,
        ),
    ]
    for path, request, response_class in pages:
        if path.endswith("ListBudgets"):
            # One budget is one page; a second one makes a token.
            await _set_budget(
                target,
                "budget-key",
                types_pb2.Budget(
                    tenant_id="acme",
                    scope=types_pb2.BUDGET_SCOPE_API_KEY,
                    scope_id="key-1",
                    limit_micros=1_000_000,
                    period=types_pb2.BUDGET_PERIOD_DAY,
                ),
            )
        page = await _call(target, path, request, response_class)
        token = page.next_page_token
        assert token, f"{path} returned no page token to start from"
        target.hints.page_tokens[path] = [token, *edited_tokens(token)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    localstripe: LocalStripe,
) -> Iterator[Target]:
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"any_request_{next(_databases)}")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('any_request') / 'billing.db'}"
    target = _start(url, localstripe)
    yield target
    _stop(target)


@pytest.fixture(scope="module")
def target_without_stripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('no_stripe') / 'billing.db'}"
    target = _start(url, None)
    yield target
    _stop(target)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None


async def _send(target: Target, rpc: Rpc, raw: bytes) -> Answer:
    try:
        if rpc.server_streaming:
            stream = target.channel.unary_stream(
                rpc.path, request_serializer=None, response_deserializer=None
            )
            async for _chunk in stream(raw, metadata=AUTH, timeout=CALL_TIMEOUT_S):
                pass
        else:
            unary = target.channel.unary_unary(
                rpc.path, request_serializer=None, response_deserializer=None
            )
            await unary(raw, metadata=AUTH, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        status = None
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                status = status_pb2.Status.FromString(value)
        return Answer(error.code(), error.details() or "", status)
    return Answer(grpc.StatusCode.OK, "", None)


def _without_echoes(message: str, strings: list[str]) -> str:
    """The message without the caller's own input that it quotes (a tenant id named in "tenant
    X does not exist" may well be the word SELECT)."""
    for value in sorted(strings, key=len, reverse=True):
        if value:
            message = message.replace(repr(value), "").replace(value, "")
    return message


def check_answer(target: Target, rpc: Rpc, raw: bytes, answer: Answer) -> None:
    request = describe(rpc.request, raw)
    where = f"{rpc} answered {answer.code.name} {answer.message!r} to\n{request}"
    assert answer.code not in NEVER, where
    allowed = documented_codes()[rpc.path] | {grpc.StatusCode.OK}
    documented = sorted(code.name for code in allowed)
    assert answer.code in allowed, f"{where}\n(not among the documented {documented})"
    if invalid := invalid_values(rpc.request, raw):
        # Never silently ignored nor defaulted: refused (by these fields, or an earlier one).
        assert answer.code is grpc.StatusCode.INVALID_ARGUMENT, f"{where}\n({invalid} invalid)"
    if answer.code is grpc.StatusCode.OK:
        return
    assert len(answer.message) <= MESSAGE_LENGTH_MAX, where
    leak = LEAKS.search(_without_echoes(answer.message, request_strings(rpc.request, raw)))
    assert leak is None, f"{where}\n(leaks {leak.group(0)!r})"
    if answer.code not in OURS:
        return
    assert answer.status is not None, f"{where}\n(no google.rpc.Status details)"
    infos = [d for d in answer.status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"{where}\n(no ErrorInfo)"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.domain, bool(info.reason)) == ("ai-billing", True), where
    needs_stripe = rpc.service.endswith("AccountService") and rpc.name != "GetBillingProfile"
    if needs_stripe and not target.stripe and answer.code is not grpc.StatusCode.INVALID_ARGUMENT:
        assert info.reason == "STRIPE_NOT_CONFIGURED", where
    if answer.code is not grpc.StatusCode.INVALID_ARGUMENT:
        return
    violations = []
    for detail in answer.status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [violation.field for violation in bad_request.field_violations]
    assert violations, f"{where}\n(no BadRequest field violation)"
    for name in violations:
        assert field_exists(rpc.request, name), f"{where}\n({name!r} is not a request field)"
    assert answer.message.startswith(f"{violations[0]}:"), f"{where}\n(message not by field)"


def exercise(target: Target, rpc: Rpc, raw: bytes) -> None:
    before = target.run(database_rows(target.reader))
    answer = target.run(_send(target, rpc, raw))
    check_answer(target, rpc, raw, answer)
    if answer.code is not grpc.StatusCode.OK:
        after = target.run(database_rows(target.reader))
        changed = [name for name in before if before[name] != after[name]]
        assert not changed, (
            f"{rpc} failed with {answer.code.name} {answer.message!r} but changed "
            f"{changed}; request:\n{describe(rpc.request, raw)}"
        )


RPCS = contract_rpcs()
ACCOUNT_RPCS = [rpc for rpc in RPCS if rpc.service == "billing.v1.AccountService"]
_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def skip_unless_served(target: Target, rpc: Rpc) -> None:
    """A method of the contract this server does not serve yet is reported as skipped (and
    covered as soon as it is served)."""
    answer = target.run(_send(target, rpc, b""))
    if answer.code is grpc.StatusCode.UNIMPLEMENTED:
        pytest.skip(f"{rpc} is in the contract but not served yet: {answer.message}")


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_any_request_gets_a_documented_answer_and_a_failure_changes_nothing(
    target: Target, rpc: Rpc
) -> None:
    skip_unless_served(target, rpc)

    @_settings
    @given(raw=requests(rpc.request, target.hints, rpc.path))
    def check(raw: bytes) -> None:
        exercise(target, rpc, raw)

    check()


@pytest.mark.parametrize("rpc", ACCOUNT_RPCS, ids=str)
def test_without_stripe_account_methods_say_so(target_without_stripe: Target, rpc: Rpc) -> None:
    @_settings
    @given(raw=requests(rpc.request, target_without_stripe.hints, rpc.path))
    def check(raw: bytes) -> None:
        exercise(target_without_stripe, rpc, raw)

    check()


def test_every_service_of_the_contract_is_covered() -> None:
    services = {rpc.service for rpc in RPCS}
    assert services >= {
        "billing.v1.BillingService",
        "billing.v1.AdminService",
        "billing.v1.AccountService",
        "billing.v1.UsageService",
        "billing.v1.BudgetService",
    }
    paths = {rpc.path for rpc in RPCS}
    assert {"/billing.v1.BillingService/Release", "/billing.v1.BillingService/ExtendHold"} <= paths
