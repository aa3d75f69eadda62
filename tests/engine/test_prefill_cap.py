"""A long prompt does not freeze running streams (#18 item 4): while rows decode, each step
prefills at most `prefill_step_while_decoding` tokens of a prompt, so between two tokens of a
running stream the long prompt advances by at most that cap; with nothing decoding the whole
configured chunk runs again. Counted in tokens per step, never timed.

The core is driven directly (its command and output queues, on a real MLX worker thread,
with the real tiny models), because the cases depend on exactly when the long prompt lands:
it is queued from inside the core's own `put` of the running stream's first token, before
the next step runs.
"""

from __future__ import annotations

import queue
import random

import pytest

from omlx_actors.engine.core import EngineCore
from omlx_actors.engine.core_messages import (
    CoreReady,
    CoreSetPrefillStep,
    CoreStop,
    CoreStopped,
    CoreSubmit,
    EngineSettings,
    StepOutput,
    decode_time_prefill_step,
)
from omlx_actors.engine.messages import Submit
from omlx_actors.engine.mlx_thread import acquire_worker

STEP, CAP = 64, 16
RUNNING, LONG = 0, 1  # slots


def _submit(slot: int, length: int, max_tokens: int) -> CoreSubmit:
    rng = random.Random(slot)
    prompt = tuple(rng.randrange(16, 200) for _ in range(length))
    return CoreSubmit(slot, Submit(request_id=str(slot), prompt_tokens=prompt,
                                   max_tokens=max_tokens), received_at=0.0)


class _LongPromptOnFirstToken(queue.Queue):
    """Outputs; queues the long prompt when the running stream's first token is put."""

    def __init__(self, long_prompt: CoreSubmit) -> None:
        super().__init__()
        self.commands: queue.SimpleQueue | None = None
        self._long = long_prompt

    def put(self, item, block=True, timeout=None):
        if (self._long is not None and isinstance(item, StepOutput)
                and any(slot == RUNNING for slot, _ in item.tokens)):
            self.commands.put(self._long)
            self._long = None
        super().put(item, block, timeout)


def _run(model, *, cap: int, block_size: int = 0, long_tokens: int = 400,
         running_tokens: int = 12, memory_step: int | None = None) -> list[StepOutput]:
    """Every step output from the running stream's admission until both requests end."""
    outputs = _LongPromptOnFirstToken(_submit(LONG, long_tokens, 4))
    settings = EngineSettings(model_path=str(model), completion_batch_size=8, prefill_batch_size=4,
                              prefill_step_size=STEP, prefill_step_while_decoding=cap,
                              block_size=block_size, gather_fraction=0.0)
    commands: queue.SimpleQueue = queue.SimpleQueue()
    outputs.commands = commands
    acquire_worker().run_job(EngineCore(settings, commands, outputs, notify=lambda: None).run)
    assert isinstance(outputs.get(timeout=60), CoreReady)
    if memory_step is not None:
        commands.put(CoreSetPrefillStep(memory_step))
    commands.put(_submit(RUNNING, 24, running_tokens))
    steps, finished = [], 0
    while finished < 2:
        output = outputs.get(timeout=60)
        assert isinstance(output, StepOutput), output
        steps.append(output)
        finished += len(output.finished)
    commands.put(CoreStop())
    while not isinstance(outputs.get(timeout=60), CoreStopped):
        pass
    return steps


def _advances(steps: list[StepOutput]) -> list[tuple[bool, int]]:
    """Per step that prefilled the long prompt: (whether the running stream was still
    decoding when the step began, tokens of the long prompt that step prefilled)."""
    running, done_before, result = False, 0, []
    for output in steps:
        for slot, done, _ in output.progress:
            if slot == LONG and done > done_before:
                result.append((running, done - done_before))
                done_before = done
        running |= any(slot == RUNNING for slot, _ in output.tokens)
        running &= not any(f.slot == RUNNING for f in output.finished)
    return result


def _tokens(steps: list[StepOutput]) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {RUNNING: [], LONG: []}
    for output in steps:
        for slot, choice in output.tokens:
            tokens[slot].append(choice.token)
    return tokens


def _between_running_tokens(steps: list[StepOutput]) -> list[int]:
    """Long-prompt tokens prefilled between consecutive tokens of the running stream."""
    gaps, since, done_before, seen_first = [], 0, 0, False
    for output in steps:
        for slot, done, _ in output.progress:
            if slot == LONG:
                since += max(0, done - done_before)
                done_before = max(done_before, done)
        if any(slot == RUNNING for slot, _ in output.tokens):
            if seen_first:
                gaps.append(since)
            seen_first, since = True, 0
    return gaps


def test_the_decision_caps_only_while_rows_decode_and_never_raises_the_step():
    assert decode_time_prefill_step(512, 128, decoding=True) == 128
    assert decode_time_prefill_step(512, 128, decoding=False) == 512
    assert decode_time_prefill_step(64, 128, decoding=True) == 64  # memory's step is smaller
    assert decode_time_prefill_step(512, 0, decoding=True) == 512  # 0: no cap


def test_a_long_prompt_advances_at_most_the_cap_between_two_tokens_of_a_running_stream(tiny_llama):
    steps = _run(tiny_llama, cap=CAP)
    gaps = _between_running_tokens(steps)
    assert max(gaps) == CAP and all(g <= CAP for g in gaps), gaps
    advances = _advances(steps)
    assert all(n <= CAP for running, n in advances if running), advances
    # Once the running stream has ended, nothing decodes: whole chunks again.
    assert STEP in [n for running, n in advances if not running], advances


def test_without_the_cap_a_running_stream_waits_for_whole_chunks(tiny_llama):
    assert max(_between_running_tokens(_run(tiny_llama, cap=0))) == STEP


def test_memory_pressures_smaller_step_wins_over_the_cap(tiny_llama):
    steps = _run(tiny_llama, cap=CAP, memory_step=8)
    assert max(n for _, n in _advances(steps)) <= 8


def test_greedy_outputs_are_the_same_with_the_cap_on_and_off(tiny_llama):
    assert _tokens(_run(tiny_llama, cap=CAP)) == _tokens(_run(tiny_llama, cap=0))


@pytest.mark.parametrize("cap", [CAP, 24])
def test_a_hybrid_models_segments_are_capped_and_keep_their_block_ends(tiny_hybrid, cap):
    """Hybrid prompts are inserted as segments cut at block ends (for recurrent-state
    snapshots); the cap cuts within a segment, so a chunk still stops at each block's end
    (24 does not divide the block: 24, 8, 24, 8, ...) and the outputs are unchanged."""
    block = 32
    steps = _run(tiny_hybrid, cap=cap, block_size=block, long_tokens=200)
    gaps = _between_running_tokens(steps)
    assert max(gaps) <= cap, gaps
    done = [d for output in steps for slot, d, total in output.progress
            if slot == LONG and d < total]
    assert set(range(block, 200, block)) <= set(done), done
    assert _tokens(steps) == _tokens(_run(tiny_hybrid, cap=0, block_size=block, long_tokens=200))
