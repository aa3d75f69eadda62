"""The memory enforcer: one actor that measures the process against its memory budget on a
fixed interval and publishes what it saw, every time.

Publication is on *every* poll, not only when the pressure level changes, so anything that
starts listening late (an engine loaded lazily, a metrics scrape) has the current budget and
level within one interval (seed 004: limits published only on level changes never reached
an engine loaded after the last change).

How snapshots reach others:

- `GetSnapshot` (wire message, `call`): the latest snapshot, or a fresh one on request.
- `EnforcerHandle.subscribe()` (in-process only, never on the wire): a `SnapshotSubscription`
  that yields each newly published snapshot; capacity one, latest wins, so a slow reader
  skips to the newest and never holds the enforcer back. A new subscription yields the
  current snapshot at once. The handle is what `run` passes to `task_status.started()`.

What is read where. MLX's counters (`mx.get_active_memory()` and friends) are MLX calls, and
only the engine's MLX thread makes MLX calls: so `read_mlx` is injected, and the engine feeds
it from its latest step statistics; without it the MLX numbers are 0 and only the process's
resident size is used. psutil's readings (`read_system`) are cheap reads of /proc or a
Mach call and are taken on the trio thread.

Module layout: constants and budget config, the messages (a closed union), the pure part
(`snapshot_from`, `level_for`, `mlx_limits_for`), the subscription board, then `run`.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from typing import Union

import attrs
import trio

from omlx_actors.kernel import Address, Inbox, unknown_message

from .estimator import format_bytes

__all__ = [
    "AUTO_HEADROOM_FRACTION",
    "DEFAULT_POLL_INTERVAL",
    "ENFORCER_INBOX_CAPACITY",
    "HARD_FRACTION",
    "MIN_AUTO_HEADROOM",
    "SOFT_FRACTION",
    "BudgetMode",
    "EnforcerHandle",
    "EnforcerMessage",
    "GetSnapshot",
    "MemoryBudget",
    "MemoryLevel",
    "MemorySnapshot",
    "MlxLimits",
    "MlxReading",
    "SnapshotBoard",
    "SnapshotSubscription",
    "SystemReading",
    "level_for",
    "mlx_limits_for",
    "read_system_psutil",
    "run",
    "snapshot_from",
]

logger = logging.getLogger(__name__)

GiB = 1 << 30

# Pressure levels, as fractions of the budget. Soft: stop growing optional things (the
# prompt cache) and admit cautiously. Hard: admit nothing new; the next allocation may be
# the one that kills the process.
SOFT_FRACTION = 0.85
HARD_FRACTION = 0.95

# Auto budget: total memory less max(MIN_AUTO_HEADROOM, AUTO_HEADROOM_FRACTION of it), left
# to the OS and other programs.
MIN_AUTO_HEADROOM = 2 * GiB
AUTO_HEADROOM_FRACTION = 0.10

DEFAULT_POLL_INTERVAL = 0.5

# The handler never awaits (a reply is a value already at hand), so this only fills if the
# trio loop is starved; callers then wait (WAIT policy) for a few microseconds of work.
ENFORCER_INBOX_CAPACITY = 64

# MLX's buffer cache keeps freed buffers for reuse. It is capped at this fraction of the
# memory the weights leave, and at most MAX_CACHE_LIMIT: decode reuses small per-step
# buffers, while the big ones (KV growth, prefill scratch) rarely come back at the same
# size, and mlx-lm clears the cache after every prefill chunk anyway.
CACHE_LIMIT_FRACTION = 0.10
MAX_CACHE_LIMIT = 2 * GiB

# (active, cache, peak) bytes, as `mx.get_active_memory()`, `mx.get_cache_memory()` and
# `mx.get_peak_memory()` return them on the MLX thread.
MlxReading = tuple[int, int, int]


class MemoryLevel(enum.Enum):
    OK = "ok"
    SOFT = "soft"
    HARD = "hard"


class BudgetMode(enum.Enum):
    EXPLICIT = "explicit"
    """A number of bytes the operator chose."""
    AUTO = "auto"
    """Total memory less a headroom (and no more than the device's working-set limit)."""


@attrs.frozen(kw_only=True)
class MemoryBudget:
    """How the memory budget is chosen: `MemoryBudget.explicit(n)` or `MemoryBudget.auto()`.

    `device_limit_bytes` is the accelerator's real ceiling where it is lower than the
    machine's memory: on Metal, `mx.device_info()["max_recommended_working_set_size"]`
    (which follows `iogpu.wired_limit_mb`), read by the engine on its MLX thread. An auto
    budget is capped at it; an explicit budget above it is refused (seed 003: the wired
    ceiling, not RAM, was the limit that killed the server).
    """

    explicit_bytes: int | None = None
    # Auto only; None means max(MIN_AUTO_HEADROOM, AUTO_HEADROOM_FRACTION * total).
    headroom_bytes: int | None = None
    device_limit_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("explicit_bytes", "headroom_bytes", "device_limit_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"MemoryBudget.{name} must be > 0, got {value!r}")
        if self.explicit_bytes is not None and self.headroom_bytes is not None:
            raise ValueError("MemoryBudget: headroom_bytes applies to auto budgets only")

    @classmethod
    def explicit(cls, budget_bytes: int, *, device_limit_bytes: int | None = None) -> MemoryBudget:
        return cls(explicit_bytes=budget_bytes, device_limit_bytes=device_limit_bytes)

    @classmethod
    def auto(
        cls, *, headroom_bytes: int | None = None, device_limit_bytes: int | None = None
    ) -> MemoryBudget:
        return cls(headroom_bytes=headroom_bytes, device_limit_bytes=device_limit_bytes)

    @property
    def mode(self) -> BudgetMode:
        return BudgetMode.AUTO if self.explicit_bytes is None else BudgetMode.EXPLICIT

    def resolve(self, system_total: int) -> int:
        """The budget in bytes on a machine with `system_total` bytes of memory.

        Raises ValueError for an explicit budget above the machine's memory or the device
        limit, and for an auto budget that leaves nothing after the headroom.
        """
        if self.explicit_bytes is not None:
            for limit, what in (
                (system_total, "the machine's memory"),
                (self.device_limit_bytes, "the device's working-set limit"),
            ):
                if limit is not None and self.explicit_bytes > limit:
                    raise ValueError(
                        f"memory budget {format_bytes(self.explicit_bytes)} exceeds "
                        f"{what} ({format_bytes(limit)})"
                    )
            return self.explicit_bytes
        headroom = self.headroom_bytes
        if headroom is None:
            headroom = max(MIN_AUTO_HEADROOM, math.ceil(AUTO_HEADROOM_FRACTION * system_total))
        budget = system_total - headroom
        if self.device_limit_bytes is not None:
            budget = min(budget, self.device_limit_bytes)
        if budget <= 0:
            raise ValueError(
                f"auto memory budget: {format_bytes(system_total)} of memory less "
                f"{format_bytes(headroom)} headroom leaves nothing"
            )
        return budget


@attrs.frozen(kw_only=True)
class SystemReading:
    """What the operating system says, in bytes."""

    process_rss: int
    system_available: int
    system_total: int


def read_system_psutil() -> SystemReading:
    """This process's resident size and the machine's available and total memory (psutil).

    Cheap (a /proc read on Linux, a Mach call on macOS): fine on the trio thread.
    """
    import psutil

    memory = psutil.virtual_memory()
    return SystemReading(
        process_rss=psutil.Process().memory_info().rss,
        system_available=memory.available,
        system_total=memory.total,
    )


# ---------------------------------------------------------------------------------------
# Messages


@attrs.frozen(kw_only=True)
class GetSnapshot:
    """`call` → `MemorySnapshot`. The latest published one (at most one poll interval old),
    or, with `fresh`, one taken now (and published to subscribers like any other)."""

    fresh: bool = False


@attrs.frozen(kw_only=True)
class MemorySnapshot:
    """One measurement against the budget. Plain data; also published to subscribers.

    `used_bytes` is this process's footprint: max(mlx_active + mlx_cache, process_rss).
    On Apple silicon, Metal buffers are not reliably part of the resident size, so MLX's
    own counters are the better number; on Linux's CPU build MLX allocates with malloc and
    its buffers (cached ones too) are inside the resident size, along with everything
    Python holds. The larger of the two is right on both.

    `pressure_bytes = max(used_bytes, budget_bytes - system_available)` is what the level
    is computed on: when other programs leave less free memory than the budget still
    promises, the level rises even though this process did not grow.
    """

    seq: int  # 1, 2, 3, ... per board: a subscriber sees it increase by one per publication
    taken_at: float  # trio.current_time(): monotonic
    budget_bytes: int
    budget_mode: BudgetMode
    soft_limit_bytes: int
    hard_limit_bytes: int
    mlx_active: int
    mlx_cache: int
    mlx_peak: int
    process_rss: int
    system_available: int
    system_total: int
    used_bytes: int
    pressure_bytes: int
    level: MemoryLevel

    @property
    def free_bytes(self) -> int:
        """What can still be allocated before the budget is reached (never negative)."""
        return max(0, self.budget_bytes - self.pressure_bytes)


EnforcerMessage = Union[GetSnapshot]


# ---------------------------------------------------------------------------------------
# The pure part


def soft_limit(budget_bytes: int) -> int:
    return int(budget_bytes * SOFT_FRACTION)


def hard_limit(budget_bytes: int) -> int:
    return int(budget_bytes * HARD_FRACTION)


def level_for(pressure_bytes: int, budget_bytes: int) -> MemoryLevel:
    """HARD at or above `HARD_FRACTION` of the budget, SOFT at or above `SOFT_FRACTION`."""
    if pressure_bytes >= hard_limit(budget_bytes):
        return MemoryLevel.HARD
    if pressure_bytes >= soft_limit(budget_bytes):
        return MemoryLevel.SOFT
    return MemoryLevel.OK


def snapshot_from(
    mlx: MlxReading,
    system: SystemReading,
    *,
    budget_bytes: int,
    budget_mode: BudgetMode,
    seq: int,
    taken_at: float,
) -> MemorySnapshot:
    """Build the snapshot for these readings (see `MemorySnapshot` for what each means)."""
    active, cache, peak = mlx
    used = max(active + cache, system.process_rss)
    pressure = max(used, budget_bytes - system.system_available)
    return MemorySnapshot(
        seq=seq,
        taken_at=taken_at,
        budget_bytes=budget_bytes,
        budget_mode=budget_mode,
        soft_limit_bytes=soft_limit(budget_bytes),
        hard_limit_bytes=hard_limit(budget_bytes),
        mlx_active=active,
        mlx_cache=cache,
        mlx_peak=peak,
        process_rss=system.process_rss,
        system_available=system.system_available,
        system_total=system.system_total,
        used_bytes=used,
        pressure_bytes=pressure,
        level=level_for(pressure, budget_bytes),
    )


@attrs.frozen(kw_only=True)
class MlxLimits:
    """What the engine applies on its MLX thread, from the same budget as everything else.

    - `memory_limit` → `mx.set_memory_limit`: a guideline only (allocating past it raises
      nothing), but MLX releases cached buffers before growing beyond it.
    - `cache_limit` → `mx.set_cache_limit`: freed buffers MLX may keep for reuse. They count
      against the budget, so admission holds them back (the ledger's `reserved_bytes`).
    - `wired_limit` → `mx.set_wired_limit` on Metal only; 0 means "do not set" (no device
      limit was given: not Metal).
    """

    memory_limit: int
    cache_limit: int
    wired_limit: int


def mlx_limits_for(
    budget_bytes: int, weights_bytes: int, *, max_wired_bytes: int | None = None
) -> MlxLimits:
    """The MLX limits for a budget and the loaded weights.

    The wired limit keeps weights and caches resident on Metal: the budget, but never above
    `max_wired_bytes` (Metal's `max_recommended_working_set_size`; `mx.set_wired_limit`
    refuses more). Raises ValueError when the weights alone do not fit the budget.
    """
    if weights_bytes < 0 or budget_bytes <= 0:
        raise ValueError(f"need budget > 0 and weights >= 0, got {budget_bytes}, {weights_bytes}")
    left = budget_bytes - weights_bytes
    if left <= 0:
        raise ValueError(
            f"the weights ({format_bytes(weights_bytes)}) do not fit the memory budget "
            f"({format_bytes(budget_bytes)})"
        )
    cache_limit = min(int(left * CACHE_LIMIT_FRACTION), MAX_CACHE_LIMIT)
    wired = 0 if max_wired_bytes is None else min(budget_bytes, max_wired_bytes)
    return MlxLimits(memory_limit=budget_bytes, cache_limit=cache_limit, wired_limit=wired)


# ---------------------------------------------------------------------------------------
# Publication


class SnapshotBoard:
    """The latest snapshot, and a wake-up for everyone waiting for the next one.

    Written only by the enforcer (`publish`, `close`); read by any number of
    subscriptions. Outlives an enforcer incarnation when passed to `run`, so subscriptions
    carry on across a supervised restart. In-process only: never put it in a message.
    """

    def __init__(self) -> None:
        self._latest: MemorySnapshot | None = None
        self._published = trio.Event()  # replaced by a fresh event on every publish
        self._closed = False

    @property
    def latest(self) -> MemorySnapshot | None:
        return self._latest

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_seq(self) -> int:
        return 1 if self._latest is None else self._latest.seq + 1

    def publish(self, snapshot: MemorySnapshot) -> None:
        """Make `snapshot` the latest and wake every subscription. Never blocks."""
        if self._closed:
            raise trio.ClosedResourceError("the snapshot board is closed")
        self._latest = snapshot
        woken, self._published = self._published, trio.Event()
        woken.set()

    def close(self) -> None:
        """No more snapshots: subscriptions end (`receive` raises `trio.EndOfChannel`)."""
        self._closed = True
        self._published.set()

    def subscribe(self) -> SnapshotSubscription:
        return SnapshotSubscription(self)


class SnapshotSubscription:
    """One reader's view of a `SnapshotBoard`: capacity one, latest wins.

    `receive()` returns the newest snapshot this subscription has not returned yet, waiting
    for the next publication if it has returned the newest; a fresh subscription returns
    the current one at once. Iterate it with `async for`; it ends when the board closes.
    """

    def __init__(self, board: SnapshotBoard) -> None:
        self._board = board
        self._last_seq = 0

    async def receive(self) -> MemorySnapshot:
        """Cancellation-safe: a cancelled receive consumes nothing."""
        while True:
            latest = self._board.latest
            if latest is not None and latest.seq != self._last_seq:
                await trio.lowlevel.checkpoint()
                latest = self._board.latest  # may have moved on meanwhile: newer still wins
                assert latest is not None
                self._last_seq = latest.seq
                return latest
            if self._board.closed:
                await trio.lowlevel.checkpoint()
                raise trio.EndOfChannel
            await self._board._published.wait()

    def __aiter__(self) -> SnapshotSubscription:
        return self

    async def __anext__(self) -> MemorySnapshot:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@attrs.frozen
class EnforcerHandle:
    """What `run` reports when ready: its address for `GetSnapshot`, and subscriptions.
    In-process only."""

    address: Address
    board: SnapshotBoard

    @property
    def latest(self) -> MemorySnapshot | None:
        return self.board.latest

    def subscribe(self) -> SnapshotSubscription:
        return self.board.subscribe()


# ---------------------------------------------------------------------------------------
# The actor


def _no_mlx() -> MlxReading:
    return (0, 0, 0)


def _log_level(snapshot: MemorySnapshot, budget_bytes: int) -> None:
    """A new memory level: info when back to ok, a warning otherwise."""
    log = logger.info if snapshot.level is MemoryLevel.OK else logger.warning
    log(
        "memory level %s: %s of %s budget in use (process %s, %s free on the machine)",
        snapshot.level.value,
        format_bytes(snapshot.pressure_bytes),
        format_bytes(budget_bytes),
        format_bytes(snapshot.used_bytes),
        format_bytes(snapshot.system_available),
    )


async def run(
    inbox: Inbox,
    budget: MemoryBudget,
    *,
    board: SnapshotBoard | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    read_mlx: Callable[[], MlxReading] | None = None,
    read_system: Callable[[], SystemReading] = read_system_psutil,
    task_status: trio.TaskStatus[EnforcerHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Measure every `poll_interval` seconds and publish every measurement; answer
    `GetSnapshot` until the inbox is closed.

    Order: the budget is resolved against the machine's total memory and a first snapshot
    is published *before* `task_status.started(handle)`, so a `GetSnapshot` or a
    subscription never finds nothing. Polls then follow on a fixed schedule (a late poll
    does not shift the ones after it; missed ticks are skipped, not bunched).

    `read_mlx` and `read_system` are called on the trio thread and must not block; an
    exception from either crashes the actor (the supervisor decides what happens next).
    Pass a `board` to keep subscriptions across restarts: each incarnation publishes on it,
    continuing its sequence numbers. When the inbox is closed (drain) the board is closed,
    which ends every subscription; a crash or cancellation leaves it open for the next
    incarnation.

    Under supervision pass the keyword arguments with `functools.partial`.
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
    board = SnapshotBoard() if board is None else board
    read_mlx = _no_mlx if read_mlx is None else read_mlx
    budget_bytes = budget.resolve(read_system().system_total)
    logger.info(
        "memory budget %s (%s)", format_bytes(budget_bytes), budget.mode.value
    )

    def poll() -> MemorySnapshot:
        previous = board.latest
        snapshot = snapshot_from(
            read_mlx(),
            read_system(),
            budget_bytes=budget_bytes,
            budget_mode=budget.mode,
            seq=board.next_seq,
            taken_at=trio.current_time(),
        )
        if previous is None or previous.level is not snapshot.level:
            _log_level(snapshot, budget_bytes)
        board.publish(snapshot)
        return snapshot

    async def poll_forever() -> None:
        next_at = trio.current_time() + poll_interval
        while True:
            await trio.sleep_until(next_at)
            poll()
            next_at += poll_interval
            now = trio.current_time()
            if next_at <= now:  # starved past a whole tick: skip, don't catch up in a burst
                next_at = now + poll_interval

    poll()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_forever)
        task_status.started(EnforcerHandle(inbox.address, board))
        async for envelope in inbox:
            match envelope.message:
                case GetSnapshot(fresh=fresh):
                    envelope.reply(poll() if fresh else board.latest)
                case other:
                    unknown_message(inbox.name, other)
        nursery.cancel_scope.cancel()
    board.close()
