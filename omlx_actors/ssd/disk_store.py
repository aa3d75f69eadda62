"""The SSD writer's blocks on disk: the files of its directory, their index, and the bytes
they may use. Every file operation runs on a worker thread, one at a time, and is never
abandoned (`trio.to_thread.run_sync`): when a call returns, what it did is on disk, or
undone and counted.

The writer actor (`writer.py`) owns one `DiskStore` and calls it between messages; the
store never sees an inbox. Policy it keeps (see the writer's module docstring): LRU
eviction at most `MAX_UNLINKS_PER_SAVE` files per save or idle pass, a save skipped
(counted) when it cannot fit the budget, free space re-read every
`DISK_USAGE_REFRESH_SAVES` writes and after every error, a block that fails its checksum
at load removed, a foreign one forgotten but kept.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
from pathlib import Path

import attrs
import trio

from omlx_actors.cache.blocks import BlockHash

from . import block_directory, blockfile
from .block_directory import DiskIO
from .blockfile import BlockRecord
from .disk_index import DiskBlock, DiskIndex, DiskSpace, effective_budget, free_space_reserve
from .faults import DiskFaults
from .lograte import RepeatedLog
from .messages import LoadReason, LoadResult, Save, WriterConfig
from .pending import PendingSaves

__all__ = [
    "DISK_USAGE_REFRESH_SAVES",
    "MAX_UNLINKS_PER_SAVE",
    "DiskStore",
    "Removal",
    "WriterCounters",
]

# The writer's logger: these are its log lines, and logging configured for the writer
# (levels, filters, tests' caplog) must keep seeing them.
logger = logging.getLogger("omlx_actors.ssd.writer")

# Unlinks per save (and per idle eviction pass): a sudden budget drop (SsdSetBudget, or
# the disk filling up) drains over several saves instead of stalling one on a syscall
# storm (seed 004).
MAX_UNLINKS_PER_SAVE = 32
# Re-read the disk's free space after this many writes (and after every error): other
# programs use the disk too.
DISK_USAGE_REFRESH_SAVES = 64


@attrs.define
class WriterCounters:
    """The counts behind `WriterStats` (see the writer's module docstring), since start."""

    saves_enqueued: int = 0
    saves_persisted: int = 0
    saves_duplicate: int = 0
    saves_cancelled: int = 0
    saves_skipped: int = 0
    write_errors: int = 0
    evictions: int = 0
    cleanup_removed: int = 0
    load_hits: int = 0
    load_misses: int = 0
    corrupt_discarded: int = 0
    foreign_skipped: int = 0
    temps_removed: int = 0
    io_errors: int = 0


class Removal(enum.Enum):
    """Why files are removed, for the counters."""

    EVICT = "evict"  # over budget: `evictions`
    CLEANUP = "cleanup"  # a cleanup asked for it: `cleanup_removed`
    DISCARD = "discard"  # failed validation at load: counted in `corrupt_discarded`


class DiskStore:
    """The directory `config.directory` as the writer sees it. Only the writer's task
    touches it; `name` prefixes its log lines."""

    def __init__(
        self, name: str, config: WriterConfig, io: DiskIO, repeat_log_interval_s: float
    ) -> None:
        self.name = name
        self.config = config
        self.io = io
        self.faults = DiskFaults()  # injected ones, striking block writes by count
        self.root = Path(config.directory)
        self.identity = config.identity
        self.budget = config.budget_bytes
        self.index = DiskIndex()
        self.space = DiskSpace()
        self.counters = WriterCounters()
        self.writes_since_usage = 0
        # Set when an idle eviction pass freed nothing (unlinks failing): idle passes
        # stop until the next write or budget change, instead of spinning.
        self.drain_stalled = False
        # Repeated failures are logged rate-limited (see `lograte`).
        self.skip_log = RepeatedLog(repeat_log_interval_s)
        self.write_error_log = RepeatedLog(repeat_log_interval_s)


    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        scan = await trio.to_thread.run_sync(block_directory.scan_directory, self.root, self.identity)
        for header, _mtime in scan.blocks:
            self.index.put(
                DiskBlock(
                    hash=header.hash,
                    parent=header.parent,
                    scope=header.scope,
                    tokens=header.tokens,
                    size=header.size,
                )
            )
        self.counters.corrupt_discarded += scan.corrupt_removed
        self.counters.foreign_skipped += scan.foreign
        self.counters.temps_removed += scan.temps_removed
        self.counters.io_errors += scan.unremovable
        if scan.corrupt_removed or scan.foreign or scan.temps_removed or scan.unremovable:
            # Foreign files are normal (another model's blocks); anything removed is not.
            damaged = scan.corrupt_removed or scan.temps_removed or scan.unremovable
            logger.log(
                logging.WARNING if damaged else logging.INFO,
                "%s: scan of %s: %d corrupt removed, %d foreign skipped, %d temp files "
                "removed, %d could not be removed",
                self.name,
                self.root,
                scan.corrupt_removed,
                scan.foreign,
                scan.temps_removed,
                scan.unremovable,
            )
        await self.refresh_disk_usage()
        self.say_budget()

    def say_budget(self) -> None:
        """Log the budget this writer will really use, once, at start: a warning when the
        disk cuts the configured one (a small volume: say so, never skip silently)."""
        if not self.space.known:
            return
        reserve = free_space_reserve(
            self.space.total, self.config.min_free_bytes, self.config.min_free_fraction
        )
        effective = self.effective_budget()
        logger.log(
            logging.WARNING if effective < self.budget else logging.INFO,
            "%s: %s: SSD cache budget %d bytes (configured %d; the disk has %d of %d bytes "
            "free and keeps %d free)%s",
            self.name,
            self.root,
            effective,
            self.budget,
            self.space.free,
            self.space.total,
            reserve,
            "; no block can be saved" if effective == 0 else "",
        )


    # -- saves ------------------------------------------------------------------------

    async def write_batch(self, pending: PendingSaves) -> None:
        """Settle `pending`'s saves, oldest first, up to the first hash seen twice:
        duplicates and skips at once, the rest written as one batch (`block_directory.write_blocks`:
        one worker-thread call, each directory fsynced once). Each is counted persisted only
        once its directory's fsync returned, or counted a write error."""
        batch: list[tuple[Save, BlockRecord, DiskBlock | None]] = []
        hashes: set[BlockHash] = set()
        incoming = 0  # bytes the batch adds to the directory
        while pending and pending.oldest().hash not in hashes:
            save = pending.pop_oldest()
            existing = self.index.get(save.hash)
            if existing is not None and existing.scope == save.scope:
                self.index.touch(save.hash)
                self.counters.saves_duplicate += 1
                continue
            record = BlockRecord(
                hash=save.hash,
                parent=save.parent,
                scope=save.scope,
                tokens=save.tokens,
                tensors=save.tensors,
            )
            grows = blockfile.planned_size(self.identity, record) - (
                existing.size if existing is not None else 0
            )
            self.drain_stalled = False
            keep = frozenset(hashes | {save.hash})
            fits = await self.make_room(incoming + grows, keep=keep)
            if not fits and self.space.known:
                # The free space may have grown since the last reading (another program
                # freed some); one re-read per refused save, so a skip is never stale.
                await self.refresh_disk_usage()
                fits = self.index.bytes + incoming + grows <= self.effective_budget()
            if not fits:
                self.skipped(save, grows)
                continue
            incoming += grows
            hashes.add(save.hash)
            batch.append((save, record, existing))
        if not batch:
            return
        jobs = [(record, self.faults.next_write(self.io)) for _, record, _ in batch]
        results = await trio.to_thread.run_sync(
            block_directory.write_blocks, self.root, self.identity, jobs
        )
        failed = False
        for (save, _, existing), result in zip(batch, results, strict=True):
            if isinstance(result, OSError):
                failed = True
                await self.write_failed(save, existing, result)
                continue
            self.index.put(
                DiskBlock(
                    hash=save.hash,
                    parent=save.parent,
                    scope=save.scope,
                    tokens=save.tokens,
                    size=result,
                )
            )
            self.space.wrote(result - (existing.size if existing is not None else 0))
            self.counters.saves_persisted += 1
            self.writes_since_usage += 1
        if failed or self.writes_since_usage >= DISK_USAGE_REFRESH_SAVES:
            await self.refresh_disk_usage()

    def skipped(self, save: Save, size: int) -> None:
        self.counters.saves_skipped += 1
        unlogged = self.skip_log.occurred(trio.current_time())
        if unlogged is not None:
            logger.warning(
                "%s: skipped block %s (%d bytes): no room within the budget (%d of %d "
                "bytes used); %d skipped so far, %d of them not logged",
                self.name,
                save.hash,
                size,
                self.index.bytes,
                self.effective_budget(),
                self.counters.saves_skipped,
                unlogged,
            )

    async def write_failed(self, save: Save, existing: DiskBlock | None, error: OSError) -> None:
        self.counters.write_errors += 1
        unlogged = self.write_error_log.occurred(trio.current_time())
        if unlogged is not None:
            logger.error(
                "%s: writing block %s failed (%s); %d write errors so far, %d of them "
                "not logged",
                self.name,
                save.hash,
                errno.errorcode.get(error.errno or 0, error.errno),
                self.counters.write_errors,
                unlogged,
            )
        if existing is not None:
            # A failure after the rename removed the replaced file too.
            path = blockfile.block_path(self.root, save.hash)
            if not await trio.to_thread.run_sync(path.exists):
                self.index.remove(save.hash)
                self.space.freed(existing.size)

    async def make_room(self, incoming: int, keep: frozenset[BlockHash]) -> bool:
        """Evict (at most `MAX_UNLINKS_PER_SAVE` files, none of `keep`) so `incoming` more
        bytes fit; True if they do."""
        excess = self.index.bytes + incoming - self.effective_budget()
        if excess > 0:
            victims = self.index.victims(excess, MAX_UNLINKS_PER_SAVE, keep)
            await self.remove(victims, Removal.EVICT)
        return self.index.bytes + incoming <= self.effective_budget()


    # -- removal ----------------------------------------------------------------------

    def over_budget(self) -> bool:
        return self.index.bytes > self.effective_budget()

    async def set_budget(self, budget: int) -> None:
        """Keep within `budget` bytes from now on; one eviction pass at once if over."""
        self.budget = budget
        self.drain_stalled = False
        if self.over_budget():
            await self.evict_pass()

    async def evict_to_budget(self) -> None:
        """Evict pass after pass until within the budget, or a pass frees nothing."""
        self.drain_stalled = False
        while self.over_budget() and not self.drain_stalled:
            await self.evict_pass()

    async def evict_pass(self) -> None:
        victims = self.index.victims(
            self.index.bytes - self.effective_budget(), MAX_UNLINKS_PER_SAVE
        )
        removed, _ = await self.remove(victims, Removal.EVICT)
        if not removed:
            self.drain_stalled = True

    async def remove(self, blocks: list[DiskBlock], why: Removal) -> tuple[int, int]:
        """Delete the files of `blocks` (one worker-thread call) and forget the removed
        ones; return (removed, failed). A file that cannot be removed stays indexed."""
        if not blocks:
            return 0, 0
        paths = [blockfile.block_path(self.root, block.hash) for block in blocks]
        errors = await trio.to_thread.run_sync(block_directory.remove_files, paths)
        removed = failed = 0
        for block, error in zip(blocks, errors, strict=True):
            if error is None:
                self.index.remove(block.hash)
                self.space.freed(block.size)
                removed += 1
            else:
                failed += 1
                self.counters.io_errors += 1
                logger.error("%s: cannot remove %s: %s", self.name, error.filename, error)
        if why is Removal.EVICT:
            self.counters.evictions += removed
        elif why is Removal.CLEANUP:
            self.counters.cleanup_removed += removed
        if failed:
            await self.refresh_disk_usage()
        return removed, failed


    # -- loads ------------------------------------------------------------------------

    async def load(self, block_hash: BlockHash) -> LoadResult:
        """Read block `block_hash` from its file (checksum verified, recency refreshed): a
        hit, or a miss - not indexed, vanished, unreadable, or corrupt (then removed)."""
        if block_hash not in self.index:
            self.counters.load_misses += 1
            return LoadResult(hash=block_hash, reason=LoadReason.MISSING)
        path = blockfile.block_path(self.root, block_hash)
        try:
            _, record = await trio.to_thread.run_sync(
                functools.partial(blockfile.read_block, path, self.identity, block_hash, touch=True)
            )
        except FileNotFoundError:
            logger.warning("%s: block file %s vanished", self.name, path)
            gone = self.index.remove(block_hash)
            if gone is not None:
                self.space.freed(gone.size)
            self.counters.load_misses += 1
            return LoadResult(hash=block_hash, reason=LoadReason.MISSING)
        except OSError as error:
            if error.errno != errno.EIO:
                # Not the file's fault (out of descriptors, memory, permissions): a miss,
                # but the block stays.
                self.counters.io_errors += 1
                self.counters.load_misses += 1
                logger.error("%s: cannot read block %s: %s", self.name, block_hash, error)
                return LoadResult(hash=block_hash, reason=LoadReason.MISSING)
            return await self.discard(block_hash, error)
        except blockfile.BlockFileError as error:
            return await self.discard(block_hash, error)
        self.index.touch(block_hash)
        self.counters.load_hits += 1
        return LoadResult(
            hash=block_hash,
            reason=LoadReason.DISK,
            tensors=record.tensors,
            parent=record.parent,
            scope=record.scope,
            tokens=record.tokens,
        )

    async def discard(self, block_hash: BlockHash, error: Exception) -> LoadResult:
        """The block's file failed at load (corrupt, unreadable: EIO): remove it, count a
        miss. A foreign file (replaced behind the writer's back) is forgotten, not removed:
        not ours to delete, not ours to serve."""
        foreign = isinstance(error, blockfile.ForeignBlock)
        logger.warning("%s: discarding block %s: %s", self.name, block_hash, error)
        block = self.index.get(block_hash)
        if foreign:
            self.index.remove(block_hash)
        elif block is not None:
            await self.remove([block], Removal.DISCARD)
        self.counters.corrupt_discarded += 1
        self.counters.load_misses += 1
        return LoadResult(hash=block_hash, reason=LoadReason.CORRUPT)


    # -- space ------------------------------------------------------------------------

    def effective_budget(self) -> int:
        if not self.space.known:
            return self.budget
        return effective_budget(
            self.budget,
            self.index.bytes,
            self.space.free,
            self.space.total,
            self.config.min_free_bytes,
            self.config.min_free_fraction,
        )

    async def refresh_disk_usage(self) -> None:
        self.writes_since_usage = 0
        try:
            usage = await trio.to_thread.run_sync(self.io.disk_usage, str(self.root))
        except OSError as error:
            self.counters.io_errors += 1
            logger.error(
                "%s: cannot read disk usage of %s: %s", self.name, self.root, error
            )
            return
        self.space.reading(total=usage.total, free=usage.free)
