"""A process that saves blocks as fast as it can until it is killed (SIGKILL), for
`test_writer_faults.py`. Usage: python _child_writer.py DIRECTORY BUDGET_BYTES [STALL_AT].

It prints "ready" once its writer has started; cleanups and evictions run meanwhile too.
With STALL_AT, its STALL_AT-th write call writes half its buffer, prints "stalled" and
hangs, so a kill lands mid-write for certain.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omlx_actors.ssd import writer  # noqa: E402
from omlx_actors.ssd.block_directory import DiskIO  # noqa: E402
from omlx_actors.ssd.writer import SsdCleanupRequest, SsdStatsQuery  # noqa: E402
from ssd.helpers import KILL_TEST_ELEMENTS, Disk, config, make_save  # noqa: E402

SAVES = 5000


def stalling_write(stall_at: int):
    calls = 0

    def write(fd: int, data: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == stall_at:
            os.write(fd, data[: len(data) // 2])
            print("stalled", flush=True)
            time.sleep(3600)
        return os.write(fd, data)

    return write


async def main(root: Path, budget: int, stall_at: int) -> None:
    address, control, saves = writer.open_writer_inboxes()
    io = Disk().io
    if stall_at:
        io = DiskIO(write=stalling_write(stall_at), disk_usage=io.disk_usage)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run, control, saves, config(root, budget), io)
        print("ready", flush=True)
        for i in range(SAVES):
            await address.save(make_save(i, f"s{i % 3}", elements=KILL_TEST_ELEMENTS))
            if i % 8 == 7:
                await address.call(SsdStatsQuery())  # keep pace with the writer
            if i % 50 == 49:
                await address.call(SsdCleanupRequest(scope="s0"))
        print("done", flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if sys.argv[3:] else 0)
