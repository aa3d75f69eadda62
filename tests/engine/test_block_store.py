"""The block store's byte count, kept as blocks come and go, equals the sum of its blocks.

It is read after every step, so it is a running total rather than a sum over the blocks;
this checks the total against the blocks themselves through every way a block enters
(a prompt's save, an SSD load) or leaves (an eviction, a clear), on a real model's cache.
"""

from __future__ import annotations

from pathlib import Path

from omlx_actors.engine.block_store import BlockStore, cache_layout
from omlx_actors.mlx_loader import load_mlx


def _sum_of_blocks(store: BlockStore) -> int:
    return sum(b.nbytes for b in store._blocks.values())


def _scenario(path: Path) -> list[tuple[str, int, int, int]]:
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    mx = load_mlx()
    model, _ = load_model(path)
    tokens = list(range(5, 25))  # 20 tokens: 5 blocks of 4
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))
    store = BlockStore(cache_layout(model), block_size=4, namespace="test")
    seen = []

    def note(what: str) -> None:
        seen.append((what, store.nbytes, _sum_of_blocks(store), len(store)))

    stored = store.save(0, tokens, cache)
    note("saved")
    store.save(1, tokens, cache)  # the same blocks again: nothing new
    note("saved again")
    last = stored[-1]
    data = store.tensor_data(last.hash)
    assert store.drop(last.hash, last.generation)
    note("dropped")
    assert not store.drop(last.hash, last.generation)  # a late second drop changes nothing
    note("dropped again")
    store.insert_tensors(last.hash, last.parent, data)
    note("loaded back")
    store.clear()
    note("cleared")
    return seen


def test_the_running_byte_count_equals_the_sum_of_the_blocks(tiny_llama: Path, on_mlx_worker) -> None:
    seen = on_mlx_worker(_scenario, tiny_llama)
    counts = {what: (total, summed, blocks) for what, total, summed, blocks in seen}
    for what, (total, summed, _) in counts.items():
        assert total == summed, what
    assert counts["saved"][2] == 5 and counts["saved"][0] > 0
    assert counts["saved again"] == counts["saved"]
    assert counts["dropped"][2] == 4 and counts["dropped"][0] < counts["saved"][0]
    assert counts["dropped again"] == counts["dropped"]
    assert counts["loaded back"] == counts["saved"]
    assert counts["cleared"] == (0, 0, 0)
