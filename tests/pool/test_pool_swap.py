"""Three real models in a pool whose budget holds two, each in its own engine process,
through a real server on loopback and the real OpenAI client: concurrent greedy requests
to all three swap models in and out, nothing is lost, every output equals a single-model
server's for the same request, and the swaps show in /metrics."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "http"))

from http_support import http_client, openai_client, serve  # noqa: E402

from omlx_actors.config import RuntimeConfig  # noqa: E402
from omlx_actors.models.download import resolve_model  # noqa: E402
from omlx_actors.pool.catalog import PoolModelSpec, PoolOptions, footprint_bytes  # noqa: E402
from omlx_actors.server import open_server  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"
PROMPTS = ["Hello there", "Name three colours.", "What is 2 + 2?"]
MAX_TOKENS = 12
ROUNDS = 3


async def smollm2_path() -> Path:
    path, _ = await resolve_model(RuntimeConfig(model=SMOLLM2))
    return path


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def chat(client, model: str, prompt: str, stream: bool) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        return answer.choices[0].message.content
    parts = []
    chunks = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def references(paths: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Each model alone on a single-model server: the outputs to match."""
    expected = {}
    for name, path in paths.items():
        async with serve(path, isolation="thread") as server:
            client = openai_client(server, timeout=120)
            for prompt in PROMPTS:
                expected[name, prompt] = await chat(client, path.name, prompt, stream=False)
    return expected


async def test_three_models_in_a_budget_of_two_swap_and_match_single_servers(
        tiny_llama, tiny_hybrid):
    paths = {"tiny-llama": tiny_llama, "tiny-hybrid": tiny_hybrid, SMOLLM2: await smollm2_path()}
    expected = await references(paths)
    sizes = [footprint_bytes(p, RuntimeConfig()) for p in paths.values()]
    budget = sum(sizes) - 1  # any two fit, never all three
    specs = (PoolModelSpec(source=str(tiny_llama)), PoolModelSpec(source=str(tiny_hybrid)),
             PoolModelSpec(source=SMOLLM2))
    options = PoolOptions(specs=specs, budget_bytes=budget)
    async with open_server(RuntimeConfig(isolation="process"), pool=options) as server:
        client = openai_client(server, timeout=300)
        got: dict[tuple[str, str, int], str] = {}

        async def one(name: str, prompt: str, round_: int) -> None:
            stream = (round_ + PROMPTS.index(prompt)) % 2 == 0
            got[name, prompt, round_] = await chat(client, name, prompt, stream)

        for round_ in range(ROUNDS):
            async with trio.open_nursery() as nursery:
                for name in paths:
                    for prompt in PROMPTS:
                        nursery.start_soon(one, name, prompt, round_)
        async with http_client(server) as http:
            metrics = (await http.get("/metrics")).text
            models = (await http.get("/v1/models")).json()["data"]
    assert len(got) == ROUNDS * len(paths) * len(PROMPTS)
    for (name, prompt, _), text in got.items():
        assert text == expected[name, prompt], (name, prompt)
    assert sum(m["state"] == "loaded" for m in models) <= 2
    assert metric(metrics, "omlx_pool_evictions_total") >= ROUNDS - 1
    assert metric(metrics, "omlx_pool_load_seconds_count") >= len(paths) + ROUNDS - 1
    assert metric(metrics, "omlx_pool_load_seconds_sum") > 0
    assert metric(metrics, "omlx_pool_memory_bytes") > 0
