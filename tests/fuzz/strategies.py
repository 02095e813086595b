"""Hypothesis strategies generated from protobuf descriptors: any request message of any RPC, with boundary values.

`message_of(descriptor)` walks the descriptor: every field is set or left unset, scalars draw from boundary values
(empty, huge, unicode with full-width digits, RTL marks, control characters and NUL, 64-KiB strings, the integer
type's extremes, NaN and infinities, enum numbers no one defined), repeated fields take a few elements or exactly
their limit and one past it, message fields recurse (to a bounded depth), oneofs set one member, and the
well-known types get their own extremes (Timestamps and Durations outside their range or with invalid nanos,
FieldMasks with junk paths). A new field or RPC is covered by the same walk without a line here.

`near_valid(base)` starts from a valid request and changes one field (or one field of its first nested element),
so most examples get past the first validation rule and reach the rules behind it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
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

FULL_WIDTH_DIGITS = "".join(chr(0xFF10 + digit) for digit in range(10))  # U+FF10..U+FF19
TO_FULL_WIDTH = str.maketrans("0123456789", FULL_WIDTH_DIGITS)
KIB64 = 64 * 1024

# Strings every string field is tried with: empty and blank, numbers in the forms people and networks write them
# (full-width, with a right-to-left override, with NUL), control characters, and 64-KiB strings.
BOUNDARY_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "0",
    "-1",
    "13800000001",
    "+8613800000001",
    "008613800000001",
    "700100000000001",
    "13800000001".translate(TO_FULL_WIDTH),
    "700100000000001".translate(TO_FULL_WIDTH),
    "\u202e13800000001",
    "13800000001\u200f",
    "\u200b",
    "\ufeff13800000001",
    "\x00",
    "13800000001\x00",
    "a\x00b",
    "\r\n",
    "\t\x0b\x0c",
    "\x7f\x1b[31m",
    "é",
    "中文",
    "😀",
    "İı",
    "%s%n%x",
    "../../etc/passwd",
    "{tenant}",
    "key:with:colons",
    "*",
    "0" * 129,
)
HUGE_STRINGS = ("9" * KIB64, "a" * KIB64, "中" * KIB64, "\x00" * KIB64)
_TEXTY = (
    st.text(max_size=40),
    st.text(alphabet="0123456789" + FULL_WIDTH_DIGITS + "+-#* \u202e\x00", max_size=24),
    st.text(alphabet=st.characters(codec="utf-8", categories=("Cc", "Cf", "Zs", "Nd", "Lo")), max_size=20),
)
SHORT_STRINGS = st.one_of(st.sampled_from(BOUNDARY_STRINGS), *_TEXTY)
# A 64-KiB string in one draw of five.
STRINGS = st.one_of(st.sampled_from(BOUNDARY_STRINGS), *_TEXTY, st.sampled_from(HUGE_STRINGS))

# google.protobuf.Timestamp holds 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z; nanos 0..999,999,999.
TIMESTAMP_SECONDS = (0, 1, -1, -62135596800, -62135596801, 253402300799, 253402300800, 1_800_000_000, *INT64)
# google.protobuf.Duration holds ±315,576,000,000 s; nanos ±999,999,999 with the sign of seconds.
DURATION_SECONDS = (0, 1, -1, 59, 60, 3600, 7_776_000, 7_776_001, 315576000000, 315576000001, -315576000001, *INT64)
NANOS = (0, 1, -1, 999_999_999, 1_000_000_000, -999_999_999, -1_000_000_000, *INT32)


def _boundary_ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted(v for v in {low, low + 1, -1, 0, 1, 100, 1000, 1001, high - 1, high} if low <= v <= high)
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _timestamps(cls: Any) -> st.SearchStrategy[Message]:
    return st.builds(
        lambda s, n: cls(seconds=s, nanos=n),
        st.one_of(st.sampled_from(TIMESTAMP_SECONDS), st.integers(*INT64)),
        st.one_of(st.sampled_from(NANOS), st.integers(*INT32)),
    )


def _durations(cls: Any) -> st.SearchStrategy[Message]:
    return st.builds(
        lambda s, n: cls(seconds=s, nanos=n),
        st.one_of(st.sampled_from(DURATION_SECONDS), st.integers(*INT64)),
        st.one_of(st.sampled_from(NANOS), st.integers(*INT32)),
    )


def _field_masks(cls: Any, names: Sequence[str]) -> st.SearchStrategy[Message]:
    """Paths from the names of the request's own fields (and one level below), junk, duplicates, very many."""
    real = st.sampled_from(tuple(names) or ("",))
    path = st.one_of(real, real.map(lambda n: n.upper()), SHORT_STRINGS, real.map(lambda n: n + ".x"))
    lists = st.one_of(st.lists(path, max_size=6), st.lists(path, min_size=1, max_size=3).map(lambda p: p * 400))
    return lists.map(lambda paths: cls(paths=paths))


def _mask_names(descriptor: Descriptor) -> list[str]:
    """The names a FieldMask in `descriptor` could mean: its sibling fields' names, also prefixed and one level in."""
    names: list[str] = []
    for field in descriptor.fields:
        names.append(field.name)
        if field.message_type is not None and not field.message_type.full_name.startswith("google."):
            names.extend(sub.name for sub in field.message_type.fields)
            names.extend(f"{field.name}.{sub.name}" for sub in field.message_type.fields)
    return names


class Strategies:
    """Strategies of one set of descriptors. `repeated_limits` maps "<message full name>.<field>" to the most
    elements the service accepts: such a field also gets exactly that many and one more."""

    def __init__(self, repeated_limits: Mapping[str, int], *, max_depth: int = 3, huge: bool = True) -> None:
        self.repeated_limits = dict(repeated_limits)
        self.max_depth = max_depth
        self.strings = STRINGS if huge else SHORT_STRINGS
        # Elements of a list at its limit: short strings (a thousand 64-KiB strings would only test the size limit).
        self._elements = self if not huge else Strategies(repeated_limits, max_depth=max_depth, huge=False)

    def message_of(self, descriptor: Any, depth: int = 0) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        special = self._well_known(descriptor, cls, mask_names=())
        if special is not None:
            return special
        optional: dict[str, st.SearchStrategy[Any]] = {}
        oneof_members = {f.name for o in descriptor.oneofs for f in o.fields if not _synthetic(o)}
        for field in descriptor.fields:
            if field.name in oneof_members:
                continue
            strategy = self.field_values(field, descriptor, depth)
            if strategy is not None:
                optional[field.name] = strategy
        for oneof in descriptor.oneofs:
            if _synthetic(oneof):
                continue
            members = [(f.name, self.field_values(f, descriptor, depth)) for f in oneof.fields]
            choices = [st.tuples(st.just(name), s) for name, s in members if s is not None]
            if choices:
                optional["oneof:" + oneof.name] = st.one_of(choices)
        return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))

    def field_values(self, field: FieldDescriptor, container: Any, depth: int = 0) -> st.SearchStrategy[Any] | None:
        """What one field may hold (a list for a repeated field); None when the depth bound leaves it unset."""
        single = self._single(field, container, depth)
        if single is None:
            return None
        if not field.is_repeated:
            return single
        lists = st.lists(single, max_size=4)
        limit = self.repeated_limits.get(f"{container.full_name}.{field.name}")
        if limit is None:
            return lists
        element = self._elements._single(field, container, depth)
        assert element is not None
        at_limits = st.tuples(element, st.sampled_from((limit, limit + 1))).map(lambda e: [e[0]] * e[1])
        return st.one_of(lists, at_limits)

    def _single(self, field: FieldDescriptor, container: Descriptor, depth: int) -> st.SearchStrategy[Any] | None:
        kind = field.type
        if kind == FieldDescriptor.TYPE_STRING:
            return self.strings
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.one_of(st.binary(max_size=64), st.just(b"\x00" * KIB64))
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in _INT_RANGES:
            return _boundary_ints(*_INT_RANGES[kind])
        if kind == FieldDescriptor.TYPE_DOUBLE:
            return st.floats(allow_nan=True, allow_infinity=True)
        if kind == FieldDescriptor.TYPE_FLOAT:
            return st.floats(width=32, allow_nan=True, allow_infinity=True)
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            known = tuple(v.number for v in field.enum_type.values)
            return st.one_of(st.sampled_from(known), _boundary_ints(*INT32))
        if kind in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
            message = field.message_type
            assert message is not None
            special = self._well_known(message, GetMessageClass(message), mask_names=_mask_names(container))
            if special is not None:
                return special
            if depth >= self.max_depth:
                return None
            return self.message_of(message, depth + 1)
        raise AssertionError(f"no strategy for {field.full_name} of type {kind}")

    @staticmethod
    def _well_known(descriptor: Descriptor, cls: Any, *, mask_names: Sequence[str]) -> st.SearchStrategy[Any] | None:
        name = descriptor.full_name
        if name == "google.protobuf.Timestamp":
            return _timestamps(cls)
        if name == "google.protobuf.Duration":
            return _durations(cls)
        if name == "google.protobuf.FieldMask":
            return _field_masks(cls, mask_names)
        return None

    def near_valid(self, base: Message) -> st.SearchStrategy[Message]:
        """`base` with one field changed: set to a drawn value, a variant of its valid value, or cleared."""
        paths = _paths(base)
        if not paths:
            return st.just(base)

        def mutate(path: tuple[str, ...]) -> st.SearchStrategy[Message]:
            holder, field = _holder(base, path)
            values = self.field_values(field, holder.DESCRIPTOR)
            choices = [st.just(_CLEAR) if values is None else values, st.just(_CLEAR)]
            current = getattr(holder, field.name)
            if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated and current:
                choices.append(string_variants(current))
            return st.one_of(choices).map(lambda value: _replaced(base, path, value))

        return st.sampled_from(paths).flatmap(mutate)

    def near_valid_stream(self, base: Sequence[Message]) -> st.SearchStrategy[list[Message]]:
        """A valid stream of requests with one of its first message's fields changed (and maybe more messages)."""
        first = self.near_valid(base[0])
        extra = st.lists(self.message_of(base[0].DESCRIPTOR), max_size=2)
        return st.tuples(first, extra).map(lambda t: [t[0], *base[1:], *t[1]])


def string_variants(valid: str) -> st.SearchStrategy[str]:
    """Variants of a valid string that a careless parser might still take for it."""
    return st.sampled_from(
        (
            valid[:-1],
            valid + "0",
            " " + valid,
            valid + "\x00",
            valid + "\n",
            "\u202e" + valid,
            valid.translate(TO_FULL_WIDTH),
            valid.upper(),
            valid * (KIB64 // max(1, len(valid))),
            valid + "/../x",
            valid + "*",
        )
    )


_CLEAR = object()


def _synthetic(oneof: Any) -> bool:
    """A proto3 `optional` field's own one-member oneof (not a real choice)."""
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def build(cls: Callable[[], Message], values: Mapping[str, Any]) -> Message:
    """A message of `cls` with `values` (field name → value; "oneof:<name>" → (member, value))."""
    message = cls()
    for name, value in values.items():
        if name.startswith("oneof:"):
            member, member_value = value
            set_field(message, member, member_value)
        else:
            set_field(message, name, value)
    return message


def set_field(message: Message, name: str, value: Any) -> None:
    field = message.DESCRIPTOR.fields_by_name[name]
    if value is _CLEAR:
        message.ClearField(name)
    elif field.is_repeated:
        target = getattr(message, name)
        del target[:]
        target.extend(value)
    elif field.message_type is not None:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def _paths(message: Message) -> list[tuple[str, ...]]:
    """Fields that can be changed: each top-level field, and the fields of a message field (or of the first
    element of a repeated message field) that the base sets."""
    paths: list[tuple[str, ...]] = []
    for field in message.DESCRIPTOR.fields:
        paths.append((field.name,))
        nested = field.message_type
        if nested is None or nested.full_name.startswith("google.") or nested.GetOptions().map_entry:
            continue
        if field.is_repeated:
            if len(getattr(message, field.name)):
                paths.extend((field.name, "0", sub.name) for sub in nested.fields)
        elif message.HasField(field.name):
            paths.extend((field.name, sub.name) for sub in nested.fields)
    return paths


def _holder(message: Message, path: tuple[str, ...]) -> tuple[Message, Any]:
    holder = message
    for step in path[:-1]:
        holder = holder[int(step)] if step.isdigit() else getattr(holder, step)  # type: ignore[index]
    return holder, holder.DESCRIPTOR.fields_by_name[path[-1]]


def _replaced(base: Message, path: tuple[str, ...], value: Any) -> Message:
    changed = copy.deepcopy(base)
    holder, field = _holder(changed, path)
    set_field(holder, field.name, value)
    return changed
