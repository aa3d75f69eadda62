"""Supervisor: readiness, crash handling, restart intensity, drain and abort, serve()."""

from __future__ import annotations

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.kernel import (
    ActorCrashed,
    ActorError,
    ActorUnavailable,
    RestartIntensityExceeded,
    RestartPolicy,
    ShutdownMode,
    UnknownMessage,
    open_inbox,
    open_supervisor,
    serve,
    unknown_message,
)

from .examples import TEST_INBOX_CAPACITY, Crash, Echo, Hold, Stray, echo_actor


class Calls:
    """Runs calls in the background and records each outcome (value or ActorError)."""

    def __init__(self, nursery, address):
        self._nursery = nursery
        self._address = address
        self.outcomes = {}

    async def start(self, label, message):
        """Start a call and return once it is queued (or being handled)."""

        async def call():
            try:
                self.outcomes[label] = await self._address.call(message)
            except ActorError as error:
                self.outcomes[label] = error

        self._nursery.start_soon(call)
        await wait_all_tasks_blocked()


async def test_start_returns_the_started_value_only_after_setup(autojump_clock):
    address, inbox = open_inbox("model", TEST_INBOX_CAPACITY)

    async def slow_setup(inbox, *, task_status=trio.TASK_STATUS_IGNORED):
        await trio.sleep(3)  # stands in for loading weights
        task_status.started("ready")
        await serve(inbox, lambda message: trio.sleep(0))

    async with open_supervisor("root") as supervisor:
        start = trio.current_time()
        assert await supervisor.start("model", slow_setup, inbox) == "ready"
        assert trio.current_time() - start == 3


async def test_start_raises_when_the_actor_fails_before_it_is_ready():
    address, inbox = open_inbox("model", TEST_INBOX_CAPACITY)

    async def broken_setup(inbox, *, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError("weights not found")

    async with open_supervisor("root") as supervisor:
        with pytest.raises(OSError, match="weights not found"):
            await supervisor.start("model", broken_setup, inbox)
        assert supervisor.running() == []
    with pytest.raises(ActorUnavailable):
        await address.cast(Echo(text="x"))


async def test_crash_fails_the_held_call_with_actor_crashed():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with open_supervisor("root") as supervisor:
        await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
        with pytest.raises(ActorCrashed) as info:
            await address.call(Crash(reason="bad shape"))
    assert info.value == ActorCrashed("echo", "ValueError", "bad shape")
    assert str(info.value) == "echo: crashed with ValueError: bad shape"


async def test_crashed_actor_is_restarted_and_serves_the_queued_messages():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    incarnations, gate = [], trio.Event()
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, incarnations, gate)
            await calls.start("hold", Hold())
            await calls.start("crash", Crash(reason="boom"))
            await calls.start("after", Echo(text="after"))
            gate.set()
            await wait_all_tasks_blocked()
            assert supervisor.restart_count("echo") == 1
            # The address is still good for new calls too.
            assert await address.call(Echo(text="new")) == "new@2"
    assert calls.outcomes == {
        "hold": "released",
        "crash": ActorCrashed("echo", "ValueError", "boom"),
        "after": "after@2",
    }
    assert incarnations == [1, 2]


async def test_crashes_beyond_max_restarts_raise_restart_intensity_exceeded():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    policy = RestartPolicy(max_restarts=2, within=10.0)
    with pytest.raises(RestartIntensityExceeded) as info:
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], trio.Event(), policy=policy)
            for attempt in range(3):
                with pytest.raises(ActorCrashed):
                    await address.call(Crash(reason=f"crash {attempt}"))
            await trio.sleep_forever()  # the escalation cancels the body
    assert info.value == RestartIntensityExceeded(
        "echo",
        "3 crashes within 10.0s (max_restarts=2); last: ValueError: crash 2",
    )
    assert isinstance(info.value.__cause__, ValueError)


async def test_escalation_fails_pending_callers_with_actor_unavailable():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        with pytest.raises(RestartIntensityExceeded):
            async with open_supervisor("root") as supervisor:
                policy = RestartPolicy(max_restarts=0)
                await supervisor.start("echo", echo_actor, inbox, [], gate, policy=policy)
                await calls.start("hold", Hold())
                await calls.start("crash", Crash(reason="fatal"))
                await calls.start("queued", Echo(text="never served"))
                gate.set()
                await trio.sleep_forever()
    given_up = ActorUnavailable("echo", "actor crashed too often and was given up")
    assert calls.outcomes == {
        "hold": "released",
        "crash": ActorCrashed("echo", "ValueError", "fatal"),
        "queued": given_up,
    }
    with pytest.raises(ActorUnavailable):
        await address.call(Echo(text="later"))


async def test_escalation_aborts_sibling_actors_and_fails_their_callers():
    echo, echo_inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    sibling, sibling_inbox = open_inbox("sibling", TEST_INBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, sibling)
        with pytest.raises(RestartIntensityExceeded):
            async with open_supervisor("root") as supervisor:
                policy = RestartPolicy(max_restarts=0)
                await supervisor.start("sibling", echo_actor, sibling_inbox, [], trio.Event())
                await supervisor.start("echo", echo_actor, echo_inbox, [], trio.Event(), policy=policy)
                await calls.start("held by sibling", Hold())
                with pytest.raises(ActorCrashed):
                    await echo.call(Crash(reason="fatal"))
                await trio.sleep_forever()
    assert calls.outcomes == {
        "held by sibling": ActorUnavailable("sibling", "actor was aborted"),
    }


async def test_crashes_spread_wider_than_the_window_do_not_escalate(autojump_clock):
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    policy = RestartPolicy(max_restarts=1, within=5.0)
    async with open_supervisor("root") as supervisor:
        await supervisor.start("echo", echo_actor, inbox, [], trio.Event(), policy=policy)
        for attempt in range(4):
            with pytest.raises(ActorCrashed):
                await address.call(Crash(reason=f"crash {attempt}"))
            await trio.sleep(5.1)
        assert supervisor.restart_count("echo") == 4
        assert await address.call(Echo(text="alive")) == "alive@5"


async def test_drain_stop_serves_queued_messages_then_returns():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], gate)
            await calls.start("hold", Hold())
            await calls.start("a", Echo(text="a"))
            await calls.start("b", Echo(text="b"))
            nursery.start_soon(supervisor.stop, "echo", ShutdownMode.DRAIN)
            await wait_all_tasks_blocked()
            with pytest.raises(ActorUnavailable):
                await address.cast(Echo(text="too late"))
            gate.set()
            await wait_all_tasks_blocked()
            assert supervisor.running() == []
    assert calls.outcomes == {"hold": "released", "a": "a@1", "b": "b@1"}


async def test_abort_stop_fails_held_and_queued_calls_with_actor_unavailable():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
            await calls.start("hold", Hold())
            await calls.start("a", Echo(text="a"))
            await supervisor.stop("echo", ShutdownMode.ABORT)
            assert supervisor.running() == []
    aborted = ActorUnavailable("echo", "actor was aborted")
    assert calls.outcomes == {"hold": aborted, "a": aborted}


async def test_drain_that_outlasts_cleanup_timeout_falls_back_to_abort(autojump_clock):
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root", cleanup_timeout=2.0) as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
            await calls.start("hold", Hold())  # the gate is never set
            start = trio.current_time()
            await supervisor.stop("echo", ShutdownMode.DRAIN)
            assert trio.current_time() - start == 2.0
    assert calls.outcomes == {"hold": ActorUnavailable("echo", "actor was aborted")}


async def test_stop_completes_even_if_its_caller_is_cancelled(autojump_clock):
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    gate = trio.Event()
    stopper_scope = trio.CancelScope()
    finished = []

    async def stopper():
        with stopper_scope:
            await supervisor.stop("echo", ShutdownMode.DRAIN)
            finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], gate)
            await calls.start("hold", Hold())
            nursery.start_soon(stopper)
            await wait_all_tasks_blocked()
            stopper_scope.cancel()
            await trio.sleep(1.0)
            assert (finished, supervisor.running()) == ([], ["echo"])
            gate.set()
            await wait_all_tasks_blocked()
            assert (finished, supervisor.running()) == ([1.0], [])
    assert calls.outcomes == {"hold": "released"}


async def test_leaving_the_supervisor_normally_drains_every_actor():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        async with open_supervisor("root") as supervisor:
            await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
            for text in ("a", "b", "c"):
                await address.cast(Echo(text=text))
            await calls.start("last", Echo(text="last"))
    assert calls.outcomes == {"last": "last@1"}
    assert inbox.queued() == 0


async def test_leaving_the_supervisor_by_an_exception_aborts_its_actors():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with trio.open_nursery() as nursery:
        calls = Calls(nursery, address)
        with pytest.RaisesGroup(KeyError):
            async with open_supervisor("root") as supervisor:
                await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
                await calls.start("hold", Hold())
                raise KeyError("bug in the body")
    assert calls.outcomes == {"hold": ActorUnavailable("echo", "actor was aborted")}


async def test_actor_that_returns_is_not_restarted_and_later_callers_get_unavailable():
    address, inbox = open_inbox("oneshot", TEST_INBOX_CAPACITY)
    runs = []

    async def oneshot(inbox, *, task_status=trio.TASK_STATUS_IGNORED):
        runs.append(1)
        task_status.started()
        envelope = await inbox.receive()
        envelope.reply("only once")

    async with open_supervisor("root") as supervisor:
        await supervisor.start("oneshot", oneshot, inbox)
        assert await address.call(Echo(text="first")) == "only once"
        await wait_all_tasks_blocked()
        assert supervisor.running() == []
        with pytest.raises(ActorUnavailable):
            await address.call(Echo(text="second"))
    assert runs == [1]


async def test_starting_a_second_actor_with_a_running_name_is_refused():
    _, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    _, other = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with open_supervisor("root") as supervisor:
        await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
        with pytest.raises(ValueError, match="actor 'echo' is already running"):
            await supervisor.start("echo", echo_actor, other, [], trio.Event())


async def test_serve_replies_to_calls_and_handles_casts_in_order():
    address, inbox = open_inbox("log", TEST_INBOX_CAPACITY)
    seen = []

    async def handle(message):
        seen.append(message.text)
        return len(seen)

    async with open_supervisor("root") as supervisor:
        await supervisor.start("log", serve, inbox, handle)
        await address.cast(Echo(text="a"))
        assert await address.call(Echo(text="b")) == 2
    assert seen == ["a", "b"]


async def test_serve_fails_the_request_on_an_actor_error_and_keeps_serving():
    address, inbox = open_inbox("echo", TEST_INBOX_CAPACITY)
    async with open_supervisor("root") as supervisor:
        await supervisor.start("echo", echo_actor, inbox, [], trio.Event())
        with pytest.raises(UnknownMessage) as info:
            await address.call(Stray())
        assert await address.call(Echo(text="still here")) == "still here@1"
        assert supervisor.restart_count("echo") == 0
    assert info.value == UnknownMessage("echo", "unknown message Stray: Stray()")


def test_unknown_message_helper_raises_unknown_message_naming_the_type():
    with pytest.raises(UnknownMessage, match=r"^echo: unknown message Stray: Stray\(\)$"):
        unknown_message("echo", Stray())


@pytest.mark.parametrize("bad", [{"max_restarts": -1}, {"within": -0.5}])
def test_restart_policy_refuses_negative_values(bad):
    with pytest.raises(ValueError, match="must be >= 0"):
        RestartPolicy(**bad)
