"""The database's floor: pgbench running the service's own reserve + commit statements
(bench.pgbench_script renders them; bench/pgbench/reserve_commit.sql is the same text).

Run with -M prepared, -c <concurrency>, -j 2 and a per-transaction log, from which the same
warm-up is cut and the same percentiles are computed as for the service.
"""

from __future__ import annotations

import math
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import pgbench_script, stats

APPLICATION_NAME = "bench-pgbench"


@dataclass(frozen=True)
class PgbenchRun:
    binary: Path
    host: str
    port: int
    user: str
    database: str
    clients: int
    ntenants: int
    zipf_s: float
    run_id: int
    warmup_s: float
    duration_s: float
    transactions_per_client: int | None = None  # smoke mode: -t instead of -T


def run(spec: PgbenchRun) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as workdir:
        prefix = Path(workdir) / "tx"
        script = Path(workdir) / "reserve_commit.sql"
        script.write_text(pgbench_script.render())
        command = [
            str(spec.binary),
            "-h", spec.host,
            "-p", str(spec.port),
            "-U", spec.user,
            "-n",
            "-M", "prepared",
            "-c", str(spec.clients),
            "-j", str(min(2, spec.clients)),
            "-f", str(script),
            "-D", f"run={spec.run_id}",
            "-D", f"ntenants={spec.ntenants}",
            "-D", f"zipf_s={spec.zipf_s}",
            "-l", "--log-prefix", str(prefix),
        ]  # fmt: skip
        if spec.transactions_per_client is not None:
            command += ["-t", str(spec.transactions_per_client)]
        else:
            command += ["-T", str(math.ceil(spec.warmup_s + spec.duration_s))]
        command.append(spec.database)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        launched = time.time()
        done = subprocess.run(
            command,
            cwd=workdir,
            capture_output=True,
            text=True,
            env={"PGAPPNAME": APPLICATION_NAME, "PATH": "/usr/bin:/bin"},
            timeout=spec.warmup_s + spec.duration_s + 120,
            check=False,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise RuntimeError(
                f"pgbench failed (exit {done.returncode}):\n"
                f"{done.stdout[-2000:]}{done.stderr[-3000:]}"
            )
        completions, failed = _read_logs(Path(workdir))
    reported = re.search(r"tps = ([0-9.]+)", done.stdout)
    first_start = min((end - latency for end, latency in completions), default=launched)
    warmup = 0.0 if spec.transactions_per_client is not None else spec.warmup_s
    window_start = first_start + warmup
    kept = [(end, latency) for end, latency in completions if end - latency >= window_start]
    window_end = max((end for end, _ in kept), default=window_start)
    window = window_end - window_start
    return {
        "clients": spec.clients,
        "threads": min(2, spec.clients),
        "ntenants": spec.ntenants,
        "transactions": len(kept),
        "transactions_all": len(completions),
        "tps": len(kept) / window if window > 0 else 0.0,
        "tps_reported_by_pgbench": float(reported.group(1)) if reported else None,
        "window_s": window,
        "failed_transactions": failed,
        "latency": {"query": stats.summarize([latency for _, latency in kept])},
        "pgbench_cpu_s": cpu_s,
        "command": " ".join(command),
    }


def _read_logs(directory: Path) -> tuple[list[tuple[float, float]], int]:
    """(completion epoch seconds, latency seconds) of every transaction, and failures."""
    completions: list[tuple[float, float]] = []
    failed = 0
    for log in sorted(directory.glob("tx.*")):
        for line in log.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6:
                continue
            if not fields[2].isdigit():  # "failed", "skipped", ...
                failed += 1
                continue
            completions.append((int(fields[4]) + int(fields[5]) / 1e6, int(fields[2]) / 1e6))
    return completions, failed
