"""Group commit: a lone call goes at once; calls that arrive while a round trip is in flight go
together in the next, in arrival order; each caller gets its own item's result or the fault of
the round trip that carried it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_service.storage.coalescer import Coalescer


class Wire:
    """A database stand-in: each round trip waits until the test lets it return."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_next = False
        self.changed = asyncio.Condition()

    async def _round_trip(self, items: list[int]) -> None:
        self.sent.append(items)
        gate = asyncio.Event()
        self.gates.append(gate)
        async with self.changed:
            self.changed.notify_all()
        await gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("lost")

    async def one(self, item: int) -> int:
        await self._round_trip([item])
        return item * 10

    async def many(self, items: Sequence[int]) -> list[int | BaseException]:
        await self._round_trip(list(items))
        return [ValueError(item) if item < 0 else item * 10 for item in items]

    async def open_next(self) -> None:
        """Lets the oldest waiting round trip return, once one is waiting (bounded)."""
        async with asyncio.timeout(5), self.changed:
            await self.changed.wait_for(lambda: any(not gate.is_set() for gate in self.gates))
        next(gate for gate in self.gates if not gate.is_set()).set()


async def test_a_lone_call_is_sent_at_once_alone() -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many)
    call = asyncio.create_task(coalescer.submit(1))
    await wire.open_next()
    assert await call == 10
    assert wire.sent == [[1]]


async def test_calls_arriving_during_a_round_trip_go_together_in_arrival_order() -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many, max_batch=3)
    calls = [asyncio.create_task(coalescer.submit(n)) for n in range(1, 6)]
    for _ in range(3):
        await wire.open_next()
    assert [await call for call in calls] == [10, 20, 30, 40, 50]
    assert wire.sent == [[1], [2, 3, 4], [5]]


async def test_one_item_failing_fails_only_its_caller() -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many)
    calls = [asyncio.create_task(coalescer.submit(n)) for n in (1, 2, -3, 4)]
    await wire.open_next()
    await wire.open_next()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == [10, 20]
    assert isinstance(results[2], ValueError)
    assert results[3] == 40


async def test_a_lost_round_trip_fails_every_caller_of_its_batch_and_only_them() -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many)
    first = asyncio.create_task(coalescer.submit(1))
    batch = [asyncio.create_task(coalescer.submit(n)) for n in (2, 3)]
    await wire.open_next()
    assert await first == 10
    wire.fail_next = True
    await wire.open_next()
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    # The next call goes through.
    after = asyncio.create_task(coalescer.submit(5))
    await wire.open_next()
    assert await after == 50


async def test_a_caller_that_gives_up_while_queued_is_not_sent() -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many)
    first = asyncio.create_task(coalescer.submit(1))
    gives_up = asyncio.create_task(coalescer.submit(2))
    stays = asyncio.create_task(coalescer.submit(3))
    await asyncio.sleep(0)
    gives_up.cancel()
    await wire.open_next()
    await wire.open_next()
    assert (await first, await stays) == (10, 30)
    assert wire.sent == [[1], [3]]


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.integers(1, 1000), min_size=1, max_size=40),
    max_batch=st.integers(1, 8),
    max_in_flight=st.integers(1, 3),
)
def test_every_item_is_sent_once_in_arrival_order(
    arrivals: list[int], max_batch: int, max_in_flight: int
) -> None:
    async def run() -> None:
        sent: list[list[int]] = []

        async def one(item: int) -> int:
            sent.append([item])
            await asyncio.sleep(0)
            return -item

        async def many(items: Sequence[int]) -> list[int | BaseException]:
            sent.append(list(items))
            await asyncio.sleep(0)
            return [-item for item in items]

        coalescer: Coalescer[int, int] = Coalescer(
            one, many, max_batch=max_batch, max_in_flight=max_in_flight
        )
        results = await asyncio.gather(*(coalescer.submit(item) for item in arrivals))
        assert results == [-item for item in arrivals]
        assert sorted(item for batch in sent for item in batch) == sorted(arrivals)
        assert all(len(batch) <= max_batch for batch in sent)
        if max_in_flight == 1:
            assert [item for batch in sent for item in batch] == arrivals
        assert coalescer.items == len(arrivals)
        assert coalescer.round_trips == len(sent)

    asyncio.run(run())


@pytest.mark.parametrize("count", [2, 50])
async def test_round_trips_are_fewer_than_calls_under_concurrency(count: int) -> None:
    wire = Wire()
    coalescer: Coalescer[int, int] = Coalescer(wire.one, wire.many, max_batch=64)
    calls = [asyncio.create_task(coalescer.submit(n)) for n in range(count)]
    await wire.open_next()
    await wire.open_next()
    assert len(await asyncio.gather(*calls)) == count
    assert coalescer.round_trips == 2
