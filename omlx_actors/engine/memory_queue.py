"""The executor's admission by memory: the effectful shell around `memory/admission.py`.

The executor (`engine/executor.py`) owns the state (`ExecutorState`: the ledger, the
requests waiting for memory) and calls in here: `price` a `Submit` (with and without its
cached prefix, at the current and the floor prefill chunk), `admit_now` what the ledger
admitted, `settle` the queue after every change of the ledger so that no request waits on
memory that nothing will free (`admission.unblock`), `leave_queue` for a request that goes
without running (aborted, refused, expired), `expire_waiting` (the task that bounds the
time in the queue), `watch_memory` (the task that follows the enforcer's snapshots).

Everything here runs on the executor's trio thread and shares its state; a function that
awaits says what it has already done by then, so a concurrent one finds the state whole.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from omlx_actors.cache.actor import Release, SetCacheBudget
from omlx_actors.engine.core import CoreSetLimits, CoreSetPrefillStep
from omlx_actors.engine.messages import EngineInfo, Finished, FinishReason, Submit
from omlx_actors.memory.admission import (
    AdmissionLedger,
    HeadAction,
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
from omlx_actors.kernel import Address

if TYPE_CHECKING:
    from omlx_actors.engine.executor import ExecutorState

log = logging.getLogger(__name__)

# A decode batch holds one KV buffer padded to its longest row; it admits rows by
# concatenating the prefilled batch's buffer onto it, so for a moment the old buffer, the
# joining one and the result coexist: the batch's KV is priced three times. (Priced once or
# twice, the 200-request replay test's MLX peak overshot its budget by 3-6%.)
BATCH_KV_COPIES = 3

# Under memory pressure prefill chunks shrink, but not below this many tokens (smaller
# chunks cost more per token than the scratch they save).
PREFILL_STEP_FLOOR = 64

# How long a request may wait in the memory queue by default before it is refused
# (`RuntimeConfig.max_queue_wait_s`); see `expire_waiting`.
MAX_QUEUE_WAIT_S = 120.0

# The queue-expiry task's doorbell: "a request was queued, look at the deadlines again".
# One pending ring says it all; further rings while it is unread are dropped (send_nowait
# finds it full), never waited for.
QUEUE_DOORBELL_CAPACITY = 1


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


def request_cost(state: ExecutorState, submit: Submit, prefill_chunk: int) -> RequestCost:
    """What `submit` costs run as it is (its cached prefix copied into its own cache),
    prefilled in `prefill_chunk`-token chunks."""
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


def price(state: ExecutorState, submit: Submit) -> tuple[RequestCost, int] | Refused:
    """The cost of `submit` as it would run, and the prefill chunk it is priced at; or the
    ledger's `Refused` if it can never fit, even alone.

    "Never fits" is judged at the smallest prefill chunk we would use: a request that fits
    with chunks at the floor is not refused - chunks shrink to the floor while it is
    admitted, and grow back once it has finished (see `restore_prefill_step`)."""
    floor = min(state.prefill_step_size, PREFILL_STEP_FLOOR)
    refusal = None
    for chunk in dict.fromkeys((state.prefill_step_size, floor)):
        cost = request_cost(state, submit, chunk)
        refusal = state.ledger.refusal(submit.request_id, cost)
        if refusal is None:
            return cost, chunk
    assert refusal is not None
    return refusal


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
        priced = price(state, submit)
        if not isinstance(priced, Refused):  # else `settle` refuses it when it is the head
            use_chunk(state, request_id, priced[1], commands)
            admit_now(state, state.ledger.reprice(request_id, priced[0]), commands)


async def settle(state: ExecutorState, commands: queue.SimpleQueue, events,
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
            priced = price(state, plain)
            if isinstance(priced, Refused):
                action = HeadAction.REFUSE
            else:
                state.waiting[head.request_id] = attrs.evolve(command, submit=plain)
                use_chunk(state, head.request_id, priced[1], commands)
                admit_now(state, ledger.reprice(head.request_id, priced[0]), commands)
                if cache_index is not None:
                    await cache_index.cast(Release(request_id=head.request_id))
                continue
        if action is HeadAction.SHRINK_CACHE and cache_index is not None:
            target = max(0, head.cache_bytes - head.shortfall_bytes)
            if state.cache_target is None or target < state.cache_target:
                state.cache_target = target
                state.cache_shrunk = True
                await cache_index.cast(SetCacheBudget(budget_bytes=target))
            return  # the engine's next report of its block store's bytes decides again
        if action is HeadAction.WAIT:
            return
        refusal = ledger.refusal(head.request_id, ledger.waiting[0][1])
        await leave_queue(
            state, head.request_id, commands, events, cache_index, FinishReason.ERROR,
            "MemoryRefused",
            f"{refusal.reason} (the budget moved while it waited)" if refusal is not None else
            f"it lacks {head.shortfall_bytes} bytes and nothing running will free them",
        )


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
        expired = [r for r, c in state.waiting.items() if c.received_at + max_wait_s <= now]
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
        oldest = min((c.received_at for c in state.waiting.values()), default=None)
        timeout = math.inf if oldest is None else oldest + max_wait_s - time.monotonic()
        with trio.move_on_after(max(timeout, 0)):
            await queued.receive()


def admit_now(state: ExecutorState, request_ids: list[str], commands: queue.SimpleQueue) -> None:
    for request_id in request_ids:
        command = state.waiting.pop(request_id, None)
        if command is not None:
            commands.put(command)


async def start_admission(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
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


async def watch_memory(state: ExecutorState, info: EngineInfo, memory: MemoryWiring,
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
            await cache_index.cast(SetCacheBudget(budget_bytes=quarter))
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
                await cache_index.cast(SetCacheBudget(budget_bytes=memory.prefix_cache_bytes))
        degraded = state.under_pressure = pressure
        limits = memory.limits_for(snapshot.budget_bytes, info.weights_bytes)
        admit_now(state, state.ledger.update(
            budget_bytes=snapshot.budget_bytes,
            reserved_bytes=limits.cache_limit,
            paused=snapshot.level is MemoryLevel.HARD,
        ), commands)
        await settle(state, commands, events, cache_index)  # the budget may have moved


__all__ = [
    "BATCH_KV_COPIES",
    "MAX_QUEUE_WAIT_S",
    "PREFILL_STEP_FLOOR",
    "QUEUE_DOORBELL_CAPACITY",
    "MemoryWiring",
    "MlxGauge",
    "admit_now",
    "expire_waiting",
    "forget_dropped_prefixes",
    "leave_queue",
    "price",
    "request_cost",
    "restore_prefill_step",
    "settle",
    "start_admission",
    "use_chunk",
    "watch_memory",
]
