"""An engine process killed in the middle of constrained streams: each resumes as a
continuation whose fresh matcher replays the delivered tokens, and still validates - and,
greedy, says exactly what the uninterrupted run says."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest
import trio
from schemas import TAGS

from omlx_actors import open_runtime
from omlx_actors.front.structured import response_format_output

pytestmark = pytest.mark.timeout(240)

# Long enough output that a kill after a few steps lands mid-stream.
LONG = {
    "type": "object",
    "properties": {
        "words": {"type": "array", "minItems": 12, "maxItems": 16,
                  "items": {"type": "string", "pattern": "^[a-z]{4,8}$"}},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["words", "n"],
    "additionalProperties": False,
}
STREAMS = 6


def _output(i: int):
    schema = LONG if i % 2 == 0 else TAGS
    return schema, response_format_output({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})


async def _run_all(rt, kill_after_tokens: int | None = None):
    results: dict[int, tuple[str, object]] = {}
    delivered = [0] * STREAMS

    async def one(i: int) -> None:
        _, structured = _output(i)
        session = rt.chat([{"role": "user", "content": f"list {i}"}], max_tokens=300,
                          structured=structured)
        text = []
        async with session:
            async for event in session:
                if hasattr(event, "text"):
                    text.append(event.text)
                    delivered[i] += 1
                elif hasattr(event, "finish_reason"):
                    results[i] = ("".join(text), event)

    async with trio.open_nursery() as nursery:
        for i in range(STREAMS):
            nursery.start_soon(one, i)
        if kill_after_tokens is not None:
            with trio.fail_after(60):
                while min(delivered) < kill_after_tokens:
                    await trio.sleep(0.002)
            os.kill(rt.engine_pid, signal.SIGKILL)
    return [results[i] for i in range(STREAMS)]


async def test_a_killed_engine_resumes_constrained_streams_that_still_validate(tiny_llama):
    async with open_runtime(tiny_llama) as rt:
        reference = await _run_all(rt)
    async with open_runtime(tiny_llama, isolation="process") as rt:
        results = await _run_all(rt, kill_after_tokens=4)
        status = rt.engine_status()
    assert status.restarts == 1
    assert status.resumed_requests == STREAMS  # every stream was mid-way
    for i, ((text, done), (expected, _)) in enumerate(zip(results, reference)):
        assert done.error is None, done.error
        schema, _ = _output(i)
        if done.finish_reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:
            assert done.finish_reason == "length"
        assert text == expected  # greedy: the continuation says what the whole run says
    assert sum(done.finish_reason == "stop" for _, done in results) >= STREAMS // 2
