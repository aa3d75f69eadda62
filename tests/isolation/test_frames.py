"""Framing over a real socket pair: order, batching, large frames, and a broken peer."""

from __future__ import annotations

import socket

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from omlx_actors.engine.messages import (
    Admitted,
    Finished,
    FinishReason,
    Ping,
    PrefillProgress,
    Submit,
    TokenChoice,
    TokenDelta,
    TokenLogprob,
)
from omlx_actors.isolation.frames import (
    HEADER,
    ConnectionLost,
    FrameReader,
    FrameWriter,
    Kind,
    decode_events,
    decode_message,
    encode_events,
    encode_frame,
    encode_message,
)
from omlx_actors.kernel import CallTimeout, wire


def stream_pair():
    a, b = socket.socketpair()
    return (trio.SocketStream(trio.socket.from_stdlib_socket(a)),
            trio.SocketStream(trio.socket.from_stdlib_socket(b)))


async def test_frames_arrive_in_order_with_their_messages_intact():
    left, right = stream_pair()
    writer, reader = FrameWriter(left), FrameReader(right)
    events = [TokenDelta(request_id="r", tokens=(TokenChoice(token=i, logprob=-0.5),), step=i)
              for i in range(50)]
    big = Submit(request_id="big", prompt_tokens=tuple(range(300_000)), max_tokens=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.send(Kind.CALL, 7, "executor", encode_message(Ping()))
        await writer.send(Kind.EVENTS, 0, "", [wire.encode(e) for e in events])
        await writer.send(Kind.CALL, 8, "executor", encode_message(big))
        await writer.send(Kind.REPLY, 9, "host", encode_message(None))
        received = [await reader.receive() for _ in range(4)]
        writer.close()
    assert received[0][:3] == (Kind.CALL, 7, "executor")
    assert decode_message(received[0][3]) == Ping()
    assert [decode_message(e) for e in received[1][3]] == events
    assert decode_message(received[2][3]) == big
    assert received[3] == (Kind.REPLY, 9, "host", None)


async def test_errors_keep_their_type_across():
    left, right = stream_pair()
    writer, reader = FrameWriter(left), FrameReader(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.send(Kind.ERROR, 1, "executor", wire.encode_error(CallTimeout("executor", "late")))
        _, _, _, payload = await reader.receive()
        writer.close()
    assert wire.decode_error(payload) == CallTimeout("executor", "late")


async def test_a_peer_gone_mid_frame_is_connection_lost():
    left, right = stream_pair()
    frame = HEADER.pack(100) + b"\x00" * 10  # promises 100 bytes, sends 10
    await left.send_all(frame)
    await left.aclose()
    with pytest.raises(ConnectionLost):
        await FrameReader(right).receive()


async def test_sending_after_close_is_connection_lost_not_a_hang():
    left, _ = stream_pair()
    writer = FrameWriter(left)
    writer.close()
    with pytest.raises(ConnectionLost):
        await writer.send(Kind.CAST, 0, "executor", encode_message(Ping()))
    assert not writer.send_nowait(Kind.CAST, 0, "executor", encode_message(Ping()))


def test_an_unknown_message_is_refused_by_name():
    from omlx_actors.cache.actor import SetCacheBudget  # an engine-internal message: never crosses

    with pytest.raises(ValueError, match="SetCacheBudget"):
        decode_message(wire.encode(SetCacheBudget(budget_bytes=1)))
    done = Finished(request_id="r", reason=FinishReason.ERROR, prompt_tokens=1,
                    completion_tokens=0, error="x", error_type="E")
    assert decode_message(encode_message(done)) == done


_finite = st.floats(allow_nan=False, width=64)
_choices = st.one_of(
    st.builds(TokenChoice, token=st.integers(0, 2**31)),
    st.builds(TokenChoice, token=st.integers(0, 2**31), logprob=_finite,
              top=st.lists(st.builds(TokenLogprob, token=st.integers(0, 2**31), logprob=_finite),
                           max_size=4).map(tuple)),
)
_events = st.one_of(
    st.builds(TokenDelta, request_id=st.text(max_size=40), step=st.integers(0, 2**40),
              tokens=st.lists(_choices, min_size=1, max_size=4).map(tuple)),
    st.builds(Admitted, request_id=st.text(max_size=10), queued_s=_finite),
    st.builds(PrefillProgress, request_id=st.text(max_size=10), done=st.integers(0, 10**6),
              total=st.integers(0, 10**6)),
)


@given(st.lists(_events, max_size=12))
def test_events_cross_a_frame_exactly_in_order(events):
    """The compact token-delta form and the generic one, mixed, through real msgpack."""
    frame = encode_frame(Kind.EVENTS, 0, "", encode_events(events))
    kind, _, _, payload = msgspec.msgpack.decode(frame[HEADER.size:])
    assert kind == Kind.EVENTS
    assert decode_events(payload) == events


def test_an_events_item_of_neither_form_is_refused():
    with pytest.raises(ValueError, match="not an engine event"):
        decode_events([["r", 1]])
    with pytest.raises(ValueError, match="not an engine event"):
        decode_events([7])
