"""The pure block index: matching, holds, refreshes and the leaf-first LRU eviction policy."""

from __future__ import annotations

import pytest

from omlx_actors.cache.index import BlockIndex, Eviction, StoredBlock


def block(h, parent=None, nbytes=10, generation=1, usable=True):
    return StoredBlock(hash=h, parent=parent, nbytes=nbytes, generation=generation, usable=usable)


def chain(*names, nbytes=10, generation=1):
    """Blocks of one chain, parents first."""
    return [
        block(name, names[i - 1] if i else None, nbytes, generation + i)
        for i, name in enumerate(names)
    ]


def evicted(evictions):
    return [e.hash for e in evictions]


def index_with(budget, *blocks):
    index = BlockIndex(budget)
    assert index.insert_all(blocks) == []
    index.check_invariants()
    return index


def test_match_counts_the_leading_run_of_present_blocks():
    index = index_with(100, *chain("a", "b", "c"))
    assert index.match(["a", "b", "c", "d"]) == 3
    assert index.match(["a", "b"]) == 2
    assert index.match(["a", "x", "c"]) == 1
    assert index.match(["x", "a"]) == 0
    assert index.match([]) == 0


def test_match_stops_before_an_unusable_snapshot():
    index = index_with(100, block("a"), block("b", "a", usable=False), block("c", "b"))
    assert index.match(["a", "b", "c"]) == 1
    assert index.acquire("r", ["a", "b", "c"]) == (1, [])
    assert index.holding("r") == ("a",)
    # The real snapshot replaces the placeholder (same generation: updated in place).
    assert index.insert(block("b", "a")) == []
    assert index.match(["a", "b", "c"]) == 3


def test_match_has_no_side_effects():
    index = index_with(20, block("a"), block("b"))
    assert index.match(["a"]) == 1
    assert (index.hits, index.misses, index.hit_blocks) == (0, 0, 0)
    # "a" was not made more recent by the match: it is still the first to go.
    assert evicted(index.insert(block("c"))) == ["a"]


def test_acquire_holds_the_matched_prefix_and_release_frees_it():
    index = index_with(100, *chain("a", "b", "c"))
    assert index.acquire("r1", ["a", "b", "x"]) == (2, [])
    assert index.acquire("r2", ["a"]) == (1, [])
    assert [index.refcount(h) for h in "abc"] == [2, 1, 0]
    assert index.referenced_bytes == 20
    index.check_invariants()
    assert index.release("r1") == []
    assert [index.refcount(h) for h in "abc"] == [1, 0, 0]
    assert index.release("r2") == []
    assert index.referenced_bytes == 0
    assert index.owners() == []
    index.check_invariants()


def test_release_of_an_owner_that_holds_nothing_is_harmless():
    index = index_with(100, block("a"))
    assert index.acquire("miss", ["x"]) == (0, [])
    assert index.release("miss") == []
    assert index.release("never-seen") == []
    assert index.refcount("a") == 0
    index.check_invariants()


def test_counters_count_hits_misses_and_hit_blocks():
    index = index_with(100, *chain("a", "b"))
    index.acquire("r1", ["a", "b"])
    index.acquire("r2", ["a", "z"])
    index.acquire("r3", ["z"])
    index.acquire("r4", [])
    assert (index.hits, index.misses, index.hit_blocks) == (2, 2, 3)
    assert (index.inserted, index.refreshed, index.evictions) == (2, 0, 0)


def test_reacquiring_replaces_the_previous_holding():
    index = index_with(100, *chain("a", "b", "c"), block("x"))
    index.acquire("r", ["a", "b", "c"])
    assert index.acquire("r", ["a", "b"]) == (2, [])
    assert index.holding("r") == ("a", "b")
    assert [index.refcount(h) for h in "abc"] == [1, 1, 0]
    assert index.acquire("r", ["x"]) == (1, [])
    assert [index.refcount(h) for h in "abcx"] == [0, 0, 0, 1]
    index.check_invariants()


def test_reacquiring_never_unpins_blocks_both_holdings_share():
    index = index_with(30, *chain("a", "b", "c"))
    index.acquire("r", ["a", "b", "c"])
    # The new holding keeps "a"; the released "b" and "c" become evictable (leaf first).
    assert index.acquire("r", ["a"]) == (1, [])
    assert [index.refcount(h) for h in "abc"] == [1, 0, 0]
    assert evicted(index.set_budget(10)) == ["c", "b"]
    assert "a" in index and index.refcount("a") == 1 and index.forced_evictions == 0
    index.check_invariants()


def test_referenced_blocks_survive_eviction_pressure():
    index = index_with(30, *chain("a", "b", "c"))
    index.acquire("r", ["a", "b"])
    for i in range(10):
        evictions = index.insert(block(f"n{i}", nbytes=10))
        assert not {"a", "b"} & set(evicted(evictions))
        index.check_invariants()
    assert "a" in index and "b" in index
    assert index.set_budget(20)  # evicts everything but the pinned blocks
    assert sorted(h for h in "abc" if h in index) == ["a", "b"]
    assert index.used_bytes == index.referenced_bytes == 20
    assert index.forced_evictions == 0
    index.check_invariants()


def test_leaves_are_evicted_before_their_parents():
    # "a" is the least recently stored, but evicting it would strand "b" and "c".
    index = index_with(30, *chain("a", "b", "c"))
    assert evicted(index.insert(block("d", nbytes=10))) == ["c"]
    assert evicted(index.insert(block("e", nbytes=10))) == ["b"]
    assert evicted(index.insert(block("f", nbytes=10))) == ["a"]
    index.check_invariants()


def test_least_recently_used_leaf_goes_first():
    index = index_with(40, block("root"), block("x", "root"), block("y", "root"), block("z"))
    # Leaves by recency: x, y, z (root has children). Release stamps y as most recent.
    index.acquire("r", ["root", "y"])
    index.release("r")
    assert evicted(index.insert(block("w"))) == ["x"]
    assert evicted(index.insert(block("v"))) == ["z"]
    index.check_invariants()


def test_a_chain_released_together_is_evicted_from_its_end():
    index = index_with(50, *chain("a", "b", "c"), block("old"))
    index.acquire("r", ["a", "b", "c"])
    index.release("r")
    assert evicted(index.set_budget(10)) == ["old", "c", "b"]
    assert index.match(["a", "b"]) == 1
    index.check_invariants()


def test_budget_shrink_evicts_down_to_budget():
    index = index_with(100, *chain("a", "b", "c"), *chain("p", "q"))
    assert index.used_bytes == 50
    evictions = index.set_budget(25)
    # The older chain is trimmed from its end; once "c" is gone, "b" is the oldest leaf.
    assert evicted(evictions) == ["c", "b", "a"]
    assert index.match(["p", "q"]) == 2
    assert index.used_bytes == 20 <= index.budget_bytes
    assert index.evictions == 3
    assert index.set_budget(0) and len(index) == 0 and index.used_bytes == 0
    index.check_invariants()


def test_a_budget_cut_below_the_pinned_bytes_evicts_held_blocks_from_the_chain_end():
    # Issue #15: the cache cut to 14 KB kept the 32 KB a waiting request held, so it stayed
    # over budget and the request waited for memory nothing would free. The budget wins.
    index = index_with(100, *chain("a", "b", "c"), block("x"))
    index.acquire("r", ["a", "b", "c"])
    index.acquire("s", ["a", "b"])
    assert evicted(index.set_budget(15)) == ["x", "c", "b"]
    assert index.used_bytes == 10 <= index.budget_bytes
    assert (index.holding("r"), index.holding("s")) == (("a",), ("a",))
    assert index.refcount("a") == 2
    assert (index.evictions, index.forced_evictions) == (3, 2)
    index.check_invariants()
    assert index.release("r") == [] and index.release("s") == []
    assert index.set_budget(0) == [Eviction(hash="a", generation=1, nbytes=10)]
    assert index.forced_evictions == 2  # "a" was no longer held
    index.check_invariants()


def test_a_held_block_grown_by_a_refresh_never_leaves_the_cache_over_budget():
    index = index_with(30, *chain("a", "b"))
    index.acquire("r", ["a", "b"])
    evictions = index.insert(block("b", "a", nbytes=25, generation=5))
    assert evictions == [Eviction(hash="b", generation=2, nbytes=10),
                         Eviction(hash="b", generation=5, nbytes=25)]
    assert index.holding("r") == ("a",) and index.used_bytes == 10
    index.check_invariants()


def test_refresh_with_a_newer_generation_evicts_the_old_tensors():
    index = index_with(100, block("a", generation=3, nbytes=10))
    index.acquire("r", ["a"])
    assert index.insert(block("a", generation=7, nbytes=12)) == [
        Eviction(hash="a", generation=3, nbytes=10)
    ]
    assert index.get("a") == block("a", generation=7, nbytes=12)
    assert index.refcount("a") == 1  # holders survive a refresh
    assert (index.used_bytes, index.referenced_bytes) == (12, 12)
    assert (index.inserted, index.refreshed, index.evictions) == (1, 1, 0)
    index.check_invariants()


def test_refresh_with_the_same_generation_updates_in_place():
    index = index_with(100, block("a", generation=3, nbytes=10))
    assert index.insert(block("a", generation=3, nbytes=15, usable=False)) == []
    assert index.get("a") == block("a", generation=3, nbytes=15, usable=False)
    assert index.used_bytes == 15
    index.check_invariants()


def test_an_older_generation_is_returned_as_an_eviction_and_not_taken():
    index = index_with(100, block("a", generation=5, nbytes=10))
    assert index.insert(block("a", generation=4, nbytes=99)) == [
        Eviction(hash="a", generation=4, nbytes=99)
    ]
    assert index.get("a") == block("a", generation=5, nbytes=10)
    assert index.used_bytes == 10
    index.check_invariants()


def test_a_refresh_that_grows_a_block_can_evict_others():
    index = index_with(30, block("a"), block("b"), block("c"))
    evictions = index.insert(block("c", generation=2, nbytes=20))
    assert evictions == [
        Eviction(hash="c", generation=1, nbytes=10),
        Eviction(hash="a", generation=1, nbytes=10),
    ]
    index.check_invariants()


def test_a_block_larger_than_the_budget_is_evicted_at_once():
    index = index_with(10, block("a", nbytes=5))
    assert index.insert(block("big", nbytes=11)) == [
        Eviction(hash="a", generation=1, nbytes=5),
        Eviction(hash="big", generation=1, nbytes=11),
    ]
    assert len(index) == 0
    index.check_invariants()


def test_a_chain_stored_over_budget_keeps_its_prefix():
    index = BlockIndex(20)
    assert evicted(index.insert_all(chain("a", "b", "c"))) == ["c"]
    assert index.match(["a", "b", "c"]) == 2


def test_an_orphan_is_stored_but_unmatchable_until_its_parent_returns():
    index = index_with(100, block("b", "a"))
    assert "b" in index and index.match(["a", "b"]) == 0
    assert index.insert(block("a")) == []
    assert index.match(["a", "b"]) == 2
    # The returned parent already has a child: it is not a leaf.
    assert evicted(index.set_budget(10)) == ["b"]
    index.check_invariants()


def test_inconsistent_parent_links_still_evict_down_to_budget():
    # "z" claims parent "p", but the lookup pins "z" through "a": "p" is no leaf and
    # unreferenced; the fallback evicts it rather than stay over budget.
    index = index_with(100, block("p"), block("a"), block("z", "a"), block("w", "p"))
    index.acquire("r", ["a", "z", "w"])
    assert evicted(index.set_budget(30)) == ["p"]
    index.check_invariants()
    # A cycle: neither block is a leaf, both still go.
    cyclic = index_with(100, block("x", "y"), block("y", "x"))
    assert evicted(cyclic.set_budget(0)) == ["x", "y"]
    cyclic.check_invariants()


def test_changing_a_blocks_parent_moves_it_in_the_tree():
    index = index_with(100, block("a"), block("b"), block("c", "a"))
    assert index.insert(block("c", "b")) == []
    index.check_invariants()
    assert evicted(index.set_budget(20)) == ["a"]  # "a" became a leaf, and is oldest


def test_a_repeated_hash_in_one_lookup_is_held_once():
    index = index_with(100, block("a"))
    assert index.acquire("r", ["a", "a"]) == (2, [])
    assert index.refcount("a") == 1
    index.check_invariants()


def test_many_evictions_keep_the_candidate_heap_small():
    index = BlockIndex(10 * 100)
    for round_ in range(20):
        index.insert_all(chain(*(f"r{round_}b{i}" for i in range(100)), generation=round_ * 100))
        index.acquire("r", [f"r{round_}b{i}" for i in range(100)])
        index.release("r")
    assert len(index) == 100
    assert len(index._leaves) <= 64 + 2 * len(index) + 1
    index.check_invariants()


def test_invalid_budgets_and_self_parents_are_refused():
    with pytest.raises(ValueError, match="budget_bytes must be an int >= 0, got -1"):
        BlockIndex(-1)
    with pytest.raises(ValueError, match="budget_bytes must be an int >= 0, got 1.5"):
        BlockIndex(10).set_budget(1.5)
    with pytest.raises(ValueError, match="block a cannot be its own parent"):
        block("a", "a")
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        block("a", nbytes=-1)
