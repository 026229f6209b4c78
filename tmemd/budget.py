"""The budget and the caps: changing them at run time, and evicting or taking back lent memory
down to them. Persistent pages are never dropped by any of these."""

from __future__ import annotations

from mypy_extensions import trait

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.accounts import NIL, Guest, Tenant
from tmemd.policy import choose_victim
from tmemd.state import StoreState


@trait
class Budgeting(StoreState):
    """The store's budget and caps (module docstring)."""

    @property
    def budget(self) -> int:
        """Bytes pages may occupy."""
        return self.budget_slots << FRAME_SHIFT

    @property
    def used(self) -> int:
        """Bytes occupied by pages."""
        return self.used_slots << FRAME_SHIFT

    @property
    def capacity(self) -> int:
        """Bytes of address space reserved: the most the budget can grow to."""
        return self.capacity_slots << FRAME_SHIFT

    def set_budget(self, budget: int) -> int:
        """Change the budget at run time; evict ephemeral pages down to it at once. Persistent
        pages are never dropped: if they alone exceed the budget, new puts are refused until
        they fit. A smaller budget gives the memory of every free slot back to the kernel (an
        administrator shrinks it to hand memory to something else). Returns pages evicted."""
        if not FRAME_SIZE <= budget <= self.capacity:
            raise ValueError(f"budget must be between {FRAME_SIZE} and {self.capacity} bytes")
        shrinking = budget >> FRAME_SHIFT < self.budget_slots
        self.budget_slots = budget >> FRAME_SHIFT
        evicted = self._shrink_to(self.budget_slots)
        if shrinking:
            owners = self._owner
            self._give_back([(owners[slot], slot) for slot in self._free])
        return evicted

    def set_cap(self, guest: Guest, cap: int | None) -> int:
        """Change a guest's cap (bytes, None for no cap); evict its own ephemeral pages down to
        it at once. Returns pages evicted."""
        guest.cap_slots = None if cap is None else cap >> FRAME_SHIFT
        evicted = 0
        if guest.cap_slots is not None:
            while guest.held_slots > guest.cap_slots and guest.oldest != NIL:
                self._evict(guest.oldest)
                evicted += 1
            over = guest.held_slots - guest.cap_slots
            if over > 0:
                self._recall(guest, max(0, guest.lent_slots - over))
        return evicted

    def set_tenant_cap(self, tenant: Tenant, cap: int | None) -> int:
        """Change a uid's cap across all its guests (bytes, None for none); evict their
        ephemeral pages (oldest first, by the weighted LRU among them), then take back their
        lent memory, down to it. Returns pages evicted."""
        tenant.cap_slots = None if cap is None else cap >> FRAME_SHIFT
        evicted = 0
        if tenant.cap_slots is not None:
            while tenant.held_slots > tenant.cap_slots:
                victim = choose_victim(tenant.guests, self.clock)
                if victim is None:
                    break
                self._evict(victim.oldest)
                evicted += 1
            for g in sorted(tenant.guests, key=lambda g: -g.lent_slots):
                over = tenant.held_slots - tenant.cap_slots
                if over <= 0:
                    break
                self._recall(g, max(0, g.lent_slots - over))
        return evicted

    def drop_ephemeral(self, guest: Guest) -> int:
        """Evict every ephemeral page billed to ``guest`` (an administrator's flush)."""
        evicted = 0
        while guest.oldest != NIL:
            self._evict(guest.oldest)
            evicted += 1
        return evicted

    def _shrink_to(self, slots: int) -> int:
        self.reap(self.used_slots)  # dying pools first: their pages are gone already
        evicted = 0
        while self.used_slots > slots:
            victim = choose_victim(self.guests.values(), self.clock)
            if victim is None:
                break
            self._evict(victim.oldest)
            evicted += 1
        # Then lent memory: idle guests' first, then the biggest loans.
        self._recall_idle(lambda: self.used_slots - slots, self.now_ns(), None)
        for g in sorted(self.lenders.values(), key=lambda g: -g.lent_slots):
            if self.used_slots <= slots:
                break
            self._recall(g, max(0, g.lent_slots - (self.used_slots - slots)))
        return evicted
