"""The README's shell sessions, run in order against a fresh server as a new user would run
them, their shown outputs compared with what the commands print: a change that makes the README
wrong fails here. tests/support/readme_sessions.py says how a session is written (a fenced
block opened with ```console tested); to update one, run this test and copy what it printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.v1 import account_pb2, admin_pb2, billing_pb2, budget_pb2, usage_pb2
from tests.support.ports import free_port
from tests.support.readme_sessions import Masks, sessions, untested_sessions
from tests.support.server_process import ServerProcess
from tests.support.tools import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"
# What the README's commands call the billing service and the example app.
BILLING_ADDRESS = "localhost:50051"
EXAMPLE_ADDRESS = "localhost:8000"
_EXAMPLE_START_S = 180.0


_CONTRACT_ROW = re.compile(r"^\| `(\w+Service)` [^|]*\| (.*) \|$", re.MULTILINE)


def test_the_contract_table_names_every_service_and_method() -> None:
    proto_files = [account_pb2, admin_pb2, billing_pb2, budget_pb2, usage_pb2]
    services = {
        service.name: [method.name for method in service.methods]
        for module in proto_files
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    table = {
        service: re.findall(r"`(\w+)`", methods)
        for service, methods in _CONTRACT_ROW.findall(README.read_text())
    }
    assert table == services


def test_every_shell_session_in_the_readme_is_tested() -> None:
    assert untested_sessions(README) == [], "mark these blocks ```console tested"
    assert len(sessions(README)) >= 3


class Example:
    """examples/chat_app/run on a free port, as the README starts it; ready once uvicorn says
    it listens."""

    def __init__(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "CHAT_"))}
        self.process = subprocess.Popen(
            ["bash", str(REPO / "examples" / "chat_app" / "run"), "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.log: list[str] = []
        listening = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.log.append(line)
                if f"Uvicorn running on http://127.0.0.1:{self.port}" in line:
                    listening.set()
            listening.set()  # it ended

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(_EXAMPLE_START_S) or self.process.poll() is not None:
            self.stop()
            pytest.fail("the example did not start:\n" + "".join(self.log[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[ServerProcess]:
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_LOG_FORMAT": "text",
    }
    with ServerProcess(settings) as server:
        yield server


def test_the_readme_sessions_print_what_the_readme_shows(
    billing: ServerProcess, tmp_path: Path
) -> None:
    workdir = tmp_path / "user"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "VIRTUAL_ENV"))}
    tools = [REPO / ".venv" / "bin", REPO / ".tools" / "node_modules" / ".bin"]
    env["PATH"] = os.pathsep.join([*map(str, tools), env.get("PATH", "")])
    env["BILLING_TARGET"] = billing.address
    masks = Masks()
    example: Example | None = None
    # Every difference is reported, not only the first: one run shows all there is to update.
    wrong: list[str] = []
    try:
        for session in sessions(README):
            if "example" in session.needs and example is None:
                example = Example()
            for command in session.commands:
                text = masks.command(command.text).replace(BILLING_ADDRESS, billing.address)
                if example is not None:
                    text = text.replace(EXAMPLE_ADDRESS, f"127.0.0.1:{example.port}")
                done = subprocess.run(
                    ["bash", "-c", text],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                printed = "\n".join(
                    line.rstrip() for line in (done.stdout + done.stderr).splitlines()
                ).strip("\n")
                where = f"README.md line {command.line}: $ {command.text}"
                if not command.output:
                    if done.returncode != 0:
                        wrong.append(f"{where}\nfailed ({done.returncode}):\n{printed}")
                    continue
                shown, real = masks.agree(command.output, printed)
                if real != shown:
                    wrong.append(f"{where}\nprinted:\n{printed}")
    finally:
        if example is not None:
            example.stop()
    assert not wrong, "\n\n".join(wrong)
