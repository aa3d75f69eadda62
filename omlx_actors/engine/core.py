"""The engine core: the only code that runs MLX. It lives on one `MlxWorker` thread.

It owns the model, the generation stream and an `mlx_lm` `BatchGenerator`, and loops:
apply queued commands (admit, abort, stop) → run one `BatchGenerator.next()` step → hand a
`StepOutput` of plain data back to the trio side → clear the buffer cache when the deferred
window allows. The trio side (`executor.py`) never calls into this object; they exchange
`CoreCommand`s through a `queue.SimpleQueue` and `CoreOutput`s through a bounded
`queue.Queue`, with a doorbell (`notify`) that wakes the trio loop without blocking.

Every method here asserts it runs on the MLX thread (`assert_on_mlx_thread`).
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import attrs

from omlx_actors.mlx_loader import load_mlx, stop_token_ids
from omlx_actors.cache.blocks import cache_namespace, default_block_size
from omlx_actors.cache.index import Eviction, StoredBlock
from omlx_actors.engine import cpu_attention
from omlx_actors.engine.block_store import BlockStore, cache_layout
from omlx_actors.engine.grammar import GrammarProcessor, GrammarTokenizers
from omlx_actors.engine.lifetime import ClearSchedule, RetiredRefs
from omlx_actors.engine.messages import (
    EngineInfo,
    FaultKind,
    FinishReason,
    SamplingParams,
    Submit,
    TokenChoice,
    TokenLogprob,
)
from omlx_actors.engine.mlx_thread import assert_on_mlx_thread
from omlx_actors.engine.step_record import StepRecorder

mx = load_mlx()
log = logging.getLogger(__name__)

# Gathering a burst on an idle engine (`EngineCore._gather_burst`): requests arriving at most
# GATHER_GAP_S apart join the first prefill, for at most GATHER_FRACTION of that prefill's
# estimated time and never more than GATHER_MAX_S.
GATHER_GAP_S = 0.015
GATHER_FRACTION = 0.05
GATHER_MAX_S = 0.1

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


@attrs.frozen(kw_only=True)
class EngineSettings:
    """What the core needs to build its batch. Plain data, so it can cross a process."""

    model_path: str
    completion_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int = 512
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


@attrs.define
class _Live:
    """MLX-thread bookkeeping of one admitted request."""

    slot: int
    uid: int
    prompt_tokens: int
    sampling: SamplingParams
    command: CoreSubmit | None = None  # kept to re-admit it if a failed step never reached it
    completion_tokens: int = 0
    prefill_started: bool = False
    cached_tokens: int = 0
    # Block indexes whose end boundary the prefill stops at (hybrid models), in order.
    boundaries: list[int] = attrs.field(factory=list)
    # Its matcher (also in its row's logits processors, where mlx-lm moves it with the row).
    grammar: GrammarProcessor | None = None


def _plain_config(config: dict) -> tuple[tuple[str, str], ...]:
    """The model config as (key, JSON) pairs: plain data the front's estimator can read."""
    import json

    return tuple(sorted((str(k), json.dumps(v, sort_keys=True, default=str)) for k, v in config.items()))


def model_identity(path: Path) -> str:
    """What names a model for the prefix cache: its config and weight files' sizes. Two
    directories with the same files share cached blocks; any change gives a new namespace."""
    import hashlib

    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:24]


def _make_seeded_sampler(p: SamplingParams) -> Callable[[Any], Any]:
    """A sampler with its own PRNG key chain, so a seeded request draws the same tokens
    whatever its batch mates are (mlx-lm's samplers draw from MLX's global state)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    key = mx.random.key(p.seed)
    state = {"key": key}

    def sampler(logprobs):
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return sampler


class EngineCore:
    """Runs on the MLX thread from `run()` to its return. Not thread-safe by design: only
    its own thread touches it; the trio side talks to it through `commands` / `outputs`."""

    def __init__(
        self,
        settings: EngineSettings,
        commands: queue.SimpleQueue[CoreCommand],
        outputs: queue.Queue[CoreOutput],
        notify: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._commands = commands
        self._outputs = outputs
        self._notify = notify
        self._live: dict[int, _Live] = {}  # slot -> live request
        self._slot_of_uid: dict[int, int] = {}
        self._step = 0
        self._clear = ClearSchedule(delay=settings.clear_delay_steps)
        self._retired = RetiredRefs()
        self._buffer_cache_clears = 0
        self._prompt_tokens_processed = 0
        self._generation_tokens = 0
        self._prefill_passes = 0
        self._prefill_s_per_token = 0.0  # measured on each prefill pass; 0 until the first
        self._stopping = False
        self._pending_fault: CoreFault | None = None
        self._samplers: dict[SamplingParams, Callable[[Any], Any]] = {}
        self._stop_sequences: dict[tuple[int, ...], Any] = {}
        self._store: BlockStore | None = None
        self._stored: list[StoredBlock] = []  # saved since the last output
        self._ssd_saves: list[tuple] = []
        self._restored: list[tuple[int, tuple[StoredBlock, ...]]] = []
        self._record = StepRecorder(settings.step_record_path)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        """The whole life of the engine on this thread. Never raises: failures are outputs."""
        assert_on_mlx_thread("EngineCore.run")
        try:
            info = self._load()
        except Exception as exc:  # noqa: BLE001 - reported to the trio side as a value
            cpu_attention.disable_on_this_thread()  # if loading failed after enabling it
            self._emit(CoreLoadFailed(type(exc).__name__, str(exc)))
            return
        self._emit(CoreReady(info))
        try:
            while not self._stopping:
                idle = not self._live
                # Wait for work only when there is nothing to do, a pending clear included.
                self._apply_commands(block=idle and self._clear.clear_at is None)
                if idle and self._live and not self._stopping:
                    self._gather_burst()
                if self._stopping:
                    break
                if self._live:
                    self._run_step()
                elif self._clear.clear_at is not None:
                    # Idle: no step will run to reach the deadline; after a synchronize
                    # nothing can still be reading the buffers. Report the memory it freed.
                    self._clear_buffer_cache()
                    self._emit(self._step_output((), (), (), ()))
        finally:
            self._teardown()
            self._record.close()
            self._emit(CoreStopped())

    def _load(self) -> EngineInfo:
        from mlx_lm.utils import load_model

        # A stream of this thread's own: mlx-lm's module-level `generation_stream` belongs to
        # whichever thread imported mlx_lm first.
        self._stream = mx.new_stream(mx.default_device())
        path = Path(self.settings.model_path)
        with mx.stream(self._stream):
            self._model, config = load_model(
                path, trust_remote_code=self.settings.trust_remote_code)
        text_config = config.get("text_config", config)
        # Not config.json's eos_token_id alone: mlx-lm's set (tokenizer, generation_config).
        eos_ids = stop_token_ids(path, config)
        self._eos_ids = eos_ids
        if self.settings.parallel_attention and cpu_attention.install(self._model):
            cpu_attention.enable_on_this_thread()
        self._gen = self._new_generator()
        from mlx.utils import tree_flatten

        self._weights_bytes = sum(v.nbytes for _, v in tree_flatten(self._model.parameters()))
        # MLX's peak is process-wide: measure this engine's own from here.
        mx.reset_peak_memory()
        layout = cache_layout(self._model)
        block_size = self.settings.block_size
        if block_size is None:
            block_size = default_block_size(layout)
        namespace = cache_namespace(model_identity(path), layout, max(block_size, 1))
        if block_size > 0:
            self._store = BlockStore(layout, block_size, namespace)
            if not self._store.enabled:
                self._store = None  # a cache type we cannot slice or snapshot
        self._grammars = GrammarTokenizers(
            str(path), int(text_config.get("vocab_size", 0)), tuple(eos_ids))
        return EngineInfo(
            model_path=str(path),
            model_type=str(config.get("model_type", "unknown")),
            vocab_size=int(text_config.get("vocab_size", 0)),
            max_context=text_config.get("max_position_embeddings"),
            eos_token_ids=eos_ids,
            device="gpu" if mx.default_device() == mx.gpu else "cpu",
            cache_layout=layout,
            cache_namespace=namespace if self._store is not None else None,
            block_size=block_size if self._store is not None else 0,
            weights_bytes=self._weights_bytes,
            memory_config=_plain_config(config),
        )

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            self._model,
            stream=self._stream,
            completion_batch_size=self.settings.completion_batch_size,
            prefill_batch_size=self.settings.prefill_batch_size,
            prefill_step_size=self.settings.prefill_step_size,
        )

    def _teardown(self) -> None:
        assert_on_mlx_thread("EngineCore._teardown")
        gen = getattr(self, "_gen", None)
        uids = self._live_uids()
        finished = tuple(self._finish(live, FinishReason.ABORT) for live in list(self._live.values()))
        if gen is not None and uids:
            gen.remove(uids)
        if finished:
            self._emit(self._step_output((), (), (), finished))
        self._gen = None
        self._model = None
        cpu_attention.disable_on_this_thread()  # this worker thread may serve a bare loop next
        if self._store is not None:
            self._store.clear()
        self._samplers.clear()
        self._stop_sequences.clear()
        if hasattr(self, "_stream"):
            self._clear_buffer_cache()

    # -- commands ---------------------------------------------------------------------------

    def _gather_burst(self) -> None:
        """Work has just arrived on an idle engine: let the rest of its burst in before the
        first step, so the burst is prefilled together. Without this, the first request of
        a burst arriving over HTTP (each parsed and tokenized in turn) is prefilled alone
        and every other one waits that whole prefill for its first token (~0.5 s at c=8 on
        the CPU demo model). Waits while requests keep coming `GATHER_GAP_S` apart, never
        longer than `GATHER_FRACTION` of the estimated prefill of what is waiting (so a
        lone request's time to first token grows by at most that fraction, and on a fast
        device, where prefill is short, by next to nothing)."""
        pending = sum(live.prompt_tokens - live.cached_tokens for live in self._live.values())
        window = min(GATHER_MAX_S, self.settings.gather_fraction * pending * self._prefill_s_per_token)
        deadline = time.monotonic() + window
        while (left := min(GATHER_GAP_S, deadline - time.monotonic())) > 0:
            if not self._apply_commands(block=True, timeout=left) or self._stopping:
                return

    def _apply_commands(self, *, block: bool, timeout: float | None = None) -> bool:
        """Drain the command queue; when idle, wait for the first command (no busy loop),
        at most `timeout` seconds if given. Returns whether any command was applied."""
        pending_finished: list[SlotFinished] = []
        admitted: list[tuple[int, float]] = []
        dropped = False
        applied = False
        while True:
            try:
                command = self._commands.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            block = False
            applied = True
            match command:
                case CoreSubmit():
                    # Admission does MLX work of its own (a cached prefix is rebuilt): a
                    # death in it is evidence against this request alone.
                    self._record.working((command.submit.request_id,))
                    try:
                        admitted.append(self._admit(command))
                    except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                        pending_finished.append(SlotFinished(
                            slot=command.slot, step=self._step, reason=FinishReason.ERROR,
                            prompt_tokens=len(command.submit.prompt_tokens),
                            completion_tokens=0, error_type=type(exc).__name__, error=str(exc),
                        ))
                    self._record.working(())
                case CoreAbort(slot=slot):
                    live = self._live.get(slot)
                    if live is not None:
                        caches = self._gen.remove([live.uid], return_prompt_caches=self._store is not None)
                        if live.uid in caches:
                            self._save_blocks(live, caches[live.uid][1], caches[live.uid][0])
                        pending_finished.append(self._finish(live, FinishReason.ABORT))
                case CoreDropBlocks(evictions=evictions):
                    if self._store is not None:
                        for e in evictions:
                            dropped |= self._store.drop(e.hash, e.generation)
                case CoreStop():
                    self._stopping = True
                case CoreFault():
                    self._pending_fault = command
                case CoreSetLimits(memory_limit=memory, cache_limit=cache, wired_limit=wired):
                    if memory:
                        mx.set_memory_limit(memory)
                    if cache:
                        mx.set_cache_limit(cache)
                    if wired and mx.metal.is_available():
                        mx.set_wired_limit(wired)
                case CoreRestoreBlocks(tag=tag, blocks=blocks):
                    restored = []
                    if self._store is not None:
                        for block_hash, parent, tensors in blocks:
                            stored = self._store.insert_tensors(block_hash, parent, tensors)
                            if stored is not None:
                                restored.append(stored)
                    self._restored.append((tag, tuple(restored)))
                case CoreSetPrefillStep(tokens=tokens):
                    self._gen.prefill_step_size = tokens
                    self._gen._prompt_batch.prefill_step_size = tokens
                case _:
                    raise TypeError(f"unknown core command {command!r}")
        if pending_finished or admitted or self._stored or dropped or self._restored:
            # Aborts and admissions are reported at once, not with the next step, so a
            # cancelled request is confirmed gone even if no step follows.
            self._emit(self._step_output(tuple(admitted), (), (), tuple(pending_finished)))
        return applied

    def _admit(self, command: CoreSubmit) -> tuple[int, float]:
        from mlx_lm.generate import StopSequences
        from mlx_lm.sample_utils import make_logits_processors

        submit = command.submit
        p = submit.sampling
        stops = self._stop_sequences.get(submit.stop_token_ids)
        if stops is None:
            stops = StopSequences([[t] for t in submit.stop_token_ids] or None)
            self._stop_sequences[submit.stop_token_ids] = stops
        processors = []
        if p.needs_logits_processors:
            processors = make_logits_processors(
                dict(p.logit_bias) or None,
                p.repetition_penalty,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
            )
        tokens = submit.prompt_tokens
        grammar = None
        if submit.grammar:
            # Last, after penalties and biases: nothing may lift a token the grammar forbids.
            replay = tokens[len(tokens) - submit.grammar_replay:] if submit.grammar_replay else ()
            grammar = self._grammars.processor(submit.grammar, tuple(replay))
            processors = [*processors, grammar]
        cache, cached = None, 0
        if self._store is not None and submit.cached_blocks:
            cache, cached = self._store.build_cache(submit.cached_blocks)
        # A request always prefills at least its last prompt token.
        if cached >= len(tokens):
            cache, cached = None, 0
        boundaries, segments = self._segments(tokens, cached)
        # list(...) copies: BatchGenerator extends the lists it is given in place.
        (uid,) = self._gen.insert_segments(
            [segments],
            max_tokens=[submit.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[list(tokens[:cached])],
            samplers=[self._sampler_for(p)],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        self._live[command.slot] = _Live(
            slot=command.slot,
            uid=uid,
            prompt_tokens=len(tokens),
            sampling=p,
            command=command,
            cached_tokens=cached,
            boundaries=boundaries,
            grammar=grammar,
        )
        self._slot_of_uid[uid] = command.slot
        return command.slot, time.monotonic() - command.received_at

    def _segments(self, tokens: tuple[int, ...], cached: int) -> tuple[list[int], list[list[int]]]:
        """The prompt after the cached prefix, cut at block boundaries when recurrent state
        must be snapshotted there (hybrid models); one segment otherwise."""
        rest = list(tokens[cached:])
        store = self._store
        if store is None or not store.hybrid:
            return [], [rest]
        size = store.block_size
        boundaries, segments, start = [], [], cached
        # The last prompt token is prefilled with the first decode step, so a boundary at
        # the very end of the prompt is reached in generation, not here.
        for end in range((cached // size + 1) * size, len(tokens), size):
            segments.append(list(tokens[start:end]))
            boundaries.append(end // size - 1)
            start = end
        segments.append(list(tokens[start:]))
        return boundaries, segments

    def _sampler_for(self, p: SamplingParams) -> Callable[[Any], Any] | None:
        """None (the batch's shared greedy sampler) for greedy requests; one shared sampler
        per distinct unseeded setting, so same-setting rows sample in one batched call."""
        if p.is_greedy:
            return None
        if p.seed is not None:
            return _make_seeded_sampler(p)
        key = attrs.evolve(p, logprobs=False, top_logprobs=0, logit_bias=())
        sampler = self._samplers.get(key)
        if sampler is None:
            from mlx_lm.sample_utils import make_sampler

            sampler = make_sampler(
                p.temperature,
                top_p=p.top_p if p.top_p < 1.0 else 0.0,
                min_p=p.min_p,
                top_k=p.top_k,
            )
            self._samplers[key] = sampler
        return sampler

    # -- the step ----------------------------------------------------------------------------

    def _run_step(self) -> None:
        assert_on_mlx_thread("EngineCore._run_step")
        # Before anything of the step runs (an injected abort included), and cleared before
        # its output is emitted (which may wait): only a death inside the step counts
        # against its requests.
        self._record.working(tuple(live.command.submit.request_id
                                   for live in self._live.values() if live.command is not None))
        self._maybe_inject_fault(FaultKind.ABORT)
        self._align_prefill_group()
        counters = self._gen._counters  # mlx-lm's own prompt time/tokens (pinned 0.32.2)
        prompt_time, prompt_tokens = counters.prompt_time, counters.prompt_tokens
        try:
            prompt_responses, generation_responses = self._gen.next()
            # After the step ran, as an out-of-memory while evaluating it would: the rows it
            # took into its batches are the ones affected.
            self._maybe_inject_fault(FaultKind.OOM)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not us
            self._fail_step(exc)
            return
        self._step += 1
        if any(not r.end_of_prompt for r in prompt_responses):
            self._prefill_passes += 1  # a prompt chunk ran (not only prompts moving to decode)
            tokens = counters.prompt_tokens - prompt_tokens
            if tokens > 0:  # the latest pass's speed, for `_gather_burst`
                self._prefill_s_per_token = (counters.prompt_time - prompt_time) / tokens
        progress: list[tuple[int, int, int]] = []
        for r in prompt_responses:
            slot = self._slot_of_uid.get(r.uid)
            if slot is None:
                continue
            done, total = r.progress
            progress.append((slot, int(done), int(total)))
            if r.end_of_prompt:
                self._prompt_tokens_processed += int(total)
                self._save_prompt_blocks(self._live[slot], r.uid)
            elif r.end_of_segment:
                self._snapshot_prefill_boundary(self._live[slot], r.uid)
        tokens: list[tuple[int, TokenChoice]] = []
        finished: list[SlotFinished] = []
        for r in generation_responses:
            slot = self._slot_of_uid.get(r.uid)
            if slot is None:
                continue
            live = self._live[slot]
            if live.grammar is not None and live.grammar.error is not None:
                # Fail closed: the token its matcher refused is withheld, the request ends
                # as an error, never as output that breaks its schema.
                if r.finish_reason is None:
                    self._gen.remove([r.uid])
                finished.append(self._finish(live, FinishReason.ERROR, "GrammarViolation",
                                             f"output left its grammar: {live.grammar.error}"))
                continue
            live.completion_tokens += 1
            tokens.append((slot, self._token_choice(live, r.token, r.logprobs)))
            if r.finish_reason is not None:
                reason = FinishReason.LENGTH if r.finish_reason == "length" else FinishReason.STOP
                # The extracted cache may still be read by the step in flight: keep it until
                # the deferred clear (rule 3 in lifetime.py). The cache index will take it here.
                self._retired.retire(self._step, r.prompt_cache)
                self._save_blocks(live, r.all_tokens, r.prompt_cache)
                finished.append(self._finish(live, reason))
        self._generation_tokens += len(tokens)
        if self._store is not None and self._store.hybrid:
            self._snapshot_generation_boundaries()
        if self._clear.due(self._step):
            self._clear_buffer_cache()
        self._record.working(())
        self._emit(self._step_output((), tuple(progress), tuple(tokens), tuple(finished)))

    def _align_prefill_group(self) -> None:
        """Let the coming step's prefill group fill to `prefill_batch_size` once the rows
        that end their prompt in it have moved on to decoding.

        mlx-lm 0.32.2's `BatchGenerator` sizes the new group *before* it moves finished
        prompts out of the prompt batch: a request that arrived alone (prefilled on its own
        while the rest of a burst arrived) leaves room for P-1 in the next group, that group
        for 1 in the one after, and the burst is prefilled in alternating groups of 1 and
        P-1: twice the prefill passes (at c=32 on the CPU demo model, runs like that reached
        0.73-0.83 of the bare loop). Counting the leavers in (what `_next` splits off: one
        segment of one token left) restores full groups. Reads `_currently_processing`:
        mlx-lm is pinned (0.32.2) for this and the block reads below."""
        gen = self._gen
        leaving = sum(1 for segments, *_ in gen._currently_processing
                      if len(segments) == 1 and len(segments[0]) == 1)
        gen.prefill_batch_size = self.settings.prefill_batch_size + leaving

    # -- prefix blocks ------------------------------------------------------------------------
    # These reach into BatchGenerator's batches (`_prompt_batch`, `_generation_batch`): mlx-lm
    # 0.32.2 (pinned) offers no public way to read one row's cache at a segment boundary.

    def _snapshot_prefill_boundary(self, live: _Live, uid: int) -> None:
        if self._store is None or not live.boundaries:
            return
        block_index = live.boundaries.pop(0)
        batch = self._gen._prompt_batch
        idx = batch.uids.index(uid)
        self._store.snapshot(live.slot, block_index, self._row_cache(batch.prompt_cache, idx))

    def _save_prompt_blocks(self, live: _Live, uid: int) -> None:
        """Store the prompt's blocks as soon as its prefill is done, so requests arriving
        while this one still decodes (agents sharing a system prompt) can reuse them."""
        if self._store is None:
            return
        batch = self._gen._generation_batch  # the row moved there with its last prompt token
        idx = batch.uids.index(uid)
        row = [c.extract(idx) for c in batch.prompt_cache]
        self._keep(live, self._store.save(
            live.slot, list(batch.tokens[idx]), row,
            skip=live.cached_tokens // self._store.block_size, keep_snapshots=True,
        ))

    def _snapshot_generation_boundaries(self) -> None:
        batch = self._gen._generation_batch
        size = self._store.block_size
        for idx, uid in enumerate(batch.uids):
            held = len(batch.tokens[idx])  # tokens in this row's cache
            slot = self._slot_of_uid.get(uid)
            if slot is not None and held % size == 0:
                self._store.snapshot(slot, held // size - 1, self._row_cache(batch.prompt_cache, idx))

    def _row_cache(self, batch_cache: list[Any], idx: int) -> list[Any]:
        """Row `idx` of a batch cache, recurrent layers only (KV blocks are sliced at save)."""
        from omlx_actors.engine.block_store import ARRAYS

        layout = self._store.layout
        return [c.extract(idx) if kind == ARRAYS else None for c, kind in zip(batch_cache, layout)]

    def _save_blocks(self, live: _Live, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if self._store is None:
            return
        if tokens and cache:
            self._keep(live, self._store.save(
                live.slot, tokens, cache, skip=live.cached_tokens // self._store.block_size))
        else:
            self._store.forget_request(live.slot)

    def _keep(self, live: _Live, stored: list[StoredBlock]) -> None:
        """Report newly stored blocks to the index and, write-through, to the SSD tier."""
        self._stored.extend(stored)
        if self.settings.ssd_enabled:
            scope = live.command.submit.cache_scope if live.command is not None else ""
            for block in stored:
                self._ssd_saves.append((block.hash, block.parent, scope, self._store.block_size,
                                        self._store.tensor_data(block.hash)))

    def _token_choice(self, live: _Live, token: int, logprobs: Any) -> TokenChoice:
        p = live.sampling
        if not p.logprobs:
            return TokenChoice(token=int(token))
        top: tuple[TokenLogprob, ...] = ()
        if p.top_logprobs > 0:
            k = min(p.top_logprobs, logprobs.shape[-1])
            ids = mx.argpartition(-logprobs, kth=k - 1)[:k]
            values = logprobs[ids]
            pairs = sorted(zip(ids.tolist(), values.tolist()), key=lambda t: -t[1])
            # A grammar masks tokens to -inf: they were never candidates, so they are not
            # alternatives (and -inf has no JSON form).
            top = tuple(TokenLogprob(token=int(i), logprob=float(v)) for i, v in pairs
                        if v != float("-inf"))
        return TokenChoice(token=int(token), logprob=float(logprobs[token].item()), top=top)

    def _maybe_inject_fault(self, kind: FaultKind) -> None:
        """Fire the pending fault of `kind` if its conditions hold for the coming step."""
        fault = self._pending_fault
        if fault is None or fault.kind is not kind:
            return
        if fault.at_step is not None and self._step + 1 < fault.at_step:
            return
        if fault.above_bytes is not None and mx.get_active_memory() <= fault.above_bytes:
            return
        if fault.prompt_token is not None and not any(
            fault.prompt_token in live.command.submit.prompt_tokens for live in self._live.values()
        ):
            return
        self._pending_fault = None
        if kind is FaultKind.ABORT:
            log.warning("injected fault: aborting the engine process at step %d", self._step + 1)
            os.abort()  # what an uncaught C++ exception in MLX does: SIGABRT, no cleanup
        raise MemoryError(fault.error)

    def _fail_step(self, exc: Exception) -> None:
        """A step raised (an out-of-memory, say): fail the requests that were in it (in
        the prompt or generation batch), release their caches, synchronize, clear, and
        keep serving - requests still waiting for a batch are re-admitted untouched."""
        try:
            stages = self._gen._find_uids(self._live_uids())
        except Exception:  # noqa: BLE001 - an inconsistent batch: treat all as in the step
            stages = {}
        waiting = [
            live for live in self._live.values()
            if stages.get(live.uid, (None,))[0] == 0 and live.command is not None
        ]
        failed = tuple(
            self._finish(live, FinishReason.ERROR, type(exc).__name__, str(exc) or repr(exc))
            for live in list(self._live.values())
            if live not in waiting
        )
        # A fresh generator: a step that raised may have left the batch half-updated. The
        # old one (and every array it holds) is released only after the synchronize below.
        self._retired.retire(self._step, self._gen)
        self._gen = self._new_generator()
        self._clear_buffer_cache()
        for live in waiting:
            del self._live[live.slot]
            self._slot_of_uid.pop(live.uid, None)
            self._admit(live.command)
        self._record.working(())
        self._emit(self._step_output((), (), (), failed))

    def _finish(
        self,
        live: _Live,
        reason: FinishReason,
        error_type: str | None = None,
        error: str | None = None,
    ) -> SlotFinished:
        del self._live[live.slot]
        self._slot_of_uid.pop(live.uid, None)
        self._clear.note_finished(self._step)
        if self._store is not None and reason in (FinishReason.ERROR,):
            self._store.forget_request(live.slot)
        return SlotFinished(
            slot=live.slot,
            step=self._step,
            reason=reason,
            prompt_tokens=live.prompt_tokens,
            completion_tokens=live.completion_tokens,
            cached_tokens=live.cached_tokens,
            error_type=error_type,
            error=error,
        )

    def _live_uids(self) -> list[int]:
        return [live.uid for live in self._live.values()]

    # -- memory ------------------------------------------------------------------------------

    def _clear_buffer_cache(self) -> None:
        """Rule 1 of lifetime.py: synchronize the generation stream, then drop retired
        references and clear MLX's buffer cache, on this thread only."""
        assert_on_mlx_thread("EngineCore._clear_buffer_cache")
        mx.synchronize(self._stream)
        self._retired.release()
        mx.clear_cache()
        self._clear.mark_cleared()
        self._buffer_cache_clears += 1

    # -- output ------------------------------------------------------------------------------

    def _step_output(self, admitted, progress, tokens, finished) -> StepOutput:
        for slot in [p[0] for p in progress] + [t[0] for t in tokens]:
            live = self._live.get(slot)
            if live is not None:
                live.prefill_started = True
        waiting = sum(1 for live in self._live.values() if not live.prefill_started)
        return StepOutput(
            step=self._step,
            admitted=admitted,
            progress=progress,
            tokens=tokens,
            finished=finished,
            running=len(self._live) - waiting,
            waiting=waiting,
            active_memory=mx.get_active_memory(),
            cache_memory=mx.get_cache_memory(),
            peak_memory=mx.get_peak_memory(),
            buffer_cache_clears=self._buffer_cache_clears,
            prompt_tokens_processed=self._prompt_tokens_processed,
            generation_tokens=self._generation_tokens,
            prefill_passes=self._prefill_passes,
            stored=self._take_stored(),
            block_store_bytes=self._store.nbytes if self._store is not None else 0,
            ssd_saves=self._take(self._ssd_saves),
            restored=self._take(self._restored),
        )

    @staticmethod
    def _take(items: list) -> tuple:
        taken = tuple(items)
        items.clear()
        return taken

    def _take_stored(self) -> tuple[StoredBlock, ...]:
        stored, self._stored = tuple(self._stored), []
        return stored

    def _emit(self, output: CoreOutput) -> None:
        # Blocks when the trio side is STEP_BACKLOG outputs behind: there is no point
        # computing tokens faster than they can be delivered.
        self._outputs.put(output)
        self._notify()
