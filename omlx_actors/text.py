"""Pure text-side pieces of a session: stop strings and tool-call extraction.

No trio, no MLX: tested on plain strings. The session feeds them detokenized text in the
pieces it arrives in, which may split a stop string or a tool-call marker anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs


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
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


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

    def feed(self, piece: str) -> tuple[str, list[ParsedToolCall]]:
        self._buffer += piece
        out: list[str] = []
        calls: list[ParsedToolCall] = []
        while True:
            if not self._in_call:
                i = self._buffer.find(self.start)
                if i < 0:
                    keep = _partial_suffix(self._buffer, self.start)
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


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
