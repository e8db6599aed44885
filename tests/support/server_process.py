"""`billing-service serve` as a real child process, for multi-process and CLI tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

_SERVING = re.compile(r"serving billing\.v1 on \S+ \(port (\d+)\)")
_START_TIMEOUT_S = 60.0


class ServerProcess:
    """Starts the server with the given BILLING_* settings and waits until it listens.

    Readiness is read from the server's own log line, so there is no polling and no sleep.
    """

    def __init__(self, settings: Mapping[str, str], cwd: Path | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        env.update(settings)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "billing_service.cli", "serve"],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(_START_TIMEOUT_S) or self._port is None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))

    @property
    def port(self) -> int:
        assert self._port is not None
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = _SERVING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter

    def terminate(self, timeout_s: float = 30.0) -> int:
        """Sends SIGTERM and returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.terminate()
        finally:
            self.kill()
