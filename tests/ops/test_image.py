"""The image's install steps, run outside Docker (Docker cannot run here): the build stage's
ENV, COPY and RUN lines, replayed into a fresh directory, give a working `billing-service` that
carries its migrations and default prices, the tracing extra, and no tests."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.tools import REPO

pytestmark = pytest.mark.slow

# scripts/uv pins the uv every script runs; the image must install the same one.
_UV_PIN = re.compile(r"^UV_VERSION=(\S+)$", re.MULTILINE)


def _build_stage() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return lines[starts[0] : starts[1]]


def _env(stage: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in stage:
        if line.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(line.removeprefix("ENV ")))
    return env


def test_the_image_installs_the_uv_that_scripts_pin() -> None:
    (pinned,) = _UV_PIN.findall((REPO / "scripts" / "uv").read_text())
    installs = [line for line in _build_stage() if line.startswith("RUN pip install uv")]
    assert installs == [f"RUN pip install uv=={pinned}"]


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
    image_env = _env(stage)
    image_venv = image_env["UV_PROJECT_ENVIRONMENT"]
    venv = tmp_path / "venv"
    # The image's settings, but uv's cache stays on (the image has none to keep) and the venv
    # goes to a temporary directory.
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "UV_", "VIRTUAL_"))
    }
    environment.update(image_env)
    del environment["UV_NO_CACHE"]
    environment["UV_PROJECT_ENVIRONMENT"] = str(venv)
    (sync_line,) = [line for line in stage if line.startswith("RUN uv ")]
    command = ["bash", str(REPO / "scripts" / "uv"), *shlex.split(sync_line)[2:]]
    installed = subprocess.run(
        command, cwd=context, env=environment, capture_output=True, text=True, timeout=900
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert image_venv not in str(venv)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        database = f"sqlite+aiosqlite:///{tmp_path / 'billing.db'}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        return subprocess.run(
            args,
            cwd=tmp_path,
            env={**env, "BILLING_DATABASE_URL": database},
            capture_output=True,
            text=True,
            timeout=300,
        )

    billing_service = venv / "bin" / "billing-service"
    for command in (["check-config"], ["migrate"]):
        result = run(str(billing_service), *command)
        assert result.returncode == 0, result.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    package = site / "billing_service"
    assert (package / "default_prices.toml").is_file()
    assert list((package / "storage" / "migrations" / "versions").glob("0001_*.py"))
    assert (package / "py.typed").is_file()
    assert not (site / "tests").exists()
    # Installed as wheels, not as links back to the sources the image does not keep.
    assert [pth for pth in site.glob("*.pth") if str(context) in pth.read_text()] == []
    # The tracing extra is in the image, so BILLING_TRACING works there; the dev extra is not.
    traced = run(str(venv / "bin" / "python"), "-c", "import opentelemetry.instrumentation.grpc")
    assert traced.returncode == 0, traced.stderr
    dev_only = run(str(venv / "bin" / "python"), "-c", "import pytest")
    assert dev_only.returncode != 0
