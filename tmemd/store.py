"""The page store: pure, synchronous, no trio and no sockets.

Memory layout. The arena is one sealed memfd (sparse: memory comes in only as pages are stored)
cut into 4 KiB *slots*. A page of order k occupies 2**k slots, not necessarily adjacent, so no
size class can fragment the budget; its first slot (the *head*) names the page.

Per-page metadata lives in flat arrays indexed by head slot (pool, object id, index, LRU links,
last-use stamp, generation, owner). The only Python objects per page are the entry in its
object's index dict and the slot number it maps to, so metadata per page stays near a hundred
bytes.

Index: pool -> object id -> {index: head slot}, as Xen's pool/object/radix-tree, so flushing an
object costs O(its pages), not O(pool).

Semantics (DESIGN.md §2): put replaces, a refused put of an existing handle flushes the old copy,
ephemeral private get is exclusive, persistent pages are never evicted. Slots freed when a pool
or guest goes are scrubbed (punched out of their file: the kernel zero-fills them on next touch)
before any other guest can be given them; slots taken by eviction are reused
whole-page-overwritten by the put that evicted them, so their old bytes are never readable either.

Mapped guests (``Store.map_guest``): the pages billed to such a guest live not in the arena but in
the guest's own *mirror*, a memfd the guest maps read-only, at the same slot numbers. Each page's
head slot has a generation word there, the store clock of the put that wrote it (0 while the slot
holds no page of this guest, or the page is being rewritten), and each slot of a bigger page links
to the next. A guest that was told (head, generation) by its put reads the page with no round
trip, and trusts what it copied only if the generation is the same before and after the copy
(PROTOCOL.md §4.7). A mirror holds only its own guest's bytes. A slot the guest no longer uses
keeps its memory in that file (so the guest's next page there costs no page fault) until the
slot is given to another owner: then it is punched out of the file, so memory in all files
together stays within what the arena alone would use.

Trust boundary (tmemd/memfiles.py): every file a guest can map is guest-writable. The store
reads nothing back from one but a loan's ACTIVE claim: generations live in ``_gen``, the lent
memory control words in the Mirror object, and both are only written out. What a guest brings
into its files on its own is measured and punched again by ``audit``.

Heavy work. A put, a get or a flush touches O(1) pages; freeing a pool, a guest or a big loan
touches all of theirs. With ``deferred`` on (the daemon sets it), such work is queued instead of
done in the caller's turn: ``reap`` frees dying pools' pages a bounded number at a time, and
``later_work`` hands out large punches to run in a worker thread. Slots being scrubbed stay
counted in ``used_slots`` until their punch is done, so they cannot be reused under it. With
``deferred`` off (the default, and what the unit tests use) everything happens at once.
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Final

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.memfiles import Loan, MemFile, Mirror, data_extents
from tmemd.policy import ACTIVE_TICKS_PER_GUEST, DEFAULT_WEIGHT, MOVE_SLACK, choose_victim

__all__ = [
    "NIL",
    "Guest",
    "Loan",
    "Mirror",
    "Pool",
    "Stats",
    "Store",
    "StoreError",
    "Tenant",
]

NIL: Final = -1
LEND_IDLE: Final = 0.1  # seconds without use after which lent memory is taken back first
LOAN_SLACK_SLOTS: Final = 16  # a guest may hold this much beyond its loan before it is punched
MIRROR_SLACK_SLOTS: Final = 64  # ...and this much of its mirror beyond its own slots
OVERDRAW_CLOSE_SLOTS: Final = 256  # one audit finding this much more: the guest is closed
AUDIT_SLOTS: Final = 4096  # pages of a file one audit step looks at (and punches), at most
BIG_PUNCH: Final = 4 << 20  # bytes: a punch at least this big runs later, off the event loop
REAP_INLINE: Final = 256  # pages: a pool at most this big is freed at once even when deferred
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


def _runs(slots: list[int]) -> list[tuple[int, int]]:
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
        self.mirror: Mirror | None = None  # set by Store.map_guest
        self.loan: Loan | None = None  # set by Store.open_loan
        self.lent_slots = 0  # of the loan, the slots the guest may use now
        self.pools: set[Pool] = set()
        self.stats = Stats()
        self.tenant: Tenant | None = None  # set by Store.add_guest
        self.overdrawn = 0  # slots of memory found (and punched) beyond its grant, ever

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

    __slots__ = (
        "dead",
        "guest",
        "objects",
        "order",
        "pages",
        "persistent",
        "pool_id",
        "shared",
        "stats",
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
        deferred: bool = False,
    ) -> None:
        """``budget`` bytes may hold pages; ``capacity`` bytes of address space are reserved so
        the budget can later grow to it without moving pages (default: the budget).
        ``move_slack``: how much older another busy guest's page must be for a mapped guest's
        put to take it rather than the guest's own (policy.choose_victim; 0: the plain
        weighted LRU). ``lend_idle``: seconds a guest leaves its lent memory unused before it
        is taken back ahead of anything else (``now_ns``: the clock, CLOCK_MONOTONIC).
        ``deferred``: queue heavy work for ``reap`` and ``later_work`` (module docstring)."""
        if budget < FRAME_SIZE:
            raise ValueError(f"budget must be at least {FRAME_SIZE} bytes")
        self.move_slack = move_slack
        self.lend_idle = lend_idle
        self.now_ns = now_ns
        self.deferred = deferred
        capacity = max(capacity or budget, budget)
        self.capacity_slots = capacity >> FRAME_SHIFT
        self.budget_slots = budget >> FRAME_SHIFT
        self.arena = MemFile("tmem-arena", self.capacity_slots << FRAME_SHIFT)
        self._mem = self.arena.view
        self.used_slots = 0
        self.clock = 0  # logical clock: one tick per page operation
        self.guests: dict[str, Guest] = {}
        self.tenants: dict[int, Tenant] = {}
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
        # The generation of a mapped guest's page, as its mirror shows it: kept here, because
        # the guest can write its mirror and we must never trust what we read back there.
        self._gen = array("Q")
        self._tails: dict[int, array[int]] = {}  # head -> other slots of an order>0 page
        self._owner = array("I")  # per slot: whose file holds its memory (Mirror.ident; 0: arena)
        self._mirrors: dict[int, Mirror] = {}
        self._next_ident = 1  # never reused: a stale owner number names no live mirror
        self._index_ints = list(range(_INTERNED_INDEXES))  # 2.3 MiB, once
        self.evictions = 0
        self.moved_slots = 0  # slots punched out of a mapped guest's file for another guest
        self.lenders: dict[str, Guest] = {}  # guests with lent memory (a Loan)
        self.recalled_slots = 0  # lent slots taken back without the guest asking
        self.punch_failures = 0  # punches the kernel refused (that memory simply stayed)
        self.overdrawn_slots = 0  # memory found in guests' files beyond their grant, punched
        self._dying: deque[Pool] = deque()  # destroyed pools whose pages are still freeing
        self._later: deque[Later] = deque()  # large punches waiting for a worker thread
        self._put_head = NIL  # head slot of the page the last successful put stored

    # ---------------------------------------------------------------- guests and pools

    def add_guest(
        self,
        name: str,
        *,
        weight: int = DEFAULT_WEIGHT,
        cap: int | None = None,
        tenant: Tenant | None = None,
    ) -> Guest:
        """Register a guest by its unique name (``tenant``: the uid account it counts in)."""
        if name in self.guests:
            raise StoreError(f"guest {name!r} exists")
        guest = Guest(self, name, weight, None if cap is None else cap >> FRAME_SHIFT)
        if tenant is not None:
            guest.tenant = tenant
            tenant.guests.add(guest)
        self.guests[name] = guest
        return guest

    def tenant(self, uid: int) -> Tenant:
        """The account of uid ``uid`` (made on first use)."""
        tenant = self.tenants.get(uid)
        if tenant is None:
            tenant = self.tenants[uid] = Tenant(uid)
        return tenant

    def remove_guest(self, guest: Guest) -> int:
        """Destroy every pool of the guest (scrubbing its memory), take back its lent memory and
        close its files; return pages freed (or being freed, when deferred)."""
        self.close_loan(guest)
        mirror = guest.mirror
        if mirror is not None:
            # Its pages die with it: nobody reads them again, so the whole file is punched at
            # once rather than slot by slot, and its slots are freed without punching.
            guest.mirror = None
            del self._mirrors[mirror.ident]
            self._close_file(mirror)
        freed = sum(self.destroy_pool(pool) for pool in list(guest.pools))
        self.guests.pop(guest.name, None)
        tenant = guest.tenant
        if tenant is not None:
            guest.tenant = None
            tenant.guests.discard(guest)
            if not tenant.guests:
                self.tenants.pop(tenant.uid, None)
        return freed

    def map_guest(self, guest: Guest) -> Mirror:
        """Keep the guest's pages from now on in a mirror it can map (created once; pages it
        already holds are not moved, so only an empty guest may be mapped)."""
        if guest.mirror is None:
            if guest.held_slots:
                raise StoreError(f"guest {guest.name!r} holds pages: map it before any put")
            ident = self._next_ident
            if ident >= 1 << 32:  # pragma: no cover - four billion mapped guests
                raise StoreError("out of mirror numbers")
            try:
                mirror = Mirror(self.capacity_slots, ident)
            except OSError as exc:  # no address space or memfds left: the guest does without
                raise StoreError(f"cannot make a mirror for {guest.name!r}: {exc}") from exc
            self._next_ident += 1
            guest.mirror = self._mirrors[ident] = mirror
        return guest.mirror

    def new_pool(self, guest: Guest, *, persistent: bool, order: int, shared: bool = False) -> Pool:
        """Create an empty pool billed to ``guest``."""
        if shared and persistent:
            raise StoreError("shared persistent pools are not supported")
        pool = Pool(self._next_pool_id, guest, persistent, order, shared)
        self._next_pool_id += 1
        guest.pools.add(pool)
        return pool

    def destroy_pool(self, pool: Pool) -> int:
        """Free every page of the pool and scrub the memory; return pages freed. With
        ``deferred``, a big pool is only marked dead here and freed by ``reap``."""
        pool.dead = True
        pool.guest.pools.discard(pool)
        pages = pool.pages
        if self.deferred and pages > REAP_INLINE:
            self._dying.append(pool)
        else:
            self._free_pages(pool, pages)
        return pages

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

    # ---------------------------------------------------------------- heavy work, deferred

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

    # ---------------------------------------------------------------- the trust boundary

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
        for start, length in _runs(stray):
            self._count_punch(mirror.punch(start, length))
        return len(stray)

    def _count_punch(self, ok: bool) -> None:
        if not ok:
            self.punch_failures += 1

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

    # ---------------------------------------------------------------- budget

    @property
    def budget(self) -> int:
        """Bytes pages may occupy."""
        return self.budget_slots << FRAME_SHIFT

    @property
    def used(self) -> int:
        """Bytes occupied by pages."""
        return self.used_slots << FRAME_SHIFT

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
            while guest.held_slots > guest.cap_slots and guest.lru_head != NIL:
                self._evict(guest.lru_head)
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
                self._evict(victim.lru_head)
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
        while guest.lru_head != NIL:
            self._evict(guest.lru_head)
            evicted += 1
        return evicted

    def _shrink_to(self, slots: int) -> int:
        self.reap(self.used_slots)  # dying pools first: their pages are gone already
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
        return self.capacity_slots << FRAME_SHIFT

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
        tokens: bool = False,
    ) -> list[bool] | list[list[int] | bool]:
        """``put`` of each (oid, index) from region frame ``frames[i]``, in order. With
        ``tokens`` (a mapped guest's pool), each stored page's result is its token [head slot,
        generation] as the put left it, even if a later entry of the batch evicted it (then
        the token simply no longer reads: a mapped read of it misses)."""
        put = self._put
        size = FRAME_SIZE << pool.order
        if not tokens or pool.guest.mirror is None:
            flags = [
                put(pool, oid, index, region[f << FRAME_SHIFT : (f << FRAME_SHIFT) + size], frozen)
                for oid, index, f in zip(oids, idxs, frames, strict=True)
            ]
            self._count_puts(pool, len(flags), sum(flags))
            return flags
        gen = self._gen
        results: list[list[int] | bool] = []
        stored = 0
        for oid, index, f in zip(oids, idxs, frames, strict=True):
            if put(pool, oid, index, region[f << FRAME_SHIFT : (f << FRAME_SHIFT) + size], frozen):
                head = self._put_head
                results.append([head, gen[head]])
                stored += 1
            else:
                results.append(False)
        self._count_puts(pool, len(results), stored)
        return results

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
        size = FRAME_SIZE << pool.order
        flags = [
            get(pool, oid, index, region[f << FRAME_SHIFT : (f << FRAME_SHIFT) + size])
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
                off = head << FRAME_SHIFT
                mem[off : off + FRAME_SIZE] = src
            if mirror is not None:
                mirror.gen[head] = self._gen[head] = self.clock
            if not pool.persistent:
                self._touch(guest, head)
            self._put_head = head
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
            # Last: the page is whole before it can be read.
            mirror.gen[head] = self._gen[head] = self.clock
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
        self._put_head = head
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
            off = head << FRAME_SHIFT
            dst[:] = mem[off : off + FRAME_SIZE]
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

    def flush_object(
        self, pool: Pool, oid: int, limit: int | None = None, *, counted: bool = True
    ) -> int:
        """Remove every page of one object (or at most ``limit`` of them: call again, with
        ``counted=False``, until it returns fewer); return how many."""
        self.clock += 1
        if counted:
            pool.stats.flushes += 1
            pool.guest.stats.flushes += 1
        pages_of_oid = pool.objects.get(oid)
        if not pages_of_oid:
            return 0
        count = 0
        while pages_of_oid and (limit is None or count < limit):
            _, head = pages_of_oid.popitem()
            self._release(self._unlink(pool, head))
            count += 1
        if not pages_of_oid:
            del pool.objects[oid]
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
            # Changed in place: no mapped read may trust it again.
            mirror.gen[head] = self._gen[head] = 0
        if head != NIL and not pool.persistent:
            self._touch(pool.guest, head)
        return head

    def _refuse(self, pool: Pool, oid: int, index: int, head: int) -> bool:
        if head != NIL:
            self._release(self._remove(pool, oid, index))
        return False

    def _make_room(self, guest: Guest, need: int, persistent: bool) -> bool:
        """Evict ephemeral pages until ``need`` slots fit the budget, the guest's cap and its
        tenant's cap."""
        cap = guest.cap_slots
        if cap is not None:
            if guest.pers_slots + guest.lent_slots + need > cap:
                return False
            while guest.held_slots + need > cap:
                if guest.lru_head == NIL:  # pragma: no cover - implied by the check above
                    return False
                self._evict(guest.lru_head)
        tenant = guest.tenant
        if tenant is not None and tenant.cap_slots is not None:
            if tenant.fixed_slots + need > tenant.cap_slots:
                return False
            while tenant.held_slots + need > tenant.cap_slots:
                victim = choose_victim(tenant.guests, self.clock)
                if victim is None:  # pragma: no cover - implied by the check above
                    return False
                self._evict(victim.lru_head)
        if need > self.budget_slots:
            return False
        if self.used_slots + need > self.budget_slots:
            self._reap_for(lambda: self.used_slots + need - self.budget_slots)
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

    def _reap_for(self, short: Callable[[], int]) -> None:
        """Free dying pools' pages while ``short()`` slots are missing: they are gone already,
        and must not cost anyone a live page."""
        while self._dying and (missing := short()) > 0:
            self.reap(missing)

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
        return self._unlink(pool, head)

    def _unlink(self, pool: Pool, head: int) -> list[int]:
        """A page already out of its pool's index: out of the LRU and the accounting; return
        its slots (not yet free)."""
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
        self._gen[head] = 0
        return slots

    def _release(self, slots: list[int]) -> None:
        self.used_slots -= len(slots)
        self._free.extend(slots)

    def _scrub(self, slots: list[int]) -> None:
        """Zero and give back to the kernel, wherever the slots' memory is (arena or a
        mirror), coalescing adjacent slots; then free the slots. A large scrub (deferred) keeps
        the slots in use until its punch is done, so nothing new can be written under it."""
        if not slots:
            return
        by_file: dict[int, list[int]] = {}
        for slot in slots:
            by_file.setdefault(self._owner[slot], []).append(slot)
        pending = [len(by_file)]

        def release() -> None:
            pending[0] -= 1
            if not pending[0]:
                self._release(slots)

        for owner, owned in by_file.items():
            file = self.arena if not owner else self._mirrors.get(owner)
            if file is None:  # that mirror is closed: its whole file was punched
                release()
                continue
            self._punch_later(file, _runs(owned), release)

    def _give_back(self, held: list[tuple[int, int]]) -> None:
        """Free the memory of (owner, slot) pairs now: in the arena, or punched out of a
        mirror's file."""
        by_owner: dict[int, list[int]] = {}
        for owner, slot in held:
            by_owner.setdefault(owner, []).append(slot)
        for owner, slots in by_owner.items():
            file = self.arena if not owner else self._mirrors.get(owner)
            if file is not None:  # else: that mirror is closed and all its memory gone
                for start, length in _runs(slots):
                    self._count_punch(file.punch(start, length))

    def _alloc(self, need: int, order: int, owner: int) -> int:
        slots = [self._alloc_slot() for _ in range(need)]
        self.used_slots += need
        owners = self._owner
        moved = [(owners[slot], slot) for slot in slots if owners[slot] != owner]
        if moved:
            # The slots' memory is in another file (or the arena): free it there, so the
            # memory of all files stays that of the slots in use.
            mirrors = self._mirrors
            for old, slot in moved:
                if old:
                    self.moved_slots += 1
                    was = mirrors.get(old)
                    if was is not None:
                        was.owned -= 1
                owners[slot] = owner
            if owner:
                self._mirrors[owner].owned += len(moved)
            self._give_back(moved)
        if order:
            self._tails[slots[0]] = array("i", slots[1:])  # 4 bytes a slot, no int objects
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
            self._gen.extend([0] * grow)
            self._owner.extend([0] * grow)
        return slot

    def _mem_of(self, guest: Guest) -> memoryview:
        """Where the guest's pages live: its mirror, or the arena."""
        return self._mem if guest.mirror is None else guest.mirror.mem

    def _slots_of(self, head: int, order: int) -> tuple[int, ...]:
        return (head, *self._tails[head]) if order else (head,)

    def _copy_in(self, mem: memoryview, head: int, order: int, src: memoryview) -> None:
        if not order:
            off = head << FRAME_SHIFT
            mem[off : off + FRAME_SIZE] = src
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << FRAME_SHIFT
            mem[off : off + FRAME_SIZE] = src[i << FRAME_SHIFT : (i + 1) << FRAME_SHIFT]

    def _copy_out(self, mem: memoryview, head: int, order: int, dst: memoryview) -> None:
        if not order:
            off = head << FRAME_SHIFT
            dst[:] = mem[off : off + FRAME_SIZE]
            return
        for i, slot in enumerate(self._slots_of(head, order)):
            off = slot << FRAME_SHIFT
            dst[i << FRAME_SHIFT : (i + 1) << FRAME_SHIFT] = mem[off : off + FRAME_SIZE]

    def _spans(
        self, pool: Pool, head: int, offset: int, length: int
    ) -> Iterator[tuple[int, memoryview]]:
        """(position in the caller's buffer, arena view) for a byte range of a page."""
        mem = self._mem_of(pool.guest)
        slots = self._slots_of(head, pool.order)
        pos = 0
        while pos < length:
            page_off = offset + pos
            slot = slots[page_off >> FRAME_SHIFT]
            in_slot = page_off & (FRAME_SIZE - 1)
            n = min(FRAME_SIZE - in_slot, length - pos)
            base = (slot << FRAME_SHIFT) + in_slot
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
        self.deferred = False
        self.drain()
        for guest in self.guests.values():
            guest.mirror = None
            if guest.loan is not None:
                guest.loan.close()
                guest.loan = None
        for mirror in self._mirrors.values():
            mirror.close()
        self._mirrors.clear()
        self.arena.close()
