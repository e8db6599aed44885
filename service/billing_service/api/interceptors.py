"""The guard around every call: log context, authentication, the deadline, metrics, access log.

One grpc.aio.ServerInterceptor wraps each unary handler; in order, per call:

1. binds the call's method, request id and tenant id to the log context;
2. refuses an unauthenticated caller (UNAUTHENTICATED) or one whose role may not call the service
   (PERMISSION_DENIED), both with an AIP-193 ErrorInfo; health and reflection are open;
3. refuses a call whose deadline has already passed (DEADLINE_EXCEEDED) before any work;
4. runs the servicer, then counts the call and its business outcome and logs one line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2

from billing_service.api.errors import error_info_status
from billing_service.domain.errors import ErrorReason
from billing_service.logs import CallContext, bind_tenant, call_context
from billing_service.metrics import Metrics
from billing_service.security import OPEN_SERVICES, Authenticator, AuthFailure

__all__ = ["CallGuard"]

_log = logging.getLogger(__name__)
_access_log = logging.getLogger("billing_service.access")

Context = grpc.aio.ServicerContext[Any, Any]
UnaryHandler = Callable[[Any, Context], Awaitable[Any]]

_STATUS_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
}


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # generic only in the type stubs
    _ServerInterceptor = grpc.aio.ServerInterceptor


class CallGuard(_ServerInterceptor):
    def __init__(self, authenticator: Authenticator, metrics: Metrics, *, access_log: bool) -> None:
        self._authenticator = authenticator
        self._metrics = metrics
        self._access_log = access_log
        self.in_flight = 0
        # The guarded handler of each method, built on its first call: building it costs as much
        # as the rest of the guard, and grpc asks for it on every call.
        self._guarded: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cached = self._guarded.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self._guard(handler, handler_call_details.method)
        self._guarded[handler_call_details.method] = (handler, guarded)
        return guarded

    def _guard(
        self, handler: grpc.RpcMethodHandler[Any, Any], full_method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, method = full_method.lstrip("/").partition("/")
        protected = service not in OPEN_SERVICES and self._authenticator.enabled
        if handler.unary_stream is not None and protected:
            return self._guarded_stream(handler, service)
        if handler.unary_unary is None:
            # Other streaming shapes would pass unchecked, so a protected one fails closed.
            if protected:
                return grpc.unary_unary_rpc_method_handler(_unimplemented)
            return handler
        inner: UnaryHandler = handler.unary_unary  # type: ignore[assignment]

        async def guarded(request: Any, context: Context) -> Any:
            return await self._handle(inner, service, method, protected, request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded_stream(
        self, handler: grpc.RpcMethodHandler[Any, Any], service: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A server-streaming method, authorized like a unary one before its first message.

        Streams are not counted in the RPC metrics nor in the access log.
        """
        inner: Callable[[Any, Context], AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]

        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            await self._authorize(service, context)
            async for response in inner(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _handle(
        self,
        inner: UnaryHandler,
        service: str,
        method: str,
        protected: bool,
        request: Any,
        context: Context,
    ) -> Any:
        started = time.perf_counter()
        call_context.set(
            CallContext(
                method=f"{service}/{method}",
                request_id=str(getattr(request, "request_id", "")),
                tenant_id=str(getattr(request, "tenant_id", "")),
            )
        )
        self.in_flight += 1
        self._metrics.rpcs_in_flight.inc()
        _log.debug("started")
        finished = False

        def finish(code: grpc.StatusCode) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            elapsed = time.perf_counter() - started
            self.in_flight -= 1
            self._metrics.rpcs_in_flight.dec()
            self._metrics.rpcs_handled.labels(service, method, code.name).inc()
            self._metrics.rpc_seconds.labels(service, method, code.name).observe(elapsed)
            if self._access_log and service not in OPEN_SERVICES:
                _access_log.info(
                    "%s %s",
                    method,
                    code.name,
                    extra={"grpc_code": code.name, "duration_ms": round(elapsed * 1000, 3)},
                )

        # An abort sends the status before the handler returns: the call is counted first, so
        # whoever sees the answer also sees it in the metrics.
        recording = cast(Context, _RecordingContext(context, finish))
        try:
            if protected:
                await self._authorize(service, recording)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                _log.info("refused: the deadline passed before the call was handled")
                await _abort(
                    recording,
                    code_pb2.DEADLINE_EXCEEDED,
                    ErrorReason.DEADLINE_PASSED,
                    "the call's deadline passed before it was handled; nothing was done",
                )
            response = await inner(request, recording)
            if isinstance(response, Message):
                _bind_tenant_of(response)
                self._metrics.observe_answer(method, request, response)
            finish(grpc.StatusCode.OK)
            return response
        except BaseException as error:
            finish(_final_code(context, error))
            raise

    async def _authorize(self, service: str, context: Context) -> None:
        try:
            caller = self._authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
            current = call_context.get()
            if current is not None:
                call_context.set(
                    CallContext(current.method, current.request_id, current.tenant_id, caller.label)
                )
            self._authenticator.authorize(caller, service)
        except AuthFailure as failure:
            _log.info("refused: %s", failure.message)
            await _abort(
                context,
                _STATUS_CODES[failure.code],
                failure.reason,
                failure.message,
                {"service": service},
            )


class _RecordingContext:
    """The servicer context, with `abort` reporting the code before the status is sent."""

    def __init__(self, context: Context, on_abort: Callable[[grpc.StatusCode], None]) -> None:
        self._context = context
        self._on_abort = on_abort

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        self._on_abort(code)
        await self._context.abort(code, details, tuple(trailing_metadata))
        raise AssertionError("abort() raises")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _abort(
    context: Context,
    code: int,
    reason: ErrorReason,
    message: str,
    metadata: dict[str, str] | None = None,
) -> None:
    status = error_info_status(code, reason, message, metadata)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _unimplemented(request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming calls are not guarded yet")


def _final_code(context: Context, error: BaseException) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code
    if isinstance(error, asyncio.CancelledError) or context.cancelled():
        # gRPC cancels the handler when the client goes away or its deadline passes.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _bind_tenant_of(response: Message) -> None:
    """Commit, Release and Refund name only a reservation; a usage record in the answer names
    its tenant."""
    record = getattr(response, "usage_record", None)
    if isinstance(record, Message):
        bind_tenant(str(getattr(record, "tenant_id", "")))
