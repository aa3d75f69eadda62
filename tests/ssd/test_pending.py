"""The SSD writer's write-behind bookkeeping on plain data: the pending queue, and the
cleanup barriers that cancel saves a cleanup found still in the save inbox."""

from __future__ import annotations

from omlx_actors.ssd.pending import CleanupBarriers, PendingSaves

from .helpers import make_save


def test_a_cleanup_cancels_exactly_the_saves_of_its_scope_still_queued():
    barriers = CleanupBarriers()
    assert barriers.arrived("a") is False  # received before the cleanup
    barriers.cleanup("a", queued=3)  # the next three to arrive were queued then
    assert [barriers.arrived(s) for s in ("a", "b", "a")] == [True, False, True]
    assert barriers.arrived("a") is False  # sent after the cleanup: written
    assert barriers.received == 5


def test_a_cleanup_with_nothing_queued_leaves_later_saves_alone():
    barriers = CleanupBarriers()
    barriers.cleanup("a", queued=0)
    assert barriers.arrived("a") is False


def test_a_cleanup_of_everything_cancels_every_queued_save_whatever_its_scope():
    barriers = CleanupBarriers()
    barriers.cleanup("a", queued=5)
    barriers.cleanup_all(queued=2)
    assert [barriers.arrived(s) for s in ("x", "a", "a")] == [True, True, False]


def test_pending_serves_the_newest_save_of_a_hash_until_its_last_copy_is_settled():
    pending = PendingSaves()
    first, second = make_save(1, scope="a"), make_save(1, scope="b")
    pending.append(first)
    pending.append(second)
    assert pending.get(first.hash) is second and len(pending) == 2
    assert pending.pop_oldest() is first and first.hash in pending
    assert pending.pop_oldest() is second and first.hash not in pending


def test_discarding_a_scope_keeps_the_others_in_order():
    pending = PendingSaves()
    saves = [make_save(i, scope=s) for i, s in enumerate(("a", "b", "a", "c"))]
    for save in saves:
        pending.append(save)
    assert pending.discard(lambda save: save.scope != "a") == 2
    assert [pending.pop_oldest() for _ in range(len(pending))] == [saves[1], saves[3]]
