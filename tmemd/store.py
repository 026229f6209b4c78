"""The page store: pure, synchronous, no trio and no sockets.

Memory layout. The arena is one anonymous mapping (MAP_NORESERVE, touched only as pages are
stored) cut into 4 KiB *slots*. A page of order k occupies 2**k slots, not necessarily adjacent,
so no size class can fragment the budget; its first slot (the *head*) names the page.

Per-page metadata lives in flat arrays indexed by head slot (pool, object id, index, LRU links,
last-use stamp). The only Python objects per page are the entry in its object's index dict and
the slot number it maps to, so metadata per page stays near a hundred bytes.

Index: pool -> object id -> {index: head slot}, as Xen's pool/object/radix-tree, so flushing an
object costs O(its pages), not O(pool).

Semantics (DESIGN.md §2): put replaces, a refused put of an existing handle flushes the old copy,
ephemeral private get is exclusive, persistent pages are never evicted. Slots freed when a pool
or guest goes are scrubbed (MADV_DONTNEED: the kernel zero-fills them on next touch) before any
other guest can be given them; slots taken by eviction are reused whole-page-overwritten by the
put that evicted them, so their old bytes are never readable either.

Mapped guests (``Store.map_guest``): the pages billed to such a guest live not in the arena but in
the guest's own *mirror*, a memfd the guest maps read-only, at the same slot numbers. Each page's
head slot has a generation word there, the store clock of the put that wrote it (0 while the slot
holds no page of this guest, or the page is being rewritten), and each slot of a bigger page links
to the next. A guest that was told (head, generation) by its put reads the page with no round
trip, and trusts what it copied only if the generation is the same before and after the copy
(PROTOCOL.md §4.7). A mirror holds only its own guest's bytes. A slot the guest no longer uses
keeps its memory in that file (so the guest's next page there costs no page fault) until the
slot is given to another owner: then it is punched out of the file (MADV_REMOVE), so memory in
all files together stays within what the arena alone would use.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Final

from tmemd.policy import ACTIVE_TICKS_PER_GUEST, DEFAULT_WEIGHT, MOVE_SLACK, choose_victim

SLOT_SHIFT: Final = 12
SLOT_SIZE: Final = 1 << SLOT_SHIFT
NIL: Final = -1
CTL_WORDS: Final = 3  # a mirror's control words: seq, lent slots, low slots (PROTOCOL.md §4.8)
LEND_IDLE: Final = 0.1  # seconds without use after which lent memory is taken back first
LOAN_SLACK_SLOTS: Final = 16  # a guest may hold this much beyond its loan before it is punched
_GROW: Final = 4096  # metadata arrays grow by this many slots at a time
_INTERNED_INDEXES: Final = 1 << 16  # page indexes below this share their int objects


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
        return {name: getattr(self, name) for name in self.__slots__}


def _each_run(slots: list[int], call: Callable[[int, int], object]) -> None:
    """``call(offset, length)`` for each run of adjacent slots (bytes; sorts ``slots``)."""
    if not slots:
        return
    slots.sort()
    start = prev = slots[0]
    for slot in [*slots[1:], None]:
        if slot is not None and slot == prev + 1:
            prev = slot
            continue
        call(start << SLOT_SHIFT, (prev - start + 1) << SLOT_SHIFT)
        if slot is not None:
            start = prev = slot


def _sealed_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A sparse memfd of ``size`` bytes (memory is used only where written), sealed against
    resizing so whoever else maps it can never fault, and the daemon's mapping of it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


class Mirror:
    """Where a mapped guest's pages live: a sealed memfd of ``slots`` slots of page data, then a
    u64 generation word and a u32 link per slot. The guest gets a read-only descriptor of it."""

    def __init__(self, slots: int, ident: int) -> None:
        self.ident = ident  # its number in Store._owner (0 is the arena)
        self.slots = slots
        self.gen_offset = slots << SLOT_SHIFT
        self.link_offset = self.gen_offset + 8 * slots
        self.ctl_offset = -(-(self.link_offset + 4 * slots) // SLOT_SIZE) * SLOT_SIZE
        self.size = self.ctl_offset + SLOT_SIZE  # then a page of control words (lent memory)
        self.fd, self._map = _sealed_memfd("tmem-mirror", self.size)
        view = memoryview(self._map)
        self.mem = view[: self.gen_offset]
        self.gen = view[self.gen_offset : self.link_offset].cast("Q")
        self.link = view[self.link_offset : self.link_offset + 4 * slots].cast("I")
        # Lent memory's state, for the guest to read (PROTOCOL.md §4.8): [seq, lent slots,
        # low slots]; seq is odd while a recall is under way.
        self.ctl = view[self.ctl_offset : self.ctl_offset + 8 * CTL_WORDS].cast("Q")
        self._view = view

    def read_only_fd(self) -> int:
        """A new descriptor of the mirror that can only be mapped for reading (the caller
        closes it once sent)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def punch(self, slots: list[int]) -> None:
        """Give the slots' memory back (adjacent slots in one call): whoever maps the file
        reads zeros there from now on."""
        _each_run(slots, lambda start, n: self._map.madvise(mmap.MADV_REMOVE, start, n))

    def close(self) -> None:
        """Free everything (the guest's own mapping may still hold the pages it touched)."""
        self._map.madvise(mmap.MADV_REMOVE, 0, self.size)
        for view in (self.mem, self.gen, self.link, self.ctl, self._view):
            view.release()
        self._map.close()
        os.close(self.fd)


class Loan:
    """Memory lent to a mapped guest to use as its own (PROTOCOL.md §4.8): a sealed memfd of a
    header page and then ``slots`` slots, which the guest maps read-write. The guest may use the
    first ``lent`` slots (its mirror's control words say how many); the daemon takes back any
    part above that at any time, by punching it out of the file. The header's first word is the
    guest's: the CLOCK_MONOTONIC nanoseconds of its last use, which tell a busy loan from an
    idle one."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.size = (slots + 1) << SLOT_SHIFT
        self.fd, self._map = _sealed_memfd("tmem-loan", self.size)  # the guest's writes fill it
        self._active = memoryview(self._map)[:8].cast("Q")

    @property
    def active_ns(self) -> int:
        """When the guest last used its lent memory (its own word; monotonic nanoseconds)."""
        return self._active[0]

    def mark_active(self, now_ns: int) -> None:
        """A request of the guest's is a use too."""
        if self._active[0] < now_ns:
            self._active[0] = now_ns

    def writable_fd(self) -> int:
        """A new read-write descriptor of the file, for the guest (closed by the caller once
        sent); the seals keep its size."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)

    def resident(self) -> int:
        """Bytes of memory the file holds now."""
        return os.fstat(self.fd).st_blocks * 512

    def punch_from(self, slot: int) -> None:
        """Take back every lent slot from ``slot`` on (the guest reads zeros there now)."""
        start = (slot + 1) << SLOT_SHIFT
        if start < self.size:
            self._map.madvise(mmap.MADV_REMOVE, start, self.size - start)

    def close(self) -> None:
        """Free everything (the guest's mapping keeps what it touched until it unmaps)."""
        self._map.madvise(mmap.MADV_REMOVE, 0, self.size)
        self._active.release()
        self._map.close()
        os.close(self.fd)


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
        "pers_slots",
        "pools",
        "stats",
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
        self.mirror: Mirror | None = None  # set by Store.map_guest
        self.loan: Loan | None = None  # set by Store.open_loan
        self.lent_slots = 0  # of the loan, the slots the guest may use now
        self.pools: set[Pool] = set()
        self.stats = Stats()

    @property
    def oldest_stamp(self) -> int | None:
        """Logical time of this guest's least recently used ephemeral page."""
        head = self.lru_head
        return None if head == NIL else self._store._stamp[head]

    @property
    def newest_stamp(self) -> int | None:
        """Logical time of this guest's most recently used ephemeral page."""
        tail = self.lru_tail
        return None if tail == NIL else self._store._stamp[tail]

    @property
    def held_slots(self) -> int:
        """Slots billed to this guest: ephemeral and persistent pages, and lent memory."""
        return self.eph_slots + self.pers_slots + self.lent_slots

    def __repr__(self) -> str:
        return f"Guest({self.name!r})"


class Pool:
    """A pool of pages of one size, ephemeral or persistent, owned by (billed to) one guest."""

    __slots__ = ("guest", "objects", "order", "pages", "persistent", "pool_id", "shared", "stats")

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

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return SLOT_SIZE << self.order

    def __repr__(self) -> str:
        kind = "persistent" if self.persistent else "ephemeral"
        return f"Pool({self.pool_id}, {kind}, order={self.order}, guest={self.guest.name!r})"


class Store:
    """Pages of every guest in one budget. Not thread-safe: one event loop drives it."""

    def __init__(
        self,
        budget: int,
        *,
        capacity: int | None = None,
        move_slack: float = MOVE_SLACK,
        lend_idle: float = LEND_IDLE,
        now_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        """``budget`` bytes may hold pages; ``capacity`` bytes of address space are reserved so
        the budget can later grow to it without moving pages (default: the budget).
        ``move_slack``: how much older another busy guest's page must be for a mapped guest's
        put to take it rather than the guest's own (policy.choose_victim; 0: the plain
        weighted LRU). ``lend_idle``: seconds a guest leaves its lent memory unused before it
        is taken back ahead of anything else (``now_ns``: the clock, CLOCK_MONOTONIC)."""
        if budget < SLOT_SIZE:
            raise ValueError(f"budget must be at least {SLOT_SIZE} bytes")
        self.move_slack = move_slack
        self.lend_idle = lend_idle
        self.now_ns = now_ns
        capacity = max(capacity or budget, budget)
        self.capacity_slots = capacity >> SLOT_SHIFT
        self.budget_slots = budget >> SLOT_SHIFT
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._arena = mmap.mmap(-1, self.capacity_slots << SLOT_SHIFT, flags=flags)
        self._mem = memoryview(self._arena)
        self.used_slots = 0
        self.clock = 0  # logical clock: one tick per page operation
        self.guests: dict[str, Guest] = {}
        self._next_pool_id = 1
        self._free: array[int] = array("i")  # stack of freed slots, reused first (warm memory)
        self._fresh = 0  # slots >= this were never used
        # Per-head-slot metadata; grown in steps of _GROW as _fresh rises.
        self._pool: list[Pool | None] = []
        self._oid: list[int] = []
        self._index = array("I")
        self._prev = array("i")
        self._next = array("i")
        self._stamp = array("Q")
        self._tails: dict[int, tuple[int, ...]] = {}  # head -> other slots of an order>0 page
        self._owner = array("H")  # per slot: whose memory holds it (a Mirror.ident; 0: arena)
        self._mirrors: dict[int, Mirror] = {}
        self._index_ints = list(range(_INTERNED_INDEXES))  # 2.3 MiB, once
        self.evictions = 0
        self.moved_slots = 0  # slots punched out of a mapped guest's file for another guest
        self.lenders: dict[str, Guest] = {}  # guests with lent memory (a Loan)
        self.recalled_slots = 0  # lent slots taken back without the guest asking

    # ---------------------------------------------------------------- guests and pools

    def add_guest(
        self, name: str, *, weight: int = DEFAULT_WEIGHT, cap: int | None = None
    ) -> Guest:
        """Register a guest by its unique name."""
        if name in self.guests:
            raise StoreError(f"guest {name!r} exists")
        guest = Guest(self, name, weight, None if cap is None else cap >> SLOT_SHIFT)
        self.guests[name] = guest
        return guest

    def remove_guest(self, guest: Guest) -> int:
        """Destroy every pool of the guest (scrubbing its memory); return pages freed."""
        freed = sum(self.destroy_pool(pool) for pool in list(guest.pools))
        self.close_loan(guest)
        self.guests.pop(guest.name, None)
        if guest.mirror is not None:
            del self._mirrors[guest.mirror.ident]  # its slots' owner numbers go stale: see _alloc
            guest.mirror.close()
            guest.mirror = None
        return freed

    def map_guest(self, guest: Guest) -> Mirror:
        """Keep the guest's pages from now on in a mirror it can map (created once; pages it
        already holds are not moved, so only an empty guest may be mapped)."""
        if guest.mirror is None:
            if guest.held_slots:
                raise StoreError(f"guest {guest.name!r} holds pages: map it before any put")
            ident = next((i for i in range(1, 1 << 16) if i not in self._mirrors), 0)
            if not ident:
                raise StoreError("65535 guests are mapped already")
            try:
                mirror = Mirror(self.capacity_slots, ident)
            except OSError as exc:  # no address space or memfds left: the guest does without
                raise StoreError(f"cannot make a mirror for {guest.name!r}: {exc}") from exc
            guest.mirror = self._mirrors[ident] = mirror
        return guest.mirror

    # ---------------------------------------------------------------- lent memory

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
        mirror.ctl[1] = mirror.ctl[2] = 0
        self.lenders[guest.name] = guest
        return guest.loan

    def close_loan(self, guest: Guest) -> None:
        """Take back all the guest's lent memory and close its file (its session ended)."""
        loan = guest.loan
        if loan is None:
            return
        self._recall(guest, 0, asked=True)
        self.lenders.pop(guest.name, None)
        guest.loan = None
        loan.close()

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
        if guest.frozen:  # an administrator froze it: it may give back, not grow
            want = min(want, guest.lent_slots)
        if guest.cap_slots is not None:
            want = min(want, max(0, guest.cap_slots - guest.eph_slots - guest.pers_slots))
        if want < guest.lent_slots:
            self._recall(guest, want, asked=True)
        elif want > guest.lent_slots:
            got = self._reclaim(guest, want - guest.lent_slots, now)
            guest.lent_slots += got
            self.used_slots += got
            mirror.ctl[1] = guest.lent_slots
        if loan.resident() > (guest.lent_slots + 1 + LOAN_SLACK_SLOTS) << SLOT_SHIFT:
            loan.punch_from(guest.lent_slots)  # written beyond its loan: not its memory
        ctl = mirror.ctl
        low = ctl[2]
        ctl[2] = guest.lent_slots
        room = self._room(guest, now)
        return {"lent": guest.lent_slots, "low": low, "seq": ctl[0], "room": room}

    def _idle(self, guest: Guest, now: int) -> bool:
        loan = guest.loan
        return loan is not None and now - loan.active_ns > self.lend_idle * 1e9

    def _shares(self, now: int, *needing: Guest) -> Callable[[Guest], int]:
        """Each guest's share of the budget, split by weight between the guests using lent
        memory now, the ``needing`` ones (asking for memory) and the guest itself. Made once per
        decision: O(guests)."""
        busy = {g.name for g in self.lenders.values() if not self._idle(g, now)}
        busy.update(g.name for g in needing)
        total = sum(self.guests[name].weight for name in busy)
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

        self._recall_idle(short, now, asker)
        while short() > 0:
            victim = choose_victim(self.guests.values(), self.clock)
            if victim is None:
                break
            self._evict(victim.lru_head)
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
            (g.loan.active_ns, g)
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

    def _recall(self, guest: Guest, keep: int, *, asked: bool = False) -> None:
        """Take the guest's lent memory down to ``keep`` slots: a seqlock write of its control
        words around the punch, so a guest reading lent memory meanwhile knows to drop it."""
        old = guest.lent_slots
        loan, mirror = guest.loan, guest.mirror
        if keep >= old or loan is None or mirror is None:
            return
        ctl = mirror.ctl
        ctl[0] += 1  # odd: under way
        ctl[1] = keep
        ctl[2] = min(ctl[2], keep)
        loan.punch_from(keep)
        ctl[0] += 1
        guest.lent_slots = keep
        self.used_slots -= old - keep
        if not asked:
            self.recalled_slots += old - keep

    def token(self, pool: Pool, oid: int, index: int) -> list[int] | None:
        """[head slot, generation] of a page of a mapped guest's pool, for a mapped read."""
        mirror = pool.guest.mirror
        head = self._lookup(pool, oid, index)
        if mirror is None or head == NIL:
            return None
        return [head, mirror.gen[head]]

    def touch_many(self, pool: Pool, heads: Sequence[int], gens: Sequence[int]) -> int:
        """Reads of ``pool``'s pages through its guest's mirror, as the guest reports them (the
        tokens [head slot, generation] it read): each page still there as it was read counts
        as a get hit and, if ephemeral, becomes the most recently used, as after a GET or a
        READ. Tokens of pages gone or changed since, or not of this pool, are ignored; returns
        how many counted."""
        mirror = pool.guest.mirror
        if mirror is None:
            return 0
        owners, gen, known = self._pool, mirror.gen, len(self._pool)
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

    def new_pool(self, guest: Guest, *, persistent: bool, order: int, shared: bool = False) -> Pool:
        """Create an empty pool billed to ``guest``."""
        if shared and persistent:
            raise StoreError("shared persistent pools are not supported")
        pool = Pool(self._next_pool_id, guest, persistent, order, shared)
        self._next_pool_id += 1
        guest.pools.add(pool)
        return pool

    def destroy_pool(self, pool: Pool) -> int:
        """Free every page of the pool and scrub the memory; return pages freed."""
        freed_slots: list[int] = []
        pages = 0
        for oid, pages_of_oid in list(pool.objects.items()):
            for index in list(pages_of_oid):
                freed_slots.extend(self._remove(pool, oid, index))
                pages += 1
        pool.guest.pools.discard(pool)
        self._scrub(freed_slots)
        return pages

    # ---------------------------------------------------------------- budget

    @property
    def budget(self) -> int:
        """Bytes pages may occupy."""
        return self.budget_slots << SLOT_SHIFT

    @property
    def used(self) -> int:
        """Bytes occupied by pages."""
        return self.used_slots << SLOT_SHIFT

    def set_budget(self, budget: int) -> int:
        """Change the budget at run time; evict ephemeral pages down to it at once. Persistent
        pages are never dropped: if they alone exceed the budget, new puts are refused until
        they fit. A smaller budget gives the memory of every free slot back to the kernel (an
        administrator shrinks it to hand memory to something else). Returns pages evicted."""
        if not SLOT_SIZE <= budget <= self.capacity:
            raise ValueError(f"budget must be between {SLOT_SIZE} and {self.capacity} bytes")
        shrinking = budget >> SLOT_SHIFT < self.budget_slots
        self.budget_slots = budget >> SLOT_SHIFT
        evicted = self._shrink_to(self.budget_slots)
        if shrinking:
            owners = self._owner
            self._give_back([(owners[slot], slot) for slot in self._free])
        return evicted

    def set_cap(self, guest: Guest, cap: int | None) -> int:
        """Change a guest's cap (bytes, None for no cap); evict its own ephemeral pages down to
        it at once. Returns pages evicted."""
        guest.cap_slots = None if cap is None else cap >> SLOT_SHIFT
        evicted = 0
        if guest.cap_slots is not None:
            while guest.held_slots > guest.cap_slots and guest.lru_head != NIL:
                self._evict(guest.lru_head)
                evicted += 1
            over = guest.held_slots - guest.cap_slots
            if over > 0:
                self._recall(guest, max(0, guest.lent_slots - over))
        return evicted

    def drop_ephemeral(self, guest: Guest) -> int:
        """Evict every ephemeral page billed to ``guest`` (an administrator's flush)."""
        evicted = 0
        while guest.lru_head != NIL:
            self._evict(guest.lru_head)
            evicted += 1
        return evicted

    def _shrink_to(self, slots: int) -> int:
        evicted = 0
        while self.used_slots > slots:
            victim = choose_victim(self.guests.values(), self.clock)
            if victim is None:
                break
            self._evict(victim.lru_head)
            evicted += 1
        # Then lent memory: idle guests' first, then the biggest loans.
        self._recall_idle(lambda: self.used_slots - slots, self.now_ns(), None)
        for g in sorted(self.lenders.values(), key=lambda g: -g.lent_slots):
            if self.used_slots <= slots:
                break
            self._recall(g, max(0, g.lent_slots - (self.used_slots - slots)))
        return evicted

    @property
    def capacity(self) -> int:
        """Bytes of address space reserved: the most the budget can grow to."""
        return self.capacity_slots << SLOT_SHIFT

    # ---------------------------------------------------------------- page operations

    def put(
        self, pool: Pool, oid: int, index: int, src: memoryview, *, frozen: bool = False
    ) -> bool:
        """Store ``src`` (exactly one page) at (oid, index); False if the daemon declines.

        ``frozen`` refuses on behalf of the putting guest when the pool is billed to another
        account (a shared pool). A refused put of an existing handle flushes the old copy, so
        stale data is never read.
        """
        ok = self._put(pool, oid, index, src, frozen)
        self._count_puts(pool, 1, ok)
        return ok

    def get(self, pool: Pool, oid: int, index: int, dst: memoryview) -> bool:
        """Copy the page into ``dst``; ephemeral pages of a private pool leave the store."""
        hit = self._get(pool, oid, index, dst)
        self._count_gets(pool, 1, hit)
        return hit

    def put_many(
        self,
        pool: Pool,
        oids: Sequence[int],
        idxs: Sequence[int],
        frames: Sequence[int],
        region: memoryview,
        *,
        frozen: bool = False,
    ) -> list[bool]:
        """``put`` of each (oid, index) from region frame ``frames[i]``, in order."""
        put = self._put
        size = SLOT_SIZE << pool.order
        flags = [
            put(pool, oid, index, region[f << SLOT_SHIFT : (f << SLOT_SHIFT) + size], frozen)
            for oid, index, f in zip(oids, idxs, frames, strict=True)
        ]
        self._count_puts(pool, len(flags), sum(flags))
        return flags

    def get_many(
        self,
        pool: Pool,
        oids: Sequence[int],
        idxs: Sequence[int],
        frames: Sequence[int],
        region: memoryview,
    ) -> list[bool]:
        """``get`` of each (oid, index) into region frame ``frames[i]``, in order."""
        get = self._get
        size = SLOT_SIZE << pool.order
        flags = [
            get(pool, oid, index, region[f << SLOT_SHIFT : (f << SLOT_SHIFT) + size])
            for oid, index, f in zip(oids, idxs, frames, strict=True)
        ]
        self._count_gets(pool, len(flags), sum(flags))
        return flags

    @staticmethod
    def _count_puts(pool: Pool, n: int, ok: int) -> None:
        # Counted once per request, not per page: the counters sit off the per-page path.
        ps, gs = pool.stats, pool.guest.stats
        if ok:
            ps.puts_ok += ok
            gs.puts_ok += ok
        if ok != n:
            ps.puts_refused += n - ok
            gs.puts_refused += n - ok

    @staticmethod
    def _count_gets(pool: Pool, n: int, hits: int) -> None:
        ps, gs = pool.stats, pool.guest.stats
        if hits:
            ps.gets_hit += hits
            gs.gets_hit += hits
        if hits != n:
            ps.gets_miss += n - hits
            gs.gets_miss += n - hits

    def _put(self, pool: Pool, oid: int, index: int, src: memoryview, frozen: bool) -> bool:
        self.clock += 1
        guest = pool.guest
        pages_of_oid = pool.objects.get(oid)
        head = NIL if pages_of_oid is None else pages_of_oid.get(index, NIL)
        if frozen or guest.frozen:
            return self._refuse(pool, oid, index, head)
        order = pool.order
        mirror = guest.mirror
        mem = self._mem_of(guest)
        if head != NIL:
            if mirror is not None:
                mirror.gen[head] = 0  # being rewritten: a mapped read of it now fails
            if order:
                self._copy_in(mem, head, order, src)
            else:
                off = head << SLOT_SHIFT
                mem[off : off + SLOT_SIZE] = src
            if mirror is not None:
                mirror.gen[head] = self.clock
            if not pool.persistent:
                self._touch(guest, head)
            return True
        need = 1 << order
        if not self._make_room(guest, need, pool.persistent):
            return self._refuse(pool, oid, index, NIL)
        head = self._alloc(need, order, 0 if mirror is None else mirror.ident)
        self._copy_in(mem, head, order, src)
        if mirror is not None:
            if order:
                slots = self._slots_of(head, order)
                for slot, after in pairwise(slots):
                    mirror.link[slot] = after
            mirror.gen[head] = self.clock  # last: the page is whole before it can be read
        # Re-fetch: making room may have evicted this object's last page and dropped its dict.
        pages_of_oid = pool.objects.get(oid)
        if pages_of_oid is None:
            pages_of_oid = pool.objects[oid] = {}
        # Share one int object per small index across every object and pool: each stored
        # page then carries no key object of its own (28 bytes fewer per page).
        ints = self._index_ints
        pages_of_oid[ints[index] if index < _INTERNED_INDEXES else index] = head
        self._pool[head] = pool
        self._oid[head] = oid
        self._index[head] = index
        pool.pages += 1
        if pool.persistent:
            guest.pers_slots += need
        else:
            guest.eph_slots += need
            self._lru_append(guest, head)
        return True

    def _get(self, pool: Pool, oid: int, index: int, dst: memoryview) -> bool:
        self.clock += 1
        pages_of_oid = pool.objects.get(oid)
        head = NIL if pages_of_oid is None else pages_of_oid.get(index, NIL)
        if head == NIL:
            return False
        mem = self._mem_of(pool.guest)
        if pool.order:
            self._copy_out(mem, head, pool.order, dst)
        else:
            off = head << SLOT_SHIFT
            dst[:] = mem[off : off + SLOT_SIZE]
        if pool.shared:
            self._touch(pool.guest, head)  # other members may still want it
        elif not pool.persistent:
            # Exclusive get: the guest now holds the only copy.
            self._release(self._remove(pool, oid, index))
        return True

    def flush(self, pool: Pool, oid: int, index: int) -> bool:
        """Remove one page; idempotent. True if it was there."""
        self.clock += 1
        pool.stats.flushes += 1
        pool.guest.stats.flushes += 1
        if self._lookup(pool, oid, index) == NIL:
            return False
        self._release(self._remove(pool, oid, index))
        return True

    def flush_object(self, pool: Pool, oid: int) -> int:
        """Remove every page of one object; return how many."""
        self.clock += 1
        pool.stats.flushes += 1
        pool.guest.stats.flushes += 1
        pages_of_oid = pool.objects.get(oid)
        if not pages_of_oid:
            return 0
        count = 0
        for index in list(pages_of_oid):
            self._release(self._remove(pool, oid, index))
            count += 1
        return count

    def read(self, pool: Pool, oid: int, index: int, offset: int, dst: memoryview) -> bool:
        """Copy ``len(dst)`` bytes from ``offset`` in the page; the page stays."""
        head = self._sub_page(pool, oid, index, offset, len(dst))
        if head == NIL:
            return False
        for start, chunk in self._spans(pool, head, offset, len(dst)):
            dst[start : start + len(chunk)] = chunk
        return True

    def write(self, pool: Pool, oid: int, index: int, offset: int, src: memoryview) -> bool:
        """Overwrite ``len(src)`` bytes at ``offset`` of an existing page (of a mapped guest:
        mapped reads of the page fail from now on; GET and READ still find it)."""
        head = self._sub_page(pool, oid, index, offset, len(src), changes=True)
        if head == NIL:
            return False
        for start, chunk in self._spans(pool, head, offset, len(src)):
            chunk[:] = src[start : start + len(chunk)]
        return True

    def xchg(self, pool: Pool, oid: int, index: int, offset: int, buf: memoryview) -> bool:
        """Atomically swap ``buf`` with the page bytes at ``offset``: the page gets buf's old
        contents and buf gets the page's."""
        head = self._sub_page(pool, oid, index, offset, len(buf), changes=True)
        if head == NIL:
            return False
        for start, chunk in self._spans(pool, head, offset, len(buf)):
            old = bytes(chunk)
            chunk[:] = buf[start : start + len(chunk)]
            buf[start : start + len(chunk)] = old
        return True

    def page_slots(self, pool: Pool, oid: int, index: int) -> int | None:
        """The head slot of a page, or None (for tests and introspection)."""
        head = self._lookup(pool, oid, index)
        return None if head == NIL else head

    # ---------------------------------------------------------------- internals

    def _lookup(self, pool: Pool, oid: int, index: int) -> int:
        pages_of_oid = pool.objects.get(oid)
        if pages_of_oid is None:
            return NIL
        return pages_of_oid.get(index, NIL)

    def _sub_page(
        self, pool: Pool, oid: int, index: int, offset: int, length: int, changes: bool = False
    ) -> int:
        if offset < 0 or length < 0 or offset + length > pool.page_size:
            raise StoreError("sub-page range outside the page")
        self.clock += 1
        head = self._lookup(pool, oid, index)
        mirror = pool.guest.mirror
        if changes and head != NIL and mirror is not None:
            mirror.gen[head] = 0  # changed in place: no mapped read may trust it again
        if head != NIL and not pool.persistent:
            self._touch(pool.guest, head)
        return head

    def _refuse(self, pool: Pool, oid: int, index: int, head: int) -> bool:
        if head != NIL:
            self._release(self._remove(pool, oid, index))
        return False

    def _make_room(self, guest: Guest, need: int, persistent: bool) -> bool:
        """Evict ephemeral pages until ``need`` slots fit the budget and the guest's cap."""
        cap = guest.cap_slots
        if cap is not None:
            if guest.pers_slots + guest.lent_slots + need > cap:
                return False
            while guest.held_slots + need > cap:
                if guest.lru_head == NIL:  # pragma: no cover - implied by the check above
                    return False
                self._evict(guest.lru_head)
        if need > self.budget_slots:
            return False
        lent = bool(self.lenders)  # lent memory to take back first, as long as some is found
        while self.used_slots + need > self.budget_slots:
            if lent and self._recall_for_put(guest, need):
                continue
            lent = False
            # A mapped guest's own page rather than another busy guest's nearly as old one:
            # that would move memory between their files (policy.py).
            victim = choose_victim(
                self.guests.values(),
                self.clock,
                mover=guest if guest.mirror is not None else None,
                slack=self.move_slack,
                active=ACTIVE_TICKS_PER_GUEST * len(self.guests),
            )
            if victim is None:
                return False
            self._evict(victim.lru_head)
        return True

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

    def _evict(self, head: int) -> None:
        pool = self._pool[head]
        assert pool is not None
        pool.stats.evictions += 1
        pool.guest.stats.evictions += 1
        self.evictions += 1
        self._release(self._remove(pool, self._oid[head], self._index[head]))

    def _remove(self, pool: Pool, oid: int, index: int) -> list[int]:
        """Unlink a page from index, LRU and accounting; return its slots (not yet free)."""
        pages_of_oid = pool.objects[oid]
        head = pages_of_oid.pop(index)
        if not pages_of_oid:
            del pool.objects[oid]
        pool.pages -= 1
        guest = pool.guest
        n = 1 << pool.order
        if pool.persistent:
            guest.pers_slots -= n
        else:
            guest.eph_slots -= n
            self._lru_unlink(guest, head)
        self._pool[head] = None
        self._oid[head] = 0
        slots = [head]
        if pool.order:
            slots.extend(self._tails.pop(head))
        if guest.mirror is not None:
            guest.mirror.gen[head] = 0  # its memory stays the guest's until _alloc moves it
        return slots

    def _release(self, slots: list[int]) -> None:
        self.used_slots -= len(slots)
        self._free.extend(slots)

    def _scrub(self, slots: list[int]) -> None:
        """Zero and give back to the kernel, wherever the slots' memory is (arena or a
        mirror), coalescing adjacent slots into one call."""
        self._give_back([(self._owner[slot], slot) for slot in slots])
        self._release(slots)

    def _give_back(self, held: list[tuple[int, int]]) -> None:
        """Free the memory of (owner, slot) pairs: arena slots are zeroed (MADV_DONTNEED), a
        mirror's punched out of its file."""
        by_owner: dict[int, list[int]] = {}
        for owner, slot in held:
            by_owner.setdefault(owner, []).append(slot)
        for owner, slots in by_owner.items():
            if not owner:
                _each_run(slots, self._zero_arena)
            elif (mirror := self._mirrors.get(owner)) is not None:
                mirror.punch(slots)
            # else: that mirror is closed and all its memory gone (a reused number is
            # harmless too: a free slot holds no page of anyone's, so punching it loses none)

    def _zero_arena(self, start: int, length: int) -> None:
        self._arena.madvise(mmap.MADV_DONTNEED, start, length)

    def _alloc(self, need: int, order: int, owner: int) -> int:
        slots = [self._alloc_slot() for _ in range(need)]
        self.used_slots += need
        owners = self._owner
        moved = [(owners[slot], slot) for slot in slots if owners[slot] != owner]
        if moved:
            # The slots' memory is in another file (or the arena): free it there, so the
            # memory of all files stays that of the slots in use.
            self.moved_slots += sum(1 for old, _ in moved if old)
            self._give_back(moved)
            for _, slot in moved:
                owners[slot] = owner
        if order:
            self._tails[slots[0]] = tuple(slots[1:])
        return slots[0]

    def _alloc_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._fresh
        if slot >= self.capacity_slots:  # pragma: no cover - used_slots <= budget <= capacity
            raise StoreError("arena exhausted")
        self._fresh += 1
        if slot >= len(self._index):
            grow = min(_GROW, self.capacity_slots - len(self._index))
            self._pool.extend([None] * grow)
            self._oid.extend([0] * grow)
            self._index.extend([0] * grow)
            self._prev.extend([NIL] * grow)
            self._next.extend([NIL] * grow)
            self._stamp.extend([0] * grow)
            self._owner.extend([0] * grow)
        return slot

    def _mem_of(self, guest: Guest) -> memoryview:
        """Where the guest's pages live: its mirror, or the arena."""
        return self._mem if guest.mirror is None else guest.mirror.mem

    def _slots_of(self, head: int, order: int) -> tuple[int, ...]:
        return (head, *self._tails[head]) if order else (head,)

    def _copy_in(self, mem: memoryview, head: int, order: int, src: memoryview) -> None:
        if not order:
            off = head << SLOT_SHIFT
            mem[off : off + SLOT_SIZE] = src
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << SLOT_SHIFT
            mem[off : off + SLOT_SIZE] = src[i << SLOT_SHIFT : (i + 1) << SLOT_SHIFT]

    def _copy_out(self, mem: memoryview, head: int, order: int, dst: memoryview) -> None:
        if not order:
            off = head << SLOT_SHIFT
            dst[:] = mem[off : off + SLOT_SIZE]
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << SLOT_SHIFT
            dst[i << SLOT_SHIFT : (i + 1) << SLOT_SHIFT] = mem[off : off + SLOT_SIZE]

    def _spans(
        self, pool: Pool, head: int, offset: int, length: int
    ) -> Iterator[tuple[int, memoryview]]:
        """(position in the caller's buffer, arena view) for a byte range of a page."""
        mem = self._mem_of(pool.guest)
        slots = self._slots_of(head, pool.order)
        pos = 0
        while pos < length:
            page_off = offset + pos
            slot = slots[page_off >> SLOT_SHIFT]
            in_slot = page_off & (SLOT_SIZE - 1)
            n = min(SLOT_SIZE - in_slot, length - pos)
            base = (slot << SLOT_SHIFT) + in_slot
            yield pos, mem[base : base + n]
            pos += n

    # LRU lists: doubly linked through _prev/_next, head = least recently used.

    def _lru_append(self, guest: Guest, slot: int) -> None:
        self._stamp[slot] = self.clock
        tail = guest.lru_tail
        self._prev[slot] = tail
        self._next[slot] = NIL
        if tail == NIL:
            guest.lru_head = slot
        else:
            self._next[tail] = slot
        guest.lru_tail = slot

    def _lru_unlink(self, guest: Guest, slot: int) -> None:
        prev, nxt = self._prev[slot], self._next[slot]
        if prev == NIL:
            guest.lru_head = nxt
        else:
            self._next[prev] = nxt
        if nxt == NIL:
            guest.lru_tail = prev
        else:
            self._prev[nxt] = prev

    def _touch(self, guest: Guest, slot: int) -> None:
        if guest.lru_tail != slot:
            self._lru_unlink(guest, slot)
            self._lru_append(guest, slot)
        else:
            self._stamp[slot] = self.clock

    def close(self) -> None:
        """Release the arena and the mirrors (the store is unusable afterwards)."""
        for guest in self.guests.values():
            guest.mirror = None
        for mirror in self._mirrors.values():
            mirror.close()
        self._mirrors.clear()
        self._mem.release()
        self._arena.close()
