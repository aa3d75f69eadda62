"""What a scenario is, typed: a model and its server settings, a request trace (workloads of
conversations, grouped into phases), faults to inject, and the expectations that decide the
exit status. `schema` reads a file into these; `RequestParams` and `Expectations` are
read directly (msgspec structs), the others are built from the file's tables.

Pure: no trio, no MLX.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import attrs
from msgspec import Meta
from msgspec.structs import force_setattr

from omlx_actors.replay.tables import ByteSize, Table, show

Mode = Literal["chat", "completion"]
Arrival = Literal["burst", "uniform", "poisson"]
CacheHitTurns = Literal["later", "all"]
MODES, ARRIVALS, CACHE_HIT_TURNS = get_args(Mode), get_args(Arrival), get_args(CacheHitTurns)
# Fault kinds: an engine step failing as an out-of-memory would; the engine process killed
# from outside (SIGKILL) and restarted by the front; the engine process aborting itself
# (SIGABRT, as MLX's uncaught C++ errors); the SSD tier's disk hanging in its writes, or
# full (ENOSPC), for a count of block writes (`writes`, after `after_writes`), never for a
# time window: a window can pass with no write in it on a loaded machine.
FaultKind = Literal["executor_oom", "process_restart", "engine_abort", "writer_stall", "disk_full"]
FAULTS = get_args(FaultKind)
# Those armed in the engine, to strike at a step (`Runtime.inject_fault`).
STEP_FAULTS = ("executor_oom", "engine_abort")
# Those that kill the engine process: the scenario's server needs isolation = "process".
ENGINE_DEATHS = ("process_restart", "engine_abort")
# Those at the SSD tier's disk (`Runtime.inject_disk_fault`): they need ssd_cache_dir.
DISK_FAULTS = {"writer_stall": "stall", "disk_full": "full"}
# Outcome names usable in min_outcomes / max_outcomes (besides HTTP status codes).
OUTCOMES = ("completed", "cancelled", "refused", "failed", "lost", "skipped")
# [server] ssd_cache_dir = "<tmp>": a fresh temporary directory for the replay's runtime (the
# reference pass gets its own), kept across restarts, removed at the end.
TEMPORARY_DIR = "<tmp>"


# The types of the file's values: msgspec checks the bounds (Meta), `tables.describe` words
# them in an error (or a Meta description does).

Count = Annotated[int, Meta(ge=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]
Positive = Annotated[float, Meta(gt=0)]
Seconds = Annotated[float, Meta(ge=0.0)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
Word = Annotated[str, Meta(min_length=1)]
Words = Annotated[Word | list[Word], Meta(description="a string or an array of non-empty strings")]
Sizes = Annotated[AtLeastOne | Annotated[list[AtLeastOne], Meta(min_length=1)],
                  Meta(description="an integer >= 1 or a non-empty array of them")]
Status = Annotated[int, Meta(ge=100)]
Statuses = Annotated[Status | Annotated[list[Status], Meta(min_length=1)],
                     Meta(description="an integer >= 100 or a non-empty array of them")]
TokenRange = Annotated[AtLeastOne | Annotated[list[AtLeastOne], Meta(min_length=2, max_length=2)],
                       Meta(description="an integer >= 1 or [low, high] with low <= high")]
SecondsRange = Annotated[Seconds | Annotated[list[Seconds], Meta(min_length=2, max_length=2)],
                         Meta(description="a number >= 0.0 or [low, high] with low <= high")]
Moments = Annotated[Seconds | Annotated[list[Seconds], Meta(min_length=1)],
                    Meta(description="seconds >= 0 or an array of them")]
# Checked in Expectations.problems: msgspec's error path would not name the outcome.
OutcomeCounts = Annotated[dict[str, Any], Meta(description='a table like { completed = 5, "413" = 1 }')]


def as_tuple(value: Any) -> tuple | None:
    """One value or an array of them → a tuple (None stays None: not given)."""
    return None if value is None else tuple(value) if isinstance(value, (list, tuple)) else (value,)


def as_range(value: Any) -> tuple | None:
    """A number or [low, high] → (low, high)."""
    return None if value is None else tuple(value) if isinstance(value, list) else (value, value)


class RequestParams(Table, frozen=True):
    """How each request of a workload is sent: the [defaults] table, and a workload's
    request keys over it."""

    max_tokens: AtLeastOne = 16
    ignore_eos: bool = False
    stream: bool = True
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Fraction = 1.0
    seed: Count | None = None
    stop: Words = ()  # one string or an array → a tuple
    # A JSON schema (as JSON text, so that RequestParams is hashable) the answer is
    # constrained to: response_format json_schema over HTTP, `structured=` in process.
    # "" = free text.
    response_schema: Annotated[str, Meta(min_length=1)] = ""

    def __post_init__(self) -> None:
        force_setattr(self, "stop", as_tuple(self.stop))

    def problems(self) -> Iterator[tuple[str, str]]:
        if not self.response_schema:
            return
        try:
            value = json.loads(self.response_schema)
        except ValueError as exc:
            yield "response_schema", f"not JSON: {exc}"
            return
        if not isinstance(value, dict):
            yield "response_schema", "must be a JSON object (a JSON schema)"

    @property
    def reproducible(self) -> bool:
        """Greedy, or seeded: the output is a function of the prompt alone."""
        return self.temperature == 0.0 or self.seed is not None


REQUEST_KEYS = RequestParams.__struct_fields__


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
    params: RequestParams = attrs.field(factory=RequestParams)
    start_s: float = 0.0
    arrival: str = "burst"
    rate: float | None = None  # conversations started per second (uniform / poisson)
    concurrency: int | None = None  # requests of this workload in flight at once
    think_s: float = 0.0  # pause between a conversation's turns
    cancel: CancelPlan | None = None
    model: str | None = None  # one of the scenario's pool models; None: the [model] one


class Expectations(Table, frozen=True):
    """What must hold for the replay to pass (each None/False: not checked): [expect], or a
    phase's (read over `PHASE_EXPECTATIONS`)."""

    no_lost_requests: bool = True
    allowed_status: Statuses | None = (200,)  # one or an array → a tuple
    min_outcomes: OutcomeCounts = ()  # a table → ((name, count), ...)
    max_outcomes: OutcomeCounts = ()
    identical_to_reference: bool = False
    # A greedy choice whose top-2 logprobs are closer than this is a tie: batching noise may
    # order it either way, so outputs diverging there are reported but not a failure.
    tie_margin: Seconds = 1e-4
    min_cache_hit_ratio: Fraction | None = None
    cache_hit_turns: CacheHitTurns = "later"
    ttft_p50_max_ratio: Positive | None = None
    ttft_p99_max_ratio: Positive | None = None
    itl_p50_max_ratio: Positive | None = None
    latency_floor_s: Seconds = 0.005
    memory_under_budget: bool = False
    no_leaks: bool = False
    new_request_succeeds: bool = False
    error_message_contains: str | None = None
    ssd_no_orphans: bool = False
    # Every completed request with a response_schema ends `stop` with JSON that validates
    # against it (the `jsonschema` package, the `test` extra), or ends `length`.
    schema_valid: bool = False
    # A model pool ([model] pool): at least this many model loads / evictions over the run.
    min_pool_loads: Count | None = None
    min_pool_evictions: Count | None = None

    def __post_init__(self) -> None:
        force_setattr(self, "allowed_status", as_tuple(self.allowed_status))
        for key in ("min_outcomes", "max_outcomes"):
            value = getattr(self, key)
            force_setattr(self, key, tuple(value.items() if isinstance(value, dict) else value))

    def problems(self) -> Iterator[tuple[str, str]]:
        for key in ("min_outcomes", "max_outcomes"):
            for name, count in getattr(self, key):
                if name not in OUTCOMES and not re.fullmatch(r"[1-5]\d\d", name):
                    yield key, (f"unknown outcome {name!r}: expected one of {', '.join(OUTCOMES)} "
                                "or an HTTP status code like \"413\"")
                elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    yield key, f"{name}: expected a count >= 0, got {show(count)}"

    @property
    def needs_reference(self) -> bool:
        return bool(self.identical_to_reference or self.ttft_p50_max_ratio
                    or self.ttft_p99_max_ratio or self.itl_p50_max_ratio)


# A phase's expectations check only what they name: the run-wide defaults no_lost_requests
# and allowed_status already cover every phase.
PHASE_EXPECTATIONS = {"no_lost_requests": False, "allowed_status": None}


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
    model: str | None = None  # a model pool's model whose engine it strikes (None: [model]'s)


# What a scenario can do to a running server besides sending requests (needs the engine).
ActionKind = Literal["ssd_cleanup"]
ACTIONS = get_args(ActionKind)


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
    # More models served beside `model` as one model pool (`omlx_actors.pool`), and how many
    # of them (the largest) its memory budget holds (None: the machine's budget).
    pool: tuple[str, ...] = ()
    pool_holds: int | None = None
    server: tuple[tuple[str, Any], ...] = ()  # RuntimeConfig overrides (sizes as ByteSize)
    workloads: tuple[Workload, ...] = ()
    phases: tuple[Phase, ...] = ()
    faults: tuple[Fault, ...] = ()
    actions: tuple[Action, ...] = ()
    expect: Expectations = attrs.field(factory=Expectations)
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


