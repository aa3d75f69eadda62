"""Scenario files: the TOML format, its typed form, and readable errors.

A scenario names a model and its server settings, a request trace (workloads of
conversations, grouped into phases), faults to inject, and the expectations that decide the
exit status. `load_scenario(path)` parses and validates a file and returns a `Scenario`, or
raises `ScenarioError` whose message lists every problem as `file:line: [table] key: what
was expected, what was found` (unknown keys are rejected, with a suggestion).

Pure: no trio, no MLX. `scenarios/README.md` documents the format with an example.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 only
    import tomli as tomllib

from omlx_actors.config import RuntimeConfig
from omlx_actors.replay.tables import REQUIRED, ByteSize, Context, Table, show

MODES = ("chat", "completion")
ARRIVALS = ("burst", "uniform", "poisson")
CACHE_HIT_TURNS = ("later", "all")
# Fault kinds: an engine step failing as an out-of-memory would; the engine process killed
# from outside (SIGKILL) and restarted by the front; the engine process aborting itself
# (SIGABRT, as MLX's uncaught C++ errors); the SSD tier's disk hanging in its writes, or
# full (ENOSPC), for a count of block writes (`writes`, after `after_writes`), never for a
# time window: a window can pass with no write in it on a loaded machine.
FAULTS = ("executor_oom", "process_restart", "engine_abort", "writer_stall", "disk_full")
# Those armed in the engine, to strike at a step (`Runtime.inject_fault`).
STEP_FAULTS = ("executor_oom", "engine_abort")
# Those that kill the engine process: the scenario's server needs isolation = "process".
ENGINE_DEATHS = ("process_restart", "engine_abort")
# Those at the SSD tier's disk (`Runtime.inject_disk_fault`): they need ssd_cache_dir.
DISK_FAULTS = {"writer_stall": "stall", "disk_full": "full"}
# Outcome names usable in min_outcomes / max_outcomes (besides HTTP status codes).
OUTCOMES = ("completed", "cancelled", "refused", "failed", "lost", "skipped")
# RuntimeConfig fields a scenario may not set: the model comes from [model] / --model.
_NOT_SERVER_KEYS = ("model", "demo_model", "model_cache_dir")
# [server] ssd_cache_dir = "<tmp>": a fresh temporary directory for the replay's runtime (the
# reference pass gets its own), kept across restarts, removed at the end.
TEMPORARY_DIR = "<tmp>"


class ScenarioError(ValueError):
    """A scenario file that cannot be used. `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------
# The typed form


@attrs.frozen(kw_only=True)
class RequestParams:
    """How each request of a workload is sent."""

    max_tokens: int = 16
    ignore_eos: bool = False
    stream: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # A JSON schema (as JSON text) the answer is constrained to: response_format json_schema
    # over HTTP, `structured=` in process. "" = free text.
    response_schema: str = ""

    @property
    def reproducible(self) -> bool:
        """Greedy, or seeded: the output is a function of the prompt alone."""
        return self.temperature == 0.0 or self.seed is not None


REQUEST_KEYS = tuple(a.name for a in attrs.fields(RequestParams))


@attrs.frozen(kw_only=True)
class CancelPlan:
    """Cancel `fraction` of a workload's requests (picked by the scenario's seed), each after
    a number of tokens or a number of seconds drawn from the range."""

    fraction: float
    after_tokens: tuple[int, int] | None = None
    after_s: tuple[float, float] | None = None


@attrs.frozen(kw_only=True)
class Workload:
    """A set of conversations with the same shape. A one-turn conversation is a single
    request. Turn k > 1 appends the previous answer (and, with tools, a tool call and its
    result) and a new user message to the conversation so far."""

    name: str
    mode: str = "chat"
    conversations: int = 1
    turns: int = 1
    system: str | None = None  # literal shared system prompt
    system_words: int = 0  # or one generated from the seed, shared by every conversation
    prompt_words: tuple[int, ...] = (20,)  # user message sizes, cycled over conversations
    prompt_tokens: tuple[int, ...] = ()  # completion mode: token-id prompts of these sizes
    tools: tuple[str, ...] = ()  # tool names; each gets a small JSON-schema definition
    tool_calls_in_history: bool = False
    tool_result_words: int = 30
    params: RequestParams = RequestParams()
    start_s: float = 0.0
    arrival: str = "burst"
    rate: float | None = None  # conversations started per second (uniform / poisson)
    concurrency: int | None = None  # requests of this workload in flight at once
    think_s: float = 0.0  # pause between a conversation's turns
    cancel: CancelPlan | None = None


@attrs.frozen(kw_only=True)
class Expectations:
    """What must hold for the replay to pass (each None/False: not checked)."""

    no_lost_requests: bool = True
    allowed_status: tuple[int, ...] | None = (200,)
    min_outcomes: tuple[tuple[str, int], ...] = ()
    max_outcomes: tuple[tuple[str, int], ...] = ()
    identical_to_reference: bool = False
    # A greedy choice whose top-2 logprobs are closer than this is a tie: batching noise may
    # order it either way, so outputs diverging there are reported but not a failure.
    tie_margin: float = 1e-4
    min_cache_hit_ratio: float | None = None
    cache_hit_turns: str = "later"
    ttft_p50_max_ratio: float | None = None
    ttft_p99_max_ratio: float | None = None
    itl_p50_max_ratio: float | None = None
    latency_floor_s: float = 0.005
    memory_under_budget: bool = False
    no_leaks: bool = False
    new_request_succeeds: bool = False
    error_message_contains: str | None = None
    ssd_no_orphans: bool = False
    # Every completed request with a response_schema ends `stop` with JSON that validates
    # against it (the `jsonschema` package, the `test` extra), or ends `length`.
    schema_valid: bool = False

    @property
    def needs_reference(self) -> bool:
        return bool(self.identical_to_reference or self.ttft_p50_max_ratio
                    or self.ttft_p99_max_ratio or self.itl_p50_max_ratio)


@attrs.frozen(kw_only=True)
class Phase:
    """Workloads run together; phases run one after another (a list of concurrency levels
    in the file expands to one phase per level, named `NAME@cN`)."""

    name: str
    workloads: tuple[str, ...]
    concurrency: int | None = None  # overrides every workload's concurrency
    # Stop the runtime (drain) and start it again with the same settings before this phase:
    # the in-memory prefix cache is gone, an SSD tier ([server] ssd_cache_dir) is not.
    restart_before: bool = False
    expect: Expectations | None = None


@attrs.frozen(kw_only=True)
class Fault:
    kind: str
    phase: str
    at_step: int | None = None  # engine steps after the phase started
    after_s: float | None = None  # seconds after the phase started (the next step fails)
    above_bytes: ByteSize | None = None  # the first step above this active memory fails
    error: str = "injected out-of-memory"
    writes: int | None = None  # block writes a disk fault strikes
    after_writes: int = 0  # block writes it lets through first (counted from its arming)
    stall_s: float = 0.0  # how long each write struck by a writer_stall hangs


# What a scenario can do to a running server besides sending requests (needs the engine).
ACTIONS = ("ssd_cleanup",)


@attrs.frozen(kw_only=True)
class Action:
    """`ssd_cleanup`: `Runtime.cleanup_ssd_cache()` (remove every block file of the SSD tier,
    acknowledged by the writer) at each of `at_s` seconds after the phase started."""

    kind: str
    phase: str
    at_s: tuple[float, ...]


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    path: Path | None
    description: str = ""
    seed: int = 0
    model: str = "tiny-llama"  # a demo model name or a model directory / repo id
    server: tuple[tuple[str, Any], ...] = ()  # RuntimeConfig overrides (sizes as ByteSize)
    workloads: tuple[Workload, ...] = ()
    phases: tuple[Phase, ...] = ()
    faults: tuple[Fault, ...] = ()
    actions: tuple[Action, ...] = ()
    expect: Expectations = Expectations()
    request_timeout_s: float = 60.0
    timeout_s: float = 600.0

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    @property
    def needs_reference(self) -> bool:
        return self.expect.needs_reference or any(
            p.expect is not None and p.expect.needs_reference for p in self.phases
        )

    @property
    def compares_outputs(self) -> bool:
        return self.expect.identical_to_reference or any(
            p.expect is not None and p.expect.identical_to_reference for p in self.phases
        )

    @property
    def restarts(self) -> bool:
        return any(p.restart_before for p in self.phases)


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
# Sections


def _build(ctx: Context, data: dict, path: Path | None) -> Scenario | None:
    root = Table(ctx, data, ())
    head_data = root.get("scenario", REQUIRED)
    head = Table(ctx, {} if head_data is REQUIRED else head_data, ("scenario",))
    name = head.str("name")
    description = head.str("description", "")
    seed = head.int("seed", 0, minimum=0)
    request_timeout_s = head.float("request_timeout_s", 60.0, positive=True)
    timeout_s = head.float("timeout_s", 600.0, positive=True)
    head.finish()

    model = "tiny-llama"
    model_table = root.sub("model")
    if model_table is not None:
        model = model_table.str("name", "tiny-llama")
        model_table.finish()

    server = _server(ctx, root.sub("server"))

    defaults: dict[str, Any] = {}
    defaults_table = root.sub("defaults")
    if defaults_table is not None:
        defaults = _request_params(defaults_table, {})
        defaults_table.finish()

    workloads: list[Workload] = []
    root.known.append("workload")
    workload_data = data.get("workload")
    names: tuple[str, ...] = ()
    if not isinstance(workload_data, Mapping) or not workload_data:
        ctx.report((), None if workload_data is None else "workload",
                   "no workload: add at least one [workload.NAME] table")
    else:
        names = tuple(workload_data)
        for wname, wdata in workload_data.items():
            w = _workload(Table(ctx, wdata, ("workload", wname)), wname, defaults)
            if w is not None:
                workloads.append(w)

    expect = Expectations()
    expect_table = root.sub("expect")
    if expect_table is not None:
        expect = _expectations(expect_table)

    phases: list[Phase] = []
    phase_data = root.get("phase", None)
    if phase_data is None:
        phases.append(Phase(name="main", workloads=names))
    elif not isinstance(phase_data, list):
        ctx.report((), "phase", "expected [[phase]] tables (an array of tables)")
    else:
        for i, pdata in enumerate(phase_data):
            phases.extend(_phases(Table(ctx, pdata, ("phase", i)), names, i))
    phase_names = [p.name for p in phases]
    for dup in sorted({n for n in phase_names if phase_names.count(n) > 1}):
        ctx.report((), "phase", f"phase name {dup!r} is used more than once")

    faults: list[Fault] = []
    fault_data = root.get("fault", None)
    if fault_data is not None:
        if not isinstance(fault_data, list):
            ctx.report((), "fault", "expected [[fault]] tables (an array of tables)")
        else:
            base_names = {p.name.split("@c")[0] for p in phases} | set(phase_names)
            for i, fdata in enumerate(fault_data):
                f = _fault(Table(ctx, fdata, ("fault", i)), phases, base_names)
                if f is not None:
                    faults.extend(f)
    actions: list[Action] = []
    action_data = root.get("action", None)
    if action_data is not None:
        if not isinstance(action_data, list):
            ctx.report((), "action", "expected [[action]] tables (an array of tables)")
        else:
            base_names = {p.name.split("@c")[0] for p in phases} | set(phase_names)
            for i, adata in enumerate(action_data):
                actions.extend(_action(Table(ctx, adata, ("action", i)), phases, base_names))
    if any(f.kind in ENGINE_DEATHS for f in faults) and dict(server).get("isolation") != "process":
        kind = next(f.kind for f in faults if f.kind in ENGINE_DEATHS)
        ctx.report(("server",), "isolation",
                   f'a {kind} fault kills the engine process: set isolation = "process"')
    if any(f.kind in DISK_FAULTS for f in faults) and not dict(server).get("ssd_cache_dir"):
        kind = next(f.kind for f in faults if f.kind in DISK_FAULTS)
        ctx.report(("server",), "ssd_cache_dir",
                   f'a {kind} fault strikes the SSD tier: set ssd_cache_dir (e.g. "{TEMPORARY_DIR}")')
    root.finish()
    if ctx.problems or name is None:
        return None
    return Scenario(
        name=name, path=path, description=description, seed=seed, model=model,
        server=server, workloads=tuple(workloads), phases=tuple(phases), faults=tuple(faults),
        actions=tuple(actions), expect=expect, request_timeout_s=request_timeout_s,
        timeout_s=timeout_s,
    )


def server_keys() -> dict[str, str]:
    """RuntimeConfig fields a scenario's [server] table may set → their annotation."""
    return {
        a.name: str(a.type)
        for a in attrs.fields(RuntimeConfig)
        if a.name not in _NOT_SERVER_KEYS
    }


def _server(ctx: Context, t: Table | None) -> tuple[tuple[str, Any], ...]:
    if t is None:
        return ()
    out: list[tuple[str, Any]] = []
    for key, annotation in server_keys().items():
        if not t.has(key):
            t.known.append(key)
            continue
        if key.endswith("_bytes"):
            value = t.size(key)
        elif "bool" in annotation:
            value = t.bool(key)
        elif "int" in annotation:
            value = t.int(key)
        elif "float" in annotation:
            value = t.float(key, positive=True)
        else:  # str, Path (a directory "<tmp>": a fresh temporary one for each runtime)
            value = t.str(key)
        if value is not None:
            out.append((key, value))
    t.finish()
    # Let RuntimeConfig's own validators speak (choices, positivity), sizes left out.
    plain = {k: v for k, v in out if not isinstance(v, ByteSize)}
    try:
        RuntimeConfig(**plain)
    except (ValueError, TypeError) as exc:
        ctx.report(("server",), None, f"invalid setting: {exc}")
    return tuple(out)


def _request_params(t: Table, base: dict[str, Any]) -> dict[str, Any]:
    """The request keys present in `t`, over `base`."""
    out = dict(base)
    getters = {
        "max_tokens": lambda: t.int("max_tokens", minimum=1),
        "ignore_eos": lambda: t.bool("ignore_eos"),
        "stream": lambda: t.bool("stream"),
        "temperature": lambda: t.float("temperature", minimum=0.0, maximum=100.0),
        "top_p": lambda: t.float("top_p", minimum=0.0, maximum=1.0),
        "seed": lambda: t.int("seed", minimum=0),
        "stop": lambda: t.strs("stop", None),
        "response_schema": lambda: _json_object_text(t, "response_schema"),
    }
    for key in REQUEST_KEYS:
        if t.has(key):
            value = getters[key]()
            if value is not None:
                out[key] = value
        else:
            t.known.append(key)
    return out


def _json_object_text(t: Table, key: str) -> str | None:
    """A JSON object given as JSON text, kept as text (RequestParams is hashable)."""
    import json

    text = t.str(key, None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        t.bad(key, f"not JSON: {exc}")
        return None
    if not isinstance(value, dict):
        t.bad(key, "must be a JSON object (a JSON schema)")
        return None
    return text


def _workload(t: Table, name: str, defaults: dict[str, Any]) -> Workload | None:
    problems = len(t.ctx.problems)
    mode = t.str("mode", "chat", choices=MODES)
    conversations = t.int("conversations", 1, minimum=1)
    turns = t.int("turns", 1, minimum=1)
    system = t.str("system", None)
    system_words = t.int("system_words", 0, minimum=0)
    prompt_words = t.ints("prompt_words", None, minimum=1)
    prompt_tokens = t.ints("prompt_tokens", None, minimum=1)
    tools = t.strs("tools", ())
    tool_calls_in_history = t.bool("tool_calls_in_history", False)
    tool_result_words = t.int("tool_result_words", 30, minimum=1)
    start_s = t.float("start_s", 0.0, minimum=0.0)
    arrival = t.str("arrival", None, choices=ARRIVALS)
    rate = t.float("rate", None, positive=True)
    concurrency = t.int("concurrency", None, minimum=1)
    think_s = t.float("think_s", 0.0, minimum=0.0)
    cancel_fraction = t.float("cancel_fraction", None, minimum=0.0, maximum=1.0)
    cancel_tokens = t.range("cancel_after_tokens", int, 1)
    cancel_s = t.range("cancel_after_s", float, 0.0)
    params = RequestParams(**_request_params(t, defaults))
    t.finish()
    if len(t.ctx.problems) > problems:
        return None
    if system is not None and system_words:
        t.bad("system_words", "give either system (a literal prompt) or system_words, not both")
    if prompt_tokens is not None:
        if mode != "completion":
            t.bad("prompt_tokens", 'token-id prompts need mode = "completion"')
        if prompt_words is not None:
            t.bad("prompt_tokens", "give either prompt_words or prompt_tokens, not both")
        if turns != 1:
            t.bad("prompt_tokens", "token-id prompts are single-turn (turns = 1)")
        if system is not None or system_words:
            t.bad("prompt_tokens", "token-id prompts have no system prompt")
    if (tools or tool_calls_in_history) and mode != "chat":
        t.bad("tools", 'tools need mode = "chat"')
    if tool_calls_in_history and not tools:
        t.bad("tool_calls_in_history", "needs at least one tool in tools")
    if rate is not None and arrival == "burst":
        t.bad("rate", 'a rate needs arrival = "uniform" or "poisson"')
    if rate is None and arrival in ("uniform", "poisson"):
        t.bad("arrival", f"arrival = {arrival!r} needs a rate (conversations per second)")
    cancel = None
    if cancel_tokens is not None and cancel_s is not None:
        t.bad("cancel_after_s", "give either cancel_after_tokens or cancel_after_s, not both")
    elif cancel_tokens is not None or cancel_s is not None:
        if cancel_tokens is not None and not params.stream:
            t.bad("cancel_after_tokens", "cancelling after N tokens needs stream = true")
        cancel = CancelPlan(fraction=1.0 if cancel_fraction is None else cancel_fraction,
                            after_tokens=cancel_tokens, after_s=cancel_s)
    elif cancel_fraction is not None:
        t.bad("cancel_fraction", "needs cancel_after_tokens or cancel_after_s")
    if len(t.ctx.problems) > problems:
        return None
    return Workload(
        name=name, mode=mode, conversations=conversations, turns=turns, system=system,
        system_words=system_words,
        prompt_words=() if prompt_tokens is not None else (prompt_words or (20,)),
        prompt_tokens=prompt_tokens or (), tools=tools, tool_calls_in_history=tool_calls_in_history,
        tool_result_words=tool_result_words, params=params, start_s=start_s,
        arrival=arrival or ("burst" if rate is None else "uniform"), rate=rate,
        concurrency=concurrency, think_s=think_s, cancel=cancel,
    )


def _outcome_counts(t: Table, key: str) -> tuple[tuple[str, int], ...]:
    value = t.get(key, None)
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        t.bad(key, f"expected a table like {{ completed = 5, \"413\" = 1 }}, got {show(value)}")
        return ()
    out = []
    for name, count in value.items():
        if name not in OUTCOMES and not re.fullmatch(r"[1-5]\d\d", name):
            t.bad(key, f"unknown outcome {name!r}: expected one of {', '.join(OUTCOMES)} "
                       "or an HTTP status code like \"413\"")
        elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
            t.bad(key, f"{name}: expected a count >= 0, got {show(count)}")
        else:
            out.append((name, count))
    return tuple(out)


def _expectations(t: Table, *, phase: bool = False) -> Expectations:
    """[expect], or a phase's (which checks only what it names: the run-wide defaults
    no_lost_requests and allowed_status already cover every phase)."""
    allowed = t.ints("allowed_status", None if phase else (200,), minimum=100)
    e = Expectations(
        no_lost_requests=t.bool("no_lost_requests", not phase),
        allowed_status=allowed,
        min_outcomes=_outcome_counts(t, "min_outcomes"),
        max_outcomes=_outcome_counts(t, "max_outcomes"),
        identical_to_reference=t.bool("identical_to_reference", False),
        tie_margin=t.float("tie_margin", 1e-4, minimum=0.0),
        min_cache_hit_ratio=t.float("min_cache_hit_ratio", None, minimum=0.0, maximum=1.0),
        cache_hit_turns=t.str("cache_hit_turns", "later", choices=CACHE_HIT_TURNS),
        ttft_p50_max_ratio=t.float("ttft_p50_max_ratio", None, positive=True),
        ttft_p99_max_ratio=t.float("ttft_p99_max_ratio", None, positive=True),
        itl_p50_max_ratio=t.float("itl_p50_max_ratio", None, positive=True),
        latency_floor_s=t.float("latency_floor_s", 0.005, minimum=0.0),
        memory_under_budget=t.bool("memory_under_budget", False),
        no_leaks=t.bool("no_leaks", False),
        new_request_succeeds=t.bool("new_request_succeeds", False),
        error_message_contains=t.str("error_message_contains", None),
        ssd_no_orphans=t.bool("ssd_no_orphans", False),
        schema_valid=t.bool("schema_valid", False),
    )
    t.finish()
    return e


def _phases(t: Table, workloads: tuple[str, ...], index: int) -> list[Phase]:
    name = t.str("name", f"phase{index + 1}")
    chosen = t.strs("workloads", workloads)
    for w in chosen or ():
        if w not in workloads:
            t.bad("workloads", f"no workload named {w!r}; defined: {', '.join(workloads) or 'none'}")
    levels = t.ints("concurrency", None, minimum=1)
    restart = t.bool("restart_before", False)
    expect = None
    sub = t.sub("expect")
    if sub is not None:
        expect = _expectations(sub, phase=True)
    t.finish()
    if name is None:
        return []
    common = dict(workloads=tuple(chosen or ()), expect=expect)
    if levels is None or len(levels) == 1:
        return [Phase(name=name, concurrency=levels[0] if levels else None,
                      restart_before=restart, **common)]
    # A restart happens once, before the first level.
    return [
        Phase(name=f"{name}@c{level}", concurrency=level, restart_before=restart and i == 0, **common)
        for i, level in enumerate(levels)
    ]


def _fault(t: Table, phases: list[Phase], phase_names: set[str]) -> list[Fault] | None:
    kind = t.str("kind", choices=FAULTS)
    phase = t.str("phase", phases[0].name if phases else "main")
    at_step = t.int("at_step", None, minimum=1)
    after_s = t.float("after_s", None, minimum=0.0)
    above = t.size("above_bytes")
    error = t.str("error", "injected out-of-memory")
    disk_keys = ("writes", "after_writes", "stall_s")
    writes = t.int("writes", None, minimum=1)
    after_writes = t.int("after_writes", 0, minimum=0)
    stall_s = t.float("stall_s", 0.0, positive=True)
    timed = t.get("duration_s", None) is not None  # the old form, refused with its fix
    t.finish()
    if timed:
        t.bad("duration_s", "disk faults strike by count, not for a time: use writes (and "
                            "after_writes, stall_s)")
        return None
    if phase is not None and phase not in phase_names:
        t.bad("phase", f"no phase named {phase!r}; phases: {', '.join(sorted(phase_names))}")
        return None
    if kind in STEP_FAULTS and sum(
            x is not None for x in (at_step, after_s, above)) != 1:
        t.bad("kind", f"an {kind} fault needs exactly one of at_step, after_s, above_bytes")
        return None
    if kind in ("process_restart", *DISK_FAULTS) and (
            above is not None or (at_step is None) == (after_s is None)):
        t.bad("kind", f"a {kind} fault needs exactly one of at_step, after_s")
        return None
    if kind is not None and kind not in DISK_FAULTS:
        for key in disk_keys:
            if t.has(key):
                t.bad(key, f"only disk faults (writer_stall, disk_full) take {key}, not {kind}")
                return None
    if kind in DISK_FAULTS and writes is None:
        if not t.has("writes"):  # else its value was reported as bad
            t.bad("kind", f"a {kind} fault needs writes (how many block writes it strikes)")
        return None
    if kind == "writer_stall" and not t.has("stall_s"):
        t.bad("kind", "a writer_stall fault needs stall_s (how long each struck write hangs)")
        return None
    if kind == "disk_full" and t.has("stall_s"):
        t.bad("stall_s", "a disk_full write fails at once: stall_s is only for writer_stall")
        return None
    if kind is None or phase is None:
        return None
    # A fault on a swept phase ("sweep") strikes in each of its levels.
    targets = [p.name for p in phases if p.name == phase or p.name.split("@c")[0] == phase]
    return [
        Fault(kind=kind, phase=target, at_step=at_step, after_s=after_s, above_bytes=above,
              error=error, writes=writes, after_writes=after_writes, stall_s=stall_s)
        for target in targets
    ]


def _action(t: Table, phases: list[Phase], phase_names: set[str]) -> list[Action]:
    kind = t.str("kind", choices=ACTIONS)
    phase = t.str("phase", phases[0].name if phases else "main")
    value = t.get("at_s", REQUIRED)
    t.finish()
    at_s: tuple[float, ...] | None = None
    if value is not REQUIRED:
        items = value if isinstance(value, list) else [value]
        if items and all(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0
                         for v in items):
            at_s = tuple(float(v) for v in items)
        else:
            t.bad("at_s", f"expected seconds >= 0 or an array of them, got {show(value)}")
    if phase is not None and phase not in phase_names:
        t.bad("phase", f"no phase named {phase!r}; phases: {', '.join(sorted(phase_names))}")
        return []
    if kind is None or phase is None or at_s is None:
        return []
    targets = [p.name for p in phases if p.name == phase or p.name.split("@c")[0] == phase]
    return [Action(kind=kind, phase=target, at_s=at_s) for target in targets]
