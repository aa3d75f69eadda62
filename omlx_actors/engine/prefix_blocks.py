"""The engine core's side of the prefix cache: its block store, and the news for the others.

The core saves a request's blocks when its prefill ends and again when it leaves the batch,
snapshots recurrent state where a block ends (hybrid models), rebuilds a cached prefix at
admission, and drops and restores blocks on command. What it stored since its last output
goes to the cache index (`stored`), and, write-through, to the SSD tier as plain data
(`ssd_saves`); the blocks a `CoreRestoreBlocks` put back go to the caller that asked
(`restored`). `StepOutput` carries all three, taken with `take_news`.

Without a block store (block size 0, or a cache type the store cannot slice or snapshot)
every method is a no-op, and only restores are still answered (with no blocks). MLX thread
only: the store's tensors belong to the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from omlx_actors.cache.index import Eviction, StoredBlock
from omlx_actors.engine import batch_rows
from omlx_actors.engine.block_store import BlockStore
from omlx_actors.engine.live_rows import LiveRequest

# A block for the SSD writer: (hash, parent, scope, tokens per block, tensors).
SsdSave = tuple[str, str | None, str, int, tuple[Any, ...]]


@attrs.frozen
class BlockNews:
    """What the block store did since the last output, for `StepOutput`."""

    stored: tuple[StoredBlock, ...]
    ssd_saves: tuple[SsdSave, ...]
    restored: tuple[tuple[int, tuple[StoredBlock, ...]], ...]


@attrs.define
class PrefixBlocks:
    """The core's block store (None: no prefix cache) and what it did since the last
    output. Not thread-safe by design: the MLX thread is its only user."""

    store: BlockStore | None
    ssd_enabled: bool
    _stored: list[StoredBlock] = attrs.field(factory=list)
    _ssd_saves: list[SsdSave] = attrs.field(factory=list)
    _restored: list[tuple[int, tuple[StoredBlock, ...]]] = attrs.field(factory=list)

    @property
    def hybrid(self) -> bool:
        """Whether recurrent state must be snapshotted where blocks end."""
        return self.store is not None and self.store.hybrid

    @property
    def nbytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0

    @property
    def has_news(self) -> bool:
        """Stored or restored blocks the next output must report (it is due even if no
        step follows)."""
        return bool(self._stored) or bool(self._restored)

    def take_news(self) -> BlockNews:
        news = BlockNews(tuple(self._stored), tuple(self._ssd_saves), tuple(self._restored))
        self._stored, self._ssd_saves, self._restored = [], [], []
        return news

    # -- admission ----------------------------------------------------------------------------

    def cached_prefix(self, cached_blocks: Sequence[str], prompt_length: int) -> tuple[Any, int]:
        """(the rebuilt cache or None, tokens it holds) for a request whose prompt starts
        with `cached_blocks`. A request always prefills at least its last prompt token, so
        a prefix covering the whole prompt is not used."""
        cache, cached = None, 0
        if self.store is not None and cached_blocks:
            cache, cached = self.store.build_cache(cached_blocks)
        if cached >= prompt_length:
            cache, cached = None, 0
        return cache, cached

    def segments(self, tokens: Sequence[int], cached: int) -> tuple[list[int], list[list[int]]]:
        """(block indexes whose end the prefill stops at, the prompt's segments): the prompt
        after the cached prefix, cut at block boundaries when recurrent state must be
        snapshotted there (hybrid models); one segment otherwise."""
        rest = list(tokens[cached:])
        store = self.store
        if store is None or not store.hybrid:
            return [], [rest]
        size = store.block_size
        boundaries, segments, start = [], [], cached
        # The last prompt token is prefilled with the first decode step, so a boundary at
        # the very end of the prompt is reached in generation, not here.
        for end in range((cached // size + 1) * size, len(tokens), size):
            segments.append(list(tokens[start:end]))
            boundaries.append(end // size - 1)
            start = end
        segments.append(list(tokens[start:]))
        return boundaries, segments

    # -- during a request's life ---------------------------------------------------------------

    def snapshot_prefill_boundary(self, gen: Any, live: LiveRequest) -> None:
        """The row's prefill stopped at the end of the next block in its `boundaries`
        (which this pops): snapshot its recurrent state there."""
        if self.store is None or not live.boundaries:
            return
        block_index = live.boundaries.pop(0)
        state = batch_rows.prompt_row_state(gen, live.uid, self.store.layout)
        self.store.snapshot(live.slot, block_index, state)

    def save_prompt(self, gen: Any, live: LiveRequest) -> None:
        """Store the prompt's blocks as soon as its prefill is done, so requests arriving
        while this one still decodes (agents sharing a system prompt) can reuse them. The
        row has just moved to the generation batch with its last prompt token."""
        if self.store is None:
            return
        row = batch_rows.generation_row_kv(gen, live.uid, self.store.layout)
        tokens, cache = row if row is not None else batch_rows.generation_row(gen, live.uid)
        self._keep(live.cache_scope, self.store.save(
            live.slot, tokens, cache, skip=self._saved(live), keep_snapshots=True,
        ))

    def save_prefilled(self, gen: Any, live: LiveRequest) -> None:
        """Between two chunks of a prompt's prefill (attention-only models): store the
        blocks it has completed since the last save. Saving a long prompt's blocks all at
        once when it ends builds every block's slices on the MLX thread in one step (256
        blocks x 32 layers x 2 for 16k tokens on a 7.5B model), which stalled every
        decoding stream for that step; this spreads it over the chunks."""
        store = self.store
        if store is None or store.hybrid:
            return
        full = batch_rows.prompt_row_length(gen, live.uid) // store.block_size
        skip = self._saved(live)
        if full <= skip:
            return  # no block completed since the last save: nothing read, nothing built
        row = batch_rows.prompt_row_kv(gen, live.uid, store.layout)
        if row is None:
            return
        tokens, cache = row
        self._keep(live.cache_scope, store.save(
            live.slot, tokens[: full * store.block_size], cache, skip=skip, keep_snapshots=True))
        live.saved_blocks = full

    def _saved(self, live: LiveRequest) -> int:
        """Blocks at the start of its prompt that need no saving: cached or already saved."""
        return max(live.saved_blocks, live.cached_tokens // self.store.block_size)

    def snapshot_generation_boundaries(self, gen: Any, slot_of_uid: Mapping[int, int]) -> None:
        """Snapshot the recurrent state of every decoding row (of `slot_of_uid`) whose
        cache has just completed a block."""
        for uid, block_index, state in batch_rows.generation_rows_at_block_end(
                gen, self.store.block_size, self.store.layout, slot_of_uid):
            self.store.snapshot(slot_of_uid[uid], block_index, state)

    def save_finished(self, live: LiveRequest, tokens: list[int] | None,
                      cache: list[Any] | None) -> None:
        """A request left the batch with `cache` over `tokens`: store its blocks (the
        store forgets its snapshots), or, with nothing to save, just forget it."""
        if self.store is None:
            return
        if tokens and cache:
            self._keep(live.cache_scope, self.store.save(
                live.slot, tokens, cache, skip=live.cached_tokens // self.store.block_size))
        else:
            self.store.forget_request(live.slot)

    def forget(self, slot: int) -> None:
        """A failed request: its snapshots are of no use."""
        if self.store is not None:
            self.store.forget_request(slot)

    def _keep(self, scope: str, stored: list[StoredBlock]) -> None:
        """Report newly stored blocks to the index and, write-through, to the SSD tier."""
        self._stored.extend(stored)
        if self.ssd_enabled:
            for block in stored:
                self._ssd_saves.append((block.hash, block.parent, scope, self.store.block_size,
                                        self.store.tensor_data(block.hash)))

    # -- on command ------------------------------------------------------------------------------

    def drop(self, evictions: Sequence[Eviction]) -> bool:
        """The cache index evicted these: drop their tensors (generation-checked). Returns
        whether any was dropped."""
        dropped = False
        if self.store is not None:
            for e in evictions:
                dropped |= self.store.drop(e.hash, e.generation)
        return dropped

    def restore(self, tag: int, blocks: Sequence[tuple[str, str | None, tuple[Any, ...]]]) -> None:
        """Put blocks loaded from the SSD tier back; the answer to `tag` is the blocks now
        in the store (none without one)."""
        restored = []
        if self.store is not None:
            for block_hash, parent, tensors in blocks:
                stored = self.store.insert_tensors(block_hash, parent, tensors)
                if stored is not None:
                    restored.append(stored)
        self._restored.append((tag, tuple(restored)))

    def clear(self) -> None:
        if self.store is not None:
            self.store.clear()
