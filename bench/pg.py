"""The benchmark's own PostgreSQL: a throwaway cluster with pg_stat_statements, and its counters.

Counters are read from the `postgres` maintenance database, so that reading them adds nothing
to the benchmark database's own counters.

pg_stat_statements is exact at any moment (each statement is counted when it ends).
pg_stat_database is not: PostgreSQL 15 backends flush their counters at most once a second while
busy, and an idle backend flushes what it still holds 10 s after going idle. A run's
pg_stat_database delta is therefore read only after `settle_s` (default 11 s) of database
quiet following the run ("settled": true in the JSON); with a shorter settle (smoke mode) the
delta is approximate.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.support.postgres import PostgresBinaries, PostgresServer

DATABASE_COUNTERS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "tup_fetched",
    "blks_hit",
    "blks_read",
)
# Idle backends flush their pending statistics 10 s after going idle (PGSTAT_IDLE_INTERVAL).
FULL_SETTLE_S = 11.0


def server_settings(max_connections: int) -> dict[str, str]:
    return {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "top",
        "pg_stat_statements.track_utility": "on",
        "pg_stat_statements.max": "10000",
        "max_connections": str(max_connections),
    }


# The harness connects to the benchmark databases as its own role, so that its statements
# (seeding, audits) can be told apart from the service's in pg_stat_statements.
HARNESS_ROLE = "bench_harness"


@dataclass(frozen=True)
class Statement:
    query: str
    calls: int
    total_ms: float
    rows: int
    wal_records: int


class Cluster:
    """A started PostgresServer plus an admin engine on its `postgres` database."""

    def __init__(self, max_connections: int) -> None:
        self.server = PostgresServer(settings=server_settings(max_connections))
        self._admin: AsyncEngine | None = None

    def start(self) -> None:
        self.server.start()

    async def open(self) -> None:
        self._admin = create_async_engine(
            self.server.url("postgres"),
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": "bench-admin"}},
        )
        await self._execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        exists = await self._execute(
            "SELECT 1 FROM pg_roles WHERE rolname = :role", role=HARNESS_ROLE
        )
        if not exists:
            await self._execute(f"CREATE ROLE {HARNESS_ROLE} SUPERUSER LOGIN")

    def harness_url(self, database: str) -> str:
        """URL of `database` for the harness's own connections (role HARNESS_ROLE)."""
        server = self.server
        return f"postgresql+asyncpg://{HARNESS_ROLE}@{server.host}:{server.port}/{database}"

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.dispose()
            self._admin = None

    def stop(self) -> None:
        self.server.stop()

    @property
    def pgbench(self) -> Path:
        """pgbench from the same installation as the server's initdb."""
        initdb = PostgresBinaries.locate().initdb.resolve()
        candidates = [initdb.parent / "pgbench"]
        found = shutil.which("pgbench")
        if found:
            candidates.append(Path(found))
        candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True))
        for candidate in candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(f"pgbench not found next to {initdb} nor on PATH")

    def create_database(self, name: str) -> str:
        return self.server.create_database(name)

    async def _execute(self, sql: str, **params: Any) -> list[Any]:
        assert self._admin is not None, "Cluster.open() first"
        async with self._admin.connect() as conn:
            result = await conn.execute(text(sql), params)
            return list(result.all()) if result.returns_rows else []

    async def version(self) -> str:
        rows = await self._execute("SELECT version()")
        return str(rows[0][0])

    async def database_oid(self, name: str) -> int:
        rows = await self._execute("SELECT oid FROM pg_database WHERE datname = :name", name=name)
        return int(rows[0][0])

    async def postmaster_pid(self) -> int:
        rows = await self._execute("SHOW data_directory")
        pid_file = Path(str(rows[0][0])) / "postmaster.pid"
        return int(pid_file.read_text().split("\n", 1)[0])

    async def reset_statements(self) -> None:
        await self._execute("SELECT pg_stat_statements_reset()")

    async def statements(self, dbid: int) -> list[Statement]:
        """The statements run in database `dbid` since the last reset, but the harness's."""
        rows = await self._execute(
            "SELECT query, calls, total_exec_time, rows, wal_records FROM pg_stat_statements "
            "WHERE dbid = :dbid "
            "AND userid <> (SELECT oid FROM pg_roles WHERE rolname = :role) "
            "ORDER BY calls DESC, total_exec_time DESC",
            dbid=dbid,
            role=HARNESS_ROLE,
        )
        return [Statement(str(r[0]), int(r[1]), float(r[2]), int(r[3]), int(r[4])) for r in rows]

    async def database_counters(self, name: str) -> dict[str, int]:
        columns = ", ".join(DATABASE_COUNTERS)
        rows = await self._execute(
            f"SELECT {columns} FROM pg_stat_database WHERE datname = :name", name=name
        )
        return {key: int(value) for key, value in zip(DATABASE_COUNTERS, rows[0], strict=True)}

    async def wait_no_backends(self, application_name: str, timeout_s: float = 30.0) -> None:
        """Waits until no backend of `application_name` is left (they flush stats on exit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            rows = await self._execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name",
                name=application_name,
            )
            if int(rows[0][0]) == 0:
                return
            await asyncio.sleep(0.05)


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in before}


async def flush_own_stats(engine: AsyncEngine) -> None:
    """Makes the harness's own backend publish its pending counters now (PostgreSQL 15+).

    The flush happens when the backend goes idle after this statement, before it answers, so
    the harness's own queries (seeding, audits) never land in a later run's delta.
    """
    if engine.dialect.name != "postgresql":
        return
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_stat_force_next_flush()"))
        await conn.commit()
