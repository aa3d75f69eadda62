"""`open_pool`: several models in one process, each loaded on demand within one memory
budget - the in-process API of the model pool, and what `serve` uses for several models.

`open_pool` resolves and prices the models (`pool.catalog`), refuses at once what can never
work (`check_startup`), starts the pool actor (`pool.actor`) and loads the pinned models;
the `ModelPool` it yields asks the actor for leases (`acquire`, `lease`, `chat`,
`complete`) and for snapshots.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from omlx_actors.config import ConfigError, RuntimeConfig
from omlx_actors.kernel import ActorError, Overflow, open_inbox
from omlx_actors.pool.actor import (
    DRAIN_AFTER_S,
    POOL_INBOX_CAPACITY,
    TICK_S,
    Acquire,
    GetSnapshot,
    PoolActor,
    PoolSnapshot,
    Release,
    Shutdown,
    run,
    tick,
)
from omlx_actors.pool.catalog import PoolModel, PoolModelSpec, resolve_pool_models
from omlx_actors.pool.policy import ModelState, PoolLedger
from omlx_actors.refusals import EngineUnavailable, ModelNotFound, RequestError


@attrs.frozen
class Lease:
    """A model held loaded for one request, until `ModelPool.release_nowait(lease)`."""

    ticket: int
    model: str
    runtime: Any


@attrs.define(eq=False)
class ModelPool:
    """Several models behind one memory budget. Get one from `open_pool`."""

    models: dict[str, PoolModel]
    _address: Any
    _nursery: trio.Nursery
    _tickets: Any = attrs.field(factory=lambda: itertools.count(1))
    accepting: bool = True  # False once shutting down: acquire refuses (503)

    def lookup(self, model: str) -> str | None:
        """The served name `model` refers to (any of its aliases), or None."""
        if model in self.models:
            return model
        return next((m.name for m in self.models.values() if model in m.aliases), None)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def not_found(self, model: str) -> ModelNotFound:
        return ModelNotFound(f"the model {model!r} is not served here; available: "
                             f"{', '.join(self.models)}", param="model")

    async def acquire(self, model: str, *, since: float | None = None) -> Lease:
        """Wait until `model` is loaded (loading it, evicting idle models for room) and hold
        it for one request. Raises `ModelNotFound` (404), `RequestTooLarge` (it can never
        fit, 413), `EngineUnavailable` (its load failed, shutting down: 503). Cancellation
        safe: a lease granted to a caller cancelled meanwhile is released. `since`: when the
        request began to wait (`trio.current_time()`), for a caller that asks again after
        giving up for a while (a stream sending keep-alives): its wait counts from then."""
        name = self.lookup(model)
        if name is None:
            raise self.not_found(model)
        if not self.accepting:
            raise EngineUnavailable("the server is shutting down")
        ticket = next(self._tickets)
        granted = False
        try:
            try:
                reply = await self._address.call(Acquire(name, ticket, since))
            except ActorError as exc:
                raise EngineUnavailable(f"the model pool is unavailable: {exc}") from exc
            if isinstance(reply, RequestError):
                raise reply
            granted = True
            return Lease(ticket=ticket, model=name, runtime=reply.runtime)
        finally:
            if not granted:
                self._release_ticket(ticket)

    def release_nowait(self, lease: Lease) -> None:
        """End a lease (never waits; safe in a cancelled scope; never dropped)."""
        self._release_ticket(lease.ticket)

    def _release_ticket(self, ticket: int) -> None:
        if not self._address.cast_nowait(Release(ticket)):
            self._nursery.start_soon(self._address.cast, Release(ticket))

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Any]:
        """`async with pool.lease("name") as runtime:` - the model stays loaded inside."""
        held = await self.acquire(model)
        try:
            yield held.runtime
        finally:
            self.release_nowait(held)

    async def chat(self, model: str, messages, **kwargs) -> AsyncIterator[Any]:
        """`Runtime.chat` on `model`, as an async iterator of its session's events; the
        model is held loaded until the iterator ends or is closed."""
        async with self.lease(model) as runtime:
            async with runtime.chat(messages, **kwargs) as session:
                async for event in session:
                    yield event

    async def complete(self, model: str, prompt, **kwargs) -> AsyncIterator[Any]:
        """`Runtime.complete` on `model`, like `chat`."""
        async with self.lease(model) as runtime:
            async with runtime.complete(prompt, **kwargs) as session:
                async for event in session:
                    yield event

    async def snapshot(self, timeout: float | None = 5.0) -> PoolSnapshot:
        return await self._address.call(GetSnapshot(), timeout=timeout)

    async def is_loaded(self, model: str) -> bool:
        name = self.lookup(model)
        return any(v.name == name and v.state == ModelState.LOADED.value
                   for v in (await self.snapshot()).models)

    async def runtime_of(self, model: str) -> Any:
        """The runtime of `model` if it is loaded now, else None (no lease: tests, metrics)."""
        name = self.lookup(model)
        snap = await self.snapshot()
        return next((v.runtime for v in snap.models if v.name == name), None)


def resolve_budget(budget_bytes: int | None) -> int:
    """The pool's budget: explicit, or the machine's memory less the usual headroom."""
    if budget_bytes is not None:
        return budget_bytes
    import psutil

    from omlx_actors.memory.enforcer import MemoryBudget

    return MemoryBudget.auto().resolve(psutil.virtual_memory().total)


def check_startup(ledger: PoolLedger, models: Sequence[PoolModel]) -> None:
    """Refuse, before anything loads, a pinned or explicitly named model that can never fit,
    and pinned models that together exceed the budget."""
    pinned = sum(m.size_bytes for m in models if m.pinned)
    if pinned > ledger.budget_bytes:
        raise ConfigError(f"the pinned models need {pinned} bytes, more than the pool's "
                          f"memory budget ({ledger.budget_bytes} bytes)")
    for model in models:
        refused = ledger.never_fits(model.name)
        if refused is not None and (model.pinned or model.explicit):
            raise ConfigError(refused.message)


@asynccontextmanager
async def open_pool(
    models: Sequence[str | PoolModelSpec], config: RuntimeConfig | None = None, *,
    budget_bytes: int | None = None, idle_ttl_s: float | None = None,
    pins: Sequence[str] = (), drain_after_s: float = DRAIN_AFTER_S, **overrides: Any,
) -> AsyncIterator[ModelPool]:
    """Several models, each loaded on demand into its own runtime, within one memory
    budget (`budget_bytes`; None: the machine's memory less a headroom). `models`: sources
    as `open_runtime` takes them (or `PoolModelSpec`s); `pins` keeps models loaded (loaded
    before this yields); `idle_ttl_s` unloads models idle that long; a load that waited
    `drain_after_s` for busy models drains them (they take no new request until they are
    evicted for it). Every model's runtime
    uses `config` (with `overrides`), each with its own SSD namespace. Example::

        async with open_pool(["tiny-llama", "smollm2-135m-instruct"]) as pool:
            async for event in pool.chat("tiny-llama", [{"role": "user", "content": "hi"}]):
                ...

    On exit every model's runtime stops (per its `shutdown_mode`)."""
    config = attrs.evolve(config or RuntimeConfig(), **overrides)
    if idle_ttl_s is not None and not (0 < idle_ttl_s < math.inf):
        raise ConfigError(f"idle_ttl_s must be > 0, got {idle_ttl_s!r}")
    specs = [m if isinstance(m, PoolModelSpec) else PoolModelSpec(source=str(m)) for m in models]
    resolved = await resolve_pool_models(specs, config, pins)
    ledger = PoolLedger(resolve_budget(budget_bytes))
    for model in resolved:
        ledger.add(model.name, model.size_bytes, pinned=model.pinned)
    check_startup(ledger, resolved)
    address, inbox = open_inbox("model-pool", POOL_INBOX_CAPACITY, Overflow.WAIT)
    async with trio.open_nursery() as outer:
        pool = ModelPool(models={m.name: m for m in resolved}, address=address, nursery=outer)
        async with trio.open_nursery() as hosts:
            actor = PoolActor(ledger=ledger, models=pool.models, address=address,
                              hosts_nursery=hosts, idle_ttl_s=idle_ttl_s,
                              drain_after_s=drain_after_s)
            await outer.start(run, inbox, actor)
            outer.start_soon(tick, address, min(TICK_S, (idle_ttl_s or math.inf) / 4))
            try:
                for model in resolved:
                    if model.pinned:
                        pool.release_nowait(await pool.acquire(model.name))
                yield pool
            finally:
                pool.accepting = False
                with trio.CancelScope(shield=True):
                    await address.call(Shutdown())
        outer.cancel_scope.cancel()


__all__ = ["Lease", "ModelPool", "check_startup", "open_pool", "resolve_budget"]
