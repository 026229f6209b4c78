"""The memory files the store keeps pages and lent memory in: the arena, mirrors, loans.

Each is a sealed memfd (its size fixed, so nobody who maps it can make another's access fault)
that the daemon maps read-write. Two kinds are handed to a guest: a mirror (read-only, PROTOCOL.md
§4.7) and a loan file (read-write, §4.8).

**Trust boundary.** Whatever mode a descriptor was handed with, anything a guest can map is
guest-writable: a memfd's inode is mode 0777 by default, so a read-only descriptor can be
re-opened read-write through /proc/self/fd. So:

- the daemon never reads back from a guest-reachable file a word it relies on: sequence numbers,
  lent counts, generations live in private memory here and in the store, and are only *written
  out* for the guest to read (``Mirror.publish``, ``Store._gen``);
- the one word it reads, a loan's ``ACTIVE`` time, is treated as the guest's claim, clamped to
  now;
- as defence in depth every file is ``fchmod 0400`` (owner: tmemd's uid), so a guest of another
  uid cannot re-open one at all; a guest under tmemd's own uid, or root, can, and gains nothing
  beyond its own pages;
- memory a guest can bring into a file on its own (writing its loan above what is lent, or
  touching holes of its mirror, which makes the kernel allocate them) is measured
  (``resident``) and punched again by the store's audit.

Punching (giving memory back to the kernel) goes through ``punch``: ``fallocate(PUNCH_HOLE)``
called through ctypes, which releases the GIL, so the daemon can run a large punch in a worker
thread without stalling the event loop (a resident GiB takes ~0.13 s to punch here).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from typing import Final

from mypy_extensions import mypyc_attr

from tmemclient.wire.layout import CTL_WORDS, FRAME_SHIFT, FRAME_SIZE, MirrorLayout, loan_size

FILE_MODE: Final = 0o400  # only tmemd's uid may re-open one of these files (see above)

_FALLOC_PUNCH: Final = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def punch(fd: int, offset: int, length: int) -> bool:
    """Give the memory of a byte range of a file back to the kernel: whoever maps it reads zeros
    there from now on. False if the kernel refused (the memory then simply stays)."""
    if length <= 0:
        return True
    return bool(_fallocate(fd, _FALLOC_PUNCH, offset, length) == 0)


def resident(fd: int) -> int:
    """Bytes of memory a file holds now (what its pages really cost, not its size)."""
    return os.fstat(fd).st_blocks * 512


def data_extents(fd: int, start: int, end: int, limit: int) -> Iterator[tuple[int, int]]:
    """(start, end) of up to ``limit`` ranges of a file in [start, end) that hold memory, in
    order (SEEK_DATA / SEEK_HOLE)."""
    pos = start
    for _ in range(limit):
        if pos >= end:
            return
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from pos to the end of the file
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def sealed_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A sparse memfd of ``size`` bytes (memory is used only where written), sealed against
    resizing so whoever else maps it can never fault, mode 0400, and the daemon's shared
    read-write mapping of it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, FILE_MODE)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


@mypyc_attr(allow_interpreted_subclasses=True)  # persist.StateArena (interpreted)
class MemFile:
    """A sealed memfd and the daemon's mapping of it. ``close`` is two-step so that the
    punch that frees its memory can run in a worker thread: ``punch_all`` (any thread), then
    ``close`` (the event loop's thread, where the views live)."""

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self.fd, self._map = sealed_memfd(name, size)
        self.view = memoryview(self._map)
        self.closed = False
        self.queued = 0  # punches of this file waiting for a worker thread (Store._later)

    def resident(self) -> int:
        """Bytes of memory the file holds now."""
        return resident(self.fd)

    def punch(self, offset: int, length: int) -> bool:
        """Free a byte range (see ``punch``)."""
        return punch(self.fd, offset, length)

    def punch_all(self) -> bool:
        """Free all of the file's memory (a mapping the guest keeps shows zeros)."""
        return punch(self.fd, 0, self.size)

    def open_fd(self, flags: int) -> int:
        """A new descriptor of the file for a guest (the caller closes it once sent)."""
        return os.open(f"/proc/self/fd/{self.fd}", flags | os.O_CLOEXEC)

    def _views(self) -> tuple[memoryview, ...]:
        return (self.view,)

    def close(self) -> None:
        """Release the views, unmap and close (after ``punch_all`` if the memory should go
        now rather than with the guest's last mapping)."""
        if self.closed:
            return
        self.closed = True
        for view in self._views():
            view.release()
        self._map.close()
        os.close(self.fd)


class Mirror(MemFile):
    """Where a mapped guest's pages live (PROTOCOL.md §4.7): ``slots`` slots of page data, then
    a u64 generation word and a u32 link per slot, then a page of control words for lent
    memory. The guest gets a read-only descriptor of it.

    The generation words are written here but never read back (the store keeps its own); the
    control words (seq, lent, low) live in this object and are published to the file."""

    def __init__(self, slots: int, ident: int) -> None:
        self.ident = ident  # its number in the store's owner table (0 is the arena)
        self.slots = slots
        layout = MirrorLayout(slots)
        self.gen_offset = layout.gen_offset
        self.link_offset = layout.link_offset
        self.ctl_offset = layout.ctl_offset
        super().__init__("tmem-mirror", layout.size)
        view = self.view
        self.mem = view[: self.gen_offset]
        self.gen = view[self.gen_offset : self.link_offset].cast("Q")
        self.link = view[self.link_offset : self.link_offset + 4 * slots].cast("I")
        self._ctl = view[self.ctl_offset : self.ctl_offset + 8 * CTL_WORDS].cast("Q")
        # Lent memory's state (PROTOCOL.md §4.8), authoritative here: seq is odd while a recall
        # is under way; lent and low are slots.
        self.seq = 0
        self.lent = 0
        self.low = 0
        self.owned = 0  # slots of the store whose memory is in this file (Store._owner)
        self.audit_from = 0  # where the next audit's walk of the data area resumes

    def publish(self) -> None:
        """Write the control words out for the guest (it reads them; we never do)."""
        ctl = self._ctl
        ctl[0] = self.seq
        ctl[1] = self.lent
        ctl[2] = self.low

    def published(self) -> list[int]:
        """The control words as the guest sees them in the file (tests; never used to decide
        anything)."""
        return list(self._ctl)

    def read_only_fd(self) -> int:
        """A descriptor that can only be mapped for reading (re-opening it read-write needs
        tmemd's uid: the file is 0400)."""
        return self.open_fd(os.O_RDONLY)

    def meta_bytes(self, slots_in_use: int) -> int:
        """Bytes of generation and link words, and the control page, that the daemon may have
        written for slots below ``slots_in_use``: what the file may hold beyond page data."""
        gen = -(-8 * slots_in_use // FRAME_SIZE) * FRAME_SIZE
        link = -(-4 * slots_in_use // FRAME_SIZE) * FRAME_SIZE
        return gen + link + 2 * FRAME_SIZE  # +1 page each side of the gen/link boundary, +ctl

    def _views(self) -> tuple[memoryview, ...]:
        return (self.mem, self.gen, self.link, self._ctl, self.view)


class Loan(MemFile):
    """Memory lent to a mapped guest to use as its own (PROTOCOL.md §4.8): a header page and
    then ``slots`` slots, which the guest maps read-write. The guest may use the first ``lent``
    slots (its mirror's control words say how many); the daemon takes back any part above that
    at any time, by punching it out of the file. The header's first word is the guest's: the
    CLOCK_MONOTONIC nanoseconds of its last use, which tell a busy loan from an idle one."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        super().__init__("tmem-loan", loan_size(slots))
        self._active = self.view[:8].cast("Q")
        self.pending = 0  # recalls whose punch has not run yet: no growing meanwhile

    def punched(self) -> None:
        """A recall's punch ran."""
        self.pending -= 1

    def active_ns(self, now_ns: int) -> int:
        """When the guest last used its lent memory: its own word, a claim, never later than
        ``now_ns`` (a guest writing 2**64-1 there is merely busy)."""
        return min(self._active[0], now_ns)

    def mark_active(self, now_ns: int) -> None:
        """A request of the guest's is a use too."""
        if self._active[0] < now_ns:
            self._active[0] = now_ns

    def writable_fd(self) -> int:
        """A read-write descriptor for the guest; the seals keep its size."""
        return self.open_fd(os.O_RDWR)

    def punch_from(self, slot: int) -> bool:
        """Take back every lent slot from ``slot`` on (the guest reads zeros there now)."""
        start = (slot + 1) << FRAME_SHIFT
        return start >= self.size or self.punch(start, self.size - start)

    def _views(self) -> tuple[memoryview, ...]:
        return (self._active, self.view)
