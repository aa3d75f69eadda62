"""The cache index actor: lookups pin, releases unpin, evictions reach the engine as
`DropBlocks`, and its messages survive the wire."""

from __future__ import annotations

from typing import Union

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.cache import actor
from omlx_actors.cache.actor import (
    CacheStats,
    CacheStatsQuery,
    DropBlocks,
    Lookup,
    LookupResult,
    Release,
    SetCacheBudget,
    Stored,
)
from omlx_actors.cache.index import Eviction, StoredBlock
from omlx_actors.kernel import (
    Overflow,
    UnknownMessage,
    assert_plain_data,
    decode,
    encode,
    open_inbox,
    open_supervisor,
)

# Room for every DropBlocks a test provokes, so the engine side never exerts backpressure
# unless the test means it to.
ENGINE_INBOX_CAPACITY = 16


def block(h, parent=None, nbytes=10, generation=1):
    return StoredBlock(hash=h, parent=parent, nbytes=nbytes, generation=generation)


def chain(*names, nbytes=10):
    return tuple(
        block(n, names[i - 1] if i else None, nbytes, generation=i + 1)
        for i, n in enumerate(names)
    )


async def start_index(nursery, budget, engine_capacity=ENGINE_INBOX_CAPACITY):
    """A running index actor and the inbox standing in for the executor's."""
    engine, engine_inbox = open_inbox("engine", engine_capacity, Overflow.WAIT)
    address, inbox = actor.open_cache_inbox()
    await nursery.start(actor.run, inbox, budget, engine)
    return address, inbox, engine_inbox


async def stats(address) -> CacheStats:
    return await address.call(CacheStatsQuery())


async def queued_drops(engine_inbox) -> list[Eviction]:
    """Every eviction the index has cast to the engine so far."""
    drops = []
    while engine_inbox.queued():
        envelope = await engine_inbox.receive()
        assert isinstance(envelope.message, DropBlocks)
        assert not envelope.expects_reply
        drops.extend(envelope.message.evictions)
    return drops


async def test_lookup_holds_the_matched_prefix_and_release_frees_it(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=100)
        await address.cast(Stored(blocks=chain("a", "b", "c")))
        result = await address.call(Lookup(request_id="r1", hashes=("a", "b", "x", "c")))
        assert result == LookupResult(request_id="r1", matched=("a", "b"))
        assert (await stats(address)).referenced_bytes == 20
        await address.cast(Release(request_id="r1"))
        assert await stats(address) == CacheStats(
            blocks=3, used_bytes=30, budget_bytes=100, referenced_bytes=0, hits=1,
            misses=0, hit_blocks=2, evictions=0, inserted=3, refreshed=0,
        )
        inbox.close()
    assert await queued_drops(engine_inbox) == []


async def test_a_lookup_that_matches_nothing_is_a_miss_holding_nothing(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, _ = await start_index(nursery, budget=100)
        assert await address.call(Lookup(request_id="r", hashes=("x",))) == LookupResult(
            request_id="r", matched=()
        )
        await address.cast(Release(request_id="r"))
        await address.cast(Release(request_id="never-looked-up"))
        s = await stats(address)
        assert (s.hits, s.misses, s.referenced_bytes) == (0, 1, 0)
        inbox.close()


async def test_stored_over_budget_casts_drop_blocks_to_the_engine(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=20)
        await address.cast(Stored(blocks=chain("a", "b", "c")))
        envelope = await engine_inbox.receive()
        # The chain's end goes, not its prefix: "a" and "b" stay matchable.
        assert envelope.message == DropBlocks(
            evictions=(Eviction(hash="c", generation=3, nbytes=10),)
        )
        assert not envelope.expects_reply
        s = await stats(address)
        assert (s.blocks, s.used_bytes, s.evictions) == (2, 20, 1)
        inbox.close()


async def test_set_budget_evicts_unpinned_blocks_first_and_pinned_ones_past_them(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=100)
        await address.cast(Stored(blocks=chain("a", "b") + chain("p", "q")))
        await address.call(Lookup(request_id="r", hashes=("a", "b")))
        await address.cast(SetCacheBudget(budget_bytes=10))
        assert (await engine_inbox.receive()).message.evictions == (
            Eviction(hash="q", generation=2, nbytes=10),
            Eviction(hash="p", generation=1, nbytes=10),
            Eviction(hash="b", generation=2, nbytes=10),
        )
        s = await stats(address)
        assert (s.used_bytes, s.budget_bytes, s.forced_evictions) == (10, 10, 1)
        await address.cast(Release(request_id="r"))
        assert (await stats(address)).used_bytes == 10  # "a" fits: nothing more to drop
        inbox.close()


async def test_a_refresh_tells_the_engine_to_drop_the_replaced_generation(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=100)
        await address.cast(Stored(blocks=(block("a", generation=1),)))
        await address.cast(Stored(blocks=(block("a", generation=9),)))
        assert (await engine_inbox.receive()).message == DropBlocks(
            evictions=(Eviction(hash="a", generation=1, nbytes=10),)
        )
        s = await stats(address)
        assert (s.blocks, s.inserted, s.refreshed, s.evictions) == (1, 1, 1, 0)
        inbox.close()


async def test_lookups_are_answered_while_the_engine_inbox_is_full(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=0, engine_capacity=1)
        for i in range(5):  # each evicted at once: more drops than the engine inbox holds
            await address.cast(Stored(blocks=(block(f"b{i}", generation=i),)))
        await address.cast(Stored(blocks=(block("x", nbytes=0),)))
        with trio.fail_after(1):
            result = await address.call(Lookup(request_id="r", hashes=("x",)))
        assert result.matched == ("x",)
        await wait_all_tasks_blocked()
        # Whatever piled up while the engine inbox was full arrives coalesced, in order.
        drops = []
        while len(drops) < 5:
            drops.extend((await engine_inbox.receive()).message.evictions)
        assert [e.hash for e in drops] == ["b0", "b1", "b2", "b3", "b4"]
        inbox.close()


async def test_draining_delivers_pending_drops_before_returning(autojump_clock):
    engine, engine_inbox = open_inbox("engine", 0, Overflow.WAIT)
    address, inbox = actor.open_cache_inbox()
    finished = trio.Event()

    async def run_then_mark():
        await actor.run(inbox, 0, engine)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_then_mark)
        await address.cast(Stored(blocks=(block("a"),)))
        inbox.close()
        await wait_all_tasks_blocked()
        assert not finished.is_set()  # still owes the engine a DropBlocks
        envelope = await engine_inbox.receive()
        assert envelope.message == DropBlocks(
            evictions=(Eviction(hash="a", generation=1, nbytes=10),)
        )
        await finished.wait()


async def test_evictions_for_a_stopped_engine_are_discarded_not_fatal(autojump_clock, caplog):
    async with trio.open_nursery() as nursery:
        address, inbox, engine_inbox = await start_index(nursery, budget=0)
        engine_inbox.close()
        await address.cast(Stored(blocks=(block("a"),)))
        await wait_all_tasks_blocked()
        assert (await stats(address)).evictions == 1
        assert "1 evictions not delivered (engine: inbox is closed)" in caplog.text
        inbox.close()


async def test_unknown_message_fails_the_caller_and_the_index_keeps_serving(autojump_clock):
    async with trio.open_nursery() as nursery:
        address, inbox, _ = await start_index(nursery, budget=100)
        with pytest.raises(UnknownMessage) as info:
            await address.call("not a cache message")
        assert str(info.value) == "cache-index: unknown message str: 'not a cache message'"
        assert (await stats(address)).blocks == 0
        inbox.close()


async def test_the_index_runs_under_a_supervisor_as_the_runtime_starts_it(autojump_clock):
    engine, engine_inbox = open_inbox("engine", ENGINE_INBOX_CAPACITY, Overflow.WAIT)
    address, inbox = actor.open_cache_inbox()
    async with open_supervisor("test") as sup:
        await sup.start("cache-index", actor.run, inbox, 10, engine)
        await address.cast(Stored(blocks=chain("a", "b")))
        assert (await address.call(Lookup(request_id="r", hashes=("a",)))).matched == ("a",)
    # Leaving drained the index: every cast was served, every drop delivered.
    assert await queued_drops(engine_inbox) == [Eviction(hash="b", generation=2, nbytes=10)]


def test_the_inbox_waits_for_room_rather_than_dropping():
    assert actor.CACHE_INBOX_OVERFLOW is Overflow.WAIT
    assert actor.CACHE_INBOX_CAPACITY == 1024


EXAMPLES = [
    Lookup(request_id="r1", hashes=("ab" * 16, "cd" * 16)),
    Lookup(request_id="r2", hashes=()),
    Release(request_id="r1"),
    Stored(blocks=(
        StoredBlock(hash="a", parent=None, nbytes=10, generation=1),
        StoredBlock(hash="b", parent="a", nbytes=2**40, generation=2, usable=False),
    )),
    SetCacheBudget(budget_bytes=2 * 1024**3),
    CacheStatsQuery(),
    LookupResult(request_id="r1", matched=("a",)),
    CacheStats(blocks=1, used_bytes=2, budget_bytes=3, referenced_bytes=4, hits=5, misses=6,
               hit_blocks=7, evictions=8, inserted=9, refreshed=10),
    DropBlocks(evictions=(Eviction(hash="a", generation=3, nbytes=4),)),
    Eviction(hash="a", generation=1, nbytes=0),
    StoredBlock(hash="c", parent="b", nbytes=0, generation=0),
]

AnyCacheMessage = Union[tuple(actor.ALL_MESSAGE_TYPES)]


def test_every_cache_message_type_has_an_example():
    assert {type(e) for e in EXAMPLES} == set(actor.ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda e: type(e).__name__)
def test_cache_message_round_trips_through_the_wire(message):
    assert_plain_data(message)
    assert decode(encode(message), AnyCacheMessage) == message


def test_invalid_messages_cannot_be_built():
    with pytest.raises(ValueError):
        SetCacheBudget(budget_bytes=-1)
    with pytest.raises(ValueError, match="block a cannot be its own parent"):
        StoredBlock(hash="a", parent="a", nbytes=1, generation=1)
