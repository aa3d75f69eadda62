"""Prefill attention split over two CPU streams, for the engine's MLX thread.

On the CPU backend, MLX's `scaled_dot_product_attention` is unfused: it materializes the
score matrix and runs the mask and the softmax (whose `exp` dominates) as single-threaded
elementwise passes over it. Matmuls use every core through BLAS; those passes use one. At
a few hundred tokens of context that is a third of a prefill on this project's CPU demo
model, and more as the context grows. Attention heads are independent, so the engine
computes half of the key/value head groups on each of two CPU streams of its own: MLX runs
each stream on its own thread, and the results are bit-identical (each head sees exactly
the same operations).

Only prompt chunks are split: a decode step's attention (one query row) is a few small
ops, where a second stream costs more than it saves.

How it is wired: mlx-lm's model modules call `scaled_dot_product_attention`, imported from
`mlx_lm.models.base`, by name. `install(model)` rebinds that name, in the modules of this
model's layers, to `parallel_sdpa`, which falls back to the original unless the *calling
thread* enabled splitting (`enable_on_this_thread`). Rebinding is process-wide, so the
gate is per thread: another MLX user in the same process (a benchmark's bare mlx-lm loop
on its own thread) runs mlx-lm's code unchanged.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any

from omlx_actors.mlx_loader import load_mlx

mx = load_mlx()

__all__ = [
    "disable_on_this_thread",
    "enable_on_this_thread",
    "install",
    "parallel_sdpa",
    "split_calls",
    "splits",
]

_SPLIT = 2  # this project's CPU machines have two cores; more streams than cores only queue
_local = threading.local()
# Prompt attentions split so far in this process: a diagnostic (tests check that the engine
# really takes the split path). Only MLX threads add to it, one at a time per engine.
_split_calls = 0


def split_calls() -> int:
    return _split_calls


@functools.cache
def _original():
    from mlx_lm.models import base  # mlx-lm is imported where used, as across the engine

    return base.scaled_dot_product_attention


def parallel_sdpa(queries, keys, values, cache, scale: float, mask, sinks=None) -> Any:
    """mlx-lm's `scaled_dot_product_attention`, with prompt chunks split by head groups over
    this thread's two streams when it enabled splitting; mlx-lm's own otherwise."""
    streams = getattr(_local, "streams", None)
    if streams is None or not splits(queries.shape, keys.shape, _mask_heads(mask),
                                     sinks=sinks is not None, quantized=hasattr(cache, "bits")):
        return _original()(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    global _split_calls
    _split_calls += 1
    heads, kv_heads = queries.shape[1], keys.shape[1]
    q_per, kv_per = heads // _SPLIT, kv_heads // _SPLIT
    parts = []
    for i, stream in enumerate(streams):
        part_mask = mask
        if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] == heads > 1:
            part_mask = mask[:, i * q_per : (i + 1) * q_per]
        parts.append(
            mx.fast.scaled_dot_product_attention(
                queries[:, i * q_per : (i + 1) * q_per],
                keys[:, i * kv_per : (i + 1) * kv_per],
                values[:, i * kv_per : (i + 1) * kv_per],
                scale=scale,
                mask=part_mask,
                stream=stream,
            )
        )
    return mx.concatenate(parts, axis=1)


def splits(q_shape, kv_shape, mask_heads: int | None, *, sinks: bool = False,
           quantized: bool = False) -> bool:
    """Whether attention of these shapes is split: a prompt chunk (more than one query row),
    key/value heads divisible among the streams, a mask shared by all heads or given per
    head, and none of the variants (sinks, quantized KV) that take mlx-lm's own path."""
    if sinks or quantized or q_shape[2] == 1 or kv_shape[1] % _SPLIT:
        return False
    return mask_heads in (None, 1, q_shape[1])


def _mask_heads(mask) -> int | None:
    if isinstance(mask, mx.array) and mask.ndim == 4:
        return mask.shape[1]
    return None  # no mask, "causal", or one that broadcasts over heads


def install(model) -> int:
    """Route the attention of `model`'s layers through `parallel_sdpa`. Idempotent; returns
    how many modules now do (0: this model's code does not use mlx-lm's shared function)."""
    original = _original()
    count = 0
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is original:
            module.scaled_dot_product_attention = parallel_sdpa
        if getattr(module, "scaled_dot_product_attention", None) is parallel_sdpa:
            count += 1
    return count


def enable_on_this_thread() -> None:
    """Split prompt attention on the calling (MLX) thread from now on; its streams are made
    here because MLX streams belong to the thread that creates them."""
    if mx.default_device() != mx.cpu:
        return  # Metal and CUDA have fused attention kernels
    _local.streams = tuple(mx.new_stream(mx.cpu) for _ in range(_SPLIT))


def disable_on_this_thread() -> None:
    """Back to mlx-lm's own attention on this thread (a worker thread may be reused)."""
    _local.streams = None
