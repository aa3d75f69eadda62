"""Framing over a real socket pair: order, batching, large frames, and a broken peer."""

from __future__ import annotations

import socket

import pytest
import trio

from omlx_actors.engine.messages import Finished, FinishReason, Ping, Submit, TokenChoice, TokenDelta
from omlx_actors.isolation.frames import (
    HEADER,
    ConnectionLost,
    FrameReader,
    FrameWriter,
    Kind,
    decode_message,
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
