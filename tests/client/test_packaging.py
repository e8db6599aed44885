"""What a user of the client package gets: no server dependencies, and real types for mypy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

USER_CODE = """
from billing.client import AsyncBillingClient, BillingClient, Denied

def chat(client: BillingClient) -> tuple[int, dict[str, object]] | None:
    reveal_type(client.check_access("t", "gpt-4o"))
    try:
        with client.reserve("t", "u", "gpt-4o", input_tokens=1, max_tokens=1) as hold:
            reveal_type(hold)
            record = hold.commit(input_tokens=1, output_tokens=1)
            reveal_type(record)
            reveal_type(record.cost_micros)
    except Denied as denied:
        return denied.to_http()
    reveal_type(client.admin)
    hold.commit(input_tokens="1", output_tokens=1)
    return None

async def achat(client: AsyncBillingClient) -> None:
    async with client.reserve("t", "u", "gpt-4o", input_tokens=1, max_tokens=1) as hold:
        reveal_type(await hold.commit(input_tokens=1, output_tokens=1))
    reveal_type(client.billing)
"""


@pytest.mark.slow
def test_a_users_mypy_sees_the_clients_types(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_CODE)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    notes = [line.split(": ", 2)[-1] for line in checked.stdout.splitlines() if ": note:" in line]
    assert notes == [
        'Revealed type is "billing.client._model.AccessDecision"',
        'Revealed type is "billing.client._sync.Hold"',
        'Revealed type is "billing.v1.types_pb2.UsageRecord"',
        'Revealed type is "int"',
        'Revealed type is "billing.v1.admin_pb2_grpc.AdminServiceStub"',
        'Revealed type is "billing.v1.types_pb2.UsageRecord"',
        'Revealed type is "billing.v1.billing_pb2_grpc.BillingServiceAsyncStub"',
    ], checked.stdout
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, checked.stdout
    assert 'Argument "input_tokens" to "commit" of "Hold" has incompatible type "str"' in errors[0]


def test_the_client_imports_nothing_of_the_server() -> None:
    probe = (
        "import sys, billing.client\n"
        "server = {'billing_service', 'sqlalchemy', 'grpc_status', 'pydantic', 'stripe'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in server))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
