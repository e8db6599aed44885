"""A program as a user of ai-billing-client writes it, for `mypy --strict` in an environment
that has only the client and its `typing` extra (tests/client/test_typing.py). It is type
checked, never run."""

from __future__ import annotations

import uuid
from typing import reveal_type

import grpc

from billing.client import AsyncBillingClient, BillingClient, BillingError, Denied
from billing.v1 import billing_pb2, billing_pb2_grpc, types_pb2


def reserve_by_hand(channel: grpc.Channel) -> int:
    stub = billing_pb2_grpc.BillingServiceStub(channel)
    request = billing_pb2.ReserveCreditRequest(
        request_id=str(uuid.uuid4()),
        tenant_id="acme",
        user_id="alice",
        model="gpt-4o",
        estimate=billing_pb2.QueryEstimate(input_tokens=1200, max_output_tokens=800),
    )
    response = stub.ReserveCredit(request, timeout=2.0)
    reveal_type(response)
    reveal_type(response.decision.reason)
    reveal_type(response.reservation.expire_time)
    return response.decision.available_credit_micros


def chat(client: BillingClient) -> int:
    try:
        with client.reserve("acme", "alice", "gpt-4o", input_tokens=1, max_tokens=1) as hold:
            record = hold.commit(input_tokens=1, output_tokens=1)
            reveal_type(record)
            reveal_type(record.usage)
            return record.charged_micros
    except Denied as denied:
        reveal_type(denied.decision)
        return 0
    except BillingError as error:
        reveal_type(error.reason)
        return 0


async def achat(client: AsyncBillingClient) -> types_pb2.UsageRecord:
    async with client.reserve("acme", "alice", "gpt-4o", input_tokens=1, max_tokens=1) as hold:
        return await hold.commit(input_tokens=1, output_tokens=1)
