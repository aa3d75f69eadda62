"""The HTTP load of `bench-servers`, in a process of its own (issue 18).

    python -m omlx_actors.bench.http_load '{"url": ..., "model": ..., "prompts": [...],
                                            "max_tokens": 64}'

(or the same JSON on stdin's first line). Streams every prompt as a `/v1/completions`
request at once (at most `concurrency` in flight, when given) with httpx on a trio loop,
and prints one JSON line on stdout: tokens, wall_s, ttft_s (one per request, from the start
of the run), itl_s (the gaps between consecutive text chunks of each stream, pooled), errors
and cpu_s (this process's CPU seconds: near wall_s, the client was the bottleneck).

A job with `"wait_for_go": true` prints `ready` once it is loaded and its connections are
open (one per request, as a long-lived client has them), and starts only when a
`go` line arrives on stdin, so that several client processes start their clocks together.
`run_http_load` is the parent's side: it starts the processes, releases them at once and
merges their answers into one `LevelResult`. The client gets its own process so that, at
high concurrency on a fast device, the benchmark measures the server and not its own SSE
parsing, which would otherwise share a GIL with the in-process sides.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import attrs
import trio

from omlx_actors.bench.common import LevelResult, gaps


@attrs.frozen(kw_only=True)
class HttpJob:
    """One measured run of one client process."""

    url: str
    model: str  # the model field the server answers to
    prompts: list[str]
    max_tokens: int
    concurrency: int | None = None  # requests in flight at most; None: all at once
    wait_for_go: bool = False


async def http_level(side: str, url: str, model: str, prompts: list[str], max_tokens: int,
                     concurrency: int | None = None, ready=None) -> LevelResult:
    """The prompts as streaming /v1/completions, started together; TTFT = first text chunk,
    both measured from the start of the run.

    The client and its connections are made before the clock starts, as an agent's
    long-lived client has them: building an httpx client (its TLS context) took tens of ms,
    which counted against the server at one stream. `ready`, if given, is awaited between
    the two (the process reports ready and waits for the go)."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4,
                          max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _warm_connections(client, url, len(prompts))
        if ready is not None:
            await ready()
        return await _run_level(client, side, url, model, prompts, max_tokens, concurrency)


async def _warm_connections(client, url: str, count: int) -> None:
    """Open `count` keep-alive connections (a cheap GET each, all at once). A server that
    closes connections after each response simply gets new ones during the run."""
    import httpx

    async def one() -> None:
        try:
            await client.get(url + "/v1/models")
        except httpx.HTTPError:
            pass  # the run itself reports a server that does not answer

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def _run_level(client, side: str, url: str, model: str, prompts: list[str],
                     max_tokens: int, concurrency: int | None) -> LevelResult:
    import httpx

    ttft: list[float] = []
    itl: list[float] = []
    tokens = errors = 0
    limiter = trio.CapacityLimiter(concurrency or max(len(prompts), 1))
    start = time.perf_counter()

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens, errors
        async with limiter:
            try:
                arrivals, usage = await _stream(client, url, model, prompt, max_tokens, start)
            except (httpx.HTTPError, json.JSONDecodeError):
                errors += 1
                return
        ttft.append(arrivals[0] if arrivals else float("nan"))
        itl.extend(gaps(arrivals))
        tokens += usage or len(arrivals)

    async with trio.open_nursery() as nursery:
        for p in prompts:
            nursery.start_soon(one, client, p)
    return LevelResult(side, len(prompts), tokens, time.perf_counter() - start,
                       tuple(ttft) or (float("nan"),), errors, tuple(itl))


async def _stream(client, url: str, model: str, prompt: str, max_tokens: int,
                  start: float) -> tuple[list[float], int]:
    """One request: the arrival times of its chunks with text, and the usage's
    completion_tokens (0 when the server sent none)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    usage = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens", 0)
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter() - start)
    return arrivals, usage


def run_http_load(side: str, job: HttpJob, processes: int = 1) -> LevelResult:
    """`job` from `processes` client processes (its prompts dealt round-robin), released
    together once all are loaded. Blocks; run it on a worker thread from trio. tokens and
    errors add up; wall_s is the slowest process's; TTFTs and ITLs are pooled."""
    import subprocess

    parts = [job.prompts[i::processes] for i in range(processes) if job.prompts[i::processes]]
    share = None if job.concurrency is None else max(1, job.concurrency // len(parts))
    procs = [subprocess.Popen([sys.executable, "-m", "omlx_actors.bench.http_load"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in parts]
    try:
        for proc, part in zip(procs, parts):
            child = attrs.evolve(job, prompts=part, concurrency=share, wait_for_go=True)
            proc.stdin.write(json.dumps(attrs.asdict(child)) + "\n")
            proc.stdin.flush()
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"http_load client exited with {proc.wait()} before it was ready")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.close()
        outputs = [(proc.stdout.read(), proc.wait()) for proc in procs]
        if any(rc != 0 or not out.strip() for out, rc in outputs):
            raise RuntimeError(f"http_load clients exited with {[rc for _, rc in outputs]}")
        answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return _merge(side, len(job.prompts), answers)


def _merge(side: str, concurrency: int, answers: list[dict[str, Any]]) -> LevelResult:
    return LevelResult(
        side, concurrency, sum(a["tokens"] for a in answers), max(a["wall_s"] for a in answers),
        tuple(t for a in answers for t in a["ttft_s"]) or (float("nan"),),
        sum(a["errors"] for a in answers), tuple(g for a in answers for g in a["itl_s"]),
        client_cpu_s=max(a["cpu_s"] for a in answers))


def main(argv: list[str]) -> int:
    raw = argv[0] if argv else sys.stdin.readline()
    job = HttpJob(**json.loads(raw))
    cpu = time.process_time()

    async def ready() -> None:
        nonlocal cpu
        print("ready", flush=True)
        if (await trio.to_thread.run_sync(sys.stdin.readline)).strip() != "go":
            raise SystemExit(1)
        cpu = time.process_time()

    result = trio.run(http_level, "http", job.url, job.model, job.prompts, job.max_tokens,
                      job.concurrency, ready if job.wait_for_go else None)
    print(json.dumps({"tokens": result.tokens, "wall_s": result.wall_s,
                      # Requests that brought no text have no TTFT (NaN is not JSON).
                      "ttft_s": [t for t in result.ttft_s if not math.isnan(t)],
                      "itl_s": list(result.itl_s), "errors": result.errors,
                      "cpu_s": time.process_time() - cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
