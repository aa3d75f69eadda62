"""The engine core's table of admitted requests, on plain data (no model, no MLX)."""

from __future__ import annotations

from omlx_actors.engine.core_messages import CoreSubmit
from omlx_actors.engine.live_rows import LiveRequest, LiveRows
from omlx_actors.engine.messages import SamplingParams, Submit


def _live(slot: int, uid: int, prompt: tuple[int, ...] = (1, 2, 3), cached: int = 0) -> LiveRequest:
    submit = Submit(request_id=f"r{slot}", prompt_tokens=prompt, max_tokens=4)
    return LiveRequest(slot=slot, uid=uid, prompt_tokens=len(prompt), sampling=SamplingParams(),
                       command=CoreSubmit(slot, submit, received_at=0.0), cached_tokens=cached)


def test_a_request_is_found_by_slot_and_by_uid_until_it_is_removed():
    rows = LiveRows()
    a = _live(slot=7, uid=0)
    rows.add(a)
    assert rows.get(7) is a and rows.by_uid(0) is a
    assert dict(rows.slots_by_uid) == {0: 7}
    rows.remove(a)
    assert rows.get(7) is None and rows.by_uid(0) is None
    assert len(rows) == 0 and not rows


def test_a_re_admitted_request_answers_to_its_new_uid_only():
    rows = LiveRows()
    first = _live(slot=3, uid=10)
    rows.add(first)
    rows.remove(first)
    rows.add(_live(slot=3, uid=11))
    assert rows.by_uid(10) is None
    assert rows.by_uid(11).slot == 3


def test_iterating_while_removing_visits_every_request_in_admission_order():
    rows = LiveRows()
    for slot, uid in [(5, 0), (1, 1), (9, 2)]:
        rows.add(_live(slot, uid))
    visited = []
    for live in rows:
        visited.append(live.slot)
        rows.remove(live)
    assert visited == [5, 1, 9]
    assert len(rows) == 0


def test_waiting_counts_requests_whose_prefill_has_not_begun():
    rows = LiveRows()
    for slot in range(3):
        rows.add(_live(slot, uid=slot))
    rows.mark_started([0, 2, 99])  # 99 already finished: ignored
    assert rows.waiting() == 1


def test_pending_prompt_tokens_leave_out_cached_prefixes():
    rows = LiveRows()
    rows.add(_live(0, 0, prompt=tuple(range(10)), cached=4))
    rows.add(_live(1, 1, prompt=tuple(range(3))))
    assert rows.pending_prompt_tokens() == 6 + 3
    assert rows.request_ids() == ("r0", "r1")
    assert list(rows.prompts()) == [tuple(range(10)), tuple(range(3))]
    assert rows.uids() == [0, 1]


def test_request_ids_follow_every_add_and_remove_and_are_one_object_while_unchanged():
    rows = LiveRows()
    a, b = _live(0, 0), _live(1, 1)
    rows.add(a)
    first = rows.request_ids()
    assert first == ("r0",) and rows.request_ids() is first
    rows.add(b)
    assert rows.request_ids() == ("r0", "r1")
    rows.remove(a)
    assert rows.request_ids() == ("r1",)
    rows.remove(b)
    assert rows.request_ids() == ()
