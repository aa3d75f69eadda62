"""The block prefix cache index: chained block hashes, the pure `BlockIndex`, and the
actor that owns it. The block tensors themselves live in the engine core.

`blocks` and `index` import neither trio nor MLX; `actor` imports trio and the actor kernel,
so it is not imported here - `from omlx_actors.cache import actor`.
"""

from .blocks import HASH_HEX_CHARS, BlockHash, block_hashes, cache_namespace
from .index import BlockIndex, Eviction, StoredBlock

__all__ = [
    "HASH_HEX_CHARS",
    "BlockHash",
    "BlockIndex",
    "Eviction",
    "StoredBlock",
    "block_hashes",
    "cache_namespace",
]
