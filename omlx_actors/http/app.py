"""The Quart-Trio application: shared state, request hooks (auth, body limit, shutdown),
the small routes (/health, /metrics, /v1/models), and the helpers the generation routes use.

`create_app(runtime, settings)` returns the ASGI callable to serve and the `ServerState`
that the server uses to drain or abort in-flight requests at shutdown.

Who owns what: the `ServerState` owns the table of in-flight generation requests and the
`accepting` flag; each request's ASGI call (see `RequestScope`) owns the cleanups that close
its session, so a request's session is closed when its HTTP exchange ends however it ends
(done, client gone, cancelled).
"""

from __future__ import annotations

import ctypes
import functools
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from omlx_actors.refusals import ModelNotFound
from omlx_actors.http.wire_errors import (
    BODY_TOO_LARGE,
    ApiError,
    WireError,
    error_response,
    from_request_error,
    install_error_handlers,
)
from omlx_actors.http.metrics import CONTENT_TYPE, HttpMetrics
from omlx_actors.http.schemas import decode_body
from omlx_actors.http.settings import HttpSettings
from omlx_actors.http.sse import StreamEncoder, sse_body
from omlx_actors.front.session import Done, Session

log = logging.getLogger(__name__)

T = TypeVar("T")

# Keys this module adds to an HTTP request's ASGI scope.
SCOPE_CLEANUPS = "omlx.cleanups"
# Buffers from this size up get their own mapping, returned to the system when freed.
# glibc's default threshold adapts upwards (to 32 MiB) after the first large free, and from
# then on keeps freed multi-MB bodies, decoded prompts and rendered templates in its heap:
# a few large requests left the front 20% larger for good. 1 MiB: far above the front's
# usual allocations, so the extra mappings cost nothing measurable.
MMAP_THRESHOLD_BYTES = 1 << 20

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@attrs.define(eq=False)
class InFlight:
    session: Session
    route: str


# While the model loads, /v1 routes answer 503 with this Retry-After (seconds): long enough
# not to hammer a server that is loading weights, short against a load of a few seconds.
STARTING_RETRY_AFTER_S = 2


@attrs.define(eq=False)
class ServerState:
    """What the routes share. Mutated only on the trio thread, between awaits.

    The server listens before the model is loaded: until `attach(runtime)`, `runtime` is
    None, /health answers 503 `starting` and /v1 routes 503 with Retry-After."""

    settings: HttpSettings
    metrics: HttpMetrics
    runtime: Any = None  # omlx_actors.front.runtime.Runtime, once ready
    model_id: str = ""
    aliases: frozenset[str] = frozenset()
    created: int = attrs.field(factory=lambda: int(time.time()))
    accepting: bool = True
    inflight: set[InFlight] = attrs.field(factory=set)
    # Every HTTP exchange in progress: the last resort at shutdown cancels these.
    exchanges: set[trio.CancelScope] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def track(self, session: Session, route: str) -> InFlight:
        """Count `session` as in flight until its HTTP exchange ends; close it then."""
        entry = InFlight(session=session, route=route)
        self.inflight.add(entry)
        self.metrics.inflight.set(len(self.inflight))

        def cleanup() -> None:
            session.close()
            self.inflight.discard(entry)
            self.metrics.inflight.set(len(self.inflight))
            self._changed.set()
            self._changed = trio.Event()

        request.scope[SCOPE_CLEANUPS].append(cleanup)
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

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.runtime is not None:
            self.runtime.accepting = False

    def abort_inflight(self) -> int:
        """Abort every in-flight request in the engine; their streams end with an error
        event (the engine reports them finished with reason `abort`)."""
        for entry in self.inflight:
            # An abort for a request the engine does not know is a no-op; one still
            # preparing is refused at submit (the runtime no longer accepts).
            self.runtime.abort_nowait(entry.session.request_id)
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


class RequestScope:
    """ASGI middleware around the Quart app. Each HTTP exchange gets a cancel scope the
    server can use at shutdown, and a list of cleanups run when the exchange ends - after
    the last byte is sent, or when the client left."""

    def __init__(self, app: QuartTrio, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cleanups: list[Callable[[], None]] = []
        scope[SCOPE_CLEANUPS] = cleanups

        async def send_last_shielded(message) -> None:
            # Sending the end of a response makes Hypercorn close or recycle the connection
            # inside this very call, while Quart-Trio, told of the disconnect, cancels the
            # handler: a connection that should close would then stay open, half-done.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        with trio.CancelScope() as exchange:
            self.state.exchanges.add(exchange)
            try:
                await self.app(scope, receive, send_last_shielded)
            finally:
                self.state.exchanges.discard(exchange)
                for cleanup in reversed(cleanups):
                    cleanup()


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


def create_app(runtime=None, settings: HttpSettings | None = None) -> tuple[RequestScope, ServerState]:
    """The app for `runtime`, or, with None, for a runtime still starting: attach it with
    `ServerState.attach` once it is ready."""
    settings = settings or HttpSettings()
    return_large_buffers()  # multi-MB bodies must not grow the front for good
    state = ServerState(settings=settings, metrics=HttpMetrics())
    if runtime is not None:
        state.attach(runtime)
    app = QuartTrio("omlx_actors")
    # Streams may last as long as a generation does: Quart's 60 s response timeout would
    # cut them silently. Bodies: refuse above the limit before reading them whole.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["omlx"] = state
    install_error_handlers(app)
    _install_hooks(app, state)
    _install_service_routes(app, state)

    from omlx_actors.http import anthropic_routes, openai_routes

    openai_routes.register(app, state)
    anthropic_routes.register(app, state)
    return RequestScope(app, state), state


def _needs_key(path: str, settings: HttpSettings) -> bool:
    if settings.api_key is None:
        return False
    if path.startswith("/v1/") or path == "/v1":
        return True
    return settings.protect_health and path in ("/health", "/metrics")


def key_matches(headers, key: str) -> bool:
    """`Authorization: Bearer KEY` or `x-api-key: KEY`, compared in constant time."""
    expected = key.encode()
    candidates = []
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        candidates.append(auth[7:].strip())
    if "x-api-key" in headers:
        candidates.append(headers.get("x-api-key", ""))
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), expected)
    return ok


def _install_hooks(app: QuartTrio, state: ServerState) -> None:
    settings = state.settings

    @app.before_request
    async def _gate():
        path = request.path
        if _needs_key(path, settings) and not key_matches(request.headers, settings.api_key):
            return error_response(
                WireError(
                    status=401,
                    message="missing or invalid API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                    code="invalid_api_key",
                )
            )
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            return error_response(
                WireError(
                    status=413,
                    message=f"the request body ({length} bytes) is larger than the limit of "
                    f"{settings.max_body_bytes} bytes",
                    code=BODY_TOO_LARGE,
                )
            )
        if not state.accepting and path.startswith("/v1/"):
            return error_response(
                WireError(status=503, message="the server is shutting down", code="shutting_down")
            )
        if state.runtime is None and path.startswith("/v1/"):
            return error_response(
                WireError(status=503, message="the server is starting: the model is loading",
                          code="starting", retry_after_s=STARTING_RETRY_AFTER_S)
            )
        return None

    @app.after_request
    async def _count(response: Response):
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        state.metrics.requests.labels(rule, str(response.status_code)).inc()
        return response


def _install_service_routes(app: QuartTrio, state: ServerState) -> None:
    settings = state.settings

    @app.get("/health")
    async def health():
        """Liveness that reflects the engine making progress, not just the web server."""
        if not state.accepting:
            return _json({"status": "shutting_down"}, 503)
        if state.runtime is None:  # the model is loading; no engine to ask yet
            return _json({"status": "starting", "engine": {"state": "starting"}}, 503)
        engine = _engine_body(state.runtime.engine_status())
        if engine["state"] != "ready":
            # Restarting: requests are held and resume; failed: new ones get 503.
            return _json({"status": engine["state"], "engine": engine}, 503)
        try:
            pong = await state.runtime.ping(timeout=settings.health_ping_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "unhealthy"
            return _json({"status": "unhealthy", "reason": f"engine did not answer: {exc}",
                          "engine": engine}, 503)
        body = {
            "status": "ok",
            "steps": pong.steps,
            "running": pong.running,
            "waiting": pong.waiting,
            "last_step_age": pong.last_step_age,
            "engine": engine,
        }
        stalled = (
            pong.running > 0
            and pong.last_step_age is not None
            and pong.last_step_age > settings.health_stall_s
        )
        if stalled:
            body.update(status="unhealthy", reason="the engine has running requests but makes no steps")
            return _json(body, 503)
        return _json(body, 200)

    @app.get("/metrics")
    async def metrics():
        m = state.metrics
        m.observe_front()
        if state.runtime is None:  # starting: only the front's own numbers exist yet
            m.observe_starting()
            return Response(m.render(), status=200, content_type=CONTENT_TYPE)
        try:
            stats = await state.runtime.stats(timeout=settings.health_ping_timeout_s)
        except Exception:  # noqa: BLE001 - keep the last values; /health reports the engine
            log.warning("engine stats unavailable for /metrics")
        else:
            m.queue_waiting.set(stats.waiting)
            m.queue_running.set(stats.running)
            m.engine_cache_bytes.set(stats.prefix_cache_bytes)
            m.observe_engine_saves_dropped(stats.ssd_saves_dropped)
        try:
            cache = await state.runtime.cache_stats(timeout=settings.health_ping_timeout_s)
        except Exception:  # noqa: BLE001 - the cache is optional; keep the last values
            cache = None
        if cache is not None:
            m.observe_cache(cache)
        try:
            ssd = await state.runtime.ssd_stats(timeout=settings.health_ping_timeout_s)
        except Exception:  # noqa: BLE001 - optional tier; keep the last values
            ssd = None
        if ssd is not None:
            m.observe_ssd(ssd)
        if state.runtime.memory is not None and state.runtime.memory.latest is not None:
            m.observe_memory(state.runtime.memory.latest,
                             engine_process=state.runtime.engine_pid is not None)
        m.pending.set(state.runtime.pending_requests)
        m.observe_engine(state.runtime.engine_status())
        return Response(m.render(), status=200, content_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return _json({"object": "list", "data": [_model_card(state)]}, 200)

    @app.get("/v1/models/<path:model>")
    async def get_model(model: str):
        check_model(state, model)
        return _json(_model_card(state), 200)


def _engine_body(status) -> dict:
    return {name: value for name, value in attrs.asdict(status).items() if value is not None}


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "omlx-actors"}


def _json(body: Any, status: int) -> Response:
    return Response(msgspec.json.encode(body), status=status, mimetype="application/json")


# ---------------------------------------------------------------------------------------
# Helpers of the generation routes


def json_response(body: Any, status: int = 200) -> Response:
    return _json(body, status)


async def read_body(type_: type[T]) -> T:
    """The request body, decoded and validated (413 past the limit, 400 if malformed)."""
    raw = await request.get_data(cache=False)
    return decode_body(raw, type_)


def return_large_buffers() -> None:
    """Make the allocator map every buffer of `MMAP_THRESHOLD_BYTES` or more on its own, so
    that freeing it returns its memory (glibc's mallopt; elsewhere nothing). Process-wide
    and idempotent."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)


def check_model(state: ServerState, model: str) -> None:
    if model not in state.aliases:
        raise ModelNotFound(
            f"the model {model!r} is not served here; this server serves {state.model_id!r}",
            param="model",
        )


async def start_session(state: ServerState, session: Session, route: str) -> None:
    """Track and start `session`: every refusal (context length, full queue, shutting
    down, tokenizer failure) raises here, before any byte of the response is sent."""
    state.track(session, route)
    await session.start()


def stream_response(
    state: ServerState, session: Session, encoder: StreamEncoder, route: str
) -> Response:
    metrics = state.metrics

    def on_end(complete: bool, seconds: float) -> None:
        metrics.stream_seconds.labels(route).observe(seconds)
        if not complete:
            metrics.disconnects.labels(route).inc()

    body = sse_body(
        session,
        encoder,
        keepalive_s=state.settings.keepalive_s,
        on_done=lambda done: metrics.observe_done(route, done),
        on_end=on_end,
    )
    response = Response(body, status=200, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.timeout = None  # never cut a stream (see RESPONSE_TIMEOUT above)
    return response


async def collect(state: ServerState, session: Session, route: str) -> list[Any]:
    """Every event of a started session, for a non-streaming answer."""
    events: list[Any] = []
    try:
        async for event in session:
            events.append(event)
            if isinstance(event, Done):
                state.metrics.observe_done(route, event)
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
    "ApiError",
    "RequestScope",
    "ServerState",
    "check_model",
    "collect",
    "create_app",
    "failed_done",
    "from_request_error",
    "json_response",
    "read_body",
    "start_session",
    "stream_response",
]
