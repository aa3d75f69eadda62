"""The executor actor: its closed inbox, its drain, and an engine that cannot start.

The inbox and load tests are plain (no model); the drain tests run the real tiny-llama.
"""

from __future__ import annotations

import ast
import inspect
import json
import queue
import textwrap
from typing import get_args

import pytest
import trio

from omlx_actors.engine import executor
from omlx_actors.engine.core_messages import EngineSettings
from omlx_actors.engine.memory_queue import MemoryWiring
from omlx_actors.engine.messages import (
    EngineInfo,
    Finished,
    FinishReason,
    Submit,
    TokenDelta,
)
from omlx_actors.engine.request_table import MlxGauge
from omlx_actors.kernel import Overflow, open_inbox
from omlx_actors.kernel.errors import UnknownMessage
from omlx_actors.memory.enforcer import (
    BudgetMode,
    SnapshotBoard,
    SystemReading,
    mlx_limits_for,
    snapshot_from,
)

MiB = 1024 * 1024
PROMPT = tuple(range(20, 30))
# The most a test waits for an event the engine owes it.
EVENT_BOUND_S = 60


def handled_message_types() -> set[str]:
    """The classes `_handle`'s `match` has a case for."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(executor._handle)))
    return {
        node.cls.id
        for node in ast.walk(tree)
        if isinstance(node, ast.MatchClass) and isinstance(node.cls, ast.Name)
    }


def test_the_handler_matches_exactly_the_inbox_union():
    assert handled_message_types() == {t.__name__ for t in get_args(executor.ExecutorMessage)}
    assert "DropBlocks" in handled_message_types()


async def test_a_message_outside_the_inbox_union_is_a_bug():
    address, inbox = open_inbox("executor", 1)
    await address.cast("not an executor message")
    envelope = await inbox.receive()
    with pytest.raises(UnknownMessage, match="unknown message str"):
        await executor._handle(envelope, executor.ExecutorState(), queue.SimpleQueue(), None)


async def test_weights_over_the_memory_budget_fail_the_engine_load():
    # The budget leaves nothing beside the weights: MLX's limits cannot be set, so the
    # engine must not start (this path once raised a NameError instead).
    config = {"model_type": "llama", "torch_dtype": "float16", "num_hidden_layers": 2,
              "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 256}
    weights = 8 * MiB
    info = EngineInfo(model_path="m", model_type="llama", vocab_size=256, max_context=None,
                      eos_token_ids=(), device="cpu", weights_bytes=weights,
                      memory_config=tuple((k, json.dumps(v)) for k, v in config.items()))
    board = SnapshotBoard()
    calm = SystemReading(process_rss=0, system_available=64 << 30, system_total=64 << 30)
    board.publish(snapshot_from((0, 0, 0), calm, budget_bytes=4 * MiB,
                                budget_mode=BudgetMode.EXPLICIT, seq=1, taken_at=0.0))
    wiring = MemoryWiring(gauge=MlxGauge(), snapshots=board.subscribe(),
                          limits_for=mlx_limits_for, max_waiting=8, prefix_cache_bytes=0,
                          prefill_step_size=512, prefill_batch_size=8)
    commands = queue.SimpleQueue()
    with pytest.raises(executor.EngineLoadFailed) as failed:
        await executor._configure(executor.ExecutorState(), info, EngineSettings(model_path="m"),
                                  wiring, commands)
    assert str(failed.value.args[-1]).endswith(
        "the weights (8.00 MiB) do not fit the memory budget (4.00 MiB)")
    assert failed.value.__suppress_context__
    assert commands.empty()  # no MLX limits were sent


async def start_executor(nursery, tiny_llama):
    events_send, events_recv = trio.open_memory_channel(executor.ENGINE_EVENT_BACKLOG)
    address, inbox = open_inbox("executor", 64, Overflow.WAIT)
    settings = EngineSettings(model_path=str(tiny_llama), block_size=0, gather_fraction=0.0)
    stopped = trio.Event()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        try:
            await executor.run(inbox, settings, events_send, task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(serve)
    return address, inbox, events_recv, stopped


async def events_until_finished(events, request_id):
    seen = []
    with trio.fail_after(EVENT_BOUND_S):
        while not any(isinstance(e, Finished) for e in seen):
            event = await events.receive()
            if event.request_id == request_id:
                seen.append(event)
    return seen


async def test_a_draining_executor_finishes_its_requests_then_returns(tiny_llama):
    async with trio.open_nursery() as nursery:
        address, inbox, events, stopped = await start_executor(nursery, tiny_llama)
        await address.call(Submit(request_id="r", prompt_tokens=PROMPT, max_tokens=40))
        inbox.close()  # drain
        seen = await events_until_finished(events, "r")
        with trio.fail_after(EVENT_BOUND_S):
            await stopped.wait()  # woken by the last request leaving, not by a timer
    done = seen[-1]
    assert (done.reason, done.completion_tokens) == (FinishReason.LENGTH, 40)
    assert sum(len(e.tokens) for e in seen if isinstance(e, TokenDelta)) == 40


async def test_a_drain_cancelled_while_requests_run_fails_them_with_engine_stopped(tiny_llama):
    async with trio.open_nursery() as nursery:
        address, inbox, events, _ = await start_executor(nursery, tiny_llama)
        await address.call(Submit(request_id="r", prompt_tokens=PROMPT, max_tokens=2000))
        with trio.fail_after(EVENT_BOUND_S):
            while not isinstance(await events.receive(), TokenDelta):
                pass
        inbox.close()
        await trio.sleep(0.05)  # the executor now waits for "r" to leave
        nursery.cancel_scope.cancel()
    seen = await events_until_finished(events, "r")
    done = seen[-1]
    assert (done.reason, done.error_type) == (FinishReason.ERROR, "EngineStopped")
    assert done.completion_tokens < 2000
