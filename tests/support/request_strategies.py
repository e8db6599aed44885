"""Hypothesis strategies for any request of the contract, built from its message descriptors.

Every field gets boundary values of its type (0, -1, the type's extremes, empty, 128 and 129
characters, control characters, unknown enum numbers), random values, and, through `Hints`,
values that reach past validation (existing tenants and reservations, models of the price
table, page tokens the server returned). Raw requests add what a protobuf library would
never build: random bytes, truncated messages and invalid UTF-8 in a string field.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}

# Values that sit on the service's own bounds (ids of 128 characters, amounts of 10^12 micros,
# token counts of 10^8, page sizes of 1,000, whole cents, the smallest top-up) and beyond.
_SPECIAL_INTS = (
    0,
    1,
    -1,
    2,
    100,
    1000,
    1001,
    10_000,
    499_999,
    500_000,
    990_000,
    1_000_000,
    25_000_000,
    100_000_000,
    100_000_001,
    10**12,
    10**12 + 1,
    # Seconds since the epoch: a UTC midnight, a second after it, the range of a Timestamp.
    1_767_225_600,
    1_767_225_601,
    -62_135_596_800,
    253_402_300_799,
    253_402_300_800,
    315_576_000_000,
    # Nanos: the largest valid, one above, and a whole second.
    999_999_999,
    1_000_000_000,
    2**31 - 1,
    -(2**31),
    2**32,
    2**63 - 1,
    -(2**63),
)

_SPECIAL_STRINGS = (
    "",
    " ",
    "a",
    "x" * 128,
    "x" * 129,
    "x" * 501,
    "\x00",
    "a\x00b",
    "\t\r\n",
    "\x7f",
    "a b",
    "é",
    "😀",
    "\u202e\ufeff",
    "../../etc/passwd",
    "C:\\Windows\\win.ini",
    "' OR 1=1; --",
    "%s%n{0}",
    "null",
    "rsv_",
    "rsv_" + "0" * 32,
    "rsv_" + "F" * 32,
    "chg_" + "0" * 32,
    "seti_",
    "seti_123",
)

_UNKNOWN_ENUM_NUMBERS = (99, -1, 2**31 - 1, -(2**31))


@dataclass
class Hints:
    """Values that exist on the server under test, by field name: they let generated requests
    reach past "not found" into the code behind it."""

    by_field: dict[str, list[str]] = field(default_factory=dict)
    # Page tokens the server returned, and edited copies of them (by method path).
    page_tokens: dict[str, list[str]] = field(default_factory=dict)

    def add(self, field_name: str, *values: str) -> None:
        self.by_field.setdefault(field_name, []).extend(values)

    def for_field(self, name: str) -> list[str]:
        found = list(self.by_field.get(name, ()))
        for suffix in ("tenant_id", "user_id", "reservation_id", "charge_id", "scope_id"):
            if name.endswith(suffix) and name != suffix:
                found += self.by_field.get(suffix, [])
        return found


def edited_tokens(token: str) -> list[str]:
    """A page token as an outsider would edit it: same envelope, other contents."""
    padded = token + "=" * (-len(token) % 4)
    try:
        body = base64.urlsafe_b64decode(padded.split(".")[0] + "==")
        decoded = json.loads(body)
    except ValueError:
        decoded = {}
    fingerprint = decoded.get("f", "") if isinstance(decoded, dict) else ""
    positions: list[object] = [
        ["0000-01-01T00:00:00+00:00", "rsv_" + "0" * 32],
        ["9999-12-31T23:59:59.999999-23:59", "rsv_" + "0" * 32],
        ["0001-01-01T00:00:00+14:00", "x"],
        ["2026-01-01T00:00:00", "rsv_" + "0" * 32],
        [2**200],
        [2**63],
        [-(2**63) - 1],
        [True],
        [1.5],
        [None],
        ["a\x00b"],
        ["x" * 100_000],
        [{"a": 1}],
        ["user", 7],
        ["nope", "ann"],
        [],
        "not a list",
    ]
    bodies = [json.dumps({"f": fingerprint, "p": position}) for position in positions]
    # Deeper than any JSON parser recurses by default.
    deep = "[" * 100_000 + "]" * 100_000
    bodies.append(f'{{"f": {json.dumps(fingerprint)}, "p": {deep}}}')
    edited = [base64.urlsafe_b64encode(body.encode()).decode().rstrip("=") for body in bodies]
    edited += [token[:-1], token + "A", token[::-1], token.upper(), token + "." + token]
    return edited


def _ints(descriptor: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[descriptor.type]
    specials = [value for value in _SPECIAL_INTS if low <= value <= high]
    # hypothesis draws small integers far more often than large ones: the type's extremes
    # get a branch of their own.
    extremes = [low, low + 1, high - 1, high, *(v for v in (-1, 0) if low <= v)]
    return st.one_of(
        st.sampled_from(extremes),
        st.sampled_from(specials),
        st.integers(low, high),
        st.integers(-1000, 1000),
    )


def _enums(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    known = [value.number for value in enum.values]
    return st.sampled_from(known) | st.sampled_from(_UNKNOWN_ENUM_NUMBERS)


def _strings(descriptor: FieldDescriptor, hints: Hints, rpc_path: str) -> st.SearchStrategy[str]:
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(_SPECIAL_STRINGS),
        st.text(max_size=140),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=130),
    ]
    hinted = hints.for_field(descriptor.name)
    if descriptor.name == "page_token":
        hinted = hints.page_tokens.get(rpc_path, [])
    if descriptor.name == "request_id":
        # A fresh id reaches the write; a reused one reaches the idempotency check.
        options.append(st.builds(lambda: str(uuid.uuid4())))
    if hinted:
        hinted_strategy = st.sampled_from(hinted)
        # A value that exists, with what a database may not store appended.
        spoiled = st.tuples(hinted_strategy, st.sampled_from(["\x00", "\x00x", " ", "é"]))
        options = [hinted_strategy, hinted_strategy, spoiled.map("".join), *options]
    return st.one_of(options)


def _scalar(
    descriptor: FieldDescriptor, hints: Hints, rpc_path: str, depth: int
) -> st.SearchStrategy[object]:
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert descriptor.message_type is not None
        return messages(descriptor.message_type, hints, rpc_path, depth + 1)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert descriptor.enum_type is not None
        return _enums(descriptor.enum_type)
    if kind == FieldDescriptor.TYPE_STRING:
        return _strings(descriptor, hints, rpc_path)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    return _ints(descriptor)


def _is_repeated(descriptor: FieldDescriptor) -> bool:
    return bool(descriptor.is_repeated)


@st.composite
def _message(
    draw: st.DrawFn, descriptor: Descriptor, hints: Hints, rpc_path: str, depth: int
) -> Message:
    message = GetMessageClass(descriptor)()
    if depth > 3:
        return message
    for field_descriptor in descriptor.fields:
        if not draw(st.booleans()):
            continue
        values = _scalar(field_descriptor, hints, rpc_path, depth)
        if _is_repeated(field_descriptor):
            drawn = draw(st.lists(values, max_size=3))
            target = getattr(message, field_descriptor.name)
            if field_descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                for item in drawn:
                    target.add().CopyFrom(item)
            else:
                target.extend(drawn)
        elif field_descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field_descriptor.name).CopyFrom(draw(values))
        else:
            setattr(message, field_descriptor.name, draw(values))
    return message


def messages(
    descriptor: Descriptor, hints: Hints, rpc_path: str = "", depth: int = 0
) -> st.SearchStrategy[Message]:
    """Any valid message of `descriptor`'s type (valid protobuf; not necessarily a valid
    request)."""
    return _message(descriptor, hints, rpc_path, depth)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def string_field_paths(descriptor: Descriptor, depth: int = 0) -> list[Sequence[int]]:
    """Field-number paths to every string field, through singular nested messages."""
    paths: list[Sequence[int]] = []
    for field_descriptor in descriptor.fields:
        if field_descriptor.type == FieldDescriptor.TYPE_STRING:
            paths.append((field_descriptor.number,))
        elif field_descriptor.message_type is not None and depth < 3:
            for inner in string_field_paths(field_descriptor.message_type, depth + 1):
                paths.append((field_descriptor.number, *inner))
    return paths


_INVALID_UTF8 = (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\x80", b"\xf4\x90\x80\x80")


def _with_invalid_utf8(path: Sequence[int], bad: bytes) -> bytes:
    """Wire bytes that set the string at `path` to `bad` (a parser merges them into the rest)."""
    payload = _length_delimited(path[-1], bad)
    for number in reversed(path[:-1]):
        payload = _length_delimited(number, payload)
    return payload


def raw_requests(descriptor: Descriptor, hints: Hints, rpc_path: str) -> st.SearchStrategy[bytes]:
    """Request bytes as a client could send them, valid protobuf or not."""
    valid = messages(descriptor, hints, rpc_path).map(lambda message: message.SerializeToString())
    options: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=96),
        st.tuples(valid, st.integers(1, 64)).map(lambda pair: pair[0][: -pair[1]] or b"\x0a"),
        st.tuples(valid, st.binary(min_size=1, max_size=16)).map(lambda pair: pair[0] + pair[1]),
    ]
    paths = string_field_paths(descriptor)
    if paths:
        bad_strings = st.tuples(valid, st.sampled_from(paths), st.sampled_from(_INVALID_UTF8)).map(
            lambda drawn: drawn[0] + _with_invalid_utf8(drawn[1], drawn[2])
        )
        options += [bad_strings, bad_strings]
    return st.one_of(options)


def requests(descriptor: Descriptor, hints: Hints, rpc_path: str) -> st.SearchStrategy[bytes]:
    """What a generated test sends: mostly valid protobuf, sometimes not."""
    valid = messages(descriptor, hints, rpc_path).map(lambda message: message.SerializeToString())
    return st.one_of(valid, valid, valid, raw_requests(descriptor, hints, rpc_path))


def request_strings(descriptor: Descriptor, raw: bytes) -> list[str]:
    """Every string value of a request that decodes (empty if it does not), for telling an
    echo of the caller's own input from a leak."""
    try:
        message = GetMessageClass(descriptor).FromString(raw)
    except Exception:
        return []
    found: list[str] = []
    _collect_strings(message, found)
    return found


def _collect_strings(message: Message, found: list[str]) -> None:
    for field_descriptor, value in message.ListFields():
        values = value if _is_repeated(field_descriptor) else [value]
        for item in values:
            if field_descriptor.type == FieldDescriptor.TYPE_STRING:
                found.append(item)
            elif field_descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                _collect_strings(item, found)


_DURATION = "google.protobuf.Duration"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION_SECONDS_MAX = 315_576_000_000
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


def invalid_values(descriptor: Descriptor, raw: bytes) -> list[str]:
    """Paths of the values a request may not carry whatever else it says: an enum number the
    enum does not define, an UNSPECIFIED (0) among a repeated enum's values, a Duration or
    Timestamp outside its type's documented range."""
    try:
        message = GetMessageClass(descriptor).FromString(raw)
    except Exception:
        return []
    found: list[str] = []
    _collect_invalid(message, "", found)
    return found


def _collect_invalid(message: Message, prefix: str, found: list[str]) -> None:
    name = message.DESCRIPTOR.full_name
    if name == _DURATION:
        seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
        if (
            abs(seconds) > _DURATION_SECONDS_MAX
            or abs(nanos) > 999_999_999
            or (seconds > 0 > nanos)
            or (seconds < 0 < nanos)
        ):
            found.append(prefix.rstrip("."))
        return
    if name == _TIMESTAMP:
        seconds, nanos = message.seconds, message.nanos  # type: ignore[attr-defined]
        low, high = _TIMESTAMP_SECONDS
        if not (low <= seconds <= high and 0 <= nanos <= 999_999_999):
            found.append(prefix.rstrip("."))
        return
    for field_descriptor, value in message.ListFields():
        path = prefix + field_descriptor.name
        values = value if _is_repeated(field_descriptor) else [value]
        if field_descriptor.enum_type is not None:
            known = {item.number for item in field_descriptor.enum_type.values}
            if any(item not in known for item in values) or (
                _is_repeated(field_descriptor) and 0 in values
            ):
                found.append(path)
        elif field_descriptor.message_type is not None:
            for item in values:
                _collect_invalid(item, path + ".", found)


def describe(descriptor: Descriptor, raw: bytes) -> str:
    """The request for a failure message: decoded if it decodes, else its bytes."""
    try:
        message = GetMessageClass(descriptor).FromString(raw)
    except Exception:
        return f"undecodable bytes {raw!r}"
    text = str(message)
    return text if len(text) < 2000 else text[:2000] + "..."
