"""Frontswap: a swap store for a guest with a fixed amount of RAM, tmem in front of a swap file.

    with tmemclient.connect(path, name="vm1") as client:
        store = SwapStore(client.new_pool(persistent=True))       # a temporary swap file
        ram = SwappedMemory(store, ram_pages=512)
        ram.write(7, page); ram.read(7)

``SwapStore`` keeps pages pushed out of RAM, by slot; ``SwappedMemory`` is the guest: N pages of
RAM over any number of page numbers, least recently used pages pushed out to the store.

Durability: write-through, batched. Persistent tmem pages die with the daemon, so a page that only
tmem holds is lost if the daemon goes away — and nothing warns before it does (a crash, a
SIGKILL). The promise is that no page is ever lost, so every page also goes to the swap file. A
stored page first waits in a small write-back queue (``batch`` pages, in the guest's memory, where
it still serves loads); when the queue is full the whole batch is put to the persistent pool in one
``put_many`` and written to the swap file in one device write. At every moment each live page is in
the queue or in the file, whatever tmem does: a refused put, an eviction (persistent pages are never
evicted, but a refused re-put flushes the older copy), or the daemon gone (``DaemonGone`` is caught;
from then on only the queue and the file are used). What tmem buys is the load side: a swap-in is a
tmem get (batched: ``load_many`` fetches every page of a fault in one round trip) instead of a
device read per page, which is the stall a swapping guest actually waits on; swap-file writes are
batched and the same with or without tmem. The rejected alternative — write to the file only what
the pool refuses, as the kernel's frontswap does — saves those writes but loses every page tmem
held when the daemon goes away.

With a client connected with ``map_pages`` (PROTOCOL.md §4.7), a swap-in needs no round trip at
all: each put's answer says where the page went, and the store reads it through the mapping.

Write-back (``write_back=True``, issue #17), as the kernel's frontswap did: a page goes to the swap
file only when tmem refuses it, so a swapping guest saves device writes as well as reads. It needs
a *named* persistent pool of a resilient client (``connect_resilient(...).new_pool(
persistent=True, name=...)``), because a page that only tmem holds must outlive a broken
connection: the client reconnects and the daemon gives the named pool back with its pages
(docs/design.md §2.6). What it guarantees, and what it cannot:

- tmem refuses a put (no room, frozen, over a cap): that page goes to the file, in the same
  batch write. A refused re-put also flushes tmem's older copy, so nothing stale is read.
- tmem evicts: never, for persistent pages.
- the connection breaks, or the daemon stops and comes back *with the pool* (a reconnect within
  ``reattach_seconds``): every page is still in tmem; nothing is lost.
- tmem is unreachable past the client's retry budget while a batch goes out: the batch goes to
  the file instead. A load of a page only tmem holds raises ``Unreachable`` until it is back.
- the daemon restarts or is killed and runs with ``--state-dir`` (docs/design.md §6.10): it
  comes back with the pool and every answered page; nothing is lost. (Not for a client with
  ``map_pages``: mirrors are not kept, so its named pool comes back empty, as below.)
- the daemon comes back *without the pool* (it restarted without a state directory, or
  discarded one it could not trust): the pages only tmem held are gone. The store knows which
  (``pool.resets`` moved), counts them (``stats.tmem_lost``) and raises ``PagesLost`` naming the
  slots on their next load — never stale or wrong data. Write-through survives that too;
  write-back is as safe only where the daemon keeps its pages across its restarts.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tmemclient.pool import Pool
from tmemclient.reconnect import ResilientPool
from tmemclient.wire.errors import DaemonGone, InvalidArgument, TmemError
from tmemclient.wire.layout import FRAME_SIZE

DiskRead = Callable[[int, int, int], bytes]  # os.pread's signature: (fd, length, offset)
DiskWrite = Callable[[int, list[tuple[int, bytes]]], None]  # (fd, [(offset, data), ...])

SWAP_OID = 0  # the one object of the store's pool; the slot is the index


class PagesLost(TmemError):
    """Pages only tmem held (write-back) are gone: the daemon came back without their pool."""

    def __init__(self, slots: Iterable[int]) -> None:
        self.slots = sorted(slots)
        shown = ", ".join(map(str, self.slots[:8])) + (", ..." if len(self.slots) > 8 else "")
        super().__init__(
            f"swap slots {shown} ({len(self.slots)} pages) were held only by tmem, and tmemd came "
            "back without their pool (it restarted without its pages); they are lost. Use "
            "write-through (write_back=False) unless tmemd keeps its pages across restarts"
        )


def write_pages(fd: int, pages: list[tuple[int, bytes]]) -> None:
    """Write each (offset, data) with pwrite: the default batched device write."""
    for offset, data in pages:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


@dataclass
class SwapStats:
    """What a swap store did."""

    stores: int = 0  # pages stored
    loads: int = 0  # pages loaded
    queue_hits: int = 0  # loads served by the write-back queue
    swap_reads: int = 0  # pages read from the swap file
    swap_writes: int = 0  # pages written to the swap file
    swap_write_batches: int = 0
    tmem_puts_ok: int = 0
    tmem_puts_refused: int = 0
    tmem_gets: int = 0  # pages loaded from tmem
    tmem_get_rounds: int = 0  # get_many round trips
    mapped_reads: int = 0  # of tmem_gets, read through the client's mapping: no round trip
    tmem_lost: int = 0  # pages tmem held when the daemon went away (write-through: the file has
    # them; write-back: pages only tmem held, now gone: PagesLost)
    daemon_gone: bool = False
    swap_writes_saved: int = 0  # write-back: pages tmem took that write-through would have written

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return asdict(self)


class SwapStore:
    """Pages pushed out of a guest's RAM, by slot (an unsigned 32-bit number).

    ``pool`` is a persistent pool, or None for a plain swap file (the comparison without tmem).
    ``path`` names the swap file (created or truncated, kept afterwards); without it an unnamed
    temporary file is used. Not thread-safe.
    """

    def __init__(
        self,
        pool: Pool | ResilientPool | None,
        path: str | os.PathLike[str] | None = None,
        *,
        batch: int = 64,
        disk_read: DiskRead | None = None,
        disk_write: DiskWrite | None = None,
        write_back: bool = False,
    ) -> None:
        if pool is not None and not pool.persistent:
            raise InvalidArgument("a swap store needs a persistent pool (ephemeral pages vanish)")
        if write_back and (not isinstance(pool, ResilientPool) or pool.name is None):
            raise InvalidArgument(
                "write-back needs a named persistent pool of a resilient client "
                "(tmemclient.connect_resilient(...).new_pool(persistent=True, name=...)): a page "
                "only tmem holds must survive a broken connection"
            )
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidArgument(f"batch must be an int >= 1, got {batch!r}")
        self.page_size = pool.page_size if pool is not None else FRAME_SIZE
        self.batch = batch
        self.stats = SwapStats()
        self._pool = pool
        self.write_back_mode = write_back
        self._tmem_only: set[int] = set()  # write-back: slots whose page only tmem holds
        self.lost: set[int] = set()  # write-back: slots whose only copy tmem lost
        self._resets = pool.resets if isinstance(pool, ResilientPool) else 0
        if path is None:
            self.fd, name = tempfile.mkstemp(prefix="tmem-swap-")
            os.unlink(name)  # unnamed: it disappears when closed, or if the guest dies
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._disk_read: DiskRead = disk_read or os.pread
        self._disk_write: DiskWrite = disk_write or write_pages
        self._queue: OrderedDict[int, bytes] = OrderedDict()  # stored, not yet written back
        self._live: set[int] = set()  # slots holding a page (in the queue or the file)
        # Slots whose current page tmem holds: where it went ([head, generation]), if the
        # client reads through a mapping, else True.
        self._in_tmem: dict[int, Any] = {}
        self._mapped = pool is not None and pool.mapping is not None

    @property
    def tmem(self) -> bool:
        """True while a pool is in use (False without one, and after the daemon went away)."""
        return self._pool is not None

    def __contains__(self, slot: int) -> bool:
        return slot in self._live

    def store(self, slot: int, data: Any) -> None:
        """Keep one page (replacing what the slot held)."""
        self.store_many([(slot, data)])

    def store_many(self, items: Iterable[tuple[int, Any]]) -> None:
        """Keep many pages; full batches go to tmem and the swap file."""
        for slot, data in items:
            page = bytes(data)
            if len(page) != self.page_size:
                raise InvalidArgument(f"a page is {self.page_size} bytes, got {len(page)}")
            self._check_slot(slot)
            self._queue[slot] = page
            self._queue.move_to_end(slot)
            self._live.add(slot)
            self._in_tmem.pop(slot, None)  # the older copy there is stale until the batch goes
            self._tmem_only.discard(slot)
            self.lost.discard(slot)  # a new page replaces the one that was lost
            self.stats.stores += 1
            if len(self._queue) >= self.batch:
                self.write_back()

    def load(self, slot: int) -> bytes:
        """The page stored in ``slot`` (it stays stored until invalidated)."""
        (page,) = self.load_many([slot])
        return page

    def load_many(self, slots: Sequence[int]) -> list[bytes]:
        """The pages stored in ``slots``, fetching what tmem holds in one round trip."""
        out: dict[int, bytes] = {}
        for slot in slots:
            if slot not in self._live:
                raise KeyError(f"swap slot {slot} holds no page")
        self._check_resets()
        if self.lost.intersection(slots):
            raise PagesLost(self.lost.intersection(slots))
        for slot in slots:
            page = self._queue.get(slot)
            if page is not None:
                out[slot] = page
                self.stats.queue_hits += 1
        wanted = [s for s in slots if s not in out and s in self._in_tmem]
        if wanted and self._pool is not None and self._mapped:
            wanted = self._read_mapped(wanted, out)
        if wanted and self._pool is not None:
            try:
                found = self._pool.get_many([(SWAP_OID, s) for s in wanted])
            except DaemonGone:
                if self.write_back_mode:
                    raise  # pages only tmem holds cannot be read now; they may come back
                self._daemon_gone()
                found = [None] * len(wanted)
            self.stats.tmem_get_rounds += 1
            self._check_resets()
            for slot, page in zip(wanted, found, strict=True):
                if page is not None:
                    out[slot] = page
                    self.stats.tmem_gets += 1
                else:  # not expected of a persistent pool; the file has it anyway
                    self._in_tmem.pop(slot, None)
                    if slot in self._tmem_only:  # ...unless only tmem had it
                        self._tmem_only.discard(slot)
                        self.lost.add(slot)
                        self.stats.tmem_lost += 1
            if self.lost.intersection(slots):
                raise PagesLost(self.lost.intersection(slots))
        ps = self.page_size
        for slot in slots:
            if slot not in out:
                out[slot] = self._disk_read(self.fd, ps, slot * ps)
                self.stats.swap_reads += 1
        self.stats.loads += len(slots)
        return [out[s] for s in slots]

    def invalidate(self, slot: int) -> None:
        """Forget a slot's page (the guest freed it)."""
        self.invalidate_many([slot])

    def invalidate_many(self, slots: Iterable[int]) -> None:
        """Forget many slots; what tmem held of them is flushed in one request."""
        flush = []
        for slot in slots:
            self._live.discard(slot)
            self._queue.pop(slot, None)
            self._tmem_only.discard(slot)
            self.lost.discard(slot)
            if slot in self._in_tmem:
                del self._in_tmem[slot]
                flush.append((SWAP_OID, slot))
        if flush and self._pool is not None:
            try:
                self._pool.flush_many(flush)
            except DaemonGone:
                self._daemon_gone()

    def write_back(self) -> None:
        """Send the write-back queue now: one put_many to tmem, one batch to the swap file."""
        if not self._queue:
            return
        items = list(self._queue.items())
        to_file = items
        if self._pool is not None:
            try:
                flags = self._put([(SWAP_OID, slot, page) for slot, page in items])
            except DaemonGone:
                if not self.write_back_mode:
                    self._daemon_gone()
                flags = [False] * len(items)  # write-back: this batch goes to the file
            self._check_resets()  # before this batch counts: it went to the pool as it is now
            for (slot, _), ok in zip(items, flags, strict=True):
                if ok:
                    self._in_tmem[slot] = ok
                    self.stats.tmem_puts_ok += 1
                elif self._pool is not None:
                    self.stats.tmem_puts_refused += 1
            if self.write_back_mode:  # only what tmem refused goes to the file
                to_file = [
                    (slot, page) for (slot, page), ok in zip(items, flags, strict=True) if not ok
                ]
                for (slot, _), ok in zip(items, flags, strict=True):
                    if ok:
                        self._tmem_only.add(slot)
                self.stats.swap_writes_saved += len(items) - len(to_file)
        ps = self.page_size
        if to_file:
            self._disk_write(self.fd, [(slot * ps, page) for slot, page in to_file])
            self.stats.swap_writes += len(to_file)
            self.stats.swap_write_batches += 1
        self._queue.clear()

    def _check_resets(self) -> None:
        """Write-back: if the pool came back empty since we last looked (a reconnect to a
        daemon that no longer had it), the pages only tmem held are lost: say which."""
        pool = self._pool
        if not self.write_back_mode or not isinstance(pool, ResilientPool):
            return
        if pool.resets == self._resets:
            return
        self._resets = pool.resets
        gone = self._tmem_only
        self._tmem_only = set()
        for slot in gone:
            self._in_tmem.pop(slot, None)
        self.lost |= gone
        self.stats.tmem_lost += len(gone)

    def _put(self, items: list[tuple[int, int, bytes]]) -> Sequence[Any]:
        """put_many; with a mapping, each page's token (truthy) or None, not True or False."""
        assert self._pool is not None
        if not self._mapped:
            return self._pool.put_many(items)
        return self._pool.put_many_tokens(items)

    def _read_mapped(self, wanted: list[int], out: dict[int, bytes]) -> list[int]:
        """Read what the mapping has of ``wanted`` into ``out``; the slots left over."""
        assert self._pool is not None
        left = []
        for slot in wanted:
            page = self._pool.read_mapped(self._in_tmem[slot])  # mapped: every value a token
            if page is None:
                left.append(slot)
            else:
                out[slot] = page
                self.stats.tmem_gets += 1
                self.stats.mapped_reads += 1
        return left

    def close(self) -> None:
        """Close the swap file (a temporary one disappears). The pool is the caller's."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SwapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_slot(self, slot: Any) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < 2**32:
            raise InvalidArgument(f"a swap slot is an unsigned 32-bit int, got {slot!r}")

    def _daemon_gone(self) -> None:
        # Every live page is in the queue or the file (write-through): nothing is lost.
        self.stats.daemon_gone = True
        self.stats.tmem_lost = len(self._in_tmem)
        self._in_tmem.clear()
        self._pool = None


class SwappedMemory:
    """A guest's RAM of ``ram_pages`` pages over page numbers 0.., swapping to a ``SwapStore``.

    A page pushed out is stored only if it changed since it was last loaded (a clean page's swap
    copy is still good, as in a kernel's swap cache). Pages never written read as zeros.
    """

    def __init__(self, store: SwapStore, ram_pages: int) -> None:
        if isinstance(ram_pages, bool) or not isinstance(ram_pages, int) or ram_pages < 1:
            raise InvalidArgument(f"ram_pages must be an int >= 1, got {ram_pages!r}")
        self.store = store
        self.ram_pages = ram_pages
        self.faults = 0
        self._zero = bytes(store.page_size)
        self._ram: OrderedDict[int, bytes] = OrderedDict()
        self._dirty: set[int] = set()

    def read(self, page: int) -> bytes:
        """The content of one page."""
        return self.read_many([page])[0]

    def read_many(self, pages: Sequence[int]) -> list[bytes]:
        """The content of several pages, faulting in the absent ones in one batch."""
        self._fault(pages)
        ram = self._ram
        out = []
        for page in pages:
            ram.move_to_end(page)
            out.append(ram[page])
        return out

    def write(self, page: int, data: Any) -> None:
        """Replace one page's content."""
        self.write_many([(page, data)])

    def write_many(self, items: Sequence[tuple[int, Any]]) -> None:
        """Replace several pages' content (a partial write would fault first; this API writes
        whole pages, so it never does)."""
        for page, data in items:
            content = bytes(data)
            if len(content) != self.store.page_size:
                raise InvalidArgument(f"a page is {self.store.page_size} bytes")
            self._ram[page] = content
            self._ram.move_to_end(page)
            self._dirty.add(page)
        self._push_out()

    def free(self, pages: Iterable[int]) -> None:
        """The guest no longer needs these pages: drop them from RAM and swap."""
        pages = list(pages)
        for page in pages:
            self._ram.pop(page, None)
            self._dirty.discard(page)
        self.store.invalidate_many(p for p in pages if p in self.store)

    def _fault(self, pages: Sequence[int]) -> None:
        wanted = list(dict.fromkeys(pages))
        if len(wanted) > self.ram_pages:
            raise InvalidArgument(f"{len(wanted)} pages at once do not fit {self.ram_pages} of RAM")
        absent = []
        for page in wanted:
            if page in self._ram:
                self._ram.move_to_end(page)  # so pushing out for the others spares it
            else:
                absent.append(page)
        if not absent:
            return
        self.faults += len(absent)
        swapped = [p for p in absent if p in self.store]
        loaded = dict(zip(swapped, self.store.load_many(swapped), strict=True)) if swapped else {}
        for page in absent:
            self._ram[page] = loaded.get(page, self._zero)
            if page not in loaded:
                self._dirty.add(page)  # first touch: no swap copy yet
        self._push_out()

    def _push_out(self) -> None:
        ram = self._ram
        out = []
        while len(ram) > self.ram_pages:
            page, content = ram.popitem(last=False)
            if page in self._dirty:
                self._dirty.discard(page)
                out.append((page, content))
        if out:
            self.store.store_many(out)
