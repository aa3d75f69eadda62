"""The SSD writer's write-behind bookkeeping: the saves it has taken off its save inbox and
not yet settled (`PendingSaves`), and the cleanup barriers that cancel saves a cleanup
found still waiting in the inbox (`CleanupBarriers`).

Why barriers: a `SsdCleanupRequest(scope)` must leave nothing of `scope` that was saved
before it, yet the save inbox cannot be looked into. It is FIFO, so the saves queued when
a cleanup is taken are exactly the next `queued` to arrive; the barrier says "cancel
those of this scope among them", and later saves of the scope are written normally.

Pure: no trio, no MLX, no I/O. Not thread-safe; the writer actor owns both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from omlx_actors.cache.blocks import BlockHash

from .messages import Save

__all__ = ["CleanupBarriers", "PendingSaves"]


class PendingSaves:
    """Saves taken off the inbox and not yet settled, oldest first, with the newest save
    of each hash for loads. The oldest is the one being written, if any."""

    def __init__(self) -> None:
        self._queue: deque[Save] = deque()
        self._newest: dict[BlockHash, Save] = {}
        self._count: dict[BlockHash, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._newest

    def get(self, block_hash: BlockHash) -> Save | None:
        return self._newest.get(block_hash)

    def oldest(self) -> Save:
        return self._queue[0]

    def append(self, save: Save) -> None:
        self._queue.append(save)
        self._newest[save.hash] = save
        self._count[save.hash] = self._count.get(save.hash, 0) + 1

    def pop_oldest(self) -> Save:
        save = self._queue.popleft()
        left = self._count[save.hash] - 1
        if left:
            self._count[save.hash] = left
        else:
            del self._count[save.hash], self._newest[save.hash]
        return save

    def discard(self, keep: Callable[[Save], bool]) -> int:
        """Drop every save for which `keep` is false; return how many."""
        kept = [save for save in self._queue if keep(save)]
        dropped = len(self._queue) - len(kept)
        self._queue.clear()
        self._newest.clear()
        self._count.clear()
        for save in kept:
            self.append(save)
        return dropped


class CleanupBarriers:
    """Numbers the saves as they come off the save inbox, and cancels on arrival those a
    cleanup covered while they were still queued.

    Invariant: every barrier is above `received` (one at or below it covers no save still
    to arrive, and is forgotten).
    """

    def __init__(self) -> None:
        # Saves taken off the save inbox so far; numbers the FIFO for the barriers.
        self.received = 0
        # scope -> `received` count below which saves of that scope are cancelled on
        # arrival (they were queued before a cleanup of that scope); `_all` the same for
        # every scope (SsdCleanupAll).
        self._by_scope: dict[str, int] = {}
        self._all = 0

    def arrived(self, scope: str) -> bool:
        """Number the next save off the inbox, one of `scope`; True if a cleanup cancelled
        it (it was queued when a cleanup of its scope, or of every scope, was taken)."""
        sequence = self.received
        self.received += 1
        cancelled = sequence < self._all or sequence < self._by_scope.get(scope, 0)
        if self._by_scope:
            self._by_scope = {s: n for s, n in self._by_scope.items() if n > self.received}
        return cancelled

    def cleanup(self, scope: str, queued: int) -> None:
        """A cleanup of `scope` is taken with `queued` saves still in the inbox: those of
        `scope` among them are cancelled when they arrive."""
        end = self.received + queued
        if end > self.received:
            self._by_scope[scope] = max(end, self._by_scope.get(scope, 0))

    def cleanup_all(self, queued: int) -> None:
        """A cleanup of every scope is taken with `queued` saves still in the inbox: all of
        them are cancelled when they arrive."""
        self._all = self.received + queued
        self._by_scope.clear()
