"""A user's `mypy --strict` of a program using the client types every message: checked in a
fresh environment holding only ai-billing-client and its `typing` extra (types-protobuf and
grpc-stubs: the generated .pyi files import google.protobuf and grpc, which ship no types)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import REPO

pytestmark = pytest.mark.slow

PROGRAM = Path(__file__).with_name("typed_user_program.py")

REVEALED = [
    "billing.v1.billing_pb2.ReserveCreditResponse",
    "billing.v1.types_pb2._DenialReason.ValueType",
    "google.protobuf.timestamp_pb2.Timestamp",
    "billing.v1.types_pb2.UsageRecord",
    "billing.v1.types_pb2.TokenUsage",
    "billing.client._model.AccessDecision",
    "str",
]


def _client_environment(directory: Path, *extras: str) -> Path:
    """A new virtualenv with the client (built as a wheel) and what uv.lock pins for it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    env["UV_PROJECT_ENVIRONMENT"] = str(directory)
    command = ["bash", str(REPO / "scripts" / "uv"), "sync", "--frozen", "--no-editable"]
    command += ["--package", "ai-billing-client", "--quiet"]
    command += [f"--extra={extra}" for extra in extras]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    return directory / "bin" / "python"


def _mypy(python: Path) -> subprocess.CompletedProcess[str]:
    """This venv's mypy, resolving imports only in `python`'s environment."""
    options = ["--strict", "--disallow-any-expr", "--no-incremental", "--cache-dir", os.devnull]
    return subprocess.run(
        [sys.executable, "-m", "mypy", *options, "--python-executable", str(python), PROGRAM.name],
        cwd=PROGRAM.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _revealed(output: str) -> list[str]:
    marker = 'note: Revealed type is "'
    return [line.split(marker)[1].rstrip('"') for line in output.splitlines() if marker in line]


def test_the_typing_extra_types_every_message_for_a_users_mypy(tmp_path: Path) -> None:
    python = _client_environment(tmp_path / "env", "typing")
    installed = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(sorted(d.name for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'ai-billing-client'" in installed
    assert "'ai-billing'" not in installed
    assert "'mypy'" not in installed
    checked = _mypy(python)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert _revealed(checked.stdout) == REVEALED


def test_without_the_typing_extra_a_users_mypy_sees_any(tmp_path: Path) -> None:
    checked = _mypy(_client_environment(tmp_path / "env"))
    assert checked.returncode == 1
    assert 'Library stubs not installed for "grpc"' in checked.stdout
    assert "Any" in _revealed(checked.stdout)
