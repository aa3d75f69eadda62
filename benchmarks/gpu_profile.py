"""Where the time goes on the GPU (issue 18, step 1): one side at one level, to run under
py-spy (`--native --threads --subprocesses --idle`), so the profile holds that side alone.

    PYTHONPATH=$PWD python3 benchmarks/gpu_profile.py SIDE MODEL_DIR LEVEL REPEAT

SIDE is `a` (bare BatchGenerator), `b` (in-process runtime) or `c` (our server over HTTP;
the server and its engine process are children of this one, so `--subprocesses` profiles
them too, and the load comes from CLIENTS separate client processes so that the client is
not the bottleneck). Each side warms up on the level's shapes first, then runs REPEAT times
and prints tokens/s, TTFT and inter-token gaps, plus the CPU seconds of each process (a
client process near one full core would be the bottleneck, not the server).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import attrs
import trio

from omlx_actors.bench.common import ServerProcess, free_port, make_text_prompts
from omlx_actors.bench.inprocess import BareLoop, runtime_level
from omlx_actors.bench.http_load import http_level
from omlx_actors.config import RuntimeConfig

PROMPT_WORDS = 100
MAX_TOKENS = 64
CLIENTS = 4


def _client(url: str, model: str, texts: list[str], out) -> None:
    result = trio.run(http_level, "c", url, model, texts, MAX_TOKENS)
    out.put((result.tokens, result.wall_s, list(result.ttft_s), result.errors,
             time.process_time()))


def http_from_processes(url: str, model: str, texts: list[str]) -> tuple[int, float, list[float], int, float]:
    """The texts split over CLIENTS processes, started together; tokens/wall from the first
    start to the last finish."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    parts = [texts[i::CLIENTS] for i in range(CLIENTS) if texts[i::CLIENTS]]
    procs = [ctx.Process(target=_client, args=(url, model, p, out)) for p in parts]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    tokens = sum(r[0] for r in results)
    ttft = [t for r in results for t in r[2]]
    return tokens, wall, ttft, sum(r[3] for r in results), max(r[4] for r in results)


def main() -> int:
    side, model, level, repeat = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    config = RuntimeConfig(model=str(model), max_batch_size=max(64, level), prefill_batch_size=8,
                           prefill_step_size=2048)
    rows = []
    if side == "c":
        server = ServerProcess("omlx-actors", [
            sys.executable, "-m", "omlx_actors.cli", "serve", "--model", str(model),
            "--port", str(port := free_port()), "--max-batch-size", str(config.max_batch_size),
            "--prefill-batch-size", "8", "--prefill-step-size", "2048", "--no-ssd-cache",
            "--gil-switch-interval", os.environ.get("GIL", "0.0002")], port)
        try:
            server.wait_ready()
            import psutil

            procs = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
            for rep in range(-1, repeat):
                texts = make_text_prompts(level, PROMPT_WORDS, offset=level + 1000 * rep + 7)
                before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
                tokens, wall, ttft, errors, client_cpu = http_from_processes(server.url, model.name, texts)
                cpu = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}
                if rep >= 0:
                    rows.append(dict(side="c", level=level, tok_s=tokens / wall, wall_s=wall,
                                     ttft_p50_ms=1000 * statistics.median(ttft), errors=errors,
                                     client_cpu_s_max=client_cpu,
                                     server_cpu_s={str(k): round(v, 2) for k, v in cpu.items()}))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
        return 0

    async def run_in_process() -> None:
        from omlx_actors.wiring import open_runtime

        async with open_runtime(config=attrs.evolve(config, gil_switch_interval_s=float(os.environ.get("GIL", "0.0002")))) as rt:
            tok = rt.tokenizer
            bare = await trio.to_thread.run_sync(BareLoop, model, config) if side == "a" else None
            for rep in range(-1, repeat):
                texts = make_text_prompts(level, PROMPT_WORDS, offset=level + 1000 * rep + 7)
                ids = [tok.encode(t) for t in texts]
                cpu0 = time.process_time()
                if side == "a":
                    r = await trio.to_thread.run_sync(bare.run, ids, MAX_TOKENS)
                else:
                    r = await runtime_level(rt, ids, MAX_TOKENS)
                if rep >= 0:
                    rows.append(dict(side=side, level=level, tok_s=r.tokens_per_s, wall_s=r.wall_s,
                                     ttft_p50_ms=1000 * r.ttft_p50,
                                     process_cpu_s=round(time.process_time() - cpu0, 2)))
                    print(json.dumps(rows[-1]), flush=True)

    trio.run(run_in_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
