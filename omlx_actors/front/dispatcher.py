"""The dispatcher: the only reader of the engine side's event channel; it routes each event
to its request's session by request id.

It owns the table request id → session channel. Sessions register before they submit and
unregister when they end; the engine side never sees a session, only request ids.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from omlx_actors.engine.messages import EngineEvent, Finished, FinishReason
from omlx_actors.refusals import DuplicateRequestId

log = logging.getLogger(__name__)

# Finished events the dispatcher remembers for inspection (tests, debugging); older ones
# are forgotten.
RECENT_FINISHED = 1024

class Dispatcher:
    """Routes engine events to sessions by request id. Never blocks on a session: each
    session's channel is sized to hold its whole request (see `Session._channel_capacity`).

    Register/unregister are plain methods: they run on the trio thread between awaits, so
    the table has one owner at a time without any lock.
    """

    def __init__(self) -> None:
        self._routes: dict[str, trio.MemorySendChannel[EngineEvent]] = {}
        self.undeliverable = 0  # events for requests nobody listens to any more
        self.recent_finished: deque[Finished] = deque(maxlen=RECENT_FINISHED)

    def register(self, request_id: str, capacity: int) -> trio.MemoryReceiveChannel:
        if request_id in self._routes:
            raise DuplicateRequestId(f"request id {request_id!r} is already in use", param="request_id")
        send, receive = trio.open_memory_channel[EngineEvent](capacity)
        self._routes[request_id] = send
        return receive

    def unregister(self, request_id: str) -> None:
        send = self._routes.pop(request_id, None)
        if send is not None:
            send.close()

    def __len__(self) -> int:
        return len(self._routes)

    async def run(self, events: trio.MemoryReceiveChannel[EngineEvent]) -> None:
        """Serve until the executor's event channel closes; then fail whoever is left.

        Routes every event already waiting before yielding again: a step's tokens for all
        streams land in their sessions together, so each stream wakes once per step with
        everything it has, not once per event."""
        try:
            async for event in events:
                self._route(event)
                while True:
                    try:
                        self._route(events.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
        finally:
            for request_id in list(self._routes):
                self.fail(request_id, "EngineStopped", "the engine stopped")

    def _route(self, event: EngineEvent) -> None:
        if isinstance(event, Finished):
            self.recent_finished.append(event)
        send = self._routes.get(event.request_id)
        if send is None:
            self.undeliverable += 1
            return
        try:
            send.send_nowait(event)
        except trio.WouldBlock:  # a sizing bug: say so, and end that request
            log.error("session channel of %s is full; failing it", event.request_id)
            self.unregister(event.request_id)
        except trio.BrokenResourceError:
            self.unregister(event.request_id)
        if isinstance(event, Finished):
            self.unregister(event.request_id)

    def fail(self, request_id: str, error_type: str, error: str) -> None:
        send = self._routes.get(request_id)
        if send is not None:
            try:
                send.send_nowait(
                    Finished(
                        request_id=request_id,
                        reason=FinishReason.ERROR,
                        prompt_tokens=0,
                        completion_tokens=0,
                        error=error,
                        error_type=error_type,
                    )
                )
            except (trio.WouldBlock, trio.BrokenResourceError):
                pass
            self.unregister(request_id)
