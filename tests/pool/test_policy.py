"""The model pool's ledger and decisions on plain data: no trio, no MLX, no engines."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from omlx_actors.pool.policy import (
    Drain,
    EvictFirst,
    Load,
    ModelState,
    NeverFits,
    PoolLedger,
    Wait,
)

MiB = 1 << 20


def pool(budget: int, **sizes: int) -> PoolLedger:
    ledger = PoolLedger(budget)
    for name, size in sizes.items():
        ledger.add(name, size)
    return ledger


def load(ledger: PoolLedger, name: str, now: float = 0.0) -> None:
    ledger.begin_load(name)
    ledger.loaded(name, now)


def test_a_model_that_fits_loads():
    ledger = pool(100, a=40, b=40)
    load(ledger, "a")
    assert ledger.plan_load("b") == Load("b")


def test_a_load_that_does_not_fit_evicts_the_least_recently_used_idle_model():
    ledger = pool(100, a=40, b=40, c=40)
    load(ledger, "a", now=1.0)
    load(ledger, "b", now=2.0)
    assert ledger.plan_load("c") == EvictFirst("c", ("a",))
    ledger.acquire("b", 3.0)
    ledger.release("b", 4.0)
    ledger.acquire("a", 5.0)
    ledger.release("a", 6.0)
    assert ledger.plan_load("c") == EvictFirst("c", ("b",))


def test_a_model_with_requests_in_flight_is_never_evicted():
    ledger = pool(100, a=40, b=40, c=40)
    load(ledger, "a", 1.0)
    load(ledger, "b", 2.0)
    ledger.acquire("a", 3.0)
    ledger.acquire("b", 3.0)
    plan = ledger.plan_load("c")
    assert isinstance(plan, Wait) and "busy" in plan.reason
    with pytest.raises(ValueError, match="busy or pinned"):
        ledger.begin_unload("a")
    ledger.release("a", 4.0)
    assert ledger.plan_load("c") == EvictFirst("c", ("a",))


def test_pinned_models_are_never_evicted_nor_expired():
    ledger = PoolLedger(100)
    ledger.add("a", 40, pinned=True)
    ledger.add("b", 40)
    ledger.add("c", 40)
    load(ledger, "a", 0.0)
    load(ledger, "b", 5.0)
    assert ledger.plan_load("c") == EvictFirst("c", ("b",))
    assert ledger.expired(now=100.0, idle_ttl_s=10.0) == ("b",)


def test_a_model_bigger_than_the_budget_beside_the_pinned_ones_never_fits():
    ledger = PoolLedger(100)
    ledger.add("pinned", 70, pinned=True)
    ledger.add("big", 40)
    plan = ledger.plan_load("big")
    assert plan == NeverFits("big", 40, 30)
    assert "can never be loaded" in plan.message
    assert ledger.never_fits("pinned") is None


def test_waits_while_an_evicted_model_is_still_unloading():
    ledger = pool(100, a=60, b=60)
    load(ledger, "a", 1.0)
    assert ledger.plan_load("b") == EvictFirst("b", ("a",))
    ledger.begin_unload("a")
    assert isinstance(ledger.plan_load("b"), Wait)
    ledger.unloaded("a")
    assert ledger.plan_load("b") == Load("b")
    assert ledger.entries["a"].evictions == 1


def test_idle_ttl_expires_only_idle_models_unused_that_long():
    ledger = pool(100, a=10, b=10, c=10)
    load(ledger, "a", 0.0)
    load(ledger, "b", 8.0)
    load(ledger, "c", 0.0)
    ledger.acquire("c", 1.0)
    assert ledger.expired(now=10.0, idle_ttl_s=5.0) == ("a",)


def test_a_failed_load_can_be_tried_again():
    ledger = pool(100, a=10)
    ledger.begin_load("a")
    ledger.load_failed("a", "bad weights")
    assert ledger.entries["a"].state is ModelState.FAILED
    assert ledger.plan_load("a") == Load("a")


def test_a_load_that_waited_may_drain_the_least_recently_used_busy_model():
    ledger = pool(100, a=40, b=40, c=40)
    load(ledger, "a", 1.0)
    load(ledger, "b", 2.0)
    ledger.acquire("a", 3.0)
    ledger.acquire("b", 4.0)
    assert isinstance(ledger.plan_load("c"), Wait)
    assert ledger.plan_load("c", may_drain=True) == Drain("c", ("a",))
    ledger.drain("a")
    assert not ledger.can_lease("a") and ledger.can_lease("b")
    with pytest.raises(ValueError, match="drains"):
        ledger.acquire("a", 5.0)
    ledger.release("a", 5.0)
    assert ledger.plan_load("c") == EvictFirst("c", ("a",))
    ledger.clear_drains()
    assert ledger.can_lease("a")


class PoolMachine(RuleBasedStateMachine):
    """The pool actor's use of the ledger, driven at random: requests arrive for any
    model (loaded: a lease; else a plan, applied as the actor applies it), leases end,
    loads finish or fail, unloads finish, idle models expire, engines die.

    Invariants: the resident bytes never exceed the budget; a busy or pinned model is never
    unloading; leases exist only on loaded or unloading-at-death models."""

    def __init__(self):
        super().__init__()
        self.ledger: PoolLedger | None = None
        self.now = 0.0
        self.unloaded_busy: set[str] = set()

    @rule(budget=st.integers(50, 300),
          sizes=st.lists(st.integers(1, 200), min_size=1, max_size=6),
          pins=st.lists(st.booleans(), min_size=6, max_size=6))
    @precondition(lambda self: self.ledger is None)
    def start(self, budget, sizes, pins):
        self.ledger = PoolLedger(budget)
        pinned_bytes = 0
        for i, size in enumerate(sizes):
            pin = pins[i] and pinned_bytes + size <= budget
            pinned_bytes += size if pin else 0
            self.ledger.add(f"m{i}", size, pinned=pin)

    def names(self) -> list[str]:
        return sorted(self.ledger.entries)

    @rule(data=st.data(), may_drain=st.booleans())
    @precondition(lambda self: self.ledger is not None)
    def request(self, data, may_drain):
        name = data.draw(st.sampled_from(self.names()))
        entry = self.ledger.entries[name]
        self.now += 1.0
        if self.ledger.can_lease(name):
            self.ledger.acquire(name, self.now)
            return
        if entry.state not in (ModelState.UNLOADED, ModelState.FAILED):
            return  # loading, unloading, or draining: the request waits
        plan = self.ledger.plan_load(name, may_drain=may_drain)
        match plan:
            case Load():
                self.ledger.begin_load(name)
            case EvictFirst(victims=victims):
                for victim in victims:
                    assert self.ledger.entries[victim].inflight == 0
                    assert not self.ledger.entries[victim].pinned
                    self.ledger.begin_unload(victim)
            case Drain(victims=victims):
                for victim in victims:
                    assert not self.ledger.entries[victim].pinned
                    if self.ledger.entries[victim].inflight:
                        self.ledger.drain(victim)
                    else:
                        self.ledger.begin_unload(victim)
            case NeverFits():
                assert entry.size_bytes > self.ledger.room_for(name)
            case Wait():
                pass

    def in_state(self, state: ModelState) -> list[str]:
        return [n for n in self.names() if self.ledger.entries[n].state is state]

    @rule(data=st.data(), fail=st.booleans())
    @precondition(lambda self: self.ledger is not None
                  and any(e.state is ModelState.LOADING for e in self.ledger.entries.values()))
    def load_ends(self, data, fail):
        name = data.draw(st.sampled_from(self.in_state(ModelState.LOADING)))
        self.now += 1.0
        if fail:
            self.ledger.load_failed(name, "injected")
        else:
            self.ledger.loaded(name, self.now)

    @rule(data=st.data())
    @precondition(lambda self: self.ledger is not None
                  and any(e.inflight for e in self.ledger.entries.values()))
    def lease_ends(self, data):
        name = data.draw(st.sampled_from([n for n in self.names()
                                          if self.ledger.entries[n].inflight]))
        self.now += 1.0
        self.ledger.release(name, self.now)

    @rule(data=st.data())
    @precondition(lambda self: self.ledger is not None
                  and any(e.state is ModelState.UNLOADING for e in self.ledger.entries.values()))
    def unload_ends(self, data):
        self.ledger.unloaded(data.draw(st.sampled_from(self.in_state(ModelState.UNLOADING))))

    @rule()
    @precondition(lambda self: self.ledger is not None)
    def replan(self):
        self.ledger.clear_drains()  # the actor decides drains afresh at every re-plan

    @rule(ttl=st.floats(0.0, 20.0))
    @precondition(lambda self: self.ledger is not None)
    def idle_tick(self, ttl):
        self.now += 1.0
        for name in self.ledger.expired(self.now, ttl):
            entry = self.ledger.entries[name]
            assert entry.inflight == 0 and not entry.pinned
            assert self.now - entry.last_used >= ttl
            self.ledger.begin_unload(name)

    @invariant()
    def resident_within_budget(self):
        if self.ledger is not None:
            assert self.ledger.resident_bytes() <= self.ledger.budget_bytes

    @invariant()
    def busy_or_pinned_never_unloading(self):
        if self.ledger is None:
            return
        for entry in self.ledger.entries.values():
            if entry.state is ModelState.UNLOADING:
                assert entry.inflight == 0 and not entry.pinned
            if entry.inflight:
                assert entry.state is ModelState.LOADED
            if entry.draining:
                assert entry.state is ModelState.LOADED and not entry.pinned


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestPoolMachine = PoolMachine.TestCase


def test_seconds_histogram_counts_cumulatively():
    from omlx_actors.pool.policy import SecondsHistogram

    h = SecondsHistogram()
    h.observe(0.3)
    h.observe(7.0)
    assert h.count == 2 and h.total == pytest.approx(7.3)
    assert h.counts[h.buckets.index(0.5)] == 1 and h.counts[h.buckets.index(10.0)] == 2
