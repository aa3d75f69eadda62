"""The engine process: `python -m omlx_actors.isolation.host FD`.

It runs the engine side (`engine.assembly.open_engine_side`: memory enforcer, cache index,
executor on its MLX thread, SSD writer) and serves it over the socket on file descriptor FD,
which the front created (`isolation.link`). Frames are `isolation.frames`.

Tasks, each owning one thing: the reader (the socket's receive half; it starts one task per
call, so a slow call - an SSD load - never holds up an abort behind it), the writer (the
send half, fed by its bounded outbox), the event forwarder (the executor's event channel →
one `EVENTS` frame per batch of ready events), and the snapshot forwarder.

Lifetime: it ends on `HostStop` (drain or abort, as asked; `HostStopped` is the last frame),
or when the front goes away (the socket closes: abort). It leaves with `os._exit` after
flushing, because MLX's worker thread can abort an interpreter that exits normally.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.assembly import LocalEngineSide, open_engine_side
from omlx_actors.engine.executor import EngineLoadFailed
from omlx_actors.isolation.frames import (
    ConnectionLost,
    FrameReader,
    FrameWriter,
    Kind,
    decode_message,
    encode_events,
    encode_message,
)
from omlx_actors.isolation.messages import (
    HostHello,
    HostLoadFailed,
    HostReady,
    HostStop,
    HostStopped,
    LookupAndSubmit,
)
from omlx_actors.kernel import ActorError, ShutdownMode, wire

log = logging.getLogger(__name__)

# Python's thread switch interval in the engine process unless the config sets one. Its
# MLX thread gives up the GIL while the device computes; with Python's 5 ms, the moment a
# step is done it can wait that long for a trio loop busy with the last step's events.
# The engine is this process's only job, so it may set the process-wide value.
ENGINE_SWITCH_INTERVAL_S = 0.0002

# Exit statuses the front reads: 0 stopped when asked; 3 the model could not be loaded.
EXIT_STOPPED = 0
EXIT_LOAD_FAILED = 3
EXIT_BAD_HELLO = 4


class _Host:
    def __init__(self, side: LocalEngineSide, writer: FrameWriter) -> None:
        self.side = side
        self.writer = writer
        self.stop: HostStop | None = None
        self.stop_call: int = 0
        self.stop_requested = trio.Event()
        self.targets = {"executor": side.executor, "cache-index": side.cache_index, "ssd": side.ssd}

    async def serve_until_gone(self, reader: FrameReader, nursery: trio.Nursery) -> None:
        """Read frames until the front goes away (then stop: abort); each call is answered
        from its own task in `nursery`."""
        try:
            await self._serve_frames(reader, nursery)
        except ConnectionLost:
            log.warning("engine host: the front went away; stopping (abort)")
            self.stop_requested.set()

    async def _serve_frames(self, reader: FrameReader, nursery: trio.Nursery) -> None:
        while True:
            kind, ident, target, payload = await reader.receive()
            message = decode_message(payload)
            if kind is Kind.CALL and isinstance(message, HostStop):
                # Answered with HostStopped once the engine has stopped (see `serve`).
                self.stop, self.stop_call = message, ident
                self.stop_requested.set()
            elif kind is Kind.CALL:
                nursery.start_soon(self.answer, ident, target, message)
            elif kind is Kind.CAST:
                address = self.targets.get(target)
                if address is not None and not address.cast_nowait(message):
                    nursery.start_soon(address.cast, message)  # never dropped, only late

    async def answer(self, ident: int, target: str, message) -> None:
        """Answer one call. A front that is gone gets no answer (`send_quietly`)."""
        try:
            result = await self.call(target, message)
        except ActorError as exc:
            await self.writer.send_quietly(Kind.ERROR, ident, target, wire.encode_error(exc))
        except Exception as exc:  # noqa: BLE001 - the front must hear of any failure
            log.exception("engine host: %s call %r failed", target, message)
            error = ActorError(target, f"{type(exc).__name__}: {exc}")
            await self.writer.send_quietly(Kind.ERROR, ident, target, wire.encode_error(error))
        else:
            await self.writer.send_quietly(Kind.REPLY, ident, target, encode_message(result))

    async def call(self, target: str, message):
        if target == "host":
            if isinstance(message, LookupAndSubmit):
                return await self.side.submit(message.submit)
            raise ActorError("host", f"unknown host message {type(message).__name__}")
        address = self.targets.get(target)
        if address is None:
            raise ActorError(target, f"no actor {target!r} in this engine")
        return await address.call(message)

    async def forward_events(self) -> None:
        """Every engine event, in order, batched per wake-up; ends when the executor has
        stopped and closed its channel (so a drain's last events all go out). With the front
        gone it keeps draining the channel, so the executor never blocks on it."""
        events = self.side.events
        async for first in events:
            batch = [first]
            while True:
                try:
                    batch.append(events.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self.writer.send_quietly(Kind.EVENTS, 0, "", encode_events(batch))

    async def forward_snapshots(self) -> None:
        async for snapshot in self.side.memory.subscribe():
            await self.writer.send_quietly(Kind.SNAPSHOT, 0, "", wire.encode(snapshot))


async def serve(sock: socket.socket) -> int:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    reader, writer = FrameReader(stream), FrameWriter(stream)
    kind, _, _, payload = await reader.receive()
    hello = decode_message(payload) if kind is Kind.CAST else None
    if not isinstance(hello, HostHello):
        log.error("engine host: expected HostHello first, got %r", hello)
        return EXIT_BAD_HELLO
    config = RuntimeConfig.from_json(hello.config_json)
    logging.getLogger().setLevel(config.log_level.upper())  # the front's --log-level
    sys.setswitchinterval(config.gil_switch_interval_s or ENGINE_SWITCH_INTERVAL_S)
    stop_mode = [ShutdownMode.ABORT]  # unless the front asks for a drain
    code = EXIT_STOPPED
    async with trio.open_nursery() as outer:
        outer.start_soon(_write, writer)
        # The serving nursery outlives the engine side, so frames (aborts, pings) are still
        # served while the executor drains, and the drain's last events still go out.
        async with trio.open_nursery() as serving:
            try:
                async with open_engine_side(config, hello.model_path, stop_mode=stop_mode,
                                            step_record_path=hello.step_record_path) as side:
                    host = _Host(side, writer)
                    events_done = trio.Event()

                    async def forward_events() -> None:
                        try:
                            await host.forward_events()
                        finally:
                            events_done.set()

                    serving.start_soon(forward_events)
                    serving.start_soon(host.forward_snapshots)
                    ready = HostReady(info=side.info, pid=os.getpid(),
                                      cache_index=side.cache_index is not None,
                                      ssd=side.ssd is not None)
                    await writer.send_quietly(Kind.REPLY, 0, "host", encode_message(ready))
                    serving.start_soon(host.serve_until_gone, reader, serving)
                    await host.stop_requested.wait()
                    if host.stop is not None and host.stop.mode == "drain":
                        stop_mode[0] = ShutdownMode.DRAIN
                # The engine side has stopped and closed its event channel.
                with trio.move_on_after(5):
                    await events_done.wait()
                if host.stop is not None:
                    stopped = encode_message(HostStopped())
                    await writer.send_quietly(Kind.REPLY, host.stop_call, "host", stopped)
            except Exception as exc:  # noqa: BLE001 - unwrap the supervisor's group
                failure = _load_failure(exc)
                if failure is None:
                    raise
                # The front reports it (the CLI in one line); say it here only when asked.
                log.info("engine host: %s", failure.message)
                failed = HostLoadFailed(error_type=type(failure).__name__, error=failure.message)
                await writer.send_quietly(Kind.REPLY, 0, "host", encode_message(failed))
                code = EXIT_LOAD_FAILED
            serving.cancel_scope.cancel()
        writer.close()  # _write returns once the queued frames are written
    return code


async def _write(writer: FrameWriter) -> None:
    try:
        await writer.run()
    except ConnectionLost:
        pass  # the front is gone; nobody is left to tell


def _load_failure(exc: BaseException) -> EngineLoadFailed | None:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, EngineLoadFailed) else None


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, format="engine[%(process)d] %(levelname)s %(name)s: %(message)s")
    fd = int(argv[1])
    sock = socket.socket(fileno=fd)
    try:
        code = trio.run(serve, sock)
    except BaseException:  # noqa: BLE001 - say what killed us, then leave without cleanup
        log.exception("engine host failed")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv)
