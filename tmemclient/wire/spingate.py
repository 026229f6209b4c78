"""When waiting by watching a ring (spinning) is worth it: only while the machine has a CPU to
spare (PROTOCOL.md §4.6, "Polling"). Both sides ask: the guest before it watches its reply ring,
the daemon's poller before it watches every guest's request ring.

Apart from ring.py, whose Rings are on every request's path (and compiled with mypyc where it
can be), because this one reads the clock and /proc, and its tests replace both.
"""

from __future__ import annotations

import os
import time


class SpinGate:
    """Whether waiting by watching a ring (spinning) is worth it now: only while the machine has
    a CPU to spare. A spinning side holds a CPU; with more runnable tasks than CPUs it holds it
    from the very peer it waits for, and sleeping (with a doorbell) is faster for everyone.
    The number of runnable tasks (/proc/loadavg's 4th field, this moment's, not an average) is
    read at most every ``period`` seconds. A spin that ended without its answer (``missed``)
    closes the gate for a while, twice as long after each miss in a row: contention the
    sampled count did not show."""

    def __init__(self, period: float = 0.05) -> None:
        self.cpus = os.cpu_count() or 1
        self.period = period
        self._next = 0.0
        self._open = True
        self._backoff = period
        self._shut_until = 0.0

    def open(self) -> bool:
        """May we spin now?"""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.period
            self._open = now >= self._shut_until and runnable_tasks() <= self.cpus
        return self._open

    def missed(self) -> None:
        """A spin ran out without the answer: stay shut for a while."""
        now = time.monotonic()
        self._open = False
        self._shut_until = self._next = now + self._backoff
        self._backoff = min(self._backoff * 2, 2.0)

    def hit(self) -> None:
        """A spin got its answer."""
        self._backoff = self.period


def runnable_tasks() -> int:
    """Tasks running or ready to run on the whole machine right now (0 if unknown)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0
