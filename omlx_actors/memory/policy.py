"""The executor's admission and pressure policy, as plain functions (no trio, no MLX).

On top of the `AdmissionLedger` (`memory/admission.py`) and the estimator, it decides:

- `decide_submit`: price a new request (with and without its cached prefix, at the current
  and the floor prefill chunk) and run, queue or refuse it;
- `settle_step`: one step for the blocked head of the memory queue (give up its prefix,
  cut the prefix cache, wait, or refuse it), so that nothing waits on memory that nothing
  will free;
- `pressure_actions`: an enforcer snapshot -> a list of typed actions (prefill chunk, prefix
  cache budget, admission pause);
- `overdue` / `next_expiry`: the memory queue's time bound.

`engine/memory_queue.py` is the shell: it reads the inputs on the executor's trio thread,
calls one of these, and applies what it returns (sending commands, casting to the cache
index). Every function here returns what to do; only `decide_submit` books the request in
the ledger it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs

from omlx_actors.memory.admission import (
    AdmissionLedger,
    BlockedHead,
    Granted,
    HeadAction,
    Queued,
    QueueFullRefusal,
    Refused,
    RequestCost,
    unblock,
)
from omlx_actors.memory.estimator import (
    ModelMemoryFacts,
    estimate_request_bytes,
    padded_batch_kv_bytes,
)

# A decode batch holds one KV buffer padded to its longest row; it admits rows by
# concatenating the prefilled batch's buffer onto it, so for a moment the old buffer, the
# joining one and the result coexist: the batch's KV is priced three times. (Priced once or
# twice, the 200-request replay test's MLX peak overshot its budget by 3-6%.)
BATCH_KV_COPIES = 3

# Under memory pressure prefill chunks shrink, but not below this many tokens (smaller
# chunks cost more per token than the scratch they save).
PREFILL_STEP_FLOOR = 64


def padded_batch_cost(facts: ModelMemoryFacts,
                      prefill_rows: int) -> Callable[[Sequence[RequestCost]], int]:
    """The bytes a set of requests holds batched together in mlx-lm, for the ledger."""

    def cost(requests: Sequence[RequestCost]) -> int:
        # KV: every row padded to the longest. Scratch: prompts prefilled together are
        # padded to the longest too, and at most `prefill_rows` prefill at once.
        longest = max((r.context_tokens for r in requests), default=0)
        kv = padded_batch_kv_bytes(facts, rows=len(requests), longest_context=longest)
        scratch = min(len(requests), prefill_rows) * max((r.other_bytes for r in requests), default=0)
        return BATCH_KV_COPIES * kv + scratch

    return cost


@attrs.frozen(kw_only=True)
class RequestShape:
    """What pricing reads of a request: its prompt, the cached blocks it would restore
    instead of prefilling, and how many tokens it may generate."""

    prompt_tokens: int
    max_tokens: int
    prefix_blocks: int = 0
    block_size: int = 0

    @property
    def has_prefix(self) -> bool:
        return self.prefix_blocks > 0

    def without_prefix(self) -> RequestShape:
        return attrs.evolve(self, prefix_blocks=0)


def request_cost(facts: ModelMemoryFacts, shape: RequestShape, prefill_chunk: int) -> RequestCost:
    """What a request costs run as it is (its cached prefix copied into its own cache),
    prefilled in `prefill_chunk`-token chunks."""
    cached = shape.prefix_blocks * shape.block_size
    estimate = estimate_request_bytes(
        facts,
        prompt_tokens=shape.prompt_tokens,
        cached_tokens=min(cached, shape.prompt_tokens - 1),
        max_tokens=shape.max_tokens,
        prefill_chunk=prefill_chunk,
        prefix_shared=False,  # the restored prefix is copied into the batch
    )
    return RequestCost(
        context_tokens=estimate.kv_capacity_tokens,
        other_bytes=estimate.scratch_bytes + estimate.recurrent_state_bytes,
    )


@attrs.frozen(kw_only=True)
class Priced:
    """A request's cost and the prefill chunk it was priced at (and must run with)."""

    cost: RequestCost
    chunk: int


def price(ledger: AdmissionLedger, facts: ModelMemoryFacts, request_id: str,
          shape: RequestShape, *, prefill_step: int) -> Priced | Refused:
    """The cost of a request as it would run, and the prefill chunk it is priced at; or the
    ledger's `Refused` if it can never fit, even alone.

    "Never fits" is judged at the smallest prefill chunk we would use: a request that fits
    with chunks at the floor is not refused - chunks shrink to the floor while it is
    admitted, and grow back once it has finished."""
    floor = min(prefill_step, PREFILL_STEP_FLOOR)
    refusal = None
    for chunk in dict.fromkeys((prefill_step, floor)):
        cost = request_cost(facts, shape, chunk)
        refusal = ledger.refusal(request_id, cost)
        if refusal is None:
            return Priced(cost=cost, chunk=chunk)
    assert refusal is not None
    return refusal


# What to do with a new request. `unpinned`: it runs without its cached prefix (it fits
# only so), and the executor unpins that prefix in the cache index, whatever the outcome.


@attrs.frozen(kw_only=True)
class RunNow:
    """Memory is granted: send it to the engine, prefilling in `priced.chunk` chunks."""

    priced: Priced
    unpinned: bool


@attrs.frozen(kw_only=True)
class WaitForMemory:
    """It fits the budget but not now: it joins the memory queue."""

    priced: Priced
    unpinned: bool


@attrs.frozen(kw_only=True)
class RefuseTooLarge:
    """It can never fit, even alone (413)."""

    refusal: Refused
    unpinned: bool


@attrs.frozen(kw_only=True)
class RefuseQueueFull:
    """Too many requests already run or wait (429)."""

    message: str
    unpinned: bool


SubmitDecision = RunNow | WaitForMemory | RefuseTooLarge | RefuseQueueFull


def decide_submit(ledger: AdmissionLedger, facts: ModelMemoryFacts, request_id: str,
                  shape: RequestShape, *, prefill_step: int, requests: int,
                  max_requests: int) -> SubmitDecision:
    """Price a new request and admit, queue or refuse it in the ledger (its only effect:
    a `RunNow` or `WaitForMemory` is booked there). `requests` are those the executor
    already runs or queues; `max_requests` bounds them, priced or not.

    A cached prefix is restored into a buffer of exactly its length, which the prefill
    then grows by a whole 256-position step: with a prefix the same prompt may cost more
    than without. A request that fits only without its prefix runs without it (issue #15:
    the same request got 200, then 413 once its blocks were cached).

    Order of refusals: one that can never fit (413) before a full queue (429) - a client
    retrying a request that can never run would retry forever."""
    unpinned = False
    priced = price(ledger, facts, request_id, shape, prefill_step=prefill_step)
    if isinstance(priced, Refused) and shape.has_prefix:
        plain = price(ledger, facts, request_id, shape.without_prefix(), prefill_step=prefill_step)
        if not isinstance(plain, Refused):
            priced, unpinned = plain, True
    if isinstance(priced, Refused):
        return RefuseTooLarge(refusal=priced, unpinned=False)
    if requests >= max_requests:
        return RefuseQueueFull(
            message=f"{requests} requests are queued or running; retry shortly",
            unpinned=unpinned)
    match ledger.submit(request_id, priced.cost):
        case Granted():
            return RunNow(priced=priced, unpinned=unpinned)
        case Queued():
            return WaitForMemory(priced=priced, unpinned=unpinned)
        case Refused() as refusal:
            return RefuseTooLarge(refusal=refusal, unpinned=unpinned)
        case QueueFullRefusal(waiting=waiting):
            return RefuseQueueFull(
                message=f"{waiting} requests already wait for memory; retry shortly",
                unpinned=unpinned)
    raise AssertionError("unreachable: the ledger's outcomes are closed")


# What to do for the blocked head of the memory queue (one step of the executor's settle).


@attrs.frozen(kw_only=True)
class DropPrefix:
    """Run the head without its cached prefix: reprice it in the ledger at `priced` and
    unpin its prefix in the cache index; then look at the head again."""

    request_id: str
    priced: Priced


@attrs.frozen(kw_only=True)
class ShrinkCache:
    """Cut the prefix cache's budget to `budget_bytes` for the head; the engine's next
    report of its block store's bytes decides again."""

    budget_bytes: int


@attrs.frozen(kw_only=True)
class KeepWaiting:
    """Something will free memory: running requests, or a cache cut already asked for."""


@attrs.frozen(kw_only=True)
class RefuseHead:
    """Nothing will make room for the head: it leaves the queue with `MemoryRefused`."""

    request_id: str
    message: str


HeadStep = DropPrefix | ShrinkCache | KeepWaiting | RefuseHead


def settle_step(ledger: AdmissionLedger, facts: ModelMemoryFacts, head: BlockedHead,
                shape: RequestShape, *, prefill_step: int, cache_target: int | None,
                has_cache_index: bool) -> HeadStep:
    """The next step for `head` (the ledger's `blocked_head()`, shaped `shape`) so that
    it never waits on memory nothing will free (see `unblock`). `cache_target` is the last
    cache cut asked for the queue; without a cache index nothing can be cut. No effect."""
    action = unblock(head, has_prefix=shape.has_prefix)
    if action is HeadAction.DROP_PREFIX:
        plain = price(ledger, facts, head.request_id, shape.without_prefix(),
                      prefill_step=prefill_step)
        if not isinstance(plain, Refused):
            return DropPrefix(request_id=head.request_id, priced=plain)
        action = HeadAction.REFUSE
    if action is HeadAction.SHRINK_CACHE and has_cache_index:
        target = max(0, head.cache_bytes - head.shortfall_bytes)
        if cache_target is None or target < cache_target:
            return ShrinkCache(budget_bytes=target)
        return KeepWaiting()
    if action is HeadAction.WAIT:
        return KeepWaiting()
    refusal = ledger.refusal(head.request_id, ledger.waiting[0][1])
    return RefuseHead(
        request_id=head.request_id,
        message=f"{refusal.reason} (the budget moved while it waited)" if refusal is not None
        else f"it lacks {head.shortfall_bytes} bytes and nothing running will free them",
    )


# Memory pressure: one enforcer snapshot -> what changes.


@attrs.frozen(kw_only=True)
class PressureReading:
    """One enforcer snapshot, as the policy reads it, and what the executor holds then."""

    pressure: bool  # the level is soft or hard
    hard: bool  # the level is hard: admission pauses while requests run
    budget_bytes: int
    under_pressure: bool  # the previous snapshot's `pressure`
    prefill_step: int  # the chunk prefill uses now
    normal_prefill_step: int  # the configured chunk
    prefill_step_floor: int
    prefix_cache_bytes: int  # the configured prefix cache budget
    cache_target: int | None  # the last cut asked for the queue's head
    cache_shrunk: bool  # a cut for the queue's head is in force
    floor_priced: bool  # a request admitted only with floor-sized chunks still runs
    waiting: bool  # a request waits for memory
    has_cache_index: bool


@attrs.frozen(kw_only=True)
class SetPrefillStep:
    tokens: int


@attrs.frozen(kw_only=True)
class ForgetCacheCut:
    """The cut made for the queue's head is over (nothing waits)."""


@attrs.frozen(kw_only=True)
class SetUnderPressure:
    pressure: bool


@attrs.frozen(kw_only=True)
class SendCacheBudget:
    """Send the cache index its new budget (a cut under pressure, or the configured one)."""

    budget_bytes: int


@attrs.frozen(kw_only=True)
class UpdateLedger:
    """The ledger's new budget (and the reserve MLX's limits keep for it) and pause; then
    admit whoever fits, and settle."""

    budget_bytes: int
    paused: bool


PressureAction = SetPrefillStep | ForgetCacheCut | SetUnderPressure | SendCacheBudget | UpdateLedger


def pressure_actions(reading: PressureReading) -> list[PressureAction]:
    """What one snapshot changes, in the order to apply it.

    Under pressure, in order: shrink the prefix cache (to a quarter of its budget, never
    above a cut made for the queue), shrink prefill chunks (halving, down to a floor),
    pause admission (hard level). Never a running request is killed. When the level is back
    to ok, all three are undone (the chunk only once no floor-priced request runs; the
    cache only once nothing waits). Every state change comes before the one message to
    the cache index, so the shell applies them all before it awaits anything."""
    actions: list[PressureAction] = []
    cache_budget = None
    if reading.pressure and not reading.under_pressure and reading.has_cache_index:
        cache_budget = reading.prefix_cache_bytes // 4
        if reading.cache_target is not None:
            cache_budget = min(cache_budget, reading.cache_target)  # never undo a cut for the queue
    if reading.pressure:
        step = max(reading.prefill_step_floor, reading.prefill_step // 2)
        if step != reading.prefill_step:
            actions.append(SetPrefillStep(tokens=step))
    elif reading.under_pressure and not reading.floor_priced:
        actions.append(SetPrefillStep(tokens=reading.normal_prefill_step))
    if (not reading.pressure and (reading.under_pressure or reading.cache_shrunk)
            and not reading.waiting):
        actions.append(ForgetCacheCut())
        if reading.has_cache_index:
            cache_budget = reading.prefix_cache_bytes
    actions.append(SetUnderPressure(pressure=reading.pressure))
    if cache_budget is not None:
        actions.append(SendCacheBudget(budget_bytes=cache_budget))
    actions.append(UpdateLedger(budget_bytes=reading.budget_bytes, paused=reading.hard))
    return actions


def overdue(arrivals: dict[str, float], *, now: float, max_wait_s: float) -> list[str]:
    """The waiting requests (by arrival time) that have waited `max_wait_s` by `now`."""
    return [r for r, at in arrivals.items() if at + max_wait_s <= now]


def next_expiry(arrivals: Iterable[float], *, max_wait_s: float) -> float | None:
    """When the oldest waiting request expires (None: nothing waits)."""
    oldest = min(arrivals, default=None)
    return None if oldest is None else oldest + max_wait_s


__all__ = [
    "BATCH_KV_COPIES",
    "PREFILL_STEP_FLOOR",
    "DropPrefix",
    "ForgetCacheCut",
    "HeadStep",
    "KeepWaiting",
    "PressureAction",
    "PressureReading",
    "Priced",
    "RefuseHead",
    "RefuseQueueFull",
    "RefuseTooLarge",
    "RequestShape",
    "RunNow",
    "SendCacheBudget",
    "SetPrefillStep",
    "SetUnderPressure",
    "ShrinkCache",
    "SubmitDecision",
    "UpdateLedger",
    "WaitForMemory",
    "decide_submit",
    "next_expiry",
    "overdue",
    "padded_batch_cost",
    "pressure_actions",
    "price",
    "request_cost",
    "settle_step",
]
