"""Server reflection that also resolves method names and serves the error-detail types.

grpcio-reflection asks the descriptor pool for the file containing a symbol, and the pool does
not index methods, so `grpcurl describe billing.v1.BillingService.Commit` fails (grpc/grpc
issue 34743, open). This pool answers a method by its service's file and delegates all else.

No service's file imports google/rpc/error_details.proto or billing/v1/errors.proto, so they are
loaded here: a tool that decodes an error's details over reflection (grpcurl) asks for
google.rpc.ErrorInfo and google.rpc.BadRequest by name, and `grpcurl describe
billing.v1.ErrorReason` lists the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection

from billing.v1 import errors_pb2

# Imported for reflection only: importing registers them in the default descriptor pool.
ERROR_DETAIL_FILES = (errors_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR)


class _MethodResolvingPool:
    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method_name = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(symbol) from None
            if method_name not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    # The servicer only calls pool methods: the wrapper stands in for a DescriptorPool.
    pool = cast(descriptor_pool.DescriptorPool, _MethodResolvingPool(descriptor_pool.Default()))
    reflection.enable_server_reflection(names, server, pool=pool)
