"""A request before it reaches the engine: what a caller asks for (`GenerationRequest`), and
every check that can refuse it, in the order `Session.start` runs them.

- `validate_request`: sampling settings, stop strings, option combinations;
- `tokenize`: the chat template and the tokenizer, refusing a prompt past the context
  before it is tokenized whole (long inputs on a worker thread);
- `fit_to_model`: token ids inside the vocabulary, prompt + max_tokens inside the context.

Each refusal is a `refusals.RequestError` naming the offending parameter; none leaves
anything behind.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from omlx_actors.engine.messages import SamplingParams
from omlx_actors.front.structured import StructuredOutput, with_tool_markers
from omlx_actors.front.text import tokens_at_least
from omlx_actors.refusals import ContextLengthExceeded, InvalidRequest

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


def validate_request(req: GenerationRequest) -> None:
    """The checks that need no tokenizer: sampling, stop strings, option combinations."""
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


def fit_to_model(req: GenerationRequest, prompt_tokens: tuple[int, ...], *, vocab: int,
                 context: int, default_max_tokens: int) -> tuple[GenerationRequest, int]:
    """The request as the engine will run it, and its max_tokens: token ids checked against
    the vocabulary (`vocab` 0: unknown, not checked), a `top_k` that keeps the whole
    vocabulary dropped, and max_tokens fitted to the context - refused if the caller's
    explicit max_tokens does not fit, else cut to the room left."""
    if not prompt_tokens:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if vocab and any(not 0 <= t < vocab for t in prompt_tokens):
        raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
    if vocab and req.sampling.top_k >= vocab:
        # Keeping the top `vocab` tokens keeps them all (mlx-lm refuses k >= vocab).
        req = attrs.evolve(req, sampling=attrs.evolve(req.sampling, top_k=0))
    for token, _ in req.sampling.logit_bias:
        if vocab and not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary", param="logit_bias")
    room = context - len(prompt_tokens)
    if room <= 0:
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt_tokens)} tokens; this model's context is "
            f"{context} tokens",
            param="messages" if req.messages is not None else "prompt",
        )
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    if max_tokens <= 0:
        raise InvalidRequest("max_tokens must be >= 1", param="max_tokens")
    if max_tokens > room:
        if req.max_tokens is not None:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_tokens)} tokens) + max_tokens ({max_tokens}) "
                f"exceeds this model's context of {context} tokens",
                param="max_tokens",
            )
        max_tokens = room
    return req, max_tokens


async def tokenize(req: GenerationRequest, tok: Any, context: int) -> tuple[int, ...]:
    """The prompt's tokens. A prompt that surely exceeds the context is refused
    (`ContextLengthExceeded`) without being tokenized whole: first by a bound from its
    length in characters (no token is longer than the vocabulary's longest entry), then
    by counting it in pieces (`tokens_at_least`) when it is long for the context; the
    chat template only ever renders messages within the first bound. Long inputs are
    prepared on a worker thread, so the event loop keeps serving meanwhile."""
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


def tool_markers_grammar(tok: Any, output: StructuredOutput) -> StructuredOutput:
    """Strict tools under tool_choice auto: the grammar around the tokenizer's tool-call
    markers (`structured.with_tool_markers`). A tokenizer without markers has no call
    to constrain: refused, never served unconstrained."""
    if not getattr(tok, "has_tool_calling", False):
        raise InvalidRequest("strict tools need a model whose tokenizer has tool-call markers "
                             "(this one has none, so a call could not be constrained)",
                             param="tools")
    start, end = tok.tool_call_start, tok.tool_call_end
    return with_tool_markers(output, start=start, end=end,
                             start_ids=list(tok.encode(start, add_special_tokens=False)),
                             end_ids=list(tok.encode(end, add_special_tokens=False)))


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
