"""A billing server as a child process, and `billingctl` run against it as another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2
from tests.support.server_process import ServerProcess

# One output token costs one micro, so amounts in the tests are exact and easy to read.
PRICES = """
[models."unit-priced"]
billing = "metered"
output_micros_per_mtok = 1_000_000

[models."house-model"]
billing = "included"
output_micros_per_mtok = 1_000_000
"""


def server_settings(directory: Path, **settings: str) -> dict[str, str]:
    prices = directory / "prices.toml"
    prices.write_text(PRICES)
    return {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        "BILLING_LOG_FORMAT": "text",
        **settings,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("ctl-server")
    with ServerProcess(server_settings(directory)) as process:
        yield process


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def json_stderr(self) -> Any:
        return json.loads(self.stderr)

    def error(self) -> Any:
        """The error object `--json` prints on stderr."""
        return self.json_stderr()["error"]

    def fields(self) -> dict[str, str]:
        """The `Name  value` lines of a human-readable block."""
        pairs = (line.split("  ", 1) for line in self.stdout.splitlines() if "  " in line)
        return {name.strip(): value.strip() for name, value in pairs}


def run_ctl(*args: str, env: Mapping[str, str] | None = None) -> Result:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "billing.ctl", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


class Ctl:
    """`billingctl --target <server> ...` for one server."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        return run_ctl("--target", self.target, *args, env=env)

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.code == 0, result.stderr
        return result


@pytest.fixture
def ctl(server: ServerProcess) -> Ctl:
    return Ctl(server.address)


@pytest.fixture
def tenant(ctl: Ctl) -> str:
    """A new tenant with a card on file ($25 default limit) and $10 prepaid credit."""
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    ctl.ok("tenants", "create", tenant_id, "--payment-method")
    ctl.ok("credit", "grant", tenant_id, "--amount", "10", "--reason", "welcome")
    return tenant_id


class Chat:
    """What a chat service does around a model call, straight over the stubs."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = billing_pb2_grpc.BillingServiceStub(self._channel)

    def reserve(self, tenant_id: str, *, model: str = "unit-priced", user: str = "alice") -> str:
        response = self._stub.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                user_id=user,
                model=model,
                estimate=billing_pb2.QueryEstimate(max_output_tokens=10_000),
            ),
            timeout=10,
        )
        assert response.decision.allowed, response.decision
        return response.reservation.reservation_id

    def query(
        self, tenant_id: str, output_tokens: int, *, model: str = "unit-priced", user: str = "alice"
    ) -> types_pb2.UsageRecord:
        """A reserved and committed call: costs `output_tokens` micros on unit-priced."""
        reservation_id = self.reserve(tenant_id, model=model, user=user)
        response = self._stub.Commit(
            billing_pb2.CommitRequest(
                request_id=str(uuid.uuid4()),
                reservation_id=reservation_id,
                usage=types_pb2.TokenUsage(input_tokens=7, output_tokens=output_tokens),
            ),
            timeout=10,
        )
        return response.usage_record

    def close(self) -> None:
        self._channel.close()


@pytest.fixture
def chat(server: ServerProcess) -> Iterator[Chat]:
    chat = Chat(server.address)
    yield chat
    chat.close()
