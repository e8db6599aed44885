"""The benchmark harness: `python -m bench.run [--smoke] [--out NAME] ...` (see bench/README.md).

For every scenario and concurrency level, in this order:
  query    ReserveCredit + Commit (90%) / release (10%), closed loop, the service's throughput
  noop     grpc.health.v1.Health/Check twice per query on the same servers: the gRPC ceiling
  stream   with --streamed-extensions N: ReserveCredit for a first chunk, N ExtendHold, then
           Commit (90%) / release (10%): a streamed answer, against the same no-op ceiling
  check    CheckAccess alone
  pgbench  bench/pgbench/reserve_commit.sql at the same concurrency: the database's floor
and after every run the invariant check (ledger audit clean, no tenant below 0 available).
Then ReserveCredit with a big ledger versus an empty one. Exit status 1 if an invariant broke
(or a run had errors, denials, or a server died), 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import (
    cpu,
    dashboard,
    machine,
    pg,
    pgbench,
    pgbench_script,
    profile,
    report,
    seed,
    sqlcapture,
    workload,
)
from bench.loadgen import LoadGenerator, LoadResult, LoadSpec, Mode
from bench.loadgen import merge as loadgen_merge
from bench.servers import Servers
from billing_service.storage import postgres_hot_path
from billing_service.storage.database import create_engine
from billing_service.storage.migrations import migrate

_log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    backend: str  # "postgresql" | "sqlite"
    servers: int
    pattern: str  # "hot" | "spread"

    @property
    def topology(self) -> tuple[str, int]:
        return (self.backend, self.servers)


SCENARIOS = (
    Scenario("a", "(a) one hot tenant, 1 server, PostgreSQL", "postgresql", 1, "hot"),
    Scenario("b", "(b) 10,000 tenants (Zipf), 1 server, PostgreSQL", "postgresql", 1, "spread"),
    Scenario("c-hot", "(c) one hot tenant, 3 servers, PostgreSQL", "postgresql", 3, "hot"),
    Scenario(
        "c-spread", "(c) 10,000 tenants (Zipf), 3 servers, PostgreSQL", "postgresql", 3, "spread"
    ),
    Scenario("d-hot", "(d) one hot tenant, 1 server, SQLite", "sqlite", 1, "hot"),
    Scenario("d-spread", "(d) 10,000 tenants (Zipf), 1 server, SQLite", "sqlite", 1, "spread"),
)
_ALIASES = {"c": ("c-hot", "c-spread"), "d": ("d-hot", "d-spread")}


@dataclass
class Options:
    concurrency: list[int]
    duration_s: float
    warmup_s: float
    max_queries: int
    scenarios: list[Scenario]
    tenants: int
    zipf_s: float
    client_processes: int
    pgbench: bool
    check_access: bool
    big_ledger_rows: int
    big_ledger_concurrency: int
    big_ledger_queries: int
    big_ledger_duration_s: float
    settle_s: float
    sweep_interval_s: float
    pool_size: int
    access_log: bool
    coalesce_writes: bool
    smoke: bool
    out: Path
    command: str
    pgbench_transactions_per_client: int | None = None
    streamed_extensions: int = 0  # 0: no streamed workload
    profile: bool = False  # py-spy samples of the servers during each query run

    def as_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "max_queries_per_run": self.max_queries,
            "scenarios": [s.key for s in self.scenarios],
            "spread_tenants": self.tenants,
            "zipf_s": self.zipf_s,
            "client_processes": self.client_processes,
            "pgbench": self.pgbench,
            "check_access": self.check_access,
            "big_ledger_rows": self.big_ledger_rows,
            "big_ledger_concurrency": self.big_ledger_concurrency,
            "big_ledger_queries": self.big_ledger_queries,
            "big_ledger_duration_s": self.big_ledger_duration_s,
            "db_stats_settle_s": self.settle_s,
            "expiry_sweep_interval_s": self.sweep_interval_s,
            "pool_size_per_server": self.pool_size or "max callers / servers + 2",
            "access_log": self.access_log,
            "coalesce_writes": self.coalesce_writes,
            "release_share": workload.RELEASE_SHARE,
            "hold_micros": workload.HOLD_MICROS,
            "streamed_extensions": self.streamed_extensions,
            "stream_first_output_tokens": workload.STREAM_FIRST_OUTPUT_TOKENS,
            "stream_chunk_tokens": workload.STREAM_CHUNK_TOKENS,
            "profile": self.profile,
        }


def _csv_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def _scenarios(text: str) -> list[Scenario]:
    keys: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        keys.extend(_ALIASES.get(part, (part,)))
    by_key = {s.key: s for s in SCENARIOS}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {unknown}; use a, b, c, d, c-hot, c-spread, d-hot, d-spread"
        )
    return [s for s in SCENARIOS if s.key in keys]


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="a few seconds in all: tiny runs of every scenario")
    add("--out", default=None, help="result name under bench/results/ (or a path prefix)")
    add("--concurrency", type=_csv_ints, default=None, help="callers per run (1,16,64,256)")
    add("--duration", type=float, default=None, help="measured seconds per run (10)")
    add("--warmup", type=float, default=None, help="unmeasured seconds before each run (2)")
    add("--max-queries", type=int, default=None, help="query budget per run (1000000)")
    add("--scenarios", type=_scenarios, default=None, help="a,b,c,d (or c-hot, d-spread, ...)")
    add("--tenants", type=int, default=None, help="tenants of the spread scenarios (10000)")
    add("--zipf-s", type=float, default=workload.DEFAULT_ZIPF_S, help="Zipf exponent (1.1)")
    add("--client-processes", type=int, default=2, help="load generator processes (2)")
    add("--no-pgbench", action="store_true", help="skip the pgbench ceiling")
    add("--no-check-access", action="store_true", help="skip the CheckAccess runs")
    add("--big-ledger-rows", type=int, default=None, help="ledger rows to add (10000000; 0: skip)")
    add("--big-ledger-concurrency", type=int, default=1)
    add("--big-ledger-queries", type=int, default=None, help="reserves per big-ledger run (3000)")
    add("--big-ledger-duration", type=float, default=None, help="seconds per big-ledger run (10)")
    add(
        "--db-stats-settle",
        type=float,
        default=None,
        help="seconds before reading pg_stat_database (11)",
    )
    add("--sweep-interval", type=float, default=1.0, help="BILLING_EXPIRY_SWEEP_INTERVAL_S (1.0)")
    add(
        "--pool-size",
        type=int,
        default=16,
        help="BILLING_DB_POOL_SIZE per server (16; 0: callers / servers + 2, one each)",
    )
    add("--access-log", action="store_true", help="keep the servers' per-call access log on")
    add(
        "--streamed-extensions",
        type=int,
        default=None,
        help="also run the streamed query: a hold, N ExtendHold, a settle (0: skip; smoke: 2)",
    )
    add("--coalesce-writes", action="store_true", help="BILLING_DB_COALESCE_WRITES=true")
    add(
        "--profile",
        action="store_true",
        help="sample the servers with py-spy during each query run (bench/profile.py)",
    )
    add("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s bench %(message)s", stream=sys.stderr
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if args.smoke else full)

    name = args.out or ("smoke" if args.smoke else f"bench-{datetime.now(UTC):%Y%m%d-%H%M%S}")
    out = Path(name) if ("/" in name or name.startswith(".")) else RESULTS / name
    return Options(
        concurrency=pick(args.concurrency, [1, 16, 64, 256], [2]),
        # Smoke runs end on their query count; the duration is only a bound for a slow machine.
        duration_s=pick(args.duration, 10.0, 2.0),
        warmup_s=pick(args.warmup, 2.0, 0.1),
        max_queries=pick(args.max_queries, 1_000_000, 20),
        scenarios=pick(args.scenarios, list(SCENARIOS), list(SCENARIOS)),
        tenants=pick(args.tenants, 10_000, 200),
        zipf_s=args.zipf_s,
        client_processes=args.client_processes,
        pgbench=not args.no_pgbench,
        check_access=not args.no_check_access,
        big_ledger_rows=pick(args.big_ledger_rows, 10_000_000, 2_000),
        big_ledger_concurrency=args.big_ledger_concurrency,
        big_ledger_queries=pick(args.big_ledger_queries, 3_000, 20),
        big_ledger_duration_s=pick(args.big_ledger_duration, 10.0, 2.0),
        settle_s=pick(args.db_stats_settle, pg.FULL_SETTLE_S, 0.0),
        sweep_interval_s=args.sweep_interval,
        pool_size=args.pool_size,
        access_log=args.access_log,
        coalesce_writes=args.coalesce_writes,
        smoke=args.smoke,
        out=out,
        command=shlex.join(
            ["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)]
        ),
        pgbench_transactions_per_client=5 if args.smoke else None,
        streamed_extensions=max(0, pick(args.streamed_extensions, 0, 2)),
        profile=args.profile,
    )


def _harness_engine(cluster: pg.Cluster, database: str) -> AsyncEngine:
    """One connection, as the harness role: its statements stay out of the service's counts,
    and `flush_own_stats` always flushes the backend that ran the audit."""
    return create_async_engine(
        cluster.harness_url(database),
        pool_size=1,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": "bench-harness"}},
    )


@dataclass
class _Topology:
    """One database and its servers, shared by the scenarios of the same shape."""

    backend: str
    database: str  # PostgreSQL database name, or the SQLite file
    url: str
    engine: AsyncEngine
    servers: Servers
    meter: cpu.CpuMeter
    dbid: int | None
    code: dict[str, Any] = field(default_factory=machine.code_version)


@dataclass
class _DbWindow:
    before: dict[str, int]
    statements: list[pg.Statement]
    ended: float
    rpcs: int
    rpcs_per_query: int


@dataclass
class Benchmark:
    options: Options
    problems: list[str] = field(default_factory=list)
    runner: asyncio.Runner = field(default_factory=asyncio.Runner)
    cluster: pg.Cluster | None = None
    postmaster: int | None = None
    loadgen: LoadGenerator | None = None
    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-")))
    pgbench_runs: int = 0
    # What has been measured so far (written as <out>.partial.json if the run breaks).
    result: dict[str, Any] = field(default_factory=dict)

    # Orchestration

    def run(self) -> dict[str, Any]:
        options = self.options
        started = time.time()
        prices = self.work / "prices.toml"
        prices.write_text(workload.PRICE_TABLE_TOML)
        needs_pg = any(s.backend == "postgresql" for s in options.scenarios) or (
            options.big_ledger_rows > 0
        )
        result = self.result
        result |= {
            "schema": "ai-billing-bench/1",
            "command": options.command,
            "smoke": options.smoke,
            "started_at": datetime.now(UTC).isoformat(),
            "config": options.as_json(),
            "scenarios": {},
        }
        pg_version = None
        if needs_pg:
            max_conc = max([*options.concurrency, options.big_ledger_concurrency])
            self.cluster = pg.Cluster(max_connections=max(200, 2 * max_conc + 100))
            _log.info("starting PostgreSQL")
            self.cluster.start()
            self.runner.run(self.cluster.open())
            pg_version = self.runner.run(self.cluster.version())
            self.postmaster = self.runner.run(self.cluster.postmaster_pid())
        result["machine"] = machine.describe(pg_version)
        self.loadgen = LoadGenerator(options.client_processes)
        result["machine"]["loadgen_pids"] = self.loadgen.pids
        topologies: dict[tuple[str, int], list[Scenario]] = {}
        for scenario in options.scenarios:
            topologies.setdefault(scenario.topology, []).append(scenario)
        for (backend, count), scenarios in topologies.items():
            topology = self._start_topology(backend, count, scenarios, prices, result)
            try:
                for scenario in scenarios:
                    result["scenarios"][scenario.key] = self._scenario(topology, scenario)
            finally:
                self._stop_topology(topology)
        if needs_pg and options.big_ledger_rows > 0:
            result["big_ledger"] = self._big_ledger(prices)
        if needs_pg:
            result["dashboard_summary"] = dashboard.measure_dashboard_summary(
                records=2_000 if options.smoke else 1_000_000, calls=40 if options.smoke else 500
            )
        result["finished_at"] = datetime.now(UTC).isoformat()
        result["elapsed_s"] = time.time() - started
        report.add_ratios_and_targets(result)
        result["problems"] = self.problems
        result["invariants_ok"] = report.all_invariants_ok(result)
        result["ok"] = result["invariants_ok"] and not self.problems
        return result

    def close(self) -> None:
        if self.loadgen is not None:
            self.loadgen.close()
        if self.cluster is not None:
            try:
                self.runner.run(self.cluster.close())
            finally:
                self.cluster.stop()
        self.runner.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def _start_topology(
        self,
        backend: str,
        count: int,
        scenarios: list[Scenario],
        prices: Path,
        result: dict[str, Any],
    ) -> _Topology:
        options = self.options
        dbid = None
        if backend == "postgresql":
            assert self.cluster is not None
            database = f"bench_pg_{count}"
            url = self.cluster.create_database(database)
            engine = _harness_engine(self.cluster, database)
        else:
            database = str(self.work / "bench.db")
            url = f"sqlite+aiosqlite:///{database}"
            engine = create_engine(url)
        _log.info("%s, %d server(s): migrating and seeding", backend, count)
        self.runner.run(migrate(url))
        spread = any(s.pattern == "spread" for s in scenarios)
        if spread:
            tenants = workload.spread_choice(options.tenants, options.zipf_s).tenant_ids()
            self.runner.run(seed.seed_tenants(engine, tenants))
        if backend == "postgresql" and options.pgbench:
            tenants = [f"{workload.PGBENCH_PREFIX}{k}" for k in range(1, options.tenants + 1)]
            self.runner.run(seed.seed_tenants(engine, tenants))
        if backend == "postgresql":
            assert self.cluster is not None
            dbid = self.runner.run(self.cluster.database_oid(database))
        pool = options.pool_size or max(2, math.ceil(max(options.concurrency) / count) + 2)
        servers = Servers(
            url, count, pool_size=pool, price_table=prices, extra_settings=self._server_settings()
        )
        try:
            if any(s.pattern == "hot" for s in scenarios):
                seed.create_tenant_via_admin(servers.addresses[0], workload.HOT_TENANT)
            if backend == "postgresql" and "pgbench_script" not in result:
                result["pgbench_script"] = self._check_pgbench_script(servers, dbid)
            self.runner.run(pg.flush_own_stats(engine))
        except BaseException:
            servers.stop()
            raise
        _log.info("servers up: %s (pool %d each)", ", ".join(servers.addresses), pool)
        if servers.startup_trouble["lines"]:
            _log.warning("servers logged at start-up: %s", servers.startup_trouble["samples"])
        meter = cpu.CpuMeter(servers.pids, self.postmaster if backend == "postgresql" else None)
        return _Topology(backend, database, url, engine, servers, meter, dbid)

    def _stop_topology(self, topology: _Topology) -> None:
        codes = topology.servers.stop()
        if any(code != 0 for code in codes):
            self.problems.append(f"{topology.backend} servers exited with {codes}")
        self.runner.run(topology.engine.dispose())

    def _check_pgbench_script(self, servers: Servers, dbid: int | None) -> dict[str, Any]:
        assert self.cluster is not None
        assert dbid is not None
        seed.create_tenant_via_admin(servers.addresses[0], "capture-1")
        captured = self.runner.run(
            sqlcapture.capture(self.cluster, dbid, servers.addresses[0], "capture-1")
        )
        # pgbench runs the statements rendered from the service's own (bench.pgbench_script);
        # `current` says whether the committed copy for readers is that text too.
        current = pgbench_script.is_current()
        if not current:
            _log.warning(
                "bench/pgbench/reserve_commit.sql differs from the statements pgbench ran; "
                "run `python -m bench.pgbench_script`"
            )
        return {
            "path": str(pgbench_script.SCRIPT.relative_to(machine.REPO)),
            "service_fingerprint": captured["fingerprint"],
            "current": current,
            "service_statements": captured["statements"],
        }

    # One scenario

    def _scenario(self, topology: _Topology, scenario: Scenario) -> dict[str, Any]:
        options = self.options
        tenants = (
            workload.hot_choice()
            if scenario.pattern == "hot"
            else workload.spread_choice(options.tenants, options.zipf_s)
        )
        points = []
        for concurrency in options.concurrency:
            _log.info("scenario %s, %d callers", scenario.key, concurrency)
            points.append(self._point(topology, scenario, tenants, concurrency))
        return {
            "title": scenario.title,
            "backend": scenario.backend,
            "servers": scenario.servers,
            "pattern": scenario.pattern,
            "tenants": tenants.count,
            "pool_size_per_server": int(topology.servers.settings["BILLING_DB_POOL_SIZE"]),
            "server_startup_log": topology.servers.startup_trouble,
            # The service's code when these servers started (it may change during a long run).
            "code": topology.code,
            "points": points,
        }

    def _spec(
        self,
        topology: _Topology,
        mode: Mode,
        tenants: workload.TenantChoice,
        concurrency: int,
        extensions: int = 0,
    ) -> LoadSpec:
        options = self.options
        return LoadSpec(
            mode=mode,
            addresses=topology.servers.addresses,
            concurrency=concurrency,
            tenants=tenants,
            warmup_s=options.warmup_s,
            duration_s=options.duration_s,
            max_queries=options.max_queries,
            seed=concurrency,
            extensions=extensions,
        )

    def _point(
        self,
        topology: _Topology,
        scenario: Scenario,
        tenants: workload.TenantChoice,
        concurrency: int,
    ) -> dict[str, Any]:
        point: dict[str, Any] = {"concurrency": concurrency}
        what = f"{scenario.key} @{concurrency}"
        query, query_db, _ = self._measured(
            topology, self._spec(topology, "query", tenants, concurrency), what
        )
        noop, _, _ = self._measured(
            topology, self._spec(topology, "noop", tenants, concurrency), what
        )
        self._close(topology, query, query_db, f"{what} query")
        noop["invariants"] = query["invariants"]
        point["query"] = query
        point["noop"] = noop
        if self.options.streamed_extensions:
            spec = self._spec(
                topology, "stream", tenants, concurrency, self.options.streamed_extensions
            )
            stream, stream_db, _ = self._measured(topology, spec, what)
            self._close(topology, stream, stream_db, f"{what} stream")
            point["stream"] = stream
        if self.options.check_access:
            check, check_db, _ = self._measured(
                topology, self._spec(topology, "check", tenants, concurrency), what
            )
            self._close(topology, check, check_db, f"{what} check")
            point["check"] = check
        if topology.backend == "postgresql" and self.options.pgbench:
            point["pgbench"] = self._pgbench(topology, tenants, concurrency, what)
        return point

    def _measured(
        self, topology: _Topology, spec: LoadSpec, what: str, *, db_window: bool = True
    ) -> tuple[dict[str, Any], _DbWindow | None, LoadResult]:
        """One load run: throughput, latencies, CPU split; the database window stays open."""
        assert self.loadgen is not None
        window = None
        before_db: dict[str, int] = {}
        db_window = db_window and topology.backend == "postgresql"
        if db_window:
            assert self.cluster is not None
            self.runner.run(self.cluster.reset_statements())
            before_db = self.runner.run(self.cluster.database_counters(topology.database))
        cpu_before: dict[str, float] = {}
        samplers: list[profile.Sampler] = []

        def measure_start() -> None:
            cpu_before.update(topology.meter.snapshot())
            if self.options.profile and spec.mode == "query":
                samplers.append(profile.Sampler(topology.servers.pids, self.options.duration_s))

        load = self.loadgen.run(spec, measure_start)
        cpu_after = topology.meter.snapshot()
        record = load.as_json()
        if samplers:
            sampled = samplers[0].finish()
            record["profile"] = sampled.as_json() if sampled else None
        record["cpu"] = cpu.split(cpu_before, cpu_after, load.loadgen_cpu_s, load.window_s)
        record["server_log"] = topology.servers.new_trouble()
        self._note_trouble(load, record, f"{what} {spec.mode}", topology)
        if db_window:
            assert self.cluster is not None
            assert topology.dbid is not None
            statements = self.runner.run(self.cluster.statements(topology.dbid))
            window = _DbWindow(
                before_db,
                statements,
                time.monotonic(),
                load.rpcs_total,
                spec.rpcs_per_query,
            )
        _log.info(
            "  %-6s %8.1f queries/s  p99 %.2f ms  cpu srv/pg/load %.1f/%.1f/%.1f s",
            spec.mode,
            load.queries_per_s,
            load.latency.get("query", {}).get("p99_ms", math.nan),
            record["cpu"]["seconds"]["servers"],
            record["cpu"]["seconds"]["postgres"],
            record["cpu"]["seconds"]["loadgen"],
        )
        if spec.mode == "noop":
            return record, None, load
        return record, window, load

    def _close(
        self, topology: _Topology, record: dict[str, Any], window: _DbWindow | None, what: str
    ) -> None:
        """Reads the run's settled database counters, then checks the invariants."""
        if window is not None:
            assert self.cluster is not None
            wait = window.ended + self.options.settle_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            after = self.runner.run(self.cluster.database_counters(topology.database))
            record["db"] = _db_stats(window, pg.counter_delta(window.before, after), self.options)
        self._invariants(topology.engine, record, what)

    def _invariants(self, engine: AsyncEngine, record: dict[str, Any], what: str) -> None:
        check = self.runner.run(seed.check_invariants(engine))
        self.runner.run(pg.flush_own_stats(engine))
        record["invariants"] = check.as_json()
        if not check.ok:
            message = f"INVARIANT VIOLATED after {what}: {check.as_json()}"
            _log.error(message)
            self.problems.append(message)

    def _note_trouble(
        self, load: LoadResult, record: dict[str, Any], what: str, topology: _Topology
    ) -> None:
        if load.errors:
            self.problems.append(f"{what}: RPC errors {load.errors}")
        if load.denied:
            self.problems.append(f"{what}: {load.denied} queries denied (never expected)")
        if load.queries_ok == 0:
            self.problems.append(f"{what}: no query completed in the measured window")
        if record["server_log"]["lines"]:
            self.problems.append(
                f"{what}: servers logged {record['server_log']['lines']} warning/error lines, "
                f"e.g. {record['server_log']['samples'][:1]}"
            )
        dead = topology.servers.dead()
        if dead:
            raise RuntimeError(f"{what}: {dead}")

    def _pgbench(
        self, topology: _Topology, tenants: workload.TenantChoice, concurrency: int, what: str
    ) -> dict[str, Any]:
        assert self.cluster is not None
        assert topology.dbid is not None
        options = self.options
        self.pgbench_runs += 1
        server = self.cluster.server
        self.runner.run(self.cluster.reset_statements())
        before = self.runner.run(self.cluster.database_counters(topology.database))
        cpu_before = topology.meter.snapshot()
        started = time.monotonic()
        record = pgbench.run(
            pgbench.PgbenchRun(
                binary=self.cluster.pgbench,
                host=server.host,
                port=server.port,
                user=server.user,
                database=topology.database,
                clients=concurrency,
                ntenants=tenants.count,
                zipf_s=options.zipf_s,
                run_id=self.pgbench_runs,
                warmup_s=options.warmup_s,
                duration_s=options.duration_s,
                transactions_per_client=options.pgbench_transactions_per_client,
            )
        )
        elapsed = time.monotonic() - started
        cpu_after = topology.meter.snapshot()
        record["cpu"] = cpu.split(cpu_before, cpu_after, record["pgbench_cpu_s"], elapsed)
        record["cpu"]["note"] = "whole pgbench run (warm-up included); loadgen = pgbench itself"
        statements = self.runner.run(self.cluster.statements(topology.dbid))
        self.runner.run(self.cluster.wait_no_backends(pgbench.APPLICATION_NAME))
        time.sleep(0.2)  # exiting backends publish their counters on the way out
        after = self.runner.run(self.cluster.database_counters(topology.database))
        window = _DbWindow(before, statements, time.monotonic(), record["transactions_all"], 1)
        record["db"] = _db_stats(window, pg.counter_delta(before, after), options, settled=True)
        if record["failed_transactions"]:
            self.problems.append(f"{what} pgbench: {record['failed_transactions']} failed")
        _log.info("  pgbench %7.1f tps (queries/s)", record["tps"])
        self._invariants(topology.engine, record, f"{what} pgbench")
        return record

    # ReserveCredit with a big ledger

    def _big_ledger(self, prices: Path) -> dict[str, Any]:
        """ReserveCredit on an empty ledger vs a big one: two databases with a server each,
        measured in alternating rounds so that any drift of the machine hits both alike."""
        assert self.cluster is not None
        options = self.options
        rounds = 1 if options.smoke else 4
        sides: dict[str, _Topology] = {}
        loaded: dict[str, Any] = {}
        try:
            for side in ("empty", "big"):
                database = f"bench_ledger_{side}"
                url = self.cluster.create_database(database)
                self.runner.run(migrate(url))
                engine = _harness_engine(self.cluster, database)
                if side == "big":
                    _log.info("big ledger: bulk-loading %d ledger rows", options.big_ledger_rows)
                    loaded = self.runner.run(seed.bulk_ledger(engine, options.big_ledger_rows))
                else:
                    self.runner.run(seed.vacuum_analyze(engine))
                dbid = self.runner.run(self.cluster.database_oid(database))
                servers = Servers(
                    url,
                    1,
                    pool_size=options.big_ledger_concurrency + 2,
                    price_table=prices,
                    extra_settings=self._server_settings(),
                )
                meter = cpu.CpuMeter(servers.pids, self.postmaster)
                sides[side] = _Topology("postgresql", database, url, engine, servers, meter, dbid)
                seed.create_tenant_via_admin(servers.addresses[0], "big-1")
                self.runner.run(pg.flush_own_stats(engine))
            return self._big_ledger_rounds(sides, rounds, loaded)
        finally:
            for topology in sides.values():
                self._stop_topology(topology)

    def _big_ledger_rounds(
        self, sides: dict[str, _Topology], rounds: int, loaded: dict[str, Any]
    ) -> dict[str, Any]:
        assert self.cluster is not None
        options = self.options
        before = {
            side: self.runner.run(self.cluster.database_counters(t.database))
            for side, t in sides.items()
        }
        self.runner.run(self.cluster.reset_statements())
        runs: dict[str, list[tuple[dict[str, Any], LoadResult]]] = {side: [] for side in sides}
        for number in range(rounds):
            order = ("empty", "big") if number % 2 == 0 else ("big", "empty")
            for side in order:
                topology = sides[side]
                spec = LoadSpec(
                    mode="reserve",
                    addresses=topology.servers.addresses,
                    concurrency=options.big_ledger_concurrency,
                    tenants=workload.TenantChoice("big-", 1),
                    warmup_s=options.warmup_s,
                    duration_s=options.big_ledger_duration_s / rounds,
                    max_queries=max(1, options.big_ledger_queries // rounds),
                    hold_ttl_s=3600,
                    seed=7 + number,
                )
                what = f"big-ledger {side} round {number + 1}/{rounds}"
                record, _, load = self._measured(topology, spec, what, db_window=False)
                self._invariants(topology.engine, record, what)
                runs[side].append((record, load))
        ended = time.monotonic()
        result: dict[str, Any] = {
            "concurrency": options.big_ledger_concurrency,
            "rounds": rounds,
            "bulk_load": loaded,
        }
        for side, topology in sides.items():
            assert topology.dbid is not None
            load = loadgen_merge([load for _, load in runs[side]])
            record = load.as_json()
            record["cpu"] = cpu.add([r["cpu"] for r, _ in runs[side]])
            record["invariants"] = runs[side][-1][0]["invariants"]
            record["rounds"] = [
                {
                    "queries_per_s": r["queries_per_s"],
                    "p50_ms": r["latency"].get("ReserveCredit", {}).get("p50_ms"),
                }
                for r, _ in runs[side]
            ]
            statements = self.runner.run(self.cluster.statements(topology.dbid))
            window = _DbWindow(before[side], statements, ended, load.rpcs_total, 1)
            wait = ended + options.settle_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            after = self.runner.run(self.cluster.database_counters(topology.database))
            record["db"] = _db_stats(window, pg.counter_delta(before[side], after), options)
            record["db"]["note"] = f"includes {3 * rounds} transactions of the harness's own audits"
            result[side] = record
        return result

    def _server_settings(self) -> dict[str, str]:
        return {
            "BILLING_EXPIRY_SWEEP_INTERVAL_S": str(self.options.sweep_interval_s),
            "BILLING_ACCESS_LOG": "true" if self.options.access_log else "false",
            "BILLING_DB_COALESCE_WRITES": "true" if self.options.coalesce_writes else "false",
        }


def _db_stats(
    window: _DbWindow, delta: dict[str, int], options: Options, *, settled: bool | None = None
) -> dict[str, Any]:
    rpcs = max(1, window.rpcs)
    calls = sum(s.calls for s in window.statements)
    wal_records = sum(s.wal_records for s in window.statements)
    transactions = delta["xact_commit"] + delta["xact_rollback"]
    writes = delta["tup_inserted"] + delta["tup_updated"] + delta["tup_deleted"]
    per_query = window.rpcs_per_query
    return {
        "settled": (options.settle_s >= pg.FULL_SETTLE_S) if settled is None else settled,
        "rpcs": window.rpcs,
        "counters": delta,
        "transactions_per_rpc": transactions / rpcs,
        "transactions_per_query": transactions / rpcs * per_query,
        # Rows written in the whole database, catalogs included (autoanalyze writes some).
        "rows_written_per_rpc": writes / rpcs,
        # WAL records written by the statements counted (exact; 0 for a read-only RPC).
        "wal_records_per_rpc": wal_records / rpcs,
        "statements": calls,
        "statements_per_rpc": calls / rpcs,
        "hot_path_round_trips": hot_path_round_trips(window.statements, rpcs),
        "statements_per_query": calls / rpcs * per_query,
        "top_statements": [
            {
                "query": sqlcapture.normalize(s.query)[:200],
                "calls": s.calls,
                "calls_per_rpc": s.calls / rpcs,
                "mean_ms": s.total_ms / s.calls if s.calls else 0.0,
                "wal_records_per_call": s.wal_records / s.calls if s.calls else 0.0,
            }
            for s in window.statements[:8]
        ],
    }


# The one-statement calls of each kind: the lone statement, and the batch function that
# coalesced calls of that kind go in (storage.postgres_hot_path).
_HOT_PATH_KINDS = {
    "reserve": (postgres_hot_path.RESERVE, postgres_hot_path.RESERVE_BATCH),
    "commit": (postgres_hot_path.COMMIT, postgres_hot_path.COMMIT_BATCH),
    "release": (postgres_hot_path.RELEASE, postgres_hot_path.RELEASE_BATCH),
}


def hot_path_round_trips(statements: list[pg.Statement], rpcs: int) -> dict[str, dict[str, Any]]:
    """Per kind (reserve, commit, release): round trips as lone statements and as coalesced
    batches (one call of the batch function each), in all and per RPC of the window."""
    result: dict[str, dict[str, Any]] = {}
    for kind, (statement, batch) in _HOT_PATH_KINDS.items():
        lone_sql = sqlcapture.canonical(postgres_hot_path.DriverStatement.of(statement).sql)
        lone = sum(s.calls for s in statements if sqlcapture.canonical(s.query) == lone_sql)
        batches = sum(s.calls for s in statements if f" FROM {batch.name}(" in s.query)
        result[kind] = {
            "statements": lone,
            "batches": batches,
            "round_trips": lone + batches,
            "round_trips_per_rpc": (lone + batches) / max(1, rpcs),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    benchmark = Benchmark(options)
    try:
        result = benchmark.run()
    except BaseException:
        partial = options.out.with_name(options.out.name + ".partial.json")
        benchmark.result["problems"] = benchmark.problems
        partial.write_text(json.dumps(benchmark.result, indent=1, default=str) + "\n")
        _log.error("the benchmark broke; what it measured so far: %s", partial)
        raise
    finally:
        benchmark.close()
    paths = report.write_all(result, options.out)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        _log.info("wrote %s: %s", kind, path)
    if not result["invariants_ok"]:
        _log.error("INVARIANT CHECK FAILED: see 'problems' in %s", paths["json"])
    elif result["problems"]:
        _log.error("the run had problems:\n  %s", "\n  ".join(result["problems"]))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
