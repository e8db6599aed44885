"""`scripts/serve` as a new user runs it: it installs only what serving needs (from uv.lock,
into a new venv here), says each step, and serves."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2
from tests.support.server_process import ServerProcess
from tests.support.tools import REPO

pytestmark = pytest.mark.slow

SERVING = {"ai-billing", "ai-billing-client", "grpcio", "sqlalchemy", "alembic", "stripe"}
NOT_FOR_SERVING = {"pytest", "mypy", "ruff", "hypothesis", "matplotlib", "localstripe", "fastapi"}


def _installed(venv: Path) -> set[str]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    names = (re.sub(r"-[^-]+\.dist-info$", "", info.name) for info in site.glob("*.dist-info"))
    return {name.lower().replace("_", "-") for name in names}


def test_serve_installs_only_what_serving_needs_says_each_step_and_serves(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_LOG_FORMAT": "text",
    }
    with ServerProcess(
        settings,
        cwd=tmp_path,
        env={"UV_PROJECT_ENVIRONMENT": str(venv)},
        command=["bash", str(REPO / "scripts" / "serve")],
        start_timeout_s=600,
    ) as server:
        with grpc.insecure_channel(server.address) as channel:
            answer = billing_pb2_grpc.BillingServiceStub(channel).CheckAccess(
                billing_pb2.CheckAccessRequest(tenant_id="acme", model="gpt-4o"), timeout=30
            )
        # A new tenant without a card: the price table was read and the ledger answered.
        assert answer.decision.reason == types_pb2.DENIAL_REASON_PAYMENT_METHOD_REQUIRED
        assert server.terminate() == 0
    # Its own steps, then uv's summary lines indented under them.
    steps = [line.rstrip() for line in server.log if re.match(r"serve: \S", line)]
    assert [step.split()[1] for step in steps] == ["uv", "installing", "starting"], steps
    assert any(re.match(r"serve:   Installed \d+ packages", line) for line in server.log)
    installed = _installed(venv)
    assert installed >= SERVING
    assert installed.isdisjoint(NOT_FOR_SERVING)
