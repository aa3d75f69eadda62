"""Strict tools under tool_choice "auto" (issue #19): the model may answer in free text or
call a tool, and every call it makes matches the strict tools' schemas. The tiny demo model
(random weights, Hermes-style `<tool_call>` markers) emits garbage, so a `logit_bias` on the
`<tool_call>` token pushes it into calls, and every call that validates is the grammar's
doing."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from http_support import MODEL, anthropic_client, openai_client
from schemas import ORDER, WEATHER

from omlx_actors import open_runtime
from omlx_actors.refusals import InvalidRequest
from omlx_actors.front.structured import OutputKind, strict_tools_output, with_tool_markers

pytestmark = pytest.mark.timeout(300)

ASK = [{"role": "user", "content": "What is the weather?"}]
SCHEMAS = {"get_weather": WEATHER, "place_order": ORDER}


def _openai_tool(name, *, strict=True):
    return {"type": "function", "function": {"name": name, "description": name,
                                             "parameters": SCHEMAS[name], "strict": strict}}


def _plain(name, *, strict=True):
    return {"name": name, "parameters": SCHEMAS[name], "strict": strict}


def _marker_id(model) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids("<tool_call>")


def _check_call(name, arguments, strict_names, all_names=SCHEMAS) -> None:
    assert name in all_names, name
    value = json.loads(arguments)
    if name in strict_names:
        jsonschema.validate(value, SCHEMAS[name])
    else:
        assert isinstance(value, dict)


def test_the_grammar_admits_text_and_valid_calls_only(tiny_llama):
    """The grammar on the demo tokenizer: text, text + valid call + text; not a call of an
    unknown tool, not bad arguments, not the start marker spelled as text."""
    import llguidance
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok = llguidance.LLTokenizer((tiny_llama / "tokenizer.json").read_text(encoding="utf-8"))
    start, end = hf.encode("<tool_call>", add_special_tokens=False), hf.encode("</tool_call>", add_special_tokens=False)
    assert len(start) == len(end) == 1
    output = with_tool_markers(
        strict_tools_output([_plain("get_weather"), _plain("place_order", strict=False)]),
        start="<tool_call>", end="</tool_call>", start_ids=start, end_ids=end)
    call = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}\n</tool_call>'
    cases = {
        "just text": True,
        f"text {call} more text": True,
        '<tool_call>{"name":"place_order","arguments":{"anything":[1]}}</tool_call>': True,
        '<tool_call>{"name":"nope","arguments":{}}</tool_call>': False,
        '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>': False,
    }
    for text, ok in cases.items():
        matcher = llguidance.LLMatcher(tok, output.grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        fits = matcher.consume_tokens(hf.encode(text, add_special_tokens=False)) and matcher.is_accepting()
        assert fits == ok, text
    # The start marker written out in pieces is no text either: the scanner would see a call.
    matcher = llguidance.LLMatcher(tok, output.grammar, log_level=0)
    pieces = [hf.convert_tokens_to_ids(c) for c in "<tool_call>"]
    assert not matcher.consume_tokens(pieces)


async def test_in_process_biased_toward_calls_every_call_validates(tiny_llama):
    output = strict_tools_output([_plain("get_weather"), _plain("place_order")])
    assert output.kind is OutputKind.TEXT_OR_TOOL_CALLS
    tools = [_openai_tool("get_weather"), _openai_tool("place_order")]
    calls_seen = 0
    async with open_runtime(tiny_llama) as rt:
        marker = rt.tokenizer.convert_tokens_to_ids("<tool_call>")
        for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
            session = rt.chat(ASK, tools=tools, structured=output, max_tokens=200,
                              temperature=temperature, seed=seed, logit_bias={marker: 100.0})
            async with session:
                text, calls, done = await session.collect()
            assert done.error is None, done.error
            if "<tool_call>" in text:  # only a call cut short by max_tokens stays text
                assert text.count("<tool_call>") == 1 and done.usage.completion_tokens == 200
            for call in calls:
                _check_call(call.name, call.arguments, SCHEMAS)
            if calls:
                assert done.finish_reason == "tool_calls"
            calls_seen += len(calls)
    assert calls_seen >= 2  # the bias made calls, and the grammar shaped each one


async def test_in_process_without_bias_free_text_comes_back_as_text(tiny_llama):
    output = strict_tools_output([_plain("get_weather")])
    async with open_runtime(tiny_llama) as rt:
        session = rt.chat(ASK, tools=[_openai_tool("get_weather")], structured=output,
                          max_tokens=24)
        async with session:
            text, calls, done = await session.collect()
    assert done.error is None, done.error
    assert done.finish_reason in ("stop", "length", "tool_calls")
    for call in calls:
        _check_call(call.name, call.arguments, SCHEMAS)
    if not calls:
        assert text  # garbage text, delivered as text
        assert done.finish_reason in ("stop", "length")


async def test_a_tokenizer_without_tool_call_markers_is_refused(tiny_llama, monkeypatch):
    async with open_runtime(tiny_llama) as rt:
        monkeypatch.setattr(type(rt.tokenizer), "has_tool_calling", property(lambda self: False))
        session = rt.chat(ASK, tools=[_openai_tool("get_weather")], max_tokens=8,
                          structured=strict_tools_output([_plain("get_weather")]))
        with pytest.raises(InvalidRequest, match="tool-call markers"):
            await session.start()


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_strict_tool_under_auto_biased_calls_validate(server, tiny_llama, stream):
    """tool_choice "auto" and absent, a strict and a non-strict tool: every call names a
    tool, a strict tool's arguments validate."""
    tools = [_openai_tool("get_weather"), _openai_tool("place_order", strict=False)]
    async with openai_client(server) as client:
        marker = _marker_id(tiny_llama)
        calls_seen = 0
        for choice, seed in (("auto", 0), (None, 1)):
            kwargs = dict(model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                          tools=tools)
            if choice is not None:
                kwargs["tool_choice"] = choice
            kwargs["logit_bias"] = {str(marker): 100}
            if stream:
                chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
                finish = [c.choices[0].finish_reason for c in chunks
                          if c.choices and c.choices[0].finish_reason]
                assert len(finish) == 1
                deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
                by_index: dict[int, list] = {}
                for tc in deltas:
                    by_index.setdefault(tc.index, []).append(tc)
                calls = [(parts[0].function.name, "".join(p.function.arguments or "" for p in parts))
                         for parts in by_index.values()]
                finish = finish[0]
            else:
                reply = await client.chat.completions.create(**kwargs)
                finish = reply.choices[0].finish_reason
                calls = [(c.function.name, c.function.arguments)
                         for c in reply.choices[0].message.tool_calls or ()]
            for name, arguments in calls:
                _check_call(name, arguments, {"get_weather"})
            if calls:
                assert finish == "tool_calls"
            calls_seen += len(calls)
    assert calls_seen >= 1


async def test_openai_strict_tool_without_bias_answers_in_text(server):
    async with openai_client(server) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=24, tools=[_openai_tool("get_weather")])
    choice = reply.choices[0]
    for call in choice.message.tool_calls or ():
        _check_call(call.function.name, call.function.arguments, {"get_weather"})
    if not choice.message.tool_calls:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content


async def test_openai_strict_tool_with_an_uncompilable_schema_is_a_400(server):
    bad = {"type": "object", "properties": {"a": {"type": "string"}},
           "dependentSchemas": {"a": {"required": ["b"]}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": bad, "strict": True}}
    async with openai_client(server) as client:
        with pytest.raises(openai.BadRequestError, match="dependentSchemas"):
            await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                                 tools=[tool])


async def test_anthropic_strict_tool_under_auto_is_served_and_tool_uses_validate(server):
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER,
              "strict": True}]
    async with anthropic_client(server) as client:
        for choice in ({"type": "auto"}, None):
            kwargs = dict(model=MODEL, max_tokens=64, messages=ASK, tools=tools)
            if choice is not None:
                kwargs["tool_choice"] = choice
            message = await client.messages.create(**kwargs)
            assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
            for block in message.content:
                if block.type == "tool_use":
                    assert block.name == "get_weather"
                    jsonschema.validate(block.input, WEATHER)
