"""Server reflection that also resolves method names.

grpcio-reflection asks the descriptor pool for the file containing a symbol, and the pool does
not index methods, so `grpcurl describe billing.v1.BillingService.Commit` fails (grpc/grpc
issue 34743, open). This pool answers a method by its service's file and delegates all else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection


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
