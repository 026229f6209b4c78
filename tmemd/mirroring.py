"""Mapped guests (PROTOCOL.md §4.7): a guest whose pages live in its own mirror, which it maps
read-only and reads with no round trip. A PUT_MANY answers each stored page's token [head slot,
generation]; the guest reports its mapped reads afterwards (TOUCH_MANY). The generations the
store trusts are its own (``_gen``), never what the guest's file says."""

from __future__ import annotations

from collections.abc import Sequence

from mypy_extensions import trait

from tmemd.accounts import NIL, Guest, Pool, StoreError
from tmemd.memfiles import Mirror
from tmemd.state import StoreState


@trait
class Mirroring(StoreState):
    """The store's mapped guests (module docstring)."""

    def map_guest(self, guest: Guest) -> Mirror:
        """Keep the guest's pages from now on in a mirror it can map (created once; pages it
        already holds are not moved, so only an empty guest may be mapped)."""
        if guest.mirror is None:
            if guest.held_slots:
                raise StoreError(f"guest {guest.name!r} holds pages: map it before any put")
            if any(pool.key for pool in guest.pools):
                # Its kept pools' pages are recorded in the state's arena; in a mirror they
                # would not be (tmemd/persist.py).
                raise StoreError(f"guest {guest.name!r} has pools kept in the state")
            ident = self._next_ident
            if ident >= 1 << 32:  # pragma: no cover - four billion mapped guests
                raise StoreError("out of mirror numbers")
            try:
                mirror = Mirror(self.capacity_slots, ident)
            except OSError as exc:  # no address space or memfds left: the guest does without
                raise StoreError(f"cannot make a mirror for {guest.name!r}: {exc}") from exc
            self._next_ident += 1
            guest.mirror = self._mirrors[ident] = mirror
            if len(self._gen) < len(self._index):  # the first mapped guest (Slots._alloc_slot)
                self._gen.extend([0] * (len(self._index) - len(self._gen)))
        return guest.mirror

    def token(self, pool: Pool, oid: int, index: int) -> list[int] | None:
        """[head slot, generation] of a page of a mapped guest's pool, for a mapped read."""
        head = self._lookup(pool, oid, index)
        if pool.guest.mirror is None or head == NIL:
            return None
        return [head, self._gen[head]]

    def touch_many(self, pool: Pool, heads: Sequence[int], gens: Sequence[int]) -> int:
        """Reads of ``pool``'s pages through its guest's mirror, as the guest reports them (the
        tokens [head slot, generation] it read): each page still there as it was read counts
        as a get hit and, if ephemeral, becomes the most recently used, as after a GET or a
        READ. Tokens of pages gone or changed since, or not of this pool, are ignored; returns
        how many counted."""
        if pool.guest.mirror is None:
            return 0
        owners, gen, known = self._pool, self._gen, len(self._pool)
        guest = pool.guest
        hits = 0
        for head, generation in zip(heads, gens, strict=True):
            if head < known and owners[head] is pool and generation and gen[head] == generation:
                self.clock += 1
                if not pool.persistent:
                    self._touch(guest, head)
                hits += 1
        self._count_gets(pool, hits, hits)
        return hits
