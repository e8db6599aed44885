"""`billing-service serve` as a real child process, for multi-process and CLI tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType

_SERVING = re.compile(r"serving billing\.v1 on \S+ \(port (\d+)\)")
_HEALTH = re.compile(r"serving grpc\.health\.v1 on \S+ \(port (\d+)\)")
_START_TIMEOUT_S = 60.0


class ServerProcess:
    """Starts the server with the given BILLING_* settings and waits until it listens.

    Readiness is read from the server's own log line, so there is no polling and no sleep.
    `capture_stdout` keeps what the server prints on stdout (e.g. console trace spans) in
    `stdout`, complete once the process has ended.
    """

    def __init__(
        self,
        settings: Mapping[str, str],
        cwd: Path | None = None,
        *,
        capture_stdout: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
        environment.update(env or {})
        environment.update(settings)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "billing_service.cli", "serve"],
            env=environment,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.stdout: list[str] = []
        self._port: int | None = None
        self._health_port: int | None = None
        self._ready = threading.Event()
        self._log_changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self._stdout_reader: threading.Thread | None = None
        if capture_stdout:
            self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
            self._stdout_reader.start()
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

    @property
    def health_address(self) -> str:
        """The health-only listener (BILLING_HEALTH_LISTEN_ADDRESS must be set)."""
        assert self._health_port is not None, "start with BILLING_HEALTH_LISTEN_ADDRESS"
        return f"127.0.0.1:{self._health_port}"

    def wait_for_log(self, pattern: str, timeout_s: float = 30.0, count: int = 1) -> list[str]:
        """Waits until `count` log lines match `pattern` (a regex) and returns them; fails on
        timeout or when the process ended first. Lines logged before the call count."""
        regex = re.compile(pattern)
        found: list[str] = []
        with self._log_changed:
            checked = 0
            while True:
                found += [line for line in self.log[checked:] if regex.search(line)]
                if len(found) >= count:
                    return found
                checked = len(self.log)
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"the server ended before logging {pattern!r}")
                if not self._log_changed.wait(timeout_s):
                    raise AssertionError(
                        f"{len(found)} of {count} log lines matched {pattern!r} in {timeout_s}s"
                    )

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._log_changed:
                self.log.append(line)
                self._log_changed.notify_all()
            if match := _HEALTH.search(line):
                self._health_port = int(match.group(1))
            match = _SERVING.search(line)
            if match and self._port is None:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiters
        with self._log_changed:
            self._log_changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line)

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """Sends SIGTERM and returns the exit code."""
        self.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        if self._stdout_reader is not None:
            self._stdout_reader.join(timeout_s)
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


@contextmanager
def start_together(*settings: Mapping[str, str]) -> Iterator[list[ServerProcess]]:
    """Starts one server per settings at the same time (each start waits for its log line) and
    stops them all at the end."""
    with ExitStack() as stack, ThreadPoolExecutor(len(settings)) as pool:
        starting = [pool.submit(ServerProcess, each) for each in settings]
        servers = []
        failed: BaseException | None = None
        for future in starting:
            # Every one that started is registered, so a failed start still stops the others.
            try:
                servers.append(stack.enter_context(future.result()))
            except Exception as error:
                failed = failed or error
        if failed is not None:
            raise failed
        yield servers
