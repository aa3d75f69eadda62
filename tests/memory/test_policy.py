"""The executor's admission and pressure policy on plain data: no trio, no MLX, no engine.

Costs come from the real estimator on a small llama-shaped config, so the numbers are the
ones the executor would use; the policy is asked exactly what the executor's shell asks it.
"""

from __future__ import annotations

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from omlx_actors.memory.admission import AdmissionLedger, Refused, RequestCost
from omlx_actors.memory.estimator import ModelMemoryFacts
from omlx_actors.memory.policy import (
    PREFILL_STEP_FLOOR,
    DropPrefix,
    ForgetCacheCut,
    KeepWaiting,
    PressureReading,
    Priced,
    RefuseHead,
    RefuseQueueFull,
    RefuseTooLarge,
    RequestShape,
    RunNow,
    SendCacheBudget,
    SetPrefillStep,
    SetUnderPressure,
    ShrinkCache,
    UpdateLedger,
    WaitForMemory,
    decide_submit,
    next_expiry,
    overdue,
    padded_batch_cost,
    pressure_actions,
    price,
    request_cost,
    settle_step,
)

# 8 layers x 4 KV heads x 64 dims x 2 bytes x (K and V): 8 KiB of KV per position.
SMALL_LLAMA_LIKE = {
    "model_type": "llama",
    "torch_dtype": "float16",
    "num_hidden_layers": 8,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 512,
    "vocab_size": 256,
}
FACTS = ModelMemoryFacts.from_config(SMALL_LLAMA_LIKE)
WEIGHTS = 1 << 20
BLOCK = 64
STEP = 512
PREFILL_ROWS = 2


def book(available: int, *, reserved: int = 0, max_waiting: int = 4) -> AdmissionLedger:
    return AdmissionLedger(weights_bytes=WEIGHTS, budget_bytes=WEIGHTS + reserved + available,
                           batch_cost=padded_batch_cost(FACTS, PREFILL_ROWS),
                           reserved_bytes=reserved, max_waiting=max_waiting)


def alone(shape: RequestShape, chunk: int = STEP) -> int:
    """What `shape` costs as a batch of one."""
    return padded_batch_cost(FACTS, PREFILL_ROWS)([request_cost(FACTS, shape, chunk)])


def decide(ledger, request_id, shape, *, requests=0, max_requests=8, prefill_step=STEP):
    return decide_submit(ledger, FACTS, request_id, shape, prefill_step=prefill_step,
                         requests=requests, max_requests=max_requests)


SHORT = RequestShape(prompt_tokens=10, max_tokens=100)  # 256 positions
LONG_PROMPT = RequestShape(prompt_tokens=1000, max_tokens=10)  # big prefill scratch
# 192 of its 193 prompt tokens are cached: restored into a buffer of exactly that length,
# the one-token prefill then grows it by a whole step (448 positions, where 193 prefilled
# need 256) - with its prefix it costs more than without, even at the floor chunk.
WITH_PREFIX = RequestShape(prompt_tokens=193, max_tokens=10, prefix_blocks=3, block_size=BLOCK)


# ---------------------------------------------------------------------------------------
# A new request


def test_a_request_that_fits_runs_now_at_the_configured_chunk():
    ledger = book(alone(SHORT))
    decision = decide(ledger, "a", SHORT)
    assert decision == RunNow(priced=Priced(cost=request_cost(FACTS, SHORT, STEP), chunk=STEP),
                              unpinned=False)
    assert list(ledger.admitted) == ["a"]


def test_a_request_that_fits_only_with_floor_chunks_is_priced_and_run_at_the_floor():
    assert alone(LONG_PROMPT, PREFILL_STEP_FLOOR) < alone(LONG_PROMPT, STEP)
    ledger = book(alone(LONG_PROMPT, PREFILL_STEP_FLOOR))
    decision = decide(ledger, "long", LONG_PROMPT)
    assert isinstance(decision, RunNow)
    assert decision.priced.chunk == PREFILL_STEP_FLOOR


def test_a_request_that_fits_only_without_its_cached_prefix_runs_without_it():
    plain = WITH_PREFIX.without_prefix()
    assert alone(plain) < alone(WITH_PREFIX, PREFILL_STEP_FLOOR)
    decision = decide(book(alone(plain)), "r", WITH_PREFIX)
    assert decision == RunNow(priced=Priced(cost=request_cost(FACTS, plain, STEP), chunk=STEP),
                              unpinned=True)


def test_what_fits_the_budget_but_not_now_waits_for_memory():
    ledger = book(alone(SHORT) + 1)
    assert isinstance(decide(ledger, "a", SHORT), RunNow)
    assert isinstance(decide(ledger, "b", SHORT, requests=1), WaitForMemory)
    assert [r for r, _ in ledger.waiting] == ["b"]


def test_a_request_that_can_never_fit_is_refused_before_a_full_queue_is():
    ledger = book(alone(SHORT) - 1)
    decision = decide(ledger, "big", SHORT, requests=8, max_requests=8)
    assert isinstance(decision, RefuseTooLarge)
    assert decision.refusal.needed_bytes == alone(SHORT, PREFILL_STEP_FLOOR)
    assert not ledger.admitted and not ledger.waiting


def test_past_max_requests_a_request_is_refused_with_the_count_and_not_booked():
    ledger = book(10 * alone(SHORT))
    assert decide(ledger, "a", SHORT, requests=3, max_requests=3) == RefuseQueueFull(
        message="3 requests are queued or running; retry shortly", unpinned=False)
    assert not ledger.admitted


def test_a_full_memory_queue_refuses_with_its_length():
    ledger = book(alone(SHORT), max_waiting=1)
    decide(ledger, "a", SHORT)
    decide(ledger, "b", SHORT)
    assert decide(ledger, "c", SHORT) == RefuseQueueFull(
        message="1 requests already wait for memory; retry shortly", unpinned=False)


# ---------------------------------------------------------------------------------------
# A blocked head


def settle_once(ledger, shape, *, cache_target=None, has_cache_index=True):
    head = ledger.blocked_head()
    return settle_step(ledger, FACTS, head, shape, prefill_step=STEP, cache_target=cache_target,
                       has_cache_index=has_cache_index)


def test_a_head_blocked_by_the_cache_gives_up_its_prefix_first_then_the_cache_is_cut():
    plain = WITH_PREFIX.without_prefix()
    ledger = book(alone(WITH_PREFIX) + 100)
    ledger.update(cache_bytes=200)
    assert isinstance(decide(ledger, "r", WITH_PREFIX), WaitForMemory)
    step = settle_once(ledger, WITH_PREFIX)
    assert step == DropPrefix(request_id="r", priced=Priced(cost=request_cost(FACTS, plain, STEP),
                                                            chunk=STEP))
    ledger.reprice("r", step.priced.cost)
    shortfall = ledger.shortfall_bytes()
    if shortfall:  # still short beside the cache: the cut is exactly the shortfall
        assert settle_once(ledger, plain) == ShrinkCache(budget_bytes=200 - shortfall)


def test_the_cache_is_cut_only_below_the_last_cut_asked_for():
    ledger = book(alone(SHORT))
    ledger.update(cache_bytes=1000)
    decide(ledger, "r", SHORT)
    assert settle_once(ledger, SHORT) == ShrinkCache(budget_bytes=0)
    assert settle_once(ledger, SHORT, cache_target=0) == KeepWaiting()


def test_a_head_behind_running_work_waits():
    ledger = book(alone(SHORT) + 1)
    decide(ledger, "a", SHORT)
    decide(ledger, "b", SHORT)
    assert settle_once(ledger, SHORT) == KeepWaiting()


def test_a_head_the_moved_budget_no_longer_fits_is_refused_with_the_reason():
    ledger = book(alone(SHORT) + 1)
    decide(ledger, "a", SHORT)
    decide(ledger, "b", SHORT)
    ledger.update(budget_bytes=WEIGHTS + alone(SHORT) - 1)
    step = settle_once(ledger, SHORT)
    assert isinstance(step, RefuseHead) and step.request_id == "b"
    assert step.message.startswith(f"request needs {alone(SHORT)} bytes")
    assert step.message.endswith("(the budget moved while it waited)")


def test_without_a_cache_index_a_head_blocked_by_the_cache_is_refused():
    ledger = book(alone(SHORT))
    ledger.update(cache_bytes=10)
    decide(ledger, "r", SHORT)
    assert settle_once(ledger, SHORT, has_cache_index=False) == RefuseHead(
        request_id="r", message="it lacks 10 bytes and nothing running will free them")


# ---------------------------------------------------------------------------------------
# Memory pressure


def reading(**kw) -> PressureReading:
    calm = {"pressure": False, "hard": False, "budget_bytes": 5000, "under_pressure": False,
            "prefill_step": 512, "normal_prefill_step": 512, "prefill_step_floor": 64,
            "prefix_cache_bytes": 4000, "cache_target": None, "cache_shrunk": False,
            "floor_priced": False, "waiting": False, "has_cache_index": True}
    calm.update(kw)
    return PressureReading(**calm)


def test_a_calm_reading_only_updates_the_ledger():
    assert pressure_actions(reading()) == [
        SetUnderPressure(pressure=False), UpdateLedger(budget_bytes=5000, paused=False)]


def test_first_pressure_halves_the_chunk_and_cuts_the_cache_to_a_quarter():
    assert pressure_actions(reading(pressure=True)) == [
        SetPrefillStep(tokens=256),
        SetUnderPressure(pressure=True),
        SendCacheBudget(budget_bytes=1000),
        UpdateLedger(budget_bytes=5000, paused=False),
    ]


def test_lasting_hard_pressure_halves_down_to_the_floor_and_pauses_admission():
    assert pressure_actions(reading(pressure=True, hard=True, under_pressure=True,
                                    prefill_step=100)) == [
        SetPrefillStep(tokens=64),
        SetUnderPressure(pressure=True),
        UpdateLedger(budget_bytes=5000, paused=True),
    ]
    assert SetPrefillStep(tokens=64) not in pressure_actions(
        reading(pressure=True, under_pressure=True, prefill_step=64))


def test_the_pressure_cut_never_undoes_a_smaller_cut_made_for_the_queue():
    assert SendCacheBudget(budget_bytes=300) in pressure_actions(
        reading(pressure=True, cache_target=300))


def test_calm_again_restores_the_chunk_and_the_cache():
    assert pressure_actions(reading(under_pressure=True, prefill_step=64)) == [
        SetPrefillStep(tokens=512),
        ForgetCacheCut(),
        SetUnderPressure(pressure=False),
        SendCacheBudget(budget_bytes=4000),
        UpdateLedger(budget_bytes=5000, paused=False),
    ]


def test_calm_keeps_floor_chunks_for_a_floor_priced_request_and_the_cut_for_a_waiting_one():
    assert pressure_actions(reading(under_pressure=True, prefill_step=64, floor_priced=True,
                                    waiting=True)) == [
        SetUnderPressure(pressure=False), UpdateLedger(budget_bytes=5000, paused=False)]


def test_a_cut_made_for_the_queue_is_forgotten_once_nothing_waits():
    assert pressure_actions(reading(cache_shrunk=True, cache_target=10))[:2] == [
        ForgetCacheCut(), SetUnderPressure(pressure=False)]


def test_without_a_cache_index_nothing_is_sent_to_it():
    for r in (reading(pressure=True), reading(under_pressure=True)):
        assert not any(isinstance(a, SendCacheBudget)
                       for a in pressure_actions(attrs.evolve(r, has_cache_index=False)))


# ---------------------------------------------------------------------------------------
# The queue's time bound


def test_requests_that_waited_max_wait_are_overdue_and_the_oldest_sets_the_next_expiry():
    arrivals = {"old": 10.0, "edge": 12.0, "new": 13.5}
    assert overdue(arrivals, now=14.0, max_wait_s=2.0) == ["old", "edge"]
    assert next_expiry(arrivals.values(), max_wait_s=2.0) == 12.0
    assert next_expiry([], max_wait_s=2.0) is None


# ---------------------------------------------------------------------------------------
# The invariant


def batch_bytes(costs) -> int:
    """The padded batch's bytes, computed here and not by the ledger under test."""
    return padded_batch_cost(FACTS, PREFILL_ROWS)(list(costs))


# About three mid-sized requests' worth beside the weights: some fit together, some alone,
# some never.
AVAILABLE = 96 << 20

shapes = st.builds(
    RequestShape,
    prompt_tokens=st.integers(1, 1500),
    max_tokens=st.integers(0, 1200),
    prefix_blocks=st.integers(0, 20),
    block_size=st.just(BLOCK),
)


class AdmissionPolicyMachine(RuleBasedStateMachine):
    """The executor's whole policy driven at random - new requests (`decide_submit`),
    finishes, requests leaving the queue, prefixes evicted (repricing), budget moves, cache
    reports, pressure readings (`pressure_actions`, applied as the shell applies them) and
    settling (`settle_step` until the head waits).

    Invariant: whenever the admitted set gains a request, the padded batch of the admitted
    set plus the prefix cache fits what the budget leaves beside the weights and MLX's
    reserve. (A budget moved down may leave earlier admissions above it - a running request
    is never killed - but then nothing new gets in until they fit.)"""

    def __init__(self):
        super().__init__()
        self.reserved = 4096
        self.ledger = book(AVAILABLE, reserved=self.reserved)
        self.shapes: dict[str, RequestShape] = {}
        self.next_id = 0
        self.prefill_step = STEP
        self.floor_priced: set[str] = set()
        self.under_pressure = False
        self.cache_target: int | None = None
        self.cache_shrunk = False
        self.seen_admitted: set[str] = set()

    # -- what the shell does with the policy's answers

    def use_chunk(self, request_id: str, chunk: int) -> None:
        if chunk != self.prefill_step:
            self.floor_priced.add(request_id)
            self.prefill_step = chunk

    def forget(self, request_id: str) -> None:
        self.ledger.finish(request_id)
        self.shapes.pop(request_id, None)
        self.floor_priced.discard(request_id)
        if not self.floor_priced and not self.under_pressure:
            self.prefill_step = STEP

    def evict_cache_to(self, budget: int) -> None:
        if self.ledger.cache_bytes > budget:  # the index holds no more than its budget
            self.ledger.update(cache_bytes=budget)

    # -- rules

    @rule(request=shapes)
    def submit(self, request):
        self.next_id += 1
        request_id = f"r{self.next_id}"
        decision = decide_submit(self.ledger, FACTS, request_id, request,
                                 prefill_step=self.prefill_step,
                                 requests=len(self.ledger.admitted) + len(self.ledger.waiting),
                                 max_requests=6)
        match decision:
            case RunNow(priced=priced) | WaitForMemory(priced=priced):
                self.shapes[request_id] = request.without_prefix() if decision.unpinned else request
                self.use_chunk(request_id, priced.chunk)

    @precondition(lambda self: self.ledger.admitted)
    @rule(data=st.data())
    def finish(self, data):
        self.forget(data.draw(st.sampled_from(sorted(self.ledger.admitted))))

    @precondition(lambda self: self.ledger.waiting)
    @rule(data=st.data())
    def leave_the_queue(self, data):
        self.forget(data.draw(st.sampled_from(sorted(r for r, _ in self.ledger.waiting))))

    @precondition(lambda self: self.ledger.waiting)
    @rule(data=st.data())
    def prefix_evicted(self, data):
        request_id = data.draw(st.sampled_from(sorted(r for r, _ in self.ledger.waiting)))
        plain = self.shapes[request_id].without_prefix()
        self.shapes[request_id] = plain
        priced = price(self.ledger, FACTS, request_id, plain, prefill_step=self.prefill_step)
        if not isinstance(priced, Refused):
            self.use_chunk(request_id, priced.chunk)
            self.ledger.reprice(request_id, priced.cost)

    @rule(available=st.integers(0, 2 * AVAILABLE))
    def budget_moves(self, available):
        self.ledger.update(budget_bytes=WEIGHTS + self.reserved + available)

    @rule(cache=st.integers(0, AVAILABLE // 2))
    def cache_reported(self, cache):
        self.ledger.update(cache_bytes=cache)

    @rule(level=st.sampled_from(["ok", "soft", "hard"]), available=st.integers(0, 2 * AVAILABLE))
    def pressure_reading(self, level, available):
        reading = PressureReading(
            pressure=level != "ok", hard=level == "hard",
            budget_bytes=WEIGHTS + self.reserved + available,
            under_pressure=self.under_pressure, prefill_step=self.prefill_step,
            normal_prefill_step=STEP, prefill_step_floor=PREFILL_STEP_FLOOR,
            prefix_cache_bytes=AVAILABLE // 2, cache_target=self.cache_target,
            cache_shrunk=self.cache_shrunk, floor_priced=bool(self.floor_priced),
            waiting=bool(self.ledger.waiting), has_cache_index=True)
        for action in pressure_actions(reading):
            match action:
                case SetPrefillStep(tokens=tokens):
                    self.prefill_step = tokens
                case ForgetCacheCut():
                    self.cache_target, self.cache_shrunk = None, False
                case SetUnderPressure(pressure=pressure):
                    self.under_pressure = pressure
                case SendCacheBudget(budget_bytes=budget):
                    self.evict_cache_to(budget)
                case UpdateLedger(budget_bytes=budget, paused=paused):
                    self.ledger.update(budget_bytes=budget, paused=paused)
        self.settle()

    @rule()
    def settle(self):
        for _ in range(3 * (len(self.ledger.waiting) + 2)):
            head = self.ledger.blocked_head()
            if head is None:
                return
            match settle_step(self.ledger, FACTS, head, self.shapes[head.request_id],
                              prefill_step=self.prefill_step, cache_target=self.cache_target,
                              has_cache_index=True):
                case DropPrefix(request_id=request_id, priced=priced):
                    self.shapes[request_id] = self.shapes[request_id].without_prefix()
                    self.use_chunk(request_id, priced.chunk)
                    self.ledger.reprice(request_id, priced.cost)
                case ShrinkCache(budget_bytes=budget):
                    self.cache_target, self.cache_shrunk = budget, True
                    self.evict_cache_to(budget)
                case KeepWaiting():
                    return
                case RefuseHead(request_id=request_id):
                    self.forget(request_id)
        raise AssertionError("settling did not converge")

    # -- invariants

    @invariant()
    def admitting_never_exceeds_the_budget(self):
        admitted = set(self.ledger.admitted)
        if admitted - self.seen_admitted:
            committed = batch_bytes(self.ledger.admitted.values()) + self.ledger.cache_bytes
            left = self.ledger.budget_bytes - WEIGHTS - self.reserved
            assert committed <= left, (
                f"admitted {sorted(admitted - self.seen_admitted)}: {committed} bytes "
                f"committed, {left} left beside the weights and the reserve")
        self.seen_admitted = admitted

    @invariant()
    def the_ledger_is_consistent(self):
        self.ledger.check_invariants()
        assert all(isinstance(c, RequestCost) for c in self.ledger.admitted.values())
        assert PREFILL_STEP_FLOOR <= self.prefill_step <= STEP


TestAdmissionPolicyMachine = AdmissionPolicyMachine.TestCase
