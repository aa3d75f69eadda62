"""`omlx-actors bench`: this runtime in-process vs a bare mlx-lm `BatchGenerator` loop.

Same model, same prompts, same batch settings, greedy decoding with EOS ignored so both
sides produce exactly the same number of tokens; measured side by side in one process, one
concurrency level at a time, (a) then (b), so machine noise hits both alike. The bare loop is
the ceiling for any mlx-lm-based server: the ratio (b)/(a) is the runtime's overhead.

Reported per level: aggregate decode tokens/s, TTFT p50/p99 and the TTFT stagger (the spread
of first-token times among requests submitted together).

`omlx-actors bench-cache` is here too: a long conversation's second turn against its cold
first turn, or (with --ssd-dir) the same prompt before and after a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.bench.common import LevelResult, gaps, make_prompts, median_run
from omlx_actors.config import RuntimeConfig


def bare_loop(model, prompts: list[list[int]], max_tokens: int, config: RuntimeConfig) -> LevelResult:
    """(a): mlx-lm's BatchGenerator driven directly, all prompts inserted at once."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        completion_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
    )
    start = time.perf_counter()
    uids = gen.insert([list(p) for p in prompts], max_tokens=[max_tokens] * len(prompts))
    times: dict[int, list[float]] = {u: [] for u in uids}  # each stream's token times
    remaining = set(uids)
    tokens = 0
    while remaining:
        _, responses = gen.next()
        now = time.perf_counter() - start
        for r in responses:
            tokens += 1
            times[r.uid].append(now)
            if r.finish_reason is not None:
                remaining.discard(r.uid)
    wall = time.perf_counter() - start
    gen.close()
    return LevelResult("bare BatchGenerator", len(prompts), tokens, wall,
                       tuple(times[u][0] for u in uids),
                       itl_s=tuple(g for u in uids for g in gaps(times[u])))


async def runtime_level(rt, prompts: list[list[int]], max_tokens: int) -> LevelResult:
    """(b): the same prompts through the in-process API, submitted together."""
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    start = time.perf_counter()

    async def one(prompt: list[int]) -> None:
        nonlocal tokens
        session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        delivered: list[float] = []  # when an event brought new tokens
        seen = 0
        async with session:
            async for _ in session:
                if len(session.completion_token_ids) > seen:
                    seen = len(session.completion_token_ids)
                    delivered.append(time.perf_counter() - start)
        ttft.append(delivered[0] if delivered else float("nan"))
        itl.extend(gaps(delivered))
        tokens += len(session.completion_token_ids)

    async with trio.open_nursery() as nursery:
        for p in prompts:
            nursery.start_soon(one, p)
    return LevelResult("omlx-actors in-process", len(prompts), tokens,
                       time.perf_counter() - start, tuple(ttft), itl_s=tuple(itl))


class BareLoop:
    """(a) on an idle MLX worker thread (never the runtime's: its engine loop is one job that
    holds its worker), loaded with mlx-lm's own `load_model`, which evaluates the weights, so
    they may be used from any thread. `run` blocks the calling thread.

    Each call takes a worker for one job: a worker puts itself back in the idle pool after
    every job, so holding one across jobs would leave it in the pool while in use."""

    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        self._config = config
        self._path = path
        self._model: Any = None
        self._call(self._load)

    def _load(self) -> None:
        from mlx_lm.utils import load_model

        self._model, _ = load_model(self._path)

    def _call(self, fn, *args):
        import threading

        box: dict[str, Any] = {}
        finished = threading.Event()

        def job() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                box["error"] = exc
            finally:
                finished.set()

        from omlx_actors.engine.mlx_thread import acquire_worker

        acquire_worker().run_job(job)
        finished.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def run(self, prompts: list[list[int]], max_tokens: int) -> LevelResult:
        return self._call(bare_loop, self._model, prompts, max_tokens, self._config)


def run_bench(config: RuntimeConfig, levels: list[int], prompt_tokens: int, max_tokens: int,
              repeat: int = 3, progress=print) -> list[tuple[LevelResult, LevelResult]]:
    """Both sides at each level, alternating (a), (b) `repeat` times after one warm-up of
    each; the run of each side with the median tokens/s is kept (this machine is noisy)."""
    from omlx_actors.wiring import open_runtime, resolve_model

    path, is_demo = trio.run(resolve_model, config)
    progress(f"model: {path}{' (random-weight demo)' if is_demo else ''}")
    config = attrs.evolve(config, model=str(path), max_batch_size=max([*levels, config.max_batch_size]))
    results: list[tuple[LevelResult, LevelResult]] = []

    async def main() -> None:
        async with open_runtime(config=config) as rt:
            # Acquired after the runtime took its own worker, so the two never share a thread.
            bare = await trio.to_thread.run_sync(BareLoop, Path(path), config)
            vocab = rt.info.vocab_size
            warm = make_prompts(2, prompt_tokens, vocab, offset=10_000)
            await trio.to_thread.run_sync(bare.run, warm, 4)
            await runtime_level(rt, warm, 4)
            for level in levels:
                runs_a, runs_b = [], []
                for rep in range(repeat):
                    prompts = make_prompts(level, prompt_tokens, vocab, offset=level * 100 + rep)
                    runs_a.append(await trio.to_thread.run_sync(bare.run, prompts, max_tokens))
                    runs_b.append(await runtime_level(rt, prompts, max_tokens))
                    progress(f"  ... c={level} run {rep + 1}/{repeat}: "
                             f"(a) {runs_a[-1].tokens_per_s:.1f} tok/s, "
                             f"(b) {runs_b[-1].tokens_per_s:.1f} tok/s")
                a, b = median_run(runs_a), median_run(runs_b)
                progress(_row(a))
                progress(_row(b))
                progress(f"  ratio tokens/s (b)/(a) = {b.tokens_per_s / a.tokens_per_s:.3f}, "
                         f"TTFT p50 (b)/(a) = {b.ttft_p50 / a.ttft_p50:.3f}")
                results.append((a, b))

    trio.run(main)
    return results


def _row(r: LevelResult) -> str:
    return (f"  c={r.concurrency:<3d} {r.side:24s} {r.tokens_per_s:8.1f} tok/s  "
            f"TTFT p50 {r.ttft_p50 * 1000:8.1f} ms  p99 {r.ttft_p99 * 1000:8.1f} ms  "
            f"stagger {r.stagger * 1000:8.1f} ms")


def bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or any(level <= 0 for level in levels):
        print("omlx-actors bench: --concurrency needs positive integers", file=sys.stderr)
        return 2
    print(f"bench: levels={levels} prompt_tokens={args.prompt_tokens} max_tokens={args.max_tokens}")
    if args.repeat <= 0:
        print("omlx-actors bench: --repeat must be >= 1", file=sys.stderr)
        return 2
    results = run_bench(config, levels, args.prompt_tokens, args.max_tokens, repeat=args.repeat)
    print("\nsummary (b)/(a):")
    for a, b in results:
        print(f"  c={a.concurrency:<3d} tokens/s ratio {b.tokens_per_s / a.tokens_per_s:.3f}   "
              f"TTFT p50 ratio {b.ttft_p50 / a.ttft_p50:.3f}   "
              f"stagger (a) {a.stagger * 1000:.0f} ms (b) {b.stagger * 1000:.0f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps([[a.as_dict(), b.as_dict()] for a, b in results], indent=2))
        print(f"wrote {args.json}")
    return 0


async def _ttft(rt, prompt: list[int], max_tokens: int):
    start = time.perf_counter()
    session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
    first = None
    done = None
    async with session:
        async for event in session:
            if first is None and session.completion_token_ids:
                first = time.perf_counter() - start
            done = event
    return first, session.completion_token_ids, done


def _restart_bench(args: argparse.Namespace, config: RuntimeConfig) -> int:
    """The same long prompt before and after a restart, its prefix served from the SSD tier."""
    import shutil

    from omlx_actors.wiring import open_runtime

    shutil.rmtree(args.ssd_dir, ignore_errors=True)
    config = attrs.evolve(config, ssd_cache_dir=args.ssd_dir)

    async def once(label: str) -> tuple[float, int]:
        async with open_runtime(config=config) as rt:
            (warmup,) = make_prompts(1, 64, rt.info.vocab_size, offset=999)
            await _ttft(rt, warmup, 2)
            (prompt,) = make_prompts(1, args.history_tokens, rt.info.vocab_size, offset=7)
            ttft, _, done = await _ttft(rt, prompt, args.max_tokens)
            print(f"{label:28s} TTFT {ttft * 1000:9.1f} ms  cached_tokens {done.usage.cached_tokens}",
                  flush=True)
            return ttft, done.usage.cached_tokens

    cold, _ = trio.run(once, "cold (empty SSD tier)")
    warm, cached = trio.run(once, "after restart (from SSD)")
    print(f"ratio restart/cold = {warm / cold:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"cold_ttft_s": cold, "restart_ttft_s": warm,
                                         "ratio": warm / cold, "cached_tokens": cached}, indent=2))
    return 0


def cache_bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    """Second turn of a conversation with a long history vs its cold first turn."""
    from omlx_actors.wiring import open_runtime
    from omlx_actors.front.session import Done

    async def main() -> dict[str, Any]:
        async with open_runtime(config=config) as rt:
            vocab = rt.info.vocab_size
            (warmup,) = make_prompts(1, 64, vocab, offset=999)
            await _ttft(rt, warmup, 2)
            (history,) = make_prompts(1, args.history_tokens, vocab, offset=7)
            cold_ttft, answer, _ = await _ttft(rt, history, args.max_tokens)
            (new_turn,) = make_prompts(1, args.new_tokens, vocab, offset=8)
            turn2 = history + answer + new_turn
            warm_ttft, _, done = await _ttft(rt, turn2, args.max_tokens)
            assert isinstance(done, Done)
            return {
                "history_tokens": len(history),
                "turn2_prompt_tokens": len(turn2),
                "cold_ttft_s": cold_ttft,
                "warm_ttft_s": warm_ttft,
                "ratio": warm_ttft / cold_ttft,
                "cached_tokens": done.usage.cached_tokens,
                "block_size": rt.info.block_size,
            }

    if args.ssd_dir is not None:
        return _restart_bench(args, config)
    result = trio.run(main)
    print(f"history {result['history_tokens']} tokens; turn 2 prompt {result['turn2_prompt_tokens']} tokens")
    print(f"cold first-turn TTFT  {result['cold_ttft_s'] * 1000:9.1f} ms")
    print(f"warm second-turn TTFT {result['warm_ttft_s'] * 1000:9.1f} ms  "
          f"(cached_tokens {result['cached_tokens']}, block size {result['block_size']})")
    print(f"ratio warm/cold = {result['ratio']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
