"""Progress for logs: when stderr is not a terminal (a log file, a pipe, a batch job), a bar shows
nothing until the end, so long runs log one line at intervals instead."""

from __future__ import annotations

import logging
import time


class ProgressLog:
    """Logs ``"<what> done/total, <rate>, <elapsed> elapsed, ~<left> left"`` at most every ``every_s``
    seconds, and always at the last item. ``update(done, total, **extra)`` appends ``k value`` pairs."""

    def __init__(self, logger: logging.Logger, what: str = "frames", *, every_s: float = 10.0, unit: str = "fps",
                 clock=time.perf_counter):
        self.log, self.what, self.every_s, self.unit, self.clock = logger, what, every_s, unit, clock
        self.t0 = clock()
        self.start_done: int | None = None
        self.last = float("-inf")

    def update(self, done: int, total: int | None, rate: float | None = None, **extra: float) -> bool:
        """Log a line if ``every_s`` has passed since the last one (or ``done == total``); True if it did."""
        now = self.clock()
        if self.start_done is None:
            self.start_done = done - 1 if done > 0 else 0
        if now - self.last < self.every_s and done != total:
            return False
        self.last = now
        elapsed = now - self.t0
        rate = rate if rate is not None else (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.what} {done}/{total if total is not None else '?'}", f"{rate:.2f} {self.unit}",
                 f"{elapsed:.0f} s elapsed"]
        if total is not None and rate > 0 and done < total:
            per_item = elapsed / max(1, done - self.start_done)
            parts.append(f"~{per_item * (total - done):.0f} s left")
        parts += [f"{k} {v:.4g}" for k, v in extra.items()]
        self.log.info(", ".join(parts))
        return True
