"""The service audits its own books in the background (storage.audit, the tests' audit too).

Every `interval_s` it checks every tenant's balance, held amount and budget periods against the
ledger entries and open holds, sets the billing_books_audit_* metrics and logs each tenant that
disagrees. Each replica runs it; it only reads, in one snapshot, and takes no lock the hot path
waits on. Its cost grows with the ledger (it sums every entry), hence an interval in minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from billing_service.domain.errors import Unavailable
from billing_service.metrics import Metrics
from billing_service.storage.audit import BooksAudit, FindingKind, audit_books
from billing_service.storage.database import storage_faults_unavailable

_log = logging.getLogger(__name__)


class BooksAuditor:
    def __init__(self, engine: AsyncEngine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics
        self.audited = asyncio.Event()  # set once an audit has finished

    async def audit_once(self) -> BooksAudit:
        """Audits the books, exports and logs what it found. Raises Unavailable on a fault."""
        started = time.monotonic()
        audit = await storage_faults_unavailable(audit_books)(self._engine)
        metrics = self._metrics
        metrics.books_audit_seconds.set(time.monotonic() - started)
        metrics.books_tenants_disagreeing.set(len(audit.tenants_disagreeing))
        metrics.books_tenants_over_credit_limit.set(len(audit.tenants_over_credit_limit))
        metrics.books_audit_last_success.set(time.time())
        self.audited.set()
        for finding in audit.findings:
            fields = {"tenant_id": finding.tenant_id, "finding": str(finding.kind)}
            if finding.kind is FindingKind.OVER_CREDIT_LIMIT:
                _log.warning("books audit: %s", finding.message, extra=fields)
            else:
                _log.error("books audit: the books disagree: %s", finding.message, extra=fields)
        if audit.findings:
            _log.info(
                "books audit: %d of %d tenants disagree, %d over their credit limit",
                len(audit.tenants_disagreeing),
                audit.tenants_audited,
                len(audit.tenants_over_credit_limit),
            )
        return audit

    def start(self, interval_s: float, stopping: asyncio.Event) -> asyncio.Task[None]:
        """Audits every `interval_s` seconds (the first at once) until `stopping` is set."""
        self._metrics.books_audit_interval.set(interval_s)
        return asyncio.create_task(self._run(interval_s, stopping), name="books-audit")

    async def _run(self, interval_s: float, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.audit_once()
            except Unavailable as error:
                self._metrics.books_audit_failures.inc()
                _log.warning("books audit failed, will retry: %s", error.__cause__)
            except Exception:
                self._metrics.books_audit_failures.inc()
                _log.exception("books audit failed, will retry")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stopping.wait()
