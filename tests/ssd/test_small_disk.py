"""The SSD tier on a small disk (issue #15 item 11): the free-space reserve scales to the
disk, the writer says the budget it will really use when it starts, and a failure that
repeats is logged once per interval with a count, not once per save."""

from __future__ import annotations

import logging

import pytest
import trio

from omlx_actors.ssd import writer
from omlx_actors.ssd.lograte import RepeatedLog
from omlx_actors.ssd.writer import (
    MIN_FREE_BYTES,
    MIN_FREE_FRACTION,
    DiskFaultKind,
    SsdFlush,
    InjectDiskFault,
)

from .helpers import mounted_tmpfs, KILL_TEST_ELEMENTS, Disk, balanced, block_files, make_save, running_writer

MB = 1 << 20
DEFAULT_RESERVE = {"min_free_bytes": MIN_FREE_BYTES, "min_free_fraction": MIN_FREE_FRACTION}


def budget_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "SSD cache budget" in r.getMessage()]


async def test_a_2_mb_disk_gets_three_quarters_of_it_and_the_writer_says_so(tmp_path, caplog):
    """Regression: the fixed 1 GiB reserve left a 2 MB disk a budget of 0, every save was
    skipped, and nothing said why at start."""
    caplog.set_level(logging.INFO, logger=writer.__name__)
    disk = Disk(free=2 * MB, total=2 * MB)
    async with running_writer(tmp_path, disk=disk, **DEFAULT_RESERVE) as (w, ready):
        assert ready.effective_budget_bytes == 3 * MB // 2
        for i in range(4):
            await w.save(make_save(i, elements=4096))  # ~32 kB each
        stats = await w.call(SsdFlush())
        assert (stats.saves_persisted, stats.saves_skipped, stats.files) == (4, 0, 4)
    [line] = budget_lines(caplog)
    assert line.levelno == logging.WARNING  # the disk cut the configured budget
    assert line.getMessage().endswith(
        f"SSD cache budget {3 * MB // 2} bytes (configured {1 << 40}; the disk has "
        f"{2 * MB} of {2 * MB} bytes free and keeps {MB // 2} free)"
    )


async def test_a_roomy_disk_states_its_budget_quietly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=writer.__name__)
    async with running_writer(tmp_path, budget=64 * MB, **DEFAULT_RESERVE) as (_, ready):
        assert ready.effective_budget_bytes == 64 * MB
    [line] = budget_lines(caplog)
    assert line.levelno == logging.INFO and "SSD cache budget 67108864 bytes" in line.getMessage()


async def test_a_disk_with_no_room_says_no_block_can_be_saved(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=writer.__name__)
    disk = Disk(free=0, total=2 * MB)
    async with running_writer(tmp_path, disk=disk, **DEFAULT_RESERVE) as (_, ready):
        assert ready.effective_budget_bytes == 0
    [line] = budget_lines(caplog)
    assert line.levelno == logging.WARNING
    assert line.getMessage().endswith("; no block can be saved")


async def test_repeated_skips_are_logged_once_per_interval_with_a_count(
    tmp_path, caplog, monkeypatch
):
    """Regression: each skipped save logged its own warning (343 lines in one run)."""
    monkeypatch.setattr(writer, "REPEAT_LOG_INTERVAL_S", 1.0)
    caplog.set_level(logging.WARNING, logger=writer.__name__)
    disk = Disk(free=0, total=2 * MB)
    async with running_writer(tmp_path, disk=disk, **DEFAULT_RESERVE) as (w, _):
        for i in range(40):
            await w.save(make_save(i, elements=64))
        stats = await w.call(SsdFlush())
        assert stats.saves_skipped == 40 and balanced(stats)
        await trio.sleep(1.1)
        await w.save(make_save(40, elements=64))
        stats = await w.call(SsdFlush())
    skips = [r.getMessage() for r in caplog.records if "skipped block" in r.getMessage()]
    # The first, then one per interval (40 tiny skips take well under a second, so
    # usually just one more, after the sleep), each counting those not logged before it.
    assert 2 <= len(skips) <= 5, skips
    assert skips[0].endswith("1 skipped so far, 0 of them not logged")
    assert skips[-1].startswith("ssd-writer: skipped block ") and "41 skipped so far" in skips[-1]
    unlogged = [int(line.rsplit(", ", 1)[1].split()[0]) for line in skips]
    assert len(skips) + sum(unlogged) == 41


async def test_repeated_write_errors_are_logged_once_per_interval(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger=writer.__name__)
    async with running_writer(tmp_path) as (w, _):
        await w.call(InjectDiskFault(kind=DiskFaultKind.FULL, writes=30))
        for i in range(30):
            await w.save(make_save(i, elements=64))
        stats = await w.call(SsdFlush())
    assert stats.write_errors == 30
    errors = [r.getMessage() for r in caplog.records if "failed (ENOSPC)" in r.getMessage()]
    assert len(errors) == 1 and errors[0].endswith("1 write errors so far, 0 of them not logged")


def test_a_repeated_log_logs_the_first_then_one_per_interval_with_the_count():
    log = RepeatedLog(10.0)
    assert [log.occurred(t) for t in (0.0, 1.0, 9.9, 10.0, 12.0, 25.0)] == [
        0, None, None, 2, None, 1,
    ]


@pytest.fixture
def tmpfs_2mb(tmp_path):
    """A real 2 MB tmpfs, mounted for the test."""
    with mounted_tmpfs(tmp_path, "2m") as mount_point:
        yield mount_point


async def test_a_real_2_mb_tmpfs_holds_blocks_with_the_default_reserve(tmpfs_2mb):
    """The case of the issue, on a real file system: it wrote nothing before."""
    saves = [make_save(i, elements=KILL_TEST_ELEMENTS) for i in range(8)]  # ~128 kB each
    async with running_writer(tmpfs_2mb, disk=Disk(free=None), **DEFAULT_RESERVE) as (w, ready):
        assert MB < ready.effective_budget_bytes <= 3 * MB // 2
        for save in saves:
            await w.save(save)
        stats = await w.call(SsdFlush())
        assert (stats.saves_persisted, stats.saves_skipped, stats.write_errors) == (8, 0, 0)
        assert len(block_files(tmpfs_2mb)) == 8 and balanced(stats)
