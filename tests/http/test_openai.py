"""OpenAI routes, driven by the official `openai` client (and raw httpx for the wire)."""

from __future__ import annotations

import json

import openai
import pytest
from http_support import MODEL, chat_body, http_client, openai_client, serve, sse_payloads

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_chat_non_stream_returns_exact_token_count_and_usage(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=12, extra_body={"ignore_eos": True}
        )
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


async def test_chat_stream_equals_non_stream_and_reports_usage_last(server):
    async with openai_client(server) as client:
        whole = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=16, extra_body={"ignore_eos": True}
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=16, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_stream_wire_ends_with_done(server):
    async with http_client(server) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True, max_tokens=4, ignore_eos=True)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines()]
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]"
    assert all(json.loads(p)["object"] == "chat.completion.chunk" for p in payloads[:-1])
    assert lines[-1] == ""  # the last frame is complete


async def test_legacy_completion_with_string_and_token_prompts(server):
    async with openai_client(server) as client:
        by_text = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=10, extra_body={"ignore_eos": True}
        )
        by_ids = await client.completions.create(
            model=MODEL, prompt=[5, 17, 42, 99], max_tokens=10, extra_body={"ignore_eos": True}
        )
        stream = await client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
    assert by_text.object == "text_completion"
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.completion_tokens == 10
    assert by_ids.usage.prompt_tokens == 4
    assert by_ids.usage.completion_tokens == 10
    assert "".join(c.choices[0].text for c in chunks if c.choices) == by_text.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10


async def test_default_max_tokens_of_legacy_completions_is_16(server):
    async with openai_client(server) as client:
        reply = await client.completions.create(
            model=MODEL, prompt="abc", extra_body={"ignore_eos": True}
        )
    assert reply.usage.completion_tokens == 16


async def test_chat_logprobs_with_top_alternatives(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=3, stream=True,
            extra_body={"ignore_eos": True},
        )
        streamed = [entry async for c in stream if c.choices and c.choices[0].logprobs
                    for entry in c.choices[0].logprobs.content]
    content = reply.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy: the best is chosen
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


async def test_legacy_logprobs_are_parallel_lists(server):
    async with openai_client(server) as client:
        reply = await client.completions.create(
            model=MODEL, prompt="abc", max_tokens=6, logprobs=2, extra_body={"ignore_eos": True}
        )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert "".join(lp.tokens) == reply.choices[0].text


async def test_stop_string_ends_the_text_before_it(server):
    async with openai_client(server) as client:
        full = await client.completions.create(
            model=MODEL, prompt="The weather", max_tokens=40, extra_body={"ignore_eos": True}
        )
        text = full.choices[0].text
        stop = text[10:13]
        assert len(stop) == 3 and stop.strip()
        stopped = await client.completions.create(
            model=MODEL, prompt="The weather", max_tokens=40, stop=[stop],
            extra_body={"ignore_eos": True},
        )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


async def test_seeded_sampling_is_reproducible_including_negative_seeds(server):
    async with openai_client(server) as client:
        async def sample(seed: int) -> str:
            reply = await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"7": 1.5},
                extra_body={"ignore_eos": True},
            )
            assert reply.usage.completion_tokens == 12
            return reply.choices[0].message.content

        assert await sample(1234) == await sample(1234)
        assert await sample(-5) == await sample(-5)


async def test_top_k_at_or_above_the_vocabulary_means_no_top_k(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, temperature=1.0, seed=1,
            extra_body={"ignore_eos": True, "top_k": 100_000},
        )
    assert reply.choices[0].finish_reason == "length"


async def test_tools_are_rendered_into_the_prompt(server):
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }]
    async with openai_client(server) as client:
        plain = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with_tools = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, tools=tools
        )
        hidden = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, tools=tools, tool_choice="none"
        )
        history = await client.chat.completions.create(
            model=MODEL, max_tokens=2, tools=tools,
            messages=[
                *HELLO,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
            ],
        )
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens
    assert history.usage.prompt_tokens > with_tools.usage.prompt_tokens


async def test_content_parts_are_joined_as_text(server):
    async with openai_client(server) as client:
        parts = await client.chat.completions.create(
            model=MODEL, max_tokens=3,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
        )
        plain = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


async def test_models_lists_the_served_model(server):
    async with openai_client(server) as client:
        models = [m async for m in client.models.list()]
        one = await client.models.retrieve(MODEL)
    assert [m.id for m in models] == [MODEL]
    assert one.id == MODEL


async def test_model_aliases_are_accepted(tiny_llama):
    async with serve(tiny_llama) as server:
        async with openai_client(server) as client:
            for alias in (str(tiny_llama), MODEL):
                reply = await client.chat.completions.create(model=alias, messages=HELLO, max_tokens=1)
                assert reply.model == MODEL


# -- refusals as SDK exceptions -----------------------------------------------------------


async def test_unknown_model_is_not_found(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


async def test_n_above_one_is_a_bad_request(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, n=2)
    assert caught.value.param == "n"


async def test_out_of_range_parameter_names_its_param(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO, temperature=3.5)
    assert caught.value.param == "temperature"
    assert caught.value.code == "invalid_request"


async def test_prompt_longer_than_context_is_context_length_exceeded(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt=[7] * 5000, max_tokens=1)
        with pytest.raises(openai.BadRequestError) as too_many:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1_000_000)
    assert caught.value.code == "context_length_exceeded"
    assert too_many.value.code == "context_length_exceeded"
    assert too_many.value.param == "max_tokens"


async def test_token_ids_outside_the_vocabulary_are_a_bad_request(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt=[1, 2, 100_000], max_tokens=1)
    assert caught.value.param == "prompt"


async def test_image_content_is_refused_naming_the_part(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL, max_tokens=1,
                messages=[{"role": "user", "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ]}],
            )
    assert caught.value.param == "messages[0].content[1]"


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


async def test_tool_choice_naming_a_tool_not_in_tools_is_a_bad_request(server):
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=1, tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "get_time"}},
            )
        with pytest.raises(openai.BadRequestError) as no_tools:
            await client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=1,
                tool_choice={"type": "function", "function": {"name": "get_weather"}},
            )
        with pytest.raises(openai.BadRequestError) as required_without_tools:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1,
                                                 tool_choice="required")
        named = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=1, tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    for caught in (unknown, no_tools, required_without_tools):
        assert caught.value.status_code == 400
        assert caught.value.param == "tool_choice"
    assert "get_time" in unknown.value.message
    assert named.choices[0].finish_reason in ("length", "stop")
