"""Bounded inboxes: how a message reaches an actor, and how its reply comes back.

`open_inbox` makes a pair: the `Address` that any number of tasks share to send, and the
`Inbox` the actor (through its supervisor) receives from. Every message travels in an
`Envelope`; a `call` adds a capacity-1 reply slot to it, a `cast` does not.

The inbox keeps every envelope it handed out that still owes a reply (`outstanding`), so a
supervisor can answer them with a typed error when the actor that held them crashes or is
stopped: a caller is never left waiting on an actor that no longer exists.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from .errors import ActorError, ActorUnavailable, CallTimeout, InboxFull

__all__ = ["Address", "Envelope", "Inbox", "Overflow", "open_inbox"]

logger = logging.getLogger(__name__)

# A reply slot holds exactly one answer, so `Envelope.reply` can hand it over with
# `send_nowait` and never block the actor on a slow or vanished caller. A second answer
# is a bug and raises before reaching the channel, so the slot is never found full.
REPLY_SLOT_CAPACITY = 1


class Overflow(enum.Enum):
    """What a sender does when the inbox is full."""

    WAIT = "wait"
    """`cast` waits for room: backpressure onto the sender."""
    REJECT = "reject"
    """`cast` raises `InboxFull` at once."""
    DROP = "drop"
    """`cast` waits at most `drop_after` seconds, then drops the message, counts it in
    `Address.dropped` and logs a warning."""


@attrs.frozen
class _Answer:
    """What travels on a reply slot: a value, or an error the caller raises."""

    value: Any = None
    error: ActorError | None = None


@attrs.define(eq=False)
class Envelope:
    """One message on its way through an inbox, with the reply slot of a `call`.

    Identity, not value, is what matters: two equal messages are two requests.
    """

    message: Any
    _reply_slot: trio.MemorySendChannel[_Answer] | None = attrs.field(
        default=None, alias="reply_slot"
    )
    # Set once the envelope is answered; invariant: an answered envelope is not outstanding.
    _answered: bool = attrs.field(default=False, init=False)
    # The inbox that received this envelope and tracks it as outstanding, if any.
    _tracker: Inbox | None = attrs.field(default=None, init=False, repr=False)

    @property
    def expects_reply(self) -> bool:
        """True for a `call`, False for a `cast`."""
        return self._reply_slot is not None

    @property
    def answered(self) -> bool:
        """True once `reply` or `fail` has been called."""
        return self._answered

    @property
    def caller_waiting(self) -> bool:
        """False once the caller has gone (timed out or cancelled); the actor may skip work."""
        slot = self._reply_slot
        return slot is not None and slot.statistics().open_receive_channels > 0

    def reply(self, value: Any = None) -> None:
        """Hand `value` to the caller. Synchronous: it never waits, so it cannot be cancelled.

        If the caller already went away the value is discarded quietly. On a `cast` there
        is nobody to answer and the value is discarded. Answering twice raises RuntimeError.
        """
        self._settle(_Answer(value=value))

    def fail(self, error: ActorError) -> None:
        """Hand `error` to the caller, who raises it. Same contract as `reply`."""
        if not isinstance(error, ActorError):
            raise TypeError(f"fail() takes an ActorError, not {type(error).__qualname__}")
        self._settle(_Answer(error=error))

    def _settle(self, answer: _Answer) -> None:
        if self._answered:
            raise RuntimeError(f"envelope for {self.message!r} was already answered")
        self._answered = True
        if self._tracker is not None:
            self._tracker._outstanding.discard(self)
            self._tracker = None
        slot = self._reply_slot
        if slot is None:
            return
        try:
            slot.send_nowait(answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller timed out or was cancelled; nobody is left to read this
        finally:
            slot.close()


@attrs.define(eq=False)
class _Mailbox:
    """State shared by every copy of an `Address` and by the `Inbox`."""

    name: str
    overflow: Overflow
    drop_after: float
    send: trio.MemorySendChannel[Envelope]
    dropped: int = 0
    rejected: int = 0
    closed: bool = False


@attrs.frozen
class Address:
    """The sending side of an inbox. Cheap to copy and share among tasks: copies share
    the channel and the counters."""

    _mailbox: _Mailbox = attrs.field(alias="mailbox")

    @property
    def name(self) -> str:
        return self._mailbox.name

    @property
    def dropped(self) -> int:
        """Messages discarded because the inbox was full (DROP casts, refused `cast_nowait`)."""
        return self._mailbox.dropped

    @property
    def rejected(self) -> int:
        """Messages refused with `InboxFull` (REJECT casts, calls that found no room)."""
        return self._mailbox.rejected

    async def cast(self, message: Any) -> None:
        """Send `message` without waiting for a reply, following the inbox's `Overflow`.

        Atomic under cancellation: if cancelled, the message was either queued whole or
        not at all (and then it is not counted as dropped). Raises `ActorUnavailable` if
        the inbox is closed, `InboxFull` under REJECT when full.
        """
        box = self._mailbox
        envelope = Envelope(message)
        if await self._enqueue(envelope, refuse=box.overflow is Overflow.REJECT):
            return
        if box.overflow is Overflow.REJECT:
            box.rejected += 1
            raise InboxFull(box.name, f"inbox full, {type(message).__qualname__} rejected")
        self._count_drop(message)

    def cast_nowait(self, message: Any) -> bool:
        """Queue `message` if there is room now; otherwise drop it, count it and return False.

        For callers that must never wait (e.g. a step loop reporting progress). Raises
        `ActorUnavailable` if the inbox is closed.
        """
        try:
            self._mailbox.send.send_nowait(Envelope(message))
        except trio.WouldBlock:
            self._count_drop(message)
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._unavailable() from None
        return True

    async def call(self, message: Any, *, timeout: float | None = None) -> Any:
        """Send `message` and wait for the actor's reply; return the replied value.

        `timeout` bounds the whole call: waiting for room and waiting for the reply.
        Raises `CallTimeout` when it expires, the actor's `ActorError` when it answers
        with `fail`, `ActorUnavailable` when the inbox is closed, `InboxFull` when the
        inbox is full and its policy is REJECT or DROP (a call is never dropped silently).

        If the caller is cancelled (or times out) the reply slot is closed on the way out,
        so a late reply is discarded by `Envelope.reply` and the actor carries on.
        """
        box = self._mailbox
        reply_send, reply_receive = trio.open_memory_channel[_Answer](REPLY_SLOT_CAPACITY)
        envelope = Envelope(message, reply_slot=reply_send)
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        try:
            with trio.move_on_at(deadline) as scope:
                if not await self._enqueue(envelope, refuse=box.overflow is Overflow.REJECT):
                    box.rejected += 1
                    raise InboxFull(
                        box.name, f"inbox full, call {type(message).__qualname__} refused"
                    )
                try:
                    answer = await reply_receive.receive()
                except trio.EndOfChannel:
                    raise self._unavailable() from None
            if scope.cancelled_caught:
                raise CallTimeout(
                    box.name, f"no reply to {type(message).__qualname__} within {timeout}s"
                )
        finally:
            reply_receive.close()
        if answer.error is not None:
            raise answer.error
        return answer.value

    async def _enqueue(self, envelope: Envelope, *, refuse: bool) -> bool:
        """Queue `envelope`; True if queued, False if the overflow policy gave up.

        Tries for room at once first, so a DROP with `drop_after=0` still queues when there
        is room; either way it is a checkpoint, and a cancellation can only arrive before
        the envelope is queued, never after.
        """
        box = self._mailbox
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                box.send.send_nowait(envelope)
            except trio.WouldBlock:
                pass
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return True
            if refuse:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return False
            if box.overflow is Overflow.DROP:
                with trio.move_on_after(box.drop_after):
                    await box.send.send(envelope)
                    return True
                return False
            await box.send.send(envelope)
            return True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._unavailable() from None

    def _count_drop(self, message: Any) -> None:
        box = self._mailbox
        box.dropped += 1
        logger.warning(
            "inbox %s full: dropped %s (%d dropped so far)",
            box.name,
            type(message).__qualname__,
            box.dropped,
        )

    def _unavailable(self) -> ActorUnavailable:
        return ActorUnavailable(self._mailbox.name, "inbox is closed")


class Inbox:
    """The receiving side of an inbox, owned by one actor (through its supervisor).

    Iterate it (or `receive`) to get envelopes; iteration ends after `close()` once the
    queued messages are drained. Envelopes received that still owe a reply are tracked
    until answered, so they can be failed for a crashed or stopped actor.
    """

    def __init__(self, mailbox: _Mailbox, receive: trio.MemoryReceiveChannel[Envelope]) -> None:
        self._mailbox = mailbox
        self._receive = receive
        self._outstanding: set[Envelope] = set()

    @property
    def name(self) -> str:
        return self._mailbox.name

    @property
    def address(self) -> Address:
        """An address for this inbox, e.g. for an actor to message itself."""
        return Address(mailbox=self._mailbox)

    @property
    def closed(self) -> bool:
        """True once `close()` (or `fail_pending`) has refused new messages."""
        return self._mailbox.closed

    def queued(self) -> int:
        """Messages waiting in the inbox, not yet received."""
        return self._receive.statistics().current_buffer_used

    def outstanding(self) -> list[Envelope]:
        """Envelopes received that expect a reply and have not been answered yet."""
        return list(self._outstanding)

    async def receive(self) -> Envelope:
        """Wait for the next envelope. Raises `trio.EndOfChannel` once closed and drained.

        Atomic under cancellation: a cancelled receive takes no envelope off the queue.
        """
        return self._track(await self._receive.receive())

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Refuse new messages; the actor still receives the queued ones, then iteration ends.

        Senders waiting for room get `ActorUnavailable`. Idempotent.
        """
        self._mailbox.closed = True
        self._mailbox.send.close()

    def fail_outstanding(self, error: ActorError) -> int:
        """Fail every envelope received but not yet answered; return how many.

        Used when the incarnation that held them crashed. Queued messages are kept for the
        next incarnation. Synchronous, so it completes even inside a cancelled scope.
        """
        held = list(self._outstanding)
        for envelope in held:
            envelope.fail(error)
        return len(held)

    def fail_pending(self, error: ActorError) -> int:
        """Close the inbox, then fail every queued and outstanding envelope; return how many
        callers were failed.

        Closing first means no message can slip in behind the drain and wait forever.
        Queued casts have nobody to tell; they are counted as dropped and logged.
        Synchronous, so it completes even inside a cancelled scope.
        """
        self.close()
        failed = 0
        discarded = 0
        while True:
            try:
                envelope = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if envelope.expects_reply:
                envelope.fail(error)
                failed += 1
            else:
                discarded += 1
        if discarded:
            self._mailbox.dropped += discarded
            logger.warning(
                "inbox %s: discarded %d queued casts (%s)", self.name, discarded, error
            )
        return failed + self.fail_outstanding(error)

    def _track(self, envelope: Envelope) -> Envelope:
        if envelope.expects_reply and not envelope.answered:
            envelope._tracker = self
            self._outstanding.add(envelope)
        return envelope


def open_inbox(
    name: str,
    capacity: int,
    overflow: Overflow = Overflow.WAIT,
    drop_after: float = 0.25,
) -> tuple[Address, Inbox]:
    """Make a bounded inbox named `name` holding at most `capacity` queued messages.

    The capacity is the caller's named constant (see style.md); unbounded inboxes are
    refused. `drop_after` is how long a DROP cast waits for room before dropping.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise ValueError(f"inbox {name!r}: capacity must be an int >= 0, got {capacity!r}")
    if drop_after < 0:
        raise ValueError(f"inbox {name!r}: drop_after must be >= 0, got {drop_after!r}")
    send, receive = trio.open_memory_channel[Envelope](capacity)
    mailbox = _Mailbox(name=name, overflow=overflow, drop_after=drop_after, send=send)
    return Address(mailbox=mailbox), Inbox(mailbox, receive)
