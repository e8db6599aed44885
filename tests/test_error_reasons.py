"""billing.v1.ErrorReason (protos/billing/v1/errors.proto) is the one list of ErrorInfo reasons:
the server sends exactly those, and the Python client selects its typed errors from them.

The TypeScript client's reasons are generated from the same enum (clients/typescript/src/gen),
so tests/typescript/test_typescript_client.py's staleness check covers it.
"""

from __future__ import annotations

import re

from billing.client import _errors as client_errors
from billing.v1 import errors_pb2
from billing_service.domain.errors import ErrorReason
from tests.support.tools import REPO

PROTO = REPO / "protos" / "billing" / "v1" / "errors.proto"
GRPC_CODES = (
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
)


def contract_reasons() -> set[str]:
    """The reason strings of the contract: its values' names (UNSPECIFIED is never sent)."""
    return {
        value.name
        for value in errors_pb2.ErrorReason.DESCRIPTOR.values
        if value.number != errors_pb2.ERROR_REASON_UNSPECIFIED
    }


def test_the_server_sends_exactly_the_reasons_of_the_contract() -> None:
    server = {reason.value for reason in ErrorReason}
    problems = [
        f"{name} is in billing.v1.ErrorReason (protos/billing/v1/errors.proto) but not in the "
        "server's ErrorReason (service/billing_service/domain/errors.py)"
        for name in sorted(contract_reasons() - server)
    ] + [
        f"{name} is in the server's ErrorReason (service/billing_service/domain/errors.py) but "
        "not in billing.v1.ErrorReason (protos/billing/v1/errors.proto): add it there with when "
        "it happens and its status code, then run scripts/generate-protos and "
        "`npm run generate` in clients/typescript"
        for name in sorted(server - contract_reasons())
    ]
    assert not problems, "\n".join(problems)


def test_each_server_reason_is_its_own_name() -> None:
    mismatched = [f"{r.name} = {r.value!r}" for r in ErrorReason if r.name != r.value]
    assert not mismatched, f"server ErrorReason values differ from their names: {mismatched}"


def test_the_python_client_selects_only_reasons_of_the_contract() -> None:
    unknown = sorted(set(client_errors._BY_REASON) - contract_reasons())
    assert not unknown, (
        f"the Python client (clients/src/billing/client/_errors.py _BY_REASON) maps {unknown}, "
        "which billing.v1.ErrorReason (protos/billing/v1/errors.proto) does not list"
    )


def test_each_reason_says_its_status_code_first() -> None:
    # The comment above each value starts with the gRPC code the reason comes with.
    text = PROTO.read_text()
    missing = []
    for match in re.finditer(r"((?:^  //.*\n)+)  ([A-Z_]+) = (\d+);", text, re.MULTILINE):
        comment, name = match.group(1), match.group(2)
        first_line = comment.splitlines()[0].removeprefix("  // ")
        if name != "ERROR_REASON_UNSPECIFIED" and first_line.split(".")[0] not in GRPC_CODES:
            missing.append(name)
    assert missing == [], f"these reasons' comments do not start with a status code: {missing}"
    found = set(re.findall(r"^  ([A-Z_]+) = \d+;", text, re.MULTILINE))
    assert found - {"ERROR_REASON_UNSPECIFIED"} == contract_reasons()
