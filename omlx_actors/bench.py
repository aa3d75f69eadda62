"""`omlx-actors bench`: this runtime in-process vs a bare mlx-lm `BatchGenerator` loop.

Same model, same prompts, same batch settings, greedy decoding with EOS ignored so both
sides produce exactly the same number of tokens; measured side by side in one process, one
concurrency level at a time, (a) then (b), so machine noise hits both alike. The bare loop is
the ceiling for any mlx-lm-based server: the ratio (b)/(a) is the runtime's overhead.

Reported per level: aggregate decode tokens/s, TTFT p50/p99 and the TTFT stagger (the spread
of first-token times among requests submitted together).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.units import percentile


@attrs.frozen
class LevelResult:
    side: str
    concurrency: int
    tokens: int
    wall_s: float
    ttft_s: tuple[float, ...]
    errors: int = 0  # requests that failed (a server that died or cut the stream)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def ttft_p99(self) -> float:
        return percentile(self.ttft_s, 99)

    @property
    def stagger(self) -> float:
        return max(self.ttft_s) - min(self.ttft_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "side": self.side, "concurrency": self.concurrency, "tokens": self.tokens,
            "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
            "ttft_p50_s": self.ttft_p50, "ttft_p99_s": self.ttft_p99, "stagger_s": self.stagger,
        }


def make_prompts(n: int, length: int, vocab: int, offset: int = 0) -> list[list[int]]:
    """Deterministic prompts of `length` token ids (no special ids below 16), each
    (offset, index) its own: no two share a prefix block, whatever the offsets."""
    rngs = [random.Random(f"{offset}:{i}") for i in range(n)]
    return [[rng.randrange(16, max(vocab, 17)) for _ in range(length)] for rng in rngs]


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
    first: dict[int, float] = {}
    remaining = set(uids)
    tokens = 0
    while remaining:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            tokens += 1
            first.setdefault(r.uid, now - start)
            if r.finish_reason is not None:
                remaining.discard(r.uid)
    wall = time.perf_counter() - start
    gen.close()
    return LevelResult("bare BatchGenerator", len(prompts), tokens, wall,
                       tuple(first[u] for u in uids))


async def runtime_level(rt, prompts: list[list[int]], max_tokens: int) -> LevelResult:
    """(b): the same prompts through the in-process API, submitted together."""
    ttft: list[float] = []
    tokens = 0
    start = time.perf_counter()

    async def one(prompt: list[int]) -> None:
        nonlocal tokens
        session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        first = None
        async with session:
            async for _ in session:
                if first is None and session.completion_token_ids:
                    first = time.perf_counter() - start
        ttft.append(first if first is not None else float("nan"))
        tokens += len(session.completion_token_ids)

    async with trio.open_nursery() as nursery:
        for p in prompts:
            nursery.start_soon(one, p)
    return LevelResult("omlx-actors in-process", len(prompts), tokens,
                       time.perf_counter() - start, tuple(ttft))


class BareLoop:
    """(a) on an MLX worker thread of its own (MLX arrays belong to the thread that made
    them), loaded with mlx-lm's own `load_model`. `run` blocks the calling thread."""

    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        from omlx_actors.engine.mlx_thread import acquire_worker

        self._worker = acquire_worker()
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

        self._worker.run_job(job)
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
    from omlx_actors.front.runtime import open_runtime, resolve_model

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
                a, b = _median_run(runs_a), _median_run(runs_b)
                progress(_row(a))
                progress(_row(b))
                progress(f"  ratio tokens/s (b)/(a) = {b.tokens_per_s / a.tokens_per_s:.3f}, "
                         f"TTFT p50 (b)/(a) = {b.ttft_p50 / a.ttft_p50:.3f}")
                results.append((a, b))

    trio.run(main)
    return results


def _median_run(runs: list[LevelResult]) -> LevelResult:
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


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

    from omlx_actors.front.runtime import open_runtime

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
    from omlx_actors.front.runtime import open_runtime
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


# ---------------------------------------------------------------------------------------
# (c) this runtime over HTTP and (d) mlx-lm's own server: both as subprocesses on loopback,
# driven by the same streaming client, so the two servers are measured alike.

WORDS = ("river stone light table garden window music paper engine forest cloud number "
         "silver market letter orange bridge winter story signal").split()


def make_text_prompts(n: int, words: int, offset: int = 0) -> list[str]:
    """`n` deterministic prompts of `words` words, each (offset, index) its own: no two share
    a prefix block, so no side's prefix cache serves one prompt from another."""
    return [" ".join(random.Random(f"{offset}:{i}").choices(WORDS, k=words)) for i in range(n)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on a loopback port; stopped with SIGINT, then killed."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None):
        import os
        import subprocess

        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(f"/tmp/omlx-bench-{name.replace(' ', '_')}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self._log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} did not start within {timeout}s")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it had its chance
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def http_level(side: str, url: str, model: str, prompts: list[str], max_tokens: int) -> LevelResult:
    """All prompts at once as streaming /v1/completions; TTFT = first text chunk."""
    import httpx

    ttft: list[float] = []
    tokens = 0
    start = time.perf_counter()

    errors = 0

    async def one(client, prompt: str) -> None:
        nonlocal errors
        try:
            await attempt(client, prompt)
        except (httpx.HTTPError, json.JSONDecodeError):
            errors += 1

    async def attempt(client, prompt: str) -> None:
        nonlocal tokens
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": 0.0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        first = None
        counted = usage = 0
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens", 0)
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    counted += 1
                    if first is None:
                        first = time.perf_counter() - start
        ttft.append(first if first is not None else float("nan"))
        tokens += usage or counted

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for p in prompts:
                nursery.start_soon(one, client, p)
    if not ttft:
        ttft.append(float("nan"))
    return LevelResult(side, len(prompts), tokens, time.perf_counter() - start, tuple(ttft), errors)


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


def full_bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    """(a) bare BatchGenerator, (b) in-process, (c) our server over HTTP, (d) mlx_lm.server."""
    import os
    import sys as _sys

    import httpx

    from omlx_actors.front.runtime import open_runtime, resolve_model

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    path, is_demo = trio.run(resolve_model, config)
    print(f"model: {path}{' (random-weight demo)' if is_demo else ''}")
    batch = max([*levels, config.max_batch_size])
    config = attrs.evolve(config, model=str(path), max_batch_size=batch)
    from omlx_actors.mlx_loader import OPENBLAS_CANDIDATES

    preload = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    sides = set(args.sides.split(","))
    ours = ServerProcess("omlx-actors", [
        _sys.executable, "-m", "omlx_actors.cli", "serve", "--model", str(path),
        "--port", str(port_c := _free_port()), "--max-batch-size", str(batch),
        "--prefill-batch-size", str(config.prefill_batch_size),
        "--prefill-step-size", str(config.prefill_step_size),
        # The SSD tier is measured by bench-cache; here, serving (in-memory prefix cache on).
        "--no-ssd-cache", *(["--gil-switch-interval", str(args.gil_switch_interval)]
                            if getattr(args, "gil_switch_interval", None) else [])], port_c)
    theirs = None if "d" not in sides else ServerProcess("mlx_lm.server", [
        _sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port",
        str(port_d := _free_port()), "--decode-concurrency", str(batch),
        "--prompt-concurrency", str(config.prefill_batch_size),
        "--prefill-step-size", str(config.prefill_step_size), "--log-level", "WARNING"],
        port_d, env={"LD_PRELOAD": preload} if preload else None)
    model_id = Path(path).name
    # mlx_lm.server treats the model field as a path or repo to load: give it its own.
    their_id = str(Path(path).resolve())
    rows: list[dict[str, Any]] = []
    try:
        ours.wait_ready()
        if theirs is not None:
            theirs.wait_ready()

        async def main() -> None:
            async with open_runtime(config=config) as rt:
                bare = await trio.to_thread.run_sync(BareLoop, Path(path), config)
                tok = rt.tokenizer
                warm = make_text_prompts(2, args.prompt_words, offset=999)
                await trio.to_thread.run_sync(bare.run, [tok.encode(p) for p in warm], 4)
                await runtime_level(rt, [tok.encode(p) for p in warm], 4)
                await http_level("c", ours.url, model_id, warm, 4)
                if theirs is not None:
                    await http_level("d", theirs.url, their_id, warm, 4)
                for level in levels:
                    # Each side first runs this level's shapes once (other prompts of the same
                    # length, so no prefix cache helps the measured run): the first batch of a
                    # new shape compiles kernels (on a GPU, seconds), and (c) and (d) compile
                    # in their own processes.
                    warm = make_text_prompts(level, args.prompt_words, offset=level + 10_000)
                    warm_ids = [tok.encode(p) for p in warm]
                    await trio.to_thread.run_sync(bare.run, warm_ids, 4)
                    await runtime_level(rt, warm_ids, 4)
                    await http_level("c", ours.url, model_id, warm, 4)
                    if theirs is not None:
                        await http_level("d", theirs.url, their_id, warm, 4)
                    runs: dict[str, list[LevelResult]] = {"a": [], "b": [], "c": [], "d": []}
                    for rep in range(args.repeat):
                        # New prompts each repeat: the sides with a prefix cache must not get
                        # an earlier repeat's prompts from it while (a) prefills them again.
                        texts = make_text_prompts(level, args.prompt_words, offset=level + 1000 * rep)
                        ids = [tok.encode(p) for p in texts]
                        runs["a"].append(await trio.to_thread.run_sync(bare.run, ids, args.max_tokens))
                        runs["b"].append(await runtime_level(rt, ids, args.max_tokens))
                        # The two servers swap places every repeat, so neither always runs
                        # right after the other (a finished run leaves its process busy
                        # for a moment: saving blocks, spinning BLAS threads down).
                        http_sides = [("c", "omlx-actors HTTP", ours.url, model_id)]
                        if theirs is not None:
                            http_sides.append(("d", "mlx_lm.server", theirs.url, their_id))
                        for key, side, url, served in (http_sides if rep % 2 == 0 else http_sides[::-1]):
                            runs[key].append(await http_level(side, url, served, texts, args.max_tokens))
                    chosen = {k: _median_run(v) for k, v in runs.items() if v}
                    base = chosen["a"]
                    for key, label in (("a", "(a) bare BatchGenerator"), ("b", "(b) in-process"),
                                       ("c", "(c) omlx-actors HTTP"), ("d", "(d) mlx_lm.server")):
                        if key not in chosen:
                            continue
                        r = chosen[key]
                        rows.append({
                            "concurrency": level, "side": label,
                            "tokens_per_s": r.tokens_per_s, "ratio": r.tokens_per_s / base.tokens_per_s,
                            "ttft_p50_s": r.ttft_p50, "ttft_p99_s": r.ttft_p99,
                            "tokens": r.tokens,
                        })
                        rows[-1]["errors"] = r.errors
                        failed = f"  {r.errors} of {level} requests FAILED" if r.errors else ""
                        print(f"  c={level:<3d} {label:26s} {r.tokens_per_s:8.1f} tok/s  ratio {r.tokens_per_s / base.tokens_per_s:5.3f}  "
                              f"TTFT p50 {r.ttft_p50 * 1000:8.1f} ms  p99 {r.ttft_p99 * 1000:8.1f} ms{failed}", flush=True)
                    if runs["c"] and runs["d"]:
                        # Same prompts, run back to back: the paired ratio cancels the drift
                        # of a shared machine that the medians above still carry.
                        paired = [c.tokens_per_s / d.tokens_per_s for c, d in zip(runs["c"], runs["d"])]
                        wins = sum(r > 1 for r in paired)
                        rows.append({"concurrency": level, "paired_c_over_d": paired,
                                     "c_faster_in": wins})
                        print(f"  c={level:<3d} paired (c)/(d) per repeat: "
                              f"{', '.join(f'{r:.3f}' for r in paired)}; median "
                              f"{statistics.median(paired):.3f}; (c) faster in {wins} of {len(paired)}",
                              flush=True)
                if args.turns < 2:
                    return
                # The same conversations for (b), (c) and (d): each side has its own cache (its
                # own process or runtime), and the same texts give each side the same token
                # counts - how much of a history a later turn can reuse depends on where its
                # blocks end and how the answer re-tokenizes, which differs text by text.
                conversations = make_text_prompts(args.conversations, args.history_words, offset=5000)
                turns_b = await runtime_turns(rt, conversations, args.turns, args.max_tokens)
                turns_c = await http_turns(ours.url, model_id, conversations, args.turns, args.max_tokens)
                turns_d = []
                if theirs is not None and theirs.proc.poll() is None:
                    try:
                        turns_d = await http_turns(theirs.url, their_id, conversations, args.turns, args.max_tokens)
                    except* httpx.HTTPError:
                        print("  (d) mlx_lm.server failed during the multi-turn workload", flush=True)
                # (a) has no prefix cache: a later turn is a cold prefill of the whole history.
                hist = [tok.encode(c) for c in make_text_prompts(args.conversations, args.history_words + 40, offset=8000)]
                cold = await trio.to_thread.run_sync(bare.run, hist, 1)
                for label, values in (("(a) bare (cold prefill)", list(cold.ttft_s)),
                                      ("(b) in-process", turns_b), ("(c) omlx-actors HTTP", turns_c),
                                      ("(d) mlx_lm.server", turns_d)):
                    if not values:
                        continue
                    p50 = statistics.median(values)
                    rows.append({"workload": "multi-turn later turns", "side": label, "ttft_p50_s": p50})
                    print(f"  multi-turn later-turn TTFT p50  {label:26s} {p50 * 1000:8.1f} ms", flush=True)

        trio.run(main)
    finally:
        ours.stop()
        if theirs is not None:
            theirs.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0
