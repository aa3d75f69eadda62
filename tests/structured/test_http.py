"""Structured output over HTTP, through the real `openai` and `anthropic` clients against a
real server on loopback (tiny demo model: garbage unless constrained)."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from http_support import MODEL, anthropic_client, chat_body, http_client, openai_client
from schemas import ORDER, PERSON, TAGS, WEATHER

pytestmark = pytest.mark.timeout(240)

ASK = [{"role": "user", "content": "Answer in JSON"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather", "parameters": WEATHER}}
ORDER_TOOL = {"type": "function", "function": {
    "name": "place_order", "description": "Order", "parameters": ORDER}}


def _fmt(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def test_json_schema_answers_validate_streaming_and_not(server):
    validated = 0
    async with openai_client(server) as client:
        for seed in range(3):
            reply = await client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                response_format=_fmt(PERSON))
            choice = reply.choices[0]
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.message.content), PERSON)
                validated += 1
            else:
                assert choice.finish_reason == "length"
            stream = await client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                response_format=_fmt(TAGS), stream=True)
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish in (["stop"], ["length"])
            if finish == ["stop"]:
                jsonschema.validate(json.loads(text), TAGS)
                validated += 1
    assert validated >= 3


async def test_json_object_answers_are_objects(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=64, response_format={"type": "json_object"})
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length"


async def test_cut_json_ends_with_length(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, response_format=_fmt(ORDER))
    assert reply.choices[0].finish_reason == "length"


async def test_an_uncompilable_schema_is_a_400_naming_the_keyword_before_any_byte(server):
    bad = {"type": "object", "properties": {"a": {"type": "string"}},
           "dependentSchemas": {"a": {"required": ["b"]}}}
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=8, response_format=_fmt(bad), stream=True)
    assert "dependentSchemas" in caught.value.message
    assert caught.value.body["param"] == "response_format.json_schema.schema"


async def test_an_unknown_response_format_type_is_a_400(server):
    async with http_client(server) as http:
        reply = await http.post("/v1/chat/completions",
                                json=chat_body(response_format={"type": "xml"}))
    assert reply.status_code == 400


async def test_strict_tool_without_a_forced_call_is_served_constrained_not_refused(server):
    """Was a 400; now the model may answer in text and its calls match (more in
    test_strict_tools.py)."""
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                                     tools=[strict])
    for call in reply.choices[0].message.tool_calls or ():
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_forced_tool_calls_validate_against_the_tool_schema(server, stream):
    choices = [{"type": "function", "function": {"name": "get_weather"}}, "required"]
    validated = 0
    async with openai_client(server) as client:
        for choice in choices:
            for seed in range(2):
                kwargs = dict(model=MODEL, messages=ASK, max_tokens=200, temperature=1.0,
                              seed=seed, tools=[WEATHER_TOOL, ORDER_TOOL], tool_choice=choice)
                if stream:
                    chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
                    finish = [c.choices[0].finish_reason for c in chunks
                              if c.choices and c.choices[0].finish_reason][0]
                    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
                    name = calls[0].function.name if calls else None
                    arguments = "".join(tc.function.arguments or "" for tc in calls)
                else:
                    reply = await client.chat.completions.create(**kwargs)
                    finish = reply.choices[0].finish_reason
                    calls = reply.choices[0].message.tool_calls or []
                    name = calls[0].function.name if calls else None
                    arguments = calls[0].function.arguments if calls else ""
                if finish == "length":
                    assert not calls
                    continue
                assert finish == "tool_calls"
                if isinstance(choice, dict):
                    assert name == "get_weather"
                schema = WEATHER if name == "get_weather" else ORDER
                jsonschema.validate(json.loads(arguments), schema)
                validated += 1
    assert validated >= 2  # not all cut by max_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_forced_tool_use_validates_against_input_schema(server, stream):
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER},
             {"name": "place_order", "description": "Order", "input_schema": ORDER}]
    validated = 0
    async with anthropic_client(server) as client:
        for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):
            kwargs = dict(model=MODEL, max_tokens=200, messages=ASK,
                          tools=tools, tool_choice=choice)
            if stream:
                async with client.messages.stream(**kwargs) as s:
                    message = await s.get_final_message()
            else:
                message = await client.messages.create(**kwargs)
            if message.stop_reason == "max_tokens":
                continue
            assert message.stop_reason == "tool_use"
            (use,) = [b for b in message.content if b.type == "tool_use"]
            if choice["type"] == "tool":
                assert use.name == "get_weather"
            jsonschema.validate(use.input, WEATHER if use.name == "get_weather" else ORDER)
            validated += 1
    assert validated >= 1


async def test_anthropic_output_format_json_schema_validates(server):
    async with http_client(server) as http:
        reply = await http.post("/v1/messages", json={
            "model": MODEL, "max_tokens": 200, "messages": ASK,
            "output_format": {"type": "json_schema", "schema": PERSON}})
    assert reply.status_code == 200
    body = reply.json()
    if body["stop_reason"] == "end_turn":
        jsonschema.validate(json.loads(body["content"][0]["text"]), PERSON)
    else:
        assert body["stop_reason"] == "max_tokens"


async def test_anthropic_unsupported_output_format_is_a_400(server):
    async with anthropic_client(server) as client:
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model=MODEL, max_tokens=8, messages=ASK,
                                         extra_body={"output_format": {"type": "xml"}})


async def test_logprobs_of_a_constrained_answer_list_only_tokens_the_grammar_allowed(server):
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"]}
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=16, logprobs=True, top_logprobs=5,
            response_format=_fmt(schema))
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and json.loads(choice.message.content) == {"a": "x"}
    items = choice.logprobs.content
    # Masked tokens are no alternatives: the first step allows `{"` alone (compact JSON).
    assert [(t.token, t.logprob) for t in items[0].top_logprobs] == [('{"', 0.0)]
    for item in items:
        assert 1 <= len(item.top_logprobs) < 5
        assert all(isinstance(t.logprob, float) and t.logprob <= 0.0 for t in item.top_logprobs)
