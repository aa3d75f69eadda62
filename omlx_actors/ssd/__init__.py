"""The SSD tier: block files on disk and the writer actor that owns their directory.

`blockfile` (pure I/O) and `disk_index` (pure bookkeeping) import neither trio nor MLX;
`writer` imports trio and the actor kernel, so it is not imported here -
`from omlx_actors.ssd import writer`. Nothing here imports MLX: tensors travel as
`TensorData` (bytes + dtype + shape) and convert to and from numpy.
"""

from .blockfile import (
    BlockIdentity,
    BlockRecord,
    CorruptBlock,
    DiskIO,
    ForeignBlock,
    TensorData,
    block_path,
)
from .disk_index import DiskBlock, DiskIndex, effective_budget

__all__ = [
    "BlockIdentity",
    "BlockRecord",
    "CorruptBlock",
    "DiskBlock",
    "DiskIO",
    "DiskIndex",
    "ForeignBlock",
    "TensorData",
    "block_path",
    "effective_budget",
]
