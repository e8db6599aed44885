"""Setting tenants up fast, bulk-loading a big ledger, and the invariant check after every run.

Tenants in bulk are direct SQL inserts: the tenant row plus the matching `grant` ledger entry,
exactly what AdminService CreateTenant + GrantCredit would leave behind, so the ledger audit
stays clean. The hot tenant is set up through the admin RPCs.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from sqlalchemy import case, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import workload
from billing.v1 import admin_pb2, admin_pb2_grpc
from billing_service.storage.audit import audit_ledger
from billing_service.storage.tables import ledger_entries, tenants

_log = logging.getLogger("bench")
_CHUNK = 2_000


async def seed_tenants(engine: AsyncEngine, tenant_ids: list[str]) -> None:
    """Creates active tenants with a payment method, a credit limit and a prepaid grant."""
    now = datetime.now(UTC)
    available = workload.GRANT_MICROS + workload.CREDIT_LIMIT_MICROS
    for start in range(0, len(tenant_ids), _CHUNK):
        chunk = tenant_ids[start : start + _CHUNK]
        async with engine.begin() as conn:
            await conn.execute(
                insert(tenants),
                [
                    {
                        "tenant_id": tenant_id,
                        "status": "active",
                        "credit_limit_micros": workload.CREDIT_LIMIT_MICROS,
                        "payment_method_on_file": True,
                        "balance_micros": workload.GRANT_MICROS,
                        "held_micros": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for tenant_id in chunk
                ],
            )
            await conn.execute(
                insert(ledger_entries),
                [
                    {
                        "tenant_id": tenant_id,
                        "kind": "grant",
                        "hold_id": None,
                        "request_id": f"bench-seed-{tenant_id}",
                        "request_fingerprint": None,
                        "balance_delta_micros": workload.GRANT_MICROS,
                        "held_delta_micros": 0,
                        "balance_after_micros": workload.GRANT_MICROS,
                        "held_after_micros": 0,
                        "available_after_micros": available,
                        "memo": "benchmark seed",
                        "created_at": now,
                    }
                    for tenant_id in chunk
                ],
            )


def create_tenant_via_admin(address: str, tenant_id: str) -> None:
    """The same tenant set-up through AdminService: CreateTenant, then GrantCredit."""
    with grpc.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.CreateTenant(
            admin_pb2.CreateTenantRequest(
                request_id=f"bench-create-{uuid.uuid4()}",
                tenant_id=tenant_id,
                credit_limit_micros=workload.CREDIT_LIMIT_MICROS,
                payment_method_on_file=True,
            ),
            timeout=30,
        )
        admin.GrantCredit(
            admin_pb2.GrantCreditRequest(
                request_id=f"bench-grant-{uuid.uuid4()}",
                tenant_id=tenant_id,
                amount_micros=workload.GRANT_MICROS,
                reason="benchmark",
            ),
            timeout=30,
        )


async def bulk_ledger(engine: AsyncEngine, rows: int, other_tenants: int = 1_000) -> dict[str, Any]:
    """Adds `rows` ledger entries (and rows/2 holds) for `other_tenants` other tenants.

    PostgreSQL only, INSERT ... SELECT generate_series. Each hold is a released one with its
    `hold` and `release` entries, so every tenant's books still balance (net zero).
    """
    holds_count = rows // 2
    started = time.monotonic()
    step = 1_000_000
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO tenants (tenant_id, status, credit_limit_micros, "
                "payment_method_on_file, balance_micros, held_micros, created_at, updated_at) "
                "SELECT 'bulk-' || g, 'active', 0, false, 0, 0, now(), now() "
                "FROM generate_series(1, :n) AS g"
            ),
            {"n": other_tenants},
        )
    for first in range(1, holds_count + 1, step):
        last = min(holds_count, first + step - 1)
        async with engine.begin() as conn:
            # The rows are consistent by construction: skip the per-row foreign-key triggers.
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(
                text(
                    "INSERT INTO holds (hold_id, request_id, request_fingerprint, tenant_id, "
                    "user_id, model, billing, input_micros_per_mtok, "
                    "cached_input_micros_per_mtok, output_micros_per_mtok, "
                    "flat_micros_per_call, amount_micros, status, decision_available_micros, "
                    "refunded_micros, created_at, expires_at, settled_at) "
                    "SELECT 'bulk-h-' || lpad(g::text, 12, '0'), "
                    "'bulk-r-' || lpad(g::text, 12, '0'), repeat('0', 64), "
                    "'bulk-' || (1 + g % :tenants), 'bulk-user', :model, 'metered', "
                    "1000000, 500000, 2000000, 0, 1000, 'released', 0, 0, "
                    "now() - interval '1 day', now() - interval '1 day' + interval '300 s', "
                    "now() - interval '1 day' "
                    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g"
                ),
                {"tenants": other_tenants, "model": workload.MODEL, "first": first, "last": last},
            )
            await conn.execute(
                text(
                    "INSERT INTO ledger_entries (tenant_id, kind, hold_id, "
                    "balance_delta_micros, held_delta_micros, balance_after_micros, "
                    "held_after_micros, available_after_micros, created_at) "
                    "SELECT 'bulk-' || (1 + g % :tenants), k.kind, "
                    "'bulk-h-' || lpad(g::text, 12, '0'), 0, "
                    "k.delta, 0, greatest(k.delta, 0), -greatest(k.delta, 0), "
                    "now() - interval '1 day' "
                    "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g, "
                    "(VALUES ('hold', 1000), ('release', -1000)) AS k(kind, delta) "
                    "ORDER BY g, k.delta DESC"
                ),
                {"tenants": other_tenants, "first": first, "last": last},
            )
        _log.info("big ledger: %d of %d holds written", last, holds_count)
    await vacuum_analyze(engine)
    async with engine.connect() as conn:
        entries = (await conn.execute(select(func.count()).select_from(ledger_entries))).scalar()
    return {
        "ledger_rows_added": holds_count * 2,
        "holds_added": holds_count,
        "other_tenants": other_tenants,
        "ledger_rows_total": int(entries or 0),
        "load_s": time.monotonic() - started,
    }


async def vacuum_analyze(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("VACUUM ANALYZE tenants, holds, ledger_entries"))


@dataclass(frozen=True)
class InvariantCheck:
    audit: list[str]
    tenants_below_zero: int
    min_available_micros: int | None

    @property
    def ok(self) -> bool:
        return not self.audit and self.tenants_below_zero == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "audit": self.audit[:20],
            "audit_problems": len(self.audit),
            "tenants_below_zero": self.tenants_below_zero,
            "min_available_micros": self.min_available_micros,
        }


async def check_invariants(engine: AsyncEngine) -> InvariantCheck:
    """audit_ledger(engine) == [] and no tenant's available credit below 0."""
    problems = await audit_ledger(engine)
    # balance + effective credit limit - held (the README's `available`), written out here.
    available = (
        tenants.c.balance_micros
        + case((tenants.c.payment_method_on_file, tenants.c.credit_limit_micros), else_=0)
        - tenants.c.held_micros
    )
    async with engine.connect() as conn:
        below = (await conn.execute(select(func.count()).where(available < 0))).scalar_one()
        minimum = (await conn.execute(select(func.min(available)))).scalar()
    return InvariantCheck(problems, int(below), None if minimum is None else int(minimum))
