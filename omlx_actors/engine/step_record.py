"""What the MLX thread is working on, written where it outlives the engine process.

When the engine process dies, the front must know which requests were in the step that
died: only that is evidence against a request (`isolation/recovery.py`'s poison rule). The
step's own events never arrive (it died), and an event sent just before it may still be in
the dying process's buffers. So the MLX thread writes the request ids of the work it is about
to start into a small file the front owns - before the step, with no round trip - and writes
an empty record when the step is done. A file write survives a SIGKILL or a segfault the
moment `pwrite` returns (the page cache belongs to the kernel, not the process); the front
reads the file after the process has died.

Layout: a header at offset 0 - `seq` (u64), payload length (u32), CRC-32 of the payload
(u32) - and the payload, the ids as a JSON list, at offset `PAYLOAD_OFFSET`. A new set is
written payload first, header last; the header is one `pwrite` inside one page, which a
signal cannot tear. A death between the two writes leaves an old header over a new payload:
its CRC fails, and the record reads as empty - the thread was between two pieces of work,
so that is the truth.

No trio, no MLX: the core calls `StepRecorder.working` on its thread; the link calls
`read_step_record` after the process has gone.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

HEADER = struct.Struct(">QII")
# The payload starts on its own page, so writing it never touches the header's page.
PAYLOAD_OFFSET = 4096


def encode(seq: int, request_ids: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(header, payload) of a record naming `request_ids` (empty: no work in progress)."""
    payload = json.dumps(list(request_ids)).encode() if request_ids else b""
    return HEADER.pack(seq, len(payload), zlib.crc32(payload)), payload


def decode(header: bytes, payload_region: bytes) -> tuple[str, ...] | None:
    """The ids a record names; None when it does not check out (torn by a death between
    its two writes, or not a record at all)."""
    if len(header) < HEADER.size:
        return () if not header.strip(b"\0") else None
    _, length, crc = HEADER.unpack_from(header)
    payload = payload_region[:length]
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    if not length:
        return ()
    try:
        ids = json.loads(payload)
    except ValueError:
        return None
    return tuple(ids) if isinstance(ids, list) and all(isinstance(i, str) for i in ids) else None


class StepRecorder:
    """Writes the record; owned by the MLX thread (one writer, so no seq ever repeats).
    `path=None` makes every call a no-op (an engine in the front's own process has nobody
    to tell)."""

    def __init__(self, path: str | None) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None
        self._seq = 0
        self._current: tuple[str, ...] = ()
        self._payload = b""  # what the payload region holds now

    def working(self, request_ids: tuple[str, ...]) -> None:
        """Record that the thread now works on exactly `request_ids` (() between steps)."""
        if self._fd is None or request_ids == self._current:
            return
        self._seq += 1
        header, payload = encode(self._seq, request_ids)
        if payload and payload != self._payload:
            os.pwrite(self._fd, payload, PAYLOAD_OFFSET)
            self._payload = payload
        os.pwrite(self._fd, header, 0)
        self._current = request_ids

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_step_record(path: str) -> frozenset[str]:
    """The requests the engine was working on when it stopped writing `path`: empty when it
    was between steps, when the record is torn, or when there is no file."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER.size)
            f.seek(PAYLOAD_OFFSET)
            payload_region = f.read()
    except OSError:
        return frozenset()
    ids = decode(header, payload_region)
    return frozenset(ids or ())
