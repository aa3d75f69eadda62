"""The writer's bookkeeping of its directory: which blocks are on disk, their real sizes
and scopes, least recently used first; and how many bytes it may use.

Pure: no trio, no MLX, no I/O. Not thread-safe; the writer actor owns it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import attrs

from omlx_actors.cache.blocks import BlockHash

__all__ = [
    "MAX_FIXED_RESERVE_SHARE",
    "DiskBlock",
    "DiskIndex",
    "DiskSpace",
    "effective_budget",
    "free_space_reserve",
]


@attrs.frozen(kw_only=True)
class DiskBlock:
    """A block file on disk: `size` is the file's real size in bytes."""

    hash: BlockHash
    parent: BlockHash | None
    scope: str
    tokens: int
    size: int


class DiskIndex:
    """Blocks on disk by hash, least recently used first, with their scopes and total size.

    Invariants: `bytes` is the sum of the blocks' sizes; every block is in exactly one
    scope set, the one its `scope` names; empty scope sets are removed.
    """

    def __init__(self, blocks: Iterable[DiskBlock] = ()) -> None:
        # Least recently used first: loads and saves move a block to the end.
        self._blocks: OrderedDict[BlockHash, DiskBlock] = OrderedDict()
        self._scopes: dict[str, set[BlockHash]] = {}
        self._bytes = 0
        for block in blocks:
            self.put(block)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def __iter__(self) -> Iterator[DiskBlock]:
        """Blocks, least recently used first."""
        return iter(list(self._blocks.values()))

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, block_hash: BlockHash) -> DiskBlock | None:
        return self._blocks.get(block_hash)

    def put(self, block: DiskBlock) -> DiskBlock | None:
        """Record `block` as the most recently used; return the entry it replaced, if any."""
        old = self.remove(block.hash)
        self._blocks[block.hash] = block
        self._scopes.setdefault(block.scope, set()).add(block.hash)
        self._bytes += block.size
        return old

    def touch(self, block_hash: BlockHash) -> None:
        """Mark `block_hash` (if present) as the most recently used."""
        if block_hash in self._blocks:
            self._blocks.move_to_end(block_hash)

    def remove(self, block_hash: BlockHash) -> DiskBlock | None:
        """Forget `block_hash`; return its entry, or None if it was not present."""
        block = self._blocks.pop(block_hash, None)
        if block is None:
            return None
        self._bytes -= block.size
        members = self._scopes[block.scope]
        members.discard(block_hash)
        if not members:
            del self._scopes[block.scope]
        return block

    def of_scope(self, scope: str) -> list[DiskBlock]:
        """The blocks whose scope is `scope`, least recently used first."""
        members = self._scopes.get(scope, ())
        return [block for block in self._blocks.values() if block.hash in members]

    def victims(
        self, excess: int, limit: int, keep: frozenset[BlockHash] = frozenset()
    ) -> list[DiskBlock]:
        """The least recently used blocks (not in `keep`) whose removal frees at least
        `excess` bytes, at most `limit` of them; fewer if the index runs out. Nothing is
        removed here: the caller removes the files, then the entries."""
        chosen: list[DiskBlock] = []
        freed = 0
        if excess <= 0:
            return chosen
        for block in self._blocks.values():
            if len(chosen) >= limit or freed >= excess:
                break
            if block.hash in keep:
                continue
            chosen.append(block)
            freed += block.size
        return chosen


# The fixed part of the reserve (`min_free_bytes`, 1 GiB by default) never takes more than
# this share of the disk: on a small volume (a 2 MB tmpfs, an 8 GB card) a fixed 1 GiB
# reserve is the whole disk and the tier would write nothing. A quarter keeps such a disk
# mostly usable while leaving other programs real room; on disks of 4 GiB or more the
# fixed reserve applies in full.
MAX_FIXED_RESERVE_SHARE = 0.25


def free_space_reserve(total_bytes: int, min_free_bytes: int, min_free_fraction: float) -> int:
    """The free space the directory never eats into on a disk of `total_bytes`:
    `max(min_free_fraction * total, min(min_free_bytes, MAX_FIXED_RESERVE_SHARE * total))`."""
    fixed = min(min_free_bytes, math.floor(MAX_FIXED_RESERVE_SHARE * total_bytes))
    return max(fixed, math.ceil(min_free_fraction * total_bytes))


def effective_budget(
    budget_bytes: int,
    used_bytes: int,
    free_bytes: int,
    total_bytes: int,
    min_free_bytes: int,
    min_free_fraction: float,
) -> int:
    """The bytes the directory may hold: the configured budget, shrunk so the disk keeps
    `free_space_reserve(...)` free. The directory's own bytes (`used_bytes`) count as
    reclaimable space. Never negative."""
    reserve = free_space_reserve(total_bytes, min_free_bytes, min_free_fraction)
    return max(0, min(budget_bytes, used_bytes + free_bytes - reserve))


@attrs.define
class DiskSpace:
    """The disk's free space as last read, kept current between readings by the writer's
    own writes and removals (file system block rounding and other programs make it drift;
    the writer re-reads it every few saves and after every error)."""

    total: int = 0
    free: int = 0
    # Whether a reading was ever taken; before it the free space counts as unlimited.
    known: bool = False

    def reading(self, total: int, free: int) -> None:
        self.total, self.free, self.known = total, free, True

    def wrote(self, nbytes: int) -> None:
        self.free = max(0, self.free - nbytes)

    def freed(self, nbytes: int) -> None:
        self.free += nbytes
