"""The engine side as the front sees it: one declared interface, two implementations.

`EngineSide` is everything the front (`front.runtime.Runtime`) uses of a running engine: its
`EngineInfo`, its event stream, its memory snapshots, submitting and aborting requests, and
the queries and commands of the executor, the prefix-cache index and the SSD tier. Two
classes implement it:

- `engine.assembly.LocalEngineSide`: the actors in this process (`isolation="thread"`);
- `isolation.remote_side.RemoteEngineSide`: the same actors in the engine process
  (`isolation="process"`), reached through the engine link.

The composition root (`omlx_actors.wiring`) picks one; the front imports only this module and
`engine.messages`, so it cannot tell which it has. `AddressedEngine` holds what both share:
each query is one call to the actor that owns the answer.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import trio

from omlx_actors.cache.actor import CacheStats, CacheStatsQuery
from omlx_actors.engine.messages import (
    Abort,
    EngineEvent,
    EngineInfo,
    EngineStats,
    EngineStatsQuery,
    InjectFault,
    Ping,
    Pong,
    Submit,
)
from omlx_actors.ssd.messages import (
    InjectDiskFault,
    SsdCleanupAll,
    SsdCleanupRequest,
    SsdFlush,
    SsdStatsQuery,
)


@attrs.frozen
class EngineStatus:
    """What `/health` and `/metrics` say about the engine."""

    state: str
    isolation: str
    pid: int | None = None
    restarts: int = 0
    resumed_requests: int = 0
    crash_loop_failures: int = 0
    last_exit: str | None = None  # how the last engine process ended
    last_restart_s: float | None = None  # from death to the new engine being ready
    last_resume_s: float | None = None  # from death to the first resumed token
    reason: str | None = None  # why it is failed
    retry_in_s: float | None = None  # failed: seconds until a new engine is tried


# The SSD tier's commands the front sends (through `EngineSide.ssd_call`).
SsdCommand = SsdCleanupRequest | SsdCleanupAll | SsdFlush | SsdStatsQuery | InjectDiskFault


class ActorRef(Protocol):
    """An actor's address: a local `kernel.Address` or the link's `RemoteAddress`."""

    async def call(self, message: Any, *, timeout: float | None = None) -> Any: ...

    async def cast(self, message: Any) -> None: ...

    def cast_nowait(self, message: Any) -> bool: ...


class EngineSide(Protocol):
    """A running engine side, as the front uses it (see the module docstring)."""

    @property
    def info(self) -> EngineInfo:
        """The engine's readiness value (model, vocabulary, context, cache identity)."""

    @property
    def events(self) -> trio.MemoryReceiveChannel[EngineEvent]:
        """Every `EngineEvent`, in order; it ends when the engine has stopped. One reader:
        the front's dispatcher."""

    @property
    def memory(self) -> Any:
        """The memory enforcer's snapshots: `.latest` is the newest `MemorySnapshot`."""

    async def submit(self, submit: Submit) -> None:
        """Pin the prompt's cached prefix, then submit. The executor's refusals raise
        (`engine.messages.DuplicateRequest`, `MemoryRefused`, `AdmissionQueueFull`, or
        another `ActorError` when the engine is unreachable)."""

    def abort_nowait(self, request_id: str) -> bool:
        """Send an `Abort` without waiting; False if the executor's inbox is full."""

    async def abort(self, request_id: str) -> None:
        """Send an `Abort`, waiting for room in the executor's inbox."""

    async def ping(self, timeout: float) -> Pong: ...

    async def stats(self, timeout: float) -> EngineStats: ...

    async def inject_fault(self, fault: InjectFault, timeout: float) -> None: ...

    async def cache_stats(self, timeout: float) -> CacheStats | None:
        """None without a prefix cache."""

    @property
    def has_ssd(self) -> bool:
        """Whether the SSD tier is on; the SSD calls below do nothing (None) without it."""

    async def ssd_call(self, command: SsdCommand, timeout: float | None = None) -> Any: ...

    def status(self) -> EngineStatus:
        """The engine's state (starting, ready, restarting, failed, stopped) and restarts."""

    @property
    def pid(self) -> int | None:
        """The engine process's pid; None when the engine runs in this process."""


class AddressedEngine:
    """The queries both engine sides answer the same way: one call to the owning actor.
    A subclass provides `executor`, `cache_index` and `ssd` (`ActorRef`s; the last two
    None when off)."""

    executor: ActorRef
    cache_index: ActorRef | None
    ssd: ActorRef | None

    def abort_nowait(self, request_id: str) -> bool:
        return self.executor.cast_nowait(Abort(request_id=request_id))

    async def abort(self, request_id: str) -> None:
        await self.executor.cast(Abort(request_id=request_id))

    async def ping(self, timeout: float) -> Pong:
        return await self.executor.call(Ping(), timeout=timeout)

    async def stats(self, timeout: float) -> EngineStats:
        return await self.executor.call(EngineStatsQuery(), timeout=timeout)

    async def inject_fault(self, fault: InjectFault, timeout: float) -> None:
        await self.executor.call(fault, timeout=timeout)

    async def cache_stats(self, timeout: float) -> CacheStats | None:
        if self.cache_index is None:
            return None
        return await self.cache_index.call(CacheStatsQuery(), timeout=timeout)

    @property
    def has_ssd(self) -> bool:
        return self.ssd is not None

    async def ssd_call(self, command: SsdCommand, timeout: float | None = None) -> Any:
        if self.ssd is None:
            return None
        return await self.ssd.call(command, timeout=timeout)
