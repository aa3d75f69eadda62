"""Example messages and a small actor shared by the runtime tests.

The messages mirror what real actors send: a closed union of frozen attrs classes with
enum, tuple, frozenset, optional, bytes and nested fields.
"""

from __future__ import annotations

import enum

import attrs
import trio

from omlx_actors.kernel import Inbox, serve, unknown_message

# Room for the few requests a test queues behind one that is being held; a full inbox
# would make a test wait on backpressure it does not mean to test.
TEST_INBOX_CAPACITY = 8


class Priority(enum.Enum):
    LOW = 1
    HIGH = 2


@attrs.frozen(kw_only=True)
class Token:
    token_id: int
    text: str


@attrs.frozen(kw_only=True)
class Submit:
    request_id: str
    prompt: tuple[int, ...]
    priority: Priority
    stop: frozenset[str]
    max_tokens: int | None
    temperature: float
    payload: bytes
    first: Token | None


@attrs.frozen(kw_only=True)
class Abort:
    request_id: str
    reason: str | None = None


@attrs.frozen(kw_only=True)
class Batch:
    items: tuple[Submit | Abort, ...]
    counts: dict[str, int]


EngineMessage = Submit | Abort | Batch


# Messages of the echo actor below.
@attrs.frozen(kw_only=True)
class Echo:
    text: str


@attrs.frozen(kw_only=True)
class Crash:
    reason: str


@attrs.frozen(kw_only=True)
class Hold:
    """Park the actor until the test sets its gate, so later messages stay queued."""


@attrs.frozen(kw_only=True)
class Stray:
    """Not in the echo actor's union."""


EchoMessage = Echo | Crash | Hold


async def echo_actor(
    inbox: Inbox,
    incarnations: list[int],
    gate: trio.Event,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Replies `text@incarnation` to Echo, raises on Crash, waits on `gate` for Hold."""
    incarnation = len(incarnations) + 1
    incarnations.append(incarnation)

    async def handle(message: EchoMessage) -> str | None:
        match message:
            case Echo(text=text):
                return f"{text}@{incarnation}"
            case Crash(reason=reason):
                raise ValueError(reason)
            case Hold():
                await gate.wait()
                return "released"
            case _:
                unknown_message(inbox.name, message)

    task_status.started(incarnation)
    await serve(inbox, handle)
