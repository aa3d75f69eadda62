"""The Quart-Trio application factory: request hooks (auth, body limit, shutdown), the small
routes (/health, /metrics, /v1/models), and the generation routes of `openai_routes` and
`anthropic_routes`.

`create_app(runtime, settings)` returns the ASGI callable to serve and the `ServerState`
(`exchange.py`) that the server uses to drain or abort in-flight requests at shutdown.
`RequestScope` gives each HTTP exchange its cancel scope and runs its cleanups (closing its
session) when it ends, however it ends (done, client gone, cancelled).
"""

from __future__ import annotations

import ctypes
import hmac
import logging
from collections.abc import Callable

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio

from omlx_actors.http import anthropic_routes, openai_routes, pool_views
from omlx_actors.http.exchange import (
    SCOPE_CLEANUPS,
    ServerState,
    check_model,
    json_response,
)
from omlx_actors.http.metrics import CONTENT_TYPE, HttpMetrics
from omlx_actors.http.settings import HttpSettings
from omlx_actors.http.wire_errors import (
    BODY_TOO_LARGE,
    WireError,
    error_response,
    install_error_handlers,
)

log = logging.getLogger(__name__)

# Buffers from this size up get their own mapping, returned to the system when freed.
# glibc's default threshold adapts upwards (to 32 MiB) after the first large free, and from
# then on keeps freed multi-MB bodies, decoded prompts and rendered templates in its heap:
# a few large requests left the front 20% larger for good. 1 MiB: far above the front's
# usual allocations, so the extra mappings cost nothing measurable.
MMAP_THRESHOLD_BYTES = 1 << 20

# While the model loads, /v1 routes answer 503 with this Retry-After (seconds): long enough
# not to hammer a server that is loading weights, short against a load of a few seconds.
STARTING_RETRY_AFTER_S = 2


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


def create_app(runtime=None, settings: HttpSettings | None = None) -> tuple[RequestScope, ServerState]:
    """The app for `runtime`, or, with None, for a runtime still starting: attach it with
    `ServerState.attach` once it is ready (or a model pool with `ServerState.attach_pool`)."""
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
        if not state.ready and path.startswith("/v1/"):
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
            return json_response({"status": "shutting_down"}, 503)
        if state.pool is not None:
            return await _pool_health(state)
        if state.runtime is None:  # the model is loading; no engine to ask yet
            return json_response({"status": "starting", "engine": {"state": "starting"}}, 503)
        engine = _engine_body(state.runtime.engine_status())
        if engine["state"] != "ready":
            # Restarting: requests are held and resume; failed: new ones get 503.
            return json_response({"status": engine["state"], "engine": engine}, 503)
        try:
            pong = await state.runtime.ping(timeout=settings.health_ping_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "unhealthy"
            return json_response({"status": "unhealthy", "reason": f"engine did not answer: {exc}",
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
            return json_response(body, 503)
        return json_response(body, 200)

    @app.get("/metrics")
    async def metrics():
        m = state.metrics
        m.observe_front()
        if state.pool is not None:
            await _observe_pool(state)
            return Response(m.render(), status=200, content_type=CONTENT_TYPE)
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

    _install_model_routes(app, state)


def _install_model_routes(app: QuartTrio, state: ServerState) -> None:
    """/v1/models: the one model, or every model of a pool with its state."""

    @app.get("/v1/models")
    async def list_models():
        if state.pool is not None:
            snap = await state.pool.snapshot()
            cards = [pool_views.model_card(v, state.created) for v in snap.models]
            return json_response({"object": "list", "data": cards}, 200)
        return json_response({"object": "list", "data": [_model_card(state)]}, 200)

    @app.get("/v1/models/<path:model>")
    async def get_model(model: str):
        check_model(state, model)
        if state.pool is not None:
            name = state.pool.lookup(model)
            snap = await state.pool.snapshot()
            view = next(v for v in snap.models if v.name == name)
            return json_response(pool_views.model_card(view, state.created), 200)
        return json_response(_model_card(state), 200)


async def _pool_health(state: ServerState):
    """/health of a model pool: each model's entry (`pool_views.model_health`). "ok" (200)
    while every loaded model's engine is ready and steps and no model's last load failed;
    "degraded" (200) while some model is not healthy but others are (one broken model of a
    directory must not get the whole server restarted); "unhealthy" (503) when none is."""
    settings = state.settings
    snap = await state.pool.snapshot()
    models, healthy = {}, []
    for view in snap.models:
        models[view.name], ok = await pool_views.model_health(
            view, settings.health_ping_timeout_s, settings.health_stall_s)
        healthy.append(ok)
    status = "ok" if all(healthy) else "degraded" if any(healthy) else "unhealthy"
    body = {"status": status, "models": models,
            "memory": {"budget_bytes": snap.budget_bytes, "resident_bytes": snap.resident_bytes}}
    return json_response(body, 503 if status == "unhealthy" else 200)


async def _observe_pool(state: ServerState) -> None:
    """Fill the pool's collector (`pool_views.PoolCollector`) for one scrape."""
    m = state.metrics
    snap = await state.pool.snapshot()
    engines = {}
    for view in snap.models:
        if view.runtime is None:
            continue
        try:
            stats = await view.runtime.stats(timeout=state.settings.health_ping_timeout_s)
        except Exception:  # noqa: BLE001 - /health reports the engine
            stats = None
        engines[view.name] = (view.runtime.engine_status(), stats)
    m.pool.snapshot = snap
    m.pool.engines = engines
    m.pending.set(sum(v.inflight for v in snap.models))


def _engine_body(status) -> dict:
    return {name: value for name, value in attrs.asdict(status).items() if value is not None}


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "omlx-actors"}


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


__all__ = ["RequestScope", "ServerState", "create_app", "key_matches"]
