"""The image's install steps, run outside Docker (Docker cannot run here): the build stage's
COPY sources and `pip install` line, replayed into a fresh virtualenv, give a working
`billing-service` that carries its migrations and default prices, and no tests."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import REPO

pytestmark = pytest.mark.slow


def _build_stage() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return lines[starts[0] : starts[1]]


def _run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    environment.update(env)
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900, check=False
    )


def test_the_dockerfile_install_steps_give_a_working_billing_service(tmp_path: Path) -> None:
    stage = _build_stage()
    context = tmp_path / "src"
    context.mkdir()
    for line in stage:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    shutil.copytree(
                        origin,
                        context / source,
                        # As .dockerignore: clients/typescript is no part of the image.
                        ignore=shutil.ignore_patterns(
                            "__pycache__", "*.egg-info", "build", "typescript"
                        ),
                    )
                else:
                    shutil.copy2(origin, context / source)
    (venv_line,) = [line for line in stage if line.startswith("RUN python -m venv ")]
    (install_line,) = [line for line in stage if line.startswith("RUN ") and " install " in line]
    image_venv = venv_line.split()[-1]
    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", str(venv)], cwd=context)
    assert created.returncode == 0, created.stderr
    install = [
        str(venv) + word.removeprefix(image_venv) if word.startswith(image_venv) else word
        for word in shlex.split(install_line.removeprefix("RUN "))
    ]
    installed = _run(install, cwd=context, PIP_DISABLE_PIP_VERSION_CHECK="1")
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    billing_service = venv / "bin" / "billing-service"
    database = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
    for command in (["check-config"], ["migrate"]):
        result = _run([str(billing_service), *command], cwd=tmp_path, BILLING_DATABASE_URL=database)
        assert result.returncode == 0, result.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    package = site / "billing_service"
    assert (package / "default_prices.toml").is_file()
    assert list((package / "storage" / "migrations" / "versions").glob("0001_*.py"))
    assert (package / "py.typed").is_file()
    assert not (site / "tests").exists()
    # The tracing extra is in the image, so BILLING_TRACING works there.
    traced = _run(
        [str(venv / "bin" / "python"), "-c", "import opentelemetry.instrumentation.grpc"],
        cwd=tmp_path,
    )
    assert traced.returncode == 0, traced.stderr
