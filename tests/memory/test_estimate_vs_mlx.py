"""The estimate against reality: real mlx-lm caches, filled by the real tiny models.

MLX runs on the test's own thread here; nothing else uses MLX while these run.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omlx_actors.memory.estimator import (
    ModelMemoryFacts,
    estimate_request_bytes,
    kv_cache_capacity,
    padded_batch_kv_bytes,
)

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402


def _load(model_dir):
    model, _ = mlx_lm.load(str(model_dir))
    facts = ModelMemoryFacts.from_config(json.loads((model_dir / "config.json").read_text()))
    return model, facts


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return _load(tiny_llama)


@pytest.fixture(scope="module")
def hybrid(tiny_hybrid):
    return _load(tiny_hybrid)


def run_request(model, *, prompt, cached, max_tokens, chunk):
    """Fill a fresh cache the way the estimate assumes: the cached prefix in one call (a
    restored prompt cache), the rest in chunks, then one token per decode step."""
    cache = model.make_cache()
    tokens = mx.array([[5 + i % 400 for i in range(prompt)]])

    def feed(part):
        model(part, cache=cache)
        mx.eval([c.state for c in cache])

    if cached:
        feed(tokens[:, :cached])
    for start in range(cached, prompt, chunk):
        feed(tokens[:, start : start + chunk])
    for _ in range(max_tokens):
        feed(mx.array([[7]]))
    return cache


CASES = [
    # (prompt, cached, max_tokens, chunk)
    (5, 0, 0, 512),
    (300, 0, 10, 128),  # three chunks; 300 + 10 -> 512 positions
    (300, 0, 300, 300),  # one odd chunk, then decode across two step boundaries
    (700, 0, 5, 300),  # odd chunks cut the cache off the step grid (812 -> 1068)
    (512, 256, 300, 512),  # a restored 256-position prefix
]


@pytest.mark.parametrize(("prompt", "cached", "max_tokens", "chunk"), CASES)
def test_llama_kv_estimate_matches_the_real_cache(llama, prompt, cached, max_tokens, chunk):
    model, facts = llama
    cache = run_request(model, prompt=prompt, cached=cached, max_tokens=max_tokens, chunk=chunk)
    estimate = estimate_request_bytes(
        facts, prompt_tokens=prompt, cached_tokens=cached, max_tokens=max_tokens,
        prefill_chunk=chunk, prefix_shared=False,
    )
    assert estimate.kv_capacity_tokens == cache[0].keys.shape[2]
    assert estimate.kv_bytes == sum(c.nbytes for c in cache)


@pytest.mark.parametrize(("prompt", "cached", "max_tokens", "chunk"), CASES[:3])
def test_hybrid_kv_and_recurrent_state_match_the_real_cache(
    hybrid, prompt, cached, max_tokens, chunk
):
    model, facts = hybrid
    cache = run_request(model, prompt=prompt, cached=cached, max_tokens=max_tokens, chunk=chunk)
    estimate = estimate_request_bytes(
        facts, prompt_tokens=prompt, cached_tokens=cached, max_tokens=max_tokens,
        prefill_chunk=chunk, prefix_shared=False,
    )
    kinds = [type(c).__name__ for c in cache]
    assert kinds == ["ArraysCache", "ArraysCache", "ArraysCache", "KVCache"]
    assert estimate.recurrent_state_bytes == sum(c.nbytes for c in cache[:3])
    assert estimate.kv_bytes == cache[3].nbytes


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 600),
    updates=st.lists(st.integers(1, 700), min_size=1, max_size=6),
)
def test_capacity_model_matches_mlx_lm_kvcache(start, updates):
    cache = KVCache()
    if start:
        cache.update_and_fetch(mx.zeros((1, 1, start, 1)), mx.zeros((1, 1, start, 1)))
        # A restored prefix holds exactly its positions.
        cache.keys = cache.keys[..., :start, :]
        cache.values = cache.values[..., :start, :]
    for n in updates:
        cache.update_and_fetch(mx.zeros((1, 1, n, 1)), mx.zeros((1, 1, n, 1)))
    assert kv_cache_capacity(start, updates)[0] == cache.keys.shape[2]


def _kv_cache(length):
    cache = KVCache()
    if length:
        cache.update_and_fetch(mx.zeros((1, 1, length, 1)), mx.zeros((1, 1, length, 1)))
    return cache


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 700), min_size=1, max_size=4),
    joining=st.lists(st.integers(1, 700), max_size=3),
    steps=st.integers(0, 600),
)
def test_padded_batch_bound_covers_mlx_lm_batch_kv_cache(lengths, joining, steps):
    facts = ModelMemoryFacts.from_config({"num_hidden_layers": 1, "hidden_size": 1,
                                          "num_attention_heads": 1, "vocab_size": 8,
                                          "torch_dtype": "float32"})
    batch = BatchKVCache.merge([_kv_cache(n) for n in lengths])
    if joining:  # rows that join a running batch (BatchGenerator extends it)
        batch.extend(BatchKVCache.merge([_kv_cache(n) for n in joining]))
    rows = len(lengths) + len(joining)
    for _ in range(steps):
        batch.update_and_fetch(mx.zeros((rows, 1, 1, 1)), mx.zeros((rows, 1, 1, 1)))
    mx.eval(batch.keys, batch.values)
    longest = max(lengths + joining) + steps
    assert batch.keys.shape[2] >= longest  # every row padded to the longest
    real = batch.keys.nbytes + batch.values.nbytes
    bound = padded_batch_kv_bytes(facts, rows=rows, longest_context=longest)
    assert real <= bound < real + rows * 2 * 4 * 256
