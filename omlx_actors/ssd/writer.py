"""The SSD tier's writer: the one owner of a directory of block files.

It persists blocks the engine hands over (`Save`), serves them back (`SsdLoad`), says which
it has (`SsdContains`), deletes them by owner (`SsdCleanupRequest`, `SsdCleanupAll`), keeps the
directory within a byte budget by LRU eviction, and stops cleanly (`SsdShutdown`). It never
imports MLX: tensors arrive and leave as `TensorData` (plain bytes + dtype + shape).

Two inboxes. Saves are bulk, lossy by design and must never hold up inference; control
messages are small, must never be dropped and should not wait behind a backlog of writes.
So:

- the *save inbox* (`SAVE_INBOX_CAPACITY`, `Overflow.DROP`): a `Save` cast that finds it
  full waits at most `SAVE_WAIT_S`, then the kernel drops it, counts it
  (`WriterStats.saves_dropped`) and logs it;
- the *control inbox* (`CONTROL_INBOX_CAPACITY`, `Overflow.WAIT`): everything else.
  Calls there are never dropped, and the writer serves it before writing the next batch,
  so a `SsdLoad` waits for at most the one file operation (a batch of writes: at most
  `PENDING_CAPACITY` blocks) in progress.

Between file operations the writer moves saves from the save inbox into its *pending*
queue (at most `PENDING_CAPACITY`; the rest wait in the inbox, still in order). Pending
saves are written oldest first, all of them in one batch (`blockfile.write_blocks`: each
temp file written, then each fsynced, renamed, and each directory fsynced once - a
prefill's blocks arrive together, and one fsync per block and per directory entry was
most of the time they took to reach the disk), and a `SsdLoad` or `SsdContains` of a pending
block is answered from its data. A save still waiting in the inbox behind a full pending
queue is not seen yet (a miss): the inbox cannot be looked into, and taking more would
unbound the memory the queue holds.

Ordering without locks. A `SsdCleanupRequest(scope)` returns only once nothing of `scope`
that was saved before the call exists on disk, and later saves of that scope are written
normally. The writer is a single task that runs each file operation to completion
(`trio.to_thread.run_sync`, never abandoned), so when it takes a cleanup no write is in
progress: an in-flight write has finished (its file is then deleted). Pending saves of
the scope are cancelled. Saves of the scope still waiting in the save inbox are the first
`k` the inbox will deliver (it is FIFO; `k` is its length when the cleanup is taken), so
the writer records a barrier - "cancel saves of this scope among the next `k`" - and
those are never written. The reply is the acknowledgement; nothing else is needed.

Budget. The directory may hold `budget_bytes`, shrunk so the disk keeps
`max(min_free_fraction * total, min(min_free_bytes, total / 4))` free (the fixed reserve
scales down on a small disk; free space is re-read every `DISK_USAGE_REFRESH_SAVES` writes
and after every error). The budget in effect is logged at start, as a warning when the
disk cuts the configured one. Before a write the writer
evicts least recently used blocks - at most `MAX_UNLINKS_PER_SAVE` per save, so a sudden
budget drop cannot stall a save on an unlink storm - and skips the save (counted) if it
still does not fit (a skip, like a write error, is logged at its first occurrence and
then at most once per `REPEAT_LOG_INTERVAL_S`, with the count not logged). When idle it
keeps evicting in batches of the same size until within
budget. Loads and saves refresh recency. Sizes are the files' real sizes.

Counters (reset when the writer restarts). Every save taken off the save inbox is
`saves_enqueued`, and ends as exactly one of: persisted (after the rename and the
directory fsync), duplicate (already on disk with the same scope), cancelled (by a
cleanup, or by a shutdown without flush), skipped (no room within the budget), or a write
error. A block of a batch counts as persisted only once its directory's fsync returned. So at every reply:

    saves_enqueued == saves_persisted + saves_duplicate + saves_cancelled
                      + saves_skipped + write_errors + pending

`saves_dropped` counts saves that never got in (inbox full past `SAVE_WAIT_S`, or still
queued when the writer stopped); a sender that cast `n` saves sees
`n == saves_enqueued + saves_dropped + saves_queued`.

Restart. On start the writer scans its directory (headers only; see
`blockfile.scan_directory`): other identities' files are skipped and kept, corrupt ones
and leftover temp files are removed, and the LRU order is rebuilt from mtimes (a load
touches its file, so recency survives a restart). A block's checksum is verified when it
is loaded; a block that fails it is a miss and is removed. The writer is ready
(`task_status.started(WriterStats)`) once the scan is done. A directory belongs to one
writer at a time. A crash loses what only memory held - pending saves and cleanup
barriers - so after a supervisor restart a save of a cleaned-up scope that was still
queued may be written; a caller that needs the guarantee across a crash cleans up again.

Shutdown. `SsdShutdown(flush, cleanup)` is answered once done; then both inboxes close and
everything still queued fails with `ActorUnavailable` (queued saves count as dropped). If
the supervisor drains it instead (the control inbox closes), the writer flushes, then
returns. Cancelled (abort), it stops after the file operation in progress; pending saves
are lost, never half written.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.cache.blocks import BlockHash
from omlx_actors.kernel import (
    ActorError,
    ActorUnavailable,
    Address,
    Envelope,
    Inbox,
    Overflow,
    open_inbox,
    unknown_message,
)

from . import blockfile
from .blockfile import BlockRecord, DiskIO
from .disk_index import DiskBlock, DiskIndex, DiskSpace, effective_budget, free_space_reserve
from .faults import DiskFaults
from .lograte import RepeatedLog
from .messages import (
    ALL_MESSAGE_TYPES,
    MIN_FREE_BYTES,
    MIN_FREE_FRACTION,
    SsdCleanupAll,
    CleanupDone,
    SsdCleanupRequest,
    SsdContains,
    ContainsResult,
    DiskFaultKind,
    SsdFlush,
    InjectDiskFault,
    SsdLoad,
    LoadReason,
    LoadResult,
    Save,
    SsdSetBudget,
    SsdShutdown,
    SsdStatsQuery,
    WriterConfig,
    WriterControl,
    WriterStats,
)

# The messages are re-exported: `from omlx_actors.ssd.writer import Save` is the usual way.
__all__ = [
    "ALL_MESSAGE_TYPES",
    "CONTROL_INBOX_CAPACITY",
    "DISK_USAGE_REFRESH_SAVES",
    "MAX_UNLINKS_PER_SAVE",
    "MIN_FREE_BYTES",
    "MIN_FREE_FRACTION",
    "PENDING_CAPACITY",
    "REPEAT_LOG_INTERVAL_S",
    "SAVE_INBOX_CAPACITY",
    "SAVE_WAIT_S",
    "SsdCleanupAll",
    "CleanupDone",
    "SsdCleanupRequest",
    "SsdContains",
    "ContainsResult",
    "DiskFaultKind",
    "SsdFlush",
    "InjectDiskFault",
    "SsdLoad",
    "LoadReason",
    "LoadResult",
    "Save",
    "SsdSetBudget",
    "SsdShutdown",
    "SsdStatsQuery",
    "WriterAddress",
    "WriterConfig",
    "WriterControl",
    "WriterStats",
    "open_writer_inboxes",
    "run",
]

logger = logging.getLogger(__name__)

# A save holds one block's tensors (MBs for a real model), so the queue bounds memory as
# much as latency: 64 queued blocks ride over a burst (a long prompt's prefill ends with
# dozens of blocks at once) while a slow disk catches up. Full: the sender waits up to
# SAVE_WAIT_S, then the save is dropped and counted - a lost save only costs a later
# re-prefill, a stalled engine costs every request.
SAVE_INBOX_CAPACITY = 64
# Well under human-perceptible latency, and about one or two block writes on a healthy
# SSD: a transient burst gets through, a sustained backlog is dropped.
SAVE_WAIT_S = 0.25
# Saves taken off the inbox but not yet written (their data serves loads meanwhile); also
# the most blocks one write batch holds. With the inbox, at most PENDING_CAPACITY +
# SAVE_INBOX_CAPACITY blocks are held in memory.
PENDING_CAPACITY = 16
# Control messages are answered between file operations; 256 covers a load and a cleanup
# for every request of a full batch and its waiting queue. Full: senders wait (WAIT) -
# a cleanup or a load is never dropped.
CONTROL_INBOX_CAPACITY = 256
# Unlinks per save (and per idle eviction pass): a sudden budget drop (SsdSetBudget, or
# the disk filling up) drains over several saves instead of stalling one on a syscall
# storm (seed 004).
MAX_UNLINKS_PER_SAVE = 32
# Re-read the disk's free space after this many writes (and after every error): other
# programs use the disk too.
DISK_USAGE_REFRESH_SAVES = 64
# A failure that repeats (every save skipped for lack of room, every write failing on a
# full disk) is logged at its first occurrence, then at most once per this interval with
# the count of those not logged; the exact counts are in `WriterStats`.
REPEAT_LOG_INTERVAL_S = 10.0


@attrs.frozen
class WriterAddress:
    """How others reach the writer: saves go to the save inbox, everything else is a call
    on the control inbox. Cheap to copy."""

    control: Address
    saves: Address

    async def save(self, save: Save) -> None:
        """Queue `save`; if the save inbox stays full for `SAVE_WAIT_S` it is dropped,
        counted and logged. Never waits longer. Raises `ActorUnavailable` once the writer
        has stopped."""
        await self.saves.cast(save)

    def save_nowait(self, save: Save) -> bool:
        """Queue `save` if the save inbox has room now; else drop it (counted, logged) and
        return False. For a loop that must never wait. Raises `ActorUnavailable` once the
        writer has stopped."""
        return self.saves.cast_nowait(save)

    async def call(self, message: WriterControl, *, timeout: float | None = None) -> Any:
        """`call` the control inbox (see `Address.call`)."""
        return await self.control.call(message, timeout=timeout)


def open_writer_inboxes(name: str = "ssd-writer") -> tuple[WriterAddress, Inbox, Inbox]:
    """The writer's address and its two inboxes: `(address, control, saves)`.

    Start it as `supervisor.start(name, run, control, saves, config)`; the supervisor owns
    the control inbox, the writer closes the save inbox when it stops.
    """
    control_address, control = open_inbox(name, CONTROL_INBOX_CAPACITY, Overflow.WAIT)
    saves_address, saves = open_inbox(
        f"{name}.saves", SAVE_INBOX_CAPACITY, Overflow.DROP, drop_after=SAVE_WAIT_S
    )
    return WriterAddress(control=control_address, saves=saves_address), control, saves


# ---------------------------------------------------------------------------------------
# State


@attrs.define
class _Counters:
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


class _Pending:
    """Saves taken off the inbox and not yet settled, oldest first, with the newest save
    of each hash for loads. The oldest is the one being written, if any."""

    def __init__(self) -> None:
        self._queue: deque[Save] = deque()
        self._newest: dict[BlockHash, Save] = {}
        self._count: dict[BlockHash, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._newest

    def get(self, block_hash: BlockHash) -> Save | None:
        return self._newest.get(block_hash)

    def oldest(self) -> Save:
        return self._queue[0]

    def append(self, save: Save) -> None:
        self._queue.append(save)
        self._newest[save.hash] = save
        self._count[save.hash] = self._count.get(save.hash, 0) + 1

    def pop_oldest(self) -> Save:
        save = self._queue.popleft()
        left = self._count[save.hash] - 1
        if left:
            self._count[save.hash] = left
        else:
            del self._count[save.hash], self._newest[save.hash]
        return save

    def discard(self, keep: Callable[[Save], bool]) -> int:
        """Drop every save for which `keep` is false; return how many."""
        kept = [save for save in self._queue if keep(save)]
        dropped = len(self._queue) - len(kept)
        self._queue.clear()
        self._newest.clear()
        self._count.clear()
        for save in kept:
            self.append(save)
        return dropped


class _Removal(enum.Enum):
    """Why files are removed, for the counters."""

    EVICT = "evict"  # over budget: `evictions`
    CLEANUP = "cleanup"  # a cleanup asked for it: `cleanup_removed`
    DISCARD = "discard"  # failed validation at load: counted in `corrupt_discarded`


# The real disk: `os.write`, `os.fsync`, `shutil.disk_usage`.
_REAL_DISK = DiskIO()


class _Stop(Exception):
    """Raised inside the writer to leave its loop after a `SsdShutdown` was answered."""


class _Writer:
    """The writer's state and behaviour; `run` drives it. Only its own task touches it."""

    def __init__(self, control: Inbox, saves: Inbox, config: WriterConfig, io: DiskIO) -> None:
        self.control = control
        self.saves = saves
        self.config = config
        self.io = io
        self.faults = DiskFaults()  # injected ones, striking block writes by count
        self.root = Path(config.directory)
        self.identity = config.identity
        self.budget = config.budget_bytes
        self.index = DiskIndex()
        self.space = DiskSpace()
        self.pending = _Pending()
        self.counters = _Counters()
        # Saves taken off the save inbox so far; numbers the FIFO for cleanup barriers.
        self.received = 0
        # scope -> `received` count below which saves of that scope are cancelled on
        # arrival (they were queued before a cleanup of that scope); `_all_barrier` the
        # same for every scope (SsdCleanupAll).
        self.barriers: dict[str, int] = {}
        self.all_barrier = 0
        self.writes_since_usage = 0
        # Set when an idle eviction pass freed nothing (unlinks failing): idle passes
        # stop until the next write or budget change, instead of spinning.
        self.drain_stalled = False
        # Repeated failures are logged rate-limited (see REPEAT_LOG_INTERVAL_S).
        self.skip_log = RepeatedLog(REPEAT_LOG_INTERVAL_S)
        self.write_error_log = RepeatedLog(REPEAT_LOG_INTERVAL_S)

    # -- start ------------------------------------------------------------------------

    async def start(self) -> None:
        scan = await trio.to_thread.run_sync(blockfile.scan_directory, self.root, self.identity)
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
                self.control.name,
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
            self.control.name,
            self.root,
            effective,
            self.budget,
            self.space.free,
            self.space.total,
            reserve,
            "; no block can be saved" if effective == 0 else "",
        )

    # -- the loop ---------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve until a `SsdShutdown` is answered or the control inbox is closed and drained.

        Between file operations: take saves into pending, answer control messages, then
        write the oldest pending save, or evict while over budget, or wait for mail.
        """
        while True:
            await self.take_saves()
            if self.control.queued():
                await self.dispatch(await self.control.receive())
            elif self.pending:
                await self.write_batch()
            elif self.over_budget() and not self.drain_stalled:
                await self.evict_pass()
            elif not await self.wait_for_mail():
                await self.flush()
                return

    async def wait_for_mail(self) -> bool:
        """Wait until either inbox delivers; handle what arrived. False once the control
        inbox is closed and drained (the supervisor's drain)."""
        control: list[Envelope | None] = []
        saves: list[Envelope | None] = []

        async def take(inbox: Inbox, into: list[Envelope | None], nursery: trio.Nursery) -> None:
            try:
                into.append(await inbox.receive())
            except trio.EndOfChannel:
                into.append(None)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, self.control, control, nursery)
            if not self.saves.closed:
                nursery.start_soon(take, self.saves, saves, nursery)
        # A receive is atomic under cancellation, so each list holds what its inbox
        # really delivered; both may have.
        for envelope in saves:
            if envelope is not None:
                self.accept(envelope)
        for envelope in control:
            if envelope is None:
                return False
            await self.dispatch(envelope)
        return True

    async def take_saves(self, target: int | None = None) -> None:
        """Move queued saves into pending while there is room (up to `target` received)."""
        while (
            len(self.pending) < PENDING_CAPACITY
            and self.saves.queued()
            and (target is None or self.received < target)
        ):
            self.accept(await self.saves.receive())

    def accept(self, envelope: Envelope) -> None:
        message = envelope.message
        if not isinstance(message, Save):
            logger.error("%s: not a Save on the save inbox: %r", self.saves.name, message)
            envelope.fail(
                ActorError(self.saves.name, f"only Save goes to the save inbox, not {message!r}")
            )
            return
        envelope.reply(None)
        sequence = self.received
        self.received += 1
        self.counters.saves_enqueued += 1
        if sequence < self.all_barrier or sequence < self.barriers.get(message.scope, 0):
            self.counters.saves_cancelled += 1
        else:
            self.pending.append(message)
        if self.barriers:
            self.barriers = {s: n for s, n in self.barriers.items() if n > self.received}

    async def dispatch(self, envelope: Envelope) -> None:
        """Handle one control message and answer it (a refusal fails it, typed)."""
        stopping = False
        try:
            result = await self.handle(envelope.message)
        except _Stop as stop:
            result, stopping = stop.args[0], True
        except ActorError as refusal:
            if not envelope.expects_reply:
                logger.warning(
                    "%s: cast %r refused: %s", self.control.name, envelope.message, refusal
                )
            envelope.fail(refusal)
            return
        envelope.reply(result)
        if stopping:
            raise _Stop

    async def handle(self, message: object) -> object:
        match message:
            case SsdLoad(hash=block_hash):
                return await self.load(block_hash)
            case SsdContains(hashes=hashes):
                present = tuple(h for h in hashes if h in self.pending or h in self.index)
                return ContainsResult(present=present)
            case SsdCleanupRequest(scope=scope):
                return await self.cleanup(scope)
            case SsdCleanupAll():
                return await self.cleanup(None)
            case SsdFlush():
                await self.flush()
                return self.stats()
            case SsdSetBudget(budget_bytes=budget):
                self.budget = budget
                self.drain_stalled = False
                if self.over_budget():
                    await self.evict_pass()
                return self.stats()
            case SsdStatsQuery():
                return self.stats()
            case InjectDiskFault() as fault:
                armed = self.faults.arm(fault)
                logger.warning(
                    "%s: injected disk fault: %s of block writes %d..%d%s",
                    self.control.name, armed.kind.value, armed.first, armed.last,
                    f" ({armed.stall_s:g} s each)" if armed.kind is DiskFaultKind.STALL else "",
                )
                return self.stats()
            case SsdShutdown(flush=flush, cleanup=cleanup):
                if cleanup:
                    await self.cleanup(None)
                elif flush:
                    await self.flush()
                else:
                    self.counters.saves_cancelled += self.pending.discard(lambda _: False)
                raise _Stop(self.stats())
            case other:
                unknown_message(self.control.name, other)

    # -- saves ------------------------------------------------------------------------

    async def write_batch(self) -> None:
        """Settle the pending saves, oldest first, up to the first hash seen twice:
        duplicates and skips at once, the rest written as one batch (`blockfile.write_blocks`:
        one worker-thread call, each directory fsynced once). Each is counted persisted only
        once its directory's fsync returned, or counted a write error."""
        batch: list[tuple[Save, BlockRecord, DiskBlock | None]] = []
        hashes: set[BlockHash] = set()
        incoming = 0  # bytes the batch adds to the directory
        while self.pending and self.pending.oldest().hash not in hashes:
            save = self.pending.pop_oldest()
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
            blockfile.write_blocks, self.root, self.identity, jobs
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
                self.control.name,
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
                self.control.name,
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
            await self.remove(victims, _Removal.EVICT)
        return self.index.bytes + incoming <= self.effective_budget()

    async def flush(self) -> None:
        """Settle every save queued now (pending or in the save inbox), then evict down to
        the budget. Saves sent meanwhile are left for the loop."""
        target = self.received + self.saves.queued()
        while True:
            await self.take_saves(target)
            if not self.pending:
                break
            await self.write_batch()
        self.drain_stalled = False
        while self.over_budget() and not self.drain_stalled:
            await self.evict_pass()

    # -- removal ----------------------------------------------------------------------

    def over_budget(self) -> bool:
        return self.index.bytes > self.effective_budget()

    async def evict_pass(self) -> None:
        victims = self.index.victims(
            self.index.bytes - self.effective_budget(), MAX_UNLINKS_PER_SAVE
        )
        removed, _ = await self.remove(victims, _Removal.EVICT)
        if not removed:
            self.drain_stalled = True

    async def remove(self, blocks: list[DiskBlock], why: _Removal) -> tuple[int, int]:
        """Delete the files of `blocks` (one worker-thread call) and forget the removed
        ones; return (removed, failed). A file that cannot be removed stays indexed."""
        if not blocks:
            return 0, 0
        paths = [blockfile.block_path(self.root, block.hash) for block in blocks]
        errors = await trio.to_thread.run_sync(blockfile.remove_files, paths)
        removed = failed = 0
        for block, error in zip(blocks, errors, strict=True):
            if error is None:
                self.index.remove(block.hash)
                self.space.freed(block.size)
                removed += 1
            else:
                failed += 1
                self.counters.io_errors += 1
                logger.error("%s: cannot remove %s: %s", self.control.name, error.filename, error)
        if why is _Removal.EVICT:
            self.counters.evictions += removed
        elif why is _Removal.CLEANUP:
            self.counters.cleanup_removed += removed
        if failed:
            await self.refresh_disk_usage()
        return removed, failed

    async def cleanup(self, scope: str | None) -> CleanupDone:
        """Delete `scope`'s blocks (None: every block), pending and queued ones included."""
        queued_end = self.received + self.saves.queued()
        if scope is None:
            cancelled = self.pending.discard(lambda _: False)
            self.all_barrier = queued_end
            self.barriers.clear()
            blocks = list(self.index)
        else:
            cancelled = self.pending.discard(lambda save: save.scope != scope)
            if queued_end > self.received:
                self.barriers[scope] = max(queued_end, self.barriers.get(scope, 0))
            blocks = self.index.of_scope(scope)
        self.counters.saves_cancelled += cancelled
        removed, failed = await self.remove(blocks, _Removal.CLEANUP)
        return CleanupDone(scope=scope, removed=removed, cancelled=cancelled, failed=failed)

    # -- loads ------------------------------------------------------------------------

    async def load(self, block_hash: BlockHash) -> LoadResult:
        pending = self.pending.get(block_hash)
        if pending is not None:
            self.counters.load_hits += 1
            return LoadResult(
                hash=block_hash,
                reason=LoadReason.PENDING,
                tensors=pending.tensors,
                parent=pending.parent,
                scope=pending.scope,
                tokens=pending.tokens,
            )
        if block_hash not in self.index:
            self.counters.load_misses += 1
            return LoadResult(hash=block_hash, reason=LoadReason.MISSING)
        path = blockfile.block_path(self.root, block_hash)
        try:
            _, record = await trio.to_thread.run_sync(
                functools.partial(blockfile.read_block, path, self.identity, block_hash, touch=True)
            )
        except FileNotFoundError:
            logger.warning("%s: block file %s vanished", self.control.name, path)
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
                logger.error("%s: cannot read block %s: %s", self.control.name, block_hash, error)
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
        logger.warning("%s: discarding block %s: %s", self.control.name, block_hash, error)
        block = self.index.get(block_hash)
        if foreign:
            self.index.remove(block_hash)
        elif block is not None:
            await self.remove([block], _Removal.DISCARD)
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
                "%s: cannot read disk usage of %s: %s", self.control.name, self.root, error
            )
            return
        self.space.reading(total=usage.total, free=usage.free)

    def stats(self) -> WriterStats:
        c = self.counters
        return WriterStats(
            saves_enqueued=c.saves_enqueued,
            saves_persisted=c.saves_persisted,
            saves_duplicate=c.saves_duplicate,
            saves_cancelled=c.saves_cancelled,
            saves_skipped=c.saves_skipped,
            write_errors=c.write_errors,
            pending=len(self.pending),
            saves_queued=self.saves.queued(),
            saves_dropped=self.saves.address.dropped,
            evictions=c.evictions,
            cleanup_removed=c.cleanup_removed,
            load_hits=c.load_hits,
            load_misses=c.load_misses,
            corrupt_discarded=c.corrupt_discarded,
            foreign_skipped=c.foreign_skipped,
            temps_removed=c.temps_removed,
            io_errors=c.io_errors,
            files=len(self.index),
            bytes_on_disk=self.index.bytes,
            budget_bytes=self.budget,
            effective_budget_bytes=self.effective_budget(),
            free_bytes=self.space.free if self.space.known else None,
        )

    def close(self, reason: str) -> None:
        """Refuse further messages on both inboxes and answer everyone still waiting."""
        error = ActorUnavailable(self.control.name, reason)
        self.saves.fail_pending(error)
        self.control.fail_pending(error)


# ---------------------------------------------------------------------------------------
# The actor


async def run(
    control: Inbox,
    saves: Inbox,
    config: WriterConfig,
    io: DiskIO = _REAL_DISK,
    *,
    task_status: trio.TaskStatus[WriterStats] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the block directory `config.directory` until shut down.

    Scans the directory first (see the module docstring), then reports ready with the
    resulting `WriterStats`. Returns after answering a `SsdShutdown`, or after flushing once
    the control inbox is closed and drained. On return or cancellation both inboxes are
    closed and their waiting callers answered with `ActorUnavailable`; on a crash (an
    unexpected exception) they are left open for the supervisor's next incarnation.
    """
    writer = _Writer(control, saves, config, io)
    await writer.start()
    task_status.started(writer.stats())
    try:
        await writer.serve()
    except _Stop:
        writer.close("writer has shut down")
    except Exception:
        raise
    except BaseException:
        writer.close("writer was cancelled")
        raise
    else:
        writer.close("writer has shut down")
