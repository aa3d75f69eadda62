"""Inbox, Address and Envelope: delivery, replies, timeouts, cancellation, overflow."""

from __future__ import annotations

import logging
import math

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.kernel import (
    ActorUnavailable,
    CallTimeout,
    InboxFull,
    Overflow,
    UnknownMessage,
    open_inbox,
)

from .examples import Echo


async def answer_next(inbox, value):
    envelope = await inbox.receive()
    envelope.reply(value)
    return envelope


async def test_call_returns_the_value_the_actor_replied():
    address, inbox = open_inbox("echo", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_next, inbox, "pong")
        assert await address.call(Echo(text="ping")) == "pong"


async def test_envelope_carries_the_message_and_expects_a_reply_only_for_calls():
    address, inbox = open_inbox("echo", 2)
    await address.cast(Echo(text="cast"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(address.call, Echo(text="call"))
        cast = await inbox.receive()
        call = await inbox.receive()
        assert (cast.message, cast.expects_reply) == (Echo(text="cast"), False)
        assert (call.message, call.expects_reply) == (Echo(text="call"), True)
        call.reply(None)


async def test_call_raises_call_timeout_when_no_reply_arrives(autojump_clock):
    address, inbox = open_inbox("silent", 1)
    start = trio.current_time()
    with pytest.raises(CallTimeout) as info:
        await address.call(Echo(text="hello"), timeout=2.5)
    assert trio.current_time() - start == 2.5
    assert info.value.actor == "silent"
    assert str(info.value) == "silent: no reply to Echo within 2.5s"


async def test_call_timeout_also_bounds_waiting_for_room(autojump_clock):
    address, inbox = open_inbox("busy", 0)
    start = trio.current_time()
    with pytest.raises(CallTimeout):
        await address.call(Echo(text="hello"), timeout=1.0)
    assert trio.current_time() - start == 1.0
    assert inbox.queued() == 0


async def test_cancelled_caller_closes_reply_slot_and_late_reply_is_discarded():
    address, inbox = open_inbox("echo", 2)
    caller_scope = trio.CancelScope()

    async def caller():
        with caller_scope:
            await address.call(Echo(text="abandoned"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        envelope = await inbox.receive()
        assert envelope.caller_waiting is True
        caller_scope.cancel()
        await wait_all_tasks_blocked()
        assert envelope.caller_waiting is False
        envelope.reply("too late")  # must not raise: the caller is gone
        assert envelope.answered is True
        assert inbox.outstanding() == []
        # The actor side is unharmed: the next call is served normally.
        nursery.start_soon(answer_next, inbox, "fresh")
        assert await address.call(Echo(text="next")) == "fresh"


async def test_replying_twice_raises_runtime_error():
    address, inbox = open_inbox("echo", 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(address.call, Echo(text="once"))
        envelope = await inbox.receive()
        envelope.reply(1)
        with pytest.raises(RuntimeError, match="already answered"):
            envelope.reply(2)


async def test_fail_delivers_the_typed_error_to_the_caller():
    address, inbox = open_inbox("strict", 1)

    async def refuse():
        envelope = await inbox.receive()
        envelope.fail(UnknownMessage("strict", "no thanks"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(UnknownMessage) as info:
            await address.call(Echo(text="x"))
    assert info.value == UnknownMessage("strict", "no thanks")


async def test_call_on_closed_inbox_raises_actor_unavailable():
    address, inbox = open_inbox("gone", 1)
    inbox.close()
    with pytest.raises(ActorUnavailable, match="gone: inbox is closed"):
        await address.call(Echo(text="x"))


async def test_cast_on_closed_inbox_raises_actor_unavailable():
    address, inbox = open_inbox("gone", 1)
    inbox.close()
    with pytest.raises(ActorUnavailable):
        await address.cast(Echo(text="x"))


async def test_close_lets_the_actor_drain_queued_messages_then_ends_iteration():
    address, inbox = open_inbox("echo", 3)
    for text in ("a", "b", "c"):
        await address.cast(Echo(text=text))
    inbox.close()
    received = [envelope.message.text async for envelope in inbox]
    assert received == ["a", "b", "c"]
    assert inbox.closed is True


async def test_sender_waiting_for_room_gets_actor_unavailable_when_inbox_closes():
    address, inbox = open_inbox("echo", 1)
    await address.cast(Echo(text="fills"))
    outcome = []

    async def blocked_sender():
        try:
            await address.cast(Echo(text="waits"))
        except ActorUnavailable as error:
            outcome.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await wait_all_tasks_blocked()
        inbox.close()
    assert outcome == [ActorUnavailable("echo", "inbox is closed")]


async def test_wait_policy_cast_blocks_until_there_is_room():
    address, inbox = open_inbox("echo", 1, Overflow.WAIT)
    await address.cast(Echo(text="first"))
    sent = trio.Event()

    async def second():
        await address.cast(Echo(text="second"))
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await wait_all_tasks_blocked()
        assert sent.is_set() is False
        assert (await inbox.receive()).message == Echo(text="first")
        await sent.wait()
    assert (await inbox.receive()).message == Echo(text="second")
    assert address.dropped == 0


async def test_reject_policy_cast_raises_inbox_full_at_once(autojump_clock):
    address, inbox = open_inbox("echo", 1, Overflow.REJECT)
    await address.cast(Echo(text="fills"))
    start = trio.current_time()
    with pytest.raises(InboxFull, match="echo: inbox full, Echo rejected"):
        await address.cast(Echo(text="refused"))
    assert trio.current_time() == start
    assert (address.rejected, address.dropped, inbox.queued()) == (1, 0, 1)


async def test_reject_policy_call_raises_inbox_full():
    address, inbox = open_inbox("echo", 0, Overflow.REJECT)
    with pytest.raises(InboxFull, match="echo: inbox full, call Echo refused"):
        await address.call(Echo(text="x"))
    assert address.rejected == 1


async def test_drop_policy_cast_drops_after_drop_after_and_counts_it(autojump_clock, caplog):
    address, inbox = open_inbox("metrics", 1, Overflow.DROP, drop_after=0.5)
    await address.cast(Echo(text="fills"))
    start = trio.current_time()
    with caplog.at_level(logging.WARNING):
        await address.cast(Echo(text="dropped"))
    assert trio.current_time() - start == 0.5
    assert (address.dropped, inbox.queued()) == (1, 1)
    assert "inbox metrics full: dropped Echo (1 dropped so far)" in caplog.text


async def test_drop_policy_cast_is_queued_if_room_frees_within_drop_after(autojump_clock):
    address, inbox = open_inbox("metrics", 1, Overflow.DROP, drop_after=0.5)
    await address.cast(Echo(text="fills"))

    async def consume_later():
        await trio.sleep(0.2)
        await inbox.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume_later)
        await address.cast(Echo(text="kept"))
    assert address.dropped == 0
    assert (await inbox.receive()).message == Echo(text="kept")


async def test_drop_policy_with_zero_drop_after_still_queues_when_there_is_room():
    address, inbox = open_inbox("metrics", 1, Overflow.DROP, drop_after=0)
    await address.cast(Echo(text="kept"))
    assert (address.dropped, inbox.queued()) == (0, 1)


async def test_drop_policy_call_raises_inbox_full_after_drop_after(autojump_clock):
    address, inbox = open_inbox("metrics", 0, Overflow.DROP, drop_after=0.5)
    start = trio.current_time()
    with pytest.raises(InboxFull):
        await address.call(Echo(text="x"))
    assert trio.current_time() - start == 0.5
    assert (address.rejected, address.dropped) == (1, 0)


async def test_cast_nowait_returns_false_and_counts_a_drop_when_full():
    address, inbox = open_inbox("progress", 1)
    assert address.cast_nowait(Echo(text="kept")) is True
    assert address.cast_nowait(Echo(text="dropped")) is False
    assert (address.dropped, inbox.queued()) == (1, 1)


async def test_copies_of_an_address_share_counters():
    address, inbox = open_inbox("progress", 0)
    copy = inbox.address
    assert copy == address
    copy.cast_nowait(Echo(text="dropped"))
    assert address.dropped == 1


async def test_outstanding_lists_received_calls_until_they_are_answered():
    address, inbox = open_inbox("echo", 2)
    await address.cast(Echo(text="cast"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(address.call, Echo(text="call"))
        await inbox.receive()
        call = await inbox.receive()
        assert inbox.outstanding() == [call]
        call.reply("done")
        assert inbox.outstanding() == []


async def test_fail_pending_fails_queued_and_outstanding_calls():
    address, inbox = open_inbox("echo", 4)
    outcomes = {}

    async def call(text):
        try:
            await address.call(Echo(text=text))
        except ActorUnavailable as error:
            outcomes[text] = error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "held")
        await wait_all_tasks_blocked()
        await inbox.receive()
        nursery.start_soon(call, "queued")
        await wait_all_tasks_blocked()
        await address.cast(Echo(text="queued cast"))
        error = ActorUnavailable("echo", "stopping")
        assert inbox.fail_pending(error) == 2
    assert outcomes == {"held": error, "queued": error}
    assert inbox.closed is True
    assert (inbox.queued(), inbox.outstanding(), address.dropped) == (0, [], 1)


async def test_fail_outstanding_fails_held_calls_and_keeps_queued_messages():
    address, inbox = open_inbox("echo", 4)
    outcomes = []

    async def call():
        try:
            await address.call(Echo(text="held"))
        except ActorUnavailable as error:
            outcomes.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await inbox.receive()
        await address.cast(Echo(text="queued"))
        assert inbox.fail_outstanding(ActorUnavailable("echo", "crashed")) == 1
    assert outcomes == [ActorUnavailable("echo", "crashed")]
    assert (await inbox.receive()).message == Echo(text="queued")


@pytest.mark.parametrize("capacity", [math.inf, -1, 1.5, True])
def test_open_inbox_refuses_capacity_that_is_not_a_bounded_int(capacity):
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        open_inbox("unbounded", capacity)
