"""The tensors of cached prefix blocks, owned by the engine core on its MLX thread.

The cache index actor (`omlx_actors.cache`) owns the bookkeeping - which blocks exist, who
holds them, what to evict. This store owns the arrays: for each block hash, the per-layer
data needed to rebuild a request's cache up to that block's end:

- KV layers (`KVCache`): the block's slice of keys and values, `(1, heads, B, dim)`.
- Recurrent layers (`ArraysCache`, e.g. qwen3_next's gated delta-net): these cannot be
  sliced, so a block carries a *snapshot* of the whole state at its end boundary, taken
  when the request reached that boundary (seed 004: snapshots must be keyed by the request
  from the moment it is admitted - here, by its slot - never by an id assigned later).
  A hybrid block without a snapshot is never stored, so it can never be matched.

Every array here is created and evaluated on the MLX thread (`assert_on_mlx_thread`), and
evaluated before its size is reported, so sizes are real and nothing lazy crosses threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from omlx_actors.mlx_loader import load_mlx
from omlx_actors.cache.blocks import block_hashes
from omlx_actors.cache.index import StoredBlock
from omlx_actors.engine.mlx_thread import assert_on_mlx_thread

mx = load_mlx()

KV = "KVCache"
ARRAYS = "ArraysCache"
SUPPORTED_LAYERS = (KV, ARRAYS)


@attrs.define
class _BlockTensors:
    generation: int
    kv: dict[int, tuple[Any, Any]]  # layer -> (keys, values) of this block's positions
    arrays: dict[int, list[Any]]  # layer -> state snapshot at this block's end
    nbytes: int


def _to_tensor_data(name: str, array: Any):
    import numpy as np

    from omlx_actors.ssd.blockfile import TensorData

    if array.dtype == mx.bfloat16:  # numpy has no bfloat16: its bits travel as uint16
        return TensorData.from_array(name, np.array(array.view(mx.uint16)), dtype="bfloat16")
    return TensorData.from_array(name, np.array(array))


def _from_tensor_data(tensor) -> Any:
    array = mx.array(tensor.to_array())
    return array.view(mx.bfloat16) if tensor.dtype == "bfloat16" else array


def cache_layout(model) -> tuple[str, ...]:
    """Class names of the model's per-layer caches: part of the blocks' namespace."""
    from mlx_lm.models.cache import make_prompt_cache

    return tuple(type(c).__name__ for c in make_prompt_cache(model))


class BlockStore:
    """Block tensors by hash. Not thread-safe by design: the MLX thread is its only user."""

    def __init__(self, layout: Sequence[str], block_size: int, namespace: str) -> None:
        self.layout = tuple(layout)
        self.block_size = block_size
        self.namespace = namespace
        self.enabled = all(kind in SUPPORTED_LAYERS for kind in self.layout)
        self.hybrid = ARRAYS in self.layout
        self._blocks: dict[str, _BlockTensors] = {}
        self._generations = 0
        # The sum of every block's bytes, kept as blocks come and go: it is read after every
        # step (`StepOutput.block_store_bytes`), where a sum over all blocks cost ~2% of the
        # MLX thread at 64 streams.
        self._nbytes = 0
        # Snapshots of recurrent state taken at block boundaries, by slot, until the
        # request finishes: slot -> {block index -> per-layer state}.
        self._snapshots: dict[int, dict[int, dict[int, list[Any]]]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: str) -> bool:
        return block_hash in self._blocks

    @property
    def nbytes(self) -> int:
        return self._nbytes

    # -- restore ---------------------------------------------------------------------------

    def build_cache(self, hashes: Sequence[str]) -> tuple[list[Any] | None, int]:
        """A fresh per-request cache holding the blocks `hashes` (a chain from the start),
        and the number of tokens it covers. Stops at the first block it does not have."""
        assert_on_mlx_thread("BlockStore.build_cache")
        from mlx_lm.models.cache import ArraysCache, KVCache

        have: list[_BlockTensors] = []
        for h in hashes:
            block = self._blocks.get(h)
            if block is None:
                break
            have.append(block)
        if not have:
            return None, 0
        cache: list[Any] = []
        last = have[-1]
        for layer, kind in enumerate(self.layout):
            if kind == KV:
                c = KVCache()
                keys = mx.concatenate([b.kv[layer][0] for b in have], axis=2)
                values = mx.concatenate([b.kv[layer][1] for b in have], axis=2)
                c.state = (keys, values, keys.shape[2])
                cache.append(c)
            else:
                c = ArraysCache(len(last.arrays[layer]))
                c.cache = list(last.arrays[layer])
                cache.append(c)
        mx.eval([c.state for c in cache if isinstance(c, KVCache)])
        return cache, len(have) * self.block_size

    # -- snapshots during prefill / generation (recurrent layers only) ------------------------

    def snapshot(self, slot: int, block_index: int, request_cache: Sequence[Any]) -> None:
        """Record the recurrent state of `slot` at the end of block `block_index`.
        `request_cache` is that request's per-layer cache extracted at exactly that boundary."""
        assert_on_mlx_thread("BlockStore.snapshot")
        state = {
            layer: [mx.contiguous(a) for a in request_cache[layer].cache]
            for layer, kind in enumerate(self.layout)
            if kind == ARRAYS
        }
        mx.eval([a for arrays in state.values() for a in arrays])
        self._snapshots.setdefault(slot, {})[block_index] = state

    def forget_request(self, slot: int) -> None:
        self._snapshots.pop(slot, None)

    # -- save -----------------------------------------------------------------------------

    def save(
        self,
        slot: int,
        tokens: Sequence[int],
        request_cache: Sequence[Any],
        skip: int = 0,
        *,
        keep_snapshots: bool = False,
    ) -> list[StoredBlock]:
        """Store the full blocks of a request's cache. `tokens` are exactly the tokens the
        cache holds; blocks before `skip` came from the store already. A finished request's
        snapshots are forgotten here; a running one's are kept (`keep_snapshots`) for its
        later blocks. Returns what was newly stored (for the index)."""
        assert_on_mlx_thread("BlockStore.save")
        if keep_snapshots:
            snapshots = self._snapshots.get(slot, {})
        else:
            snapshots = self._snapshots.pop(slot, {})
        if not self.enabled:
            return []
        hashes = block_hashes(tokens, self.block_size, self.namespace)
        stored: list[StoredBlock] = []
        new_arrays: list[Any] = []
        for i, h in enumerate(hashes):
            if i < skip or h in self._blocks:
                continue
            if self.hybrid and i not in snapshots:
                break  # no snapshot: this block and all after it can't be restored
            lo, hi = i * self.block_size, (i + 1) * self.block_size
            kv = {}
            for layer, kind in enumerate(self.layout):
                if kind == KV:
                    keys, values, _ = request_cache[layer].state
                    kv[layer] = (mx.contiguous(keys[..., lo:hi, :]), mx.contiguous(values[..., lo:hi, :]))
                    new_arrays.extend(kv[layer])
            arrays = snapshots.get(i, {})
            self._generations += 1
            block = _BlockTensors(generation=self._generations, kv=kv, arrays=arrays, nbytes=0)
            self._blocks[h] = block
            stored.append((i, h, block))
        # Scheduled, not awaited: a synchronous eval here waited for the device to finish
        # everything queued, on the step path, once per prompt (13-15% of the MLX thread's
        # time at c=64 on an H200, BENCHMARKS.md). The copies run in stream order before the
        # next step's work; sizes come from shapes; whoever needs the bytes (the SSD tier's
        # `tensor_data`) waits for them then.
        mx.async_eval(new_arrays)
        result = []
        for i, h, block in stored:
            block.nbytes = sum(k.nbytes + v.nbytes for k, v in block.kv.values()) + sum(
                a.nbytes for arrays in block.arrays.values() for a in arrays
            )
            self._nbytes += block.nbytes
            result.append(
                StoredBlock(
                    hash=h,
                    parent=hashes[i - 1] if i else None,
                    nbytes=block.nbytes,
                    generation=block.generation,
                )
            )
        return result

    # -- the SSD tier: evaluated data out, arrays back in (MLX thread only) ---------------------

    def tensor_data(self, block_hash: str) -> tuple[Any, ...]:
        """The block's arrays as plain `TensorData` (bytes) for the SSD writer, which never
        touches MLX: `l{layer}.k`, `l{layer}.v`, `l{layer}.s{i}`."""
        assert_on_mlx_thread("BlockStore.tensor_data")
        block = self._blocks[block_hash]
        out = []
        for layer, (k, v) in block.kv.items():
            out += [_to_tensor_data(f"l{layer}.k", k), _to_tensor_data(f"l{layer}.v", v)]
        for layer, arrays in block.arrays.items():
            out += [_to_tensor_data(f"l{layer}.s{i}", a) for i, a in enumerate(arrays)]
        return tuple(out)

    def insert_tensors(self, block_hash: str, parent: str | None, tensors) -> StoredBlock | None:
        """A block loaded from the SSD tier, as arrays on this thread. None if its tensors do
        not fit this model's layout (then it is simply not used)."""
        assert_on_mlx_thread("BlockStore.insert_tensors")
        if block_hash in self._blocks:
            return None
        by_name = {t.name: t for t in tensors}
        kv, arrays = {}, {}
        try:
            for layer, kind in enumerate(self.layout):
                if kind == KV:
                    kv[layer] = (_from_tensor_data(by_name[f"l{layer}.k"]),
                                 _from_tensor_data(by_name[f"l{layer}.v"]))
                else:
                    names = sorted((n for n in by_name if n.startswith(f"l{layer}.s")),
                                   key=lambda n: int(n.rsplit("s", 1)[1]))
                    if not names:
                        return None
                    arrays[layer] = [_from_tensor_data(by_name[n]) for n in names]
        except KeyError:
            return None
        everything = [a for pair in kv.values() for a in pair] + [a for xs in arrays.values() for a in xs]
        mx.eval(everything)
        self._generations += 1
        nbytes = sum(a.nbytes for a in everything)
        self._blocks[block_hash] = _BlockTensors(self._generations, kv, arrays, nbytes)
        self._nbytes += nbytes
        return StoredBlock(hash=block_hash, parent=parent, nbytes=nbytes, generation=self._generations)

    def drop(self, block_hash: str, generation: int) -> bool:
        """Drop a block the index evicted - only the generation it evicted, so a block
        stored again since (a newer generation) survives a late drop."""
        block = self._blocks.get(block_hash)
        if block is None or block.generation != generation:
            return False
        del self._blocks[block_hash]
        self._nbytes -= block.nbytes
        return True

    def clear(self) -> None:
        self._blocks.clear()
        self._nbytes = 0
        self._snapshots.clear()
