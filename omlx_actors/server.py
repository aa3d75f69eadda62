"""`omlx-actors serve`: the HTTP server, in the same trio run as the runtime.

`open_server(config, settings, host=..., port=0)` is the in-process way (tests, embedding):
it starts the runtime, serves the Quart-Trio app with Hypercorn's trio worker on a bound
loopback port, and yields a `RunningServer` (its URL and runtime). `serve_main` is the CLI
path: it prints the banner once listening and shuts down gracefully on SIGINT/SIGTERM.

Shutdown, in order: stop admitting (new /v1 requests answer 503, /health turns 503); then
with `shutdown_mode="drain"` wait for in-flight requests to finish (bounded by
`drain_timeout_s`), with "abort" - or when the drain times out, or a second signal arrives -
abort them in the engine, so each stream ends with an error event in its route's format
(bounded by `abort_grace_s`, after which the remaining connections are cut); then stop
Hypercorn, then the runtime.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.http.settings import HttpSettings

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger(__name__)


def banner(rt, host: str, port: int) -> str:
    from omlx_actors.backend import blas_status

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
    """A server that is listening. `url` is its base URL (no trailing slash, no /v1)."""

    url: str
    host: str
    port: int
    runtime: object  # omlx_actors.api.Runtime
    state: object  # omlx_actors.http.app.ServerState
    _stop_serving: trio.Event
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
        config = self.runtime.config
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
) -> AsyncIterator[RunningServer]:
    """Start the runtime and an HTTP server for it; yield once it is listening. Port 0
    binds an ephemeral port (see `RunningServer.port`). On exit: graceful shutdown."""
    import hypercorn.trio

    from omlx_actors.api import open_runtime
    from omlx_actors.http import create_app

    config = config or RuntimeConfig()
    async with open_runtime(config=config) as runtime:
        asgi, state = create_app(runtime, settings or HttpSettings())
        stop_serving = trio.Event()
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(hypercorn.trio.serve, asgi, _hypercorn_config(host, port),
                        shutdown_trigger=stop_serving.wait)
            )
            url = binds[0]
            bound_port = int(url.rsplit(":", 1)[1])
            server = RunningServer(
                url=url, host=host, port=bound_port, runtime=runtime, state=state,
                stop_serving=stop_serving,
            )
            try:
                yield server
            finally:
                with trio.CancelScope(shield=True):
                    await server.shutdown()


def serve_main(config: RuntimeConfig, *, host: str, port: int, settings: HttpSettings | None = None) -> int:
    """The CLI: serve until SIGINT/SIGTERM, then shut down gracefully; exit status 0. A
    second signal during a drain aborts the requests still running."""
    from omlx_actors.errors import RequestError

    if config.gil_switch_interval_s is not None:
        # See RuntimeConfig.gil_switch_interval_s. Serving is this process's only job, so we
        # may set it (the engine process sets it for itself).
        sys.setswitchinterval(config.gil_switch_interval_s)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_server(config, settings, host=host, port=port) as server:
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
        print("omlx-actors: stopped", flush=True)

    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - report startup failures in one line
        leaf = _single_leaf(exc)
        if isinstance(leaf, RequestError):
            print(f"omlx-actors: {leaf.message}", file=sys.stderr)
            return 2
        if isinstance(leaf, OSError):
            print(f"omlx-actors: cannot serve on {host}:{port}: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
