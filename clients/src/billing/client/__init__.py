"""A typed client of the ai-billing service, blocking and asyncio.

    client = BillingClient("localhost:50051", token=...)
    with client.reserve(tenant, user, "gpt-4o", input_tokens=1200, max_tokens=800) as hold:
        answer = model(...)
        hold.commit(input_tokens=..., output_tokens=...)

See docs/client.md.
"""

from billing.client._aio import AsyncBillingClient, AsyncHold, AsyncHoldContext
from billing.client._channel import CHANNEL_OPTIONS, connect_aio_channel, connect_channel
from billing.client._errors import (
    AlreadyExists,
    BillingError,
    BillingUnavailable,
    CommitOutcomeUnknown,
    Denied,
    FailedPrecondition,
    FieldViolation,
    HoldAlreadyCommitted,
    HoldExpired,
    HoldNotCommitted,
    HoldReleased,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    ReleaseOutcomeUnknown,
    RequestIdReused,
    Unauthenticated,
    error_from_rpc,
)
from billing.client._model import AccessDecision, Extension, OnExit, new_request_id
from billing.client._retry import RETRIED_CODES, OnRetry, RetryEvent, RetryPolicy
from billing.client._sync import BillingClient, Hold, HoldContext

__all__ = [
    "CHANNEL_OPTIONS",
    "RETRIED_CODES",
    "AccessDecision",
    "AlreadyExists",
    "AsyncBillingClient",
    "AsyncHold",
    "AsyncHoldContext",
    "BillingClient",
    "BillingError",
    "BillingUnavailable",
    "CommitOutcomeUnknown",
    "Denied",
    "Extension",
    "FailedPrecondition",
    "FieldViolation",
    "Hold",
    "HoldAlreadyCommitted",
    "HoldContext",
    "HoldExpired",
    "HoldNotCommitted",
    "HoldReleased",
    "InvalidArgument",
    "NotFound",
    "OnExit",
    "OnRetry",
    "OutcomeUnknown",
    "PermissionDenied",
    "ReleaseOutcomeUnknown",
    "RequestIdReused",
    "RetryEvent",
    "RetryPolicy",
    "Unauthenticated",
    "connect_aio_channel",
    "connect_channel",
    "error_from_rpc",
    "new_request_id",
]
