"""The memory enforcer: budgets, levels, publication on every poll, GetSnapshot, restarts."""

from __future__ import annotations

import functools
import math
from typing import Union

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from omlx_actors.kernel import (
    ActorCrashed,
    assert_plain_data,
    decode,
    encode,
    open_inbox,
    open_supervisor,
)
from omlx_actors.memory import enforcer
from omlx_actors.memory.admission import (
    Granted,
    Queued,
    QueueFullRefusal,
    Refused,
    RequestCost,
)
from omlx_actors.memory.enforcer import (
    ENFORCER_INBOX_CAPACITY,
    BudgetMode,
    GetSnapshot,
    MemoryBudget,
    MemoryLevel,
    MemorySnapshot,
    MlxLimits,
    SnapshotBoard,
    SystemReading,
    level_for,
    mlx_limits_for,
    read_system_psutil,
    snapshot_from,
)
from omlx_actors.memory.estimator import ModelMemoryFacts, RequestEstimate

from .configs import GEMMA3_LIKE

GiB = 1 << 30
INTERVAL = 1.0


@attrs.define
class FakeMachine:
    """Readings a test sets; injected where the enforcer reads MLX and the OS."""

    active: int = 0
    cache: int = 0
    peak: int = 0
    rss: int = 0
    available: int = 60 * GiB
    total: int = 64 * GiB
    fail_next_system_read: bool = False

    def read_mlx(self) -> tuple[int, int, int]:
        return (self.active, self.cache, self.peak)

    def read_system(self) -> SystemReading:
        if self.fail_next_system_read:
            self.fail_next_system_read = False
            raise OSError("reading /proc failed")
        return SystemReading(
            process_rss=self.rss, system_available=self.available, system_total=self.total
        )


def enforcer_run(machine, *, with_mlx=True, **kwargs):
    return functools.partial(
        enforcer.run,
        poll_interval=INTERVAL,
        read_mlx=machine.read_mlx if with_mlx else None,
        read_system=machine.read_system,
        **kwargs,
    )


async def start_enforcer(nursery, machine, budget, **kwargs):
    _, inbox = open_inbox("memory", ENFORCER_INBOX_CAPACITY)
    return await nursery.start(enforcer_run(machine, **kwargs), inbox, budget), inbox


# ---------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize(
    ("pressure", "level"),
    [(0, MemoryLevel.OK), (849, MemoryLevel.OK), (850, MemoryLevel.SOFT),
     (949, MemoryLevel.SOFT), (950, MemoryLevel.HARD), (2000, MemoryLevel.HARD)],
)
def test_levels_at_85_and_95_percent_of_the_budget(pressure, level):
    assert level_for(pressure, 1000) is level


@pytest.mark.parametrize(
    ("mlx", "rss", "available", "used", "pressure", "level"),
    [
        ((500, 100, 700), 300, 10_000, 600, 600, MemoryLevel.OK),  # MLX's counters larger
        ((500, 100, 700), 900, 10_000, 900, 900, MemoryLevel.SOFT),  # resident size larger
        ((900, 60, 960), 0, 10_000, 960, 960, MemoryLevel.HARD),
        # Other programs leave 100 free of a budget that still promises 700: pressure 900.
        ((200, 100, 300), 250, 100, 300, 900, MemoryLevel.SOFT),
    ],
)
def test_snapshot_levels_from_readings(mlx, rss, available, used, pressure, level):
    snapshot = snapshot_from(
        mlx, SystemReading(process_rss=rss, system_available=available, system_total=4000),
        budget_bytes=1000, budget_mode=BudgetMode.EXPLICIT, seq=7, taken_at=1.5,
    )
    assert snapshot == MemorySnapshot(
        seq=7, taken_at=1.5, budget_bytes=1000, budget_mode=BudgetMode.EXPLICIT,
        soft_limit_bytes=850, hard_limit_bytes=950, mlx_active=mlx[0], mlx_cache=mlx[1],
        mlx_peak=mlx[2], process_rss=rss, system_available=available, system_total=4000,
        used_bytes=used, pressure_bytes=pressure, level=level,
    )
    assert snapshot.free_bytes == max(0, 1000 - pressure)


@pytest.mark.parametrize(
    ("budget", "total", "expected"),
    [
        (MemoryBudget.auto(), 64 * GiB, 64 * GiB - math.ceil(0.1 * 64 * GiB)),  # 10% headroom
        (MemoryBudget.auto(), 8 * GiB, 6 * GiB),  # at least 2 GiB headroom
        (MemoryBudget.auto(headroom_bytes=GiB), 8 * GiB, 7 * GiB),
        # The Metal working-set ceiling is lower than RAM less headroom: it wins.
        (MemoryBudget.auto(device_limit_bytes=36 * GiB), 48 * GiB, 36 * GiB),
        (MemoryBudget.explicit(40 * GiB), 48 * GiB, 40 * GiB),
    ],
)
def test_budget_resolution(budget, total, expected):
    assert budget.resolve(total) == expected


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (MemoryBudget.explicit(65 * GiB), "exceeds the machine's memory (64.00 GiB)"),
        (MemoryBudget.explicit(40 * GiB, device_limit_bytes=36 * GiB),
         "exceeds the device's working-set limit (36.00 GiB)"),
        (MemoryBudget.auto(headroom_bytes=64 * GiB), "leaves nothing"),
    ],
)
def test_a_budget_above_the_real_limit_is_refused(budget, message):
    with pytest.raises(ValueError) as raised:
        budget.resolve(64 * GiB)
    assert message in str(raised.value)


def test_budget_config_is_validated():
    with pytest.raises(ValueError, match="explicit_bytes must be > 0"):
        MemoryBudget.explicit(0)
    with pytest.raises(ValueError, match="headroom_bytes applies to auto budgets only"):
        MemoryBudget(explicit_bytes=1, headroom_bytes=1)


def test_mlx_limits_from_the_budget_and_the_weights():
    assert mlx_limits_for(32 * GiB, 16 * GiB) == MlxLimits(
        memory_limit=32 * GiB, cache_limit=int(16 * GiB * 0.1), wired_limit=0
    )
    # The cache limit is capped; the wired limit never exceeds the device's.
    assert mlx_limits_for(100 * GiB, 10 * GiB, max_wired_bytes=72 * GiB) == MlxLimits(
        memory_limit=100 * GiB, cache_limit=2 * GiB, wired_limit=72 * GiB
    )
    with pytest.raises(ValueError, match="do not fit the memory budget"):
        mlx_limits_for(16 * GiB, 16 * GiB)


def test_psutil_reading_is_sane():
    reading = read_system_psutil()
    assert 0 < reading.process_rss < reading.system_total
    assert 0 < reading.system_available <= reading.system_total


# ---------------------------------------------------------------------------------------
# The actor


async def test_publishes_on_every_poll_even_when_the_level_is_unchanged(autojump_clock):
    machine = FakeMachine(active=100, rss=50)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        handle, _ = await start_enforcer(nursery, machine, MemoryBudget.explicit(1000))
        subscription = handle.subscribe()
        seen = [await subscription.receive() for _ in range(5)]
        assert [s.seq for s in seen] == [1, 2, 3, 4, 5]
        assert [s.taken_at - t0 for s in seen] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert {s.level for s in seen} == {MemoryLevel.OK}
        assert {s.used_bytes for s in seen} == {100}
        nursery.cancel_scope.cancel()


async def test_a_late_subscriber_gets_limits_within_one_interval(autojump_clock):
    machine = FakeMachine()
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, machine, MemoryBudget.explicit(32 * GiB))
        await trio.sleep(3.5 * INTERVAL)  # an engine loaded long after the enforcer started
        joined = trio.current_time()
        subscription = handle.subscribe()
        first = await subscription.receive()
        assert trio.current_time() == joined  # at once: the current snapshot
        assert joined - first.taken_at <= INTERVAL
        assert (first.seq, first.budget_bytes) == (4, 32 * GiB)
        second = await subscription.receive()
        assert (second.seq, second.taken_at - first.taken_at) == (5, INTERVAL)
        nursery.cancel_scope.cancel()


async def test_a_slow_subscriber_skips_to_the_latest_snapshot(autojump_clock):
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, FakeMachine(), MemoryBudget.explicit(GiB))
        subscription = handle.subscribe()
        assert (await subscription.receive()).seq == 1
        await trio.sleep(3 * INTERVAL + 0.5)
        assert (await subscription.receive()).seq == 4  # 2 and 3 were superseded
        nursery.cancel_scope.cancel()


async def test_levels_follow_the_injected_readings(autojump_clock):
    machine = FakeMachine()
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, machine, MemoryBudget.explicit(1000))
        subscription = handle.subscribe()
        levels = []
        for active, rss in [(100, 0), (860, 0), (0, 960), (0, 960), (500, 0)]:
            machine.active, machine.rss = active, rss
            snapshot = await subscription.receive()
            levels.append((snapshot.used_bytes, snapshot.level))
        # The first snapshot was taken before the first reading was set.
        assert levels == [
            (0, MemoryLevel.OK),
            (860, MemoryLevel.SOFT),
            (960, MemoryLevel.HARD),
            (960, MemoryLevel.HARD),
            (500, MemoryLevel.OK),
        ]
        nursery.cancel_scope.cancel()


async def test_without_mlx_readings_only_the_process_is_measured(autojump_clock):
    machine = FakeMachine(active=10 * GiB, rss=3 * GiB)
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, machine, MemoryBudget.explicit(8 * GiB),
                                         with_mlx=False)
        snapshot = handle.latest
        assert (snapshot.mlx_active, snapshot.mlx_cache, snapshot.mlx_peak) == (0, 0, 0)
        assert snapshot.used_bytes == 3 * GiB
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("budget", "mode", "expected"),
    [
        (MemoryBudget.auto(), BudgetMode.AUTO, 64 * GiB - math.ceil(0.1 * 64 * GiB)),
        (MemoryBudget.explicit(20 * GiB), BudgetMode.EXPLICIT, 20 * GiB),
    ],
)
async def test_the_budget_and_its_mode_are_reported(autojump_clock, budget, mode, expected):
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, FakeMachine(total=64 * GiB), budget)
        snapshot = handle.latest
        assert (snapshot.budget_bytes, snapshot.budget_mode) == (expected, mode)
        assert snapshot.hard_limit_bytes == int(expected * 0.95)
        nursery.cancel_scope.cancel()


async def test_an_impossible_budget_fails_the_start(autojump_clock):
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="exceeds the machine's memory"):
            await start_enforcer(nursery, FakeMachine(total=8 * GiB),
                                 MemoryBudget.explicit(9 * GiB))


async def test_get_snapshot_returns_the_latest_or_a_fresh_one(autojump_clock):
    machine = FakeMachine(rss=123)
    async with trio.open_nursery() as nursery:
        handle, _ = await start_enforcer(nursery, machine, MemoryBudget.explicit(GiB))
        await trio.sleep(2.5 * INTERVAL)
        latest = await handle.address.call(GetSnapshot())
        assert latest == handle.latest
        assert (latest.seq, latest.process_rss) == (3, 123)
        subscription = handle.subscribe()
        await subscription.receive()
        machine.rss = 456
        fresh = await handle.address.call(GetSnapshot(fresh=True))
        assert (fresh.seq, fresh.process_rss, fresh.taken_at) == (4, 456, trio.current_time())
        assert await subscription.receive() == fresh  # published like any other
        nursery.cancel_scope.cancel()


async def test_closing_the_inbox_ends_the_actor_and_its_subscriptions(autojump_clock):
    async with trio.open_nursery() as nursery:
        handle, inbox = await start_enforcer(nursery, FakeMachine(), MemoryBudget.explicit(GiB))
        received = []

        async def follow():
            async for snapshot in handle.subscribe():
                received.append(snapshot.seq)

        nursery.start_soon(follow)
        await trio.sleep(2.5 * INTERVAL)
        inbox.close()
    assert received == [1, 2, 3]
    assert handle.board.closed


async def test_subscriptions_survive_a_supervised_restart(autojump_clock):
    machine = FakeMachine()
    board = SnapshotBoard()
    _, inbox = open_inbox("memory", ENFORCER_INBOX_CAPACITY)
    async with open_supervisor("root") as supervisor:
        handle = await supervisor.start(
            "memory", enforcer_run(machine, board=board), inbox, MemoryBudget.explicit(GiB)
        )
        subscription = handle.subscribe()
        assert (await subscription.receive()).seq == 1
        machine.fail_next_system_read = True  # the poll at t=1 crashes the actor
        await trio.sleep(1.5 * INTERVAL)
        assert supervisor.restart_count("memory") == 1
        # The new incarnation published its first snapshot on the same board at once.
        snapshot = await subscription.receive()
        assert snapshot.seq == 2
        assert (await subscription.receive()).seq == 3
        assert (await handle.address.call(GetSnapshot())).seq == 3


@attrs.frozen
class Stray:
    pass


async def test_an_unknown_message_is_a_crash(autojump_clock):
    _, inbox = open_inbox("memory", ENFORCER_INBOX_CAPACITY)
    async with open_supervisor("root") as supervisor:
        handle = await supervisor.start(
            "memory", enforcer_run(FakeMachine()), inbox, MemoryBudget.explicit(GiB)
        )
        with pytest.raises(ActorCrashed) as raised:
            await handle.address.call(Stray())
        assert raised.value.error_type == "UnknownMessage"
        await wait_all_tasks_blocked()
        assert supervisor.restart_count("memory") == 1


# ---------------------------------------------------------------------------------------
# The wire


WIRE_EXAMPLES = [
    GetSnapshot(),
    GetSnapshot(fresh=True),
    snapshot_from((1, 2, 3), SystemReading(process_rss=4, system_available=5, system_total=6),
                  budget_bytes=GiB, budget_mode=BudgetMode.AUTO, seq=9, taken_at=12.25),
    MlxLimits(memory_limit=3, cache_limit=2, wired_limit=1),
    SystemReading(process_rss=1, system_available=2, system_total=3),
    MemoryBudget.auto(device_limit_bytes=36 * GiB),
    RequestEstimate(kv_capacity_tokens=512, kv_bytes=1, growth_copy_bytes=2,
                    recurrent_state_bytes=3, scratch_bytes=4),
    RequestCost(context_tokens=512, other_bytes=7),
    Granted(request_id="a"),
    Queued(request_id="b", position=1),
    Refused(request_id="c", reason="too big", needed_bytes=3, available_bytes=2),
    QueueFullRefusal(request_id="d", waiting=4),
    ModelMemoryFacts.from_config(GEMMA3_LIKE, weights_bytes=8 * GiB),
]

AnyMemoryMessage = Union[tuple(type(example) for example in WIRE_EXAMPLES)]


@pytest.mark.parametrize("message", WIRE_EXAMPLES, ids=lambda m: type(m).__name__)
def test_memory_messages_are_plain_data_and_round_trip(message):
    assert_plain_data(message)
    assert decode(encode(message), AnyMemoryMessage) == message
