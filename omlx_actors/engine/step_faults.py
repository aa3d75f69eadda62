"""Fault injection on the MLX thread: a step that fails on demand, for tests and scenarios.

`InjectFault` reaches the core as a `CoreFault` and is armed here until a step meets its
conditions. Then it fires once: an out-of-memory (`MemoryError`) after the step ran, as a
real one while evaluating it would, failing the requests in that step; or an abort of the
whole process before the step, as an uncaught C++ exception in MLX does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import attrs

from omlx_actors.engine.core_messages import CoreFault
from omlx_actors.engine.messages import FaultKind
from omlx_actors.mlx_loader import load_mlx

mx = load_mlx()
log = logging.getLogger(__name__)


@attrs.define
class StepFaults:
    """The one armed fault, if any; a new `CoreFault` replaces it."""

    armed: CoreFault | None = None

    def arm(self, fault: CoreFault) -> None:
        self.armed = fault

    def fire_if_due(self, kind: FaultKind, step: int, prompts: Iterable[tuple[int, ...]]) -> None:
        """Fire the armed fault of `kind` if its conditions hold for the coming `step` (the
        prompts of its live requests are read only if the fault names a prompt token).
        Raises `MemoryError` for an out-of-memory; never returns for an abort."""
        fault = self.armed
        if fault is None or fault.kind is not kind:
            return
        if fault.at_step is not None and step < fault.at_step:
            return
        if fault.above_bytes is not None and mx.get_active_memory() <= fault.above_bytes:
            return
        if fault.prompt_token is not None and not any(
            fault.prompt_token in prompt for prompt in prompts
        ):
            return
        self.armed = None
        if kind is FaultKind.ABORT:
            log.warning("injected fault: aborting the engine process at step %d", step)
            os.abort()  # what an uncaught C++ exception in MLX does: SIGABRT, no cleanup
        raise MemoryError(fault.error)
