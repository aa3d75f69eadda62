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


async def test_a_streamed_request_waits_for_its_model_to_load(tiny_llama):
    async with open_server(RuntimeConfig(isolation="process"), pool=pool_of(tiny_llama)) as server:
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
