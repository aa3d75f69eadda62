"""Disk faults injected at the writer's disk boundary (`InjectDiskFault`: tests and
scenarios; off unless sent). They strike block writes by count, never by a time window:
a window can pass with no write in it on a loaded machine (issue #15).

Pure bookkeeping plus a `DiskIO` wrapper: no trio. The writer actor owns a `DiskFaults`
and asks it, for every block write it starts, which disk that write goes to.
"""

from __future__ import annotations

import errno
import time

import attrs

from .block_directory import DiskIO
from .messages import DiskFaultKind, InjectDiskFault

__all__ = ["ArmedFault", "DiskFaults"]


@attrs.frozen
class ArmedFault:
    """An injected fault: it strikes block writes number `first`..`last` (1-based, counted
    over the writer's life), each as `kind` says."""

    kind: DiskFaultKind
    first: int
    last: int
    stall_s: float


class DiskFaults:
    """The faults armed on one writer, and the count of block writes they strike by."""

    def __init__(self) -> None:
        self.block_writes = 0  # block writes started so far
        self._armed: list[ArmedFault] = []  # in arrival order: the first sent strikes first

    def arm(self, fault: InjectDiskFault) -> ArmedFault:
        """Arm `fault`, counting from now (see `InjectDiskFault`)."""
        first = self.block_writes + fault.after_writes + 1
        armed = ArmedFault(fault.kind, first, first + fault.writes - 1, fault.stall_s)
        self._armed.append(armed)
        return armed

    def next_write(self, disk: DiskIO) -> DiskIO:
        """Count a block write; the disk it goes to: `disk`, or `disk` struck by the
        earliest armed fault that covers it."""
        self.block_writes += 1
        n = self.block_writes
        self._armed = [fault for fault in self._armed if fault.last >= n]
        for fault in self._armed:
            if fault.first <= n:
                return _struck(disk, fault)
        return disk


def _struck(disk: DiskIO, fault: ArmedFault) -> DiskIO:
    """`disk` for one struck block write: its first write call hangs for `fault.stall_s`
    and then goes on (STALL), or fails with ENOSPC (FULL). Runs on the writer's worker
    thread."""
    struck = False

    def write(fd: int, buffer: memoryview) -> int:
        nonlocal struck
        if not struck:
            struck = True
            if fault.kind is DiskFaultKind.FULL:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            time.sleep(fault.stall_s)  # a hung disk: the write returns after the stall
        return disk.write(fd, buffer)

    return DiskIO(write=write, fsync=disk.fsync, disk_usage=disk.disk_usage)
