"""A request session: one per request, owning its text state.

A session turns a chat or a prompt into tokens (chat template, tools) and validates limits
(both in `front.requests`), submits through its `SessionContext` (the few things of the
runtime it uses), and turns the token stream back into typed events: text deltas (mlx-lm's
streaming detokenizer), tool calls (mlx-lm's tool parsers), logprobs, prefill progress (for
keep-alives), and a final `Done` with finish reason, usage and timings. Stop strings are
applied here, including one split across tokens.

A session runs in the task of whoever iterates it (an HTTP handler, embedding code): it is
an actor whose mailbox is its event channel from the dispatcher. Its contract:

- `start()` does every check that can refuse the request and raises a `RequestError`
  before anything is streamed; after it returns, the request is in the engine.
- Iterating yields events until `Done`. If the consumer is cancelled, or leaves early and
  calls `aclose()` (or exits `async with`), the request is aborted in the engine - without
  blocking, so it is safe inside a cancelled scope - and unregistered from the dispatcher.
- `receive_ready(deadline)` is the batch form for streaming: every event ready now, in one
  list, waiting until `deadline` for the first; reaching the deadline is not a cancellation
  (the request goes on), so a caller can time keep-alives without a task of its own.
"""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Union

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.messages import (
    Admitted,
    EngineInfo,
    Finished,
    FinishReason,
    PrefillProgress,
    Submit,
    TokenChoice,
    TokenDelta,
)
from omlx_actors.front.dispatcher import Dispatcher
from omlx_actors.front.requests import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    GenerationRequest,
    coerce_stop,
    fit_to_model,
    tokenize,
    tool_markers_grammar,
    validate_request,
)
from omlx_actors.front.structured import OutputKind, parse_tool_call
from omlx_actors.front.text import ParsedToolCall, StopStringMatcher, ToolCallScanner
from omlx_actors.refusals import DuplicateRequestId, EngineUnavailable


@attrs.frozen(kw_only=True)
class SessionContext:
    """What a session uses of its runtime, and nothing more. The `Runtime` builds one;
    anything with these attributes will do (a benchmark's fake runtime does)."""

    tokenizer: Any  # mlx-lm's TokenizerWrapper
    info: EngineInfo
    config: RuntimeConfig  # default_max_tokens, prefill_step_size
    max_context: int  # prompt + max_tokens may not exceed it (`Runtime.max_context`)
    dispatcher: Dispatcher  # register before submitting, unregister when done
    # Pins the prompt's cached prefix and submits; raises a `RequestError` if refused.
    submit: Callable[[Submit], Awaitable[None]]
    abort_nowait: Callable[[str], None]  # never blocks, never dropped


# ---------------------------------------------------------------------------------------
# Events a session yields


@attrs.frozen(kw_only=True)
class TextDelta:
    text: str
    tokens: tuple[TokenChoice, ...] = ()  # the tokens behind this text, logprobs included


@attrs.frozen(kw_only=True)
class ToolCall:
    id: str
    index: int
    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class Progress:
    """Prefill progress: `done` of `total` prompt tokens processed."""

    done: int
    total: int


@attrs.frozen(kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen(kw_only=True)
class Timings:
    queued_s: float | None
    ttft_s: float | None  # submit → first token
    total_s: float
    mean_itl_s: float | None  # mean inter-token latency


@attrs.frozen(kw_only=True)
class Done:
    finish_reason: str  # stop | length | tool_calls | abort | error
    usage: Usage
    timings: Timings
    error: str | None = None
    error_type: str | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did


SessionEvent = Union[TextDelta, ToolCall, Progress, Done]


class _EngineStopped:
    """Stands for the end of the dispatcher's channel: it closed before `Finished`."""


_ENGINE_STOPPED = _EngineStopped()

# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def unprinted_special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special (control) tokens that never reach the text: `<|im_start|>`,
    `<|endoftext|>` and the like, which a model may emit but no client should see as words.
    Tool-call and thinking markers stay text: the tool scanner and clients look for them.
    Computed once per tokenizer (the wrapper lives as long as its runtime)."""
    ids = getattr(tokenizer, "all_special_ids", None) or ()
    markers = {getattr(tokenizer, name, None) for name in
               ("tool_call_start", "tool_call_end", "think_start", "think_end")} - {None}
    if not markers:
        return frozenset(ids)
    names = tokenizer.convert_ids_to_tokens(list(ids))
    return frozenset(i for i, name in zip(ids, names) if name not in markers)

class Session:
    """One request's life on the front side. Build with `Runtime.chat` / `Runtime.complete`."""

    def __init__(self, context: SessionContext, request: GenerationRequest) -> None:
        self._ctx = context
        self._request = request
        self.request_id = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        self.prompt_tokens: tuple[int, ...] = ()
        self.max_tokens = 0
        self._events: trio.MemoryReceiveChannel | None = None
        self._started = False
        self._finished = False
        self._closed = False
        self._engine_done = False  # the engine sent Finished: nothing left to abort
        self._pending: deque[SessionEvent] = deque()
        self._completion_tokens = 0
        self.completion_token_ids: list[int] = []  # every token the engine delivered
        self._tool_calls: list[ParsedToolCall] = []
        self._t_submit = 0.0
        self._queued_s: float | None = None
        self._t_first: float | None = None
        self._t_last: float | None = None
        self._cached_tokens = 0

    # -- preparing (all refusals happen here) --------------------------------------------------

    async def start(self) -> None:
        """Tokenize, validate and submit. Raises a `RequestError` and leaves nothing behind
        if the request is refused; idempotent once it succeeded."""
        if self._started:
            return
        ctx = self._ctx
        req = self._request
        validate_request(req)
        self.prompt_tokens = await tokenize(req, ctx.tokenizer, ctx.max_context)
        req, self.max_tokens = fit_to_model(
            req, self.prompt_tokens, vocab=ctx.info.vocab_size, context=ctx.max_context,
            default_max_tokens=ctx.config.default_max_tokens,
        )
        self._request = req
        stop_ids = () if req.ignore_eos else ctx.info.eos_token_ids
        if req.structured is not None and req.structured.kind is OutputKind.TEXT_OR_TOOL_CALLS:
            self._request = req = attrs.evolve(
                req, structured=tool_markers_grammar(ctx.tokenizer, req.structured))
        self._events = ctx.dispatcher.register(self.request_id, self._channel_capacity())
        self._t_submit = time.monotonic()
        try:
            # The engine pins the prompt's cached prefix and admits it (or refuses) in one go.
            await ctx.submit(
                Submit(
                    request_id=self.request_id,
                    prompt_tokens=self.prompt_tokens,
                    max_tokens=self.max_tokens,
                    sampling=req.sampling,
                    stop_token_ids=tuple(stop_ids),
                    cache_scope=req.cache_scope,
                    grammar=req.structured.grammar if req.structured is not None else "",
                )
            )
        except BaseException:
            ctx.dispatcher.unregister(self.request_id)
            self._closed = True
            raise
        self._started = True
        self._prepare_stream(req, frozenset(stop_ids))

    def _prepare_stream(self, req: GenerationRequest, stop_ids: frozenset[int]) -> None:
        """The text state of a submitted request: detokenizer, stops, tool-call scanner."""
        tok = self._ctx.tokenizer
        self._detokenizer = tok.detokenizer
        self._stop_ids = stop_ids
        self._unprinted_ids = unprinted_special_ids(tok)
        self._stops = StopStringMatcher(tuple(req.stop))
        self._logprobs = req.sampling.logprobs
        self._scanner: ToolCallScanner | None = None
        self._structured = req.structured
        self._structured_text: list[str] = []
        free_text = req.structured is None or req.structured.kind is OutputKind.TEXT_OR_TOOL_CALLS
        if req.tools and free_text and getattr(tok, "has_tool_calling", False):
            self._scanner = ToolCallScanner(
                start=tok.tool_call_start, end=tok.tool_call_end, parse=tok.tool_parser,
                tools=list(req.tools),
            )

    def _channel_capacity(self) -> int:
        # A true upper bound on the events of one request, so the dispatcher can always
        # deliver without waiting: Admitted and Finished, at most one TokenDelta per token,
        # and at most one PrefillProgress per prompt token (a chunk prefills at least one).
        # Counting chunks at the configured step was not a bound: memory pressure shrinks
        # the step to 64, decoding rows hold it to `prefill_step_while_decoding`, and hybrid
        # prompts are cut at block ends too. A trio channel allocates nothing for its
        # capacity; it only bounds what a stalled reader may leave queued.
        return self.max_tokens + len(self.prompt_tokens) + 4

    # -- streaming ---------------------------------------------------------------------------

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> SessionEvent:
        await self._fill(math.inf)
        if not self._pending:
            raise StopAsyncIteration
        return self._pending.popleft()

    async def receive_ready(self, deadline: float = math.inf) -> list[SessionEvent]:
        """Every event ready now (the engine's events already queued are all processed),
        waiting until `deadline` (trio time) for at least one: `[]` if none came by then.
        Raises `trio.EndOfChannel` once there is nothing more: `Done` was taken, or the
        session was closed."""
        await self._fill(deadline)
        if not self._pending:
            if self._finished:
                raise trio.EndOfChannel
            return []
        batch = list(self._pending)
        self._pending.clear()
        return batch

    async def _fill(self, deadline: float) -> None:
        """Make some session event pending, processing engine events (waiting for them
        until `deadline`), then process whatever else is already queued, without waiting."""
        if not self._started:
            await self.start()  # its refusals leave nothing to close
        try:
            self._drain_ready()
            if not self._pending and not self._finished:
                if deadline == math.inf:
                    await self._wait_for_pending()
                else:
                    # Only here: a cancel scope costs more than the rest of a token's work.
                    with trio.CancelScope(deadline=deadline):
                        await self._wait_for_pending()
                self._drain_ready()
        except BaseException:
            self.close()  # cancelled or failed: the engine must not keep our request
            raise

    async def _wait_for_pending(self) -> None:
        # Not every engine event makes a session event (`Admitted` does not).
        while not self._pending and not self._finished:
            self._on_event(await self._receive())

    def _drain_ready(self) -> None:
        while not self._finished and (event := self._receive_nowait()) is not None:
            self._on_event(event)

    async def _receive(self) -> Any:
        assert self._events is not None
        try:
            return await self._events.receive()
        except trio.EndOfChannel:
            return _ENGINE_STOPPED

    def _receive_nowait(self) -> Any:
        """The next engine event if one is queued, else None."""
        assert self._events is not None
        try:
            return self._events.receive_nowait()
        except trio.WouldBlock:
            return None
        except trio.EndOfChannel:
            return _ENGINE_STOPPED

    def _on_event(self, event: Any) -> None:
        match event:
            case TokenDelta(tokens=tokens):  # first: all but a few events are tokens
                self._on_tokens(tokens)
            case Admitted(queued_s=queued_s):
                self._queued_s = queued_s
            case PrefillProgress(done=done, total=total):
                self._pending.append(Progress(done=done, total=total))
            case Finished(reason=reason, error=error, error_type=error_type):
                self._engine_done = True
                self._cached_tokens = event.cached_tokens
                if not self._finished:
                    self._finish_with(reason, error_type, error)
            case _EngineStopped():
                self._finish_with(FinishReason.ERROR, "EngineStopped", "the engine stopped unexpectedly")
            case other:
                raise TypeError(f"session got unknown event {other!r}")

    def _on_tokens(self, tokens: tuple[TokenChoice, ...]) -> None:
        now = time.monotonic()
        if self._t_first is None:
            self._t_first = now
        self._t_last = now
        if self._finished:
            return
        detokenizer = self._detokenizer
        for choice in tokens:
            token = choice.token
            self._completion_tokens += 1
            self.completion_token_ids.append(token)
            if token in self._stop_ids:
                continue  # the stop token ends the request; it is not text
            if token in self._unprinted_ids:
                self._emit_text("", (choice,))  # a control token: no text, its logprob kept
                continue
            detokenizer.add_token(token)
            self._emit_text(detokenizer.last_segment, (choice,))
            if self._finished:
                return

    def _emit_text(self, piece: str, tokens: tuple[TokenChoice, ...]) -> None:
        if self._structured is not None:
            self._structured_text.append(piece)
            if self._structured.kind is OutputKind.TOOL_CALL:
                return  # a forced call's text is its arguments, delivered as a ToolCall
            # TEXT_OR_TOOL_CALLS: text and calls flow through the scanner as unconstrained
        if self._scanner is not None:
            piece, calls = self._scanner.feed(piece)
            for call in calls:
                self._tool_calls.append(call)
                self._pending.append(
                    ToolCall(
                        id=f"call_{uuid.uuid4().hex[:24]}",
                        index=call.index,
                        name=call.name,
                        arguments=call.arguments,
                    )
                )
        text, stopped = self._stops.feed(piece)
        if text or (tokens and self._logprobs):
            self._pending.append(TextDelta(text=text, tokens=tokens))
        if stopped:
            self._finish_with(FinishReason.STOP, None, None, abort_engine=True)

    def _finish_with(
        self,
        reason: FinishReason,
        error_type: str | None,
        error: str | None,
        *,
        abort_engine: bool = False,
    ) -> None:
        if reason in (FinishReason.STOP, FinishReason.LENGTH) and not abort_engine:
            self._detokenizer.finalize()
            self._emit_text(self._detokenizer.last_segment, ())
        if not self._stops.stopped:
            tail = self._scanner.flush() if self._scanner is not None else ""
            text = self._stops.feed(tail)[0] + self._stops.flush()
            if text:
                self._pending.append(TextDelta(text=text))
        if self._finished:
            return
        if self._structured is not None and reason is FinishReason.STOP:
            reason, error_type, error = self._complete_structured()
        self._finished = True
        finish_reason = reason.value
        if self._tool_calls and reason in (FinishReason.STOP, FinishReason.LENGTH):
            finish_reason = "tool_calls"
        now = time.monotonic()
        itl = None
        if self._t_first is not None and self._t_last is not None and self._completion_tokens > 1:
            itl = (self._t_last - self._t_first) / (self._completion_tokens - 1)
        self._pending.append(
            Done(
                finish_reason=finish_reason,
                usage=Usage(
                    prompt_tokens=len(self.prompt_tokens),
                    completion_tokens=self._completion_tokens,
                    cached_tokens=self._cached_tokens,
                ),
                timings=Timings(
                    queued_s=self._queued_s,
                    ttft_s=None if self._t_first is None else self._t_first - self._t_submit,
                    total_s=now - self._t_submit,
                    mean_itl_s=itl,
                ),
                error=error,
                error_type=error_type,
                stop_sequence=self._stops.matched,
            )
        )
        if abort_engine and not self._engine_done:
            self._engine_done = True
            self._ctx.abort_nowait(self.request_id)
        self._release()

    def _complete_structured(self) -> tuple[FinishReason, str | None, str | None]:
        """A constrained request the engine ended with a stop token: its grammar accepted
        the text, so it parses. Checked again here anyway (fail closed: a text that does
        not parse ends as an error, never as `stop`); a forced call becomes a ToolCall."""
        text = "".join(self._structured_text)
        if self._structured.kind is OutputKind.TEXT_OR_TOOL_CALLS:
            return FinishReason.STOP, None, None  # free text; the scanner parsed each call
        try:
            if self._structured.kind is OutputKind.TOOL_CALL:
                name, arguments = parse_tool_call(self._structured, text)
                call = ParsedToolCall(index=0, name=name, arguments=arguments)
                self._tool_calls.append(call)
                self._pending.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", index=0,
                                              name=name, arguments=arguments))
            else:
                json.loads(text)
        except (ValueError, KeyError, TypeError) as exc:
            return FinishReason.ERROR, "GrammarViolation", f"structured output does not parse: {exc}"
        return FinishReason.STOP, None, None

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Abort the request if it is still running and forget it. Never blocks; safe in a
        cancelled scope; idempotent."""
        if self._started and not self._engine_done:
            self._finished = True
            self._engine_done = True
            self._ctx.abort_nowait(self.request_id)
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._ctx.dispatcher.unregister(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    # -- convenience -------------------------------------------------------------------------

    async def collect(self) -> tuple[str, list[ToolCall], Done]:
        """Run to the end; return the whole text, the tool calls and the final event."""
        parts: list[str] = []
        calls: list[ToolCall] = []
        done: Done | None = None
        async with self:
            async for event in self:
                match event:
                    case TextDelta(text=text):
                        parts.append(text)
                    case ToolCall():
                        calls.append(event)
                    case Done():
                        done = event
        assert done is not None
        return "".join(parts), calls, done


__all__ = [  # the request names too, for the callers that read them from here
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_STRINGS",
    "Done",
    "DuplicateRequestId",
    "EngineUnavailable",
    "GenerationRequest",
    "Progress",
    "Session",
    "SessionContext",
    "SessionEvent",
    "TextDelta",
    "Timings",
    "ToolCall",
    "Usage",
    "coerce_stop",
]
