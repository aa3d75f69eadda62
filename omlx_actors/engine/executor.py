"""The GPU executor actor: the trio face of the engine core.

It owns the request table (request id → slot) and one `EngineCore` running on an MLX worker
thread. Its inbox takes `Submit`, `Abort`, `Ping` and `EngineStatsQuery`; its output is a
stream of `EngineEvent`s on the `events` channel, which the front's dispatcher routes to
sessions by request id. The trio loop never waits on MLX: commands go to the MLX thread
through a queue, and step outputs come back through a bounded queue plus a doorbell rung
with `TrioToken.run_sync_soon` (non-blocking for the MLX thread).

Ordering contract: an `Abort` handled by this actor takes effect for every step output the
pump has not yet delivered - tokens of the step in flight are dropped for the aborted
request, and its `Finished(ABORT)` is sent once the MLX thread confirms the removal.

Cancellation contract: when `run` is cancelled or crashes, every request it knew of gets a
`Finished(ERROR)` event (sent without blocking, in a shielded finally), so no session waits
forever; the core is told to stop, and its thread parks for reuse.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import time
from typing import Any

import attrs
import trio

from omlx_actors.cache.actor import DropBlocks, Release, Stored
from omlx_actors.engine.core import (
    CoreAbort,
    CoreDropBlocks,
    CoreRestoreBlocks,
    CoreSetLimits,
    CoreSetPrefillStep,
    CoreFault,
    CoreLoadFailed,
    CoreReady,
    CoreStop,
    CoreStopped,
    CoreSubmit,
    EngineCore,
    EngineSettings,
    StepOutput,
)
from omlx_actors.engine.messages import (
    Abort,
    Admitted,
    EngineEvent,
    EngineInfo,
    EngineStats,
    EngineStatsQuery,
    Finished,
    FinishReason,
    InjectFault,
    Ping,
    RestoreBlocks,
    PrefillProgress,
    Pong,
    Submit,
    TokenDelta,
)
from omlx_actors.engine.mlx_thread import acquire_worker
from omlx_actors.cache.actor import SetBudget
from omlx_actors.memory.admission import (
    AdmissionLedger,
    Admitted as LedgerAdmitted,
    HeadAction,
    Queued,
    QueueFullRefusal,
    Refused,
    RequestCost,
    unblock,
)
from omlx_actors.memory.enforcer import MemoryLevel
from omlx_actors.memory.estimator import (
    ModelMemoryFacts,
    estimate_request_bytes,
    padded_batch_kv_bytes,
)
from omlx_actors.runtime import ActorError, Address, Inbox, unknown_message
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

# A draining executor checks this often whether its last request has finished.
DRAIN_POLL_INTERVAL = 0.01

# A decode batch holds one KV buffer padded to its longest row; it admits rows by
# concatenating the prefilled batch's buffer onto it, so for a moment the old buffer, the
# joining one and the result coexist: the batch's KV is priced three times. (Priced once or
# twice, the 200-request replay test's MLX peak overshot its budget by 3-6%.)
BATCH_KV_COPIES = 3

# Saves in flight from the engine to the SSD writer (see `run`), counted in tokens so that
# the bound means the same bytes and the same burst whatever the block size (32 blocks of
# 256 tokens; 128 of the 64-token blocks attention-only models default to).
SSD_FORWARD_BACKLOG_TOKENS = 8192

# Under memory pressure prefill chunks shrink, but not below this many tokens (smaller
# chunks cost more per token than the scratch they save).
PREFILL_STEP_FLOOR = 64

# How long a request may wait in the memory queue by default before it is refused
# (`RuntimeConfig.max_queue_wait_s`); see `_expire_waiting`.
MAX_QUEUE_WAIT_S = 120.0

# The queue-expiry task's doorbell: "a request was queued, look at the deadlines again".
# One pending ring says it all; further rings while it is unread are dropped (send_nowait
# finds it full), never waited for.
QUEUE_DOORBELL_CAPACITY = 1


class EngineLoadFailed(ActorError):
    """The model could not be loaded; the executor never became ready."""


class DuplicateRequest(ActorError):
    """A `Submit` reused the id of a request that is still running."""


class EngineStopping(ActorError):
    """The executor is shutting down and admits nothing new."""


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


@attrs.define
class MlxGauge:
    """MLX's memory as of the engine's last step. Written only by the executor; the memory
    enforcer reads it (MLX itself may only be asked on the MLX thread)."""

    active: int = 0
    cache: int = 0
    peak: int = 0

    def reading(self) -> tuple[int, int, int]:
        return self.active, self.cache, self.peak


@attrs.frozen(kw_only=True)
class MemoryWiring:
    """What the executor needs to admit by memory (in-process wiring, not a message)."""

    gauge: MlxGauge
    snapshots: Any  # an enforcer SnapshotSubscription: latest snapshot wins
    limits_for: Any  # budget, weights -> MlxLimits
    max_waiting: int
    prefix_cache_bytes: int  # the configured prefix cache budget, restored when calm
    prefill_step_size: int
    prefill_batch_size: int
    prefill_step_floor: int = PREFILL_STEP_FLOOR
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S


@attrs.define
class _Request:
    request_id: str
    slot: int
    prompt_tokens: int
    aborted: bool = False
    delivered: int = 0


@attrs.define
class ExecutorState:
    """The executor's trio-side bookkeeping (pure: no trio, no MLX)."""

    by_id: dict[str, _Request] = attrs.field(factory=dict)
    by_slot: dict[int, _Request] = attrs.field(factory=dict)
    slots: itertools.count = attrs.field(factory=lambda: itertools.count(1))
    last: StepOutput | None = None
    last_step_at: float | None = None
    stopping: bool = False
    # Memory admission (None: requests are not priced).
    ledger: AdmissionLedger | None = None
    facts: ModelMemoryFacts | None = None
    block_size: int = 0
    prefill_step_size: int = 512
    waiting: dict[str, CoreSubmit] = attrs.field(factory=dict)  # queued for memory
    gauge: MlxGauge | None = None
    max_requests: int = 1 << 30  # unpriced admission: batch + waiting bound
    cache_shrunk: bool = False  # the prefix cache budget was cut to make room
    cache_target: int | None = None  # the last budget cut sent for the queue's head
    queued: Any = None  # a trio send channel: rung when a request joins the memory queue
    under_pressure: bool = False  # the enforcer's last level was soft or hard
    normal_prefill_step: int = 512  # the configured chunk, restored when nothing needs less
    floor_priced: set[str] = attrs.field(factory=set)  # admitted only with floor-sized chunks
    restores: dict[int, Any] = attrs.field(factory=dict)  # RestoreBlocks callers by tag
    ssd_saves_dropped: int = 0

    def add(self, submit: Submit) -> _Request:
        request = _Request(submit.request_id, next(self.slots), len(submit.prompt_tokens))
        self.by_id[request.request_id] = request
        self.by_slot[request.slot] = request
        return request

    def remove(self, request: _Request) -> None:
        self.by_slot.pop(request.slot, None)
        if self.by_id.get(request.request_id) is request:
            del self.by_id[request.request_id]


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
    commands: queue.SimpleQueue = queue.SimpleQueue()
    outputs: queue.Queue = queue.Queue(maxsize=STEP_BACKLOG)
    doorbell_send, doorbell_recv = trio.open_memory_channel[None](1)
    token = trio.lowlevel.current_trio_token()

    def ring() -> None:  # runs on the trio thread, scheduled by the MLX thread
        try:
            doorbell_send.send_nowait(None)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass  # already ringing, or we are gone: either way nothing to add

    def notify() -> None:  # runs on the MLX thread; never blocks it
        try:
            token.run_sync_soon(ring)
        except trio.RunFinishedError:
            pass

    # New blocks on their way to the SSD writer. The writer takes a save within SAVE_WAIT_S
    # or drops it (counted); this buffer only smooths bursts, and past it saves are dropped
    # here, counted in `ssd_saves_dropped` and logged - inference never waits for the disk.
    # The channel's own bound is in saves (each at least one token); `_forward_saves`
    # applies the real one, in tokens.
    to_ssd, from_engine = trio.open_memory_channel[Any](SSD_FORWARD_BACKLOG_TOKENS)
    forwarded = trio.Event()
    core = EngineCore(settings, commands, outputs, notify)
    acquire_worker().run_job(core.run)
    state = ExecutorState()
    core_stopped = trio.Event()

    def next_outputs():
        while True:
            try:
                yield outputs.get_nowait()
            except queue.Empty:
                return

    async def pump() -> None:
        async for _ in doorbell_recv:
            for output in next_outputs():
                match output:
                    case StepOutput():
                        await _deliver(state, output, events, cache_index, commands)
                        if ssd_writer is not None:
                            _forward_saves(state, output, to_ssd)
                    case CoreStopped():
                        core_stopped.set()
                        return

    try:
        # Readiness: wait for the model to load (or fail) before accepting work.
        info: EngineInfo | None = None
        while info is None:
            await doorbell_recv.receive()
            for output in next_outputs():
                match output:
                    case CoreReady(info=ready):
                        info = ready
                    case CoreLoadFailed(error_type=error_type, error=error):
                        core_stopped.set()  # the core returned without a CoreStopped
                        raise EngineLoadFailed(
                            "executor", f"{settings.model_path}: {error_type}: {error}"
                        )
        state.prefill_step_size = settings.prefill_step_size
        state.normal_prefill_step = settings.prefill_step_size
        state.block_size = info.block_size
        state.max_requests = settings.max_requests
        if memory is not None:
            state.gauge = memory.gauge
            await _start_admission(state, info, memory, commands)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            if ssd_writer is not None:
                nursery.start_soon(_forward_to_ssd, from_engine, ssd_writer, forwarded)
            else:
                forwarded.set()
            if memory is not None and state.ledger is not None:
                nursery.start_soon(_watch_memory, state, info, memory, commands, cache_index,
                                   events)
                queued_send, queued_recv = trio.open_memory_channel[None](QUEUE_DOORBELL_CAPACITY)
                state.queued = queued_send
                nursery.start_soon(_expire_waiting, state, memory.max_queue_wait_s, queued_recv,
                                   commands, events, cache_index)
            task_status.started(info)
            async for envelope in inbox:
                await _handle(envelope, state, commands, events, cache_index)
            # Drain: the inbox was closed. Let running requests finish, then stop the core.
            state.stopping = True
            while state.by_slot:
                await trio.sleep(DRAIN_POLL_INTERVAL)
            commands.put(CoreStop())
            await core_stopped.wait()
            # The engine's last blocks go to the SSD writer before we stop forwarding.
            to_ssd.close()
            with trio.move_on_after(CORE_STOP_TIMEOUT):
                await forwarded.wait()
            nursery.cancel_scope.cancel()  # the memory watcher runs until told to stop
    finally:
        commands.put(CoreStop())
        with trio.CancelScope(shield=True):
            # The MLX thread blocks on a full output queue: keep draining it until the core
            # says it stopped, so its thread can park for reuse. Bounded, then given up.
            with trio.move_on_after(CORE_STOP_TIMEOUT):
                while not core_stopped.is_set():
                    for output in next_outputs():
                        if isinstance(output, CoreStopped):
                            core_stopped.set()
                    if not core_stopped.is_set():
                        await doorbell_recv.receive()
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
    """One inbox message. Awaits only casts to the cache index (its handler never waits on
    us) and events for requests that leave the memory queue (the event channel has room in
    practice), so the inbox is served at once. A `Submit` is answered before anything is
    awaited. Cancelled in between, the executor is stopping with its engine side (the
    index included): a request already forgotten here is not released there, and need
    not be."""
    if isinstance(envelope.message, RestoreBlocks):
        tag = next(state.slots)
        state.restores[tag] = envelope
        commands.put(CoreRestoreBlocks(
            tag, tuple((b.hash, b.parent, b.tensors) for b in envelope.message.blocks)))
        return
    match envelope.message:
        case Submit() as submit:
            if state.stopping:
                envelope.fail(EngineStopping("executor", "the engine is stopping"))
            elif submit.request_id in state.by_id:
                envelope.fail(
                    DuplicateRequest("executor", f"request {submit.request_id!r} is still running")
                )
            else:
                unpinned = _admit(envelope, state, submit, commands)
                if unpinned and cache_index is not None:
                    await cache_index.cast(Release(request_id=submit.request_id))
                await _settle(state, commands, events, cache_index)
        case Abort(request_id=request_id):
            request = state.by_id.get(request_id)
            if request is not None and request.request_id in state.waiting:
                # Still queued for memory: it never reached the engine.
                await _leave_queue(state, request_id, commands, events, cache_index,
                                   FinishReason.ABORT)
                await _settle(state, commands, events, cache_index)
            elif request is not None and not request.aborted:
                request.aborted = True
                commands.put(CoreAbort(request.slot))
            envelope.reply(None)
        case Ping():
            envelope.reply(_pong(state))
        case EngineStatsQuery():
            envelope.reply(_stats(state))
        case InjectFault() as fault:
            commands.put(CoreFault(fault.error, fault.at_step, fault.above_bytes, fault.kind,
                                   fault.prompt_token))
            envelope.reply(None)
        case DropBlocks(evictions=evictions):
            commands.put(CoreDropBlocks(tuple(evictions)))
            envelope.reply(None)
            if state.waiting:
                _forget_dropped_prefixes(state, {e.hash for e in evictions}, commands)
                await _settle(state, commands, events, cache_index)
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


def _request_cost(state: ExecutorState, submit: Submit, prefill_chunk: int) -> RequestCost:
    cached = len(submit.cached_blocks) * state.block_size
    estimate = estimate_request_bytes(
        state.facts,
        prompt_tokens=len(submit.prompt_tokens),
        cached_tokens=min(cached, len(submit.prompt_tokens) - 1),
        max_tokens=submit.max_tokens,
        prefill_chunk=prefill_chunk,
        prefix_shared=False,  # the restored prefix is copied into the batch
    )
    return RequestCost(
        context_tokens=estimate.kv_capacity_tokens,
        other_bytes=estimate.scratch_bytes + estimate.recurrent_state_bytes,
    )


def _price(state: ExecutorState, submit: Submit) -> tuple[RequestCost, int] | Refused:
    """The cost of `submit` as it would run, and the prefill chunk it is priced at; or the
    ledger's `Refused` if it can never fit, even alone.

    "Never fits" is judged at the smallest prefill chunk we would use: a request that fits
    with chunks at the floor is not refused - chunks shrink to the floor while it is
    admitted, and grow back once it has finished (see `_deliver`)."""
    floor = min(state.prefill_step_size, PREFILL_STEP_FLOOR)
    refusal = None
    for chunk in dict.fromkeys((state.prefill_step_size, floor)):
        cost = _request_cost(state, submit, chunk)
        refusal = state.ledger.refusal(submit.request_id, cost)
        if refusal is None:
            return cost, chunk
    assert refusal is not None
    return refusal


def _use_chunk(state: ExecutorState, request_id: str, chunk: int, commands: queue.SimpleQueue) -> None:
    """A request priced at the floor chunk: prefill at that chunk until it has finished."""
    if chunk != state.prefill_step_size:
        state.floor_priced.add(request_id)
        state.prefill_step_size = chunk
        commands.put(CoreSetPrefillStep(chunk))


def _restore_prefill_step(state: ExecutorState, commands: queue.SimpleQueue) -> None:
    """The configured prefill chunk again, once no request priced at the floor is left
    (and no memory pressure keeps chunks small)."""
    if (not state.floor_priced and not state.under_pressure
            and state.prefill_step_size != state.normal_prefill_step):
        state.prefill_step_size = state.normal_prefill_step
        commands.put(CoreSetPrefillStep(state.normal_prefill_step))


def _admit(envelope, state: ExecutorState, submit: Submit, commands: queue.SimpleQueue) -> bool:
    """Price the request and admit, queue or refuse it (see memory/admission.py). Returns
    whether the request gave up its cached prefix (the caller unpins it in the index).

    A cached prefix is restored into a buffer of exactly its length, which the prefill
    then grows by a whole 256-position step: with a prefix the same prompt may cost more
    than without. A request that fits only without its prefix runs without it (issue #15:
    the same request got 200, then 413 once its blocks were cached).

    Order of refusals: one that can never fit (413) before a full queue (429) - a client
    retrying a request that can never run would retry forever. The count bound (batch +
    waiting) holds whether or not requests are priced."""
    full = len(state.by_slot) >= state.max_requests

    def queue_full() -> None:
        envelope.fail(AdmissionQueueFull(
            "executor", f"{len(state.by_slot)} requests are queued or running; retry shortly"))

    if state.ledger is None:
        if full:
            queue_full()
            return False
        request = state.add(submit)
        commands.put(CoreSubmit(request.slot, submit, time.monotonic()))
        envelope.reply(None)
        return False
    unpinned = False
    priced = _price(state, submit)
    if isinstance(priced, Refused) and submit.cached_blocks:
        plain = attrs.evolve(submit, cached_blocks=())
        plain_priced = _price(state, plain)
        if not isinstance(plain_priced, Refused):
            submit, priced, unpinned = plain, plain_priced, True
    if isinstance(priced, Refused):
        envelope.fail(MemoryRefused("executor", priced.reason, priced.needed_bytes,
                                    priced.available_bytes))
        return False
    if full:
        queue_full()
        return unpinned
    cost, chunk = priced
    match state.ledger.submit(submit.request_id, cost):
        case LedgerAdmitted():
            _use_chunk(state, submit.request_id, chunk, commands)
            request = state.add(submit)
            commands.put(CoreSubmit(request.slot, submit, time.monotonic()))
            envelope.reply(None)
        case Queued():
            _use_chunk(state, submit.request_id, chunk, commands)
            request = state.add(submit)
            state.waiting[submit.request_id] = CoreSubmit(request.slot, submit, time.monotonic())
            if state.queued is not None:
                try:
                    state.queued.send_nowait(None)
                except trio.WouldBlock:
                    pass  # a ring is pending: the expiry task will see this request too
            envelope.reply(None)
        case Refused(reason=reason, needed_bytes=needed, available_bytes=available):
            envelope.fail(MemoryRefused("executor", reason, needed, available))
        case QueueFullRefusal(waiting=waiting):
            envelope.fail(AdmissionQueueFull(
                "executor", f"{waiting} requests already wait for memory; retry shortly"))
    return unpinned


async def _leave_queue(state: ExecutorState, request_id: str, commands: queue.SimpleQueue,
                       events, cache_index: Address | None, reason: FinishReason,
                       error_type: str | None = None, error: str | None = None) -> None:
    """A request leaves the memory queue without running (aborted, refused, expired): it is
    forgotten at once (nothing is awaited before that), then unpinned and finished.

    What its leaving lets in goes to the engine: the ledger may admit requests queued
    behind it (an aborted queued request once left those admitted in the ledger but never
    sent to the engine, to wait forever), and its pinned prefix is released (it was not)."""
    command = state.waiting.pop(request_id)
    request = state.by_id.get(request_id)
    if request is not None:
        state.remove(request)
    state.floor_priced.discard(request_id)
    _restore_prefill_step(state, commands)
    _admit_now(state, state.ledger.finish(request_id), commands)
    if command.submit.cached_blocks and cache_index is not None:
        await cache_index.cast(Release(request_id=request_id))
    await events.send(Finished(
        request_id=request_id, reason=reason, prompt_tokens=len(command.submit.prompt_tokens),
        completion_tokens=0, error=error, error_type=error_type))


def _forget_dropped_prefixes(state: ExecutorState, dropped: set[str],
                             commands: queue.SimpleQueue) -> None:
    """The index evicted blocks (maybe ones a waiting request pinned, when its budget was
    cut below what requests pin): a waiting request keeps the part of its prefix before the
    first dropped block - the engine will restore no more - and is priced again for it.
    Admitted requests need nothing: their `CoreSubmit` reached the engine before this
    eviction, so their prefix was copied first."""
    for request_id, command in list(state.waiting.items()):
        blocks = command.submit.cached_blocks
        kept = next((i for i, h in enumerate(blocks) if h in dropped), len(blocks))
        if kept == len(blocks):
            continue
        submit = attrs.evolve(command.submit, cached_blocks=blocks[:kept])
        state.waiting[request_id] = attrs.evolve(command, submit=submit)
        priced = _price(state, submit)
        if not isinstance(priced, Refused):  # else `_settle` refuses it when it is the head
            _use_chunk(state, request_id, priced[1], commands)
            _admit_now(state, state.ledger.reprice(request_id, priced[0]), commands)


async def _settle(state: ExecutorState, commands: queue.SimpleQueue, events,
                  cache_index: Address | None) -> None:
    """Make sure the head of the memory queue waits only for what will come: running
    requests finishing, or the prefix cache giving memory back (`admission.unblock`).
    Called after every change of the ledger.

    The head gives up its cached prefix first (unpinned in the index), then the cache is
    cut by what the head lacks (the index evicts pinned blocks too if it must: it never
    holds more than its budget); a head that nothing will make room for is refused with
    `Finished(error, MemoryRefused)` - 413 before the first byte, an error event after."""
    ledger = state.ledger
    if ledger is None:
        return
    while (head := ledger.blocked_head()) is not None:
        command = state.waiting[head.request_id]
        action = unblock(head, has_prefix=bool(command.submit.cached_blocks))
        if action is HeadAction.DROP_PREFIX:
            plain = attrs.evolve(command.submit, cached_blocks=())
            priced = _price(state, plain)
            if isinstance(priced, Refused):
                action = HeadAction.REFUSE
            else:
                state.waiting[head.request_id] = attrs.evolve(command, submit=plain)
                _use_chunk(state, head.request_id, priced[1], commands)
                _admit_now(state, ledger.reprice(head.request_id, priced[0]), commands)
                if cache_index is not None:
                    await cache_index.cast(Release(request_id=head.request_id))
                continue
        if action is HeadAction.SHRINK_CACHE and cache_index is not None:
            target = max(0, head.cache_bytes - head.shortfall_bytes)
            if state.cache_target is None or target < state.cache_target:
                state.cache_target = target
                state.cache_shrunk = True
                await cache_index.cast(SetBudget(budget_bytes=target))
            return  # the engine's next report of its block store's bytes decides again
        if action is HeadAction.WAIT:
            return
        refusal = ledger.refusal(head.request_id, ledger.waiting[0][1])
        await _leave_queue(
            state, head.request_id, commands, events, cache_index, FinishReason.ERROR,
            "MemoryRefused",
            f"{refusal.reason} (the budget moved while it waited)" if refusal is not None else
            f"it lacks {head.shortfall_bytes} bytes and nothing running will free them",
        )


async def _expire_waiting(state: ExecutorState, max_wait_s: float, queued,
                          commands: queue.SimpleQueue, events,
                          cache_index: Address | None) -> None:
    """Refuse every request that has waited `max_wait_s` in the memory queue (counted from
    its arrival at the executor) with `Finished(error, QueueTimeout)`: 503 with Retry-After
    before the first byte, an error event after. Sleeps until the oldest deadline or until
    `queued` rings (a request joined). Runs until cancelled; a cancellation leaves nothing
    half done (a request is forgotten before anything is awaited for it)."""
    while True:
        now = time.monotonic()
        expired = [r for r, c in state.waiting.items() if c.received_at + max_wait_s <= now]
        for request_id in expired:
            command = state.waiting.get(request_id)
            if command is not None:
                await _leave_queue(
                    state, request_id, commands, events, cache_index, FinishReason.ERROR,
                    "QueueTimeout",
                    f"waited {now - command.received_at:.1f} s for memory (the limit is "
                    f"{max_wait_s:g} s); retry later")
        if expired:
            await _settle(state, commands, events, cache_index)
        oldest = min((c.received_at for c in state.waiting.values()), default=None)
        timeout = math.inf if oldest is None else oldest + max_wait_s - time.monotonic()
        with trio.move_on_after(max(timeout, 0)):
            await queued.receive()


def _admit_now(state: ExecutorState, request_ids: list[str], commands: queue.SimpleQueue) -> None:
    for request_id in request_ids:
        command = state.waiting.pop(request_id, None)
        if command is not None:
            commands.put(command)


async def _start_admission(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
                           commands: queue.SimpleQueue) -> None:
    """Read the model's memory facts and the first snapshot; apply MLX's limits."""
    if info.memory_config is None:
        return
    config = {k: json.loads(v) for k, v in info.memory_config}
    try:
        state.facts = ModelMemoryFacts.from_config(config, weights_bytes=info.weights_bytes)
    except ValueError as exc:
        log.warning("cannot price requests for this model (%s): admission by memory is off", exc)
        return
    snapshot = await memory.snapshots.receive()
    try:
        limits = memory.limits_for(snapshot.budget_bytes, info.weights_bytes)
    except ValueError as exc:  # the weights do not fit the budget: this engine cannot start
        raise EngineLoadFailed("executor", str(exc)) from None
    commands.put(CoreSetLimits(limits.memory_limit, limits.cache_limit, limits.wired_limit))
    facts = state.facts

    prefill_rows = memory.prefill_batch_size

    def batch_cost(requests) -> int:
        # KV: every row padded to the longest. Scratch: prompts prefilled together are
        # padded to the longest too, and at most `prefill_rows` prefill at once.
        longest = max((r.context_tokens for r in requests), default=0)
        kv = padded_batch_kv_bytes(facts, rows=len(requests), longest_context=longest)
        scratch = min(len(requests), prefill_rows) * max((r.other_bytes for r in requests), default=0)
        return BATCH_KV_COPIES * kv + scratch

    state.ledger = AdmissionLedger(
        weights_bytes=info.weights_bytes,
        budget_bytes=snapshot.budget_bytes,
        batch_cost=batch_cost,
        reserved_bytes=limits.cache_limit,
        max_waiting=memory.max_waiting,
    )


async def _watch_memory(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
                        commands: queue.SimpleQueue, cache_index: Address | None,
                        events) -> None:
    """Follow the enforcer's snapshots: new budget or pressure → admit, degrade, recover.

    Under pressure, in order: shrink the prefix cache (to a quarter of its budget), shrink
    prefill chunks (halving, down to a floor), pause admission (hard level). Never a
    running request is killed. When the level is back to ok, all three are undone."""
    degraded = False
    async for snapshot in memory.snapshots:
        pressure = snapshot.level is not MemoryLevel.OK
        if pressure and not degraded and cache_index is not None:
            quarter = memory.prefix_cache_bytes // 4
            if state.cache_target is not None:
                quarter = min(quarter, state.cache_target)  # never undo a cut for the queue
            await cache_index.cast(SetBudget(budget_bytes=quarter))
        if pressure:
            step = max(memory.prefill_step_floor, state.prefill_step_size // 2)
            if step != state.prefill_step_size:
                state.prefill_step_size = step
                commands.put(CoreSetPrefillStep(step))
        elif degraded and not state.floor_priced:
            state.prefill_step_size = memory.prefill_step_size
            commands.put(CoreSetPrefillStep(memory.prefill_step_size))
        if not pressure and (degraded or state.cache_shrunk) and not state.waiting:
            state.cache_shrunk = False
            state.cache_target = None
            if cache_index is not None:
                await cache_index.cast(SetBudget(budget_bytes=memory.prefix_cache_bytes))
        degraded = state.under_pressure = pressure
        limits = memory.limits_for(snapshot.budget_bytes, info.weights_bytes)
        _admit_now(state, state.ledger.update(
            budget_bytes=snapshot.budget_bytes,
            reserved_bytes=limits.cache_limit,
            paused=snapshot.level is MemoryLevel.HARD,
        ), commands)
        await _settle(state, commands, events, cache_index)  # the budget may have moved


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
        _admit_now(state, state.ledger.update(cache_bytes=output.block_store_bytes), commands)
        await _settle(state, commands, events, cache_index)
    if cache_index is not None and output.stored:
        await cache_index.cast(Stored(blocks=output.stored))
    state.last_step_at = time.monotonic()
    for slot, queued_s in output.admitted:
        request = state.by_slot.get(slot)
        if request is not None and not request.aborted:
            await events.send(Admitted(request_id=request.request_id, queued_s=queued_s))
    for slot, done, total in output.progress:
        request = state.by_slot.get(slot)
        if request is not None and not request.aborted:
            await events.send(PrefillProgress(request_id=request.request_id, done=done, total=total))
    by_slot: dict[int, list] = {}
    for slot, choice in output.tokens:
        by_slot.setdefault(slot, []).append(choice)
    for slot, choices in by_slot.items():
        request = state.by_slot.get(slot)
        if request is None or request.aborted:
            continue
        request.delivered += len(choices)
        await events.send(
            TokenDelta(request_id=request.request_id, tokens=tuple(choices), step=output.step)
        )
    for done in output.finished:
        request = state.by_slot.get(done.slot)
        if request is None:
            continue
        state.remove(request)
        if state.ledger is not None:
            _admit_now(state, state.ledger.finish(request.request_id), commands)
            state.floor_priced.discard(request.request_id)
            _restore_prefill_step(state, commands)
        if cache_index is not None:
            await cache_index.cast(Release(request_id=request.request_id))
        # After the release: a cache cut for the queue's head then evicts its blocks first.
        await _settle(state, commands, events, cache_index)
        reason = FinishReason.ABORT if request.aborted else done.reason
        await events.send(
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


def _finish_nowait(events, request: _Request, reason: FinishReason, error_type: str, error: str):
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
    "ExecutorState",
    "run",
]
