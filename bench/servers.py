"""`billing-service serve` processes for a scenario, and what their logs said."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.server_process import ServerProcess

# A log line worth reporting: a warning, an error or a traceback (text or JSON log format).
_TROUBLE = re.compile(r"\bWARNING\b|\bERROR\b|\bCRITICAL\b|Traceback")


class Servers:
    """`count` server processes on one database, each listening on a free loopback port."""

    def __init__(
        self,
        database_url: str,
        count: int,
        *,
        pool_size: int,
        price_table: Path,
        extra_settings: Mapping[str, str],
    ) -> None:
        self.settings = {
            "BILLING_DATABASE_URL": database_url,
            "BILLING_LISTEN_ADDRESS": "127.0.0.1:0",
            "BILLING_PRICE_TABLE": str(price_table),
            "BILLING_DB_POOL_SIZE": str(pool_size),
            **extra_settings,
        }
        self.processes: list[ServerProcess] = []
        self._seen: list[int] = []
        try:
            for _ in range(count):
                self.processes.append(ServerProcess(self.settings))
                self._seen.append(0)
        except BaseException:
            self.stop()
            raise
        # What they logged while starting is reported apart from what they log under load.
        self.startup_trouble = self.new_trouble()

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(p.address for p in self.processes)

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self.processes]

    def dead(self) -> list[str]:
        """Servers that exited, with their exit codes (none should, during a benchmark)."""
        return [
            f"server {i} ({p.address}) exited with {p.process.returncode}"
            for i, p in enumerate(self.processes)
            if p.process.poll() is not None
        ]

    def new_trouble(self) -> dict[str, Any]:
        """Warning/error lines logged since the last call (counts and a few samples)."""
        fresh: list[str] = []
        for index, process in enumerate(self.processes):
            log = list(process.log)  # appended to by the process's reader thread
            fresh.extend(
                line.rstrip() for line in log[self._seen[index] :] if _TROUBLE.search(line)
            )
            self._seen[index] = len(log)
        return {"lines": len(fresh), "samples": [line[:400] for line in fresh[:5]]}

    def stop(self) -> list[int]:
        codes = []
        for process in self.processes:
            try:
                codes.append(process.terminate())
            except Exception:
                process.kill()
                codes.append(-9)
        return codes
