"""examples/chat_app/run_all.py starts its own billing service and bills through that one only:
a billing port already taken stops it with a clear message, never a silent fallback to whatever
server listens there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from billing.v1 import admin_pb2, admin_pb2_grpc
from examples.chat_app.run_all import start_billing
from tests.support.server_process import ServerProcess
from tests.support.tools import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A billing server the example did not start, on the port the example is asked for."""
    directory = tmp_path_factory.mktemp("other")
    with ServerProcess(
        {
            "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'billing.db'}",
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        }
    ) as server:
        yield server


def test_a_taken_billing_port_stops_the_example_with_a_clear_message(
    other_server: ServerProcess, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "CHAT_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.chat_app.run_all",
            "--billing-port",
            str(other_server.port),
            "--data-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{other_server.port}" in last, done.stderr
    assert "in use" in last, done.stderr
    assert "Traceback" not in done.stderr
    # Nothing was set up on the server that was already there.
    with (
        grpc.insecure_channel(other_server.address) as channel,
        pytest.raises(grpc.RpcError) as missing,
    ):
        admin_pb2_grpc.AdminServiceStub(channel).GetTenant(
            admin_pb2.GetTenantRequest(tenant_id="acme"), timeout=10
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_by_default_the_example_bills_through_its_own_server_on_a_free_port(
    other_server: ServerProcess, tmp_path: Path
) -> None:
    process, target = start_billing(tmp_path, "127.0.0.1", 0)
    try:
        assert target != other_server.address
        assert target.startswith("127.0.0.1:")
        assert (tmp_path / "billing.db").exists()  # the one it started, on its data directory
    finally:
        process.terminate()
        process.wait(30)
