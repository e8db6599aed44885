"""When a call is tried again: transient codes only, bounded attempts, full-jitter backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

__all__ = ["RETRIED_CODES", "OnRetry", "RetryEvent", "RetryPolicy"]

logger = logging.getLogger("billing.client")

# Every BillingService call may be retried: the mutating ones are idempotent by request id and
# CheckAccess is a read. Only these codes mean "try again"; any other answer is final.
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RetryEvent:
    """A failed attempt that will be tried again (for logs and metrics)."""

    method: str
    request_id: str
    attempt: int
    code: grpc.StatusCode
    next_in_s: float


OnRetry = Callable[[RetryEvent], None]


def _transient(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in RETRIED_CODES


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` attempts in all; before attempt n+1 a random wait in
    [0, min(max_backoff_s, first_backoff_s * 2**(n-1))].

    Each attempt has its own deadline of `timeout_s`. The worst case of one logical call is
    max_attempts x timeout_s plus the waits (at most 0.1 + 0.2 + 0.4 = 0.7 s with the defaults:
    8.7 s with 4 attempts of 2 s), or `total_timeout_s` when set: no attempt starts or runs past
    it.
    """

    timeout_s: float = 2.0
    max_attempts: int = 4
    total_timeout_s: float | None = None
    first_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    on_retry: OnRetry | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.timeout_s <= 0 or (self.total_timeout_s is not None and self.total_timeout_s <= 0):
            raise ValueError("timeouts must be positive")

    def deadline(self) -> float | None:
        """When a logical call that starts now must end (time.monotonic), if bounded."""
        if self.total_timeout_s is None:
            return None
        return time.monotonic() + self.total_timeout_s

    def attempt_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.timeout_s
        return max(min(self.timeout_s, deadline - time.monotonic()), 0.001)

    def _stop(self) -> stop_base:
        if self.total_timeout_s is None:
            return stop_after_attempt(self.max_attempts)
        return stop_after_attempt(self.max_attempts) | stop_before_delay(self.total_timeout_s)

    def _before_sleep(self, method: str, request_id: str) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            assert isinstance(error, grpc.RpcError)
            event = RetryEvent(
                method=method,
                request_id=request_id,
                attempt=state.attempt_number,
                code=error.code(),
                next_in_s=state.upcoming_sleep,
            )
            logger.warning(
                "billing call %s failed with %s (attempt %d), retrying in %.3f s",
                method,
                event.code.name,
                event.attempt,
                event.next_in_s,
            )
            if self.on_retry is not None:
                self.on_retry(event)

        return before_sleep

    def _wait(self) -> wait_random_exponential:
        # Full jitter: many clients that lost one server do not come back in step.
        return wait_random_exponential(multiplier=self.first_backoff_s, max=self.max_backoff_s)

    def sync(self, method: str, request_id: str) -> Retrying:
        return Retrying(
            stop=self._stop(),
            wait=self._wait(),
            retry=retry_if_exception(_transient),
            reraise=True,
            before_sleep=self._before_sleep(method, request_id),
        )

    def aio(self, method: str, request_id: str) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self._stop(),
            wait=self._wait(),
            retry=retry_if_exception(_transient),
            reraise=True,
            before_sleep=self._before_sleep(method, request_id),
        )
