"""billingctl ships in the client distribution: it must run without the server's packages."""

from __future__ import annotations

import subprocess
import sys


def test_billingctl_imports_nothing_of_the_server() -> None:
    probe = (
        "import sys\n"
        "from billing.ctl.cli import build_parser\n"
        "build_parser().parse_args(['summary', 'acme'])\n"
        "server = {'billing_service', 'sqlalchemy', 'grpc_status', 'pydantic', 'stripe'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in server))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
