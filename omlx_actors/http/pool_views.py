"""What /v1/models, /health and /metrics say about a model pool (`omlx_actors.pool`).

Read from one `PoolSnapshot` of the pool actor per call, plus, for each loaded model, its
engine's status (and, for /health, a ping). Every per-model number carries a `model` label.
The front never imports the pool's actor module (it sits above the composition root): the
pool object is handed in, as a single runtime is.
"""

from __future__ import annotations

import attrs
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from omlx_actors.pool.policy import ModelState

STATES = tuple(s.value for s in ModelState)


def model_card(view, created: int) -> dict:
    """One model of /v1/models, with its pool state."""
    card = {"id": view.name, "object": "model", "created": created, "owned_by": "omlx-actors",
            "state": view.state, "pinned": view.pinned, "size_bytes": view.size_bytes}
    if view.error is not None:
        card["error"] = view.error
    return card


async def model_health(view, ping_timeout_s: float, stall_s: float) -> tuple[dict, bool]:
    """One model's /health entry, and whether it counts as healthy: an unloaded model is
    (it loads on demand), a failed one is not; a loaded one answers a ping and steps."""
    body: dict = {"state": view.state, "inflight": view.inflight, "waiting": view.waiting,
                  "loads": view.loads, "evictions": view.evictions, "pinned": view.pinned}
    if view.loading_s is not None:
        body["load"] = {"seconds": round(view.loading_s, 3), "last_load_s": view.last_load_s}
    if view.error is not None:
        body["error"] = view.error
    if view.runtime is None:
        return body, view.state != ModelState.FAILED.value
    status = view.runtime.engine_status()
    body["engine"] = {k: v for k, v in attrs.asdict(status).items() if v is not None}
    if status.state != "ready":
        return body, False
    try:
        pong = await view.runtime.ping(timeout=ping_timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure to answer is "unhealthy"
        body["reason"] = f"engine did not answer: {exc}"
        return body, False
    body.update(steps=pong.steps, running=pong.running, waiting_engine=pong.waiting,
                last_step_age=pong.last_step_age)
    stalled = (pong.running > 0 and pong.last_step_age is not None
               and pong.last_step_age > stall_s)
    return body, not stalled


class PoolCollector:
    """The pool's numbers at scrape time: set `snapshot` (and `engines`: model -> (its
    engine status, its stats or None)) before rendering."""

    def __init__(self) -> None:
        self.snapshot = None
        self.engines: dict[str, tuple] = {}

    def collect(self):
        snap = self.snapshot
        if snap is None:
            return
        yield _gauge("omlx_pool_memory_bytes", "the pool's memory budget and the priced bytes "
                     "of the models loading, loaded or unloading", "what",
                     [("budget_bytes", snap.budget_bytes), ("resident_bytes", snap.resident_bytes)])
        state = GaugeMetricFamily("omlx_pool_model_state", "1 for each model's current state",
                                  labels=["model", "state"])
        for view in snap.models:
            for name in STATES:
                state.add_metric([view.name, name], 1.0 if view.state == name else 0.0)
        yield state
        yield _gauge("omlx_pool_model_inflight", "requests holding each model loaded", "model",
                     [(v.name, v.inflight) for v in snap.models])
        yield _gauge("omlx_pool_model_waiting", "requests waiting for each model to load",
                     "model", [(v.name, v.waiting) for v in snap.models])
        yield _gauge("omlx_pool_model_size_bytes", "each model's priced footprint", "model",
                     [(v.name, v.size_bytes) for v in snap.models])
        yield _counter("omlx_pool_loads", "model loads completed", "model",
                       [(v.name, v.loads) for v in snap.models])
        yield _counter("omlx_pool_evictions", "models unloaded for room or idleness", "model",
                       [(v.name, v.evictions) for v in snap.models])
        yield _counter("omlx_pool_load_failures", "model loads that failed", None,
                       [(None, snap.load_failures)])
        yield _histogram("omlx_pool_load_seconds", "seconds from a load's start to a ready "
                         "model (engine started, weights loaded)", snap.load_seconds)
        yield _histogram("omlx_pool_unload_seconds", "seconds from an unload's start to its "
                         "engine's exit", snap.unload_seconds)
        yield from self._engines()

    def _engines(self):
        ready, restarts, running, waiting = [], [], [], []
        for name, (status, stats) in self.engines.items():
            ready.append((name, 1 if status.state == "ready" else 0))
            restarts.append((name, status.restarts))
            if stats is not None:
                running.append((name, stats.running))
                waiting.append((name, stats.waiting))
        yield _gauge("omlx_model_engine_ready", "1 while a loaded model's engine is ready",
                     "model", ready)
        yield _counter("omlx_model_engine_restarts", "engine process deaths followed by a "
                       "restart, per loaded model (from zero at each load)", "model", restarts)
        yield _gauge("omlx_model_queue_running", "requests in each model's batch", "model",
                     running)
        yield _gauge("omlx_model_queue_waiting", "requests admitted to each model's engine "
                     "but not yet running", "model", waiting)


def _gauge(name: str, doc: str, label: str | None, values) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label] if label else None)
    for key, value in values:
        family.add_metric([key] if label else [], value)
    return family


def _counter(name: str, doc: str, label: str | None, values) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label] if label else None)
    for key, value in values:
        family.add_metric([key] if label else [], value)
    return family


def _histogram(name: str, doc: str, hist) -> HistogramMetricFamily:
    buckets = [(repr(float(b)), c) for b, c in zip(hist.buckets, hist.counts)]
    buckets.append(("+Inf", hist.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.total)
