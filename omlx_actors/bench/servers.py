"""`omlx-actors bench-servers`: (a) a bare mlx-lm `BatchGenerator` loop, (b) this runtime
in-process, (c) this runtime's HTTP server and (d) mlx-lm's own `mlx_lm.server`.

(c) and (d) run as subprocesses on loopback, driven by the same streaming client, so the two
servers are measured alike; that client runs in processes of its own (bench/http_load.py,
`--client-processes` of them), so it neither limits the servers nor shares a GIL with (a) and
(b). Each level: every side warms up on the level's exact shapes (prompts of the same token
lengths as the measured ones), then runs `--repeat` times on new prompts of those lengths; the
median run of each side is reported with its ratio to (a), its TTFT and its inter-token
latency, and, where both servers ran, the paired (c)/(d) ratio of each repeat. Then, with
`--turns` >= 2, a multi-turn workload: the TTFT of later turns, whose history a prefix cache
can serve (a few conversations, TTFT only: its client stays in this process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.bench.common import (LevelResult, ServerProcess, free_port, make_text_prompts,
                                      median_run, texts_of_lengths)
from omlx_actors.bench.http_load import HttpJob, run_http_load
from omlx_actors.bench.inprocess import BareLoop, runtime_level
from omlx_actors.config import RuntimeConfig


async def http_turns(url: str, model: str, conversations: list[str], turns: int, max_tokens: int) -> list[float]:
    """Multi-turn: each conversation resends its whole history plus a new message each turn
    (conversations run concurrently); returns the TTFTs of turns after the first."""
    import httpx

    later: list[float] = []

    async def conversation(client, history: str, k: int) -> None:
        for turn in range(turns):
            body = {"model": model, "prompt": history, "max_tokens": max_tokens, "stream": True,
                    "temperature": 0.0, "ignore_eos": True}
            start = time.perf_counter()
            first, text = None, []
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0].get("text"):
                            text.append(chunk["choices"][0]["text"])
                            if first is None:
                                first = time.perf_counter() - start
            if turn > 0:
                later.append(first if first is not None else float("nan"))
            history = history + "".join(text) + " " + make_text_prompts(1, 24, offset=100 * k + turn)[0]

    async with httpx.AsyncClient(timeout=600) as client:
        async with trio.open_nursery() as nursery:
            for k, history in enumerate(conversations):
                nursery.start_soon(conversation, client, history, k)
    return later


async def runtime_turns(rt, conversations: list[str], turns: int, max_tokens: int) -> list[float]:
    later: list[float] = []

    async def conversation(history: str, k: int) -> None:
        for turn in range(turns):
            start = time.perf_counter()
            session = rt.complete(history, max_tokens=max_tokens, ignore_eos=True)
            first, text = None, []
            async with session:
                async for event in session:
                    if getattr(event, "text", "") and first is None:
                        first = time.perf_counter() - start
                    if getattr(event, "text", ""):
                        text.append(event.text)
            if turn > 0:
                later.append(first if first is not None else float("nan"))
            history = history + "".join(text) + " " + make_text_prompts(1, 24, offset=100 * k + turn)[0]

    async with trio.open_nursery() as nursery:
        for k, history in enumerate(conversations):
            nursery.start_soon(conversation, history, k)
    return later



@attrs.frozen
class _Sides:
    """What each step runs against: (a) the bare loop, (b) the runtime, (c) our server and
    (d) mlx_lm.server (None when --sides leaves it out), with the model id each server
    answers to."""

    rt: Any
    bare: BareLoop
    ours: ServerProcess
    theirs: ServerProcess | None
    model_id: str
    their_id: str
    client_processes: int = 1  # HTTP client processes per measured run of (c) or (d)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.rt.tokenizer.encode(p) for p in texts]

    async def http(self, key: str, texts: list[str], max_tokens: int) -> LevelResult:
        """One run of (c) or (d) from the client processes (on a worker thread: it waits
        for them)."""
        server, served = (self.ours, self.model_id) if key == "c" else (self.theirs, self.their_id)
        job = HttpJob(url=server.url, model=served, prompts=texts, max_tokens=max_tokens)
        return await trio.to_thread.run_sync(run_http_load, server.name, job, self.client_processes)


_LABELS = (("a", "(a) bare BatchGenerator"), ("b", "(b) in-process"),
           ("c", "(c) omlx-actors HTTP"), ("d", "(d) mlx_lm.server"))


def full_bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    """(a) bare BatchGenerator, (b) in-process, (c) our server over HTTP, (d) mlx_lm.server."""
    from omlx_actors.models.download import resolve_model

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    path, is_demo = trio.run(resolve_model, config)
    print(f"model: {path}{' (random-weight demo)' if is_demo else ''}")
    batch = max([*levels, config.max_batch_size])
    config = attrs.evolve(config, model=str(path), max_batch_size=batch)
    ours, theirs = _start_servers(args, config, Path(path), batch)
    rows: list[dict[str, Any]] = []
    try:
        ours.wait_ready()
        if theirs is not None:
            theirs.wait_ready()
        trio.run(_measure, args, config, Path(path), levels, ours, theirs, rows)
    finally:
        ours.stop()
        if theirs is not None:
            theirs.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def _start_servers(args: argparse.Namespace, config: RuntimeConfig, path: Path,
                   batch: int) -> tuple[ServerProcess, ServerProcess | None]:
    """Start (c), and (d) when --sides names it, with the same batch settings; they load
    their models while the caller goes on."""
    import os
    import sys

    from omlx_actors.mlx_loader import OPENBLAS_CANDIDATES

    preload = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    sides = set(args.sides.split(","))
    ours = ServerProcess("omlx-actors", [
        sys.executable, "-m", "omlx_actors.cli", "serve", "--model", str(path),
        "--port", str(port_c := free_port()), "--max-batch-size", str(batch),
        "--prefill-batch-size", str(config.prefill_batch_size),
        "--prefill-step-size", str(config.prefill_step_size),
        # The SSD tier is measured by bench-cache; here, serving (in-memory prefix cache on).
        "--no-ssd-cache", *(["--gil-switch-interval", str(args.gil_switch_interval)]
                            if getattr(args, "gil_switch_interval", None) else [])], port_c)
    theirs = None if "d" not in sides else ServerProcess("mlx_lm.server", [
        sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port",
        str(port_d := free_port()), "--decode-concurrency", str(batch),
        "--prompt-concurrency", str(config.prefill_batch_size),
        "--prefill-step-size", str(config.prefill_step_size), "--log-level", "WARNING"],
        port_d, env={"LD_PRELOAD": preload} if preload else None)
    return ours, theirs


async def _measure(args: argparse.Namespace, config: RuntimeConfig, path: Path, levels: list[int],
                   ours: ServerProcess, theirs: ServerProcess | None,
                   rows: list[dict[str, Any]]) -> None:
    """Every level on every side, then the multi-turn workload; appends to `rows` as it
    goes (what was measured before a failure is still written)."""
    from omlx_actors.wiring import open_runtime

    async with open_runtime(config=config) as rt:
        bare = await trio.to_thread.run_sync(BareLoop, path, config)
        # mlx_lm.server treats the model field as a path or repo to load: give it its own.
        sides = _Sides(rt=rt, bare=bare, ours=ours, theirs=theirs, model_id=path.name,
                       their_id=str(path.resolve()),
                       client_processes=getattr(args, "client_processes", 1))
        await _warm_up(sides, make_text_prompts(2, args.prompt_words, offset=999))
        for level in levels:
            texts = _level_texts(sides, level, args)
            # Each side, (a) at c=1 included, first runs this level's exact shapes once
            # (texts of the measured ones' token lengths, so no prefix cache helps the
            # measured run): the first batch of a new shape compiles kernels (on a GPU,
            # seconds, and a prompt one token longer is a new shape), and (c) and (d)
            # compile in their own processes.
            await _warm_up(sides, texts[0])
            runs = await _level_runs(sides, level, texts[1:], args)
            _report_level(level, runs, rows)
            _report_paired(level, runs, rows)
        if args.turns >= 2:
            await _multi_turn(sides, args, rows)


def _level_texts(sides: _Sides, level: int, args: argparse.Namespace) -> list[list[str]]:
    """The warm-up's texts, then each repeat's: new prompts each time (the sides with a
    prefix cache must not get an earlier run's prompts from it while (a) prefills them
    again), all with the first repeat's token lengths, so every run has the same shapes."""
    first = make_text_prompts(level, args.prompt_words, offset=level)
    lengths = [len(ids) for ids in sides.encode(first)]

    def like_first(offset: int) -> list[str]:
        return texts_of_lengths(sides.rt.tokenizer.encode, lengths, args.prompt_words, offset)

    return [like_first(level + 10_000), first,
            *(like_first(level + 1000 * rep) for rep in range(1, args.repeat))]


async def _warm_up(sides: _Sides, texts: list[str]) -> None:
    """Four tokens of each prompt on every side."""
    await trio.to_thread.run_sync(sides.bare.run, sides.encode(texts), 4)
    await runtime_level(sides.rt, sides.encode(texts), 4)
    await sides.http("c", texts, 4)
    if sides.theirs is not None:
        await sides.http("d", texts, 4)


async def _level_runs(sides: _Sides, level: int, texts_per_repeat: list[list[str]],
                      args: argparse.Namespace) -> dict[str, list[LevelResult]]:
    """One run of each side per repeat's texts, keyed by side letter."""
    runs: dict[str, list[LevelResult]] = {"a": [], "b": [], "c": [], "d": []}
    for rep, texts in enumerate(texts_per_repeat):
        ids = sides.encode(texts)
        runs["a"].append(await trio.to_thread.run_sync(sides.bare.run, ids, args.max_tokens))
        runs["b"].append(await runtime_level(sides.rt, ids, args.max_tokens))
        # The two servers swap places every repeat, so neither always runs
        # right after the other (a finished run leaves its process busy
        # for a moment: saving blocks, spinning BLAS threads down).
        http_sides = ["c"] if sides.theirs is None else ["c", "d"]
        for key in (http_sides if rep % 2 == 0 else http_sides[::-1]):
            runs[key].append(await sides.http(key, texts, args.max_tokens))
    return runs


def _report_level(level: int, runs: dict[str, list[LevelResult]], rows: list[dict[str, Any]]) -> None:
    """Each side's median run, its tokens/s as a ratio to (a)'s."""
    chosen = {k: median_run(v) for k, v in runs.items() if v}
    base = chosen["a"]
    for key, label in _LABELS:
        if key not in chosen:
            continue
        r = chosen[key]
        rows.append({
            "concurrency": level, "side": label,
            "tokens_per_s": r.tokens_per_s, "ratio": r.tokens_per_s / base.tokens_per_s,
            "ttft_p50_s": r.ttft_p50, "ttft_p99_s": r.ttft_p99,
            "tokens": r.tokens, "errors": r.errors,
            "itl_p50_s": r.itl_p50, "itl_p99_s": r.itl_p99, "client_cpu_s": r.client_cpu_s,
        })
        failed = f"  {r.errors} of {level} requests FAILED" if r.errors else ""
        print(f"  c={level:<3d} {label:26s} {r.tokens_per_s:8.1f} tok/s  ratio {r.tokens_per_s / base.tokens_per_s:5.3f}  "
              f"TTFT p50 {r.ttft_p50 * 1000:8.1f} ms  p99 {r.ttft_p99 * 1000:8.1f} ms  "
              f"ITL p50 {r.itl_p50 * 1000:7.1f} ms  p99 {r.itl_p99 * 1000:7.1f} ms{failed}", flush=True)
        if r.client_cpu_s is not None and r.client_cpu_s > 0.8 * r.wall_s:
            print(f"        its busiest client process used {r.client_cpu_s / r.wall_s:.0%} of a core: "
                  f"the client may be the bottleneck (try --client-processes)", flush=True)


def _report_paired(level: int, runs: dict[str, list[LevelResult]], rows: list[dict[str, Any]]) -> None:
    """(c)/(d) repeat by repeat, where both ran."""
    if not (runs["c"] and runs["d"]):
        return
    # Same prompts, run back to back: the paired ratio cancels the drift
    # of a shared machine that the medians above still carry.
    paired = [c.tokens_per_s / d.tokens_per_s for c, d in zip(runs["c"], runs["d"])]
    wins = sum(r > 1 for r in paired)
    rows.append({"concurrency": level, "paired_c_over_d": paired, "c_faster_in": wins})
    print(f"  c={level:<3d} paired (c)/(d) per repeat: "
          f"{', '.join(f'{r:.3f}' for r in paired)}; median "
          f"{statistics.median(paired):.3f}; (c) faster in {wins} of {len(paired)}",
          flush=True)


async def _multi_turn(sides: _Sides, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Later-turn TTFT p50 of (b), (c), (d), and (a)'s cold prefill of a history as long."""
    import httpx

    # The same conversations for (b), (c) and (d): each side has its own cache (its
    # own process or runtime), and the same texts give each side the same token
    # counts - how much of a history a later turn can reuse depends on where its
    # blocks end and how the answer re-tokenizes, which differs text by text.
    conversations = make_text_prompts(args.conversations, args.history_words, offset=5000)
    turns_b = await runtime_turns(sides.rt, conversations, args.turns, args.max_tokens)
    turns_c = await http_turns(sides.ours.url, sides.model_id, conversations, args.turns, args.max_tokens)
    turns_d = []
    if sides.theirs is not None and sides.theirs.proc.poll() is None:
        try:
            turns_d = await http_turns(sides.theirs.url, sides.their_id, conversations,
                                       args.turns, args.max_tokens)
        except* httpx.HTTPError:
            print("  (d) mlx_lm.server failed during the multi-turn workload", flush=True)
    # (a) has no prefix cache: a later turn is a cold prefill of the whole history.
    hist = sides.encode(make_text_prompts(args.conversations, args.history_words + 40, offset=8000))
    cold = await trio.to_thread.run_sync(sides.bare.run, hist, 1)
    for label, values in (("(a) bare (cold prefill)", list(cold.ttft_s)),
                          ("(b) in-process", turns_b), ("(c) omlx-actors HTTP", turns_c),
                          ("(d) mlx_lm.server", turns_d)):
        if not values:
            continue
        p50 = statistics.median(values)
        rows.append({"workload": "multi-turn later turns", "side": label, "ttft_p50_s": p50})
        print(f"  multi-turn later-turn TTFT p50  {label:26s} {p50 * 1000:8.1f} ms", flush=True)
