"""Memory refusals over HTTP: 413 before any stream byte, in each API's shape."""

from __future__ import annotations

import time

import anthropic
import openai
import pytest
import trio

from http_support import MODEL, anthropic_client, chat_body, http_client, openai_client, serve

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
    assert elapsed < 0.1
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
