"""The SQLite default's single writer: each ledger transaction is one hop to the writer's
thread, whole; the caller's loop keeps running while it waits; dispose closes the writer."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.core import BillingCore
from billing_service.domain.commands import Commit, CreateTenant, Reserve
from billing_service.domain.errors import ErrorReason, Unavailable
from billing_service.domain.pricing import TokenUsage
from billing_service.storage.database import sqlite_writer
from tests.ledger.books import money
from tests.ledger.conftest import TOKENS


@pytest.fixture
def backend() -> str:
    return "sqlite"


async def test_a_query_is_one_hop_per_transaction(core: BillingCore, engine: AsyncEngine) -> None:
    await core.create_tenant(CreateTenant("c", "acme", 10_000_000, payment_method_on_file=True))
    writer = sqlite_writer(engine)
    before = writer.hops
    reserved = await core.reserve(Reserve("r", "acme", "u", TOKENS, amount_micros=30_000))
    assert reserved.hold is not None
    await core.commit(Commit("c1", reserved.hold.hold_id, TokenUsage(1_000, 0, 0)))
    # ReserveCredit and Commit: one transaction each, one hop each.
    assert writer.hops - before == 2
    assert await money(engine, "acme") == (-3_000, 0)


async def test_transactions_run_whole_on_the_writer_thread(engine: AsyncEngine) -> None:
    writer = sqlite_writer(engine)
    seen: list[tuple[str, str]] = []

    async def body(tag: str) -> str:
        seen.append((tag, "start"))
        seen.append((tag, "end"))
        return threading.current_thread().name

    names = await asyncio.gather(*(writer.run(lambda tag=tag: body(tag)) for tag in "abc"))
    assert set(names) == {"sqlite-writer"}
    # One at a time, in the order they were sent.
    assert seen == [(tag, step) for tag in "abc" for step in ("start", "end")]


async def test_dispose_closes_the_writer_and_the_next_use_opens_another(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await core.create_tenant(CreateTenant("c", "acme", 10_000_000, payment_method_on_file=True))
    first = sqlite_writer(engine)
    await engine.dispose()
    assert not any(t.name == "sqlite-writer" and t is first._thread for t in threading.enumerate())
    reserved = await core.reserve(Reserve("r", "acme", "u", TOKENS, amount_micros=30_000))
    assert reserved.decision.allowed
    assert sqlite_writer(engine) is not first


async def test_a_write_lock_held_elsewhere_past_the_busy_timeout_is_unavailable(
    core: BillingCore, engine: AsyncEngine
) -> None:
    await core.create_tenant(CreateTenant("c", "acme", 10_000_000, payment_method_on_file=True))
    writer = sqlite_writer(engine)

    async def shorten_busy_timeout() -> None:
        with writer.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")

    await writer.run(shorten_busy_timeout)
    assert engine.url.database is not None
    other = sqlite3.connect(engine.url.database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable) as refused:
            await core.reserve(Reserve("r", "acme", "u", TOKENS, amount_micros=30_000))
        assert refused.value.reason is ErrorReason.STORAGE_UNAVAILABLE
    finally:
        other.execute("ROLLBACK")
        other.close()
    # Nothing was written: the retry is the first reservation.
    retried = await core.reserve(Reserve("r", "acme", "u", TOKENS, amount_micros=30_000))
    assert retried.decision.allowed
    assert await money(engine, "acme") == (0, 30_000)


async def test_results_finished_while_the_loop_is_busy_wake_it_once(engine: AsyncEngine) -> None:
    writer = sqlite_writer(engine)
    loop = asyncio.get_running_loop()
    wakeups: list[object] = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        wakeups.append(callback)
        return call_soon_threadsafe(callback, *args)

    last_ran = threading.Event()

    async def body(n: int) -> int:
        if n == 4:
            last_ran.set()
        return n * 10

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        runs = [asyncio.ensure_future(writer.run(lambda n=n: body(n))) for n in range(5)]
        await asyncio.sleep(0)  # the five are queued
        # The loop's thread is busy until the writer has run all five.
        assert last_ran.wait(timeout=10)
        assert await asyncio.gather(*runs) == [0, 10, 20, 30, 40]
    finally:
        del loop.call_soon_threadsafe
    assert len(wakeups) == 1


async def test_cancelled_while_queued_never_runs_cancelled_while_running_is_dropped(
    engine: AsyncEngine,
) -> None:
    writer = sqlite_writer(engine)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    async def blocking() -> str:
        started.set()
        assert release.wait(timeout=10)
        ran.append("running")
        return "running"

    async def queued() -> str:
        ran.append("queued")
        return "queued"

    running = asyncio.ensure_future(writer.run(blocking))
    waiting = asyncio.ensure_future(writer.run(queued))
    await asyncio.sleep(0)  # both are sent
    assert started.wait(timeout=10)
    running.cancel()
    waiting.cancel()
    release.set()
    # A later transaction comes back after both: the writer went on, nothing was lost.
    assert await writer.run(queued) == "queued"
    assert running.cancelled()
    assert waiting.cancelled()
    assert ran == ["running", "queued"]
