"""Block files: safetensors on disk, exact sizes, atomic writes, typed errors on read."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from omlx_actors.ssd import block_directory
from omlx_actors.ssd.block_directory import DiskIO, scan_directory, write_block
from omlx_actors.ssd.blockfile import (
    FORMAT_VERSION,
    BlockIdentity,
    BlockRecord,
    CorruptBlock,
    ForeignBlock,
    TensorData,
    block_path,
    planned_size,
    read_block,
    read_header,
)

from .helpers import IDENTITY, OTHER_IDENTITY, block_hash, temp_files, tensors


def record(i: int = 1, scope: str = "req-1", parent: str | None = None) -> BlockRecord:
    return BlockRecord(
        hash=block_hash(i), parent=parent, scope=scope, tokens=16, tensors=tensors(i)
    )


def written(tmp_path, rec: BlockRecord | None = None, identity=IDENTITY):
    rec = rec or record()
    size = write_block(tmp_path, identity, rec)
    return block_path(tmp_path, rec.hash), size


def test_block_path_is_two_level_by_hash_prefix(tmp_path):
    h = block_hash(3)
    assert block_path(tmp_path, h) == tmp_path / h[:2] / f"{h}.safetensors"
    with pytest.raises(ValueError, match="not a block hash"):
        block_path(tmp_path, "../../etc/passwd")


def test_write_returns_the_real_file_size_which_planned_size_predicts(tmp_path):
    rec = record()
    path, size = written(tmp_path, rec)
    assert size == os.path.getsize(path) == planned_size(IDENTITY, rec)
    assert temp_files(tmp_path) == []


def test_a_block_file_is_plain_safetensors_with_our_metadata(tmp_path):
    rec = record(parent=block_hash(0))
    path, _ = written(tmp_path, rec)
    arrays = load_file(path)
    assert sorted(arrays) == ["l0.k", "l0.v", "l1.s0"]
    for tensor in rec.tensors:
        np.testing.assert_array_equal(arrays[tensor.name], tensor.to_array())
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT_VERSION
    assert meta["namespace"] == IDENTITY.namespace
    assert json.loads(meta["layout"]) == list(IDENTITY.layout)
    assert meta["block_size"] == "16"
    assert meta["hash"] == rec.hash
    assert meta["parent"] == block_hash(0)
    assert meta["scope"] == "req-1"
    assert meta["tokens"] == "16"
    assert len(meta["checksum"]) == 32


def test_read_block_returns_what_was_written(tmp_path):
    rec = record(parent=block_hash(0))
    path, size = written(tmp_path, rec)
    header, back = read_block(path, IDENTITY, rec.hash)
    assert back == rec
    assert header.size == size
    assert read_header(path, IDENTITY, rec.hash) == header


def test_bfloat16_travels_as_its_bits(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x7F80], dtype=np.uint16)  # 1.0, -2.0, inf
    tensor = TensorData.from_array("l0.k", bits, dtype="bfloat16")
    rec = BlockRecord(hash=block_hash(1), parent=None, scope="", tokens=16, tensors=(tensor,))
    path, _ = written(tmp_path, rec)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["l0.k"]["dtype"] == "BF16"
    _, back = read_block(path, IDENTITY, rec.hash)
    assert back.tensors[0].dtype == "bfloat16"
    np.testing.assert_array_equal(back.tensors[0].to_array(), bits)


def test_tensor_data_checks_its_size_and_dtype():
    with pytest.raises(ValueError, match="3 bytes for float16"):
        TensorData(name="x", dtype="float16", shape=(2,), data=b"abc")
    with pytest.raises(ValueError, match="unknown dtype 'complex64'"):
        TensorData(name="x", dtype="complex64", shape=(1,), data=b"12345678")
    with pytest.raises(ValueError, match="cannot be recorded as bfloat16"):
        TensorData.from_array("x", np.zeros(2, np.float32), dtype="bfloat16")


def test_big_endian_arrays_are_stored_little_endian(tmp_path):
    array = np.arange(4, dtype=">i4")
    tensor = TensorData.from_array("x", array)
    assert tensor.data == np.arange(4, dtype="<i4").tobytes()
    np.testing.assert_array_equal(tensor.to_array(), array)


@pytest.mark.parametrize(
    "damage",
    ["flip_data", "flip_header_digit", "truncate", "append", "garbage_header", "empty"],
)
def test_damaged_files_are_corrupt(tmp_path, damage):
    path, size = written(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "flip_data":
        raw[-5] ^= 0x40
    elif damage == "flip_header_digit":
        # tokens "16" -> "17": parses fine, only the checksum catches it
        raw = bytearray(bytes(raw).replace(b'"tokens":"16"', b'"tokens":"17"'))
    elif damage == "truncate":
        raw = raw[: size - 3]
    elif damage == "append":
        raw += b"\0"
    elif damage == "garbage_header":
        raw[10:20] = b"\xff" * 10
    elif damage == "empty":
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlock):
        read_block(path, IDENTITY, block_hash(1))


def test_a_file_renamed_to_another_hash_is_corrupt(tmp_path):
    path, _ = written(tmp_path)
    other = block_path(tmp_path, block_hash(2))
    other.parent.mkdir(parents=True, exist_ok=True)
    path.rename(other)
    with pytest.raises(CorruptBlock, match="names block"):
        read_block(other, IDENTITY, block_hash(2))


def test_files_of_another_identity_or_version_are_foreign(tmp_path):
    path, _ = written(tmp_path, identity=OTHER_IDENTITY)
    with pytest.raises(ForeignBlock):
        read_block(path, IDENTITY, block_hash(1))
    relaid = BlockIdentity(namespace=IDENTITY.namespace, layout=("KVCache",), block_size=16)
    path2, _ = written(tmp_path, record(2), identity=IDENTITY)
    with pytest.raises(ForeignBlock):
        read_header(path2, relaid, block_hash(2))
    raw = path2.read_bytes().replace(FORMAT_VERSION.encode(), b"omlx-ssd-block-v0")
    path2.write_bytes(raw)
    with pytest.raises(ForeignBlock, match="omlx-ssd-block-v0"):
        read_block(path2, IDENTITY, block_hash(2))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("at_call", [1, 3])
def test_a_failed_write_call_leaves_no_file(tmp_path, code, at_call):
    calls = []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == at_call:
            raise OSError(code, os.strerror(code))
        return os.write(fd, data)

    with pytest.raises(OSError) as raised:
        write_block(tmp_path, IDENTITY, record(), DiskIO(write=failing_write))
    assert raised.value.errno == code
    assert list(tmp_path.rglob("*.*")) == []


def test_partial_writes_are_continued(tmp_path):
    def dribble(fd, data):
        return os.write(fd, data[:7])

    rec = record()
    size = write_block(tmp_path, IDENTITY, rec, DiskIO(write=dribble))
    assert read_block(block_path(tmp_path, rec.hash), IDENTITY, rec.hash)[1] == rec
    assert size == planned_size(IDENTITY, rec)


def test_a_failed_directory_fsync_removes_the_renamed_file(tmp_path):
    rec = record()
    write_block(tmp_path, IDENTITY, rec)  # the subdirectory exists now
    fsyncs = []

    def fsync(fd):
        fsyncs.append(fd)
        if len(fsyncs) == 2:  # the file's, then the directory's
            raise OSError(errno.EIO, "dir fsync failed")
        os.fsync(fd)

    with pytest.raises(OSError):
        write_block(tmp_path, IDENTITY, rec, DiskIO(fsync=fsync))
    assert list(tmp_path.rglob("*.*")) == []


def test_a_failed_rewrite_before_the_rename_keeps_the_old_file(tmp_path):
    rec = record()
    path, _ = written(tmp_path, rec)

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "full")

    rescoped = BlockRecord(
        hash=rec.hash, parent=rec.parent, scope="req-2", tokens=rec.tokens, tensors=rec.tensors
    )
    with pytest.raises(OSError):
        write_block(tmp_path, IDENTITY, rescoped, DiskIO(write=enospc))
    assert read_block(path, IDENTITY, rec.hash)[1] == rec
    assert temp_files(tmp_path) == []


def test_scan_indexes_headers_skips_foreign_removes_corrupt_and_temps(tmp_path):
    good, good_size = written(tmp_path, record(1))
    foreign, _ = written(tmp_path, record(2), identity=OTHER_IDENTITY)
    corrupt, _ = written(tmp_path, record(3))
    corrupt.write_bytes(corrupt.read_bytes()[:-1])
    leftover = good.parent / f".{block_hash(1)}.abcd1234.tmp"
    leftover.write_bytes(b"half a block")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")
    os.utime(good, (1000, 1000))

    scan = scan_directory(tmp_path, IDENTITY)

    assert [(h.hash, h.size, mtime) for h, mtime in scan.blocks] == [
        (block_hash(1), good_size, 1000)
    ]
    assert (scan.foreign, scan.corrupt_removed, scan.temps_removed, scan.unremovable) == (
        1,
        1,
        1,
        0,
    )
    assert foreign.exists() and unrelated.exists()
    assert not corrupt.exists() and not leftover.exists()


def test_scan_orders_blocks_by_mtime(tmp_path):
    for i, mtime in ((1, 300), (2, 100), (3, 200)):
        path, _ = written(tmp_path, record(i))
        os.utime(path, (mtime, mtime))
    scan = scan_directory(tmp_path, IDENTITY)
    assert [h.hash for h, _ in scan.blocks] == [block_hash(2), block_hash(3), block_hash(1)]


def test_scan_creates_a_missing_directory(tmp_path):
    root = tmp_path / "a" / "b"
    assert scan_directory(root, IDENTITY).blocks == ()
    assert root.is_dir()


def test_remove_files_reports_each_error(tmp_path):
    path, _ = written(tmp_path)
    missing = block_path(tmp_path, block_hash(9))
    results = block_directory.remove_files([path, missing, tmp_path])
    assert results[:2] == [None, None]
    assert isinstance(results[2], OSError)
    assert not path.exists()


def _in_two_directories(count: int) -> list[BlockRecord]:
    """`count` records whose hashes fall in two subdirectories, alternating."""
    return [
        BlockRecord(hash=("aa" if i % 2 else "bb") + block_hash(i)[2:], parent=None,
                    scope="", tokens=16, tensors=tensors(i))
        for i in range(count)
    ]


def _counting_io() -> tuple[DiskIO, list[int]]:
    fsyncs: list[int] = []

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        os.fsync(fd)

    return DiskIO(fsync=fsync), fsyncs


def test_a_batch_fsyncs_each_file_once_and_each_directory_once(tmp_path):
    """Issue #15 item 14: one at a time, 6 blocks in 2 new directories cost 6 file + 6
    directory + 2 parent fsyncs; as a batch, 6 + 2 + 1."""
    records = _in_two_directories(6)
    io, fsyncs = _counting_io()
    sizes = block_directory.write_blocks(tmp_path, IDENTITY, [(rec, io) for rec in records])
    assert len(fsyncs) == 6 + 2 + 1
    assert sizes == [planned_size(IDENTITY, rec) for rec in records]
    for rec in records:
        assert read_block(block_path(tmp_path, rec.hash), IDENTITY, rec.hash)[1] == rec
    assert temp_files(tmp_path) == []


def test_a_failed_write_in_a_batch_fails_only_its_block(tmp_path):
    records = _in_two_directories(4)
    healthy = DiskIO()

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "full")

    ios = [healthy, DiskIO(write=enospc), healthy, healthy]
    results = block_directory.write_blocks(tmp_path, IDENTITY, list(zip(records, ios, strict=True)))
    assert isinstance(results[1], OSError) and results[1].errno == errno.ENOSPC
    assert [r for i, r in enumerate(results) if i != 1] == [
        planned_size(IDENTITY, rec) for i, rec in enumerate(records) if i != 1
    ]
    assert not block_path(tmp_path, records[1].hash).exists()
    assert temp_files(tmp_path) == []


def test_a_failed_directory_fsync_fails_every_block_renamed_into_it(tmp_path):
    records = _in_two_directories(4)  # bb, aa, bb, aa
    block_directory.write_blocks(tmp_path, IDENTITY, [(records[0], DiskIO()), (records[1], DiskIO())])
    bb = os.stat(block_path(tmp_path, records[0].hash).parent)

    def fsync(fd):
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (bb.st_dev, bb.st_ino):
            raise OSError(errno.EIO, "dir fsync failed")
        os.fsync(fd)

    io = DiskIO(fsync=fsync)
    fresh = [BlockRecord(hash=rec.hash[:-1] + "f", parent=None, scope="", tokens=16,
                         tensors=rec.tensors) for rec in records]
    results = block_directory.write_blocks(tmp_path, IDENTITY, [(rec, io) for rec in fresh])
    assert [isinstance(r, OSError) for r in results] == [True, False, True, False]
    assert not block_path(tmp_path, fresh[0].hash).exists()
    assert not block_path(tmp_path, fresh[2].hash).exists()
    assert block_path(tmp_path, fresh[1].hash).exists()
    assert temp_files(tmp_path) == []
