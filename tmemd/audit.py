"""Holding guests to their grant: the memory a guest can bring into the files it maps on its own
(writing its loan above what is lent, touching holes of its mirror) is measured and punched
again, and a guest found far beyond its grant is to be closed (docs/security.md)."""

from __future__ import annotations

from typing import Final

from mypy_extensions import trait

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.accounts import Guest, Overdraft
from tmemd.deferred import runs
from tmemd.lending import LOAN_SLACK_SLOTS
from tmemd.memfiles import Mirror, data_extents
from tmemd.state import StoreState

MIRROR_SLACK_SLOTS: Final = 64  # ...and this much of its mirror beyond its own slots
OVERDRAW_CLOSE_SLOTS: Final = 256  # one audit finding this much more: the guest is closed
AUDIT_SLOTS: Final = 4096  # pages of a file one audit step looks at (and punches), at most


@trait
class Auditing(StoreState):
    """The store's audit of guests' files (module docstring)."""

    def files_resident(self, guest: Guest) -> int:
        """Bytes of memory the guest's mirror and loan file hold now."""
        return sum(f.resident() for f in (guest.mirror, guest.loan) if f is not None)

    def resident(self) -> int:
        """Bytes of memory the arena and every guest's files hold now."""
        return self.arena.resident() + sum(self.files_resident(g) for g in self.guests.values())

    def audit(self, guest: Guest) -> Overdraft:
        """Hold a mapped guest to its grant: memory its files hold beyond what it was given
        (written into its loan above what is lent, or holes of its mirror it touched) is
        punched again and counted. A guest found with much more than a race can explain
        (``OVERDRAW_CLOSE_SLOTS``) is to be closed (``close``): then nothing is punched here
        (closing it punches its files whole, off the event loop), so an audit never spends more
        than a small punch of the caller's time."""
        found = Overdraft()
        loan, mirror = guest.loan, guest.mirror
        loan_excess = mirror_excess = 0
        if loan is not None and not loan.pending:
            allowed = (guest.lent_slots + 1 + LOAN_SLACK_SLOTS) << FRAME_SHIFT
            loan_excess = max(0, loan.resident() - allowed) >> FRAME_SHIFT
        if mirror is not None:
            allowed = (mirror.owned + MIRROR_SLACK_SLOTS) << FRAME_SHIFT
            allowed += mirror.meta_bytes(self._fresh)
            mirror_excess = max(0, mirror.resident() - allowed) >> FRAME_SHIFT
            if not mirror_excess:
                mirror.audit_from = 0
        if max(loan_excess, mirror_excess) > OVERDRAW_CLOSE_SLOTS:
            found.close = True
            found.loan, found.mirror = loan_excess, mirror_excess
        else:
            if loan_excess:
                assert loan is not None
                found.loan = loan_excess
                if not loan.punch_from(guest.lent_slots):
                    self.punch_failures += 1
            if mirror_excess:
                assert mirror is not None
                found.mirror = self._audit_mirror(mirror)
        if found:
            guest.overdrawn += found.loan + found.mirror
            self.overdrawn_slots += found.loan + found.mirror
        return found

    def _audit_mirror(self, mirror: Mirror) -> int:
        """Punch the memory of a mirror that is not the guest's: data slots whose memory is
        elsewhere, and generation/link pages of slots never used. Looks at most AUDIT_SLOTS
        pages, resuming where the last walk stopped; returns pages punched."""
        owners, ident, fresh = self._owner, mirror.ident, self._fresh
        data_end = mirror.gen_offset
        meta_used = (
            (mirror.gen_offset, mirror.gen_offset + 8 * fresh),
            (mirror.link_offset, mirror.link_offset + 4 * fresh),
        )
        stray: list[int] = []  # page numbers of the file
        budget = AUDIT_SLOTS
        resume = 0
        for start, end in data_extents(mirror.fd, mirror.audit_from, mirror.ctl_offset, budget):
            first, last = start >> FRAME_SHIFT, -(-end // FRAME_SIZE)
            if last - first > budget:
                last = first + budget
                resume = last << FRAME_SHIFT
            budget -= last - first
            for page in range(first, last):
                offset = page << FRAME_SHIFT
                if offset < data_end:
                    if page >= fresh or owners[page] != ident:
                        stray.append(page)
                elif not any(lo - FRAME_SIZE < offset < hi for lo, hi in meta_used):
                    stray.append(page)
            if resume or budget <= 0:
                resume = resume or (last << FRAME_SHIFT)
                break
        mirror.audit_from = resume
        for start, length in runs(stray):
            self._count_punch(mirror.punch(start, length))
        return len(stray)

    def _count_punch(self, ok: bool) -> None:
        if not ok:
            self.punch_failures += 1
