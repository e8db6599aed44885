"""Billing errors as gRPC statuses with google.rpc.ErrorInfo (AIP-193)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from billing_service.domain.errors import (
    AlreadyExists,
    BillingError,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

ERROR_DOMAIN = "ai-billing"

_log = logging.getLogger(__name__)

_CODES: dict[type[BillingError], int] = {
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    AlreadyExists: code_pb2.ALREADY_EXISTS,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    Unavailable: code_pb2.UNAVAILABLE,
}


def _packed(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(error: BillingError) -> grpc.Status:
    metadata = {}
    details = []
    if isinstance(error, InvalidArgument):
        metadata["field"] = error.field
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    return error_info_status(_CODES[type(error)], error.reason, error.message, metadata, details)


def error_info_status(
    code: int,
    reason: ErrorReason,
    message: str,
    metadata: Mapping[str, str] | None = None,
    more_details: Sequence[any_pb2.Any] = (),
) -> grpc.Status:
    """A status (google.rpc.Code value) carrying an ErrorInfo of our domain, then more details."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=code, message=message, details=[_packed(info), *more_details])
    return rpc_status.to_status(status)


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")

Handler = Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
]


def maps_errors(
    handler: Handler[Servicer, Request, Response],
) -> Handler[Servicer, Request, Response]:
    """Aborts the call with the rich status of a BillingError raised by the handler."""

    @functools.wraps(handler)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await handler(self, request, context)
        except BillingError as error:
            if isinstance(error, Unavailable):
                _log.warning("%s unavailable: %s", handler.__name__, error.__cause__ or error)
            status = rich_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
            raise AssertionError("abort() raises") from None

    return wrapper
