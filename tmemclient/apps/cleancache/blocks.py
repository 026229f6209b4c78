"""The local LRU of blocks: what the cache holds in its own memory and in lent memory.

The cache holds up to ``capacity`` 4 KiB file pages, grouped in *blocks* of consecutive pages of a
file (like a kernel's large folios): ``block_pages`` pages, by default the pool's page size. A
block is the unit of the local LRU, and may be partly filled: only the pages that were read are
held. A block that leaves the LRU goes to the put batch (puts.py) or is dropped. Blocks gathering
for a batch still serve hits and count in ``capacity``: with a pool the LRU holds ``capacity -
put_batch`` pages, so a guest uses the same memory with tmem or without (a read may overshoot by
its own pages until its end).

With lent memory (lent.py) there is still one LRU over all blocks: a page is kept in our own
memory while ``capacity`` has room and else copied into a free 4 KiB frame of lent memory (4 KiB,
not a block: partly read blocks would waste a third of it), so a block leaving frees what it held
wherever it was, and a read serves pages from either with no copy but the one every read makes.
"""

from __future__ import annotations

from tmemclient.apps.cleancache.shadow import _Shadow
from tmemclient.apps.cleancache.state import Key, Page


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


class _Blocks(_Shadow):
    """The local blocks: finding them, making room, holding pages, letting blocks go."""

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

    def _forget(self, key: Key) -> None:
        """Drop a block wherever it is (local, or in the put batch) and what the shadow knows of
        its tmem pages."""
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
