"""Lent memory (PROTOCOL.md §4.8) against a real tmemd: a mapped guest borrows memory from the
budget to use as its own; tmemd takes it back, without asking, when another guest needs it, and
the guest sees exactly what it lost, never a torn or foreign byte."""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Daemon

import tmemclient
from tmemclient.apps.cleancache import AsyncPageCache, PageCache
from tmemclient.mapping import LentMemory
from tmemclient.wire.errors import InvalidArgument
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Op
from tmemd.ctl.client import AdminClient

PAGE = FRAME_SIZE
MIB = 1 << 20


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The tmemd this module's tests share (conftest's ``shared_daemon``, checked after each
    test); a test that needs other options starts its own with ``start_daemon``."""
    return shared_daemon


def borrower(daemon: Daemon, name: str, **kwargs: Any) -> tmemclient.Client:
    client = tmemclient.connect(
        daemon.socket, name=name, frames=64, map_pages=True, lend_memory=True, **kwargs
    )
    client._sock.settimeout(30)
    return client


def loan_of(client: tmemclient.Client) -> LentMemory:
    assert client.mapping is not None and client.mapping.loan is not None
    return client.mapping.loan


def admin_daemon(start_daemon: Any, tmp_path: Path, *args: str) -> tuple[Daemon, AdminClient]:
    admin = tmp_path / "admin" / "admin.sock"
    admin.parent.mkdir(mode=0o700)
    daemon = start_daemon("--admin-socket", str(admin), *args)
    return daemon, AdminClient(admin)


def test_a_loan_is_memory_of_ones_own_until_another_guest_needs_it(
    start_daemon: Any, tmp_path: Path
) -> None:
    daemon, admin = admin_daemon(start_daemon, tmp_path, "--memory", "4MiB")
    with borrower(daemon, "a") as a, borrower(daemon, "b") as b:
        la, lb = loan_of(a), loan_of(b)
        answer = a.lend(16 * MIB)  # more than there is: all of it
        assert answer["lent"] == 4 * MIB and answer["room"] == 0
        assert la.answered(answer) == 0 and la.lent == 4 * MIB
        data = random.Random(1).randbytes(4 * MIB)
        la.mem[: len(data)] = data
        la.mark_active()
        rows = {r["name"].split("/")[-1]: r for r in admin.call("guests")}
        assert rows["a"]["lent_bytes"] == 4 * MIB
        assert admin.call("status")["lent"] == 4 * MIB

        # b is busy too: it gets its share (half, equal weights), taken from the top of a's.
        answer = b.lend(4 * MIB)
        assert answer["lent"] == 2 * MIB and lb.answered(answer) == 0
        assert la.changed() == 2 * MIB  # what a kept from 2 MiB up is gone...
        assert la.lent == 2 * MIB
        assert la.mem[: 2 * MIB] == data[: 2 * MIB]  # ...and nothing below it
        assert la.mem[2 * MIB : 2 * MIB + PAGE] == bytes(PAGE)  # punched: zeros
        assert admin.call("status")["recalled"] == 2 * MIB

        # a stops using its memory: after lend_idle_ms (100), b may take all of it.
        deadline = time.monotonic() + 10
        while b.lend(4 * MIB)["lent"] < 4 * MIB:
            assert time.monotonic() < deadline, "a's idle loan was never taken back"
            time.sleep(0.05)
        assert la.changed() == 0 and la.lent == 0

        # Giving back: b asks for less.
        assert b.lend(MIB)["lent"] == MIB
        assert admin.call("status")["used"] == MIB
    # Sessions over: everything lent is back.
    daemon.wait_event("guest_disconnected", 2)
    assert admin.call("status")["lent"] == 0


def test_a_guest_that_puts_gets_its_share_of_a_busy_loan_and_all_of_an_idle_one(
    start_daemon: Any, tmp_path: Path
) -> None:
    daemon, _ = admin_daemon(start_daemon, tmp_path, "--memory", "1MiB")
    with borrower(daemon, "a") as a, tmemclient.connect(daemon.socket, name="p") as p:
        la = loan_of(a)
        la.answered(a.lend(MIB))
        la.mark_active()
        pool = p.new_pool()
        pages = MIB // PAGE  # pages that do not pack (design.md §6.11): a slot each
        assert all(
            pool.put_many([(1, i, bytes([i % 256]) * (PAGE - 1) + b"-") for i in range(pages)])
        )
        assert la.changed() == MIB // 2 and la.lent == MIB // 2  # a keeps its half
        la.mark_active()
        assert sum(pool.get(1, i) is not None for i in range(pages)) == pages // 2
        # a stops using its loan: lend_idle_ms (100) after its last use, puts take all of it.
        deadline = time.monotonic() + 10
        oid = 2
        while la.lent > 0:
            assert time.monotonic() < deadline, "a's idle loan was never taken back"
            assert all(pool.put_many([(oid, i, b"y" * (PAGE - 1) + b"-") for i in range(pages)]))
            oid += 1
            time.sleep(0.01)
        assert la.changed() == 0  # and a is told all of it is gone


def test_the_loan_file_cannot_change_size_and_is_the_guests_alone(daemon: Daemon) -> None:
    with borrower(daemon, "a") as a, borrower(daemon, "b") as b:
        la, lb = loan_of(a), loan_of(b)
        la.answered(a.lend(MIB))
        lb.answered(b.lend(MIB))
        la.mem[:5] = b"mine!"
        assert lb.mem[:5] == bytes(5)  # separate files
    # The descriptor itself: a fresh connection, its fd from the HELLO reply before mapping.
    client = borrower(daemon, "c")
    try:
        loan = loan_of(client)
        size = loan.size + PAGE
        path = f"/proc/{os.getpid()}/map_files"
        assert os.path.isdir(path)
        for name in os.listdir(path):
            try:
                target = os.readlink(os.path.join(path, name))
            except OSError:
                continue
            if "tmem-loan" in target:
                fd = os.open(os.path.join(path, name), os.O_RDWR)
                try:
                    for new in (size + PAGE, size - PAGE):
                        with pytest.raises(OSError) as info:
                            os.ftruncate(fd, new)
                        assert info.value.errno == errno.EPERM
                finally:
                    os.close(fd)
                break
        else:
            pytest.fail("the loan file is not mapped")
    finally:
        client.close()


def test_bad_lend_requests_get_a_clear_error_and_the_connection_goes_on(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="plain", map_pages=True) as plain:
        with pytest.raises(InvalidArgument, match="LEND needs a loan file"):
            plain.lend(MIB)
        plain.ping()
    with borrower(daemon, "a") as a:
        for bad, needle in (
            (-1, "want must be an unsigned 64-bit integer, got -1"),
            ("1M", "want must be an unsigned integer, got str"),
            (True, "want must be an unsigned integer, got bool"),
            (1.5, "want must be an unsigned integer, got float"),
        ):
            with pytest.raises(InvalidArgument, match=needle):
                a._exchange([[Op.LEND, bad]])
        with pytest.raises(InvalidArgument, match="LEND takes 1 arguments"):
            a._exchange([[Op.LEND]])
        assert a.lend(MIB)["lent"] == MIB  # and the connection works
    with pytest.raises(InvalidArgument, match="lend_memory needs map_pages"):
        tmemclient.connect(daemon.socket, name="x", lend_memory=True)


def test_one_borrowing_session_per_guest_and_lending_can_be_off(
    start_daemon: Any, tmp_path: Path
) -> None:
    config = tmp_path / "tmemd.toml"
    config.write_text(f"[guests.twice]\nuids = [{os.getuid()}]\nsessions = 2\n")
    daemon = start_daemon("--config", str(config))
    with borrower(daemon, "twice") as first, borrower(daemon, "twice") as second:
        assert first.mapping is not None and first.mapping.loan is not None
        assert second.mapping is not None and second.mapping.loan is None  # declined
        with pytest.raises(InvalidArgument, match="LEND needs a loan file"):
            second.lend(MIB)
    off = start_daemon("--no-lend-memory", name="off")
    with borrower(off, "a") as a:
        assert a.mapping is not None and a.mapping.loan is None  # mapped, but no loan
    logged = [e for e in off.events("guest_connected")]
    assert logged and logged[-1]["lending"] is False


def cache_files(tmp_path: Path, count: int, pages: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp_path / f"data{i}"
        path.write_bytes(b"".join(bytes([i, p % 256]) * (PAGE // 2) for p in range(pages)))
        paths.append(path)
    return paths


def expected(i: int, first: int, count: int) -> bytes:
    return b"".join(bytes([i, p % 256]) * (PAGE // 2) for p in range(first, first + count))


def test_a_page_cache_keeps_blocks_in_lent_memory_and_survives_recalls(
    start_daemon: Any, tmp_path: Path
) -> None:
    daemon = start_daemon("--memory", "2MiB")
    paths = cache_files(tmp_path, 2, 256)
    with borrower(daemon, "cache") as client, borrower(daemon, "rival") as rival:
        pool = client.new_pool(page_size=8 * PAGE)
        cache = PageCache(pool, 64, block_pages=8, put_batch=16, borrow=2 * MIB)
        files = [cache.open(p) for p in paths]
        rng = random.Random(5)
        lr = loan_of(rival)
        for n in range(3000):
            i, first = rng.randrange(2), rng.randrange(256 - 8)
            assert cache.read(files[i], first * PAGE, 8 * PAGE) == expected(i, first, 8)
            if n == 1500:  # a busy rival takes its share back, mid-run
                lr.mark_active()
                assert lr.answered(rival.lend(2 * MIB)) == 0
                assert rival.lend(2 * MIB)["lent"] == MIB
        stats = cache.stats
        assert stats.lends >= 1 and stats.lent_hits > 0
        assert stats.lent_lost > 0  # the recall cost it blocks...
        assert stats.local_hits + stats.tmem_hits + stats.disk_reads == stats.pages_read
        # ...and writes still invalidate what lent memory holds.
        cache.close()
        cache = PageCache(pool, 64, block_pages=8, put_batch=16, borrow=MIB)
        f = cache.open(paths[0], writable=True)
        for first in range(0, 248, 8):
            assert cache.read(f, first * PAGE, 8 * PAGE) == expected(0, first, 8)
        assert cache.cached_pages > 64  # beyond its own capacity: lent memory holds some
        cache.write(f, 0, b"\xff" * (256 * PAGE))
        for first in range(0, 248, 8):
            assert cache.read(f, first * PAGE, 8 * PAGE) == b"\xff" * (8 * PAGE)
        cache.close()


@asynccontextmanager
async def trio_cache(daemon: Daemon, capacity: int, borrow: int) -> AsyncIterator[AsyncPageCache]:
    """A trio page cache of ``capacity`` pages that borrows up to ``borrow`` bytes."""
    with trio.fail_after(60):
        async with tmemclient.open_client(
            daemon.socket, name="t", map_pages=True, lend_memory=True
        ) as client:
            pool = await client.new_pool(page_size=8 * PAGE)
            cache = AsyncPageCache(pool, capacity, block_pages=8, put_batch=8, borrow=borrow)
            try:
                yield cache
            finally:
                cache.close()


async def test_the_trio_page_cache_borrows_too(daemon: Daemon, tmp_path: Path) -> None:
    paths = cache_files(tmp_path, 1, 128)
    async with trio_cache(daemon, 32, MIB) as cache:
        f = await cache.open(paths[0])
        rng = random.Random(3)
        for _ in range(400):
            first = rng.randrange(128 - 8)
            assert await cache.read(f, first * PAGE, 8 * PAGE) == expected(0, first, 8)
        assert cache.stats.lends >= 1 and cache.stats.lent_hits > 0
        assert cache.cached_pages > 32


def test_a_recall_in_the_middle_of_a_read_never_returns_a_punched_page(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The rival takes memory back while the cache is reading the file for a read whose other
    pages sit in lent memory: the read is made again, and counted once."""
    daemon = start_daemon("--memory", "1MiB")
    paths = cache_files(tmp_path, 1, 256)
    with borrower(daemon, "cache") as client, borrower(daemon, "rival") as rival:
        lr = loan_of(rival)
        recalls = 0

        def disk_read(fd: int, length: int, offset: int) -> bytes:
            nonlocal recalls
            data = os.pread(fd, length, offset)
            if armed and recalls < 3:
                recalls += 1
                lr.mark_active()  # busy, and below its share: takes the cache's
                lr.answered(rival.lend(MIB))
                lr.answered(rival.lend(0))  # and gives it straight back to the budget
            return data

        armed = False
        pool = client.new_pool(page_size=8 * PAGE)
        cache = PageCache(pool, 16, block_pages=8, put_batch=8, borrow=MIB, disk_read=disk_read)
        f = cache.open(paths[0])
        for first in range(0, 248, 8):  # fill: most of it lands in lent memory
            assert cache.read(f, first * PAGE, 8 * PAGE) == expected(0, first, 8)
        assert cache.stats.lent_hits == 0 and loan_of(client).lent > 0
        armed = True
        reads = 0
        rng = random.Random(9)
        while recalls < 3 and reads < 500:
            first = rng.randrange(256 - 12)
            assert cache.read(f, first * PAGE, 12 * PAGE) == expected(0, first, 12)
            reads += 1
        assert recalls == 3, "no read reached the file"
        stats = cache.stats
        assert stats.lent_lost > 0
        assert stats.pages_read == 31 * 8 + 12 * reads
        assert stats.local_hits + stats.tmem_hits + stats.disk_reads == stats.pages_read
        cache.close()


async def test_tasks_sharing_a_trio_page_cache_take_turns(daemon: Daemon, tmp_path: Path) -> None:
    """Reads of several tasks interleave at their awaits (a LEND, a put): each still gets its
    own bytes, though another's eviction reuses lent frames meanwhile."""
    paths = cache_files(tmp_path, 2, 128)
    async with trio_cache(daemon, 16, 64 * PAGE) as cache:
        files = [await cache.open(p) for p in paths]

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(150):
                i, first = rng.randrange(2), rng.randrange(128 - 12)
                got = await cache.read(files[i], first * PAGE, 12 * PAGE)
                assert got == expected(i, first, 12)

        async with trio.open_nursery() as nursery:
            for seed in range(4):
                nursery.start_soon(reader, seed)
        assert cache.stats.lent_hits > 0
