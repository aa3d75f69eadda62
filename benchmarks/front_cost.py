"""Per-token CPU cost of the front path: engine `TokenDelta` → session → SSE bytes.

In process (the default): everything real except the engine and the HTTP server: the demo
model's tokenizer (mlx-lm's streaming detokenizer), the `Dispatcher`, `Session`, `sse_body`
and each route's stream encoder. A feeder plays the engine: each step it puts one
`TokenDelta` per stream on the engine event channel, then waits until every task is blocked
again (all bytes of that step handed to the "response"), as the front does between two
engine steps. So µs/token is the CPU time one token costs the event loop (and the GIL)
before Hypercorn writes it; about 1 µs of it is the feeder's own wait.

    .venv/bin/python benchmarks/front_cost.py                 # every route, c=8, 256 tokens
    .venv/bin/python benchmarks/front_cost.py --streams 32 --stop '###' --profile chat

`--burst` queues every token before the streams run instead: what a starved event loop
sees (how much it coalesces also depends on how the dispatcher hands events on).

`--http` measures the whole front instead: a real `omlx-actors serve` (its engine in its
own process), streams over loopback HTTP, and the CPU time of the server's main thread per
streamed token, Quart, Hypercorn and the engine link included (Linux: reads /proc). The
demo model only sets how long it takes: `--demo-model tiny-llama` is fast.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.testing

from omlx_actors.front.dispatcher import Dispatcher
from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.messages import (
    Admitted,
    EngineInfo,
    Finished,
    FinishReason,
    TokenChoice,
    TokenDelta,
)
from omlx_actors.http.anthropic_routes import MessageStream
from omlx_actors.http.openai_routes import ChatStream, CompletionStream
from omlx_actors.http.sse import sse_body
from omlx_actors.front.session import GenerationRequest, Session

ROUTES = ("chat", "completions", "anthropic")
KEEPALIVE_S = 3600.0  # no keep-alive may fire inside the timed region


@attrs.define
class FakeRuntime:
    """What a `Session` uses of `Runtime`, minus the engine: submits are accepted at once."""

    tokenizer: Any
    info: EngineInfo
    config: RuntimeConfig = attrs.Factory(RuntimeConfig)
    dispatcher: Dispatcher = attrs.Factory(Dispatcher)

    @property
    def max_context(self) -> int:
        return self.info.max_context

    async def submit(self, submit) -> None:
        pass

    def abort_nowait(self, request_id: str) -> None:
        pass


def load_runtime(demo_model: str) -> FakeRuntime:
    from mlx_lm.utils import load_tokenizer

    from omlx_actors.models.demo import ensure_demo_model

    tokenizer = load_tokenizer(ensure_demo_model(demo_model))
    info = EngineInfo(model_path=demo_model, model_type="llama", vocab_size=len(tokenizer),
                      max_context=1 << 20, eos_token_ids=tuple(tokenizer.eos_token_ids),
                      device="cpu")
    return FakeRuntime(tokenizer=tokenizer, info=info)


def token_stream(rt: FakeRuntime, n: int, seed: int) -> list[int]:
    """Random non-special ids, like the random-weight demo model generates."""
    special = set(rt.tokenizer.all_special_ids) | set(rt.info.eos_token_ids)
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        token = rng.randrange(rt.info.vocab_size)
        if token not in special:
            out.append(token)
    return out


def make_encoder(route: str, session: Session, token_text: Callable[[int], str]):
    common = {"id": session.request_id, "model": "demo"}
    if route == "anthropic":
        return MessageStream(**common, input_tokens=len(session.prompt_tokens),
                             resolve_stop=lambda done, emitted: ("end_turn", None))
    cls = ChatStream if route == "chat" else CompletionStream
    return cls(**common, created=0, include_usage=True, logprobs=False, token_text=token_text)


def make_request(route: str, request_id: str, max_tokens: int, stop: tuple[str, ...]) -> GenerationRequest:
    if route == "completions":
        return GenerationRequest(prompt="Once upon a time", max_tokens=max_tokens, stop=stop,
                                 request_id=request_id)
    return GenerationRequest(messages=({"role": "user", "content": "Tell me a story."},),
                             max_tokens=max_tokens, stop=stop, request_id=request_id)


@attrs.frozen
class Result:
    route: str
    tokens: int
    seconds: float
    cpu_seconds: float
    wire_bytes: int

    @property
    def us_per_token(self) -> float:
        return self.cpu_seconds / self.tokens * 1e6


async def measure(rt: FakeRuntime, route: str, args: argparse.Namespace,
                  profiler: cProfile.Profile | None) -> Result:
    """One run of `args.streams` streams of `args.tokens` tokens each through `route`."""
    rt.dispatcher = Dispatcher()
    token_text = functools.lru_cache(maxsize=65536)(lambda t: rt.tokenizer.decode([t]))
    ids = token_stream(rt, args.tokens, args.seed)
    stop = tuple(args.stop)
    engine_send, engine_receive = trio.open_memory_channel[Any](float("inf"))
    wire_bytes = 0

    async def consume(session: Session) -> None:
        nonlocal wire_bytes
        body = sse_body(session, make_encoder(route, session, token_text),
                        keepalive_s=KEEPALIVE_S, on_done=lambda done: None,
                        on_end=lambda complete, seconds: None)
        async for frame in body:
            wire_bytes += len(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.dispatcher.run, engine_receive)
        sessions = []
        for i in range(args.streams):
            session = Session(rt, make_request(route, f"req-{i}", args.tokens + 1, stop))
            await session.start()
            sessions.append(session)
            nursery.start_soon(consume, session)
        # Built before the clock starts: making them is the engine's work, not the front's.
        steps = [
            [TokenDelta(request_id=s.request_id, tokens=(TokenChoice(token=t),), step=k) for s in sessions]
            for k, t in enumerate(ids)
        ]
        finished = [Finished(request_id=s.request_id, reason=FinishReason.LENGTH, prompt_tokens=1,
                             completion_tokens=args.tokens) for s in sessions]
        for s in sessions:
            engine_send.send_nowait(Admitted(request_id=s.request_id, queued_s=0.0))
        await trio.testing.wait_all_tasks_blocked()

        if profiler is not None:
            profiler.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        for step in steps:
            for event in step:
                engine_send.send_nowait(event)
            if not args.burst:
                await trio.testing.wait_all_tasks_blocked()
        for event in finished:
            engine_send.send_nowait(event)
        await trio.testing.wait_all_tasks_blocked()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if profiler is not None:
            profiler.disable()
        engine_send.close()
    return Result(route, args.tokens * args.streams, seconds, cpu, wire_bytes)


HTTP_REQUESTS = {
    "chat": ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}]}),
    "completions": ("/v1/completions", lambda text: {"prompt": text}),
    "anthropic": ("/v1/messages", lambda text: {"messages": [{"role": "user", "content": text}]}),
}


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (the trio loop of a server), to the ns."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9  # time on a CPU (ns), waits, timeslices


async def stream_over_http(url: str, model: str, route: str, streams: int, tokens: int) -> None:
    import httpx

    path, body_of = HTTP_REQUESTS[route]

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "max_tokens": tokens, "stream": True, "ignore_eos": True,
                **body_of(f"request {i}")}
        async with client.stream("POST", url + path, json=body) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client, trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(one, client, i)


def measure_http(server, route: str, args: argparse.Namespace) -> Result:
    """One run of `args.streams` streams over a real server; the cost is its main thread's."""
    c0, t0 = main_thread_cpu_s(server.proc.pid), time.perf_counter()
    trio.run(stream_over_http, server.url, args.demo_model, route, args.streams, args.tokens)
    return Result(route, args.tokens * args.streams, time.perf_counter() - t0,
                  main_thread_cpu_s(server.proc.pid) - c0, 0)


def report_http(args: argparse.Namespace) -> None:
    from omlx_actors.bench.common import ServerProcess, free_port

    server = ServerProcess("front-cost", [
        sys.executable, "-m", "omlx_actors.cli", "serve", "--demo-model", args.demo_model,
        "--port", str(port := free_port()), "--max-batch-size", str(max(args.streams, 8)),
        "--no-ssd-cache"], port)
    print(f"HTTP, server main thread, {args.streams} streams x {args.tokens} tokens")
    try:
        server.wait_ready()
        trio.run(stream_over_http, server.url, args.demo_model, "completions", args.streams, 4)  # warm-up
        for route in args.routes:
            best = min((measure_http(server, route, args) for _ in range(args.repeat)),
                       key=lambda r: r.cpu_seconds)
            print(f"  {route:12s} {best.us_per_token:7.2f} µs/token "
                  f"({best.tokens / best.seconds:7.1f} tokens/s)")
    finally:
        server.stop()


def report_in_process(args: argparse.Namespace) -> None:
    rt = load_runtime(args.demo_model)
    mode = "burst" if args.burst else "stepped"
    print(f"{mode}, {args.streams} streams x {args.tokens} tokens, stop={args.stop or 'none'}")
    for route in args.routes:
        best = min((trio.run(measure, rt, route, args, None) for _ in range(args.repeat)),
                   key=lambda r: r.cpu_seconds)
        print(f"  {route:12s} {best.us_per_token:7.2f} µs/token (cpu; wall "
              f"{best.seconds / best.tokens * 1e6:7.2f}), {best.wire_bytes / best.tokens:6.1f} B/token")
        if args.profile:
            profiler = cProfile.Profile()
            trio.run(measure, rt, route, args, profiler)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routes", nargs="*", metavar="ROUTE",
                        help=f"any of {', '.join(ROUTES)} (default: all)")
    parser.add_argument("--demo-model", default="demo-150m")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per route; the best is kept")
    parser.add_argument("--stop", action="append", default=[],
                        help="a stop string (random tokens rarely match it)")
    parser.add_argument("--burst", action="store_true", help="queue every token before streaming")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile a run of each route")
    parser.add_argument("--http", action="store_true", help="measure a real server over HTTP")
    args = parser.parse_args()
    unknown = set(args.routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {sorted(unknown)}; choose from {', '.join(ROUTES)}")
    args.routes = args.routes or list(ROUTES)

    (report_http if args.http else report_in_process)(args)


if __name__ == "__main__":
    main()
