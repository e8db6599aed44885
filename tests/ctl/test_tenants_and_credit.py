"""`billingctl tenants ...`, `credit grant` and `refund` against a live server: what they print,
what they change (read back through the CLI's own JSON), and their exit codes."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from tests.ctl.conftest import Chat, Ctl


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def balance_micros(ctl: Ctl, tenant_id: str) -> int:
    tenant = ctl.ok("tenants", "get", tenant_id, "--json").json()["tenant"]
    return int(tenant["balance"]["balance_micros"])


def test_create_shows_the_tenant_in_dollars(ctl: Ctl) -> None:
    tenant_id = new_id()
    result = ctl.ok("tenants", "create", tenant_id, "--payment-method", "--credit-limit", "30.5")
    fields = result.fields()
    assert fields["Tenant"] == tenant_id
    assert fields["Status"] == "active"
    assert fields["Payment method"] == "on file"
    assert fields["Credit limit"] == "$30.50"
    assert fields["Effective limit"] == "$30.50"
    assert fields["Available"] == "$30.50"
    assert fields["Balance"] == "$0.00"


def test_get_json_is_the_protobuf_response_with_integer_micros(ctl: Ctl) -> None:
    tenant_id = new_id()
    ctl.ok("tenants", "create", tenant_id, "--credit-limit-micros", "1234567")
    tenant = ctl.ok("--json", "tenants", "get", tenant_id).json()["tenant"]
    assert tenant["tenant_id"] == tenant_id
    assert tenant["credit_limit_micros"] == "1234567"
    assert tenant["payment_method_on_file"] is False
    # No card: no credit extended.
    assert tenant["balance"]["effective_credit_limit_micros"] == "0"
    assert tenant["status"] == "TENANT_STATUS_ACTIVE"


def test_update_changes_only_what_is_given(ctl: Ctl) -> None:
    tenant_id = new_id()
    ctl.ok("tenants", "create", tenant_id, "--payment-method", "--credit-limit", "40")
    fields = ctl.ok("tenants", "update", tenant_id, "--status", "suspended").fields()
    assert fields["Status"] == "suspended"
    assert fields["Credit limit"] == "$40.00"
    assert fields["Payment method"] == "on file"
    ctl.ok("tenants", "update", tenant_id, "--no-payment-method")
    tenant = ctl.ok("tenants", "get", tenant_id, "--json").json()["tenant"]
    assert tenant["status"] == "TENANT_STATUS_SUSPENDED"
    assert tenant["payment_method_on_file"] is False
    assert tenant["balance"]["effective_credit_limit_micros"] == "0"


def test_grant_adds_exactly_the_amount_and_prints_it(ctl: Ctl) -> None:
    tenant_id = new_id()
    ctl.ok("tenants", "create", tenant_id)
    result = ctl.ok("credit", "grant", tenant_id, "--amount", "$12.34", "--reason", "welcome")
    assert result.stdout.startswith(f"Granted $12.34 to {tenant_id} (ledger entry ")
    assert "Balance $12.34, available $12.34." in result.stdout
    ctl.ok("credit", "grant", tenant_id, "--amount-micros", "1", "--reason", "one micro")
    assert balance_micros(ctl, tenant_id) == 12_340_001
    assert ctl.ok("tenants", "get", tenant_id).fields()["Balance"] == "$12.340001"


def test_a_retry_with_the_same_request_id_grants_once(ctl: Ctl) -> None:
    tenant_id = new_id()
    ctl.ok("tenants", "create", tenant_id)
    grant = ("credit", "grant", tenant_id, "--amount", "5", "--reason", "r", "--json")
    first = ctl.ok(*grant, "--request-id", "grant-once-1").json()
    again = ctl.ok(*grant, "--request-id", "grant-once-1").json()
    assert again == first
    assert balance_micros(ctl, tenant_id) == 5_000_000
    # The same id for another amount is refused and changes nothing.
    other = ctl(
        "credit",
        "grant",
        tenant_id,
        "--amount",
        "6",
        "--reason",
        "r",
        "--request-id",
        "grant-once-1",
        "--json",
    )
    assert other.code == 64 + 6  # ALREADY_EXISTS
    assert other.error()["reason"] == "REQUEST_ID_REUSED"
    assert balance_micros(ctl, tenant_id) == 5_000_000


def test_each_invocation_gets_its_own_request_id(ctl: Ctl) -> None:
    tenant_id = new_id()
    ctl.ok("tenants", "create", tenant_id)
    for _ in range(2):
        ctl.ok("credit", "grant", tenant_id, "--amount", "1", "--reason", "twice on purpose")
    assert balance_micros(ctl, tenant_id) == 2_000_000


def test_refund_part_then_the_rest_of_a_charge(ctl: Ctl, chat: Chat, tenant: str) -> None:
    record = chat.query(tenant, output_tokens=1_500)
    assert record.charged_micros == 1_500
    assert balance_micros(ctl, tenant) == 10_000_000 - 1_500

    part = ctl.ok("refund", record.reservation_id, "--amount-micros", "500", "--reason", "T-1")
    assert part.stdout.splitlines()[0] == (
        f"Refunded $0.0005 of {record.reservation_id} (refunded in all: $0.0005)."
    )
    assert balance_micros(ctl, tenant) == 10_000_000 - 1_000

    rest = ctl.ok("refund", record.reservation_id, "--all", "--reason", "T-1 rest", "--json")
    rest = rest.json()
    assert rest["kind"] == "REFUND_KIND_REFUND"
    assert rest["amount_micros"] == "1000"
    assert rest["refunded_total_micros"] == "1500"
    assert balance_micros(ctl, tenant) == 10_000_000

    too_much = ctl("refund", record.reservation_id, "--amount-micros", "1", "--reason", "x")
    assert too_much.code == 64 + 9  # FAILED_PRECONDITION
    assert "FAILED_PRECONDITION REFUND_EXCEEDS_CHARGE" in too_much.stderr
    assert balance_micros(ctl, tenant) == 10_000_000


def test_release_gives_an_open_hold_back_and_refund_never_does(
    ctl: Ctl, chat: Chat, tenant: str
) -> None:
    reservation_id = chat.reserve(tenant)
    held = ctl.ok("tenants", "get", tenant, "--json").json()["tenant"]["balance"]["held_micros"]
    assert held == "10000"
    refused = ctl("refund", reservation_id, "--all", "--reason", "wrong tool")
    assert refused.code == 64 + 9  # FAILED_PRECONDITION
    assert "FAILED_PRECONDITION HOLD_NOT_COMMITTED" in refused.stderr
    result = ctl.ok("release", reservation_id, "--reason", "model timed out")
    assert result.stdout.splitlines()[0] == f"Released the open hold {reservation_id} ($0.01)."
    balance = ctl.ok("tenants", "get", tenant, "--json").json()["tenant"]["balance"]
    assert balance["held_micros"] == "0"
    assert balance["balance_micros"] == "10000000"

    record = chat.query(tenant, output_tokens=1_500)
    committed = ctl("release", record.reservation_id, "--json")
    assert committed.code == 64 + 9
    assert committed.error()["reason"] == "HOLD_ALREADY_COMMITTED"
    assert balance_micros(ctl, tenant) == 10_000_000 - 1_500


def test_the_installed_command_runs(ctl: Ctl) -> None:
    tenant_id = new_id()
    command = Path(sys.executable).parent / "billingctl"
    done = subprocess.run(
        [str(command), "--target", ctl.target, "tenants", "create", tenant_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"Tenant           {tenant_id}" in done.stdout
