"""The read path, and the class the layers stack into: ``_CacheCore``, the page cache's logic as
sans-I/O plans, which the two drivers (drivers.py) run.

A read takes what the local blocks hold (blocks.py). A local miss asks the pool before the file:
the tmem pages of all the missing pages of one read, plus, when the file is read sequentially,
``readahead`` pages beyond, in one ``get_many`` — only pages the shadow says are there, and only
when asking pays (shadow.py, costs.py). Exclusive gets move pages back into the local cache: a
page lives in one place at a time. A mapped client reads the pages through its mapping instead,
with no round trip (PROTOCOL.md §4.7). With ``overlap`` the sync cache reads the file while the
lookup is on its way (fetcher.py). The rest comes from the file; the blocks evicted to make room
go to tmem behind the lookup (puts.py). A read that used lent memory is checked against the
loan's seq word after copying out, and made again if tmemd took memory back meanwhile (lent.py).

How the layers stack: each concept is a class in its own module, over the layers it uses.

    _CacheState                           state.py      settings, counters, the shared fields
    _Shadow(_CacheState)                  shadow.py     the shadow of our puts; back-off
    _Blocks(_Shadow)                      blocks.py     the local LRU of blocks
    _Lent(_Blocks)                        lent.py       borrowed memory
    _Coherency(_Blocks)                   coherency.py  files; forgetting what changed
    _Puts(_Shadow)                        puts.py       the put batch
    _CacheCore(_Coherency, _Puts, _Lent)  core.py       the read path

They are mixins over one set of fields, rather than objects the cache holds, so that the read
path pays no extra attribute lookup per page (it was tuned with callgrind).
"""

from __future__ import annotations

import time

from tmemclient.apps.cleancache.blocks import _Block
from tmemclient.apps.cleancache.coherency import CachedFile, _Coherency
from tmemclient.apps.cleancache.lent import _Lent
from tmemclient.apps.cleancache.puts import _Puts
from tmemclient.apps.cleancache.requests import Answers, Get, GetStart, GetWait, Plan
from tmemclient.apps.cleancache.state import PAGE, Key, Page
from tmemclient.mapping import Token
from tmemclient.wire.errors import InvalidArgument


class _CacheCore(_Coherency, _Puts, _Lent):
    """The page cache's logic as sans-I/O plans; the sync and the trio cache drive them."""

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
            yield GetStart(asked)
            try:
                for index in early:
                    pages[index] = self._disk_page(f, index)
            finally:  # a file read that fails still collects the answer (then raises)
                waiting = time.perf_counter()
                found, took = yield GetWait(asked)
            self.stats.tmem_seconds += time.perf_counter() - waiting
            self.stats.overlapped_gets += 1
        else:
            found = yield Get(asked)
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
            yield Answers()
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

    def _daemon_gone(self) -> None:
        """The daemon went away: carry on with local pages and the file."""
        self.tmem = False
        self._pending.clear()
        self._pending_pages = 0
        self._shadow.clear()
        self._ghost.clear()
