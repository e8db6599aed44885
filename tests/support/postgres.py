"""Throwaway PostgreSQL clusters for tests, started from the locally installed server binaries.

Usage::

    with PostgresServer() as server:
        url = server.create_database("billing_test")  # postgresql+asyncpg://postgres@127.0.0.1:PORT/...

Each server gets its own temporary directory (data, Unix socket, log), listens on a free TCP port
on 127.0.0.1 only, trusts every local connection as superuser ``postgres`` and runs with durability
switched off (fsync, synchronous_commit, full_page_writes): fast, and fine for data that is thrown
away. :meth:`PostgresServer.stop` stops it and deletes the directory.

PostgreSQL refuses to run as root. When the tests run as root (CI does), the cluster's directories
are given to the ``postgres`` user and ``initdb``/``pg_ctl`` run through ``runuser -u postgres --``;
the tests themselves stay root and connect over TCP. ``scripts/ensure-tools`` installs the binaries.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["PostgresBinaries", "PostgresServer", "PostgresServerError"]

_SUPERUSER = "postgres"
_HOST = "127.0.0.1"
_VERSIONED_BINDIRS = "/usr/lib/postgresql/*/bin"
_DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOG_TAIL_LINES = 30
_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
_TIMEOUT_SECONDS = 60
_SERVER_SETTINGS = {
    "listen_addresses": _HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "400",
    "shared_buffers": "128MB",
}


class PostgresServerError(RuntimeError):
    """The binaries are missing, or a server could not be set up, started or used."""


@dataclass(frozen=True)
class PostgresBinaries:
    """Paths of the PostgreSQL programs a :class:`PostgresServer` runs."""

    initdb: Path
    pg_ctl: Path
    psql: Path

    @classmethod
    def locate(cls) -> PostgresBinaries:
        """Find the binaries: ``initdb``/``pg_ctl`` on PATH first, then the newest
        ``/usr/lib/postgresql/<version>/bin``. ``psql`` is taken from the same directory as
        ``pg_ctl`` when it is there, else from PATH.
        """
        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if initdb and pg_ctl:
            sibling = Path(pg_ctl).resolve().parent / "psql"
            psql = str(sibling) if _is_executable(sibling) else shutil.which("psql")
            if psql:
                return cls(Path(initdb), Path(pg_ctl), Path(psql))
        bindirs = sorted(Path("/").glob(_VERSIONED_BINDIRS.lstrip("/")), key=_version_key)
        for bindir in reversed(bindirs):
            found = cls(bindir / "initdb", bindir / "pg_ctl", bindir / "psql")
            if all(_is_executable(p) for p in (found.initdb, found.pg_ctl, found.psql)):
                return found
        raise PostgresServerError(
            "PostgreSQL binaries (initdb, pg_ctl, psql) not found on PATH or under "
            f"{_VERSIONED_BINDIRS}; run scripts/ensure-tools"
        )


class PostgresServer:
    """A throwaway PostgreSQL server; use as a context manager or call :meth:`start`/:meth:`stop`.

    The superuser is ``postgres`` without password (trust authentication), reachable at
    :attr:`host`:attr:`port` once started.
    """

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """``settings``: extra server settings (``-c key=value``) over the defaults, e.g.
        ``{"shared_preload_libraries": "pg_stat_statements"}``."""
        self._binaries = binaries
        self._settings = {**_SERVER_SETTINGS, **(settings or {})}
        self._root: Path | None = None
        self._port: int | None = None
        self._run_as_postgres = os.geteuid() == 0

    # Connection details -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on (IPv4 loopback only)."""
        return _HOST

    @property
    def port(self) -> int:
        """The server's TCP port; only valid while it runs."""
        if self._port is None:
            raise PostgresServerError("the PostgreSQL server is not running")
        return self._port

    @property
    def user(self) -> str:
        """The superuser to connect as; needs no password."""
        return _SUPERUSER

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy URL of ``database`` on this server, e.g. ``postgresql+asyncpg://...``."""
        return f"{driver}://{_SUPERUSER}@{_HOST}:{self.port}/{database}"

    # Lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Self:
        """Create a fresh cluster in a new temporary directory and start it; returns ``self``.

        Raises :class:`PostgresServerError` (with the tail of the server log) when it fails; the
        temporary directory is removed in that case.
        """
        if self._root is not None:
            raise PostgresServerError("the PostgreSQL server is already started")
        binaries = self._binaries or PostgresBinaries.locate()
        self._root = Path(tempfile.mkdtemp(prefix="billing-test-pg-"))
        try:
            self._root.chmod(0o755)  # the postgres user must be able to traverse it
            self._initdb(binaries)
            for attempt in range(1, _START_ATTEMPTS + 1):
                port = _free_port()
                try:
                    self._pg_ctl_start(binaries, port)
                except PostgresServerError as error:
                    if attempt == _START_ATTEMPTS or "already in use" not in str(error):
                        raise
                else:
                    self._port = port
                    break
        except BaseException:
            self._remove_root()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory. Safe to call more than once."""
        if self._root is None:
            return
        try:
            if self._port is not None:
                binaries = self._binaries or PostgresBinaries.locate()
                self._run(
                    [str(binaries.pg_ctl), "-D", str(self._data_dir), "-m", "fast", "-w", "stop"],
                    as_postgres=True,
                    what="pg_ctl stop",
                )
        finally:
            self._port = None
            self._remove_root()

    def pause(self) -> None:
        """Stop the server but keep its data and port: an outage. :meth:`resume` ends it."""
        binaries = self._binaries or PostgresBinaries.locate()
        self._run(
            [str(binaries.pg_ctl), "-D", str(self._data_dir), "-m", "fast", "-w", "stop"],
            as_postgres=True,
            what="pg_ctl stop",
        )

    def resume(self) -> None:
        """Start a paused server again on the same port, with the same data."""
        binaries = self._binaries or PostgresBinaries.locate()
        self._pg_ctl_start(binaries, self.port)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Databases ----------------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` (a plain SQL identifier) and return its SQLAlchemy URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"not a plain database name (letters, digits, _; max 63): {name!r}")
        binaries = self._binaries or PostgresBinaries.locate()
        self._run(
            [
                str(binaries.psql),
                "--no-psqlrc",
                "--quiet",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                _HOST,
                "-p",
                str(self.port),
                "-U",
                _SUPERUSER,
                "-d",
                "postgres",
                "-c",
                f'CREATE DATABASE "{name}"',
            ],
            as_postgres=False,
            what=f"CREATE DATABASE {name}",
        )
        return self.url(name)

    # Internals ----------------------------------------------------------------------------------

    @property
    def _data_dir(self) -> Path:
        assert self._root is not None
        return self._root / "data"

    @property
    def _socket_dir(self) -> Path:
        assert self._root is not None
        return self._root / "socket"

    @property
    def _log_file(self) -> Path:
        assert self._root is not None
        return self._root / "server.log"

    def _initdb(self, binaries: PostgresBinaries) -> None:
        self._data_dir.mkdir(mode=0o700)
        self._socket_dir.mkdir(mode=0o700)
        self._log_file.touch(mode=0o644)
        if self._run_as_postgres:
            try:
                account = pwd.getpwnam(_SUPERUSER)
            except KeyError:
                raise PostgresServerError(
                    "running as root, but there is no 'postgres' user to run PostgreSQL as; "
                    "run scripts/ensure-tools"
                ) from None
            for path in (self._data_dir, self._socket_dir, self._log_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run(
            [
                str(binaries.initdb),
                "-D",
                str(self._data_dir),
                "-U",
                _SUPERUSER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            as_postgres=True,
            what="initdb",
        )

    def _pg_ctl_start(self, binaries: PostgresBinaries, port: int) -> None:
        settings = [f"-c {key}={value}" for key, value in self._settings.items()]
        # pg_ctl hands these to the server through /bin/sh, hence the quoting.
        options = " ".join(["-p", str(port), "-k", shlex.quote(str(self._socket_dir)), *settings])
        self._run(
            [
                str(binaries.pg_ctl),
                "-D",
                str(self._data_dir),
                "-l",
                str(self._log_file),
                "-w",
                "-t",
                str(_TIMEOUT_SECONDS),
                "-o",
                options,
                "start",
            ],
            as_postgres=True,
            what="pg_ctl start",
        )

    def _run(self, command: list[str], *, as_postgres: bool, what: str) -> None:
        """Run ``command`` (as ``postgres`` when asked and we are root); raise with its output and
        the server log's tail when it fails."""
        if as_postgres and self._run_as_postgres:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise PostgresServerError("running as root, but 'runuser' is not installed")
            command = [runuser, "-u", _SUPERUSER, "--", *command]
        # PG* variables of the caller (PGHOST, PGOPTIONS, ...) must not steer the throwaway server.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        try:
            result = subprocess.run(
                command,
                cwd=self._root,  # PostgreSQL programs may not be able to read the caller's cwd
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_SECONDS + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresServerError(f"{what} timed out{self._log_tail()}") from error
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise PostgresServerError(
                f"{what} failed (exit {result.returncode}): {output}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if self._root is None:
            return ""
        try:
            lines = self._log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        if not lines:
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(lines[-_LOG_TAIL_LINES:])

    def _remove_root(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(bindir: Path) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin`` -> ``(15,)``; sorts 9.6 before 10."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


async def until_a_session_waits_for_a_lock(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    """Returns once a backend of this database waits on a lock (bounded by `timeout_s`): the
    moment a concurrent statement has reached the row another transaction holds."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(timeout_s):
        while True:
            async with engine.connect() as conn:
                if (await conn.execute(query)).scalar_one():
                    return
            await asyncio.sleep(0.005)
