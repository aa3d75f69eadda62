"""Reading TOML tables with checked types and located, readable errors.

`Table` wraps one parsed table: its typed getters (`int`, `float`, `str`, `ints`, `range`,
`size`, ...) record a problem - file:line, table, key, what was expected, what was found -
instead of raising, and `finish()` rejects the keys nobody asked for (suggesting the closest
known one). `Context` collects the problems in file order and finds a key's line back in
the source, since `tomllib` does not keep positions. Also byte sizes (`ByteSize`).

Pure: no trio, no MLX.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import attrs

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


REQUIRED = object()  # a getter default: the key must be present


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


class Table:
    """Reads one TOML table: typed getters record problems instead of raising, and
    `finish()` rejects the keys nobody asked for."""

    def __init__(self, ctx: Context, data: Any, table: tuple):
        self.ctx = ctx
        self.table = table
        self.known: list[str] = []
        if not isinstance(data, Mapping):
            ctx.report(table[:-1], str(table[-1]) if table else None,
                       f"expected a table, got {show(data)}")
            data = {}
        self.data = dict(data)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any) -> Any:
        """The raw value (marking the key as known); a missing required key is reported."""
        self.known.append(key)
        if key not in self.data:
            if default is REQUIRED:
                self.ctx.report(self.table, None, f"missing required key {key!r}")
            return default
        return self.data[key]

    def bad(self, key: str, message: str) -> None:
        self.ctx.report(self.table, key, message)

    def str(self, key: str, default: Any = REQUIRED, choices: tuple[str, ...] | None = None):
        value = self.get(key, default)
        if value is default:
            return None if default is REQUIRED else default
        if not isinstance(value, str):
            self.bad(key, f"expected a string, got {show(value)}")
            return None if default is REQUIRED else default
        if choices is not None and value not in choices:
            self.bad(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
            return default if default is not REQUIRED else None
        return value

    def int(self, key: str, default: Any = REQUIRED, minimum: int | None = None):
        value = self.get(key, default)
        if value is default:
            return None if default is REQUIRED else default
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, f"expected an integer{_bound(minimum)}, got {show(value)}")
            return None if default is REQUIRED else default
        if minimum is not None and value < minimum:
            self.bad(key, f"expected an integer{_bound(minimum)}, got {value}")
            return None if default is REQUIRED else default
        return value

    def float(self, key: str, default: Any = REQUIRED, minimum: float | None = None,
              maximum: float | None = None, positive: bool = False):
        value = self.get(key, default)
        if value is default:
            return None if default is REQUIRED else default
        what = "a number" + (" > 0" if positive else _bound(minimum)) + (
            f" and <= {maximum}" if maximum is not None else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(key, f"expected {what}, got {show(value)}")
            return None if default is REQUIRED else default
        if ((positive and value <= 0) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            self.bad(key, f"expected {what}, got {value}")
            return None if default is REQUIRED else default
        return float(value)

    def bool(self, key: str, default: Any = REQUIRED):
        value = self.get(key, default)
        if value is default:
            return default
        if not isinstance(value, bool):
            self.bad(key, f"expected true or false, got {show(value)}")
            return default
        return value

    def ints(self, key: str, default: Any, minimum: int | None = None) -> Any:
        """An integer or an array of integers → a tuple."""
        value = self.get(key, default)
        if value is default:
            return default
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items) or (
            minimum is not None and any(v < minimum for v in items)
        ):
            self.bad(key, f"expected an integer{_bound(minimum)} or a non-empty array of them, "
                          f"got {show(value)}")
            return default
        return tuple(items)

    def strs(self, key: str, default: Any) -> Any:
        value = self.get(key, default)
        if value is default:
            return default
        items = value if isinstance(value, list) else [value]
        if any(not isinstance(v, str) or not v for v in items):
            self.bad(key, f"expected a string or an array of non-empty strings, got {show(value)}")
            return default
        return tuple(items)

    def range(self, key: str, kind: type, minimum: float) -> Any:
        """A number, or [low, high] → (low, high)."""
        value = self.get(key, None)
        if value is None:
            return None
        items = value if isinstance(value, list) else [value, value]
        name = "an integer" if kind is int else "a number"
        ok = len(items) == 2 and all(
            not isinstance(v, bool) and isinstance(v, (int,) if kind is int else (int, float))
            and v >= minimum for v in items
        ) and items[0] <= items[1]
        if not ok:
            self.bad(key, f"expected {name} >= {minimum} or [low, high] with low <= high, "
                          f"got {show(value)}")
            return None
        return (kind(items[0]), kind(items[1]))

    def size(self, key: str) -> ByteSize | None:
        value = self.get(key, None)
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            self.bad(key, f"expected {exc}" if str(exc).startswith("a ") else str(exc))
            return None

    def sub(self, key: str) -> Table | None:
        value = self.get(key, None)
        if value is None:
            return None
        return Table(self.ctx, value, self.table + (key,))

    def finish(self) -> None:
        for key in self.data:
            if key not in self.known:
                close = difflib.get_close_matches(key, self.known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.bad(key, f"unknown key{hint}; expected one of: {', '.join(sorted(self.known))}")


def _bound(minimum) -> str:
    return "" if minimum is None else f" >= {minimum}"
