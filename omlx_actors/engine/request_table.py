"""The executor's request table: request id -> slot, and the memory-admission state beside it.

Plain state (no trio, no MLX), owned by the executor actor (`engine/executor.py`) and read and
changed by its memory-admission shell (`engine/memory_queue.py`) on the same trio task, so it
needs no lock. Slots, not request ids, name requests inside the engine: a request id reused
after an abort can never be confused with the aborted request whose removal is in flight.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attrs

from omlx_actors.engine.core_messages import CoreSubmit, StepOutput
from omlx_actors.engine.messages import Submit
from omlx_actors.memory.admission import AdmissionLedger
from omlx_actors.memory.estimator import ModelMemoryFacts


@attrs.define
class MlxGauge:
    """MLX's memory as of the engine's last step. Written only by the executor; the memory
    enforcer reads it (MLX itself may only be asked on the MLX thread)."""

    active: int = 0
    cache: int = 0
    peak: int = 0

    def reading(self) -> tuple[int, int, int]:
        return self.active, self.cache, self.peak


@attrs.define
class TrackedRequest:
    """One request the executor knows of, from its `Submit` to its `Finished`."""

    request_id: str
    slot: int
    prompt_tokens: int
    aborted: bool = False
    delivered: int = 0


@attrs.define
class ExecutorState:
    """The executor's trio-side bookkeeping (pure: no trio, no MLX)."""

    by_id: dict[str, TrackedRequest] = attrs.field(factory=dict)
    by_slot: dict[int, TrackedRequest] = attrs.field(factory=dict)
    slots: itertools.count = attrs.field(factory=lambda: itertools.count(1))
    last: StepOutput | None = None
    last_step_at: float | None = None
    stopping: bool = False
    # Memory admission (None: requests are not priced).
    ledger: AdmissionLedger | None = None
    facts: ModelMemoryFacts | None = None
    block_size: int = 0
    prefill_step_size: int = 512
    waiting: dict[str, CoreSubmit] = attrs.field(factory=dict)  # queued for memory
    gauge: MlxGauge | None = None
    max_requests: int = 1 << 30  # unpriced admission: batch + waiting bound
    cache_shrunk: bool = False  # the prefix cache budget was cut to make room
    cache_target: int | None = None  # the last budget cut sent for the queue's head
    queued: Any = None  # a trio send channel: rung when a request joins the memory queue
    under_pressure: bool = False  # the enforcer's last level was soft or hard
    normal_prefill_step: int = 512  # the configured chunk, restored when nothing needs less
    floor_priced: set[str] = attrs.field(factory=set)  # admitted only with floor-sized chunks
    restores: dict[int, Any] = attrs.field(factory=dict)  # RestoreBlocks callers by tag
    ssd_saves_dropped: int = 0
    # Called once the last request has left (see `remove`): how a draining executor
    # learns that it may stop the core.
    on_empty: Callable[[], None] | None = None

    def add(self, submit: Submit) -> TrackedRequest:
        request = TrackedRequest(submit.request_id, next(self.slots), len(submit.prompt_tokens))
        self.by_id[request.request_id] = request
        self.by_slot[request.slot] = request
        return request

    def remove(self, request: TrackedRequest) -> None:
        self.by_slot.pop(request.slot, None)
        if self.by_id.get(request.request_id) is request:
            del self.by_id[request.request_id]
        if not self.by_slot and self.on_empty is not None:
            self.on_empty()
