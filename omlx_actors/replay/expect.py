"""Expectations, checked against what a replay observed.

Each check gives a `Verdict`: held (True), failed (False) or could not be measured against
this target (None: shown, never counted as a failure - e.g. leaks against a server whose
/metrics says nothing). The replay passes iff no verdict failed. A failed verdict says
which expectation, in which scope, what was expected and what was found.

Pure: no trio, no MLX.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs

from omlx_actors.replay.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    LOST,
    REFUSED,
    LeakCheck,
    RequestRecord,
    SsdCheck,
)
from omlx_actors.replay.scenario import Expectations
from omlx_actors.units import percentile

_SHOW = 3  # examples named in a failure message


@attrs.frozen(kw_only=True)
class Verdict:
    name: str
    scope: str  # "run" or a phase name
    ok: bool | None
    expected: str
    actual: str

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "skip"}[self.ok]

    def line(self) -> str:
        return f"{self.status:4}  {self.name} [{self.scope}]: expected {self.expected}; got {self.actual}"

    def as_json(self) -> dict:
        return {"name": self.name, "scope": self.scope, "status": self.status,
                "expected": self.expected, "actual": self.actual}


@attrs.frozen(kw_only=True)
class Observed:
    """Everything the checks read."""

    records: Sequence[RequestRecord]
    reference: Mapping[str, RequestRecord] | None
    leak_checks: Sequence[LeakCheck]
    budget_bytes: int | None
    peak_bytes: int | None
    new_request: RequestRecord | None
    compare_tokens: bool  # token ids (in process) or text (over HTTP)
    ssd_check: SsdCheck | None = None
    # Workload name -> the JSON schema (JSON text) its answers are constrained to.
    schemas: Mapping[str, str] = attrs.field(factory=dict)
    # A model pool's totals over the run ("loads", "evictions", ...); None without a pool.
    pool_counts: Mapping[str, float] | None = None


def evaluate(expect: Expectations, scope: str, obs: Observed) -> list[Verdict]:
    """Every expectation `expect` sets, over the records of `scope` ("run": all), in the
    order of `_CHECKS`."""
    records = [r for r in obs.records if scope == "run" or r.phase == scope]
    return [v for check in _CHECKS for v in check(expect, scope, records, obs)]


# Each check yields a verdict for every expectation of its group that `expect` sets.
Check = Callable[[Expectations, str, Sequence[RequestRecord], Observed], Iterator[Verdict]]


def _outcomes(expect: Expectations, scope: str, records: Sequence[RequestRecord],
              obs: Observed) -> Iterator[Verdict]:
    if expect.no_lost_requests:
        lost = [r for r in records if r.outcome in (LOST, None)]
        yield Verdict(
            name="no_lost_requests", scope=scope, ok=not lost,
            expected="every request to end with a known outcome",
            actual="none lost" if not lost else
            f"{len(lost)} lost: " + "; ".join(f"{r.key} in {r.phase}: {r.error}" for r in lost[:_SHOW]))

    if expect.allowed_status is not None:
        allowed = set(expect.allowed_status)
        bad = [r for r in records
               if (r.outcome == COMPLETED and 200 not in allowed)
               or (r.outcome in (REFUSED, FAILED) and r.status not in allowed)]
        seen = sorted({r.status for r in records if r.status is not None})
        yield Verdict(
            name="allowed_status", scope=scope, ok=not bad, expected=f"statuses within {sorted(allowed)}",
            actual=f"statuses {seen}" if not bad else
            f"{len(bad)} outside: " + "; ".join(
                f"{r.key} in {r.phase}: {r.status} {r.error_code or ''} {_clip(r.error)}".rstrip()
                for r in bad[:_SHOW]))

    for name, minimum in expect.min_outcomes:
        n = count_outcome(records, name)
        yield Verdict(name=f"min_outcomes.{name}", scope=scope, ok=n >= minimum,
                      expected=f"at least {minimum} {_noun(name)}", actual=f"{n}")
    for name, maximum in expect.max_outcomes:
        n = count_outcome(records, name)
        yield Verdict(name=f"max_outcomes.{name}", scope=scope, ok=n <= maximum,
                      expected=f"at most {maximum} {_noun(name)}", actual=f"{n}")


def _against_reference(expect: Expectations, scope: str, records: Sequence[RequestRecord],
                       obs: Observed) -> Iterator[Verdict]:
    if expect.identical_to_reference:
        yield _identity(scope, records, obs, expect.tie_margin)

    if expect.min_cache_hit_ratio is not None:
        yield _cache_hits(scope, records, expect)

    for name, q, ratio in (("ttft_p50_max_ratio", 50, expect.ttft_p50_max_ratio),
                           ("ttft_p99_max_ratio", 99, expect.ttft_p99_max_ratio)):
        if ratio is not None:
            yield _latency_ratio(name, scope, records, obs, q, ratio, expect.latency_floor_s,
                                 lambda r: [r.ttft_s] if r.ttft_s is not None else [], "TTFT")
    if expect.itl_p50_max_ratio is not None:
        yield _latency_ratio("itl_p50_max_ratio", scope, records, obs, 50, expect.itl_p50_max_ratio,
                             expect.latency_floor_s, RequestRecord.itl_gaps, "inter-token latency")


def _resources(expect: Expectations, scope: str, records: Sequence[RequestRecord],
               obs: Observed) -> Iterator[Verdict]:
    if expect.memory_under_budget:
        if obs.budget_bytes is None or obs.peak_bytes is None:
            yield Verdict(name="memory_under_budget", scope=scope, ok=None,
                          expected="peak memory <= the memory budget",
                          actual="not measurable against this target (no budget or no memory numbers)")
        else:
            yield Verdict(name="memory_under_budget", scope=scope, ok=obs.peak_bytes <= obs.budget_bytes,
                          expected=f"peak memory <= budget {_mib(obs.budget_bytes)}",
                          actual=f"peak {_mib(obs.peak_bytes)}")

    if expect.no_leaks:
        expected = "nothing left registered or running after each phase"
        checks = [c for c in obs.leak_checks if scope == "run" or c.phase == scope]
        dirty = [c for c in checks if c.clean is False]
        measured = [c for c in checks if c.clean is not None]
        if not measured:
            yield Verdict(name="no_leaks", scope=scope, ok=None, expected=expected,
                          actual=checks[0].detail if checks else "no phase was checked")
        else:
            yield Verdict(name="no_leaks", scope=scope, ok=not dirty, expected=expected,
                          actual="clean after " + ", ".join(c.phase for c in measured) if not dirty else
                          "; ".join(f"{c.phase}: {c.detail}" for c in dirty))


def _after_the_run(expect: Expectations, scope: str, records: Sequence[RequestRecord],
                   obs: Observed) -> Iterator[Verdict]:
    if expect.new_request_succeeds:
        r = obs.new_request
        expected = "a new request after the run to complete"
        if r is None:
            yield Verdict(name="new_request_succeeds", scope=scope, ok=False, expected=expected,
                          actual="none was sent")
        else:
            yield Verdict(name="new_request_succeeds", scope=scope, ok=r.outcome == COMPLETED,
                          expected=expected, actual="completed" if r.outcome == COMPLETED else
                          f"{r.outcome} {r.status or ''} {r.error_code or ''} {_clip(r.error)}".strip())

    if expect.ssd_no_orphans:
        check = obs.ssd_check
        yield Verdict(name="ssd_no_orphans", scope=scope, ok=None if check is None else check.clean,
                      expected="after the run, flushed then cleaned up: no file left in the SSD "
                               "directory, the writer's counters balanced",
                      actual="not checked" if check is None else check.detail)


def _answers(expect: Expectations, scope: str, records: Sequence[RequestRecord],
             obs: Observed) -> Iterator[Verdict]:
    if expect.schema_valid:
        yield _schema_valid(scope, records, obs.schemas)

    if expect.error_message_contains is not None:
        needle = expect.error_message_contains
        failed = [r for r in records if r.outcome == FAILED]
        unclear = [r for r in failed if needle.lower() not in (r.error or "").lower()]
        yield Verdict(
            name="error_message_contains", scope=scope, ok=not unclear,
            expected=f"every failed request's error to mention {needle!r}",
            actual=f"{len(failed)} failed, all say so" if failed and not unclear else
            "no request failed" if not failed else
            f"{len(unclear)} do not: " + "; ".join(f"{r.key}: {r.error!r}" for r in unclear[:_SHOW]))


def _pool(expect: Expectations, scope: str, records: Sequence[RequestRecord],
          obs: Observed) -> Iterator[Verdict]:
    for name, key, minimum in (("min_pool_loads", "loads", expect.min_pool_loads),
                               ("min_pool_evictions", "evictions", expect.min_pool_evictions)):
        if minimum is None:
            continue
        expected = f"at least {minimum} model {key} in the pool over the run"
        if obs.pool_counts is None:
            yield Verdict(name=name, scope=scope, ok=None, expected=expected,
                          actual="no model pool in this target")
            continue
        n = int(obs.pool_counts[key])
        seconds = obs.pool_counts.get("load_seconds_total", 0.0)
        yield Verdict(name=name, scope=scope, ok=n >= minimum, expected=expected,
                      actual=f"{n} (loads took {seconds:.2f} s in all)" if key == "loads" else f"{n}")


_CHECKS: tuple[Check, ...] = (_outcomes, _against_reference, _resources, _after_the_run, _answers,
                              _pool)


def _schema_valid(scope: str, records: Sequence[RequestRecord], schemas: Mapping[str, str]) -> Verdict:
    """Fail closed, checked by an independent validator: a constrained answer that ends
    `stop` parses and validates; one cut by max_tokens ends `length`; nothing else."""
    import json

    import jsonschema  # the `test` extra

    expected = "every completed constrained answer to validate (finish stop) or end length"
    checked = [r for r in records if r.outcome == COMPLETED and schemas.get(r.workload)]
    bad: list[str] = []
    finished = 0
    for r in checked:
        if r.finish_reason == "length":
            continue
        try:
            if r.finish_reason != "stop":
                raise ValueError(f"finish_reason {r.finish_reason!r}")
            jsonschema.validate(json.loads(r.text or ""), json.loads(schemas[r.workload]))
            finished += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            bad.append(f"{r.key}: {_clip(str(exc))} in {_clip(r.text)!r}")
    if not checked:
        return Verdict(name="schema_valid", scope=scope, ok=False, expected=expected,
                       actual="no constrained request completed")
    return Verdict(name="schema_valid", scope=scope, ok=not bad, expected=expected,
                   actual=f"{finished} valid, {len(checked) - finished} length" if not bad else
                   f"{len(bad)} invalid: " + "; ".join(bad[:_SHOW]))


def count_outcome(records: Sequence[RequestRecord], name: str) -> int:
    if name.isdigit():
        status = int(name)
        return sum(1 for r in records if r.status == status and r.outcome in (COMPLETED, REFUSED, FAILED))
    return sum(1 for r in records if r.outcome == name)


def _noun(name: str) -> str:
    return f"requests with status {name}" if name.isdigit() else f"{name} requests"


def _identity(scope: str, records: Sequence[RequestRecord], obs: Observed, tie_margin: float) -> Verdict:
    expected = ("greedy/seeded outputs identical to the reference pass "
                "(cancelled ones a prefix of it)")
    if obs.reference is None:
        return Verdict(name="identical_to_reference", scope=scope, ok=False, expected=expected,
                       actual="no reference pass was run")
    compared = 0
    diffs: list[str] = []
    ties: list[str] = []
    for r in records:
        ref = obs.reference.get(r.key)
        if not r.reproducible or ref is None or ref.outcome != COMPLETED:
            continue
        if r.outcome not in (COMPLETED, CANCELLED):
            continue
        compared += 1
        found = _differs(r, ref, obs.compare_tokens, tie_margin)
        if found is not None:
            tie, problem = found
            (ties if tie else diffs).append(f"{r.key} in {r.phase} {problem}")
    unit = "token ids" if obs.compare_tokens else "outputs"
    if compared == 0:
        return Verdict(name="identical_to_reference", scope=scope, ok=False, expected=expected,
                       actual="no request could be compared (none completed in both passes)")
    if diffs:
        actual = f"{len(diffs)} of {compared} differ: " + "; ".join(diffs[:_SHOW])
    elif ties:
        actual = f"all {compared - len(ties)} of {compared} {unit} match"
    else:
        actual = f"all {compared} {unit} match"
    if ties:
        actual += (f"; {len(ties)} diverged at a greedy tie (not counted): "
                   + "; ".join(ties[:_SHOW]))
    return Verdict(name="identical_to_reference", scope=scope, ok=not diffs, expected=expected,
                   actual=actual)


def _differs(r: RequestRecord, ref: RequestRecord, tokens: bool,
             tie_margin: float) -> tuple[bool, str] | None:
    """None if `r` matches `ref` (a prefix of it, if cancelled); else (at a tie?, where)."""
    got: Sequence
    want: Sequence
    if tokens and r.token_ids is not None and ref.token_ids is not None:
        got, want, what = r.token_ids, ref.token_ids, "token"
    elif r.token_texts is not None and ref.token_texts is not None and r.outcome == COMPLETED:
        got, want, what = r.token_texts, ref.token_texts, "token"
    else:  # text; cancelled streams over HTTP may stop mid-token-list, the text is exact
        got, want, what = r.text, ref.text, "character"
    if r.outcome == CANCELLED:
        if len(got) <= len(want) and list(got) == list(want[: len(got)]):
            return None
    elif list(got) == list(want):
        return None
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            margin = _margin_at(ref, r, i) if what == "token" else None
            if margin is not None and margin < tie_margin:
                return True, (f"at token {i}, top-2 logprobs {margin:.2g} apart "
                              f"(reference {b!r}, got {a!r})")
            return False, f"differs at {what} {i} (reference {b!r}, got {a!r})"
    return False, f"has {len(got)} {what}s, the reference {len(want)}"


def _margin_at(ref: RequestRecord, r: RequestRecord, i: int) -> float | None:
    """How far the reference's choice at position i led its runner-up, if known. Only the
    reference (run alone) decides: overturning a clear lead there takes a real difference
    in the computation, whatever the other pass's own margin was."""
    if ref.token_margins is not None and i < len(ref.token_margins):
        return ref.token_margins[i]
    return None


def _cache_hits(scope: str, records: Sequence[RequestRecord], expect: Expectations) -> Verdict:
    assert expect.min_cache_hit_ratio is not None
    which = "later turns" if expect.cache_hit_turns == "later" else "all requests"
    expected = f"cached/prompt tokens >= {expect.min_cache_hit_ratio:.2f} over {which}"
    pool = [r for r in records if r.outcome == COMPLETED and r.prompt_tokens
            and (expect.cache_hit_turns == "all" or r.turn >= 2)]
    if not pool:
        return Verdict(name="min_cache_hit_ratio", scope=scope, ok=False, expected=expected,
                       actual=f"no completed request among {which}")
    if all(r.cached_tokens is None for r in pool):
        return Verdict(name="min_cache_hit_ratio", scope=scope, ok=None, expected=expected,
                       actual="the target does not report cached tokens")
    cached = sum(r.cached_tokens or 0 for r in pool)
    prompt = sum(r.prompt_tokens or 0 for r in pool)
    ratio = cached / prompt
    return Verdict(name="min_cache_hit_ratio", scope=scope, ok=ratio >= expect.min_cache_hit_ratio,
                   expected=expected,
                   actual=f"{ratio:.3f} ({cached} of {prompt} prompt tokens over {len(pool)} requests)")


def _latency_ratio(name, scope, records, obs: Observed, q, ratio, floor, values, what) -> Verdict:
    expected = f"{what} p{q} <= {ratio:g} x the reference pass's"
    if obs.reference is None:
        return Verdict(name=name, scope=scope, ok=False, expected=expected,
                       actual="no reference pass was run")
    mine: list[float] = []
    base: list[float] = []
    for r in records:
        ref = obs.reference.get(r.key)
        if r.outcome in (COMPLETED, CANCELLED) and ref is not None and ref.outcome == COMPLETED:
            mine.extend(values(r))
            base.extend(values(ref))
    if not mine or not base:
        return Verdict(name=name, scope=scope, ok=None, expected=expected,
                       actual=f"no {what} measured in both passes")
    got, ref_q = percentile(mine, q), percentile(base, q)
    bound = ratio * max(ref_q, floor)
    return Verdict(name=name, scope=scope, ok=got <= bound, expected=expected,
                   actual=f"{got * 1000:.1f} ms vs reference {ref_q * 1000:.1f} ms "
                          f"(bound {bound * 1000:.1f} ms, ratio {got / max(ref_q, floor):.2f})")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _clip(text: str | None, n: int = 80) -> str:
    if not text:
        return ""
    return text if len(text) <= n else text[: n - 3] + "..."
