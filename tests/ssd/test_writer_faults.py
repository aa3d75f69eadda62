"""The writer against real failures: a process killed mid-write (SIGKILL), and a real
file system that fills up (a 1 MiB tmpfs, where mounting is permitted); and the faults
scenarios inject at its disk boundary (`InjectDiskFault`: a hung disk, a full one)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.ssd.writer import (
    PENDING_CAPACITY,
    SsdCleanupAll,
    DiskFaultKind,
    SsdFlush,
    InjectDiskFault,
    SsdLoad,
    LoadReason,
)

from .helpers import (
    mounted_tmpfs,
    KILL_TEST_ELEMENTS,
    Disk,
    balanced,
    block_files,
    block_hash,
    file_size,
    make_save,
    running_writer,
    temp_files,
)

CHILD = Path(__file__).with_name("_child_writer.py")
# Blocks the child may have saved before being killed (it stops at its SAVES).
CHILD_SAVES = 5000


async def start_child(root: Path, budget: int, stall_at: int, until: bytes) -> trio.Process:
    """The child writer, once it has printed `until`."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(CHILD), str(root), str(budget), str(stall_at)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    seen = b""
    with trio.fail_after(30):
        while until not in seen:
            chunk = await process.stdout.receive_some()
            assert chunk, "the child exited before it was ready"
            seen += chunk
    return process


@pytest.mark.parametrize("kill", ["mid-write", "random-0", "random-1", "random-2"])
async def test_a_writer_killed_at_random_points_leaves_valid_blocks_or_misses(tmp_path, kill):
    block = file_size(make_save(1, "s1", elements=KILL_TEST_ELEMENTS))
    if kill == "mid-write":
        # The 4th call of the 31st file (a header and 3 tensors each): half a tensor in.
        process = await start_child(tmp_path, 24 * block, stall_at=30 * 4 + 3, until=b"stalled")
    else:
        process = await start_child(tmp_path, 24 * block, stall_at=0, until=b"ready")
        await trio.sleep(random.Random(kill).uniform(0.1, 0.6))
    process.send_signal(signal.SIGKILL)
    assert await process.wait() == -signal.SIGKILL
    await process.stdout.aclose()
    temps_left = len(temp_files(tmp_path))
    if kill == "mid-write":
        # The temp files of the batch in progress, the last one half written.
        assert 1 <= temps_left <= PENDING_CAPACITY
    on_disk = block_files(tmp_path)
    assert on_disk, "the child persisted nothing before the kill"

    index_of = {block_hash(i): i for i in range(CHILD_SAVES)}
    async with running_writer(tmp_path) as (w, ready):
        assert ready.temps_removed == temps_left
        assert temp_files(tmp_path) == []
        assert ready.files == len(on_disk)
        for h in on_disk:
            result = await w.call(SsdLoad(hash=h))
            assert result.reason is LoadReason.DISK  # checksum verified on the way
            i = index_of[h]
            expected = make_save(i, f"s{i % 3}", elements=KILL_TEST_ELEMENTS)
            assert sorted(result.tensors, key=lambda t: t.name) == list(expected.tensors)
        missing = next(h for h in index_of if h not in on_disk)
        assert (await w.call(SsdLoad(hash=missing))).reason is LoadReason.MISSING
        stats = await w.call(SsdFlush())
        assert stats.corrupt_discarded == 0
        assert stats.load_hits == len(on_disk)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB tmpfs mounted for the test."""
    with mounted_tmpfs(tmp_path, "1m") as mount_point:
        yield mount_point


async def test_a_really_full_disk_fails_the_write_cleanly_and_shrinks_the_budget(
    tiny_filesystem,
):
    root = tiny_filesystem
    first, second, third = (make_save(i, elements=KILL_TEST_ELEMENTS) for i in (1, 2, 3))
    async with running_writer(root, disk=Disk(free=None)) as (w, ready):
        assert ready.effective_budget_bytes > file_size(first)
        # Another program takes nearly all the room behind the writer's back.
        hog = root / "hog"
        hog.write_bytes(b"\0" * (900 * 1024))

        await w.save(first)
        stats = await w.call(SsdFlush())
        assert (stats.write_errors, stats.files, stats.saves_persisted) == (1, 0, 0)
        assert list(root.rglob("*.tmp")) == [] and block_files(root) == {}
        assert stats.effective_budget_bytes < file_size(second)  # re-read after ENOSPC

        await w.save(second)
        stats = await w.call(SsdFlush())
        assert (stats.write_errors, stats.saves_skipped) == (1, 1)  # refused, not tried

        hog.unlink()
        await w.save(third)
        stats = await w.call(SsdFlush())
        assert (stats.saves_persisted, stats.files) == (1, 1)
        assert balanced(stats)
        assert (await w.call(SsdLoad(hash=third.hash))).reason is LoadReason.DISK


async def test_a_hung_disk_holds_the_writer_and_a_cleanup_waits_for_its_write(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        await w.call(InjectDiskFault(kind=DiskFaultKind.STALL, writes=1, stall_s=2.0))
        await w.save(make_save(1, elements=64))
        await wait_all_tasks_blocked()  # the writer is inside the hung write
        stalled_at = trio.current_time()
        # The cleanup does not race the write in progress: it is answered after it, and
        # removes the block that write produced.
        done = await w.call(SsdCleanupAll())
        assert trio.current_time() >= stalled_at + 1.9
        assert done.removed == 1
        assert block_files(tmp_path) == {} and temp_files(tmp_path) == []
        # The fault struck one write: the next goes to a healthy disk at once.
        await w.save(make_save(2, elements=64))
        with trio.fail_after(1.5):
            stats = await w.call(SsdFlush())
        assert (stats.saves_persisted, stats.files, stats.write_errors) == (2, 1, 0)
        assert balanced(stats)


async def test_a_full_disk_fails_exactly_the_writes_it_was_told_to(tmp_path):
    """Regression (issue #15 item 15): a fault over a time window struck nothing when the
    window passed before a write came (a loaded machine); one by count cannot miss."""
    async with running_writer(tmp_path) as (w, _):
        await w.call(InjectDiskFault(kind=DiskFaultKind.FULL, writes=2, after_writes=1))
        # However late the writes come, the 2nd and 3rd block writes fail.
        await trio.sleep(0.3)
        for i in range(5):
            await w.save(make_save(i, elements=64))
        stats = await w.call(SsdFlush())
        assert (stats.saves_persisted, stats.write_errors, stats.files) == (3, 2, 3)
        assert set(block_files(tmp_path)) == {block_hash(0), block_hash(3), block_hash(4)}
        assert temp_files(tmp_path) == []
        assert balanced(stats)
        assert (await w.call(SsdLoad(hash=block_hash(3)))).reason is LoadReason.DISK


async def test_faults_sent_together_each_count_from_their_arrival(tmp_path):
    async with running_writer(tmp_path) as (w, _):
        await w.call(InjectDiskFault(kind=DiskFaultKind.STALL, writes=1, stall_s=0.05))
        await w.call(InjectDiskFault(kind=DiskFaultKind.FULL, writes=2, after_writes=1))
        # Overlapping the stall's write, a later fault waits for the one sent first.
        await w.call(InjectDiskFault(kind=DiskFaultKind.FULL, writes=1))
        for i in range(4):
            await w.save(make_save(i, elements=64))
        stats = await w.call(SsdFlush())
        # Write 1 stalled then succeeded, writes 2 and 3 failed, write 4 succeeded.
        assert (stats.saves_persisted, stats.write_errors) == (2, 2)
        assert set(block_files(tmp_path)) == {block_hash(0), block_hash(3)}
        assert balanced(stats)
