"""Rate limiting for a log line that repeats: the first occurrence is logged, then at most
one per interval, and each logged line says how many occurrences were not.

A full disk or a budget too small for a block fails every save the same way; one line per
save buried the log (343 lines in one run, issue #15) while saying nothing new. The counts
stay exact in `WriterStats`; the log says that it keeps happening, and how often.

Pure: no trio, no I/O. The caller passes the time, so tests need no clock.
"""

from __future__ import annotations

import attrs

__all__ = ["RepeatedLog"]


@attrs.define
class RepeatedLog:
    """Decides which occurrences of one repeated event are logged.

    `occurred(now)` counts an occurrence at time `now` (seconds, any monotonic clock) and
    returns None when it should not be logged, else how many occurrences were not logged
    since the last logged one (0 for the first)."""

    interval_s: float
    _last: float | None = None
    _unlogged: int = 0

    def occurred(self, now: float) -> int | None:
        if self._last is not None and now - self._last < self.interval_s:
            self._unlogged += 1
            return None
        unlogged, self._unlogged, self._last = self._unlogged, 0, now
        return unlogged
