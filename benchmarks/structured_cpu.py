"""The cost of constrained decoding: decode tokens/s at a concurrency, every request free
vs every request constrained to a JSON schema, through the runtime in-process.

    python benchmarks/structured_cpu.py [--model smollm2-135m-instruct] [--concurrency 8]
        [--requests 32] [--tokens 64] [--rounds 3]

Both sides generate exactly `--tokens` tokens per request (free: ignore_eos; constrained:
a schema that needs longer output than that, so each ends with `length`), so the figures
compare the same work. Rounds alternate free and constrained; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

import omlx_actors.mlx_loader  # noqa: F401 - OpenBLAS before MLX
from omlx_actors import open_runtime
from omlx_actors.front.structured import response_format_output

# Needs far more than 64 tokens: 40+ patterned words.
LONG = {
    "type": "object",
    "properties": {
        "words": {"type": "array", "minItems": 40, "maxItems": 60,
                  "items": {"type": "string", "pattern": "^[a-z]{3,10}$"}},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["words", "count"],
    "additionalProperties": False,
}


async def run(rt, requests: int, concurrency: int, tokens: int, constrained: bool) -> float:
    structured = response_format_output(
        {"type": "json_schema", "json_schema": {"name": "words", "schema": LONG}}) if constrained else None
    limiter = trio.CapacityLimiter(concurrency)
    produced = 0

    async def one(i: int) -> None:
        nonlocal produced
        async with limiter:
            session = rt.chat([{"role": "user", "content": f"List {40 + i} lowercase English words as JSON."}],
                              max_tokens=tokens, structured=structured, ignore_eos=not constrained)
            async with session:
                _, _, done = await session.collect()
            assert done.finish_reason == "length", done
            produced += done.usage.completion_tokens

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(requests):
            nursery.start_soon(one, i)
    return produced / (time.perf_counter() - start)


async def main(args) -> None:
    async with open_runtime(args.model) as rt:
        await run(rt, args.concurrency, args.concurrency, 8, True)  # warm up (tokenizer, matcher)
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(await run(rt, args.requests, args.concurrency, args.tokens, False))
            constrained.append(await run(rt, args.requests, args.concurrency, args.tokens, True))
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"model {args.model}, c={args.concurrency}, {args.requests} requests x {args.tokens} tokens")
    print(f"free:        {f:7.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in free)})")
    print(f"constrained: {c:7.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in constrained)})")
    print(f"constrained / free: {c / f:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    trio.run(main, parser.parse_args())
