"""billingctl as a Unix tool: a closed pipe ends it quietly, errors speak the units the user
typed, and both commands tell their version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.ctl.conftest import Chat, Ctl

VERSION = "0.1.0"


def _into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs billingctl with stdout a pipe whose reader is gone (as `| head -1` leaves it)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        return subprocess.run(
            [sys.executable, "-m", "billing.ctl", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=environment,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("what", [["--help"], ["tenants", "list"], ["ledger", "list"]])
def test_a_closed_pipe_ends_it_quietly_as_sigpipe_does(
    ctl: Ctl, tenant: str, what: list[str]
) -> None:
    args = [*what, tenant] if what == ["ledger", "list"] else what
    done = _into_a_closed_pipe("--target", ctl.target, *args)
    assert done.stderr == ""
    assert done.returncode == -signal.SIGPIPE  # what the shell shows as 141


def test_a_refund_given_in_dollars_is_refused_in_dollars(ctl: Ctl, chat: Chat, tenant: str) -> None:
    record = chat.query(tenant, output_tokens=1_500)
    in_dollars = ctl("refund", record.reservation_id, "--amount", "0.01", "--reason", "x")
    assert in_dollars.code == 64 + 9, in_dollars.stderr
    assert "REFUND_EXCEEDS_CHARGE" in in_dollars.stderr
    assert "$0.0015 is left to refund of this charge, $0.01 was asked" in in_dollars.stderr
    assert "micros" not in in_dollars.stderr
    in_micros = ctl("refund", record.reservation_id, "--amount-micros", "10000", "--reason", "x")
    assert "1500 micros left to refund, 10000 were asked" in in_micros.stderr


def test_an_amount_out_of_range_is_refused_in_the_units_given(ctl: Ctl, tenant: str) -> None:
    in_dollars = ctl("credit", "grant", tenant, "--amount", "2000000", "--reason", "r")
    assert in_dollars.code == 64 + 3, in_dollars.stderr
    assert (
        "--amount: must be between $0.000001 and $1,000,000.00, got $2,000,000.00"
        in in_dollars.stderr
    )
    limit = ctl("tenants", "create", f"t-{uuid.uuid4().hex[:8]}", "--credit-limit", "5000000")
    assert "--credit-limit: must be between $0.00 and $1,000,000.00" in limit.stderr
    in_micros = ctl("credit", "grant", tenant, "--amount-micros", "2000000000000", "--reason", "r")
    assert "amount_micros: must be between 1 and 1000000000000" in in_micros.stderr


def test_both_commands_tell_their_version() -> None:
    for command, module in (
        ("billingctl", "billing.ctl"),
        ("billing-service", "billing_service.cli"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (done.returncode, done.stdout.strip()) == (0, f"{command} {VERSION}")
