"""The deferred buffer-cache clear window (seed 000), as pure bookkeeping."""

from hypothesis import given
from hypothesis import strategies as st

from omlx_actors.engine.lifetime import CLEAR_DELAY_STEPS, ClearSchedule, RetiredRefs


def test_two_completions_in_consecutive_steps_clear_delay_steps_after_the_second():
    schedule = ClearSchedule(delay=CLEAR_DELAY_STEPS)
    schedule.note_finished(10)
    schedule.note_finished(11)
    due = [step for step in range(10, 20) if schedule.due(step)]
    assert due[0] == 11 + CLEAR_DELAY_STEPS


def test_a_later_completion_never_shortens_a_pending_window():
    schedule = ClearSchedule(delay=5)
    schedule.note_finished(20)
    schedule.note_finished(3)  # reported late: must not pull the clear earlier
    assert schedule.clear_at == 25


def test_clear_is_not_due_without_a_completion_and_resets_after_clearing():
    schedule = ClearSchedule(delay=2)
    assert not schedule.due(100)
    schedule.note_finished(1)
    assert schedule.due(3)
    schedule.mark_cleared()
    assert not schedule.due(1000)


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=50),
       st.integers(min_value=0, max_value=8))
def test_clear_at_is_the_latest_finish_plus_delay(finish_steps, delay):
    schedule = ClearSchedule(delay=delay)
    for step in finish_steps:
        schedule.note_finished(step)
    assert schedule.clear_at == max(finish_steps) + delay
    assert not schedule.due(max(finish_steps) + delay - 1)


def test_retired_refs_hold_until_released():
    refs = RetiredRefs()
    marker = object()
    refs.retire(4, marker)
    assert len(refs) == 1
    assert refs.release() == 1
    assert len(refs) == 0
