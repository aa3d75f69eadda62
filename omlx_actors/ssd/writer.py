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
saves are written oldest first, all of them in one batch (`block_directory.write_blocks`: each
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
`block_directory.scan_directory`): other identities' files are skipped and kept, corrupt ones
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

Where it lives: this module is the actor - its inboxes, its loop, the control messages,
cleanups and stats. The files, their index, the budget and eviction are `disk_store`'s
(`DiskStore`); the pending queue and the cleanup barriers are `pending`'s (pure).
"""

from __future__ import annotations

import logging
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

from .block_directory import DiskIO
from .disk_store import DiskStore, Removal
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
from .pending import CleanupBarriers, PendingSaves

# The messages are re-exported: `from omlx_actors.ssd.writer import Save` is the usual way.
__all__ = [
    "ALL_MESSAGE_TYPES",
    "CONTROL_INBOX_CAPACITY",
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


# The real disk: `os.write`, `os.fsync`, `shutil.disk_usage`.
_REAL_DISK = DiskIO()


class _Stop(Exception):
    """Raised inside the writer to leave its loop after a `SsdShutdown` was answered."""


class _Writer:
    """The writer's state and behaviour; `run` drives it. Only its own task touches it."""

    def __init__(self, control: Inbox, saves: Inbox, config: WriterConfig, io: DiskIO) -> None:
        self.control = control
        self.saves = saves
        self.store = DiskStore(control.name, config, io, REPEAT_LOG_INTERVAL_S)
        self.counters = self.store.counters
        self.pending = PendingSaves()
        self.barriers = CleanupBarriers()

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
                await self.store.write_batch(self.pending)
            elif self.store.over_budget() and not self.store.drain_stalled:
                await self.store.evict_pass()
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
            and (target is None or self.barriers.received < target)
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
        self.counters.saves_enqueued += 1
        if self.barriers.arrived(message.scope):
            self.counters.saves_cancelled += 1
        else:
            self.pending.append(message)

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
                present = tuple(h for h in hashes if h in self.pending or h in self.store.index)
                return ContainsResult(present=present)
            case SsdCleanupRequest(scope=scope):
                return await self.cleanup(scope)
            case SsdCleanupAll():
                return await self.cleanup(None)
            case SsdFlush():
                await self.flush()
                return self.stats()
            case SsdSetBudget(budget_bytes=budget):
                await self.store.set_budget(budget)
                return self.stats()
            case SsdStatsQuery():
                return self.stats()
            case InjectDiskFault() as fault:
                armed = self.store.faults.arm(fault)
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

    # -- saves, cleanups, loads --------------------------------------------------------

    async def flush(self) -> None:
        """Settle every save queued now (pending or in the save inbox), then evict down to
        the budget. Saves sent meanwhile are left for the loop."""
        target = self.barriers.received + self.saves.queued()
        while True:
            await self.take_saves(target)
            if not self.pending:
                break
            await self.store.write_batch(self.pending)
        await self.store.evict_to_budget()

    async def cleanup(self, scope: str | None) -> CleanupDone:
        """Delete `scope`'s blocks (None: every block), pending and queued ones included."""
        queued = self.saves.queued()
        if scope is None:
            cancelled = self.pending.discard(lambda _: False)
            self.barriers.cleanup_all(queued)
            blocks = list(self.store.index)
        else:
            cancelled = self.pending.discard(lambda save: save.scope != scope)
            self.barriers.cleanup(scope, queued)
            blocks = self.store.index.of_scope(scope)
        self.counters.saves_cancelled += cancelled
        removed, failed = await self.store.remove(blocks, Removal.CLEANUP)
        return CleanupDone(scope=scope, removed=removed, cancelled=cancelled, failed=failed)

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
        return await self.store.load(block_hash)

    def stats(self) -> WriterStats:
        c, store = self.counters, self.store
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
            files=len(store.index),
            bytes_on_disk=store.index.bytes,
            budget_bytes=store.budget,
            effective_budget_bytes=store.effective_budget(),
            free_bytes=store.space.free if store.space.known else None,
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
    await writer.store.start()
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
