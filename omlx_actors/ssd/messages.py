"""The SSD writer's plain-data vocabulary: its configuration, the messages it accepts and
the replies it sends. Every one is `@attrs.frozen`, holds plain data only, and survives
`runtime.wire` unchanged, so the writer could sit behind a process boundary.

Tensors travel as `TensorData` (bytes + dtype + shape). The writer's behaviour - ordering,
budget, counters - is documented in `writer`.
"""

from __future__ import annotations

import enum
from typing import Any, Union

import attrs

from omlx_actors.cache.blocks import BlockHash

from . import blockfile
from .blockfile import BlockIdentity, TensorData

__all__ = [
    "ALL_MESSAGE_TYPES",
    "MIN_FREE_BYTES",
    "MIN_FREE_FRACTION",
    "SsdCleanupAll",
    "CleanupDone",
    "SsdCleanupRequest",
    "SsdContains",
    "ContainsResult",
    "SsdFlush",
    "SsdLoad",
    "LoadReason",
    "LoadResult",
    "Save",
    "SsdSetBudget",
    "SsdShutdown",
    "SsdStatsQuery",
    "WriterConfig",
    "WriterControl",
    "WriterStats",
]

# Free space the directory never eats into: max(MIN_FREE_BYTES, MIN_FREE_FRACTION of the
# disk), so the SSD tier cannot fill the system disk; on a disk under 4 GiB the fixed part
# is capped at a quarter of it (`disk_index.free_space_reserve`).
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.05


def _block_hash(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not blockfile.is_block_hash(value):
        raise ValueError(f"{attribute.name} must be a block hash, got {value!r}")


def _optional_block_hash(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _block_hash(instance, attribute, value)


def _block_hashes(instance: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    for item in value:
        _block_hash(instance, attribute, item)


def _unique_names(_: Any, attribute: attrs.Attribute[Any], value: tuple[TensorData, ...]) -> None:
    names = [tensor.name for tensor in value]
    if len(set(names)) != len(names):
        raise ValueError(f"{attribute.name}: tensor names must be unique, got {names!r}")


@attrs.frozen(kw_only=True)
class WriterConfig:
    """Settings of one writer: its directory, the identity of the cache it stores (files
    of another identity are foreign) and its byte budget."""

    directory: str
    identity: BlockIdentity
    budget_bytes: int = attrs.field(validator=attrs.validators.ge(0))
    min_free_bytes: int = attrs.field(default=MIN_FREE_BYTES, validator=attrs.validators.ge(0))
    min_free_fraction: float = attrs.field(
        default=MIN_FREE_FRACTION, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )


# ---------------------------------------------------------------------------------------
# Messages: the save inbox


@attrs.frozen(kw_only=True)
class Save:
    """Persist block `hash` (cast, to the save inbox). `scope` is the owner a later
    `SsdCleanupRequest` names ("" for blocks no cleanup should touch); `tokens` is how many
    tokens the block covers; `parent` the previous block of its chain."""

    hash: BlockHash = attrs.field(validator=_block_hash)
    parent: BlockHash | None = attrs.field(default=None, validator=_optional_block_hash)
    scope: str = ""
    tokens: int = attrs.field(validator=attrs.validators.ge(0))
    tensors: tuple[TensorData, ...] = attrs.field(validator=_unique_names)

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)


# ---------------------------------------------------------------------------------------
# Messages: the control inbox


@attrs.frozen(kw_only=True)
class SsdLoad:
    """Read block `hash` back; replied with `LoadResult`. A hit refreshes its recency."""

    hash: BlockHash = attrs.field(validator=_block_hash)


@attrs.frozen(kw_only=True)
class SsdContains:
    """Which of `hashes` are on disk or pending; replied with `ContainsResult`. Neither
    reads the files (a block found corrupt when loaded is still a miss then) nor
    refreshes recency."""

    hashes: tuple[BlockHash, ...] = attrs.field(validator=_block_hashes)


@attrs.frozen(kw_only=True)
class SsdCleanupRequest:
    """Delete every block of `scope` saved before this call, pending ones included;
    replied with `CleanupDone` once none exists on disk."""

    scope: str


@attrs.frozen(kw_only=True)
class SsdCleanupAll:
    """Delete every block of this writer's identity (foreign files stay); replied with
    `CleanupDone` once the directory holds none."""


@attrs.frozen(kw_only=True)
class SsdFlush:
    """Write every save sent before this call and evict down to the budget; replied with
    `WriterStats` once done."""


@attrs.frozen(kw_only=True)
class SsdSetBudget:
    """Change the byte budget. Replied with `WriterStats` after one eviction pass of at
    most `MAX_UNLINKS_PER_SAVE` files; the rest drains while idle."""

    budget_bytes: int = attrs.field(validator=attrs.validators.ge(0))


class DiskFaultKind(enum.Enum):
    STALL = "stall"  # each struck block write first hangs for `stall_s`: a disk that hangs
    FULL = "full"  # each struck block write fails with ENOSPC: a full disk


def _stall_matches_kind(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if instance.kind is DiskFaultKind.STALL and not value > 0:
        raise ValueError(f"a stall fault needs {attribute.name} > 0, got {value!r}")
    if instance.kind is DiskFaultKind.FULL and value != 0:
        raise ValueError(f"a full-disk fault fails its writes at once: {attribute.name} must "
                         f"be 0, got {value!r}")


@attrs.frozen(kw_only=True)
class InjectDiskFault:
    """Fault injection at the writer's disk boundary (tests, scenarios; off unless sent).

    It strikes by count, never by a time window (a window can pass with no write in it on
    a loaded machine): of the block writes the writer starts after this message arrives,
    the first `after_writes` go through untouched and the next `writes` are struck. A
    block write is one block file written (a skipped or duplicate save is none). A struck
    write either hangs for `stall_s` seconds in its first write call, then goes on
    (`STALL`: a hung disk; the writer takes nothing else meanwhile, so saves back up and
    are dropped, and cleanups wait), or fails with ENOSPC as on a full disk (`FULL`; the
    writer's own error handling runs). Faults sent one after another are all armed, each
    counting from its own arrival; where they overlap, the one sent first strikes.
    Replied with `WriterStats` at once."""

    kind: DiskFaultKind
    writes: int = attrs.field(validator=attrs.validators.ge(1))
    after_writes: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    stall_s: float = attrs.field(default=0.0, validator=_stall_matches_kind)


@attrs.frozen(kw_only=True)
class SsdStatsQuery:
    """Ask for a `WriterStats` snapshot."""


@attrs.frozen(kw_only=True)
class SsdShutdown:
    """Stop the writer; replied with `WriterStats` once done, then the inboxes close.

    `flush`: write every save sent before this call first (else pending saves are
    cancelled). `cleanup`: delete every block first (then nothing is flushed)."""

    flush: bool = True
    cleanup: bool = False


WriterControl = Union[
    SsdLoad, SsdContains, SsdCleanupRequest, SsdCleanupAll, SsdFlush, SsdSetBudget, SsdStatsQuery, SsdShutdown,
    InjectDiskFault,
]

# ---------------------------------------------------------------------------------------
# Replies


class LoadReason(enum.Enum):
    PENDING = "pending"
    """Hit: the block's save is not written yet; served from its data."""
    DISK = "disk"
    """Hit: read from its file, checksum verified."""
    MISSING = "missing"
    """Miss: not on disk nor pending (never saved, dropped, evicted, cleaned up)."""
    CORRUPT = "corrupt"
    """Miss: its file failed validation or could not be read; it was removed."""


@attrs.frozen(kw_only=True)
class LoadResult:
    """The block `hash`: its tensors on a hit (`reason` PENDING or DISK), None on a miss."""

    hash: BlockHash
    reason: LoadReason
    tensors: tuple[TensorData, ...] | None = None
    parent: BlockHash | None = None
    scope: str = ""
    tokens: int = 0

    @property
    def hit(self) -> bool:
        return self.tensors is not None


@attrs.frozen(kw_only=True)
class ContainsResult:
    """The asked hashes that are on disk or pending, in the order asked."""

    present: tuple[BlockHash, ...]


@attrs.frozen(kw_only=True)
class CleanupDone:
    """The acknowledgement of a cleanup. `scope` None: `SsdCleanupAll`.

    `removed`: files deleted; `cancelled`: pending saves discarded before being written
    (saves of the scope still in the save inbox are discarded as they arrive, counted in
    `WriterStats.saves_cancelled`); `failed`: files that could not be deleted (logged;
    still indexed, so a later cleanup retries them)."""

    scope: str | None
    removed: int
    cancelled: int
    failed: int = 0


@attrs.frozen(kw_only=True)
class WriterStats:
    """A snapshot of the writer (see the module docstring for how the counters balance)."""

    saves_enqueued: int
    saves_persisted: int
    saves_duplicate: int
    saves_cancelled: int
    saves_skipped: int
    write_errors: int
    pending: int
    saves_queued: int  # still in the save inbox
    saves_dropped: int  # never got in (kernel-counted, see `Address.dropped`)
    evictions: int
    cleanup_removed: int
    load_hits: int
    load_misses: int
    corrupt_discarded: int  # at load, or at the start-up scan
    foreign_skipped: int  # at the start-up scan
    temps_removed: int  # at the start-up scan
    io_errors: int  # failed unlinks and disk-usage readings
    files: int
    bytes_on_disk: int
    budget_bytes: int
    effective_budget_bytes: int
    free_bytes: int | None  # the current estimate; None if the disk could not be read


ALL_MESSAGE_TYPES = (
    Save,
    TensorData,
    SsdLoad,
    SsdContains,
    SsdCleanupRequest,
    SsdCleanupAll,
    SsdFlush,
    SsdSetBudget,
    SsdStatsQuery,
    SsdShutdown,
    InjectDiskFault,
    LoadResult,
    ContainsResult,
    CleanupDone,
    WriterStats,
    WriterConfig,
    BlockIdentity,
)
