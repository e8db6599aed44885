"""`billingctl summary`, `usage list|export`, `ledger list` and `tenants list` against a live
server: the numbers they print agree with the usage written, filters and paging hold."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.ctl.conftest import Chat, Ctl


def period() -> tuple[str, str]:
    """Today and tomorrow (UTC midnights): a period holding everything these tests write."""
    today = datetime.now(UTC).date()
    return today.isoformat(), (today + timedelta(days=1)).isoformat()


@pytest.fixture
def used(chat: Chat, tenant: str) -> str:
    """The tenant after three metered calls (alice 100 + 200, bob 300 micros) and one included."""
    chat.query(tenant, 100, user="alice")
    chat.query(tenant, 200, user="alice")
    chat.query(tenant, 300, user="bob")
    chat.query(tenant, 50, user="bob", model="house-model")
    return tenant


def test_summary_shows_money_and_usage_by_model_and_user(ctl: Ctl, used: str) -> None:
    since, until = period()
    text = ctl.ok("summary", used, "--since", since, "--until", until).stdout
    assert "Balance          $9.9994" in text
    assert "Calls            4" in text
    assert "Charged          $0.0006" in text
    assert "Cost             $0.00065" in text
    model_rows = text.split("By model\n")[1].split("\n\n")[0].splitlines()
    assert model_rows[1].split() == ["unit-priced", "3", "21", "0", "600", "$0.0006", "$0.0006"]
    assert model_rows[2].split() == ["house-model", "1", "7", "0", "50", "$0.00005", "$0.00"]
    user_rows = text.split("By user\n")[1].splitlines()
    assert user_rows[1].split()[:2] == ["bob", "2"]
    assert user_rows[2].split()[:2] == ["alice", "2"]

    summary = ctl.ok("summary", used, "--since", since, "--until", until, "--json").json()
    by_model = {row["model"]: row["totals"] for row in summary["by_model"]}
    assert sum(int(t["charged_micros"]) for t in by_model.values()) == 600
    assert int(summary["totals"]["cost_micros"]) == 650
    assert summary["tenant"]["tenant_id"] == used


def test_summary_defaults_to_this_month(ctl: Ctl, used: str) -> None:
    summary = ctl.ok("summary", used, "--json").json()
    first = datetime.now(UTC).replace(day=1).date().isoformat()
    assert summary["start_time"].startswith(first)
    assert summary["totals"]["call_count"] == "4"


def test_usage_list_filters_and_pages(ctl: Ctl, used: str) -> None:
    records = ctl.ok("usage", "list", used, "--json").json()["usage_records"]
    assert len(records) == 4
    assert sum(int(r["charged_micros"]) for r in records) == 600
    bobs = ctl.ok("usage", "list", used, "--user", "bob", "--model", "unit-priced", "--json")
    assert [r["cost_micros"] for r in bobs.json()["usage_records"]] == ["300"]

    first = ctl.ok("usage", "list", used, "--limit", "3", "--json").json()
    assert len(first["usage_records"]) == 3
    rest = ctl.ok("usage", "list", used, "--page-token", first["next_page_token"], "--json")
    ids = [r["reservation_id"] for r in first["usage_records"] + rest.json()["usage_records"]]
    assert sorted(ids) == sorted(r["reservation_id"] for r in records)

    table = ctl.ok("usage", "list", used, "--limit", "2").stdout.splitlines()
    assert table[0].split()[:4] == ["COMMITTED", "(UTC)", "RESERVATION", "USER"]
    assert len(table) == 4  # header, two rows, the token to go on
    assert table[3].startswith("(more: --page-token ")


def test_usage_export_writes_the_periods_records_as_csv(ctl: Ctl, used: str) -> None:
    since, until = period()
    exported = ctl.ok("usage", "export", used, "--since", since, "--until", until).stdout
    rows = list(csv.reader(io.StringIO(exported)))
    assert len(rows) == 1 + 4
    assert all(used in row for row in rows[1:])


def test_ledger_list_shows_the_statement(ctl: Ctl, chat: Chat, tenant: str) -> None:
    record = chat.query(tenant, 1_000)
    ctl.ok("refund", record.reservation_id, "--amount-micros", "400", "--reason", "ticket 4411")
    entries = ctl.ok("ledger", "list", tenant, "--json").json()["ledger_entries"]
    assert sum(int(e["balance_delta_micros"]) for e in entries) == 10_000_000 - 600
    refunds = ctl.ok("ledger", "list", tenant, "--kind", "refund", "--json").json()
    assert [e["memo"] for e in refunds["ledger_entries"]] == ["ticket 4411"]
    grants = ctl.ok("ledger", "list", tenant, "--kind", "grant").stdout.splitlines()
    assert len(grants) == 2
    assert "grant" in grants[1]
    assert "$10.00" in grants[1]


def test_dashboard_commands_on_an_unknown_tenant(ctl: Ctl) -> None:
    for command in (["summary"], ["usage", "list"], ["ledger", "list"]):
        result = ctl(*command, "nobody-here", "--json")
        assert result.code == 69, command
        assert result.error()["reason"] == "TENANT_NOT_FOUND"


def test_tenants_list_pages_in_id_order(ctl: Ctl) -> None:
    prefix = f"list-{uuid.uuid4().hex[:8]}"
    for n in range(3):
        ctl.ok("tenants", "create", f"{prefix}-{n}")
    listed = ctl.ok("tenants", "list", "--json").json()
    ids = [t["tenant_id"] for t in listed["tenants"]]
    assert ids == sorted(ids)
    assert [i for i in ids if i.startswith(prefix)] == [f"{prefix}-{n}" for n in range(3)]
    assert listed["next_page_token"] == ""
    page = ctl.ok("tenants", "list", "--limit", "1")
    assert len(page.stdout.splitlines()) == 3  # header, one tenant, the token to go on


def test_tenants_list_by_billing_status(ctl: Ctl, tenant: str) -> None:
    # A fresh tenant is in good standing, so it is not listed under payment-failed.
    failed = ctl.ok("tenants", "list", "--billing-status", "payment-failed", "--json").json()
    assert all(t["billing_status"] == "BILLING_STATUS_PAYMENT_FAILED" for t in failed["tenants"])
    assert tenant not in [t["tenant_id"] for t in failed["tenants"]]
    good = ctl.ok("tenants", "list", "--billing-status", "good-standing", "--json").json()
    assert tenant in [t["tenant_id"] for t in good["tenants"]]
