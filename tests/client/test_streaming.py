"""Holds that grow, through the clients: `hold.extend()` and the `hold.stream()` helper, blocking
and asyncio, against a real server (unit prices: one token, one micro)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from billing.client import (
    AsyncBillingClient,
    BillingClient,
    Hold,
    HoldAlreadyCommitted,
    HoldReleased,
)
from billing.v1 import types_pb2
from tests.client.conftest import ServerThread, balance, create_tenant

INPUT = 100
FIRST_CHUNK = 50  # the hold starts at the input plus 50 output tokens: 150 micros


def words(count: int, fail_at: int | None = None) -> Iterator[str]:
    for n in range(count):
        if n == fail_at:
            raise RuntimeError("the model stream broke")
        yield f"w{n} "


@pytest.fixture
def client(server: ServerThread) -> Iterator[BillingClient]:
    with BillingClient(server.address, timeout_s=10) as billing:
        yield billing


def test_a_stream_grows_its_hold_in_chunks_and_commits_what_it_passed(
    client: BillingClient,
) -> None:
    create_tenant(client, "acme")
    with client.reserve(
        "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
    ) as hold:
        assert hold.amount_micros == 150
        passed = list(hold.stream(words(420), chunk_tokens=100))
    assert len(passed) == 420
    # 50 covered at first, then four extensions of 100: 450 covered, 420 used.
    assert hold.amount_micros == 150 + 400
    assert hold.denied_extension is None
    assert hold.state == "committed"
    assert hold.record is not None
    assert (hold.record.usage.input_tokens, hold.record.usage.output_tokens) == (INPUT, 420)
    assert hold.record.charged_micros == INPUT + 420
    assert hold.record.held_micros == 550
    after = balance(client, "acme")
    assert (after.balance_micros, after.held_micros) == (-(INPUT + 420), 0)


def test_a_denied_extension_ends_the_stream_where_the_hold_stops_and_commits(
    client: BillingClient,
) -> None:
    # Room for the first hold and 230 more micros: two extensions of 100, then a denial.
    create_tenant(client, "acme", limit=150 + 230)
    with client.reserve(
        "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
    ) as hold:
        passed = list(hold.stream(words(1_000), chunk_tokens=100))
    assert len(passed) == 250
    denied = hold.denied_extension
    assert denied is not None
    assert not denied.allowed
    assert denied.decision.reason == "CREDIT_LIMIT_REACHED"
    assert denied.decision.available_credit_micros == 30
    assert denied.covered_output_tokens == 0
    assert hold.record is not None
    assert hold.record.charged_micros == INPUT + 250 == hold.record.held_micros
    assert hold.record.uncollected_micros == 0


def test_a_consumer_that_stops_reading_commits_what_it_was_given(client: BillingClient) -> None:
    create_tenant(client, "acme")
    with client.reserve(
        "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
    ) as hold:
        stream = hold.stream(words(1_000), chunk_tokens=100)
        for n, _ in enumerate(stream):
            if n == 119:
                break
        stream.close()
    assert hold.record is not None
    assert hold.record.usage.output_tokens == 120


def test_a_broken_model_stream_releases_the_hold(client: BillingClient) -> None:
    create_tenant(client, "acme")
    context = client.reserve(
        "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
    )

    entered: list[Hold] = []

    def run() -> None:
        with context as hold:
            entered.append(hold)
            for _ in hold.stream(words(1_000, fail_at=300), chunk_tokens=100):
                pass

    with pytest.raises(RuntimeError, match="broke"):
        run()
    [hold] = entered
    assert hold.state == "released"
    assert hold.record is None
    after = balance(client, "acme")
    assert (after.balance_micros, after.held_micros) == (0, 0)


def test_extend_outside_a_stream_and_on_a_settled_hold(client: BillingClient) -> None:
    create_tenant(client, "acme")
    with client.reserve(
        "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
    ) as hold:
        extension = hold.extend(1_000, output_tokens=40, ttl_s=600)
        assert extension.allowed
        assert extension.extended_micros == 1_000
        assert extension.covered_output_tokens == 10 + 1_000
        assert hold.amount_micros == 1_150
        assert extension.reservation.status == types_pb2.RESERVATION_STATUS_OPEN
        hold.release("cancelled")
        with pytest.raises(HoldReleased):
            hold.extend(10)
    with pytest.raises(HoldReleased):
        client.extend_hold(hold.reservation_id, additional_output_tokens=10)
    assert balance(client, "acme").held_micros == 0


async def test_the_async_stream_grows_stops_on_denial_and_commits(server: ServerThread) -> None:
    async def model() -> AsyncIterator[str]:
        for n in range(1_000):
            yield f"w{n} "

    async with AsyncBillingClient(server.address, timeout_s=10) as billing:
        with BillingClient(server.address, timeout_s=10) as admin:
            create_tenant(admin, "acme", limit=150 + 230)
        async with billing.reserve(
            "acme", "ann", "unit-priced", input_tokens=INPUT, max_tokens=FIRST_CHUNK
        ) as hold:
            passed = [chunk async for chunk in hold.stream(model(), chunk_tokens=100)]
        assert len(passed) == 250
        assert hold.denied_extension is not None
        assert hold.denied_extension.decision.reason == "CREDIT_LIMIT_REACHED"
        assert hold.record is not None
        assert hold.record.charged_micros == INPUT + 250
        with pytest.raises(HoldAlreadyCommitted):
            await billing.extend_hold(hold.reservation_id, additional_output_tokens=1)
