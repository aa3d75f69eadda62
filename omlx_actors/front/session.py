"""A request session: one per request, owning its text state.

A session turns a chat or a prompt into tokens (chat template, tools), validates limits,
submits to the executor, and turns the token stream back into typed events: text deltas
(mlx-lm's streaming detokenizer), tool calls (mlx-lm's tool parsers), logprobs, prefill
progress (for keep-alives), and a final `Done` with finish reason, usage and timings. Stop
strings are applied here, including one split across tokens.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import attrs
import trio

from omlx_actors.engine.messages import (
    Admitted,
    Finished,
    FinishReason,
    PrefillProgress,
    SamplingParams,
    Submit,
    TokenChoice,
    TokenDelta,
)
from omlx_actors.refusals import (
    ContextLengthExceeded,
    DuplicateRequestId,
    EngineUnavailable,
    InvalidRequest,
)
from omlx_actors.front.text import ParsedToolCall, StopStringMatcher, ToolCallScanner, tokens_at_least
from omlx_actors.front.structured import OutputKind, StructuredOutput, parse_tool_call, with_tool_markers

if TYPE_CHECKING:
    from omlx_actors.front.runtime import Runtime

# Prompts longer than this many characters are tokenized on a worker thread so a 100k-token
# prompt does not stall the event loop (tokenizers release the GIL).
TOKENIZE_OFF_LOOP_CHARS = 20_000
# A prompt with more characters than this many per token of the context is counted in pieces
# before it is tokenized whole: past the context the count stops early, so refusing a
# multi-megabyte prompt costs about a context's worth of tokenizing. Text averages 3-4
# characters per token, so a prompt that fits rarely pays for the count.
COUNT_IN_PIECES_ABOVE_CHARS_PER_TOKEN = 4

# Stop strings per request, and characters per stop string: matching costs time linear in
# the generated text per stop string and memory linear in their length (`StopStringMatcher`),
# so these bound both; past them the request is refused (400).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_TOP_LOGPROBS = 20

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


@attrs.frozen(kw_only=True)
class GenerationRequest:
    """What a caller asks for, before tokenization. Either `messages` (chat) or `prompt`."""

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    ignore_eos: bool = False
    request_id: str | None = None
    cache_scope: str = ""
    # Constrain the output to a grammar (response_format, a forced tool call); None: free.
    structured: StructuredOutput | None = None


def validate_sampling(p: SamplingParams) -> None:
    """Raise `InvalidRequest` naming the offending parameter."""
    if not 0.0 <= p.temperature <= 100.0:
        raise InvalidRequest("temperature must be between 0 and 100", param="temperature")
    if not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if p.top_k < 0:
        raise InvalidRequest("top_k must be >= 0", param="top_k")
    if not 0.0 <= p.min_p <= 1.0:
        raise InvalidRequest("min_p must be in [0, 1]", param="min_p")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise InvalidRequest(f"{name} must be in [-2, 2]", param=name)
    if p.repetition_penalty is not None and not 0.0 < p.repetition_penalty <= 10.0:
        raise InvalidRequest("repetition_penalty must be in (0, 10]", param="repetition_penalty")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        raise InvalidRequest("seed must be in [0, 2**64)", param="seed")



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

    def __init__(self, runtime: Runtime, request: GenerationRequest) -> None:
        self._rt = runtime
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
        rt = self._rt
        req = self._request
        validate_sampling(req.sampling)
        if len(req.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not isinstance(s, str) or not s for s in req.stop):
            raise InvalidRequest("stop strings must be non-empty strings", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in req.stop):
            raise InvalidRequest(
                f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters", param="stop"
            )
        if req.structured is not None and req.stop:
            # A stop string could cut the JSON short and pass it off as finished.
            raise InvalidRequest("stop strings cannot be combined with structured output", param="stop")
        if req.structured is not None and req.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with structured output", param="ignore_eos")
        self.prompt_tokens = await self._tokenize()
        if not self.prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = rt.info.vocab_size
        if vocab and any(not 0 <= t < vocab for t in self.prompt_tokens):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
        if vocab and req.sampling.top_k >= vocab:
            # Keeping the top `vocab` tokens keeps them all (mlx-lm refuses k >= vocab).
            self._request = req = attrs.evolve(req, sampling=attrs.evolve(req.sampling, top_k=0))
        for token, _ in req.sampling.logit_bias:
            if vocab and not 0 <= token < vocab:
                raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary", param="logit_bias")
        context = rt.max_context
        room = context - len(self.prompt_tokens)
        if room <= 0:
            raise ContextLengthExceeded(
                f"the prompt has {len(self.prompt_tokens)} tokens; this model's context is "
                f"{context} tokens",
                param="messages" if req.messages is not None else "prompt",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else rt.config.default_max_tokens
        if max_tokens <= 0:
            raise InvalidRequest("max_tokens must be >= 1", param="max_tokens")
        if max_tokens > room:
            if req.max_tokens is not None:
                raise ContextLengthExceeded(
                    f"prompt ({len(self.prompt_tokens)} tokens) + max_tokens ({max_tokens}) "
                    f"exceeds this model's context of {context} tokens",
                    param="max_tokens",
                )
            max_tokens = room
        self.max_tokens = max_tokens
        stop_ids = () if req.ignore_eos else rt.info.eos_token_ids
        if req.structured is not None and req.structured.kind is OutputKind.TEXT_OR_TOOL_CALLS:
            self._request = req = attrs.evolve(req, structured=self._tool_markers_grammar(req.structured))
        self._events = rt.dispatcher.register(self.request_id, self._channel_capacity())
        self._t_submit = time.monotonic()
        try:
            # The engine pins the prompt's cached prefix and admits it (or refuses) in one go.
            await rt.submit(
                Submit(
                    request_id=self.request_id,
                    prompt_tokens=self.prompt_tokens,
                    max_tokens=max_tokens,
                    sampling=req.sampling,
                    stop_token_ids=tuple(stop_ids),
                    cache_scope=req.cache_scope,
                    grammar=req.structured.grammar if req.structured is not None else "",
                )
            )
        except BaseException:
            rt.dispatcher.unregister(self.request_id)
            self._closed = True
            raise
        self._started = True
        tok = rt.tokenizer
        self._detokenizer = tok.detokenizer
        self._stop_ids = frozenset(stop_ids)
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

    def _tool_markers_grammar(self, output: StructuredOutput) -> StructuredOutput:
        """Strict tools under tool_choice auto: the grammar around the tokenizer's tool-call
        markers (`structured.with_tool_markers`). A tokenizer without markers has no call
        to constrain: refused, never served unconstrained."""
        tok = self._rt.tokenizer
        if not getattr(tok, "has_tool_calling", False):
            raise InvalidRequest("strict tools need a model whose tokenizer has tool-call markers "
                                 "(this one has none, so a call could not be constrained)",
                                 param="tools")
        start, end = tok.tool_call_start, tok.tool_call_end
        return with_tool_markers(output, start=start, end=end,
                                 start_ids=list(tok.encode(start, add_special_tokens=False)),
                                 end_ids=list(tok.encode(end, add_special_tokens=False)))

    def _channel_capacity(self) -> int:
        # One event per step at most for tokens, one per prefill chunk, plus Admitted and
        # Finished: the dispatcher can always deliver without waiting.
        chunks = len(self.prompt_tokens) // self._rt.config.prefill_step_size + 2
        return self.max_tokens + chunks + 4

    async def _tokenize(self) -> tuple[int, ...]:
        """The prompt's tokens. A prompt that surely exceeds the context is refused
        (`ContextLengthExceeded`) without being tokenized whole: first by a bound from its
        length in characters (no token is longer than the vocabulary's longest entry), then
        by counting it in pieces (`tokens_at_least`) when it is long for the context; the
        chat template only ever renders messages within the first bound. Long inputs are
        prepared on a worker thread, so the event loop keeps serving meanwhile."""
        req = self._request
        rt = self._rt
        tok = rt.tokenizer
        context = rt.max_context
        param = "messages" if req.messages is not None else "prompt"
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages must not be empty", param="messages")
            messages, tools = list(req.messages), list(req.tools) if req.tools else None
            # What the template will surely copy into the prompt: the messages' text.
            known_chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))

            def render() -> str:
                return tok.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=False
                )

            def encode(text: str) -> list[int]:
                return tok.encode(text, add_special_tokens=False)

            size = _input_size(messages, tools)
        elif isinstance(req.prompt, str):
            prompt = req.prompt
            known_chars = size = len(prompt)

            def render() -> str:
                return prompt

            def encode(text: str) -> list[int]:
                return tok.encode(text)

        elif req.prompt is not None:
            if len(req.prompt) >= context:
                raise _context_exceeded(len(req.prompt), context, param, exact=True)
            return tuple(int(t) for t in req.prompt)
        else:
            raise InvalidRequest("either messages or prompt is required", param="messages")
        token_chars = max_token_chars(tok)

        def prepare() -> tuple[int, ...] | int:
            """The tokens, or a lower bound of their count that reaches the context."""
            if token_chars and known_chars // token_chars >= context:
                return known_chars // token_chars  # not even rendered
            text = render()
            if token_chars and len(text) // token_chars >= context:
                return len(text) // token_chars
            if len(text) > COUNT_IN_PIECES_ABOVE_CHARS_PER_TOKEN * context:
                at_least = tokens_at_least(text, lambda piece: tok.encode(piece, add_special_tokens=False),
                                           context)
                if at_least >= context:
                    return at_least
            return tuple(int(t) for t in encode(text))

        try:
            if size > TOKENIZE_OFF_LOOP_CHARS:
                prepared = await trio.to_thread.run_sync(prepare)
            else:
                prepared = prepare()
        except Exception as exc:  # noqa: BLE001 - template/tokenizer failures are the input's
            raise InvalidRequest(f"could not tokenize the input: {exc}", param="messages") from exc
        if isinstance(prepared, int):
            raise _context_exceeded(prepared, context, param, exact=False)
        return prepared

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
            self._rt.abort_nowait(self.request_id)
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
            self._rt.abort_nowait(self.request_id)
        self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._rt.dispatcher.unregister(self.request_id)

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


def _context_exceeded(tokens: int, context: int, param: str, *, exact: bool) -> ContextLengthExceeded:
    count = f"{tokens}" if exact else f"at least {tokens}"
    return ContextLengthExceeded(
        f"the prompt has {count} tokens; this model's context is {context} tokens", param=param
    )


def _input_size(messages: list[dict[str, Any]], tools: list[Any] | None) -> int:
    """About how many characters a chat's template will render, to choose where to render
    it. Past a few hundred items the answer is "large" without looking further."""
    if len(messages) + len(tools or ()) > 256:
        return TOKENIZE_OFF_LOOP_CHARS + 1
    size = sum(len(c) if isinstance(c := m.get("content"), str) else len(repr(m)) for m in messages)
    return size + (len(repr(tools)) if tools else 0)


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` can stand for: its vocabulary's longest
    entry (byte-level vocabularies spell each byte as one character, SentencePiece spells
    a space as one); 0 if the vocabulary cannot be read, which disables the bound."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - any tokenizer without a readable vocabulary
        return 0
    return max(map(len, vocab), default=0)


def coerce_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


__all__ = [
    "Done",
    "DuplicateRequestId",
    "EngineUnavailable",
    "GenerationRequest",
    "Progress",
    "Session",
    "SessionEvent",
    "TextDelta",
    "Timings",
    "ToolCall",
    "Usage",
    "coerce_stop",
]
