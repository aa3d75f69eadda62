"""Structured output on the real model (issue #19's done-when): SmolLM2-135M-Instruct over
a real server, the real `openai` and `anthropic` clients, `jsonschema` to validate.

Constrained requests over 5 schemas (nested objects, arrays with item limits, enums,
bounded integers, patterned strings, optional fields), streaming and not, at concurrency 8,
with unconstrained greedy requests in the same batches: every constrained answer parses and
validates or ends with `length`, and every free greedy answer equals its answer alone.

The suite sends 10 of them (25 took 474 s beside a CPU hog); the issue's 100 took 318-676 s
on this 2-core CPU, so that run is asked for explicitly:
    OMLX_STRUCTURED_REQUESTS=100 pytest tests/real_model/test_structured_smollm2.py -k validate
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import trio
from http_support import anthropic_client, openai_client, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "structured"))
from schemas import ALL, ORDER, WEATHER  # noqa: E402
from stream_support import run_chats  # noqa: E402

MODEL = "smollm2-135m-instruct"
CONCURRENCY = 8
CONSTRAINED = int(os.environ.get("OMLX_STRUCTURED_REQUESTS", "10"))
FREE = min(12, (CONSTRAINED + 3) // 8)
PROMPTS = {
    "person": "Describe a person as JSON with name, age and maybe a nickname.",
    "order": "Write a shop order as JSON: id, items with sku and qty, status.",
    "weather": "Give a weather query as JSON: city, unit, days.",
    "tags": "Tag this text as JSON: tags, score, meta.",
    "choice": "Is water wet? Answer as JSON with answer and confidence.",
}
FREE_PROMPTS = [f"Tell me one fact about the number {i}." for i in range(FREE)]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def _constrained(client, i: int, name: str) -> tuple[str, str, str]:
    """(schema name, finish_reason, text) of one request; odd ones stream, every third samples."""
    kwargs = dict(model=MODEL, messages=_user(PROMPTS[name]), max_tokens=128,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": name, "schema": ALL[name], "strict": True}})
    if i % 3 == 0:
        kwargs.update(temperature=0.8, seed=i)
    if i % 2:
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        (finish,) = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = await client.chat.completions.create(**kwargs)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    return name, finish, text


async def _free(client, prompt: str) -> str:
    reply = await client.chat.completions.create(model=MODEL, messages=_user(prompt), max_tokens=48)
    return reply.choices[0].message.content


async def test_constrained_requests_validate_beside_unchanged_free_ones(smollm2):
    async with serve(smollm2) as server, openai_client(server, timeout=600) as client:
        alone = [await _free(client, p) for p in FREE_PROMPTS]
        limiter = trio.CapacityLimiter(CONCURRENCY)
        constrained: list[tuple[str, str, str]] = []
        free: dict[int, str] = {}

        async def one_constrained(i: int, name: str) -> None:
            async with limiter:
                constrained.append(await _constrained(client, i, name))

        async def one_free(i: int) -> None:
            async with limiter:
                free[i] = await _free(client, FREE_PROMPTS[i])

        names = itertools.cycle(ALL)
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(CONSTRAINED):
                nursery.start_soon(one_constrained, i, next(names))
                if i % 8 == 4 and i // 8 < FREE:
                    nursery.start_soon(one_free, i // 8)
        elapsed = time.monotonic() - started
    finishes = {}
    for name, finish, text in constrained:
        finishes[finish] = finishes.get(finish, 0) + 1
        if finish == "stop":
            jsonschema.validate(json.loads(text), ALL[name])
        else:
            assert finish == "length", (name, finish, text)
    print(f"\n{CONSTRAINED} constrained + {FREE} free at c={CONCURRENCY}: {finishes}, {elapsed:.1f} s")
    assert len(constrained) == CONSTRAINED
    assert finishes.get("stop", 0) >= 0.9 * CONSTRAINED  # a trained model finishes its JSON
    assert [free[i] for i in range(FREE)] == alone


async def test_forced_tool_calls_through_both_sdks_match_the_tool_schema(smollm2):
    openai_tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                          "parameters": WEATHER}},
        {"type": "function", "function": {"name": "place_order", "description": "Place an order",
                                          "parameters": ORDER, "strict": True}},
    ]
    anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"]["parameters"]} for t in openai_tools]
    ask = _user("What is the weather in Paris this week?")
    async with serve(smollm2) as server:
        async with openai_client(server, timeout=300) as client:
            for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                reply = await client.chat.completions.create(
                    model=MODEL, messages=ask, max_tokens=128, tools=openai_tools, tool_choice=choice)
                assert reply.choices[0].finish_reason == "tool_calls"
                (call,) = reply.choices[0].message.tool_calls
                schema = WEATHER if call.function.name == "get_weather" else ORDER
                jsonschema.validate(json.loads(call.function.arguments), schema)
        async with anthropic_client(server, timeout=300) as client:
            for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
                message = await client.messages.create(
                    model=MODEL, max_tokens=128, messages=ask, tools=anthropic_tools, tool_choice=choice)
                assert message.stop_reason == "tool_use"
                (use,) = [b for b in message.content if b.type == "tool_use"]
                jsonschema.validate(use.input, WEATHER if use.name == "get_weather" else ORDER)


async def test_an_engine_kill_mid_constrained_stream_resumes_and_validates(smollm2):
    """SIGKILL the engine process while 4 constrained greedy streams are mid-way: each resumes
    (its fresh matcher replays what was delivered), validates, and equals the run without
    the kill."""
    from omlx_actors.wiring import open_runtime
    from omlx_actors.front.structured import response_format_output

    names = ["order", "tags", "person", "weather"]

    async def run(rt, kill: bool) -> list[tuple[str, object]]:
        requests = [(_user(PROMPTS[name]), response_format_output(
            {"type": "json_schema", "json_schema": {"name": name, "schema": ALL[name]}}))
            for name in names]
        return await run_chats(rt, requests, max_tokens=128, kill_after_tokens=3 if kill else None,
                               kill_within_s=120, poll_s=0.005)

    async with open_runtime(str(smollm2)) as rt:
        reference = await run(rt, kill=False)
    async with open_runtime(str(smollm2), isolation="process") as rt:
        resumed = await run(rt, kill=True)
        status = rt.engine_status()
    assert status.restarts == 1 and status.resumed_requests >= 1
    for name, (text, done), (expected, _) in zip(names, resumed, reference):
        assert done.finish_reason == "stop", (name, done.finish_reason, done.error)
        jsonschema.validate(json.loads(text), ALL[name])
        assert text == expected
