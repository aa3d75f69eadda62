"""A model pool soak (issue #20): three models in a budget that holds two, for minutes.

tiny-llama, tiny-hybrid and SmolLM2-135M-Instruct, each engine in its own process, the pool
budget holding any two but never all three. First each prompt is answered once per model
(greedy) to get the expected outputs; then `--clients` clients send greedy requests to
random models (streamed and not) for `--seconds`, and every output must equal the expected
one. At the end: requests, mismatches, failures, the pool's loads, evictions, drains'
effect (loads per model) and load/unload seconds.

    python benchmarks/pool_soak.py --seconds 180 --clients 6
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import openai
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.models.download import resolve_model
from omlx_actors.pool.catalog import PoolModelSpec, PoolOptions, footprint_bytes
from omlx_actors.server import open_server

MODELS = ("tiny-llama", "tiny-hybrid", "smollm2-135m-instruct")
PROMPTS = ("Hello there", "Name three colours.", "What is 2 + 2?", "Write a haiku about tea.")
MAX_TOKENS = 16


async def ask(client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        return answer.choices[0].message.content
    parts = []
    async for chunk in await client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


async def model_sizes(config: RuntimeConfig) -> list[int]:
    """Each of `MODELS`' pool footprint (bytes), as the pool prices it."""
    sizes = []
    for name in MODELS:
        probe = RuntimeConfig(model=None, demo_model=name) if name.startswith("tiny") else \
            RuntimeConfig(model=name)
        path, _ = await resolve_model(probe)
        sizes.append(footprint_bytes(path, config))
    return sizes


def print_load_summary(snap) -> None:
    """The pool's loads and unloads (evictions) over the run, from its snapshot."""
    lo, un = snap.load_seconds, snap.unload_seconds
    print(f"  loads {lo.count} (mean {lo.total / max(lo.count, 1):.2f} s), unloads {un.count} "
          f"(mean {un.total / max(un.count, 1):.3f} s), load failures {snap.load_failures}")


async def main(seconds: float, clients: int, seed: int) -> None:
    config = RuntimeConfig(isolation="process")
    options = PoolOptions(specs=tuple(PoolModelSpec(source=m) for m in MODELS),
                          budget_bytes=sum(await model_sizes(config)) - 1)
    tally: Counter = Counter(mismatches=0)
    async with open_server(config, pool=options) as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                    timeout=600)
        expected = {(m, p): await ask(client, m, p, False) for m in MODELS for p in PROMPTS}
        deadline = trio.current_time() + seconds

        async def one_client(rng: random.Random) -> None:
            while trio.current_time() < deadline:
                model, prompt = rng.choice(MODELS), rng.choice(PROMPTS)
                try:
                    text = await ask(client, model, prompt, rng.random() < 0.5)
                except openai.APIError as exc:
                    tally[f"error {type(exc).__name__}"] += 1
                    continue
                tally["requests"] += 1
                tally[f"requests {model}"] += 1
                if text != expected[model, prompt]:
                    tally["mismatches"] += 1

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(one_client, random.Random(seed + i))
        elapsed = time.perf_counter() - start
        snap = await server.pool.snapshot()
    print(f"{elapsed:.0f} s, {clients} clients: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    for view in snap.models:
        print(f"  {view.name:<24} loads {view.loads:>3}  evictions {view.evictions:>3}  "
              f"last load {view.last_load_s or 0:.2f} s")
    print_load_summary(snap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.clients, args.seed)
