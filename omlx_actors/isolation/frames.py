"""Framed, typed messages over a byte stream (the front ↔ engine process socket).

A frame is a 4-byte big-endian length, then a msgpack array `[kind, id, target, payload]`:

- `CALL` id target message — `target` names an actor on the far side ("executor",
  "cache-index", "ssd", "host"); answered by `REPLY` id value or `ERROR` id error, where
  error is an `ActorError` as `wire.encode_error` writes it (its type survives).
- `CAST` 0 target message — no answer.
- `EVENTS` 0 "" [event, ...] — engine events, in order, as many as were ready at once (one
  frame per engine step in practice, not one per token). A `TokenDelta` travels as a plain
  array `[request_id, step, [choice, ...]]` (`encode_events`), any other event as its
  `wire` bytes: a step's frame holds one delta per stream, and the generic encoding cost
  each side ~2 and ~10 µs per delta.
- `SNAPSHOT` 0 "" snapshot — the memory enforcer's latest `MemorySnapshot`.

Messages are the actors' own attrs classes encoded by `runtime.wire`; `MESSAGES` lists the
ones that may cross, by class name (names are unique across it: checked at import).

Each side has exactly one reader of the stream and one writer (`FrameWriter`, fed by a
bounded outbox), so no two tasks ever touch the same half of the socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from omlx_actors.cache import actor as cache_actor
from omlx_actors.engine import messages as engine_messages
from omlx_actors.engine.messages import TokenChoice, TokenDelta, TokenLogprob
from omlx_actors.isolation import messages as host_messages
from omlx_actors.memory.enforcer import MemorySnapshot
from omlx_actors.kernel import wire
from omlx_actors.ssd import messages as ssd_messages

# A frame's length prefix. The largest frame is an SSD block load (tens of MB); the limit
# only guards against a corrupt length.
HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 2**31 - 1

# Frames a side's writer may hold before senders wait (WAIT: backpressure to whoever sends -
# the event forwarder, and through it the MLX thread, or a caller). Events come batched, so
# this is many steps' worth.
OUTBOX_CAPACITY = 256

READ_CHUNK = 1 << 20


class Kind(enum.IntEnum):
    CALL = 1
    CAST = 2
    REPLY = 3
    ERROR = 4
    EVENTS = 5
    SNAPSHOT = 6


def _registry(classes: list[type]) -> dict[str, type]:
    by_name: dict[str, type] = {}
    for cls in classes:
        if by_name.setdefault(cls.__name__, cls) is not cls:
            raise TypeError(f"two messages that cross the boundary are named {cls.__name__}")
    return by_name


# Everything that crosses: requests, their replies, events, and the host's own messages.
MESSAGES: dict[str, type] = _registry([
    engine_messages.Submit, engine_messages.Abort, engine_messages.Ping, engine_messages.Pong,
    engine_messages.EngineStatsQuery, engine_messages.EngineStats, engine_messages.InjectFault,
    engine_messages.EngineInfo,
    engine_messages.Admitted, engine_messages.PrefillProgress, engine_messages.TokenDelta,
    engine_messages.Finished,
    cache_actor.Lookup, cache_actor.LookupResult, cache_actor.Release,
    cache_actor.CacheStatsQuery, cache_actor.CacheStats,
    ssd_messages.SsdContains, ssd_messages.ContainsResult, ssd_messages.SsdLoad, ssd_messages.LoadResult,
    ssd_messages.SsdCleanupRequest, ssd_messages.SsdCleanupAll, ssd_messages.CleanupDone,
    ssd_messages.SsdFlush, ssd_messages.SsdStatsQuery, ssd_messages.WriterStats,
    ssd_messages.InjectDiskFault,
    MemorySnapshot,
    host_messages.HostHello, host_messages.HostReady, host_messages.HostLoadFailed,
    host_messages.HostStop, host_messages.HostStopped,
    host_messages.LookupAndSubmit,
])

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


def encode_message(message: Any) -> bytes | None:
    """A message (or None, the reply of a call that returns nothing) as bytes."""
    return None if message is None else wire.encode(message)


def decode_message(data: bytes | None) -> Any:
    if data is None:
        return None
    return wire.decode_tagged(data, MESSAGES)


def encode_events(events: Sequence[Any]) -> list[Any]:
    """An `EVENTS` frame's payload: each `TokenDelta` as `[request_id, step, choices]`,
    where a choice is its token id, or `[token, logprob, [[token, logprob], ...]]` when it
    carries logprobs; every other event as `wire.encode` bytes."""
    out: list[Any] = []
    for event in events:
        if type(event) is TokenDelta:
            out.append([event.request_id, event.step, [
                c.token if c.logprob is None and not c.top
                else [c.token, c.logprob, [[t.token, t.logprob] for t in c.top]]
                for c in event.tokens]])
        else:
            out.append(wire.encode(event))
    return out


def decode_events(payload: Sequence[Any]) -> list[Any]:
    """The events `encode_events` wrote. ValueError on an item that is neither form."""
    out: list[Any] = []
    for item in payload:
        if isinstance(item, bytes):
            out.append(decode_message(item))
            continue
        try:
            request_id, step, choices = item
            out.append(TokenDelta(request_id=request_id, step=step, tokens=tuple(
                TokenChoice(token=c) if type(c) is int
                else TokenChoice(token=c[0], logprob=c[1],
                                 top=tuple(TokenLogprob(token=t, logprob=lp) for t, lp in c[2]))
                for c in choices)))
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not an engine event: {item!r:.200}") from exc
    return out


def encode_frame(kind: Kind, ident: int, target: str, payload: Any) -> bytes:
    body = _ENCODER.encode([int(kind), ident, target, payload])
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"a {kind.name} frame of {len(body)} bytes is over the frame limit")
    return HEADER.pack(len(body)) + body


class ConnectionLost(Exception):
    """The other side closed the stream or it broke (mid-frame included)."""


class FrameReader:
    """The only reader of a stream: `receive()` → (kind, id, target, payload)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def receive(self) -> tuple[Kind, int, str, Any]:
        """Cancellation: safe between frames; a frame cut by cancellation is lost with the
        connection (callers stop reading the stream then)."""
        header = await self._exactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        body = await self._exactly(length)
        kind, ident, target, payload = _DECODER.decode(body)
        return Kind(kind), ident, target, payload

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.receive_some(max(READ_CHUNK, size - len(self._buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(str(exc)) from exc
            if not chunk:
                raise ConnectionLost("the other side closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


class FrameWriter:
    """The only writer of a stream. Senders put encoded frames in its outbox (capacity
    `OUTBOX_CAPACITY`, WAIT); `run()` writes them in order, joining the frames that are
    ready at once into one write."""

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._send, self._receive = trio.open_memory_channel[bytes](OUTBOX_CAPACITY)

    async def send(self, kind: Kind, ident: int, target: str, payload: Any) -> None:
        """Queue a frame (waiting for room). Raises `ConnectionLost` once closed."""
        try:
            await self._send.send(encode_frame(kind, ident, target, payload))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionLost("the connection is closed") from exc

    async def send_quietly(self, kind: Kind, ident: int, target: str, payload: Any) -> None:
        """`send` for a background task: a closed connection is not its caller's problem
        (whoever owns the connection handles that)."""
        try:
            await self.send(kind, ident, target, payload)
        except ConnectionLost:
            pass

    def send_nowait(self, kind: Kind, ident: int, target: str, payload: Any) -> bool:
        try:
            self._send.send_nowait(encode_frame(kind, ident, target, payload))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        """No more frames: `run()` returns once what was queued is written."""
        self._send.close()

    async def run(self) -> None:
        """Write until closed. Raises `ConnectionLost` if the stream breaks."""
        async for frame in self._receive:
            frames = [frame]
            while True:
                try:
                    frames.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await self._stream.send_all(b"".join(frames))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(str(exc)) from exc
