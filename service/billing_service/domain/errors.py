"""Errors of the billing core, each with a stable reason (AIP-193 `ErrorInfo.reason`).

The transport maps each class to one gRPC status code; the reason strings are part of the
public contract and never change meaning. The contract lists them as billing.v1.ErrorReason
(protos/billing/v1/errors.proto); tests/test_error_reasons.py fails when the two differ.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """Every ErrorInfo reason the server sends, the transport's (authentication, deadline) too."""

    FIELD_INVALID = "FIELD_INVALID"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    TENANT_ALREADY_EXISTS = "TENANT_ALREADY_EXISTS"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    HOLD_ALREADY_COMMITTED = "HOLD_ALREADY_COMMITTED"
    HOLD_NOT_COMMITTED = "HOLD_NOT_COMMITTED"
    HOLD_RELEASED = "HOLD_RELEASED"
    HOLD_EXPIRED = "HOLD_EXPIRED"
    PARTIAL_RELEASE_NOT_ALLOWED = "PARTIAL_RELEASE_NOT_ALLOWED"
    REFUND_EXCEEDS_CHARGE = "REFUND_EXCEEDS_CHARGE"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    STRIPE_NOT_CONFIGURED = "STRIPE_NOT_CONFIGURED"
    STRIPE_UNAVAILABLE = "STRIPE_UNAVAILABLE"
    SETUP_INTENT_NOT_FOUND = "SETUP_INTENT_NOT_FOUND"
    SETUP_INTENT_NOT_SUCCEEDED = "SETUP_INTENT_NOT_SUCCEEDED"
    SETUP_INTENT_OF_ANOTHER_CUSTOMER = "SETUP_INTENT_OF_ANOTHER_CUSTOMER"
    CARD_REFUSED = "CARD_REFUSED"
    NO_PAYMENT_METHOD = "NO_PAYMENT_METHOD"
    CHARGE_NOT_FOUND = "CHARGE_NOT_FOUND"
    CHARGE_IN_PROGRESS = "CHARGE_IN_PROGRESS"
    BUDGET_NOT_FOUND = "BUDGET_NOT_FOUND"
    CREDENTIALS_MISSING = "CREDENTIALS_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    CLIENT_CERTIFICATE_UNKNOWN = "CLIENT_CERTIFICATE_UNKNOWN"
    CALLER_NOT_PERMITTED = "CALLER_NOT_PERMITTED"
    DEADLINE_PASSED = "DEADLINE_PASSED"


class BillingError(Exception):
    """Base of every error the core reports to a caller."""

    reason: ErrorReason

    def __init__(self, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidArgument(BillingError):
    """A request field is malformed; nothing was changed."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(ErrorReason.FIELD_INVALID, f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(BillingError):
    """The tenant or reservation named does not exist."""


class AlreadyExists(BillingError):
    """The tenant exists already, or a request_id was reused for a different request."""


class FailedPrecondition(BillingError):
    """The request is well formed but the reservation's state does not allow it."""


class Unavailable(BillingError):
    """A dependency (the database) is down; the caller may retry with the same request_id."""


def request_id_reused(request_id: str) -> AlreadyExists:
    return AlreadyExists(
        ErrorReason.REQUEST_ID_REUSED,
        f"request_id {request_id!r} was already used for a different request",
    )
