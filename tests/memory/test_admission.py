"""The admission ledger on plain numbers."""

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from omlx_actors.memory.admission import (
    AdmissionLedger,
    BlockedHead,
    Granted,
    HeadAction,
    Queued,
    QueueFullRefusal,
    Refused,
    RequestCost,
    unblock,
    unpadded_batch_cost,
)


def ledger(**kw):
    base = dict(weights_bytes=100, budget_bytes=1000, reserved_bytes=0, max_waiting=2,
                batch_cost=unpadded_batch_cost(1))
    base.update(kw)
    return AdmissionLedger(**base)


def cost(n):
    return RequestCost(context_tokens=n, other_bytes=0)


def padded(requests):
    """Rows padded to the longest, as mlx-lm's batch caches are."""
    return len(requests) * max((r.context_tokens for r in requests), default=0)


def test_a_batch_is_priced_padded_to_its_longest_row():
    book = ledger(batch_cost=padded, max_waiting=5)
    assert book.submit("long", cost(400)) == Granted(request_id="long")
    # Alone it would fit (10 bytes); beside the long row it costs 400.
    assert book.submit("short", cost(10)) == Granted(request_id="short")
    assert book.committed_bytes == 800
    assert isinstance(book.submit("third", cost(10)), Queued)


def test_what_can_never_fit_is_refused_with_the_numbers():
    decision = ledger().submit("big", cost(901))
    assert isinstance(decision, Refused)
    assert (decision.needed_bytes, decision.available_bytes) == (901, 900)


def test_what_fits_the_budget_but_not_now_waits_then_runs_when_room_frees():
    book = ledger()
    assert book.submit("a", cost(600)) == Granted(request_id="a")
    assert book.submit("b", cost(600)) == Queued(request_id="b", position=1)
    assert book.finish("a") == ["b"]
    assert book.admitted == {"b": cost(600)}


def test_queue_is_bounded():
    book = ledger()
    book.submit("a", cost(900))
    book.submit("b", cost(10))
    book.submit("c", cost(10))
    assert book.submit("d", cost(10)) == QueueFullRefusal(request_id="d", waiting=2)


def test_fifo_head_blocks_smaller_requests_behind_it():
    book = ledger(max_waiting=5)
    book.submit("a", cost(500))
    assert isinstance(book.submit("big", cost(800)), Queued)
    assert isinstance(book.submit("small", cost(10)), Queued)  # would fit, but must not overtake
    assert book.finish("a") == ["big", "small"]


def test_pause_holds_new_work_while_requests_run_but_never_deadlocks_when_idle():
    book = ledger(max_waiting=5)
    book.update(paused=True)
    assert book.submit("a", cost(10)) == Granted(request_id="a")  # nothing running: admit
    assert isinstance(book.submit("b", cost(10)), Queued)
    assert book.finish("a") == ["b"]


def test_prefix_cache_bytes_count_as_committed_and_shrinking_them_admits():
    book = ledger()
    book.update(cache_bytes=800)
    assert isinstance(book.submit("a", cost(200)), Queued)
    assert book.shortfall_bytes() == 100
    assert book.update(cache_bytes=700) == ["a"]


def test_leaving_the_queue_removes_a_waiting_request():
    book = ledger()
    book.submit("a", cost(900))
    book.submit("b", cost(100))
    book.finish("b")
    assert not book.waiting


def test_a_head_blocked_by_the_cache_it_pins_gives_its_prefix_up_then_the_cache_shrinks():
    # Issue #15, in numbers: nothing runs, the cache holds 98, the head fits alone (880 of
    # 900) but not beside the cache; priced without its prefix it costs 850.
    book = ledger()
    book.update(cache_bytes=98)
    assert isinstance(book.submit("r", cost(880)), Queued)
    head = book.blocked_head()
    assert head == BlockedHead(request_id="r", shortfall_bytes=78, cache_bytes=98, running=0,
                               fits_alone=True)
    assert unblock(head, has_prefix=True) is HeadAction.DROP_PREFIX
    assert book.reprice("r", cost(850)) == []
    head = book.blocked_head()
    assert head.shortfall_bytes == 850 + 98 - 900
    assert unblock(head, has_prefix=False) is HeadAction.SHRINK_CACHE
    assert book.update(cache_bytes=98 - head.shortfall_bytes) == ["r"]
    assert book.blocked_head() is None


def test_a_head_that_no_longer_fits_alone_is_refused_and_one_behind_running_work_waits():
    book = ledger(max_waiting=5)
    book.submit("a", cost(600))
    book.submit("b", cost(800))
    head = book.blocked_head()
    assert (head.request_id, head.running, head.fits_alone) == ("b", 1, True)
    assert unblock(head, has_prefix=False) is HeadAction.WAIT
    book.update(budget_bytes=800)  # the budget moved: "b" can never fit now
    assert unblock(book.blocked_head(), has_prefix=True) is HeadAction.REFUSE
    book.finish("a")
    assert unblock(book.blocked_head(), has_prefix=False) is HeadAction.REFUSE


def test_only_a_pause_holding_the_head_is_no_memory_block():
    book = ledger(max_waiting=5)
    book.submit("a", cost(10))
    book.update(paused=True)
    assert isinstance(book.submit("b", cost(10)), Queued)
    assert book.blocked_head() is None  # it waits for "a", which will finish
    assert book.finish("a") == ["b"]


# Moved from the estimator's tests when its second admission API (`decide_admission`) was
# removed (#17): the same edges, asked of the one ledger.


@pytest.mark.parametrize(
    ("estimate", "committed", "shortfall"),
    [
        (0, 0, None),
        (600, 0, None),  # weights 400 + 600 = budget exactly: fits
        (300, 300, None),  # committed + estimate = budget - weights exactly
        (301, 300, 1),
        (600, 1, 1),
        (600, 600, 600),
    ],
)
def test_admission_at_the_edges(estimate, committed, shortfall):
    book = ledger(weights_bytes=400, budget_bytes=1000)
    if committed:
        assert book.submit("running", cost(committed)) == Granted(request_id="running")
    decision = book.submit("new", cost(estimate))
    if shortfall is None:
        assert decision == Granted(request_id="new")
    else:
        assert decision == Queued(request_id="new", position=1)
        assert book.shortfall_bytes() == shortfall


def test_a_request_that_can_never_fit_is_refused_with_the_budget_weights_and_reserve():
    book = ledger(weights_bytes=400 << 20, budget_bytes=1000 << 20)
    assert book.submit("big", cost(601 << 20)) == Refused(
        request_id="big",
        reason="request needs 630194176 bytes but the memory budget of 1048576000 bytes "
        "leaves 629145600 beside the weights (419430400) and the reserve (0)",
        needed_bytes=601 << 20,
        available_bytes=600 << 20,
    )


def test_reserved_bytes_are_held_back_from_requests():
    book = ledger(weights_bytes=400, budget_bytes=1000, reserved_bytes=100)
    assert book.submit("fits", cost(500)) == Granted(request_id="fits")
    refused = ledger(weights_bytes=400, budget_bytes=1000, reserved_bytes=100).submit(
        "over", cost(501))
    assert isinstance(refused, Refused)
    assert refused.available_bytes == 500
    assert refused.reason.endswith("and the reserve (100)")


def test_weights_larger_than_the_budget_refuse_everything():
    decision = ledger(weights_bytes=200, budget_bytes=100).submit("empty", cost(0))
    assert isinstance(decision, Refused)
    assert decision.available_bytes == 0


def test_a_negative_cost_is_refused():
    with pytest.raises(ValueError, match="'context_tokens' must be >= 0: -1"):
        RequestCost(context_tokens=-1, other_bytes=0)
    with pytest.raises(ValueError, match="'other_bytes' must be >= 0: -1"):
        RequestCost(context_tokens=0, other_bytes=-1)


class LedgerMachine(RuleBasedStateMachine):
    """Random submits, finishes, repricings and budget / cache / pause changes; after each
    `settle` (the executor's loop over `unblock`, with the cache giving bytes back at once)
    no request waits unless something runs: a queued request never waits forever."""

    def __init__(self):
        super().__init__()
        self.book = ledger(max_waiting=4)
        self.next_id = 0
        self.with_prefix: dict[str, int] = {}  # waiting id -> its price without its prefix
        self.refused: set[str] = set()
        self.seen_admitted: set[str] = set()

    @rule(estimate=st.integers(0, 1200), plain=st.one_of(st.none(), st.integers(0, 1200)))
    def submit(self, estimate, plain):
        self.next_id += 1
        request_id = f"r{self.next_id}"
        decision = self.book.submit(request_id, cost(estimate))
        if isinstance(decision, Queued) and plain is not None:
            self.with_prefix[request_id] = plain

    @rule(budget=st.integers(150, 1300))
    def budget_moves(self, budget):
        self.book.update(budget_bytes=budget)

    @rule()
    def settle(self):
        for _ in range(3 * (len(self.book.waiting) + 2)):
            head = self.book.blocked_head()
            if head is None:
                break
            match unblock(head, has_prefix=head.request_id in self.with_prefix):
                case HeadAction.WAIT:
                    break
                case HeadAction.DROP_PREFIX:
                    self.book.reprice(head.request_id, cost(self.with_prefix.pop(head.request_id)))
                case HeadAction.SHRINK_CACHE:
                    self.book.update(cache_bytes=max(0, head.cache_bytes - head.shortfall_bytes))
                case HeadAction.REFUSE:
                    self.refused.add(head.request_id)
                    self.book.finish(head.request_id)
        else:
            raise AssertionError("settling did not converge")
        assert not self.book.waiting or self.book.admitted, "a request waits on nothing"
        for request_id in self.refused:
            assert request_id not in self.book.admitted

    @rule(data=st.data())
    def finish(self, data):
        ids = list(self.book.admitted) + [r for r, _ in self.book.waiting]
        if ids:
            self.book.finish(data.draw(st.sampled_from(ids)))

    @rule(cache=st.integers(0, 1000), paused=st.booleans())
    def update(self, cache, paused):
        self.book.update(cache_bytes=cache, paused=paused)

    @invariant()
    def consistent(self):
        self.book.check_invariants()

    @invariant()
    def never_over_budget_because_of_admission(self):
        # Admitting never pushes requests past what the budget leaves beside the weights,
        # except the one rule: with nothing running, the head runs if it fits alone. (A
        # budget moved down may leave earlier admissions above it; then nothing new gets in.)
        admitted = set(self.book.admitted)
        if admitted - self.seen_admitted and len(admitted) > 1:
            requests = sum(c.context_tokens for c in self.book.admitted.values())
            assert requests + self.book.cache_bytes <= self.book.available_bytes
        self.seen_admitted = admitted


TestLedgerMachine = LedgerMachine.TestCase
