"""Shared parts of the SSD tier tests: blocks with known contents, a disk whose free
space and write calls the test controls, and a writer started on a real directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import trio

from omlx_actors.cache.blocks import cache_namespace
from omlx_actors.kernel import ActorUnavailable
from omlx_actors.ssd import writer
from omlx_actors.ssd.block_directory import DiskIO, DiskUsage
from omlx_actors.ssd.blockfile import (
    BLOCK_SUFFIX,
    TEMP_SUFFIX,
    BlockIdentity,
    BlockRecord,
    TensorData,
    planned_size,
)
from omlx_actors.ssd.writer import Save, SsdShutdown, WriterAddress, WriterConfig

LAYOUT = ("KVCache", "ArraysCache")
BLOCK_SIZE = 16
IDENTITY = BlockIdentity(
    namespace=cache_namespace("tiny-test-model", LAYOUT, BLOCK_SIZE),
    layout=LAYOUT,
    block_size=BLOCK_SIZE,
)
OTHER_IDENTITY = BlockIdentity(
    namespace=cache_namespace("another-model", LAYOUT, BLOCK_SIZE),
    layout=LAYOUT,
    block_size=BLOCK_SIZE,
)
ROOMY = 1 << 40  # a budget and a disk nothing in these tests can fill
# Elements per KV row in the kill and full-disk tests: ~128 kB blocks, so writes take long
# enough for a kill to land inside one.
KILL_TEST_ELEMENTS = 16384


def block_hash(i: int) -> str:
    return hashlib.sha256(f"block-{i}".encode()).hexdigest()[:32]


def tensors(i: int, elements: int | None = None) -> tuple[TensorData, ...]:
    """Block i's tensors: a KV pair and a recurrent-state snapshot, contents fixed by i."""
    n = elements if elements is not None else 8 + (i * 37) % 120
    rng = np.random.default_rng(i)
    k = rng.standard_normal((2, n)).astype(np.float16)
    v = rng.standard_normal((2, n)).astype(np.float16)
    s = rng.standard_normal((3,)).astype(np.float32)
    return (
        TensorData.from_array("l0.k", k),
        TensorData.from_array("l0.v", v),
        TensorData.from_array("l1.s0", s),
    )


def make_save(i: int, scope: str = "", *, elements: int | None = None) -> Save:
    parent = block_hash(i - 1) if i > 0 else None
    return Save(
        hash=block_hash(i),
        parent=parent,
        scope=scope,
        tokens=BLOCK_SIZE,
        tensors=tensors(i, elements),
    )


def file_size(save: Save, identity: BlockIdentity = IDENTITY) -> int:
    record = BlockRecord(
        hash=save.hash,
        parent=save.parent,
        scope=save.scope,
        tokens=save.tokens,
        tensors=save.tensors,
    )
    return planned_size(identity, record)


def block_files(root: Path) -> dict[str, int]:
    """Block files under `root` (hash -> real size). A file removed while listing (a
    running writer evicting it) is left out."""
    found = {}
    for path in Path(root).glob(f"??/*{BLOCK_SUFFIX}"):
        try:
            found[path.name[: -len(BLOCK_SUFFIX)]] = path.stat().st_size
        except FileNotFoundError:
            continue
    return found


def temp_files(root: Path) -> list[Path]:
    return list(Path(root).glob(f"??/*{TEMP_SUFFIX}"))


def balanced(stats: writer.WriterStats) -> bool:
    """The counter identity of the writer module's docstring."""
    return stats.saves_enqueued == (
        stats.saves_persisted
        + stats.saves_duplicate
        + stats.saves_cancelled
        + stats.saves_skipped
        + stats.write_errors
        + stats.pending
    )


class Disk:
    """The boundary where the writer meets the disk, under the test's control.

    `errors`: errnos the next write calls raise, one each. `gate`: when set up with
    `stall()`, every write call waits for it (on the writer's worker thread). `free`:
    the free space reported (None: the real disk's). Counts fsync and disk-usage calls.
    """

    def __init__(self, free: int | None = ROOMY, total: int = ROOMY) -> None:
        self.errors: deque[int] = deque()
        self.error_at_call = 1  # which write call of a file fails (1: the first)
        self.free = free
        self.total = total
        self.gate: threading.Event | None = None
        self.write_started = threading.Event()
        self.usage_calls = 0
        self.fsyncs = 0
        self._calls_this_file = 0
        self.io = DiskIO(write=self._write, fsync=self._fsync, disk_usage=self._usage)

    def stall(self) -> threading.Event:
        self.gate = threading.Event()
        return self.gate

    def _write(self, fd: int, data: memoryview) -> int:
        self.write_started.set()
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise OSError(errno.ETIMEDOUT, "test gate never opened")
        self._calls_this_file += 1
        if self.errors and self._calls_this_file >= self.error_at_call:
            self._calls_this_file = 0
            code = self.errors.popleft()
            raise OSError(code, os.strerror(code))
        return os.write(fd, data)

    def _fsync(self, fd: int) -> None:
        self.fsyncs += 1
        os.fsync(fd)

    def _usage(self, path: str) -> DiskUsage:
        self.usage_calls += 1
        if self.free is None:
            real = shutil.disk_usage(path)
            return DiskUsage(real.total, real.used, real.free)
        return DiskUsage(self.total, self.total - self.free, self.free)


def config(
    root: Path,
    budget: int = ROOMY,
    identity: BlockIdentity = IDENTITY,
    min_free_bytes: int = 0,
    min_free_fraction: float = 0.0,
) -> WriterConfig:
    return WriterConfig(
        directory=str(root),
        identity=identity,
        budget_bytes=budget,
        min_free_bytes=min_free_bytes,
        min_free_fraction=min_free_fraction,
    )


@contextlib.asynccontextmanager
async def running_writer(
    root: Path,
    *,
    disk: Disk | None = None,
    budget: int = ROOMY,
    identity: BlockIdentity = IDENTITY,
    **options: object,
) -> AsyncIterator[tuple[WriterAddress, writer.WriterStats]]:
    """A writer serving `root`, and its readiness stats. Shut down (no flush) on exit."""
    disk = disk if disk is not None else Disk()
    address, control, saves = writer.open_writer_inboxes()
    settings = config(root, budget, identity, **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(writer.run, control, saves, settings, disk.io)
        yield address, ready
        if disk.gate is not None:
            disk.gate.set()
        with contextlib.suppress(ActorUnavailable):
            await address.call(SsdShutdown(flush=False))


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, size: str):
    """A real tmpfs of `size` (mount's syntax: "1m") for a test, unmounted after it; the
    test is skipped where mounting is not permitted (not root, or no mount in a sandbox)."""
    import pytest

    mount_point = tmp_path / f"tmpfs-{size}"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
