"""The block index against a naive model, under random stores, lookups, releases and
budget changes (cuts below the pinned bytes included): every reply and every eviction must
be exactly the model's, the index's own invariants must hold after every step, and the
bytes cached never exceed the budget (issue #15)."""

from __future__ import annotations

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from omlx_actors.cache.index import BlockIndex, Eviction, StoredBlock

# A fixed forest of blocks: node i's parent is PARENTS[i] (None: a first block). Two roots,
# shared prefixes and branches, like agent conversations that fork from a system prompt.
PARENTS = (None, 0, 1, 2, 1, 4, 0, 6, 7, 3, None, 10, 11, 12, 11, 5)
HASHES = tuple(f"{i:02d}" for i in range(len(PARENTS)))
OWNERS = ("s1", "s2", "s3", "s4")


def path(node: int) -> list[str]:
    hashes = []
    while node is not None:
        hashes.append(HASHES[node])
        node = PARENTS[node]
    return hashes[::-1]


@attrs.define
class ModelBlock:
    parent: str | None
    nbytes: int
    generation: int
    usable: bool
    last_used: int


class Model:
    """The policy written the slow, obvious way."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.blocks: dict[str, ModelBlock] = {}
        self.holdings: dict[str, tuple[str, ...]] = {}
        self.clock = 0
        self.hits = self.misses = self.hit_blocks = self.evictions = self.forced = 0

    def refs(self, h: str) -> int:
        return sum(h in held for held in self.holdings.values())

    def used(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def touch(self, h: str) -> None:
        self.clock += 1
        self.blocks[h].last_used = self.clock

    def evict(self) -> list[Eviction]:
        out = []
        while self.used() > self.budget:
            idle = [h for h in self.blocks if self.refs(h) == 0]
            parents = {b.parent for b in self.blocks.values()}
            if idle:
                leaves = [h for h in idle if h not in parents]
                victim = min(leaves or idle, key=lambda h: self.blocks[h].last_used)
            else:
                # The budget is a hard ceiling: held blocks go too, leaf first, and their
                # holders stop holding them and what follows them in their chains.
                held = list(self.blocks)
                leaves = [h for h in held if h not in parents]
                victim = min(leaves or held, key=lambda h: self.blocks[h].last_used)
                for owner, holding in list(self.holdings.items()):
                    if victim in holding:
                        cut = holding.index(victim)
                        if cut:
                            self.holdings[owner] = holding[:cut]
                        else:
                            del self.holdings[owner]
                        self.release_holding(holding[cut:])
                self.forced += 1
            gone = self.blocks.pop(victim)
            out.append(Eviction(hash=victim, generation=gone.generation, nbytes=gone.nbytes))
        self.evictions += len(out)
        return out

    def store(self, block: StoredBlock) -> list[Eviction]:
        old = self.blocks.get(block.hash)
        if old is not None and block.generation < old.generation:
            return [Eviction(hash=block.hash, generation=block.generation, nbytes=block.nbytes)]
        out = []
        if old is not None and block.generation != old.generation:
            out.append(Eviction(hash=block.hash, generation=old.generation, nbytes=old.nbytes))
        self.blocks[block.hash] = ModelBlock(
            block.parent, block.nbytes, block.generation, block.usable,
            old.last_used if old else 0,
        )
        if self.refs(block.hash) == 0:
            self.touch(block.hash)
        return out + self.evict()

    def match(self, hashes: list[str]) -> int:
        n = 0
        for h in hashes:
            b = self.blocks.get(h)
            if b is None or not b.usable:
                break
            n += 1
        return n

    def release_holding(self, held: tuple[str, ...]) -> None:
        for h in held:
            if self.refs(h) == 0:
                self.touch(h)

    def acquire(self, owner: str, hashes: list[str]) -> tuple[int, list[Eviction]]:
        n = self.match(hashes)
        held = tuple(dict.fromkeys(hashes[:n]))
        previous = self.holdings.pop(owner, ())
        if held:
            self.holdings[owner] = held
        if n:
            self.hits += 1
            self.hit_blocks += n
        else:
            self.misses += 1
        if not previous:
            return n, []
        self.release_holding(previous)
        return n, self.evict()

    def release(self, owner: str) -> list[Eviction]:
        previous = self.holdings.pop(owner, ())
        if not previous:
            return []
        self.release_holding(previous)
        return self.evict()


class BlockIndexMachine(RuleBasedStateMachine):
    @initialize(budget=st.integers(0, 200))
    def start(self, budget):
        self.index = BlockIndex(budget)
        self.model = Model(budget)
        self.generation = 0
        # Blocks evicted (whole, not a replaced generation) and not stored since.
        self.evicted: set[str] = set()

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def apply(self, evictions: list[Eviction], expected: list[Eviction]) -> None:
        assert evictions == expected
        for e in evictions:
            if e.hash not in self.model.blocks:
                self.evicted.add(e.hash)

    def stored(self, block: StoredBlock) -> None:
        self.evicted.discard(block.hash)

    @rule(
        node=st.integers(0, len(PARENTS) - 1),
        nbytes=st.integers(0, 40),
        usable=st.sampled_from([True, True, True, False]),
        age=st.sampled_from(["new", "new", "same", "older"]),
    )
    def store(self, node, nbytes, usable, age):
        h = HASHES[node]
        parent = None if PARENTS[node] is None else HASHES[PARENTS[node]]
        present = self.model.blocks.get(h)
        if present is None or age == "new":
            generation = self.next_generation()
        elif age == "same":
            generation = present.generation
        else:
            generation = present.generation - 1
        block = StoredBlock(
            hash=h, parent=parent, nbytes=nbytes, generation=generation, usable=usable
        )
        expected = self.model.store(block)
        if h in self.model.blocks:
            self.stored(block)
        self.apply(self.index.insert(block), expected)

    @rule(node=st.integers(0, len(PARENTS) - 1), nbytes=st.integers(1, 30))
    def store_a_whole_chain(self, node, nbytes):
        blocks = []
        hashes = path(node)
        for i, h in enumerate(hashes):
            blocks.append(StoredBlock(
                hash=h, parent=hashes[i - 1] if i else None, nbytes=nbytes,
                generation=self.next_generation(),
            ))
        expected = []
        for block in blocks:
            expected.extend(self.model.store(block))
            self.stored(block)
        self.apply(self.index.insert_all(blocks), expected)

    @rule(
        node=st.integers(0, len(PARENTS) - 1),
        odd_parent=st.integers(0, len(PARENTS) - 1),
        nbytes=st.integers(0, 40),
    )
    def store_with_an_inconsistent_parent(self, node, odd_parent, nbytes):
        # Parent links that disagree with the chains looked up (even cycles) must not
        # break the budget or the invariants.
        if node == odd_parent:
            return
        block = StoredBlock(
            hash=HASHES[node], parent=HASHES[odd_parent], nbytes=nbytes,
            generation=self.next_generation(),
        )
        expected = self.model.store(block)
        self.stored(block)
        self.apply(self.index.insert(block), expected)

    @rule(
        owner=st.sampled_from(OWNERS),
        node=st.integers(0, len(PARENTS) - 1),
        cut=st.integers(0, 3),
        unknown_tail=st.booleans(),
    )
    def lookup(self, owner, node, cut, unknown_tail):
        hashes = path(node)
        hashes = hashes[: max(len(hashes) - cut, 0)] + (["never-stored"] if unknown_tail else [])
        expected = self.model.acquire(owner, hashes)
        matched, evictions = self.index.acquire(owner, hashes)
        assert matched == expected[0]
        self.apply(evictions, expected[1])
        assert self.index.holding(owner) == tuple(hashes[:matched])

    @rule(owner=st.sampled_from(OWNERS))
    def release(self, owner):
        expected = self.model.release(owner)
        self.apply(self.index.release(owner), expected)
        assert self.index.holding(owner) == ()

    @rule(budget=st.integers(0, 200))
    def set_budget(self, budget):
        held = {h for held in self.model.holdings.values() for h in held}
        held_bytes = sum(self.model.blocks[h].nbytes for h in held)
        self.model.budget = budget
        expected = self.model.evict()
        self.apply(self.index.set_budget(budget), expected)
        if held_bytes <= budget:
            # Held blocks survive any budget cut that leaves room for them.
            assert all(h in self.index for h in held)

    @rule(owner=st.sampled_from(OWNERS), node=st.integers(0, len(PARENTS) - 1),
          fraction=st.sampled_from([0, 0.25, 0.5, 0.9]))
    def cut_the_budget_below_what_is_held(self, owner, node, fraction):
        # The admission path of issue #15: a request pins its prefix, then the cache is
        # cut below the bytes pinned. The cut holds; the holder keeps a shorter prefix.
        hashes = path(node)
        expected = self.model.acquire(owner, hashes)
        matched, evictions = self.index.acquire(owner, hashes)
        assert matched == expected[0]
        self.apply(evictions, expected[1])
        budget = int(self.index.referenced_bytes * fraction)
        self.model.budget = budget
        expected = self.model.evict()
        self.apply(self.index.set_budget(budget), expected)
        held = self.index.holding(owner)
        assert held == tuple(hashes[: len(held)])
        assert self.index.match(list(held)) == len(held)

    @precondition(lambda self: self.model.blocks)
    @rule(node=st.integers(0, len(PARENTS) - 1), cut=st.integers(0, 3))
    def match(self, node, cut):
        hashes = path(node)[cut:]
        assert self.index.match(hashes) == self.model.match(hashes)

    @invariant()
    def never_over_budget(self):
        assert self.index.used_bytes <= self.index.budget_bytes

    @invariant()
    def agrees_with_the_model(self):
        index, model = self.index, self.model
        index.check_invariants()
        assert set(self.evicted).isdisjoint(h for h in HASHES if h in index)
        assert len(index) == len(model.blocks)
        for h, b in model.blocks.items():
            assert index.get(h) == StoredBlock(
                hash=h, parent=b.parent, nbytes=b.nbytes, generation=b.generation,
                usable=b.usable,
            )
            assert index.refcount(h) == model.refs(h)
        assert index.used_bytes == model.used()
        assert index.referenced_bytes == sum(
            b.nbytes for h, b in model.blocks.items() if model.refs(h)
        )
        assert (index.hits, index.misses, index.hit_blocks, index.evictions) == (
            model.hits, model.misses, model.hit_blocks, model.evictions
        )
        assert index.forced_evictions == model.forced


BlockIndexMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, derandomize=True, deadline=None
)
TestBlockIndexAgainstModel = BlockIndexMachine.TestCase
