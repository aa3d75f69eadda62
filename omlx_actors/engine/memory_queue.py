"""The executor's admission by memory: the effectful shell around `memory/policy.py`.

The executor (`engine/executor.py`) owns the state (`ExecutorState`: the ledger, the
requests waiting for memory) and calls in here: `admit` a `Submit` (the policy's
`decide_submit`, applied), `settle` the queue after every change of the ledger so that no
request waits on memory that nothing will free (the policy's `settle_step`, applied until
the head waits), `leave_queue` for a request that goes without running (aborted, refused,
expired), `expire_waiting` (the task that bounds the time in the queue), `watch_memory`
(the task that follows the enforcer's snapshots: `pressure_actions`, applied). Every
decision is made by the pure policy; this module reads its inputs and applies its answers.

Everything here runs on the executor's trio thread and shares its state; a function that
awaits says what it has already done by then, so a concurrent one finds the state whole.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import time
from typing import Any

import attrs
import trio

from omlx_actors.cache.actor import Release, SetCacheBudget
from omlx_actors.engine.core_messages import (
    CoreSetLimits,
    CoreSetPrefillStep,
    CoreSubmit,
)
from omlx_actors.engine.messages import (
    AdmissionQueueFull,
    EngineInfo,
    Finished,
    FinishReason,
    MemoryRefused,
    Submit,
)
from omlx_actors.engine.request_table import ExecutorState, MlxGauge
from omlx_actors.kernel import Address
from omlx_actors.memory.admission import AdmissionLedger, Refused
from omlx_actors.memory.enforcer import MemoryLevel
from omlx_actors.memory.estimator import ModelMemoryFacts
from omlx_actors.memory.policy import (
    PREFILL_STEP_FLOOR,
    DropPrefix,
    ForgetCacheCut,
    KeepWaiting,
    PressureReading,
    RefuseHead,
    RefuseQueueFull,
    RefuseTooLarge,
    RequestShape,
    RunNow,
    SendCacheBudget,
    SetPrefillStep,
    SetUnderPressure,
    ShrinkCache,
    UpdateLedger,
    WaitForMemory,
    decide_submit,
    next_expiry,
    overdue,
    padded_batch_cost,
    pressure_actions,
    price,
    settle_step,
)

log = logging.getLogger(__name__)

# How long a request may wait in the memory queue by default before it is refused
# (`RuntimeConfig.max_queue_wait_s`); see `expire_waiting`.
MAX_QUEUE_WAIT_S = 120.0

# The queue-expiry task's doorbell: "a request was queued, look at the deadlines again".
# One pending ring says it all; further rings while it is unread are dropped (send_nowait
# finds it full), never waited for.
QUEUE_DOORBELL_CAPACITY = 1


class BudgetBelowWeights(Exception):
    """The weights alone do not fit the memory budget: this engine cannot start (the
    executor reports it as its `EngineLoadFailed`)."""


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


def shape_of(state: ExecutorState, submit: Submit) -> RequestShape:
    """What the policy prices of `submit`."""
    return RequestShape(prompt_tokens=len(submit.prompt_tokens), max_tokens=submit.max_tokens,
                        prefix_blocks=len(submit.cached_blocks), block_size=state.block_size)


def admit(envelope, state: ExecutorState, submit: Submit, commands: queue.SimpleQueue) -> bool:
    """Admit, queue or refuse a new request (answering `envelope`); with a ledger, as the
    policy's `decide_submit` says. Returns whether the request gave up its cached prefix
    (the caller unpins it in the index). Never awaits.

    The count bound (batch + waiting) holds whether or not requests are priced."""
    if state.ledger is None:
        if len(state.by_slot) >= state.max_requests:
            envelope.fail(AdmissionQueueFull(
                "executor", f"{len(state.by_slot)} requests are queued or running; retry shortly"))
            return False
        request = state.add(submit)
        commands.put(CoreSubmit(request.slot, submit, time.monotonic()))
        envelope.reply(None)
        return False
    decision = decide_submit(state.ledger, state.facts, submit.request_id, shape_of(state, submit),
                             prefill_step=state.prefill_step_size,
                             requests=len(state.by_slot), max_requests=state.max_requests)
    if decision.unpinned:
        submit = attrs.evolve(submit, cached_blocks=())
    match decision:
        case RunNow(priced=priced):
            use_chunk(state, submit.request_id, priced.chunk, commands)
            request = state.add(submit)
            commands.put(CoreSubmit(request.slot, submit, time.monotonic()))
            envelope.reply(None)
        case WaitForMemory(priced=priced):
            use_chunk(state, submit.request_id, priced.chunk, commands)
            request = state.add(submit)
            state.waiting[submit.request_id] = CoreSubmit(request.slot, submit, time.monotonic())
            if state.queued is not None:
                try:
                    state.queued.send_nowait(None)
                except trio.WouldBlock:
                    pass  # a ring is pending: the expiry task will see this request too
            envelope.reply(None)
        case RefuseTooLarge(refusal=refusal):
            envelope.fail(MemoryRefused("executor", refusal.reason, refusal.needed_bytes,
                                        refusal.available_bytes))
        case RefuseQueueFull(message=message):
            envelope.fail(AdmissionQueueFull("executor", message))
    return decision.unpinned


def use_chunk(state: ExecutorState, request_id: str, chunk: int, commands: queue.SimpleQueue) -> None:
    """A request priced at the floor chunk: prefill at that chunk until it has finished."""
    if chunk != state.prefill_step_size:
        state.floor_priced.add(request_id)
        state.prefill_step_size = chunk
        commands.put(CoreSetPrefillStep(chunk))


def restore_prefill_step(state: ExecutorState, commands: queue.SimpleQueue) -> None:
    """The configured prefill chunk again, once no request priced at the floor is left
    (and no memory pressure keeps chunks small)."""
    if (not state.floor_priced and not state.under_pressure
            and state.prefill_step_size != state.normal_prefill_step):
        state.prefill_step_size = state.normal_prefill_step
        commands.put(CoreSetPrefillStep(state.normal_prefill_step))


async def leave_queue(state: ExecutorState, request_id: str, commands: queue.SimpleQueue,
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
    restore_prefill_step(state, commands)
    admit_now(state, state.ledger.finish(request_id), commands)
    if command.submit.cached_blocks and cache_index is not None:
        await cache_index.cast(Release(request_id=request_id))
    await events.send(Finished(
        request_id=request_id, reason=reason, prompt_tokens=len(command.submit.prompt_tokens),
        completion_tokens=0, error=error, error_type=error_type))


def forget_dropped_prefixes(state: ExecutorState, dropped: set[str],
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
        priced = price(state.ledger, state.facts, request_id, shape_of(state, submit),
                       prefill_step=state.prefill_step_size)
        if not isinstance(priced, Refused):  # else `settle` refuses it when it is the head
            use_chunk(state, request_id, priced.chunk, commands)
            admit_now(state, state.ledger.reprice(request_id, priced.cost), commands)


async def settle(state: ExecutorState, commands: queue.SimpleQueue, events,
                  cache_index: Address | None) -> None:
    """Make sure the head of the memory queue waits only for what will come: running
    requests finishing, or the prefix cache giving memory back (the policy's
    `settle_step`, applied until the head waits or nothing is blocked). Called after
    every change of the ledger.

    The head gives up its cached prefix first (unpinned in the index), then the cache is
    cut by what the head lacks (the index evicts pinned blocks too if it must: it never
    holds more than its budget); a head that nothing will make room for is refused with
    `Finished(error, MemoryRefused)` - 413 before the first byte, an error event after.
    Each step's bookkeeping is done before its cast is awaited; the next step reads the
    ledger afresh."""
    ledger = state.ledger
    if ledger is None:
        return
    while (head := ledger.blocked_head()) is not None:
        command = state.waiting[head.request_id]
        match settle_step(ledger, state.facts, head, shape_of(state, command.submit),
                          prefill_step=state.prefill_step_size, cache_target=state.cache_target,
                          has_cache_index=cache_index is not None):
            case DropPrefix(request_id=request_id, priced=priced):
                plain = attrs.evolve(command.submit, cached_blocks=())
                state.waiting[request_id] = attrs.evolve(command, submit=plain)
                use_chunk(state, request_id, priced.chunk, commands)
                admit_now(state, ledger.reprice(request_id, priced.cost), commands)
                if cache_index is not None:
                    await cache_index.cast(Release(request_id=request_id))
            case ShrinkCache(budget_bytes=target):
                state.cache_target = target
                state.cache_shrunk = True
                await cache_index.cast(SetCacheBudget(budget_bytes=target))
                return  # the engine's next report of its block store's bytes decides again
            case KeepWaiting():
                return
            case RefuseHead(request_id=request_id, message=message):
                await leave_queue(state, request_id, commands, events, cache_index,
                                  FinishReason.ERROR, "MemoryRefused", message)


async def expire_waiting(state: ExecutorState, max_wait_s: float, queued,
                          commands: queue.SimpleQueue, events,
                          cache_index: Address | None) -> None:
    """Refuse every request that has waited `max_wait_s` in the memory queue (counted from
    its arrival at the executor) with `Finished(error, QueueTimeout)`: 503 with Retry-After
    before the first byte, an error event after. Sleeps until the oldest deadline or until
    `queued` rings (a request joined). Runs until cancelled; a cancellation leaves nothing
    half done (a request is forgotten before anything is awaited for it)."""
    while True:
        now = time.monotonic()
        arrivals = {r: c.received_at for r, c in state.waiting.items()}
        expired = overdue(arrivals, now=now, max_wait_s=max_wait_s)
        for request_id in expired:
            command = state.waiting.get(request_id)
            if command is not None:
                await leave_queue(
                    state, request_id, commands, events, cache_index, FinishReason.ERROR,
                    "QueueTimeout",
                    f"waited {now - command.received_at:.1f} s for memory (the limit is "
                    f"{max_wait_s:g} s); retry later")
        if expired:
            await settle(state, commands, events, cache_index)
        expiry = next_expiry((c.received_at for c in state.waiting.values()),
                             max_wait_s=max_wait_s)
        timeout = math.inf if expiry is None else expiry - time.monotonic()
        with trio.move_on_after(max(timeout, 0)):
            await queued.receive()


def admit_now(state: ExecutorState, request_ids: list[str], commands: queue.SimpleQueue) -> None:
    """Send the engine the waiting requests the ledger just admitted."""
    for request_id in request_ids:
        command = state.waiting.pop(request_id, None)
        if command is not None:
            commands.put(command)


async def start_admission(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
                           commands: queue.SimpleQueue) -> None:
    """Read the model's memory facts and the first snapshot; apply MLX's limits. Raises
    `BudgetBelowWeights` when the weights alone do not fit that snapshot's budget."""
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
    except ValueError as exc:
        raise BudgetBelowWeights(str(exc)) from None
    commands.put(CoreSetLimits(limits.memory_limit, limits.cache_limit, limits.wired_limit))
    state.ledger = AdmissionLedger(
        weights_bytes=info.weights_bytes,
        budget_bytes=snapshot.budget_bytes,
        batch_cost=padded_batch_cost(state.facts, memory.prefill_batch_size),
        reserved_bytes=limits.cache_limit,
        max_waiting=memory.max_waiting,
    )


async def watch_memory(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
                        commands: queue.SimpleQueue, cache_index: Address | None,
                        events) -> None:
    """Follow the enforcer's snapshots: new budget or pressure → admit, degrade, recover,
    as the policy's `pressure_actions` says (shrink the prefix cache, shrink prefill
    chunks, pause admission; never kill a running request; undo all three when calm).

    Each snapshot's state changes are made before its cast to the cache index is awaited;
    then the ledger reads the new budget and the queue is settled."""
    async for snapshot in memory.snapshots:
        reading = PressureReading(
            pressure=snapshot.level is not MemoryLevel.OK,
            hard=snapshot.level is MemoryLevel.HARD,
            budget_bytes=snapshot.budget_bytes,
            under_pressure=state.under_pressure,
            prefill_step=state.prefill_step_size,
            normal_prefill_step=memory.prefill_step_size,
            prefill_step_floor=memory.prefill_step_floor,
            prefix_cache_bytes=memory.prefix_cache_bytes,
            cache_target=state.cache_target,
            cache_shrunk=state.cache_shrunk,
            floor_priced=bool(state.floor_priced),
            waiting=bool(state.waiting),
            has_cache_index=cache_index is not None,
        )
        for action in pressure_actions(reading):
            await _apply_pressure(action, state, info, memory, commands, cache_index, events)


async def _apply_pressure(action, state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
                          commands: queue.SimpleQueue, cache_index: Address | None,
                          events) -> None:
    match action:
        case SetPrefillStep(tokens=tokens):
            state.prefill_step_size = tokens
            commands.put(CoreSetPrefillStep(tokens))
        case ForgetCacheCut():
            state.cache_shrunk = False
            state.cache_target = None
        case SetUnderPressure(pressure=pressure):
            state.under_pressure = pressure
        case SendCacheBudget(budget_bytes=budget):
            await cache_index.cast(SetCacheBudget(budget_bytes=budget))
        case UpdateLedger(budget_bytes=budget, paused=paused):
            # MLX's limits for the new budget: raises (crashing the executor) if the
            # weights no longer fit it.
            limits = memory.limits_for(budget, info.weights_bytes)
            admit_now(state, state.ledger.update(
                budget_bytes=budget, reserved_bytes=limits.cache_limit, paused=paused), commands)
            await settle(state, commands, events, cache_index)  # the budget may have moved


__all__ = [
    "MAX_QUEUE_WAIT_S",
    "QUEUE_DOORBELL_CAPACITY",
    "BudgetBelowWeights",
    "MemoryWiring",
    "admit",
    "admit_now",
    "expire_waiting",
    "forget_dropped_prefixes",
    "leave_queue",
    "restore_prefill_step",
    "settle",
    "shape_of",
    "start_admission",
    "use_chunk",
    "watch_memory",
]
