"""Periodic reconciliation: a card deleted or detached at Stripe without our hearing of it
(a lost webhook) is forgotten, so metered use stops relying on it.

The hot path never asks Stripe; this is where a card's existence is re-learned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from billing_service.domain.errors import Unavailable
from billing_service.payments.gateway import GatewayNotFound, GatewayUnavailable, PaymentGateway
from billing_service.storage.payments_store import PaymentsStore

_log = logging.getLogger(__name__)
_BATCH = 100


class CardReconciler:
    def __init__(self, store: PaymentsStore, gateway: PaymentGateway) -> None:
        self._store = store
        self._gateway = gateway

    async def run(self, interval_s: float, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stopping.wait()
            if stopping.is_set():
                return
            try:
                await self.reconcile_once()
            except (Unavailable, GatewayUnavailable) as error:
                _log.warning("card reconciliation failed, will retry: %s", error)
            except Exception:
                _log.exception("card reconciliation failed, will retry")

    async def reconcile_once(self) -> int:
        """Checks every card on file; returns how many were forgotten."""
        forgotten, after = 0, ""
        while cards := await self._store.cards_on_file(after, _BATCH):
            for tenant_id, customer_id, payment_method_id in cards:
                after = tenant_id
                try:
                    card = await self._gateway.get_card(payment_method_id)
                    gone = card.customer_id != customer_id
                except GatewayNotFound:
                    gone = True
                if gone and await self._store.forget_card(
                    tenant_id, payment_method_id, datetime.now(UTC)
                ):
                    _log.info("tenant %s: card %s is gone at Stripe", tenant_id, payment_method_id)
                    forgotten += 1
        return forgotten
