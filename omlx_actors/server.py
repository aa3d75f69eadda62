"""`omlx-actors serve`: the HTTP server, in the same trio run as the runtime.

`open_server(config, settings, host=..., port=0)` is the in-process way (tests, embedding):
it binds the port and serves the Quart-Trio app with Hypercorn's trio worker first, then
starts the runtime (loads the model) - meanwhile /health answers 503 `starting` and /v1
routes 503 with Retry-After - and yields a `RunningServer` (its URL and, once ready, its
runtime). `serve_main` is the CLI path: it says where it listens at once, prints the banner
once the model is loaded, and shuts down gracefully on SIGINT/SIGTERM.

Shutdown, in order: stop admitting (new /v1 requests answer 503, /health turns 503); then
with `shutdown_mode="drain"` wait for in-flight requests to finish (bounded by
`drain_timeout_s`), with "abort" - or when the drain times out, or a second signal arrives -
abort them in the engine, so each stream ends with an error event in its route's format
(bounded by `abort_grace_s`, after which the remaining connections are cut); then tell
Hypercorn to stop (its idle connections close) and stop the runtime.

Startup errors the user can fix (a model that cannot be found or loaded, settings that do
not fit it) end `serve_main` with one line on stderr and exit status 2; what can be checked
before the port is bound (a local model path, its weights against --memory-budget) is.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.http.settings import HttpSettings
from omlx_actors.pool.catalog import PoolOptions

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger(__name__)


def banner(rt, host: str, port: int) -> str:
    from omlx_actors.mlx_loader import blas_status

    kind = "RANDOM-WEIGHT DEMO model (not a real language model)" if rt.is_demo else "model"
    return (
        f"omlx-actors: serving {kind} {rt.model_path}\n"
        f"  type={rt.info.model_type} vocab={rt.info.vocab_size} context={rt.max_context} "
        f"device={rt.info.device} blas: {blas_status()}\n"
        f"  http://{_url_host(host)}:{port}/v1"
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@attrs.define(eq=False)
class RunningServer:
    """A server that is listening. `url` is its base URL (no trailing slash, no /v1).
    `runtime` is None while the model loads (see `open_server`'s `on_listening`)."""

    url: str
    host: str
    port: int
    state: object  # omlx_actors.http.exchange.ServerState
    _stop_serving: trio.Event
    runtime: object = None  # omlx_actors.front.runtime.Runtime, once ready
    # With several models: the omlx_actors.pool.actor.ModelPool (then `runtime` stays None).
    pool: object = None
    config: RuntimeConfig | None = None
    _shutdown_done: trio.Event = attrs.field(factory=trio.Event)
    _shutdown_started: bool = False
    _drain_scope: trio.CancelScope | None = None
    _abort_requested: bool = False

    async def shutdown(self, mode: str | None = None) -> None:
        """Stop admitting, drain or abort in-flight requests, stop serving. Idempotent: a
        second caller waits for the first. `mode` defaults to the runtime's shutdown_mode."""
        if self._shutdown_started:
            await self._shutdown_done.wait()
            return
        self._shutdown_started = True
        state = self.state
        config = self.config or self.runtime.config
        mode = mode or config.shutdown_mode
        try:
            state.stop_accepting()
            if mode == "drain" and not self._abort_requested:
                with trio.move_on_after(config.drain_timeout_s) as self._drain_scope:
                    await state.wait_idle()
                if state.inflight:
                    log.warning("drain timed out with %d requests in flight; aborting them",
                                len(state.inflight))
            if state.inflight:
                state.abort_inflight()
                with trio.move_on_after(state.settings.abort_grace_s):
                    await state.wait_idle()
            if state.inflight:
                log.warning("%d requests did not end after the abort; cutting their connections",
                            len(state.inflight))
            state.cancel_exchanges()
        finally:
            self._stop_serving.set()
            self._shutdown_done.set()

    def abort_now(self) -> None:
        """Escalate a drain in progress to an abort (a second SIGINT)."""
        self._abort_requested = True
        if self._drain_scope is not None:
            self._drain_scope.cancel()


def _hypercorn_config(host: str, port: int):
    from hypercorn.config import Config

    hc = Config()
    hc.bind = [f"{_url_host(host)}:{port}"]
    hc.accesslog = None
    hc.loglevel = "WARNING"
    # We drain before telling Hypercorn to stop; what is left then are idle keep-alive
    # connections, closed at once.
    hc.graceful_timeout = 1.0
    # No read timeout: a streaming response may be long, and the client sends nothing
    # while it lasts. Idle keep-alive connections close after keep_alive_timeout (5 s).
    hc.read_timeout = None
    return hc


@asynccontextmanager
async def open_server(
    config: RuntimeConfig | None = None,
    settings: HttpSettings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_listening: Callable[[RunningServer], None] | None = None,
    pool: PoolOptions | None = None,
) -> AsyncIterator[RunningServer]:
    """Bind and serve HTTP first, then start the runtime (load the model); yield once it
    is ready. In between - `on_listening(server)` is called then, with `server.runtime`
    None - /health answers 503 `starting` and /v1 routes 503 with Retry-After. Port 0 binds
    an ephemeral port (see `RunningServer.port`). A runtime that fails to start raises
    here, after the HTTP server has stopped. On exit: graceful shutdown (stop admitting,
    drain or abort, stop serving), then the runtime stops.

    `pool`: serve several models (`omlx_actors.pool`), each loaded on demand with `config`'s
    settings, within the pool's budget; pinned models are loaded before this yields."""
    import hypercorn.trio

    from omlx_actors.http import create_app

    config = config or RuntimeConfig()
    asgi, state = create_app(None, settings or HttpSettings())
    stop_serving = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, asgi, _hypercorn_config(host, port),
                    shutdown_trigger=stop_serving.wait)
        )
        url = binds[0]
        bound_port = int(url.rsplit(":", 1)[1])
        server = RunningServer(
            url=url, host=host, port=bound_port, state=state, stop_serving=stop_serving,
            config=config,
        )
        try:
            if on_listening is not None:
                on_listening(server)
            async with _open_models(server, config, pool):
                try:
                    yield server
                finally:
                    with trio.CancelScope(shield=True):
                        await server.shutdown()
        finally:
            stop_serving.set()  # also when the runtime failed to start


@asynccontextmanager
async def _open_models(server: RunningServer, config: RuntimeConfig,
                       pool: PoolOptions | None) -> AsyncIterator[None]:
    """The one runtime, or the model pool, attached to the server's state while open."""
    if pool is None:
        from omlx_actors.wiring import open_runtime

        async with open_runtime(config=config) as runtime:
            server.runtime = runtime
            server.state.attach(runtime)
            yield
        return
    from omlx_actors.pool.api import open_pool

    async with open_pool(pool.specs, config, budget_bytes=pool.budget_bytes,
                         idle_ttl_s=pool.idle_ttl_s, pins=pool.pins) as models:
        server.pool = models
        server.state.attach_pool(models)
        yield


def serve_main(config: RuntimeConfig, *, host: str, port: int, settings: HttpSettings | None = None,
               pool: PoolOptions | None = None) -> int:
    """The CLI: serve until SIGINT/SIGTERM, then shut down gracefully; exit status 0. A
    second signal during a drain aborts the requests still running. A start that fails
    for a reason the user can fix (the model cannot be found or loaded, the settings do
    not fit it) is one line on stderr and exit status 2; the port taken, one line and 1."""
    from omlx_actors.config import ConfigError

    try:
        _check_local_model(config)
    except ConfigError as exc:  # before the port is bound: this one line is all the output
        print(f"omlx-actors: {exc}", file=sys.stderr)
        return 2
    if config.gil_switch_interval_s is not None:
        # See RuntimeConfig.gil_switch_interval_s. Serving is this process's only job, so we
        # may set it (the engine process sets it for itself).
        sys.setswitchinterval(config.gil_switch_interval_s)
    try:
        trio.run(_serve_until_stopped, config, settings, host, port, pool)
    except BaseException as exc:  # noqa: BLE001 - report startup failures in one line
        status = _startup_failure(_single_leaf(exc), host, port)
        if status is None:
            raise
        return status
    return 0


async def _serve_until_stopped(config: RuntimeConfig, settings: HttpSettings | None,
                               host: str, port: int, pool: PoolOptions | None = None) -> None:
    """Listen, load the model, serve until a signal, shut down. A signal while the model
    loads stops at once: nothing is in flight yet."""

    def listening(server: RunningServer) -> None:
        print(f"omlx-actors: listening on {server.url} (503 until the model is loaded)",
              flush=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        loading = trio.CancelScope()
        watching = trio.CancelScope()
        watched = trio.Event()

        async def stop_loading_on_signal() -> None:
            try:
                with watching:
                    async for signum in signals:
                        print(f"omlx-actors: {signal.Signals(signum).name} while loading "
                              "the model: stopping", flush=True)
                        loading.cancel()
                        return
            finally:
                watched.set()

        async with trio.open_nursery() as watcher:
            watcher.start_soon(stop_loading_on_signal)
            with loading:
                async with open_server(config, settings, host=host, port=port,
                                       on_listening=listening, pool=pool) as server:
                    watching.cancel()
                    await watched.wait()  # one reader of `signals` at a time
                    await _serve_until_signal(server, signals, host, config)
    print("omlx-actors: stopped", flush=True)


async def _serve_until_signal(server: RunningServer, signals, host: str,
                              config: RuntimeConfig) -> None:
    """Print the banner, wait for a signal, shut down; a further signal escalates a drain
    to an abort."""
    if server.pool is not None:
        names = ", ".join(server.pool.names)
        print(f"omlx-actors: serving a model pool ({names}), each loaded on demand\n"
              f"  http://{_url_host(host)}:{server.port}/v1", flush=True)
    else:
        print(banner(server.runtime, host, server.port), flush=True)
    async for signum in signals:
        break
    print(
        f"omlx-actors: {signal.Signals(signum).name}: shutting down "
        f"({config.shutdown_mode}); signal again to abort in-flight requests",
        flush=True,
    )
    async with trio.open_nursery() as nursery:

        async def escalate() -> None:
            async for _ in signals:
                print("omlx-actors: aborting in-flight requests", flush=True)
                server.abort_now()

        nursery.start_soon(escalate)
        await server.shutdown()
        nursery.cancel_scope.cancel()


def _startup_failure(leaf: BaseException, host: str, port: int) -> int | None:
    """A failed start the user can act on, said in one line on stderr: its exit status.
    None for anything else (the caller re-raises it)."""
    from omlx_actors.config import ConfigError
    from omlx_actors.engine.executor import EngineLoadFailed
    from omlx_actors.refusals import RequestError

    if isinstance(leaf, (RequestError, ConfigError)):
        print(f"omlx-actors: {leaf}", file=sys.stderr)
        return 2
    if isinstance(leaf, EngineLoadFailed):
        print(f"omlx-actors: cannot load the model: {leaf.message}", file=sys.stderr)
        return 2
    if isinstance(leaf, OSError):
        print(f"omlx-actors: cannot serve on {host}:{port}: {leaf}", file=sys.stderr)
        return 1
    return None


def _check_local_model(config: RuntimeConfig) -> None:
    """What can be known wrong before binding the port: a model path that does not exist,
    weights that cannot fit the memory budget (`RuntimeConfig.check_model_fits`). A hub id
    or the demo model is checked when it is resolved, after binding."""
    from omlx_actors.config import ConfigError

    if config.model is None:
        return
    local = Path(config.model).expanduser()
    if local.is_dir():
        config.check_model_fits(local)
    elif not local.exists() and config.model.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"no such model directory: {config.model}")


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
