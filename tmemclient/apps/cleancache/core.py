"""Cleancache: a file page cache for a guest process, with tmem as its second chance.

    with tmemclient.connect(path, name="vm1") as client:
        cache = PageCache(client.new_pool(), capacity=1024, block_pages=8)   # 1024 local pages
        f = cache.open("data.bin")
        cache.read(f, offset, length)

The cache holds up to ``capacity`` 4 KiB file pages, grouped in *blocks* of consecutive pages of a
file (like a kernel's large folios): ``block_pages`` pages, by default the pool's page size. A
block is the unit of the local LRU, and may be partly filled: only the pages that were read are
held. In tmem a block is stored as pages of the pool's page size (4096 << order, at most the
block): a block read in part costs tmem only the pool pages that hold something, so a pool of
4 KiB pages stores exactly the pages the block held (with 32 KiB pool pages, random reads leave
blocks two-thirds full and a third of tmem holds zeros), at the price of more pages per request
for the client and the daemon to handle. The cache remembers which file pages each tmem page
carried. While tmem is under pressure (it dropped our pages before we came back: a lookup hit
rate below 90%), a tmem page is put only if it carries at least ``DENSE`` of its size, so the
shared memory goes to the pages that bring the most file pages back.

A clean block that leaves the local LRU is offered to an ephemeral pool, gathered in batches of
``put_batch`` pages sent without waiting for the answer (``put_many_nowait``). Blocks gathering for
a batch still serve hits and count in ``capacity``: with a pool the LRU holds ``capacity -
put_batch`` pages, so a guest uses the same memory with tmem or without (a read may overshoot by
its own pages until its end). A local miss asks the pool before the file: the tmem pages of all
the missing pages of one read, plus, when the file is read sequentially, ``readahead`` pages
beyond, in one ``get_many``. Exclusive gets move pages back into the local cache: a page lives in
one place at a time.

Hiding the round trip. Asking tmem costs a round trip even when it misses, so the cache asks only
for tmem pages it has put and believes still there: it keeps a *shadow* of its puts in put order.
The daemon evicts a guest's ephemeral pages least recently used first and a get removes the page,
so our pages leave tmem in the order we put them: when a lookup misses, every page put before it
is gone too and leaves the shadow. A page never put (a cold miss) goes straight to the file.
With ``overlap``, when a read needs pages from both, the sync cache reads the file while the
lookup is on its way (a helper thread waits for tmem's answer, as a kernel would have both I/Os in
flight), so the round trip costs only what the file reads do not cover; off by default, as on a
busy 2-core machine the thread's handoffs and its wait for the answer cost the guest more than
they hide. A lookup that could return k pages saves k times the hit rate times a file read; the
cache measures both costs (from recent samples) and reads the file directly when asking would
cost more than it saves (asking anyway 1 in 4 times, to keep measuring).

Back-off. Each tmem page put has an outcome once it is wanted again: tmem returns it (a hit; a
page read ahead counts when it is read), or it does not have it any more (a miss); a page not
wanted while ``shadow_limit`` newer pages were put (8 times the capacity) counts as a miss too (a
scan). A lookup skipped for its cost is no outcome: it says what a round trip costs now, not
whether tmem keeps what we put. When the hit rate of a ``window`` of outcomes (``window`` blocks'
worth) stays near zero (below 1 in 8, two windows in a row), the cache *samples*: only blocks of a
fixed 1 in ``sample`` subset (by hash of the block) are put and looked up, in batches and a
reserve 1/``sample`` the size, so tmem traffic falls to 1/sample while the sample keeps measuring;
at 1 in 4 again it goes back to full use. Outcomes, not recent misses, are judged, so a cold start
(puts whose pages are not wanted yet) is not mistaken for waste.

Lent memory. With ``borrow=N`` and a client connected with ``map_pages`` and ``lend_memory``,
the cache asks tmemd to lend it up to N bytes to use as its own (PROTOCOL.md §4.8: LEND, when
blocks must leave for lack of room; more often while the loan grows). Lent memory extends the
local cache: one LRU over all blocks, a page kept in our own memory while ``capacity`` has room
and else copied into a free 4 KiB frame of lent memory (4 KiB, not a block: partly read blocks
would waste a third of it), so a block leaving frees what it held wherever it was, and a read
serves pages from either with no copy but the one every read makes. Evicted blocks go to tmem
only while tmemd says a put would find room (LEND's ``room``): with lent memory at its share a
guest makes no puts at all. tmemd may take any lent memory back at any time: a read that used
it checks the mirror's seq word after copying out, and is made again if memory was taken back
meanwhile (its pages count once); during a recall a read comes straight from the file. Pages
lost that way count in ``lent_lost``; ``lent_hits`` counts the pages reads found in lent memory.

Coherency. One object id per file, from st_dev, st_ino and (where the filesystem has one) the
inode generation; a file replaced under the same name is a new inode, so a new object. ``open``
revalidates what the cache knew of the inode (ctime, mtime, size): a file changed behind the
cache's back, or a recycled inode, loses its cached pages here and in tmem. ``write`` goes to the
file, drops the cached blocks it touches and flushes them from tmem; ``truncate`` flushes the
object. If the daemon goes away (``DaemonGone``) the cache carries on with its local pages and the
file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import trio

from tmemclient.aclient import AsyncPool
from tmemclient.client import Pool
from tmemclient.core import OnAnswer
from tmemclient.mapping import LentMemory, Mapping, Token, token_of
from tmemclient.wire.errors import DaemonGone, InvalidArgument
from tmemclient.wire.layout import FRAME_SIZE

PAGE = FRAME_SIZE  # a file page
Key = tuple[int, int]  # (object id, block index): a tmem handle
Page = bytes | memoryview  # a page read from the file, or a view of a block tmem returned
DiskRead = Callable[[int, int, int], bytes]  # os.pread's signature: (fd, length, offset)
DiskReadInto = Callable[[int, memoryview, int], int]  # (fd, buffer, offset) -> bytes read


def _preadv(fd: int, buf: memoryview, offset: int) -> int:
    return os.preadv(fd, [buf], offset)


DENSE = 0.75  # under pressure, a tmem page is put only if it carries this much of its size
ASK_MIN, ASK_MAX = 8, 256  # blocks with no lent frame to go to before asking to borrow more
_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode generation, where supported


@dataclass
class CacheStats:
    """What a page cache did, in file pages unless said otherwise. Every page read is a local
    hit, a tmem hit or a disk read."""

    pages_read: int = 0  # pages asked for by read()
    local_hits: int = 0
    tmem_hits: int = 0  # pages of a read served by a block tmem returned
    disk_reads: int = 0
    tmem_gets: int = 0  # get_many round trips
    blocks_got: int = 0  # blocks tmem returned (its gets_hit)
    tmem_misses: int = 0  # blocks asked for that tmem no longer held
    readahead: int = 0  # blocks fetched beyond a read
    puts: int = 0  # blocks put (tmem pages)
    puts_refused: int = 0  # known refused; puts sent without waiting are counted by the client
    pages_put: int = 0  # file pages those tmem pages carried
    put_batches: int = 0
    sparse_dropped: int = 0  # tmem pages not put: too sparse while tmem was under pressure
    lookups_skipped: int = 0  # tmem pages read from the file because asking would not pay
    overlapped_gets: int = 0  # lookups answered while the file was being read
    mapped_reads: int = 0  # of blocks_got, read through the client's mapping: no round trip
    puts_skipped: int = 0  # tmem pages not put again: tmem still holds them as they are
    backoffs: int = 0
    resumes: int = 0
    lent_hits: int = 0  # of local_hits, pages found in lent memory
    lent_lost: int = 0  # pages in lent memory tmemd took back before we came back
    lends: int = 0  # LEND round trips
    lent_bytes: int = 0  # bytes borrowed at the last LEND
    tmem_seconds: float = 0.0  # waiting for tmem (gets and puts)
    put_seconds: float = 0.0  # of which sending puts
    disk_seconds: float = 0.0  # reading the file

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return asdict(self)


@dataclass
class CachedFile:
    """A file opened through a page cache. ``oid`` is its tmem object id."""

    path: str
    fd: int
    oid: int
    size: int
    writable: bool
    next_page: int = -1  # where the last read ended: a read starting here is sequential
    closed: bool = False


@dataclass
class _Known:
    ctime_ns: int
    mtime_ns: int
    size: int


class _Recent:
    """The last few measurements of a cost, read as a quantile: one slow outlier (a page fault, a
    preempted daemon) must not stop the cache from asking tmem for long."""

    def __init__(self, quantile: float, size: int = 15) -> None:
        self._quantile = quantile
        self._recent: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._recent.append(value)

    @property
    def value(self) -> float | None:
        if len(self._recent) < 3:
            return None
        return sorted(self._recent)[int(len(self._recent) * self._quantile)]


@dataclass
class _Costs:
    """Measured costs, in seconds."""

    # One page read from the file: the median.
    disk: _Recent = field(default_factory=lambda: _Recent(0.5))
    # One lookup: a low quantile, since a lookup may also wait for the daemon to finish puts
    # sent before it, which is the puts' cost, not the lookup's.
    lookup: _Recent = field(default_factory=lambda: _Recent(0.25))
    hit_rate: float = 1.0  # of blocks asked of tmem, the fraction it returned (weighted average)


def object_id(st: os.stat_result, generation: int = 0) -> int:
    """The tmem object id of a file: st_dev, st_ino and the inode generation, 192 bits."""
    return ((st.st_dev & (2**64 - 1)) << 128) | ((st.st_ino & (2**64 - 1)) << 64) | generation


def _generation(fd: int) -> int:
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETVERSION, b"\0" * 8)
    except OSError:
        return 0  # the filesystem has no generation: revalidation at open covers inode reuse
    return int(struct.unpack("q", raw)[0]) & (2**64 - 1)


class _Block:
    """The pages of one block that the cache holds (None where it holds none)."""

    __slots__ = ("held", "lent", "lent_mask", "mask", "pages")

    def __init__(self, pages: list[Page | None]) -> None:
        self.pages = pages
        self.mask = sum(1 << i for i, page in enumerate(pages) if page is not None)
        self.held = self.mask.bit_count()
        self.lent: dict[int, int] | None = None  # page -> lent memory frame, for pages kept there
        self.lent_mask = 0  # of those pages

    def add(self, slot: int, page: Page) -> None:
        """Hold one more page."""
        self.pages[slot] = page
        self.mask |= 1 << slot
        self.held += 1

    def lend(self, slot: int, view: memoryview, frame: int) -> None:
        """Hold one more page, ``view``: lent memory's frame ``frame``."""
        self.add(slot, view)
        if self.lent is None:
            self.lent = {}
        self.lent[slot] = frame
        self.lent_mask |= 1 << slot


# An I/O request of a plan: ("get", keys) -> list[bytes | None]; ("get_start", keys) -> None, then
# ("get_wait", keys) -> (list[bytes | None], seconds the round trip took or None): the same get,
# with the caller reading the file in between; ("put", (items, on_answer)) -> list[bool] or None
# when the answers are not known (then each is handed to on_answer, if any, as it comes:
# ``Pool.put_many_nowait``); ("answers", None) -> None once every such answer is in (a mapped
# client's, whose answers say where pages went); ("flush", keys) and ("flush_object", oid) -> None.
Request = tuple[str, Any]
Plan = Generator[Request, Any, Any]


class _CacheCore:
    """The page cache's logic as sans-I/O plans; the sync and the trio cache drive them."""

    _pool_type: ClassVar[type[Pool] | type[AsyncPool]]
    _overlap: ClassVar[bool] = False  # read the file while a lookup is on its way
    _pool: Pool | AsyncPool | None

    def __init__(
        self,
        pool: Pool | AsyncPool | None,
        capacity: int,
        *,
        block_pages: int | None = None,
        readahead: int = 16,
        put_batch: int = 64,
        sample: int = 16,
        window: int = 256,
        disk_read: DiskRead | None = None,
        overlap: bool = False,
        borrow: int = 0,
        disk_readinto: DiskReadInto | None = None,
    ) -> None:
        if pool is not None and not isinstance(pool, self._pool_type):
            raise InvalidArgument(f"{type(self).__name__} needs a {self._pool_type.__name__}")
        block_size, part_size = _check_pool(pool, block_pages)
        tmem = pool is not None
        self._pool = pool
        for name, value, low in (
            ("capacity", capacity, 1),
            ("readahead", readahead, 0),
            ("put_batch", put_batch, 1),
            ("sample", sample, 1),
            ("window", window, 4),
            ("borrow", borrow, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgument(f"{name} must be an int >= {low}, got {value!r}")
        self.block_pages = block_size // PAGE
        self.part_pages = part_size // PAGE  # file pages per tmem page
        self._parts = self.block_pages // self.part_pages  # tmem pages per block
        if tmem and put_batch + self.block_pages > capacity:
            raise InvalidArgument("capacity must hold put_batch pages and a block more")
        self.capacity = capacity
        self.readahead = readahead
        self.put_batch = put_batch
        self.sample = sample
        self.window = window
        self.overlap = overlap and self._overlap
        self.shadow_limit = max(1, 8 * capacity // self.part_pages)  # tmem pages
        # A client connected with map_pages reads tmem pages it was told the place of with no
        # round trip (PROTOCOL.md §4.7); the page stays in tmem, so a block read that way and
        # evicted unchanged is not put again.
        self._mapping: Mapping | None = None if pool is None else pool.mapping
        self.stats = CacheStats()
        self.tmem = tmem  # False without a pool, or once the daemon is gone
        self.sampling = False
        self._disk_read: DiskRead = disk_read or os.pread
        # Reading a page straight into lent memory saves a copy (the default, or the caller's).
        self._disk_readinto = disk_readinto or (None if disk_read else _preadv)
        self._zero = bytes(PAGE)
        self._local: OrderedDict[Key, _Block] = OrderedDict()
        self._local_pages = 0
        self._pending: dict[Key, _Block] = {}  # evicted, gathering for a put batch
        self._pending_pages = 0
        # Keyed by tmem handle (object id, file page // part_pages), not by block:
        # put: (seq, page mask, token of a mapped read or None)
        self._shadow: OrderedDict[Key, tuple[int, int, Token | None]] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()  # put, then dropped by tmem
        self._readahead: set[Key] = set()  # fetched ahead, not read yet
        self._seq = 0
        self._hits = self._misses = self._bad_windows = self._skipped = 0
        self._costs = _Costs()
        self._known: dict[int, _Known] = {}
        self._files: dict[int, CachedFile] = {}
        # Lent memory (PROTOCOL.md §4.8), in 4 KiB frames: it extends the local cache (one LRU);
        # a page comes in there when our own ``capacity`` is full. tmemd may take any of it
        # back at any time: we then drop the pages that were there.
        self.borrow = borrow
        loan = None if self._mapping is None else self._mapping.loan
        self._loan: LentMemory | None = loan if borrow else None
        self._lent_pages = 0  # pages of local blocks kept in lent memory (not in _local_pages)
        self._frames_free: list[int] = []  # 4 KiB frames of lent memory; lowest last: used first
        self._frames = 0  # frames of lent memory we know we have
        # A view of each of them, made once: a page held there is its frame's view (a slice
        # per page read cost a fifth of what lent memory added to a read's CPU).
        self._views: list[memoryview] = []
        self._room = True  # the last LEND said a put would find room in tmem
        self._pressure = self._ask_every = ASK_MIN
        self._reads = 0

    @property
    def cached_pages(self) -> int:
        """File pages held locally (including blocks gathering for a put batch and blocks in
        lent memory)."""
        return self._local_pages + self._pending_pages + self._lent_pages

    @property
    def _putting(self) -> bool:
        """Do evicted blocks go to tmem? Not while the daemon says it has no room for them."""
        return self.tmem and self._room

    # ------------------------------------------------------------------ plans

    def _open_plan(self, path: str | os.PathLike[str], writable: bool) -> Plan:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            oid = object_id(st, _generation(fd))
            now = _Known(st.st_ctime_ns, st.st_mtime_ns, st.st_size)
            known = self._known.get(oid)
            if known is not None and known != now:
                yield from self._invalidate_object(oid)  # changed behind our back, or reused
            self._known[oid] = now
        except BaseException:
            os.close(fd)
            raise
        f = CachedFile(os.fspath(path), fd, oid, st.st_size, writable)
        self._files[fd] = f
        return f

    def _read_plan(self, f: CachedFile, offset: int, length: int) -> Plan:
        if f.closed:
            raise InvalidArgument(f"{f.path} is closed")
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must be >= 0")
        end = min(offset + length, f.size)
        if offset >= end:
            return b""
        loan = self._loan
        if loan is None:
            return (yield from self._read_pages(f, offset, end))
        self._reads += 1
        if not self._reads & 7:  # (every read would cost a clock read each)
            loan.mark_active()
        # The seq word is read here rather than through loan.changed() and loan.still(): two
        # calls on every read cost 1.3% of a guest's instructions (callgrind, uniform run).
        for _ in range(4):  # bounded: each round means tmemd took memory back meanwhile
            if loan.words[0] != loan.seq and not self._loan_sync():
                break  # a recall under way
            seq, stats = loan.seq, self.stats
            before = (stats.pages_read, stats.local_hits, stats.lent_hits, stats.tmem_hits)
            data = yield from self._read_pages(f, offset, end)
            if loan.words[0] == seq:
                return data
            # Pages read from lent memory may be punched: read again. Its pages count once
            # (those the first try read from the file count as file reads, and are local now).
            stats.pages_read, stats.local_hits, stats.lent_hits, stats.tmem_hits = before
            stats.disk_reads -= (
                stats.local_hits + stats.tmem_hits + stats.disk_reads - stats.pages_read
            )
        # A recall under way, or still racing: straight from the file, as file reads.
        first, last = offset // PAGE, (end - 1) // PAGE
        self.stats.pages_read += last - first + 1
        f.next_page = last + 1
        data = b"".join([self._read_disk(f, i) for i in range(first, last + 1)])
        return data[offset % PAGE : offset % PAGE + end - offset]

    def _read_pages(self, f: CachedFile, offset: int, end: int) -> Plan:
        first, last = offset // PAGE, (end - 1) // PAGE
        bp, pp = self.block_pages, self.part_pages
        pages: dict[int, Page] = {}
        missing: list[int] = []
        ahead = self._readahead
        for b in range(first // bp, last // bp + 1):
            lo, hi = max(first, b * bp), min(last, b * bp + bp - 1)
            block = self._local_block((f.oid, b))
            if block is not None and block.lent_mask:
                self.stats.lent_hits += (
                    block.lent_mask >> lo - b * bp & (2 << hi - lo) - 1
                ).bit_count()
            for index in range(lo, hi + 1):
                data = None if block is None else block.pages[index % bp]
                if data is None:
                    missing.append(index)
                else:
                    pages[index] = data
                    if ahead and (f.oid, index // pp) in ahead:
                        ahead.discard((f.oid, index // pp))
                        self._outcome(hit=True)
        self.stats.pages_read += last - first + 1
        self.stats.local_hits += len(pages)
        if missing:
            yield from self._fill(f, missing, first == f.next_page, pages)
        f.next_page = last + 1
        data = b"".join(pages[i] for i in range(first, last + 1))
        skip = offset - first * PAGE
        return data[skip : skip + end - offset]

    def _fill(
        self, f: CachedFile, missing: list[int], sequential: bool, pages: dict[int, Page]
    ) -> Plan:
        """Bring the missing pages of a read in: tmem first (one batch), then the file."""
        oid, bp, pp = f.oid, self.block_pages, self.part_pages
        asked: list[Key] = []
        if self.tmem and (self._shadow or self._ghost):  # else nothing we put is there
            wanted: dict[int, int] = {}  # tmem page -> mask of the pages we miss
            for index in missing:
                wanted[index // pp] = wanted.get(index // pp, 0) | 1 << index % pp
            useful = 0
            for part, need in wanted.items():
                key = (oid, part)
                entry = self._shadow.get(key)
                if entry is not None:
                    if self._eligible(key):
                        asked.append(key)
                        useful += (entry[1] & need).bit_count()
                elif key in self._ghost:  # put once, dropped by tmem before we came back
                    del self._ghost[key]
                    self._outcome(hit=False)
            early: list[int] = []
            if asked and self.overlap:  # pages that must come from the file anyway: read
                parts = {key[1] for key in asked}  # them while the lookup is on its way
                early = [i for i in missing if i // pp not in parts]
            if asked and self._mapping is None and not self._worth_asking(useful, len(early)):
                # Not a verdict on tmem: the lookup costs more than it would save right now.
                self.stats.lookups_skipped += len(asked)
                asked, early = [], []
            if asked and self._mapping is not None:
                asked = yield from self._read_through_mapping(asked)
            demand = len(asked)
            if asked and sequential:
                after = missing[-1] // pp + 1
                for part in range(after, after + -(-self.readahead // pp)):
                    key = (oid, part)
                    if key not in self._shadow or not self._eligible(key):
                        break
                    asked.append(key)
            if asked:
                yield from self._get(f, asked, demand, early, pages)
                # The blocks evicted by earlier reads go now, behind the lookup: tmemd stores
                # them while we read the file, and our next lookup does not queue behind them.
                yield from self._put_pending(force=False)
        stats, local = self.stats, self._local
        # Where the pages read from the file go: our own memory while it has room, then free
        # frames of lent memory (read straight into them), then our own memory over its limit
        # until _evict. Decided here for the whole read, not page by page.
        limit, free, lent = self._limit(), self._frames_free, 0
        own, views = len(missing), self._views
        if self._loan is not None:
            own = self._room_for(len(missing), oid, missing, limit)
        readinto = self._disk_readinto is not None
        for index in missing:
            if index in pages:
                continue  # read from the file while the lookup was on its way
            key = (oid, index // bp)
            block = local.get(key)
            data = None if block is None else block.pages[index % bp]
            if data is not None:
                stats.tmem_hits += 1
            else:
                if block is None:
                    block = local[key] = _Block([None] * bp)
                if own > 0 or not free:
                    own -= 1
                    data = self._read_disk(f, index)
                    block.add(index % bp, data)
                    self._local_pages += 1
                elif not readinto:  # the device cannot read into a buffer: copied in
                    data = self._hold(block, index % bp, self._read_disk(f, index))
                else:
                    frame = free.pop()
                    data = view = views[frame]
                    self._read_disk(f, index, view)
                    block.lend(index % bp, view, frame)
                    lent += 1
            pages[index] = data
        self._lent_pages += lent
        self._evict(limit)
        if not asked:  # else they go behind the next lookup
            yield from self._put_pending(force=False)
        if self._loan is not None and self.tmem and self._pressure >= self._ask_every:
            yield from self._borrow()

    def _disk_page(self, f: CachedFile, index: int) -> Page:
        """Read a page from the file into its local block."""
        bp = self.block_pages
        data = self._read_disk(f, index)
        key = (f.oid, index // bp)
        block = self._local.get(key)
        if block is None:
            block = self._local[key] = _Block([None] * bp)
        return self._hold(block, index % bp, data)

    def _get(
        self, f: CachedFile, asked: list[Key], demand: int, early: list[int], pages: dict[int, Page]
    ) -> Plan:
        """Ask tmem for ``asked`` (the first ``demand`` for this read, the rest read ahead); the
        ``early`` pages are read from the file while the answer is on its way."""
        # What each asked page carries, read first: misses trim the shadow, and tmem may return
        # a page put before one it no longer has (its eviction order is not exactly ours).
        masks = [self._shadow[key][1] for key in asked]
        started = time.perf_counter()
        if early:
            yield ("get_start", asked)
            try:
                for index in early:
                    pages[index] = self._disk_page(f, index)
            finally:  # a file read that fails still collects the answer (then raises)
                waiting = time.perf_counter()
                found, took = yield ("get_wait", asked)
            self.stats.tmem_seconds += time.perf_counter() - waiting
            self.stats.overlapped_gets += 1
        else:
            found = yield ("get", asked)
            took = time.perf_counter() - started
            self.stats.tmem_seconds += took
        self.stats.tmem_gets += 1
        if took is not None:
            self._costs.lookup.add(took)
        self._take(asked, masks, found, demand, kept=False)

    def _take(
        self,
        asked: list[Key],
        masks: list[int],
        found: list[bytes | None],
        demand: int,
        *,
        kept: bool,
    ) -> None:
        """Put what tmem returned for ``asked`` into local blocks (the first ``demand`` were
        for this read, the rest read ahead); a miss trims the shadow. ``kept``: the pages
        are still in tmem (mapped reads), so their shadow entries stay."""
        costs = self._costs
        returned = sum(data is not None for data in found)
        costs.hit_rate = 0.9 * costs.hit_rate + 0.1 * returned / len(asked)
        self.stats.blocks_got += returned
        pp, parts = self.part_pages, self._parts
        shadow = self._shadow
        for n, (key, data) in enumerate(zip(asked, found, strict=True)):
            if data is None:
                self.stats.tmem_misses += 1
                self._trim_through(key)
                if n < demand:
                    self._outcome(hit=False)
                continue
            mask = masks[n]
            if not kept:
                shadow.pop(key, None)
                self._ghost.pop(key, None)
            view = memoryview(data)  # pages are views of the tmem page: no copy
            block = self._block_for((key[0], key[1] // parts))
            base = key[1] % parts * pp
            for i in range(pp):
                if mask >> i & 1 and block.pages[base + i] is None:
                    self._hold(block, base + i, view[i * PAGE : (i + 1) * PAGE])
            if n < demand:
                self._outcome(hit=True)
            else:
                self.stats.readahead += 1
                self._readahead.add(key)

    def _read_through_mapping(self, asked: list[Key]) -> Plan:
        """Read the asked tmem pages through the mapping, once the answers to their puts said
        where they went (waiting for those costs what a lookup would, as tmemd answers in
        order). Returns the keys left for a lookup: none, unless an answer was an error."""
        shadow, pool = self._shadow, self._pool
        assert pool is not None
        if any(shadow[key][2] is None for key in asked):
            yield ("answers", None)
        mapped: list[Key] = []
        tokens: list[Token] = []
        left: list[Key] = []
        for key in asked:
            entry = shadow.get(key)
            if entry is None:  # refused, we now know: the file has it
                continue
            if entry[2] is None:
                left.append(key)
            else:
                mapped.append(key)
                tokens.append(entry[2])
        if mapped:
            masks = [shadow[key][1] for key in mapped]
            # Not reported to tmemd: the block is ours again, and tmem's copy (kept so that
            # an unchanged block is not put again) should age from its put, not crowd out
            # pages only tmem holds. Refreshing it cost 3% more disk reads (uniform run).
            found = [pool.read_mapped(token, report=False) for token in tokens]
            self.stats.mapped_reads += sum(data is not None for data in found)
            self._take(mapped, masks, found, len(mapped), kept=True)
        return left

    def _answered(self, keys: list[Key], seqs: list[int]) -> OnAnswer:
        """What to do with the answer to a put sent without waiting: remember where a mapped
        guest's pages were put; forget the pages tmem refused."""

        def answered(first: int, results: Any) -> None:
            if results is None:
                return
            shadow = self._shadow
            for n, result in enumerate(results[: len(keys) - first], first):
                key = keys[n]
                entry = shadow.get(key)
                if entry is None or entry[0] != seqs[n]:
                    continue  # put again since, or forgotten
                if not result:
                    del shadow[key]  # refused: a lookup would miss
                elif (token := token_of(result)) is not None:
                    shadow[key] = (entry[0], entry[1], token)

        return answered

    def _write_plan(self, f: CachedFile, offset: int, data: Any) -> Plan:
        if f.closed or not f.writable:
            raise InvalidArgument(f"{f.path} is not open for writing through this cache")
        if offset < 0:
            raise InvalidArgument("offset must be >= 0")
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(f.fd, view[done:], offset + done)
        if not view:
            return 0
        bp = PAGE * self.block_pages
        blocks = [(f.oid, b) for b in range(offset // bp, (offset + len(view) - 1) // bp + 1)]
        for key in blocks:
            self._forget(key)
        self._refresh(f)
        if self.tmem:  # whatever the shadow believes: stale data is never read
            yield ("flush", [part for key in blocks for part in self._parts_of(key)])
        return len(view)

    def _truncate_plan(self, f: CachedFile, size: int) -> Plan:
        if f.closed or not f.writable:
            raise InvalidArgument(f"{f.path} is not open for writing through this cache")
        if size < 0:
            raise InvalidArgument("size must be >= 0")
        os.ftruncate(f.fd, size)
        yield from self._invalidate_object(f.oid)
        self._refresh(f)

    def _put_pending(self, *, force: bool) -> Plan:
        if not self._pending or (not force and self._pending_pages < self._batch_pages()):
            return
        batch = list(self._pending.items())
        self._pending.clear()
        self._pending_pages = 0
        if not self.tmem:
            return
        zero, pp, parts = self._zero, self.part_pages, self._parts
        dense = self._dense_pages()
        full = (1 << pp) - 1
        items: list[tuple[int, int, Page]] = []
        masks: list[int] = []
        dropped = put = 0
        shadow, mapping = self._shadow, self._mapping
        for (oid, b), block in batch:
            if parts == 1:  # the block is one tmem page
                if mapping is not None and self._still_held(shadow.get((oid, b)), block.mask):
                    self.stats.puts_skipped += 1
                    continue
                if block.held < dense:
                    dropped += 1
                    continue
                put += block.held
                items.append((oid, b, b"".join([x or zero for x in block.pages])))
                masks.append(block.mask)
                continue
            for p in range(parts):
                mask = block.mask >> p * pp & full
                if not mask:
                    continue  # only the pages held go to tmem: no memory spent on holes
                if mapping is not None and self._still_held(shadow.get((oid, b * parts + p)), mask):
                    self.stats.puts_skipped += 1
                    continue
                held = mask.bit_count()
                if held < dense:
                    dropped += 1
                    continue
                put += held
                group = block.pages[p * pp : (p + 1) * pp]
                one = group[0]
                data = one if pp == 1 and one is not None else b"".join([x or zero for x in group])
                items.append((oid, b * parts + p, data))
                masks.append(mask)
        self.stats.sparse_dropped += dropped
        self.stats.pages_put += put
        if not items:
            return
        # Every page goes into the shadow before the put is sent: a trio client may hand us
        # its answer (where the page went) before the send returns.
        shadow = self._shadow
        seqs: list[int] = []
        for n, (oid, index, _) in enumerate(items):
            key = (oid, index)
            shadow.pop(key, None)
            self._ghost.pop(key, None)
            self._seq += 1
            shadow[key] = (self._seq, masks[n], None)
            seqs.append(self._seq)
        on_answer = None
        if mapping is not None:
            on_answer = self._answered([(oid, index) for oid, index, _ in items], seqs)
        started = time.perf_counter()
        flags = yield ("put", (items, on_answer))
        took = time.perf_counter() - started
        self.stats.tmem_seconds += took
        self.stats.put_seconds += took
        self.stats.put_batches += 1
        self.stats.puts += len(items)
        if flags is not None:  # answered now: a page refused is not in tmem
            for n, (oid, index, _) in enumerate(items):
                if flags[n]:
                    continue
                entry = shadow.get((oid, index))
                if entry is not None and entry[0] == seqs[n]:
                    del shadow[(oid, index)]
                self.stats.puts_refused += 1
                self._outcome(hit=False)
        limit = self.shadow_limit // self.sample if self.sampling else self.shadow_limit
        while len(shadow) > limit:  # not wanted while this many newer blocks were put: a scan
            shadow.popitem(last=False)
            self._outcome(hit=False)

    def _still_held(self, entry: tuple[int, int, Token | None] | None, mask: int) -> bool:
        """Does tmem still hold, as the shadow entry says, every page of ``mask``?"""
        if entry is None or entry[2] is None or mask & ~entry[1]:
            return False
        assert self._mapping is not None
        return self._mapping.valid(entry[2])

    def _invalidate_object(self, oid: int) -> Plan:
        for key in [k for k in (*self._local, *self._pending) if k[0] == oid]:
            self._forget(key)  # a block
        for table in (self._shadow, self._ghost):
            for key in [k for k in table if k[0] == oid]:
                del table[key]  # a tmem page
        self._readahead = {k for k in self._readahead if k[0] != oid}
        if self.tmem:
            yield ("flush_object", oid)

    # ------------------------------------------------------------------ local blocks

    def _local_block(self, key: Key) -> _Block | None:
        block = self._local.get(key)
        if block is not None:
            self._local.move_to_end(key)
        else:
            block = self._pending.pop(key, None)  # not put yet: still ours
            if block is None:
                return None
            self._pending_pages -= block.held
            self._local_pages += block.held
            self._local[key] = block
        return block

    def _block_for(self, key: Key) -> _Block:
        """The block ``key``, held locally: found, taken back from the put batch, or new."""
        block = self._local_block(key)
        if block is None:
            block = self._local[key] = _Block([None] * self.block_pages)
        return block

    def _parts_of(self, key: Key) -> list[Key]:
        """The tmem handles of a block's pages."""
        oid, b = key
        return [(oid, b * self._parts + p) for p in range(self._parts)]

    def _limit(self) -> int:
        """Pages our own memory holds: with puts, a batch's worth of the capacity is kept for
        the batch being gathered."""
        return self.capacity - self._batch_pages() if self._putting else self.capacity

    def _evict(self, limit: int | None = None) -> None:
        """Evict the oldest blocks while our own memory holds more than ``limit`` pages (by
        default ``_limit()``)."""
        if limit is None:
            limit = self._limit()
        while self._local_pages > limit and self._local:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        """The least recently used block leaves: to the put batch (if puts go, and it is in the
        sample), or dropped."""
        key, block = self._local.popitem(last=False)
        if self._readahead:
            self._readahead.difference_update(self._parts_of(key))
        put = self._putting and self._eligible(key, block=True)
        if block.lent:
            if put:
                for i in block.lent:  # its frames are reused before the batch goes
                    block.pages[i] = bytes(block.pages[i])  # type: ignore[arg-type]
            self._free_lent(block)
        self._local_pages -= block.held
        if put:
            self._pending[key] = block
            self._pending_pages += block.held

    def _room_for(self, pages: int, oid: int, missing: list[int], limit: int) -> int:
        """With lent memory: evict the oldest blocks (never one of this read's) until ``pages``
        more fit in our own memory (of ``limit`` pages) and free lent frames together. Returns
        how many fit in our own memory."""
        local, free = self._local, self._frames_free
        if len(free) + limit - self._local_pages >= pages:
            return limit - self._local_pages
        lo, hi = missing[0] // self.block_pages, missing[-1] // self.block_pages
        while len(free) + limit - self._local_pages < pages and local:
            oldest = next(iter(local))
            if oldest[0] == oid and lo <= oldest[1] <= hi:
                break  # the rest are newer still: this read overshoots until _evict
            self._evict_oldest()
            self._pressure += 1
        return limit - self._local_pages

    def _hold(self, block: _Block, i: int, page: Page) -> Page:
        """Add a page to a local block: in our own memory while it has room, else copied into a
        free frame of lent memory (there are free frames only with a loan; ``_room_for`` made
        them free); returns the page as held. (A recall meanwhile: _read_plan reads again.)"""
        free = self._frames_free
        if not free or self._local_pages < self._limit():
            block.add(i, page)  # our own memory (or over it until _evict, as without a loan)
            self._local_pages += 1
            return page
        frame = free.pop()
        view = self._views[frame]
        view[:] = page
        block.lend(i, view, frame)
        self._lent_pages += 1
        return view

    def _free_lent(self, block: _Block) -> None:
        """A block leaves: its lent frames are free again."""
        lent = block.lent
        assert lent is not None
        self._frames_free.extend(lent.values())
        self._lent_pages -= len(lent)
        self._local_pages += len(lent)  # the caller takes the whole block off
        block.lent = None
        block.lent_mask = 0

    # ------------------------------------------------------------------ lent memory

    def _loan_sync(self) -> bool:
        """Drop what tmemd took back since we last looked; False while it is taking some."""
        loan = self._loan
        assert loan is not None
        low = loan.changed()
        if low is None:
            return True
        if low == LentMemory.BUSY:
            return False
        self._lost(low, loan.lent)
        return True

    def _lost(self, low: int, lent: int) -> None:
        """Everything we kept in lent memory from byte ``low`` on is gone; ``lent`` bytes are
        ours now. (A scan of the blocks holding lent pages, when some are lost.)"""
        frames = lent // PAGE
        first = min(low // PAGE, frames)
        views = self._views
        if frames > len(views):
            assert self._loan is not None
            mem = self._loan.mem
            views.extend(mem[k * PAGE : (k + 1) * PAGE] for k in range(len(views), frames))
        else:
            del views[frames:]  # taken back
        if first >= self._frames:  # nothing lost: only new frames, if any
            self._frames_free[:0] = range(frames - 1, self._frames - 1, -1)
            self._frames = frames
            return
        self._frames = frames
        used: set[int] = set()
        for key, block in list(self._local.items()):
            if not block.lent:
                continue
            for i, frame in list(block.lent.items()):
                if frame < first:
                    used.add(frame)
                    continue
                del block.lent[i]
                block.lent_mask &= ~(1 << i)
                block.pages[i] = None
                block.mask &= ~(1 << i)
                block.held -= 1
                self._lent_pages -= 1
                self.stats.lent_lost += 1
            if not block.held:
                del self._local[key]
        self._frames_free = [f for f in range(frames - 1, -1, -1) if f not in used]

    def _borrow(self) -> Plan:
        """Ask to borrow ``borrow`` bytes in all; learn what we have and whether puts find room."""
        loan = self._loan
        assert loan is not None
        self._pressure = 0
        had = len(self._frames_free) + self._lent_pages
        reply = yield ("lend", self.borrow)
        if reply is None:
            return
        self.stats.lends += 1
        self.stats.lent_bytes = reply["lent"]
        self._lost(loan.answered(reply), reply["lent"])
        self._room = reply["room"] >= self.part_pages * PAGE
        grew = len(self._frames_free) + self._lent_pages > had
        self._ask_every = ASK_MIN if grew else min(self._ask_every * 2, ASK_MAX)

    def _forget(self, key: Key) -> None:
        block = self._local.pop(key, None)
        if block is not None:
            if block.lent:
                self._free_lent(block)
            self._local_pages -= block.held
        block = self._pending.pop(key, None)
        if block is not None:
            self._pending_pages -= block.held
        for part in self._parts_of(key):
            self._shadow.pop(part, None)
            self._ghost.pop(part, None)
            self._readahead.discard(part)

    def _read_disk(self, f: CachedFile, index: int, into: memoryview | None = None) -> Page:
        """A page of the file (short at its end: padded with zeros), or read ``into`` a
        page-sized buffer with the ``disk_readinto`` hook, which is then returned."""
        started = time.perf_counter()
        if into is None:
            data: Page = self._disk_read(f.fd, PAGE, index * PAGE)
        else:
            assert self._disk_readinto is not None
            got = self._disk_readinto(f.fd, into, index * PAGE)
            if got < PAGE:
                into[got:] = bytes(PAGE - got)
            data = into
        took = time.perf_counter() - started
        self.stats.disk_reads += 1
        self.stats.disk_seconds += took
        self._costs.disk.add(took)
        return data if len(data) == PAGE else bytes(data).ljust(PAGE, b"\0")

    def _refresh(self, f: CachedFile) -> None:
        """After our own write: remember the inode as it is now, in every handle of the file."""
        st = os.fstat(f.fd)
        self._known[f.oid] = _Known(st.st_ctime_ns, st.st_mtime_ns, st.st_size)
        for other in self._files.values():
            if other.oid == f.oid:
                other.size = st.st_size

    # ------------------------------------------------------------------ shadow and back-off

    def _trim_through(self, key: Key) -> None:
        """``key`` was evicted from tmem: so was everything we put before it."""
        entry = self._shadow.pop(key, None)
        if entry is None:
            return
        shadow, ghost = self._shadow, self._ghost
        while shadow:
            old, old_entry = shadow.popitem(last=False)
            if old_entry[0] > entry[0]:
                shadow[old] = old_entry
                shadow.move_to_end(old, last=False)
                break
            ghost[old] = None
        while len(ghost) > self.shadow_limit:
            ghost.popitem(last=False)

    def _dense_pages(self) -> int:
        """Pages a tmem page must carry to be put. Any while tmem keeps what we put (a lookup
        hit rate of 90% or more); under pressure, at least ``DENSE`` of it: tmem's memory then
        goes to the pages that bring the most file pages back."""
        if self._costs.hit_rate >= 0.9:
            return 0
        return int(self.part_pages * DENSE)

    def _batch_pages(self) -> int:
        """Pages gathered before a put: fewer while sampling, as fewer blocks go to tmem."""
        if self.sampling:
            return max(self.block_pages, self.put_batch // self.sample)
        return self.put_batch

    def _eligible(self, key: Key, *, block: bool = False) -> bool:
        """Is this tmem page (or block) in the sample? Whole blocks are in or out."""
        if not self.sampling:
            return True
        oid, index = key
        return hash((oid, index if block else index // self._parts)) % self.sample == 0

    def _worth_asking(self, pages: int, hidden: int) -> bool:
        """Would asking for these pages save more file reading than the lookup costs? The
        lookup's time is hidden behind ``hidden`` page reads made meanwhile."""
        costs = self._costs
        disk, lookup = costs.disk.value, costs.lookup.value
        if (
            disk is None
            or lookup is None
            or pages * costs.hit_rate * disk >= lookup - hidden * disk
        ):
            return True
        self._skipped += 1
        return self._skipped % 4 == 0  # now and then, to keep measuring

    def _outcome(self, *, hit: bool) -> None:
        """A put block's fate is known; judge the window when it is full."""
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        seen = self._hits + self._misses
        window = self.window * self._parts  # a window is ``window`` blocks' worth
        if seen < (window // 4 if self.sampling else window):
            return
        rate = self._hits / seen
        self._hits = self._misses = 0
        if not self.sampling:
            self._bad_windows = self._bad_windows + 1 if rate < 1 / 8 else 0
            if self._bad_windows >= 2:
                self._bad_windows = 0
                self.sampling = True
                self.stats.backoffs += 1
                # Only the sample is put and looked up from now on; forget the rest unjudged.
                for key in [k for k in self._pending if not self._eligible(k, block=True)]:
                    self._pending_pages -= self._pending.pop(key).held
                for key in [k for k in self._shadow if not self._eligible(k)]:
                    del self._shadow[key]
                self._ghost.clear()
        elif rate >= 1 / 4:
            self.sampling = False
            self.stats.resumes += 1

    # ------------------------------------------------------------------ the drivers' helpers

    def _daemon_gone(self) -> None:
        """The daemon went away: carry on with local pages and the file."""
        self.tmem = False
        self._pending.clear()
        self._pending_pages = 0
        self._shadow.clear()
        self._ghost.clear()

    @staticmethod
    def _failed(request: Request) -> Any:
        """The answer a request gets when tmem is not there: every get misses, no put lands."""
        kind, arg = request
        if kind == "get":
            return [None] * len(arg)
        if kind == "get_wait":
            return [None] * len(arg), None
        if kind == "put":
            return [False] * len(arg[0])
        return None

    def close_file(self, f: CachedFile) -> None:
        """Close the file; its pages stay cached (until evicted) for the next ``open``."""
        if not f.closed:
            f.closed = True
            self._files.pop(f.fd, None)
            os.close(f.fd)

    def close(self) -> None:
        """Close every file opened through the cache (the pool is the caller's)."""
        for f in list(self._files.values()):
            self.close_file(f)


def _check_pool(pool: Pool | AsyncPool | None, block_pages: int | None) -> tuple[int, int]:
    """The block size and the tmem page size in bytes. The block is ``block_pages`` pages, by
    default the pool's page size; a pool's page may be smaller than a block (a power of two
    fraction of it), never larger."""
    if block_pages is not None and (
        isinstance(block_pages, bool)
        or not isinstance(block_pages, int)
        or block_pages < 1
        or block_pages & (block_pages - 1)
    ):
        raise InvalidArgument(f"block_pages must be a power of two, got {block_pages!r}")
    if pool is None:
        return (block_pages or 1) * PAGE, (block_pages or 1) * PAGE
    if pool.persistent:
        raise InvalidArgument("a page cache needs an ephemeral pool")
    if block_pages is None:
        return pool.page_size, pool.page_size
    if pool.page_size > block_pages * PAGE:
        raise InvalidArgument(
            f"the pool's page size {pool.page_size} is larger than a block of {block_pages} pages"
        )
    return block_pages * PAGE, pool.page_size


def _put_batch(
    pool: Pool, items: list[tuple[int, int, bytes]], on_answer: OnAnswer | None = None
) -> list[bool] | None:
    """Put one batch of evicted blocks without waiting for the answer (None: not known).

    A clean block may be dropped, so nothing waits for its put: the daemon serves requests in
    order, so a later get sees it, and the client counts the answers (``client.deferred``). The
    cache assumes the blocks landed; if one was refused, a later lookup misses and trims the
    shadow. To wait for the answers instead, ``return pool.put_many(items)``.
    """
    pool.put_many_nowait(items, on_answer)
    return None


class _Fetcher:
    """A thread that makes one ``get_many`` at a time for a cache, so that the cache can read the
    file while the answer is on its way (a kernel would have both I/Os in flight at once). The
    pool's client is used by this thread only between ``start`` and ``wait``, and by the cache
    only outside that window: one user at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._requests: queue.SimpleQueue[list[Key] | None] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[tuple[Any, float | None, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="tmem-get", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (keys := self._requests.get()) is not None:
            started = time.perf_counter()
            try:
                found = self._pool.get_many(keys)
            except BaseException as exc:  # handed to the cache's thread, raised there
                self._answers.put((None, None, exc))
            else:
                self._answers.put((found, time.perf_counter() - started, None))

    def start(self, keys: list[Key]) -> None:
        """Send the get (from the thread)."""
        if self.busy:  # an answer nobody collected (an interrupted wait): not ours to use
            with contextlib.suppress(Exception):
                self.wait()
        self.busy = True
        self._requests.put(keys)

    def wait(self) -> tuple[list[bytes | None], float | None]:
        """The get's answer and how long its round trip took."""
        found, took, exc = self._answers.get()
        self.busy = False
        if exc is not None:
            raise exc
        return found, took

    def stop(self) -> None:
        """End the thread."""
        self._requests.put(None)
        self._thread.join(timeout=10)


class PageCache(_CacheCore):
    """A synchronous file page cache backed by an ephemeral tmem pool; ``pool=None`` makes it a
    plain local cache (the static partition to compare with).

    ``capacity`` is in file pages; ``block_pages`` pages make a block (default: the pool's page
    size, which may be smaller than a block but not larger); ``readahead`` pages are fetched
    beyond a sequential read; ``put_batch`` pages are gathered per put; while backed off 1 in
    ``sample`` blocks is used; ``window`` blocks' worth of outcomes are judged at a time (see the
    module docstring); ``disk_read`` replaces ``os.pread`` for file reads (the benchmark adds a
    device's latency there); ``overlap`` reads the file while a lookup is on its way (a helper
    thread makes the get; ``close`` ends it); ``borrow`` bytes of memory are asked of tmemd to
    extend the cache (its client connected with ``lend_memory``; see "Lent memory" above).
    ``stats`` counts what the cache did, ``sampling`` is True while it has backed off, and
    ``tmem`` turns False once the daemon went away. Not thread-safe.
    """

    _pool_type = Pool
    _pool: Pool | None
    _overlap = True
    _fetcher: _Fetcher | None = None

    def _drive(self, plan: Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(self._do(request))
        except StopIteration as stop:
            return stop.value

    def _do(self, request: Request) -> Any:
        pool = self._pool
        kind, arg = request
        if kind == "get_wait" and self._fetcher is not None and self._fetcher.busy:
            try:
                return self._fetcher.wait()
            except DaemonGone:
                self._daemon_gone()
                return self._failed(request)
        if pool is None or not self.tmem or kind == "get_wait":
            return self._failed(request)
        try:
            if kind == "get_start":
                if self._fetcher is None:
                    self._fetcher = _Fetcher(pool)
                return self._fetcher.start(arg)
            if kind == "get":
                return pool.get_many(arg)
            if kind == "put":
                return _put_batch(pool, *arg)
            if kind == "answers":
                return pool.wait_deferred()
            if kind == "lend":
                return pool.client.lend(arg)
            if kind == "flush":
                return pool.flush_many(arg)
            return pool.flush_object(arg)
        except DaemonGone:
            self._daemon_gone()
            return self._failed(request)

    def open(self, path: str | os.PathLike[str], *, writable: bool = False) -> CachedFile:
        """Open a file through the cache (read-only unless ``writable``)."""
        result: CachedFile = self._drive(self._open_plan(path, writable))
        return result

    def read(self, f: CachedFile, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        result: bytes = self._drive(self._read_plan(f, offset, length))
        return result

    def write(self, f: CachedFile, offset: int, data: Any) -> int:
        """Write through to the file; the cached blocks it touches are dropped."""
        result: int = self._drive(self._write_plan(f, offset, data))
        return result

    def truncate(self, f: CachedFile, size: int) -> None:
        """Truncate (or extend) the file; its cached pages are dropped here and in tmem."""
        self._drive(self._truncate_plan(f, size))

    def put_pending(self) -> None:
        """Send the evicted blocks gathering for a batch now."""
        self._drive(self._put_pending(force=True))

    def close(self) -> None:
        """Close every file opened through the cache (the pool is the caller's)."""
        super().close()
        if self._fetcher is not None:
            self._fetcher.stop()
            self._fetcher = None

    def __enter__(self) -> PageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPageCache(_CacheCore):
    """The trio page cache: ``PageCache``'s logic over an ``AsyncPool``. File reads are short
    blocking calls made from the task, as a page cache's would be. Tasks may share one: its
    operations take turns (a read in progress holds pages another's eviction would reuse)."""

    _pool_type = AsyncPool
    _pool: AsyncPool | None
    _turns: trio.Lock | None = None

    async def _drive(self, plan: Plan) -> Any:
        if self._turns is None:
            self._turns = trio.Lock()
        async with self._turns:
            try:
                request = next(plan)
                while True:
                    request = plan.send(await self._do(request))
            except StopIteration as stop:
                return stop.value

    async def _do(self, request: Request) -> Any:
        pool = self._pool
        if pool is None or not self.tmem:
            return self._failed(request)
        kind, arg = request
        try:
            if kind == "get":
                return await pool.get_many(arg)
            if kind == "get_start":  # not overlapped: the get is made at get_wait
                return None
            if kind == "get_wait":
                started = time.perf_counter()
                found = await pool.get_many(arg)
                return found, time.perf_counter() - started
            if kind == "put":  # as the sync cache: a clean block's put needs no answer
                await pool.put_many_nowait(*arg)
                return None
            if kind == "answers":
                return await pool.wait_deferred()
            if kind == "lend":
                return await pool.client.lend(arg)
            if kind == "flush":
                return await pool.flush_many(arg)
            return await pool.flush_object(arg)
        except DaemonGone:
            self._daemon_gone()
            return self._failed(request)

    async def open(self, path: str | os.PathLike[str], *, writable: bool = False) -> CachedFile:
        """Open a file through the cache (read-only unless ``writable``)."""
        result: CachedFile = await self._drive(self._open_plan(path, writable))
        return result

    async def read(self, f: CachedFile, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        result: bytes = await self._drive(self._read_plan(f, offset, length))
        return result

    async def write(self, f: CachedFile, offset: int, data: Any) -> int:
        """Write through to the file; the cached blocks it touches are dropped."""
        result: int = await self._drive(self._write_plan(f, offset, data))
        return result

    async def truncate(self, f: CachedFile, size: int) -> None:
        """Truncate (or extend) the file; its cached pages are dropped here and in tmem."""
        await self._drive(self._truncate_plan(f, size))

    async def put_pending(self) -> None:
        """Send the evicted blocks gathering for a batch now."""
        await self._drive(self._put_pending(force=True))
