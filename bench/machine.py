"""The machine a result was measured on, and the code it measured."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def code_version() -> dict[str, Any]:
    """The commit, and whether the service's files differ from it (tracked or not)."""
    status = _git("status", "--porcelain", "--", "service")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "service_tree_dirty": None if status is None else bool(status),
    }


def describe(postgres_version: str | None) -> dict[str, Any]:
    return {
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "postgresql": postgres_version,
        "packages": {
            name: _version(name) for name in ("grpcio", "protobuf", "SQLAlchemy", "asyncpg")
        },
        **code_version(),
    }
