"""Group commit: calls that arrive while round trips are in flight go together in the next one.

A call that finds fewer than `max_in_flight` round trips in flight and nobody waiting is sent
at once, alone: a lone caller never waits for company (there is no timer). A call that arrives
while the limit is reached queues; when a round trip returns, the queue (up to `max_batch`
items, in arrival order) is sent as one batch. The batch's callers each get their own item's
result, or the exception of the round trip that carried it (a lost connection: every caller of
that batch gets it, and retries with the same request_id).

A round trip runs as its own task: a caller that gives up (its deadline) while its batch is in
flight leaves the batch to finish, and learns nothing of its own item (its retry does). A caller
that gives up while still queued is dropped from the queue before it is sent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    def __init__(
        self,
        send_one: Callable[[Item], Awaitable[Result]],
        send_many: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        max_in_flight: int = 1,
        max_batch: int = 64,
    ) -> None:
        """send_many: one round trip for several items, returning one result per item (an
        exception for an item that failed alone) in their order."""
        self._send_one = send_one
        self._send_many = send_many
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._in_flight = 0
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters for the benchmark: round trips and items sent.
        self.round_trips = 0
        self.items = 0

    async def submit(self, item: Item) -> Result:
        if self._in_flight < self._max_in_flight and not self._waiting:
            self._in_flight += 1
            self.round_trips += 1
            self.items += 1
            try:
                return await self._send_one(item)
            finally:
                self._round_trip_done()
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        return await future

    def _round_trip_done(self) -> None:
        self._in_flight -= 1
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        while self._waiting and len(batch) < self._max_batch:
            item, future = self._waiting.popleft()
            if not future.done():  # a caller that gave up while queued is not sent
                batch.append((item, future))
        if not batch:
            return
        self._in_flight += 1
        self.round_trips += 1
        self.items += len(batch)
        task = asyncio.get_running_loop().create_task(self._send_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            if len(batch) == 1:
                results: Sequence[Result | BaseException] = [await self._send_one(batch[0][0])]
            else:
                results = await self._send_many([item for item, _ in batch])
            if len(results) != len(batch):
                raise AssertionError(f"{len(results)} results for {len(batch)} items")
        except BaseException as error:  # the round trip failed: so did each of its items
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        finally:
            self._round_trip_done()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
