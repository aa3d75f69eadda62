"""The block directory's file operations: block files written crash-safe, the start-up
scan, removal. What a file holds and how one is read back is `blockfile`'s.

Writes are crash-safe: a temp file in the block's own directory is written, fsynced,
renamed over the final name, then the directory is fsynced. Only then is a block
*persisted*. A batch (`write_blocks`) does each step for all its blocks before the next,
so each directory is fsynced once per batch. Whatever dies part way leaves at most temp
files (`TEMP_SUFFIX`), which `scan_directory` removes at the next start. The size
`write_block` returns is the file's real size (`fstat` after the last write), so budget
accounting never estimates.

Pure I/O: no trio, no MLX, blocking calls. The writer actor runs each call on a worker
thread, one at a time. `DiskIO` is the seam where tests make the write call fail
(ENOSPC, EIO), stall, or report another disk's free space.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs

from .blockfile import (
    BLOCK_SUFFIX,
    TEMP_SUFFIX,
    BlockHeader,
    BlockIdentity,
    BlockRecord,
    CorruptBlock,
    ForeignBlock,
    block_path,
    encode_block,
    is_block_hash,
    read_header,
)

__all__ = [
    "DiskIO",
    "DiskUsage",
    "ScanResult",
    "remove_files",
    "scan_directory",
    "write_block",
    "write_blocks",
]

_SUBDIR_RE = re.compile("[0-9a-f]{2}")


class DiskUsage(NamedTuple):
    """As `shutil.disk_usage` reports it."""

    total: int
    used: int
    free: int


def _write_all(fd: int, data: memoryview) -> int:
    return os.write(fd, data)


@attrs.frozen
class DiskIO:
    """The calls where block files meet the disk, replaceable by tests.

    `write(fd, buffer) -> int` writes some prefix of `buffer` (like `os.write`);
    `fsync(fd)`; `disk_usage(path) -> DiskUsage`. All run on the writer's worker thread.
    """

    write: Callable[[int, memoryview], int] = _write_all
    fsync: Callable[[int], None] = os.fsync
    disk_usage: Callable[[str], Any] = shutil.disk_usage


# ---------------------------------------------------------------------------------------
# Write


def _fsync_dir(path: Path, io: DiskIO) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        io.fsync(fd)
    finally:
        os.close(fd)


def write_block(
    root: str | os.PathLike[str],
    identity: BlockIdentity,
    record: BlockRecord,
    io: DiskIO = DiskIO(),
) -> int:
    """Write `record` as its block file under `root`, atomically; return the file's size.

    A batch of one (see `write_blocks`): temp file (same directory) → write → fsync →
    close → rename over the final name → fsync of the directory. On return the block is
    durable. On any error the temp file is removed, and if the error came after the rename
    (the directory fsync) the final file is removed too - it was never known durable -
    then the error is raised. An existing file of the same hash is replaced only by the
    rename, so a failed rewrite before it leaves the old file whole.
    """
    [result] = write_blocks(root, identity, [(record, io)])
    if isinstance(result, OSError):
        raise result
    return result


@attrs.define
class _Job:
    """One block of a batch on its way to disk."""

    record: BlockRecord
    io: DiskIO
    final: Path
    temp: Path | None = None
    fd: int | None = None
    expected: int = 0
    size: int = 0
    renamed: bool = False
    error: OSError | None = None


def write_blocks(
    root: str | os.PathLike[str],
    identity: BlockIdentity,
    batch: Sequence[tuple[BlockRecord, DiskIO]],
) -> list[int | OSError]:
    """Write each record of `batch` as its block file under `root`, each atomically, through
    its own `DiskIO`; return, in order, each file's size or the OSError that failed it.

    Order: every temp file is written (in its block's directory); then each is fsynced and
    closed; then each is renamed over its final name; then every directory that received a
    file is fsynced once (and `root` once, first, if a subdirectory was created). A block
    is durable - and gets its size - only after its directory's fsync. A failure fails its
    own block (its temp file removed), except a failed directory fsync, which fails every
    block renamed into that directory (their files are removed: never known durable). An
    existing file of the same hash is replaced only by the rename, so a failed rewrite
    leaves the old file whole unless its directory's fsync failed.

    Against writing the blocks one at a time: the same file fsyncs, one directory fsync
    per directory instead of one per block, and the disk has the whole batch's data
    before the first fsync waits. Interrupted (any other exception), every temp file and
    every renamed file not yet durable is removed and the exception propagates.
    """
    root = Path(root)
    jobs = [_Job(record=record, io=io, final=block_path(root, record.hash)) for record, io in batch]
    try:
        created = [job for job in jobs if _create_directory(job)]
        for job in jobs:
            if job.error is None:
                _fail_on_oserror(job, _write_temp, job, identity)
        if created:
            # The new subdirectories' entries must be durable too.
            error = _fsync_quietly(root, created[0].io)
            for job in created:
                if error is not None and job.error is None:
                    job.error = error
        for job in jobs:
            if job.error is None:
                _fail_on_oserror(job, _sync_temp, job)
        for job in jobs:
            if job.error is None:
                _fail_on_oserror(job, _rename, job)
        by_directory: dict[Path, list[_Job]] = {}
        for job in jobs:
            if job.renamed and job.error is None:
                by_directory.setdefault(job.final.parent, []).append(job)
        for directory, members in by_directory.items():
            error = _fsync_quietly(directory, members[0].io)
            if error is not None:
                for job in members:
                    job.error = error
    except BaseException:
        for job in jobs:
            _discard(job, renamed_too=True)
        raise
    for job in jobs:
        if job.error is not None:
            _discard(job, renamed_too=True)
    return [job.error if job.error is not None else job.size for job in jobs]


def _fail_on_oserror(job: _Job, step: Callable[..., None], *args: Any) -> None:
    try:
        step(*args)
    except OSError as error:
        job.error = error
        _discard(job, renamed_too=False)


def _create_directory(job: _Job) -> bool:
    """Create the block's directory if missing; True if this call created it."""
    directory = job.final.parent
    if directory.is_dir():
        return False
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        return False  # an earlier block of the batch made it
    except OSError as error:
        job.error = error
        return False
    return True


def _write_temp(job: _Job, identity: BlockIdentity) -> None:
    record = job.record
    header, ordered = encode_block(identity, record)
    job.expected = len(header) + sum(t.nbytes for t in ordered)
    job.temp = job.final.parent / f".{record.hash}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    job.fd = os.open(job.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for chunk in (header, *(t.data for t in ordered)):
        view = memoryview(chunk)
        while view:
            written = job.io.write(job.fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "write returned no progress", str(job.temp))
            view = view[written:]


def _sync_temp(job: _Job) -> None:
    assert job.fd is not None
    job.io.fsync(job.fd)
    job.size = os.fstat(job.fd).st_size
    fd, job.fd = job.fd, None
    os.close(fd)
    if job.size != job.expected:
        raise OSError(errno.EIO, f"wrote {job.size} bytes, planned {job.expected}", str(job.temp))


def _rename(job: _Job) -> None:
    assert job.temp is not None
    os.replace(job.temp, job.final)
    job.renamed = True


def _fsync_quietly(directory: Path, io: DiskIO) -> OSError | None:
    try:
        _fsync_dir(directory, io)
    except OSError as error:
        return error
    return None


def _discard(job: _Job, *, renamed_too: bool) -> None:
    """Close and remove what `job` left: its temp file, and with `renamed_too` its renamed
    (never known durable) final file."""
    if job.fd is not None:
        fd, job.fd = job.fd, None
        try:
            os.close(fd)
        except OSError:
            pass  # the descriptor is gone either way
    if job.renamed:
        if renamed_too:
            _unlink_quietly(job.final)
            job.renamed = False
    elif job.temp is not None:
        _unlink_quietly(job.temp)
        job.temp = None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # already gone, or the disk is failing; a restart's scan retries


# ---------------------------------------------------------------------------------------
# Directory


@attrs.frozen(kw_only=True)
class ScanResult:
    """What a start-up scan of a block directory found.

    `blocks`: valid headers of this identity with their mtimes, least recently modified
    first. Foreign files were left alone; corrupt files and leftover temp files were
    removed (those that could not be are counted in `unremovable`).
    """

    blocks: tuple[tuple[BlockHeader, float], ...]
    foreign: int
    corrupt_removed: int
    temps_removed: int
    unremovable: int


def scan_directory(root: str | os.PathLike[str], identity: BlockIdentity) -> ScanResult:
    """Index the block directory `root` (created if missing) for `identity`.

    Reads only headers (one small read per file): the checksum of each block is checked
    when it is loaded, so a start does not read the whole directory. Any file that is not
    a block file name (`<2 hex>/<hash>.safetensors`) or a temp file is ignored.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    found: list[tuple[BlockHeader, float]] = []
    foreign = corrupt = temps = unremovable = 0

    def remove(path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    for subdir in sorted(root.iterdir()):
        if not _SUBDIR_RE.fullmatch(subdir.name) or not subdir.is_dir():
            continue
        for path in sorted(subdir.iterdir()):
            name = path.name
            if name.endswith(TEMP_SUFFIX):
                if remove(path):
                    temps += 1
                else:
                    unremovable += 1
                continue
            stem = name[: -len(BLOCK_SUFFIX)] if name.endswith(BLOCK_SUFFIX) else ""
            if not is_block_hash(stem) or stem[:2] != subdir.name:
                continue
            try:
                header = read_header(path, identity, stem)
                mtime = path.stat().st_mtime
            except ForeignBlock:
                foreign += 1
                continue
            except (CorruptBlock, OSError):
                if remove(path):
                    corrupt += 1
                else:
                    unremovable += 1
                continue
            found.append((header, mtime))
    found.sort(key=lambda item: (item[1], item[0].hash))
    return ScanResult(
        blocks=tuple(found),
        foreign=foreign,
        corrupt_removed=corrupt,
        temps_removed=temps,
        unremovable=unremovable,
    )


def remove_files(paths: Sequence[Path]) -> list[OSError | None]:
    """Unlink each of `paths`; the error of each (None: removed or already gone)."""
    results: list[OSError | None] = []
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            results.append(None)
        except OSError as error:
            results.append(error)
        else:
            results.append(None)
    return results
