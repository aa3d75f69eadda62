"""OpenAI routes: `POST /v1/chat/completions` and `POST /v1/completions`.

Each is a thin layer over `Runtime.chat` / `Runtime.complete`: decode and validate the
body, map it to a session, `start()` it (every refusal answers here with its status), then
either collect the events into one JSON answer or stream them as SSE chunks ending with
`data: [DONE]`. A failure after the stream began ends it with a `data: {"error": ...}`
chunk, then `data: [DONE]`.

Behaviour worth knowing: an absent `temperature` means greedy decoding (as mlx-lm's
server); `n` and `best_of` must be 1; `tool_choice` "required" or a named function needs
`tools` (holding that function) and then constrains the output to a call of it whose
arguments match its `parameters` (`omlx_actors.front.structured`); a `strict` tool under "auto"
lets the model answer in text or call, its calls matching the tools; "none" hides the tools; JSON
`response_format`s (json_object, json_schema) constrain the text to their schema, and a
schema llguidance cannot compile is a 400 naming what it lacks. Non-standard fields: `ignore_eos`, `top_k`, `min_p`,
`repetition_penalty`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from omlx_actors.engine.messages import SamplingParams, TokenChoice
from omlx_actors.refusals import InvalidRequest
from omlx_actors.http.exchange import (
    Served,
    ServerState,
    check_model,
    collect,
    failed_done,
    json_response,
    read_body,
    serve_model,
    start_session,
    stream_after_load,
    stream_response,
    waits_for_load,
)
from omlx_actors.http.wire_errors import ApiError, WireError, invalid
from omlx_actors.http.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    SEED_MAX,
    SEED_MIN,
    OpenAISampling,
    RefusalPart,
    TextPart,
)
from omlx_actors.http.sse import KEEPALIVE_COMMENT, StreamBroken, sse_data, sse_template
from omlx_actors.front.session import Done, Progress, TextDelta, ToolCall, Usage
from omlx_actors.front.structured import (
    StructuredOutput,
    response_format_output,
    strict_tools_output,
    tool_call_output,
)

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
DONE_FRAME = b"data: [DONE]\n\n"
SEED_MODULUS = 2**64


def register(app, state: ServerState) -> None:
    @app.post(CHAT_ROUTE)
    async def chat_completions():
        body = await read_body(ChatCompletionRequest)
        check_model(state, body.model)
        _check_common(body)
        if body.top_logprobs and not body.logprobs:
            raise invalid("top_logprobs requires logprobs: true", param="top_logprobs")
        _check_tool_choice(body)
        structured = _structured_output(body)
        tools = _chat_tools(body)
        want_logprobs = bool(body.logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def new_session(served: Served):
            sampling = sampling_params(
                body, served.runtime.info.vocab_size,
                logprobs=want_logprobs, top_logprobs=body.top_logprobs or 0,
            )
            return served.runtime.chat(
                chat_messages(body.messages),
                tools=tools,
                max_tokens=body.max_completion_tokens or body.max_tokens,
                stop=body.stop,
                sampling=sampling,
                ignore_eos=body.ignore_eos,
                request_id=request_id,
                structured=structured,
            )

        return await _respond(state, new_session, body, CHAT_ROUTE, ChatStream, chat_completion,
                              request_id=request_id, logprobs=want_logprobs)

    @app.post(COMPLETIONS_ROUTE)
    async def completions():
        body = await read_body(CompletionRequest)
        check_model(state, body.model)
        _check_common(body)
        if body.echo:
            raise invalid("echo is not supported by this server", param="echo",
                          code="unsupported_parameter")
        if body.suffix:
            raise invalid("suffix is not supported by this server", param="suffix",
                          code="unsupported_parameter")
        if body.best_of is not None and body.best_of != 1:
            raise invalid("only best_of=1 is supported", param="best_of")
        want_logprobs = body.logprobs is not None
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"

        def new_session(served: Served):
            sampling = sampling_params(
                body, served.runtime.info.vocab_size,
                logprobs=want_logprobs, top_logprobs=body.logprobs or 0,
            )
            return served.runtime.complete(
                completion_prompt(body.prompt),
                max_tokens=body.max_tokens,
                stop=body.stop,
                sampling=sampling,
                ignore_eos=body.ignore_eos,
                request_id=request_id,
            )

        return await _respond(state, new_session, body, COMPLETIONS_ROUTE, CompletionStream,
                              text_completion, request_id=request_id, logprobs=want_logprobs)


# ---------------------------------------------------------------------------------------
# Request mapping


def _chat_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template sees (none when `tool_choice` is "none")."""
    if not body.tools or body.tool_choice == "none":
        return None
    return [
        {
            "type": "function",
            "function": {
                k: v
                for k, v in (
                    ("name", t.function.name),
                    ("description", t.function.description),
                    ("parameters", t.function.parameters),
                )
                if v is not None
            },
        }
        for t in body.tools
    ]


async def _respond(state: ServerState, new_session, body, route: str, stream_cls,
                   build, *, request_id: str, logprobs: bool):
    """Take the model (`serve_model`), make its session with `new_session(served)` and
    start it (refusals become error responses before any byte), then stream it with
    `stream_cls` or collect it into one body with `build`. A stream whose pool model must
    load first starts at once, with keep-alives (`stream_after_load`)."""

    def encoder(served: Served):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_cls(
            id=request_id, model=served.model_id, created=int(time.time()),
            include_usage=include_usage, logprobs=logprobs, token_text=served.token_text,
        )

    if await waits_for_load(state, body.model, body.stream):
        async def open_stream(served: Served, cleanups: list):
            session = new_session(served)
            await start_session(state, session, route, served, cleanups)
            return session, encoder(served)

        return stream_after_load(state, body.model, route, open_stream,
                                 keepalive=KEEPALIVE_COMMENT,
                                 error_frame=lambda error: b"".join(_error_frames(error)))
    served = await serve_model(state, body.model)
    session = new_session(served)
    await start_session(state, session, route, served)
    pool_model = served.model_id if state.pool is not None else None
    if body.stream:
        return stream_response(state, session, encoder(served), route, pool_model)
    events = await collect(state, session, route, pool_model)
    return json_response(
        build(events, id=request_id, model=served.model_id, logprobs=logprobs,
              token_text=served.token_text)
    )


def _structured_output(body: ChatCompletionRequest) -> StructuredOutput | None:
    """What the output is constrained to: `response_format` json_object / json_schema, or
    the tool's `parameters` when a call is forced (`tool_choice` "required" or a named
    function), or - a `strict` tool under tool_choice "auto" - free text whose tool calls
    match the tools (`strict_tools_output`). Fail closed: what cannot be honoured is a 400, never ignored."""
    choice = body.tool_choice
    forced = bool(body.tools) and (choice == "required" or isinstance(choice, NamedToolChoice))
    tools_on = bool(body.tools) and choice != "none"
    fmt = body.response_format
    wants_format = fmt is not None and fmt.type != "text"
    if wants_format and tools_on:
        raise invalid("response_format cannot be combined with tools unless tool_choice is "
                      "'none'", param="response_format", code="unsupported_parameter")
    try:
        if tools_on and not forced and any(t.function.strict for t in body.tools):
            # tool_choice auto: free text, or a call whose JSON the grammar checks.
            return strict_tools_output(
                [{"name": t.function.name, "parameters": t.function.parameters,
                  "strict": bool(t.function.strict)} for t in body.tools], param="tools")
        if forced:
            tools = [{"name": t.function.name, "parameters": t.function.parameters}
                     for t in body.tools]
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            return tool_call_output(tools, name, param="tools")
        if wants_format:
            return response_format_output({"type": fmt.type, "json_schema": fmt.json_schema})
    except InvalidRequest as exc:
        raise invalid(exc.message, param=exc.param, code="unsupported_parameter") from None
    return None


def _check_tool_choice(body: ChatCompletionRequest) -> None:
    """A tool_choice that needs tools ("required", or a named function) must find them: OpenAI
    answers 400 otherwise, and serving it would silently ignore the client's choice."""
    choice = body.tool_choice
    if choice is None or choice in ("none", "auto"):
        return
    names = [t.function.name for t in body.tools or ()]
    if not names:
        raise invalid("tool_choice is only allowed when tools are specified", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise invalid(f"tool_choice names the function {choice.function.name!r}, which is not "
                      f"among the tools ({', '.join(map(repr, names))})", param="tool_choice")


def _check_common(body: OpenAISampling) -> None:
    if body.n is not None and body.n != 1:
        raise invalid("only n=1 is supported", param="n")


def sampling_params(
    body: OpenAISampling, vocab_size: int, *, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """SamplingParams for the engine. Values that mean "no limit" are normalised (a top_k
    of -1 or of at least the vocabulary), and any 64-bit seed is folded into the engine's
    unsigned range so that negative seeds (valid for OpenAI) reproduce too."""
    top_k = body.top_k or 0
    if top_k < 0 or (vocab_size and top_k >= vocab_size):
        top_k = 0
    if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX:
        raise invalid("seed must be a 64-bit integer", param="seed")
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        bias.append((token, float(value)))
    return SamplingParams(
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        min_p=body.min_p or 0.0,
        seed=None if body.seed is None else body.seed % SEED_MODULUS,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple(bias),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _content_text(content, param: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append(part.text)
        elif isinstance(part, RefusalPart):
            parts.append(part.refusal)
        else:
            kind = type(part).__struct_config__.tag
            raise invalid(
                f"{kind} content is not supported: this server serves a text-only model",
                param=f"{param}[{j}]", code="unsupported_content",
            )
    return "\n".join(parts)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages → the chat template's messages (text only)."""
    out = []
    for i, m in enumerate(messages):
        text = _content_text(m.content, f"messages[{i}].content")
        if text is None and m.role in ("user", "system", "developer", "tool"):
            raise invalid(f"{m.role} messages need content", param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": text or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise invalid("only assistant messages carry tool_calls",
                              param=f"messages[{i}].tool_calls")
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]
        if m.role == "tool":
            if not m.tool_call_id:
                raise invalid("tool messages need tool_call_id", param=f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def completion_prompt(prompt: str | list[Any]) -> str | list[int]:
    """A string or token ids; a batch of exactly one of those is unwrapped."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(_is_int(t) for t in prompt):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if len(prompt) == 1 and isinstance(prompt[0], list) and prompt[0] and all(_is_int(t) for t in prompt[0]):
        return prompt[0]
    if len(prompt) > 1 and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        raise invalid("batched prompts are not supported; send one prompt per request", param="prompt")
    raise invalid("prompt must be a string or a non-empty list of token ids", param="prompt")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------
# Response mapping


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _logprob_entry(choice: TokenChoice, token_text: Callable[[int], str]) -> dict[str, Any]:
    text = token_text(choice.token)
    return {
        "token": text,
        "logprob": choice.logprob,
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [
            {"token": (t := token_text(alt.token)), "logprob": alt.logprob, "bytes": list(t.encode("utf-8"))}
            for alt in choice.top
        ],
    }


def tool_call_body(call: ToolCall, *, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if index is not None:
        body = {"index": index, **body}
    return body


def _final(events: list[Any]) -> Done:
    done = events[-1] if events else None
    if not isinstance(done, Done):
        raise ApiError(WireError(status=500, message="the request ended without a result",
                                 code="generation_failed"))
    error = failed_done(done)
    if error is not None:
        raise ApiError(error)
    return done


def chat_completion(
    events: list[Any], *, id: str, model: str, logprobs: bool, token_text: Callable[[int], str]
) -> dict[str, Any]:
    done = _final(events)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e for e in events if isinstance(e, ToolCall)]
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
    if calls:
        message["tool_calls"] = [tool_call_body(c) for c in calls]
    lp = None
    if logprobs:
        lp = {"content": [_logprob_entry(t, token_text)
                          for e in events if isinstance(e, TextDelta) for t in e.tokens]}
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": done.finish_reason}],
        "usage": usage_body(done.usage),
    }


@attrs.define
class _LegacyLogprobs:
    """OpenAI's legacy completions logprobs: parallel lists, with character offsets."""

    token_text: Callable[[int], str]
    offset: int = 0

    def block(self, tokens: tuple[TokenChoice, ...]) -> dict[str, Any]:
        texts = [self.token_text(t.token) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_text(a.token): a.logprob for a in t.top} for t in tokens],
            "text_offset": offsets,
        }


def text_completion(
    events: list[Any], *, id: str, model: str, logprobs: bool, token_text: Callable[[int], str]
) -> dict[str, Any]:
    done = _final(events)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    lp = None
    if logprobs:
        lp = _LegacyLogprobs(token_text).block(tuple(t for e in deltas for t in e.tokens))
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": "".join(e.text for e in deltas), "logprobs": lp,
                     "finish_reason": done.finish_reason}],
        "usage": usage_body(done.usage),
    }


def _error_frames(error: WireError) -> list[bytes]:
    return [sse_data(error.openai_body()), DONE_FRAME]


@attrs.define
class ChatStream:
    """Session events → `chat.completion.chunk` frames."""

    id: str
    model: str
    created: int
    include_usage: bool
    logprobs: bool
    token_text: Callable[[int], str]
    finished: bool = False
    _text_frame: Callable[[str], bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._text_frame = sse_template(lambda text: self._chunk({"content": text}))

    def _chunk(self, delta: dict, *, finish_reason: str | None = None, logprobs=None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            body["usage"] = None
        return sse_data(body)

    def open(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def keepalive(self) -> bytes:
        return KEEPALIVE_COMMENT

    def feed(self, event: Any) -> list[bytes]:
        match event:
            case TextDelta(text=text, tokens=tokens):
                if not self.logprobs:
                    return [self._text_frame(text)] if text else []
                lp = {"content": [_logprob_entry(t, self.token_text) for t in tokens]}
                return [self._chunk({"content": text}, logprobs=lp)]
            case ToolCall():
                return [self._chunk({"tool_calls": [tool_call_body(event, index=event.index)]})]
            case Progress():
                return [KEEPALIVE_COMMENT]
            case Done():
                self.finished = True
                error = failed_done(event)
                if error is not None:
                    return _error_frames(error)
                frames = [self._chunk({}, finish_reason=event.finish_reason)]
                if self.include_usage:
                    frames.append(sse_data({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "system_fingerprint": None, "choices": [],
                        "usage": usage_body(event.usage),
                    }))
                frames.append(DONE_FRAME)
                return frames
            case StreamBroken(message=message):
                self.finished = True
                return _error_frames(WireError(status=500, message=message, code="generation_failed"))
            case other:
                raise TypeError(f"unexpected stream event {other!r}")


@attrs.define
class CompletionStream:
    """Session events → legacy `text_completion` chunks."""

    id: str
    model: str
    created: int
    include_usage: bool
    logprobs: bool
    token_text: Callable[[int], str]
    finished: bool = False
    _legacy: _LegacyLogprobs | None = None
    _text_frame: Callable[[str], bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._text_frame = sse_template(self._chunk)

    def _chunk(self, text: str, *, finish_reason: str | None = None, logprobs=None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            body["usage"] = None
        return sse_data(body)

    def open(self) -> list[bytes]:
        if self.logprobs:
            self._legacy = _LegacyLogprobs(self.token_text)
        return []

    def keepalive(self) -> bytes:
        return KEEPALIVE_COMMENT

    def feed(self, event: Any) -> list[bytes]:
        match event:
            case TextDelta(text=text, tokens=tokens):
                if self._legacy is None:
                    return [self._text_frame(text)] if text else []
                return [self._chunk(text, logprobs=self._legacy.block(tokens))]
            case ToolCall():
                return []  # no tools on this route
            case Progress():
                return [KEEPALIVE_COMMENT]
            case Done():
                self.finished = True
                error = failed_done(event)
                if error is not None:
                    return _error_frames(error)
                frames = [self._chunk("", finish_reason=event.finish_reason)]
                if self.include_usage:
                    frames.append(sse_data({
                        "id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model, "system_fingerprint": None, "choices": [],
                        "usage": usage_body(event.usage),
                    }))
                frames.append(DONE_FRAME)
                return frames
            case StreamBroken(message=message):
                self.finished = True
                return _error_frames(WireError(status=500, message=message, code="generation_failed"))
            case other:
                raise TypeError(f"unexpected stream event {other!r}")
