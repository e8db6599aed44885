"""localstripe (a Stripe emulator, in the dev extra) as a child process, so the example's card
form works offline: the billing service talks to it as Stripe, and the billing page loads the
test Stripe.js it serves at /js.stripe.com/v3/."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# localstripe takes any key of the right kind.
SECRET_KEY = "sk_test_localstripe"
PUBLISHABLE_KEY = "pk_test_localstripe"
_READY_TIMEOUT_S = 30.0


@dataclass
class LocalStripe:
    process: subprocess.Popen[bytes]
    url: str

    @property
    def billing_env(self) -> dict[str, str]:
        return {"BILLING_STRIPE_API_KEY": SECRET_KEY, "BILLING_STRIPE_API_BASE": self.url}

    @property
    def app_env(self) -> dict[str, str]:
        return {
            "CHAT_STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
            "CHAT_STRIPE_JS_URL": f"{self.url}/js.stripe.com/v3/",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_localstripe() -> LocalStripe:
    """Starts it on a port free a moment ago; fails loudly if it does not come up as ours."""
    port = _free_port()
    executable = shutil.which("localstripe", path=str(Path(sys.executable).parent))
    if executable is None:
        raise SystemExit("localstripe is not installed (pip install localstripe)")
    # --from-scratch: otherwise it shares one /tmp/localstripe.pickle with every other instance.
    process = subprocess.Popen(
        [executable, "--port", str(port), "--from-scratch"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _READY_TIMEOUT_S
    # It prints nothing reliable when ready: its port is polled, within a bound.
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"localstripe exited with {process.returncode} (port {port} taken?)")
        try:
            with urllib.request.urlopen(f"{url}/js.stripe.com/v3/", timeout=1.0):
                pass
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
            continue
        if process.poll() is None:  # and ours still runs (it exits if it lost the port)
            return LocalStripe(process, url)
    process.kill()
    raise SystemExit(f"localstripe did not start on port {port}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
