"""Pure text-side pieces of a session: stop strings, tool-call extraction, and counting a
long prompt's tokens in pieces.

No trio, no MLX: tested on plain strings (the count with any `encode` function). The
session feeds the matchers detokenized text in the pieces it arrives in, which may split a
stop string or a tool-call marker anywhere.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs


def held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`: text that may
    be the start of the marker, to hold until the next piece.

    Quadratic in the marker's length (no table to build): for the tokenizer's own short
    markers (tool-call tags). Stop strings, which clients choose, use `StopStringMatcher`."""
    longest = min(len(marker) - 1, len(text))
    if longest <= 0 or marker[0] not in text[-longest:]:  # the common case, in one C call
        return 0
    return next((n for n in range(longest, 0, -1) if text.endswith(marker[:n])), 0)


@attrs.define
class _StopAutomaton:
    """Knuth-Morris-Pratt matching of one stop string over text fed piece by piece: time
    linear in the text fed, memory linear in the stop string (one int per character)."""

    stop: str
    # _border[i]: length of the longest proper prefix of stop[: i + 1] that is also its end.
    _border: array = attrs.field(init=False)
    # Length of the longest end of the text fed so far that is a proper prefix of `stop`.
    state: int = 0

    def __attrs_post_init__(self) -> None:
        stop = self.stop
        border = array("i", [0]) * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = border[k - 1]
            if stop[i] == stop[k]:
                k += 1
            border[i] = k
        self._border = border

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; the index in `piece` just past the first occurrence of the
        stop string that ends in it, or None (then `state` says how much may start one)."""
        stop, border, k = self.stop, self._border, self.state
        if k == 0 and stop[0] not in piece:  # the common case, in one C call
            return None
        last = len(stop)
        for i, char in enumerate(piece):
            while k and char != stop[k]:
                k = border[k - 1]
            if char == stop[k]:
                k += 1
                if k == last:
                    self.state = border[k - 1]
                    return i + 1
        self.state = k
        return None


@attrs.define
class StopStringMatcher:
    """Holds back just enough text to recognise a stop string split across pieces.

    `feed(piece)` returns `(text_to_emit, stopped)`. Text is released as soon as it can no
    longer be the start of a stop string; the text ends where a stop string first ends (the
    longest of those ending there), so the result does not depend on how the text was split;
    the text before that stop string is released and nothing after it ever is. `flush()`
    releases what is held at the end. Time is linear in the text fed (per stop string),
    memory linear in the stop strings' length: callers bound their count and length.
    """

    stops: tuple[str, ...]
    _held: str = ""
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the text
    _automata: tuple[_StopAutomaton, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._automata = tuple(_StopAutomaton(s) for s in self.stops if s)

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + piece
        if not self._automata:
            self._held = ""
            return text, False
        first: tuple[int, int, str] | None = None  # (end in piece, -length, stop string)
        for automaton in self._automata:
            end = automaton.feed(piece)
            if end is not None:
                candidate = (end, -len(automaton.stop), automaton.stop)
                first = candidate if first is None else min(first, candidate)
        if first is not None:
            self.stopped = True
            self.matched = first[2]
            self._held = ""
            # The match ends `first[0]` characters into the piece and is -first[1] long.
            return text[: len(text) - len(piece) + first[0] + first[1]], True
        keep = max(a.state for a in self._automata)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


# Characters per piece when a long prompt is counted piece by piece (`tokens_at_least`):
# small enough that the count stops soon after the context is passed, large enough that
# the cuts' slack is noise (about 4,000 tokens of text per 8 tokens of slack).
COUNT_PIECE_CHARS = 16_384
# How much a cut between two pieces may change the count: tokenizers merge characters
# within words (their pre-tokenizers split at whitespace), pieces are cut before
# whitespace where there is some, so a cut changes a token or two. The count subtracts this
# per cut, so it stays a lower bound.
CUT_SLACK_TOKENS = 8


def tokens_at_least(
    text: str, encode: Callable[[str], Sequence[int]], limit: int, *, piece_chars: int = COUNT_PIECE_CHARS
) -> int:
    """A lower bound of the number of tokens of `text`, found by encoding it in pieces of
    about `piece_chars` characters and stopping as soon as the bound reaches `limit`: the
    work and memory are those of about `limit` tokens plus a piece, however long the text.
    Below `limit`, the whole text was encoded and the bound is its count less the slack."""
    count = cuts = start = 0
    while start < len(text):
        end = start + piece_chars
        if end < len(text):
            cuts += 1
            space = max(text.rfind(" ", start + piece_chars // 2, end),
                        text.rfind("\n", start + piece_chars // 2, end))
            end = space if space > start else end
        count += len(encode(text[start:end]))
        if count - CUT_SLACK_TOKENS * cuts >= limit:
            break
        start = end
    return count - CUT_SLACK_TOKENS * cuts


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
                    keep = held_back(self._buffer, self.start)
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
