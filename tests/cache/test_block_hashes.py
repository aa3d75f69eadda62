"""Chained block hashes: equal prefixes share hashes, namespaces never meet, and only full
blocks are named."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omlx_actors.cache.blocks import HASH_HEX_CHARS, block_hashes, cache_namespace

ROOT = Path(__file__).resolve().parents[2]
NS = cache_namespace("tiny-llama@abc", ("KVCache", "KVCache"), 4)
OTHER_NS = cache_namespace("tiny-llama@def", ("KVCache", "KVCache"), 4)

tokens = st.lists(st.integers(0, 2**32 - 1), max_size=40)


def test_each_full_block_gets_one_hash_of_32_lowercase_hex():
    hashes = block_hashes(list(range(12)), 4, NS)
    assert len(hashes) == 3
    for h in hashes:
        assert len(h) == HASH_HEX_CHARS == 32
        assert int(h, 16) >= 0 and h == h.lower()
    assert len(set(hashes)) == 3


def test_the_recipe_is_sha256_of_parent_namespace_digest_and_little_endian_tokens():
    # Pinned: changing the recipe silently would make old and new chains disagree.
    salt = hashlib.sha256(NS.encode()).digest()
    first = hashlib.sha256(salt + bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0]))
    h0 = first.hexdigest()[:32]
    second = hashlib.sha256(bytes.fromhex(h0) + salt + (7).to_bytes(4, "little") * 4)
    assert block_hashes([1, 2, 3, 256, 7, 7, 7, 7], 4, NS) == [h0, second.hexdigest()[:32]]


@given(prefix=tokens, a=tokens, b=tokens)
@settings(max_examples=200, derandomize=True)
def test_equal_prefixes_give_equal_hashes_whatever_follows(prefix, a, b):
    whole = len(prefix) // 4
    ha = block_hashes(prefix + a, 4, NS)
    hb = block_hashes(prefix + b, 4, NS)
    assert ha[:whole] == hb[:whole] == block_hashes(prefix, 4, NS)


@given(a=tokens, b=tokens)
@settings(max_examples=200, derandomize=True)
def test_different_blocks_give_different_hashes_from_the_first_difference_on(a, b):
    ha, hb = block_hashes(a, 4, NS), block_hashes(b, 4, NS)
    for i in range(min(len(ha), len(hb))):
        if a[: 4 * (i + 1)] != b[: 4 * (i + 1)]:
            assert ha[i:] != hb[i:] and all(x != y for x, y in zip(ha[i:], hb[i:]))
            break
        assert ha[i] == hb[i]


def test_a_partial_last_block_gets_no_hash():
    assert block_hashes(list(range(11)), 4, NS) == block_hashes(list(range(8)), 4, NS)
    assert len(block_hashes(list(range(11)), 4, NS)) == 2
    assert block_hashes([1, 2, 3], 4, NS) == []
    assert block_hashes([], 4, NS) == []


def test_block_order_matters():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    ab, ba = block_hashes(a + b, 4, NS), block_hashes(b + a, 4, NS)
    assert set(ab).isdisjoint(ba)
    # The same block after a different prefix is a different block.
    assert block_hashes(a + b, 4, NS)[1] != block_hashes(b, 4, NS)[0]
    # Token order inside a block matters too.
    assert block_hashes([2, 1, 3, 4], 4, NS) != block_hashes(a, 4, NS)


def test_a_different_namespace_gives_disjoint_hashes():
    seq = list(range(64))
    assert set(block_hashes(seq, 4, NS)).isdisjoint(block_hashes(seq, 4, OTHER_NS))


def test_cache_namespace_separates_model_layout_and_block_size():
    spaces = {
        cache_namespace("m", ("KVCache",), 256),
        cache_namespace("m2", ("KVCache",), 256),
        cache_namespace("m", ("ArraysCache",), 256),
        cache_namespace("m", ("KVCache", "KVCache"), 256),
        cache_namespace("m", ("KVCache",), 128),
        # Separators inside the model id cannot forge another triple.
        cache_namespace('m",["KVCache"],256', (), 256),
    }
    assert len(spaces) == 6
    assert cache_namespace("m", ["KVCache"], 256) == cache_namespace("m", ("KVCache",), 256)


def test_a_parent_continues_a_chain():
    seq = list(range(40))
    whole = block_hashes(seq, 4, NS)
    assert block_hashes(seq[16:], 4, NS, parent=whole[3]) == whole[4:]


def test_token_ids_outside_uint32_are_refused():
    with pytest.raises(OverflowError):
        block_hashes([0, 1, 2, -1], 4, NS)
    with pytest.raises(OverflowError):
        block_hashes([0, 1, 2, 2**32], 4, NS)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size must be > 0, got 0"):
        block_hashes([1], 0, NS)
    with pytest.raises(ValueError, match="block_size must be > 0, got -1"):
        cache_namespace("m", (), -1)


def test_hashing_100k_tokens_takes_well_under_50_ms():
    rng = random.Random(7)
    seq = [rng.randrange(0, 152_000) for _ in range(100_000)]
    ns = cache_namespace("m", ("KVCache",) * 32, 256)
    best = min(_timed(block_hashes, seq, 256, ns) for _ in range(3))
    assert best < 0.025, f"{best * 1000:.1f} ms"
    ns16 = cache_namespace("m", ("KVCache",) * 32, 16)
    assert min(_timed(block_hashes, seq, 16, ns16) for _ in range(3)) < 0.05


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def test_importing_blocks_and_index_imports_neither_trio_nor_mlx():
    probe = (
        "import sys, omlx_actors.cache, omlx_actors.cache.blocks, omlx_actors.cache.index; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'mlx')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
