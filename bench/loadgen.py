"""The load generator: worker processes (multiprocessing spawn), each an asyncio loop of callers.

Closed loop: every caller sends its next query as soon as the previous one is answered. A run
starts in every worker at the same moment (a barrier), warms up for `warmup_s` (calls made, not
recorded), then records every query that *starts* in the measured window, and stops by itself
when the window's duration has passed or its share of the query budget is used, whichever comes
first. The workers stay alive between runs, so a run costs no process start-up.

Modes (what one "query" is):
  query    ReserveCredit, then Commit (90%) or Refund without amount (release, 10%)
  stream   ReserveCredit for the input and a first chunk of output, `extensions` ExtendHold calls
           of one chunk each, then Commit (90%) or release (10%): a streamed answer
  reserve  ReserveCredit only (holds stay open; used by the big-ledger comparison)
  check    CheckAccess
  noop     grpc.health.v1.Health/Check twice: the transport's ceiling for a two-RPC query
"""

from __future__ import annotations

import asyncio
import math
import queue
import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import stats, workload
from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2

Mode = Literal["query", "stream", "reserve", "check", "noop"]

_RPC_TIMEOUT_S = 60.0
_BARRIER_TIMEOUT_S = 120.0
_CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LoadSpec:
    """One run, as the harness asks for it."""

    mode: Mode
    addresses: tuple[str, ...]
    concurrency: int
    tenants: workload.TenantChoice
    warmup_s: float
    duration_s: float
    max_queries: int
    hold_ttl_s: int | None = None
    seed: int = 0
    extensions: int = 0  # ExtendHold calls per query of the `stream` mode

    @property
    def rpcs_per_query(self) -> int:
        """The RPCs of one query that settles (a release counts as the settling RPC)."""
        if self.mode == "stream":
            return 2 + self.extensions
        return 1 if self.mode in ("reserve", "check") else 2


@dataclass(frozen=True)
class _WorkerSpec:
    load: LoadSpec
    callers: int
    first_caller: int
    max_queries: int
    tag: str


@dataclass
class WorkerResult:
    worker: int
    measure_start: float = math.nan  # time.monotonic(), comparable across processes (Linux)
    measure_end: float = math.nan
    queries_started: int = 0  # measured queries begun (the budget counts these)
    queries_ok: int = 0  # measured queries whose every RPC succeeded
    rpcs_total: int = 0  # every RPC sent, warm-up included (database counters include it too)
    rpcs_by_method: Counter[str] = field(default_factory=Counter)  # warm-up included
    latencies: dict[str, list[float]] = field(default_factory=dict)  # measured, seconds
    errors: Counter[str] = field(default_factory=Counter)  # "Method:CODE" -> count
    denied: int = 0  # ReserveCredit or ExtendHold answered allowed=false (never expected)
    cpu_s: float = 0.0  # this process's CPU over its measured window
    failure: str | None = None  # a traceback when the worker itself broke


@dataclass(frozen=True)
class LoadResult:
    spec: LoadSpec
    window_s: float
    queries_ok: int
    queries_started: int
    rpcs_total: int
    rpcs_by_method: dict[str, int]
    latency: dict[str, dict[str, Any]]
    errors: dict[str, int]
    denied: int
    loadgen_cpu_s: float
    # Every measured latency in seconds, per RPC and "query" (kept out of the JSON).
    raw: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def queries_per_s(self) -> float:
        return self.queries_ok / self.window_s if self.window_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.spec.mode,
            "extensions_per_query": self.spec.extensions if self.spec.mode == "stream" else 0,
            "rpcs_per_query": self.spec.rpcs_per_query,
            "concurrency": self.spec.concurrency,
            "servers": len(self.spec.addresses),
            "window_s": self.window_s,
            "queries_ok": self.queries_ok,
            "queries_started": self.queries_started,
            "queries_per_s": self.queries_per_s,
            "rpcs_total_with_warmup": self.rpcs_total,
            "rpcs_by_method_with_warmup": self.rpcs_by_method,
            "latency": self.latency,
            "errors": self.errors,
            "denied": self.denied,
        }


class LoadGeneratorError(RuntimeError):
    """A worker broke or did not answer in time."""


class LoadGenerator:
    """A fixed set of spawned worker processes that run one LoadSpec at a time."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("at least one load generator process")
        import multiprocessing

        self._context: SpawnContext = multiprocessing.get_context("spawn")
        self._barrier: Barrier = self._context.Barrier(processes + 1)
        self._results: Queue[WorkerResult] = self._context.Queue()
        self._commands: list[Queue[_WorkerSpec | None]] = []
        self._processes: list[SpawnProcess] = []
        for index in range(processes):
            commands: Queue[_WorkerSpec | None] = self._context.Queue()
            process = self._context.Process(
                target=_worker_main,
                args=(index, commands, self._results, self._barrier),
                name=f"bench-loadgen-{index}",
                daemon=True,
            )
            process.start()
            self._commands.append(commands)
            self._processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def run(self, spec: LoadSpec, at_measure_start: Callable[[], None] | None = None) -> LoadResult:
        """Runs `spec` on every worker at once; calls `at_measure_start()` when warm-up ends."""
        workers = len(self._processes)
        tag = uuid.uuid4().hex[:10]
        for index, commands in enumerate(self._commands):
            callers = spec.concurrency // workers + (1 if index < spec.concurrency % workers else 0)
            first = sum(
                spec.concurrency // workers + (1 if i < spec.concurrency % workers else 0)
                for i in range(index)
            )
            share = math.ceil(spec.max_queries * callers / spec.concurrency) if callers else 0
            commands.put(
                _WorkerSpec(
                    replace(spec, seed=spec.seed + index), callers, first, share, f"{tag}{index}"
                )
            )
        try:
            self._barrier.wait(_BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            self._barrier.reset()
            raise LoadGeneratorError(
                "a load generator worker did not start the run:\n" + self._drain_failures()
            ) from None
        time.sleep(spec.warmup_s)
        if at_measure_start is not None:
            at_measure_start()
        deadline = time.monotonic() + spec.duration_s + _RPC_TIMEOUT_S + 30
        results: list[WorkerResult] = []
        while len(results) < workers:
            try:
                result = self._results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise LoadGeneratorError("a load generator worker did not finish in time") from None
            if result.failure is not None:
                raise LoadGeneratorError(f"worker {result.worker} failed:\n{result.failure}")
            results.append(result)
        return _combine(spec, results)

    def _drain_failures(self) -> str:
        failures = []
        while True:
            try:
                result = self._results.get(timeout=1.0)
            except queue.Empty:
                break
            if result.failure:
                failures.append(f"worker {result.worker}: {result.failure}")
        return "\n".join(failures) or "(no traceback)"

    def close(self) -> None:
        for commands in self._commands:
            commands.put(None)
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _combine(spec: LoadSpec, results: list[WorkerResult]) -> LoadResult:
    active = [r for r in results if not math.isnan(r.measure_start)]
    window = (
        max(r.measure_end for r in active) - min(r.measure_start for r in active) if active else 0.0
    )
    latencies: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    by_method: Counter[str] = Counter()
    for result in results:
        for name, values in result.latencies.items():
            latencies.setdefault(name, []).extend(values)
        errors.update(result.errors)
        by_method.update(result.rpcs_by_method)
    return LoadResult(
        spec=spec,
        window_s=window,
        queries_ok=sum(r.queries_ok for r in results),
        queries_started=sum(r.queries_started for r in results),
        rpcs_total=sum(r.rpcs_total for r in results),
        rpcs_by_method=dict(by_method),
        latency={name: stats.summarize(values) for name, values in sorted(latencies.items())},
        errors=dict(errors),
        denied=sum(r.denied for r in results),
        loadgen_cpu_s=sum(r.cpu_s for r in results),
        raw=latencies,
    )


def merge(results: list[LoadResult]) -> LoadResult:
    """Several runs of one spec (e.g. interleaved rounds) as one: windows and counts add up."""
    raw: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    by_method: Counter[str] = Counter()
    for result in results:
        for name, values in result.raw.items():
            raw.setdefault(name, []).extend(values)
        errors.update(result.errors)
        by_method.update(result.rpcs_by_method)
    return LoadResult(
        spec=results[0].spec,
        window_s=sum(r.window_s for r in results),
        queries_ok=sum(r.queries_ok for r in results),
        queries_started=sum(r.queries_started for r in results),
        rpcs_total=sum(r.rpcs_total for r in results),
        rpcs_by_method=dict(by_method),
        latency={name: stats.summarize(values) for name, values in sorted(raw.items())},
        errors=dict(errors),
        denied=sum(r.denied for r in results),
        loadgen_cpu_s=sum(r.loadgen_cpu_s for r in results),
        raw=raw,
    )


# Inside a worker process.


def _worker_main(
    index: int,
    commands: Queue[_WorkerSpec | None],
    results: Queue[WorkerResult],
    barrier: Barrier,
) -> None:
    while True:
        spec = commands.get()
        if spec is None:
            return
        try:
            result = asyncio.run(_run(index, spec, barrier))
        except BaseException:
            barrier.abort()
            result = WorkerResult(index, failure=traceback.format_exc())
        results.put(result)


class _Window:
    """The run's clock and query budget, shared by the callers of one worker."""

    def __init__(self, spec: _WorkerSpec, start: float) -> None:
        self.measure_start = start + spec.load.warmup_s
        self.deadline = self.measure_start + spec.load.duration_s
        self.budget = spec.max_queries

    def next_query(self, result: WorkerResult) -> bool | None:
        """None: stop; True: a measured query; False: a warm-up query."""
        now = time.monotonic()
        if now >= self.deadline or result.queries_started >= self.budget:
            return None
        if now < self.measure_start:
            return False
        result.queries_started += 1
        return True


async def _run(index: int, spec: _WorkerSpec, barrier: Barrier) -> WorkerResult:
    result = WorkerResult(index)
    loop = asyncio.get_running_loop()
    if spec.callers == 0:
        await loop.run_in_executor(None, barrier.wait, _BARRIER_TIMEOUT_S)
        return result
    channels = [grpc.aio.insecure_channel(address) for address in spec.load.addresses]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), _CONNECT_TIMEOUT_S)
        callers = [
            _Caller(spec, result, channels, spec.first_caller + i) for i in range(spec.callers)
        ]
        await loop.run_in_executor(None, barrier.wait, _BARRIER_TIMEOUT_S)
        window = _Window(spec, time.monotonic())
        cpu_meter = asyncio.create_task(_cpu_at(window.measure_start))
        await asyncio.gather(*(caller.loop(window) for caller in callers))
        result.measure_end = time.monotonic()
        result.measure_start = window.measure_start
        cpu_start = await cpu_meter
        result.cpu_s = time.process_time() - cpu_start
        if result.queries_started == 0:
            result.measure_start = result.measure_end = math.nan
    finally:
        for channel in channels:
            await channel.close(None)
    return result


async def _cpu_at(moment: float) -> float:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))
    return time.process_time()


class _Caller:
    def __init__(
        self, spec: _WorkerSpec, result: WorkerResult, channels: list[grpc.aio.Channel], number: int
    ) -> None:
        channel = channels[number % len(channels)]
        self._billing = billing_pb2_grpc.BillingServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._mode = spec.load.mode
        self._extensions = spec.load.extensions if spec.load.mode == "stream" else 0
        self._result = result
        self._rng = random.Random(spec.load.seed * 1_000_003 + number)
        self._tenants = workload.TenantPicker(spec.load.tenants, self._rng)
        self._prefix = f"b{spec.tag}-{number}-"
        self._user = f"user-{number % 16}"
        self._ttl = (
            None
            if spec.load.hold_ttl_s is None
            else duration_pb2.Duration(seconds=spec.load.hold_ttl_s)
        )
        self._seq = 0
        self._recorded: dict[str, list[float]] = {}

    async def loop(self, window: _Window) -> None:
        while (measured := window.next_query(self._result)) is not None:
            self._seq += 1
            started = time.monotonic()
            ok = await self._one_query(measured)
            if measured and ok:
                self._result.queries_ok += 1
                self._record("query", time.monotonic() - started)
        for name, values in self._recorded.items():
            self._result.latencies.setdefault(name, []).extend(values)

    def _record(self, name: str, seconds: float) -> None:
        self._recorded.setdefault(name, []).append(seconds)

    async def _call(self, method: str, measured: bool, call: Any) -> Any:
        self._result.rpcs_total += 1
        self._result.rpcs_by_method[method] += 1
        started = time.monotonic()
        try:
            answer = await call
        except grpc.aio.AioRpcError as error:
            self._result.errors[f"{method}:{error.code().name}"] += 1
            return None
        if measured:
            self._record(method, time.monotonic() - started)
        return answer

    async def _one_query(self, measured: bool) -> bool:
        if self._mode == "noop":
            request = health_pb2.HealthCheckRequest(service="")
            for _ in range(2):
                if (
                    await self._call(
                        "Health.Check",
                        measured,
                        self._health.Check(request, timeout=_RPC_TIMEOUT_S),
                    )
                    is None
                ):
                    return False
            return True
        tenant = self._tenants.pick()
        streamed = self._mode == "stream"
        output_tokens = (
            workload.STREAM_FIRST_OUTPUT_TOKENS if streamed else workload.ESTIMATE_MAX_OUTPUT_TOKENS
        )
        estimate = billing_pb2.QueryEstimate(
            input_tokens=workload.ESTIMATE_INPUT_TOKENS, max_output_tokens=output_tokens
        )
        if self._mode == "check":
            answer = await self._call(
                "CheckAccess",
                measured,
                self._billing.CheckAccess(
                    billing_pb2.CheckAccessRequest(
                        tenant_id=tenant, model=workload.MODEL, estimate=estimate
                    ),
                    timeout=_RPC_TIMEOUT_S,
                ),
            )
            if answer is not None and not answer.decision.allowed:
                self._result.denied += 1
                return False
            return answer is not None
        reserved = await self._call(
            "ReserveCredit",
            measured,
            self._billing.ReserveCredit(
                billing_pb2.ReserveCreditRequest(
                    request_id=f"{self._prefix}{self._seq}-r",
                    tenant_id=tenant,
                    user_id=self._user,
                    model=workload.MODEL,
                    estimate=estimate,
                    ttl=self._ttl,
                ),
                timeout=_RPC_TIMEOUT_S,
            ),
        )
        if reserved is None:
            return False
        if not reserved.decision.allowed:
            self._result.denied += 1
            return False
        if self._mode == "reserve":
            return True
        reservation_id = reserved.reservation.reservation_id
        for number in range(1, self._extensions + 1):
            extended = await self._call(
                "ExtendHold",
                measured,
                self._billing.ExtendHold(
                    billing_pb2.ExtendHoldRequest(
                        request_id=f"{self._prefix}{self._seq}-e{number}",
                        reservation_id=reservation_id,
                        additional_output_tokens=workload.STREAM_CHUNK_TOKENS,
                        usage=types_pb2.TokenUsage(
                            input_tokens=workload.ESTIMATE_INPUT_TOKENS,
                            output_tokens=output_tokens,
                        ),
                        ttl=self._ttl,
                    ),
                    timeout=_RPC_TIMEOUT_S,
                ),
            )
            if extended is None:
                return False
            if not extended.decision.allowed:
                self._result.denied += 1
                return False
            output_tokens += workload.STREAM_CHUNK_TOKENS
        if self._rng.random() < workload.RELEASE_SHARE:
            settled = await self._call(
                "Refund",
                measured,
                self._billing.Refund(
                    billing_pb2.RefundRequest(
                        request_id=f"{self._prefix}{self._seq}-s", reservation_id=reservation_id
                    ),
                    timeout=_RPC_TIMEOUT_S,
                ),
            )
        else:
            settled = await self._call(
                "Commit",
                measured,
                self._billing.Commit(
                    billing_pb2.CommitRequest(
                        request_id=f"{self._prefix}{self._seq}-s",
                        reservation_id=reservation_id,
                        usage=types_pb2.TokenUsage(
                            input_tokens=workload.COMMIT_INPUT_TOKENS,
                            cached_input_tokens=workload.COMMIT_CACHED_INPUT_TOKENS,
                            output_tokens=self._rng.randint(
                                1,
                                output_tokens if streamed else workload.COMMIT_MAX_OUTPUT_TOKENS,
                            ),
                        ),
                    ),
                    timeout=_RPC_TIMEOUT_S,
                ),
            )
        return settled is not None
