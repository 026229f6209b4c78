"""Identical pages stored once within a pool (docs/design.md §6.11, ``tmemd --dedup``): pure,
no I/O.

A ``DedupZPool`` is a ZPool (tmemd/zpool.py) whose objects may be shared: a page whose object
(raw, compressed or a word) is byte for byte one the pool already holds takes a reference to it
instead of a copy. Pages stay pages: each has its own handle, metadata and place in the LRU;
only the bytes are shared, and billed once. Sharing never crosses a pool, so never a guest:
what one guest's timing could tell of another's pages (the reason Xen removed tmem's
cross-guest dedup) is not there to tell.

Copy on write: an object that is shared is never changed in place (``replace`` says no), so a
WRITE or XCHG of one page stores a new object for it and the others keep the old one.

A shared object costs no more memory per page, so without a bound a guest could hold any
number of identical pages for nothing, and the daemon's metadata (about 100 bytes a page)
would grow without one. So an object is shared by at most ``class size // OBJ_MIN`` pages:
no page costs less than a same-filled page does (32 bytes), and the budget bounds the pages
as before. (Same-filled pages, 8 bytes in the 32-byte class, are never shared.)

Finding a match: a dict from (hash of the bytes, length, length code) to the newest object
with them, checked byte for byte before it is shared, so a hash collision only misses a share.
"""

from __future__ import annotations

from collections.abc import Callable

from tmemd.zpool import _IDX_BITS, _IDX_MASK, CLASSES, OBJ_MIN, ZPool

Key = tuple[int, int, int]  # hash of the bytes, their length, the length code


class DedupZPool(ZPool):
    """A ZPool whose objects identical pages share (module docstring)."""

    def __init__(self, mem: memoryview, relocate: Callable[[int, int], None]) -> None:
        super().__init__(mem, relocate)
        self._by_key: dict[Key, int] = {}  # the newest object with these bytes
        self._key_of: dict[int, Key] = {}
        self._sharers: dict[int, set[int]] = {}  # handle -> owners besides the zspage's own
        self.shares = 0  # pages that share another's object

    def find(self, data: bytes, code: int) -> int:
        """The handle of an object holding exactly ``data`` (of length code ``code``) that
        one more page may share, or -1."""
        handle = self._by_key.get((hash(data), len(data), code), -1)
        if handle < 0:
            return -1
        zspage = self.zspages[handle >> _IDX_BITS]
        assert zspage is not None
        limit = CLASSES[zspage.cls][0] // OBJ_MIN
        if len(self._sharers.get(handle, ())) + 2 > limit:
            return -1
        if bytes(self.read(handle, len(data))) != data:  # a hash collision
            return -1
        return handle

    def remember(self, handle: int, data: bytes, code: int) -> None:
        """``handle`` now holds ``data``: later identical pages may share it."""
        key = (hash(data), len(data), code)
        self._by_key[key] = handle
        self._key_of[handle] = key

    def share(self, handle: int, owner: int) -> None:
        """``owner`` (a page) takes a reference to the object ``handle``."""
        self._sharers.setdefault(handle, set()).add(owner)
        self.objects += 1
        self.shares += 1

    def free(self, handle: int, length: int, *, owner: int = -1, compact: bool = True) -> list[int]:
        """Drop ``owner``'s reference; the object goes with its last one."""
        sharers = self._sharers.get(handle)
        if sharers:
            if owner in sharers:
                sharers.discard(owner)
            else:  # the zspage's own owner leaves: a sharer takes its place there
                zspage = self.zspages[handle >> _IDX_BITS]
                assert zspage is not None
                zspage.owners[handle & _IDX_MASK] = sharers.pop()
            if not sharers:
                del self._sharers[handle]
            self.objects -= 1
            self.shares -= 1
            return []
        self._forget(handle)
        return super().free(handle, length, owner=owner, compact=compact)

    def replace(self, handle: int, length: int, data: bytes) -> bool:
        """In place only if no other page shares the object (copy on write)."""
        if handle in self._sharers:
            return False
        if not super().replace(handle, length, data):
            return False
        self._forget(handle)  # its old bytes are gone
        return True

    def _forget(self, handle: int) -> None:
        key = self._key_of.pop(handle, None)
        if key is not None and self._by_key.get(key) == handle:
            del self._by_key[key]

    def _moved(self, old: int, new: int, owner: int) -> None:
        key = self._key_of.pop(old, None)
        if key is not None:
            self._key_of[new] = key
            if self._by_key.get(key) == old:
                self._by_key[key] = new
        self.relocate(owner, new)
        sharers = self._sharers.pop(old, None)
        if sharers:
            self._sharers[new] = sharers
            for other in sharers:
                self.relocate(other, new)
