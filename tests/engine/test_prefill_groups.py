"""Prefill groups stay full when a burst arrives while a lone request is being prefilled.

The core is driven directly (its command and output queues, on a real MLX worker thread,
with the real tiny model), because the case depends on exactly when commands land: the
burst is queued from inside the core's own `put` of the lone request's prefill step (on the
MLX thread, before it returns), so it is applied before the next step - the step in which
the lone request moves on to decoding - as when a burst of HTTP requests lands while the
first of them is being prefilled.
"""

from __future__ import annotations

import queue
import random

import pytest

from omlx_actors.engine.core import (
    CoreReady,
    CoreStop,
    CoreStopped,
    CoreSubmit,
    EngineCore,
    EngineSettings,
    StepOutput,
)
from omlx_actors.engine.messages import Submit
from omlx_actors.engine.mlx_thread import acquire_worker

PREFILL_BATCH = 2
BURST = 6


def _prompt(i: int, length: int = 24) -> tuple[int, ...]:
    rng = random.Random(i)
    return tuple(rng.randrange(16, 200) for _ in range(length))


def _run_lone_then_burst(model: str) -> tuple[list[int], int]:
    """The sizes of the prefill groups, in order, and the core's prefill pass count."""
    commands: queue.SimpleQueue = queue.SimpleQueue()

    def submit(slot: int) -> CoreSubmit:
        return CoreSubmit(slot, Submit(request_id=str(slot), prompt_tokens=_prompt(slot),
                                       max_tokens=4), received_at=0.0)

    class BurstAfterLonePrefill(queue.Queue):
        burst_sent = False

        def put(self, item, block=True, timeout=None):
            # A prompt still being prefilled reports done < total.
            if (isinstance(item, StepOutput) and not self.burst_sent
                    and [s for s, done, total in item.progress if done < total] == [0]):
                for slot in range(1, 1 + BURST):
                    commands.put(submit(slot))
                self.burst_sent = True
            super().put(item, block, timeout)

    outputs = BurstAfterLonePrefill()
    settings = EngineSettings(model_path=model, completion_batch_size=8,
                              prefill_batch_size=PREFILL_BATCH, block_size=0)
    core = EngineCore(settings, commands, outputs, notify=lambda: None)
    acquire_worker().run_job(core.run)

    def get():
        return outputs.get(timeout=60)

    assert isinstance(get(), CoreReady)

    commands.put(submit(0))
    groups: list[int] = []
    finished = 0
    last: StepOutput | None = None
    while finished < 1 + BURST:
        output = get()
        assert isinstance(output, StepOutput), output
        last = output
        prefilling = [slot for slot, done, total in output.progress if done < total]
        if prefilling:
            groups.append(len(prefilling))
        finished += len(output.finished)
    commands.put(CoreStop())
    while not isinstance(get(), CoreStopped):
        pass
    assert last is not None
    return groups, last.prefill_passes


@pytest.mark.timeout(120)
def test_a_burst_behind_a_lone_prefill_is_prefilled_in_full_groups(tiny_llama):
    groups, passes = _run_lone_then_burst(str(tiny_llama))
    # mlx-lm alone would size the next group before request 0 leaves the prompt batch and
    # alternate [1, 1, 1, 1, 1, 1] after it; the core counts the leaver in.
    assert groups == [1] + [PREFILL_BATCH] * (BURST // PREFILL_BATCH)
    assert passes == 1 + BURST // PREFILL_BATCH


def test_an_idle_engine_gathers_a_burst_arriving_a_few_ms_apart_into_one_prefill(tiny_llama):
    """Requests of a burst arrive one by one (over HTTP each is parsed and tokenized in
    turn): the first must not be prefilled alone while the others wait for it. The tiny
    model prefills in about a millisecond, so the window's fraction is raised to let the
    cap (`GATHER_MAX_S`) bound it, as a real model's prefill time would."""
    import threading
    import time

    commands: queue.SimpleQueue = queue.SimpleQueue()
    outputs: queue.Queue = queue.Queue()
    settings = EngineSettings(model_path=str(tiny_llama), completion_batch_size=8,
                              prefill_batch_size=4, block_size=0, gather_fraction=1e6)
    acquire_worker().run_job(EngineCore(settings, commands, outputs, notify=lambda: None).run)

    def submit(slot: int) -> CoreSubmit:
        return CoreSubmit(slot, Submit(request_id=str(slot), prompt_tokens=_prompt(slot, 64),
                                       max_tokens=2), received_at=0.0)

    def run_until_finished(n: int) -> list[int]:
        groups, finished = [], 0
        while finished < n:
            output = outputs.get(timeout=60)
            assert isinstance(output, (StepOutput, CoreReady)), output
            if isinstance(output, StepOutput):
                prefilling = [s for s, done, total in output.progress if done < total]
                if prefilling:
                    groups.append(len(prefilling))
                finished += len(output.finished)
        return groups

    commands.put(submit(0))  # measures the prefill speed
    assert run_until_finished(1) == [1]

    def burst() -> None:
        for slot in range(1, 5):
            commands.put(submit(slot))
            time.sleep(0.002)

    sender = threading.Thread(target=burst)
    sender.start()
    groups = run_until_finished(4)
    sender.join()
    commands.put(CoreStop())
    while not isinstance(outputs.get(timeout=60), CoreStopped):
        pass
    assert groups == [4]
