"""What can go wrong: a denial (a normal answer) and the typed errors of failed calls.

A failed call carries an AIP-193 `google.rpc.Status` in the trailing metadata
`grpc-status-details-bin`; its `ErrorInfo.reason` is the stable reason the typed errors expose
and select on. It is decoded with `googleapis-common-protos` (protobuf messages only, already a
dependency of the generated stubs) rather than `grpcio-status`, which the client does not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from billing.client._model import AccessDecision

__all__ = [
    "AlreadyExists",
    "BillingError",
    "BillingUnavailable",
    "CommitOutcomeUnknown",
    "Denied",
    "FailedPrecondition",
    "HoldAlreadyCommitted",
    "HoldExpired",
    "HoldNotCommitted",
    "HoldReleased",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "ReleaseOutcomeUnknown",
    "RequestIdReused",
    "Unauthenticated",
]

ERROR_DOMAIN = "ai-billing"


class Denied(Exception):
    """The tenant may not run the query (no credit, no card, suspended ...).

    Map it to HTTP 402 in one line: `except Denied as denied: return denied.to_http()`.
    """

    http_status = 402

    def __init__(self, decision: AccessDecision) -> None:
        super().__init__(f"{decision.reason}: {decision.message}")
        self.decision = decision
        self.reason = decision.reason
        self.message = decision.message

    def to_http(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status (402) and a JSON-ready body naming the reason and the message."""
        return self.http_status, {
            "error": {
                "reason": self.reason,
                "message": self.message,
                "available_credit_micros": self.decision.available_credit_micros,
                "required_micros": self.decision.required_micros,
            }
        }


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of an INVALID_ARGUMENT (`google.rpc.BadRequest`)."""

    field: str
    description: str


class BillingError(Exception):
    """A call the service refused or could not answer.

    `code` is the gRPC status, `reason` the stable AIP-193 reason (e.g. "HOLD_EXPIRED"; empty
    when the failure came from the transport, not the service), `message` the server's text.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(f"{code.name}{f' {reason}' if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = field_violations


class InvalidArgument(BillingError):
    """A request field is malformed (see `field_violations`); nothing was changed."""


class NotFound(BillingError):
    """The tenant or reservation does not exist."""


class AlreadyExists(BillingError):
    """The tenant exists already, or a request id was reused (see `RequestIdReused`)."""


class RequestIdReused(AlreadyExists):
    """The request id was used before for a different request."""


class FailedPrecondition(BillingError):
    """The reservation's state does not allow the call."""


class HoldAlreadyCommitted(FailedPrecondition):
    """The hold was committed already (by another request id). A release of it fails so and
    refunds nothing."""


class HoldNotCommitted(FailedPrecondition):
    """A refund of a hold that is still open: there is no charge to refund (release it)."""


class HoldReleased(FailedPrecondition):
    """The hold was released; nothing was charged."""


class HoldExpired(FailedPrecondition):
    """The hold expired before the call; nothing was charged. Reserve again."""


class Unauthenticated(BillingError):
    """No credentials, or credentials the server does not know."""


class PermissionDenied(BillingError):
    """The caller's role may not call this service."""


class BillingUnavailable(BillingError):
    """The service did not answer in time (UNAVAILABLE or DEADLINE_EXCEEDED on every attempt).

    The outcome of a mutating call is unknown; calling it again with the same request id is safe.
    """


class OutcomeUnknown(BillingUnavailable):
    """A commit or release of a hold got no answer (UNAVAILABLE, DEADLINE_EXCEEDED on every
    attempt, or another failure that does not say the call changed nothing): it may or may not
    have been applied. Nothing was guessed: send the same request again with `request_id` to
    learn its answer; meanwhile the hold is left as it is (it expires at its expire time if
    nothing settled it)."""

    def __init__(self, cause: BillingError, *, reservation_id: str, request_id: str) -> None:
        super().__init__(
            cause.code,
            cause.message,
            reason=cause.reason,
            domain=cause.domain,
            metadata=cause.metadata,
            field_violations=cause.field_violations,
        )
        self.reservation_id = reservation_id
        self.request_id = request_id


class CommitOutcomeUnknown(OutcomeUnknown):
    """A Commit whose outcome is unknown. The hold was not released: retry the same commit
    with `hold.commit(...)` (same usage) or `client.commit(error.reservation_id,
    request_id=error.request_id, **error.usage)`."""

    def __init__(
        self,
        cause: BillingError,
        *,
        reservation_id: str,
        request_id: str,
        usage: Mapping[str, int],
    ) -> None:
        super().__init__(cause, reservation_id=reservation_id, request_id=request_id)
        # The token counts the commit sent: a retry must send exactly these.
        self.usage: dict[str, int] = dict(usage)


class ReleaseOutcomeUnknown(OutcomeUnknown):
    """A Release whose outcome is unknown. Retry it with `client.release(error.reservation_id,
    request_id=error.request_id)`, or leave the hold to expire."""


# Answers after which a commit or release certainly changed nothing, or the hold's final state
# is known: any other failure leaves its outcome unknown.
_DECIDED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def outcome_unknown(error: BillingError) -> bool:
    """Whether a failed mutating call may still have been applied."""
    return error.code not in _DECIDED_CODES


@dataclass
class _Rich:
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)


_BY_CODE: dict[grpc.StatusCode, type[BillingError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: BillingUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: BillingUnavailable,
}

_BY_REASON: dict[str, type[BillingError]] = {
    "REQUEST_ID_REUSED": RequestIdReused,
    "HOLD_ALREADY_COMMITTED": HoldAlreadyCommitted,
    "HOLD_NOT_COMMITTED": HoldNotCommitted,
    "HOLD_RELEASED": HoldReleased,
    "HOLD_EXPIRED": HoldExpired,
}


def _details(trailing: Any) -> _Rich:
    rich = _Rich()
    status = status_pb2.Status()
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status.ParseFromString(value)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            rich.reason, rich.domain, rich.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            rich.violations += [
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            ]
    return rich


def error_from_rpc(error: grpc.RpcError) -> BillingError:
    """The typed error for a failed call (sync or asyncio)."""
    code = error.code()
    rich = _details(error.trailing_metadata())
    kind = _BY_CODE.get(code, BillingError)
    specific = _BY_REASON.get(rich.reason) if rich.domain == ERROR_DOMAIN else None
    if specific is not None and issubclass(specific, kind):
        kind = specific
    return kind(
        code,
        error.details() or "",
        reason=rich.reason,
        domain=rich.domain,
        metadata=rich.metadata,
        field_violations=tuple(rich.violations),
    )
