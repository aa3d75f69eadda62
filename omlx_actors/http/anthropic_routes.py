"""Anthropic route: `POST /v1/messages`, streaming and not.

A thin layer over `Runtime.chat`, like the OpenAI routes. The body maps to chat-template
messages (system first; `tool_use` blocks become the assistant's tool calls, `tool_result`
blocks become tool messages), Anthropic tools to function tools. The stream is
`message_start`, `ping`, then per content block `content_block_start` /
`content_block_delta`... / `content_block_stop`, then `message_delta` (stop reason and
usage) and `message_stop`; `ping` also serves as keep-alive. A failure after the stream
began ends it with an `error` event.

An absent `temperature` means greedy decoding; `tool_choice` "any" or "tool" needs `tools`
(holding the named tool) and then constrains the output to a call whose input matches the
tool's `input_schema`; a `strict` tool under "auto" lets the model answer in text or call,
its calls matching the tools; "none" hides the tools. `output_format` {"type": "json_schema",
"schema"} constrains the text to the schema (`omlx_actors.front.structured`); a schema llguidance
cannot compile is a 400. Non-standard field: `ignore_eos`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from omlx_actors.engine.messages import SamplingParams
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
    ARedactedThinkingBlock,
    AThinkingBlock,
    ATextBlock,
    AToolResultBlock,
    AToolUseBlock,
    MessagesRequest,
)
from omlx_actors.http.sse import StreamBroken, sse_event, sse_template
from omlx_actors.front.session import Done, Progress, Session, TextDelta, ToolCall, Usage
from omlx_actors.front.structured import (
    StructuredOutput,
    response_format_output,
    strict_tools_output,
    tool_call_output,
)

MESSAGES_ROUTE = "/v1/messages"
PING_FRAME = sse_event("ping", {"type": "ping"})

# (stop_reason, stop_sequence) for a finished request, given the text it emitted.
StopResolver = Callable[[Done, str], tuple[str, str | None]]


def register(app, state: ServerState) -> None:
    @app.post(MESSAGES_ROUTE)
    async def messages():
        body = await read_body(MessagesRequest)
        check_model(state, body.model)
        _check_tool_choice(body)
        structured = _structured_output(body)
        tools = None
        if body.tools and not (body.tool_choice and body.tool_choice.type == "none"):
            tools = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description or "",
                        "parameters": t.input_schema,
                    },
                }
                for t in body.tools
            ]
        request_id = f"msg_{uuid.uuid4().hex[:24]}"
        stops = list(body.stop_sequences or ())

        def new_session(served: Served):
            vocab = served.runtime.info.vocab_size
            top_k = body.top_k or 0
            if top_k < 0 or (vocab and top_k >= vocab):
                top_k = 0
            sampling = SamplingParams(
                temperature=0.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=top_k,
            )
            return served.runtime.chat(
                anthropic_messages(body),
                tools=tools,
                max_tokens=body.max_tokens,
                stop=stops,
                sampling=sampling,
                ignore_eos=body.ignore_eos,
                request_id=request_id,
                structured=structured,
            )

        return await _respond(state, body, new_session, request_id, stops)


async def _respond(state: ServerState, body: MessagesRequest, new_session, request_id: str,
                   stops: list[str]):
    """Take the model (`serve_model`), make and start its session (refusals become error
    responses before any byte), then stream it or answer it whole. A stream whose pool
    model must load first starts at once, with pings (`stream_after_load`)."""

    def encoder(served: Served, session) -> tuple[StopResolver, MessageStream]:
        resolve = stop_resolver(session, stops, served.runtime.tokenizer,
                                served.runtime.info.eos_token_ids, ignore_eos=body.ignore_eos)
        return resolve, MessageStream(id=request_id, model=served.model_id,
                                      input_tokens=len(session.prompt_tokens), resolve_stop=resolve)

    if await waits_for_load(state, body.model, body.stream):
        async def open_stream(served: Served, cleanups: list):
            session = new_session(served)
            await start_session(state, session, MESSAGES_ROUTE, served, cleanups)
            return session, encoder(served, session)[1]

        return stream_after_load(state, body.model, MESSAGES_ROUTE, open_stream,
                                 keepalive=PING_FRAME, error_frame=_error_frame)
    served = await serve_model(state, body.model)
    session = new_session(served)
    await start_session(state, session, MESSAGES_ROUTE, served)
    resolve, stream = encoder(served, session)
    pool_model = served.model_id if state.pool is not None else None
    if body.stream:
        return stream_response(state, session, stream, MESSAGES_ROUTE, pool_model)
    events = await collect(state, session, MESSAGES_ROUTE, pool_model)
    return json_response(message_body(events, id=request_id, model=served.model_id,
                                      resolve_stop=resolve))


# ---------------------------------------------------------------------------------------
# Request mapping


def _structured_output(body: MessagesRequest) -> StructuredOutput | None:
    """What the output is constrained to: the tool's `input_schema` when `tool_choice` is
    "tool" or "any", free text whose tool calls match the tools when a tool is `strict`
    under tool_choice "auto" (`strict_tools_output`), or `output_format` {"type": "json_schema", "schema"}. Fail closed:
    what cannot be honoured is a 400, never ignored."""
    choice = body.tool_choice
    tools_on = bool(body.tools) and not (choice and choice.type == "none")
    forced = tools_on and choice is not None and choice.type in ("any", "tool")
    fmt = body.output_format
    if fmt is not None and tools_on:
        raise invalid("output_format cannot be combined with tools unless tool_choice is "
                      "'none'", param="output_format")
    try:
        if tools_on and not forced and any(t.strict for t in body.tools):
            # tool_choice auto: free text, or a call whose JSON the grammar checks.
            return strict_tools_output(
                [{"name": t.name, "parameters": t.input_schema, "strict": bool(t.strict)}
                 for t in body.tools], param="tools")
        if forced:
            tools = [{"name": t.name, "parameters": t.input_schema} for t in body.tools]
            return tool_call_output(tools, choice.name if choice.type == "tool" else None,
                                    param="tools")
        if fmt is not None:
            if fmt.get("type") != "json_schema":
                raise InvalidRequest(f"unsupported output_format type {fmt.get('type')!r} "
                                     "(json_schema)", param="output_format.type")
            return response_format_output({"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt.get("schema")}})
    except InvalidRequest as exc:
        raise invalid(exc.message, param=exc.param) from None
    return None


def _check_tool_choice(body: MessagesRequest) -> None:
    """"any" and "tool" need tools, and "tool" names one of them: Anthropic answers 400
    otherwise, and serving it would silently ignore the client's choice."""
    choice = body.tool_choice
    if choice is None or choice.type in ("auto", "none"):
        return
    names = [t.name for t in body.tools or ()]
    if not names:
        raise invalid(f"tool_choice {choice.type!r} needs tools", param="tool_choice")
    if choice.type == "tool":
        if choice.name is None:
            raise invalid("tool_choice of type 'tool' needs the tool's name", param="tool_choice.name")
        if choice.name not in names:
            raise invalid(f"tool_choice names the tool {choice.name!r}, which is not among the tools "
                          f"({', '.join(map(repr, names))})", param="tool_choice.name")


def _block_text(content, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, ATextBlock):
            raise invalid(f"{block.__struct_config__.tag} blocks are not supported: this server "
                          "serves a text-only model", param=f"{param}[{j}]")
        parts.append(block.text)
    return "\n".join(parts)


def anthropic_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """Anthropic system + messages → the chat template's messages."""
    out: list[dict[str, Any]] = []
    system = _block_text(body.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            match block:
                case ATextBlock(text=text):
                    texts.append(text)
                case AToolUseBlock(id=id, name=name, input=input):
                    if m.role != "assistant":
                        raise invalid("tool_use blocks belong in assistant messages", param=param)
                    calls.append({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(input, ensure_ascii=False)}})
                case AToolResultBlock(tool_use_id=tool_use_id, content=content, is_error=is_error):
                    if m.role != "user":
                        raise invalid("tool_result blocks belong in user messages", param=param)
                    text = _block_text(content, f"{param}.content")
                    results.append({"role": "tool", "tool_call_id": tool_use_id,
                                    "content": f"Error: {text}" if is_error else text})
                case AThinkingBlock() | ARedactedThinkingBlock():
                    pass  # earlier reasoning is not replayed to the model
                case _:
                    raise invalid(f"{block.__struct_config__.tag} blocks are not supported: this "
                                  "server serves a text-only model", param=param)
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            out.extend(results)
            if texts or not results:
                out.append({"role": "user", "content": "\n".join(texts)})
    return out


def stop_resolver(
    session: Session, stops: list[str], tokenizer, eos_token_ids, *, ignore_eos: bool
) -> StopResolver:
    """Anthropic reports which stop sequence ended a message: the session says which."""

    def resolve(done: Done, emitted: str) -> tuple[str, str | None]:
        match done.finish_reason:
            case "length":
                return "max_tokens", None
            case "tool_calls":
                return "tool_use", None
        if done.stop_sequence is not None:
            return "stop_sequence", done.stop_sequence
        return "end_turn", None

    return resolve


# ---------------------------------------------------------------------------------------
# Response mapping


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    try:
        parsed = json.loads(call.arguments)
    except ValueError:
        parsed = {"arguments": call.arguments}
    if not isinstance(parsed, dict):
        parsed = {"value": parsed}
    tool_id = "toolu_" + call.id.removeprefix("call_")
    return {"type": "tool_use", "id": tool_id, "name": call.name, "input": parsed}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
    }


def message_body(events: list[Any], *, id: str, model: str, resolve_stop: StopResolver) -> dict[str, Any]:
    done = events[-1] if events else None
    if not isinstance(done, Done):
        raise ApiError(WireError(status=500, message="the request ended without a result",
                                 code="generation_failed"))
    error = failed_done(done)
    if error is not None:
        raise ApiError(error)
    content: list[dict[str, Any]] = []
    emitted: list[str] = []
    for event in events:
        if isinstance(event, TextDelta) and event.text:
            emitted.append(event.text)
            if content and content[-1]["type"] == "text":
                content[-1]["text"] += event.text
            else:
                content.append({"type": "text", "text": event.text})
        elif isinstance(event, ToolCall):
            content.append(tool_use_block(event))
    stop_reason, stop_sequence = resolve_stop(done, "".join(emitted))
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_body(done.usage),
    }


def _error_frame(error: WireError) -> bytes:
    return sse_event("error", error.anthropic_body())


@attrs.define
class MessageStream:
    """Session events → Anthropic stream events. Text opens a text block (kept open across
    deltas); a tool call closes it and is sent as one complete tool_use block."""

    id: str
    model: str
    input_tokens: int
    resolve_stop: StopResolver
    finished: bool = False
    _next_index: int = 0
    _text_open: bool = False
    _emitted: list[str] = attrs.Factory(list)
    _text_delta: Callable[[str], bytes] | None = None  # the open text block's delta frame

    def open(self) -> list[bytes]:
        start = {
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            },
        }
        return [sse_event("message_start", start), PING_FRAME]

    def keepalive(self) -> bytes:
        return PING_FRAME

    def _open_text(self) -> bytes:
        self._text_open = True
        index = self._next_index
        self._text_delta = sse_template(lambda text: sse_event("content_block_delta", {
            "type": "content_block_delta", "index": index,
            "delta": {"type": "text_delta", "text": text},
        }))
        return sse_event("content_block_start", {
            "type": "content_block_start", "index": index,
            "content_block": {"type": "text", "text": ""},
        })

    def _close_text(self) -> list[bytes]:
        if not self._text_open:
            return []
        self._text_open = False
        self._next_index += 1
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": self._next_index - 1})]

    def feed(self, event: Any) -> list[bytes]:
        match event:
            case TextDelta(text=text):
                if not text:
                    return []
                self._emitted.append(text)
                if self._text_open:
                    return [self._text_delta(text)]
                return [self._open_text(), self._text_delta(text)]
            case ToolCall():
                frames = self._close_text()
                block = tool_use_block(event)
                index = self._next_index
                self._next_index += 1
                frames.append(sse_event("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {**block, "input": {}},
                }))
                frames.append(sse_event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta",
                              "partial_json": json.dumps(block["input"], ensure_ascii=False)},
                }))
                frames.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
                return frames
            case Progress():
                return [PING_FRAME]
            case Done():
                self.finished = True
                error = failed_done(event)
                if error is not None:
                    return [_error_frame(error)]
                frames = self._close_text()
                stop_reason, stop_sequence = self.resolve_stop(event, "".join(self._emitted))
                frames.append(sse_event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": usage_body(event.usage),
                }))
                frames.append(sse_event("message_stop", {"type": "message_stop"}))
                return frames
            case StreamBroken(message=message):
                self.finished = True
                return [_error_frame(WireError(status=500, message=message, code="generation_failed"))]
            case other:
                raise TypeError(f"unexpected stream event {other!r}")
