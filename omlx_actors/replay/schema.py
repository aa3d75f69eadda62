"""Scenario files: the TOML format, read into a `Scenario` (omlx_actors.replay.scenario),
with readable errors.

Each table of the file is a msgspec struct (see `tables.decode`). `load_scenario(path)`
parses and validates a file and returns a `Scenario`, or
raises `ScenarioError` whose message lists every problem as `file:line: [table] key: what
was expected, what was found` (unknown keys are rejected, with a suggestion).

Pure: no trio, no MLX. `scenarios/README.md` documents the format with an example.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import attrs
import msgspec
from msgspec import Meta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 only
    import tomli as tomllib

from omlx_actors.config import RuntimeConfig
from omlx_actors.replay.scenario import (
    DISK_FAULTS,
    ENGINE_DEATHS,
    PHASE_EXPECTATIONS,
    REQUEST_KEYS,
    STEP_FAULTS,
    TEMPORARY_DIR,
    Action,
    ActionKind,
    Arrival,
    AtLeastOne,
    CancelPlan,
    Count,
    Expectations,
    Fault,
    FaultKind,
    Fraction,
    Mode,
    Moments,
    Phase,
    Positive,
    RequestParams,
    Scenario,
    Seconds,
    SecondsRange,
    Sizes,
    TokenRange,
    Word,
    Words,
    Workload,
    as_range,
    as_tuple,
)
from omlx_actors.replay.tables import (
    ByteSize,
    Context,
    Size,
    Table,
    decode,
    describe,
    show,
)

# RuntimeConfig fields a scenario may not set: the model comes from [model] / --model.
_NOT_SERVER_KEYS = ("model", "demo_model", "model_cache_dir")


class ScenarioError(ValueError):
    """A scenario file that cannot be used. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------
# Loading


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises `ScenarioError` (every problem found, one
    per line, each with file:line where it can be located) or `OSError`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    return parse_scenario(text, path)


def parse_scenario(text: str, path: Path | None = None) -> Scenario:
    where = str(path) if path is not None else "<scenario>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([f"{where}: not valid TOML: {exc}"]) from None
    ctx = Context(where, text.splitlines())
    scenario = _build(ctx, data, path)
    if ctx.problems:
        raise ScenarioError(ctx.problems)
    assert scenario is not None
    return scenario


# ---------------------------------------------------------------------------------------
# The file's tables, as msgspec reads them: field names are the TOML keys, and a field
# whose default is None was not given (TOML has no null).


# The arrays of tables, named so in an error.
_Phases = Annotated[list[Any], Meta(description="[[phase]] tables (an array of tables)")]
_Faults = Annotated[list[Any], Meta(description="[[fault]] tables (an array of tables)")]
_Actions = Annotated[list[Any], Meta(description="[[action]] tables (an array of tables)")]


class ScenarioFile(Table):
    """The file's top level: its sections, each read by its own table type below."""

    scenario: dict[str, Any] | None = None  # required: reported by hand, to check the rest too
    model: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    defaults: dict[str, Any] | None = None
    workload: Any = None  # checked by hand: its message asks for [workload.NAME] tables
    expect: dict[str, Any] | None = None
    phase: _Phases | None = None
    fault: _Faults | None = None
    action: _Actions | None = None


class ScenarioTable(Table):
    name: str
    description: str = ""
    seed: Count = 0
    request_timeout_s: Positive = 60.0
    timeout_s: Positive = 600.0


class ModelTable(Table):
    name: str = "tiny-llama"
    pool: Words | None = None  # more models, served beside `name` as one model pool
    pool_holds: AtLeastOne | None = None  # the pool's budget holds this many (the largest)


class WorkloadTable(RequestParams, frozen=True):
    """A workload's table holds its request keys flat, over the [defaults] table's."""

    mode: Mode = "chat"
    conversations: AtLeastOne = 1
    turns: AtLeastOne = 1
    system: str | None = None
    system_words: Count = 0
    prompt_words: Sizes | None = None
    prompt_tokens: Sizes | None = None
    tools: Words | None = None
    tool_calls_in_history: bool = False
    tool_result_words: AtLeastOne = 30
    start_s: Seconds = 0.0
    arrival: Arrival | None = None
    rate: Positive | None = None
    concurrency: AtLeastOne | None = None
    think_s: Seconds = 0.0
    cancel_fraction: Fraction | None = None
    cancel_after_tokens: TokenRange | None = None
    cancel_after_s: SecondsRange | None = None
    model: Word | None = None  # one of [model]'s pool models (None: [model] name)

    def problems(self) -> Iterator[tuple[str, str]]:
        request = list(super().problems())
        if request:
            yield from request
            return
        for key, kind in (("cancel_after_tokens", TokenRange), ("cancel_after_s", SecondsRange)):
            low, high = as_range(getattr(self, key)) or (0, 0)
            if low > high:
                yield key, f"expected {describe(kind)}, got {show(getattr(self, key))}"
                return
        yield from self._prompt_problems()
        if (self.tools or self.tool_calls_in_history) and self.mode != "chat":
            yield "tools", 'tools need mode = "chat"'
        if self.tool_calls_in_history and not self.tools:
            yield "tool_calls_in_history", "needs at least one tool in tools"
        if self.rate is not None and self.arrival == "burst":
            yield "rate", 'a rate needs arrival = "uniform" or "poisson"'
        if self.rate is None and self.arrival in ("uniform", "poisson"):
            yield "arrival", f"arrival = {self.arrival!r} needs a rate (conversations per second)"
        if self.cancel_after_tokens is not None and self.cancel_after_s is not None:
            yield "cancel_after_s", "give either cancel_after_tokens or cancel_after_s, not both"
        elif self.cancel_after_tokens is not None and self.stream is False:
            yield "cancel_after_tokens", "cancelling after N tokens needs stream = true"
        elif (self.cancel_fraction is not None
              and self.cancel_after_s is None and self.cancel_after_tokens is None):
            yield "cancel_fraction", "needs cancel_after_tokens or cancel_after_s"

    def _prompt_problems(self) -> Iterator[tuple[str, str]]:
        if self.system is not None and self.system_words:
            yield "system_words", "give either system (a literal prompt) or system_words, not both"
        if self.prompt_tokens is None:
            return
        if self.mode != "completion":
            yield "prompt_tokens", 'token-id prompts need mode = "completion"'
        if self.prompt_words is not None:
            yield "prompt_tokens", "give either prompt_words or prompt_tokens, not both"
        if self.turns != 1:
            yield "prompt_tokens", "token-id prompts are single-turn (turns = 1)"
        if self.system is not None or self.system_words:
            yield "prompt_tokens", "token-id prompts have no system prompt"

    def workload(self, name: str) -> Workload:
        cancel = None
        if self.cancel_after_tokens is not None or self.cancel_after_s is not None:
            cancel = CancelPlan(fraction=1.0 if self.cancel_fraction is None else self.cancel_fraction,
                                after_tokens=as_range(self.cancel_after_tokens),
                                after_s=as_range(self.cancel_after_s))
        return Workload(
            name=name, mode=self.mode, conversations=self.conversations, turns=self.turns,
            system=self.system, system_words=self.system_words,
            prompt_words=(() if self.prompt_tokens is not None
                          else as_tuple(self.prompt_words) or (20,)),
            prompt_tokens=as_tuple(self.prompt_tokens) or (), tools=as_tuple(self.tools) or (),
            tool_calls_in_history=self.tool_calls_in_history, tool_result_words=self.tool_result_words,
            params=RequestParams(**{key: getattr(self, key) for key in REQUEST_KEYS}),
            start_s=self.start_s,
            arrival=self.arrival or ("burst" if self.rate is None else "uniform"), rate=self.rate,
            concurrency=self.concurrency, think_s=self.think_s, cancel=cancel, model=self.model,
        )


class PhaseTable(Table):
    name: str | None = None
    workloads: Words | None = None
    concurrency: Sizes | None = None
    restart_before: bool = False
    expect: dict[str, Any] | None = None  # Expectations, read on their own: located as [phase[N].expect]


class FaultTable(Table):
    kind: FaultKind
    phase: str | None = None
    at_step: AtLeastOne | None = None
    after_s: Seconds | None = None
    above_bytes: Size | None = None
    error: str = "injected out-of-memory"
    writes: AtLeastOne | None = None
    after_writes: Count | None = None
    stall_s: Positive | None = None
    duration_s: Any = None  # the old form, refused with its fix
    model: Word | None = None  # a pool model whose engine it strikes (None: [model] name)

    def problem(self, phase_names: set[str]) -> tuple[str, str] | None:
        """The first thing wrong with this fault's combination of keys, if any."""
        kind = self.kind
        if self.duration_s is not None:
            return "duration_s", ("disk faults strike by count, not for a time: use writes (and "
                                  "after_writes, stall_s)")
        if self.phase is not None and self.phase not in phase_names:
            return "phase", f"no phase named {self.phase!r}; phases: {', '.join(sorted(phase_names))}"
        moments = (self.at_step, self.after_s, self.above_bytes)
        if kind in STEP_FAULTS and sum(x is not None for x in moments) != 1:
            return "kind", f"an {kind} fault needs exactly one of at_step, after_s, above_bytes"
        if kind in ("process_restart", *DISK_FAULTS) and (
                self.above_bytes is not None or (self.at_step is None) == (self.after_s is None)):
            return "kind", f"a {kind} fault needs exactly one of at_step, after_s"
        for key in () if kind in DISK_FAULTS else ("writes", "after_writes", "stall_s"):
            if getattr(self, key) is not None:
                return key, f"only disk faults (writer_stall, disk_full) take {key}, not {kind}"
        if kind in DISK_FAULTS and self.writes is None:
            return "kind", f"a {kind} fault needs writes (how many block writes it strikes)"
        if kind == "writer_stall" and self.stall_s is None:
            return "kind", "a writer_stall fault needs stall_s (how long each struck write hangs)"
        if kind == "disk_full" and self.stall_s is not None:
            return "stall_s", "a disk_full write fails at once: stall_s is only for writer_stall"
        return None


class ActionTable(Table):
    kind: ActionKind
    at_s: Moments
    phase: str | None = None


def server_keys() -> dict[str, str]:
    """RuntimeConfig fields a scenario's [server] table may set → their annotation."""
    return {
        a.name: str(a.type)
        for a in attrs.fields(RuntimeConfig)
        if a.name not in _NOT_SERVER_KEYS
    }


def _server_field(key: str, annotation: str) -> Any:
    if key.endswith("_bytes"):
        return Size
    for name, kind in (("bool", bool), ("int", int), ("float", Positive)):
        if name in annotation:
            return kind
    return str  # str, Path (a directory "<tmp>": a fresh temporary one for each runtime)


# [server]: RuntimeConfig's fields, typed from their annotations.
ServerTable = msgspec.defstruct(
    "ServerTable", [(key, _server_field(key, a) | None, None) for key, a in server_keys().items()],
    bases=(Table,), kw_only=True,
)


# ---------------------------------------------------------------------------------------
# Sections


def _build(ctx: Context, data: dict, path: Path | None) -> Scenario | None:
    root = decode(ctx, data, (), ScenarioFile, partial=True)
    assert root is not None  # `data` is a table, and every section is optional to msgspec
    if root.scenario is None:
        ctx.report((), None, "missing required key 'scenario'")
    head = decode(ctx, root.scenario or {}, ("scenario",), ScenarioTable)
    model = decode(ctx, root.model or {}, ("model",), ModelTable)
    server = _server(ctx, root.server)
    defaults = root.defaults or {}
    if decode(ctx, defaults, ("defaults",), RequestParams) is None:
        defaults = {}
    names, workloads = _workloads(ctx, root.workload, defaults)
    expect = decode(ctx, root.expect or {}, ("expect",), Expectations)
    phases = _phases(ctx, root.phase, names)
    base_names = {p.name.split("@c")[0] for p in phases} | {p.name for p in phases}
    first = phases[0].name if phases else "main"
    faults = [f for i, raw in enumerate(root.fault or ())
              for f in _fault(ctx, raw, ("fault", i), phases, base_names, first)]
    actions = [a for i, raw in enumerate(root.action or ())
               for a in _action(ctx, raw, ("action", i), phases, base_names, first)]
    _check_server_for_faults(ctx, dict(server), faults)
    if model is not None:
        _check_pool(ctx, model, workloads, faults)
    if ctx.problems or head is None or model is None or expect is None:
        return None
    return Scenario(
        name=head.name, path=path, description=head.description, seed=head.seed, model=model.name,
        pool=as_tuple(model.pool) or (), pool_holds=model.pool_holds,
        server=server, workloads=tuple(workloads), phases=tuple(phases), faults=tuple(faults),
        actions=tuple(actions), expect=expect,
        request_timeout_s=head.request_timeout_s, timeout_s=head.timeout_s,
    )


def _check_pool(ctx: Context, model: ModelTable, workloads: list[Workload],
                faults: list[Fault]) -> None:
    """A workload's or a fault's `model` names a pool model; pool_holds needs a pool."""
    pool = as_tuple(model.pool) or ()
    names = (model.name, *pool)
    for w in workloads:
        if w.model is not None and w.model not in names:
            ctx.report(("workload", w.name), "model",
                       f"no model {w.model!r} in [model]; models: {', '.join(names)}")
    for f in faults:
        if f.model is not None and f.model not in names:
            ctx.report(("fault",), "model",
                       f"no model {f.model!r} in [model]; models: {', '.join(names)}")
            return
    if model.pool_holds is not None and not pool:
        ctx.report(("model",), "pool_holds", "needs a pool (more models in pool)")


def _check_server_for_faults(ctx: Context, server: dict[str, Any], faults: list[Fault]) -> None:
    death = next((f.kind for f in faults if f.kind in ENGINE_DEATHS), None)
    if death is not None and server.get("isolation") != "process":
        ctx.report(("server",), "isolation",
                   f'a {death} fault kills the engine process: set isolation = "process"')
    disk = next((f.kind for f in faults if f.kind in DISK_FAULTS), None)
    if disk is not None and not server.get("ssd_cache_dir"):
        ctx.report(("server",), "ssd_cache_dir",
                   f'a {disk} fault strikes the SSD tier: set ssd_cache_dir (e.g. "{TEMPORARY_DIR}")')


def _server(ctx: Context, data: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    if data is None:
        return ()
    # partial: the settings that are right still count (for the checks of faults' needs).
    table = decode(ctx, data, ("server",), ServerTable, partial=True)
    if table is None:
        return ()
    out = tuple((key, getattr(table, key)) for key in server_keys() if getattr(table, key) is not None)
    # Let RuntimeConfig's own validators speak (choices, positivity), sizes left out.
    plain = {k: v for k, v in out if not isinstance(v, ByteSize)}
    try:
        RuntimeConfig(**plain)
    except (ValueError, TypeError) as exc:
        ctx.report(("server",), None, f"invalid setting: {exc}")
    return out


def _workloads(ctx: Context, data: Any,
               defaults: dict[str, Any]) -> tuple[tuple[str, ...], list[Workload]]:
    """The [workload.NAME] tables, each over the [defaults] (already checked)."""
    if not isinstance(data, Mapping) or not data:
        ctx.report((), None if data is None else "workload",
                   "no workload: add at least one [workload.NAME] table")
        return (), []
    workloads = []
    for name, raw in data.items():
        table = decode(ctx, {**defaults, **raw} if isinstance(raw, Mapping) else raw,
                       ("workload", name), WorkloadTable)
        if table is not None:
            workloads.append(table.workload(name))
    return tuple(data), workloads


def _phases(ctx: Context, data: list[Any] | None, workloads: tuple[str, ...]) -> list[Phase]:
    if data is None:
        return [Phase(name="main", workloads=workloads)]
    phases = [p for i, raw in enumerate(data) for p in _phase(ctx, raw, ("phase", i), workloads)]
    names = [p.name for p in phases]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        ctx.report((), "phase", f"phase name {dup!r} is used more than once")
    return phases


def _phase(ctx: Context, data: Any, table: tuple, workloads: tuple[str, ...]) -> list[Phase]:
    # partial: a phase whose other keys are wrong still counts (faults and actions name it).
    t = decode(ctx, data, table, PhaseTable, partial=True)
    if t is None:
        return []
    chosen = as_tuple(t.workloads) or (() if t.workloads is not None else workloads)
    for w in chosen:
        if w not in workloads:
            ctx.report(table, "workloads",
                       f"no workload named {w!r}; defined: {', '.join(workloads) or 'none'}")
    expect = None
    if t.expect is not None:
        expect = decode(ctx, {**PHASE_EXPECTATIONS, **t.expect}, table + ("expect",), Expectations)
    name = t.name if t.name is not None else f"phase{table[-1] + 1}"
    levels = as_tuple(t.concurrency)
    if levels is None or len(levels) == 1:
        return [Phase(name=name, workloads=chosen, concurrency=levels[0] if levels else None,
                      restart_before=t.restart_before, expect=expect)]
    # A restart happens once, before the first level.
    return [
        Phase(name=f"{name}@c{level}", workloads=chosen, concurrency=level,
              restart_before=t.restart_before and i == 0, expect=expect)
        for i, level in enumerate(levels)
    ]


def _targets(phases: list[Phase], phase: str) -> list[str]:
    """The phases a fault or an action names: a swept phase ("sweep") is each of its levels."""
    return [p.name for p in phases if p.name == phase or p.name.split("@c")[0] == phase]


def _fault(ctx: Context, data: Any, table: tuple, phases: list[Phase], phase_names: set[str],
           first: str) -> list[Fault]:
    t = decode(ctx, data, table, FaultTable)
    if t is None:
        return []
    problem = t.problem(phase_names)
    if problem is not None:
        ctx.report(table, *problem)
        return []
    return [
        Fault(kind=t.kind, phase=target, at_step=t.at_step, after_s=t.after_s, above_bytes=t.above_bytes,
              error=t.error, writes=t.writes, after_writes=t.after_writes or 0, stall_s=t.stall_s or 0.0,
              model=t.model)
        for target in _targets(phases, t.phase or first)
    ]


def _action(ctx: Context, data: Any, table: tuple, phases: list[Phase], phase_names: set[str],
            first: str) -> list[Action]:
    t = decode(ctx, data, table, ActionTable)
    if t is None:
        return []
    if t.phase is not None and t.phase not in phase_names:
        ctx.report(table, "phase",
                   f"no phase named {t.phase!r}; phases: {', '.join(sorted(phase_names))}")
        return []
    return [Action(kind=t.kind, phase=target, at_s=as_tuple(t.at_s))
            for target in _targets(phases, t.phase or first)]
