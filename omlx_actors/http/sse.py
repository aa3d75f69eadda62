"""Server-sent events: framing, and the relay that turns a started session into an SSE body
with keep-alives.

A session's events are pumped by a task of the request's own nursery (see
`omlx_actors.http.app.RequestScope`) into a small channel; the response body reads that
channel with a timer, so a quiet stream (a long prefill, a wait in the queue) gets a
keep-alive without ever cancelling the session's own receive - cancelling a session's
iteration aborts its request, by contract.

Order of events on the wire: the encoder's opening frames, then frames for each session
event, keep-alives in between (after `keepalive_s` of silence, and for prefill progress
after a second of silence), and the encoder's closing frames on `Done`. If the
client leaves, the body is closed (or its task cancelled): the session is closed, which
aborts the request in the engine without waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import attrs
import msgspec
import trio

from omlx_actors.session import Done, Progress, Session

log = logging.getLogger(__name__)

# Events in flight between a session's pump and its response body. When the client reads
# slowly the pump waits here; the session's own channel (sized for the whole request) holds
# the rest, so the engine never waits on a client. 16 keeps a burst of tokens in one write.
STREAM_RELAY_CAPACITY = 16

KEEPALIVE_COMMENT = b": keep-alive\n\n"

# Prefill progress becomes a keep-alive only if the stream has been quiet this long: a
# 100k-token prompt reports a chunk every few hundred ms, and one frame a second is enough.
PROGRESS_KEEPALIVE_MIN_S = 1.0

_encode = msgspec.json.Encoder().encode


def sse_data(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def sse_event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


@attrs.frozen(kw_only=True)
class StreamBroken:
    """The session failed in an unexpected way (a bug, not a request error): the stream
    ends with an error event instead of a cut connection."""

    message: str


class StreamEncoder(Protocol):
    """Turns session events into SSE frames in one route's format."""

    finished: bool  # the closing frames were produced

    def open(self) -> list[bytes]: ...

    def feed(self, event: Any) -> list[bytes]: ...

    def keepalive(self) -> bytes: ...


async def _pump(session: Session, send: trio.MemorySendChannel) -> None:
    with send:
        try:
            async for event in session:
                await send.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the body is gone: the client left
        except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
            log.exception("session %s failed while streaming", session.request_id)
            try:
                await send.send(StreamBroken(message=f"internal error: {type(exc).__name__}"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        finally:
            session.close()


async def sse_body(
    session: Session,
    encoder: StreamEncoder,
    *,
    nursery: trio.Nursery,
    keepalive_s: float,
    on_done: Callable[[Done], None],
    on_end: Callable[[bool, float], None],
) -> AsyncIterator[bytes]:
    """The body of a streaming response for a started session.

    `on_done(done)` runs when the final event arrives; `on_end(complete, seconds)` runs
    once when the body ends, however it ends (`complete` is False if the client left or the
    body was cancelled). Never raises into the server for a session failure: those become
    error frames.
    """
    send, receive = trio.open_memory_channel[Any](STREAM_RELAY_CAPACITY)
    nursery.start_soon(_pump, session, send)
    started = time.monotonic()
    last_frame = trio.current_time()  # keep-alives are timed from the last frame sent
    complete = False
    try:
        for frame in encoder.open():
            yield frame
        while not encoder.finished:
            event: Any = None
            with trio.move_on_at(last_frame + keepalive_s):
                try:
                    event = await receive.receive()
                except trio.EndOfChannel:
                    event = StreamBroken(message="the stream ended without a final event")
            now = trio.current_time()
            if event is None or isinstance(event, Progress):
                if event is None or now - last_frame >= min(PROGRESS_KEEPALIVE_MIN_S, keepalive_s):
                    last_frame = now
                    yield encoder.keepalive()
                continue
            # Whatever else is already waiting goes out in the same write: under load
            # (many streams, fast steps) one write per token costs more than the token.
            frames: list[bytes] = []
            while True:
                if isinstance(event, Done):
                    on_done(event)
                if not isinstance(event, Progress):
                    frames.extend(encoder.feed(event))
                if encoder.finished:
                    break
                try:
                    event = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if frames:
                last_frame = now
                yield b"".join(frames)
        complete = True
    finally:
        receive.close()
        session.close()
        on_end(complete, time.monotonic() - started)
