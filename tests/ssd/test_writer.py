"""The writer actor on a real directory: saves, loads, cleanup ordering, the bounded save
inbox, faults at the write call, budget and eviction, restart, shutdown, the wire."""

from __future__ import annotations

import errno
import logging
import os
from typing import Union

import attrs
import numpy as np
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.kernel import (
    ActorUnavailable,
    UnknownMessage,
    assert_plain_data,
    decode,
    encode,
    open_supervisor,
)
from omlx_actors.ssd import writer
from omlx_actors.ssd.blockfile import BlockIdentity, TensorData, block_path
from omlx_actors.ssd.disk_store import DISK_USAGE_REFRESH_SAVES, MAX_UNLINKS_PER_SAVE
from omlx_actors.ssd.writer import (
    PENDING_CAPACITY,
    SAVE_INBOX_CAPACITY,
    SAVE_WAIT_S,
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
    WriterStats,
)

from .helpers import (
    IDENTITY,
    OTHER_IDENTITY,
    Disk,
    balanced,
    block_files,
    block_hash,
    config,
    file_size,
    make_save,
    running_writer,
    temp_files,
)


def same_tensors(result: LoadResult, save: Save) -> bool:
    return result.tensors is not None and sorted(result.tensors, key=lambda t: t.name) == sorted(
        save.tensors, key=lambda t: t.name
    )


async def flushed(address) -> WriterStats:
    stats = await address.call(SsdFlush())
    assert balanced(stats)
    return stats


# -- saves and loads -------------------------------------------------------------------


async def test_a_saved_block_is_persisted_and_loads_back_from_disk(tmp_path):
    save = make_save(1, "req-1")
    async with running_writer(tmp_path) as (w, ready):
        assert (ready.files, ready.bytes_on_disk) == (0, 0)
        await w.save(save)
        stats = await flushed(w)
        assert (stats.saves_enqueued, stats.saves_persisted, stats.files) == (1, 1, 1)
        assert stats.bytes_on_disk == file_size(save) == block_files(tmp_path)[save.hash]

        result = await w.call(SsdLoad(hash=save.hash))
        assert result.reason is LoadReason.DISK
        assert same_tensors(result, save)
        assert (result.parent, result.scope, result.tokens) == (block_hash(0), "req-1", 16)
        for got in result.tensors:
            want = next(t for t in save.tensors if t.name == got.name)
            np.testing.assert_array_equal(got.to_array(), want.to_array())
        assert await w.call(SsdLoad(hash=block_hash(2))) == LoadResult(
            hash=block_hash(2), reason=LoadReason.MISSING
        )
        stats = await w.call(SsdStatsQuery())
        assert (stats.load_hits, stats.load_misses) == (1, 1)


async def test_saves_queued_together_are_written_as_one_batch_with_fewer_fsyncs(tmp_path):
    """Issue #15 item 14: a prefill's blocks arrive together. Written as one batch, each
    directory is fsynced once per batch and the root once, not once per new subdirectory;
    every block is persisted (and counted) by the time Flush answers."""
    disk = Disk()
    gate = disk.stall()
    saves = [make_save(i, elements=64) for i in range(16)]
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(saves[0])
        await wait_all_tasks_blocked()  # its write waits at the gate
        for save in saves[1:]:
            await w.save(save)
        gate.set()
        stats = await flushed(w)
        assert (stats.saves_persisted, stats.files) == (16, 16)
        assert set(block_files(tmp_path)) == {save.hash for save in saves}
    first = saves[0].hash[:2]
    rest = {save.hash[:2] for save in saves[1:]}
    # The first block alone: its file, its directory, the root (a new subdirectory); then
    # the other 15 in one batch: 15 files, each of their directories once, the root once.
    assert disk.fsyncs == 3 + 15 + len(rest) + (1 if rest - {first} else 0)
    one_at_a_time = 16 + 16 + len(rest | {first})
    assert disk.fsyncs < one_at_a_time


async def test_load_of_a_pending_block_hits_from_its_data(tmp_path):
    disk = Disk()
    gate = disk.stall()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(0))
        await trio.to_thread.run_sync(disk.write_started.wait)  # block 0 is being written
        await w.save(make_save(1))
        async with trio.open_nursery() as nursery:
            results = []

            async def load():
                results.append(await w.call(SsdLoad(hash=block_hash(1))))

            nursery.start_soon(load)
            await wait_all_tasks_blocked()
            gate.set()
        assert results[0].reason is LoadReason.PENDING
        assert same_tensors(results[0], make_save(1))
        assert (await w.call(SsdContains(hashes=(block_hash(1), block_hash(5))))) == ContainsResult(
            present=(block_hash(1),)
        )
        stats = await flushed(w)
        assert stats.saves_persisted == 2


async def test_a_duplicate_save_is_not_rewritten_but_a_new_scope_is(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        await w.save(make_save(1, "a"))
        await flushed(w)
        mtime = block_path(tmp_path, block_hash(1)).stat().st_mtime_ns
        await w.save(make_save(1, "a"))
        stats = await flushed(w)
        assert (stats.saves_persisted, stats.saves_duplicate) == (1, 1)
        assert block_path(tmp_path, block_hash(1)).stat().st_mtime_ns == mtime
        await w.save(make_save(1, "b"))
        stats = await flushed(w)
        assert (stats.saves_persisted, stats.files) == (2, 1)
        assert (await w.call(SsdLoad(hash=block_hash(1)))).scope == "b"
        assert await w.call(SsdCleanupRequest(scope="a")) == CleanupDone(
            scope="a", removed=0, cancelled=0
        )
        assert block_files(tmp_path).keys() == {block_hash(1)}


async def test_a_corrupt_file_is_a_miss_and_is_removed(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        await w.save(make_save(1))
        await flushed(w)
        path = block_path(tmp_path, block_hash(1))
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF
        path.write_bytes(bytes(raw))

        result = await w.call(SsdLoad(hash=block_hash(1)))

        assert (result.reason, result.tensors) == (LoadReason.CORRUPT, None)
        assert not path.exists()
        stats = await w.call(SsdStatsQuery())
        assert (stats.corrupt_discarded, stats.load_misses, stats.files, stats.bytes_on_disk) == (
            1,
            1,
            0,
            0,
        )
        assert (await w.call(SsdLoad(hash=block_hash(1)))).reason is LoadReason.MISSING


async def test_a_foreign_namespace_file_is_skipped_and_kept(tmp_path):
    async with running_writer(tmp_path, identity=OTHER_IDENTITY) as (other, _):
        await other.save(make_save(1))
        await flushed(other)
    foreign = block_path(tmp_path, block_hash(1))
    async with running_writer(tmp_path) as (w, ready):
        assert (ready.foreign_skipped, ready.files) == (1, 0)
        assert await w.call(SsdContains(hashes=(block_hash(1),))) == ContainsResult(present=())
        assert (await w.call(SsdLoad(hash=block_hash(1)))).reason is LoadReason.MISSING
        assert await w.call(SsdCleanupAll()) == CleanupDone(scope=None, removed=0, cancelled=0)
        assert foreign.exists()
        await w.call(SsdShutdown(cleanup=True))
    assert foreign.exists()
    async with running_writer(tmp_path, identity=OTHER_IDENTITY) as (other, ready):
        assert ready.files == 1
        assert (await other.call(SsdLoad(hash=block_hash(1)))).reason is LoadReason.DISK


# -- cleanup ordering ------------------------------------------------------------------


async def test_cleanup_waits_for_inflight_write(tmp_path):
    disk = Disk()
    gate = disk.stall()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(1, "req-1"))
        await trio.to_thread.run_sync(disk.write_started.wait)
        acks = []

        async def cleanup():
            acks.append(await w.call(SsdCleanupRequest(scope="req-1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleanup)
            await wait_all_tasks_blocked()
            assert acks == []  # the write is still in progress, so is the cleanup
            assert len(temp_files(tmp_path)) == 1
            gate.set()

        assert acks == [CleanupDone(scope="req-1", removed=1, cancelled=0)]
        assert block_files(tmp_path) == {} and temp_files(tmp_path) == []
        stats = await w.call(SsdStatsQuery())
        assert (stats.saves_persisted, stats.cleanup_removed, stats.files) == (1, 1, 0)

        # The scope is not poisoned: a later save under it is written.
        await w.save(make_save(2, "req-1"))
        await flushed(w)
        assert block_files(tmp_path).keys() == {block_hash(2)}


async def test_cleanup_cancels_saves_of_its_scope_still_queued(tmp_path):
    disk = Disk()
    gate = disk.stall()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(0, "keep"))
        await trio.to_thread.run_sync(disk.write_started.wait)
        for i in range(1, 41):  # more than fit in pending: some stay in the save inbox
            await w.save(make_save(i, "req-1" if i % 2 else "keep"))
        acks = []

        async def cleanup():
            acks.append(await w.call(SsdCleanupRequest(scope="req-1")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cleanup)
            await wait_all_tasks_blocked()
            gate.set()
        # Only pending ones are counted in the ack; queued ones are cancelled on arrival.
        assert acks == [CleanupDone(scope="req-1", removed=0, cancelled=PENDING_CAPACITY // 2)]
        await w.save(make_save(41, "req-1"))  # sent after the cleanup: written
        stats = await flushed(w)
        assert (stats.saves_enqueued, stats.saves_cancelled, stats.saves_persisted) == (42, 20, 22)
        assert block_files(tmp_path).keys() == {block_hash(i) for i in range(0, 41, 2)} | {
            block_hash(41)
        }


async def test_cleanup_all_deletes_everything_saved_before_it(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        for i in range(5):
            await w.save(make_save(i, f"req-{i % 2}"))
        await flushed(w)
        for i in range(5, 8):
            await w.save(make_save(i, "late"))
        done = await w.call(SsdCleanupAll())
        assert done.scope is None and done.removed + done.cancelled >= 5
        stats = await flushed(w)
        assert (stats.files, stats.bytes_on_disk, stats.pending) == (0, 0, 0)
        assert block_files(tmp_path) == {}
        await w.save(make_save(9, "late"))
        await flushed(w)
        assert block_files(tmp_path).keys() == {block_hash(9)}


# -- the bounded save inbox ------------------------------------------------------------


async def test_saves_beyond_a_full_inbox_are_dropped_after_save_wait(
    tmp_path, autojump_clock, caplog
):
    disk = Disk()
    gate = disk.stall()
    extra = 5
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(0, "b"))
        await trio.to_thread.run_sync(disk.write_started.wait)  # the writer is stalled now
        for i in range(1, SAVE_INBOX_CAPACITY + 1):
            await w.save(make_save(i, "a" if i % 2 else "b"))
        assert w.saves.dropped == 0
        start = trio.current_time()
        with caplog.at_level(logging.WARNING):
            for i in range(extra):
                await w.save(make_save(100 + i))
        assert trio.current_time() - start == pytest.approx(extra * SAVE_WAIT_S)
        assert w.saves.dropped == extra
        assert "dropped Save" in caplog.text

        # Loads and cleanups are not dropped: they wait on the control inbox.
        replies = []

        async def ask(message):
            replies.append(await w.call(message))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, SsdLoad(hash=block_hash(2)))
            await wait_all_tasks_blocked()
            nursery.start_soon(ask, SsdCleanupRequest(scope="a"))
            await wait_all_tasks_blocked()
            gate.set()
        assert replies[0].reason is LoadReason.PENDING
        assert replies[1].scope == "a"
        stats = await flushed(w)
        sent = 1 + SAVE_INBOX_CAPACITY + extra
        assert stats.saves_enqueued + stats.saves_dropped + stats.saves_queued == sent
        assert (stats.saves_dropped, stats.saves_cancelled, stats.saves_persisted) == (
            extra,
            SAVE_INBOX_CAPACITY // 2,
            1 + SAVE_INBOX_CAPACITY // 2,
        )


# -- faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("at_call", [1, 2])
async def test_a_write_error_is_counted_the_temp_removed_and_serving_goes_on(
    tmp_path, code, at_call, caplog
):
    disk = Disk()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        readings = disk.usage_calls
        disk.errors.append(code)
        disk.error_at_call = at_call
        with caplog.at_level(logging.ERROR):
            await w.save(make_save(1))
            stats = await flushed(w)
        assert (stats.write_errors, stats.saves_persisted, stats.files) == (1, 0, 0)
        assert list(tmp_path.rglob("*.*")) == []
        assert disk.usage_calls == readings + 1  # the free space was re-read
        assert errno.errorcode[code] in caplog.text

        await w.save(make_save(2))
        stats = await flushed(w)
        assert (stats.write_errors, stats.saves_persisted) == (1, 1)
        assert (await w.call(SsdLoad(hash=block_hash(2)))).reason is LoadReason.DISK


async def test_a_failed_rewrite_keeps_the_old_block(tmp_path):
    disk = Disk()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(1, "a"))
        await flushed(w)
        disk.errors.append(errno.EIO)
        await w.save(make_save(1, "b"))
        stats = await flushed(w)
        assert (stats.write_errors, stats.files) == (1, 1)
        result = await w.call(SsdLoad(hash=block_hash(1)))
        assert (result.reason, result.scope) == (LoadReason.DISK, "a")


# -- budget and eviction ---------------------------------------------------------------


async def test_eviction_is_lru_and_loads_refresh_recency(tmp_path):
    size = file_size(make_save(1, elements=64))  # blocks 1.. have parents: equal sizes
    async with running_writer(tmp_path, budget=3 * size) as (w, _):
        for i in (1, 2, 3):
            await w.save(make_save(i, elements=64))
        await flushed(w)
        assert (await w.call(SsdLoad(hash=block_hash(1)))).hit
        await w.save(make_save(4, elements=64))
        stats = await flushed(w)
        assert (stats.evictions, stats.files, stats.bytes_on_disk) == (1, 3, 3 * size)
        present = await w.call(SsdContains(hashes=tuple(block_hash(i) for i in range(1, 5))))
        assert present.present == (block_hash(1), block_hash(3), block_hash(4))
        assert block_files(tmp_path).keys() == set(present.present)


async def test_a_block_larger_than_the_budget_is_skipped_and_counted(tmp_path):
    async with running_writer(tmp_path, budget=100) as (w, _):
        await w.save(make_save(1))
        stats = await flushed(w)
        assert (stats.saves_skipped, stats.files) == (1, 0)
        assert block_files(tmp_path) == {}


async def test_a_budget_drop_unlinks_at_most_a_batch_per_pass_then_drains(tmp_path):
    count = MAX_UNLINKS_PER_SAVE + 8
    async with running_writer(tmp_path) as (w, _):
        for i in range(count):
            await w.save(make_save(i))
        await flushed(w)
        stats = await w.call(SsdSetBudget(budget_bytes=0))
        assert (stats.evictions, stats.files) == (MAX_UNLINKS_PER_SAVE, 8)
        stats = await flushed(w)
        assert (stats.evictions, stats.files, stats.bytes_on_disk) == (count, 0, 0)
        assert block_files(tmp_path) == {}


async def test_low_free_space_shrinks_the_budget_after_enospc(tmp_path):
    size = file_size(make_save(1, elements=64))
    disk = Disk(free=100 * size, total=1000 * size)
    async with running_writer(tmp_path, disk=disk, min_free_bytes=2 * size) as (w, ready):
        assert ready.effective_budget_bytes == 98 * size
        for i in range(1, 7):
            await w.save(make_save(i, elements=64))
        await flushed(w)
        # Another program fills the disk: our next write fails, the reading is refreshed,
        # and the budget now keeps 2 blocks' worth free: 6 on disk + 1 free - 2 = 5 blocks.
        disk.free = 1 * size
        disk.errors.append(errno.ENOSPC)
        await w.save(make_save(7, elements=64))
        stats = await flushed(w)
        assert stats.write_errors == 1
        assert stats.effective_budget_bytes == 5 * size
        assert (stats.files, stats.evictions) == (5, 1)
        assert block_hash(1) not in block_files(tmp_path)  # the least recently used


async def test_free_space_is_reread_every_refresh_interval(tmp_path):
    disk = Disk()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        assert disk.usage_calls == 1  # at start
        for i in range(DISK_USAGE_REFRESH_SAVES):
            await w.save(make_save(i, elements=8))
        await flushed(w)
        assert disk.usage_calls == 2


async def test_a_skipped_save_rereads_free_space_so_room_freed_elsewhere_is_used(tmp_path):
    size = file_size(make_save(1, elements=64))
    disk = Disk(free=size // 2, total=100 * size)
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(1, elements=64))
        assert (await flushed(w)).saves_skipped == 1
        disk.free = 10 * size
        await w.save(make_save(1, elements=64))
        stats = await flushed(w)
        assert (stats.saves_skipped, stats.saves_persisted) == (1, 1)


# -- restart ---------------------------------------------------------------------------


async def test_restart_rebuilds_the_index_with_lru_order_from_mtimes(tmp_path):
    size = file_size(make_save(1, "s", elements=64))
    async with running_writer(tmp_path) as (w, _):
        for i in range(1, 5):
            await w.save(make_save(i, "s", elements=64))
        await w.call(SsdShutdown(flush=True))
    for i, mtime in zip(range(1, 5), (400, 100, 300, 200), strict=True):
        os.utime(block_path(tmp_path, block_hash(i)), (mtime, mtime))
    leftover = block_path(tmp_path, block_hash(1)).parent / f".{block_hash(1)}.deadbeef.tmp"
    leftover.write_bytes(b"torn")
    torn = block_path(tmp_path, block_hash(9))
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(b"\x10\0\0\0\0\0\0\0{}")

    async with running_writer(tmp_path, budget=2 * size) as (w, ready):
        assert (ready.files, ready.temps_removed, ready.corrupt_discarded) == (4, 1, 1)
        assert ready.bytes_on_disk == 4 * size
        stats = await flushed(w)  # drains to the budget: oldest mtimes go first
        assert stats.evictions == 2
        assert block_files(tmp_path).keys() == {block_hash(1), block_hash(3)}
        assert temp_files(tmp_path) == [] and not torn.exists()
        assert (await w.call(SsdCleanupRequest(scope="s"))).removed == 2


async def test_a_load_touches_its_file_so_recency_survives_a_restart(tmp_path):
    size = file_size(make_save(1, elements=64))
    async with running_writer(tmp_path) as (w, _):
        for i in (1, 2, 3):
            await w.save(make_save(i, elements=64))
        await flushed(w)
        for i, mtime in zip((1, 2, 3), (100, 200, 300), strict=True):
            os.utime(block_path(tmp_path, block_hash(i)), (mtime, mtime))
        assert (await w.call(SsdLoad(hash=block_hash(1)))).hit
    assert block_path(tmp_path, block_hash(1)).stat().st_mtime > 300
    async with running_writer(tmp_path, budget=2 * size) as (w, _):
        stats = await flushed(w)
        assert stats.evictions == 1
        assert block_files(tmp_path).keys() == {block_hash(1), block_hash(3)}


# -- shutdown --------------------------------------------------------------------------


async def test_shutdown_flush_writes_everything_sent_before_it(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        for i in range(30):
            await w.save(make_save(i))
        stats = await w.call(SsdShutdown(flush=True))
        assert (stats.saves_persisted, stats.pending, stats.saves_queued) == (30, 0, 0)
        with pytest.raises(ActorUnavailable):
            await w.call(SsdStatsQuery())
        with pytest.raises(ActorUnavailable):
            await w.save(make_save(99))
    assert len(block_files(tmp_path)) == 30


async def test_shutdown_without_flush_cancels_pending_saves(tmp_path):
    disk = Disk()
    gate = disk.stall()
    async with running_writer(tmp_path, disk=disk) as (w, _):
        await w.save(make_save(0))
        await trio.to_thread.run_sync(disk.write_started.wait)
        for i in range(1, 4):
            await w.save(make_save(i))
        async with trio.open_nursery() as nursery:
            replies = []

            async def shutdown():
                replies.append(await w.call(SsdShutdown(flush=False)))

            nursery.start_soon(shutdown)
            await wait_all_tasks_blocked()
            gate.set()
        stats = replies[0]
        assert balanced(stats)
        assert (stats.saves_persisted, stats.saves_cancelled, stats.pending) == (1, 3, 0)
    assert block_files(tmp_path).keys() == {block_hash(0)}
    assert temp_files(tmp_path) == []


async def test_shutdown_cleanup_deletes_everything(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        for i in range(5):
            await w.save(make_save(i, "r"))
        await flushed(w)
        await w.save(make_save(5))
        stats = await w.call(SsdShutdown(cleanup=True))
        assert (stats.files, stats.bytes_on_disk) == (0, 0)
    assert block_files(tmp_path) == {}


async def test_a_supervisor_drain_flushes_the_writer(tmp_path):
    address, control, saves = writer.open_writer_inboxes()
    async with open_supervisor("test") as supervisor:
        await supervisor.start(
            "ssd-writer", writer.run, control, saves, config(tmp_path), Disk().io
        )
        for i in range(10):
            await address.save(make_save(i))
    assert len(block_files(tmp_path)) == 10
    with pytest.raises(ActorUnavailable):
        await address.save(make_save(11))


async def test_cancelling_the_writer_waits_for_the_write_in_progress(tmp_path):
    disk = Disk()
    gate = disk.stall()
    address, control, saves = writer.open_writer_inboxes()
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run, control, saves, config(tmp_path), disk.io)
        await address.save(make_save(0))
        await trio.to_thread.run_sync(disk.write_started.wait)
        nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await wait_all_tasks_blocked()
        assert block_files(tmp_path) == {}  # still writing, cancelled or not
        gate.set()
    # The write ran to completion (never abandoned half way), then the writer stopped.
    assert block_files(tmp_path).keys() == {block_hash(0)}
    assert temp_files(tmp_path) == []
    with pytest.raises(ActorUnavailable):
        await address.call(SsdStatsQuery())


async def test_an_unknown_message_is_refused_and_serving_goes_on(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        with pytest.raises(UnknownMessage):
            await w.control.call(make_save(1))  # a Save belongs on the save inbox
        assert balanced(await w.call(SsdStatsQuery()))


# -- messages --------------------------------------------------------------------------


def test_messages_validate_hashes_and_names():
    with pytest.raises(ValueError, match="block hash"):
        SsdLoad(hash="../../etc")
    with pytest.raises(ValueError, match="block hash"):
        SsdContains(hashes=(block_hash(1), "nope"))
    with pytest.raises(ValueError, match="unique"):
        Save(hash=block_hash(1), tokens=1, tensors=make_save(1).tensors * 2)
    with pytest.raises(ValueError):
        SsdSetBudget(budget_bytes=-1)


def test_a_disk_fault_says_what_it_lacks():
    with pytest.raises(ValueError, match="must be >= 1"):
        InjectDiskFault(kind=DiskFaultKind.FULL, writes=0)
    with pytest.raises(ValueError, match=r"^a stall fault needs stall_s > 0, got 0.0$"):
        InjectDiskFault(kind=DiskFaultKind.STALL, writes=1)
    with pytest.raises(ValueError, match="a full-disk fault fails its writes at once"):
        InjectDiskFault(kind=DiskFaultKind.FULL, writes=1, stall_s=1.0)


AnyWriterMessage = Union[
    Save,
    InjectDiskFault,
    SsdLoad,
    SsdContains,
    SsdCleanupRequest,
    SsdCleanupAll,
    SsdFlush,
    SsdSetBudget,
    SsdStatsQuery,
    SsdShutdown,
    LoadResult,
    ContainsResult,
    CleanupDone,
    WriterStats,
    WriterConfig,
]

STATS = WriterStats(**{f.name: 3 for f in attrs.fields(WriterStats)})


@pytest.mark.parametrize(
    "message",
    [
        make_save(1, "req-1"),
        make_save(0),
        Save(hash=block_hash(2), tokens=0, tensors=()),
        SsdLoad(hash=block_hash(1)),
        SsdContains(hashes=(block_hash(1), block_hash(2))),
        SsdContains(hashes=()),
        SsdCleanupRequest(scope="req-1"),
        SsdCleanupAll(),
        SsdFlush(),
        SsdSetBudget(budget_bytes=1 << 40),
        SsdStatsQuery(),
        SsdShutdown(flush=False, cleanup=True),
        InjectDiskFault(kind=DiskFaultKind.STALL, writes=3, stall_s=1.5),
        InjectDiskFault(kind=DiskFaultKind.FULL, writes=1, after_writes=7),
        LoadResult(
            hash=block_hash(1),
            reason=LoadReason.DISK,
            tensors=make_save(1).tensors,
            parent=block_hash(0),
            scope="s",
            tokens=16,
        ),
        LoadResult(hash=block_hash(1), reason=LoadReason.CORRUPT),
        ContainsResult(present=(block_hash(3),)),
        CleanupDone(scope=None, removed=2, cancelled=1, failed=0),
        STATS,
        attrs.evolve(STATS, free_bytes=None),
        config(__import__("pathlib").Path("/tmp/x")),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_is_plain_data_and_survives_the_wire(message):
    assert_plain_data(message)
    assert decode(encode(message), AnyWriterMessage) == message


def test_tensor_data_survives_the_wire_byte_exact():
    tensor = TensorData.from_array("l0.k", np.array([[1.5, -2.0]], dtype=np.float16))
    back = decode(encode(tensor), TensorData)
    assert back == tensor and back.shape == (1, 2)
    identity = decode(encode(IDENTITY), BlockIdentity)
    assert identity == IDENTITY
