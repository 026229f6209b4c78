"""The store's accounts: a guest (a tenant's account, its pools, its LRU list, what it holds), a
pool, a tenant (a uid and every guest account it uses), the statistics kept for each, and what
an audit found. Plain records; the store (tmemd/store.py) keeps them consistent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from tmemclient.wire.layout import FRAME_SIZE
from tmemd.memfiles import Loan, Mirror

if TYPE_CHECKING:
    from tmemd.store import Store
    from tmemd.zpool import ZPool

NIL: Final = -1


class StoreError(Exception):
    """Misuse of the store by the server (a bug on our side, not the guest's)."""


class Stats:
    """Counters kept per guest and per pool; the admin interface reads them."""

    __slots__ = ("evictions", "flushes", "gets_hit", "gets_miss", "puts_ok", "puts_refused")

    def __init__(self) -> None:
        self.puts_ok = 0
        self.puts_refused = 0
        self.gets_hit = 0
        self.gets_miss = 0
        self.flushes = 0
        self.evictions = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {
            "evictions": self.evictions,
            "flushes": self.flushes,
            "gets_hit": self.gets_hit,
            "gets_miss": self.gets_miss,
            "puts_ok": self.puts_ok,
            "puts_refused": self.puts_refused,
        }


class Tenant:
    """A uid and every guest account it uses: a cap here holds across all of its names."""

    __slots__ = ("cap_slots", "guests", "uid")

    def __init__(self, uid: int, cap_slots: int | None = None) -> None:
        self.uid = uid
        self.cap_slots = cap_slots
        self.guests: set[Guest] = set()

    @property
    def held_slots(self) -> int:
        """Slots billed to all of the tenant's guests."""
        return sum(g.held_slots for g in self.guests)

    @property
    def fixed_slots(self) -> int:
        """Slots that eviction cannot take: persistent pages and lent memory."""
        return sum(g.pers_slots + g.lent_slots for g in self.guests)

    def __repr__(self) -> str:
        return f"Tenant({self.uid})"


class Guest:
    """A tenant: its pools, its LRU list of ephemeral pages, what it holds, and its policy knobs."""

    __slots__ = (
        "_store",
        "cap_slots",
        "eph_slots",
        "frozen",
        "lent_slots",
        "loan",
        "lru_head",
        "lru_tail",
        "mirror",
        "name",
        "overdrawn",
        "pers_slots",
        "plru_head",
        "plru_tail",
        "pools",
        "stats",
        "tenant",
        "weight",
    )

    def __init__(self, store: Store, name: str, weight: int, cap_slots: int | None) -> None:
        self._store = store
        self.name = name
        self.weight = weight
        self.cap_slots = cap_slots
        self.frozen = False
        self.eph_slots = 0
        self.pers_slots = 0
        self.lru_head = NIL  # least recently used ephemeral page (head slot)
        self.lru_tail = NIL  # most recently used
        self.plru_head = NIL  # the same for its packed ephemeral pages (packed ids)
        self.plru_tail = NIL
        self.mirror: Mirror | None = None  # set by Store.map_guest
        self.loan: Loan | None = None  # set by Store.open_loan
        self.lent_slots = 0  # of the loan, the slots the guest may use now
        self.pools: set[Pool] = set()
        self.stats = Stats()
        self.tenant: Tenant | None = None  # set by Store.add_guest
        self.overdrawn = 0  # slots of memory found (and punched) beyond its grant, ever

    @property
    def oldest(self) -> int:
        """The least recently used ephemeral page: its head slot, or (packed, below NIL) its
        ``-2 - packed id`` (tmemd/packing.py); NIL if none. The older of the heads of the
        guest's two LRU lists, raw and packed pages."""
        head, pid = self.lru_head, self.plru_head
        if pid == NIL:
            return head
        if head == NIL or self._store._pstamp[pid] < self._store._stamp[head]:
            return -2 - pid
        return head

    @property
    def oldest_stamp(self) -> int | None:
        """Logical time of this guest's least recently used ephemeral page."""
        head, pid = self.lru_head, self.plru_head
        if pid == NIL:
            return None if head == NIL else self._store._stamp[head]
        stamp = self._store._pstamp[pid]
        return stamp if head == NIL else min(stamp, self._store._stamp[head])

    @property
    def newest_stamp(self) -> int | None:
        """Logical time of this guest's most recently used ephemeral page."""
        tail, pid = self.lru_tail, self.plru_tail
        if pid == NIL:
            return None if tail == NIL else self._store._stamp[tail]
        stamp = self._store._pstamp[pid]
        return stamp if tail == NIL else max(stamp, self._store._stamp[tail])

    @property
    def held_slots(self) -> int:
        """Slots billed to this guest: ephemeral and persistent pages, and lent memory."""
        return self.eph_slots + self.pers_slots + self.lent_slots

    def __repr__(self) -> str:
        return f"Guest({self.name!r})"


class Pool:
    """A pool of pages of one size, ephemeral or persistent, owned by (billed to) one guest."""

    __slots__ = (
        "dead",
        "guest",
        "key",
        "objects",
        "order",
        "pages",
        "persistent",
        "pool_id",
        "shared",
        "stats",
        "zpool",
    )

    def __init__(
        self, pool_id: int, guest: Guest, persistent: bool, order: int, shared: bool = False
    ) -> None:
        self.pool_id = pool_id
        self.guest = guest
        self.persistent = persistent
        self.shared = shared  # shared pools: get leaves the page; billed to a shared account
        self.order = order
        self.objects: dict[int, dict[int, int]] = {}
        self.pages = 0
        self.stats = Stats()
        self.dead = False  # destroyed: no request reaches it; its pages may still be freeing
        self.key = 0  # a named pool kept in the state directory (tmemd/persist.py), else 0
        self.zpool: ZPool | None = None  # its packed pages' objects (made on the first)

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return FRAME_SIZE << self.order

    def __repr__(self) -> str:
        kind = "persistent" if self.persistent else "ephemeral"
        return f"Pool({self.pool_id}, {kind}, order={self.order}, guest={self.guest.name!r})"


class Overdraft:
    """What one audit of a guest's files found: slots of memory it held beyond its grant
    (punched again) and whether that was so much that the guest must be closed."""

    __slots__ = ("close", "loan", "mirror")

    def __init__(self) -> None:
        self.mirror = 0
        self.loan = 0
        self.close = False

    def __bool__(self) -> bool:
        return bool(self.mirror or self.loan)
