"""An HTTP proxy in front of localstripe that behaves like Stripe where localstripe does not.

localstripe ignores `Idempotency-Key` (the same key creates two objects), so exactly-once
tests could not tell a replayed charge from a second one. This proxy replays by key as
Stripe does, and injects the faults of a real network and a real Stripe on request:

    with StripeFaultProxy(localstripe.url) as proxy:
        client = stripe.StripeClient(API_KEY, base_addresses={"api": proxy.url})
        proxy.drop_response_after_forwarding("POST", "/v1/payment_intents")
        ...
        assert proxy.forwarded("/v1/payment_intents") == 1

Replay (as Stripe documents it): a request whose key was seen before with the same method,
path and body gets the first answer again (status and body, header `Idempotent-Replayed:
true`) without reaching upstream; the same key with another request gets 400
`idempotency_error`; a request whose key is still in flight gets 409. Only answers that came
from upstream are stored, like Stripe, which stores whatever an endpoint that started
executing answered (402 declines included) and nothing for requests it refused up front.

A fault applies to the next `times` requests whose method matches and whose path starts with
the prefix, in the order they arrive (replayed ones included: the network does not know).
The proxy runs its own event loop in a background thread, so a blocked test thread or event
loop never stalls it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from aiohttp import web

from tests.support.ports import free_port

_START_TIMEOUT_S = 10.0
# Hop-by-hop and framing headers the proxy recomputes rather than copies.
_SKIPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "content-encoding",
        "accept-encoding",
        "date",
        "server",
    }
)


class _FaultKind(enum.Enum):
    DROP_RESPONSE_AFTER_FORWARDING = "drop_response_after_forwarding"
    STATUS_500 = "status_500"
    STATUS_429 = "status_429"
    DELAY = "delay"
    HOLD = "hold"


@dataclass
class _Fault:
    kind: _FaultKind
    method: str
    path_prefix: str
    remaining: int
    delay_s: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and method == self.method and path.startswith(self.path_prefix)


@dataclass(frozen=True)
class _StoredAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass
class _KeyRecord:
    fingerprint: tuple[str, str, bytes]
    answer: _StoredAnswer | None = None  # None while the first request is in flight


@dataclass
class _Hold:
    held: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


def _stripe_error(status: int, error: dict[str, str]) -> _StoredAnswer:
    body = json.dumps({"error": error}).encode()
    return _StoredAnswer(status, (("Content-Type", "application/json"),), body)


_SERVER_ERROR = _stripe_error(
    500,
    {
        "type": "api_error",
        "message": "An unknown error occurred while processing your request.",
    },
)
_RATE_LIMITED = _stripe_error(
    429,
    {
        "type": "invalid_request_error",
        "code": "rate_limit",
        "message": "Request rate limit exceeded. Try again with an exponential backoff.",
    },
)


def _key_reused(key: str) -> _StoredAnswer:
    return _stripe_error(
        400,
        {
            "type": "idempotency_error",
            "message": (
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request."
            ),
        },
    )


def _key_in_flight(key: str) -> _StoredAnswer:
    return _stripe_error(
        409,
        {
            "type": "invalid_request_error",
            "code": "idempotency_key_in_use",
            "message": (
                f"There is currently another in-progress request using this Idempotent Key "
                f"('{key}'): it probably means you submitted twice and the other request is "
                "still going through. Please try again later."
            ),
        },
    )


class StripeFaultProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._keys: dict[str, _KeyRecord] = {}
        self._forwarded: Counter[tuple[str, str]] = Counter()
        self._replayed: Counter[tuple[str, str]] = Counter()
        self._hold = _Hold()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="stripe-fault-proxy", daemon=True
        )
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(_START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    # Faults

    def drop_response_after_forwarding(self, method: str, path_prefix: str, times: int = 1) -> None:
        """Forward, store the answer for replay, then close the connection without answering."""
        self._add_fault(_FaultKind.DROP_RESPONSE_AFTER_FORWARDING, method, path_prefix, times)

    def status_500(self, method: str, path_prefix: str, times: int = 1) -> None:
        """Answer Stripe's 500 `api_error` without forwarding."""
        self._add_fault(_FaultKind.STATUS_500, method, path_prefix, times)

    def status_429(self, method: str, path_prefix: str, times: int = 1) -> None:
        """Answer Stripe's 429 `rate_limit` without forwarding."""
        self._add_fault(_FaultKind.STATUS_429, method, path_prefix, times)

    def delay(self, seconds: float, method: str, path_prefix: str, times: int = 1) -> None:
        """Forward at once, answer `seconds` later (for client timeouts and deadlines)."""
        self._add_fault(_FaultKind.DELAY, method, path_prefix, times, delay_s=seconds)

    def hold(self, method: str, path_prefix: str, times: int = 1) -> None:
        """Forward and store the answer, then keep it until `release()`.

        `wait_until_held` tells the test that upstream has processed the request, so it can
        kill the caller at exactly that point.
        """
        with self._lock:
            self._hold = _Hold()
        self._add_fault(_FaultKind.HOLD, method, path_prefix, times)

    def wait_until_held(self, timeout: float) -> None:
        """Blocks until a held request has been answered upstream; TimeoutError if not."""
        if not self._hold.held.wait(timeout):
            raise TimeoutError(f"no request was held within {timeout} s")

    async def async_wait_until_held(self, timeout_s: float) -> None:
        """`wait_until_held` for a test whose own event loop must keep running meanwhile."""
        await asyncio.to_thread(self.wait_until_held, timeout_s)

    def release(self) -> None:
        """Lets every held request (and any later one of the current hold) answer."""
        self._hold.released.set()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        self.release()

    def _add_fault(
        self, kind: _FaultKind, method: str, path_prefix: str, times: int, delay_s: float = 0.0
    ) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(_Fault(kind, method.upper(), path_prefix, times, delay_s))

    # Counters

    def forwarded(self, path_prefix: str, method: str | None = None) -> int:
        """How many requests under `path_prefix` reached upstream."""
        return self._count(self._forwarded, path_prefix, method)

    def replayed(self, path_prefix: str, method: str | None = None) -> int:
        """How many requests under `path_prefix` were answered from the idempotency store."""
        return self._count(self._replayed, path_prefix, method)

    def _count(
        self, counter: Counter[tuple[str, str]], path_prefix: str, method: str | None
    ) -> int:
        with self._lock:
            return sum(
                n
                for (m, path), n in counter.items()
                if path.startswith(path_prefix) and (method is None or m == method.upper())
            )

    # The server

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._take_fault(request.method, request.path)
        if fault is not None and fault.kind is _FaultKind.STATUS_500:
            return self._respond(_SERVER_ERROR)
        if fault is not None and fault.kind is _FaultKind.STATUS_429:
            return self._respond(_RATE_LIMITED)
        answer = await self._answer(request, body)
        if answer is None:
            return self._respond(
                _stripe_error(502, {"type": "api_error", "message": "upstream unreachable"})
            )
        if fault is not None:
            await self._apply_after_forwarding(fault, request)
        return self._respond(answer)

    async def _answer(self, request: web.Request, body: bytes) -> _StoredAnswer | None:
        key = request.headers.get("Idempotency-Key")
        if key is None or request.method != "POST":
            return await self._forward(request, body)
        fingerprint = (request.method, request.path_qs, body)
        with self._lock:
            record = self._keys.get(key)
            if record is None:
                self._keys[key] = _KeyRecord(fingerprint)
        if record is not None:
            return self._replay(key, record, fingerprint, request)
        answer = await self._forward(request, body)
        with self._lock:
            if answer is None:
                del self._keys[key]
            else:
                self._keys[key].answer = answer
        return answer

    def _replay(
        self,
        key: str,
        record: _KeyRecord,
        fingerprint: tuple[str, str, bytes],
        request: web.Request,
    ) -> _StoredAnswer:
        if record.fingerprint != fingerprint:
            return _key_reused(key)
        if record.answer is None:
            return _key_in_flight(key)
        with self._lock:
            self._replayed[(request.method, request.path)] += 1
        stored = record.answer
        headers = (*stored.headers, ("Idempotent-Replayed", "true"), ("Idempotency-Key", key))
        return _StoredAnswer(stored.status, headers, stored.body)

    async def _forward(self, request: web.Request, body: bytes) -> _StoredAnswer | None:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        with self._lock:
            self._forwarded[(request.method, request.path)] += 1
        try:
            async with self._session.request(
                request.method, self.upstream_url + request.path_qs, headers=headers, data=body
            ) as upstream:
                answer_body = await upstream.read()
                answer_headers = tuple(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _SKIPPED_HEADERS
                )
                return _StoredAnswer(upstream.status, answer_headers, answer_body)
        except aiohttp.ClientError:
            return None

    async def _apply_after_forwarding(self, fault: _Fault, request: web.Request) -> None:
        if fault.kind is _FaultKind.DELAY:
            await asyncio.sleep(fault.delay_s)
        elif fault.kind is _FaultKind.HOLD:
            hold = self._hold
            hold.held.set()
            await asyncio.to_thread(hold.released.wait)
        elif fault.kind is _FaultKind.DROP_RESPONSE_AFTER_FORWARDING:
            # Closing the socket makes aiohttp give up on this request: the caller sees the
            # connection end with no answer, as if the network lost Stripe's reply.
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError

    @staticmethod
    def _respond(answer: _StoredAnswer) -> web.Response:
        return web.Response(status=answer.status, headers=answer.headers, body=answer.body)

    # Lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.release()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(_START_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_START_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> StripeFaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
