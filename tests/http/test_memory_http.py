"""Memory refusals over HTTP: 413 before any stream byte, in each API's shape."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest
import trio

from http_support import (
    MODEL,
    anthropic_client,
    chat_body,
    http_client,
    openai_client,
    serve,
    sse_payloads,
)

MiB = 1024 * 1024


def _weights(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


async def test_a_prompt_that_cannot_fit_gets_413_fast_while_a_small_stream_completes(tiny_llama):
    huge = "hello " * 600  # ~1800 tokens: within the context, beyond the memory budget
    async with serve(tiny_llama, memory_budget_bytes=_weights(tiny_llama) + 2 * MiB,
                     prefix_cache_bytes=0) as server:
        async with http_client(server) as http, trio.open_nursery() as nursery:
            small_done = []

            async def small():
                async with http.stream("POST", "/v1/chat/completions",
                                       json=chat_body(max_tokens=30, ignore_eos=True, stream=True)) as r:
                    assert r.status_code == 200
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    small_done.append(lines[-1])

            nursery.start_soon(small)
            before = await server.runtime.stats()
            start = time.monotonic()
            raw = await http.post("/v1/chat/completions",
                                  json=chat_body(messages=[{"role": "user", "content": huge}], stream=True))
            elapsed = time.monotonic() - start
            anthropic_raw = await http.post("/v1/messages", json={
                "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": huge}]})
            after = await server.runtime.stats()
        async with openai_client(server) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": huge}], max_tokens=8)
        async with anthropic_client(server) as client:
            with pytest.raises(anthropic.APIStatusError) as anthropic_caught:
                await client.messages.create(
                    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": huge}])
    assert raw.status_code == 413, raw.text
    assert elapsed < 2  # no prefill (counted below); generous: 0.1 s failed on a busy machine
    error = raw.json()["error"]
    assert error["code"] == "prefill_memory_exceeded"
    assert error["estimated_bytes"] > error["limit_bytes"] > 0
    assert anthropic_raw.status_code == 413
    assert anthropic_raw.json()["error"]["type"] == "request_too_large"
    assert caught.value.status_code == 413
    assert anthropic_caught.value.status_code == 413
    # No prefill work was done for the refused prompts; the small stream finished.
    assert after.prompt_tokens_processed - before.prompt_tokens_processed < 100
    assert small_done == ["data: [DONE]"]


async def test_out_of_memory_in_a_step_is_503_before_the_first_byte_and_an_error_event_after(tiny_llama):
    async with serve(tiny_llama) as server:
        async with http_client(server) as http:
            await server.runtime.inject_fault()
            plain = await http.post("/v1/chat/completions", json=chat_body(max_tokens=20, ignore_eos=True))
            await server.runtime.inject_fault()
            async with http.stream("POST", "/v1/chat/completions",
                                   json=chat_body(max_tokens=20, ignore_eos=True, stream=True)) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            health = await http.get("/health")
            after = await http.post("/v1/chat/completions", json=chat_body(max_tokens=5, ignore_eos=True))
    assert plain.status_code == 503
    assert plain.json()["error"]["code"] == "out_of_memory"
    assert '"error"' in lines[-2] and "out of memory" in lines[-2]
    assert lines[-1] == "data: [DONE]"
    assert health.status_code == 200
    assert after.status_code == 200
    assert after.json()["usage"]["completion_tokens"] == 5


# Issue #15 item 4. With --memory-budget 2M, tiny-llama's weights (0.53 MiB) and MLX's cache
# reserve leave 1.32 MiB for requests and the prefix cache. REPEATED is 182 prompt tokens:
# alone it fits with 64-token prefill chunks, but with its first two blocks restored from the
# cache its KV is a 384-position buffer (the restored 128 plus one 256-position growth), which
# does not fit. SIBLING (198 tokens) shares only REPEATED's first block: it fits alone, but
# not beside the 96 KiB of cache, nor beside the one 32 KiB block it pins itself - it waited
# with keep-alives and nothing running while the cache, cut to 14 KiB for it, kept that block.
REPEATED = " ".join(f"w{i}" for i in range(60))
SIBLING = " ".join(f"w{i}" for i in range(35)) + " " + " ".join(f"z{i}" for i in range(25))
# The most one of these requests may take, queue included, on a busy machine (each takes well
# under a second alone); the bug was a stream that never ended.
ANSWER_BOUND_S = 20


async def _answer(http, content: str, *, stream: bool) -> tuple[int, int, str]:
    """(status, completion tokens, finish reason or error code) of one chat request."""
    body = chat_body(messages=[{"role": "user", "content": content}], max_tokens=20,
                     ignore_eos=True, stream=stream,
                     **({"stream_options": {"include_usage": True}} if stream else {}))
    with trio.fail_after(ANSWER_BOUND_S):
        if not stream:
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return r.status_code, 0, r.json()["error"]["code"]
            return 200, r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, 0, r.json()["error"]["code"]
            payloads = sse_payloads([line async for line in r.aiter_lines()])
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    if "error" in chunks[-1]:
        return 200, 0, chunks[-1]["error"].get("code") or "error"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return 200, chunks[-1]["usage"]["completion_tokens"], [r for r in reasons if r][-1]


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_the_same_request_under_a_tiny_budget_is_answered_every_time_and_never_left_waiting(
        tiny_llama, isolation):
    async with serve(tiny_llama, memory_budget_bytes=2 * MiB, block_size=64,
                     isolation=isolation) as server:
        async with http_client(server, timeout=ANSWER_BOUND_S) as http:
            answers = []
            for content, stream in [(REPEATED, False), (REPEATED, False), (REPEATED, True),
                                    (SIBLING, True), (SIBLING, False), (REPEATED, True)]:
                answers.append(await _answer(http, content, stream=stream))
                cache = await server.runtime.cache_stats()
                assert cache.used_bytes <= cache.budget_bytes
            stats = await server.runtime.stats()
    # Each request fits the budget alone, so each runs: none is refused, none waits forever.
    assert answers == [(200, 20, "length")] * 6
    assert (stats.running, stats.waiting) == (0, 0)


async def test_a_request_queued_past_max_queue_wait_gets_503_with_retry_after_or_an_error_event(tiny_llama):
    # A 4 MiB budget: the process is far over it, so admission pauses while a request runs
    # and the others queue; each must leave the queue after max_queue_wait_s, while the
    # long stream (1200 tokens, ~2.4 s on a busy 2-core machine) still runs.
    async with serve(tiny_llama, memory_budget_bytes=4 * MiB, block_size=64,
                     max_queue_wait_s=0.2) as server:
        async with http_client(server, timeout=ANSWER_BOUND_S) as http, trio.open_nursery() as nursery:
            long_answer = []
            queued: dict[str, object] = {}

            async def long_stream(task_status=trio.TASK_STATUS_IGNORED):
                body = chat_body(max_tokens=1200, ignore_eos=True, stream=True,
                                 stream_options={"include_usage": True})
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if '"content"' in line:
                            task_status.started()  # running: its first token is out
                            break
                    rest = [line async for line in lines]
                long_answer.append(json.loads(sse_payloads(rest)[-2])["usage"]["completion_tokens"])

            async def plain():
                queued["plain"] = await http.post("/v1/chat/completions", json=chat_body(max_tokens=5))

            async def streamed():
                queued["streamed"] = await _answer(http, "Hello there", stream=True)

            async def openai_sdk():
                async with openai_client(server) as client:
                    with pytest.raises(openai.APIStatusError) as caught:
                        await client.chat.completions.create(
                            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
                queued["openai"] = caught.value

            await nursery.start(long_stream)
            with trio.fail_after(ANSWER_BOUND_S):
                async with trio.open_nursery() as waiting:
                    for task in (plain, streamed, openai_sdk):
                        waiting.start_soon(task)
            running_when_refused = not long_answer
        async with http_client(server) as after:
            late = await _answer(after, "Hello there", stream=False)
    assert running_when_refused  # each left the queue while the long stream still ran
    plain = queued["plain"]
    assert plain.status_code == 503 and plain.headers["retry-after"] == "1"
    assert plain.json()["error"]["code"] == "queue_timeout"
    assert "limit is 0.2 s" in plain.json()["error"]["message"]
    assert queued["streamed"] == (200, 0, "queue_timeout")
    assert queued["openai"].status_code == 503
    assert long_answer == [1200]
    assert late == (200, 20, "length")  # the queue works on once the long stream ended
