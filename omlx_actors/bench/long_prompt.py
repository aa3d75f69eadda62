"""`omlx-actors bench-long-prompt`: what a long prompt arriving costs streams already running.

`--streams` streams decode; once each has `--before-tokens` tokens a prompt of
`--long-prompt-tokens` arrives. Reported per side: the streams' inter-token latency (ITL) p50
before it arrived, their ITL p99 while it prefilled (from its arrival to its first token),
and its own time to first token. Sides, each measured `--repeat` times (medians kept):

  (a) mlx-lm's `BatchGenerator` driven bare: each step decodes, then prefills one whole
      `--prefill-step-size` chunk, so every token of a running stream waits for one;
  (b) this runtime in-process with no cap (`--prefill-step-while-decoding 0`): the same;
  (c) this runtime in-process with the cap (`--prefill-step-while-decoding`, default 128):
      while rows decode, a step prefills at most that many tokens of a prompt (#18).

(a) and (b) run in one runtime's lifetime, (a) and (c) in a second's, alternating, so
machine noise hits the sides alike. Greedy decoding with EOS ignored; every prompt is its own,
so no prefix cache serves one.
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

from omlx_actors.bench.common import make_prompts
from omlx_actors.bench.inprocess import BareLoop
from omlx_actors.config import RuntimeConfig
from omlx_actors.units import percentile

STREAM_PROMPT_TOKENS = 64


@attrs.frozen
class Trace:
    """When each running stream's tokens came (perf_counter seconds, in order), when the
    long prompt was submitted, and when its first token came."""

    stream_times: tuple[tuple[float, ...], ...]
    long_at: float
    long_first: float


@attrs.frozen
class LongPromptResult:
    side: str
    itl_p50_before_s: float
    itl_p99_during_s: float
    long_ttft_s: float
    gaps_during: int  # ITL samples in the prefill window

    @property
    def stall_ratio(self) -> float:
        return self.itl_p99_during_s / self.itl_p50_before_s

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "stall_ratio": self.stall_ratio}


def itl_split(trace: Trace) -> tuple[list[float], list[float]]:
    """(gaps before the long prompt arrived, gaps during its prefill): each gap is the time
    between two consecutive tokens of one stream, filed by when the later token came. A
    stream's first gap is left out (it may hold the other streams' prefill)."""
    before: list[float] = []
    during: list[float] = []
    for times in trace.stream_times:
        for prev, now in zip(times[1:], times[2:]):
            if now <= trace.long_at:
                before.append(now - prev)
            elif now <= trace.long_first:
                during.append(now - prev)
    return before, during


def summarize(side: str, traces: list[Trace]) -> LongPromptResult:
    """Each statistic's median over the runs."""
    rows = []
    for trace in traces:
        before, during = itl_split(trace)
        rows.append((statistics.median(before), percentile(during, 99) if during else float("nan"),
                     trace.long_first - trace.long_at, len(during)))
    p50, p99, ttft, gaps = (statistics.median(col) for col in zip(*rows))
    return LongPromptResult(side, p50, p99, ttft, int(gaps))


def bare_trace(model, streams: list[list[int]], long_prompt: list[int], before_tokens: int,
               max_tokens: int, config: RuntimeConfig) -> Trace:
    """(a): mlx-lm's BatchGenerator alone; the long prompt is inserted once every stream has
    `before_tokens` tokens, and the loop ends at its first token. MLX worker thread only."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=config.max_batch_size,
                         prefill_batch_size=config.prefill_batch_size,
                         prefill_step_size=config.prefill_step_size)
    uids = gen.insert([list(p) for p in streams], max_tokens=[max_tokens] * len(streams))
    times: dict[int, list[float]] = {uid: [] for uid in uids}
    long_uid, long_at, long_first = None, 0.0, None
    while long_first is None:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            if r.uid == long_uid:
                long_first = now
            elif r.uid in times:
                times[r.uid].append(now)
        if long_uid is None and all(len(t) >= before_tokens for t in times.values()):
            long_at = time.perf_counter()
            (long_uid,) = gen.insert([list(long_prompt)], max_tokens=[1])
    gen.close()
    return Trace(tuple(tuple(times[u]) for u in uids), long_at, long_first)


class _Bare(BareLoop):
    """(a): `BareLoop` with the long-prompt trace."""

    def trace(self, *args) -> Trace:
        return self._call(bare_trace, self._model, *args, self._config)


async def runtime_trace(rt, streams: list[list[int]], long_prompt: list[int],
                        before_tokens: int, max_tokens: int) -> Trace:
    """(b)/(c): the same through the in-process API; the streams are cancelled at the long
    prompt's first token."""
    times: list[list[float]] = [[] for _ in streams]
    ready, long_done = trio.Event(), trio.Event()
    box: dict[str, float] = {}

    async def stream(i: int, prompt: list[int]) -> None:
        session = rt.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
        async with session:
            async for _ in session:
                now = time.perf_counter()
                times[i].extend([now] * (len(session.completion_token_ids) - len(times[i])))
                if all(len(t) >= before_tokens for t in times):
                    ready.set()
                if long_done.is_set():
                    return

    async def long() -> None:
        await ready.wait()
        box["at"] = time.perf_counter()
        session = rt.complete(long_prompt, max_tokens=1, ignore_eos=True)
        async with session:
            async for _ in session:
                if session.completion_token_ids and "first" not in box:
                    box["first"] = time.perf_counter()
                    long_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long)
        for i, p in enumerate(streams):
            nursery.start_soon(stream, i, p)
    return Trace(tuple(tuple(t) for t in times), box["at"], box["first"])


@attrs.frozen(kw_only=True)
class Scenario:
    streams: int = 8
    long_prompt_tokens: int = 4096
    before_tokens: int = 16
    repeat: int = 3

    @property
    def stream_max_tokens(self) -> int:
        """Enough for every stream to outlast the prefill even at 8-token chunks."""
        return self.before_tokens + self.long_prompt_tokens // 8 + 64


def _prompts(scenario: Scenario, vocab: int, offset: int) -> tuple:
    """Arguments of one trace: its own stream prompts and long prompt (no prefix shared)."""
    streams = make_prompts(scenario.streams, STREAM_PROMPT_TOKENS, vocab, offset=offset)
    (long_prompt,) = make_prompts(1, scenario.long_prompt_tokens, vocab, offset=offset + 1)
    return streams, long_prompt, scenario.before_tokens, scenario.stream_max_tokens


async def _one_runtime(config: RuntimeConfig, path: str, scenario: Scenario, cap: int,
                       label: str, offset: int, progress) -> tuple[list[Trace], list[Trace]]:
    """(a) and one runtime side, alternating, `scenario.repeat` times after a warm-up of each."""
    from omlx_actors.wiring import open_runtime

    config = attrs.evolve(config, prefill_step_while_decoding=cap)
    a_runs: list[Trace] = []
    b_runs: list[Trace] = []
    async with open_runtime(config=config) as rt:
        # Acquired after the runtime took its own worker, so the two never share a thread.
        bare = await trio.to_thread.run_sync(_Bare, Path(path), config)
        vocab = rt.info.vocab_size
        for rep in range(scenario.repeat + 1):  # run 0 warms both sides up
            base = offset + rep * 1000
            a = await trio.to_thread.run_sync(bare.trace, *_prompts(scenario, vocab, base))
            b = await runtime_trace(rt, *_prompts(scenario, vocab, base + 2))
            if rep:
                a_runs.append(a)
                b_runs.append(b)
                progress(f"  ... {label} run {rep}/{scenario.repeat}: "
                         f"{_row(summarize('(a)', [a]))} | {_row(summarize(label, [b]))}")
    return a_runs, b_runs


def run_long_prompt_bench(config: RuntimeConfig, scenario: Scenario, cap: int,
                          progress=print) -> list[LongPromptResult]:
    """(a), (b) uncapped and (c) capped at `cap`; (a)'s runs from both runtimes pooled."""
    from omlx_actors.wiring import resolve_model

    path, is_demo = trio.run(resolve_model, config)
    progress(f"model: {path}{' (random-weight demo)' if is_demo else ''}")
    config = attrs.evolve(config, model=str(path),
                          max_batch_size=max(config.max_batch_size, scenario.streams + 1))
    a1, b = trio.run(_one_runtime, config, str(path), scenario, 0, "(b) no cap", 100_000, progress)
    a2, c = trio.run(_one_runtime, config, str(path), scenario, cap, f"(c) cap {cap}", 200_000,
                     progress)
    return [summarize("(a) bare BatchGenerator", a1 + a2), summarize("(b) in-process, no cap", b),
            summarize(f"(c) in-process, cap {cap}", c)]


def _row(r: LongPromptResult) -> str:
    return (f"{r.side:28s} ITL p50 before {r.itl_p50_before_s * 1000:7.1f} ms  "
            f"p99 during {r.itl_p99_during_s * 1000:7.1f} ms  (x{r.stall_ratio:4.1f})  "
            f"long TTFT {r.long_ttft_s:6.2f} s")


def long_prompt_bench_main(args: argparse.Namespace, config: RuntimeConfig) -> int:
    scenario = Scenario(streams=args.streams, long_prompt_tokens=args.long_prompt_tokens,
                        before_tokens=args.before_tokens, repeat=args.repeat)
    if min(scenario.streams, scenario.long_prompt_tokens, scenario.repeat) <= 0 \
            or scenario.before_tokens < 3:
        print("omlx-actors bench-long-prompt: --streams, --long-prompt-tokens and --repeat must "
              "be >= 1, --before-tokens >= 3")
        return 2
    cap = config.prefill_step_while_decoding or config.prefill_step_size
    print(f"bench-long-prompt: {scenario.streams} streams, a {scenario.long_prompt_tokens}-token "
          f"prompt after {scenario.before_tokens} tokens each; prefill step "
          f"{config.prefill_step_size}, cap while decoding {cap}; medians of {scenario.repeat}")
    results = run_long_prompt_bench(config, scenario, cap)
    print("\nsummary:")
    for r in results:
        print("  " + _row(r))
    if args.json is not None:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
        print(f"wrote {args.json}")
    return 0
