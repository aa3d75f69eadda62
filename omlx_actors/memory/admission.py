"""Admission by memory budget, as pure bookkeeping (no trio, no MLX).

The executor owns one `AdmissionLedger`. Every request is priced by the estimator before it
reaches MLX; the ledger admits it, queues it, or refuses it:

- **Reject** what can never fit (weights + reserve + estimate > budget): the front answers
  413 `prefill_memory_exceeded` before any stream byte and no prefill work is done.
- **Queue** what fits the budget but not now (FIFO: the head waits for room, so a large
  request is not starved by a stream of small ones); past `max_waiting` queued requests the
  front answers 429 with Retry-After.
- **Pause** under hard memory pressure: nothing new is admitted while requests run (they
  finish and free memory); never is a running request killed to admit a new one. With
  nothing running, pausing cannot relieve pressure, so the head is admitted if it fits.

- **Unblock** the head of the queue when what it waits for will not come by itself
  (`BlockedHead`, `unblock`): a request must never wait on memory that nothing will free.
  The prefix cache gives memory back (a waiting request first gives up its own cached
  prefix, which it would otherwise pin), running requests free theirs when they finish;
  with neither, or when the budget moved below what the request needs alone, it is
  refused. Issue #15: a request waited 130 s, with nothing running, for the 32 KB of cache
  it had pinned itself.

The executor's policy on top of this ledger (pricing, what to do with a new request, a
blocked head, a pressure reading) is in `memory/policy.py`.

Sizes are what the estimator says, not what MLX reports: MLX's limits are only guidelines
and a failed allocation on the CPU build is an uncatchable SIGSEGV, so the decision has to be
made from sizes known before anything is evaluated.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence

import attrs


@attrs.frozen(kw_only=True)
class RequestCost:
    """What one admitted request costs: `context_tokens` of KV it may grow to (padded to
    the batch's longest row when batched) and `other_bytes` that do not pad (prefill
    scratch, recurrent state). Neither is negative (ValueError)."""

    context_tokens: int = attrs.field(validator=attrs.validators.ge(0))
    other_bytes: int = attrs.field(validator=attrs.validators.ge(0))


def unpadded_batch_cost(kv_bytes_per_token: int) -> Callable[[Sequence[RequestCost]], int]:
    """Each request pays only its own KV (no padding): for tests on plain numbers."""

    def cost(requests: Sequence[RequestCost]) -> int:
        return sum(r.context_tokens * kv_bytes_per_token + r.other_bytes for r in requests)

    return cost


@attrs.frozen(kw_only=True)
class Granted:
    """The ledger granted the request its memory: it runs now."""

    request_id: str


@attrs.frozen(kw_only=True)
class Queued:
    request_id: str
    position: int


@attrs.frozen(kw_only=True)
class Refused:
    request_id: str
    reason: str
    needed_bytes: int
    available_bytes: int


@attrs.frozen(kw_only=True)
class QueueFullRefusal:
    request_id: str
    waiting: int


@attrs.frozen(kw_only=True)
class BlockedHead:
    """The head of the queue does not fit now; what could change that."""

    request_id: str
    shortfall_bytes: int  # committed-with-it minus what the budget leaves (> 0)
    cache_bytes: int  # the prefix cache's share of the committed bytes: it can give them back
    running: int  # admitted requests: each frees its bytes when it finishes
    fits_alone: bool  # with nothing running and an empty cache it would fit the budget


class HeadAction(enum.Enum):
    WAIT = "wait"  # running requests will finish and free memory
    DROP_PREFIX = "drop_prefix"  # run it without its cached prefix (unpin it), then re-decide
    SHRINK_CACHE = "shrink_cache"  # cut the prefix cache's budget by the shortfall
    REFUSE = "refuse"  # nothing will ever make room: refuse it now (413)


def unblock(head: BlockedHead, *, has_prefix: bool) -> HeadAction:
    """What to do for a blocked head so that it never waits on memory nothing will free.

    In order: a request that no longer fits even alone (the budget moved since it was
    queued) is refused; memory held by the prefix cache is taken back - first the head's
    own cached prefix is given up (it pins those blocks, so a cache cut for it would evict
    what it is about to read, and priced with them it may cost more than without), then
    the cache is shrunk; otherwise it waits only if something runs, and is refused if not.
    """
    if not head.fits_alone:
        return HeadAction.REFUSE
    if head.cache_bytes > 0:
        return HeadAction.DROP_PREFIX if has_prefix else HeadAction.SHRINK_CACHE
    if head.running:
        return HeadAction.WAIT
    return HeadAction.REFUSE


@attrs.define
class AdmissionLedger:
    """Who holds how much, who waits. Invariant: `committed_bytes` is the sum of the
    estimates of admitted, unfinished requests; a request is in at most one of
    `admitted` / `waiting`."""

    weights_bytes: int
    budget_bytes: int
    # The bytes a set of requests holds when batched together (see `RequestCost`).
    batch_cost: Callable[[Sequence[RequestCost]], int]
    reserved_bytes: int = 0
    max_waiting: int = 256
    # Bytes held outside requests (the prefix cache's blocks): counted as committed.
    cache_bytes: int = 0
    paused: bool = False
    admitted: dict[str, RequestCost] = attrs.field(factory=dict)
    waiting: deque[tuple[str, RequestCost]] = attrs.field(factory=deque)

    @property
    def committed_bytes(self) -> int:
        return self.batch_cost(list(self.admitted.values())) + self.cache_bytes

    @property
    def available_bytes(self) -> int:
        return self.budget_bytes - self.weights_bytes - self.reserved_bytes

    def submit(self, request_id: str, cost: RequestCost) -> Granted | Queued | Refused | QueueFullRefusal:
        refusal = self.refusal(request_id, cost)
        if refusal is not None:
            return refusal
        if not self.waiting and self._fits_now(cost):
            self.admitted[request_id] = cost
            return Granted(request_id=request_id)
        if len(self.waiting) >= self.max_waiting:
            return QueueFullRefusal(request_id=request_id, waiting=len(self.waiting))
        self.waiting.append((request_id, cost))
        return Queued(request_id=request_id, position=len(self.waiting))

    def refusal(self, request_id: str, cost: RequestCost) -> Refused | None:
        """`Refused` if the request could never fit, even alone; else None. No side effect."""
        alone = self.batch_cost([cost])
        if alone > self.available_bytes:
            return Refused(
                request_id=request_id,
                reason=(
                    f"request needs {alone} bytes but the memory budget of {self.budget_bytes} "
                    f"bytes leaves {max(self.available_bytes, 0)} beside the weights "
                    f"({self.weights_bytes}) and the reserve ({self.reserved_bytes})"
                ),
                needed_bytes=alone,
                available_bytes=max(self.available_bytes, 0),
            )
        return None

    def finish(self, request_id: str) -> list[str]:
        """A request ended (or left the queue): free its bytes, admit whoever now fits."""
        if self.admitted.pop(request_id, None) is None:
            self.waiting = deque((r, e) for r, e in self.waiting if r != request_id)
        return self._admit_waiting()

    def update(self, *, budget_bytes: int | None = None, cache_bytes: int | None = None,
               paused: bool | None = None, reserved_bytes: int | None = None) -> list[str]:
        """New readings (budget, prefix cache size, pressure): admit whoever now fits."""
        if budget_bytes is not None:
            self.budget_bytes = budget_bytes
        if cache_bytes is not None:
            self.cache_bytes = cache_bytes
        if paused is not None:
            self.paused = paused
        if reserved_bytes is not None:
            self.reserved_bytes = reserved_bytes
        return self._admit_waiting()

    def reprice(self, request_id: str, cost: RequestCost) -> list[str]:
        """A waiting request's price changed (it gave up its cached prefix): it keeps its
        place in the queue; admit whoever now fits. Unknown ids are ignored."""
        self.waiting = deque((r, cost if r == request_id else c) for r, c in self.waiting)
        return self._admit_waiting()

    def blocked_head(self) -> BlockedHead | None:
        """The head of the queue if memory keeps it out (None if nothing waits, or it fits
        and only a pause holds it: a pause holds only while requests run, which finish)."""
        if not self.waiting:
            return None
        request_id, cost = self.waiting[0]
        shortfall = self.shortfall_bytes()
        if shortfall <= 0:
            return None
        return BlockedHead(
            request_id=request_id,
            shortfall_bytes=shortfall,
            cache_bytes=self.cache_bytes,
            running=len(self.admitted),
            fits_alone=self.refusal(request_id, cost) is None,
        )

    def shortfall_bytes(self) -> int:
        """How much the head of the queue lacks (0 if nothing waits or it fits)."""
        if not self.waiting:
            return 0
        _, cost = self.waiting[0]
        return max(0, self._committed_with(cost) - self.available_bytes)

    def _committed_with(self, cost: RequestCost) -> int:
        return self.batch_cost([*self.admitted.values(), cost]) + self.cache_bytes

    def _fits_now(self, cost: RequestCost) -> bool:
        if self.paused and self.admitted:
            return False
        return self._committed_with(cost) <= self.available_bytes

    def _admit_waiting(self) -> list[str]:
        admitted = []
        while self.waiting and self._fits_now(self.waiting[0][1]):
            request_id, cost = self.waiting.popleft()
            self.admitted[request_id] = cost
            admitted.append(request_id)
        return admitted

    def check_invariants(self) -> None:
        ids = [r for r, _ in self.waiting]
        assert len(ids) == len(set(ids)), "a request waits twice"
        assert not set(ids) & set(self.admitted), "a request both waits and runs"
        assert all(c.context_tokens >= 0 and c.other_bytes >= 0 for c in self.admitted.values())
        assert len(self.waiting) <= self.max_waiting

