"""One engine process as the link sees it - an *incarnation* - from spawn to reap.

`Spawner.spawn` starts `python -m omlx_actors.isolation.host` on one end of a socket pair,
sends it its `HostHello` (the configuration, the model, where to record its steps) and
waits, at most `engine_start_timeout_s`, for its first answer: `HostReady` gives an
`Incarnation`; `HostLoadFailed`, a death, a broken connection or the timeout raise, and
nothing of that process is left behind (killed, reaped, its socket and step record gone).
`Incarnation.reap` makes sure a dead or stopped engine's process is gone too.

The link (`link.py`) decides when to spawn and what a death means; this module only
handles the process and its connection.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.executor import EngineLoadFailed
from omlx_actors.engine.step_record import read_step_record
from omlx_actors.isolation.frames import (
    ConnectionLost,
    FrameReader,
    FrameWriter,
    Kind,
    decode_message,
    encode_message,
)
from omlx_actors.isolation.messages import HostHello, HostLoadFailed, HostReady
from omlx_actors.kernel import ActorUnavailable

__all__ = ["REAP_TIMEOUT_S", "Incarnation", "Spawner", "describe_exit"]

# How long a dead engine's process may take to be reaped after SIGKILL.
REAP_TIMEOUT_S = 5.0


@attrs.define(eq=False)
class Incarnation:
    """A ready engine process and its connection. `pending`: the link's calls waiting for
    a reply, by call id. Once the link notices it is gone, `dead` is set and `cause` says
    why (the first cause noticed)."""

    process: trio.Process
    stream: trio.SocketStream
    writer: FrameWriter
    reader: FrameReader
    ready: HostReady
    record_path: str  # where it records the requests of its current step
    pending: dict[int, trio.MemorySendChannel] = attrs.field(factory=dict)
    dead: trio.Event = attrs.field(factory=trio.Event)
    cause: str | None = None

    def die(self, cause: str) -> None:
        if self.cause is None:
            self.cause = cause
        self.dead.set()

    async def reap(self, *, kill: bool) -> None:
        """Wait for the process to exit, killing it first if `kill`, and again if it has
        not exited within `REAP_TIMEOUT_S`. Shielded: it runs to its end under
        cancellation, which is at most twice `REAP_TIMEOUT_S`."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None and kill:
                self.process.kill()
            with trio.move_on_after(REAP_TIMEOUT_S):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                with trio.move_on_after(REAP_TIMEOUT_S):
                    await self.process.wait()

    def how_it_ended(self) -> str:
        """How the process ended, and why the link let it go: for `EngineStatus.last_exit`."""
        return f"{describe_exit(self.process.returncode)}: {self.cause}"

    def last_step(self) -> frozenset[str]:
        """The requests in the step it was running when it died (its step record, which is
        then removed): the poison evidence."""
        in_step = read_step_record(self.record_path)
        _remove(self.record_path)
        return in_step


class Spawner:
    """Starts the engine processes of one link. Each records its steps in a file of its
    own, in a directory the first spawn makes and `close` removes."""

    def __init__(self, config: RuntimeConfig, model_path: Path) -> None:
        self.config = config
        self.model_path = model_path
        # The engine process being started (not yet ready), if any.
        self.starting: trio.Process | None = None
        self._spawns = itertools.count(1)
        self._record_dir: str | None = None

    async def spawn(self) -> Incarnation:
        """Start an engine process and wait until it is ready. Raises `EngineLoadFailed`
        if it reports that, `ActorUnavailable` if it dies, breaks the connection or times
        out while starting. Cancelled, it kills the process it started and re-raises."""
        if self._record_dir is None:
            self._record_dir = tempfile.mkdtemp(prefix="omlx-engine-")
        record_path = os.path.join(self._record_dir, f"engine-{next(self._spawns)}.step")
        ours, theirs = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "omlx_actors.isolation.host", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                # Its own session: a Ctrl-C at the terminal reaches the front, which stops
                # the engine in order, not the engine directly.
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.starting = process
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        writer, reader = FrameWriter(stream), FrameReader(stream)
        hello = HostHello(config_json=self.config.to_json(), model_path=str(self.model_path),
                          step_record_path=record_path)
        try:
            with trio.fail_after(self.config.engine_start_timeout_s):
                payload = await _handshake(writer, reader, hello)
            answer = decode_message(payload)
        except BaseException as exc:  # cancelled too: never leave a half-started engine
            process.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(REAP_TIMEOUT_S):
                await process.wait()
            _remove(record_path)
            stream.socket.close()  # a crash loop must not leak a socket per try
            if not _is_start_failure(exc):
                raise
            how = describe_exit(process.returncode)
            raise ActorUnavailable("engine", f"the engine process did not start ({how}): "
                                             f"{_leaf(exc)!r}") from None
        finally:
            self.starting = None
        if isinstance(answer, HostLoadFailed):
            with trio.move_on_after(REAP_TIMEOUT_S):
                await process.wait()
            _remove(record_path)
            stream.socket.close()
            raise EngineLoadFailed("executor", answer.error)
        assert isinstance(answer, HostReady), answer
        return Incarnation(process=process, stream=stream, writer=writer, reader=reader,
                           ready=answer, record_path=record_path)

    def close(self) -> None:
        """Remove the step records' directory (the link has stopped)."""
        if self._record_dir is not None:
            shutil.rmtree(self._record_dir, ignore_errors=True)
            self._record_dir = None


async def _handshake(writer: FrameWriter, reader: FrameReader, hello: HostHello) -> Any:
    """Send `hello`, return the payload of the engine's first answer."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.send(Kind.CAST, 0, "host", encode_message(hello))
        _, _, _, payload = await reader.receive()
        nursery.cancel_scope.cancel()
    return payload


# What a starting engine's failure looks like here: it died or broke the connection
# (`ConnectionLost`, raised in `_handshake`'s nursery, so it arrives in an exception group)
# or did not answer in time. Anything else - cancellation above all - is not ours to absorb.
_START_FAILURES = (ConnectionLost, trio.TooSlowError)


def _is_start_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(_START_FAILURES)
        return rest is None
    return isinstance(exc, _START_FAILURES)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def describe_exit(returncode: int | None) -> str:
    """A process's end in words: "exit status 1", "killed by SIGKILL"."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
