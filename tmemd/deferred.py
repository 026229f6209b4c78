"""Heavy work done off the event loop. A put, a get or a flush touches O(1) pages; freeing a
pool, a guest or a big loan touches all of theirs. With ``deferred`` on (the daemon sets it),
such work is queued instead of done in the caller's turn: ``reap`` frees dying pools' pages a
bounded number at a time, and ``later_work`` hands out large punches to run in a worker thread
(tmemd/server.py's maintenance task). Slots being scrubbed stay counted in ``used_slots`` until
their punch is done, so they cannot be reused under it. With ``deferred`` off (the default, and
what the unit tests use) everything happens at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mypy_extensions import trait

from tmemclient.wire.layout import FRAME_SHIFT
from tmemd.accounts import Pool
from tmemd.memfiles import MemFile
from tmemd.state import StoreState

BIG_PUNCH: Final = 4 << 20  # bytes: a punch at least this big runs later, off the event loop
REAP_INLINE: Final = 256  # pages: a pool at most this big is freed at once even when deferred


def runs(slots: list[int]) -> list[tuple[int, int]]:
    """(offset, length) in bytes of each run of adjacent slots (sorts ``slots``)."""
    runs: list[tuple[int, int]] = []
    if not slots:
        return runs
    slots.sort()
    start = prev = slots[0]
    for slot in [*slots[1:], None]:
        if slot is not None and slot == prev + 1:
            prev = slot
            continue
        runs.append((start << FRAME_SHIFT, (prev - start + 1) << FRAME_SHIFT))
        if slot is not None:
            start = prev = slot
    return runs


class Later:
    """Work queued off the event loop: punches (``run``, any thread, GIL released), then
    ``done`` in the event loop's thread (slots freed, files closed)."""

    def __init__(
        self,
        file: MemFile,
        ranges: list[tuple[int, int]],
        done: Callable[[], None] | None = None,
    ) -> None:
        self.file = file
        self.ranges = ranges
        self._done = done
        self.failed = 0

    def run(self) -> None:
        """The punches."""
        for start, length in self.ranges:
            if not self.file.punch(start, length):
                self.failed += 1

    def done(self) -> None:
        """What follows the punches."""
        if self._done is not None:
            self._done()


@trait
class Deferring(StoreState):
    """The store's deferred work (module docstring)."""

    @property
    def busy(self) -> bool:
        """Is there deferred work (dying pools to free, punches to run)?"""
        return bool(self._dying or self._later)

    def reap(self, max_pages: int) -> int:
        """Free up to ``max_pages`` pages of destroyed pools; return how many."""
        done = 0
        dying = self._dying
        while dying and done < max_pages:
            pool = dying[0]
            done += self._free_pages(pool, max_pages - done)
            if not pool.objects:
                dying.popleft()
        return done

    def later_work(self) -> Later | None:
        """The next large punch to run off the event loop (``Later.run`` in a worker thread,
        then ``finish``), or None."""
        return self._later[0] if self._later else None

    def finish(self, later: Later) -> None:
        """A punch from ``later_work`` ran: free what waited for it."""
        if self._later and self._later[0] is later:
            self._later.popleft()
        else:  # pragma: no cover - the daemon finishes them in order
            self._later.remove(later)
        later.file.queued -= 1
        self.punch_failures += later.failed
        later.done()

    def drain(self) -> None:
        """Do every deferred thing now (at exit, and in tests)."""
        while self._dying:
            self.reap(1 << 30)
        while (later := self.later_work()) is not None:
            later.run()
            self.finish(later)

    def _punch_later(
        self,
        file: MemFile,
        ranges: list[tuple[int, int]],
        done: Callable[[], None] | None,
        cost: int | None = None,
    ) -> None:
        """Punch ``ranges`` of ``file`` and then call ``done``: now, or (when deferred and
        costly) from a worker thread. ``cost``: bytes of memory the ranges are expected to
        hold (what a punch costs: a hole is free), by default their whole length."""
        later = Later(file, ranges, done)
        if cost is None:
            cost = sum(n for _, n in ranges)
        # A file with a punch queued queues the next one too: its punches run in order, and
        # it is closed only after them.
        if self.deferred and (file.queued or cost >= BIG_PUNCH):
            file.queued += 1
            self._later.append(later)
            return
        later.run()
        self.punch_failures += later.failed
        later.done()

    def _close_file(self, file: MemFile) -> None:
        """Free all of a file's memory and close it (its guest's mapping shows zeros)."""
        cost = file.resident() if self.deferred else None
        self._punch_later(file, [(0, file.size)], file.close, cost)

    def _reap_for(self, short: Callable[[], int]) -> None:
        """Free dying pools' pages while ``short()`` slots are missing: they are gone already,
        and must not cost anyone a live page."""
        while self._dying and (missing := short()) > 0:
            self.reap(missing)

    def _free_pages(self, pool: Pool, limit: int) -> int:
        """Remove and scrub up to ``limit`` pages of a dead pool; return how many."""
        freed_slots: list[int] = []
        objects = pool.objects
        count = 0
        while count < limit and objects:
            oid, pages_of_oid = objects.popitem()  # popitem: O(1), leaves no holes behind
            while count < limit and pages_of_oid:
                _, head = pages_of_oid.popitem()
                freed_slots.extend(self._unlink(pool, head))
                count += 1
            if pages_of_oid:
                objects[oid] = pages_of_oid
        self._scrub(freed_slots)
        return count
