"""Server-sent events: framing, and the body that turns a started session into an SSE
stream with keep-alives.

The response body reads the session itself, in batches (`Session.receive_ready`): every
event ready goes out in one write, and waiting for the next one is bounded by a deadline, so
a quiet stream (a long prefill, a wait in the queue) gets a keep-alive without cancelling
the session's receive - cancelling a session's iteration aborts its request, by contract.
No task of its own: each token costs one wake-up of the body, not a relay between tasks.

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

from omlx_actors.front.session import Done, Progress, Session

log = logging.getLogger(__name__)

KEEPALIVE_COMMENT = b": keep-alive\n\n"

# Prefill progress becomes a keep-alive only if the stream has been quiet this long: a
# 100k-token prompt reports a chunk every few hundred ms, and one frame a second is enough.
PROGRESS_KEEPALIVE_MIN_S = 1.0

_encode = msgspec.json.Encoder().encode


def sse_data(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def sse_event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(payload) + b"\n\n"


# Encodes as "\u0000hole\u0000": no id, model name or other fixed part of a frame holds it.
_HOLE = "\x00hole\x00"


def sse_template(frame: Callable[[str], bytes]) -> Callable[[str], bytes]:
    """`frame`, with everything but its string argument encoded once.

    For the frames sent per token, whose payload is fixed but for the token's text:
    building and encoding the whole payload each time costs more than the text itself."""
    head, tail = frame(_HOLE).split(_encode(_HOLE))
    return lambda text: head + _encode(text) + tail


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


async def _next_events(session: Session, deadline: float) -> list[Any]:
    """The session's ready events (`[]`: none by `deadline`); its failures as `StreamBroken`."""
    try:
        return await session.receive_ready(deadline)
    except trio.EndOfChannel:
        return [StreamBroken(message="the stream ended without a final event")]
    except Exception as exc:  # reported to the client as an error event
        log.exception("session %s failed while streaming", session.request_id)
        return [StreamBroken(message=f"internal error: {type(exc).__name__}")]


def _frames_of(
    events: list[Any], encoder: StreamEncoder, on_done: Callable[[Done], None]
) -> tuple[bytes, bool]:
    """One write for a batch of events, and whether prefill progress was among them
    (progress is not sent as such: it only makes a quiet stream send a keep-alive)."""
    frames: list[bytes] = []
    progress = False
    for event in events:
        if isinstance(event, Progress):
            progress = True
            continue
        if isinstance(event, Done):
            on_done(event)
        frames.extend(encoder.feed(event))
        if encoder.finished:
            break
    return b"".join(frames), progress


async def sse_body(
    session: Session,
    encoder: StreamEncoder,
    *,
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
    started = time.monotonic()
    last_frame = trio.current_time()  # keep-alives are timed from the last frame sent
    progress_quiet_s = min(PROGRESS_KEEPALIVE_MIN_S, keepalive_s)
    complete = False
    try:
        opening = b"".join(encoder.open())
        if opening:
            yield opening
        while not encoder.finished:
            events = await _next_events(session, last_frame + keepalive_s)
            now = trio.current_time()
            # Everything that is ready goes out in one write: under load (many streams,
            # fast steps) one write per token costs more than the token.
            data, progress = _frames_of(events, encoder, on_done)
            if data:
                last_frame = now
                yield data
            elif not events or (progress and now - last_frame >= progress_quiet_s):
                last_frame = now
                yield encoder.keepalive()
        complete = True
    finally:
        session.close()
        on_end(complete, time.monotonic() - started)
