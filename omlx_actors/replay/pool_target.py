"""Replaying a scenario on a model pool (`[model] pool`, issue #20): the pool's options,
its targets (in process: `open_pool`; with `serve=True`: a server serving the pool), the
engine a fault strikes, and the pool's load and eviction counts for the expectations.

A workload's `model` names the pool model its requests go to (None: the [model] one); a
`process_restart` fault's `model` names the one whose engine process is killed (the harness
waits until that model is loaded to count its steps).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.pool.catalog import (
    PoolModelSpec,
    PoolOptions,
    resolve_pool_models,
)
from omlx_actors.replay.records import LeakCheck, RequestRecord
from omlx_actors.replay.scenario import Scenario
from omlx_actors.replay.targets import HttpTarget, InProcessTarget, engine_idle

# How long a fault waits for its model to be loaded before it gives up.
MODEL_LOAD_WAIT_S = 120.0


async def pool_options(scenario: Scenario, config: RuntimeConfig,
                       model: str | None = None) -> PoolOptions | None:
    """The scenario's pool: [model] name (or the `model` given instead, as `config.model`
    holds it resolved) and its pool models, with a budget that holds `pool_holds` of them
    (the largest: any that many fit, more may not). None without a pool."""
    if not scenario.pool:
        return None
    main = PoolModelSpec(source=str(config.model),
                         served_name=scenario.model if model is None else None)
    specs = (main, *(PoolModelSpec(source=name) for name in scenario.pool))
    budget = None
    if scenario.pool_holds is not None:
        sizes = sorted((m.size_bytes for m in await resolve_pool_models(specs, config)),
                       reverse=True)
        budget = sum(sizes[:scenario.pool_holds])
    return PoolOptions(specs=specs, budget_bytes=budget)


@asynccontextmanager
async def open_pool_target(kind: str, config: RuntimeConfig, options: PoolOptions,
                           timeout_s: float) -> AsyncIterator[Any]:
    """The pool in process (`PoolTarget`) or behind a server on loopback (`PoolHttpTarget`)."""
    if kind == "serve":
        from omlx_actors.server import open_server

        async with open_server(config, pool=options) as server:
            target = PoolHttpTarget(server.url, pool=server.pool, timeout_s=timeout_s)
            try:
                await target.resolve_model(server.pool.names[0])
                yield target
            finally:
                await target.aclose()
        return
    from omlx_actors.pool.api import open_pool

    async with open_pool(options.specs, config, budget_bytes=options.budget_bytes) as pool:
        yield PoolTarget(pool)


class ServingEngine:
    """A pool model's engine as a fault sees it: `stats`, `ping` and `engine_pid` of the
    model's runtime while it serves requests. The pool may evict an idle model and load it
    again later, so each call waits until the model is loaded with a request in flight (it
    cannot be evicted then) and asks that runtime; an engine that went away meanwhile is
    asked again once the model serves again."""

    def __init__(self, pool: Any, name: str):
        self._pool = pool
        self._name = name
        self._runtime: Any = None

    async def _serving(self) -> Any:
        with trio.fail_after(MODEL_LOAD_WAIT_S):
            while True:
                view = next(v for v in (await self._pool.snapshot()).models
                            if v.name == self._name)
                if view.runtime is not None and view.inflight > 0:
                    self._runtime = view.runtime
                    return view.runtime
                await trio.sleep(0.005)

    async def _ask(self, what: str) -> Any:
        while True:
            runtime = await self._serving()
            try:
                return await getattr(runtime, what)()
            except Exception:  # noqa: BLE001 - evicted or died meanwhile: ask the next one
                await trio.sleep(0.01)

    async def stats(self) -> Any:
        return await self._ask("stats")

    async def ping(self) -> Any:
        return await self._ask("ping")

    @property
    def engine_pid(self) -> int | None:
        """The engine process of the runtime asked last (busy then)."""
        return self._runtime.engine_pid


class _PoolEngines:
    pool: Any

    async def engine_for(self, model: str | None) -> ServingEngine:
        """The engine of `model` (None: the pool's first) while it serves."""
        return ServingEngine(self.pool, self.pool.lookup(model or self.pool.names[0]))


class PoolTarget(_PoolEngines):
    """Each request holds its model (`ModelPool.lease`, loading it if needed) and runs as
    `InProcessTarget` runs it on that model's runtime."""

    kind = "in-process"
    engine = None

    def __init__(self, pool: Any):
        self.pool = pool

    @property
    def has_engine(self) -> bool:
        return True

    async def send(self, body, cancel, rec: RequestRecord, clock) -> None:
        from omlx_actors.refusals import RequestError

        try:
            async with self.pool.lease(body.model or self.pool.names[0]) as runtime:
                await InProcessTarget(runtime).send(body, cancel, rec, clock)
        except RequestError as exc:  # the pool's refusal: never fits, load failed
            rec.refuse(exc.status, exc.code, exc.message)
            rec.t_end = clock()

    async def sample(self, t: float):
        return None

    async def budget_bytes(self) -> int | None:
        return (await self.pool.snapshot()).budget_bytes

    async def check_idle(self, phase: str) -> LeakCheck:
        snap = await self.pool.snapshot()
        busy = [v.name for v in snap.models if v.inflight or v.waiting]
        for view in snap.models:
            if view.runtime is not None:
                check = await engine_idle(view.runtime, phase)
                if not check.clean:
                    return LeakCheck(phase=phase, clean=False, detail=f"{view.name}: {check.detail}")
        if busy:
            return LeakCheck(phase=phase, clean=False, detail=f"leases still held: {busy}")
        return LeakCheck(phase=phase, clean=True, detail="every loaded model idle, no lease held")

    async def aclose(self) -> None:
        return None


class PoolHttpTarget(_PoolEngines, HttpTarget):
    """Over HTTP to a server serving the pool in this process (faults reach its engines)."""

    def __init__(self, url: str, *, pool: Any, timeout_s: float):
        HttpTarget.__init__(self, url, timeout_s=timeout_s)
        self.pool = pool


async def engine_of(target: Any, fault: Any) -> Any:
    """The runtime a fault strikes: its pool model's (waiting for it to load), else the
    target's one engine."""
    if getattr(target, "pool", None) is not None:
        return await target.engine_for(fault.model)
    return target.engine


async def pool_counts(target: Any) -> dict[str, float] | None:
    """The pool's model loads, evictions and load seconds (None: no pool)."""
    pool = getattr(target, "pool", None)
    if pool is None:
        return None
    snap = await pool.snapshot()
    return {"loads": sum(v.loads for v in snap.models),
            "evictions": sum(v.evictions for v in snap.models),
            "load_seconds_total": snap.load_seconds.total,
            "unloads": snap.unload_seconds.count,
            "unload_seconds_total": snap.unload_seconds.total}
