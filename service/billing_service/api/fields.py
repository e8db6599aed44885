"""Request values that decode as protobuf but that no request may carry, refused by name.

proto3 enums are open (any int32 decodes), and a Duration or Timestamp holds any int64 of
seconds and any int32 of nanos, far outside the ranges their types define. Each helper here
turns such a field into a domain value or raises InvalidArgument naming it: nothing is ever
silently defaulted, dropped or overflowed further in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from billing_service.domain.errors import InvalidArgument

T = TypeVar("T")

# The ranges google/protobuf/duration.proto and timestamp.proto define.
DURATION_SECONDS_MAX = 315_576_000_000
TIMESTAMP_SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z
TIMESTAMP_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z
NANOS_MAX = 999_999_999


def optional_enum(
    field: str, number: int, enum: EnumDescriptor, values: Mapping[Any, T]
) -> T | None:
    """The value of an enum field whose UNSPECIFIED (0) means "none" or "keep"; an undefined
    number is refused."""
    if number == 0:
        return None
    return required_enum(field, number, enum, values)


def required_enum(field: str, number: int, enum: EnumDescriptor, values: Mapping[Any, T]) -> T:
    """The value of an enum field that must name one of `values`."""
    value = values.get(number)
    if value is None:
        names = ", ".join(enum.values_by_number[known].name for known in sorted(values))
        if number == 0:
            raise InvalidArgument(field, f"is required: one of {names}")
        raise InvalidArgument(field, f"{number} is not one of {names}")
    return value


def repeated_enum(
    field: str, numbers: Iterable[int], enum: EnumDescriptor, values: Mapping[Any, T]
) -> list[T]:
    """The values of a repeated enum field: each must be defined, UNSPECIFIED included (an
    empty list is how a request says "any")."""
    return [required_enum(field, number, enum, values) for number in numbers]


def optional_duration(message: Message, field: str) -> timedelta | None:
    """A Duration field as a timedelta; None when unset."""
    if not message.HasField(field):
        return None
    duration: Duration = getattr(message, field)
    seconds, nanos = duration.seconds, duration.nanos
    if (
        abs(seconds) > DURATION_SECONDS_MAX
        or abs(nanos) > NANOS_MAX
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        raise InvalidArgument(
            field,
            f"is not a valid Duration: seconds within ±{DURATION_SECONDS_MAX}, nanos within "
            f"±{NANOS_MAX} and of the same sign",
        )
    microseconds = abs(nanos) // 1000 * (-1 if nanos < 0 else 1)
    return timedelta(seconds=seconds, microseconds=microseconds)


def optional_time(message: Message, field: str) -> datetime | None:
    """A Timestamp field as a UTC datetime; None when unset."""
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    if not (
        TIMESTAMP_SECONDS_MIN <= stamp.seconds <= TIMESTAMP_SECONDS_MAX
        and 0 <= stamp.nanos <= NANOS_MAX
    ):
        raise InvalidArgument(
            field, "is not a valid Timestamp: 0001-01-01 to 9999-12-31, nanos 0 to 999,999,999"
        )
    if stamp.nanos % 1000:
        # Stored times have microseconds: a finer instant would be silently moved.
        raise InvalidArgument(field, "must not have a fraction of a microsecond")
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        seconds=stamp.seconds, microseconds=stamp.nanos // 1000
    )
