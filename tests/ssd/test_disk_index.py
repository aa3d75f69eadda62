"""The writer's pure bookkeeping: LRU order, scopes, byte totals, the effective budget."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from omlx_actors.ssd.disk_index import (
    DiskBlock,
    DiskIndex,
    DiskSpace,
    effective_budget,
    free_space_reserve,
)

GiB = 1 << 30


def blk(name: str, size: int = 10, scope: str = "") -> DiskBlock:
    return DiskBlock(hash=name, parent=None, scope=scope, tokens=16, size=size)


def test_victims_are_least_recently_used_first_and_touch_refreshes():
    index = DiskIndex([blk("a"), blk("b"), blk("c")])
    index.touch("a")
    assert [b.hash for b in index.victims(excess=15, limit=32)] == ["b", "c"]
    assert len(index) == 3  # choosing removes nothing


def test_victims_stop_at_the_limit_and_skip_kept_blocks():
    index = DiskIndex([blk(str(i)) for i in range(100)])
    chosen = index.victims(excess=10_000, limit=32, keep=frozenset({"0"}))
    assert [b.hash for b in chosen] == [str(i) for i in range(1, 33)]
    assert index.victims(excess=0, limit=32) == []


def test_put_replaces_and_keeps_bytes_and_scopes_exact():
    index = DiskIndex()
    assert index.put(blk("a", 10, "r1")) is None
    old = index.put(blk("a", 25, "r2"))
    assert old == blk("a", 10, "r1")
    assert index.bytes == 25
    assert index.of_scope("r1") == []
    assert index.of_scope("r2") == [blk("a", 25, "r2")]
    assert index.remove("a") == blk("a", 25, "r2")
    assert (index.bytes, len(index), index.remove("a")) == (0, 0, None)


def test_effective_budget_keeps_the_reserve_free():
    # 100 GiB disk, 5% = 5 GiB reserve beats 1 GiB; 3 GiB free + 2 GiB ours - 5 GiB = 0.
    assert effective_budget(10 * GiB, 2 * GiB, 3 * GiB, 100 * GiB, GiB, 0.05) == 0
    assert effective_budget(10 * GiB, 2 * GiB, 8 * GiB, 100 * GiB, GiB, 0.05) == 5 * GiB
    assert effective_budget(4 * GiB, 2 * GiB, 80 * GiB, 100 * GiB, GiB, 0.05) == 4 * GiB
    # a small disk: the 1 GiB floor beats 5%
    assert effective_budget(10 * GiB, 0, 2 * GiB, 4 * GiB, GiB, 0.05) == GiB


def test_the_fixed_reserve_scales_down_on_a_small_disk():
    """Regression (issue #15 item 11): a fixed 1 GiB reserve left a 2 MB disk no room at
    all, so the tier wrote nothing. It now takes at most a quarter of the disk."""
    MB = 1 << 20
    assert free_space_reserve(2 * MB, GiB, 0.05) == MB // 2
    assert effective_budget(10 * GiB, 0, 2 * MB, 2 * MB, GiB, 0.05) == 3 * MB // 2
    # 2 GiB: a quarter (512 MiB) rather than 1 GiB; from 4 GiB on the full 1 GiB.
    assert free_space_reserve(2 * GiB, GiB, 0.05) == GiB // 2
    assert free_space_reserve(8 * GiB, GiB, 0.05) == GiB
    # A larger share asked for by fraction still wins.
    assert free_space_reserve(2 * MB, GiB, 0.5) == MB


def test_disk_space_follows_writes_and_removals():
    space = DiskSpace()
    space.reading(total=1000, free=300)
    space.wrote(200)
    space.freed(50)
    space.wrote(500)
    assert (space.free, space.known) == (0, True)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "touch", "remove"]),
            st.sampled_from("abcdef"),
            st.integers(0, 50),
            st.sampled_from(["", "r1", "r2"]),
        ),
        max_size=40,
    )
)
def test_index_matches_a_naive_lru_list(ops):
    index = DiskIndex()
    model: list[DiskBlock] = []  # least recently used first
    for op, name, size, scope in ops:
        if op == "put":
            index.put(blk(name, size, scope))
            model = [b for b in model if b.hash != name] + [blk(name, size, scope)]
        elif op == "touch":
            index.touch(name)
            model = [b for b in model if b.hash != name] + [b for b in model if b.hash == name]
        else:
            index.remove(name)
            model = [b for b in model if b.hash != name]
        assert list(index) == model
        assert index.bytes == sum(b.size for b in model)
        for s in ("", "r1", "r2"):
            assert index.of_scope(s) == [b for b in model if b.scope == s]
