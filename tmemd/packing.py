"""Packed pages (docs/design.md §6.11): a page kept as less than its slots. A same-filled page is
kept as its word, and (with compression on) a page that compresses well as its compressed
bytes; either is an *object* in its pool's ZPool (tmemd/zpool.py), whose slots are billed to the
pool's account as pages' slots are. Pages of mapped guests are never packed: they read their
pages straight from their mirror (PROTOCOL.md §4.7), which must hold them raw.

A packed page has no head slot, so it is named by a *packed id* instead, and its metadata lives
in arrays of its own indexed by that id. In a pool's index (and wherever a head slot is passed
around: ``_unlink``, ``_evict``, LRU heads) a packed page appears as ``-2 - pid``: any value below
NIL (-1) is a packed page, any value above a head slot. Each guest keeps its packed ephemeral
pages in an LRU list of their own; both lists are ordered by last use on the one logical clock,
so the older of their two heads is the guest's least recently used page (``Guest.oldest``) and
the weighted LRU sees one list.

Changing part of a packed page (WRITE, XCHG) repacks it, which may take more memory than it had.
An ephemeral page is unpacked, changed, and stored again like a new put (if no room is found it
is gone, as if evicted right after the change). A persistent page is never lost: its new copy is
stored before the old one goes, over the budget if need be (as a budget lowered below what
persistent pages hold: puts are refused until they fit); only if the arena itself is full is the
change refused, and the page stays as it was.
"""

from __future__ import annotations

from array import array
from typing import Final

from mypy_extensions import trait

from tmemd import compress
from tmemd.accounts import NIL, Guest, Pool
from tmemd.compress import Codec
from tmemd.dedup import DedupZPool
from tmemd.slots import Slots
from tmemd.zpool import ZPool

_GROW: Final = 4096  # packed-page metadata arrays grow by this many entries at a time


def packed_id(head: int) -> int:
    """The packed id of a page whose head value (below NIL) names a packed page."""
    return -2 - head


@trait
class Packing(Slots):
    """The store's packed pages (module docstring)."""

    codec: Codec | None
    dedup: bool
    packs_all: bool

    def _init_packing(self, codec: Codec | None, dedup: bool) -> None:
        self.set_packing(codec, dedup)
        self._ppool: list[Pool | None] = []
        self._poid: list[int] = []
        self._pindex = array("I")
        self._pprev = array("i")
        self._pnext = array("i")
        self._pstamp = array("Q")
        self._pobj = array("q")  # its object's handle in its pool's ZPool
        self._plen = array("I")  # 0: same-filled (the object is the word); else the object's size
        self._pfree = array("i")
        self.packed_pages = 0

    def set_packing(self, codec: Codec | None, dedup: bool) -> None:
        """Compress with ``codec`` (None: only same-filled pages pack) and share identical
        pages of a pool (``dedup``). Before any page is stored: pages stored compressed need
        the codec they were stored with."""
        self.codec = codec
        self.dedup = dedup
        self.packs_all = codec is not None or dedup  # else only same-filled pages pack

    # --------------------------------------------------------------------------- put and get

    def _pack(self, pool: Pool, src: memoryview) -> tuple[bytes, int] | None:
        """What the page packs to (compress.pack), or None: kept raw, as every page of a
        mapped guest."""
        if pool.guest.mirror is not None:
            return None
        packed = compress.pack(src, self.codec)
        if packed is None and self.dedup:  # a raw page, as an object identical pages share
            return bytes(src), len(src)
        return packed

    def _put_packed(
        self,
        pool: Pool,
        oid: int,
        index: int,
        head: int,
        packed: tuple[bytes, int],
        src: memoryview,
    ) -> bool:
        """A put of a page that packs: the old copy (raw or packed) goes first, so a refused
        put leaves none (docs/design.md §2.4). If no room is found for a new zspage of more
        slots than the page has (a cap or budget of a few slots), it is stored raw."""
        if head != NIL:
            self._release(self._remove(pool, oid, index))
        pid = self._store_packed(pool, packed, force=False)
        if pid == NIL:
            if ZPool.slots_needed(len(packed[0])) > 1 << pool.order:
                return self._put_raw(pool, oid, index, src)
            return False
        self._index_packed(pool, oid, index, pid)
        self._put_head = -2 - pid
        return True

    def _get_packed(self, pool: Pool, oid: int, index: int, head: int, dst: memoryview) -> None:
        self._unpack(pool, head, dst)
        if pool.shared:
            self._ptouch(pool.guest, packed_id(head))
        elif not pool.persistent:
            self._release(self._remove(pool, oid, index))

    def _unpack(self, pool: Pool, head: int, dst: memoryview) -> None:
        pid = packed_id(head)
        code = self._plen[pid]
        zpool = pool.zpool
        assert zpool is not None
        data = zpool.read(self._pobj[pid], code or compress.WORD)
        compress.unpack(data, code, dst, self.codec)

    def _store_packed(self, pool: Pool, packed: tuple[bytes, int], *, force: bool) -> int:
        """Store an object for a page of ``pool``, making room as a put does; its packed id, or
        NIL if no room was found. ``force``: past the budget and caps if need be (a persistent
        page being rewritten), as long as the arena has the slots."""
        data, code = packed
        zpool = pool.zpool
        if zpool is None:
            zpool = pool.zpool = (DedupZPool if self.dedup else ZPool)(self._mem, self._relocate)
        pid = self._new_pid()
        if isinstance(zpool, DedupZPool):
            same = zpool.find(data, code)
            if same >= 0:  # an identical page of this pool: share its object, take no memory
                zpool.share(same, pid)
                self._pobj[pid] = same
                self._plen[pid] = code
                return pid
        handle = zpool.alloc(len(data), pid)
        if handle < 0:
            need = zpool.slots_needed(len(data))
            guest = pool.guest
            length, zp = len(data), zpool
            if not self._make_room(
                guest, need, pool.persistent, lambda: zp.has_room(length)
            ) and not (force and self.used_slots + need <= self.capacity_slots):
                self._pfree.append(pid)
                return NIL
            handle = zpool.alloc(len(data), pid)  # making room may have freed some here
            if handle < 0:
                zpool.grow(len(data), [self._alloc(1, 0, 0) for _ in range(need)])
                if pool.persistent:
                    guest.pers_slots += need
                else:
                    guest.eph_slots += need
                handle = zpool.alloc(len(data), pid)
        zpool.write(handle, data)
        if isinstance(zpool, DedupZPool):
            zpool.remember(handle, data, code)
        self._pobj[pid] = handle
        self._plen[pid] = code
        return pid

    def _index_packed(self, pool: Pool, oid: int, index: int, pid: int) -> None:
        pages_of_oid = pool.objects.get(oid)
        if pages_of_oid is None:
            pages_of_oid = pool.objects[oid] = {}
        pages_of_oid[index] = -2 - pid
        self._ppool[pid] = pool
        self._poid[pid] = oid
        self._pindex[pid] = index
        pool.pages += 1
        self.packed_pages += 1
        if not pool.persistent:
            self._plru_append(pool.guest, pid)

    def _unlink_packed(self, pool: Pool, head: int) -> list[int]:
        """``_unlink`` of a packed page: its object freed; return the slots that left its
        pool's ZPool (none, usually)."""
        pid = packed_id(head)
        pool.pages -= 1
        self.packed_pages -= 1
        guest = pool.guest
        if not pool.persistent:
            self._plru_unlink(guest, pid)
        zpool = pool.zpool
        assert zpool is not None
        code = self._plen[pid]
        slots = zpool.free(self._pobj[pid], code or compress.WORD, owner=pid, compact=not pool.dead)
        if slots:
            if pool.persistent:
                guest.pers_slots -= len(slots)
            else:
                guest.eph_slots -= len(slots)
        self._ppool[pid] = None
        self._poid[pid] = 0
        self._pfree.append(pid)
        return list(slots)

    def _relocate(self, owner: int, handle: int) -> None:
        self._pobj[owner] = handle

    def _whose(self, head: int) -> tuple[Pool, int, int]:
        """(pool, object id, index) of a stored page, raw or packed."""
        if head < NIL:
            pid = packed_id(head)
            pool = self._ppool[pid]
            assert pool is not None
            return pool, self._poid[pid], self._pindex[pid]
        raw = self._pool[head]
        assert raw is not None
        return raw, self._oid[head], self._index[head]

    def _touch_page(self, guest: Guest, head: int) -> None:
        """``_touch`` of a raw or packed page."""
        if head < NIL:
            self._ptouch(guest, packed_id(head))
        else:
            self._touch(guest, head)

    # ---------------------------------------------------------------------- sub-page access

    def _sub_packed(
        self, pool: Pool, oid: int, index: int, head: int, offset: int, buf: memoryview, op: str
    ) -> bool:
        """READ ("read": into ``buf``), WRITE ("write": from it) or XCHG ("xchg") of a packed
        page: unpacked, changed and packed again (module docstring)."""
        page = bytearray(pool.page_size)
        view = memoryview(page)
        self._unpack(pool, head, view)
        end = offset + len(buf)
        if op == "read":
            buf[:] = view[offset:end]
            return True
        old = bytes(view[offset:end])
        view[offset:end] = buf
        if not self._repack(pool, oid, index, head, view):
            return False
        if op == "xchg":
            buf[:] = old
        return True

    def _repack(self, pool: Pool, oid: int, index: int, head: int, page: memoryview) -> bool:
        pid = packed_id(head)
        packed = self._pack(pool, page)
        zpool = pool.zpool
        assert zpool is not None
        code = self._plen[pid]
        if packed is not None and zpool.replace(self._pobj[pid], code or compress.WORD, packed[0]):
            self._plen[pid] = packed[1]
            return True
        if not pool.persistent:
            # Changed, then stored again like a new put; without room it is gone, as an
            # ephemeral page may be at any time (counted as an eviction).
            self._release(self._remove(pool, oid, index))
            if packed is None:
                stored = self._put_raw(pool, oid, index, page)
            else:
                new = self._store_packed(pool, packed, force=False)
                if stored := new != NIL:
                    self._index_packed(pool, oid, index, new)
            if not stored:
                pool.stats.evictions += 1
                pool.guest.stats.evictions += 1
                self.evictions += 1
            return True
        # Persistent: the new copy first (it replaces the old in the index), then the old goes.
        if packed is None:
            if not self._put_raw(pool, oid, index, page, force=True):
                return False
        else:
            new = self._store_packed(pool, packed, force=True)
            if new == NIL:
                return False
            self._index_packed(pool, oid, index, new)
        self._release(self._unlink_packed(pool, head))
        return True

    # ----------------------------------------------------------------------------- metadata

    def _new_pid(self) -> int:
        if self._pfree:
            return self._pfree.pop()
        pid = len(self._pobj)
        self._ppool.extend([None] * _GROW)
        self._poid.extend([0] * _GROW)
        self._pindex.extend([0] * _GROW)
        self._pprev.extend([NIL] * _GROW)
        self._pnext.extend([NIL] * _GROW)
        self._pstamp.extend([0] * _GROW)
        self._pobj.extend([0] * _GROW)
        self._plen.extend([0] * _GROW)
        self._pfree.extend(range(pid + _GROW - 1, pid, -1))
        return pid

    def _plru_append(self, guest: Guest, pid: int) -> None:
        self._pstamp[pid] = self.clock
        tail = guest.plru_tail
        self._pprev[pid] = tail
        self._pnext[pid] = NIL
        if tail == NIL:
            guest.plru_head = pid
        else:
            self._pnext[tail] = pid
        guest.plru_tail = pid

    def _plru_unlink(self, guest: Guest, pid: int) -> None:
        prev, nxt = self._pprev[pid], self._pnext[pid]
        if prev == NIL:
            guest.plru_head = nxt
        else:
            self._pnext[prev] = nxt
        if nxt == NIL:
            guest.plru_tail = prev
        else:
            self._pprev[nxt] = prev

    def _ptouch(self, guest: Guest, pid: int) -> None:
        if guest.plru_tail != pid:
            self._plru_unlink(guest, pid)
            self._plru_append(guest, pid)
        else:
            self._pstamp[pid] = self.clock

    # -------------------------------------------------------------------------------- views

    def packing_stats(self, pools: list[Pool] | None = None) -> dict[str, int]:
        """Packed pages of ``pools`` (default: all): ``packed`` pages, ``deduped`` pages of them
        that share another's bytes, ``packed_slots`` their zspages hold, ``packed_stored`` bytes
        of their objects (the rest of those slots is fragmentation)."""
        if pools is None:
            pools = [p for g in self.guests.values() for p in g.pools]
        zpools = [p.zpool for p in pools if p.zpool is not None]
        return {
            "packed": sum(z.objects for z in zpools),
            "deduped": sum(z.shares for z in zpools if isinstance(z, DedupZPool)),
            "packed_slots": sum(z.slots for z in zpools),
            "packed_stored": sum(z.stored for z in zpools),
        }
