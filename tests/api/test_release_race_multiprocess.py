"""A Commit and a release of the same hold sent at the same moment to two server processes
sharing one PostgreSQL, round after round: exactly one of them wins, and a release never
refunds the charge of a commit that beat it.

The release is sent both ways callers send it: the Release RPC, and a Refund without an amount
(what clients sent before Release existed). The ledger is read at the end, hold by hold.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from billing.v1 import admin_pb2, admin_pb2_grpc, billing_pb2, billing_pb2_grpc, types_pb2
from billing_service.storage.database import create_engine
from tests.ledger.books import Tables, read_tables, table_problems
from tests.support.grpc_errors import rich_error
from tests.support.postgres import PostgresServer
from tests.support.server_process import ServerProcess

ROUNDS = 100
HOLD = 20_000
COST = 30_000  # above the hold, as in a query that used more than estimated
TENANT = "racing-tenant"
CALL_TIMEOUT_S = 60

# One output token costs one micro.
PRICES = """
[models."unit-priced"]
billing = "metered"
output_micros_per_mtok = 1_000_000
"""

pytestmark = pytest.mark.slow


async def _answer(call: Any) -> str:
    """ "OK", or the error's reason (its code when it has none)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        rich = rich_error(error)
        return rich.reason or rich.code.name
    return "OK"


async def _race(addresses: list[str]) -> list[tuple[str, str, str, str]]:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    try:
        billing = [billing_pb2_grpc.BillingServiceStub(channel) for channel in channels]
        admin = admin_pb2_grpc.AdminServiceStub(channels[0])
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=TENANT,
                credit_limit_micros=ROUNDS * COST,
                payment_method_on_file=True,
            )
        )
        rounds = []
        for number in range(ROUNDS):
            reserved = await billing[number % 2].ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id=f"reserve-{number}",
                    tenant_id=TENANT,
                    user_id="user",
                    model="unit-priced",
                    amount_micros=HOLD,
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert reserved.decision.allowed, reserved.decision
            reservation_id = reserved.reservation.reservation_id
            # The commit goes to one server, the release to the other, alternating.
            committer, releaser = billing[number % 2], billing[(number + 1) % 2]
            commit = committer.Commit(
                billing_pb2.CommitRequest(
                    request_id=f"commit-{number}",
                    reservation_id=reservation_id,
                    usage=types_pb2.TokenUsage(output_tokens=COST),
                ),
                timeout=CALL_TIMEOUT_S,
            )
            via = "Release" if number % 2 == 0 else "Refund"
            if via == "Release":
                release = releaser.Release(
                    billing_pb2.ReleaseRequest(
                        request_id=f"release-{number}", reservation_id=reservation_id
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            else:
                release = releaser.Refund(
                    billing_pb2.RefundRequest(
                        request_id=f"release-{number}", reservation_id=reservation_id
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            committed, released = await asyncio.gather(_answer(commit), _answer(release))
            rounds.append((reservation_id, via, committed, released))
    finally:
        for channel in channels:
            await channel.close()
    return rounds


async def _tables(url: str) -> Tables:
    engine = create_engine(url, pool_size=1)
    try:
        return await read_tables(engine)
    finally:
        await engine.dispose()


def test_commit_and_release_racing_on_two_servers_settle_each_hold_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database("release_race")
    price_table = tmp_path / "prices.toml"
    price_table.write_text(PRICES)
    settings = {
        "BILLING_DATABASE_URL": url,
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(price_table),
        "BILLING_DB_POOL_SIZE": "4",
    }
    with ServerProcess(settings) as first, ServerProcess(settings) as second:
        rounds = asyncio.run(_race([first.address, second.address]))
        assert first.terminate() == 0
        assert second.terminate() == 0
    tables = asyncio.run(_tables(url))

    outcomes: Counter[tuple[str, str, str]] = Counter()
    entries_of: dict[str, list[str]] = {}
    for entry in tables.entries:
        if entry.hold_id is not None:
            entries_of.setdefault(entry.hold_id, []).append(entry.kind)
    status_of = {hold.hold_id: hold.status for hold in tables.holds}
    for reservation_id, via, committed, released in rounds:
        outcomes[(via, committed, released)] += 1
        kinds = entries_of[reservation_id]
        # Never both a debit and a release (or a refund) of one hold.
        assert "refund" not in kinds, (via, kinds)
        if committed == "OK":
            assert released == "HOLD_ALREADY_COMMITTED", (via, committed, released)
            assert (status_of[reservation_id], kinds) == ("committed", ["hold", "debit"])
            assert tables.usage[reservation_id].charged_micros == COST
        else:
            assert (committed, released) == ("HOLD_RELEASED", "OK"), (via, committed, released)
            assert (status_of[reservation_id], kinds) == ("released", ["hold", "release"])
            assert reservation_id not in tables.usage
    print(sorted(outcomes.items()))
    assert table_problems(tables) == []
    (tenant,) = tables.tenants
    commits = sum(1 for _, _, committed, _ in rounds if committed == "OK")
    assert (tenant.balance_micros, tenant.held_micros) == (-commits * COST, 0)
