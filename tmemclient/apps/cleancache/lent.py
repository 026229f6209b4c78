"""Lent memory: borrowing memory from tmemd to extend the local cache, and giving up what it
takes back.

With ``borrow=N`` and a client connected with ``map_pages`` and ``lend_memory``, the cache asks
tmemd to lend it up to N bytes to use as its own (PROTOCOL.md §4.8: LEND, when blocks must leave
for lack of room; more often while the loan grows). Lent memory extends the local cache (how its
4 KiB frames hold pages: blocks.py). Evicted blocks go to tmem only while tmemd says a put would
find room (LEND's ``room``): with lent memory at its share a guest makes no puts at all.

tmemd may take any lent memory back at any time: a read that used it checks the mirror's seq word
after copying out, and is made again if memory was taken back meanwhile (its pages count once:
``_read_plan``, core.py); during a recall a read comes straight from the file. Pages lost that way
count in ``lent_lost``; ``lent_hits`` counts the pages reads found in lent memory.
"""

from __future__ import annotations

from tmemclient.apps.cleancache.blocks import _Blocks
from tmemclient.apps.cleancache.requests import Lend, Plan
from tmemclient.apps.cleancache.state import ASK_MAX, ASK_MIN, PAGE
from tmemclient.mapping import LentMemory


class _Lent(_Blocks):
    """Keeping the cache's view of its loan in step with tmemd's."""

    def _loan_sync(self) -> bool:
        """Drop what tmemd took back since we last looked; False while it is taking some."""
        loan = self._loan
        assert loan is not None
        low = loan.changed()
        if low is None:
            return True
        if low == LentMemory.BUSY:
            return False
        self._lost(low, loan.lent)
        return True

    def _lost(self, low: int, lent: int) -> None:
        """Everything we kept in lent memory from byte ``low`` on is gone; ``lent`` bytes are
        ours now. (A scan of the blocks holding lent pages, when some are lost.)"""
        frames = lent // PAGE
        first = min(low // PAGE, frames)
        views = self._views
        if frames > len(views):
            assert self._loan is not None
            mem = self._loan.mem
            views.extend(mem[k * PAGE : (k + 1) * PAGE] for k in range(len(views), frames))
        else:
            del views[frames:]  # taken back
        if first >= self._frames:  # nothing lost: only new frames, if any
            self._frames_free[:0] = range(frames - 1, self._frames - 1, -1)
            self._frames = frames
            return
        self._frames = frames
        used: set[int] = set()
        for key, block in list(self._local.items()):
            if not block.lent:
                continue
            for i, frame in list(block.lent.items()):
                if frame < first:
                    used.add(frame)
                    continue
                del block.lent[i]
                block.lent_mask &= ~(1 << i)
                block.pages[i] = None
                block.mask &= ~(1 << i)
                block.held -= 1
                self._lent_pages -= 1
                self.stats.lent_lost += 1
            if not block.held:
                del self._local[key]
        self._frames_free = [f for f in range(frames - 1, -1, -1) if f not in used]

    def _borrow(self) -> Plan:
        """Ask to borrow ``borrow`` bytes in all; learn what we have and whether puts find room."""
        loan = self._loan
        assert loan is not None
        self._pressure = 0
        had = len(self._frames_free) + self._lent_pages
        reply = yield Lend(self.borrow)
        if reply is None:
            return
        self.stats.lends += 1
        self.stats.lent_bytes = reply["lent"]
        self._lost(loan.answered(reply), reply["lent"])
        self._room = reply["room"] >= self.part_pages * PAGE
        grew = len(self._frames_free) + self._lent_pages > had
        self._ask_every = ASK_MIN if grew else min(self._ask_every * 2, ASK_MAX)
