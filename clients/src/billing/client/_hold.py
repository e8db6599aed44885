"""What the sync and asyncio holds share: the granted reservation, its request ids, and what a
failed commit or release leaves known."""

from __future__ import annotations

import logging
from typing import Literal

from billing.client._errors import (
    BillingError,
    CommitOutcomeUnknown,
    HoldAlreadyCommitted,
    HoldExpired,
    HoldReleased,
    ReleaseOutcomeUnknown,
    outcome_unknown,
)
from billing.client._model import (
    AccessDecision,
    Extension,
    OnExit,
    extend_request,
    new_request_id,
    usage_of,
)
from billing.v1 import billing_pb2, types_pb2

logger = logging.getLogger("billing.client")

# "unknown": a commit or release was sent and its outcome is unknown (no answer, or the call
# was interrupted): the hold may be settled or still open. It is never released after that.
HoldState = Literal["open", "committed", "released", "expired", "unknown"]


class HoldBase:
    """A granted hold. Its commit and its release each get one request id, made here, so a
    second `commit()` after an unknown outcome (CommitOutcomeUnknown) is a retry, not a second
    charge."""

    def __init__(
        self,
        reservation: types_pb2.Reservation,
        decision: AccessDecision,
        *,
        input_tokens: int,
        max_tokens: int,
        on_exit: OnExit,
    ) -> None:
        self.reservation = reservation
        self.decision = decision
        self.record: types_pb2.UsageRecord | None = None
        self.state: HoldState = "open"
        self._estimate = (input_tokens, max_tokens)
        self._on_exit = on_exit
        self._commit_request_id = new_request_id()
        self._release_request_id = new_request_id()
        # Streaming (`stream()`): the output tokens passed through, how many the hold pays for
        # in all (it was priced for `max_tokens`), and the extension that ended the stream.
        self.streamed_output_tokens = 0
        self.covered_output_tokens = max_tokens
        self.denied_extension: Extension | None = None

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def amount_micros(self) -> int:
        """The amount held, in micros (0 for an included model)."""
        return self.reservation.amount_micros

    def _extend_request(
        self, additional_output_tokens: int, output_tokens: int, ttl_s: float | None
    ) -> billing_pb2.ExtendHoldRequest:
        """An extension of this hold, with the call's counts so far (the reservation's input
        tokens and `output_tokens`), so the answer says what the hold covers past them."""
        return extend_request(
            new_request_id(),
            self.reservation_id,
            additional_output_tokens,
            self._estimate[0],
            output_tokens,
            0,
            ttl_s,
        )

    def _extended(self, extension: Extension, output_tokens: int) -> Extension:
        """Keeps what an extension answered: the hold as it left it, and how many output
        tokens it covers in all."""
        self.reservation = extension.reservation
        self.covered_output_tokens = output_tokens + extension.covered_output_tokens
        return extension

    def _needs_extension(self, tokens: int) -> bool:
        """Whether passing `tokens` more output tokens would go past what the hold covers."""
        return self.streamed_output_tokens + tokens > self.covered_output_tokens

    def _stream_commit_counts(self) -> dict[str, int]:
        """What a stream commits when it ends: the reservation's input tokens and the output
        tokens it passed through."""
        return {"input_tokens": self._estimate[0], "output_tokens": self.streamed_output_tokens}

    def _note_failure(self, error: BillingError) -> None:
        """Remembers what a failed commit or release says of the hold, so leaving the block
        does not act on a hold that is no longer open, or that may not be."""
        if isinstance(error, CommitOutcomeUnknown | ReleaseOutcomeUnknown):
            self.state = "unknown"
        elif isinstance(error, HoldAlreadyCommitted):
            self.state = "committed"
        elif isinstance(error, HoldReleased):
            self.state = "released"
        elif isinstance(error, HoldExpired):
            self.state = "expired"

    def _interrupted(self) -> None:
        """A commit or release stopped by something else (a cancelled task, Ctrl-C) may have
        reached the service: its outcome is unknown."""
        if self.state == "open":
            self.state = "unknown"


def commit_failure(error: BillingError, request: billing_pb2.CommitRequest) -> BillingError:
    """The error to raise for a failed Commit: CommitOutcomeUnknown unless the answer says
    what happened."""
    if not outcome_unknown(error):
        return error
    return CommitOutcomeUnknown(
        error,
        reservation_id=request.reservation_id,
        request_id=request.request_id,
        usage=usage_of(request),
    )


def release_failure(error: BillingError, request: billing_pb2.ReleaseRequest) -> BillingError:
    """The error to raise for a failed Release: ReleaseOutcomeUnknown unless the answer says
    what happened."""
    if not outcome_unknown(error):
        return error
    return ReleaseOutcomeUnknown(
        error, reservation_id=request.reservation_id, request_id=request.request_id
    )


def log_release_failure(hold: HoldBase, error: BillingError) -> None:
    # The hold is released at its expire time anyway, and nothing is charged for it.
    logger.warning(
        "could not release hold %s on leaving its block (%s); it expires at its TTL",
        hold.reservation_id,
        error,
    )
