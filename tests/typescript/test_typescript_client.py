"""The TypeScript client (clients/typescript) and the Next.js example's chat route
(examples/nextjs_chat), tested with Node's own test runner against a real server on a real port;
and the client's generated code, current with the .proto files.

scripts/ensure-tools installs both packages from their lock files (`npm ci`); scripts/test
type-checks them. Here they are built, and `node --test` runs their tests with the shared
server's address, the command that starts more servers, their price table and a certificate
authority's files in its environment; a failing node test fails this test with node's report.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.conftest import PRICES
from tests.support.certs import CertificateAuthority
from tests.support.server_process import ServerProcess
from tests.support.tools import REPO

CLIENT = REPO / "clients" / "typescript"
EXAMPLE = REPO / "examples" / "nextjs_chat"
GENERATED = Path("src") / "gen"
NODE_TESTS_TIMEOUT_S = 600


def _npm(package: Path, *args: str) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    assert npm is not None, "npm is not installed: run scripts/ensure-tools"
    return subprocess.run(
        [npm, "run", "--silent", *args],
        cwd=package,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _differences(committed: Path, fresh: Path) -> list[str]:
    """Files missing, extra or different between two trees, as relative paths."""
    found: list[str] = []

    def walk(compared: filecmp.dircmp[str], prefix: str) -> None:
        found.extend(f"{prefix}{name} (not committed)" for name in compared.right_only)
        found.extend(f"{prefix}{name} (no longer generated)" for name in compared.left_only)
        _match, mismatch, errors = filecmp.cmpfiles(
            compared.left, compared.right, compared.common_files, shallow=False
        )
        found.extend(f"{prefix}{name} (stale)" for name in [*mismatch, *errors])
        for name, sub in compared.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(committed, fresh), "")
    return found


def test_the_committed_typescript_matches_the_protos(tmp_path: Path) -> None:
    result = _npm(CLIENT, "generate", "--", "-o", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    stale = _differences(CLIENT / GENERATED, tmp_path / GENERATED)
    assert stale == [], "run `npm run generate` in clients/typescript: " + ", ".join(stale)


@pytest.fixture(scope="module")
def built() -> None:
    for package in (CLIENT, EXAMPLE):
        result = _npm(package, "build")
        assert result.returncode == 0, f"{package}: {result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    authority = CertificateAuthority()
    (directory / "ca.crt").write_bytes(authority.certificate_pem)
    authority.server().write(directory, "server")
    authority.client("chat-1").write(directory, "chat")
    authority.client("stranger").write(directory, "stranger")
    return directory


@pytest.fixture(scope="module")
def prices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token of any kind costs one micro, on every server of the node tests."""
    path = tmp_path_factory.mktemp("prices") / "prices.toml"
    path.write_text(PRICES)
    return path


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, prices: Path
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("server")
    settings = {
        "BILLING_DATABASE_URL": f"sqlite+aiosqlite:///{directory / 'billing.db'}",
        "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
        "BILLING_PRICE_TABLE": str(prices),
        "BILLING_AUTO_CREATE_TENANTS": "false",
        "BILLING_EXPIRY_SWEEP_INTERVAL_S": "0.05",
    }
    with ServerProcess(settings) as server:
        yield server


@pytest.mark.slow
def test_node_tests_pass(
    built: None, certificates: Path, prices: Path, shared_server: ServerProcess
) -> None:
    node = shutil.which("node")
    assert node is not None, "node is not installed: run scripts/ensure-tools"
    files = sorted(
        str(path)
        for package in (CLIENT, EXAMPLE)
        for path in (package / "dist" / "test").glob("*.test.js")
    )
    assert len(files) >= 7, files
    serve = [sys.executable, "-m", "billing_service.cli", "serve"]
    env = {
        **os.environ,
        "BILLING_TEST_TARGET": shared_server.address,
        "BILLING_TEST_SERVE_COMMAND": json.dumps(serve),
        "BILLING_TEST_TLS_DIR": str(certificates),
        "BILLING_TEST_PRICE_TABLE": str(prices),
    }
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", *files],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=NODE_TESTS_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed:\n{report[-30_000:]}"
    ran = re.search(r"^\S+ tests (\d+)$", report, re.MULTILINE)
    assert ran is not None, report[-5_000:]
    assert int(ran.group(1)) >= 40, "node ran fewer tests than there are"
