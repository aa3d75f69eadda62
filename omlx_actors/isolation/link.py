"""The front's side of the process boundary: the engine link.

`open_engine_link(config, model_path)` starts the engine process (`isolation.host`) on one
end of a socket pair and yields an `EngineLink` once the engine is ready. The front uses it
through `RemoteAddress`es that look like local actor addresses (`call`, `cast`,
`cast_nowait`), so the runtime and its sessions don't know which transport they are on.

The link is the engine's supervisor. It owns the engine process, the socket (one reader
task, one writer task), the calls waiting for replies, and a `Recovery` of every request in
flight. It notices the engine's death - the process exits or is killed, the socket breaks,
or no heartbeat is answered within `engine_heartbeat_timeout_s` - then fails the calls that
were waiting on it, starts a new engine, waits for it to be ready (model loaded, SSD index
rebuilt), re-sends sticky fault injections, and re-submits each in-flight request as a
continuation (see `recovery.py`). Sessions see a pause; HTTP streams keep sending
keep-alives. Requests submitted during a restart are held and sent once it is ready.

A new engine that fails while starting (killed, crashed or timed out while loading, or
reporting that it cannot load) is one more death, under the same policy. Deaths beyond
`engine_max_restarts` within `engine_restart_window_s` make the engine "failed" for a
cool-down (`engine_restart_cooldown_s`, doubled at each give-up in a row up to
`engine_restart_cooldown_max_s`; `EngineStatus.retry_in_s` says when the next try is):
in-flight requests end with an error, new ones get `EngineUnavailable`; then a new engine
is tried.

Poison evidence: each engine process records, before every step, the requests it is about
to run in a file the link gave it (`engine/step_record.py`); when it dies the link reads it
and tells `Recovery` exactly which requests were in the step that died.

Cancellation: `EngineLink.call` cancelled mid-call forgets the call (a late reply is
dropped); a `Submit` cancelled that way is aborted in the engine, so nothing runs unheard.

Where it lives: this module is the link - calls over the socket, the incarnation's tasks,
supervision. Starting and reaping an engine process is `incarnation.py`'s; when to give up
is `restarts.py`'s (pure); which requests to resume or fail is `recovery.py`'s (pure).
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from omlx_actors.config import RuntimeConfig
from omlx_actors.engine.executor import ENGINE_EVENT_BACKLOG, DuplicateRequest
from omlx_actors.engine.side import EngineStatus
from omlx_actors.engine.messages import (
    Abort,
    EngineEvent,
    Finished,
    FinishReason,
    InjectFault,
    Ping,
    Submit,
    TokenDelta,
)
from omlx_actors.isolation.frames import (
    ConnectionLost,
    Kind,
    decode_events,
    decode_message,
    encode_message,
)
from omlx_actors.isolation.incarnation import REAP_TIMEOUT_S, Incarnation, Spawner
from omlx_actors.isolation.messages import HostReady, HostStop, LookupAndSubmit
from omlx_actors.isolation.recovery import Recovery
from omlx_actors.isolation.restarts import RestartPolicy
from omlx_actors.kernel import ActorError, ActorUnavailable, CallTimeout, wire

log = logging.getLogger(__name__)

# Seconds between heartbeats (a `Ping`, answered by the engine's trio loop, not its MLX
# thread, so a long step does not delay it).
HEARTBEAT_INTERVAL_S = 1.0


class EngineState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineDied(ActorUnavailable):
    """The engine process died while the call was waiting (or before it was sent)."""


@attrs.define(eq=False)
class RemoteMemory:
    """The engine's memory snapshots, as the front sees them (latest wins)."""

    latest: Any = None


class RemoteAddress:
    """An actor in the engine process, addressed like a local one."""

    def __init__(self, link: EngineLink, target: str) -> None:
        self._link = link
        self._target = target

    @property
    def name(self) -> str:
        return self._target

    async def call(self, message: Any, *, timeout: float | None = None) -> Any:
        return await self._link.call(self._target, message, timeout=timeout)

    def cast_nowait(self, message: Any) -> bool:
        return self._link.cast_nowait(self._target, message)

    async def cast(self, message: Any) -> None:
        await self._link.cast(self._target, message)


class EngineLink:
    """See the module docstring. Built by `open_engine_link`."""

    def __init__(self, config: RuntimeConfig, model_path: Path, nursery: trio.Nursery) -> None:
        self.config = config
        self.model_path = model_path
        self._nursery = nursery
        self.state = EngineState.STARTING
        self.recovery = Recovery()
        self.memory = RemoteMemory()
        self._events_send, self.events = trio.open_memory_channel[EngineEvent](ENGINE_EVENT_BACKLOG)
        self._current: Incarnation | None = None
        self._call_ids = itertools.count(1)
        self._sticky_faults: list[InjectFault] = []
        self._restarts = RestartPolicy(
            max_restarts=config.engine_max_restarts,
            window_s=config.engine_restart_window_s,
            cooldown_base_s=config.engine_restart_cooldown_s,
            cooldown_max_s=config.engine_restart_cooldown_max_s,
        )
        self._closing = False
        self._stopped = trio.Event()
        # Resume timing: the death being recovered from, and requests still to resume.
        self._died_at: float | None = None
        self._awaiting_resume: set[str] = set()
        self.restarts = 0
        self.last_exit: str | None = None
        self.last_restart_s: float | None = None
        self.last_resume_s: float | None = None
        self.failed_reason: str | None = None
        self.first_ready: HostReady | None = None
        # Failed: when the next engine is tried.
        self._retry_at: float | None = None  # on trio's clock
        self._spawner = Spawner(config, model_path)

    # -- what the runtime uses ----------------------------------------------------------------

    def address(self, target: str) -> RemoteAddress:
        return RemoteAddress(self, target)

    @property
    def pid(self) -> int | None:
        return self._current.ready.pid if self._current is not None else None

    @property
    def starting_pid(self) -> int | None:
        """The engine process being started (not yet ready), if any."""
        starting = self._spawner.starting
        return starting.pid if starting is not None else None

    def status(self) -> EngineStatus:
        retry_in = None
        if self.state is EngineState.FAILED and self._retry_at is not None:
            retry_in = round(max(0.0, self._retry_at - trio.current_time()), 3)
        return EngineStatus(
            state=self.state.value, isolation="process", pid=self.pid, restarts=self.restarts,
            resumed_requests=self.recovery.resumed_total,
            crash_loop_failures=self.recovery.poisoned_total, last_exit=self.last_exit,
            last_restart_s=self.last_restart_s, last_resume_s=self.last_resume_s,
            reason=self.failed_reason if self.state is EngineState.FAILED else None,
            retry_in_s=retry_in,
        )

    async def call(self, target: str, message: Any, *, timeout: float | None = None) -> Any:
        if target == "executor" and isinstance(message, Submit):
            return await self._submit(message, timeout)
        if target == "executor" and isinstance(message, InjectFault) and message.sticky:
            self._sticky_faults.append(message)
        return await self._call(self._live_incarnation(target), target, message, timeout)

    def cast_nowait(self, target: str, message: Any) -> bool:
        if target == "executor" and isinstance(message, Abort):
            self._abort(message)
            return True
        inc = self._current
        if inc is None or self.state is not EngineState.READY:
            return True  # nothing to tell: the engine that would care is gone
        return inc.writer.send_nowait(Kind.CAST, 0, target, encode_message(message))

    async def cast(self, target: str, message: Any) -> None:
        if not self.cast_nowait(target, message):
            inc = self._current
            if inc is not None:
                await inc.writer.send_quietly(Kind.CAST, 0, target, encode_message(message))

    # -- submissions, aborts, continuations --------------------------------------------------

    async def submit(self, submit: Submit) -> None:
        """What `Runtime.submit` calls: see `_submit`."""
        await self._submit(submit, self.config.submit_timeout_s)

    async def _submit(self, submit: Submit, timeout: float | None) -> None:
        """Track the request, then send it now if the engine is ready and nothing is being
        proven, else hold it (sent once possible). The engine's refusals are raised here, as
        with a local engine; a death while waiting is not a refusal: it will be resumed."""
        if self.state in (EngineState.FAILED, EngineState.STOPPED) or self._closing:
            raise ActorUnavailable("engine", self.failed_reason or "the engine is stopped")
        request_id = submit.request_id
        if request_id in self.recovery.tracked:
            raise DuplicateRequest("executor", f"request {request_id!r} is still running")
        self.recovery.track(submit)
        inc = self._current
        if inc is None or self.state is not EngineState.READY or self.recovery.holding:
            return None
        self.recovery.mark_sent(request_id)
        try:
            return await self._call(inc, "host", LookupAndSubmit(submit=submit), timeout)
        except EngineDied:
            return None  # the next engine gets its continuation
        except BaseException:
            # Refused, timed out, or our caller was cancelled: the session will not read
            # this request, so it must not run.
            if self.recovery.untrack(request_id) is not None:
                self._cast_abort(inc, request_id)
            self._pump_sends()
            raise

    def _abort(self, abort: Abort) -> None:
        tracked = self.recovery.untrack(abort.request_id)
        self._awaiting_resume.discard(abort.request_id)
        inc = self._current
        if inc is not None and self.state is EngineState.READY and (tracked is None or tracked.sent):
            self._cast_abort(inc, abort.request_id)
        self._pump_sends()

    def _cast_abort(self, inc: Incarnation, request_id: str) -> None:
        """Tell `inc` to drop a request, never blocking (a background send if the outbox is
        momentarily full: an abort is never dropped while the engine lives)."""
        payload = encode_message(Abort(request_id=request_id))
        if not inc.writer.send_nowait(Kind.CAST, 0, "executor", payload):
            self._nursery.start_soon(inc.writer.send_quietly, Kind.CAST, 0, "executor", payload)

    def _pump_sends(self) -> None:
        """Send every request `Recovery` says may go to the ready engine now."""
        inc = self._current
        if inc is None or self.state is not EngineState.READY:
            return
        for request_id in self.recovery.sendable():
            self.recovery.mark_sent(request_id)
            self._nursery.start_soon(self._send_continuation, inc, request_id)

    async def _send_continuation(self, inc: Incarnation, request_id: str) -> None:
        """(Re)submit a tracked request to `inc` as its continuation, with a fresh prefix
        lookup in that engine (the SSD tier makes a long prompt cheap to resume)."""
        if request_id not in self.recovery.tracked:
            return
        resumed = self.recovery.continuation(request_id)
        if isinstance(resumed, Finished):  # nothing left to generate
            await self._emit(resumed)
            self._pump_sends()
            return
        try:
            await self._call(inc, "host", LookupAndSubmit(submit=resumed),
                             self.config.submit_timeout_s)
        except EngineDied:
            return  # recovery already counts it as unsent: the next engine gets it
        except ActorError as exc:
            if self.recovery.untrack(request_id) is not None:
                self._cast_abort(inc, request_id)  # a timed-out submit may still get in
                await self._emit(_error(request_id, type(exc).__name__,
                                        f"the request could not be resumed: {exc}"))
            self._pump_sends()
            return
        if request_id not in self.recovery.tracked:  # aborted while we were sending it
            self._cast_abort(inc, request_id)

    async def _emit(self, event: EngineEvent) -> None:
        # Shielded: an event recorded by `Recovery` must reach its session, or the two
        # disagree about what was delivered (and a continuation would skip a token). The
        # dispatcher never blocks, so this waits at most for it to take the next event.
        # With room, `send_nowait` (no checkpoint, so nothing can cancel it): a frame holds
        # one event per stream, and a shielded scope and a scheduling round per event cost
        # this loop more than the events themselves at 64 streams.
        try:
            self._events_send.send_nowait(event)
            return
        except trio.WouldBlock:
            pass
        with trio.CancelScope(shield=True):
            await self._events_send.send(event)

    # -- calls over the socket -----------------------------------------------------------------

    def _live_incarnation(self, target: str) -> Incarnation:
        inc = self._current
        if inc is None or self.state is not EngineState.READY:
            raise EngineDied(target, f"the engine is {self.state.value}")
        return inc

    async def _call(self, inc: Incarnation, target: str, message: Any, timeout: float | None) -> Any:
        """One call on `inc`. Raises `EngineDied` if it dies first, `CallTimeout` after
        `timeout` (the far side may still act on it), or the far side's `ActorError`."""
        if inc.dead.is_set():
            raise EngineDied(target, f"the engine died ({inc.cause})")
        ident = next(self._call_ids)
        send, receive = trio.open_memory_channel[tuple[Kind, Any]](1)
        inc.pending[ident] = send
        try:
            with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
                await inc.writer.send(Kind.CALL, ident, target, encode_message(message))
                kind, payload = await receive.receive()
            if scope.cancelled_caught:
                raise CallTimeout(target, f"no reply within {timeout}s")
        except ConnectionLost:
            kind, payload = None, inc.cause
        finally:
            inc.pending.pop(ident, None)
        if kind is Kind.REPLY:
            return decode_message(payload)
        if kind is Kind.ERROR:
            raise wire.decode_error(payload)
        raise EngineDied(target, f"the engine died ({payload})")

    # -- incarnations ----------------------------------------------------------------------

    async def _run_incarnation(self, inc: Incarnation) -> None:
        """Serve `inc` until it dies (or the link stops it); then reap it and fail the calls
        that were waiting on it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, inc)
            nursery.start_soon(self._read, inc)
            nursery.start_soon(self._watch_process, inc)
            nursery.start_soon(self._heartbeat, inc)
            await inc.dead.wait()
            nursery.cancel_scope.cancel()
        await inc.reap(kill=not self._closing)
        self.last_exit = inc.how_it_ended()
        inc.writer.close()  # a caller waiting for room in the outbox gets ConnectionLost
        inc.stream.socket.close()  # its reader and writer tasks have ended with it
        for send in list(inc.pending.values()):
            send.send_nowait((None, inc.cause))  # capacity 1, one answer each: never blocks
        inc.pending.clear()

    async def _write(self, inc: Incarnation) -> None:
        try:
            await inc.writer.run()
        except ConnectionLost as exc:
            inc.die(f"the connection broke: {exc}")

    async def _watch_process(self, inc: Incarnation) -> None:
        await inc.process.wait()
        inc.die("the process exited")

    async def _heartbeat(self, inc: Incarnation) -> None:
        timeout = self.config.engine_heartbeat_timeout_s
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._call(inc, "executor", Ping(), timeout)
            except CallTimeout:
                inc.die(f"no heartbeat answered within {timeout}s")
                return
            except ActorError:
                pass  # died (noticed elsewhere) or stopping (a drain): not a hang

    async def _read(self, inc: Incarnation) -> None:
        try:
            while True:
                kind, ident, _, payload = await inc.reader.receive()
                if kind is Kind.EVENTS:
                    await self._on_events(payload)
                elif kind is Kind.SNAPSHOT:
                    self.memory.latest = decode_message(payload)
                elif kind in (Kind.REPLY, Kind.ERROR):
                    waiting = inc.pending.pop(ident, None)
                    if waiting is not None:
                        waiting.send_nowait((kind, payload))
        except ConnectionLost as exc:
            inc.die(f"the connection closed: {exc}")

    async def _on_events(self, payload: list[bytes]) -> None:
        """Record and forward a frame's events. Each event is recorded (`Recovery`) and
        forwarded (`_emit`, shielded) with no checkpoint in between, so a death noticed
        meanwhile cannot separate the two."""
        for event in decode_events(payload):
            if isinstance(event, TokenDelta) and event.request_id in self._awaiting_resume:
                if self._died_at is not None and self.last_resume_s is None:
                    self.last_resume_s = time.monotonic() - self._died_at
                self._awaiting_resume.clear()
            for forwarded in self.recovery.on_event(event):
                await self._emit(forwarded)
        self._pump_sends()

    # -- supervision -----------------------------------------------------------------------

    async def supervise(self, first: Incarnation, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run incarnations one after another until the link stops."""
        inc: Incarnation | None = first
        try:
            while inc is not None:
                self._current = inc
                self.state = EngineState.READY
                self._restarts.ready(time.monotonic())
                self._pump_sends()
                if inc is first:
                    task_status.started()
                await self._run_incarnation(inc)
                self._current = None
                if self._closing:
                    break
                inc = await self._restart(inc)
        finally:
            with trio.CancelScope(shield=True):
                if self.state is not EngineState.FAILED:
                    self.state = EngineState.STOPPED
                await self._fail_all("EngineStopped", self.failed_reason or "the engine stopped")
                self._events_send.close()
                self._spawner.close()
                self._stopped.set()

    async def _restart(self, dead: Incarnation) -> Incarnation:
        """Replace `dead` with a ready engine: every failed start is one more death, and
        past the restart limit the engine is failed for a cool-down, then tried again. Only
        cancellation (the link stopping) ends it without an engine; an engine it was
        starting then is killed and reaped (`Spawner.spawn`), and the state is left as it
        was."""
        in_step = dead.last_step()
        log.error("engine process %d died (%s); starting a new one", dead.ready.pid, self.last_exit)
        await self._on_death(in_step)
        while True:
            if self._restarts.exhausted():
                await self._cool_down(
                    f"the engine died {self._restarts.deaths} times within "
                    f"{self.config.engine_restart_window_s:g}s (last: {self.last_exit})")
            try:
                inc = await self._spawner.spawn()
            except (ActorError, OSError) as exc:
                self.last_exit = f"a new engine did not start: {exc}"
                log.error("%s", self.last_exit)
                await self._on_death(frozenset())  # it ran no step: nobody is struck
                continue
            break
        for fault in self._sticky_faults:
            # Queued ahead of every continuation: the writer sends the outbox in order.
            inc.writer.send_nowait(Kind.CAST, 0, "executor", encode_message(fault))
        self.last_restart_s = time.monotonic() - self._died_at
        log.warning("engine restarted in %.2fs (pid %d); resuming %d requests",
                    self.last_restart_s, inc.ready.pid, len(self.recovery.tracked))
        return inc

    async def _on_death(self, in_step: frozenset[str]) -> None:
        """Count a death (of a serving or a starting engine) and apply the poison rule to
        the requests that were in the step that died."""
        now = time.monotonic()
        self.state = EngineState.RESTARTING
        self.restarts += 1
        self._died_at = now
        self.last_resume_s = None
        self._restarts.died(now)
        for failure in self.recovery.on_death(in_step):
            log.error("%s", failure.error)
            await self._emit(_error(failure.request_id, failure.error_type, failure.error))
        self._awaiting_resume = set(self.recovery.tracked)

    async def _cool_down(self, reason: str) -> None:
        """Give up for a while: fail what is in flight, refuse new requests (503) while the
        state is failed, then forget the deaths and let the caller try a new engine."""
        delay = self._restarts.give_up()
        log.error("engine failed: %s; trying a new one in %.0fs", reason, delay)
        self.state = EngineState.FAILED
        self.failed_reason = reason
        self._retry_at = trio.current_time() + delay
        await self._fail_all("EngineStopped", reason)
        self._awaiting_resume.clear()
        await trio.sleep_until(self._retry_at)
        self._retry_at = None
        self._restarts.cooled_down()
        self.state = EngineState.RESTARTING

    async def _fail_all(self, error_type: str, error: str) -> None:
        for request_id in list(self.recovery.tracked):
            self.recovery.untrack(request_id)
            await self._emit(_error(request_id, error_type, error))

    async def stop(self, mode: str) -> None:
        """Stop the engine: drain (running requests finish, bounded by `drain_timeout_s`) or
        abort; then the process exits. Idempotent."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        inc = self._current
        if inc is not None and self.state is EngineState.READY:
            try:
                await self._call(inc, "host", HostStop(mode=mode),
                                 self.config.drain_timeout_s + REAP_TIMEOUT_S)
            except ActorError as exc:
                log.warning("the engine did not stop cleanly: %s", exc)
            with trio.move_on_after(REAP_TIMEOUT_S):
                await inc.process.wait()
            inc.die("stopped")
        else:
            self._nursery.cancel_scope.cancel()  # a restart in progress, if any
        await self._stopped.wait()


def _error(request_id: str, error_type: str, error: str) -> Finished:
    return Finished(request_id=request_id, reason=FinishReason.ERROR, prompt_tokens=0,
                    completion_tokens=0, error=error, error_type=error_type)


@asynccontextmanager
async def open_engine_link(config: RuntimeConfig, model_path: Path) -> AsyncIterator[EngineLink]:
    """Start the engine process; yield its link once the engine is ready. Raises what the
    first start raises (`EngineLoadFailed`, `ActorUnavailable`). On exit the engine stops
    per `config.shutdown_mode` and every request still tracked ends with an error."""
    async with trio.open_nursery() as nursery:
        link = EngineLink(config, model_path, nursery)
        try:
            first = await link._spawner.spawn()
        except BaseException:
            link._spawner.close()
            raise
        link.first_ready = first.ready
        await nursery.start(link.supervise, first)
        try:
            yield link
        finally:
            with trio.CancelScope(shield=True):
                await link.stop(config.shutdown_mode)
