"""The pure recovery policy: continuations, event rewriting, and the poison rule - on plain
data, with a hypothesis state machine for its invariants and a simulated crashing engine
for its verdicts."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from omlx_actors.engine.messages import (
    Admitted,
    Finished,
    FinishReason,
    PrefillProgress,
    SamplingParams,
    Submit,
    TokenChoice,
    TokenDelta,
)
from omlx_actors.isolation.recovery import (
    CRASH_LOOP_ERROR_TYPE,
    POISON_DEATHS,
    Recovery,
)
from omlx_actors.isolation.restarts import cooldown_s


def submit(rid: str, prompt=(5, 6, 7), max_tokens: int = 8, stop=(1,)) -> Submit:
    return Submit(request_id=rid, prompt_tokens=tuple(prompt), max_tokens=max_tokens,
                  sampling=SamplingParams(temperature=0.7, seed=3), stop_token_ids=tuple(stop),
                  cached_blocks=("a", "b"), cache_scope="s")


def token(rid: str, tok: int = 9) -> TokenDelta:
    return TokenDelta(request_id=rid, tokens=(TokenChoice(token=tok),), step=0)


def sent(recovery: Recovery, *rids: str) -> None:
    for rid in rids:
        recovery.track(submit(rid))
        recovery.mark_sent(rid)


def test_a_continuation_is_the_prompt_plus_what_was_delivered():
    r = Recovery()
    sent(r, "a")
    r.on_event(token("a", 11))
    r.on_event(token("a", 12))
    r.on_death()
    cont = r.continuation("a")
    assert cont.prompt_tokens == (5, 6, 7, 11, 12)
    assert cont.max_tokens == 6
    assert cont.sampling == SamplingParams(temperature=0.7, seed=3)
    assert cont.stop_token_ids == (1,) and cont.cache_scope == "s"
    assert cont.cached_blocks == ()  # looked up again in the new engine
    assert r.resumed_total == 1


def test_a_request_that_already_ended_gets_the_finished_the_engine_did_not_send():
    r = Recovery()
    sent(r, "stop", "full")
    r.on_event(token("stop", 1))  # its stop token arrived, its Finished did not
    for _ in range(8):
        r.on_event(token("full"))
    r.on_death()
    stop, full = r.continuation("stop"), r.continuation("full")
    assert isinstance(stop, Finished) and stop.reason is FinishReason.STOP
    assert stop.completion_tokens == 1 and stop.prompt_tokens == 3
    assert isinstance(full, Finished) and full.reason is FinishReason.LENGTH
    assert full.completion_tokens == 8
    assert r.tracked == {}


def test_a_continuation_finishes_counted_as_the_original_request():
    r = Recovery()
    sent(r, "a")
    r.on_event(token("a"))
    r.on_event(token("a"))
    r.on_death()
    r.continuation("a")
    r.mark_sent("a")
    (done,) = r.on_event(Finished(request_id="a", reason=FinishReason.LENGTH, prompt_tokens=5,
                                  completion_tokens=6, cached_tokens=5))
    assert (done.prompt_tokens, done.completion_tokens, done.cached_tokens) == (3, 8, 3)
    assert "a" not in r.tracked


def test_the_session_sees_admitted_once_and_prefill_progress_only_forward():
    r = Recovery()
    sent(r, "a")
    assert r.on_event(Admitted(request_id="a", queued_s=0.0))
    assert r.on_event(PrefillProgress(request_id="a", done=2, total=3))
    r.on_death()
    r.mark_sent("a")
    assert r.on_event(Admitted(request_id="a", queued_s=0.0)) == ()
    assert r.on_event(PrefillProgress(request_id="a", done=2, total=3)) == ()
    assert r.on_event(PrefillProgress(request_id="a", done=3, total=3))
    r.on_event(token("a"))
    r.on_death()
    r.mark_sent("a")
    # A continuation's prompt is longer than the session's: its progress is not shown.
    assert r.on_event(PrefillProgress(request_id="a", done=4, total=4)) == ()


def test_events_of_untracked_requests_pass_through_unchanged():
    r = Recovery()
    event = token("gone")
    assert r.on_event(event) == (event,)


def test_the_only_unproven_request_in_the_dying_step_twice_is_failed():
    r = Recovery()
    sent(r, "poison", "good")
    r.on_event(token("good"))  # good ran steps on this engine: the death is not its first
    assert r.on_death({"poison", "good"}) == ()
    r.mark_sent("poison"), r.mark_sent("good")
    r.on_event(token("good"))
    (failure,) = r.on_death({"poison", "good"})
    assert failure.request_id == "poison" and failure.error_type == CRASH_LOOP_ERROR_TYPE
    assert "died 2 times, with no token for it in between" in failure.error
    assert set(r.tracked) == {"good"} and not r.holding
    assert r.sendable() == ("good",)
    assert r.poisoned_total == 1


def test_a_death_outside_a_step_strikes_nobody():
    """Issue #15 (2): requests sent to an engine that died before running them (killed
    right after it said ready), or while it loaded, are not suspects, however often."""
    r = Recovery()
    sent(r, "a", "b")
    for _ in range(5):
        assert r.on_death(frozenset()) == ()
        assert not r.holding and set(r.sendable()) == {"a", "b"}
        for rid in r.sendable():
            r.mark_sent(rid)
    assert all(t.strikes == 0 for t in r.tracked.values())


def test_a_request_merely_waiting_beside_the_step_is_not_struck():
    r = Recovery()
    sent(r, "running", "waiting")
    for _ in range(3):
        r.on_death({"running"})
        for rid in r.sendable():
            r.mark_sent(rid)
    assert r.tracked["waiting"].strikes == 0


def test_a_token_resets_the_count_so_only_consecutive_deaths_count():
    r = Recovery()
    sent(r, "a")
    for _ in range(3):
        assert r.on_death({"a"}) == ()
        r.mark_sent("a")
        r.on_event(token("a"))


def die_together(r: Recovery, deaths: int) -> None:
    """`deaths` engine deaths inside a step of every sent request, all resent in between."""
    for death in range(deaths):
        if death:
            for rid in r.sendable():
                r.mark_sent(rid)
        assert r.on_death({rid for rid, t in r.tracked.items() if t.sent}) == ()


def test_shared_suspects_are_proven_alone_one_at_a_time():
    r = Recovery()
    sent(r, "x", "y", "z")
    die_together(r, POISON_DEATHS)
    # All three were in both fatal batches: one at a time, each alone.
    assert r.holding and r.probation == "x" and r.sendable() == ("x",)
    r.mark_sent("x")
    r.track(submit("late"))  # arrives during probation: held
    assert r.sendable() == ()
    r.check()
    r.on_event(token("x"))  # proven: y goes next, alone (x keeps running: it is proven)
    assert r.probation == "y" and r.sendable() == ("y",)
    r.mark_sent("y")
    # y kills the engine in its first step, beside x (which has run on this engine).
    assert r.on_death({"x", "y"}) == ()
    assert r.probation == "y" and r.sendable() == ("y",)  # alone again: x is held too
    r.mark_sent("y")
    (failure,) = r.on_death({"y"})  # twice alone in the dying step: it is the cause
    assert failure.request_id == "y"
    assert r.probation == "z" and r.sendable() == ("z",)
    r.mark_sent("z")
    r.on_event(Finished(request_id="z", reason=FinishReason.STOP, prompt_tokens=3,
                        completion_tokens=1))
    assert not r.holding
    assert set(r.sendable()) == {"x", "late"}


def test_aborting_the_probationer_moves_probation_on():
    r = Recovery()
    sent(r, "x", "y")
    die_together(r, POISON_DEATHS)
    assert r.probation == "x"
    r.untrack("x")
    assert r.probation == "y"
    r.untrack("y")
    assert not r.holding


# ------------------------------------------------------------------------------------------
# A simulated engine that dies at any step while the poison request is in it.


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 12), poison=st.integers(0, 11), arrivals=st.integers(0, 12),
       max_tokens=st.integers(1, 6))
def test_simulated_crash_loop_fails_only_the_poison_and_finishes_the_rest(
        count, poison, arrivals, max_tokens):
    poison %= count
    r = Recovery()
    outcome: dict[str, str] = {}
    names = [f"r{i}" for i in range(count)]
    # The first `arrivals` requests are running when the poison arrives; the rest come after.
    order = names[:min(arrivals, count)]
    order += [n for n in names if n not in order]
    deaths = 0
    for name in order:
        r.track(submit(name, max_tokens=max_tokens))
    for _ in range(200):
        for rid in r.sendable():
            cont = r.continuation(rid) if r.tracked[rid].delivered else None
            if isinstance(cont, Finished):
                outcome[rid] = cont.reason.value
                continue
            r.mark_sent(rid)
        running = [rid for rid, t in r.tracked.items() if t.sent]
        if not r.tracked:
            break
        if names[poison] in running:
            deaths += 1
            for failure in r.on_death(set(running)):
                outcome[failure.request_id] = failure.error_type
            r.check()
            continue
        for rid in running:  # one step: every running request gets a token
            r.on_event(token(rid))
            if len(r.tracked[rid].delivered) == max_tokens:
                (done,) = r.on_event(Finished(request_id=rid, reason=FinishReason.LENGTH,
                                              prompt_tokens=3, completion_tokens=1))
                outcome[rid] = done.reason.value
        r.check()
    assert outcome[names[poison]] == CRASH_LOOP_ERROR_TYPE
    assert all(outcome[n] == "length" for n in names if n != names[poison])
    # K deaths in the shared batch make it a suspect, K more alone on probation fail it.
    assert deaths <= 2 * POISON_DEATHS


# ------------------------------------------------------------------------------------------
# Any interleaving: the invariants hold and every request ends exactly once.


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.r = Recovery()
        self.next_id = 0
        self.ended: set[str] = set()
        self.alone: dict[str, int] = {}  # alone strikes since the last token (the model)

    @rule()
    def submit_one(self):
        rid = f"q{self.next_id}"
        self.next_id += 1
        self.r.track(submit(rid, max_tokens=4))

    @rule()
    def send_what_may_go(self):
        for rid in self.r.sendable():
            cont = self.r.continuation(rid)
            if isinstance(cont, Finished):
                self._end(rid)
            else:
                self.r.mark_sent(rid)

    @precondition(lambda self: any(t.sent for t in self.r.tracked.values()))
    @rule(data=st.data())
    def token_for_a_running_request(self, data):
        rid = data.draw(st.sampled_from(sorted(k for k, t in self.r.tracked.items() if t.sent)))
        self.r.on_event(token(rid))
        self.alone.pop(rid, None)

    @precondition(lambda self: any(t.sent for t in self.r.tracked.values()))
    @rule(data=st.data())
    def finish_a_running_request(self, data):
        rid = data.draw(st.sampled_from(sorted(k for k, t in self.r.tracked.items() if t.sent)))
        self.r.on_event(Finished(request_id=rid, reason=FinishReason.STOP, prompt_tokens=3,
                                 completion_tokens=1))
        self._end(rid)

    @precondition(lambda self: bool(self.r.tracked))
    @rule(data=st.data())
    def abort_one(self, data):
        rid = data.draw(st.sampled_from(sorted(self.r.tracked)))
        assert self.r.untrack(rid) is not None
        self._end(rid)

    @rule(data=st.data())
    def engine_dies(self, data):
        # In a step: any subset of what was sent (the rest waited, or it was idle).
        sent = sorted(rid for rid, t in self.r.tracked.items() if t.sent)
        in_step = data.draw(st.sets(st.sampled_from(sent)) if sent else st.just(set()))
        unproven = [rid for rid in in_step if not self._ran_here(rid)]
        for rid in list(self.alone):
            if rid not in self.r.tracked:
                del self.alone[rid]
        for rid in in_step:
            if unproven == [rid]:
                self.alone[rid] = self.alone.get(rid, 0) + 1
        failures = self.r.on_death(in_step)
        # Failed exactly when it was alone in the dying step K times with no token between.
        assert {f.request_id for f in failures} == {
            rid for rid, n in self.alone.items() if n >= POISON_DEATHS}
        for failure in failures:
            self._end(failure.request_id)
            del self.alone[failure.request_id]

    def _ran_here(self, rid: str) -> bool:
        t = self.r.tracked[rid]
        return len(t.delivered) > t.base

    def _end(self, rid: str) -> None:
        assert rid not in self.ended, f"{rid} ended twice"
        self.ended.add(rid)

    @invariant()
    def invariants_hold(self):
        self.r.check()
        assert not (set(self.r.tracked) & self.ended)
        assert len(self.r.tracked) + len(self.ended) == self.next_id
        if self.r.probation is not None:
            assert self.r.sendable() in ((), (self.r.probation,))


TestRecoveryMachine = RecoveryMachine.TestCase
TestRecoveryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------------------------------
# The cool-down after a give-up (issue #15 (3)).


@given(base=st.floats(0.01, 100), cap=st.floats(0.01, 10_000), n=st.integers(1, 200))
def test_the_cool_down_doubles_at_each_give_up_and_is_capped(base, cap, n):
    assert cooldown_s(1, base, cap) == min(base, cap)
    assert cooldown_s(n, base, cap) <= cap
    assert cooldown_s(n + 1, base, cap) == min(cap, 2 * cooldown_s(n, base, cap)) or \
        cooldown_s(n + 1, base, cap) == cap
