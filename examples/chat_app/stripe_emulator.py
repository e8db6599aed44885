"""localstripe (a Stripe emulator, in the dev extra) as a child process, so the example's card
form works offline: the billing service talks to it as Stripe, and the billing page loads the
test Stripe.js it serves at /js.stripe.com/v3/.

Run as a program (`python examples/chat_app/stripe_emulator.py --port N`; the tests start it so
too), it serves localstripe's application on 127.0.0.1 only and in memory: localstripe's own
command binds every interface, and pickles its whole store to one /tmp file, shared by every
instance on the machine, on every write."""

from __future__ import annotations

import argparse
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
    process = subprocess.Popen(
        loopback_command(port),
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


def loopback_command(port: int) -> list[str]:
    """The command that serves localstripe on 127.0.0.1:`port`, in memory (this file's main)."""
    return [sys.executable, str(Path(__file__).resolve()), "--port", str(port)]


def _serve_on_loopback(port: int) -> None:
    try:
        from aiohttp import web
        from localstripe import server  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("localstripe is not installed (pip install localstripe)") from None
    server.store.dump_to_disk = lambda: None
    web.run_app(server.app, host="127.0.0.1", port=port, print=None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    _serve_on_loopback(parser.parse_args().port)
