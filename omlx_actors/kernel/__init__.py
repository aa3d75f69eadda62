"""The actor kernel: bounded inboxes, typed errors, supervision and the wire format.

Imports neither MLX nor anything above it; every actor in the project is built on this.
"""

from .errors import (
    ActorCrashed,
    ActorError,
    ActorUnavailable,
    CallTimeout,
    InboxFull,
    RestartIntensityExceeded,
    UnknownMessage,
    unknown_message,
)
from .mailbox import Address, Envelope, Inbox, Overflow, open_inbox
from .supervisor import (
    RestartPolicy,
    ShutdownMode,
    Supervisor,
    open_supervisor,
    serve,
)
from .wire import (
    TAG_KEY,
    assert_plain_data,
    decode,
    decode_error,
    encode,
    encode_error,
    make_converter,
)

__all__ = [
    "TAG_KEY",
    "ActorCrashed",
    "ActorError",
    "ActorUnavailable",
    "Address",
    "CallTimeout",
    "Envelope",
    "Inbox",
    "InboxFull",
    "Overflow",
    "RestartIntensityExceeded",
    "RestartPolicy",
    "ShutdownMode",
    "Supervisor",
    "UnknownMessage",
    "assert_plain_data",
    "decode",
    "decode_error",
    "encode",
    "encode_error",
    "make_converter",
    "open_inbox",
    "open_supervisor",
    "serve",
    "unknown_message",
]
