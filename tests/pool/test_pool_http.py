"""A real server serving a model pool on loopback, through the real OpenAI and Anthropic
clients: routing by `model`, 404s listing what is served, /v1/models with states, /health
per model, /metrics with a `model` label and the pool's loads, evictions and load times."""

from __future__ import annotations

import sys
from pathlib import Path

import anthropic
import openai
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http"))

from http_support import anthropic_client, http_client, openai_client  # noqa: E402

from omlx_actors.config import RuntimeConfig  # noqa: E402
from omlx_actors.http.settings import HttpSettings  # noqa: E402
from omlx_actors.pool.catalog import PoolModelSpec, PoolOptions, footprint_bytes  # noqa: E402
from omlx_actors.server import open_server  # noqa: E402

HELLO = [{"role": "user", "content": "Hello there"}]


def pool_of(*paths, budget: int | None = None, **kwargs) -> PoolOptions:
    return PoolOptions(specs=tuple(PoolModelSpec(source=str(p)) for p in paths),
                       budget_bytes=budget, **kwargs)


async def test_requests_are_routed_by_model_and_unknown_models_are_404s(tiny_llama, tiny_hybrid):
    budget = max(footprint_bytes(p, RuntimeConfig()) for p in (tiny_llama, tiny_hybrid))
    async with open_server(RuntimeConfig(), pool=pool_of(tiny_llama, tiny_hybrid, budget=budget)) as server:
        client = openai_client(server)
        async with http_client(server) as http:
            listed = (await http.get("/v1/models")).json()["data"]
            assert [(m["id"], m["state"]) for m in listed] == [
                ("tiny-llama", "unloaded"), ("tiny-hybrid", "unloaded")]
            health = (await http.get("/health")).json()
            assert health["status"] == "ok"
            assert health["models"]["tiny-llama"]["state"] == "unloaded"

            answer = await client.chat.completions.create(model="tiny-llama", messages=HELLO,
                                                          max_tokens=4)
            assert answer.model == "tiny-llama"
            message = await anthropic_client(server).messages.create(
                model="tiny-hybrid", messages=HELLO, max_tokens=4)
            assert message.model == "tiny-hybrid"

            listed = {m["id"]: m["state"] for m in (await http.get("/v1/models")).json()["data"]}
            assert listed == {"tiny-llama": "unloaded", "tiny-hybrid": "loaded"}
            health = (await http.get("/health")).json()
            assert health["models"]["tiny-hybrid"]["engine"]["state"] == "ready"
            assert health["models"]["tiny-llama"]["evictions"] == 1

            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=4)
            error = missing.value.body
            assert error["code"] == "model_not_found"
            assert "available: tiny-llama, tiny-hybrid" in error["message"]
            with pytest.raises(anthropic.NotFoundError) as missing:
                await anthropic_client(server).messages.create(
                    model="claude", messages=HELLO, max_tokens=4)
            assert missing.value.body["type"] == "error"
            assert "available: tiny-llama, tiny-hybrid" in missing.value.body["error"]["message"]

            metrics = (await http.get("/metrics")).text
        assert 'omlx_pool_loads_total{model="tiny-llama"} 1.0' in metrics
        assert 'omlx_pool_evictions_total{model="tiny-llama"} 1.0' in metrics
        assert "omlx_pool_load_seconds_count 2.0" in metrics
        assert 'omlx_pool_model_state{model="tiny-hybrid",state="loaded"} 1.0' in metrics
        assert 'omlx_model_requests_finished_total{model="tiny-llama",reason="length"} 1.0' in metrics
        assert 'omlx_model_time_to_first_token_seconds_count{model="tiny-hybrid"} 1.0' in metrics
        assert 'omlx_model_engine_ready{model="tiny-hybrid"} 1.0' in metrics


async def test_a_model_that_can_never_fit_is_a_413_that_says_so(tiny_llama, tiny_hybrid):
    small, big = sorted((footprint_bytes(p, RuntimeConfig()), str(p)) for p in (tiny_llama, tiny_hybrid))
    options = PoolOptions(specs=(PoolModelSpec(source=small[1]),
                                 PoolModelSpec(source=big[1], explicit=False)),
                          budget_bytes=small[0])
    async with open_server(RuntimeConfig(), pool=options) as server:
        with pytest.raises(openai.APIStatusError) as refused:
            await openai_client(server).chat.completions.create(
                model=Path(big[1]).name, messages=HELLO, max_tokens=4)
        assert refused.value.status_code == 413
        assert "can never be loaded" in refused.value.body["message"]
        assert refused.value.body["code"] == "model_memory_exceeded"


async def test_a_streamed_request_gets_keep_alives_while_its_model_loads(tiny_llama, tiny_hybrid):
    settings = HttpSettings(keepalive_s=0.2)
    async with open_server(RuntimeConfig(isolation="process"), settings,
                           pool=pool_of(tiny_llama, tiny_hybrid, idle_ttl_s=0.5)) as server:
        seen = []
        async with http_client(server) as http:
            async def watch():
                while True:
                    seen.append((await http.get("/health")).json()["models"]["tiny-llama"])
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                stream = await openai_client(server).chat.completions.create(
                    model="tiny-llama", messages=HELLO, max_tokens=4, stream=True)
                chunks = [c async for c in stream]
                nursery.cancel_scope.cancel()
        assert chunks and chunks[0].model == "tiny-llama"
        loading = [s for s in seen if s["state"] == "loading"]
        assert loading and all("seconds" in s["load"] for s in loading)
        # The raw stream: keep-alives (OpenAI: comments; Anthropic: pings) before the model's
        # first frame, while the engine process starts.
        async with http_client(server) as http:
            for path, body, keepalive in (
                ("/v1/chat/completions", {"model": "tiny-hybrid", "stream": True, "max_tokens": 2,
                                          "messages": HELLO}, ": keep-alive"),
                ("/v1/messages", {"model": "tiny-llama", "stream": True, "max_tokens": 2,
                                  "messages": HELLO}, "event: ping"),
            ):
                await unload_all(server)
                async with http.stream("POST", path, json=body) as response:
                    assert response.status_code == 200
                    lines = [line async for line in response.aiter_lines() if line]
                first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
                assert keepalive in lines[:first_data] or lines[0] == keepalive, lines[:5]
                assert lines[-1] == "data: [DONE]" or "message_stop" in lines[-1], lines[-3:]


async def unload_all(server) -> None:
    """Wait until the idle TTL has unloaded every model of the server's pool."""
    with trio.fail_after(30):
        while any(v.state != "unloaded" for v in (await server.pool.snapshot()).models):
            await trio.sleep(0.05)


async def test_sdk_streams_that_wait_for_a_load_read_as_usual(tiny_llama, tiny_hybrid):
    settings = HttpSettings(keepalive_s=0.1)
    async with open_server(RuntimeConfig(), settings, pool=pool_of(tiny_llama, tiny_hybrid)) as server:
        async with anthropic_client(server).messages.stream(
                model="tiny-llama", messages=HELLO, max_tokens=4) as stream:
            message = await stream.get_final_message()
        assert message.model == "tiny-llama" and message.usage.output_tokens == 4
        chunks = await openai_client(server).completions.create(
            model="tiny-hybrid", prompt="Hello", max_tokens=4, stream=True)
        assert [c.model async for c in chunks][0] == "tiny-hybrid"


async def test_health_is_degraded_not_down_while_one_model_fails_to_load(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    async with open_server(RuntimeConfig(), pool=pool_of(tiny_llama, broken)) as server:
        async with http_client(server) as http:
            refused = await http.post("/v1/chat/completions", json={
                "model": "broken", "messages": HELLO, "max_tokens": 2})
            assert refused.status_code == 503 and "failed to load" in refused.json()["error"]["message"]
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "degraded"
            assert health.json()["models"]["broken"]["state"] == "failed"
            assert health.json()["models"]["tiny-llama"]["state"] == "unloaded"
