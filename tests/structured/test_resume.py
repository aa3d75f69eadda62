"""An engine process killed in the middle of constrained streams: each resumes as a
continuation whose fresh matcher replays the delivered tokens, and still validates - and,
greedy, says exactly what the uninterrupted run says."""

from __future__ import annotations

import json

import jsonschema
import pytest
from schemas import TAGS
from stream_support import run_chats

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
    requests = [([{"role": "user", "content": f"list {i}"}], _output(i)[1]) for i in range(STREAMS)]
    return await run_chats(rt, requests, max_tokens=300, kill_after_tokens=kill_after_tokens,
                           kill_within_s=60, poll_s=0.002)


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
