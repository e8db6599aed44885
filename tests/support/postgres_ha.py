"""A pg_auto_failover formation on this machine: a monitor and two PostgreSQL nodes, a primary and
its synchronous standby, for failover tests.

Usage::

    with AutoFailoverFormation() as formation:
        url = formation.create_database("billing")  # multi-host, target_session_attrs=read-write
        formation.kill(formation.primary())          # kill -9 the node: its keeper and PostgreSQL
        formation.wait_for_primary(other, timeout_s=60)

Each piece is started by ``pg_autoctl`` (Debian's ``pg-auto-failover-cli`` and
``postgresql-15-auto-failover``; ``scripts/ensure-tools`` installs them) as the ``postgres`` user,
like :mod:`tests.support.postgres`, in one temporary directory that also holds pg_autoctl's
configuration and state (``XDG_*``), on free ports, listening on 127.0.0.1 only. The nodes keep
pg_auto_failover's durability settings (fsync on, ``synchronous_commit = on``, the standby in
``synchronous_standby_names``): an acknowledged commit is on both nodes.

The monitor is tuned to act within seconds instead of its production defaults (a node is
unhealthy after 20 s, and a promoted standby waits 30 s for the old primary to demote itself
before it takes writes): :data:`MONITOR_SETTINGS`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.support.ports import free_port
from tests.support.postgres import PostgresBinaries, PostgresServerError

__all__ = ["MONITOR_SETTINGS", "AutoFailoverFormation", "Node"]

_HOST = "127.0.0.1"
_USER = "postgres"
_START_TIMEOUT_S = 120.0
# Milliseconds. Health checks every second, a node unhealthy 2 s after its keeper's last report
# and failed checks, and a promoted standby writable 2 s after it stopped replicating.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "2000",
}


@dataclass
class Node:
    name: str
    port: int
    data: Path
    keeper: subprocess.Popen[bytes] | None = None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


class AutoFailoverFormation:
    def __init__(self) -> None:
        self._root: Path | None = None
        self._monitor: Node | None = None
        self.nodes: list[Node] = []
        self._logs: list[IO[bytes]] = []
        # pg_autoctl finds pg_controldata and the rest beside pg_ctl: the real directory.
        self._pg_ctl = str(PostgresBinaries.locate().pg_ctl.resolve())
        self._psql = str(PostgresBinaries.locate().psql)
        self._run_as_postgres = os.geteuid() == 0

    # Lifecycle ----------------------------------------------------------------------------------

    def start(self) -> Self:
        _which("pg_autoctl")
        self._root = Path(tempfile.mkdtemp(prefix="billing-test-paf-"))
        try:
            self._root.chmod(0o755)
            if self._run_as_postgres:
                account = pwd.getpwnam(_USER)
                os.chown(self._root, account.pw_uid, account.pw_gid)
            monitor = Node("monitor", free_port(), self._root / "monitor")
            self._monitor = monitor
            monitor.keeper = self._spawn(
                "monitor",
                ["create", "monitor", "--pgdata", str(monitor.data)],
                ["--pgport", str(monitor.port)],
            )
            self._wait_for_log("monitor", "Contacting the monitor to LISTEN")
            self.psql(monitor.port, "pg_auto_failover", *self._monitor_settings())
            # Both nodes register at once: the monitor makes the first one the primary and the
            # other its standby, which clones the primary once it is up.
            for name in ("a", "b"):
                node = Node(name, free_port(), self._root / name)
                node.keeper = self._spawn(
                    name,
                    ["create", "postgres", "--pgdata", str(node.data), "--name", name],
                    [
                        "--pgport",
                        str(node.port),
                        "--listen",
                        _HOST,
                        "--monitor",
                        self.monitor_uri,
                    ],
                )
                self.nodes.append(node)
            self._wait_for_roles()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kills every piece (the data is thrown away: no clean shutdown needed), then deletes
        the directory."""
        for node in [*self.nodes, self._monitor]:
            if node is not None:
                self.kill(node)
        for log in self._logs:
            log.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Use ----------------------------------------------------------------------------------------

    @property
    def monitor_uri(self) -> str:
        assert self._monitor is not None
        return (
            f"postgres://autoctl_node@{_HOST}:{self._monitor.port}/pg_auto_failover?sslmode=disable"
        )

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` on whichever node is the primary: every node as a
        `host=` parameter (asyncpg tries them in order) and `target_session_attrs=read-write`."""
        hosts = "&".join(f"host={_HOST}:{node.port}" for node in self.nodes)
        return f"postgresql+asyncpg://{_USER}@/{database}?{hosts}&target_session_attrs=read-write"

    def create_database(self, name: str) -> str:
        self.psql(self.primary().port, "postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def state(self) -> dict[str, tuple[str, str]]:
        """Each node's (reported, assigned) state, as the monitor has them."""
        assert self._monitor is not None
        output = self.psql(
            self._monitor.port,
            "pg_auto_failover",
            "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node",
        )
        rows = [line.split("|") for line in output.splitlines() if line]
        return {name: (reported, goal) for name, reported, goal in rows}

    def primary(self) -> Node:
        (name,) = [n for n, (reported, _) in self.state().items() if reported == "primary"]
        return self.node(name)

    def node(self, name: str) -> Node:
        (node,) = [node for node in self.nodes if node.name == name]
        return node

    def kill(self, node: Node) -> None:
        """kill -9 the whole node: its keeper (which would restart PostgreSQL) first, then the
        postmaster and every backend, as when its machine dies."""
        postmaster = node.postmaster_pid()
        # Found before anything dies: orphaned backends are re-parented and lost from view.
        postgres = [postmaster, *_children(postmaster)] if postmaster else []
        if node.keeper is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.keeper.pid, signal.SIGKILL)
            node.keeper.wait(30)
        for pid in postgres:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait_for_primary(self, node: Node, timeout_s: float) -> float:
        """Waits until the monitor reports `node` as a primary that takes writes; returns the
        seconds it took."""
        started = time.monotonic()
        self._wait_for_state({node.name: {"wait_primary", "primary"}}, timeout_s)
        return time.monotonic() - started

    def psql(self, port: int, database: str, *commands: str) -> str:
        command = [self._psql, "--no-psqlrc", "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        command += ["-h", _HOST, "-p", str(port), "-U", _USER, "-d", database]
        for sql in commands:
            command += ["-c", sql]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, env=_clean_env()
        )
        if result.returncode != 0:
            raise PostgresServerError(f"psql on port {port} failed: {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, name: str, lines: int = 30) -> str:
        assert self._root is not None
        text = (self._root / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # Internals ----------------------------------------------------------------------------------

    def _monitor_settings(self) -> list[str]:
        statements = [
            f"ALTER SYSTEM SET {key} = {value}" for key, value in MONITOR_SETTINGS.items()
        ]
        return [*statements, "SELECT pg_reload_conf()"]

    def _environment(self) -> dict[str, str]:
        assert self._root is not None
        env = _clean_env()
        env.update(
            PATH=f"{Path(self._pg_ctl).parent}:/usr/bin:/bin",
            XDG_CONFIG_HOME=str(self._root / "config"),
            XDG_DATA_HOME=str(self._root / "share"),
            XDG_RUNTIME_DIR=str(self._root / "run"),
        )
        return env

    def _command(self, arguments: list[str]) -> list[str]:
        command = [_which("pg_autoctl"), *arguments]
        if self._run_as_postgres:
            command = [_which("runuser"), "-u", _USER, "--", *command]
        return command

    def _spawn(self, name: str, create: list[str], options: list[str]) -> subprocess.Popen[bytes]:
        assert self._root is not None
        log = (self._root / f"{name}.log").open("wb")
        self._logs.append(log)
        arguments = [*create, *options, "--pgctl", self._pg_ctl, "--hostname", _HOST]
        arguments += ["--auth", "trust", "--no-ssl", "--run"]
        # A session of its own: kill() ends the keeper and everything it started at once.
        return subprocess.Popen(
            self._command(arguments),
            cwd=self._root,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_for_log(self, name: str, text: str) -> None:
        assert self._root is not None
        path = self._root / f"{name}.log"
        self._wait_until(lambda: text in path.read_text(errors="replace"), f"{text!r} in {name}")

    def _reported_states(self) -> dict[str, str]:
        try:
            return {name: reported for name, (reported, _) in self.state().items()}
        except PostgresServerError:
            return {}  # the monitor is not answering yet

    def _wait_for_state(self, wanted: dict[str, set[str]], timeout_s: float) -> None:
        def reached() -> bool:
            states = self._reported_states()
            return all(states.get(name) in allowed for name, allowed in wanted.items())

        self._wait_until(reached, f"states {wanted}", timeout_s)

    def _wait_for_roles(self) -> None:
        """Waits until one node is the primary and the other its synchronous standby."""
        self._wait_until(
            lambda: sorted(self._reported_states().values()) == ["primary", "secondary"],
            "a primary and a standby",
        )

    def _wait_until(
        self, condition: Callable[[], bool], what: str, timeout_s: float = _START_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                logs = "\n".join(self.log_tail(node.name) for node in self.nodes)
                raise PostgresServerError(
                    f"no {what} in {timeout_s}s: {self._reported_states()}\n{logs}"
                )
            time.sleep(0.1)  # polling for a condition, bounded by the deadline

    def _check_alive(self) -> None:
        for node in [self._monitor, *self.nodes]:
            if node and node.keeper and node.keeper.poll() not in (None, -signal.SIGKILL):
                raise PostgresServerError(
                    f"pg_autoctl for {node.name} ended ({node.keeper.returncode})\n"
                    + self.log_tail(node.name)
                )


def _children(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _which(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise PostgresServerError(f"{program} not found; run scripts/ensure-tools")
    return found


def _clean_env() -> dict[str, str]:
    # PG* variables of the caller must not steer the formation.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}
