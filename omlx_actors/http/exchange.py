"""What every route shares: the server's state and the helpers of one HTTP exchange.

`ServerState` owns the table of in-flight generation requests and the `accepting` flag; a
request's cleanups (closing its session) ride in its ASGI scope under `SCOPE_CLEANUPS`,
run by `app.RequestScope` when the exchange ends however it ends (done, client gone,
cancelled). The helpers turn a session into a response: `start_session` (every refusal
before the first byte), `stream_response` (SSE), `collect` (a whole answer), `failed_done`
(the error a finished request reports).

The app factory (`app.py`) and the route modules import this module; it imports neither.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import msgspec
import trio
from quart import Response, request

from omlx_actors.front.session import Done, Session
from omlx_actors.http.metrics import HttpMetrics
from omlx_actors.http.schemas import decode_body
from omlx_actors.http.settings import HttpSettings
from omlx_actors.http.sse import StreamEncoder, sse_body
from omlx_actors.http.wire_errors import ApiError, WireError, from_request_error
from omlx_actors.refusals import ModelNotFound, RequestError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Keys this module adds to an HTTP request's ASGI scope.
SCOPE_CLEANUPS = "omlx.cleanups"

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@attrs.define(eq=False)
class InFlight:
    session: Session
    route: str
    runtime: Any = None  # the runtime it runs on (with a model pool; else the server's)


@attrs.frozen
class Served:
    """The model a request runs on: its runtime, the id responses name, its token texts."""

    runtime: Any
    model_id: str
    token_text: Callable[[int], str]



@attrs.define(eq=False)
class ServerState:
    """What the routes share. Mutated only on the trio thread, between awaits.

    The server listens before the model is loaded: until `attach(runtime)`, `runtime` is
    None, /health answers 503 `starting` and /v1 routes 503 with Retry-After."""

    settings: HttpSettings
    metrics: HttpMetrics
    runtime: Any = None  # omlx_actors.front.runtime.Runtime, once ready
    # omlx_actors.pool.actor.ModelPool when serving several models (then `runtime` is None)
    pool: Any = None
    model_id: str = ""
    aliases: frozenset[str] = frozenset()
    created: int = attrs.field(factory=lambda: int(time.time()))
    accepting: bool = True
    inflight: set[InFlight] = attrs.field(factory=set)
    # Every HTTP exchange in progress: the last resort at shutdown cancels these.
    exchanges: set[trio.CancelScope] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    # A model pool's per-model token texts: served name -> (its runtime, its lookup).
    _pool_token_texts: dict[str, tuple[Any, Callable[[int], str]]] = attrs.field(factory=dict)

    @property
    def ready(self) -> bool:
        """A runtime or a model pool is attached."""
        return self.runtime is not None or self.pool is not None

    def track(self, session: Session, route: str, runtime: Any = None,
              cleanups: list | None = None) -> InFlight:
        """Count `session` as in flight until its HTTP exchange ends; close it then.
        `cleanups`: the exchange's list (`SCOPE_CLEANUPS`), where the request context is
        gone (inside a response body)."""
        entry = InFlight(session=session, route=route, runtime=runtime)
        self.inflight.add(entry)
        self.metrics.inflight.set(len(self.inflight))

        def cleanup() -> None:
            session.close()
            self.inflight.discard(entry)
            self.metrics.inflight.set(len(self.inflight))
            self._changed.set()
            self._changed = trio.Event()

        (request.scope[SCOPE_CLEANUPS] if cleanups is None else cleanups).append(cleanup)
        return entry

    async def wait_idle(self) -> None:
        """Return once no generation request is in flight."""
        while self.inflight:
            await self._changed.wait()

    def attach(self, runtime) -> None:
        """The runtime is ready: serve it."""
        self.model_id, self.aliases = model_aliases(runtime, self.settings)
        self.runtime = runtime
        runtime.accepting = self.accepting

    def attach_pool(self, pool) -> None:
        """Serve a model pool: each request's `model` picks one of its models."""
        self.pool = pool
        self.model_id = pool.names[0]
        pool.accepting = self.accepting

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.runtime is not None:
            self.runtime.accepting = False
        if self.pool is not None:
            self.pool.accepting = False

    def abort_inflight(self) -> int:
        """Abort every in-flight request in the engine; their streams end with an error
        event (the engine reports them finished with reason `abort`)."""
        for entry in self.inflight:
            # An abort for a request the engine does not know is a no-op; one still
            # preparing is refused at submit (the runtime no longer accepts).
            (entry.runtime or self.runtime).abort_nowait(entry.session.request_id)
        return len(self.inflight)

    def cancel_exchanges(self) -> None:
        for scope in list(self.exchanges):
            scope.cancel()

    @functools.cached_property
    def token_text(self) -> Callable[[int], str]:
        tokenizer = self.runtime.tokenizer

        @functools.lru_cache(maxsize=65536)
        def text(token: int) -> str:
            return tokenizer.decode([token])

        return text

    def pool_token_text(self, name: str, runtime: Any) -> Callable[[int], str]:
        """`token_text` for one model of the pool (rebuilt when it was loaded again)."""
        held = self._pool_token_texts.get(name)
        if held is None or held[0] is not runtime:
            tokenizer = runtime.tokenizer

            @functools.lru_cache(maxsize=65536)
            def text(token: int) -> str:
                return tokenizer.decode([token])

            held = self._pool_token_texts[name] = (runtime, text)
        return held[1]



def model_aliases(runtime, settings: HttpSettings) -> tuple[str, frozenset[str]]:
    """The model id /v1/models reports, and every name a request may use for it: that id
    (--served-model-name, else a hub repo id as given, else the model directory's name, or
    the demo's name when no --model), the --model string as given, the model directory's
    name and its resolved path."""
    path = Path(runtime.model_path)
    given = runtime.config.model
    if settings.served_model_name:
        model_id = settings.served_model_name
    elif given is None:
        model_id = runtime.config.demo_model  # the built-in demo, by its name
    elif not Path(given).expanduser().is_dir():
        model_id = given  # a hub repo id
    else:
        model_id = path.name
    names = {model_id, path.name, str(path), str(path.resolve())}
    if given:
        names.add(given)
    return model_id, frozenset(names)



# ---------------------------------------------------------------------------------------
# Helpers of the generation routes


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")


async def read_body(type_: type[T]) -> T:
    """The request body, decoded and validated (413 past the limit, 400 if malformed)."""
    raw = await request.get_data(cache=False)
    return decode_body(raw, type_)


def check_model(state: ServerState, model: str) -> None:
    """404 for a model this server does not serve (in the route's error shape)."""
    if state.pool is not None:
        if state.pool.lookup(model) is None:
            raise state.pool.not_found(model)
        return
    if model not in state.aliases:
        raise ModelNotFound(
            f"the model {model!r} is not served here; this server serves {state.model_id!r}",
            param="model",
        )


async def serve_model(state: ServerState, model: str) -> Served:
    """The model a request runs on. With a model pool: waits until it is loaded (loading
    it, evicting idle models for room) and holds it loaded until the HTTP exchange ends,
    however it ends; its refusals (never fits: 413; load failed: 503) raise here."""
    if state.pool is None:
        check_model(state, model)
        return Served(runtime=state.runtime, model_id=state.model_id, token_text=state.token_text)
    name = state.pool.lookup(model)
    if name is None:
        raise state.pool.not_found(model)
    lease = await state.pool.acquire(name)
    request.scope[SCOPE_CLEANUPS].append(lambda: state.pool.release_nowait(lease))
    return Served(runtime=lease.runtime, model_id=lease.model,
                  token_text=state.pool_token_text(lease.model, lease.runtime))


async def start_session(state: ServerState, session: Session, route: str,
                        served: Served | None = None, cleanups: list | None = None) -> None:
    """Track and start `session`: every refusal (context length, full queue, shutting
    down, tokenizer failure) raises here, before any byte of the response is sent."""
    state.track(session, route, None if served is None else served.runtime, cleanups)
    await session.start()


async def waits_for_load(state: ServerState, model: str, stream: bool) -> bool:
    """A streamed request, with a model pool, for a model not loaded now: its response
    starts at once and keeps the connection alive while the model loads
    (`stream_after_load`)."""
    if state.pool is None or not stream:
        return False
    name = state.pool.lookup(model)
    return name is not None and not await state.pool.is_loaded(name)


# Opens a started stream on a loaded model: the session (tracked via the cleanups given) and
# its route's encoder; raises the request's refusals.
StreamOpener = Callable[[Served, list], Awaitable[tuple[Session, StreamEncoder]]]


def stream_after_load(state: ServerState, model: str, route: str, open_stream: StreamOpener,
                      *, keepalive: bytes, error_frame: Callable[[WireError], bytes]) -> Response:
    """A 200 SSE response that sends `keepalive` every `keepalive_s` while `model` loads,
    then streams what `open_stream` opens. A refusal, now after the first byte, is one error
    frame in the route's format (`error_frame`). The lease is held until the exchange ends;
    a client that leaves during the load cancels its wait (and any grant it never saw)."""
    cleanups = request.scope[SCOPE_CLEANUPS]
    pool = state.pool

    async def body() -> AsyncIterator[bytes]:
        lease = refused = None
        since = trio.current_time()  # the wait's age survives each re-ask
        while lease is None:
            # Never yield inside the cancel scope: the body is suspended between yields.
            with trio.move_on_after(state.settings.keepalive_s):
                try:
                    lease = await pool.acquire(model, since=since)
                except RequestError as exc:
                    refused = exc
            if refused is not None:
                yield error_frame(from_request_error(refused))
                return
            if lease is None:
                yield keepalive
        cleanups.append(lambda: pool.release_nowait(lease))
        served = Served(runtime=lease.runtime, model_id=lease.model,
                        token_text=state.pool_token_text(lease.model, lease.runtime))
        try:
            session, encoder = await open_stream(served, cleanups)
        except RequestError as exc:
            yield error_frame(from_request_error(exc))
            return
        except ApiError as exc:
            yield error_frame(exc.error)
            return
        async for chunk in _sse(state, session, encoder, route, served.model_id):
            yield chunk

    response = Response(body(), status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.timeout = None
    return response


def stream_response(
    state: ServerState, session: Session, encoder: StreamEncoder, route: str,
    model: str | None = None,
) -> Response:
    """`model`: with a model pool, the served name its per-model metrics are filed under."""
    response = Response(_sse(state, session, encoder, route, model), status=200,
                        mimetype="text/event-stream", headers=SSE_HEADERS)
    response.timeout = None  # never cut a stream (see RESPONSE_TIMEOUT above)
    return response


def _sse(state: ServerState, session: Session, encoder: StreamEncoder, route: str,
         model: str | None) -> AsyncIterator[bytes]:
    metrics = state.metrics

    def on_end(complete: bool, seconds: float) -> None:
        metrics.stream_seconds.labels(route).observe(seconds)
        if not complete:
            metrics.disconnects.labels(route).inc()

    return sse_body(
        session,
        encoder,
        keepalive_s=state.settings.keepalive_s,
        on_done=lambda done: metrics.observe_done(route, done, model),
        on_end=on_end,
    )


async def collect(state: ServerState, session: Session, route: str,
                  model: str | None = None) -> list[Any]:
    """Every event of a started session, for a non-streaming answer."""
    events: list[Any] = []
    try:
        async for event in session:
            events.append(event)
            if isinstance(event, Done):
                state.metrics.observe_done(route, event, model)
    finally:
        session.close()
    return events


def failed_done(done: Done) -> WireError | None:
    """The error a finished request reports to its client, if it did not end normally."""
    if done.finish_reason == "abort":
        return WireError(status=503, message="the server is shutting down; the request was aborted",
                         code="shutting_down")
    if done.finish_reason == "error":
        if done.error_type in ("EngineStopped", "EngineStopping"):
            return WireError(status=503, message=done.error or "the engine stopped",
                             code="engine_unavailable")
        if done.error_type == "MemoryError":
            # The engine survived and serves on: retrying later is the right move.
            return WireError(status=503, message=f"the engine ran out of memory: {done.error}",
                             code="out_of_memory", retry_after_s=1)
        if done.error_type == "MemoryRefused":
            # Queued, then found that nothing would ever make room (the executor's _settle).
            return WireError(status=413, message=f"this request cannot fit in memory: {done.error}",
                             code="prefill_memory_exceeded")
        if done.error_type == "QueueTimeout":
            return WireError(status=503, message=done.error or "waited too long for memory",
                             code="queue_timeout", retry_after_s=1)
        return WireError(status=500, message=f"generation failed: {done.error or done.error_type}",
                         code="generation_failed")
    return None


__all__ = [
    "InFlight",
    "Served",
    "ServerState",
    "check_model",
    "collect",
    "failed_done",
    "json_response",
    "model_aliases",
    "read_body",
    "serve_model",
    "start_session",
    "stream_after_load",
    "stream_response",
    "waits_for_load",
]
