"""The model pool's bookkeeping and decisions, on plain data (imports neither trio nor MLX).

The pool actor (`pool.actor`) owns one `PoolLedger` and applies what it decides. Each model
has an entry: its state, its priced size (`pool.catalog.footprint_bytes`), the leases in
flight, when it was last used, whether it is pinned.

Invariants (checked by the hypothesis state machine in tests/pool/test_policy.py):

- the bytes of every model that is loading, loaded or unloading never exceed the budget
  (a load starts only when its size fits beside them: `plan_load` answers `Load`);
- a model with leases in flight, or a pinned one, is never chosen to be unloaded (neither
  for room, `EvictFirst`, nor for idleness, `expired`);
- a lease is taken only on a loaded model that is not draining.

Draining: a load that has waited long enough for busy models may `Drain` them - they take
no new lease, so their requests end, they become idle and are evicted for it - so a model
kept busy without a pause cannot keep another out for good. Draining is decided afresh at
every re-plan (`clear_drains` first), so it never outlives the wait that asked for it.
"""

from __future__ import annotations

import enum

import attrs


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    # Told to stop; its memory is still taken until its engine has exited.
    UNLOADING = "unloading"
    # The last load failed (the next request for it tries again).
    FAILED = "failed"


# States whose bytes count against the budget.
RESIDENT = frozenset({ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING})


@attrs.define(kw_only=True)
class ModelEntry:
    """One model of the pool. Mutated only through `PoolLedger`."""

    name: str
    size_bytes: int  # the priced footprint: weights + one request's KV (pool.catalog)
    pinned: bool = False
    state: ModelState = ModelState.UNLOADED
    inflight: int = 0  # leases held (requests between acquire and release)
    last_used: float = 0.0  # when a lease was last taken or returned (monotonic seconds)
    loads: int = 0
    evictions: int = 0  # unloads for room or idleness (not the final shutdown)
    error: str | None = None  # why the last load failed
    draining: bool = False  # loaded, but takes no new lease: a waiting load needs its room


@attrs.frozen
class Load:
    """It fits now: start loading it."""

    name: str


@attrs.frozen
class EvictFirst:
    """Unload these idle models (least recently used first); then it fits."""

    name: str
    victims: tuple[str, ...]


@attrs.frozen
class Drain:
    """Only busy models stand in the way: let these (least recently used first) take no
    new lease and evict them as they become idle (idle ones among them at once)."""

    name: str
    victims: tuple[str, ...]


@attrs.frozen
class Wait:
    """It will fit once memory is given back: models unloading, or models now busy that
    will become idle."""

    name: str
    reason: str


@attrs.frozen
class NeverFits:
    """It cannot fit even with every other unpinned model unloaded."""

    name: str
    needed_bytes: int
    available_bytes: int

    @property
    def message(self) -> str:
        return (f"the model {self.name!r} needs {_human(self.needed_bytes)} and the pool's "
                f"memory budget leaves at most {_human(self.available_bytes)} for it (beside "
                "the pinned models): it can never be loaded")


LoadPlan = Load | EvictFirst | Drain | Wait | NeverFits


@attrs.define
class PoolLedger:
    """Every model of the pool and the byte budget they share."""

    budget_bytes: int
    entries: dict[str, ModelEntry] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"the pool's budget must be > 0, got {self.budget_bytes!r}")

    def add(self, name: str, size_bytes: int, *, pinned: bool = False) -> ModelEntry:
        if name in self.entries:
            raise ValueError(f"model {name!r} is already in the pool")
        if size_bytes <= 0:
            raise ValueError(f"model {name!r}: size must be > 0, got {size_bytes!r}")
        entry = self.entries[name] = ModelEntry(name=name, size_bytes=size_bytes, pinned=pinned)
        return entry

    # -- what is taken -----------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries.values() if e.state in RESIDENT)

    def room_for(self, name: str) -> int:
        """The most bytes `name` could ever have: the budget less every other pinned model."""
        pinned = sum(e.size_bytes for e in self.entries.values() if e.pinned and e.name != name)
        return self.budget_bytes - pinned

    def never_fits(self, name: str) -> NeverFits | None:
        entry = self.entries[name]
        room = self.room_for(name)
        if entry.size_bytes > room:
            return NeverFits(name=name, needed_bytes=entry.size_bytes, available_bytes=max(room, 0))
        return None

    # -- decisions ---------------------------------------------------------------------------

    def plan_load(self, name: str, *, may_drain: bool = False) -> LoadPlan:
        """What it takes to load `name` (unloaded or failed) now. `may_drain`: it has
        waited long enough that busy models may be drained for it."""
        entry = self.entries[name]
        if entry.state not in (ModelState.UNLOADED, ModelState.FAILED):
            raise ValueError(f"plan_load({name!r}) while it is {entry.state.value}")
        refused = self.never_fits(name)
        if refused is not None:
            return refused
        free = self.budget_bytes - self.resident_bytes()
        if entry.size_bytes <= free:
            return Load(name)
        unloading = sum(e.size_bytes for e in self.entries.values()
                        if e.state is ModelState.UNLOADING)
        if entry.size_bytes <= free + unloading:
            return Wait(name, "waiting for models being unloaded to give back their memory")
        victims: list[str] = []
        gained = free + unloading
        for candidate in self.idle_lru():
            victims.append(candidate.name)
            gained += candidate.size_bytes
            if entry.size_bytes <= gained:
                return EvictFirst(name, tuple(victims))
        if may_drain:
            drained = self._drain_victims(entry.size_bytes - gained)
            if drained:
                return Drain(name, tuple(victims) + drained)
        return Wait(name, "waiting for a busy model to become idle")

    def _drain_victims(self, missing: int) -> tuple[str, ...]:
        """Busy unpinned loaded models, least recently used first, until `missing` bytes."""
        busy = sorted((e for e in self.entries.values()
                       if e.state is ModelState.LOADED and not e.pinned and e.inflight),
                      key=lambda e: (e.last_used, e.name))
        chosen: list[str] = []
        for entry in busy:
            chosen.append(entry.name)
            missing -= entry.size_bytes
            if missing <= 0:
                return tuple(chosen)
        return ()

    def idle_lru(self) -> list[ModelEntry]:
        """Models that may be unloaded for room, least recently used first: loaded, no lease
        in flight, not pinned."""
        idle = [e for e in self.entries.values() if self._evictable(e)]
        return sorted(idle, key=lambda e: (e.last_used, e.name))

    def expired(self, now: float, idle_ttl_s: float) -> tuple[str, ...]:
        """Idle models unused for `idle_ttl_s` or longer (never pinned or busy ones)."""
        return tuple(e.name for e in self.idle_lru() if now - e.last_used >= idle_ttl_s)

    @staticmethod
    def _evictable(entry: ModelEntry) -> bool:
        return entry.state is ModelState.LOADED and entry.inflight == 0 and not entry.pinned

    # -- transitions -------------------------------------------------------------------------

    def drain(self, name: str) -> None:
        """No new lease on `name` until `clear_drains` (a `Drain` plan's busy victim)."""
        self._expect(name, ModelState.LOADED).draining = True

    def clear_drains(self) -> None:
        for entry in self.entries.values():
            entry.draining = False

    def can_lease(self, name: str) -> bool:
        entry = self.entries[name]
        return entry.state is ModelState.LOADED and not entry.draining

    def begin_load(self, name: str) -> None:
        """Only after `plan_load(name)` answered `Load`."""
        if not isinstance(self.plan_load(name), Load):
            raise ValueError(f"begin_load({name!r}): it does not fit now")
        entry = self.entries[name]
        entry.state = ModelState.LOADING
        entry.error = None

    def loaded(self, name: str, now: float) -> None:
        entry = self._expect(name, ModelState.LOADING)
        entry.state = ModelState.LOADED
        entry.loads += 1
        entry.last_used = now

    def load_failed(self, name: str, error: str) -> None:
        entry = self._expect(name, ModelState.LOADING)
        entry.state = ModelState.FAILED
        entry.error = error

    def begin_unload(self, name: str, *, shutdown: bool = False) -> None:
        """Evict an idle model (or, at `shutdown`, any loaded one): it is unloading until
        `unloaded`. Refuses a busy or pinned model unless shutting down."""
        entry = self._expect(name, ModelState.LOADED)
        if not shutdown:
            if not self._evictable(entry):
                raise ValueError(f"begin_unload({name!r}): busy or pinned")
            entry.evictions += 1
        entry.state = ModelState.UNLOADING
        entry.draining = False

    def unloaded(self, name: str, error: str | None = None) -> None:
        """Its engine has exited (asked to, or on its own: then `error` says why)."""
        entry = self.entries[name]
        entry.state = ModelState.FAILED if error is not None else ModelState.UNLOADED
        entry.error = error
        entry.draining = False

    def acquire(self, name: str, now: float) -> None:
        entry = self._expect(name, ModelState.LOADED)
        if entry.draining:
            raise ValueError(f"acquire({name!r}) while it drains")
        entry.inflight += 1
        entry.last_used = now

    def release(self, name: str, now: float) -> None:
        entry = self.entries[name]
        if entry.inflight <= 0:
            raise ValueError(f"release({name!r}) with no lease in flight")
        entry.inflight -= 1
        entry.last_used = now

    def _expect(self, name: str, state: ModelState) -> ModelEntry:
        entry = self.entries[name]
        if entry.state is not state:
            raise ValueError(f"model {name!r} is {entry.state.value}, not {state.value}")
        return entry


# Seconds a model takes to load (an engine process starting, its weights read) or unload.
LOAD_SECONDS_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@attrs.define
class SecondsHistogram:
    """Cumulative counts per upper bound (Prometheus' shape), kept by the pool actor and
    exported by the HTTP front's /metrics."""

    buckets: tuple[float, ...] = LOAD_SECONDS_BUCKETS
    counts: list[int] = attrs.field(factory=lambda: [0] * len(LOAD_SECONDS_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                self.counts[i] += 1
        self.total += seconds
        self.count += 1

    def copy(self) -> SecondsHistogram:
        return SecondsHistogram(self.buckets, list(self.counts), self.total, self.count)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


__all__ = [
    "RESIDENT", "Drain", "EvictFirst", "Load", "LoadPlan", "ModelEntry", "ModelState", "NeverFits",
    "PoolLedger", "SecondsHistogram", "Wait",
]
