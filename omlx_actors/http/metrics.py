"""Prometheus metrics of one server, in a registry of its own (several servers in one
process - tests - never share counters).

Counters are updated by the routes as requests end; the engine's queue gauges are read
from `Runtime.stats()` when /metrics is scraped, so they are never stale by more than a scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from omlx_actors.session import Done

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_STREAM_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HttpMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
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
        # The prefix cache index's own numbers, read at scrape time.
        self.cache_index = Gauge(
            "omlx_prefix_cache", "prefix cache index: lookups that hit/missed, blocks, bytes, "
            "evictions (cumulative where the name says so)", ["what"], registry=r,
        )
        # The memory enforcer's latest snapshot.
        self.memory = Gauge(
            "omlx_memory_bytes", "memory budget and use (bytes)", ["what"], registry=r,
        )
        self.memory_level = Gauge(
            "omlx_memory_level", "memory pressure: 0 ok, 1 soft, 2 hard", registry=r,
        )
        self.ssd = Gauge(
            "omlx_ssd_cache", "SSD tier: save/load counters (cumulative) and bytes on disk",
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

        # The engine process (isolation="process"): restarts and what they cost.
        self.engine = Gauge(
            "omlx_engine", "engine: restarts, resumed requests and crash-loop failures "
            "(cumulative), ready (1/0), seconds from the last death to ready and to the first "
            "resumed token", ["what"], registry=r,
        )

    def observe_engine(self, status) -> None:
        self.engine.labels("restarts").set(status.restarts)
        self.engine.labels("resumed_requests").set(status.resumed_requests)
        self.engine.labels("crash_loop_failures").set(status.crash_loop_failures)
        self.engine.labels("ready").set(1 if status.state == "ready" else 0)
        if status.last_restart_s is not None:
            self.engine.labels("last_restart_seconds").set(status.last_restart_s)
        if status.last_resume_s is not None:
            self.engine.labels("last_resume_seconds").set(status.last_resume_s)

    def observe_done(self, route: str, done: Done) -> None:
        usage = done.usage
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
        for what in ("hits", "misses", "hit_blocks", "evictions", "inserted", "blocks",
                     "used_bytes", "budget_bytes", "referenced_bytes"):
            self.cache_index.labels(what).set(getattr(stats, what))

    def observe_ssd(self, stats) -> None:
        for what in ("saves_enqueued", "saves_persisted", "saves_dropped", "write_errors",
                     "evictions", "load_hits", "load_misses", "corrupt_discarded", "files",
                     "bytes_on_disk", "effective_budget_bytes"):
            self.ssd.labels(what).set(getattr(stats, what))

    def observe_memory(self, snapshot) -> None:
        for what in ("budget_bytes", "used_bytes", "pressure_bytes", "mlx_active", "mlx_cache",
                     "mlx_peak", "process_rss", "system_available"):
            self.memory.labels(what).set(getattr(snapshot, what))
        self.memory_level.set(("ok", "soft", "hard").index(snapshot.level.value))

    def render(self) -> bytes:
        return generate_latest(self.registry)
