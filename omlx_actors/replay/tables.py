"""Reading TOML tables into typed structs, with located, readable errors.

`decode` converts one parsed table to a `msgspec.Struct` (unknown keys rejected, types and
bounds from the struct's annotations) and records each problem - file:line, table, key, what
was expected, what was found - in a `Context`, which keeps them in file order and finds a
key's line back in the source, since `tomllib` does not keep positions. A struct may add
checks msgspec cannot express in a `problems()` method. Also byte sizes (`ByteSize`).

Pure: no trio, no MLX.
"""

from __future__ import annotations

import abc
import difflib
import re
import types
from collections.abc import Iterator, Mapping
from typing import (
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import attrs
import msgspec

from omlx_actors.units import parse_bytes


@attrs.frozen(kw_only=True)
class ByteSize:
    """A byte count written as `123`, `"512M"`, `"1.5G"` or `"weights + 6M"` (the model's
    weight files plus a margin, so a budget follows the model it runs with)."""

    plus_weights: bool
    bytes: int

    def resolve(self, weights_bytes: int) -> int:
        return self.bytes + (weights_bytes if self.plus_weights else 0)

    def __str__(self) -> str:
        return f"weights + {self.bytes}" if self.plus_weights else str(self.bytes)


def parse_size(value: Any) -> ByteSize:
    """`123` / `"512M"` / `"1.5G"` / `"weights + 6M"` → ByteSize; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must be >= 0")
        return ByteSize(plus_weights=False, bytes=value)
    if not isinstance(value, str):
        raise ValueError(f"a size (an integer or a string like \"512M\"), got {show(value)}")
    text = value.strip()
    plus = False
    m = re.fullmatch(r"weights\s*(?:\+\s*(.+))?", text, re.I)
    if m:
        plus = True
        text = (m.group(1) or "0").strip()
    try:
        return ByteSize(plus_weights=plus, bytes=parse_bytes(text))
    except ValueError:
        raise ValueError(f"a size like 1048576, \"512M\", \"1.5G\" or \"weights + 6M\", got {value!r}") from None


class Size(abc.ABC):
    """A struct field holding a `ByteSize`, written as `parse_size` reads it. msgspec would
    read the attrs class ByteSize as a table; an unknown type goes to `_decode_hook`, and
    msgspec accepts what it returns because ByteSize is registered as a Size."""


Size.register(ByteSize)


def _decode_hook(kind: type, value: Any) -> Any:
    if kind is Size:
        return parse_size(value)
    raise NotImplementedError(kind)


class Context:
    """Where problems are collected, and how a key is found back in the source."""

    def __init__(self, where: str, lines: list[str]):
        self.where = where
        self.lines = lines
        self._problems: list[tuple[int, int, str]] = []
        self._headers = [(i, _header(line)) for i, line in enumerate(lines)]
        self._headers = [(i, h) for i, h in self._headers if h is not None]

    @property
    def problems(self) -> list[str]:
        """Every problem so far, in the order of the file's lines."""
        return [text for _, _, text in sorted(self._problems, key=lambda p: (p[0], p[1]))]

    def report(self, table: tuple, key: str | None, message: str) -> None:
        line = self.locate(table, key)
        loc = f"{self.where}:{line}" if line else self.where
        name = _table_name(table)
        subject = f"[{name}] {key}" if key and name else (key or f"[{name}]" if name else "")
        text = f"{loc}: {subject}: {message}" if subject else f"{loc}: {message}"
        self._problems.append((line or 0, len(self._problems), text))

    def region(self, table: tuple) -> tuple[int, int] | None:
        """The lines (start, end) of a table given as a path like ("phase", 2, "expect")."""
        if not table:
            end = self._headers[0][0] if self._headers else len(self.lines)
            return 0, end
        start, end = 0, len(self.lines)
        names: list[str] = []
        found = False
        for seg in table:
            if isinstance(seg, int):
                hits = [i for i, (kind, h) in self._headers_in(start, end) if kind == "[[" and h == names]
                if seg >= len(hits):
                    return None
                start = hits[seg]
                end = hits[seg + 1] if seg + 1 < len(hits) else end
                found = True
                continue
            names.append(seg)
            hits = [i for i, (kind, h) in self._headers_in(start, end) if kind == "[" and h == names]
            if hits:
                start = hits[0]
                found = True
        if not found:
            return None
        nxt = [i for i, _ in self._headers_in(start + 1, end)]
        return start, (nxt[0] if nxt else end)

    def _headers_in(self, start: int, end: int):
        return [(i, h) for i, h in self._headers if start <= i < end]

    def locate(self, table: tuple, key: str | None) -> int | None:
        region = self.region(table)
        if region is None and table:
            # An inline table (`expect = {...}`): look for its key in the parent's region.
            parent = self.region(table[:-1])
            if parent is None:
                return None
            name = table[-1]
            region = parent
            if key is None:
                key = str(name)
        if region is None:
            return None
        start, end = region
        if key is None:
            return start + 1
        pattern = re.compile(r"^\s*(?:[\w.\"'-]+\.)?[\"']?" + re.escape(key) + r"[\"']?\s*=")
        inline = re.compile(r"[{,]\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
        for i in range(start, end):
            if pattern.search(self.lines[i]) or inline.search(self.lines[i]):
                return i + 1
        return start + 1 if table else None


def _header(line: str) -> tuple[str, list[str]] | None:
    m = re.match(r"^\s*(\[\[|\[)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
    if not m:
        return None
    parts = [p.strip().strip("\"'") for p in m.group(2).split(".")]
    return m.group(1), parts


def _table_name(table: tuple) -> str:
    out = ""
    for seg in table:
        if isinstance(seg, int):
            out += f"[{seg + 1}]"
        else:
            out += ("." if out else "") + seg
    return out


def show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind})"


class Table(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A TOML table's typed form. TOML has no null, so a field whose default is None was
    not given in the file."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """(key, message) for what the types cannot say (keys that go together or not)."""
        return iter(())


T = TypeVar("T", bound=Table)


def decode(ctx: Context, data: Any, table: tuple, kind: type[T], *, partial: bool = False) -> T | None:
    """`data` as a `kind`, or None after reporting every problem found in it. msgspec stops
    at the first bad key, so each one is reported, set aside, and the rest converted again.
    `partial`: return what converted even so (the file's top level, so that each section
    is still checked)."""
    if not isinstance(data, Mapping):
        ctx.report(table[:-1], str(table[-1]) if table else None, f"expected a table, got {show(data)}")
        return None
    data = dict(data)
    set_aside: set[str] = set()
    while True:
        try:
            value = msgspec.convert(data, kind, dec_hook=_decode_hook)
            break
        except msgspec.ValidationError as exc:
            key, message = _explain(str(exc), kind, data)
            if key in data:
                ctx.report(table, key, message)
                set_aside.add(key)
                del data[key]
                continue
            # A missing key (said already if its bad value was set aside), or not a table.
            if not any(message == f"missing required key {k!r}" for k in set_aside):
                ctx.report(table, key, message)
            return None
    if set_aside:
        return value if partial else None
    problems = list(value.problems())
    for key, message in problems:
        ctx.report(table, key, message)
    return None if problems else value


def _explain(error: str, kind: type, data: dict) -> tuple[str | None, str]:
    """msgspec's message → (the key, what was expected and what was found)."""
    text, _, path = error.partition(" - at `")
    hints = get_type_hints(kind, include_extras=True)
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        key = m.group(1)
        close = difflib.get_close_matches(key, hints, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return key, f"unknown key{hint}; expected one of: {', '.join(sorted(hints))}"
    if m := re.fullmatch(r"Object missing required field `(.+)`", text):
        return None, f"missing required key {m.group(1)!r}"
    m = re.match(r"\$\.(\w+)", path)
    if m is None:
        return None, f"expected a table, got {show(data)}"
    key = m.group(1)
    if not text.startswith(("Expected `", "Invalid enum value")):  # `_decode_hook`'s own words
        return key, f"expected {text}" if text.startswith("a ") else text
    hint, value = _given(hints[key]), data[key]
    wrong_type = ", got `" in text
    if wrong_type and get_origin(hint) is Literal:
        return key, f"expected a string, got {show(value)}"
    # A number out of bounds or a string not among the choices is shown bare, as written.
    bare = not wrong_type and (get_origin(hint) is Literal or (
        get_origin(hint) is Annotated and get_args(hint)[0] in (int, float)))
    return key, f"expected {describe(hint)}, got {repr(value) if bare else show(value)}"


def _given(hint: Any) -> Any:
    """`X | None` → X: None only marks a key that was not given."""
    if get_origin(hint) in (Union, types.UnionType):
        kinds = [a for a in get_args(hint) if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def describe(hint: Any) -> str:
    """What a field's type accepts, in words: `Annotated[int, Meta(ge=1)]` → "an integer >= 1"
    (a `Meta(description=...)` says it instead)."""
    hint = _given(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        meta = next((a for a in args[1:] if isinstance(a, msgspec.Meta)), msgspec.Meta())
        if meta.description:
            return meta.description
        if args[0] is str and meta.min_length == 1:
            return "a non-empty string"
        bounds = [f"{op} {bound}" for op, bound in ((">=", meta.ge), (">", meta.gt), ("<=", meta.le),
                                                    ("<", meta.lt)) if bound is not None]
        return " ".join([describe(args[0]), " and ".join(bounds)]).rstrip()
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "a table", list: "an array", tuple: "an array"}
    return words.get(origin or hint, "a table")
