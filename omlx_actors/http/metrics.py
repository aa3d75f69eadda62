"""Prometheus metrics of one server, in a registry of its own (several servers in one
process - tests - never share counters).

Counters are updated by the routes as requests end; the engine's queue gauges, and the
totals other actors keep (exported as counters, see `_SourcedCounters`), are read when
/metrics is scraped, so they are never stale by more than a scrape.
"""

from __future__ import annotations

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily

from omlx_actors.front.session import Done
from omlx_actors.http.pool_views import PoolCollector

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_STREAM_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HttpMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._define_front_metrics(r)
        self._define_engine_metrics(r)
        self.sourced = _SourcedCounters()
        r.register(self.sourced)
        self.pool = PoolCollector()  # a model pool's numbers (silent without a pool)
        r.register(self.pool)
        self._define_model_metrics(r)

    def _define_front_metrics(self, r: CollectorRegistry) -> None:
        """What the front counts itself: requests, tokens, latencies, streams."""
        self.requests = Counter(
            "omlx_http_requests", "HTTP requests answered, by route and status",
            ["route", "status"], registry=r,
        )
        self.queue_waiting = Gauge(
            "omlx_queue_waiting", "requests admitted to the engine but not yet running", registry=r
        )
        self.queue_running = Gauge("omlx_queue_running", "requests in the engine's batch", registry=r)
        self.pending = Gauge(
            "omlx_requests_pending", "requests registered with the front (queued or running)",
            registry=r,
        )
        self.inflight = Gauge(
            "omlx_http_inflight", "generation requests the HTTP front is serving", registry=r
        )
        self.prompt_tokens = Counter(
            "omlx_prompt_tokens", "prompt tokens of finished requests", ["route"], registry=r
        )
        self.completion_tokens = Counter(
            "omlx_completion_tokens", "tokens generated for finished requests", ["route"], registry=r
        )
        self.finished = Counter(
            "omlx_requests_finished", "generation requests by finish reason",
            ["route", "reason"], registry=r,
        )
        self.ttft = Histogram(
            "omlx_time_to_first_token_seconds", "submit to first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "omlx_inter_token_latency_seconds", "mean inter-token latency of each request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stream_seconds = Histogram(
            "omlx_http_stream_seconds", "SSE streams: first byte to last byte",
            ["route"], buckets=_STREAM_BUCKETS, registry=r,
        )
        self.disconnects = Counter(
            "omlx_client_disconnects", "streams whose client left before the end", ["route"],
            registry=r,
        )

    def _define_model_metrics(self, r: CollectorRegistry) -> None:
        """Per model of a model pool (a `model` label); unused when serving one model."""
        self.model_finished = Counter(
            "omlx_model_requests_finished", "generation requests by model and finish reason",
            ["model", "reason"], registry=r,
        )
        self.model_completion_tokens = Counter(
            "omlx_model_completion_tokens", "tokens generated, by model", ["model"], registry=r,
        )
        self.model_ttft = Histogram(
            "omlx_model_time_to_first_token_seconds", "submit to first token, by model "
            "(a request's wait for its model to load is not in it)", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )

    def _define_engine_metrics(self, r: CollectorRegistry) -> None:
        """Numbers other actors keep (the cache index, the SSD writer, the engine link, the
        memory enforcer), read when /metrics is scraped: cumulative ones are exported as
        counters by `_SourcedCounters`, the rest as gauges."""
        self.cache_index = Gauge(
            "omlx_prefix_cache", "prefix cache index: blocks, bytes used, budget, bytes "
            "referenced by running requests", ["what"], registry=r,
        )
        # The memory enforcer's latest snapshot.
        self.memory = Gauge(
            "omlx_memory_bytes", "memory budget and use (bytes)", ["what"], registry=r,
        )
        self.process_rss = Gauge(
            "omlx_process_rss_bytes", "resident memory of the front (HTTP server) process and, "
            "with the engine in its own process, of the engine process", ["process"], registry=r,
        )
        self.memory_level = Gauge(
            "omlx_memory_level", "memory pressure: 0 ok, 1 soft, 2 hard", registry=r,
        )
        self.ssd = Gauge(
            "omlx_ssd_cache", "SSD tier: files, bytes on disk, effective byte budget",
            ["what"], registry=r,
        )
        self.engine_cache_bytes = Gauge(
            "omlx_prefix_cache_engine_bytes", "block tensors the engine holds", registry=r,
        )
        self.cache_hits = Counter(
            "omlx_prefix_cache_hits", "requests that reused cached prompt tokens", registry=r
        )
        self.cache_hit_tokens = Counter(
            "omlx_prefix_cache_hit_tokens", "prompt tokens served from the cache", registry=r
        )

        # The engine (isolation="process": restarts and what they cost).
        self.engine_ready = Gauge(
            "omlx_engine_ready", "1 while the engine is ready, 0 while it is starting, "
            "restarting or failed", registry=r,
        )
        self.engine_seconds = Gauge(
            "omlx_engine_last_seconds", "the last restart: seconds from the engine's death to a "
            "ready engine (restart) and to the first resumed token (resume)", ["what"], registry=r,
        )

    def observe_engine(self, status) -> None:
        self.sourced.set("omlx_engine_restarts", "engine process deaths followed by a restart",
                         status.restarts)
        self.sourced.set("omlx_engine_resumed_requests",
                         "in-flight requests resumed in a new engine", status.resumed_requests)
        self.sourced.set("omlx_engine_crash_loop_failures",
                         "requests failed as the cause of repeated engine deaths",
                         status.crash_loop_failures)
        self.engine_ready.set(1 if status.state == "ready" else 0)
        if status.last_restart_s is not None:
            self.engine_seconds.labels("restart").set(status.last_restart_s)
        if status.last_resume_s is not None:
            self.engine_seconds.labels("resume").set(status.last_resume_s)

    def observe_starting(self) -> None:
        """No runtime yet (the model is loading): the engine is not ready."""
        self.engine_ready.set(0)

    def observe_done(self, route: str, done: Done, model: str | None = None) -> None:
        """A finished request; `model`: its model's name, with a model pool."""
        usage = done.usage
        if model is not None:
            self.model_finished.labels(model, done.finish_reason).inc()
            self.model_completion_tokens.labels(model).inc(usage.completion_tokens)
            if done.timings.ttft_s is not None:
                self.model_ttft.labels(model).observe(done.timings.ttft_s)
        self.prompt_tokens.labels(route).inc(usage.prompt_tokens)
        self.completion_tokens.labels(route).inc(usage.completion_tokens)
        self.finished.labels(route, done.finish_reason).inc()
        if usage.cached_tokens:
            self.cache_hits.inc()
            self.cache_hit_tokens.inc(usage.cached_tokens)
        if done.timings.ttft_s is not None:
            self.ttft.observe(done.timings.ttft_s)
        if done.timings.mean_itl_s is not None:
            self.itl.observe(done.timings.mean_itl_s)

    def observe_cache(self, stats) -> None:
        lookups = "prefix cache index lookups, by whether they matched at least one block"
        self.sourced.set("omlx_prefix_cache_lookups", lookups, stats.hits, result="hit")
        self.sourced.set("omlx_prefix_cache_lookups", lookups, stats.misses, result="miss")
        self.sourced.set("omlx_prefix_cache_hit_blocks", "blocks matched over all lookups",
                         stats.hit_blocks)
        self.sourced.set("omlx_prefix_cache_evictions", "blocks evicted to stay within the "
                         "budget", stats.evictions)
        self.sourced.set("omlx_prefix_cache_inserted", "blocks stored that were not cached",
                         stats.inserted)
        for what in ("blocks", "used_bytes", "budget_bytes", "referenced_bytes"):
            self.cache_index.labels(what).set(getattr(stats, what))

    def observe_ssd(self, stats) -> None:
        saves = ("SSD tier saves: taken by the writer (enqueued), and how they ended: "
                 "persisted, duplicate, cancelled (by a cleanup), skipped (no room within the "
                 "budget); dropped: never taken (the writer's inbox stayed full)")
        for result in ("enqueued", "persisted", "duplicate", "cancelled", "skipped", "dropped"):
            self.sourced.set("omlx_ssd_saves", saves, getattr(stats, f"saves_{result}"),
                             result=result)
        for name, what, doc in (
            ("omlx_ssd_write_errors", "write_errors", "SSD block writes that failed"),
            ("omlx_ssd_evictions", "evictions", "SSD block files evicted for the budget"),
            ("omlx_ssd_corrupt_discarded", "corrupt_discarded",
             "SSD block files found corrupt and discarded"),
        ):
            self.sourced.set(name, doc, getattr(stats, what))
        loads = "SSD tier block loads, by whether the block was on disk"
        self.sourced.set("omlx_ssd_loads", loads, stats.load_hits, result="hit")
        self.sourced.set("omlx_ssd_loads", loads, stats.load_misses, result="miss")
        for what in ("files", "bytes_on_disk", "effective_budget_bytes"):
            self.ssd.labels(what).set(getattr(stats, what))

    def observe_engine_saves_dropped(self, count: int) -> None:
        self.sourced.set("omlx_ssd_engine_saves_dropped", "blocks the engine could not hand "
                         "to the SSD writer (its forward queue was full)", count)

    def observe_memory(self, snapshot, *, engine_process: bool) -> None:
        """The enforcer's snapshot. Its `process_rss` is the engine's process: labelled
        "engine" when that is a process of its own, else it is the front's own RSS."""
        for what in ("budget_bytes", "used_bytes", "pressure_bytes", "mlx_active", "mlx_cache",
                     "mlx_peak", "system_available"):
            self.memory.labels(what).set(getattr(snapshot, what))
        if engine_process:
            self.process_rss.labels("engine").set(snapshot.process_rss)
        self.memory_level.set(("ok", "soft", "hard").index(snapshot.level.value))

    def observe_front(self) -> None:
        self.process_rss.labels("front").set(psutil.Process().memory_info().rss)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SourcedCounters:
    """Counters that another actor keeps (the cache index, the SSD writer, the engine link):
    the latest value read at scrape time, exported as a Prometheus counter (`_total`).
    A `Counter` of our own cannot hold them: they are totals, not increments, and a new
    engine process starts its own from zero (a reset, which Prometheus' rate() handles)."""

    def __init__(self) -> None:
        # name -> (documentation, label name or None, {label value or None: value})
        self._families: dict[str, tuple[str, str | None, dict[str | None, float]]] = {}

    def set(self, name: str, documentation: str, value: float, **label: str) -> None:
        (label_name, label_value), = label.items() if label else ((None, None),)
        _, _, values = self._families.setdefault(name, (documentation, label_name, {}))
        values[label_value] = value

    def collect(self):
        for name, (documentation, label_name, values) in self._families.items():
            family = CounterMetricFamily(name, documentation,
                                         labels=[label_name] if label_name else None)
            for label_value, value in values.items():
                family.add_metric([label_value] if label_name else [], value)
            yield family
