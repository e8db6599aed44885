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
