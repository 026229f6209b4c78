"""The page cache (tmemclient.apps.cleancache) against a real tmemd: what it reads is always the file's
current content, whatever tmem holds, and it stops bothering tmem when tmem does not pay."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Daemon

import tmemclient
from tmemclient.apps.cleancache import AsyncPageCache, CachedFile, PageCache, Request, object_id

PAGE = 4096
IO_TIMEOUT = 30.0


def content(tag: int, pages: int) -> bytes:
    """File content that no other tag produces."""
    return random.Random(tag).randbytes(pages * PAGE)


def make_file(path: Path, tag: int, pages: int) -> bytes:
    """Write a file of ``pages`` pages; its bytes."""
    data = content(tag, pages)
    path.write_bytes(data)
    return data


def guest(daemon: Daemon, map_pages: bool) -> tmemclient.Client:
    """A guest of the 16 MiB daemon, every call bounded in time."""
    c = tmemclient.connect(
        daemon.socket, name="cache", frames=512, timeout=IO_TIMEOUT, map_pages=map_pages
    )
    c._sock.settimeout(IO_TIMEOUT)
    return c


@pytest.fixture(params=[False, True], ids=["lookups", "mapped"])
def client(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[tmemclient.Client]:
    """A guest that looks pages up in tmem, and one that reads them through its mapping
    (PROTOCOL.md §4.7): what the cache reads must be the same."""
    with guest(daemon, request.param) as c:
        yield c


@pytest.fixture
def lookup_client(daemon: Daemon) -> Iterator[tmemclient.Client]:
    """A guest that looks pages up (for what only lookups do: readahead, overlap, cost)."""
    with guest(daemon, False) as c:
        yield c


def slow_pread(fd: int, length: int, offset: int) -> bytes:
    """A file read as slow as a device's: tmem lookups pay, so the cache makes them."""
    time.sleep(300e-6)
    return os.pread(fd, length, offset)


def slower_pread(fd: int, length: int, offset: int) -> bytes:
    """A device slow enough that a lookup never costs more than the read it saves, even one
    that takes a few hundred microseconds on a busy machine (for tests that count disk reads:
    at slow_pread's 300 us, one such lookup made the cache read a page from the file)."""
    time.sleep(1e-3)
    return os.pread(fd, length, offset)


def read_all(cache: PageCache, f: CachedFile, pages: int, run: int = 4) -> bytes:
    """Read a file through the cache, ``run`` pages at a time."""
    return b"".join(cache.read(f, i * PAGE, run * PAGE) for i in range(0, pages, run))


def counts_add_up(cache: PageCache | AsyncPageCache) -> bool:
    """Every page read was a local hit, a tmem hit or a disk read."""
    s = cache.stats
    return s.local_hits + s.tmem_hits + s.disk_reads == s.pages_read


@pytest.mark.parametrize("block_pages", [1, 8])
def test_pages_evicted_to_tmem_come_back_byte_exact(
    client: tmemclient.Client, tmp_path: Path, block_pages: int
) -> None:
    data = make_file(tmp_path / "f", 1, 256)
    pool = client.new_pool(page_size=block_pages * PAGE)
    with PageCache(pool, capacity=48, put_batch=16, disk_read=slower_pread) as cache:
        f = cache.open(tmp_path / "f")
        assert read_all(cache, f, 256) == data
        assert cache.stats.disk_reads == 256 and cache.stats.tmem_gets == 0  # cold: no lookups
        assert read_all(cache, f, 256) == data
        # Everything came back from the local cache and tmem (directly, or read ahead).
        assert cache.stats.disk_reads == 256
        assert cache.stats.tmem_hits > 0
        if client.mapping is None:
            assert cache.stats.readahead > 0 and cache.stats.mapped_reads == 0
        else:  # no lookup at all: every tmem page came through the mapping
            assert cache.stats.tmem_gets == 0 and cache.stats.mapped_reads > 0
        assert counts_add_up(cache)
        assert cache.cached_pages <= 48 + 4  # a read may overshoot by its own pages


def test_unaligned_reads_and_the_end_of_the_file(client: tmemclient.Client, tmp_path: Path) -> None:
    data = content(2, 10)[: 10 * PAGE - 100]  # the last page is partial
    (tmp_path / "f").write_bytes(data)
    with PageCache(
        client.new_pool(page_size=4 * PAGE), capacity=16, put_batch=4, disk_read=slow_pread
    ) as cache:
        f = cache.open(tmp_path / "f")
        for _ in range(3):
            for offset, length in [
                (0, 1),
                (4000, 300),
                (5 * PAGE + 7, 9000),
                (len(data) - 50, 999),
            ]:
                assert cache.read(f, offset, length) == data[offset : offset + length]
        assert cache.read(f, len(data), 10) == b""
        assert counts_add_up(cache)


def test_a_write_after_a_put_is_what_reads_return(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    make_file(tmp_path / "f", 3, 64)
    pool = client.new_pool()
    with PageCache(pool, capacity=16, put_batch=8, disk_read=slow_pread) as cache:
        f = cache.open(tmp_path / "f", writable=True)
        read_all(cache, f, 64)
        cache.put_pending()
        client.wait_deferred()
        assert pool.get(f.oid, 0) is not None or pool.get(f.oid, 1) is not None  # tmem had them
        new = content(30, 64)
        assert cache.write(f, 0, new) == len(new)
        for index in range(64):  # the write flushed every page it touched from tmem
            assert pool.get(f.oid, index) is None
        assert read_all(cache, f, 64) == new
        assert (tmp_path / "f").read_bytes() == new


def test_a_partial_write_keeps_the_rest_of_the_page(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    data = bytearray(make_file(tmp_path / "f", 4, 32))
    with PageCache(
        client.new_pool(page_size=8 * PAGE), capacity=24, put_batch=8, disk_read=slow_pread
    ) as cache:
        f = cache.open(tmp_path / "f", writable=True)
        read_all(cache, f, 32)
        cache.write(f, 3 * PAGE + 10, b"new bytes")
        data[3 * PAGE + 10 : 3 * PAGE + 19] = b"new bytes"
        assert read_all(cache, f, 32) == bytes(data)
        assert read_all(cache, f, 32) == bytes(data)


def test_truncate_flushes_the_object(client: tmemclient.Client, tmp_path: Path) -> None:
    make_file(tmp_path / "f", 5, 64)
    pool = client.new_pool()
    with PageCache(pool, capacity=16, put_batch=8, disk_read=slow_pread) as cache:
        f = cache.open(tmp_path / "f", writable=True)
        read_all(cache, f, 64)
        cache.put_pending()
        cache.truncate(f, 10)
        assert f.size == 10
        client.wait_deferred()
        assert all(pool.get(f.oid, i) is None for i in range(64))
        assert cache.read(f, 0, 64 * PAGE) == content(5, 1)[:10]
        cache.truncate(f, 2 * PAGE)  # extending reads zeros past the old end
        assert cache.read(f, 0, 2 * PAGE) == content(5, 1)[:10] + bytes(2 * PAGE - 10)


def test_a_file_replaced_under_the_same_name_is_never_read_stale(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    old = make_file(path, 6, 64)
    with PageCache(client.new_pool(), capacity=16, put_batch=8, disk_read=slow_pread) as cache:
        f = cache.open(path)
        assert read_all(cache, f, 64) == old
        read_all(cache, f, 64)  # now tmem holds most of it
        cache.close_file(f)
        new = make_file(tmp_path / "f.new", 7, 64)
        os.replace(tmp_path / "f.new", path)
        g = cache.open(path)
        assert g.oid != f.oid  # a new inode, a new object
        assert read_all(cache, g, 64) == new


def test_a_file_recreated_or_changed_behind_the_cache_is_revalidated(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    path = tmp_path / "f"
    make_file(path, 8, 32)
    with PageCache(client.new_pool(), capacity=8, put_batch=4, disk_read=slow_pread) as cache:
        f = cache.open(path)
        read_all(cache, f, 32)
        read_all(cache, f, 32)
        cache.close_file(f)
        # Deleted and created again: the inode number may well be reused.
        path.unlink()
        new = make_file(path, 9, 32)
        g = cache.open(path)
        assert read_all(cache, g, 32) == new
        cache.close_file(g)
        # Changed in place by someone else, size unchanged: mtime and ctime tell.
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"X" * PAGE, 5 * PAGE)
        os.close(fd)
        h = cache.open(path)
        assert h.oid == g.oid
        assert cache.read(h, 5 * PAGE, PAGE) == b"X" * PAGE
        assert read_all(cache, h, 32) == new[: 5 * PAGE] + b"X" * PAGE + new[6 * PAGE :]


def test_object_ids_carry_device_and_inode(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    st = os.stat(tmp_path / "f")
    oid = object_id(st, 7)
    assert oid >> 128 == st.st_dev and (oid >> 64) & (2**64 - 1) == st.st_ino
    assert oid & (2**64 - 1) == 7 and oid < 2**192


def test_a_guest_that_tmem_does_not_pay_backs_off(start_daemon: Any, tmp_path: Path) -> None:
    # A scan of 1024 pages through 16 local pages and 32 pages of tmem: nothing comes back.
    daemon = start_daemon("--memory", "128KiB")
    data = make_file(tmp_path / "f", 10, 1024)
    with tmemclient.connect(daemon.socket, name="scanner", timeout=IO_TIMEOUT) as client:
        client._sock.settimeout(IO_TIMEOUT)
        with PageCache(
            client.new_pool(), capacity=16, put_batch=8, window=32, disk_read=slow_pread
        ) as cache:
            f = cache.open(tmp_path / "f")
            for _ in range(3):
                assert read_all(cache, f, 1024, run=8) == data
            assert cache.sampling and cache.stats.backoffs == 1
            puts_before = cache.stats.pages_put
            assert read_all(cache, f, 1024, run=8) == data
            # Sampling: about 1 page in 16 is offered to tmem any more.
            assert cache.stats.pages_put - puts_before < 1024 // 4
            assert counts_add_up(cache)
            # A working set tmem can hold: the sample pays again, the cache goes back.
            for _ in range(40):
                read_all(cache, f, 40, run=8)
                if not cache.sampling:
                    break
            assert not cache.sampling and cache.stats.resumes == 1
            assert read_all(cache, f, 1024, run=8) == data


def test_the_cache_carries_on_when_the_daemon_goes_away(start_daemon: Any, tmp_path: Path) -> None:
    daemon = start_daemon("--memory", "4MiB")
    data = make_file(tmp_path / "f", 11, 128)
    with tmemclient.connect(daemon.socket, name="orphan", timeout=IO_TIMEOUT) as client:
        client._sock.settimeout(IO_TIMEOUT)
        with PageCache(client.new_pool(), capacity=16, put_batch=8, disk_read=slow_pread) as cache:
            f = cache.open(tmp_path / "f", writable=True)
            read_all(cache, f, 128)
            daemon.stop()
            assert read_all(cache, f, 128) == data
            assert read_all(cache, f, 128) == data
            assert not cache.tmem
            cache.write(f, 0, b"still writable")
            assert cache.read(f, 0, 14) == b"still writable"
            assert counts_add_up(cache)


def test_pages_read_ahead_on_a_sequential_scan(
    lookup_client: tmemclient.Client, tmp_path: Path
) -> None:
    data = make_file(tmp_path / "f", 12, 512)
    with PageCache(
        lookup_client.new_pool(page_size=8 * PAGE), capacity=64, put_batch=16, readahead=32
    ) as cache:
        f = cache.open(tmp_path / "f")
        read_all(cache, f, 512, run=8)
        gets_before = cache.stats.tmem_gets
        assert read_all(cache, f, 512, run=8) == data
        assert cache.stats.readahead > 0
        # Each lookup brings the read's block and the blocks ahead: far fewer round trips than
        # reads.
        assert cache.stats.tmem_gets - gets_before < 512 // 8 // 2


@pytest.mark.parametrize("map_pages", [False, True], ids=["lookups", "mapped"])
async def test_the_trio_cache_has_the_same_semantics(
    daemon: Daemon, tmp_path: Path, map_pages: bool
) -> None:
    data = make_file(tmp_path / "f", 13, 128)
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            daemon.socket, name="trio-cache", map_pages=map_pages
        ) as client:
            assert (client.mapping is not None) == map_pages
            pool = await client.new_pool(page_size=2 * PAGE)
            cache = AsyncPageCache(pool, capacity=16, put_batch=8, disk_read=slow_pread)
            f = await cache.open(tmp_path / "f", writable=True)
            for _ in range(2):
                got = b"".join([await cache.read(f, i * PAGE, 4 * PAGE) for i in range(0, 128, 4)])
                assert got == data
            assert cache.stats.tmem_hits > 0 and counts_add_up(cache)
            if map_pages:  # every tmem hit through the mapping, none by a lookup
                assert cache.stats.mapped_reads > 0 and cache.stats.tmem_gets == 0
            await cache.write(f, PAGE, b"Z" * PAGE)
            assert (
                await cache.read(f, 0, 3 * PAGE)
                == data[:PAGE] + b"Z" * PAGE + data[2 * PAGE : 3 * PAGE]
            )
            await cache.truncate(f, PAGE)
            assert await cache.read(f, 0, 3 * PAGE) == data[:PAGE]
            cache.close()


def test_tmem_pages_smaller_than_a_block_carry_only_the_pages_held(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    # Blocks of 8 pages locally, 4 KiB pages in tmem: a block read in part costs tmem only the
    # pages it holds, and every page comes back byte-exact.
    data = make_file(tmp_path / "f", 14, 256)
    pool = client.new_pool()
    with PageCache(pool, capacity=48, block_pages=8, put_batch=16, disk_read=slow_pread) as cache:
        f = cache.open(tmp_path / "f", writable=True)
        rng = random.Random(3)
        for _ in range(3):
            for _ in range(100):
                first = rng.randrange(256 - 3)
                assert (
                    cache.read(f, first * PAGE, 3 * PAGE) == data[first * PAGE : (first + 3) * PAGE]
                )
        assert cache.stats.tmem_hits > 0 and counts_add_up(cache)
        assert cache.stats.puts == cache.stats.pages_put  # one tmem page per page held
        cache.put_pending()
        client.wait_deferred()
        # A write drops the block it touches here and in tmem, whichever tmem pages it had.
        new = content(15, 16)
        cache.write(f, 8 * PAGE, new)
        for index in range(8, 24):
            assert pool.get(f.oid, index) is None
        expected = data[: 8 * PAGE] + new + data[24 * PAGE :]
        assert read_all(cache, f, 256) == expected
        assert read_all(cache, f, 256) == expected


def test_a_pool_page_larger_than_the_block_is_refused(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    with pytest.raises(tmemclient.InvalidArgument):
        PageCache(client.new_pool(page_size=4 * PAGE), capacity=64, block_pages=2)


def test_files_are_read_while_a_lookup_is_on_its_way(
    lookup_client: tmemclient.Client, tmp_path: Path
) -> None:
    # Random reads: most need pages from tmem and from the file at once; the file is read while
    # tmem answers (a helper thread waits for the answer), and nothing changes in what is read.
    data = make_file(tmp_path / "f", 16, 256)
    pool = lookup_client.new_pool(page_size=4 * PAGE)
    with PageCache(pool, capacity=32, put_batch=8, disk_read=slow_pread, overlap=True) as cache:
        f = cache.open(tmp_path / "f")
        rng = random.Random(5)
        for _ in range(400):
            first = rng.randrange(256 - 6)
            assert cache.read(f, first * PAGE, 6 * PAGE) == data[first * PAGE : (first + 6) * PAGE]
        assert cache.stats.overlapped_gets > 0 and cache.stats.tmem_hits > 0
        assert counts_add_up(cache)
    assert cache._fetcher is None  # closing the cache ended the thread


def test_lookups_skipped_for_their_cost_are_not_judged_as_misses(
    lookup_client: tmemclient.Client, tmp_path: Path
) -> None:
    # Whether a lookup pays is the cost model's call (a fast disk, a slow daemon); a lookup it
    # skips says nothing of tmem's hit rate, so it must not make the cache back off.
    data = make_file(tmp_path / "f", 17, 128)
    with PageCache(lookup_client.new_pool(), capacity=16, put_batch=8, window=16) as cache:
        cache._worth_asking = lambda pages, hidden: False  # type: ignore[method-assign]
        f = cache.open(tmp_path / "f")
        rng = random.Random(7)
        for _ in range(600):
            first = rng.randrange(128 - 4)
            assert cache.read(f, first * PAGE, 4 * PAGE) == data[first * PAGE : (first + 4) * PAGE]
        assert cache.stats.lookups_skipped > 16 * 4
        assert not cache.sampling and cache.stats.backoffs == 0
        assert counts_add_up(cache)


def test_a_file_read_failing_during_a_lookup_leaves_no_answer_behind(
    lookup_client: tmemclient.Client, tmp_path: Path
) -> None:
    # A file read fails while a lookup is on its way: the read raises, and the lookup's answer
    # is collected, never handed to the next read's lookup.
    data = make_file(tmp_path / "f", 18, 256)
    calls = 0

    def flaky_pread(fd: int, length: int, offset: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls % 37 == 0:
            raise OSError("I/O error")
        return slow_pread(fd, length, offset)

    pool = lookup_client.new_pool(page_size=4 * PAGE)
    with PageCache(pool, capacity=32, put_batch=8, disk_read=flaky_pread, overlap=True) as cache:
        f = cache.open(tmp_path / "f")
        rng = random.Random(9)
        failed = 0
        for _ in range(500):
            first = rng.randrange(256 - 6)
            try:
                got = cache.read(f, first * PAGE, 6 * PAGE)
            except OSError:
                failed += 1
                continue
            assert got == data[first * PAGE : (first + 6) * PAGE]
        assert failed > 0 and cache.stats.overlapped_gets > 0


def sparse_reads(cache: PageCache, f: CachedFile, data: bytes, pages: int, count: int) -> None:
    """Random reads of 3 pages: blocks of 8 pages are left partly read."""
    rng = random.Random(11)
    for _ in range(count):
        first = rng.randrange(pages - 3)
        assert cache.read(f, first * PAGE, 3 * PAGE) == data[first * PAGE : (first + 3) * PAGE]


def test_under_pressure_tmem_gets_the_dense_blocks(start_daemon: Any, tmp_path: Path) -> None:
    # tmem holds 8 blocks of 32 KiB: it drops our pages before we come back for most of them, so
    # a block that holds little is not worth a whole tmem page and is not put.
    daemon = start_daemon("--memory", "256KiB")
    data = make_file(tmp_path / "f", 19, 512)
    with tmemclient.connect(daemon.socket, name="squeezed", timeout=IO_TIMEOUT) as client:
        client._sock.settimeout(IO_TIMEOUT)
        pool = client.new_pool(page_size=8 * PAGE)
        with PageCache(pool, capacity=48, put_batch=16, disk_read=slow_pread) as cache:
            f = cache.open(tmp_path / "f")
            sparse_reads(cache, f, data, 512, 600)
            assert cache.stats.sparse_dropped > 0 and cache.stats.puts > 0
            assert counts_add_up(cache)


def test_with_room_in_tmem_every_block_is_put(client: tmemclient.Client, tmp_path: Path) -> None:
    data = make_file(tmp_path / "f", 20, 256)
    with PageCache(
        client.new_pool(page_size=8 * PAGE), capacity=48, put_batch=16, disk_read=slow_pread
    ) as cache:
        f = cache.open(tmp_path / "f")
        sparse_reads(cache, f, data, 256, 400)
        assert cache.stats.sparse_dropped == 0 and cache.stats.tmem_hits > 0
        assert counts_add_up(cache)


def test_tmem_returning_a_page_put_before_one_it_dropped(
    client: tmemclient.Client, tmp_path: Path
) -> None:
    # The shadow assumes tmem drops our pages in put order. Here page 1 is put before page 0,
    # and page 0 alone leaves tmem: one lookup finds 0 missing (trimming everything put before
    # it, page 1 included) and 1 there. The read must still be right, and must not crash.
    data = make_file(tmp_path / "f", 21, 64)
    pool = client.new_pool()
    with PageCache(pool, capacity=16, put_batch=8, disk_read=slow_pread) as cache:
        f = cache.open(tmp_path / "f")
        cache.read(f, 1 * PAGE, PAGE)
        cache.read(f, 0, PAGE)
        for index in range(10, 40):  # pushes 1, then 0, out to tmem
            cache.read(f, index * PAGE, PAGE)
        cache.put_pending()
        client.wait_deferred()
        pool.flush(f.oid, 0)
        assert cache.read(f, 0, 2 * PAGE) == data[: 2 * PAGE]
        assert cache.stats.tmem_misses >= 1 and cache.stats.tmem_hits >= 1
        assert read_all(cache, f, 64) == data


class RecordingCache(PageCache):
    """A page cache that logs the kind of every request it makes of tmem."""

    log: list[str]

    def _do(self, request: Request) -> Any:
        self.log.append(type(request).__name__)
        return super()._do(request)


def test_evicted_blocks_go_behind_a_lookup_not_before_the_next(
    lookup_client: tmemclient.Client, tmp_path: Path
) -> None:
    """A read that asks tmem sends the blocks gathered for a put right after its lookup, so
    tmemd stores them while the file is read, and the next read's lookup does not wait behind
    them; a read that asks nothing sends them at its end, as before."""
    data = make_file(tmp_path / "f", 9, 256)
    log: list[str] = []

    def logged_pread(fd: int, length: int, offset: int) -> bytes:
        log.append("disk")
        return slow_pread(fd, length, offset)

    cache = RecordingCache(
        lookup_client.new_pool(), capacity=32, put_batch=8, disk_read=logged_pread
    )
    cache.log = log
    with cache:
        f = cache.open(tmp_path / "f")
        rng = random.Random(3)
        lookups = puts_behind = 0
        for _ in range(150):
            start = rng.randrange(0, 256 - 4)
            log.clear()
            assert cache.read(f, start * PAGE, 4 * PAGE) == data[start * PAGE : (start + 4) * PAGE]
            io = [kind for kind in log if kind != "disk"]
            if "Get" in io:
                lookups += 1
                assert io in (["Get"], ["Get", "Put"]), log  # one lookup, any put behind it
                if "Put" in io:
                    assert log[1] == "Put", log  # before the file is read
                    puts_behind += 1
            else:
                assert io in ([], ["Put"]) and log[-1:] != ["Get"], log
        assert lookups > 10 and puts_behind > 5 and cache.stats.tmem_hits > 0
        assert counts_add_up(cache)


async def test_a_request_of_no_known_kind_is_an_error_not_a_flush(
    lookup_client: tmemclient.Client,
) -> None:
    """Both drivers make every kind of request the cache's plans make and refuse anything else
    (an unknown kind once fell through to flush_object), with tmem or without."""
    pool = lookup_client.new_pool()
    assert pool.put(7, 0, bytes([1]) * PAGE)
    caches = [PageCache(pool, capacity=16, put_batch=8), PageCache(None, capacity=16)]
    for cache in caches:
        with pytest.raises(TypeError, match="not a page cache request"):
            cache._do(("flush_object", 7))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a page cache request"):
            cache._do(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a page cache request"):
        await AsyncPageCache(None, capacity=16)._do(("flush_object", 7))  # type: ignore[arg-type]
    assert pool.get(7, 0) == bytes([1]) * PAGE  # nothing was flushed


def test_a_mapped_cache_reads_tmem_without_lookups_and_puts_only_what_changed(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Through the mapping a tmem hit costs no round trip and leaves the page in tmem, so a
    block evicted again unchanged is not put again; a block that changed (its file was
    written) is never read back stale."""
    data = bytearray(make_file(tmp_path / "f", 11, 128))
    with (
        guest(daemon, True) as c,
        PageCache(c.new_pool(), capacity=32, put_batch=8, disk_read=slow_pread) as cache,
    ):
        f = cache.open(tmp_path / "f", writable=True)
        for _ in range(3):
            assert read_all(cache, f, 128) == data
        s = cache.stats
        assert s.tmem_gets == 0 and s.mapped_reads > 0 and s.puts_skipped > 0
        assert s.disk_reads == 128  # everything after the first pass came from memory
        cache.write(f, 5 * PAGE, b"new" * 100)
        data[5 * PAGE : 5 * PAGE + 300] = b"new" * 100
        assert read_all(cache, f, 128) == data
        assert counts_add_up(cache)
