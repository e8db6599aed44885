"""Where a server's CPU goes under load: py-spy samples of the server processes, by part.

`bench.run --profile` samples every server process during each measured query run (py-spy,
200 samples/s) and adds to the run's record the share of samples
in each part of the stack below, and in each thread. A sample is counted where its innermost
Python frame is: work in C (SQLite's engine, asyncpg's protocol, gRPC's core, protobuf) is
counted with the Python function that called it, so "SQLAlchemy" includes the driver calls it
makes and "gRPC" the C core's polling thread. Only the thread holding the GIL is sampled
(py-spy --gil): a server process runs Python on one core at a time, and that is its limit under
load. Waits are not counted (py-spy's own idle detection misses epoll and queue waits), nor C
work done with the GIL released (SQLite's engine, gRPC's core polling, a socket send): those
run beside it.

Sampling costs the servers a little CPU: a profiled run's throughput is not the headline
figure, so `--profile` belongs in a run of its own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RATE_HZ = 200

# (part, a pattern of the innermost frame's "file:function"): the first that matches names it.
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (part, re.compile(pattern))
    for part, pattern in (
        ("gRPC (grpc.aio, its Cython)", r"/grpc/|_cygrpc|grpc/_cython"),
        # Callbacks the loop runs that have no Python frame: gRPC's Cython, futures' wake-ups.
        (
            "event-loop callbacks in C (gRPC's Cython, futures)",
            r"/asyncio/events\.py:Handle\._run$",
        ),
        ("protobuf", r"/google/protobuf/"),
        ("asyncpg", r"/asyncpg/"),
        ("SQLAlchemy (and its driver calls)", r"/sqlalchemy/"),
        ("SQLite driver", r"/sqlite3/|/aiosqlite/"),
        ("service: transport (servicers, call guard)", r"/billing_service/api/"),
        ("service: storage", r"/billing_service/storage/"),
        ("service: domain rules", r"/billing_service/domain/"),
        ("service: core, metrics, logs", r"/billing_service/"),
        ("prometheus_client", r"/prometheus_client/"),
        ("logging", r"/logging/"),
        (
            "asyncio loop, threads, queues",
            r"/asyncio/|/selectors\.py|/threading\.py|/queue\.py|/concurrent/",
        ),
        ("dataclasses", r"/dataclasses\.py|^<string>:"),
    )
)
OTHER = "other"

# "thread (1234): name;frame (file:line);frame (file:line) count"
_LINE = re.compile(r"^thread \(\d+\): (?P<thread>[^;]*);(?P<stack>.*) (?P<count>\d+)$")
_FRAME_FILE = re.compile(r"\((?P<file>[^()]*):\d+\)$")


@dataclass(frozen=True)
class Profile:
    samples: int
    parts: dict[str, int]
    threads: dict[str, int]
    leaves: dict[str, int]  # innermost function (file:function): samples, the top ones

    def as_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "rate_hz": RATE_HZ,
            "parts": self.parts,
            "threads": self.threads,
            "top_functions": self.leaves,
        }


def part_of(frame_file: str, function: str) -> str:
    where = f"{frame_file}:{function}"
    for part, pattern in PARTS:
        if pattern.search(where):
            return part
    return OTHER


def summarize(raw_lines: Sequence[str], top: int = 15) -> Profile:
    """Counts py-spy's raw (collapsed) samples by part, thread and innermost function."""
    parts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw_lines:
        match = _LINE.match(line.strip())
        if match is None:
            continue
        count = int(match["count"])
        leaf = match["stack"].rsplit(";", 1)[-1]
        file_match = _FRAME_FILE.search(leaf)
        frame_file = file_match["file"] if file_match else ""
        function = leaf.split(" (", 1)[0]
        parts[part_of(frame_file, function)] += count
        thread = match["thread"] or "unnamed"
        threads[re.sub(r"[-_]?\d+$", "", thread)] += count
        leaves[f"{_short(frame_file)}:{function}"] += count
    return Profile(
        samples=sum(parts.values()),
        parts=dict(parts.most_common()),
        threads=dict(threads.most_common()),
        leaves=dict(leaves.most_common(top)),
    )


def _short(frame_file: str) -> str:
    for marker in ("site-packages/", "billing_service/", "lib/python3"):
        if marker in frame_file:
            return frame_file.split(marker, 1)[1].lstrip("/")
    return frame_file


def py_spy() -> str:
    """py-spy from the project's environment (a dev dependency), or PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (scripts/uv sync --locked --extra dev)")
    return found


class Sampler:
    """py-spy recording each pid for `seconds`, started now; `finish()` waits and summarizes."""

    def __init__(self, pids: Sequence[int], seconds: float) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="bench-profile-")
        self._outputs = [Path(self._directory.name) / f"{pid}.txt" for pid in pids]
        command = py_spy()
        self._processes = [
            subprocess.Popen(
                [
                    command,
                    "record",
                    "--gil",
                    "--threads",
                    "--full-filenames",
                    "--format",
                    "raw",
                    "--rate",
                    str(RATE_HZ),
                    "--duration",
                    str(max(1, round(seconds))),
                    "--pid",
                    str(pid),
                    "--output",
                    str(output),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, output in zip(pids, self._outputs, strict=True)
        ]

    def finish(self, timeout_s: float = 30) -> Profile | None:
        try:
            for process in self._processes:
                process.wait(timeout=timeout_s)
            lines: list[str] = []
            for output in self._outputs:
                if output.exists():
                    lines.extend(output.read_text().splitlines())
            return summarize(lines) if lines else None
        finally:
            for process in self._processes:
                if process.poll() is None:
                    process.kill()
            self._directory.cleanup()
