"""Lent memory (PROTOCOL.md §4.8): memory a mapped guest holds as its own, billed like pages,
which the store takes back at any time (a recall) by punching it out of the guest's loan file,
under a seqlock of the mirror's control words that the guest reads and the store only writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mypy_extensions import trait

from tmemclient.wire.layout import FRAME_SHIFT
from tmemd.accounts import Guest, StoreError
from tmemd.memfiles import Loan
from tmemd.policy import choose_victim
from tmemd.state import StoreState

LEND_IDLE: Final = 0.1  # seconds without use after which lent memory is taken back first
LOAN_SLACK_SLOTS: Final = 16  # a guest may hold this much beyond its loan before it is punched


@trait
class Lending(StoreState):
    """The store's lent memory (module docstring)."""

    def open_loan(self, guest: Guest) -> Loan:
        """Give a mapped guest a file to borrow memory in (PROTOCOL.md §4.8); nothing is lent
        until it asks (``lend``). One loan per guest."""
        mirror = guest.mirror
        if mirror is None:
            raise StoreError(f"guest {guest.name!r} has no mirror: lent memory needs one")
        if guest.loan is not None:
            raise StoreError(f"guest {guest.name!r} borrows memory already")
        try:
            guest.loan = Loan(self.capacity_slots)
        except OSError as exc:
            raise StoreError(f"cannot make a loan file for {guest.name!r}: {exc}") from exc
        mirror.lent = mirror.low = 0
        mirror.publish()
        self.lenders[guest.name] = guest
        return guest.loan

    def close_loan(self, guest: Guest) -> None:
        """Take back all the guest's lent memory and close its file (its session ended)."""
        loan = guest.loan
        if loan is None:
            return
        self._recall(guest, 0, asked=True, punch=False)
        self.lenders.pop(guest.name, None)
        guest.loan = None
        self._close_file(loan)

    def lend(self, guest: Guest, want: int) -> dict[str, int]:
        """The guest asks to borrow ``want`` slots in all (fewer: it gives the rest back).

        It gets, above what it has, memory that is free, then memory idle guests left lent
        (unused for ``lend_idle``), then ephemeral pages by the weighted LRU; and, while it
        holds less than its *share* (the budget split by weight between the guests using
        lent memory now), the part of busy guests' loans above their own share. Returns
        what it has now, in slots: ``lent``; ``low``, the fewest it had since it last asked
        (everything it kept from there up is gone); ``seq``, the mirror's seq word then; and
        ``room``, slots a put could get without taking anyone's busy loan.
        """
        loan, mirror = guest.loan, guest.mirror
        if loan is None or mirror is None:
            raise StoreError(f"guest {guest.name!r} has no loan file")
        now = self.now_ns()
        loan.mark_active(now)
        want = min(want, loan.slots)
        if guest.frozen or loan.pending:
            # An administrator froze it, or memory it gave back is still being punched out of
            # the file (lending it again now could let that punch hit new data): it may give
            # back, not grow.
            want = min(want, guest.lent_slots)
        want = min(want, guest.lent_slots + self._cap_room(guest))
        if want < guest.lent_slots:
            self._recall(guest, want, asked=True)
        elif want > guest.lent_slots:
            got = self._reclaim(guest, want - guest.lent_slots, now)
            guest.lent_slots += got
            self.used_slots += got
            mirror.lent = guest.lent_slots
            mirror.publish()
        if (
            not loan.pending
            and loan.resident() > (guest.lent_slots + 1 + LOAN_SLACK_SLOTS) << FRAME_SHIFT
        ):
            loan.punch_from(guest.lent_slots)  # written beyond its loan: not its memory
        low = mirror.low
        mirror.low = guest.lent_slots
        mirror.publish()
        room = self._room(guest, now)
        return {"lent": guest.lent_slots, "low": low, "seq": mirror.seq, "room": room}

    def _cap_room(self, guest: Guest) -> int:
        """Slots the guest may still add under its cap and its tenant's, not evicting anything
        of its own (lent memory never evicts the borrower's own pages)."""
        room = self.capacity_slots
        if guest.cap_slots is not None:
            room = guest.cap_slots - guest.held_slots
        tenant = guest.tenant
        if tenant is not None and tenant.cap_slots is not None:
            room = min(room, tenant.cap_slots - tenant.held_slots)
        return max(0, room)

    def _idle(self, guest: Guest, now: int) -> bool:
        loan = guest.loan
        return loan is not None and now - loan.active_ns(now) > self.lend_idle * 1e9

    def _shares(self, now: int, *needing: Guest) -> Callable[[Guest], int]:
        """Each guest's share of the budget, split by weight between the guests using lent
        memory now, the ``needing`` ones (asking for memory) and the guest itself. Made once per
        decision: O(guests)."""
        busy = {g.name for g in self.lenders.values() if not self._idle(g, now)}
        busy.update(g.name for g in needing)
        total = sum(self.guests[name].weight for name in busy if name in self.guests)
        budget = self.budget_slots

        def share(guest: Guest) -> int:
            weights = total if guest.name in busy else total + guest.weight
            return budget * guest.weight // max(1, weights)

        return share

    def _room(self, guest: Guest, now: int) -> int:
        """Slots a put of ``guest`` could have without taking a busy guest's lent memory."""
        idle = sum(
            g.lent_slots for g in self.lenders.values() if g is not guest and self._idle(g, now)
        )
        pages = sum(g.eph_slots for g in self.guests.values())
        return max(0, self.budget_slots - self.used_slots) + pages + idle

    def _reclaim(self, asker: Guest, need: int, now: int) -> int:
        """Free up to ``need`` slots for ``asker``'s loan (see ``lend``); return how many."""

        def short() -> int:
            return need - (self.budget_slots - self.used_slots)

        self._reap_for(short)
        self._recall_idle(short, now, asker)
        while short() > 0:
            victim = choose_victim(self.guests.values(), self.clock)
            if victim is None:
                break
            self._evict(victim.oldest)
        # Busy guests' loans above their share, while the asker is below its own.
        share = self._shares(now, asker)
        may = share(asker) - asker.lent_slots - (self.budget_slots - self.used_slots)
        self._recall_excess(short, share, asker, may)
        return max(0, min(need, self.budget_slots - self.used_slots))

    def _recall_excess(
        self,
        short: Callable[[], int],
        share: Callable[[Guest], int],
        keep: Guest,
        may: int | None = None,
    ) -> bool:
        """Take back what busy guests hold above their share (furthest above first; never
        ``keep``'s) while ``short()`` is above 0, ``may`` slots at most; True if any was
        taken."""
        over = [(g.lent_slots - share(g), g) for g in self.lenders.values() if g is not keep]
        taken = False
        for excess, g in sorted(over, key=lambda pair: -pair[0]):
            take = min(short(), excess if may is None else min(excess, may))
            if take <= 0:
                break  # the rest are no further above their share, or no more is wanted
            self._recall(g, g.lent_slots - take)
            taken = True
            if may is not None:
                may -= take
        return taken

    def _recall_idle(self, short: Callable[[], int], now: int, keep: Guest | None) -> bool:
        """Take back idle guests' lent memory (longest idle first; never ``keep``'s) while
        ``short()`` is above 0; True if any was taken."""
        idle = [
            (g.loan.active_ns(now), g)
            for g in self.lenders.values()
            if g is not keep and g.lent_slots and g.loan is not None and self._idle(g, now)
        ]
        taken = False
        for _, g in sorted(idle, key=lambda pair: pair[0]):
            need = short()
            if need <= 0:
                break
            self._recall(g, max(0, g.lent_slots - need))
            taken = True
        return taken

    def _recall(self, guest: Guest, keep: int, *, asked: bool = False, punch: bool = True) -> None:
        """Take the guest's lent memory down to ``keep`` slots: a seqlock write of its control
        words (seq odd while they change), then the punch. A large punch may run later, in a
        worker thread: the guest no longer uses that memory (seq changed, lent lowered), and
        the loan grows no more until it is done (``Loan.pending``). ``punch=False``: the whole
        file is about to be punched anyway."""
        old = guest.lent_slots
        loan, mirror = guest.loan, guest.mirror
        if keep >= old or loan is None or mirror is None:
            return
        mirror.seq += 1  # odd: under way
        mirror.lent = keep
        mirror.low = min(mirror.low, keep)
        mirror.publish()
        if punch:
            start = (keep + 1) << FRAME_SHIFT
            loan.pending += 1
            cost = (old - keep) << FRAME_SHIFT  # what was lent there; the rest is holes
            self._punch_later(loan, [(start, loan.size - start)], loan.punched, cost)
        mirror.seq += 1
        mirror.publish()
        guest.lent_slots = keep
        self.used_slots -= old - keep
        if not asked:
            self.recalled_slots += old - keep

    def _recall_for_put(self, guest: Guest, need: int) -> bool:
        """Lent memory for a put, before any page is evicted: idle guests' first, then what
        busy guests hold above their share (counting the putting guest in, so a guest that
        never borrows still has its share). True if any was taken."""
        now = self.now_ns()

        def short() -> int:
            return self.used_slots + need - self.budget_slots

        if self._recall_idle(short, now, guest):
            return True
        return self._recall_excess(short, self._shares(now, guest), guest)
