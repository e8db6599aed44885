"""Several ReserveCredit, Commit or release calls decided in one round trip to PostgreSQL.

Each batch is one call of a PL/pgSQL function generated from the per-call statement of
postgres_hot_path (the very text, its parameters read from arrays): the function runs that
statement once per item, so every item is decided by the same rule, in one transaction, against
the rows as the items before it left them. The items go in the order of their tenant, then of
their arrival: one tenant's items are decided in the order they came (the cap stays exact to
the micro), and every batch locks tenant rows in the same order, so two batches (of this server
or another) never wait on each other in a cycle. A batch that settles holds (commit, release)
first locks them all, in hold_id order, so that it too takes each hold before its tenant, like
every other writer (`hold_locks`).

Per item, in its own subtransaction, the function answers:
- `done`: the statement's row (the hold taken, the usage record written, the hold released);
- `fallback`: the statement wrote nothing (no room, unknown tenant or hold, a hold not live or
  settled by an earlier item, a budget to move):
  the caller decides it in the general transaction, as a lone call would;
- `conflict`: a unique key of the item exists (a retried request_id): its writes are undone,
  and the caller replays the stored answer;
- `fallback` too when a budget filled under the statement (its 1 / 0 guard).
One item's failure never undoes another's. A lost connection loses the whole batch (one
transaction): every caller gets the fault and retries with the same request_id.

The function's name carries a digest of its text, so a server only ever calls the version it
was built with, and two versions coexist while servers are replaced. It is created on first use
in each database (CREATE OR REPLACE under an advisory lock, so concurrent servers agree).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import TextClause

_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
# Batches are capped: each item is a subtransaction, and PostgreSQL keeps up to 64 of them per
# transaction in shared memory before every snapshot gets slower.
MAX_BATCH = 64


@dataclass(frozen=True)
class BatchFunction:
    """A per-call statement run over arrays of its parameters, one item at a time."""

    name: str
    create_sql: str
    call_sql: str
    parameters: tuple[str, ...]

    def call_args(self, items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """The arrays of the call: one per parameter, one element per item."""
        return [[item[name] for item in items] for name in self.parameters]


def batch_function(
    kind: str,
    statement: TextClause,
    *,
    outputs: tuple[tuple[str, str], ...],
    tenant_of: str,
    lock_first: str = "",
) -> BatchFunction:
    """kind: reserve, commit or release. outputs: the (name, SQL type) the statement's
    RETURNING row is read into, answered for an item done. tenant_of: SQL that gives the tenant
    of item `ord` from the parameter arrays (`p_<name>[ord]`), to lock tenants in order.
    lock_first: a PL/pgSQL statement run before the items, over the parameter arrays, that locks
    the rows the items will update ahead of their tenants (see `hold_locks`)."""
    sql = statement.text
    types = {
        name: param.type.compile(dialect=_DIALECT) for name, param in statement._bindparams.items()
    }
    names = tuple(sorted(set(_PARAMETER.findall(sql))))
    body = _PARAMETER.sub(lambda match: f"p_{match.group(1)}[item]", sql).strip()
    arguments = ",\n    ".join(f"p_{name} {types[name]}[]" for name in names)
    first = f"p_{names[0]}"
    columns = ", ".join(f"{output} {sql_type}" for output, sql_type in outputs)
    targets = ", ".join(output for output, _ in outputs)
    cleared = " ".join(f"{output} := NULL;" for output, _ in outputs)
    digest_source = f"{kind}\n{arguments}\n{body}\n{columns}\n{tenant_of}"
    locking = ""
    if lock_first:
        digest_source += f"\n{lock_first}"
        locking = f"\n    {lock_first};"
    name = f"billing_{kind}_batch_{hashlib.sha256(digest_source.encode()).hexdigest()[:12]}"
    create_sql = f"""
CREATE OR REPLACE FUNCTION {name}(
    {arguments}
) RETURNS TABLE (item integer, item_outcome text, {columns})
LANGUAGE plpgsql AS $batch$
#variable_conflict use_column
BEGIN{locking}
    FOR item IN
        SELECT ord::integer FROM generate_series(1, cardinality({first})) AS ord
        ORDER BY ({tenant_of}), ord
    LOOP
        {cleared}
        BEGIN
            {body}
            INTO {targets};
            item_outcome := CASE WHEN FOUND THEN 'done' ELSE 'fallback' END;
        EXCEPTION
            WHEN unique_violation THEN
                item_outcome := 'conflict';
                {cleared}
            WHEN division_by_zero THEN
                item_outcome := 'fallback';
                {cleared}
        END;
        RETURN NEXT;
    END LOOP;
END
$batch$
"""
    placeholders = ", ".join(
        f"${index}::{types[param]}[]" for index, param in enumerate(names, start=1)
    )
    call_sql = f"SELECT item, item_outcome, {targets} FROM {name}({placeholders})"
    return BatchFunction(name, create_sql, call_sql, names)


def hold_locks(parameter: str) -> str:
    """Locks the holds named by the array `p_<parameter>`, in hold_id order, before any item.

    A statement that settles a hold (commit, release, the general transaction, the sweep)
    locks the hold, then its tenant. A batch of them locks a tenant with its first item and
    keeps it to the end, so without this its next hold of that tenant would be locked after the
    tenant: a lone statement holding that hold and waiting for the tenant would close a cycle
    (a deadlock, one of the two aborted). Locked first, every hold a batch settles is held
    before any tenant, the order of every other writer."""
    return (
        f"PERFORM 1 FROM holds WHERE holds.hold_id = ANY(p_{parameter})"
        " ORDER BY holds.hold_id FOR UPDATE"
    )


def install_sql(function: BatchFunction) -> list[str]:
    """The statements that create `function` if needed, in one transaction."""
    # A fixed key: servers installing any batch function take turns.
    return ["SELECT pg_advisory_xact_lock(7718250431)", function.create_sql]
