"""Load, evict and first-token times of a model pool (issue #20), over HTTP.

Three models (tiny-llama, tiny-hybrid, SmolLM2-135M-Instruct) in a pool whose budget holds
two, each engine in its own process. Requests go round-robin over the three, so every
request for the model not loaded evicts the least recently used one and loads it; each
request is streamed and its time to first token measured by the client (a cold one includes
the load), then once more warm. The pool's own load/unload seconds come from its snapshot.

    python benchmarks/pool_timings.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import trio

from pool_soak import MODELS, model_sizes, print_load_summary  # this directory's, run as a script

from omlx_actors.config import RuntimeConfig
from omlx_actors.pool.catalog import PoolModelSpec, PoolOptions
from omlx_actors.server import open_server


async def first_token_s(client: httpx.AsyncClient, model: str) -> float:
    body = {"model": model, "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello there"}]}
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data:") and '"content":"' in line \
                    and '"content":""' not in line:
                ttft = time.perf_counter() - start
    return ttft


async def main(rounds: int) -> None:
    config = RuntimeConfig(isolation="process")
    sizes = await model_sizes(config)
    options = PoolOptions(specs=tuple(PoolModelSpec(source=m) for m in MODELS),
                          budget_bytes=sum(sizes) - 1)
    cold: dict[str, list[float]] = {m: [] for m in MODELS}
    warm: dict[str, list[float]] = {m: [] for m in MODELS}
    async with open_server(config, pool=options) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            for _ in range(rounds):
                for model in MODELS:
                    cold[model].append(await first_token_s(client, model))
                    warm[model].append(await first_token_s(client, model))
        snap = await server.pool.snapshot()
    print(f"budget {options.budget_bytes / 2**20:.0f} MiB; sizes "
          + ", ".join(f"{m} {s / 2**20:.1f} MiB" for m, s in zip(MODELS, sizes)))
    print(f"{'model':<24} {'loads':>5} {'evict':>5} {'last load s':>11} "
          f"{'cold TTFT s p50':>15} {'warm TTFT s p50':>15}")
    for view in snap.models:
        print(f"{view.name:<24} {view.loads:>5} {view.evictions:>5} {view.last_load_s:>11.2f} "
              f"{statistics.median(cold[view.name]):>15.3f} "
              f"{statistics.median(warm[view.name]):>15.3f}")
    print_load_summary(snap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    trio.run(main, parser.parse_args().rounds)
