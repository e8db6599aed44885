"""Logging: one JSON object per line (or text for a terminal), with the call's context.

The JSON formatter is an allowlist: the time, level, logger, message, the context of the call
being served (method, request id, tenant id, caller) and a few named extras. Nothing else from a
record is written, so a payload or a secret passed in `extra=` by mistake never reaches the logs.

A call's request id and tenant id join its context only once the caller is authenticated (see
api/interceptors.py), and every value copied from a request is capped (`capped`): a caller cannot
make each log line of its call as large as its request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "LOGGED_VALUE_MAX",
    "CallContext",
    "JsonFormatter",
    "bind_request",
    "bind_tenant",
    "call_context",
    "capped",
    "configure_logging",
]

# The most characters of one value taken from a request that a log line carries (an id is at
# most 128 when valid).
LOGGED_VALUE_MAX = 128

# Control characters would let a value forge line breaks in the text format.
_CONTROL = {code: "?" for code in [*range(0x20), 0x7F]}


def capped(value: str) -> str:
    """`value` as a log line may carry it: at most LOGGED_VALUE_MAX characters, no controls."""
    if len(value) > LOGGED_VALUE_MAX:
        value = f"{value[: LOGGED_VALUE_MAX - 3]}..."
    return value.translate(_CONTROL)


@dataclass(frozen=True, slots=True)
class CallContext:
    method: str
    request_id: str = ""
    tenant_id: str = ""
    # Who called: a role and which credential ("chat-service token ab12cd34"), never the secret.
    caller: str = ""


call_context: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "billing_call_context", default=None
)


def bind_request(*, request_id: str = "", tenant_id: str = "", caller: str = "") -> None:
    """Adds what is known of the call to its context, each value capped; empty ones are kept."""
    context = call_context.get()
    if context is None:
        return
    call_context.set(
        replace(
            context,
            request_id=capped(request_id) or context.request_id,
            tenant_id=capped(tenant_id) or context.tenant_id,
            caller=capped(caller) or context.caller,
        )
    )


def bind_tenant(tenant_id: str) -> None:
    """Adds the tenant to the current call's context once it is known (e.g. from the answer)."""
    context = call_context.get()
    if context is not None and tenant_id and not context.tenant_id:
        call_context.set(replace(context, tenant_id=capped(tenant_id)))


# Extras a log call may attach (`extra={"grpc_code": ...}`); any other attribute is dropped.
# An access line's outcome: the status code, the ErrorInfo reason and field of an error, the
# DenialReason of a decision that denied.
_EXTRA_FIELDS = (
    "grpc_code",
    "error_reason",
    "field",
    "denial_reason",
    "duration_ms",
    "peer",
    "in_flight",
    "grace_s",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = call_context.get()
        if context is not None:
            entry["method"] = context.method
            for key in ("request_id", "tenant_id", "caller"):
                if value := getattr(context, key):
                    entry[key] = value
        for key in _EXTRA_FIELDS:
            if (value := record.__dict__.get(key)) is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = call_context.get()
        if context is None:
            return line
        parts = [f"method={context.method}"]
        parts += [f"{k}={v}" for k in ("request_id", "tenant_id") if (v := getattr(context, k))]
        return f"{line} [{' '.join(parts)}]"


def configure_logging(level: str, log_format: Literal["auto", "json", "text"]) -> None:
    """Sends every log record to stderr in the chosen format; replaces earlier handlers."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
