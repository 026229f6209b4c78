"""Named pools a guest can come back to (docs/design.md §2.6, PROTOCOL.md §6.1; issue #17).

A private pool made with a name (``NEW_POOL`` with ``name``) is held by the connection that
opened it, like any private pool. When that connection ends, the pool is not destroyed but
*kept*: its pages stay where they are, billed to its guest's account (which therefore stays too),
for ``reattach_seconds``. A connection of the same guest name and the same uid that asks for the
same name within that time gets the same pool back, with its pages; after it, the pool is freed.

Identity is the daemon's, never the guest's claim: the guest name is the one the host resolved
from SO_PEERCRED and the policy (so ``1000/vm1`` for an unlisted name, and a listed name only for
its uids), and the uid that made a named pool is recorded with it, so another uid allowed the same
listed name cannot open it either. Pure bookkeeping: no I/O, no clock of its own (the caller says
what time it is, in seconds of a monotonic clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tmemclient.wire.errors import GuestConflict, InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    from tmemd.accounts import Pool


@dataclass(eq=False)
class Named:
    """One named pool: whose it is (guest name, pool name, uid), the pool, the connection that
    holds it now (None while kept) and, while kept, when it is freed."""

    guest: str
    name: str
    uid: int
    pool: Pool
    holder: object | None
    expires: float = float("inf")


class NamedPools:
    """Every named pool of the daemon, held or kept."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Named] = {}
        self._by_pool: dict[Pool, Named] = {}
        self._per_uid: dict[int, int] = {}  # named pools each uid made (a tenant's bound)

    def __len__(self) -> int:
        return len(self._by_key)

    def of_uid(self, uid: int) -> int:
        """How many named pools (held or kept) uid ``uid`` made."""
        return self._per_uid.get(uid, 0)

    def of(self, pool: Pool) -> Named | None:
        """The named-pool record of ``pool``, or None for an unnamed pool."""
        return self._by_pool.get(pool)

    def find(
        self, holder: object, guest: str, uid: int, name: str, *, persistent: bool, order: int
    ) -> Pool | None:
        """The kept pool ``name`` of ``guest``, now held by ``holder``; None if there is none
        (the caller makes one and ``add``s it). PermissionDenied if another uid made it,
        GuestConflict if another connection holds it, InvalidArgument if it is of another kind
        or page size than asked (nothing changes then)."""
        named = self._by_key.get((guest, name))
        if named is None:
            return None
        if named.uid != uid:
            raise PermissionDenied(
                f"pool {name!r} of guest {guest!r} belongs to uid {named.uid}: a named pool is "
                "given back only to the uid that made it"
            )
        if named.holder is not None:
            raise GuestConflict(
                f"pool {name!r} is open on another connection of guest {guest!r}; close that "
                "connection (or destroy the pool there) first"
            )
        pool = named.pool
        if pool.persistent != persistent or pool.order != order:
            kind = "persistent" if pool.persistent else "ephemeral"
            raise InvalidArgument(
                f"pool {name!r} exists as a {kind} pool of {pool.page_size}-byte pages; ask for "
                "it as it was made, or use another name"
            )
        named.holder = holder
        named.expires = float("inf")
        return pool

    def add(self, holder: object, guest: str, uid: int, name: str, pool: Pool) -> None:
        """Record a new named pool, held by ``holder``."""
        named = Named(guest, name, uid, pool, holder)
        self._by_key[(guest, name)] = named
        self._by_pool[pool] = named
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1

    def adopt(self, guest: str, name: str, uid: int, pool: Pool, until: float) -> None:
        """Record a named pool a start found in its state directory, kept until ``until``."""
        named = Named(guest, name, uid, pool, None, until)
        self._by_key[(guest, name)] = named
        self._by_pool[pool] = named
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1

    def keep(self, holder: object, pool: Pool, until: float) -> bool:
        """``holder``'s connection ends: keep ``pool`` until ``until`` if it is a named pool
        ``holder`` holds (True), else leave it to be destroyed (False)."""
        named = self._by_pool.get(pool)
        if named is None or named.holder is not holder or pool.dead:
            return False
        named.holder = None
        named.expires = until
        return True

    def forget(self, pool: Pool) -> None:
        """``pool`` was destroyed (by its guest, or freed): its name is free again."""
        named = self._by_pool.pop(pool, None)
        if named is not None:
            self._by_key.pop((named.guest, named.name), None)
            left = self._per_uid[named.uid] - 1
            if left:
                self._per_uid[named.uid] = left
            else:
                del self._per_uid[named.uid]

    def kept(self, guest: str) -> int:
        """How many pools of ``guest`` are kept for it (held by no connection)."""
        return sum(1 for n in self._by_key.values() if n.guest == guest and n.holder is None)

    def kept_total(self) -> tuple[int, int]:
        """Pools kept for guests that may come back, and their pages."""
        kept = [n.pool for n in self._by_key.values() if n.holder is None]
        return len(kept), sum(p.pages for p in kept)

    def expired(self, now: float) -> list[Named]:
        """The kept pools whose time is up at ``now``, forgotten here (the caller frees them)."""
        gone = [n for n in self._by_key.values() if n.holder is None and n.expires <= now]
        for named in gone:
            self.forget(named.pool)
        return gone
