"""What the executor and the engine core say to each other, and how the core is configured.

Commands go in (trio side → MLX thread) on a `queue.SimpleQueue` as a `CoreCommand`; outputs
come back (MLX thread → trio side) on a bounded `queue.Queue` as a `CoreOutput`. All plain
data: nothing here holds an MLX array, so nothing here needs the MLX thread. Internal to the
engine (its wire to the front is `engine/messages.py`).

No trio, no MLX.
"""

from __future__ import annotations

from typing import Any, Union

import attrs

from omlx_actors.cache.index import Eviction, StoredBlock
from omlx_actors.engine.messages import (
    EngineInfo,
    FaultKind,
    FinishReason,
    Submit,
    TokenChoice,
)

# ---------------------------------------------------------------------------------------
# Commands into the core (trio side → MLX thread). Internal to the engine: they carry the
# executor's `slot` numbers, not request ids, so a reused request id can never be confused
# with an aborted request of the same id whose removal is still in flight.


@attrs.frozen
class CoreSubmit:
    slot: int
    submit: Submit
    received_at: float  # time.monotonic() when the executor received it


@attrs.frozen
class CoreAbort:
    slot: int


@attrs.frozen
class CoreStop:
    """Finish: abort every live request (each reported as finished with ABORT), release the
    model, synchronize, clear the buffer cache, report `CoreStopped`."""


@attrs.frozen
class CoreDropBlocks:
    """The cache index evicted these blocks: drop their tensors (generation-checked)."""

    evictions: tuple[Eviction, ...]


@attrs.frozen
class CoreRestoreBlocks:
    """Blocks loaded from the SSD tier (plain data) to put back into the block store;
    `tag` names the executor's waiting caller."""

    tag: int
    blocks: tuple[tuple[str, str | None, tuple[Any, ...]], ...]  # (hash, parent, tensors)


@attrs.frozen
class CoreFault:
    """Fault injection (see `InjectFault`): make a step raise `MemoryError(error)`, or
    abort the process, when its conditions hold."""

    error: str
    at_step: int | None = None
    above_bytes: int | None = None
    kind: FaultKind = FaultKind.OOM
    prompt_token: int | None = None


@attrs.frozen
class CoreSetLimits:
    """MLX's own limits, derived from the memory budget (guidelines only in MLX: the real
    guard is admission). 0 leaves a limit unchanged."""

    memory_limit: int
    cache_limit: int
    wired_limit: int


@attrs.frozen
class CoreSetPrefillStep:
    """Tokens per prefill chunk from now on (shrunk under memory pressure)."""

    tokens: int


CoreCommand = Union[
    CoreSubmit, CoreAbort, CoreStop, CoreFault, CoreDropBlocks, CoreSetLimits, CoreSetPrefillStep,
    CoreRestoreBlocks,
]

# ---------------------------------------------------------------------------------------
# Outputs of the core (MLX thread → trio side), all plain data.


@attrs.frozen
class CoreReady:
    info: EngineInfo


@attrs.frozen
class CoreLoadFailed:
    error_type: str
    error: str


@attrs.frozen
class SlotFinished:
    slot: int
    step: int  # the engine step at which it left the batch
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error_type: str | None = None
    error: str | None = None


@attrs.frozen
class StepOutput:
    step: int
    admitted: tuple[tuple[int, float], ...]  # (slot, seconds queued)
    progress: tuple[tuple[int, int, int], ...]  # (slot, done, total) prefill chunks
    tokens: tuple[tuple[int, TokenChoice], ...]  # (slot, token) in batch order
    finished: tuple[SlotFinished, ...]
    running: int
    waiting: int
    active_memory: int
    cache_memory: int
    peak_memory: int
    buffer_cache_clears: int
    prompt_tokens_processed: int
    generation_tokens: int
    prefill_passes: int = 0  # steps that ran a prompt chunk (a prefill group's forward pass)
    stored: tuple[StoredBlock, ...] = ()  # blocks newly in the block store, for the index
    block_store_bytes: int = 0
    # New blocks as plain data for the SSD writer: (hash, parent, scope, tokens, tensors).
    ssd_saves: tuple[tuple[str, str | None, str, int, tuple[Any, ...]], ...] = ()
    # Answers to CoreRestoreBlocks: (tag, blocks now in the store).
    restored: tuple[tuple[int, tuple[StoredBlock, ...]], ...] = ()


@attrs.frozen
class CoreStopped:
    pass


CoreOutput = Union[CoreReady, CoreLoadFailed, StepOutput, CoreStopped]

# ---------------------------------------------------------------------------------------
# How the core is built.

# Gathering a burst on an idle engine (`EngineCore._gather_burst`): requests arriving at most
# GATHER_GAP_S apart join the first prefill, for at most GATHER_FRACTION of that prefill's
# estimated time and never more than GATHER_MAX_S.
GATHER_GAP_S = 0.015
GATHER_FRACTION = 0.05
GATHER_MAX_S = 0.1


@attrs.frozen(kw_only=True)
class EngineSettings:
    """What the core needs to build its batch. Plain data, so it can cross a process."""

    model_path: str
    completion_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
    # Cap on the prefill chunk while rows are decoding (`decode_time_prefill_step`); 0: none.
    prefill_step_while_decoding: int = 128
    clear_delay_steps: int = 2
    # Prefix cache: tokens per block, None to choose by the model's cache layout,
    # 0 disables saving and restoring blocks.
    block_size: int | None = None
    # Requests queued or running at once when they cannot be priced by memory.
    max_requests: int = 32 + 256
    # Hand every newly stored block to the SSD tier as plain data (write-through).
    ssd_enabled: bool = False
    # The most an idle engine waits for the rest of a burst, as a fraction of the first
    # prefill's estimated time (`EngineCore._gather_burst`); 0 turns gathering off.
    gather_fraction: float = GATHER_FRACTION
    # On the CPU backend, split prompt attention over two streams of the MLX thread
    # (`omlx_actors.engine.cpu_attention`; bit-identical results).
    parallel_attention: bool = True
    # Let mlx-lm import the model's own architecture file (its config's `model_file`).
    trust_remote_code: bool = False
    # A file (owned by the front, in another process) where the MLX thread records the
    # requests of the step it runs, so that a death in that step is evidence against them
    # (`engine/step_record.py`); None: no record (the engine runs in the front's process).
    step_record_path: str | None = None


def decode_time_prefill_step(step: int, cap: int, decoding: bool) -> int:
    """Tokens per prompt the coming step may prefill: `step` (the configured chunk, or the
    smaller one memory pressure set), held to `cap` while rows are `decoding` (#18).

    mlx-lm's step decodes the generation batch, then prefills one chunk per prompt, so
    every running stream's token waits for that chunk: capping it bounds their inter-token
    latency during a long prompt's prefill. With nothing decoding no one waits, and the
    whole chunk runs (fewer, larger passes). Never more than `step`: a chunk no larger than
    the one admission priced needs no more memory. `cap` 0 means no cap."""
    if decoding and 0 < cap < step:
        return cap
    return step
