"""Ratios, targets, and the three outputs: JSON, a short Markdown table, a PNG plot.

The targets are those of the issues that set them: "the benchmark" (ratios to the no-op
ceiling, hot / spread, transactions per RPC, the big ledger, the dashboard) and "the hot path
at the machine's limit" (one caller no worse than before, PostgreSQL CPU per query, SQLite)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.stats import ratio

# The topologies drawn and compared: (title, hot scenario, spread scenario).
TOPOLOGIES = (
    ("PostgreSQL, 1 server: (a) hot / (b) spread", "a", "b"),
    ("PostgreSQL, 3 servers: (c)", "c-hot", "c-spread"),
    ("SQLite, 1 server: (d)", "d-hot", "d-spread"),
)


def _qps(run: dict[str, Any] | None) -> float | None:
    return None if run is None else float(run["queries_per_s"])


def _point(result: dict[str, Any], key: str, concurrency: int) -> dict[str, Any] | None:
    scenario = result["scenarios"].get(key)
    if scenario is None:
        return None
    for point in scenario["points"]:
        if point["concurrency"] == concurrency:
            return dict(point)
    return None


def add_ratios_and_targets(result: dict[str, Any]) -> None:
    for scenario in result["scenarios"].values():
        for point in scenario["points"]:
            query = _qps(point["query"])
            pgbench = point.get("pgbench")
            point["ratios"] = {
                "to_noop": ratio(query, _qps(point["noop"])),
                "to_pgbench": ratio(query, None if pgbench is None else pgbench["tps"]),
            }
            stream = point.get("stream")
            if stream is not None:
                point["ratios"] |= _stream_ratios(stream, point["noop"], point["query"])
    hot_to_spread = []
    for title, hot, spread in TOPOLOGIES:
        if hot not in result["scenarios"] or spread not in result["scenarios"]:
            continue
        for point in result["scenarios"][hot]["points"]:
            other = _point(result, spread, point["concurrency"])
            if other is None:
                continue
            value = ratio(_qps(point["query"]), _qps(other["query"]))
            point["ratios"]["hot_to_spread"] = value
            hot_to_spread.append(
                {"topology": title, "concurrency": point["concurrency"], "ratio": value}
            )
    result["hot_to_spread"] = hot_to_spread
    big = result.get("big_ledger")
    if big is not None:
        empty = big["empty"]["latency"].get("ReserveCredit", {})
        full = big["big"]["latency"].get("ReserveCredit", {})
        big["ratio_p50"] = ratio(full.get("p50_ms"), empty.get("p50_ms"))
        big["ratio_mean"] = ratio(full.get("mean_ms"), empty.get("mean_ms"))
        big["ratio_p99"] = ratio(full.get("p99_ms"), empty.get("p99_ms"))
    result["targets"] = _targets(result)


def _stream_ratios(
    stream: dict[str, Any], noop: dict[str, Any], query: dict[str, Any]
) -> dict[str, float | None]:
    """A streamed query against the two-call no-op query, per query and per RPC, and against
    the plain query (a hold and a settle) of the same point."""
    stream_qps, noop_qps = _qps(stream), _qps(noop)
    return {
        "stream_to_noop": ratio(stream_qps, noop_qps),
        "stream_rpcs_to_noop_rpcs": ratio(
            None if stream_qps is None else stream_qps * stream["rpcs_per_query"],
            None if noop_qps is None else noop_qps * noop["rpcs_per_query"],
        ),
        "stream_to_query": ratio(stream_qps, _qps(query)),
    }


def _streamed(result: dict[str, Any]) -> list[str]:
    points = [
        (key, point)
        for key, scenario in result["scenarios"].items()
        for point in scenario["points"]
        if "stream" in point
    ]
    if not points:
        return []
    config = result["config"]
    extensions = config.get("streamed_extensions", 0)
    lines = [
        "",
        f"## Streamed queries (ReserveCredit + {extensions} ExtendHold + settle)",
        "",
        f"A streamed query holds the input and a first {config['stream_first_output_tokens']} "
        f"output tokens, extends the hold {extensions} times by "
        f"{config['stream_chunk_tokens']} tokens, then commits (90%) or releases (10%): "
        f"{extensions + 2} RPCs, where the no-op query is 2. / no-op: queries/s over the no-op's; "
        "RPC/s / no-op: RPCs per second over the no-op's; / plain: over the plain query's "
        "(ReserveCredit + settle) of the same run.",
        "",
        "| scenario | callers | queries/s | RPCs/query | query p50 / p99 ms | ExtendHold p50 / p99 "
        "| no-op q/s | / no-op | RPC/s / no-op | plain q/s | / plain | tx/RPC | audit |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, point in points:
        stream, ratios = point["stream"], point["ratios"]
        db = stream.get("db")
        lines.append(
            f"| {key} | {point['concurrency']} | {_f(stream['queries_per_s'])} "
            f"| {stream['rpcs_per_query']} "
            f"| {_lat(stream, 'query', 'p50_ms')} / {_lat(stream, 'query', 'p99_ms')} "
            f"| {_lat(stream, 'ExtendHold', 'p50_ms')} / {_lat(stream, 'ExtendHold', 'p99_ms')} "
            f"| {_f(point['noop']['queries_per_s'])} | {_f(ratios['stream_to_noop'], 2)} "
            f"| {_f(ratios['stream_rpcs_to_noop_rpcs'], 2)} "
            f"| {_f(point['query']['queries_per_s'])} | {_f(ratios['stream_to_query'], 2)} "
            f"| {_f(None if db is None else db['transactions_per_rpc'], 2)} "
            f"| {'ok' if stream['invariants']['ok'] else '**VIOLATED**'} |"
        )
    return lines


def _target(
    name: str, scope: str, measured: float | None, met: bool | None, note: str = ""
) -> dict[str, Any]:
    return {"target": name, "scope": scope, "measured": measured, "met": met, "note": note}


# "The hot path at the machine's limit": the figures it started from (run-2026-11-24b).
ONE_CALLER_RATIO_BEFORE = 0.42
ONE_CALLER_P50_MS_BEFORE = 3.8
POSTGRES_CPU_MS_PER_QUERY = 0.3
SQLITE_RATIO_AT_16 = 0.3
SQLITE_QPS_BEFORE = {
    ("d-hot", 1): 39.6,
    ("d-hot", 16): 39.0,
    ("d-hot", 64): 22.7,
    ("d-hot", 256): 32.3,
    ("d-spread", 1): 45.2,
    ("d-spread", 16): 38.8,
    ("d-spread", 64): 32.0,
    ("d-spread", 256): 19.7,
}


def _hot_path_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for key in ("a", "b"):
        point = _point(result, key, 1)
        if point is None:
            continue
        value = point["ratios"]["to_noop"]
        targets.append(
            _target(
                f"at 1 caller, queries/s / no-op no worse than {ONE_CALLER_RATIO_BEFORE}",
                key,
                value,
                None if value is None else value >= ONE_CALLER_RATIO_BEFORE,
            )
        )
        p50 = point["query"]["latency"].get("query", {}).get("p50_ms")
        targets.append(
            _target(
                f"at 1 caller, query p50 no worse than {ONE_CALLER_P50_MS_BEFORE} ms",
                key,
                p50,
                None if p50 is None else p50 <= ONE_CALLER_P50_MS_BEFORE,
            )
        )
    for key in ("a", "b", "c-hot", "c-spread"):
        point = _point(result, key, 64)
        cpu = None if point is None else cpu_ms_per_query(point["query"])
        if cpu is not None:
            value = cpu["postgres"]
            targets.append(
                _target(
                    f"PostgreSQL CPU per query <= {POSTGRES_CPU_MS_PER_QUERY} ms at 64 callers",
                    key,
                    value,
                    value <= POSTGRES_CPU_MS_PER_QUERY,
                    "ms of CPU",
                )
            )
    for key in ("d-hot", "d-spread"):
        point = _point(result, key, 16)
        if point is not None:
            value = point["ratios"]["to_noop"]
            targets.append(
                _target(
                    f"SQLite: queries/s / no-op >= {SQLITE_RATIO_AT_16} at 16 callers",
                    key,
                    value,
                    None if value is None else value >= SQLITE_RATIO_AT_16,
                )
            )
        scenario = result["scenarios"].get(key)
        for point in [] if scenario is None else scenario["points"]:
            before = SQLITE_QPS_BEFORE.get((key, point["concurrency"]))
            value = ratio(_qps(point["query"]), before)
            if value is not None:
                targets.append(
                    _target(
                        ">= 10x the SQLite queries/s of run-2026-11-24b",
                        f"{key} @{point['concurrency']}",
                        value,
                        value >= 10,
                        f"{before} queries/s then",
                    )
                )
    return targets


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for key in ("a", "b", "c-hot", "c-spread"):
        point = _point(result, key, 64)
        if point is not None:
            value = point["ratios"]["to_noop"]
            targets.append(
                _target(
                    "queries/s / no-op ceiling >= 0.6 at 64 callers",
                    key,
                    value,
                    None if value is None else value >= 0.6,
                )
            )
    for title, hot, _ in TOPOLOGIES[:2]:
        for concurrency in (64, 256):
            point = _point(result, hot, concurrency)
            value = None if point is None else point["ratios"].get("hot_to_spread")
            if value is not None:
                targets.append(
                    _target(
                        f"hot / spread >= 0.9 at {concurrency} callers", title, value, value >= 0.9
                    )
                )
    for key in ("c-hot", "c-spread"):
        point = _point(result, key, 64)
        if point is not None:
            value = _qps(point["query"])
            targets.append(
                _target(
                    ">= 1,000 queries/s at 64 callers, 3 servers, no cap violation",
                    key,
                    value,
                    value is not None and value >= 1000 and point["query"]["invariants"]["ok"],
                )
            )
    big = result.get("big_ledger")
    if big is not None:
        for mode, label in (("empty", "ReserveCredit"),):
            db = big[mode].get("db")
            if db is not None:
                value = db["transactions_per_rpc"]
                targets.append(
                    _target(
                        "one database transaction per mutating RPC",
                        f"{label} (reserve-only run)",
                        value,
                        abs(value - 1.0) < 0.05 if db["settled"] else None,
                        f"{db['statements_per_rpc']:.2f} statements per RPC",
                    )
                )
    for key in ("a", "b"):
        scenario = result["scenarios"].get(key)
        if scenario is None:
            continue
        point = scenario["points"][-1]
        db = point["query"].get("db")
        if db is not None:
            value = db["transactions_per_rpc"]
            targets.append(
                _target(
                    "one database transaction per mutating RPC",
                    f"{key} @{point['concurrency']}: Reserve + Commit/Refund",
                    value,
                    abs(value - 1.0) < 0.05 if db["settled"] else None,
                    f"{db['statements_per_rpc']:.2f} statements per RPC",
                )
            )
        check = point.get("check", {}).get("db")
        if check is not None:
            value = check["wal_records_per_rpc"]
            targets.append(
                _target(
                    "CheckAccess without a write",
                    f"{key} @{point['concurrency']}",
                    value,
                    value == 0,
                    f"WAL records per call; {check['transactions_per_rpc']:.2f} transactions "
                    f"and {check['statements_per_rpc']:.2f} statements per call",
                )
            )
    if big is not None and big.get("ratio_p50") is not None:
        value = big["ratio_p50"]
        rows = big["bulk_load"]["ledger_rows_total"]
        targets.append(
            _target(
                "ReserveCredit with 10,000,000 ledger rows within 1.15x of an empty ledger",
                f"p50, {rows:,} rows",
                value,
                value <= 1.15 if rows >= 10_000_000 else None,
                "" if rows >= 10_000_000 else "scaled down: fewer than 10,000,000 rows",
            )
        )
    dash = result.get("dashboard_summary", {})
    if dash.get("measurable"):
        value = dash["ratio_p50"]
        rows = dash["records"]["dash-big"]
        targets.append(
            _target(
                "summary read with 1,000,000 usage records within 1.5x of 10",
                f"GetUsageSummary p50, {rows:,} records",
                value,
                value <= 1.5 if rows >= 1_000_000 else None,
                "" if rows >= 1_000_000 else "scaled down: fewer than 1,000,000 records",
            )
        )
    else:
        targets.append(
            _target(
                "summary read with 1,000,000 usage records within 1.5x of 10",
                "dashboard",
                None,
                None,
                "not measured in this run (bench/dashboard.py needs PostgreSQL)",
            )
        )
    return targets + _hot_path_targets(result)


def all_invariants_ok(result: dict[str, Any]) -> bool:
    checks: list[bool] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "invariants" in node and isinstance(node["invariants"], dict):
                checks.append(bool(node["invariants"].get("ok")))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(result)
    return bool(checks) and all(checks)


# Outputs


def write_all(result: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {
        "json": out.with_name(out.name + ".json"),
        "markdown": out.with_name(out.name + ".md"),
        "plot": out.with_name(out.name + ".png"),
    }
    paths["json"].write_text(
        json.dumps(result, indent=1, sort_keys=False, default=_json_default) + "\n"
    )
    paths["markdown"].write_text(markdown(result, paths["plot"].name))
    plot(result, paths["plot"])
    return paths


def cpu_ms_per_query(run: dict[str, Any]) -> dict[str, float] | None:
    """CPU milliseconds each part of the machine spent per query of `run`."""
    queries = run["queries_per_s"] * run["cpu"]["window_s"]
    if not queries:
        return None
    return {part: 1000 * s / queries for part, s in run["cpu"]["seconds"].items()}


def _cpu_per_query(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## CPU per query (ms of CPU time per ReserveCredit + settle, or per two no-op calls)",
        "",
        "| scenario | callers | query: servers / PostgreSQL / load generator | total "
        "| no-op: servers / load generator | total |",
        "|---|---:|---|---:|---|---:|",
    ]
    for key, scenario in result["scenarios"].items():
        for point in scenario["points"]:
            query = cpu_ms_per_query(point["query"])
            noop = cpu_ms_per_query(point["noop"])
            if query is None or noop is None:
                continue
            lines.append(
                f"| {key} | {point['concurrency']} "
                f"| {query['servers']:.2f} / {query['postgres']:.2f} / {query['loadgen']:.2f} "
                f"| {query['servers'] + query['postgres'] + query['loadgen']:.2f} "
                f"| {noop['servers']:.2f} / {noop['loadgen']:.2f} "
                f"| {noop['servers'] + noop['loadgen']:.2f} |"
            )
    return lines


def _profiles(result: dict[str, Any]) -> list[str]:
    """Where the servers' samples fell (bench.run --profile): one column per profiled point."""
    profiled = [
        (f"{key} @{point['concurrency']}", point["query"]["profile"])
        for key, scenario in result["scenarios"].items()
        for point in scenario["points"]
        if point["query"].get("profile")
    ]
    if not profiled:
        return []

    def table(title: str, field: str) -> list[str]:
        names = list(dict.fromkeys(name for _, p in profiled for name in p[field]))
        rows = [
            f"| {name} | "
            + " | ".join(f"{100 * p[field].get(name, 0) / p['samples']:.0f}%" for _, p in profiled)
            + " |"
            for name in names
        ]
        return [
            "",
            f"| {title} | " + " | ".join(label for label, _ in profiled) + " |",
            "|---|" + "---:|" * len(profiled),
            *rows,
        ]

    lines = [
        "",
        "## Where the servers' CPU goes (py-spy, share of samples during the query run)",
        "",
        "A sample counts where its innermost Python frame is (work in C with the Python function "
        "that called it); see bench/profile.py. Samples: "
        + ", ".join(f"{label} {p['samples']:,}" for label, p in profiled)
        + ".",
    ]
    lines += table("part", "parts")
    lines += table("thread", "threads")
    for label, p in profiled:
        lines += ["", f"Top innermost functions, {label}:", ""]
        lines += [
            f"- {name}: {100 * count / p['samples']:.1f}%"
            for name, count in p["top_functions"].items()
        ]
    return lines


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value)}")


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float) and abs(value) >= 1000 and digits <= 1:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _lat(run: dict[str, Any] | None, rpc: str, key: str) -> str:
    if run is None:
        return "-"
    return _f(run["latency"].get(rpc, {}).get(key), 2)


def markdown(result: dict[str, Any], plot_name: str) -> str:
    m = result["machine"]
    memory = m["memory_bytes"] / 2**30
    dirty = " + uncommitted service changes" if m["service_tree_dirty"] else ""
    lines = [
        f"# Billing hot-path benchmark{' (smoke)' if result['smoke'] else ''}",
        "",
        f"- Machine: {m['logical_cores']} logical cores ({m['cpu_model']}), {memory:.1f} GiB; "
        f"Python {m['python']}; {m['postgresql'] or 'no PostgreSQL'}",
        f"- Code: {m['git_commit'] or '?'}{dirty}",
        f"- Command: `{result['command']}` ({result['elapsed_s']:.0f} s)",
        f"- Runs: {result['config']['warmup_s']} s warm-up + {result['config']['duration_s']} s "
        f"(or {result['config']['max_queries_per_run']:,} queries); "
        f"{result['config']['client_processes']} load generator processes; "
        "a query = ReserveCredit + Commit (90%) / release (10%)",
        "",
        "## Queries (ReserveCredit + settle)",
        "",
        "| scenario | callers | queries/s | query p50 / p95 / p99 ms | Reserve p99 | Commit p99 "
        "| no-op q/s | / no-op | pgbench q/s | / pgbench | tx/RPC | stmts/RPC "
        "| CPU % srv / pg / load / other | busy | audit |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for key, scenario in result["scenarios"].items():
        for point in scenario["points"]:
            query, noop, pgb = point["query"], point["noop"], point.get("pgbench")
            share = query["cpu"]["share"]
            db = query.get("db")
            lines.append(
                f"| {key} | {point['concurrency']} | {_f(query['queries_per_s'])} "
                f"| {_lat(query, 'query', 'p50_ms')} / {_lat(query, 'query', 'p95_ms')} / "
                f"{_lat(query, 'query', 'p99_ms')} "
                f"| {_lat(query, 'ReserveCredit', 'p99_ms')} | {_lat(query, 'Commit', 'p99_ms')} "
                f"| {_f(noop['queries_per_s'])} | {_f(point['ratios']['to_noop'], 2)} "
                f"| {_f(None if pgb is None else pgb['tps'])} "
                f"| {_f(point['ratios']['to_pgbench'], 2)} "
                f"| {_f(None if db is None else db['transactions_per_rpc'], 2)} "
                f"| {_f(None if db is None else db['statements_per_rpc'], 2)} "
                f"| {100 * share['servers']:.0f} / {100 * share['postgres']:.0f} / "
                f"{100 * share['loadgen']:.0f} / {100 * share['other']:.0f} "
                f"| {100 * query['cpu']['machine_busy']:.0f}% "
                f"| {'ok' if query['invariants']['ok'] else '**VIOLATED**'} |"
            )
    lines += _streamed(result)
    lines += _cpu_per_query(result)
    lines += _profiles(result)
    if any("check" in p for s in result["scenarios"].values() for p in s["points"]):
        lines += [
            "",
            "## CheckAccess alone",
            "",
            "| scenario | callers | calls/s | p50 ms | p99 ms | tx/call | stmts/call "
            "| WAL records/call |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, scenario in result["scenarios"].items():
            for point in scenario["points"]:
                check = point.get("check")
                if check is None:
                    continue
                db = check.get("db") or {}
                lines.append(
                    f"| {key} | {point['concurrency']} | {_f(check['queries_per_s'])} "
                    f"| {_lat(check, 'CheckAccess', 'p50_ms')} "
                    f"| {_lat(check, 'CheckAccess', 'p99_ms')} "
                    f"| {_f(db.get('transactions_per_rpc'), 2)} "
                    f"| {_f(db.get('statements_per_rpc'), 2)} "
                    f"| {_f(db.get('wal_records_per_rpc'), 2)} |"
                )
    if result.get("hot_to_spread"):
        lines += ["", "## Hot tenant / spread tenants (queries/s)", ""]
        lines += ["| topology | callers | hot / spread |", "|---|---:|---:|"]
        for row in result["hot_to_spread"]:
            lines.append(f"| {row['topology']} | {row['concurrency']} | {_f(row['ratio'], 2)} |")
    big = result.get("big_ledger")
    if big is not None:
        rows = big["bulk_load"]["ledger_rows_total"]
        lines += [
            "",
            f"## ReserveCredit: empty ledger vs {rows:,} ledger rows "
            f"({big['concurrency']} caller(s), reserve only, {big['rounds']} alternating rounds)",
            "",
            "| ledger | reserves/s | p50 ms | p99 ms | mean ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, run in (("empty", big["empty"]), (f"{rows:,} rows", big["big"])):
            lines.append(
                f"| {label} | {_f(run['queries_per_s'])} "
                f"| {_lat(run, 'ReserveCredit', 'p50_ms')} "
                f"| {_lat(run, 'ReserveCredit', 'p99_ms')} "
                f"| {_lat(run, 'ReserveCredit', 'mean_ms')} |"
            )
        lines.append(
            f"| ratio | | {_f(big.get('ratio_p50'), 2)} | {_f(big.get('ratio_p99'), 2)} "
            f"| {_f(big.get('ratio_mean'), 2)} |"
        )
        lines.append(f"\nBulk load: {big['bulk_load']['load_s']:.0f} s.")
    dash = result.get("dashboard_summary", {})
    if dash.get("measurable"):
        small, big = dash["small"], dash["big"]
        commit = dash["commit_rollup_cost"]
        lines += [
            "",
            f"Dashboard summary read (GetUsageSummary, concurrency 1): p50 {small['p50_ms']} ms "
            f"with 10 usage records, {big['p50_ms']} ms with {dash['records']['dash-big']:,} "
            f"(x{dash['ratio_p50']:.2f}); the one-statement Commit with its rollup upsert "
            f"x{commit['ratio_mean']:.2f} of the same statement without it.",
        ]
    lines += [
        "",
        "## Targets",
        "",
        "| target | scope | measured | met |",
        "|---|---|---:|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']} | {t['scope']}{note} | {_f(t['measured'], 2)} | {met} |")
    script = result.get("pgbench_script")
    if script is not None and not script["current"]:
        lines += [
            "",
            f"**The committed pgbench script {script['path']} is stale** (pgbench ran the "
            "statements rendered from the service's own); run `python -m bench.pgbench_script`.",
        ]
    lines += ["", f"Invariant checks: {'all passed' if result['invariants_ok'] else '**FAILED**'}."]
    if result["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in result["problems"]]
    lines += [
        "",
        f"![throughput and p99 latency against concurrency]({plot_name})",
        "",
        "tx/RPC: pg_stat_database commits + rollbacks per RPC; stmts/RPC: pg_stat_statements "
        "calls per RPC (warm-up included in both, as the counters are). "
        "CPU %: share of the CPU used during the measured window (other: every other process "
        "on the machine, the harness included); busy: of all cores.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in TOPOLOGIES if t[1] in result["scenarios"] or t[2] in result["scenarios"]]
    rows = max(1, len(shown))
    figure, axes = plt.subplots(rows, 2, figsize=(12, 3.8 * rows), squeeze=False)
    for row, (title, hot, spread) in enumerate(shown):
        throughput, latency = axes[row][0], axes[row][1]
        for key, color in ((hot, "tab:red"), (spread, "tab:blue")):
            scenario = result["scenarios"].get(key)
            if scenario is None:
                continue
            points = scenario["points"]
            x = [p["concurrency"] for p in points]
            label = f"{key} ({scenario['pattern']})"
            throughput.plot(
                x,
                [p["query"]["queries_per_s"] for p in points],
                "o-",
                color=color,
                label=f"{label} service",
            )
            throughput.plot(
                x,
                [p["noop"]["queries_per_s"] for p in points],
                "x--",
                color=color,
                alpha=0.6,
                label=f"{label} no-op ceiling",
            )
            latency.plot(
                x,
                [p["query"]["latency"].get("query", {}).get("p99_ms", math.nan) for p in points],
                "o-",
                color=color,
                label=f"{label} service",
            )
            latency.plot(
                x,
                [p["noop"]["latency"].get("query", {}).get("p99_ms", math.nan) for p in points],
                "x--",
                color=color,
                alpha=0.6,
                label=f"{label} no-op",
            )
            if all("pgbench" in p for p in points):
                throughput.plot(
                    x,
                    [p["pgbench"]["tps"] for p in points],
                    "s:",
                    color=color,
                    label=f"{label} pgbench floor",
                )
                latency.plot(
                    x,
                    [p["pgbench"]["latency"]["query"].get("p99_ms", math.nan) for p in points],
                    "s:",
                    color=color,
                    label=f"{label} pgbench",
                )
        for axis, ylabel in ((throughput, "queries/s"), (latency, "query p99 latency (ms)")):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent callers")
            axis.set_ylabel(ylabel)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        throughput.set_title(title, fontsize=10)
        latency.set_yscale("log")
    figure.suptitle(
        f"ReserveCredit + Commit/release, {result['machine']['logical_cores']} cores"
        f"{' (smoke)' if result['smoke'] else ''}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report bench/results/NAME.json`: writes NAME.md and NAME.png again from
    the JSON of a run, ratios and targets recomputed (after a change of the report, not of the
    measurements)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text())
    add_ratios_and_targets(result)
    args.json.write_text(
        json.dumps(result, indent=1, sort_keys=False, default=_json_default) + "\n"
    )
    out = args.json.with_suffix("")
    out.with_name(out.name + ".md").write_text(markdown(result, out.name + ".png"))
    plot(result, out.with_name(out.name + ".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
