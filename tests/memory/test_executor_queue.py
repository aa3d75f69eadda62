"""The executor's memory queue with the real engine (tiny-llama): nothing waits forever.

The memory enforcer is replaced by its own snapshot board, published by the test: with a
budget of a few MiB the real enforcer sees the whole process (hundreds of MiB) over it and
pauses admission, which would hide the queue's own behaviour. Snapshots are built by the
enforcer's pure `snapshot_from` from a calm system reading (the boundary: the OS).
"""

from __future__ import annotations

import itertools

import trio

from omlx_actors.engine import executor, memory_queue
from omlx_actors.engine.core_messages import EngineSettings
from omlx_actors.engine.request_table import MlxGauge
from omlx_actors.engine.messages import (
    Abort,
    Finished,
    FinishReason,
    Ping,
    Submit,
    TokenDelta,
)
from omlx_actors.kernel import Overflow, open_inbox
from omlx_actors.memory.enforcer import (
    BudgetMode,
    SnapshotBoard,
    SystemReading,
    mlx_limits_for,
    snapshot_from,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
# tiny-llama's weights as the engine counts them (parameters' bytes).
WEIGHTS = 558336
# Beside the weights and MLX's cache reserve this leaves 2.83 MB: a 512-position request
# beside a 256-position one (2.46 MB, padded to 512) fits, a 1280-position one fits alone
# (2.42 MB) but not beside the 512 (4.85 MB).
BUDGET = WEIGHTS + 3 * MiB
PROMPT = tuple(range(20, 30))  # 10 tokens
# The most the test waits for an event the engine owes it; the queue's deadlines are what
# is tested, never this.
EVENT_BOUND_S = 60


class Engine:
    """A started executor, its event stream (per request), and the board it reads."""

    def __init__(self, address, events, board, seq):
        self.address, self.events, self.board, self._seq = address, events, board, seq
        self.seen: dict[str, list] = {}

    def publish(self, budget: int) -> None:
        calm = SystemReading(process_rss=0, system_available=64 * GiB, system_total=64 * GiB)
        self.board.publish(snapshot_from((0, 0, 0), calm, budget_bytes=budget,
                                         budget_mode=BudgetMode.EXPLICIT,
                                         seq=next(self._seq), taken_at=trio.current_time()))

    async def submit(self, request_id: str, max_tokens: int) -> None:
        await self.address.call(Submit(request_id=request_id, prompt_tokens=PROMPT,
                                       max_tokens=max_tokens), timeout=EVENT_BOUND_S)

    async def until(self, predicate) -> None:
        """Read events until `predicate(seen)` holds."""
        with trio.fail_after(EVENT_BOUND_S):
            while not predicate(self.seen):
                event = await self.events.receive()
                self.seen.setdefault(event.request_id, []).append(event)

    def finished(self, request_id: str) -> Finished | None:
        return next((e for e in self.seen.get(request_id, ()) if isinstance(e, Finished)), None)

    def tokens(self, request_id: str) -> int:
        return sum(len(e.tokens) for e in self.seen.get(request_id, ()) if isinstance(e, TokenDelta))


async def start_engine(nursery, tiny_llama, *, max_queue_wait_s: float = 600.0) -> Engine:
    board = SnapshotBoard()
    seq = itertools.count(1)
    wiring = memory_queue.MemoryWiring(
        gauge=MlxGauge(), snapshots=board.subscribe(), limits_for=mlx_limits_for,
        max_waiting=8, prefix_cache_bytes=0, prefill_step_size=512, prefill_batch_size=8,
        max_queue_wait_s=max_queue_wait_s,
    )
    events_send, events_recv = trio.open_memory_channel(executor.ENGINE_EVENT_BACKLOG)
    address, inbox = open_inbox("executor", 64, Overflow.WAIT)
    engine = Engine(address, events_recv, board, seq)
    engine.publish(BUDGET)
    settings = EngineSettings(model_path=str(tiny_llama), block_size=0, gather_fraction=0.0)
    await nursery.start(executor.run, inbox, settings, events_send, None, wiring)
    return engine


async def test_aborting_a_queued_request_sends_the_one_behind_it_to_the_engine(tiny_llama):
    # The abort of a queued request let the ledger admit the one behind it, but nothing
    # sent that one to the engine: it waited forever (even after everything finished).
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, tiny_llama)
        await engine.submit("running", max_tokens=400)  # 512 positions
        await engine.until(lambda seen: engine.tokens("running") > 0)
        await engine.submit("big", max_tokens=1200)  # 1280 positions: waits for "running"
        await engine.submit("small", max_tokens=100)  # would fit now, but queues behind "big"
        assert (await engine.address.call(Ping())).waiting == 2
        await engine.address.call(Abort(request_id="big"))
        await engine.until(lambda seen: engine.finished("small") and engine.finished("running"))
        nursery.cancel_scope.cancel()
    assert engine.finished("big").reason is FinishReason.ABORT
    assert (engine.finished("small").reason, engine.tokens("small")) == (FinishReason.LENGTH, 100)
    assert engine.tokens("running") == 400


async def test_a_queued_request_the_moved_budget_can_no_longer_fit_is_refused_at_once(tiny_llama):
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, tiny_llama)
        await engine.submit("running", max_tokens=400)
        await engine.until(lambda seen: engine.tokens("running") > 0)
        await engine.submit("big", max_tokens=1200)  # fits alone: waits for "running"
        engine.publish(WEIGHTS + 2 * MiB)  # now "big" can never fit; "running" still does
        await engine.until(lambda seen: engine.finished("big"))
        refused = engine.finished("big")
        running_then = engine.finished("running")
        await engine.until(lambda seen: engine.finished("running"))
        nursery.cancel_scope.cancel()
    assert (refused.reason, refused.error_type) == (FinishReason.ERROR, "MemoryRefused")
    assert "the memory budget of 2655488 bytes" in refused.error
    assert running_then is None  # refused while "running" still ran: it did not wait for it
    assert engine.tokens("running") == 400


async def test_a_request_waiting_past_max_queue_wait_is_refused_and_the_rest_are_served(tiny_llama):
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, tiny_llama, max_queue_wait_s=0.2)
        await engine.submit("running", max_tokens=1200)  # 1280 positions: nothing fits beside
        await engine.until(lambda seen: engine.tokens("running") > 0)
        await engine.submit("late", max_tokens=100)
        await engine.until(lambda seen: engine.finished("late"))
        late = engine.finished("late")
        tokens_then = engine.tokens("running")
        await engine.until(lambda seen: engine.finished("running"))
        await engine.submit("after", max_tokens=10)  # the queue works on
        await engine.until(lambda seen: engine.finished("after"))
        nursery.cancel_scope.cancel()
    assert (late.reason, late.error_type, late.completion_tokens) == (
        FinishReason.ERROR, "QueueTimeout", 0)
    assert "limit is 0.2 s" in late.error
    assert tokens_then < 1200  # it expired while "running" ran, not when it finished
    assert engine.tokens("running") == 1200
    assert engine.finished("after").reason is FinishReason.LENGTH


def test_a_queued_request_whose_pinned_blocks_are_evicted_is_priced_for_the_prefix_left(tiny_llama):
    # Plain data: the executor's bookkeeping, no engine. A budget cut below the pinned
    # bytes evicts a queued request's blocks; the engine will restore only the blocks before
    # the first evicted one, so the request must be priced (and submitted) for just those.
    import json
    import queue

    import attrs

    from omlx_actors.engine.core_messages import CoreSubmit
    from omlx_actors.memory.admission import (
        AdmissionLedger,
        Queued,
        RequestCost,
        unpadded_batch_cost,
    )
    from omlx_actors.memory.estimator import ModelMemoryFacts
    from omlx_actors.memory.policy import request_cost

    config = json.loads((tiny_llama / "config.json").read_text())
    state = executor.ExecutorState(
        facts=ModelMemoryFacts.from_config(config, weights_bytes=WEIGHTS), block_size=64)
    state.ledger = AdmissionLedger(weights_bytes=WEIGHTS, budget_bytes=BUDGET,
                                   batch_cost=unpadded_batch_cost(512))
    state.ledger.submit("running", RequestCost(context_tokens=5800, other_bytes=0))
    submit = Submit(request_id="queued", prompt_tokens=tuple(range(20, 220)), max_tokens=20,
                    cached_blocks=("a", "b", "c"))
    priced = request_cost(state.facts, memory_queue.shape_of(state, submit), 512)
    assert isinstance(state.ledger.submit("queued", priced), Queued)
    state.waiting["queued"] = CoreSubmit(state.add(submit).slot, submit, 0.0)
    commands = queue.SimpleQueue()

    memory_queue.forget_dropped_prefixes(state, {"b", "x"}, commands)

    kept = attrs.evolve(submit, cached_blocks=("a",))
    assert state.waiting["queued"].submit == kept
    assert state.ledger.waiting[0] == (
        "queued", request_cost(state.facts, memory_queue.shape_of(state, kept), 512))
    assert state.ledger.waiting[0][1] != priced
    assert commands.empty()  # still waiting for "running": nothing went to the engine
