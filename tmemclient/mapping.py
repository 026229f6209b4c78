"""Reading one's own tmem pages with no round trip (PROTOCOL.md §4.7).

A guest that asks for it in HELLO gets, with the reply, a read-only descriptor of its *mirror*:
the daemon keeps every page billed to this guest there, at the page's slot numbers, with a
generation word per head slot (the daemon's clock when the put stored it; 0 while the slot holds
nothing of ours or is being rewritten) and a link from each slot of a bigger page to the next.
A PUT_MANY of such a guest answers each stored page with its ``[head, generation]`` token.

A mapped read checks the generation, copies the page, and checks the generation again: the page
is the one the token names only if both match (the daemon zeroes the word before it changes or
frees the slot, and a generation is never reused). That needs the loads to stay in order, as
they do on x86-64 (the rings need it too). The page stays in tmem: a mapped read is READ of the
whole page, not GET (not exclusive). The daemon sees it only when the pool reports it
(TOUCH_MANY, sent by the pool with its next no-wait put): then it counts as a get hit and the page
becomes recently used.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any, Final

from tmemclient.wire.errors import ProtocolError
from tmemclient.wire.layout import CTL_WORDS, FRAME_SIZE, MirrorLayout, loan_size

Token = tuple[int, int]  # (head slot, generation)


def token_of(result: Any) -> Token | None:
    """The token a PUT_MANY answer gives one page: None for a page refused (false), or a plain
    true (a connection without a mapping)."""
    if type(result) is list and len(result) == 2:
        head, gen = result
        if (
            type(head) is not int
            or type(gen) is not int
            or head >> 32
            or gen >> 64
            or head < 0
            or gen < 0
        ):
            raise ProtocolError("a PUT_MANY token must be [slot, generation], unsigned integers")
        return (head, gen)
    return None


class Mapping:
    """The guest's read-only view of its mirror (and, if it borrows memory, of that: ``loan``)."""

    def __init__(
        self, fd: int, slots: int, loan_fd: int | None = None, loan_slots: int = 0
    ) -> None:
        self.slots = slots
        layout = MirrorLayout(slots)
        gen_offset, link_offset, ctl_offset = (
            layout.gen_offset,
            layout.link_offset,
            layout.ctl_offset,
        )
        # The control page after the links matters only with a loan (§4.8).
        size = layout.size if loan_fd is not None else ctl_offset
        if os.fstat(fd).st_size < size:
            raise ProtocolError(f"tmemd's page mirror is smaller than {slots} slots need")
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        view = memoryview(self._map)
        self._view = view
        self._mem = view[:gen_offset]
        self._gen = view[gen_offset:link_offset].cast("Q")
        self._link = view[link_offset : link_offset + 4 * slots].cast("I")
        self._ctl = (
            view[ctl_offset : ctl_offset + 8 * CTL_WORDS].cast("Q") if loan_fd is not None else None
        )
        self.reads = self.misses = 0
        self.loan: LentMemory | None = None
        if loan_fd is not None:
            try:
                assert self._ctl is not None
                self.loan = LentMemory(loan_fd, loan_slots, self._ctl)
            except BaseException:
                self.close()
                raise

    def read(self, token: Token, order: int) -> bytes | None:
        """The page the token names, or None if tmem no longer holds it as it was put."""
        head, generation = token
        gen, slots = self._gen, self.slots
        if not 0 <= head < slots or gen[head] != generation:
            self.misses += 1
            return None
        mem = self._mem
        if not order:
            data = bytes(mem[head * FRAME_SIZE : (head + 1) * FRAME_SIZE])
        else:
            parts = []
            slot = head
            for _ in range(1 << order):
                if slot >= slots:  # a link read while the page was being replaced
                    self.misses += 1
                    return None
                parts.append(mem[slot * FRAME_SIZE : (slot + 1) * FRAME_SIZE])
                slot = self._link[slot]
            data = b"".join(parts)
        if gen[head] != generation:  # changed under us: what we copied may be torn
            self.misses += 1
            return None
        self.reads += 1
        return data

    def valid(self, token: Token) -> bool:
        """Does tmem still hold the page as the token names it (a moment ago)?"""
        head, generation = token
        return 0 <= head < self.slots and self._gen[head] == generation

    def close(self) -> None:
        """Unmap."""
        if self.loan is not None:
            self.loan.close()
            self.loan = None
        for view in (self._mem, self._gen, self._link, self._ctl, self._view):
            if view is not None:
                view.release()
        self._map.close()


class LentMemory:
    """Memory tmemd lent this guest to use as its own (PROTOCOL.md §4.8): a file mapped
    read-write, of which the first ``lent`` bytes are ours for now. The daemon may take back any
    part above a new, lower ``lent`` at any time, without asking: it bumps the mirror's seq word
    (odd while it works), lowers ``lent`` and ``low``, and punches the memory out (it reads as
    zeros from then on). So a user of lent memory

    - calls ``changed()`` before it reads or writes there: ``None`` if nothing was taken back
      since it last looked; else the offset from which everything it kept is gone (or
      ``BUSY`` while a recall is under way: leave the memory alone for now);
    - checks ``still(seq)`` after copying something out, and drops the copy if not.

    Memory is asked for with LEND (``Client.lend``); its answer's ``low`` counts as a
    ``changed()`` too. ``mark_active()`` on each use tells tmemd the memory is busy: memory left
    unused for a while (tmemd's ``lend_idle_ms``) is the first it takes back.
    """

    BUSY: Final = -1

    def __init__(self, fd: int, slots: int, ctl: memoryview) -> None:
        size = loan_size(slots)
        if os.fstat(fd).st_size < size:
            raise ProtocolError(f"tmemd's loan file is smaller than {slots} slots need")
        self.size = slots * FRAME_SIZE  # the most it could ever lend
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        view = memoryview(self._map)
        self._view = view
        self.mem = view[FRAME_SIZE:]
        self._active = view[:8].cast("Q")
        self.words = ctl  # the mirror's control words (read-only): seq, lent, low
        self.seq = ctl[0]  # as last seen

    @property
    def lent(self) -> int:
        """Bytes we may use now."""
        return self.words[1] * FRAME_SIZE

    def changed(self) -> int | None:
        """None if nothing was taken back since we last looked; else the offset from which
        what we kept is gone (``BUSY``: a recall is under way, leave it all alone)."""
        ctl = self.words
        seq = ctl[0]
        if seq == self.seq:
            return None
        if seq & 1:
            return self.BUSY
        low = ctl[2] * FRAME_SIZE  # read after an even seq: the recall's words are all there
        self.seq = seq
        return low

    def still(self, seq: int) -> bool:
        """Was nothing taken back since seq (what was copied out meanwhile is whole)?"""
        return self.words[0] == seq

    def answered(self, reply: dict[str, int]) -> int:
        """Take a LEND answer in; returns the offset from which what we kept is gone."""
        self.seq = reply["seq"]
        return reply["low"]

    def mark_active(self) -> None:
        """We use the memory (a word of ours tmemd reads)."""
        self._active[0] = time.monotonic_ns()

    def close(self) -> None:
        """Unmap."""
        for view in (self.mem, self._active, self._view):
            view.release()
        self._map.close()
