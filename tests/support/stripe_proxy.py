"""An HTTP proxy in front of localstripe that behaves like Stripe where localstripe does not.

localstripe ignores `Idempotency-Key` (the same key creates two objects), so exactly-once
tests could not tell a replayed charge from a second one; and it cannot filter a list of
PaymentIntents by customer or creation time. This proxy replays by key and filters lists as
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
the prefix (and, given `customer`, whose `customer` parameter is that customer), in the order
they arrive (replayed ones included: the network does not know). `forget_keys` drops stored
keys, as Stripe does once a key is older than 24 hours.
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
from typing import Any
from urllib.parse import parse_qs

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
    STATUS_500_AFTER_FORWARDING = "status_500_after_forwarding"
    STATUS_429 = "status_429"
    DELAY = "delay"
    HANG = "hang"
    HOLD = "hold"


@dataclass
class _Fault:
    kind: _FaultKind
    method: str
    path_prefix: str
    remaining: int
    delay_s: float = 0.0
    customer: str | None = None

    def matches(self, method: str, path: str, customer: str | None) -> bool:
        return (
            self.remaining > 0
            and method == self.method
            and path.startswith(self.path_prefix)
            and (self.customer is None or customer == self.customer)
        )


@dataclass(frozen=True)
class _StoredAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass
class _KeyRecord:
    fingerprint: tuple[str, str, bytes]
    customer: str | None
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


_PAYMENT_INTENTS = "/v1/payment_intents"
_LIST_FILTERS = ("customer", "created[gt]", "created[gte]", "created[lt]", "created[lte]")


def _customer_of(request: web.Request, body: bytes) -> str | None:
    """The request's `customer` parameter (form body or query), if any."""
    if request.method == "POST":
        try:
            values = parse_qs(body.decode(), keep_blank_values=True).get("customer")
        except UnicodeDecodeError:
            values = None
        return values[0] if values else None
    return request.query.get("customer")


def _filters(request: web.Request) -> bool:
    return any(name in request.query for name in _LIST_FILTERS)


def _listed(intent: dict[str, Any], request: web.Request) -> bool:
    query = request.query
    if "customer" in query and intent.get("customer") != query["customer"]:
        return False
    created = int(intent.get("created", 0))
    bounds = {
        "created[gt]": lambda bound: created > bound,
        "created[gte]": lambda bound: created >= bound,
        "created[lt]": lambda bound: created < bound,
        "created[lte]": lambda bound: created <= bound,
    }
    return all(check(int(query[name])) for name, check in bounds.items() if name in query)


class StripeFaultProxy:
    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._forwarded_changed = threading.Condition(self._lock)
        self._faults: list[_Fault] = []
        self._keys: dict[str, _KeyRecord] = {}
        self._forwarded: Counter[tuple[str, str]] = Counter()
        self._forwarded_for: Counter[tuple[str, str, str | None]] = Counter()
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

    def drop_response_after_forwarding(
        self, method: str, path_prefix: str, times: int = 1, *, customer: str | None = None
    ) -> None:
        """Forward, store the answer for replay, then close the connection without answering."""
        self._add_fault(
            _FaultKind.DROP_RESPONSE_AFTER_FORWARDING, method, path_prefix, times, customer=customer
        )

    def status_500(
        self, method: str, path_prefix: str, times: int = 1, *, customer: str | None = None
    ) -> None:
        """Answer Stripe's 500 `api_error` without forwarding."""
        self._add_fault(_FaultKind.STATUS_500, method, path_prefix, times, customer=customer)

    def status_500_after_forwarding(
        self, method: str, path_prefix: str, times: int = 1, *, customer: str | None = None
    ) -> None:
        """Forward and store the answer for replay, then answer Stripe's 500 `api_error`: the
        request took effect, and the caller cannot know it."""
        self._add_fault(
            _FaultKind.STATUS_500_AFTER_FORWARDING, method, path_prefix, times, customer=customer
        )

    def status_429(
        self, method: str, path_prefix: str, times: int = 1, *, customer: str | None = None
    ) -> None:
        """Answer Stripe's 429 `rate_limit` without forwarding."""
        self._add_fault(_FaultKind.STATUS_429, method, path_prefix, times, customer=customer)

    def delay(
        self,
        seconds: float,
        method: str,
        path_prefix: str,
        times: int = 1,
        *,
        customer: str | None = None,
    ) -> None:
        """Forward at once, answer `seconds` later (for client timeouts and deadlines)."""
        self._add_fault(
            _FaultKind.DELAY, method, path_prefix, times, delay_s=seconds, customer=customer
        )

    def hang(
        self,
        seconds: float,
        method: str,
        path_prefix: str,
        times: int = 1,
        *,
        customer: str | None = None,
    ) -> None:
        """Forward and store the answer for replay, then say nothing for `seconds` (longer
        than the caller's timeout) and close the connection: the answer never arrives."""
        self._add_fault(
            _FaultKind.HANG, method, path_prefix, times, delay_s=seconds, customer=customer
        )

    def forget_keys(self, *, customer: str | None = None) -> None:
        """Drops the stored idempotency keys (only those of requests naming `customer`, when
        given), as Stripe does once a key is older than 24 hours."""
        with self._lock:
            for key in [
                key
                for key, record in self._keys.items()
                if record.answer is not None and (customer is None or record.customer == customer)
            ]:
                del self._keys[key]

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

    def clear_faults(self, *, customer: str | None = None) -> None:
        """Drops every fault (only those of `customer`, when given)."""
        with self._lock:
            self._faults = [
                fault
                for fault in self._faults
                if customer is not None and fault.customer != customer
            ]
        if customer is None:
            self.release()

    def _add_fault(
        self,
        kind: _FaultKind,
        method: str,
        path_prefix: str,
        times: int,
        delay_s: float = 0.0,
        customer: str | None = None,
    ) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(_Fault(kind, method.upper(), path_prefix, times, delay_s, customer))

    # Counters

    def forwarded(self, path_prefix: str, method: str | None = None) -> int:
        """How many requests under `path_prefix` reached upstream."""
        return self._count(self._forwarded, path_prefix, method)

    def forwarded_for(self, customer: str, path: str, method: str) -> int:
        """How many requests to exactly `path` naming `customer` reached upstream."""
        with self._lock:
            return self._forwarded_for[(method.upper(), path, customer)]

    def wait_until_forwarded(
        self,
        path_prefix: str,
        method: str,
        count: int,
        timeout_s: float,
        *,
        customer: str | None = None,
    ) -> None:
        """Blocks until `count` requests under `path_prefix` (naming `customer`, when given)
        have reached upstream."""

        def reached() -> int:
            if customer is None:
                return self._count_locked(self._forwarded, path_prefix, method)
            return sum(
                n
                for (m, path, who), n in self._forwarded_for.items()
                if who == customer and m == method.upper() and path.startswith(path_prefix)
            )

        with self._forwarded_changed:
            if not self._forwarded_changed.wait_for(lambda: reached() >= count, timeout_s):
                raise TimeoutError(f"fewer than {count} {method} {path_prefix} in {timeout_s} s")

    async def async_wait_until_forwarded(
        self,
        path_prefix: str,
        method: str,
        count: int,
        timeout_s: float,
        *,
        customer: str | None = None,
    ) -> None:
        await asyncio.to_thread(
            lambda: self.wait_until_forwarded(
                path_prefix, method, count, timeout_s, customer=customer
            )
        )

    def replayed(self, path_prefix: str, method: str | None = None) -> int:
        """How many requests under `path_prefix` were answered from the idempotency store."""
        return self._count(self._replayed, path_prefix, method)

    def _count(
        self, counter: Counter[tuple[str, str]], path_prefix: str, method: str | None
    ) -> int:
        with self._lock:
            return self._count_locked(counter, path_prefix, method)

    @staticmethod
    def _count_locked(
        counter: Counter[tuple[str, str]], path_prefix: str, method: str | None
    ) -> int:
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

    def _take_fault(self, method: str, path: str, customer: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, customer):
                    fault.remaining -= 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        customer = _customer_of(request, body)
        fault = self._take_fault(request.method, request.path, customer)
        if fault is not None and fault.kind is _FaultKind.STATUS_500:
            return self._respond(_SERVER_ERROR)
        if fault is not None and fault.kind is _FaultKind.STATUS_429:
            return self._respond(_RATE_LIMITED)
        if request.method == "GET" and request.path == _PAYMENT_INTENTS and _filters(request):
            answer = await self._filtered_list(request)
        else:
            answer = await self._answer(request, body, customer)
        if answer is None:
            return self._respond(
                _stripe_error(502, {"type": "api_error", "message": "upstream unreachable"})
            )
        if fault is not None:
            await self._apply_after_forwarding(fault, request)
            if fault.kind is _FaultKind.STATUS_500_AFTER_FORWARDING:
                return self._respond(_SERVER_ERROR)
        return self._respond(answer)

    async def _answer(
        self, request: web.Request, body: bytes, customer: str | None
    ) -> _StoredAnswer | None:
        key = request.headers.get("Idempotency-Key")
        if key is None or request.method != "POST":
            return await self._forward(request, body)
        fingerprint = (request.method, request.path_qs, body)
        with self._lock:
            record = self._keys.get(key)
            if record is None:
                self._keys[key] = _KeyRecord(fingerprint, customer)
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
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        customer = _customer_of(request, body)
        with self._lock:
            self._forwarded[(request.method, request.path)] += 1
            self._forwarded_for[(request.method, request.path, customer)] += 1
            self._forwarded_changed.notify_all()
        return await self._upstream(request.method, request.path_qs, headers, body)

    async def _upstream(
        self, method: str, path_qs: str, headers: dict[str, str], body: bytes
    ) -> _StoredAnswer | None:
        assert self._session is not None
        try:
            async with self._session.request(
                method, self.upstream_url + path_qs, headers=headers, data=body
            ) as upstream:
                answer_body = await upstream.read()
                answer_headers = tuple(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _SKIPPED_HEADERS
                )
                return _StoredAnswer(upstream.status, answer_headers, answer_body)
        except aiohttp.ClientError:
            return None

    async def _filtered_list(self, request: web.Request) -> _StoredAnswer | None:
        """GET /v1/payment_intents with `customer` and `created[...]`, which localstripe
        refuses: every page is read from upstream and filtered here, newest first."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        with self._lock:
            self._forwarded[(request.method, request.path)] += 1
            self._forwarded_changed.notify_all()
        intents: list[dict[str, Any]] = []
        after = ""
        while True:
            page_query = f"?limit=100{f'&starting_after={after}' if after else ''}"
            upstream = await self._upstream("GET", _PAYMENT_INTENTS + page_query, headers, b"")
            if upstream is None or upstream.status != 200:
                return upstream
            page = json.loads(upstream.body)
            intents += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            after = page["data"][-1]["id"]
        kept = [intent for intent in intents if _listed(intent, request)]
        kept.sort(key=lambda intent: intent["created"], reverse=True)
        if starting_after := request.query.get("starting_after"):
            ids = [intent["id"] for intent in kept]
            kept = kept[ids.index(starting_after) + 1 :] if starting_after in ids else []
        limit = int(request.query.get("limit", "10"))
        body = {
            "object": "list",
            "url": _PAYMENT_INTENTS,
            "has_more": len(kept) > limit,
            "data": kept[:limit],
        }
        return _StoredAnswer(
            200, (("Content-Type", "application/json"),), json.dumps(body).encode()
        )

    async def _apply_after_forwarding(self, fault: _Fault, request: web.Request) -> None:
        if fault.kind is _FaultKind.DELAY:
            await asyncio.sleep(fault.delay_s)
        elif fault.kind is _FaultKind.HANG:
            await asyncio.sleep(fault.delay_s)
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
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
