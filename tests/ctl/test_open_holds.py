"""`billingctl holds list`: a tenant's open holds, oldest first, as a table or as JSON."""

from __future__ import annotations

import uuid

import grpc
import pytest

from billing.v1 import billing_pb2, billing_pb2_grpc
from tests.ctl.conftest import Ctl
from tests.support.server_process import ServerProcess


def _reserve(
    stub: billing_pb2_grpc.BillingServiceStub, tenant_id: str, user: str, key: str, micros: int
) -> str:
    response = stub.ReserveCredit(
        billing_pb2.ReserveCreditRequest(
            request_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            user_id=user,
            api_key_id=key,
            model="unit-priced",
            amount_micros=micros,
        ),
        timeout=10,
    )
    assert response.decision.allowed, response.decision
    return str(response.reservation.reservation_id)


@pytest.fixture
def holds(server: ServerProcess, tenant: str) -> list[str]:
    """Three open holds of `tenant` and one released one."""
    with grpc.insecure_channel(server.address) as channel:
        stub = billing_pb2_grpc.BillingServiceStub(channel)
        taken = [
            _reserve(stub, tenant, "alice", "key-1", 1_500_000),
            _reserve(stub, tenant, "bob", "key-1", 250_000),
            _reserve(stub, tenant, "alice", "key-2", 10_000),
            _reserve(stub, tenant, "carol", "key-2", 70_000),
        ]
        stub.Release(
            billing_pb2.ReleaseRequest(request_id=str(uuid.uuid4()), reservation_id=taken[3]),
            timeout=10,
        )
    return taken[:3]


def test_the_table_shows_each_open_hold_with_who_took_it(
    ctl: Ctl, tenant: str, holds: list[str]
) -> None:
    lines = ctl.ok("holds", "list", tenant).stdout.splitlines()
    assert lines[0].split()[:5] == ["HOLD", "USER", "API", "KEY", "MODEL"]
    rows = [line.split() for line in lines[1:]]
    assert sorted(row[0] for row in rows) == sorted(holds)
    by_id = {row[0]: row for row in rows}
    assert by_id[holds[0]][1:5] == ["alice", "key-1", "unit-priced", "$1.50"]
    assert by_id[holds[1]][1:5] == ["bob", "key-1", "unit-priced", "$0.25"]
    assert by_id[holds[2]][1:5] == ["alice", "key-2", "unit-priced", "$0.01"]


def test_json_filters_and_limit(ctl: Ctl, tenant: str, holds: list[str]) -> None:
    everything = ctl.ok("--json", "holds", "list", tenant).json()
    assert {hold["hold_id"] for hold in everything["holds"]} == set(holds)
    assert sum(int(hold["amount_micros"]) for hold in everything["holds"]) == 1_760_000
    times = [hold["create_time"] for hold in everything["holds"]]
    assert times == sorted(times)

    alice = ctl.ok("--json", "holds", "list", tenant, "--user", "alice").json()
    assert {hold["hold_id"] for hold in alice["holds"]} == {holds[0], holds[2]}
    key_1 = ctl.ok("--json", "holds", "list", tenant, "--api-key", "key-1").json()
    assert {hold["hold_id"] for hold in key_1["holds"]} == {holds[0], holds[1]}

    first = ctl.ok("--json", "holds", "list", tenant, "--limit", "2").json()
    assert len(first["holds"]) == 2
    assert first["next_page_token"]
    rest = ctl.ok(
        "--json", "holds", "list", tenant, "--page-token", first["next_page_token"]
    ).json()
    assert [hold["hold_id"] for hold in first["holds"] + rest["holds"]] == [
        hold["hold_id"] for hold in everything["holds"]
    ]


def test_a_bad_user_is_refused_naming_the_field(ctl: Ctl, tenant: str) -> None:
    result = ctl("--json", "holds", "list", tenant, "--user", "x" * 129)
    assert result.code != 0
    assert result.error()["code"] == "INVALID_ARGUMENT"
    assert result.error()["fields"] == ["user_id"]
