"""Block files: one safetensors file per cached block, read back with every byte checked.

A block of hash `h` lives at `<root>/<h[:2]>/<h>.safetensors` (256 subdirectories keep
directories small). The file is plain safetensors - an 8-byte little-endian header length,
a JSON header, the tensor bytes - so any safetensors reader can open it; its
`__metadata__` names what the block is:

- `format`: `FORMAT_VERSION`; another value is another program's (or version's) file.
- `namespace`, `layout`, `block_size`: the `BlockIdentity` of the cache it belongs to
  (model identity, per-layer cache kinds, tokens per block). A file of another identity
  is *foreign*: it is never served and never deleted.
- `hash`, `parent`, `tokens`, `scope`: the block itself. `scope` is the owner a cleanup
  names (a request or session id; empty for shared blocks).
- `checksum`: blake2b-128 over the metadata above and each tensor's name, dtype, shape
  and bytes, in name order. A header bit flip, a truncated or torn data region, a
  renamed file: each fails either parsing or this checksum.

This module is the format: the values a file holds, their encoding (`encode_block`,
`planned_size`) and reading one file back (`read_header`, `read_block`). Writing files
crash-safe, the start-up scan and removal are `block_directory`'s.

Pure I/O: no trio, no MLX, blocking calls. The writer actor runs each call on a worker
thread, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np

from omlx_actors.cache.blocks import HASH_HEX_CHARS, BlockHash

__all__ = [
    "BLOCK_SUFFIX",
    "DTYPES",
    "FORMAT_VERSION",
    "TEMP_SUFFIX",
    "BlockFileError",
    "BlockHeader",
    "BlockIdentity",
    "BlockRecord",
    "CorruptBlock",
    "ForeignBlock",
    "TensorData",
    "block_path",
    "encode_block",
    "is_block_hash",
    "planned_size",
    "read_block",
    "read_header",
]

# Bumped whenever the file layout or the checksum recipe changes; files of any other
# version are foreign (kept for the program that wrote them, never served).
FORMAT_VERSION = "omlx-ssd-block-v1"
BLOCK_SUFFIX = ".safetensors"
# A dot prefix keeps temp files out of any glob for blocks; the suffix is what a restart
# looks for to remove leftovers of a write that died part way.
TEMP_SUFFIX = ".tmp"

# safetensors' own header limit: a larger length is corruption, not a header to read.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors pads the JSON header with spaces so the data starts 8-byte aligned.
_HEADER_ALIGN = 8
_LENGTH_BYTES = 8
_CHECKSUM_BYTES = 16
_HASH_RE = re.compile(f"[0-9a-f]{{{HASH_HEX_CHARS}}}")


class _DType(NamedTuple):
    code: str  # safetensors dtype code
    itemsize: int
    numpy: str  # the numpy dtype `TensorData.to_array` returns


# Tensor dtypes by name (numpy's names; `bfloat16` as MLX names it). Data is little-endian.
# numpy has no bfloat16: such tensors come back from `to_array` as their raw uint16 bits
# (MLX: `mx.array(bits).view(mx.bfloat16)`).
DTYPES: dict[str, _DType] = {
    "bool": _DType("BOOL", 1, "bool"),
    "uint8": _DType("U8", 1, "uint8"),
    "int8": _DType("I8", 1, "int8"),
    "uint16": _DType("U16", 2, "<u2"),
    "int16": _DType("I16", 2, "<i2"),
    "uint32": _DType("U32", 4, "<u4"),
    "int32": _DType("I32", 4, "<i4"),
    "uint64": _DType("U64", 8, "<u8"),
    "int64": _DType("I64", 8, "<i8"),
    "float16": _DType("F16", 2, "<f2"),
    "bfloat16": _DType("BF16", 2, "<u2"),
    "float32": _DType("F32", 4, "<f4"),
    "float64": _DType("F64", 8, "<f8"),
}
_BY_CODE = {dtype.code: name for name, dtype in DTYPES.items()}


def is_block_hash(value: object) -> bool:
    """True for a `BlockHash`: exactly `HASH_HEX_CHARS` lowercase hex characters (so it is
    safe to use as a file name)."""
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


class BlockFileError(Exception):
    """A block file cannot be served. `path` is the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class CorruptBlock(BlockFileError):
    """The file is ours but unreadable: bad header, wrong size, checksum mismatch, or
    metadata naming another block. It should be removed."""


class ForeignBlock(BlockFileError):
    """The file belongs to another format version or cache identity. Leave it alone."""


# ---------------------------------------------------------------------------------------
# Values


def _validate_tensor(instance: TensorData, _: Any, data: bytes) -> None:
    dtype = DTYPES.get(instance.dtype)
    if dtype is None:
        raise ValueError(f"tensor {instance.name!r}: unknown dtype {instance.dtype!r}")
    if any(not isinstance(d, int) or d < 0 for d in instance.shape):
        raise ValueError(f"tensor {instance.name!r}: bad shape {instance.shape!r}")
    expected = math.prod(instance.shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"tensor {instance.name!r}: {len(data)} bytes for {instance.dtype}"
            f"{list(instance.shape)} (expected {expected})"
        )


@attrs.frozen(kw_only=True)
class TensorData:
    """One tensor as plain data: little-endian bytes of `shape` elements of `dtype`.

    Plain data so a `Save` or `LoadResult` can cross the wire; `from_array`/`to_array`
    convert from and to numpy.
    """

    name: str = attrs.field(validator=attrs.validators.min_len(1))
    dtype: str
    shape: tuple[int, ...]
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>", validator=_validate_tensor)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, *, dtype: str | None = None) -> TensorData:
        """The tensor `array` (copied, little-endian, C order). `dtype` overrides the
        name to record, e.g. `"bfloat16"` for the uint16 bits of a bfloat16 array."""
        array = np.asarray(array)
        recorded = dtype if dtype is not None else array.dtype.name
        spec = DTYPES.get(recorded)
        if spec is None:
            raise ValueError(f"tensor {name!r}: unsupported dtype {recorded!r}")
        if array.dtype.itemsize != spec.itemsize:
            raise ValueError(
                f"tensor {name!r}: a {array.dtype} array cannot be recorded as {recorded}"
            )
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(name=name, dtype=recorded, shape=tuple(little.shape), data=little.tobytes())

    def to_array(self) -> np.ndarray:
        """A read-only numpy view of `data` (bfloat16 as its uint16 bits)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype].numpy).reshape(self.shape)


@attrs.frozen(kw_only=True)
class BlockIdentity:
    """The cache a block file belongs to: files of another identity are foreign.

    `namespace` is the cache namespace (`cache.blocks.cache_namespace`: model identity,
    layout and block size); `layout` and `block_size` are recorded separately too, so a
    file says what it holds without parsing the namespace.
    """

    namespace: str
    layout: tuple[str, ...]
    block_size: int = attrs.field(validator=attrs.validators.gt(0))


@attrs.frozen(kw_only=True)
class BlockRecord:
    """What a block file holds: the block's tensors and what it is."""

    hash: BlockHash
    parent: BlockHash | None
    scope: str
    tokens: int
    tensors: tuple[TensorData, ...]


@attrs.frozen(kw_only=True)
class BlockHeader:
    """What a block file says about itself, from its header alone."""

    hash: BlockHash
    parent: BlockHash | None
    scope: str
    tokens: int
    size: int  # the file's size in bytes


# ---------------------------------------------------------------------------------------
# Layout and header


def block_path(root: str | os.PathLike[str], block_hash: BlockHash) -> Path:
    """Where the block `block_hash` lives under `root`."""
    if not is_block_hash(block_hash):
        raise ValueError(f"not a block hash: {block_hash!r}")
    return Path(root) / block_hash[:2] / f"{block_hash}{BLOCK_SUFFIX}"


def _metadata(identity: BlockIdentity, record: BlockRecord) -> dict[str, str]:
    return {
        "format": FORMAT_VERSION,
        "namespace": identity.namespace,
        "layout": json.dumps(list(identity.layout), separators=(",", ":")),
        "block_size": str(identity.block_size),
        "hash": record.hash,
        "parent": record.parent or "",
        "tokens": str(record.tokens),
        "scope": record.scope,
    }


def _sorted_tensors(tensors: Iterable[TensorData]) -> list[TensorData]:
    ordered = sorted(tensors, key=lambda t: t.name)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.name == after.name:
            raise ValueError(f"two tensors are named {before.name!r}")
    return ordered


def _checksum(
    metadata: dict[str, str], specs: Sequence[tuple[str, str, Sequence[int]]], data: Sequence[Any]
) -> str:
    """blake2b-128 over the metadata (checksum excluded) and each tensor in name order."""
    digest = hashlib.blake2b(digest_size=_CHECKSUM_BYTES)
    covered = {key: value for key, value in metadata.items() if key != "checksum"}
    digest.update(json.dumps(covered, sort_keys=True, ensure_ascii=False).encode())
    for (name, dtype, shape), chunk in zip(specs, data, strict=True):
        digest.update(json.dumps([name, dtype, list(shape)], ensure_ascii=False).encode())
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def _header_bytes(metadata: dict[str, str], ordered: Sequence[TensorData]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for tensor in ordered:
        end = offset + tensor.nbytes
        header[tensor.name] = {
            "dtype": DTYPES[tensor.dtype].code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + _LENGTH_BYTES) % _HEADER_ALIGN)
    return len(text).to_bytes(_LENGTH_BYTES, "little") + text


def encode_block(identity: BlockIdentity, record: BlockRecord) -> tuple[bytes, list[TensorData]]:
    """The file of `record`: its header (length prefix and checksum included) and its
    tensors in file order; the file is the header, then each tensor's `data`. Raises
    ValueError if two tensors share a name."""
    ordered = _sorted_tensors(record.tensors)
    metadata = _metadata(identity, record)
    metadata["checksum"] = _checksum(
        metadata, [(t.name, t.dtype, t.shape) for t in ordered], [t.data for t in ordered]
    )
    return _header_bytes(metadata, ordered), ordered


def planned_size(identity: BlockIdentity, record: BlockRecord) -> int:
    """The exact size in bytes `block_directory.write_block` will give the file of `record`.

    The checksum is fixed-length hex, so the header's length does not depend on its value.
    """
    ordered = _sorted_tensors(record.tensors)
    metadata = _metadata(identity, record)
    metadata["checksum"] = "0" * (2 * _CHECKSUM_BYTES)
    return len(_header_bytes(metadata, ordered)) + sum(t.nbytes for t in ordered)


# ---------------------------------------------------------------------------------------
# Read


class _Parsed(NamedTuple):
    metadata: dict[str, str]
    specs: list[tuple[str, str, tuple[int, ...], int, int]]  # name, dtype, shape, begin, end
    data_start: int


def _parse_header(
    path: Path, raw_header: bytes, file_size: int, identity: BlockIdentity, expected: BlockHash
) -> _Parsed:
    """Validate a header read from `path`; raise ForeignBlock or CorruptBlock."""
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptBlock(path, f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CorruptBlock(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ForeignBlock(path, f"format {found!r}, not {FORMAT_VERSION!r}")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptBlock(path, "metadata values must be strings")
    layout = json.dumps(list(identity.layout), separators=(",", ":"))
    if (
        metadata.get("namespace") != identity.namespace
        or metadata.get("layout") != layout
        or metadata.get("block_size") != str(identity.block_size)
    ):
        raise ForeignBlock(path, f"namespace {metadata.get('namespace')!r}")
    if metadata.get("hash") != expected:
        raise CorruptBlock(path, f"metadata names block {metadata.get('hash')!r}")
    parent = metadata.get("parent")
    tokens = metadata.get("tokens", "")
    if (
        parent is None
        or (parent and not is_block_hash(parent))
        or not (tokens.isascii() and tokens.isdigit())
        or "scope" not in metadata
        or "checksum" not in metadata
    ):
        raise CorruptBlock(path, "metadata is incomplete")

    data_start = _LENGTH_BYTES + len(raw_header)
    specs = []
    for name, entry in header.items():
        try:
            dtype = _BY_CODE[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptBlock(path, f"bad entry for tensor {name!r}") from None
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
            isinstance(begin, int) and isinstance(end, int)
        ):
            raise CorruptBlock(path, f"bad shape or offsets for tensor {name!r}")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise CorruptBlock(path, f"tensor {name!r}: offsets disagree with its shape")
        specs.append((name, dtype, shape, begin, end))
    specs.sort(key=lambda spec: spec[0])
    offset = 0
    for _, _, _, begin, end in sorted(specs, key=lambda spec: (spec[3], spec[4])):
        if begin != offset:
            raise CorruptBlock(path, "tensor data is not contiguous")
        offset = end
    if data_start + offset != file_size:
        raise CorruptBlock(
            path, f"file is {file_size} bytes, its header describes {data_start + offset}"
        )
    return _Parsed(metadata, specs, data_start)


def _header_of(parsed: _Parsed, size: int) -> BlockHeader:
    meta = parsed.metadata
    return BlockHeader(
        hash=meta["hash"],
        parent=meta["parent"] or None,
        scope=meta["scope"],
        tokens=int(meta["tokens"]),
        size=size,
    )


def _read_length(path: Path, prefix: bytes, file_size: int) -> int:
    if len(prefix) < _LENGTH_BYTES:
        raise CorruptBlock(path, f"file is {file_size} bytes, shorter than a header")
    length = int.from_bytes(prefix[:_LENGTH_BYTES], "little")
    if length > MAX_HEADER_BYTES or _LENGTH_BYTES + length > file_size:
        raise CorruptBlock(path, f"header length {length} does not fit a {file_size}-byte file")
    return length


def read_header(
    path: str | os.PathLike[str], identity: BlockIdentity, expected: BlockHash
) -> BlockHeader:
    """Validate the header of the block file `path`, expected to hold block `expected`:
    format, identity, the block's metadata, and that the file is exactly as long as the
    header says. The data's checksum is not read (see `read_block`).

    Raises ForeignBlock, CorruptBlock, or OSError if the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        length = _read_length(path, file.read(_LENGTH_BYTES), size)
        raw = file.read(length)
    if len(raw) != length:
        raise CorruptBlock(path, "file shrank while being read")
    return _header_of(_parse_header(path, raw, size, identity, expected), size)


def read_block(
    path: str | os.PathLike[str],
    identity: BlockIdentity,
    expected: BlockHash,
    *,
    touch: bool = False,
) -> tuple[BlockHeader, BlockRecord]:
    """Read and fully validate the block file `path` (see `read_header`), checksum included.
    `touch`: once valid, set its mtime to now (recency for the next start's scan; best
    effort).

    Raises ForeignBlock, CorruptBlock, or OSError if the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    length = _read_length(path, raw, len(raw))
    parsed = _parse_header(
        path, raw[_LENGTH_BYTES : _LENGTH_BYTES + length], len(raw), identity, expected
    )
    view = memoryview(raw)
    start = parsed.data_start
    chunks = [view[start + begin : start + end] for _, _, _, begin, end in parsed.specs]
    checksum = _checksum(parsed.metadata, [spec[:3] for spec in parsed.specs], chunks)
    if checksum != parsed.metadata["checksum"]:
        raise CorruptBlock(path, "checksum mismatch")
    if touch:
        try:
            os.utime(path)
        except OSError:
            pass  # recency is a hint; the block itself is fine
    header = _header_of(parsed, len(raw))
    tensors = tuple(
        TensorData(name=name, dtype=dtype, shape=shape, data=bytes(chunk))
        for (name, dtype, shape, _, _), chunk in zip(parsed.specs, chunks, strict=True)
    )
    record = BlockRecord(
        hash=header.hash,
        parent=header.parent,
        scope=header.scope,
        tokens=header.tokens,
        tensors=tensors,
    )
    return header, record
