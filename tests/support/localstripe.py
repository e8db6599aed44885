"""localstripe (a stateful Stripe emulator) as a real child process on a free port.

Each instance serves on 127.0.0.1 only and keeps its objects in memory (the worked example's
launcher, examples/chat_app/stripe_emulator.py): localstripe's own command binds every interface and
saves one fixed /tmp/localstripe.pickle, shared by every instance on the machine.
"""

from __future__ import annotations

import os
import subprocess
import time
from types import TracebackType

import httpx

from examples.chat_app.stripe_emulator import loopback_command
from tests.support.ports import free_port

API_KEY = "sk_test_localstripe"
PUBLISHABLE_KEY = "pk_test_localstripe"
_START_TIMEOUT_S = 30.0


class LocalStripe:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            loopback_command(self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        # localstripe prints nothing reliable when ready, so its port is polled: a bounded
        # readiness probe of a child process, not a sleep standing in for a result.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"localstripe exited with {self.process.returncode}")
            try:
                httpx.get(f"{self.url}/v1/customers", auth=(API_KEY, ""), timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("localstripe did not start listening")

    def wipe(self) -> None:
        """Forgets every object (customers, intents, webhooks)."""
        httpx.delete(f"{self.url}/_config/data", auth=(API_KEY, ""), timeout=5.0).raise_for_status()

    def register_webhook(self, name: str, url: str, secret: str) -> None:
        """Makes localstripe deliver its events, signed with `secret`, to `url`."""
        response = httpx.post(
            f"{self.url}/_config/webhooks/{name}",
            data={"url": url, "secret": secret},
            auth=(API_KEY, ""),
            timeout=5.0,
        )
        response.raise_for_status()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalStripe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
