"""Our charges and ledger beside what Stripe (localstripe) actually did, read from both sides.

`charge_problems` states the promises about card money once, for every test that injects
faults: each PaymentIntent that succeeded at Stripe is credited exactly once, nothing is
credited that did not succeed there, no charge Stripe took money for is marked failed or left
without an outcome, and automatic charges never take more than the ceiling in any month.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.storage.tables import charges, ledger_entries
from tests.support.localstripe import API_KEY

_AUTOMATIC = ("automatic", "on_demand")


@dataclass(frozen=True)
class Intent:
    payment_intent_id: str
    status: str
    amount_cents: int
    charge_id: str | None


async def intents_at_stripe(stripe_url: str, customer_id: str) -> list[Intent]:
    """Every PaymentIntent of the customer, read from localstripe itself (every page)."""
    found: list[Intent] = []
    after = ""
    async with httpx.AsyncClient(base_url=stripe_url, auth=(API_KEY, ""), timeout=30) as http:
        while True:
            params = {"limit": "100", **({"starting_after": after} if after else {})}
            page = (await http.get("/v1/payment_intents", params=params)).raise_for_status()
            body = page.json()
            for intent in body["data"]:
                if intent.get("customer") == customer_id:
                    metadata = intent.get("metadata") or {}
                    found.append(
                        Intent(
                            intent["id"],
                            intent["status"],
                            intent["amount"],
                            metadata.get("charge_id"),
                        )
                    )
            if not body["has_more"] or not body["data"]:
                return found
            after = body["data"][-1]["id"]


async def charge_rows(engine: AsyncEngine, tenant_id: str) -> list[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(charges)
            .where(charges.c.tenant_id == tenant_id)
            .order_by(charges.c.created_at, charges.c.charge_id)
        )
        return list(rows)


async def top_up_credits(engine: AsyncEngine, tenant_id: str) -> list[tuple[str, str | None]]:
    """(charge id, PaymentIntent id) of every TOP_UP ledger entry of the tenant."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(ledger_entries.c.charge_id, charges.c.payment_intent_id)
            .join(charges, charges.c.charge_id == ledger_entries.c.charge_id)
            .where(ledger_entries.c.tenant_id == tenant_id, ledger_entries.c.kind == "top_up")
        )
        return [(row.charge_id, row.payment_intent_id) for row in rows]


async def charge_problems(
    engine: AsyncEngine,
    stripe_url: str,
    tenant_id: str,
    customer_id: str,
    ceiling_micros: int | None,
) -> list[str]:
    """What breaks a promise about the tenant's card money; empty when the books agree."""
    intents = await intents_at_stripe(stripe_url, customer_id)
    rows = {row.charge_id: row for row in await charge_rows(engine, tenant_id)}
    credits = await top_up_credits(engine, tenant_id)
    problems: list[str] = []
    succeeded = {i.payment_intent_id: i for i in intents if i.status == "succeeded"}
    credited = Counter(intent_id for _, intent_id in credits)
    for intent_id, intent in succeeded.items():
        if credited[intent_id] != 1:
            problems.append(
                f"{intent_id} (charge {intent.charge_id}) succeeded at Stripe and was credited "
                f"{credited[intent_id]} times"
            )
        row = rows.get(intent.charge_id or "")
        if row is None:
            problems.append(f"{intent_id} succeeded for a charge we do not have")
        elif row.status not in ("succeeded", "refunded"):
            problems.append(f"charge {row.charge_id} is {row.status}; Stripe took its money")
    for intent_id, times in credited.items():
        if intent_id not in succeeded:
            problems.append(f"{intent_id} was credited {times} times without a success at Stripe")
    per_charge = Counter(intent.charge_id for intent in intents)
    problems += [
        f"charge {charge_id} made {n} PaymentIntents"
        for charge_id, n in per_charge.items()
        if n > 1
    ]
    problems += [
        f"charge {row.charge_id} is still {row.status}"
        for row in rows.values()
        if row.status in ("pending", "unresolved")
    ]
    if ceiling_micros is not None:
        taken: defaultdict[tuple[int, int], int] = defaultdict(int)
        for intent in succeeded.values():
            row = rows.get(intent.charge_id or "")
            if row is not None and row.trigger in _AUTOMATIC:
                made = row.created_at.astimezone(UTC)
                taken[(made.year, made.month)] += intent.amount_cents * 10_000
        problems += [
            f"automatic charges took {micros} micros in {year}-{month:02} (ceiling "
            f"{ceiling_micros})"
            for (year, month), micros in taken.items()
            if micros > ceiling_micros
        ]
    return problems
