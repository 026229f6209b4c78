"""The cost model: what a file read and a tmem lookup cost, and how often a lookup finds pages.

Asking tmem costs a round trip even when it misses. A lookup that could return k pages saves k
times the hit rate times a file read; the cache measures both costs (from recent samples) and
reads the file directly when asking would cost more than it saves (asking anyway 1 in 4 times, to
keep measuring: ``_Shadow._worth_asking``). The hit rate also says whether tmem is under
pressure, which makes the cache put only dense tmem pages (``_Puts._dense_pages``).

Measured where they happen: file reads in ``_read_disk``, lookups in ``_get``, the hit rate in
``_take`` (core.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class _Recent:
    """The last few measurements of a cost, read as a quantile: one slow outlier (a page fault, a
    preempted daemon) must not stop the cache from asking tmem for long."""

    def __init__(self, quantile: float, size: int = 15) -> None:
        self._quantile = quantile
        self._recent: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._recent.append(value)

    @property
    def value(self) -> float | None:
        if len(self._recent) < 3:
            return None
        return sorted(self._recent)[int(len(self._recent) * self._quantile)]


@dataclass
class _Costs:
    """Measured costs, in seconds."""

    # One page read from the file: the median.
    disk: _Recent = field(default_factory=lambda: _Recent(0.5))
    # One lookup: a low quantile, since a lookup may also wait for the daemon to finish puts
    # sent before it, which is the puts' cost, not the lookup's.
    lookup: _Recent = field(default_factory=lambda: _Recent(0.25))
    hit_rate: float = 1.0  # of blocks asked of tmem, the fraction it returned (weighted average)
