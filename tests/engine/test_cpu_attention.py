"""Prompt attention split over two CPU streams: bit-identical to MLX's own, and only on the
thread that asked for it."""

from __future__ import annotations

import threading

import pytest

from omlx_actors.wiring import open_runtime
from omlx_actors.mlx_loader import load_mlx
from omlx_actors.engine import cpu_attention

mx = load_mlx()


def _qkv(batch, heads, kv_heads, queries, keys, seed):
    k = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(k, 3)
    return (mx.random.normal((batch, heads, queries, 16), key=k1),
            mx.random.normal((batch, kv_heads, keys, 16), key=k2),
            mx.random.normal((batch, kv_heads, keys, 16), key=k3))


def _masks(batch, heads, queries, keys):
    causal = mx.tril(mx.ones((queries, keys), dtype=mx.bool_), k=keys - queries)
    padded = mx.broadcast_to(causal, (batch, 1, queries, keys))
    # rows of a left-padded batch: row b ignores its first 3*b positions
    padded = mx.logical_and(padded, (mx.arange(keys)[None, :] >= 3 * mx.arange(batch)[:, None])[:, None, None, :])
    per_head = mx.broadcast_to(padded, (batch, heads, queries, keys))
    additive = mx.where(padded, 0.0, -1e9)
    return {"none": None, "causal": "causal", "shared bool": padded, "per-head bool": per_head,
            "additive": additive}


@pytest.mark.parametrize("mask_name", ["none", "causal", "shared bool", "per-head bool", "additive"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4), (6, 2)])
def test_split_attention_is_bit_identical_to_mlx(mask_name, heads, kv_heads):
    q, k, v = _qkv(3, heads, kv_heads, 20, 24, seed=heads * 10 + kv_heads)
    mask = _masks(3, heads, 20, 24)[mask_name]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    cpu_attention.enable_on_this_thread()
    try:
        assert cpu_attention.splits(q.shape, k.shape, cpu_attention._mask_heads(mask))
        got = cpu_attention.parallel_sdpa(q, k, v, cache=None, scale=0.25, mask=mask)
        mx.eval(got, expected)
    finally:
        cpu_attention.disable_on_this_thread()
    assert got.shape == expected.shape
    assert mx.array_equal(got, expected).item()


def test_what_is_split():
    assert cpu_attention.splits((1, 8, 20, 16), (1, 2, 20, 16), None)
    assert not cpu_attention.splits((4, 8, 1, 16), (4, 2, 300, 16), 1)  # a decode step
    assert not cpu_attention.splits((1, 3, 20, 16), (1, 3, 20, 16), None)  # odd KV heads
    assert not cpu_attention.splits((1, 8, 20, 16), (1, 2, 20, 16), None, sinks=True)
    assert not cpu_attention.splits((1, 8, 20, 16), (1, 2, 20, 16), None, quantized=True)
    assert not cpu_attention.splits((1, 8, 20, 16), (1, 2, 20, 16), 4)  # a mask we can't cut


def test_only_the_enabling_thread_splits():
    """Rebinding mlx-lm's function is process-wide; another thread's MLX (a bare benchmark
    loop) must not get this thread's streams - they are not its own and MLX would refuse."""
    cpu_attention.enable_on_this_thread()
    before = cpu_attention.split_calls()
    seen = {}

    def other_thread():
        seen["streams"] = getattr(cpu_attention._local, "streams", None)
        q, k, v = _qkv(1, 4, 2, 5, 5, seed=1)
        seen["out"] = cpu_attention.parallel_sdpa(q, k, v, cache=None, scale=1.0, mask="causal")
        mx.eval(seen["out"])

    try:
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    finally:
        cpu_attention.disable_on_this_thread()
    assert seen["streams"] is None and seen["out"].shape == (1, 4, 5, 16)
    assert cpu_attention.split_calls() == before  # mlx-lm's own attention ran there


async def _outputs(model_path, prompts, parallel: bool):
    async with open_runtime(model_path, parallel_attention=parallel, block_size=16) as rt:
        # twice: the second round restores the first round's prefixes (prefill with a cache)
        results = []
        for suffix in ([], [5, 6, 7, 8, 9]):
            sessions = [rt.complete(p + suffix, max_tokens=12, ignore_eos=True) for p in prompts]
            for s in sessions:
                await s.collect()
            results.append([list(s.completion_token_ids) for s in sessions])
        return results


async def test_engine_outputs_are_identical_with_split_attention_on_and_off(tiny_llama, tiny_hybrid):
    # different lengths: the batch is padded, so the masks are arrays, not "causal"
    prompts = [[(i * 7 + j) % 300 + 20 for i in range(40 + 9 * j)] for j in range(4)]
    for model in (tiny_llama, tiny_hybrid):
        before = cpu_attention.split_calls()
        on = await _outputs(model, prompts, parallel=True)
        split = cpu_attention.split_calls() - before
        off = await _outputs(model, prompts, parallel=False)
        assert on == off
        assert split > 0 and cpu_attention.split_calls() == before + split  # off: none


def test_install_rebinds_the_models_attention_once(tiny_llama):
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny_llama)
    assert cpu_attention.install(model) == 1  # mlx_lm.models.llama
    assert cpu_attention.install(model) == 1
    import mlx_lm.models.llama as llama

    assert llama.scaled_dot_product_attention is cpu_attention.parallel_sdpa
