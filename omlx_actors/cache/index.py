"""The block index: which prefix blocks are cached, who holds them, what to evict.

Bookkeeping only. The tensors of each block live in the engine core (its block store, on
the MLX thread); this index owns their names (`BlockHash`), sizes, reference counts,
recency and the byte budget, and decides evictions. Each eviction names the block *and
the generation* of the tensors it evicts, so the engine drops exactly those tensors: a
block stored again since (a newer generation) survives a late drop.

Generations. The engine numbers every set of block tensors it stores, increasing. For one
hash the index keeps the newest generation it was told of; an older or replaced one comes
back as an `Eviction` so the engine frees it. Re-reporting the generation already held
only updates the block's size and usability.

Matching. `match` walks the requested hash chain from the start and stops at the first
block that is missing or not usable. A chained hash stands for its whole prefix, so
presence of hash *i* is all a match needs; parent links are used only by eviction.

Eviction policy, run whenever the bytes cached exceed the budget:

1. Never a referenced block: a request that matched a block holds it until released.
2. Leaves first: a block with no cached children. Evicting a parent first would strand its
   children - still cached, using memory, but unreachable by any match - so the index
   trims chains from their ends.
3. Among leaves, the least recently used first. A block is *used* when it is stored (or
   stored again) and when its last holder releases it; `match` and `acquire` do not touch
   recency, because an acquired block cannot be evicted anyway and its release stamps it.
4. Only if no unreferenced leaf is left - possible only when the parent links reported by
   the engine disagree with the chains looked up (the engine reports a parent that no
   lookup passes through, or a cycle) - the least recently used unreferenced block goes,
   leaves or not, so an unpinned excess can never outlive an eviction pass.

5. The budget is a hard ceiling: `used_bytes <= budget_bytes` holds after every method.
   When unreferenced blocks are not enough (the budget was cut below what requests hold),
   referenced blocks go too, by the same leaves-first LRU order, and every holder stops
   holding that block and the rest of its chain after it (`forced_evictions` counts them).
   Dropping a held block is safe for the engine: a request that already started has
   copied its prefix into its own cache, and one that has not gets the blocks still
   present (the block store's `build_cache` stops at the first missing one), so it
   prefills more. Issue #15: a cache cut to 14 KB for a waiting request kept the 32 KB
   that request itself held, so the cache stayed over budget and the request waited on
   memory nothing would free.

Pure: no trio, no MLX. Not thread-safe; one actor owns it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

from .blocks import BlockHash

__all__ = ["BlockIndex", "Eviction", "StoredBlock"]

# The leaf heap keeps stale entries (lazy deletion); it is rebuilt from the live leaves
# once it holds this many times more entries than there are idle blocks, so it stays
# O(blocks) in size while each rebuild is paid for by as many pushes.
_HEAP_SLACK = 2
_HEAP_MIN_REBUILD = 64


def _non_negative(_: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Eviction:
    """The engine may drop the tensors of `hash` stored as `generation` (`nbytes` of them)."""

    hash: BlockHash
    generation: int
    nbytes: int


@attrs.frozen(kw_only=True)
class StoredBlock:
    """A block whose tensors the engine now holds, reported to the index.

    `parent` is the previous block of its chain (None for the first block of a sequence).
    `usable=False` is a placeholder (e.g. a state snapshot not yet valid): it takes part in
    eviction and chains but is never matched, and a match stops before it.
    """

    hash: BlockHash
    parent: BlockHash | None
    nbytes: int = attrs.field(validator=_non_negative)
    generation: int
    usable: bool = True

    def __attrs_post_init__(self) -> None:
        if self.parent == self.hash:
            raise ValueError(f"block {self.hash} cannot be its own parent")


@attrs.define(eq=False)
class _Entry:
    """A present block. `refs` is the number of owners holding it."""

    hash: BlockHash
    parent: BlockHash | None
    nbytes: int
    generation: int
    usable: bool
    refs: int = 0
    # Recency stamp from `BlockIndex._clock`; unique per block, larger is more recent.
    last_used: int = 0


class BlockIndex:
    """Cached blocks within `budget_bytes`, with per-owner holds and leaf-first LRU eviction.

    Invariant: `used_bytes <= budget_bytes` after every method (policy rule 5).

    Every method that can evict returns the `Eviction`s it made, in the order made; the
    caller must pass them on to whoever holds the tensors.
    """

    def __init__(self, budget_bytes: int) -> None:
        _check_budget(budget_bytes)
        self._budget = budget_bytes
        self._blocks: dict[BlockHash, _Entry] = {}
        # owner -> distinct hashes it holds, in chain order (each counted once in `refs`).
        self._holdings: dict[str, tuple[BlockHash, ...]] = {}
        # Unreferenced present blocks, least recently used first. Invariant: exactly the
        # present blocks with refs == 0, ordered by `last_used`.
        self._idle: OrderedDict[BlockHash, None] = OrderedDict()
        # Candidates for eviction: (last_used, hash) of unreferenced leaves. Entries go stale
        # instead of being removed; `_pop_leaf` skips an entry unless the block is present,
        # unreferenced, a leaf and still stamped `last_used`. Invariant: every idle leaf has
        # a live entry.
        self._leaves: list[tuple[int, BlockHash]] = []
        # hash -> number of present blocks naming it as parent, whether or not it is
        # present itself (a child may arrive before its parent). No zero counts are kept.
        self._children: dict[BlockHash, int] = {}
        self._clock = 0
        self._used = 0
        self._referenced = 0
        # Counters (monotonic).
        self.hits = 0
        """Acquisitions that matched at least one block."""
        self.misses = 0
        """Acquisitions that matched none."""
        self.hit_blocks = 0
        """Blocks matched over all acquisitions."""
        self.evictions = 0
        """Blocks evicted to stay within the budget."""
        self.inserted = 0
        """Blocks added that were not present."""
        self.refreshed = 0
        """Reports of a block already present (its older tensors are returned as evictions)."""
        self.forced_evictions = 0
        """Of `evictions`, blocks evicted while held (policy rule 5: the budget was cut
        below the held bytes)."""

    # -- queries ---------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes of every present block, referenced or not."""
        return self._used

    @property
    def referenced_bytes(self) -> int:
        """Bytes of blocks held by at least one owner (they cannot be evicted)."""
        return self._referenced

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def get(self, block_hash: BlockHash) -> StoredBlock | None:
        """The present block `block_hash` as last reported, or None."""
        entry = self._blocks.get(block_hash)
        if entry is None:
            return None
        return StoredBlock(
            hash=entry.hash,
            parent=entry.parent,
            nbytes=entry.nbytes,
            generation=entry.generation,
            usable=entry.usable,
        )

    def refcount(self, block_hash: BlockHash) -> int:
        """Owners holding `block_hash` (0 if it is not present)."""
        entry = self._blocks.get(block_hash)
        return 0 if entry is None else entry.refs

    def holding(self, owner: str) -> tuple[BlockHash, ...]:
        """The blocks `owner` holds, in chain order."""
        return self._holdings.get(owner, ())

    def owners(self) -> list[str]:
        return list(self._holdings)

    def match(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` are present and usable.

        No side effects: no counters, no recency. (Recency is stamped when a holder
        releases, see the module docstring.)
        """
        blocks = self._blocks
        matched = 0
        for block_hash in hashes:
            entry = blocks.get(block_hash)
            if entry is None or not entry.usable:
                break
            matched += 1
        return matched

    # -- holds -----------------------------------------------------------------------------

    def acquire(self, owner: str, hashes: Sequence[BlockHash]) -> tuple[int, list[Eviction]]:
        """Match `hashes` and hold the matched prefix for `owner`; return (matched count,
        evictions).

        Counts a hit (matched >= 1) or a miss. An owner that already holds blocks keeps at
        most one holding: the new prefix is held first and the old holding released after,
        so blocks in both are never unpinned in between. The evictions are always empty
        now that the budget is a hard ceiling (rule 5: releasing cannot leave the cache
        over budget); the return shape is kept for callers that pass them on.
        """
        matched = self.match(hashes)
        held = tuple(dict.fromkeys(hashes[:matched]))  # a repeated hash is one hold
        for block_hash in held:
            self._ref(self._blocks[block_hash])
        previous = self._holdings.pop(owner, ())
        if held:
            self._holdings[owner] = held
        if matched:
            self.hits += 1
            self.hit_blocks += matched
        else:
            self.misses += 1
        if not previous:
            return matched, []
        self._unref_all(previous)
        return matched, self._evict_to_budget()

    def release(self, owner: str) -> list[Eviction]:
        """Drop every hold of `owner` (nothing if it holds none). Returns evictions for the
        callers' sake; with the budget a hard ceiling (rule 5) there are none."""
        previous = self._holdings.pop(owner, ())
        if not previous:
            return []
        self._unref_all(previous)
        return self._evict_to_budget()

    # -- changes ---------------------------------------------------------------------------

    def insert(self, block: StoredBlock) -> list[Eviction]:
        """Add `block` (or refresh it if its hash is present), then evict down to the budget.

        A refresh with a newer generation replaces the tensors: the replaced generation is
        the first eviction returned. An older generation than the one held is not taken:
        it is returned as an eviction itself. The same generation only updates size and
        usability. A present block keeps its holders across a refresh. A block whose parent
        is not present is added all the same; no match reaches it until the parent is back.

        The returned evictions may include `block` itself, if it cannot fit.
        """
        entry = self._blocks.get(block.hash)
        if entry is None:
            self._add(block)
            self.inserted += 1
            return self._evict_to_budget()
        self.refreshed += 1
        if block.generation < entry.generation:
            return [Eviction(hash=block.hash, generation=block.generation, nbytes=block.nbytes)]
        evictions: list[Eviction] = []
        if block.generation != entry.generation:
            evictions.append(
                Eviction(hash=entry.hash, generation=entry.generation, nbytes=entry.nbytes)
            )
        if block.parent != entry.parent:
            self._unlink(entry)
            entry.parent = block.parent
            self._link(entry)
        self._used += block.nbytes - entry.nbytes
        if entry.refs:
            self._referenced += block.nbytes - entry.nbytes
        entry.nbytes = block.nbytes
        entry.generation = block.generation
        entry.usable = block.usable
        if not entry.refs:
            self._touch(entry)
        evictions.extend(self._evict_to_budget())
        return evictions

    def insert_all(self, blocks: Iterable[StoredBlock]) -> list[Eviction]:
        """`insert` each block in order; all their evictions, in order."""
        evictions: list[Eviction] = []
        for block in blocks:
            evictions.extend(self.insert(block))
        return evictions

    def set_budget(self, budget_bytes: int) -> list[Eviction]:
        """Change the budget and evict down to it (as far as unreferenced blocks allow)."""
        _check_budget(budget_bytes)
        self._budget = budget_bytes
        return self._evict_to_budget()

    # -- internals -------------------------------------------------------------------------

    def _add(self, block: StoredBlock) -> None:
        entry = _Entry(
            hash=block.hash,
            parent=block.parent,
            nbytes=block.nbytes,
            generation=block.generation,
            usable=block.usable,
        )
        self._blocks[entry.hash] = entry
        self._used += entry.nbytes
        self._link(entry)
        self._touch(entry)

    def _link(self, entry: _Entry) -> None:
        """Count `entry` as a child of its parent."""
        if entry.parent is not None:
            self._children[entry.parent] = self._children.get(entry.parent, 0) + 1

    def _unlink(self, entry: _Entry) -> None:
        """Stop counting `entry` as a child; its parent may become an evictable leaf."""
        parent = entry.parent
        if parent is None:
            return
        remaining = self._children[parent] - 1
        if remaining:
            self._children[parent] = remaining
            return
        del self._children[parent]
        parent_entry = self._blocks.get(parent)
        if parent_entry is not None and parent_entry.refs == 0:
            self._push_leaf(parent_entry)

    def _touch(self, entry: _Entry) -> None:
        """Stamp an unreferenced block most recently used."""
        self._clock += 1
        entry.last_used = self._clock
        self._idle[entry.hash] = None
        self._idle.move_to_end(entry.hash)
        if entry.hash not in self._children:
            self._push_leaf(entry)

    def _push_leaf(self, entry: _Entry) -> None:
        heapq.heappush(self._leaves, (entry.last_used, entry.hash))
        if len(self._leaves) > _HEAP_MIN_REBUILD + _HEAP_SLACK * len(self._idle):
            self._leaves = [
                (self._blocks[h].last_used, h) for h in self._idle if h not in self._children
            ]
            heapq.heapify(self._leaves)

    def _ref(self, entry: _Entry) -> None:
        entry.refs += 1
        if entry.refs == 1:
            del self._idle[entry.hash]
            self._referenced += entry.nbytes

    def _unref_all(self, hashes: Sequence[BlockHash]) -> None:
        # Chain order: a parent is stamped before its children, so among blocks released
        # together the deepest are the least recently used and go first.
        for block_hash in hashes:
            entry = self._blocks[block_hash]
            entry.refs -= 1
            if entry.refs == 0:
                self._referenced -= entry.nbytes
                self._touch(entry)

    def _pop_leaf(self) -> _Entry | None:
        """The least recently used unreferenced leaf, or None; discards stale entries."""
        leaves = self._leaves
        while leaves:
            last_used, block_hash = heapq.heappop(leaves)
            entry = self._blocks.get(block_hash)
            if (
                entry is not None
                and entry.refs == 0
                and entry.last_used == last_used
                and block_hash not in self._children
            ):
                return entry
        return None

    def _evict_to_budget(self) -> list[Eviction]:
        evictions: list[Eviction] = []
        while self._used > self._budget:
            if self._idle:
                victim = self._pop_leaf()
                if victim is None:
                    # Policy rule 4: inconsistent parent links left no idle leaf.
                    victim = self._blocks[next(iter(self._idle))]
            else:
                # Policy rule 5: only held blocks are left and the budget is still exceeded.
                victim = self._unhold(self._held_victim())
            evictions.append(self._remove(victim))
        self.evictions += len(evictions)
        return evictions

    def _held_victim(self) -> _Entry:
        """The least recently used held leaf (any held block if links form a cycle).

        A linear scan: this runs only when a budget cut falls below the held bytes."""
        held = [e for e in self._blocks.values() if e.refs]
        leaves = [e for e in held if e.hash not in self._children]
        return min(leaves or held, key=lambda e: e.last_used)

    def _unhold(self, victim: _Entry) -> _Entry:
        """Make `victim` evictable although held: each holder stops holding it and the rest
        of its chain after it (unusable without it); those become idle like any release."""
        for owner, held in list(self._holdings.items()):
            if victim.hash not in held:
                continue
            cut = held.index(victim.hash)
            if cut:
                self._holdings[owner] = held[:cut]
            else:
                del self._holdings[owner]
            self._unref_all(held[cut:])
        self.forced_evictions += 1
        return victim

    def _remove(self, entry: _Entry) -> Eviction:
        del self._blocks[entry.hash]
        del self._idle[entry.hash]
        self._used -= entry.nbytes
        self._unlink(entry)
        return Eviction(hash=entry.hash, generation=entry.generation, nbytes=entry.nbytes)

    # -- checking --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (for tests)."""

        def require(condition: bool, what: str) -> None:
            if not condition:
                raise AssertionError(f"BlockIndex invariant broken: {what}")

        blocks = self._blocks
        holders: dict[BlockHash, int] = {}
        for owner, held in self._holdings.items():
            require(bool(held), f"owner {owner!r} is recorded with an empty holding")
            require(len(set(held)) == len(held), f"owner {owner!r} holds a block twice")
            for block_hash in held:
                require(block_hash in blocks, f"owner {owner!r} holds evicted {block_hash}")
                holders[block_hash] = holders.get(block_hash, 0) + 1
        for block_hash, entry in blocks.items():
            require(entry.hash == block_hash, f"{block_hash} is filed under another hash")
            require(entry.refs >= 0, f"{block_hash} has refcount {entry.refs}")
            require(
                entry.refs == holders.get(block_hash, 0),
                f"{block_hash} has refcount {entry.refs} but "
                f"{holders.get(block_hash, 0)} holders",
            )
            require(entry.nbytes >= 0, f"{block_hash} has {entry.nbytes} bytes")
        used = sum(e.nbytes for e in blocks.values())
        require(self._used == used, f"used_bytes {self._used} != sum of block sizes {used}")
        referenced = sum(e.nbytes for e in blocks.values() if e.refs)
        require(
            self._referenced == referenced,
            f"referenced_bytes {self._referenced} != sum of held block sizes {referenced}",
        )
        idle = [h for h, e in blocks.items() if e.refs == 0]
        require(
            set(self._idle) == set(idle) and len(self._idle) == len(idle),
            "the LRU holds other blocks than the unreferenced ones",
        )
        stamps = [blocks[h].last_used for h in self._idle]
        require(stamps == sorted(set(stamps)), "the LRU is not ordered by last use")
        require(
            self._used <= self._budget,
            f"{self._used} bytes used over a budget of {self._budget}",
        )
        children: dict[BlockHash, int] = {}
        for entry in blocks.values():
            if entry.parent is not None:
                children[entry.parent] = children.get(entry.parent, 0) + 1
        require(self._children == children, "child counts disagree with the parent links")
        live = set(self._leaves)
        for block_hash in self._idle:
            if block_hash not in children:
                require(
                    (blocks[block_hash].last_used, block_hash) in live,
                    f"idle leaf {block_hash} is not an eviction candidate",
                )
        for counter in ("hits", "misses", "hit_blocks", "evictions", "inserted", "refreshed",
                        "forced_evictions"):
            require(getattr(self, counter) >= 0, f"counter {counter} is negative")


def _check_budget(budget_bytes: int) -> None:
    if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0, got {budget_bytes!r}")
