"""A throwaway Prometheus server (Debian's `prometheus`, installed by scripts/ensure-tools) that
scrapes given targets and evaluates given rules, on a free loopback port, in a temp directory.

Usage::

    with PrometheusServer(tmp_path, targets, rules, labels={"namespace": "test"}) as prometheus:
        prometheus.wait_for(lambda: prometheus.firing("BillingDatabaseUnavailable"))
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import yaml

from tests.support.ports import free_port
from tests.support.tools import tool

JOB = "billing"
_START_TIMEOUT_S = 60.0


class PrometheusServer:
    def __init__(
        self,
        directory: Path,
        targets: Sequence[str],
        rules: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self._directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "rules.yaml").write_text(yaml.safe_dump(dict(rules)))
        interval = f"{int(interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": list(targets), "labels": dict(labels or {})}],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (directory / "prometheus.log").open("wb")
        self._process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=self.url, timeout=10)

    def start(self) -> Self:
        self._process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self._directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={self._directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            cwd=self._directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_for(self._ready, _START_TIMEOUT_S, "Prometheus ready")
        return self

    def stop(self) -> None:
        self._http.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Reading it ---------------------------------------------------------------------------------

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert now pending or firing, as /api/v1/alerts reports it."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def firing(self, name: str) -> list[dict[str, str]]:
        """The labels of every firing alert called `name`."""
        return [
            alert["labels"]
            for alert in self.alerts()
            if alert["labels"]["alertname"] == name and alert["state"] == "firing"
        ]

    def query(self, expression: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query", query=expression)["result"]
        return result

    def targets_up(self) -> int:
        targets = self._get("/api/v1/targets")["activeTargets"]
        return sum(1 for target in targets if target["health"] == "up")

    def wait_for(
        self, condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "the condition"
    ) -> Any:
        """Polls `condition` until it returns something true; fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(f"Prometheus ended:\n{self.log_tail()}")
            found = condition()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout_s}s\n{self.log_tail()}")
            time.sleep(0.2)  # polling Prometheus's API for a condition, bounded by the deadline

    def log_tail(self, lines: int = 30) -> str:
        text = (self._directory / "prometheus.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _ready(self) -> bool:
        try:
            return self._http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _get(self, path: str, **params: str) -> Any:
        answer = self._http.get(path, params=params)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]
