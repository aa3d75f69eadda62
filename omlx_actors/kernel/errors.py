"""Typed errors that travel from an actor to whoever asked it.

Every error an actor hands back to a caller is an `ActorError`: it names the actor and
carries only strings, so it pickles, prints and crosses a process boundary (see
`wire.encode_error`) with its original type intact. The caller raises it as-is.

Each class lists the constructor arguments it is rebuilt from in `wire_fields`; `__reduce__`
and the wire codec both use that list, so a subclass that adds a field only has to name it
there.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

__all__ = [
    "ActorCrashed",
    "ActorError",
    "ActorUnavailable",
    "CallTimeout",
    "InboxFull",
    "RestartIntensityExceeded",
    "UnknownMessage",
    "unknown_message",
]


class ActorError(Exception):
    """Base of every error an actor reports to a caller.

    `actor` is the name of the actor the error is about; `message` says what happened.
    """

    wire_fields: ClassVar[tuple[str, ...]] = ("actor", "message")

    def __init__(self, actor: str, message: str = "") -> None:
        super().__init__(actor, message)
        self.actor = actor
        self.message = message

    def __str__(self) -> str:
        return f"{self.actor}: {self.message}" if self.message else self.actor

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.wire_fields)
        return f"{type(self).__name__}({args})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's default reduce replays `self.args`, which a subclass with a different
        # signature would get wrong; rebuild from the declared fields instead.
        return (type(self), tuple(getattr(self, name) for name in self.wire_fields))

    def __eq__(self, other: object) -> bool:
        # Value equality lets tests and the wire round-trip compare errors exactly.
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.wire_fields)

    def __hash__(self) -> int:
        return hash((type(self), tuple(getattr(self, n) for n in self.wire_fields)))


class ActorCrashed(ActorError):
    """The actor raised while it held the caller's request; the supervisor restarts it.

    `error_type` is the qualified name of the exception the actor raised, `detail` its text.
    The request is not retried: a message that crashes an actor would crash the next
    incarnation too.
    """

    wire_fields: ClassVar[tuple[str, ...]] = ("actor", "error_type", "detail")

    def __init__(self, actor: str, error_type: str, detail: str = "") -> None:
        super().__init__(actor, f"crashed with {error_type}: {detail}")
        self.args = (actor, error_type, detail)
        self.error_type = error_type
        self.detail = detail


class ActorUnavailable(ActorError):
    """The actor is stopped, stopping, or gave up after too many crashes."""


class CallTimeout(ActorError):
    """No reply arrived within the caller's timeout. The request may still be served."""


class InboxFull(ActorError):
    """The actor's inbox had no room and its overflow policy refuses to wait (longer)."""


class RestartIntensityExceeded(ActorError):
    """An actor crashed more often than its `RestartPolicy` allows; raised to the parent."""


class UnknownMessage(ActorError):
    """An actor received a message outside its closed union: a bug in the sender."""


def unknown_message(actor_name: str, message: object) -> NoReturn:
    """Raise `UnknownMessage` for `message`; the `case _:` arm of every actor's `match`."""
    raise UnknownMessage(
        actor_name, f"unknown message {type(message).__qualname__}: {message!r}"
    )
