"""The cache index actor: the one owner of the `BlockIndex`.

Sessions `call` it with `Lookup` before submitting a request: the longest usable cached
prefix is held (pinned) for that request until the executor casts `Release` when the
request is finished. The executor casts `Stored` when the engine has stored new block
tensors. Whenever the index evicts - over budget after `Stored`, `Release`, `SetCacheBudget`
or a repeated `Lookup` - it casts `DropBlocks` to the `drop_to` address it was started
with (the executor's), so the engine frees exactly those generations of tensors.

Ordering contract: messages are applied one at a time in inbox order, and each reply
(`LookupResult`, `CacheStats`) reflects every message before it. `DropBlocks` are sent in
the order the evictions were made.

Never blocks on the engine: the inbox handler does not await. Evictions go to a small
forwarding task that casts them to `drop_to`, coalescing whatever piled up while a cast
waited for room. The executor casts `Stored`/`Release` to this inbox and waits for room
(`Overflow.WAIT`) while this actor casts `DropBlocks` back and waits too; because the
handler here never waits on the executor, that pair of waits cannot deadlock, and a
`Lookup` is never delayed behind a slow executor.

Restart: the index is bookkeeping only. A new incarnation starts empty (no blocks, no
holds); blocks the engine still holds are unknown to it and are never matched or dropped
by it. Evictions not yet forwarded when an incarnation ends are lost with it.
"""

from __future__ import annotations

import logging
from typing import Union

import attrs
import trio

from omlx_actors.kernel import (
    ActorUnavailable,
    Address,
    Inbox,
    Overflow,
    open_inbox,
    serve,
    unknown_message,
)

from .blocks import BlockHash
from .index import BlockIndex, Eviction, StoredBlock

__all__ = [
    "ALL_MESSAGE_TYPES",
    "CACHE_INBOX_CAPACITY",
    "CACHE_INBOX_OVERFLOW",
    "CacheCommand",
    "CacheStats",
    "CacheStatsQuery",
    "DropBlocks",
    "Lookup",
    "LookupResult",
    "Release",
    "SetCacheBudget",
    "Stored",
    "cache_stats",
    "open_cache_inbox",
    "run",
]

logger = logging.getLogger(__name__)

# Every message is bookkeeping on dicts (microseconds), so the inbox only fills if the trio
# loop is starved. 1024 covers a Release for every request of a full batch plus its waiting
# queue with room to spare, so the executor's non-waiting `cast_nowait(Release)` on abort
# finds room.
CACHE_INBOX_CAPACITY = 1024
# WAIT: `Stored` and `Release` are casts that must never be lost - a lost `Stored` leaks
# engine tensors no eviction will ever name, a lost `Release` pins blocks forever - so a
# full inbox holds the sender back instead of dropping.
CACHE_INBOX_OVERFLOW = Overflow.WAIT

# A ring of the forwarder's doorbell means "evictions are pending"; one pending ring is
# enough, further rings while it is unread coalesce (`send_nowait` finds it full).
_DOORBELL_CAPACITY = 1

# ---------------------------------------------------------------------------------------
# Commands


@attrs.frozen(kw_only=True)
class Lookup:
    """Match `hashes` (a chain from the start of a prompt, see `block_hashes`) and hold the
    matched prefix for `request_id`; replied with `LookupResult`.

    A second `Lookup` for the same `request_id` replaces its holding (the new prefix is
    held before the old one is released)."""

    request_id: str
    hashes: tuple[BlockHash, ...]


@attrs.frozen(kw_only=True)
class Release:
    """Unhold every block `request_id` holds. Harmless for a request that holds none, so
    the executor may cast it for every finished request."""

    request_id: str


@attrs.frozen(kw_only=True)
class Stored:
    """The engine now holds the tensors of `blocks` (in chain order, parents first)."""

    blocks: tuple[StoredBlock, ...]


@attrs.frozen(kw_only=True)
class SetCacheBudget:
    """Change the byte budget and evict down to it: unpinned blocks first, then pinned ones
    (their requests keep a shorter prefix); the cache never holds more than its budget."""

    budget_bytes: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class CacheStatsQuery:
    """Ask for a `CacheStats` snapshot."""


CacheCommand = Union[Lookup, Release, Stored, SetCacheBudget, CacheStatsQuery]

# ---------------------------------------------------------------------------------------
# Replies and outgoing messages


@attrs.frozen(kw_only=True)
class LookupResult:
    """The blocks now held for `request_id`: the leading run of the looked-up hashes that
    is cached and usable (possibly empty)."""

    request_id: str
    matched: tuple[BlockHash, ...]


@attrs.frozen(kw_only=True)
class CacheStats:
    blocks: int
    used_bytes: int
    budget_bytes: int
    referenced_bytes: int
    hits: int  # lookups that matched at least one block
    misses: int  # lookups that matched none
    hit_blocks: int  # blocks matched over all lookups
    evictions: int  # blocks evicted to stay within the budget
    inserted: int  # blocks stored that were not cached
    refreshed: int = 0  # blocks stored again while cached (older tensors dropped)
    forced_evictions: int = 0  # of `evictions`, blocks held by a request (budget cut below)


@attrs.frozen(kw_only=True)
class DropBlocks:
    """To the engine (cast): drop the tensors of each eviction, only of that generation."""

    evictions: tuple[Eviction, ...]


ALL_MESSAGE_TYPES = (
    Lookup,
    Release,
    Stored,
    SetCacheBudget,
    CacheStatsQuery,
    LookupResult,
    CacheStats,
    DropBlocks,
    Eviction,
    StoredBlock,
)


def open_cache_inbox(name: str = "cache-index") -> tuple[Address, Inbox]:
    """The index actor's inbox, with its capacity and overflow policy."""
    return open_inbox(name, CACHE_INBOX_CAPACITY, CACHE_INBOX_OVERFLOW)


# ---------------------------------------------------------------------------------------
# The actor


@attrs.define(eq=False)
class _DropOutbox:
    """Evictions made but not yet cast to the engine, and the task that casts them.

    Unbounded as a list, but bounded in fact: each pending eviction names tensors the
    engine still holds, so there are never more than the blocks the engine has stored.
    """

    drop_to: Address
    pending: list[Eviction] = attrs.field(factory=list)
    undeliverable: int = 0
    _ring: trio.MemorySendChannel[None] = attrs.field(init=False)
    _rung: trio.MemoryReceiveChannel[None] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._ring, self._rung = trio.open_memory_channel[None](_DOORBELL_CAPACITY)

    def post(self, evictions: list[Eviction]) -> None:
        """Queue `evictions` for the engine. Never waits."""
        if not evictions:
            return
        self.pending.extend(evictions)
        try:
            self._ring.send_nowait(None)
        except trio.WouldBlock:
            pass  # a ring is already pending; the forwarder will take these with it

    def close(self) -> None:
        """No more evictions: the forwarder sends what is pending, then returns."""
        self._ring.close()

    async def forward(self) -> None:
        """Cast everything pending as one `DropBlocks` per wake-up, until closed and empty.

        If `drop_to` is gone (the executor stopped), its tensors went with it: the
        evictions are counted, logged and discarded rather than crashing the index.
        """
        async for _ in self._rung:
            while self.pending:
                batch = tuple(self.pending)
                self.pending.clear()
                try:
                    await self.drop_to.cast(DropBlocks(evictions=batch))
                except ActorUnavailable as gone:
                    self.undeliverable += len(batch)
                    logger.warning(
                        "cache index: %d evictions not delivered (%s); %d so far",
                        len(batch),
                        gone,
                        self.undeliverable,
                    )


async def run(
    inbox: Inbox,
    budget_bytes: int,
    drop_to: Address,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the index within `budget_bytes` until the inbox is closed and drained, casting
    evictions to `drop_to` as `DropBlocks`. Ready (`task_status.started()`) at once.

    On drain, the evictions still pending are delivered before it returns. On
    cancellation they are not (see the module docstring on restarts).
    """
    index = BlockIndex(budget_bytes)
    outbox = _DropOutbox(drop_to)

    async def handle(message: object) -> object:
        match message:
            case Lookup(request_id=request_id, hashes=hashes):
                matched, evictions = index.acquire(request_id, hashes)
                outbox.post(evictions)
                return LookupResult(request_id=request_id, matched=tuple(hashes[:matched]))
            case Release(request_id=request_id):
                outbox.post(index.release(request_id))
            case Stored(blocks=blocks):
                outbox.post(index.insert_all(blocks))
            case SetCacheBudget(budget_bytes=budget):
                outbox.post(index.set_budget(budget))
            case CacheStatsQuery():
                return cache_stats(index)
            case other:
                unknown_message(inbox.name, other)
        return None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.forward)
        await serve(inbox, handle, task_status=task_status)
        outbox.close()


def cache_stats(index: BlockIndex) -> CacheStats:
    """A `CacheStats` snapshot of `index`."""
    return CacheStats(
        blocks=len(index),
        used_bytes=index.used_bytes,
        budget_bytes=index.budget_bytes,
        referenced_bytes=index.referenced_bytes,
        hits=index.hits,
        misses=index.misses,
        hit_blocks=index.hit_blocks,
        evictions=index.evictions,
        inserted=index.inserted,
        refreshed=index.refreshed,
        forced_evictions=index.forced_evictions,
    )
