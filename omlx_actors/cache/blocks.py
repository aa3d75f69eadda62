"""Block hashes: how a token sequence is named for the prefix cache.

A prompt is cut into full blocks of `block_size` tokens; block *i* is named by a hash of
the hash of block *i-1* and its own tokens, so a block's hash stands for the whole prefix
that ends with it. Two requests whose prompts share their first *n* full blocks share the
first *n* hashes, whatever follows; a trailing partial block gets no hash (it is never
cached, so the next turn re-prefills it along with its new tokens).

Every hash also covers a *namespace* - model identity, per-layer cache layout and block
size (`cache_namespace`) - so tensors cached for one model or layout can never be matched
by another: a different namespace gives disjoint chains.

Pure: no trio, no MLX.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from collections.abc import Sequence

__all__ = [
    "ATTENTION_BLOCK_SIZE",
    "HASH_HEX_CHARS",
    "RECURRENT_BLOCK_SIZE",
    "BlockHash",
    "block_hashes",
    "cache_namespace",
    "default_block_size",
]

BlockHash = str
"""A block's chained hash, as `HASH_HEX_CHARS` lowercase hex characters."""

# 128 bits of SHA-256: collisions stay out of reach for any number of blocks a machine can
# hold (birthday bound ~2^64), at half the size in messages, logs and dict keys.
HASH_HEX_CHARS = 32

# Token ids are packed as unsigned 32-bit integers; every vocabulary fits.
_TOKEN_TYPECODE = "I"
if array(_TOKEN_TYPECODE).itemsize != 4:  # pragma: no cover - no current CPython platform
    raise ImportError("array('I') is not 32 bits on this platform")
_NEEDS_BYTESWAP = sys.byteorder != "little"

# Bumped if the hash recipe below changes, so old and new chains never meet.
_NAMESPACE_VERSION = "omlx-block-hash-v1"


# Default tokens per block. A later turn of a conversation re-prefills whatever follows its
# last full cached block - on average half a block, on a CPU with a long history about
# 0.4 s per 100 tokens per conversation - so attention-only models use small blocks (a KV
# block is a slice: cutting finely costs a few more array ops and index entries). A model
# with recurrent layers cuts its prefill at every block boundary to snapshot the state
# there, so its blocks stay large enough for prefill chunks to remain efficient.
ATTENTION_BLOCK_SIZE = 64
RECURRENT_BLOCK_SIZE = 256
_RECURRENT_LAYERS = frozenset({"ArraysCache"})


def default_block_size(layout: Sequence[str]) -> int:
    """Tokens per prefix-cache block for a model whose per-layer cache classes are
    `layout`, when the user chose none."""
    if any(kind in _RECURRENT_LAYERS for kind in layout):
        return RECURRENT_BLOCK_SIZE
    return ATTENTION_BLOCK_SIZE


def cache_namespace(model_id: str, layout: Sequence[str], block_size: int) -> str:
    """The namespace of blocks cached for `model_id` with per-layer cache kinds `layout`
    and `block_size` tokens per block.

    JSON, not string joining, so no choice of `model_id` can make two different
    (model, layout, block size) triples read the same.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size!r}")
    return json.dumps(
        [_NAMESPACE_VERSION, model_id, list(layout), block_size],
        separators=(",", ":"),
        ensure_ascii=False,
    )


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    namespace: str,
    *,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """One chained hash per full block of `tokens`; a trailing partial block is ignored.

    h_i = sha256(h_{i-1} ‖ sha256(namespace) ‖ tokens of block i as little-endian uint32),
    truncated to `HASH_HEX_CHARS` hex; h_{-1} is `parent` (its 16 bytes) or b"" for a
    chain from the start of a sequence. Passing the last hash of a prefix as `parent`
    continues that chain, so `block_hashes(a + b, ...)` equals
    `block_hashes(a, ...) + block_hashes(b, ..., parent=last hash of a)` when `a` is
    whole blocks.

    The namespace enters as its own digest (fixed length), so the input of a first block
    (48 bytes + tokens) can never be read as that of a later one (64 bytes + tokens).

    Raises OverflowError for a token id outside 0 <= id < 2**32.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size!r}")
    full = len(tokens) // block_size
    if full == 0:
        return []
    packed = array(_TOKEN_TYPECODE, tokens[: full * block_size])
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    data = memoryview(packed.tobytes())
    salt = hashlib.sha256(namespace.encode()).digest()
    previous = b"" if parent is None else bytes.fromhex(parent)
    step = 4 * block_size
    sha256 = hashlib.sha256
    hashes: list[BlockHash] = []
    for start in range(0, full * step, step):
        digest = sha256(previous + salt + data[start : start + step]).digest()
        previous = digest[: HASH_HEX_CHARS // 2]
        hashes.append(previous.hex())
    return hashes
