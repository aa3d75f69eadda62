"""Pure text-side pieces of a session: stop strings and tool-call extraction.

No trio, no MLX: tested on plain strings. The session feeds them detokenized text in the
pieces it arrives in, which may split a stop string or a tool-call marker anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs


def proper_prefixes(markers: Sequence[str]) -> tuple[str, ...]:
    """Every proper prefix of `markers` (stop strings, tool-call tags), longest first."""
    return tuple(sorted({m[:n] for m in markers for n in range(1, len(m))}, key=len, reverse=True))


def held_back(text: str, prefixes: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is one of `prefixes` (`proper_prefixes`
    of some markers): text that may be the start of a marker, to hold until the next piece."""
    if not text.endswith(prefixes):  # one C call for the common case: nothing to hold
        return 0
    return next(len(p) for p in prefixes if text.endswith(p))


@attrs.define
class StopStringMatcher:
    """Holds back just enough text to recognise a stop string split across pieces.

    `feed(piece)` returns `(text_to_emit, stopped)`. Text is released as soon as it can no
    longer be the start of a stop string; on a match, the text before the stop string is
    released and nothing after it ever is. `flush()` releases what is held at the end.
    """

    stops: tuple[str, ...]
    _held: str = ""
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the text
    _prefixes: tuple[str, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._prefixes = proper_prefixes(self.stops)

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        if not self.stops:
            self._held = ""
            return text, False
        first = min(
            ((i, s) for s in self.stops if (i := text.find(s)) >= 0),
            default=None,
        )
        if first is not None:
            self.stopped = True
            self.matched = first[1]
            self._held = ""
            return text[: first[0]], True
        keep = held_back(text, self._prefixes)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


@attrs.frozen(kw_only=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI and Anthropic wires carry it
    index: int


@attrs.define
class ToolCallScanner:
    """Splits generated text into plain text and tool calls delimited by the tokenizer's
    markers (mlx-lm's `tool_call_start` / `tool_call_end`), parsed by mlx-lm's parser.

    `feed(piece)` returns `(text, calls)`: text outside tool calls (a partial start marker
    is held back), and the calls completed by this piece. `flush()` returns what is left; an
    unterminated or unparsable call is returned as text so nothing generated is lost.
    """

    start: str
    end: str
    parse: Callable[[str, Any], Any]
    tools: Sequence[Any] | None = None
    _buffer: str = ""
    _in_call: bool = False
    _count: int = 0
    _start_prefixes: tuple[str, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._start_prefixes = proper_prefixes((self.start,))

    def feed(self, piece: str) -> tuple[str, list[ParsedToolCall]]:
        self._buffer += piece
        out: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            if not self._in_call:
                i = self._buffer.find(self.start)
                if i < 0:
                    keep = held_back(self._buffer, self._start_prefixes)
                    out.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                out.append(self._buffer[:i])
                self._buffer = self._buffer[i + len(self.start) :]
                self._in_call = True
            else:
                j = self._buffer.find(self.end)
                if j < 0:
                    break
                body, self._buffer = self._buffer[:j], self._buffer[j + len(self.end) :]
                self._in_call = False
                parsed = self._parse(body)
                if parsed is None:
                    out.append(self.start + body + self.end)
                else:
                    calls.extend(parsed)
        return "".join(out), calls

    def flush(self) -> str:
        text = (self.start if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return text

    def _parse(self, body: str) -> list[ParsedToolCall] | None:
        import json

        try:
            parsed = self.parse(body, self.tools)
        except Exception:  # noqa: BLE001 - a malformed call stays visible as text
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for item in items:
            if not isinstance(item, dict) or "name" not in item:
                return None
            arguments = item.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            calls.append(ParsedToolCall(name=str(item["name"]), arguments=arguments, index=self._count))
            self._count += 1
        return calls
