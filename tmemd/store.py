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

Semantics (docs/design.md §2): put replaces, a refused put of an existing handle flushes the old copy,
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

Packed pages (packing.py): a same-filled page, or with compression on a page that compresses
well, is kept as an object of a few bytes in its pool's zspages (zpool.py), not in slots of its
own; in the index it appears as a value below NIL.

The store is one class made of parts, each in its own module (tmemd/state.py lists them):
packed pages (packing.py), mapped guests (mirroring.py), where pages' memory is (slots.py), the budget and caps (budget.py),
lent memory (lending.py), the audit of what guests hold in their files (audit.py: the trust
boundary, tmemd/memfiles.py) and heavy work done off the event loop (deferred.py).
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Final

from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemd.accounts import NIL, Guest, Overdraft, Pool, Stats, StoreError, Tenant
from tmemd.audit import Auditing
from tmemd.budget import Budgeting
from tmemd.compress import Codec
from tmemd.deferred import REAP_INLINE, Deferring, Later
from tmemd.lending import LEND_IDLE, Lending
from tmemd.memfiles import Loan, MemFile, Mirror
from tmemd.mirroring import Mirroring
from tmemd.packing import Packing
from tmemd.policy import ACTIVE_TICKS_PER_GUEST, DEFAULT_WEIGHT, MOVE_SLACK, choose_victim
from tmemd.slots import Slots

if TYPE_CHECKING:
    from tmemd.persist import StateDir

__all__ = [
    "NIL",
    "Guest",
    "Loan",
    "Mirror",
    "Overdraft",
    "Pool",
    "Stats",
    "Store",
    "StoreError",
    "Tenant",
]

_INTERNED_INDEXES: Final = 1 << 16  # page indexes below this share their int objects


class Store(Packing, Mirroring, Lending, Auditing, Budgeting, Deferring, Slots):
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
        arena: MemFile | None = None,
        codec: Codec | None = None,
        dedup: bool = False,
    ) -> None:
        """``budget`` bytes may hold pages; ``capacity`` bytes of address space are reserved so
        the budget can later grow to it without moving pages (default: the budget).
        ``move_slack``: how much older another busy guest's page must be for a mapped guest's
        put to take it rather than the guest's own (policy.choose_victim; 0: the plain
        weighted LRU). ``lend_idle``: seconds a guest leaves its lent memory unused before it
        is taken back ahead of anything else (``now_ns``: the clock, CLOCK_MONOTONIC).
        ``deferred``: queue heavy work for ``reap`` and ``later_work`` (module docstring).
        ``arena``: the arena's file (a state directory's, tmemd/persist.py), else a memfd.
        ``codec``: compress pages with it (tmemd/compress.py; same-filled pages are packed
        whatever it is). ``dedup``: identical pages of a pool share one copy (tmemd/dedup.py)."""
        if budget < FRAME_SIZE:
            raise ValueError(f"budget must be at least {FRAME_SIZE} bytes")
        self.move_slack = move_slack
        self.lend_idle = lend_idle
        self.now_ns = now_ns
        self.deferred = deferred
        capacity = max(capacity or budget, budget)
        self.capacity_slots = capacity >> FRAME_SHIFT
        self.budget_slots = budget >> FRAME_SHIFT
        self.arena = arena or MemFile("tmem-arena", self.capacity_slots << FRAME_SHIFT)
        # Records of named pools' pages in a state directory (tmemd/persist.py: the order of
        # its writes is what makes them survive a SIGKILL); None without one.
        self.journal: StateDir | None = None
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
        # Made only while there are mapped guests (8 bytes a slot the others need not pay).
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
        self._init_packing(codec, dedup)

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
        mirror = guest.mirror
        # Pages of a mapped guest, or of a named pool whose records the state journal keeps
        # (tmemd/persist.py: a record names slots), are kept raw.
        if mirror is None and not pool.key:
            # Most pages differ in their first and ninth bytes: they cannot be same-filled,
            # and with compression off that is all a raw put pays for packing (one compare).
            maybe = self.packs_all or src[0] == src[8]
            packed = self._pack(pool, src) if maybe else None
            if packed is not None:
                return self._put_packed(pool, oid, index, head, packed, src)
            if head < NIL:  # was packed, is not now: the old copy goes first
                self._release(self._remove(pool, oid, index))
                head = NIL
        order = pool.order
        mem = self._mem_of(guest)
        journal = self.journal if pool.key else None
        old = NIL
        if head != NIL and journal is not None and pool.persistent:
            old, head = head, NIL  # copy on write: the answered copy stays until this is whole
        if head != NIL:
            if journal is not None:
                journal.removed(head)  # an ephemeral page: absent while it is rewritten
            if mirror is not None:
                mirror.gen[head] = 0  # being rewritten: a mapped read of it now fails
            if order:
                self._copy_in(mem, head, order, src)
            else:
                off = head << FRAME_SHIFT
                mem[off : off + FRAME_SIZE] = src
            if mirror is not None:
                mirror.gen[head] = self._gen[head] = self.clock
            if journal is not None:
                journal.stored(self._slots_of(head, order), pool.key, oid, index)
            if not pool.persistent:
                self._touch(guest, head)
            self._put_head = head
            return True
        return self._put_raw(pool, oid, index, src, old=old)

    def _put_raw(
        self,
        pool: Pool,
        oid: int,
        index: int,
        src: memoryview,
        force: bool = False,
        old: int = NIL,
    ) -> bool:
        """A new page in slots of its own, making room for it; False if none was found.
        ``force``: past the budget and caps if need be (a persistent page being rewritten,
        packing.py), as long as the arena has the slots. ``old``: the copy of a kept named
        pool's page this one replaces (copy on write), freed once this one is recorded, or
        dropped if this put is refused."""
        guest = pool.guest
        order = pool.order
        mirror = guest.mirror
        mem = self._mem_of(guest)
        journal = self.journal if pool.key else None
        need = 1 << order
        if not self._make_room(guest, need, pool.persistent) and not (
            force and self.used_slots + need <= self.capacity_slots
        ):
            return self._refuse(pool, oid, index, old)
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
        if journal is not None:  # the data is whole: now the record that makes it visible
            journal.stored(self._slots_of(head, order), pool.key, oid, index)
        pool.pages += 1
        if pool.persistent:
            guest.pers_slots += need
        else:
            guest.eph_slots += need
            self._lru_append(guest, head)
        if old != NIL:  # the copy it replaces goes only now that this one is recorded
            self._release(self._unlink(pool, old))
        self._put_head = head
        return True

    def _get(self, pool: Pool, oid: int, index: int, dst: memoryview) -> bool:
        self.clock += 1
        pages_of_oid = pool.objects.get(oid)
        head = NIL if pages_of_oid is None else pages_of_oid.get(index, NIL)
        if head == NIL:
            return False
        if head < NIL:
            self._get_packed(pool, oid, index, head, dst)
            return True
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
        if head < NIL:
            return self._sub_packed(pool, oid, index, head, offset, dst, "read")
        for start, chunk in self._spans(pool, head, offset, len(dst)):
            dst[start : start + len(chunk)] = chunk
        return True

    def write(self, pool: Pool, oid: int, index: int, offset: int, src: memoryview) -> bool:
        """Overwrite ``len(src)`` bytes at ``offset`` of an existing page (of a mapped guest:
        mapped reads of the page fail from now on; GET and READ still find it)."""
        head = self._sub_page(pool, oid, index, offset, len(src), changes=True)
        if head == NIL:
            return False
        if head < NIL:
            return self._sub_packed(pool, oid, index, head, offset, src, "write")
        for start, chunk in self._spans(pool, head, offset, len(src)):
            chunk[:] = src[start : start + len(chunk)]
        return True

    def xchg(self, pool: Pool, oid: int, index: int, offset: int, buf: memoryview) -> bool:
        """Atomically swap ``buf`` with the page bytes at ``offset``: the page gets buf's old
        contents and buf gets the page's."""
        head = self._sub_page(pool, oid, index, offset, len(buf), changes=True)
        if head == NIL:
            return False
        if head < NIL:
            return self._sub_packed(pool, oid, index, head, offset, buf, "xchg")
        for start, chunk in self._spans(pool, head, offset, len(buf)):
            old = bytes(chunk)
            chunk[:] = buf[start : start + len(chunk)]
            buf[start : start + len(chunk)] = old
        return True

    def page_slots(self, pool: Pool, oid: int, index: int) -> int | None:
        """The head slot of a page (below NIL: a packed page), or None (for tests and
        introspection)."""
        head = self._lookup(pool, oid, index)
        return None if head == NIL else head

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
            self._touch_page(pool.guest, head)
        return head

    def _refuse(self, pool: Pool, oid: int, index: int, head: int) -> bool:
        if head != NIL:
            self._release(self._remove(pool, oid, index))
        return False

    def _make_room(
        self, guest: Guest, need: int, persistent: bool, found: Callable[[], bool] | None = None
    ) -> bool:
        """Evict ephemeral pages until ``need`` slots fit the budget, the guest's cap and its
        tenant's cap, or until ``found()`` says an eviction made other room (a hole in a
        zspage, for a packed page)."""
        cap = guest.cap_slots
        if cap is not None:
            if guest.pers_slots + guest.lent_slots + need > cap:
                return False
            while guest.held_slots + need > cap:
                if guest.oldest == NIL:  # pragma: no cover - implied by the check above
                    return False
                self._evict(guest.oldest)
                if found is not None and found():
                    return True
        tenant = guest.tenant
        if tenant is not None and tenant.cap_slots is not None:
            if tenant.fixed_slots + need > tenant.cap_slots:
                return False
            while tenant.held_slots + need > tenant.cap_slots:
                victim = choose_victim(tenant.guests, self.clock)
                if victim is None:  # pragma: no cover - implied by the check above
                    return False
                self._evict(victim.oldest)
                if found is not None and found():
                    return True
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
            self._evict(victim.oldest)
            if found is not None and found():
                return True
        return True

    def _evict(self, head: int) -> None:
        pool, oid, index = self._whose(head)
        pool.stats.evictions += 1
        pool.guest.stats.evictions += 1
        self.evictions += 1
        self._release(self._remove(pool, oid, index))

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
        if head < NIL:
            return self._unlink_packed(pool, head)
        if pool.key and self.journal is not None:
            self.journal.removed(head)  # the record goes before the slots can be reused
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
        if guest.mirror is not None:  # its memory stays the guest's until _alloc moves it
            guest.mirror.gen[head] = self._gen[head] = 0
        return slots

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
