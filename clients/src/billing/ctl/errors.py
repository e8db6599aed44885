"""A failed call as an operator reads it: status, AIP-193 reason, fields, and an exit code."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

# Like grpcurl: a failed call exits with 64 + its gRPC status code (NOT_FOUND: 69,
# UNAVAILABLE: 78), so scripts can tell the cause from the exit code alone. 2 is a usage error.
RPC_EXIT_BASE = 64
USAGE_EXIT = 2

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class CallFailure:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return RPC_EXIT_BASE + int(self.code.value[0])

    @property
    def retryable(self) -> bool:
        return self.code in _RETRYABLE

    def as_json(self) -> dict[str, object]:
        return {
            "code": self.code.name,
            "reason": self.reason,
            "domain": self.domain,
            "message": self.message,
            "metadata": self.metadata,
            "fields": self.fields,
        }

    def __str__(self) -> str:
        text = self.code.name
        if self.reason:
            text += f" {self.reason}"
        text += f": {self.message}"
        if self.fields:
            text += f" (field: {', '.join(self.fields)})"
        return text


def call_failure(error: grpc.RpcError) -> CallFailure:
    """Reads the status code, message and the ErrorInfo / BadRequest details of a failed call."""
    if not isinstance(error, grpc.Call):
        return CallFailure(grpc.StatusCode.UNKNOWN, str(error))
    status = status_pb2.Status()
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status.ParseFromString(value)
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(violation.field for violation in bad_request.field_violations)
    return CallFailure(
        code=error.code(),
        message=error.details() or "",
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        fields=fields,
    )
