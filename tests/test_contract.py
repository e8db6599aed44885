"""The .proto contract: buf-clean, formatted, and the committed stubs generated from it."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

from tests.support.tools import REPO, tool


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


def test_buf_lint_passes() -> None:
    result = _run(tool("buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_are_buf_formatted() -> None:
    result = _run(tool("buf"), "format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    result = _run("bash", "scripts/generate-protos", str(tmp_path))
    assert result.returncode == 0, result.stderr
    committed = REPO / "clients" / "src" / "billing" / "v1"
    fresh = tmp_path / "billing" / "v1"
    generated = sorted(path.name for path in fresh.iterdir() if path.is_file())
    assert generated, "nothing was generated"
    _match, mismatch, errors = filecmp.cmpfiles(committed, fresh, generated, shallow=False)
    assert (mismatch, errors) == ([], []), "stale stubs: run scripts/generate-protos"


def test_no_breaking_change_since_the_first_release() -> None:
    # The image of billing.v1 as first released; a breaking change needs billing.v2.
    released = REPO / "protos-released" / "billing-v1-2026-11-24.binpb"
    result = _run(tool("buf"), "breaking", "--against", str(released))
    assert result.returncode == 0, result.stdout + result.stderr
