"""A PostgreSQL failover under load: three server replicas on a pg_auto_failover formation (a
primary and its synchronous standby), reservations, commits and releases from many workers; the
primary is killed with SIGKILL (its keeper and every PostgreSQL process), the monitor promotes the
standby, and the same replicas go on serving without a restart.

Afterwards every call that answered OK is in the database as answered, sending each one again with
its request_id answers the same, no request_id took effect twice, the books balance and no tenant
is past its credit limit. Every failed attempt answered UNAVAILABLE / STORAGE_UNAVAILABLE and was
retried with the same request (clients retry those; the outcome of the failed attempt, applied or
not, is what the retry returns). The counts and the seconds without answers are printed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from billing_service.storage.database import create_engine
from billing_service.storage.tables import holds, ledger_entries, usage_records
from tests.ledger.books import assert_books_balance
from tests.ops.conftest import UNIT_PRICES
from tests.support.grpc_errors import rich_error
from tests.support.postgres_ha import AutoFailoverFormation
from tests.support.server_process import ServerProcess, start_together

pytestmark = pytest.mark.slow

REPLICAS = 3
WORKERS = 18
AMOUNT = 3_000
# Half the tenants can hold at most a few reservations and run out of credit as commits charge
# them: the cap is tested across the failover too. The other half never run out.
TENANTS = {f"tight-{i}": 40 * AMOUNT for i in range(3)} | {f"roomy-{i}": 10**12 for i in range(3)}
CALLS_BEFORE_KILL = 300
CALLS_AFTER_PROMOTION = 300
CALL_TIMEOUT_S = 20.0
RETRY_DELAY_S = 0.05  # a client's backoff between attempts of one call
FAILOVER_TIMEOUT_S = 90.0  # bounds every wait below; reaching one is a failure


@dataclass
class Call:
    """One logical call: the request sent on every attempt and the answer that ended it."""

    method: str
    replica: int
    request: Message
    answer: Message | None = None
    failed_attempts: list[tuple[float, str, str]] = field(default_factory=list)
    answered_at: float = 0.0


@dataclass
class Load:
    stubs: list[billing_pb2_grpc.BillingServiceStub]
    calls: list[Call] = field(default_factory=list)
    stop: bool = False
    killed_at: float | None = None
    killed_at_wall: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    promoted_at: float | None = None
    enough_before_kill: asyncio.Event = field(default_factory=asyncio.Event)
    enough_after_promotion: asyncio.Event = field(default_factory=asyncio.Event)

    def _progress(self) -> None:
        answered = [c for c in self.calls if c.answer is not None]
        if len(answered) >= CALLS_BEFORE_KILL:
            self.enough_before_kill.set()
        if self.promoted_at is not None:
            after = [c for c in answered if c.answered_at > self.promoted_at]
            replicas = {c.replica for c in after}
            if len(after) >= CALLS_AFTER_PROMOTION and len(replicas) == REPLICAS:
                self.enough_after_promotion.set()

    async def send(self, replica: int, method: str, request: Message) -> Any:
        """Sends `request` until it is answered, retrying UNAVAILABLE with the same request."""
        call = Call(method, replica, request)
        self.calls.append(call)
        rpc: Callable[..., Awaitable[Any]] = getattr(self.stubs[replica], method)
        while True:
            try:
                call.answer = await rpc(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                details = rich_error(error)
                call.failed_attempts.append((time.monotonic(), details.code.name, details.reason))
                if details.code != grpc.StatusCode.UNAVAILABLE:
                    return None  # not retried; the test fails on it below
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            call.answered_at = time.monotonic()
            self._progress()
            return call.answer

    async def worker(self, number: int) -> None:
        rng = random.Random(number)
        replica = number % REPLICAS
        tenant = list(TENANTS)[number % len(TENANTS)]
        while not self.stop:
            reserved = await self.send(
                replica,
                "ReserveCredit",
                billing_pb2.ReserveCreditRequest(
                    request_id=f"reserve-{uuid.uuid4()}",
                    tenant_id=tenant,
                    user_id=f"user-{number}",
                    model="unit-priced",
                    amount_micros=AMOUNT,
                ),
            )
            if reserved is None or not reserved.decision.allowed:
                continue
            reservation_id = reserved.reservation.reservation_id
            if rng.random() < 0.7:
                await self.send(
                    replica,
                    "Commit",
                    billing_pb2.CommitRequest(
                        request_id=f"commit-{uuid.uuid4()}",
                        reservation_id=reservation_id,
                        # Some above the hold: charged up to the limit, the rest uncollected.
                        usage=types_pb2.TokenUsage(output_tokens=rng.randrange(2 * AMOUNT)),
                    ),
                )
            else:
                await self.send(
                    replica,
                    "Release",
                    billing_pb2.ReleaseRequest(
                        request_id=f"release-{uuid.uuid4()}", reservation_id=reservation_id
                    ),
                )


@pytest.fixture(scope="module")
def formation() -> Iterator[AutoFailoverFormation]:
    with AutoFailoverFormation() as started:
        yield started


def test_a_failover_under_load_loses_no_answer(
    formation: AutoFailoverFormation, tmp_path: Path
) -> None:
    url = formation.create_database("failover")
    prices = tmp_path / "prices.toml"
    prices.write_text(UNIT_PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        "BILLING_DB_POOL_SIZE": "8",
        "BILLING_HEALTH_CHECK_INTERVAL_S": "0.5",
        "BILLING_ACCESS_LOG": "false",
    }
    with start_together(*[settings] * REPLICAS) as replicas:
        pids = [replica.process.pid for replica in replicas]
        load = asyncio.run(_failover_under_load(formation, replicas))
        assert [replica.process.poll() for replica in replicas] == [None] * REPLICAS
        assert [replica.process.pid for replica in replicas] == pids
        asyncio.run(_check(url, load))
        _report(load)
        _report_logs(load, replicas)


async def _failover_under_load(
    formation: AutoFailoverFormation, replicas: list[ServerProcess]
) -> Load:
    channels = [grpc.aio.insecure_channel(replica.address) for replica in replicas]
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channels[0])
        for tenant, limit in TENANTS.items():
            await admin.CreateTenant(
                admin_pb2.CreateTenantRequest(
                    request_id=str(uuid.uuid4()),
                    tenant_id=tenant,
                    payment_method_on_file=True,
                    credit_limit_micros=limit,
                )
            )
        load = Load([billing_pb2_grpc.BillingServiceStub(channel) for channel in channels])
        started = time.monotonic()
        workers = [asyncio.create_task(load.worker(n)) for n in range(WORKERS)]
        try:
            async with asyncio.timeout(FAILOVER_TIMEOUT_S):
                await load.enough_before_kill.wait()
            primary = formation.primary()
            (standby,) = [node for node in formation.nodes if node is not primary]
            load.killed_at, load.killed_at_wall = time.monotonic(), time.time()
            load.phases["load before the kill"] = load.killed_at - started
            await asyncio.to_thread(formation.kill, primary)
            await asyncio.to_thread(formation.wait_for_primary, standby, FAILOVER_TIMEOUT_S)
            load.promoted_at = time.monotonic()
            async with asyncio.timeout(FAILOVER_TIMEOUT_S):
                await load.enough_after_promotion.wait()
            load.phases["load after the promotion"] = time.monotonic() - load.promoted_at
        finally:
            load.stop = True
            async with asyncio.timeout(FAILOVER_TIMEOUT_S):
                await asyncio.gather(*workers)
        for channel in channels:
            health = health_pb2_grpc.HealthStub(channel)
            ready = await health.Check(
                health_pb2.HealthCheckRequest(service="billing.v1.BillingService")
            )
            assert ready.status == health_pb2.HealthCheckResponse.SERVING
        # Every answered call sent again with its request_id: the same answer.
        replaying = asyncio.Semaphore(WORKERS)

        async def replay(call: Call) -> None:
            async with replaying:
                rpc = getattr(load.stubs[call.replica], call.method)
                again = await rpc(call.request, timeout=CALL_TIMEOUT_S)
            assert again == call.answer, (call.method, call.request)

        started = time.monotonic()
        await asyncio.gather(*(replay(call) for call in load.calls if call.answer is not None))
        load.phases["replay"] = time.monotonic() - started
        return load
    finally:
        for channel in channels:
            await channel.close()


async def _check(url: str, load: Load) -> None:
    assert load.killed_at is not None
    assert load.promoted_at is not None
    failures = [attempt for call in load.calls for attempt in call.failed_attempts]
    assert {(code, reason) for _, code, reason in failures} <= {
        ("UNAVAILABLE", "STORAGE_UNAVAILABLE")
    }, failures
    assert all(call.answer is not None for call in load.calls)

    engine = create_engine(url, pool_size=2)
    try:
        async with engine.connect() as conn:
            held = {
                row.request_id: row
                for row in await conn.execute(
                    select(holds.c.request_id, holds.c.hold_id, holds.c.status)
                )
            }
            used = {
                row.request_id: row
                for row in await conn.execute(
                    select(usage_records.c.request_id, usage_records.c.charged_micros)
                )
            }
            released = {
                row.request_id
                for row in await conn.execute(
                    select(ledger_entries.c.request_id).where(ledger_entries.c.kind == "release")
                )
            }
            per_request = await conn.execute(
                select(holds.c.request_id, func.count())
                .group_by(holds.c.request_id)
                .having(func.count() > 1)
            )
            assert list(per_request) == []
        for call in load.calls:
            answer: Any = call.answer
            request: Any = call.request
            if call.method == "ReserveCredit":
                stored = held[request.request_id]
                if answer.decision.allowed:
                    assert stored.hold_id == answer.reservation.reservation_id
                else:
                    assert stored.status == "denied"
            elif call.method == "Commit":
                assert used[request.request_id].charged_micros == (
                    answer.usage_record.charged_micros
                )
            else:
                assert request.request_id in released
        await assert_books_balance(engine)
    finally:
        await engine.dispose()


def _report(load: Load) -> None:
    assert load.killed_at is not None
    assert load.promoted_at is not None
    retried = [call for call in load.calls if call.failed_attempts]
    failed_attempts = sum(len(call.failed_attempts) for call in load.calls)
    denied = sum(
        1
        for call in load.calls
        if call.method == "ReserveCredit" and not call.answer.decision.allowed  # type: ignore[union-attr]
    )
    gaps = []
    for replica in range(REPLICAS):
        times = sorted(c.answered_at for c in load.calls if c.replica == replica)
        gaps.append(max(b - a for a, b in itertools.pairwise(times)))
    failed_at = sorted(at for call in load.calls for at, _, _ in call.failed_attempts)
    first_after_kill = min(c.answered_at for c in load.calls if c.answered_at > load.killed_at)
    print(
        f"\nfailover: {len(load.calls)} calls answered OK ({denied} of them denials), "
        f"{len(retried)} retried after {failed_attempts} failed attempts "
        f"(all UNAVAILABLE / STORAGE_UNAVAILABLE); standby promoted "
        f"{load.promoted_at - load.killed_at:.1f} s after the kill; first answer after the "
        f"kill at +{first_after_kill - load.killed_at:.1f} s; failed attempts from "
        f"+{failed_at[0] - load.killed_at:.1f} s to +{failed_at[-1] - load.killed_at:.1f} s; "
        f"longest time without an answer "
        f"per replica: {', '.join(f'{gap:.1f} s' for gap in gaps)}; phases (s): "
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in load.phases.items())
    )


def _report_logs(load: Load, replicas: list[ServerProcess]) -> None:
    """What an operator reads in the replicas' logs: readiness changes and the causes of the
    UNAVAILABLE answers, relative to the kill."""
    causes: Counter[str] = Counter()
    for number, replica in enumerate(replicas):
        for line in replica.log:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            message = str(record.get("message", ""))
            at = datetime.fromisoformat(record["time"]).timestamp() - load.killed_at_wall
            if message.startswith(("ready:", "not ready:")):
                print(f"replica {number} at {at:+.1f} s: {message[:150]}")
            elif " unavailable: " in message:
                cause = message.split(" unavailable: ", 1)[1]
                causes[re.sub(r"\d+", "N", cause)[:160]] += 1
    for cause, count in causes.most_common():
        print(f"{count:5d} x unavailable: {cause}")
