"""The dispatcher: routes engine events to sessions by request id, in order, never blocking."""

from __future__ import annotations

import trio
import trio.testing

from omlx_actors.front.dispatcher import Dispatcher
from omlx_actors.engine.messages import Finished, FinishReason, TokenChoice, TokenDelta


def delta(rid: str, token: int) -> TokenDelta:
    return TokenDelta(request_id=rid, tokens=(TokenChoice(token=token),), step=token)


async def test_a_burst_is_routed_whole_in_order_and_finished_requests_are_forgotten():
    dispatcher = Dispatcher()
    a, b = dispatcher.register("a", 64), dispatcher.register("b", 64)
    send, receive = trio.open_memory_channel(64)
    burst = [delta(rid, t) for t in range(10) for rid in ("a", "b", "gone")]
    burst.append(Finished(request_id="a", reason=FinishReason.LENGTH, prompt_tokens=1,
                          completion_tokens=10))
    for event in burst:
        send.send_nowait(event)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.run, receive)
        await trio.testing.wait_all_tasks_blocked()
        # Everything that was waiting reached its session in one pass, in order.
        got_a = [a.receive_nowait() for _ in range(11)]
        got_b = [b.receive_nowait() for _ in range(10)]
        assert [e.tokens[0].token for e in got_a[:10]] == list(range(10))
        assert isinstance(got_a[10], Finished)
        assert [e.tokens[0].token for e in got_b] == list(range(10))
        assert dispatcher.undeliverable == 10  # "gone" has no session
        assert len(dispatcher) == 1  # "a" finished and was unregistered
        send.close()
    # The channel closed with "b" still registered: it is failed, not left waiting.
    (failed,) = [b.receive_nowait()]
    assert failed.reason is FinishReason.ERROR and failed.error_type == "EngineStopped"
