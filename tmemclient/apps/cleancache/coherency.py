"""Coherency: files opened through the cache, and what the cache must forget when they change.

One object id per file, from st_dev, st_ino and (where the filesystem has one) the inode
generation; a file replaced under the same name is a new inode, so a new object. ``open``
revalidates what the cache knew of the inode (ctime, mtime, size): a file changed behind the
cache's back, or a recycled inode, loses its cached pages here and in tmem. ``write`` goes to the
file, drops the cached blocks it touches and flushes them from tmem; ``truncate`` flushes the
object.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from typing import Any

from tmemclient.apps.cleancache.blocks import _Blocks
from tmemclient.apps.cleancache.requests import Flush, FlushObject, Plan
from tmemclient.apps.cleancache.state import PAGE
from tmemclient.wire.errors import InvalidArgument

_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode generation, where supported


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


def object_id(st: os.stat_result, generation: int = 0) -> int:
    """The tmem object id of a file: st_dev, st_ino and the inode generation, 192 bits."""
    return ((st.st_dev & (2**64 - 1)) << 128) | ((st.st_ino & (2**64 - 1)) << 64) | generation


def _generation(fd: int) -> int:
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETVERSION, b"\0" * 8)
    except OSError:
        return 0  # the filesystem has no generation: revalidation at open covers inode reuse
    return int(struct.unpack("q", raw)[0]) & (2**64 - 1)


class _Coherency(_Blocks):
    """Opening, writing, truncating and closing files: the cache never serves stale pages."""

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
            yield Flush([part for key in blocks for part in self._parts_of(key)])
        return len(view)

    def _truncate_plan(self, f: CachedFile, size: int) -> Plan:
        if f.closed or not f.writable:
            raise InvalidArgument(f"{f.path} is not open for writing through this cache")
        if size < 0:
            raise InvalidArgument("size must be >= 0")
        os.ftruncate(f.fd, size)
        yield from self._invalidate_object(f.oid)
        self._refresh(f)

    def _invalidate_object(self, oid: int) -> Plan:
        """Forget every page of the object, here and in tmem."""
        for key in [k for k in (*self._local, *self._pending) if k[0] == oid]:
            self._forget(key)  # a block
        for table in (self._shadow, self._ghost):
            for key in [k for k in table if k[0] == oid]:
                del table[key]  # a tmem page
        self._readahead = {k for k in self._readahead if k[0] != oid}
        if self.tmem:
            yield FlushObject(oid)

    def _refresh(self, f: CachedFile) -> None:
        """After our own write: remember the inode as it is now, in every handle of the file."""
        st = os.fstat(f.fd)
        self._known[f.oid] = _Known(st.st_ctime_ns, st.st_mtime_ns, st.st_size)
        for other in self._files.values():
            if other.oid == f.oid:
                other.size = st.st_size

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
