"""The pool actor: one owner of which models are loaded, and `open_pool`, the in-process API.

Who owns what. The pool actor owns the `PoolLedger` (`pool.policy`: states, sizes, leases,
last use, pins), the loaded models' `Runtime`s, the requests waiting for a load and the
leases granted (ticket -> model). Each loaded model is one *host task*, which holds its
runtime open (`wiring.open_runtime`: its own engine - its own process with
isolation="process" -, prefix cache and SSD namespace) until told to stop; the host reports
to the actor, which alone changes the ledger.

Messages (`PoolMessage`, on one inbox of `POOL_INBOX_CAPACITY`, WAIT):

- `Acquire(model, ticket)` (call) -> a `Grant` with the runtime once the model is loaded,
  or a `RequestError` value (never fits: 413; its load failed, shutting down: 503). A
  request for an unloaded model waits in the actor; the first one starts the load (after
  evicting the least recently used idle models if it does not fit), the others share it.
- `Release(ticket)` (cast): the lease is over - after the request's stream ended, or when
  the caller was cancelled (a grant it never saw is released too, by ticket).
- `HostLoaded`, `HostExited` (from host tasks), `Tick` (idle-TTL timer), `GetSnapshot`
  (call -> `PoolSnapshot`), `Shutdown` (call: refuse new work, stop every host).

Flow of a load: Acquire for an unloaded model -> `plan_load`: Load (start its host),
EvictFirst (tell those idle hosts to stop; their `HostExited` re-plans), Wait (a busy model
must become idle first: every `Release` re-plans), NeverFits (refuse the waiters) ->
`HostLoaded`: lease granted to every waiter still there.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from omlx_actors.config import ConfigError, RuntimeConfig
from omlx_actors.kernel import ActorError, Envelope, Overflow, open_inbox
from omlx_actors.pool.catalog import PoolModel, PoolModelSpec, resolve_pool_models
from omlx_actors.pool.policy import (
    Drain,
    EvictFirst,
    Load,
    ModelState,
    NeverFits,
    PoolLedger,
    SecondsHistogram,
    Wait,
)
from omlx_actors.refusals import (
    EngineUnavailable,
    ModelNotFound,
    QueueFull,
    RequestError,
    RequestTooLarge,
)

log = logging.getLogger(__name__)

# Acquires and releases of every request, and the hosts' reports. WAIT: a sender waits for
# room (the actor never awaits anything but its hosts' start, so it drains fast); a release
# that finds the inbox full is delivered by a background task, never dropped.
POOL_INBOX_CAPACITY = 256
# How often the actor re-plans on its own (idle-TTL expiry, loads that have waited long
# enough to drain busy models); a short TTL checks more often.
TICK_S = 1.0
# A load waiting this long for busy models drains them (no new lease on them until they
# are evicted for it): a model kept busy without a pause cannot keep another out for good.
DRAIN_AFTER_S = 10.0
# Requests waiting in the actor for their models to load, over all models: beyond it a new
# one is refused at once (429 with Retry-After) rather than queued without bound.
MAX_WAITING_FOR_LOAD = 1024


# -- messages ------------------------------------------------------------------------------
# Front-only: a `Grant` and `HostLoaded` carry a live Runtime, so these never cross a process.

@attrs.frozen
class Acquire:
    model: str
    ticket: int
    since: float | None = None  # when the request began to wait (trio time; None: now)


@attrs.frozen
class Release:
    ticket: int


@attrs.frozen
class HostLoaded:
    model: str
    runtime: Any
    seconds: float


@attrs.frozen
class HostExited:
    model: str
    error: str | None  # None: stopped when told to (or cancelled at shutdown)


@attrs.frozen
class Tick:
    pass


@attrs.frozen
class GetSnapshot:
    pass


@attrs.frozen
class Shutdown:
    pass


PoolMessage = Acquire | Release | HostLoaded | HostExited | Tick | GetSnapshot | Shutdown


@attrs.frozen
class Grant:
    ticket: int
    model: str
    runtime: Any


@attrs.frozen(kw_only=True)
class ModelView:
    """One model as /v1/models and /health show it."""

    name: str
    state: str
    size_bytes: int
    pinned: bool
    inflight: int
    loads: int
    evictions: int
    waiting: int  # requests waiting for it to load
    loading_s: float | None  # seconds since its load started, while loading
    last_load_s: float | None
    error: str | None
    runtime: Any = None  # its Runtime while loaded


@attrs.frozen(kw_only=True)
class PoolSnapshot:
    budget_bytes: int
    resident_bytes: int
    models: tuple[ModelView, ...]
    load_seconds: SecondsHistogram
    unload_seconds: SecondsHistogram
    load_failures: int


# -- the actor's state ---------------------------------------------------------------------

@attrs.define(eq=False)
class _Host:
    stop: trio.Event = attrs.field(factory=trio.Event)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    started: float = 0.0
    stopping_since: float | None = None
    runtime: Any = None


@attrs.define(eq=False)
class PoolActor:
    """The pool's state, mutated only by `run`'s loop."""

    ledger: PoolLedger
    models: dict[str, PoolModel]
    address: Any  # its own inbox's Address (hosts report there)
    hosts_nursery: trio.Nursery
    idle_ttl_s: float | None = None
    drain_after_s: float = DRAIN_AFTER_S
    accepting: bool = True
    hosts: dict[str, _Host] = attrs.field(factory=dict)
    # model -> requests waiting for it (ticket, envelope, since), oldest first
    waiters: dict[str, list[tuple[int, Envelope, float]]] = attrs.field(factory=dict)
    grants: dict[int, str] = attrs.field(factory=dict)
    last_load_s: dict[str, float] = attrs.field(factory=dict)
    load_seconds: SecondsHistogram = attrs.field(factory=SecondsHistogram)
    unload_seconds: SecondsHistogram = attrs.field(factory=SecondsHistogram)
    load_failures: int = 0

    def handle(self, envelope: Envelope) -> None:
        now = trio.current_time()
        match envelope.message:
            case Acquire(model=model, ticket=ticket, since=since):
                self._acquire(envelope, model, ticket, now, now if since is None else since)
            case Release(ticket=ticket):
                self._release(ticket, now)
            case HostLoaded(model=model, runtime=runtime, seconds=seconds):
                self._loaded(model, runtime, seconds, now)
            case HostExited(model=model, error=error):
                self._exited(model, error, now)
            case Tick():
                if self.idle_ttl_s is not None:
                    for name in self.ledger.expired(now, self.idle_ttl_s):
                        log.info("model %s idle for %.0f s: unloading", name, self.idle_ttl_s)
                        self._stop_host(name, now)
            case GetSnapshot():
                envelope.reply(self.snapshot(now))
                return
            case Shutdown():
                self._shutdown(now)
                envelope.reply(None)
                return
            case other:
                raise TypeError(f"the pool actor got an unknown message {other!r}")
        self._replan(now)

    # -- leases ------------------------------------------------------------------------------

    def _acquire(self, envelope: Envelope, model: str, ticket: int, now: float,
                 since: float) -> None:
        if not self.accepting:
            envelope.reply(EngineUnavailable("the server is shutting down"))
            return
        entry = self.ledger.entries.get(model)
        if entry is None:
            envelope.reply(ModelNotFound(f"the model {model!r} is not in the pool", param="model"))
            return
        if self.ledger.can_lease(model):
            self._grant(envelope, model, ticket, now)
            return
        if sum(len(q) for q in self.waiters.values()) >= MAX_WAITING_FOR_LOAD:
            envelope.reply(QueueFull(f"{MAX_WAITING_FOR_LOAD} requests are already waiting "
                                     "for models to load; retry shortly"))
            return
        self.waiters.setdefault(model, []).append((ticket, envelope, since))

    def _grant(self, envelope: Envelope, model: str, ticket: int, now: float) -> None:
        self.ledger.acquire(model, now)
        self.grants[ticket] = model
        envelope.reply(Grant(ticket=ticket, model=model, runtime=self.hosts[model].runtime))

    def _release(self, ticket: int, now: float) -> None:
        model = self.grants.pop(ticket, None)
        if model is not None:
            self.ledger.release(model, now)
            return
        for queue in self.waiters.values():  # cancelled while waiting for the load
            queue[:] = [w for w in queue if w[0] != ticket]

    # -- hosts -------------------------------------------------------------------------------

    def _start_host(self, name: str, now: float) -> None:
        self.ledger.begin_load(name)
        host = self.hosts[name] = _Host(started=now)
        log.info("loading model %s", name)
        self.hosts_nursery.start_soon(_host_model, self.models[name], host, self.address)

    def _stop_host(self, name: str, now: float, *, shutdown: bool = False) -> None:
        self.ledger.begin_unload(name, shutdown=shutdown)
        host = self.hosts[name]
        host.stopping_since = now
        if host.runtime is not None:
            host.runtime.accepting = False
        host.stop.set()

    def _loaded(self, model: str, runtime: Any, seconds: float, now: float) -> None:
        host = self.hosts[model]
        host.runtime = runtime
        self.ledger.loaded(model, now)
        self.last_load_s[model] = seconds
        self.load_seconds.observe(seconds)
        log.info("model %s loaded in %.2f s", model, seconds)
        runtime.accepting = self.accepting
        if not self.accepting:
            self._stop_host(model, now, shutdown=True)
            return
        self._grant_waiters(model, now)

    def _grant_waiters(self, model: str, now: float) -> None:
        for ticket, envelope, _ in self.waiters.pop(model, []):
            if envelope.caller_waiting:
                self._grant(envelope, model, ticket, now)

    def _exited(self, model: str, error: str | None, now: float) -> None:
        host = self.hosts.pop(model)
        entry = self.ledger.entries[model]
        if entry.state is ModelState.LOADING:
            if error is None:  # cancelled at shutdown while loading
                entry.state = ModelState.UNLOADED
            else:
                self.load_failures += 1
                self.ledger.load_failed(model, error)
                self._refuse_waiters(model, EngineUnavailable(
                    f"the model {model!r} failed to load: {error}"))
            return
        if host.stopping_since is not None:
            self.unload_seconds.observe(now - host.stopping_since)
            log.info("model %s unloaded in %.2f s", model, now - host.stopping_since)
        elif error is not None:
            log.warning("model %s stopped on its own: %s", model, error)
        self.ledger.unloaded(model, error)

    def _refuse_waiters(self, model: str, error: RequestError) -> None:
        for _, envelope, _ in self.waiters.pop(model, []):
            envelope.reply(error)

    # -- decisions ---------------------------------------------------------------------------

    def _replan(self, now: float) -> None:
        """Start, or make room for, the loads requests wait for (oldest first). Drains are
        decided afresh: a model drained for a wait that is gone serves again."""
        self.ledger.clear_drains()
        for name in list(self.waiters):
            self.waiters[name] = [w for w in self.waiters[name] if w[1].caller_waiting]
            if not self.waiters[name]:
                del self.waiters[name]
                continue
            if self.ledger.can_lease(name):
                self._grant_waiters(name, now)
                continue
            if self.ledger.entries[name].state not in (ModelState.UNLOADED, ModelState.FAILED):
                continue
            waited = now - min(w[2] for w in self.waiters[name])
            match self.ledger.plan_load(name, may_drain=waited >= self.drain_after_s):
                case Load():
                    self._start_host(name, now)
                case EvictFirst(victims=victims):
                    for victim in victims:
                        log.info("evicting idle model %s to load %s", victim, name)
                        self._stop_host(victim, now)
                case Drain(victims=victims):
                    for victim in victims:
                        if self.ledger.entries[victim].inflight:
                            self.ledger.drain(victim)  # its requests end, then it goes
                        else:
                            self._stop_host(victim, now)
                case NeverFits() as refused:
                    self._refuse_waiters(name, RequestTooLarge(
                        refused.message, code="model_memory_exceeded", param="model",
                        details={"needed_bytes": refused.needed_bytes,
                                 "available_bytes": refused.available_bytes}))
                case Wait():
                    pass

    def _shutdown(self, now: float) -> None:
        self.accepting = False
        for name in list(self.waiters):
            self._refuse_waiters(name, EngineUnavailable("the server is shutting down"))
        for name, host in self.hosts.items():
            state = self.ledger.entries[name].state
            if state is ModelState.LOADED:
                self._stop_host(name, now, shutdown=True)
            elif state is ModelState.LOADING:
                host.scope.cancel()

    def snapshot(self, now: float) -> PoolSnapshot:
        views = []
        for name, entry in self.ledger.entries.items():
            host = self.hosts.get(name)
            loading = entry.state is ModelState.LOADING and host is not None
            views.append(ModelView(
                name=name, state=entry.state.value, size_bytes=entry.size_bytes,
                pinned=entry.pinned, inflight=entry.inflight, loads=entry.loads,
                evictions=entry.evictions, waiting=len(self.waiters.get(name, ())),
                loading_s=now - host.started if loading else None,
                last_load_s=self.last_load_s.get(name), error=entry.error,
                runtime=host.runtime if entry.state is ModelState.LOADED else None))
        return PoolSnapshot(budget_bytes=self.ledger.budget_bytes,
                            resident_bytes=self.ledger.resident_bytes(), models=tuple(views),
                            load_seconds=self.load_seconds.copy(),
                            unload_seconds=self.unload_seconds.copy(),
                            load_failures=self.load_failures)


async def run(inbox, actor: PoolActor, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The pool actor's loop: one message at a time; its handler never awaits."""
    task_status.started()
    async for envelope in inbox:
        actor.handle(envelope)


async def _host_model(model: PoolModel, host: _Host, address) -> None:
    """Hold `model`'s runtime open from load to `host.stop`; report both ends to the actor.
    Cancelled (`host.scope`) while loading at shutdown."""
    from omlx_actors.wiring import open_runtime

    error = None
    try:
        with host.scope:
            async with open_runtime(config=model.config) as runtime:
                await address.cast(HostLoaded(model.name, runtime,
                                              trio.current_time() - host.started))
                await host.stop.wait()
                runtime.accepting = False
    except Exception as exc:  # noqa: BLE001 - any failure is this model's, reported as a value
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        error = f"{type(leaf).__name__}: {leaf}"
        log.warning("model %s: %s", model.name, error)
    finally:
        with trio.CancelScope(shield=True):
            await address.cast(HostExited(model.name, error))


async def _tick(address, every_s: float) -> None:
    while True:
        await trio.sleep(every_s)
        await address.cast(Tick())


# -- the handle ----------------------------------------------------------------------------

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
            outer.start_soon(_tick, address, min(TICK_S, (idle_ttl_s or math.inf) / 4))
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


__all__ = [
    "POOL_INBOX_CAPACITY", "Lease", "ModelPool", "ModelView", "PoolSnapshot", "open_pool",
]
