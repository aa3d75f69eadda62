"""The admission ledger on plain numbers."""

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from omlx_actors.memory.admission import (
    AdmissionLedger,
    Admitted,
    Queued,
    QueueFullRefusal,
    Refused,
    RequestCost,
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
    assert book.submit("long", cost(400)) == Admitted(request_id="long")
    # Alone it would fit (10 bytes); beside the long row it costs 400.
    assert book.submit("short", cost(10)) == Admitted(request_id="short")
    assert book.committed_bytes == 800
    assert isinstance(book.submit("third", cost(10)), Queued)


def test_what_can_never_fit_is_refused_with_the_numbers():
    decision = ledger().submit("big", cost(901))
    assert isinstance(decision, Refused)
    assert (decision.needed_bytes, decision.available_bytes) == (901, 900)


def test_what_fits_the_budget_but_not_now_waits_then_runs_when_room_frees():
    book = ledger()
    assert book.submit("a", cost(600)) == Admitted(request_id="a")
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
    assert book.submit("a", cost(10)) == Admitted(request_id="a")  # nothing running: admit
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


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.book = ledger(max_waiting=4)
        self.next_id = 0

    @rule(estimate=st.integers(0, 1200))
    def submit(self, estimate):
        self.next_id += 1
        self.book.submit(f"r{self.next_id}", cost(estimate))

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
        # except the one rule: with nothing running, the head runs if it fits alone.
        requests = sum(c.context_tokens for c in self.book.admitted.values())
        if len(self.book.admitted) > 1:
            assert requests <= self.book.available_bytes


TestLedgerMachine = LedgerMachine.TestCase
