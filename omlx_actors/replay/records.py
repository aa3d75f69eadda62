"""What a replay observed: one record per request, memory samples, phase windows.

Plain data filled in by the targets and the runner, read by the expectations, the report
and the plots. Times are seconds from the start of the replay. Pure: no trio, no MLX.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import attrs

from omlx_actors.replay.trace import CancelAt
from omlx_actors.units import percentile

# Outcomes, in the order tables list them.
COMPLETED = "completed"  # finished normally (stop, length, tool_calls): status 200
CANCELLED = "cancelled"  # cancelled by the scenario, as planned
REFUSED = "refused"  # refused before anything streamed (400, 413, 429, 503, ...)
FAILED = "failed"  # an error after the request was accepted (e.g. 503 out_of_memory)
LOST = "lost"  # no known outcome: cut stream, transport error, timeout, harness error
SKIPPED = "skipped"  # a later turn of a conversation whose earlier turn did not complete
OUTCOME_ORDER = (COMPLETED, CANCELLED, REFUSED, FAILED, LOST, SKIPPED)

# Error codes of requests that failed after being accepted, and the status each maps to
# (the same mapping the HTTP front uses for an error event: `http.exchange.failed_done`).
FAILURE_STATUS = {
    "out_of_memory": 503,
    "engine_unavailable": 503,
    "shutting_down": 503,
    "aborted": 503,
    "generation_failed": 500,
}


@attrs.define(kw_only=True)
class RequestRecord:
    key: str  # workload/conversation/turn: the same request in every phase and the reference
    phase: str
    workload: str
    conversation: int
    turn: int
    reproducible: bool  # greedy or seeded: comparable with the reference
    planned_cancel: CancelAt | None = None
    outcome: str | None = None
    status: int | None = None
    error_code: str | None = None
    error: str | None = None
    finish_reason: str | None = None
    text: str = ""
    token_ids: list[int] | None = None  # in-process only
    token_texts: list[str] | None = None  # over HTTP with margins: each token's text
    # top-1 minus top-2 logprob of each delivered token (when margins were asked for)
    token_margins: list[float] | None = None
    tool_calls: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    t_sent: float | None = None
    t_first: float | None = None
    t_end: float | None = None
    # (time, tokens) per delivery the client saw, for inter-token latency and throughput.
    token_times: list[tuple[float, int]] = attrs.field(factory=list)
    server_ttft_s: float | None = None

    # -- filling in ------------------------------------------------------------------------

    def add_tokens(self, t: float, n: int) -> None:
        if n <= 0:
            return
        if self.t_first is None:
            self.t_first = t
        self.token_times.append((t, n))

    def refuse(self, status: int, code: str | None, message: str | None) -> None:
        self.outcome, self.status, self.error_code, self.error = REFUSED, status, code, message

    def fail(self, code: str, message: str | None, status: int | None = None) -> None:
        self.outcome = FAILED
        self.status = status if status is not None else FAILURE_STATUS.get(code, 500)
        self.error_code, self.error = code, message

    def lose(self, why: str) -> None:
        self.outcome, self.status, self.error_code, self.error = LOST, None, "lost", why

    # -- derived ---------------------------------------------------------------------------

    @property
    def ttft_s(self) -> float | None:
        if self.t_first is not None and self.t_sent is not None:
            return self.t_first - self.t_sent
        return self.server_ttft_s

    def itl_gaps(self) -> list[float]:
        """Seconds per token between successive deliveries (a delivery of n tokens counts
        its gap n times, as n tokens that arrived together)."""
        out: list[float] = []
        for (t0, _), (t1, n) in zip(self.token_times, self.token_times[1:]):
            out.extend([(t1 - t0) / n] * n)
        return out

    @property
    def mean_itl_s(self) -> float | None:
        gaps = self.itl_gaps()
        return sum(gaps) / len(gaps) if gaps else None

    @property
    def delivered_tokens(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        return sum(n for _, n in self.token_times)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "phase": self.phase, "workload": self.workload,
            "conversation": self.conversation, "turn": self.turn,
            "outcome": self.outcome, "status": self.status, "error_code": self.error_code,
            "error": self.error, "finish_reason": self.finish_reason,
            "planned_cancel": None if self.planned_cancel is None else self.planned_cancel.describe(),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens, "delivered_tokens": self.delivered_tokens,
            "tool_calls": self.tool_calls,
            "start_s": _round(self.t_sent), "end_s": _round(self.t_end),
            "ttft_s": _round(self.ttft_s), "mean_itl_s": _round(self.mean_itl_s),
            "text_sha1": hashlib.sha1(self.text.encode()).hexdigest()[:12],
            "text_head": self.text[:60],
        }


@attrs.frozen(kw_only=True)
class MemorySample:
    t: float
    active_bytes: int
    peak_bytes: int
    cache_bytes: int  # MLX's buffer cache
    prefix_cache_bytes: int
    running: int | None = None
    waiting: int | None = None

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class LeakCheck:
    """After a phase: was anything left registered or running? None where unmeasurable."""

    phase: str
    clean: bool | None
    detail: str


@attrs.frozen(kw_only=True)
class PhaseWindow:
    name: str
    start_s: float
    end_s: float


@attrs.frozen(kw_only=True)
class ActionRecord:
    kind: str
    phase: str
    at_s: float  # when it was done
    took_s: float  # until it was acknowledged


@attrs.frozen(kw_only=True)
class SsdCheck:
    """The SSD tier after the run: flushed, then cleaned up; None where unmeasurable."""

    clean: bool | None
    detail: str


@attrs.frozen(kw_only=True)
class FaultRecord:
    kind: str
    phase: str
    what: str  # how it was armed
    at_s: float  # when it was armed


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(x, digits)


@attrs.frozen(kw_only=True)
class Summary:
    """The numbers of one group of requests (a phase, the whole run, the reference pass)."""

    requests: int
    outcomes: dict[str, int]
    statuses: dict[str, int]  # status code (as a string) → count, refused and failed only
    errors: dict[str, int]  # error code → count
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    cache_hit_ratio: float | None
    duration_s: float
    throughput_tokens_per_s: float | None

    def as_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def summarize(records: Iterable[RequestRecord], duration_s: float) -> Summary:
    records = list(records)
    outcomes = {o: 0 for o in OUTCOME_ORDER}
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    ttfts: list[float] = []
    gaps: list[float] = []
    completion = prompt = cached = 0
    for r in records:
        outcomes[r.outcome or LOST] = outcomes.get(r.outcome or LOST, 0) + 1
        if r.outcome in (REFUSED, FAILED) and r.status is not None:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        if r.error_code and r.outcome != SKIPPED:
            errors[r.error_code] = errors.get(r.error_code, 0) + 1
        if r.outcome in (COMPLETED, CANCELLED):
            if r.ttft_s is not None:
                ttfts.append(r.ttft_s)
            gaps.extend(r.itl_gaps())
        completion += r.completion_tokens if r.completion_tokens is not None else r.delivered_tokens
        if r.outcome == COMPLETED and r.prompt_tokens:
            prompt += r.prompt_tokens
            cached += r.cached_tokens or 0
    pct = lambda xs: {f"p{q}": _round(percentile(xs, q)) for q in (50, 90, 99)}  # noqa: E731
    return Summary(
        requests=len(records), outcomes=outcomes, statuses=statuses, errors=errors,
        ttft_s=pct(ttfts), itl_s=pct(gaps), completion_tokens=completion, prompt_tokens=prompt,
        cached_tokens=cached, cache_hit_ratio=(cached / prompt) if prompt else None,
        duration_s=round(duration_s, 4),
        throughput_tokens_per_s=(completion / duration_s) if duration_s > 0 else None,
    )
