"""A failed call as an operator reads it: status, AIP-193 reason, fields, and an exit code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from billing.client import RETRIED_CODES, error_from_rpc
from billing.ctl.money import format_dollars

# Like grpcurl: a failed call exits with 64 + its gRPC status code (NOT_FOUND: 69,
# UNAVAILABLE: 78), so scripts can tell the cause from the exit code alone. 2 is a usage error.
RPC_EXIT_BASE = 64
USAGE_EXIT = 2


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
        return self.code in RETRIED_CODES

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
        return self._text(self.message)

    def in_dollars(self, dollar_options: Mapping[str, str]) -> str:
        """The failure as __str__ says it, but in dollars where the user typed dollars: the
        amounts the server sent as ErrorInfo metadata (`*_micros`), the option they typed."""
        micros = {
            key: int(value)
            for key, value in self.metadata.items()
            if key.endswith("_micros") and value.isdigit()
        }
        dollars = {key: format_dollars(value) for key, value in micros.items()}
        refund = self.reason == "REFUND_EXCEEDS_CHARGE" and "amount_micros" in dollar_options
        if refund and {"refundable_micros", "requested_micros"} <= dollars.keys():
            return self._text(
                f"{dollars['refundable_micros']} is left to refund of this charge, "
                f"{dollars['requested_micros']} was asked"
            )
        field = self.metadata.get("field", "")
        out_of_range = self.reason == "FIELD_INVALID" and field in dollar_options
        if out_of_range and {"min_micros", "max_micros", "value_micros"} <= dollars.keys():
            return self._text(
                f"{dollar_options[field]}: must be between {dollars['min_micros']} and "
                f"{dollars['max_micros']}, got {dollars['value_micros']}"
            )
        return str(self)

    def _text(self, message: str) -> str:
        text = self.code.name
        if self.reason:
            text += f" {self.reason}"
        text += f": {message}"
        if self.fields:
            text += f" (field: {', '.join(self.fields)})"
        return text


def call_failure(error: grpc.RpcError) -> CallFailure:
    """The status code, message and the ErrorInfo / BadRequest details of a failed call, as the
    client library decodes them."""
    if not isinstance(error, grpc.Call):
        return CallFailure(grpc.StatusCode.UNKNOWN, str(error))
    typed = error_from_rpc(error)
    return CallFailure(
        code=typed.code,
        message=typed.message,
        reason=typed.reason,
        domain=typed.domain,
        metadata=typed.metadata,
        fields=[violation.field for violation in typed.field_violations],
    )
