"""The engine's wire: what the front sends the executor, and what the executor sends back.

Everything here is plain data (ints, floats, strings, tuples, enums, nested frozen attrs
classes) so the engine can move into its own process without its callers changing: no
callbacks, no channels, no MLX arrays. `omlx_actors.kernel.wire` round-trips every type
below (see tests/engine/test_messages.py).

Commands (front → executor inbox):  Submit, Abort, Ping, EngineStatsQuery, InjectFault
Events (executor → front dispatcher): Admitted, PrefillProgress, TokenDelta, Finished
Refusals (error replies to Submit): DuplicateRequest, MemoryRefused, AdmissionQueueFull
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Union

import attrs

from omlx_actors.kernel.errors import ActorError
from omlx_actors.ssd.blockfile import TensorData

# ---------------------------------------------------------------------------------------
# Request parameters


def _bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((int(token), float(bias)) for token, bias in items)


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to pick each next token. The defaults are greedy decoding.

    `seed` makes a sampled request reproducible on its own, independent of its batch mates.
    `logit_bias` is a tuple of (token id, bias) pairs so the value stays hashable; a
    mapping (as the in-process API's callers write it) is converted to one.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = attrs.field(default=(), converter=_bias_pairs)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_logits_processors(self) -> bool:
        return bool(
            self.logit_bias
            or self.repetition_penalty
            or self.presence_penalty
            or self.frequency_penalty
        )


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token (EOS) or, decided by the session, a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the front aborted it (client gone, stop string, shutdown)
    ERROR = "error"  # the engine failed it; `Finished.error` says why


# ---------------------------------------------------------------------------------------
# Commands


@attrs.frozen(kw_only=True)
class Submit:
    """Admit a request. `prompt_tokens` must be non-empty; `stop_token_ids` end it with
    reason STOP (the token that stopped it is delivered, so the session can see it)."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] = ()
    # Prefix blocks the cache index matched and pinned for this request (a hash chain from
    # the start of the prompt); the engine restores them instead of prefilling.
    cached_blocks: tuple[str, ...] = ()
    # The SSD tier files this request's new blocks under this scope ("" = shared), so
    # a cleanup of the scope removes them.
    cache_scope: str = ""
    # Constrained decoding: an llguidance grammar string ("" = none), built and validated on
    # the front (`omlx_actors.front.structured`); the engine keeps one matcher per request. The
    # last `grammar_replay` prompt tokens are output already generated under it (a
    # continuation's delivered tokens): the fresh matcher consumes them first.
    grammar: str = ""
    grammar_replay: int = 0


@attrs.frozen(kw_only=True)
class Abort:
    """Remove a request from the batch. Tokens of the step in flight are not delivered for
    it; a `Finished(reason=ABORT)` follows once the MLX thread has removed it."""

    request_id: str


@attrs.frozen(kw_only=True)
class Ping:
    """Liveness probe; answered by the executor's trio side without waiting for MLX."""


@attrs.frozen(kw_only=True)
class EngineStatsQuery:
    """Ask for an `EngineStats` snapshot."""


class FaultKind(enum.Enum):
    OOM = "oom"  # the step raises MemoryError: its requests fail, the engine goes on
    ABORT = "abort"  # the engine process aborts (SIGABRT), as MLX's uncaught C++ errors do


@attrs.frozen(kw_only=True)
class InjectFault:
    """Fault injection (tests, scenarios; off unless sent) at the next step, the step
    numbered `at_step`, the first step that starts with MLX's active memory above
    `above_bytes`, or the first step while a request whose prompt holds `prompt_token` is
    in the engine. `OOM`: the step raises `MemoryError(error)`, failing the requests in it
    as an out-of-memory would. `ABORT`: the process aborts - only survivable with the
    engine in its own process. `sticky`: the front re-sends it to every new engine process
    (a request that crashes every engine)."""

    error: str = "injected out-of-memory"
    at_step: int | None = None
    above_bytes: int | None = None
    kind: FaultKind = FaultKind.OOM
    prompt_token: int | None = None
    sticky: bool = False


@attrs.frozen(kw_only=True)
class RestoredBlock:
    """A prefix block read back from the SSD tier: its tensors as plain data."""

    hash: str
    parent: str | None
    tensors: tuple[TensorData, ...]


@attrs.frozen(kw_only=True)
class RestoreBlocks:
    """Put blocks loaded from the SSD tier back into the engine's block store (a call: the
    reply, the hashes now in the store, comes once the index has been told about them)."""

    blocks: tuple[RestoredBlock, ...]


EngineCommand = Union[Submit, Abort, Ping, EngineStatsQuery, InjectFault, RestoreBlocks]

# ---------------------------------------------------------------------------------------
# Replies


@attrs.frozen(kw_only=True)
class Pong:
    """`steps` counts completed engine steps; `last_step_age` is seconds since the last one
    finished (None before the first). With `running > 0`, a growing age means the engine is
    stuck even though the web server answers."""

    steps: int
    last_step_age: float | None
    running: int
    waiting: int


@attrs.frozen(kw_only=True)
class EngineStats:
    steps: int
    running: int
    waiting: int
    prompt_tokens_processed: int
    generation_tokens: int
    buffer_cache_clears: int
    active_memory_bytes: int
    cache_memory_bytes: int
    peak_memory_bytes: int
    prefix_cache_bytes: int = 0  # block tensors held by the engine for the prefix cache
    ssd_saves_dropped: int = 0  # blocks not handed to the SSD tier because it was behind
    prefill_passes: int = 0  # steps that ran a prompt chunk


@attrs.frozen(kw_only=True)
class EngineInfo:
    """What the executor reports once its model is loaded (the readiness handshake value)."""

    model_path: str
    model_type: str
    vocab_size: int
    max_context: int | None
    eos_token_ids: tuple[int, ...]
    device: str
    cache_layout: tuple[str, ...] = ()
    cache_namespace: str | None = None  # None: the prefix cache is off for this model
    block_size: int = 0
    weights_bytes: int = 0
    # The model's memory facts as a config dict the estimator reads (None: unknown layout,
    # so requests are not priced and only the queue bound applies).
    memory_config: tuple[tuple[str, str], ...] | None = None


# ---------------------------------------------------------------------------------------
# Refusals: the executor's error replies to a `Submit`. They cross the process boundary as
# values (`kernel.wire` rebuilds them by class name), and the front maps each to its
# `omlx_actors.refusals` type, so they live with the wire, not with the executor.


class DuplicateRequest(ActorError):
    """A `Submit` reused the id of a request that is still running."""


class MemoryRefused(ActorError):
    """The request can never fit the memory budget (refused before any work)."""

    wire_fields = ("actor", "message", "needed_bytes", "available_bytes")

    def __init__(self, actor: str, message: str = "", needed_bytes: int = 0,
                 available_bytes: int = 0) -> None:
        super().__init__(actor, message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class AdmissionQueueFull(ActorError):
    """Too many requests already wait for memory."""


# ---------------------------------------------------------------------------------------
# Events


@attrs.frozen(kw_only=True)
class Admitted:
    """The request entered the MLX thread's batch (prefill may still be pending)."""

    request_id: str
    queued_s: float  # from Submit received to admission on the MLX thread


@attrs.frozen(kw_only=True)
class PrefillProgress:
    """A prefill chunk of this request finished: `done` of `total` prompt tokens."""

    request_id: str
    done: int
    total: int


@attrs.frozen(kw_only=True)
class TokenLogprob:
    token: int
    logprob: float


@attrs.frozen(kw_only=True)
class TokenChoice:
    """One generated token with, when asked, its logprob and the top alternatives."""

    token: int
    logprob: float | None = None
    top: tuple[TokenLogprob, ...] = ()


@attrs.frozen(kw_only=True)
class TokenDelta:
    """New tokens for one request from one engine step (usually exactly one)."""

    request_id: str
    tokens: tuple[TokenChoice, ...]
    step: int


@attrs.frozen(kw_only=True)
class Finished:
    """The last event of a request. `completion_tokens` counts every token delivered;
    `step` is the engine step at which the request left the batch."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    step: int = 0
    cached_tokens: int = 0
    error: str | None = None
    error_type: str | None = None


EngineEvent = Union[Admitted, PrefillProgress, TokenDelta, Finished]

ALL_MESSAGE_TYPES = (
    SamplingParams,
    Submit,
    Abort,
    Ping,
    EngineStatsQuery,
    InjectFault,
    Pong,
    EngineStats,
    EngineInfo,
    Admitted,
    PrefillProgress,
    TokenLogprob,
    TokenChoice,
    TokenDelta,
    Finished,
    RestoredBlock,
    RestoreBlocks,
)
