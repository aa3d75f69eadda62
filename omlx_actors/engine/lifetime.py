"""Memory lifetime rules of the engine, as pure bookkeeping (no MLX, no trio).

Seeds 000 and 001: KV memory released when a request finished was reused while the GPU still
read it (a kernel panic on Metal), and a cache trim under churn freed a buffer an in-flight
command buffer used. The rules, enforced by `omlx_actors.engine.core`:

1. The MLX buffer cache is cleared only on the executor's thread, and only right after
   `mx.synchronize` on the generation stream (`core.EngineCore._clear_buffer_cache`).
2. Clearing after a completion or abort is deferred by a window measured from *that*
   request's own finish step: `clear_at = max(clear_at, step + delay)`. A second completion
   extends the window instead of being ignored (the oMLX bug kept the first deadline).
3. Whatever a finished request's step may still read (its extracted cache, its batch rows)
   stays referenced in `RetiredRefs` until that clear point, i.e. until the stream has been
   synchronized past the step that used it.
"""

from __future__ import annotations

from typing import Any

import attrs

# Steps to wait after a request finishes before the buffer cache may be cleared. Two steps
# cover the async_eval'd step that was in flight when the request finished plus the one that
# filtered it out of the batch; more only delays giving memory back.
CLEAR_DELAY_STEPS = 2


@attrs.define
class ClearSchedule:
    """When the next buffer-cache clear is due. Invariant: `clear_at` never moves earlier
    while a clear is pending."""

    delay: int = CLEAR_DELAY_STEPS
    clear_at: int | None = None

    def note_finished(self, step: int) -> None:
        """A request finished or was aborted at `step`: push the clear past its window."""
        deadline = step + self.delay
        self.clear_at = deadline if self.clear_at is None else max(self.clear_at, deadline)

    def due(self, step: int) -> bool:
        return self.clear_at is not None and step >= self.clear_at

    def mark_cleared(self) -> None:
        self.clear_at = None


@attrs.define
class RetiredRefs:
    """Objects (MLX arrays, caches) that must outlive the steps that may read them.

    They are held until `release()`, which the engine calls only after synchronizing the
    generation stream; releasing earlier is the seed-000 bug.
    """

    _held: list[tuple[int, Any]] = attrs.field(factory=list)

    def retire(self, step: int, obj: Any) -> None:
        self._held.append((step, obj))

    def release(self) -> int:
        """Drop every held reference; returns how many were held."""
        n = len(self._held)
        self._held.clear()
        return n

    def __len__(self) -> int:
        return len(self._held)
