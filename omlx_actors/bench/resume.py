"""`omlx-actors bench-resume`: what an engine death costs a client.

Runs streams on an engine process (isolation="process"), kills the engine with SIGKILL once
the first stream has received `--kill-after` tokens, and reports, from the death:
the time until the new engine is ready (process start, model load, SSD index rebuild), the
time until the first resumed token, and the longest pause any stream saw - once with the
prefix cache in memory only (a continuation prefills its whole prompt again) and once with
the SSD tier (a continuation's prompt blocks are restored from disk). Each stream's output
is checked against a fault-free run: a resumed greedy stream must be the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.bench.common import make_prompts
from omlx_actors.config import RuntimeConfig


async def _streams(rt, prompts: list[list[int]], max_tokens: int, kill_after: int | None):
    """Run the prompts; if `kill_after`, SIGKILL the engine once a stream has that many
    tokens. Returns each stream's token ids, its longest gap between tokens, and the time
    of the kill (perf_counter) or None."""
    gaps = [0.0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    killed: list[float] = []

    async def one(index: int, prompt: list[int]) -> None:
        session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        last = None
        async with session:
            async for _ in session:
                now = time.perf_counter()
                count = len(session.completion_token_ids)
                if count and last is not None:
                    gaps[index] = max(gaps[index], now - last)
                if count:
                    last = now
                if kill_after is not None and not killed and count >= kill_after:
                    killed.append(time.perf_counter())
                    os.kill(rt.engine_pid, signal.SIGKILL)
        outputs[index] = list(session.completion_token_ids)

    async with trio.open_nursery() as nursery:
        for index, prompt in enumerate(prompts):
            nursery.start_soon(one, index, prompt)
    return outputs, gaps, (killed[0] if killed else None)


def _measure(config: RuntimeConfig, args: argparse.Namespace, label: str) -> dict[str, Any]:
    from omlx_actors.wiring import open_runtime

    async def main() -> dict[str, Any]:
        async with open_runtime(config=config) as rt:
            (warmup,) = make_prompts(1, 64, rt.info.vocab_size, offset=999)
            await _streams(rt, [warmup], 2, None)
            prompts = make_prompts(args.streams, args.prompt_tokens, rt.info.vocab_size, offset=11)
            start = time.perf_counter()
            reference, _, _ = await _streams(rt, prompts, args.max_tokens, None)
            fault_free_s = time.perf_counter() - start
            # The faulted run starts from this engine's memory prefix cache; the kill empties
            # it, so a continuation finds its prompt blocks on the SSD tier or nowhere.
            outputs, gaps, _ = await _streams(rt, prompts, args.max_tokens, args.kill_after)
            status = rt.engine_status()
            return {
                "label": label,
                "streams": args.streams,
                "prompt_tokens": args.prompt_tokens,
                "fault_free_run_s": fault_free_s,
                "restart_s": status.last_restart_s,
                "first_resumed_token_s": status.last_resume_s,
                "longest_stream_pause_s": max(gaps),
                "restarts": status.restarts,
                "outputs_equal_fault_free": outputs == reference,
            }

    return trio.run(main)


def resume_bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    config = attrs.evolve(config, isolation="process")
    results = []
    ssd_dir = Path(tempfile.mkdtemp(prefix="omlx-resume-ssd-"))
    try:
        results.append(_measure(attrs.evolve(config, ssd_cache_dir=None), args, "memory cache only"))
        results.append(_measure(attrs.evolve(config, ssd_cache_dir=ssd_dir), args, "with SSD tier"))
    finally:
        shutil.rmtree(ssd_dir, ignore_errors=True)
    print(f"{args.streams} stream(s) x {args.prompt_tokens} prompt tokens, SIGKILL after "
          f"{args.kill_after} tokens of the first stream, {args.max_tokens} tokens each")
    print(f"{'':20s} {'ready':>8s} {'1st resumed':>12s} {'max pause':>10s} {'fault-free run':>15s} same output")
    for r in results:
        print(f"{r['label']:20s} {r['restart_s']:7.2f}s {r['first_resumed_token_s']:11.2f}s "
              f"{r['longest_stream_pause_s']:9.2f}s {r['fault_free_run_s']:14.2f}s "
              f"{r['outputs_equal_fault_free']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["outputs_equal_fault_free"] and r["restarts"] == 1 for r in results) else 1
