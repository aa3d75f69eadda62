"""The engine core: the only code that runs MLX. It lives on one `MlxWorker` thread.

It owns the model, the generation stream and an `mlx_lm` `BatchGenerator`, and loops:
apply queued commands (admit, abort, stop) → run one `BatchGenerator.next()` step → hand a
`StepOutput` of plain data back to the trio side → clear the buffer cache when the deferred
window allows. The trio side (`executor.py`) never calls into this object; they exchange
`CoreCommand`s through a `queue.SimpleQueue` and `CoreOutput`s through a bounded
`queue.Queue` (`core_messages.py`), with a doorbell (`notify`) that wakes the trio loop
without blocking.

Here: the loop, the commands, the step and what a failed step does. Beside it, on the same
thread: `sampling.py` (samplers, logprobs), `prefix_blocks.py` (saving, snapshotting and
restoring prefix blocks), `batch_rows.py` (every read of mlx-lm's private batch state),
`step_faults.py` (injected faults), `lifetime.py` (when buffers may be freed),
`live_rows.py` (the table of admitted requests) and `model_load.py` (the model, once).

Every method here asserts it runs on the MLX thread (`assert_on_mlx_thread`), or is only
called from one that does.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from omlx_actors.mlx_loader import load_mlx
from omlx_actors.engine import batch_rows, cpu_attention
from omlx_actors.engine.core_messages import (
    GATHER_GAP_S,
    GATHER_MAX_S,
    CoreAbort,
    CoreCommand,
    CoreDropBlocks,
    CoreFault,
    CoreLoadFailed,
    CoreOutput,
    CoreReady,
    CoreRestoreBlocks,
    CoreSetLimits,
    CoreSetPrefillStep,
    CoreStop,
    CoreStopped,
    CoreSubmit,
    EngineSettings,
    SlotFinished,
    StepOutput,
    decode_time_prefill_step,
)
from omlx_actors.engine.lifetime import ClearSchedule, RetiredRefs
from omlx_actors.engine.live_rows import LiveRequest, LiveRows
from omlx_actors.engine.messages import (
    EngineInfo,
    FaultKind,
    FinishReason,
    TokenChoice,
)
from omlx_actors.engine.mlx_thread import assert_on_mlx_thread
from omlx_actors.engine.model_load import load_engine_model
from omlx_actors.engine.prefix_blocks import PrefixBlocks
from omlx_actors.engine.sampling import SharedSamplers, logits_processors, token_choice
from omlx_actors.engine.step_faults import StepFaults
from omlx_actors.engine.step_record import StepRecorder

mx = load_mlx()


def _set_mlx_limits(limits: CoreSetLimits) -> None:
    """MLX's own limits (guidelines only: the real guard is admission); 0 leaves one as is."""
    if limits.memory_limit:
        mx.set_memory_limit(limits.memory_limit)
    if limits.cache_limit:
        mx.set_cache_limit(limits.cache_limit)
    if limits.wired_limit and mx.metal.is_available():
        mx.set_wired_limit(limits.wired_limit)


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
        self._live = LiveRows()
        self._step = 0
        self._clear = ClearSchedule(delay=settings.clear_delay_steps)
        self._retired = RetiredRefs()
        self._buffer_cache_clears = 0
        self._prompt_tokens_processed = 0
        self._generation_tokens = 0
        self._prefill_passes = 0
        self._prefill_s_per_token = 0.0  # measured on each prefill pass; 0 until the first
        # The chunk the executor set (shrunk under memory pressure); the generator's own
        # may be smaller while rows decode (`_cap_prefill_step`).
        self._prefill_step = settings.prefill_step_size
        self._stopping = False
        self._faults = StepFaults()
        self._samplers = SharedSamplers()
        self._blocks = PrefixBlocks(None, settings.ssd_enabled)  # its store comes with the model
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
        """The model, its generator and its block store, on a stream of this thread."""
        # A stream of this thread's own: mlx-lm's module-level `generation_stream` belongs to
        # whichever thread imported mlx_lm first.
        self._stream = mx.new_stream(mx.default_device())
        loaded = load_engine_model(self.settings, self._stream)
        self._model = loaded.model
        self._gen = self._new_generator()
        self._blocks = PrefixBlocks(loaded.store, self.settings.ssd_enabled)
        self._grammars = loaded.grammars
        return loaded.info

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
        """After the loop, however it ended: every live request finishes as ABORT, the
        model and every block are released, and the buffer cache is cleared."""
        assert_on_mlx_thread("EngineCore._teardown")
        gen = getattr(self, "_gen", None)
        uids = self._live.uids()
        finished = tuple(self._finish(live, FinishReason.ABORT) for live in self._live)
        if gen is not None and uids:
            gen.remove(uids)
        if finished:
            self._emit(self._step_output((), (), (), finished))
        self._gen = None
        self._model = None
        cpu_attention.disable_on_this_thread()  # this worker thread may serve a bare loop next
        self._blocks.clear()
        self._samplers.clear()
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
        pending = self._live.pending_prompt_tokens()
        window = min(GATHER_MAX_S, self.settings.gather_fraction * pending * self._prefill_s_per_token)
        deadline = time.monotonic() + window
        while (left := min(GATHER_GAP_S, deadline - time.monotonic())) > 0:
            if not self._apply_commands(block=True, timeout=left) or self._stopping:
                return

    def _apply_commands(self, *, block: bool, timeout: float | None = None) -> bool:
        """Drain the command queue; when idle, wait for the first command (no busy loop),
        at most `timeout` seconds if given. Returns whether any command was applied."""
        finished: list[SlotFinished] = []
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
            dropped |= self._apply(command, admitted, finished)
        if finished or admitted or dropped or self._blocks.has_news:
            # Aborts and admissions are reported at once, not with the next step, so a
            # cancelled request is confirmed gone even if no step follows.
            self._emit(self._step_output(tuple(admitted), (), (), tuple(finished)))
        return applied

    def _apply(self, command: CoreCommand, admitted: list[tuple[int, float]],
               finished: list[SlotFinished]) -> bool:
        """Apply one command, adding the requests it admitted or finished to those lists.
        Returns whether it dropped blocks from the store."""
        match command:
            case CoreSubmit():
                # Admission does MLX work of its own (a cached prefix is rebuilt): a
                # death in it is evidence against this request alone.
                self._record.working((command.submit.request_id,))
                try:
                    admitted.append(self._admit(command))
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    finished.append(SlotFinished(
                        slot=command.slot, step=self._step, reason=FinishReason.ERROR,
                        prompt_tokens=len(command.submit.prompt_tokens),
                        completion_tokens=0, error_type=type(exc).__name__, error=str(exc),
                    ))
                self._record.working(())
            case CoreAbort(slot=slot):
                live = self._live.get(slot)
                if live is not None:
                    finished.append(self._abort(live))
            case CoreDropBlocks(evictions=evictions):
                return self._blocks.drop(evictions)
            case CoreStop():
                self._stopping = True
            case CoreFault():
                self._faults.arm(command)
            case CoreSetLimits():
                _set_mlx_limits(command)
            case CoreRestoreBlocks(tag=tag, blocks=blocks):
                self._blocks.restore(tag, blocks)
            case CoreSetPrefillStep(tokens=tokens):
                self._prefill_step = tokens  # applied, capped if rows decode, before each step
            case _:
                raise TypeError(f"unknown core command {command!r}")
        return False

    def _admit(self, command: CoreSubmit) -> tuple[int, float]:
        """Insert the request into the batch as one row, after the prefix the block store
        holds for it. Returns (slot, seconds it queued); raises if the request cannot be
        admitted (its grammar, say), leaving nothing behind."""
        submit = command.submit
        p = submit.sampling
        stops = self._samplers.stop_sequences(submit.stop_token_ids)
        processors = logits_processors(p)
        tokens = submit.prompt_tokens
        grammar = None
        if submit.grammar:
            # Last, after penalties and biases: nothing may lift a token the grammar forbids.
            replay = tokens[len(tokens) - submit.grammar_replay:] if submit.grammar_replay else ()
            grammar = self._grammars.processor(submit.grammar, tuple(replay))
            processors = [*processors, grammar]
        cache, cached = self._blocks.cached_prefix(submit.cached_blocks, len(tokens))
        boundaries, segments = self._blocks.segments(tokens, cached)
        # list(...) copies: BatchGenerator extends the lists it is given in place.
        (uid,) = self._gen.insert_segments(
            [segments],
            max_tokens=[submit.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[list(tokens[:cached])],
            samplers=[self._samplers.sampler_for(p)],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        self._live.add(LiveRequest(
            slot=command.slot,
            uid=uid,
            prompt_tokens=len(tokens),
            sampling=p,
            command=command,
            cached_tokens=cached,
            boundaries=boundaries,
            grammar=grammar,
        ))
        return command.slot, time.monotonic() - command.received_at

    def _abort(self, live: LiveRequest) -> SlotFinished:
        """Take the request's row out of the batch, keeping the blocks it has computed."""
        caches = self._gen.remove([live.uid], return_prompt_caches=self._blocks.store is not None)
        if live.uid in caches:
            cache, tokens = caches[live.uid]
            self._blocks.save_finished(live, tokens, cache)
        return self._finish(live, FinishReason.ABORT)

    # -- the step ----------------------------------------------------------------------------

    def _run_step(self) -> None:
        """One `BatchGenerator.next()`, reported as one `StepOutput`; a step that raises
        fails the requests in it (`_fail_step`), never the engine."""
        assert_on_mlx_thread("EngineCore._run_step")
        # Before anything of the step runs (an injected abort included), and cleared before
        # its output is emitted (which may wait): only a death inside the step counts
        # against its requests.
        self._record.working(self._live.request_ids())
        self._fire_fault_if_due(FaultKind.ABORT)
        batch_rows.align_prefill_group(self._gen, self.settings.prefill_batch_size)
        self._cap_prefill_step()
        before = batch_rows.prompt_counters(self._gen)
        try:
            prompt_responses, generation_responses = self._gen.next()
            # After the step ran, as an out-of-memory while evaluating it would: the rows it
            # took into its batches are the ones affected.
            self._fire_fault_if_due(FaultKind.OOM)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not us
            self._fail_step(exc)
            return
        self._step += 1
        progress = self._prompt_progress(prompt_responses, before)
        tokens, finished = self._generated(generation_responses)
        self._generation_tokens += len(tokens)
        if self._blocks.hybrid:
            self._blocks.snapshot_generation_boundaries(self._gen, self._live.slots_by_uid)
        if self._clear.due(self._step):
            self._clear_buffer_cache()
        self._record.working(())
        self._emit(self._step_output((), tuple(progress), tuple(tokens), tuple(finished)))

    def _cap_prefill_step(self) -> None:
        """Set the coming step's prefill chunk: the executor's, held small while rows decode
        so their next token does not wait for a whole chunk (`decode_time_prefill_step`).
        Decided on the batch as the step finds it: a prompt that ends in this step starts
        decoding in the next, and is capped from then on."""
        tokens = decode_time_prefill_step(
            self._prefill_step, self.settings.prefill_step_while_decoding,
            decoding=batch_rows.decoding_rows(self._gen) > 0)
        if tokens != batch_rows.prefill_step(self._gen):
            batch_rows.set_prefill_step(self._gen, tokens)

    def _fire_fault_if_due(self, kind: FaultKind) -> None:
        self._faults.fire_if_due(kind, self._step + 1, self._live.prompts())

    def _prompt_progress(self, responses: list, before: tuple[float, int]) -> list[tuple[int, int, int]]:
        """The step's prompt responses as (slot, done, total); a prompt that reached a
        block's end or its own end has its blocks snapshotted or saved. `before` is mlx-lm's
        prompt counters before the step, to measure the prefill's speed."""
        if any(not r.end_of_prompt for r in responses):
            self._prefill_passes += 1  # a prompt chunk ran (not only prompts moving to decode)
            prompt_time, prompt_tokens = batch_rows.prompt_counters(self._gen)
            tokens = prompt_tokens - before[1]
            if tokens > 0:  # the latest pass's speed, for `_gather_burst`
                self._prefill_s_per_token = (prompt_time - before[0]) / tokens
        progress: list[tuple[int, int, int]] = []
        for r in responses:
            live = self._live.by_uid(r.uid)
            if live is None:
                continue
            done, total = r.progress
            progress.append((live.slot, int(done), int(total)))
            if r.end_of_prompt:
                self._prompt_tokens_processed += int(total)
                self._blocks.save_prompt(self._gen, live)
            elif r.end_of_segment:
                self._blocks.snapshot_prefill_boundary(self._gen, live)
            else:
                self._blocks.save_prefilled(self._gen, live)
        return progress

    def _generated(self, responses: list) -> tuple[list[tuple[int, TokenChoice]], list[SlotFinished]]:
        """The step's tokens, (slot, token) in batch order, and the requests that ended
        with them."""
        tokens: list[tuple[int, TokenChoice]] = []
        finished: list[SlotFinished] = []
        for r in responses:
            live = self._live.by_uid(r.uid)
            if live is None:
                continue
            if live.grammar is not None and live.grammar.error is not None:
                # Fail closed: the token its matcher refused is withheld, the request ends
                # as an error, never as output that breaks its schema.
                if r.finish_reason is None:
                    self._gen.remove([r.uid])
                finished.append(self._finish(live, FinishReason.ERROR, "GrammarViolation",
                                             f"output left its grammar: {live.grammar.error}"))
                continue
            live.completion_tokens += 1
            tokens.append((live.slot, token_choice(live.sampling, r.token, r.logprobs)))
            if r.finish_reason is not None:
                reason = FinishReason.LENGTH if r.finish_reason == "length" else FinishReason.STOP
                # The extracted cache may still be read by the step in flight: keep it until
                # the deferred clear (rule 3 in lifetime.py). The cache index will take it here.
                self._retired.retire(self._step, r.prompt_cache)
                self._blocks.save_finished(live, r.all_tokens, r.prompt_cache)
                finished.append(self._finish(live, reason))
        return tokens, finished

    def _fail_step(self, exc: Exception) -> None:
        """A step raised (an out-of-memory, say): fail the requests that were in it (in
        the prompt or generation batch), release their caches, synchronize, clear, and
        keep serving - requests still waiting for a batch are re-admitted untouched."""
        try:
            queued = batch_rows.queued_uids(self._gen, self._live.uids())
        except Exception:  # noqa: BLE001 - an inconsistent batch: treat all as in the step
            queued = set()
        waiting = [live for live in self._live if live.uid in queued and live.command is not None]
        failed = tuple(
            self._finish(live, FinishReason.ERROR, type(exc).__name__, str(exc) or repr(exc))
            for live in self._live
            if live not in waiting
        )
        # A fresh generator: a step that raised may have left the batch half-updated. The
        # old one (and every array it holds) is released only after the synchronize below.
        self._retired.retire(self._step, self._gen)
        self._gen = self._new_generator()
        self._clear_buffer_cache()
        for live in waiting:
            self._live.remove(live)
            self._admit(live.command)
        self._record.working(())
        self._emit(self._step_output((), (), (), failed))

    def _finish(
        self,
        live: LiveRequest,
        reason: FinishReason,
        error_type: str | None = None,
        error: str | None = None,
    ) -> SlotFinished:
        self._live.remove(live)
        self._clear.note_finished(self._step)
        if reason == FinishReason.ERROR:
            self._blocks.forget(live.slot)
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
        self._live.mark_started([p[0] for p in progress] + [t[0] for t in tokens])
        waiting = self._live.waiting()
        news = self._blocks.take_news()
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
            stored=news.stored,
            block_store_bytes=self._blocks.nbytes,
            ssd_saves=news.ssd_saves,
            restored=news.restored,
        )

    def _emit(self, output: CoreOutput) -> None:
        # Blocks when the trio side is STEP_BACKLOG outputs behind: there is no point
        # computing tokens faster than they can be delivered.
        self._outputs.put(output)
        self._notify()
