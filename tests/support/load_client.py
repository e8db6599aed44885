"""A client process firing many concurrent calls at servers (run with multiprocessing spawn)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2


@dataclass(frozen=True)
class Reserved:
    request_id: str
    allowed: bool
    reservation_id: str
    amount_micros: int
    reason: int


def reserve_many(
    addresses: list[str], tenant_id: str, model: str, amount_micros: int, request_ids: list[str]
) -> list[Reserved]:
    """Sends one ReserveCredit per request id, all at once, spread over the servers."""
    return asyncio.run(_reserve_many(addresses, tenant_id, model, amount_micros, request_ids))


async def _reserve_many(
    addresses: list[str], tenant_id: str, model: str, amount_micros: int, request_ids: list[str]
) -> list[Reserved]:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [billing_pb2_grpc.BillingServiceStub(channel) for channel in channels]
    try:
        responses = await asyncio.gather(
            *(
                stubs[i % len(stubs)].ReserveCredit(
                    billing_pb2.ReserveCreditRequest(
                        request_id=request_id,
                        tenant_id=tenant_id,
                        user_id=f"user-{i % 7}",
                        model=model,
                        amount_micros=amount_micros,
                    ),
                    timeout=60,
                )
                for i, request_id in enumerate(request_ids)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    return [
        Reserved(
            request_id,
            response.decision.allowed,
            response.reservation.reservation_id,
            response.reservation.amount_micros,
            response.decision.reason,
        )
        for request_id, response in zip(request_ids, responses, strict=True)
    ]


@dataclass(frozen=True)
class Settle:
    """One Commit (output_tokens set) or Refund (release) to send, possibly twice at once."""

    request_id: str
    reservation_id: str
    output_tokens: int | None
    copies: int


def settle_many(addresses: list[str], settles: list[Settle]) -> list[list[bytes]]:
    """Sends every settle `copies` times concurrently; returns each one's serialized answers."""
    return asyncio.run(_settle_many(addresses, settles))


async def _settle_many(addresses: list[str], settles: list[Settle]) -> list[list[bytes]]:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [billing_pb2_grpc.BillingServiceStub(channel) for channel in channels]

    async def send(index: int, settle: Settle, copy: int) -> bytes:
        stub = stubs[(index + copy) % len(stubs)]
        if settle.output_tokens is None:
            refunded = await stub.Refund(
                billing_pb2.RefundRequest(
                    request_id=settle.request_id, reservation_id=settle.reservation_id
                ),
                timeout=60,
            )
            return bytes(refunded.SerializeToString(deterministic=True))
        committed = await stub.Commit(
            billing_pb2.CommitRequest(
                request_id=settle.request_id,
                reservation_id=settle.reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=settle.output_tokens),
            ),
            timeout=60,
        )
        return bytes(committed.SerializeToString(deterministic=True))

    try:
        answers = await asyncio.gather(
            *(
                asyncio.gather(*(send(i, settle, copy) for copy in range(settle.copies)))
                for i, settle in enumerate(settles)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    return [list(group) for group in answers]


@dataclass(frozen=True)
class Stream:
    """One streamed answer: a hold of `first_micros`, extended by `chunk_tokens` output tokens
    at a time until an extension is denied, then committed at its hold plus `over_micros`
    (a unit-priced model: one output token costs one micro)."""

    request_id: str
    tenant_id: str
    user_id: str
    model: str
    first_micros: int
    chunk_tokens: int
    over_micros: int


@dataclass(frozen=True)
class Streamed:
    stream: Stream
    allowed: bool
    reservation_id: str
    # Every extension's answer, in order: the last one is the denial that ended the stream.
    extensions: list[bytes]
    # The hold when the stream ended, and what its commit charged and left uncollected.
    held_micros: int
    charged_micros: int
    uncollected_micros: int


def stream_many(addresses: list[str], streams: list[Stream]) -> list[Streamed]:
    """Runs every stream at once, spread over the servers; every third extension is sent twice
    at once (a retry racing its first attempt), and both copies must answer alike."""
    return asyncio.run(_stream_many(addresses, streams))


async def _stream_many(addresses: list[str], streams: list[Stream]) -> list[Streamed]:
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [billing_pb2_grpc.BillingServiceStub(channel) for channel in channels]

    async def run(index: int, stream: Stream) -> Streamed:
        stub = stubs[index % len(stubs)]
        reserved = await stub.ReserveCredit(
            billing_pb2.ReserveCreditRequest(
                request_id=stream.request_id,
                tenant_id=stream.tenant_id,
                user_id=stream.user_id,
                model=stream.model,
                amount_micros=stream.first_micros,
            ),
            timeout=60,
        )
        if not reserved.decision.allowed:
            return Streamed(stream, False, "", [], 0, 0, 0)
        reservation_id = reserved.reservation.reservation_id
        held = reserved.reservation.amount_micros
        extensions: list[bytes] = []
        while True:
            request = billing_pb2.ExtendHoldRequest(
                request_id=f"{stream.request_id}-extend-{len(extensions)}",
                reservation_id=reservation_id,
                additional_output_tokens=stream.chunk_tokens,
                usage=types_pb2.TokenUsage(output_tokens=held),
            )
            copies = 2 if len(extensions) % 3 == 0 else 1
            answers = await asyncio.gather(
                *(
                    stubs[(index + copy) % len(stubs)].ExtendHold(request, timeout=60)
                    for copy in range(copies)
                )
            )
            serialized = {bytes(a.SerializeToString(deterministic=True)) for a in answers}
            assert len(serialized) == 1, "a retried extension got another answer"
            answer = answers[0]
            extensions.append(serialized.pop())
            if not answer.decision.allowed:
                break
            held = answer.reservation.amount_micros
        committed = await stub.Commit(
            billing_pb2.CommitRequest(
                request_id=f"{stream.request_id}-commit",
                reservation_id=reservation_id,
                usage=types_pb2.TokenUsage(output_tokens=held + stream.over_micros),
            ),
            timeout=60,
        )
        record = committed.usage_record
        return Streamed(
            stream,
            True,
            reservation_id,
            extensions,
            held,
            record.charged_micros,
            record.uncollected_micros,
        )

    try:
        return list(await asyncio.gather(*(run(i, s) for i, s in enumerate(streams))))
    finally:
        for channel in channels:
            await channel.close()
