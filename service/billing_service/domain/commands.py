"""The requests the core accepts, their validation, and their idempotency fingerprints.

Validation happens before anything is read or written: a bad field raises InvalidArgument
naming it and changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from billing_service.domain.errors import InvalidArgument
from billing_service.domain.model import TenantStatus
from billing_service.domain.money import AMOUNT_MICROS_MAX
from billing_service.domain.pricing import TOKENS_MAX, TokenUsage

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ID_LENGTH_MAX = 128
REASON_LENGTH_MAX = 500
_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
_RESERVATION_ID_PATTERN = re.compile(r"rsv_[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class QueryEstimate:
    input_tokens: int
    max_output_tokens: int


@dataclass(frozen=True, slots=True)
class CheckAccess:
    tenant_id: str
    model: str
    estimate: QueryEstimate | None = None
    # Optional: whose budgets to take into account ("" for none).
    user_id: str = ""
    api_key_id: str = ""


@dataclass(frozen=True, slots=True)
class Reserve:
    request_id: str
    tenant_id: str
    user_id: str
    model: str
    estimate: QueryEstimate | None = None
    amount_micros: int | None = None
    # None: the server's default time to live.
    ttl: timedelta | None = None
    # Optional: the API key or caller label whose budget applies ("" for none).
    api_key_id: str = ""


@dataclass(frozen=True, slots=True)
class Commit:
    request_id: str
    reservation_id: str
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class Refund:
    """Gives back `amount_micros` of a committed charge, or all that is left of it with
    `refund_all`. With neither it is a release (the shape earlier clients sent to give a hold
    back), with exactly Release's meaning: it never refunds anything."""

    request_id: str
    reservation_id: str
    amount_micros: int = 0
    reason: str = ""
    refund_all: bool = False

    @property
    def asks_release(self) -> bool:
        return not self.amount_micros and not self.refund_all


@dataclass(frozen=True, slots=True)
class Release:
    """Gives an open hold back; never refunds a charge."""

    request_id: str
    reservation_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ExtendHold:
    """Grows an open hold by the price of `additional_output_tokens` more output tokens."""

    request_id: str
    reservation_id: str
    additional_output_tokens: int
    # The call's counts so far: only to say how many more output tokens the hold covers.
    usage: TokenUsage = dataclasses.field(default_factory=TokenUsage)
    # None: the server's default time to live, counted from the extension.
    ttl: timedelta | None = None


@dataclass(frozen=True, slots=True)
class CreateTenant:
    request_id: str
    tenant_id: str
    credit_limit_micros: int | None = None
    status: TenantStatus = TenantStatus.ACTIVE
    payment_method_on_file: bool = False


@dataclass(frozen=True, slots=True)
class UpdateTenant:
    request_id: str
    tenant_id: str
    credit_limit_micros: int | None = None
    status: TenantStatus | None = None
    payment_method_on_file: bool | None = None


@dataclass(frozen=True, slots=True)
class GrantCredit:
    request_id: str
    tenant_id: str
    amount_micros: int
    reason: str


Command = (
    Reserve | Commit | Refund | Release | ExtendHold | CreateTenant | UpdateTenant | GrantCredit
)


def _fields(instance: Any) -> dict[str, Any]:
    """dataclasses.asdict without its deep copies, which cost more than the hash on the hot
    path: the same dict for the flat values commands hold (str, int, enums, timedelta)."""
    return {
        field.name: _fields(value) if isinstance(value, _NESTED) else value
        for field in dataclasses.fields(instance)
        for value in (getattr(instance, field.name),)
    }


# The dataclasses commands nest (asdict turns them into dicts too).
_NESTED = (QueryEstimate, TokenUsage)


# Fields added to commands after requests were stored, with the value that means "not sent".
_ADDED_FIELDS = (("api_key_id", ""), ("refund_all", False))


def fingerprint(command: Command | DataclassInstance) -> str:
    """A digest of everything a request asks, to tell a retry from a reused request_id."""
    body = {"command": type(command).__name__, **_fields(command)}
    # Requests made before these fields existed keep their fingerprints.
    for name, absent in _ADDED_FIELDS:
        if name in body and body[name] == absent:
            del body[name]
    canonical = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TtlBounds:
    default: timedelta = timedelta(minutes=5)
    minimum: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(hours=1)


def is_valid_id(value: str) -> bool:
    """Whether check_id accepts `value`."""
    return _ID_PATTERN.fullmatch(value) is not None


def check_id(field: str, value: str) -> None:
    if is_valid_id(value):
        return
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > ID_LENGTH_MAX:
        raise InvalidArgument(field, f"must be at most {ID_LENGTH_MAX} characters")
    raise InvalidArgument(field, "must be printable ASCII without spaces")


def check_reservation_id(value: str) -> None:
    if not _RESERVATION_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            "reservation_id", "must be 'rsv_' followed by 32 lowercase hex digits"
        )


def check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")


def check_money(field: str, value: int, low: int, high: int) -> None:
    """check_range for an amount of micros; the bounds and the value also go to the error's
    metadata, so a client can say them in the units its user typed."""
    if not low <= value <= high:
        raise InvalidArgument(
            field,
            f"must be between {low} and {high}, got {value}",
            {"min_micros": str(low), "max_micros": str(high), "value_micros": str(value)},
        )


def check_amount(field: str, value: int) -> None:
    check_money(field, value, 1, AMOUNT_MICROS_MAX)


def check_reason(field: str, value: str, *, required: bool) -> None:
    if required and not value.strip():
        raise InvalidArgument(field, "is required")
    if len(value) > REASON_LENGTH_MAX:
        raise InvalidArgument(field, f"must be at most {REASON_LENGTH_MAX} characters")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; SQLite could, but both databases answer alike.
        raise InvalidArgument(field, "must not contain NUL characters")


def check_estimate(estimate: QueryEstimate) -> None:
    check_range("estimate.input_tokens", estimate.input_tokens, 0, TOKENS_MAX)
    check_range("estimate.max_output_tokens", estimate.max_output_tokens, 1, TOKENS_MAX)


def check_usage(usage: TokenUsage) -> None:
    check_range("usage.input_tokens", usage.input_tokens, 0, TOKENS_MAX)
    check_range("usage.cached_input_tokens", usage.cached_input_tokens, 0, TOKENS_MAX)
    check_range("usage.output_tokens", usage.output_tokens, 0, TOKENS_MAX)


def validate_check_access(command: CheckAccess) -> None:
    check_id("tenant_id", command.tenant_id)
    check_id("model", command.model)
    if command.estimate is not None:
        check_estimate(command.estimate)
    if command.user_id:
        check_id("user_id", command.user_id)
    if command.api_key_id:
        check_id("api_key_id", command.api_key_id)


def check_ttl(ttl: timedelta | None, ttl_bounds: TtlBounds) -> timedelta:
    """The time to live asked (the default when None), within the server's bounds."""
    ttl = ttl_bounds.default if ttl is None else ttl
    if not ttl_bounds.minimum <= ttl <= ttl_bounds.maximum:
        raise InvalidArgument(
            "ttl",
            f"must be between {ttl_bounds.minimum.total_seconds():g}s and "
            f"{ttl_bounds.maximum.total_seconds():g}s",
        )
    return ttl


def validate_reserve(command: Reserve, ttl_bounds: TtlBounds) -> timedelta:
    """Checks a reservation request and returns the time to live of its hold."""
    check_id("request_id", command.request_id)
    check_id("tenant_id", command.tenant_id)
    check_id("user_id", command.user_id)
    check_id("model", command.model)
    if command.api_key_id:
        check_id("api_key_id", command.api_key_id)
    if (command.estimate is None) == (command.amount_micros is None):
        raise InvalidArgument("size", "exactly one of estimate or amount_micros is required")
    if command.estimate is not None:
        check_estimate(command.estimate)
    if command.amount_micros is not None:
        check_amount("amount_micros", command.amount_micros)
    return check_ttl(command.ttl, ttl_bounds)


def validate_commit(command: Commit) -> None:
    check_id("request_id", command.request_id)
    check_reservation_id(command.reservation_id)
    check_usage(command.usage)


def validate_extend_hold(command: ExtendHold, ttl_bounds: TtlBounds) -> timedelta:
    """Checks an extension request and returns the time to live it gives the hold."""
    check_id("request_id", command.request_id)
    check_reservation_id(command.reservation_id)
    check_range("additional_output_tokens", command.additional_output_tokens, 1, TOKENS_MAX)
    check_usage(command.usage)
    return check_ttl(command.ttl, ttl_bounds)


def validate_refund(command: Refund) -> None:
    check_id("request_id", command.request_id)
    check_reservation_id(command.reservation_id)
    check_money("amount_micros", command.amount_micros, 0, AMOUNT_MICROS_MAX)
    if command.refund_all and command.amount_micros:
        raise InvalidArgument("amount_micros", "must be 0 when refund_all is set")
    check_reason("reason", command.reason, required=False)


def validate_release(command: Release) -> None:
    check_id("request_id", command.request_id)
    check_reservation_id(command.reservation_id)
    check_reason("reason", command.reason, required=False)


def validate_create_tenant(command: CreateTenant) -> None:
    check_id("request_id", command.request_id)
    check_id("tenant_id", command.tenant_id)
    if command.credit_limit_micros is not None:
        check_money("credit_limit_micros", command.credit_limit_micros, 0, AMOUNT_MICROS_MAX)


def validate_update_tenant(command: UpdateTenant) -> None:
    check_id("request_id", command.request_id)
    check_id("tenant_id", command.tenant_id)
    if command.credit_limit_micros is not None:
        check_money("credit_limit_micros", command.credit_limit_micros, 0, AMOUNT_MICROS_MAX)


def validate_grant(command: GrantCredit) -> None:
    check_id("request_id", command.request_id)
    check_id("tenant_id", command.tenant_id)
    check_amount("amount_micros", command.amount_micros)
    check_reason("reason", command.reason, required=True)
