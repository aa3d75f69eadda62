"""Supervision: start actors with a readiness handshake, restart them when they crash,
stop them by draining or aborting, and escalate when they crash too often.

An actor is `async def run(inbox, *args, task_status=trio.TASK_STATUS_IGNORED)`. It owns
its state; the supervisor owns its inbox, so the inbox outlives any one incarnation:
callers' `Address`es stay valid and queued messages survive a restart.

Blast radius, in order of escalation:

1. A typed refusal (`ActorError` raised by a handler under `serve`) fails one request.
2. A crash fails the requests that incarnation held with `ActorCrashed`, then the actor is
   restarted with the same inbox.
3. More than `RestartPolicy.max_restarts` crashes within `RestartPolicy.within` seconds:
   every caller of that actor gets `ActorUnavailable`, its inbox is closed, and
   `RestartIntensityExceeded` leaves `open_supervisor`, cancelling the sibling actors
   (whose callers also get `ActorUnavailable`).

Whichever way an actor ends, its inbox is closed and every caller still waiting on it is
answered: nobody hangs on an actor that is gone.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .errors import ActorCrashed, ActorError, ActorUnavailable, RestartIntensityExceeded
from .mailbox import Inbox

__all__ = ["RestartPolicy", "ShutdownMode", "Supervisor", "open_supervisor", "serve"]

logger = logging.getLogger(__name__)

ActorRun = Callable[..., Awaitable[Any]]


def _non_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"RestartPolicy.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class RestartPolicy:
    """Restart a crashed actor unless it crashed more than `max_restarts` times within
    the last `within` seconds (trio clock)."""

    max_restarts: int = attrs.field(default=3, validator=_non_negative)
    within: float = attrs.field(default=5.0, validator=_non_negative)


class ShutdownMode(enum.Enum):
    DRAIN = "drain"
    """Close the inbox; the actor serves the queued messages and returns (bounded by
    `cleanup_timeout`, then ABORT)."""
    ABORT = "abort"
    """Cancel the actor; every queued or held request fails with `ActorUnavailable`."""


@attrs.define(eq=False)
class _Child:
    """The supervisor's record of one actor, across all its incarnations."""

    name: str
    run: ActorRun
    inbox: Inbox
    args: tuple[Any, ...]
    policy: RestartPolicy
    # Cancelling this aborts every incarnation, present and future.
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Set when a stop was asked for: a crash after this is not restarted.
    stopping: bool = False
    # Set once the supervising task has finished and every caller has been answered.
    done: trio.Event = attrs.field(factory=trio.Event)
    restarts: int = 0
    # trio-clock times of recent crashes, oldest first; only those within policy.within.
    crash_times: deque[float] = attrs.field(factory=deque)


class _Readiness:
    """Passes the first `started()` on to `nursery.start` and remembers that it happened."""

    def __init__(self, outer: trio.TaskStatus[Any]) -> None:
        self._outer = outer
        self.reported = False

    def started(self, value: Any = None) -> None:
        if self.reported:
            raise RuntimeError("task_status.started() called twice")
        self.reported = True
        self._outer.started(value)


class Supervisor:
    """Runs actors in one nursery. Made only by `open_supervisor`."""

    def __init__(self, name: str, nursery: trio.Nursery, cleanup_timeout: float) -> None:
        self.name = name
        self._nursery = nursery
        self._cleanup_timeout = cleanup_timeout
        # Insertion order is start order; shutdown stops actors in reverse of it.
        self._children: dict[str, _Child] = {}

    def running(self) -> list[str]:
        """Names of actors not yet finished, in start order."""
        return [name for name, child in self._children.items() if not child.done.is_set()]

    def restart_count(self, name: str) -> int:
        """How many times the actor `name` has been restarted after a crash."""
        return self._child(name).restarts

    async def start(
        self,
        name: str,
        run: ActorRun,
        inbox: Inbox,
        *args: Any,
        policy: RestartPolicy = RestartPolicy(),
    ) -> Any:
        """Start `run(inbox, *args)` as actor `name`; return the value it passed to
        `task_status.started()`, once it has.

        If the first incarnation raises before it is ready, that exception propagates from
        here, the inbox is closed and its callers get `ActorUnavailable` (no restart: an
        actor that cannot start once will not start on retry). If `start` is cancelled
        the half-started actor is cancelled with it.
        """
        existing = self._children.get(name)
        if existing is not None and not existing.done.is_set():
            raise ValueError(f"supervisor {self.name}: actor {name!r} is already running")
        child = _Child(name=name, run=run, inbox=inbox, args=args, policy=policy)
        self._children[name] = child
        try:
            return await self._nursery.start(self._supervise, child)
        except BaseException:
            if self._children.get(name) is child:
                del self._children[name]
            raise

    async def stop(self, name: str, mode: ShutdownMode = ShutdownMode.DRAIN) -> None:
        """Stop actor `name` and wait until it has finished and every caller is answered.

        DRAIN closes the inbox and waits up to `cleanup_timeout` for the actor to serve
        what is queued and return, then aborts. ABORT cancels it at once. Either way,
        requests still queued or held afterwards fail with `ActorUnavailable`.

        Shielded: once called it completes (within at most twice `cleanup_timeout`) even
        if the caller is cancelled, so a stop is never left half done. Stopping a
        finished actor does nothing.
        """
        child = self._child(name)
        with trio.CancelScope(shield=True):
            child.stopping = True
            if mode is ShutdownMode.DRAIN:
                child.inbox.close()
                with trio.move_on_after(self._cleanup_timeout):
                    await child.done.wait()
                if not child.done.is_set():
                    logger.warning(
                        "%s: actor %s did not drain within %ss; aborting",
                        self.name,
                        name,
                        self._cleanup_timeout,
                    )
            child.cancel_scope.cancel()
            with trio.move_on_after(self._cleanup_timeout):
                await child.done.wait()
            if not child.done.is_set():
                # It shields itself from cancellation; still answer its callers now.
                logger.error(
                    "%s: actor %s ignored cancellation for %ss",
                    self.name,
                    name,
                    self._cleanup_timeout,
                )
                child.inbox.fail_pending(ActorUnavailable(name, "actor is stopping"))

    async def shutdown(self, mode: ShutdownMode = ShutdownMode.DRAIN) -> None:
        """Stop every actor, most recently started first (later actors may depend on
        earlier ones). Same contract as `stop`."""
        for name in reversed(list(self._children)):
            await self.stop(name, mode)

    def _child(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise KeyError(f"supervisor {self.name}: no actor named {name!r}") from None

    async def _supervise(
        self, child: _Child, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run incarnations of `child` until it returns, is stopped, or escalates.

        The `finally` answers every remaining caller; it is synchronous, so it completes
        even when this task is being cancelled.
        """
        readiness = _Readiness(task_status)
        # Any way out not named below is a cancellation: a stop(ABORT) or the nursery's.
        ended = "actor was aborted"
        try:
            with child.cancel_scope:
                while True:
                    status: Any = trio.TASK_STATUS_IGNORED if readiness.reported else readiness
                    try:
                        await child.run(child.inbox, *child.args, task_status=status)
                        logger.info("%s: actor %s returned", self.name, child.name)
                        ended = "actor has exited"
                        return
                    except Exception as error:
                        self._crashed(child, error, started=readiness.reported)
                        if not readiness.reported:
                            ended = "actor failed to start"
                            raise
                        if child.stopping:
                            ended = "actor crashed while stopping"
                            return
                        escalation = self._escalation(child, error)
                        if escalation is not None:
                            ended = "actor crashed too often and was given up"
                            raise escalation from error
                    child.restarts += 1
                    logger.warning(
                        "%s: restarting actor %s (restart %d)",
                        self.name,
                        child.name,
                        child.restarts,
                    )
                    # An actor that raises before its first checkpoint must not spin this
                    # loop without ever letting other tasks (or a cancellation) in.
                    await trio.lowlevel.checkpoint()
        finally:
            child.inbox.fail_pending(ActorUnavailable(child.name, ended))
            child.done.set()

    def _crashed(self, child: _Child, error: Exception, *, started: bool = True) -> None:
        error_type, detail = _describe(error)
        if not started:
            # Raised to whoever started it, who reports it (a CLI in one line): logging its
            # traceback here too would bury that line.
            logger.info("%s: actor %s failed to start with %s: %s", self.name, child.name,
                        error_type, detail)
            child.inbox.fail_outstanding(ActorCrashed(child.name, error_type, detail))
            return
        logger.error(
            "%s: actor %s crashed with %s: %s",
            self.name,
            child.name,
            error_type,
            detail,
            exc_info=error,
        )
        child.inbox.fail_outstanding(ActorCrashed(child.name, error_type, detail))

    def _escalation(self, child: _Child, error: Exception) -> RestartIntensityExceeded | None:
        """Record a crash now; return the error to escalate with if the policy is exceeded."""
        now = trio.current_time()
        times = child.crash_times
        times.append(now)
        while times and times[0] < now - child.policy.within:
            times.popleft()
        if len(times) <= child.policy.max_restarts:
            return None
        error_type, detail = _describe(error)
        return RestartIntensityExceeded(
            child.name,
            f"{len(times)} crashes within {child.policy.within}s "
            f"(max_restarts={child.policy.max_restarts}); last: {error_type}: {detail}",
        )


def _describe(error: BaseException) -> tuple[str, str]:
    """(error_type, detail) for `ActorCrashed`: the single leaf of a group if there is one."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return type(error).__qualname__, str(error)


@asynccontextmanager
async def open_supervisor(
    name: str, *, cleanup_timeout: float = 5.0
) -> AsyncIterator[Supervisor]:
    """Open a supervisor named `name`; on leaving, stop its actors.

    Leaving normally drains every actor (`ShutdownMode.DRAIN`). Leaving by an exception
    or a cancellation aborts them: trio cancels the nursery, and each actor's callers get
    `ActorUnavailable`. If an actor exceeds its restart intensity, the body is cancelled,
    the other actors are aborted, and `RestartIntensityExceeded` is raised here bare (not
    in an ExceptionGroup), so a parent can catch it by type.
    """
    try:
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(name, nursery, cleanup_timeout)
            yield supervisor
            await supervisor.shutdown(ShutdownMode.DRAIN)
    except BaseExceptionGroup as group:
        escalated, rest = group.split(RestartIntensityExceeded)
        if escalated is None or rest is not None:
            raise
        raise _leaves(escalated)[0]  # noqa: B904 - its __cause__ is the crash that escalated


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found


async def serve(
    inbox: Inbox,
    handle: Callable[[Any], Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a simple actor: `await handle(message)` for each message, one at a time, and
    reply with its result when the sender called.

    An `ActorError` from `handle` is a typed refusal: it fails that request and the loop
    goes on. Any other exception is a crash and propagates to the supervisor. Returns once
    the inbox is closed and drained. If cancelled mid-`handle`, the request stays
    outstanding in the inbox for the supervisor to fail.
    """
    task_status.started()
    async for envelope in inbox:
        try:
            result = await handle(envelope.message)
        except ActorError as refusal:
            if not envelope.expects_reply:
                logger.warning("%s: cast %r refused: %s", inbox.name, envelope.message, refusal)
            envelope.fail(refusal)
            continue
        if envelope.expects_reply:
            envelope.reply(result)
