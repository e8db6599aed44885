"""Text for people (aligned tables, key/value blocks) and JSON for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp


def print_json(message: Message, out: TextIO) -> None:
    """The protobuf JSON mapping with the .proto field names; unset scalars are printed too, so a
    script finds every field. int64 fields (all money) are JSON strings of integer micros, as
    the mapping requires."""
    text = json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=2,
    )
    out.write(text + "\n")


def print_json_value(value: object, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, *, right: set[int]
) -> None:
    """Columns padded to their widest cell; the columns in `right` (numbers, money) aligned
    right."""
    widths = [
        max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        )
        return "  ".join(padded).rstrip()

    out.write(line(headers) + "\n")
    for row in rows:
        out.write(line(row) + "\n")


def print_fields(fields: Sequence[tuple[str, str]], out: TextIO) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.write(f"{name.ljust(width)}  {value}\n".rstrip() + "\n")


def format_time(timestamp: Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_age(since: Timestamp, now: datetime) -> str:
    """How long ago `since` was, e.g. `2h05m`, `4m10s`, `12s` (never negative)."""
    seconds = max(0, int((now - since.ToDatetime(tzinfo=UTC)).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def format_date(timestamp: Timestamp) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d")


def timestamp_of(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def enum_label(name: str, prefix: str) -> str:
    """`BILLING_STATUS_PAYMENT_FAILED` -> `payment failed`."""
    return name.removeprefix(prefix).lower().replace("_", " ")


def count(number: int) -> str:
    return f"{number:,}"
