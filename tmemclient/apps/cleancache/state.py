"""What a page cache is made of: its settings, checked, its counters, and the state every layer
of it shares, set up in one place.

The cache's logic is split in layers, one module each (``core`` says how they stack); they all
work on the fields ``_CacheState.__init__`` sets up, listed there by the layer that owns them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from tmemclient.apool import AsyncPool
from tmemclient.apps.cleancache.costs import _Costs
from tmemclient.mapping import LentMemory, Mapping, Token
from tmemclient.pool import Pool
from tmemclient.wire.errors import InvalidArgument
from tmemclient.wire.layout import FRAME_SIZE

if TYPE_CHECKING:
    from tmemclient.apps.cleancache.blocks import _Block
    from tmemclient.apps.cleancache.coherency import CachedFile, _Known

PAGE = FRAME_SIZE  # a file page
Key = tuple[int, int]  # (object id, block index): a tmem handle
Page = bytes | memoryview  # a page read from the file, or a view of a block tmem returned
DiskRead = Callable[[int, int, int], bytes]  # os.pread's signature: (fd, length, offset)
DiskReadInto = Callable[[int, memoryview, int], int]  # (fd, buffer, offset) -> bytes read

ASK_MIN, ASK_MAX = 8, 256  # blocks with no lent frame to go to before asking to borrow more


def _preadv(fd: int, buf: memoryview, offset: int) -> int:
    return os.preadv(fd, [buf], offset)


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


class _CacheState:
    """A page cache's settings and state; the layers above it hold the logic."""

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
        # The read path (core).
        self._disk_read: DiskRead = disk_read or os.pread
        # Reading a page straight into lent memory saves a copy (the default, or the caller's).
        self._disk_readinto = disk_readinto or (None if disk_read else _preadv)
        self._zero = bytes(PAGE)
        # Local blocks (blocks), and the put batch (puts).
        self._local: OrderedDict[Key, _Block] = OrderedDict()
        self._local_pages = 0
        self._pending: dict[Key, _Block] = {}  # evicted, gathering for a put batch
        self._pending_pages = 0
        # The shadow (shadow). Keyed by tmem handle (object id, file page // part_pages), not
        # by block: put: (seq, page mask, token of a mapped read or None)
        self._shadow: OrderedDict[Key, tuple[int, int, Token | None]] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()  # put, then dropped by tmem
        self._readahead: set[Key] = set()  # fetched ahead, not read yet
        self._seq = 0
        # Back-off (shadow) and the cost model (costs).
        self._hits = self._misses = self._bad_windows = self._skipped = 0
        self._costs = _Costs()
        # Files (coherency).
        self._known: dict[int, _Known] = {}
        self._files: dict[int, CachedFile] = {}
        # Lent memory (lent; PROTOCOL.md §4.8), in 4 KiB frames: it extends the local cache (one
        # LRU); a page comes in there when our own ``capacity`` is full. tmemd may take any of
        # it back at any time: we then drop the pages that were there.
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
