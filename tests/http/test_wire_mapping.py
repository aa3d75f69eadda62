"""The event → wire mapping for what the random-weight model cannot be made to produce on
demand (tool calls, engine errors), checked with the official SDKs parsing the exact bytes
the routes would send. The SDKs talk to a transport that answers with those bytes; the
same encoders serve the real routes (see test_openai.py / test_anthropic.py)."""

from __future__ import annotations

import anthropic
import httpx2
import msgspec
import openai
import pytest

from omlx_actors.http.anthropic_routes import MessageStream, message_body
from omlx_actors.http.openai_routes import ChatStream, CompletionStream, chat_completion
from omlx_actors.http.sse import sse_data, sse_event
from omlx_actors.front.session import Done, Progress, TextDelta, Timings, ToolCall, Usage

TIMINGS = Timings(queued_s=0.0, ttft_s=0.01, total_s=0.1, mean_itl_s=0.001)
CALL = ToolCall(id="call_abc123", index=0, name="get_weather", arguments='{"city": "Oslo"}')
SECOND = ToolCall(id="call_def456", index=1, name="get_time", arguments="{}")
TOOL_EVENTS = [
    Progress(done=20, total=20),
    TextDelta(text="Let me "),
    TextDelta(text="check."),
    CALL,
    SECOND,
    Done(finish_reason="tool_calls", usage=Usage(prompt_tokens=20, completion_tokens=31), timings=TIMINGS),
]
FAILED = Done(
    finish_reason="error", usage=Usage(prompt_tokens=20, completion_tokens=3), timings=TIMINGS,
    error="injected out-of-memory", error_type="MemoryError",
)


def _frames(encoder, events) -> bytes:
    frames = encoder.open()
    for event in events:
        frames += encoder.feed(event)
    assert encoder.finished
    return b"".join(frames)


def _transport(body: bytes, content_type: str, status: int = 200) -> httpx2.Client:
    return httpx2.Client(transport=httpx2.MockTransport(
        lambda request: httpx2.Response(status, content=body, headers={"content-type": content_type})
    ))


def _openai(body: bytes, content_type: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://wire/v1", api_key="x", max_retries=0,
                         http_client=_transport(body, content_type))


def _anthropic(body: bytes, content_type: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url="http://wire", api_key="x", max_retries=0,
                               http_client=_transport(body, content_type))


def _chat_stream() -> ChatStream:
    return ChatStream(id="chatcmpl-1", model="m", created=1, include_usage=True, logprobs=False,
                      token_text=str)


def _message_stream() -> MessageStream:
    def resolve(done, emitted):
        return ("tool_use" if done.finish_reason == "tool_calls" else "end_turn"), None

    return MessageStream(id="msg_1", model="m", input_tokens=20, resolve_stop=resolve)


def test_openai_stream_tool_calls_accumulate_in_the_sdk():
    client = _openai(_frames(_chat_stream(), TOOL_EVENTS), "text/event-stream")
    with client.chat.completions.stream(model="m", messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls == [("call_abc123", "get_weather", '{"city": "Oslo"}'), ("call_def456", "get_time", "{}")]
    assert final.usage.completion_tokens == 31


def test_openai_non_stream_tool_calls_parse_in_the_sdk():
    body = chat_completion(TOOL_EVENTS, id="chatcmpl-1", model="m", logprobs=False, token_text=str)
    client = _openai(msgspec.json.encode(body), "application/json")
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert message.tool_calls[0].type == "function"


def test_openai_stream_failure_is_an_error_chunk_then_done():
    raw = _frames(_chat_stream(), [TextDelta(text="abc"), FAILED])
    assert raw.endswith(b"data: [DONE]\n\n")
    client = _openai(raw, "text/event-stream")
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="injected out-of-memory"):
        for _ in stream:
            pass


def test_anthropic_stream_tool_use_blocks_accumulate_in_the_sdk():
    raw = _frames(_message_stream(), TOOL_EVENTS)
    client = _anthropic(raw, "text/event-stream")
    with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me check."
    first, second = final.content[1], final.content[2]
    assert (first.id, first.name, first.input) == ("toolu_abc123", "get_weather", {"city": "Oslo"})
    assert (second.id, second.name, second.input) == ("toolu_def456", "get_time", {})
    assert final.usage.output_tokens == 31
    blocks = [t for t in types if t.startswith("content_block") or t.startswith("message")]
    assert blocks[0] == "message_start"
    assert blocks[-2:] == ["message_delta", "message_stop"]


def test_anthropic_non_stream_tool_use_parses_in_the_sdk():
    body = message_body(TOOL_EVENTS, id="msg_1", model="m",
                        resolve_stop=lambda done, text: ("tool_use", None))
    client = _anthropic(msgspec.json.encode(body), "application/json")
    message = client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].input == {"city": "Oslo"}


def test_anthropic_stream_failure_is_an_error_event():
    raw = _frames(_message_stream(), [TextDelta(text="abc"), FAILED])
    assert raw.rstrip().splitlines()[-2] == b"event: error"
    client = _anthropic(raw, "text/event-stream")
    with pytest.raises(anthropic.APIError, match="injected out-of-memory"):
        with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as stream:
            for _ in stream:
                pass


# Text a token may carry: quotes, escapes, control characters, non-ASCII, the empty-looking.
AWKWARD = ['say "hi"', "back\\slash", "tab\tnew\nline", "\x00\x1f\x7f", "snow ☃ 🐍", " ", "</script>"]


def test_openai_text_frames_are_exactly_the_encoded_chunks():
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": None}
    stream = _chat_stream()
    stream.open()
    for text in AWKWARD:
        chunk = {**head, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}], "usage": None}
        assert stream.feed(TextDelta(text=text)) == [sse_data(chunk)]
    legacy = CompletionStream(id="cmpl-1", model="m", created=1, include_usage=False, logprobs=False,
                              token_text=str)
    legacy.open()
    for text in AWKWARD:
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                 "system_fingerprint": None,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
        assert legacy.feed(TextDelta(text=text)) == [sse_data(chunk)]


def test_anthropic_text_deltas_are_exactly_the_encoded_events_in_each_block():
    stream = _message_stream()
    frames = stream.open()
    for event in [TextDelta(text=AWKWARD[0]), CALL, *(TextDelta(text=t) for t in AWKWARD[1:])]:
        frames += stream.feed(event)
    deltas = [f for f in frames if f.startswith(b"event: content_block_delta\n") and b"text_delta" in f]
    indexes = [0] + [2] * (len(AWKWARD) - 1)  # the tool_use block in between is index 1
    assert deltas == [
        sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "text_delta", "text": text}})
        for index, text in zip(indexes, AWKWARD)
    ]
