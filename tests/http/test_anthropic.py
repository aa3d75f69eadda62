"""The Anthropic route, driven by the official `anthropic` client (and raw httpx)."""

from __future__ import annotations

import json

import anthropic
import pytest
from http_support import MODEL, anthropic_client, http_client

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_message_non_stream_has_text_usage_and_max_tokens_stop(server):
    async with anthropic_client(server) as client:
        message = await client.messages.create(
            model=MODEL, max_tokens=10, messages=HELLO, system="Be brief.",
            extra_body={"ignore_eos": True},
        )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.stop_reason == "max_tokens"
    assert message.stop_sequence is None
    assert [block.type for block in message.content] == ["text"]
    assert message.usage.output_tokens == 10
    assert message.usage.input_tokens > 0


async def test_message_stream_event_order_and_final_message(server):
    async with anthropic_client(server) as client:
        whole = await client.messages.create(
            model=MODEL, max_tokens=12, messages=HELLO, extra_body={"ignore_eos": True}
        )
        async with client.messages.stream(
            model=MODEL, max_tokens=12, messages=HELLO, extra_body={"ignore_eos": True}
        ) as stream:
            types = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == 12
    assert final.stop_reason == "max_tokens"
    raw = [t for t in types if t in (
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    )]
    deltas = raw.count("content_block_delta")
    assert deltas >= 1
    assert raw == (
        ["message_start", "content_block_start"] + ["content_block_delta"] * deltas
        + ["content_block_stop", "message_delta", "message_stop"]
    )


async def test_message_stream_wire_event_sequence_with_ping(server):
    body = {"model": MODEL, "max_tokens": 3, "messages": HELLO, "stream": True, "ignore_eos": True}
    async with http_client(server) as http:
        async with http.stream("POST", "/v1/messages", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
    events = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == events  # every event names its type twice
    assert events[:2] == ["message_start", "ping"]
    without_pings = [e for e in events if e != "ping"]
    assert without_pings[0] == "message_start"
    assert without_pings[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    delta = datas[events.index("message_delta")]
    assert delta["usage"]["output_tokens"] == 3
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


async def test_stop_sequence_is_reported_with_its_text(server):
    async with anthropic_client(server) as client:
        full = await client.messages.create(
            model=MODEL, max_tokens=40, messages=HELLO, extra_body={"ignore_eos": True}
        )
        text = full.content[0].text
        stop = text[8:11]
        assert len(stop) == 3 and stop.strip()
        stopped = await client.messages.create(
            model=MODEL, max_tokens=40, messages=HELLO, stop_sequences=["@@never@@", stop],
            extra_body={"ignore_eos": True},
        )
        async with client.messages.stream(
            model=MODEL, max_tokens=40, messages=HELLO, stop_sequences=[stop],
            extra_body={"ignore_eos": True},
        ) as stream:
            streamed = await stream.get_final_message()
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]
    assert streamed.stop_reason == "stop_sequence"
    assert streamed.stop_sequence == stop


async def test_tool_use_history_and_tools_reach_the_prompt(server):
    tools = [{
        "name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }]
    async with anthropic_client(server) as client:
        plain = await client.messages.create(model=MODEL, max_tokens=2, messages=HELLO)
        with_tools = await client.messages.create(model=MODEL, max_tokens=2, messages=HELLO, tools=tools)
        history = await client.messages.create(
            model=MODEL, max_tokens=2, tools=tools,
            messages=[
                *HELLO,
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3 degrees"},
                    {"type": "text", "text": "Thanks"},
                ]},
            ],
        )
    def prompt(message) -> int:  # input_tokens excludes what the prefix cache served
        return message.usage.input_tokens + message.usage.cache_read_input_tokens

    assert prompt(with_tools) > prompt(plain) + 20
    assert prompt(history) > prompt(with_tools)


# -- refusals ------------------------------------------------------------------------------


async def test_missing_max_tokens_is_invalid_request(server):
    async with http_client(server) as http:
        response = await http.post("/v1/messages", json={"model": MODEL, "messages": HELLO})
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Object missing required field `max_tokens`"},
    }


async def test_refusals_raise_the_sdk_exception_types(server):
    async with anthropic_client(server) as client:
        with pytest.raises(anthropic.NotFoundError) as not_found:
            await client.messages.create(model="claude-x", max_tokens=1, messages=HELLO)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(
                model=MODEL, max_tokens=1, messages=HELLO, extra_body={"temperature": 1.5}
            )
        with pytest.raises(anthropic.BadRequestError) as too_long:
            await client.messages.create(
                model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "word " * 3000}]
            )
    assert not_found.value.body["error"]["type"] == "not_found_error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in bad.value.body["error"]["message"]
    assert "context" in too_long.value.body["error"]["message"]


async def test_image_blocks_are_refused(server):
    async with anthropic_client(server) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(
                model=MODEL, max_tokens=1,
                messages=[{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ]}],
            )
    assert "image blocks are not supported" in caught.value.body["error"]["message"]


WEATHER_TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}


async def test_tool_choice_naming_a_tool_not_in_tools_is_a_bad_request(server):
    async with anthropic_client(server) as client:
        with pytest.raises(anthropic.BadRequestError) as unknown:
            await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO, tools=[WEATHER_TOOL],
                                         tool_choice={"type": "tool", "name": "get_time"})
        with pytest.raises(anthropic.BadRequestError) as no_name:
            await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO, tools=[WEATHER_TOOL],
                                         tool_choice={"type": "tool"})
        with pytest.raises(anthropic.BadRequestError) as no_tools:
            await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO,
                                         tool_choice={"type": "any"})
        named = await client.messages.create(model=MODEL, max_tokens=1, messages=HELLO, tools=[WEATHER_TOOL],
                                             tool_choice={"type": "tool", "name": "get_weather"})
    for caught in (unknown, no_name, no_tools):
        assert caught.value.status_code == 400
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert "tool_choice" in caught.value.body["error"]["message"]
    assert "get_time" in unknown.value.body["error"]["message"]
    assert named.stop_reason == "max_tokens"
