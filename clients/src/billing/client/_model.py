"""Plain values the clients return, and the requests both clients send."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from google.protobuf.duration_pb2 import Duration

from billing.client._errors import Denied
from billing.v1 import billing_pb2, types_pb2

__all__ = ["AccessDecision", "Extension", "OnExit", "new_request_id"]

OnExit = Literal["release", "commit"]

_EnumValue = TypeVar("_EnumValue", bound=int)


def new_request_id() -> str:
    """An idempotency key: made once per logical operation and sent on each of its retries."""
    return str(uuid.uuid4())


def _enum_name(name_of: Callable[[_EnumValue], str], value: _EnumValue, prefix: str) -> str:
    """ "CREDIT_LIMIT_REACHED" for DENIAL_REASON_CREDIT_LIMIT_REACHED; "" for UNSPECIFIED."""
    if value == 0:
        return ""
    try:
        return name_of(value).removeprefix(prefix)
    except ValueError:  # a value added to the contract after this client was built
        return str(value)


@dataclass(frozen=True)
class AccessDecision:
    """Whether a tenant may run a query, and if not why (the contract's `Decision`).

    `reason` is the DenialReason without its prefix ("CREDIT_LIMIT_REACHED", "" when allowed),
    `model_billing` "METERED", "INCLUDED" or "" (model not offered). Money is in micros.
    `budgets`: every budget that applied, with what remains as of the decision;
    `exhausted_budget`: the one that denied, with its reset time (a budget denial only).
    """

    allowed: bool
    reason: str
    message: str
    available_credit_micros: int
    required_micros: int
    model_billing: str
    budgets: tuple[types_pb2.BudgetUsage, ...] = ()
    exhausted_budget: types_pb2.BudgetUsage | None = None

    @classmethod
    def from_proto(cls, decision: types_pb2.Decision) -> AccessDecision:
        return cls(
            allowed=decision.allowed,
            reason=_enum_name(types_pb2.DenialReason.Name, decision.reason, "DENIAL_REASON_"),
            message=decision.message,
            available_credit_micros=decision.available_credit_micros,
            budgets=tuple(decision.budgets),
            exhausted_budget=(
                decision.exhausted_budget if decision.HasField("exhausted_budget") else None
            ),
            required_micros=decision.required_micros,
            model_billing=_enum_name(
                types_pb2.ModelBilling.Name, decision.model_billing, "MODEL_BILLING_"
            ),
        )

    def raise_if_denied(self) -> AccessDecision:
        """Raises `Denied` for a denial; returns the decision otherwise."""
        if not self.allowed:
            raise Denied(self)
        return self


@dataclass(frozen=True)
class Extension:
    """The answer to an extension of a hold (the contract's `ExtendHoldResponse`).

    `decision` says whether it was granted and, if not, why (a denial is an answer, not an
    error); `extended_micros` is what was added (0 when denied); `covered_output_tokens` how many
    more output tokens, past the counts sent with it, the hold pays for now: on a denial, stop
    the stream after that many more tokens and commit. `reservation` is the hold after it.
    """

    decision: AccessDecision
    extended_micros: int
    covered_output_tokens: int
    reservation: types_pb2.Reservation

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @classmethod
    def from_proto(cls, response: billing_pb2.ExtendHoldResponse) -> Extension:
        return cls(
            AccessDecision.from_proto(response.decision),
            response.extended_micros,
            response.covered_output_tokens,
            response.reservation,
        )


def check_access_request(
    tenant_id: str,
    model: str,
    input_tokens: int,
    max_tokens: int,
    user_id: str = "",
    api_key_id: str = "",
) -> billing_pb2.CheckAccessRequest:
    request = billing_pb2.CheckAccessRequest(
        tenant_id=tenant_id, model=model, user_id=user_id, api_key_id=api_key_id
    )
    if input_tokens or max_tokens:
        request.estimate.CopyFrom(
            billing_pb2.QueryEstimate(input_tokens=input_tokens, max_output_tokens=max_tokens)
        )
    return request


def reserve_request(
    request_id: str,
    tenant_id: str,
    user_id: str,
    model: str,
    input_tokens: int,
    max_tokens: int,
    ttl_s: float | None,
    api_key_id: str = "",
) -> billing_pb2.ReserveCreditRequest:
    request = billing_pb2.ReserveCreditRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        user_id=user_id,
        api_key_id=api_key_id,
        model=model,
        estimate=billing_pb2.QueryEstimate(input_tokens=input_tokens, max_output_tokens=max_tokens),
    )
    if ttl_s is not None:
        ttl = Duration()
        ttl.FromNanoseconds(round(ttl_s * 1_000_000_000))
        request.ttl.CopyFrom(ttl)
    return request


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def extend_request(
    request_id: str,
    reservation_id: str,
    additional_output_tokens: int,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
    ttl_s: float | None,
) -> billing_pb2.ExtendHoldRequest:
    request = billing_pb2.ExtendHoldRequest(
        request_id=request_id,
        reservation_id=reservation_id,
        additional_output_tokens=additional_output_tokens,
        usage=types_pb2.TokenUsage(
            input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens,
            output_tokens=output_tokens,
        ),
    )
    if ttl_s is not None:
        request.ttl.CopyFrom(_duration(ttl_s))
    return request


def commit_request(
    request_id: str,
    reservation_id: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int,
) -> billing_pb2.CommitRequest:
    return billing_pb2.CommitRequest(
        request_id=request_id,
        reservation_id=reservation_id,
        usage=types_pb2.TokenUsage(
            input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens,
            output_tokens=output_tokens,
        ),
    )


def refund_request(
    request_id: str,
    reservation_id: str,
    amount_micros: int | None,
    refund_all: bool,
    reason: str,
) -> billing_pb2.RefundRequest:
    """A Refund that says what it refunds: a positive `amount_micros`, or `refund_all`. Never
    neither: that shape of the request releases a hold, which is `release()`'s job."""
    if refund_all == (amount_micros is not None):
        raise ValueError(
            "refund() takes exactly one of amount_micros and refund_all=True "
            "(to give an open hold back, use release())"
        )
    if amount_micros is not None and amount_micros <= 0:
        raise ValueError(
            "amount_micros must be positive (to give an open hold back, use release())"
        )
    return billing_pb2.RefundRequest(
        request_id=request_id,
        reservation_id=reservation_id,
        amount_micros=amount_micros or 0,
        refund_all=refund_all,
        reason=reason[:500],
    )


def release_request(
    request_id: str, reservation_id: str, reason: str
) -> billing_pb2.ReleaseRequest:
    return billing_pb2.ReleaseRequest(
        request_id=request_id, reservation_id=reservation_id, reason=reason[:500]
    )


def usage_of(request: billing_pb2.CommitRequest) -> dict[str, int]:
    """The token counts of a commit, as the keyword arguments of `commit()`."""
    usage = request.usage
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
    }


def exit_reason(exc_type: type[BaseException] | None) -> str:
    """The ledger's reason for a hold released by leaving its block."""
    if exc_type is None:
        return "not committed"
    return f"{exc_type.__qualname__} raised"
