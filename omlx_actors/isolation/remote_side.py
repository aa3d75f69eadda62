"""The engine process as an `engine.side.EngineSide`: the front's view of `isolation="process"`.

`RemoteEngineSide` is built from a ready `EngineLink`: its actors are the link's
`RemoteAddress`es, its events and memory snapshots are the link's, and a submit goes through
the link (which tracks the request so it can resume it in a new engine process). The
queries are `AddressedEngine`'s, the same calls the in-process side makes.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from omlx_actors.engine.messages import EngineInfo, Submit
from omlx_actors.engine.side import AddressedEngine, EngineStatus
from omlx_actors.isolation.link import EngineLink, RemoteAddress


@attrs.frozen(eq=False)
class RemoteEngineSide(AddressedEngine):
    """The engine process, through its link. `cache_index` and `ssd` are None when off."""

    link: EngineLink
    info: EngineInfo
    executor: RemoteAddress
    events: trio.MemoryReceiveChannel
    memory: Any  # the link's `RemoteMemory`: `.latest`
    cache_index: RemoteAddress | None
    ssd: RemoteAddress | None

    @classmethod
    def of(cls, link: EngineLink) -> RemoteEngineSide:
        """The side of a link whose first engine is ready (`open_engine_link` yields it so)."""
        ready = link.first_ready
        return cls(
            link=link,
            info=ready.info,
            executor=link.address("executor"),
            events=link.events,
            memory=link.memory,
            cache_index=link.address("cache-index") if ready.cache_index else None,
            ssd=link.address("ssd") if ready.ssd else None,
        )

    async def submit(self, submit: Submit) -> None:
        await self.link.submit(submit)

    def status(self) -> EngineStatus:
        return self.link.status()

    @property
    def pid(self) -> int | None:
        return self.link.pid
