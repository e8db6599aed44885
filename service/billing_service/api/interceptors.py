"""The guard around every call: log context, authentication, the deadline, metrics, access log.

One grpc.aio.ServerInterceptor wraps each unary handler; in order, per call:

1. binds the call's method to the log context;
2. refuses an unauthenticated caller (UNAUTHENTICATED) or one whose role may not call the service
   (PERMISSION_DENIED), both with an AIP-193 ErrorInfo; health and reflection are open;
3. binds the request's request id and tenant id to the log context, each only if it is a valid
   id (an invalid one is answered INVALID_ARGUMENT by the servicer): nothing a caller sends
   reaches the log before it is authenticated, and nothing unbounded after;
4. refuses a call whose deadline has already passed (DEADLINE_EXCEEDED) before any work;
5. refuses a request that is not valid protobuf (INVALID_ARGUMENT naming the request message);
6. runs the servicer, then counts the call and its business outcome and logs one line: the
   status code, with the ErrorInfo reason (and field) of an error or the DenialReason of a
   decision that denied. An exception the servicer did not map is a defect: it is logged with
   its traceback and answered INTERNAL (reason INTERNAL_ERROR) without its text, which may hold
   SQL or file paths.

grpc deserializes a request before any handler runs and answers a deserializer's exception
with UNKNOWN and the exception's class; the guard's deserializer turns undecodable bytes into an
`UndecodableRequest` instead, which step 5 refuses once the caller is known to be allowed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from billing.v1 import types_pb2
from billing_service.api.errors import error_info_status, rich_status
from billing_service.domain.commands import is_valid_id
from billing_service.domain.errors import ErrorReason, InvalidArgument
from billing_service.logs import CallContext, bind_request, bind_tenant, call_context, capped
from billing_service.metrics import Metrics
from billing_service.security import OPEN_SERVICES, Authenticator, AuthFailure

__all__ = ["CallGuard", "UndecodableRequest"]

_log = logging.getLogger(__name__)
_access_log = logging.getLogger("billing_service.access")

Context = grpc.aio.ServicerContext[Any, Any]
UnaryHandler = Callable[[Any, Context], Awaitable[Any]]

_STATUS_CODES = {
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
}


class UndecodableRequest:
    """What request bytes that are not a valid message of the method's request type (truncated,
    a string field that is not UTF-8, ...) deserialize to."""

    __slots__ = ("message_name",)

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name

    def refusal(self) -> grpc.Status:
        return rich_status(
            InvalidArgument(
                self.message_name,
                "is not a valid protobuf message of this type (truncated, or a string field "
                "that is not UTF-8); nothing was done",
            )
        )


Deserializer = Callable[[bytes], Any]


def _tolerant(deserializer: Deserializer | None, message_name: str) -> Deserializer | None:
    if deserializer is None:
        return None
    read = deserializer

    def deserialize(raw: bytes) -> Any:
        try:
            return read(raw)
        except Exception:
            return UndecodableRequest(message_name)

    return deserialize


def _request_name(full_method: str) -> str:
    """The request message's full name ("billing.v1.CommitRequest"); "request" if unknown."""
    name = full_method.strip("/").replace("/", ".")
    try:
        method = descriptor_pool.Default().FindMethodByName(name)
    except KeyError:
        return "request"
    return str(method.input_type.full_name)


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
        request_deserializer = _tolerant(handler.request_deserializer, _request_name(full_method))
        if handler.unary_stream is not None:
            return self._guarded_stream(handler, service, protected, request_deserializer)
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
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded_stream(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        service: str,
        protected: bool,
        request_deserializer: Deserializer | None,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A server-streaming method, authorized like a unary one before its first message.

        Streams are not counted in the RPC metrics nor in the access log.
        """
        inner: Callable[[Any, Context], Any] = handler.unary_stream  # type: ignore[assignment]

        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            if protected:
                await self._authorize(service, context)
            if isinstance(request, UndecodableRequest):
                await _refuse(context, request)
            try:
                responses = inner(request, context)
                if inspect.isawaitable(responses):
                    # A handler that writes its messages with context.write (health's Watch).
                    await responses
                    return
                async for response in responses:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                _log.error("%s failed unexpectedly: %s", service, _defect(error))
                await _internal_error(context)

        return grpc.unary_stream_rpc_method_handler(
            guarded,
            request_deserializer=request_deserializer,
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
        call_context.set(CallContext(method=f"{service}/{method}"))
        self.in_flight += 1
        self._metrics.rpcs_in_flight.inc()
        finished = False

        def finish(code: grpc.StatusCode, outcome: _Outcome | None = None) -> None:
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
                outcome = outcome or _Outcome()
                _access_log.info(
                    "%s %s%s",
                    method,
                    code.name,
                    outcome.text(),
                    extra={
                        "grpc_code": code.name,
                        "duration_ms": round(elapsed * 1000, 3),
                        **outcome.fields(),
                    },
                )

        # An abort sends the status before the handler returns: the call is counted first, so
        # whoever sees the answer also sees it in the metrics.
        recording = cast(Context, _RecordingContext(context, finish))
        try:
            if protected:
                await self._authorize(service, recording)
            _bind_ids_of(request)
            _log.debug("started")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                _log.info("refused: the deadline passed before the call was handled")
                await _abort(
                    recording,
                    code_pb2.DEADLINE_EXCEEDED,
                    ErrorReason.DEADLINE_PASSED,
                    "the call's deadline passed before it was handled; nothing was done",
                )
            if isinstance(request, UndecodableRequest):
                await _refuse(recording, request)
            try:
                response = await inner(request, recording)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                _log.error("failed unexpectedly: %s", _defect(error))
                await _internal_error(recording)
            outcome = None
            if isinstance(response, Message):
                _bind_tenant_of(response)
                self._metrics.observe_answer(method, request, response)
                outcome = _Outcome(denial_reason=_denial_reason(response))
            finish(grpc.StatusCode.OK, outcome)
            return response
        except BaseException as error:
            finish(_final_code(context, error))
            raise

    async def _authorize(self, service: str, context: Context) -> None:
        try:
            caller = self._authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
            bind_request(caller=caller.label)
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


class _Outcome:
    """What an access line says beyond the status code."""

    __slots__ = ("denial_reason", "error_reason", "field")

    def __init__(self, error_reason: str = "", field: str = "", denial_reason: str = "") -> None:
        self.error_reason = error_reason
        self.field = field
        self.denial_reason = denial_reason

    def text(self) -> str:
        if self.denial_reason:
            return f" denied {self.denial_reason}"
        text = f" {self.error_reason}" if self.error_reason else ""
        return f"{text} field={self.field}" if self.field else text

    def fields(self) -> dict[str, str]:
        names = ("error_reason", "field", "denial_reason")
        return {name: value for name in names if (value := getattr(self, name))}


def _error_outcome(trailing_metadata: Sequence[tuple[str, str | bytes]]) -> _Outcome:
    """The ErrorInfo reason and field of an abort's rich status (grpc-status-details-bin)."""
    for key, value in trailing_metadata:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return _Outcome()
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return _Outcome(capped(info.reason), capped(info.metadata.get("field", "")))
    return _Outcome()


class _RecordingContext:
    """The servicer context, with `abort` reporting the code before the status is sent."""

    def __init__(
        self, context: Context, on_abort: Callable[[grpc.StatusCode, _Outcome], None]
    ) -> None:
        self._context = context
        self._on_abort = on_abort

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        self._on_abort(code, _error_outcome(trailing_metadata))
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


# An exception's text may quote a request (SQL parameters): the log keeps this much of it.
_DEFECT_TEXT_MAX = 500


def _defect(error: BaseException) -> str:
    """The exception's type, its text cut to a bound, and where it was raised."""
    text = str(error)
    if len(text) > _DEFECT_TEXT_MAX:
        text = text[:_DEFECT_TEXT_MAX] + "..."
    where = "".join(traceback.format_tb(error.__traceback__))
    return f"{type(error).__name__}: {text}\n{where}"


async def _internal_error(context: Context) -> None:
    await _abort(
        context,
        code_pb2.INTERNAL,
        ErrorReason.INTERNAL_ERROR,
        "internal error: the call failed in a way this service did not foresee, and it was "
        "logged; retrying with the same request_id is safe",
    )


async def _refuse(context: Context, request: UndecodableRequest) -> None:
    status = request.refusal()
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


def _bind_ids_of(request: Any) -> None:
    """The request's ids join the log context, each only if it is a valid id."""
    ids = {key: getattr(request, key, "") for key in ("request_id", "tenant_id")}
    bind_request(**{key: value for key, value in ids.items() if is_valid_id(value)})


def _denial_reason(response: Message) -> str:
    decision = getattr(response, "decision", None)
    if not isinstance(decision, types_pb2.Decision) or decision.allowed:
        return ""
    value = types_pb2.DenialReason.DESCRIPTOR.values_by_number.get(decision.reason)
    return value.name if value is not None else str(decision.reason)


def _bind_tenant_of(response: Message) -> None:
    """Commit, Release and Refund name only a reservation; a usage record in the answer names
    its tenant."""
    record = getattr(response, "usage_record", None)
    if isinstance(record, Message):
        bind_tenant(str(getattr(record, "tenant_id", "")))
