"""The engine link's restart policy: when a dying engine is replaced at once, and when the
link gives up on engines for a cool-down.

Every death counts, of a serving engine or of one that failed while starting. More than
`max_restarts` deaths within `window_s` make the link give up: the engine is failed for
`cooldown_s(give-ups in a row)` seconds, then the deaths are forgotten and a new engine is
tried. An engine that stays up a whole window after becoming ready resets the give-ups,
so the cool-down starts short again.

Pure: no trio, no MLX, no I/O. The caller passes the time (monotonic seconds), so tests
need no clock. The link owns one.
"""

from __future__ import annotations

from collections import deque

import attrs

__all__ = ["RestartPolicy", "cooldown_s"]


def cooldown_s(give_ups_in_a_row: int, base_s: float, max_s: float) -> float:
    """How long the engine stays failed after its `give_ups_in_a_row`-th give-up (1, 2, ...)
    before a new one is tried: `base_s`, doubled at each give-up in a row, never above
    `max_s`."""
    if give_ups_in_a_row < 1:
        raise ValueError("give_ups_in_a_row must be >= 1")
    return min(max_s, base_s * 2.0 ** min(give_ups_in_a_row - 1, 64))


@attrs.define
class RestartPolicy:
    """The deaths within the window, and the give-ups in a row. See the module docstring."""

    max_restarts: int
    window_s: float
    cooldown_base_s: float
    cooldown_max_s: float
    # Times of the deaths within the last `window_s`, oldest first.
    _deaths: deque[float] = attrs.field(factory=deque)
    # Give-ups since an engine last stayed up a whole window (the cool-down's exponent).
    _give_ups: int = 0
    # When the current engine became ready; None while none is.
    _ready_since: float | None = None

    @property
    def deaths(self) -> int:
        """Deaths within the window (as of the last `died`)."""
        return len(self._deaths)

    def ready(self, now: float) -> None:
        """An engine became ready at `now`."""
        self._ready_since = now

    def died(self, now: float) -> None:
        """An engine (serving or starting) died at `now`."""
        if self._ready_since is not None and now - self._ready_since >= self.window_s:
            self._give_ups = 0  # the last engine held a whole window: the backoff starts over
        self._ready_since = None
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > self.window_s:
            self._deaths.popleft()

    def exhausted(self) -> bool:
        """True when the deaths within the window are past the restart limit: give up."""
        return len(self._deaths) > self.max_restarts

    def give_up(self) -> float:
        """Count a give-up; the cool-down it earns, in seconds."""
        self._give_ups += 1
        return cooldown_s(self._give_ups, self.cooldown_base_s, self.cooldown_max_s)

    def cooled_down(self) -> None:
        """The cool-down is over: forget the deaths, so a new engine is tried."""
        self._deaths.clear()
