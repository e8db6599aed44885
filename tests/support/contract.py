"""The contract as data: every RPC of every service in billing.v1, found from the descriptors,
and the status codes each method's documentation names.

An RPC added to a .proto (and its stubs regenerated) appears here without any test changing.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

import billing.v1
from tests.support.tools import REPO

PACKAGE = "billing.v1"
_PROTOS = REPO / "protos"
_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)
_WORD = re.compile(r"\b[A-Z_]{2,}\b")


@dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. "billing.v1.BillingService"
    name: str  # e.g. "ReserveCredit"
    request: Descriptor
    server_streaming: bool
    client_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.request)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def _services() -> Iterator[ServiceDescriptor]:
    for module_info in pkgutil.iter_modules(billing.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"billing.v1.{module_info.name}")
        yield from module.DESCRIPTOR.services_by_name.values()


def _rpc(service: ServiceDescriptor, method: MethodDescriptor) -> Rpc:
    return Rpc(
        service=service.full_name,
        name=method.name,
        request=method.input_type,
        server_streaming=method.server_streaming,
        client_streaming=method.client_streaming,
    )


@cache
def contract_rpcs() -> tuple[Rpc, ...]:
    """Every method of every service of the package, sorted by path."""
    rpcs = [_rpc(service, method) for service in _services() for method in service.methods]
    return tuple(sorted(rpcs, key=lambda rpc: rpc.path))


@cache
def documented_codes() -> Mapping[str, frozenset[grpc.StatusCode]]:
    """For each method path, the status codes its own comment or its service's comment names
    (e.g. "Errors: INVALID_ARGUMENT, NOT_FOUND (reason TENANT_NOT_FOUND)")."""
    comments = _comments()
    codes: dict[str, frozenset[grpc.StatusCode]] = {}
    for rpc in contract_rpcs():
        text = comments.get(rpc.service, "") + "\n" + comments.get(rpc.path, "")
        names = {word for word in _WORD.findall(text) if word in _STATUS_NAMES}
        codes[rpc.path] = frozenset(grpc.StatusCode[name] for name in names)
    return codes


def _comments() -> dict[str, str]:
    """Leading comments of services ("billing.v1.X") and methods ("/billing.v1.X/M")."""
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    files = sorted(str(path.relative_to(_PROTOS)) for path in _PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "contract.binpb"
        status = protoc.main(
            [
                "protoc",
                f"-I{_PROTOS}",
                f"-I{well_known}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        assert status == 0, "protoc could not read protos/"
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments: dict[str, str] = {}
    for file in descriptors.file:
        # Path [6, i] is service i; [6, i, 2, j] is its method j (descriptor.proto numbers).
        for location in file.source_code_info.location:
            path = list(location.path)
            if len(path) < 2 or path[0] != 6:
                continue
            service = file.service[path[1]]
            name = f"{file.package}.{service.name}"
            if len(path) == 2:
                comments[name] = location.leading_comments
            elif len(path) == 4 and path[2] == 2:
                comments[f"/{name}/{service.method[path[3]].name}"] = location.leading_comments
    return comments


def field_exists(request: Descriptor, path: str) -> bool:
    """Whether `path` ("budget.scope", "size", "kinds[0]") names a field or a oneof of
    `request`, or is the request message's own name."""
    if path == request.full_name:
        return True
    descriptor: Descriptor | None = request
    parts = path.split(".")
    for index, part in enumerate(parts):
        name = part.split("[", 1)[0]
        if descriptor is None:
            return False
        if name in descriptor.oneofs_by_name and index == len(parts) - 1:
            return True
        field = descriptor.fields_by_name.get(name)
        if field is None:
            return False
        descriptor = field.message_type
    return True
