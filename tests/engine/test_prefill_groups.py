"""Prefill groups stay full when a burst arrives one request at a time.

The core is driven directly (its command and output queues, on a real MLX worker thread,
with the real tiny model), because these cases depend on exactly when commands land.
"""

from __future__ import annotations

import queue
import random
import threading
import time

from omlx_actors.engine.core import EngineCore
from omlx_actors.engine.core_messages import (
    CoreReady,
    CoreStop,
    CoreStopped,
    CoreSubmit,
    EngineSettings,
    StepOutput,
)
from omlx_actors.engine.messages import Submit
from omlx_actors.engine.mlx_thread import acquire_worker


def _submit(slot: int, length: int = 24, max_tokens: int = 4) -> CoreSubmit:
    rng = random.Random(slot)
    prompt = tuple(rng.randrange(16, 200) for _ in range(length))
    return CoreSubmit(slot, Submit(request_id=str(slot), prompt_tokens=prompt,
                                   max_tokens=max_tokens), received_at=0.0)


def _prefilling(output: StepOutput) -> list[int]:
    """Slots that ran a prompt chunk in this step (done < total; a prompt moving on to
    decoding reports done == total)."""
    return [slot for slot, done, total in output.progress if done < total]


def _start(settings: EngineSettings, outputs: queue.Queue) -> queue.SimpleQueue:
    commands: queue.SimpleQueue = queue.SimpleQueue()
    acquire_worker().run_job(EngineCore(settings, commands, outputs, notify=lambda: None).run)
    assert isinstance(outputs.get(timeout=60), CoreReady)
    return commands


def _groups_until_finished(outputs: queue.Queue, requests: int) -> tuple[list[int], StepOutput]:
    """The prefill group sizes, in order, until `requests` have finished; and the last output."""
    groups, finished = [], 0
    while finished < requests:
        output = outputs.get(timeout=60)
        assert isinstance(output, StepOutput), output
        if prefilling := _prefilling(output):
            groups.append(len(prefilling))
        finished += len(output.finished)
    return groups, output


def _stop(commands: queue.SimpleQueue, outputs: queue.Queue) -> None:
    commands.put(CoreStop())
    while not isinstance(outputs.get(timeout=60), CoreStopped):
        pass


def test_a_burst_behind_a_lone_prefill_is_prefilled_in_full_groups(tiny_llama):
    """The burst is queued from inside the core's own `put` of the lone request's prefill
    step (on the MLX thread, before it returns), so it is applied before the step in which
    the lone request moves on to decoding - as when a burst of HTTP requests lands while
    the first of them is being prefilled."""
    prefill_batch, burst = 2, 6
    commands_box: list[queue.SimpleQueue] = []

    class BurstAfterLonePrefill(queue.Queue):
        burst_sent = False

        def put(self, item, block=True, timeout=None):
            if isinstance(item, StepOutput) and not self.burst_sent and _prefilling(item) == [0]:
                for slot in range(1, 1 + burst):
                    commands_box[0].put(_submit(slot))
                self.burst_sent = True
            super().put(item, block, timeout)

    outputs = BurstAfterLonePrefill()
    settings = EngineSettings(model_path=str(tiny_llama), completion_batch_size=8,
                              prefill_batch_size=prefill_batch, block_size=0, gather_fraction=0.0)
    commands = _start(settings, outputs)
    commands_box.append(commands)
    commands.put(_submit(0))
    groups, last = _groups_until_finished(outputs, 1 + burst)
    _stop(commands, outputs)
    # mlx-lm alone would size the next group before request 0 leaves the prompt batch and
    # alternate [1, 1, 1, 1, 1, 1] after it; the core counts the leaver in.
    assert groups == [1] + [prefill_batch] * (burst // prefill_batch)
    assert last.prefill_passes == 1 + burst // prefill_batch


def test_an_idle_engine_gathers_a_burst_arriving_a_few_ms_apart_into_one_prefill(tiny_llama):
    """Requests of a burst arrive one by one (over HTTP each is parsed and tokenized in
    turn): the first must not be prefilled alone while the others wait for it. The tiny
    model prefills in about a millisecond, so the window's fraction is raised to let the
    cap (`GATHER_MAX_S`) bound it, as a real model's prefill time would."""
    outputs: queue.Queue = queue.Queue()
    settings = EngineSettings(model_path=str(tiny_llama), completion_batch_size=8,
                              prefill_batch_size=4, block_size=0, gather_fraction=1e6)
    commands = _start(settings, outputs)
    commands.put(_submit(0, 64, 2))  # measures the prefill speed
    assert _groups_until_finished(outputs, 1)[0] == [1]

    def burst() -> None:
        for slot in range(1, 5):
            commands.put(_submit(slot, 64, 2))
            time.sleep(0.002)

    sender = threading.Thread(target=burst)
    sender.start()
    groups, _ = _groups_until_finished(outputs, 4)
    sender.join()
    _stop(commands, outputs)
    assert groups == [4]
