"""The engine link's bookkeeping under cancellation, without an engine process: what it
records as delivered must be exactly what reaches the sessions."""

from __future__ import annotations

from pathlib import Path

import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.messages import Submit, TokenChoice, TokenDelta
from omlx_actors.isolation.link import EngineLink
from omlx_actors.kernel import wire


async def test_a_batch_of_events_is_recorded_and_forwarded_whole_even_if_cancelled():
    async with trio.open_nursery() as nursery:
        link = EngineLink(RuntimeConfig(isolation="process"), Path("unused"), nursery)
        link.recovery.track(Submit(request_id="r", prompt_tokens=(5, 6), max_tokens=8))
        link.recovery.mark_sent("r")
        batch = [wire.encode(TokenDelta(request_id="r", tokens=(TokenChoice(token=t),), step=t))
                 for t in (10, 11, 12)]
        # The reader is cancelled (the engine died) while it handles a frame.
        with trio.CancelScope() as scope:
            scope.cancel()
            await link._on_events(batch)
        forwarded = []
        while True:
            try:
                forwarded.append(link.events.receive_nowait())
            except trio.WouldBlock:
                break
        assert [e.tokens[0].token for e in forwarded] == [10, 11, 12]
        assert link.recovery.tracked["r"].delivered == [10, 11, 12]
        nursery.cancel_scope.cancel()
