"""CPU seconds of the server processes and of PostgreSQL (postmaster and every backend).

PostgreSQL's total is the postmaster's own time, the time of its children alive now, and the
time of its children already reaped (cutime/cstime), so backends that come and go between two
snapshots are still counted. The load generator's processes measure themselves.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import psutil


def _process_total(process: psutil.Process, with_reaped_children: bool) -> float:
    times = process.cpu_times()
    total = times.user + times.system
    if with_reaped_children:
        total += times.children_user + times.children_system
    return float(total)


def processes_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += _process_total(psutil.Process(pid), with_reaped_children=False)
    return total


def postgres_cpu_s(postmaster_pid: int | None) -> float:
    if postmaster_pid is None:
        return 0.0
    try:
        postmaster = psutil.Process(postmaster_pid)
        total = _process_total(postmaster, with_reaped_children=True)
        children = postmaster.children()
    except psutil.Error:
        return 0.0
    for child in children:
        with contextlib.suppress(psutil.Error):
            total += _process_total(child, with_reaped_children=True)
    return total


class CpuMeter:
    """Snapshots of cumulative CPU seconds of the servers and of PostgreSQL."""

    def __init__(self, server_pids: list[int], postmaster_pid: int | None) -> None:
        self.server_pids = server_pids
        self.postmaster_pid = postmaster_pid

    def snapshot(self) -> dict[str, float]:
        return {
            "servers": processes_cpu_s(self.server_pids),
            "postgres": postgres_cpu_s(self.postmaster_pid),
            "machine": machine_busy_s(),
        }


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle, all cores together."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def add(splits: list[dict[str, Any]]) -> dict[str, Any]:
    """The CPU split of several windows taken together."""
    seconds = {key: sum(s["seconds"][key] for s in splits) for key in splits[0]["seconds"]}
    total = sum(seconds.values())
    window = sum(s["window_s"] for s in splits)
    busy = sum(s["machine_busy"] * s["window_s"] for s in splits)
    return {
        "seconds": seconds,
        "share": {key: (value / total if total > 0 else 0.0) for key, value in seconds.items()},
        "total_s": total,
        "window_s": window,
        "machine_busy": busy / window if window > 0 else 0.0,
    }


def split(
    before: dict[str, float], after: dict[str, float], loadgen_s: float, window_s: float
) -> dict[str, Any]:
    """CPU seconds per group over a window, their shares, and how busy the machine was.

    "other" is everything else the machine ran meanwhile (the harness itself, and any
    unrelated process: on a shared machine it says how much the numbers were disturbed).
    """
    seconds = {key: after[key] - before[key] for key in ("servers", "postgres")}
    seconds["loadgen"] = loadgen_s
    machine = after["machine"] - before["machine"]
    seconds["other"] = max(0.0, machine - sum(seconds.values()))
    total = sum(seconds.values())
    cores = os.cpu_count() or 1
    return {
        "seconds": seconds,
        "share": {key: (value / total if total > 0 else 0.0) for key, value in seconds.items()},
        "total_s": total,
        "window_s": window_s,
        "machine_busy": machine / (window_s * cores) if window_s > 0 else 0.0,
    }
