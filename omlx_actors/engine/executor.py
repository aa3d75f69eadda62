"""The GPU executor actor: the trio face of the engine core.

It owns the request table (request id → slot) and one `EngineCore` running on an MLX worker
thread. Its inbox takes the closed `ExecutorMessage` union (the front's `EngineCommand`s
and the cache index's `DropBlocks`); its output is a stream of `EngineEvent`s on the
`events` channel, which the front's dispatcher routes to sessions by request id. The trio
loop never waits on MLX: commands go to the MLX thread through a queue, and step outputs
come back through a bounded queue plus a doorbell rung with `TrioToken.run_sync_soon`
(non-blocking for the MLX thread).

Ordering contract: an `Abort` handled by this actor takes effect for every step output the
pump has not yet delivered - tokens of the step in flight are dropped for the aborted
request, and its `Finished(ABORT)` is sent once the MLX thread confirms the removal.

Cancellation contract: when `run` is cancelled or crashes, every request it knew of gets a
`Finished(ERROR)` event (sent without blocking, in a shielded finally), so no session waits
forever; the core is told to stop, and its thread parks for reuse.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from omlx_actors.cache.actor import DropBlocks, Release, Stored
from omlx_actors.engine.core import EngineCore
from omlx_actors.engine.core_messages import (
    CoreAbort,
    CoreDropBlocks,
    CoreFault,
    CoreLoadFailed,
    CoreReady,
    CoreRestoreBlocks,
    CoreStop,
    CoreStopped,
    EngineSettings,
    StepOutput,
)
from omlx_actors.engine.memory_queue import (  # MlxGauge (request_table), MemoryWiring: assembly's wiring
    QUEUE_DOORBELL_CAPACITY,
    BudgetBelowWeights,
    MemoryWiring,
    admit,
    admit_now,
    expire_waiting,
    forget_dropped_prefixes,
    leave_queue,
    restore_prefill_step,
    settle,
    start_admission,
    watch_memory,
)
from omlx_actors.engine.messages import (  # the refusals are wire values: see messages.py
    Abort,
    Admitted,
    DuplicateRequest,
    EngineCommand,
    EngineEvent,
    EngineInfo,
    EngineStats,
    EngineStatsQuery,
    Finished,
    FinishReason,
    InjectFault,
    Ping,
    Pong,
    PrefillProgress,
    RestoreBlocks,
    Submit,
    TokenDelta,
)
from omlx_actors.engine.mlx_thread import acquire_worker
from omlx_actors.engine.request_table import ExecutorState, TrackedRequest
from omlx_actors.kernel import ActorError, Address, Inbox, unknown_message
from omlx_actors.ssd.messages import Save

log = logging.getLogger(__name__)

# Step outputs the MLX thread may run ahead of the trio side before `queue.put` blocks it.
# 8 steps is ~0.1-0.5 s of decoding on a CPU and plenty to ride out a busy trio loop; more
# would only let tokens pile up that no client has read yet.
STEP_BACKLOG = 8

# Events the executor may queue for the dispatcher. The dispatcher never blocks (each session
# channel holds a whole request's worth), so this only fills if the dispatcher task is
# starved; then the pump waits (backpressure through STEP_BACKLOG to the MLX thread).
ENGINE_EVENT_BACKLOG = 4096

# How long a stopping executor waits for the MLX thread to finish its step and release the
# model before giving up on it (the thread keeps going and parks; only the wait is bounded).
CORE_STOP_TIMEOUT = 30.0

# Saves in flight from the engine to the SSD writer (see `run`), counted in tokens so that
# the bound means the same bytes and the same burst whatever the block size (32 blocks of
# 256 tokens; 128 of the 64-token blocks attention-only models default to).
SSD_FORWARD_BACKLOG_TOKENS = 8192

# What the executor's inbox accepts, closed: the engine's commands (from the front) and the
# cache index's evictions. `_handle` matches every member; anything else is a bug
# (`unknown_message`).
ExecutorMessage = EngineCommand | DropBlocks


class EngineLoadFailed(ActorError):
    """The model could not be loaded; the executor never became ready."""


class EngineStopping(ActorError):
    """The executor is shutting down and admits nothing new."""


@attrs.define
class _CoreLink:
    """The trio side's ends of one `EngineCore` on an MLX thread: the command queue, the
    bounded output queue and its doorbell, and whether the core has said it stopped."""

    commands: queue.SimpleQueue
    outputs: queue.Queue
    doorbell_send: Any
    doorbell_recv: Any
    core_stopped: trio.Event = attrs.field(factory=trio.Event)
    # A ring is on its way and outputs put since will be drained with it: the MLX thread
    # skips `run_sync_soon` (a write to trio's wakeup socket, ~3% of that thread at 64
    # streams) until the trio side clears this, which it does before each drain.
    ringing: bool = False

    @classmethod
    def open(cls) -> _CoreLink:
        doorbell_send, doorbell_recv = trio.open_memory_channel[None](1)
        return cls(queue.SimpleQueue(), queue.Queue(maxsize=STEP_BACKLOG), doorbell_send,
                   doorbell_recv)

    def notifier(self) -> Callable[[], None]:
        """The core's `notify`: runs on the MLX thread and never blocks it."""
        token = trio.lowlevel.current_trio_token()

        def ring() -> None:  # runs on the trio thread, scheduled by the MLX thread
            try:
                self.doorbell_send.send_nowait(None)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # already ringing, or we are gone: either way nothing to add

        def notify() -> None:
            # Sound under the GIL: the output was put before this read; if the flag is
            # still set, the trio side has not begun the drain that will take it.
            if self.ringing:
                return
            self.ringing = True
            try:
                token.run_sync_soon(ring)
            except trio.RunFinishedError:
                pass

        return notify

    def next_outputs(self):
        """Every output queued now. Clears `ringing` first, so an output put after this
        drain began rings again."""
        self.ringing = False
        while True:
            try:
                yield self.outputs.get_nowait()
            except queue.Empty:
                return

    async def ready(self, settings: EngineSettings) -> EngineInfo:
        """Wait for the model to load; raises `EngineLoadFailed` if it does not."""
        info: EngineInfo | None = None
        while info is None:
            await self.doorbell_recv.receive()
            for output in self.next_outputs():
                match output:
                    case CoreReady(info=ready):
                        info = ready
                    case CoreLoadFailed(error_type=error_type, error=error):
                        self.core_stopped.set()  # the core returned without a CoreStopped
                        raise EngineLoadFailed(
                            "executor", f"{settings.model_path}: {error_type}: {error}"
                        )
        return info

    async def wait_stopped(self) -> None:
        """Keep draining the outputs until the core says it stopped (the MLX thread blocks
        on a full output queue), so its thread can park for reuse. Bounded by
        CORE_STOP_TIMEOUT, then given up. Call shielded."""
        with trio.move_on_after(CORE_STOP_TIMEOUT):
            while not self.core_stopped.is_set():
                for output in self.next_outputs():
                    if isinstance(output, CoreStopped):
                        self.core_stopped.set()
                if not self.core_stopped.is_set():
                    await self.doorbell_recv.receive()


async def run(
    inbox: Inbox,
    settings: EngineSettings,
    events: trio.MemorySendChannel[EngineEvent],
    cache_index: Address | None = None,
    memory: MemoryWiring | None = None,
    ssd_writer: Any = None,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Load the model on an MLX thread, report `EngineInfo` as the readiness value, then
    serve the inbox until it is closed (drain) or this task is cancelled (abort).

    On drain (inbox closed), running requests finish normally before the core stops.
    With a `cache_index`, blocks the core stored are reported to it (`Stored`), finished
    requests release their pinned blocks (`Release`), and its `DropBlocks` evictions are
    passed on to the core. Those casts wait for room (never dropped): the index never
    blocks on us, so the wait is bounded by its own work.
    """
    link = _CoreLink.open()
    # New blocks on their way to the SSD writer. The writer takes a save within SAVE_WAIT_S
    # or drops it (counted); this buffer only smooths bursts, and past it saves are dropped
    # here, counted in `ssd_saves_dropped` and logged - inference never waits for the disk.
    # The channel's own bound is in saves (each at least one token); `_forward_saves`
    # applies the real one, in tokens.
    to_ssd, from_engine = trio.open_memory_channel[Any](SSD_FORWARD_BACKLOG_TOKENS)
    forwarded = trio.Event()
    core = EngineCore(settings, link.commands, link.outputs, link.notifier())
    acquire_worker().run_job(core.run)
    state = ExecutorState()
    try:
        info = await link.ready(settings)
        await _configure(state, info, settings, memory, link.commands)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, link, state, events, cache_index, ssd_writer, to_ssd)
            if ssd_writer is not None:
                nursery.start_soon(_forward_to_ssd, from_engine, ssd_writer, forwarded)
            else:
                forwarded.set()
            if memory is not None and state.ledger is not None:
                nursery.start_soon(watch_memory, state, info, memory, link.commands,
                                   cache_index, events)
                queued_send, queued_recv = trio.open_memory_channel[None](QUEUE_DOORBELL_CAPACITY)
                state.queued = queued_send
                nursery.start_soon(expire_waiting, state, memory.max_queue_wait_s, queued_recv,
                                   link.commands, events, cache_index)
            task_status.started(info)
            async for envelope in inbox:
                await _handle(envelope, state, link.commands, events, cache_index)
            await _drain(state, link, to_ssd, forwarded)
            nursery.cancel_scope.cancel()  # the memory watcher runs until told to stop
    finally:
        link.commands.put(CoreStop())
        with trio.CancelScope(shield=True):
            await link.wait_stopped()
            _fail_the_rest(state, events, cache_index)


async def _configure(state: ExecutorState, info: EngineInfo, settings: EngineSettings,
                     memory: MemoryWiring | None, commands: queue.SimpleQueue) -> None:
    """The loaded engine's facts into the state; with `memory`, admission by memory starts
    (raises `EngineLoadFailed` if the weights alone do not fit the budget)."""
    state.prefill_step_size = settings.prefill_step_size
    state.normal_prefill_step = settings.prefill_step_size
    state.block_size = info.block_size
    state.max_requests = settings.max_requests
    if memory is not None:
        state.gauge = memory.gauge
        try:
            await start_admission(state, info, memory, commands)
        except BudgetBelowWeights as exc:
            raise EngineLoadFailed("executor", str(exc)) from None


async def _pump(link: _CoreLink, state: ExecutorState, events, cache_index: Address | None,
                ssd_writer: Any, to_ssd) -> None:
    """Deliver the core's step outputs, in order, until it says it stopped."""
    async for _ in link.doorbell_recv:
        for output in link.next_outputs():
            match output:
                case StepOutput():
                    await _deliver(state, output, events, cache_index, link.commands)
                    if ssd_writer is not None:
                        _forward_saves(state, output, to_ssd)
                case CoreStopped():
                    link.core_stopped.set()
                    return


async def _drain(state: ExecutorState, link: _CoreLink, to_ssd, forwarded: trio.Event) -> None:
    """The inbox was closed: admit nothing new, let running (and queued) requests finish -
    woken when the last one leaves, not polling - then stop the core and let its last
    blocks reach the SSD writer (bounded by CORE_STOP_TIMEOUT). Cancelled while waiting,
    nothing is half done: the caller's finally stops the core and fails what is left."""
    state.stopping = True
    emptied = trio.Event()
    state.on_empty = emptied.set
    if state.by_slot:
        await emptied.wait()
    link.commands.put(CoreStop())
    await link.core_stopped.wait()
    # The engine's last blocks go to the SSD writer before we stop forwarding.
    to_ssd.close()
    with trio.move_on_after(CORE_STOP_TIMEOUT):
        await forwarded.wait()


def _fail_the_rest(state: ExecutorState, events, cache_index: Address | None) -> None:
    """Every request still known gets `Finished(ERROR, EngineStopped)` and is unpinned, and
    every `RestoreBlocks` caller an empty answer (it prefills instead). Never blocks."""
    for request in list(state.by_slot.values()):
        if cache_index is not None:
            cache_index.cast_nowait(Release(request_id=request.request_id))
        _finish_nowait(
            events,
            request,
            FinishReason.ERROR,
            "EngineStopped",
            "the engine stopped before the request finished",
        )
    state.by_slot.clear()
    state.by_id.clear()
    for envelope in state.restores.values():
        if not envelope.answered:
            envelope.reply(())  # nothing restored: the caller prefills instead
    state.restores.clear()


async def _handle(envelope, state: ExecutorState, commands: queue.SimpleQueue, events,
                  cache_index: Address | None = None) -> None:
    """One `ExecutorMessage`. Awaits only casts to the cache index (its handler never waits
    on us) and events for requests that leave the memory queue (the event channel has room
    in practice), both through `settle` / `leave_queue`; never MLX, never a reply. So the
    inbox is served at once. A `Submit` is answered before anything is
    awaited. Cancelled in between, the executor is stopping with its engine side (the
    index included): a request already forgotten here is not released there, and need
    not be."""
    match envelope.message:
        case Submit() as submit:
            if state.stopping:
                envelope.fail(EngineStopping("executor", "the engine is stopping"))
            elif submit.request_id in state.by_id:
                envelope.fail(
                    DuplicateRequest("executor", f"request {submit.request_id!r} is still running")
                )
            else:
                unpinned = admit(envelope, state, submit, commands)
                if unpinned and cache_index is not None:
                    await cache_index.cast(Release(request_id=submit.request_id))
                await settle(state, commands, events, cache_index)
        case Abort(request_id=request_id):
            request = state.by_id.get(request_id)
            if request is not None and request.request_id in state.waiting:
                # Still queued for memory: it never reached the engine.
                await leave_queue(state, request_id, commands, events, cache_index,
                                   FinishReason.ABORT)
                await settle(state, commands, events, cache_index)
            elif request is not None and not request.aborted:
                request.aborted = True
                commands.put(CoreAbort(request.slot))
            envelope.reply(None)
        case Ping():
            envelope.reply(_pong(state))
        case EngineStatsQuery():
            envelope.reply(_stats(state))
        case RestoreBlocks(blocks=blocks):
            tag = next(state.slots)
            state.restores[tag] = envelope
            commands.put(CoreRestoreBlocks(tag, tuple((b.hash, b.parent, b.tensors) for b in blocks)))
        case InjectFault() as fault:
            commands.put(CoreFault(fault.error, fault.at_step, fault.above_bytes, fault.kind,
                                   fault.prompt_token))
            envelope.reply(None)
        case DropBlocks(evictions=evictions):
            commands.put(CoreDropBlocks(tuple(evictions)))
            envelope.reply(None)
            if state.waiting:
                forget_dropped_prefixes(state, {e.hash for e in evictions}, commands)
                await settle(state, commands, events, cache_index)
        case other:
            unknown_message("executor", other)


def _forward_saves(state: ExecutorState, output: StepOutput, to_ssd) -> None:
    for block_hash, parent, scope, tokens, tensors in output.ssd_saves:
        # One engine's blocks all have the same size: queued saves x tokens per block. Within
        # this bound the channel (bounded in saves, each at least a token) always has room.
        if (to_ssd.statistics().current_buffer_used + 1) * tokens <= SSD_FORWARD_BACKLOG_TOKENS:
            to_ssd.send_nowait(Save(hash=block_hash, parent=parent, scope=scope, tokens=tokens,
                                    tensors=tensors))
        else:
            state.ssd_saves_dropped += 1
            # Counted in EngineStats/metrics; logged at powers of two, not once per block.
            if state.ssd_saves_dropped & (state.ssd_saves_dropped - 1) == 0:
                log.warning("SSD tier is behind the engine: %d block saves dropped so far",
                            state.ssd_saves_dropped)


async def _forward_to_ssd(from_engine, writer, forwarded: trio.Event) -> None:
    async for save in from_engine:
        await writer.save(save)  # waits at most SAVE_WAIT_S, then the writer counts a drop
    forwarded.set()


async def _send_event(events: trio.MemorySendChannel[EngineEvent], event: EngineEvent) -> None:
    """`events.send`, without its checkpoint when there is room: a step's output is one
    event per stream, and at 64 streams a scheduling round per event cost the engine's
    trio thread more than the events themselves. Still waits (backpressure) when full."""
    try:
        events.send_nowait(event)
    except trio.WouldBlock:
        await events.send(event)


async def _deliver(
    state: ExecutorState,
    output: StepOutput,
    events: trio.MemorySendChannel[EngineEvent],
    cache_index: Address | None,
    commands: queue.SimpleQueue,
) -> None:
    """Turn one step's output into events, dropping anything for aborted requests."""
    state.last = output
    for tag, stored in output.restored:
        if stored and cache_index is not None:
            await cache_index.cast(Stored(blocks=stored))
        envelope = state.restores.pop(tag, None)
        if envelope is not None:
            envelope.reply(tuple(b.hash for b in stored))
    if state.gauge is not None:
        state.gauge.active, state.gauge.cache, state.gauge.peak = (
            output.active_memory, output.cache_memory, output.peak_memory)
    if state.ledger is not None and state.ledger.cache_bytes != output.block_store_bytes:
        admit_now(state, state.ledger.update(cache_bytes=output.block_store_bytes), commands)
        await settle(state, commands, events, cache_index)
    if cache_index is not None and output.stored:
        await cache_index.cast(Stored(blocks=output.stored))
    state.last_step_at = time.monotonic()
    for slot, queued_s in output.admitted:
        request = state.by_slot.get(slot)
        if request is not None and not request.aborted:
            await _send_event(events, Admitted(request_id=request.request_id, queued_s=queued_s))
    for slot, done, total in output.progress:
        request = state.by_slot.get(slot)
        if request is not None and not request.aborted:
            await _send_event(events, PrefillProgress(request_id=request.request_id, done=done, total=total))
    by_slot: dict[int, list] = {}
    for slot, choice in output.tokens:
        by_slot.setdefault(slot, []).append(choice)
    for slot, choices in by_slot.items():
        request = state.by_slot.get(slot)
        if request is None or request.aborted:
            continue
        request.delivered += len(choices)
        await _send_event(
            events, TokenDelta(request_id=request.request_id, tokens=tuple(choices), step=output.step)
        )
    for done in output.finished:
        request = state.by_slot.get(done.slot)
        if request is None:
            continue
        state.remove(request)
        if state.ledger is not None:
            admit_now(state, state.ledger.finish(request.request_id), commands)
            state.floor_priced.discard(request.request_id)
            restore_prefill_step(state, commands)
        if cache_index is not None:
            await cache_index.cast(Release(request_id=request.request_id))
        # After the release: a cache cut for the queue's head then evicts its blocks first.
        await settle(state, commands, events, cache_index)
        reason = FinishReason.ABORT if request.aborted else done.reason
        await _send_event(
            events,
            Finished(
                request_id=request.request_id,
                reason=reason,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=request.delivered,
                step=done.step,
                cached_tokens=done.cached_tokens,
                error=done.error,
                error_type=done.error_type,
            )
        )


def _finish_nowait(events, request: TrackedRequest, reason: FinishReason, error_type: str, error: str):
    try:
        events.send_nowait(
            Finished(
                request_id=request.request_id,
                reason=reason,
                prompt_tokens=request.prompt_tokens,
                completion_tokens=request.delivered,
                error=error,
                error_type=error_type,
            )
        )
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the dispatcher fails its sessions itself when the executor is gone


def _pong(state: ExecutorState) -> Pong:
    last = state.last
    age = None if state.last_step_at is None else time.monotonic() - state.last_step_at
    return Pong(
        steps=last.step if last else 0,
        last_step_age=age,
        running=last.running if last else 0,
        waiting=(last.waiting if last else 0) + len(state.waiting),
    )


def _stats(state: ExecutorState) -> EngineStats:
    last = state.last
    if last is None:
        return EngineStats(
            steps=0, running=0, waiting=0, prompt_tokens_processed=0, generation_tokens=0,
            buffer_cache_clears=0, active_memory_bytes=0, cache_memory_bytes=0,
            peak_memory_bytes=0,
        )
    return EngineStats(
        steps=last.step,
        running=last.running,
        waiting=last.waiting + len(state.waiting),
        prompt_tokens_processed=last.prompt_tokens_processed,
        generation_tokens=last.generation_tokens,
        buffer_cache_clears=last.buffer_cache_clears,
        active_memory_bytes=last.active_memory,
        cache_memory_bytes=last.cache_memory,
        peak_memory_bytes=last.peak_memory,
        prefix_cache_bytes=last.block_store_bytes,
        ssd_saves_dropped=state.ssd_saves_dropped,
        prefill_passes=last.prefill_passes,
    )


__all__ = [
    "CORE_STOP_TIMEOUT",
    "ENGINE_EVENT_BACKLOG",
    "STEP_BACKLOG",
    "DuplicateRequest",
    "EngineLoadFailed",
    "EngineStopping",
    "ExecutorMessage",
    "ExecutorState",
    "run",
]
