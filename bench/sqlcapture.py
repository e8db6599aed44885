"""What SQL the service sends today for one RPC, read from pg_stat_statements.

The harness fingerprints the statements of one ReserveCredit + one Commit and compares the result
with the fingerprint written in bench/pgbench/reserve_commit.sql: when they differ, the hot path
changed and the pgbench script no longer mirrors it (reported, not fatal).
`python -m bench.capture_sql` prints the statements, to update the script by hand.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

import grpc

from bench import workload
from bench.pg import Cluster
from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2

RPCS = ("ReserveCredit", "Commit", "Refund(release)", "CheckAccess")


_PLACEHOLDER = re.compile(r"\$\d+")
_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"(?<![\w$.])\d+(?:\.\d+)?\b")


def normalize(query: str) -> str:
    """Whitespace collapsed."""
    return " ".join(query.split())


def canonical(query: str) -> str:
    """Placeholders and literals as `?`: pg_stat_statements shows a statement with its constants
    as written, or replaced by $n when it saw the statement parsed after a reset."""
    query = _PLACEHOLDER.sub("?", normalize(query))
    query = _STRING.sub("?", query)
    return _NUMBER.sub("?", query)


def fingerprint(captured: dict[str, list[str]]) -> str:
    """16 hex digits over the ReserveCredit and Commit statements (order-insensitive)."""
    digest = hashlib.sha256()
    for rpc in ("ReserveCredit", "Commit"):
        for query in sorted(captured.get(rpc, [])):
            digest.update(query.encode())
            digest.update(b"\n")
        digest.update(b"--\n")
    return digest.hexdigest()[:16]


def _reserve(stub: billing_pb2_grpc.BillingServiceStub, tenant_id: str) -> str:
    answer = stub.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=f"capture-{uuid.uuid4()}",
            tenant_id=tenant_id,
            user_id="capture",
            model=workload.MODEL,
            estimate=billing_pb2.QueryEstimate(
                input_tokens=workload.ESTIMATE_INPUT_TOKENS,
                max_output_tokens=workload.ESTIMATE_MAX_OUTPUT_TOKENS,
            ),
        ),
        timeout=30,
    )
    if not answer.decision.allowed:
        raise RuntimeError(f"capture: reservation denied: {answer.decision.message}")
    return str(answer.reservation.reservation_id)


async def capture(cluster: Cluster, dbid: int, address: str, tenant_id: str) -> dict[str, Any]:
    """The statements each RPC ran (seen in two attempts, so a background sweep drops out),
    in canonical form."""
    attempts: list[dict[str, set[str]]] = []
    with grpc.insecure_channel(address) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        for _ in range(2):
            seen: dict[str, set[str]] = {}

            async def read(rpc: str, seen: dict[str, set[str]] = seen) -> None:
                seen[rpc] = {canonical(s.query) for s in await cluster.statements(dbid)}

            await cluster.reset_statements()
            reservation = _reserve(stub, tenant_id)
            await read("ReserveCredit")
            await cluster.reset_statements()
            stub.Commit(
                billing_pb2.CommitRequest(
                    request_id=f"capture-{uuid.uuid4()}",
                    reservation_id=reservation,
                    usage=types_pb2.TokenUsage(
                        input_tokens=workload.COMMIT_INPUT_TOKENS,
                        cached_input_tokens=workload.COMMIT_CACHED_INPUT_TOKENS,
                        output_tokens=300,
                    ),
                ),
                timeout=30,
            )
            await read("Commit")
            reservation = _reserve(stub, tenant_id)
            await cluster.reset_statements()
            stub.Refund(
                billing_pb2.RefundRequest(
                    request_id=f"capture-{uuid.uuid4()}", reservation_id=reservation
                ),
                timeout=30,
            )
            await read("Refund(release)")
            await cluster.reset_statements()
            stub.CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id=tenant_id, model=workload.MODEL),
                timeout=30,
            )
            await read("CheckAccess")
            attempts.append(seen)
    statements = {rpc: sorted(attempts[0][rpc] & attempts[1][rpc]) for rpc in RPCS}
    return {"statements": statements, "fingerprint": fingerprint(statements)}
