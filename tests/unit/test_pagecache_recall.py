"""The page cache (tmemclient.apps.cleancache) during a recall of its lent memory, without a
daemon: while tmemd is taking the loan back (its seq odd) the cache leaves lent memory alone
and reads straight from the file. Against a real tmemd: tests/integration/test_lend.py."""

from __future__ import annotations

from pathlib import Path

from tmemclient.apps.cleancache import PageCache
from tmemclient.mapping import LentMemory
from tmemclient.wire.layout import FRAME_SIZE

PAGE = FRAME_SIZE


def cache_file(path: Path, pages: int) -> Path:
    """A file whose page ``p`` is ``bytes([0, p % 256])`` over and over."""
    path.write_bytes(b"".join(bytes([0, p % 256]) * (PAGE // 2) for p in range(pages)))
    return path


def expected(first: int, count: int) -> bytes:
    return b"".join(bytes([0, p % 256]) * (PAGE // 2) for p in range(first, first + count))


class _BusyLoan:
    """A loan whose recall never ends (seq stays odd): the cache must leave it alone."""

    BUSY = LentMemory.BUSY

    def __init__(self) -> None:
        self.words = [1, 0, 0]
        self.seq = 0
        self.mem = memoryview(bytearray(64 * PAGE))
        self.lent = 64 * PAGE

    def mark_active(self) -> None:
        pass

    def changed(self) -> int:
        return self.BUSY


def test_a_read_during_a_recall_comes_straight_from_the_file(tmp_path: Path) -> None:
    path = cache_file(tmp_path / "data", 64)
    cache = PageCache(None, 16, block_pages=8)
    cache._loan = _BusyLoan()  # type: ignore[assignment]
    f = cache.open(path)
    for first in (0, 3, 3, 40):
        assert cache.read(f, first * PAGE + 5, 8 * PAGE) == expected(first, 9)[5 : 5 + 8 * PAGE]
    stats = cache.stats
    assert stats.pages_read == stats.disk_reads == 4 * 9 and stats.local_hits == 0
    cache.close()
