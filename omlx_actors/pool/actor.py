"""The pool actor: the one owner of which models are loaded (`pool.api` opens it and hands
out `ModelPool`, the in-process API).

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
must become idle first: every `Release` re-plans), Drain (the wait is older than
`drain_after_s`: those busy models take no new lease, and go once idle), NeverFits (refuse
the waiters) -> `HostLoaded`: lease granted to every waiter still there.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from omlx_actors.kernel import Envelope
from omlx_actors.pool.catalog import PoolModel
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


async def tick(address, every_s: float) -> None:
    """Cast `Tick` every `every_s` (the actor re-plans on it)."""
    while True:
        await trio.sleep(every_s)
        await address.cast(Tick())


__all__ = [
    "DRAIN_AFTER_S", "MAX_WAITING_FOR_LOAD", "POOL_INBOX_CAPACITY", "TICK_S", "Acquire",
    "GetSnapshot", "Grant", "HostExited", "HostLoaded", "ModelView", "PoolActor", "PoolSnapshot",
    "Release", "Shutdown", "Tick", "run", "tick",
]
