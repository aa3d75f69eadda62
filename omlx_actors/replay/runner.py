"""Running a scenario: the reference pass, the phases, faults, sampling, verdicts.

`replay(scenario, ...)` is the whole harness as one async function (the CLI and the tests
call it). In order:

1. Refuse what this target cannot do (faults, actions or restarts through a bare URL)
   with `UnsupportedScenario`, before anything runs.
2. Resolve the model and the scenario's server settings into one `RuntimeConfig`.
3. If an expectation needs it, a *reference pass*: every conversation of every workload
   the phases use, one request at a time, no cancellations, no faults. In process (and
   with `serve=True`) it runs on a fresh runtime of its own first, so the phases start as
   cold as it did; against a URL it runs after the phases, on the same server.
4. The phases, one after another; within a phase, its workloads' conversations start at
   their arrival offsets and each sends its turns in order (a later turn carries the
   earlier answers), at most `concurrency` requests of a workload in flight. Faults are
   armed when their phase starts (and disarmed when it ends); actions (SSD cleanups) run
   at their times within the phase. With an identity expectation, greedy requests ask for
   top-2 logprobs so a tie can be told from a divergence. After each phase the
   engine must settle: nothing registered, nothing running (the leak check). A phase with
   `restart_before` first stops the runtime (drain) and starts it again with the same
   settings (in process and with `serve=True` only; `ssd_cache_dir = "<tmp>"` is one
   temporary directory for the whole main run, another for the reference pass).
5. Memory is sampled all along (engine stats in process, /metrics over a URL).
6. Optionally one new request and the SSD check (flush, counters, cleanup, empty
   directory) after the run; then every expectation is evaluated.

Cancellation: cancelling `replay` cancels every request in flight (each session is closed
and aborted in the engine, or its connection closed) and stops the runtime it started.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.replay.expect import Observed, Verdict, evaluate
from omlx_actors.replay.records import (
    COMPLETED,
    SKIPPED,
    ActionRecord,
    FaultRecord,
    LeakCheck,
    MemorySample,
    PhaseWindow,
    RequestRecord,
    SsdCheck,
)
from omlx_actors.replay.schema import (
    DISK_FAULTS,
    STEP_FAULTS,
    TEMPORARY_DIR,
    ByteSize,
    Phase,
    RequestParams,
    Scenario,
    Workload,
)
from omlx_actors.replay.pool_target import engine_of, open_pool_target, pool_counts, pool_options
from omlx_actors.replay.ssd_check import ssd_check, ssd_stats
from omlx_actors.replay.targets import HttpTarget, InProcessTarget
from omlx_actors.replay.trace import (
    ConversationPlan,
    RequestBody,
    conversation_body,
    plan_workload,
    reference_workloads,
    request_count,
)

log = logging.getLogger(__name__)

# Memory sampling period: in process a stats call costs microseconds; over HTTP each sample
# is a /metrics scrape, so less often.
SAMPLE_INTERVAL_S = 0.05
HTTP_SAMPLE_INTERVAL_S = 0.25
# A fault step number no run reaches: arming one replaces (disarms) a pending fault.
_NEVER_STEP = 2**62


class UnsupportedScenario(Exception):
    """The scenario asks for something this build or this target cannot do."""


@attrs.define(kw_only=True)
class ReplayResult:
    scenario: Scenario
    target: str  # in-process | serve | url
    url: str | None
    model: str
    config: dict[str, Any]
    started_at: str
    duration_s: float = 0.0
    windows: list[PhaseWindow] = attrs.field(factory=list)
    records: list[RequestRecord] = attrs.field(factory=list)
    reference: list[RequestRecord] | None = None
    reference_duration_s: float = 0.0
    samples: list[MemorySample] = attrs.field(factory=list)
    leak_checks: list[LeakCheck] = attrs.field(factory=list)
    faults: list[FaultRecord] = attrs.field(factory=list)
    restarts: list[float] = attrs.field(factory=list)  # when the runtime was restarted
    actions: list[ActionRecord] = attrs.field(factory=list)
    ssd_stats: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # SSD writer, per phase
    ssd_check: SsdCheck | None = None
    budget_bytes: int | None = None
    peak_bytes: int | None = None
    new_request: RequestRecord | None = None
    pool_counts: dict[str, float] | None = None  # a model pool's loads and evictions
    verdicts: list[Verdict] = attrs.field(factory=list)

    @property
    def passed(self) -> bool:
        return all(v.ok is not False for v in self.verdicts)

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.ok is False]


class _Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, name: str):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit="req", dynamic_ncols=True, leave=True)

    def phase(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description(name)

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def runtime_config(scenario: Scenario, model: str | None = None) -> RuntimeConfig:
    """The scenario's model (or `model`) and [server] settings as one RuntimeConfig. A demo
    model name is built once into the user cache if needed (in a child process)."""
    from omlx_actors.models import DEMO_SPECS
    from omlx_actors.models.download import resolve_model

    name = model or scenario.model
    base = RuntimeConfig(model=None, demo_model=name) if name in DEMO_SPECS else RuntimeConfig(model=name)
    path, _ = await resolve_model(base)
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    overrides = {k: (v.resolve(weights) if isinstance(v, ByteSize) else v) for k, v in scenario.server}
    try:
        return RuntimeConfig(model=str(path), **overrides)
    except (ValueError, TypeError) as exc:
        raise UnsupportedScenario(f"[server] settings are invalid for {name}: {exc}") from exc


@contextlib.asynccontextmanager
async def _fresh_target(kind: str, config: RuntimeConfig, timeout_s: float,
                        pool=None) -> AsyncIterator[Any]:
    if pool is not None:  # [model] pool: several models (pool_target)
        async with open_pool_target(kind, config, pool, timeout_s) as target:
            yield target
    elif kind == "serve":
        from omlx_actors.server import open_server

        async with open_server(config) as server:
            target = HttpTarget(server.url, engine=server.runtime, timeout_s=timeout_s)
            try:
                await target.resolve_model(Path(config.model or "model").name)
                yield target
            finally:
                await target.aclose()
    else:
        from omlx_actors.wiring import open_runtime

        async with open_runtime(config=config) as rt:
            yield InProcessTarget(rt)


async def replay(
    scenario: Scenario,
    *,
    url: str | None = None,
    serve: bool = False,
    model: str | None = None,
    api_key: str | None = None,
    served_model: str | None = None,
    engine: Any = None,
    progress: bool = False,
) -> ReplayResult:
    """Run `scenario` and evaluate its expectations (see the module docstring).

    Targets: in process (default), `serve=True` (an HTTP server on loopback in this
    process, driven over HTTP), or `url` (any OpenAI-compatible server; `engine` may hand
    the runtime behind it when it runs in this process, which enables faults and engine
    memory). Raises `UnsupportedScenario` before running anything it cannot do."""
    problems: list[str] = []
    if url is not None and engine is None and scenario.faults:
        problems.append(
            f"fault {scenario.faults[0].kind} needs the engine in this process: run in process "
            "or with --serve, not against --url")
    if url is not None and engine is None and scenario.actions:
        problems.append(f"action {scenario.actions[0].kind} needs the engine in this process: "
                        "run in process or with --serve, not against --url")
    if url is not None and scenario.restarts:
        restart = next(p.name for p in scenario.phases if p.restart_before)
        problems.append(f"phase {restart} restarts the server: run in process or with --serve, "
                        "not against --url")
    if scenario.pool and any(f.kind != "process_restart" for f in scenario.faults):
        problems.append("a model pool's scenario takes only process_restart faults")
    if problems:
        raise UnsupportedScenario("; ".join(problems))
    kind = "url" if url is not None else ("serve" if serve else "in-process")
    config = pool = None
    if kind != "url":
        config = await runtime_config(scenario, model)
        pool = await pool_options(scenario, config, model)
    result = ReplayResult(
        scenario=scenario, target=kind, url=url,
        model=(config.model if config is not None else (served_model or "")) or "",
        config={} if config is None else {k: _plain(v) for k, v in attrs.asdict(config).items()},
        started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    plans = {w.name: plan_workload(scenario, w) for w in reference_workloads(scenario)}
    total = request_count(scenario)
    reference_total = sum(w.conversations * w.turns for w in reference_workloads(scenario))
    bar = _Progress(progress, total + (reference_total if scenario.needs_reference else 0),
                    scenario.name)
    timeout = scenario.request_timeout_s
    try:
        with trio.fail_after(scenario.timeout_s), contextlib.ExitStack() as dirs:
            if kind == "url":
                assert url is not None
                target = HttpTarget(url, api_key=api_key, model=served_model, engine=engine,
                                    timeout_s=timeout)
                try:
                    result.model = await target.resolve_model(scenario.model)
                    await _main_run(scenario, lambda: _given(target), plans, result, bar)
                    if scenario.needs_reference:
                        await _reference_pass(scenario, target, plans, result, bar)
                finally:
                    await target.aclose()
            else:
                assert config is not None
                if scenario.needs_reference:
                    ref_config = _own_directories(config, dirs)
                    async with _fresh_target(kind, ref_config, timeout, pool) as target:
                        await _reference_pass(scenario, target, plans, result, bar)
                main_config = _own_directories(config, dirs)
                if main_config.ssd_cache_dir is not None:
                    result.config["ssd_cache_dir"] = str(main_config.ssd_cache_dir)
                await _main_run(scenario, lambda: _fresh_target(kind, main_config, timeout, pool),
                                plans, result, bar)
    finally:
        bar.close()
    result.verdicts = verdicts(scenario, result, compare_tokens=kind == "in-process")
    return result


def _own_directories(config: RuntimeConfig, dirs: contextlib.ExitStack) -> RuntimeConfig:
    """`ssd_cache_dir = "<tmp>"` → a fresh temporary directory, removed when `dirs` closes."""
    if config.ssd_cache_dir is None or str(config.ssd_cache_dir) != TEMPORARY_DIR:
        return config
    path = dirs.enter_context(tempfile.TemporaryDirectory(prefix="omlx-replay-ssd-"))
    return attrs.evolve(config, ssd_cache_dir=Path(path))


@contextlib.asynccontextmanager
async def _given(target) -> AsyncIterator[Any]:
    yield target


def verdicts(scenario: Scenario, result: ReplayResult, *, compare_tokens: bool) -> list[Verdict]:
    obs = Observed(
        records=result.records,
        reference=None if result.reference is None else {r.key: r for r in result.reference},
        leak_checks=result.leak_checks, budget_bytes=result.budget_bytes,
        peak_bytes=result.peak_bytes, new_request=result.new_request,
        compare_tokens=compare_tokens, ssd_check=result.ssd_check, pool_counts=result.pool_counts,
        schemas={w.name: w.params.response_schema for w in scenario.workloads
                 if w.params.response_schema},
    )
    out = evaluate(scenario.expect, "run", obs)
    for phase in scenario.phases:
        if phase.expect is not None:
            out.extend(evaluate(phase.expect, phase.name, obs))
    return out


async def _reference_pass(scenario, target, plans, result: ReplayResult, bar: _Progress) -> None:
    bar.phase(f"{scenario.name}: reference")
    t0 = trio.current_time()
    clock = lambda: trio.current_time() - t0  # noqa: E731
    records: list[RequestRecord] = []
    for workload in reference_workloads(scenario):
        for plan in plans[workload.name]:
            await _conversation(scenario, target, workload, plan, "reference", None, clock,
                                records, bar, t0, reference=True)
    result.reference = records
    result.reference_duration_s = clock()


@attrs.define
class _Current:
    """The target the phases talk to; None while the runtime restarts."""

    target: Any = None


async def _main_run(scenario: Scenario, open_target, plans, result: ReplayResult, bar: _Progress) -> None:
    """The phases, with the memory sampler alongside. `open_target()` is entered at the start
    and again after each restart (the previous one is closed first: drained, shut down)."""
    t0 = trio.current_time()
    clock = lambda: trio.current_time() - t0  # noqa: E731
    current = _Current()
    # The sampler's nursery encloses every target, so a target can be closed and opened
    # again in this task while the sampler keeps running.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample_memory, current, clock, result)
        async with contextlib.AsyncExitStack() as stack:
            current.target = await stack.enter_async_context(open_target())
            for phase in scenario.phases:
                if phase.restart_before:
                    bar.phase(f"{scenario.name}: restarting")
                    current.target = None
                    await stack.aclose()
                    result.restarts.append(clock())
                    current.target = await stack.enter_async_context(open_target())
                target = current.target
                bar.phase(f"{scenario.name}: {phase.name}")
                start = clock()
                await _phase(scenario, target, phase, plans, clock, result, bar, t0)
                result.windows.append(PhaseWindow(name=phase.name, start_s=start, end_s=clock()))
                result.leak_checks.append(await target.check_idle(phase.name))
                stats = await ssd_stats(target)
                if stats is not None:
                    result.ssd_stats[phase.name] = stats
            target = current.target
            if any(e.new_request_succeeds for e in _all_expectations(scenario)):
                result.new_request = await _new_request(scenario, target, clock)
            if any(e.ssd_no_orphans for e in _all_expectations(scenario)):
                result.ssd_check = await ssd_check(target)
            await _take_sample(target, clock, result)
            result.budget_bytes = await target.budget_bytes()
            result.pool_counts = await pool_counts(target)
            current.target = None
        nursery.cancel_scope.cancel()
    result.duration_s = clock()
    peaks = [s.peak_bytes for s in result.samples]
    result.peak_bytes = max(peaks) if peaks else None


def _all_expectations(scenario: Scenario):
    yield scenario.expect
    for p in scenario.phases:
        if p.expect is not None:
            yield p.expect


async def _phase(scenario, target, phase: Phase, plans, clock, result: ReplayResult, bar, t0) -> None:
    faults = [f for f in scenario.faults if f.phase == phase.name]
    phase_t0 = trio.current_time()
    async with trio.open_nursery() as armed:
        for fault in faults:
            await _arm(target, fault, clock, result, armed)
        for action in scenario.actions:
            if action.phase == phase.name:
                for at in action.at_s:
                    armed.start_soon(_act, target, action.kind, phase.name, phase_t0 + at, clock, result)
        async with trio.open_nursery() as nursery:
            for name in phase.workloads:
                workload = scenario.workload(name)
                level = phase.concurrency or workload.concurrency
                limiter = trio.CapacityLimiter(level) if level else None
                for plan in plans[name]:
                    nursery.start_soon(
                        _conversation, scenario, target, workload, plan, phase.name, limiter,
                        clock, result.records, bar, phase_t0,
                    )
        armed.cancel_scope.cancel()  # a delayed fault not yet armed never will be
    if any(f.kind in STEP_FAULTS for f in faults):
        await target.engine.inject_fault("disarmed", at_step=_NEVER_STEP)


async def _arm(target, fault, clock, result: ReplayResult, nursery: trio.Nursery) -> None:
    engine = target.engine
    if fault.kind == "process_restart":
        nursery.start_soon(_kill_engine, target, fault, clock, result)
        return
    if fault.kind in DISK_FAULTS:
        nursery.start_soon(_disk_fault, engine, fault, clock, result)
        return
    kind = "abort" if fault.kind == "engine_abort" else "oom"
    if fault.at_step is not None:
        steps = (await engine.stats()).steps
        await engine.inject_fault(fault.error, at_step=steps + fault.at_step, kind=kind)
        what = f"at engine step {steps + fault.at_step} (phase start + {fault.at_step})"
    elif fault.above_bytes is not None:
        limit = fault.above_bytes.resolve(engine.info.weights_bytes)
        await engine.inject_fault(fault.error, above_bytes=limit, kind=kind)
        what = f"at the first step above {limit} bytes of active memory"
    else:
        async def later() -> None:
            await trio.sleep(fault.after_s)
            await engine.inject_fault(fault.error, kind=kind)
            result.faults.append(FaultRecord(kind=fault.kind, phase=fault.phase,
                                             what=f"at the next step after {fault.after_s:g} s",
                                             at_s=clock()))

        nursery.start_soon(later)
        return
    result.faults.append(FaultRecord(kind=fault.kind, phase=fault.phase, what=what, at_s=clock()))


async def _wait_for_fault(engine, fault) -> str:
    """Sleep until the fault's moment of its phase (`at_step` engine steps or `after_s`
    seconds after the phase started); returns how that moment reads in the report."""
    if fault.at_step is not None:
        first = (await engine.stats()).steps
        while (await engine.ping()).steps < first + fault.at_step:
            await trio.sleep(0.002)
        return f"at engine step {first + fault.at_step} (phase start + {fault.at_step})"
    await trio.sleep(fault.after_s)
    return f"{fault.after_s:g} s into the phase"


async def _disk_fault(engine, fault, clock, result: ReplayResult) -> None:
    """Arm a count of the SSD tier's block writes to stall or fail with ENOSPC (from the
    fault's moment on: `after_writes` go through first, then `writes` are struck)."""
    when = await _wait_for_fault(engine, fault)
    kind = DISK_FAULTS[fault.kind]
    await engine.inject_disk_fault(kind, fault.writes, after_writes=fault.after_writes,
                                   stall_s=fault.stall_s)
    first = fault.after_writes + 1
    struck = f"block writes {first}..{first + fault.writes - 1} after it"
    what = f"{kind} ({fault.stall_s:g} s each) of {struck}" if kind == "stall" else f"{kind}: {struck}"
    result.faults.append(FaultRecord(kind=fault.kind, phase=fault.phase, at_s=clock(),
                                     what=f"{what}, armed {when}"))


async def _kill_engine(target, fault, clock, result: ReplayResult) -> None:
    """SIGKILL the engine process (of `fault.model` in a pool) at a step or a time of the
    phase (the front restarts it)."""
    engine = await engine_of(target, fault)
    when = await _wait_for_fault(engine, fault)
    os.kill(engine.engine_pid, signal.SIGKILL)
    result.faults.append(FaultRecord(kind=fault.kind, phase=fault.phase, what=f"SIGKILL {when}",
                                     at_s=clock()))


async def _act(target, kind: str, phase: str, when: float, clock, result: ReplayResult) -> None:
    """An action at a moment of its phase (cancelled if the phase's requests end first)."""
    await trio.sleep_until(when)
    start = clock()
    if kind == "ssd_cleanup":
        await target.engine.cleanup_ssd_cache()
    else:  # pragma: no cover - the schema admits only the kinds above
        raise AssertionError(kind)
    result.actions.append(ActionRecord(kind=kind, phase=phase, at_s=start, took_s=clock() - start))


async def _conversation(
    scenario: Scenario, target, workload: Workload, plan: ConversationPlan, phase: str,
    limiter: trio.CapacityLimiter | None, clock, records: list[RequestRecord], bar: _Progress,
    t0: float, *, reference: bool = False,
) -> None:
    if not reference:
        await trio.sleep_until(t0 + plan.offset_s)
    answers: list[str] = []
    broken_at: int | None = None
    for turn in plan.turns:
        rec = RequestRecord(
            key=plan.key(turn.turn), phase=phase, workload=workload.name,
            conversation=plan.index, turn=turn.turn, reproducible=workload.params.reproducible,
            planned_cancel=None if reference else turn.cancel,
        )
        records.append(rec)
        if broken_at is not None:
            rec.outcome, rec.error_code = SKIPPED, "skipped"
            rec.error = f"turn {broken_at} of this conversation did not complete"
            bar.update()
            continue
        body = conversation_body(workload, plan, turn.turn, answers)
        if scenario.compares_outputs and workload.params.reproducible:
            body = attrs.evolve(body, margins=True)
        async with limiter if limiter is not None else contextlib.nullcontext():
            await _send(scenario, target, body, rec, clock)
        bar.update()
        if rec.outcome != COMPLETED:
            broken_at = turn.turn
            continue
        answers.append(rec.text)
        if workload.think_s and turn.turn < len(plan.turns):
            await trio.sleep(workload.think_s)


async def _send(scenario: Scenario, target, body: RequestBody, rec: RequestRecord, clock) -> None:
    """One request, bounded by the scenario's request timeout; whatever goes wrong becomes
    the record's outcome (a harness error is a lost request, never a crash of the run)."""
    with trio.move_on_after(scenario.request_timeout_s) as scope:
        try:
            await target.send(body, rec.planned_cancel, rec, clock)
        except Exception as exc:  # noqa: BLE001 - recorded as lost, with what it was
            log.exception("request %s raised", rec.key)
            rec.lose(f"{type(exc).__name__}: {exc}")
    if scope.cancelled_caught:
        rec.lose(f"no outcome within the request timeout ({scenario.request_timeout_s:g} s)")
        rec.t_end = clock()


async def _new_request(scenario: Scenario, target, clock) -> RequestRecord:
    rec = RequestRecord(key="after-run/0/1", phase="after-run", workload="after-run",
                        conversation=0, turn=1, reproducible=True)
    body = RequestBody(
        mode="chat", messages=({"role": "user", "content": "replay: one new request after the run"},),
        prompt=None, tools=None, params=RequestParams(max_tokens=4, ignore_eos=True, stream=True),
    )
    await _send(scenario, target, body, rec, clock)
    return rec


async def _take_sample(target, clock, result: ReplayResult) -> None:
    try:
        sample = await target.sample(clock())
    except Exception as exc:  # noqa: BLE001 - a missed sample is not a failed run
        log.debug("memory sample failed: %s", exc)
        return
    if sample is not None:
        result.samples.append(sample)


async def _sample_memory(current: _Current, clock, result: ReplayResult) -> None:
    while True:
        target = current.target
        if target is not None:
            await _take_sample(target, clock, result)
        engine = target is None or target.has_engine
        await trio.sleep(SAMPLE_INTERVAL_S if engine else HTTP_SAMPLE_INTERVAL_S)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return None
    return value
