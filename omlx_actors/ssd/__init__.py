"""The SSD tier: block files on disk and the writer actor that owns their directory.

`blockfile` (the file format, reading one back), `block_directory` (crash-safe writes,
the start-up scan, removal: pure I/O), `disk_index` and `pending` (pure bookkeeping)
import neither trio nor MLX; `disk_store` and `writer` (the actor) import trio and the
actor kernel, so they are not imported here - `from omlx_actors.ssd import writer`.
Nothing here imports MLX: tensors travel as `TensorData` (bytes + dtype + shape) and
convert to and from numpy.
"""

from .block_directory import DiskIO
from .blockfile import (
    BlockIdentity,
    BlockRecord,
    CorruptBlock,
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
