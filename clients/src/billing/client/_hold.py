"""What the sync and asyncio holds share: the granted reservation and its request ids."""

from __future__ import annotations

import logging
from typing import Literal

from billing.client._errors import (
    BillingError,
    HoldAlreadyCommitted,
    HoldExpired,
    HoldReleased,
)
from billing.client._model import AccessDecision, OnExit, new_request_id
from billing.v1 import types_pb2

logger = logging.getLogger("billing.client")

HoldState = Literal["open", "committed", "released", "expired"]


class HoldBase:
    """A granted hold. Its commit and its release each get one request id, made here, so a
    second `commit()` after an unknown outcome (BillingUnavailable) is a retry, not a second
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

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def amount_micros(self) -> int:
        """The amount held, in micros (0 for an included model)."""
        return self.reservation.amount_micros

    def _note_failure(self, error: BillingError) -> None:
        """Remembers a final state the server reported, so leaving the block does not act on
        a hold that is no longer open."""
        if isinstance(error, HoldAlreadyCommitted):
            self.state = "committed"
        elif isinstance(error, HoldReleased):
            self.state = "released"
        elif isinstance(error, HoldExpired):
            self.state = "expired"


def log_release_failure(hold: HoldBase, error: BillingError) -> None:
    # The hold is released at its expire time anyway, and nothing is charged for it.
    logger.warning(
        "could not release hold %s on leaving its block (%s); it expires at its TTL",
        hold.reservation_id,
        error,
    )
