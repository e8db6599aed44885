"""Finds the command-line tools the tests drive (installed by scripts/ensure-tools)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """The path of `name`: the venv's bin, the repo's .tools, then PATH. Fails if absent."""
    candidates = [
        Path(sys.executable).parent / name,
        REPO / ".tools" / "node_modules" / ".bin" / name,
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run scripts/ensure-tools")
    return found
