"""The swap store (tmemclient.apps.frontswap) against a real tmemd: every page stored reads back
byte-exact, whatever the daemon refuses, evicts around it, or if it goes away mid-run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

import tmemclient
from tmemclient import InvalidArgument
from tmemclient.apps.frontswap import SWAP_OID, SwappedMemory, SwapStore

PAGE = 4096
IO_TIMEOUT = 30.0


def page(n: int, version: int = 0) -> bytes:
    """The content of guest page ``n`` at ``version``: no two are alike."""
    return random.Random(n * 1000 + version).randbytes(PAGE)


MAPS = pytest.mark.parametrize("map_pages", [False, True], ids=["gets", "mapped"])


@pytest.fixture(params=[False, True], ids=["gets", "mapped"])
def client(daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[tmemclient.Client]:
    """A guest of the 16 MiB daemon, every call bounded in time; one that swaps in with gets,
    one that reads through its mapping (PROTOCOL.md §4.7)."""
    c = tmemclient.connect(
        daemon.socket, name="swapper", timeout=IO_TIMEOUT, map_pages=request.param
    )
    c._sock.settimeout(IO_TIMEOUT)
    yield c
    c.close()


def churn(memory: SwappedMemory, pages: int, rounds: int, seed: int = 1) -> dict[int, int]:
    """Write every page, then read and rewrite random runs of them; the versions written."""
    rng = random.Random(seed)
    versions = {}
    for n in range(pages):
        memory.write(n, page(n))
        versions[n] = 0
    for _ in range(rounds):
        first = rng.randrange(pages - 4)
        run = list(range(first, first + 4))
        for n, data in zip(run, memory.read_many(run), strict=True):
            assert data == page(n, versions[n])
        if rng.random() < 0.3:
            for n in run:
                versions[n] += 1
            memory.write_many([(n, page(n, versions[n])) for n in run])
    return versions


def all_read_back(memory: SwappedMemory, versions: dict[int, int]) -> bool:
    """Every page holds what was last written to it."""
    return all(memory.read(n) == page(n, v) for n, v in versions.items())


def test_pages_pushed_out_come_back_from_tmem(client: tmemclient.Client, tmp_path: Path) -> None:
    with SwapStore(client.new_pool(persistent=True), tmp_path / "swap", batch=16) as store:
        memory = SwappedMemory(store, ram_pages=32)
        versions = churn(memory, 256, 300)
        assert all_read_back(memory, versions)
        s = store.stats
        assert s.tmem_gets > 0 and s.swap_reads == 0  # every load came from tmem (or the queue)
        if client.mapping is not None:  # ...with no round trip
            assert s.mapped_reads == s.tmem_gets and s.tmem_get_rounds == 0
        assert s.swap_writes == s.tmem_puts_ok > 0  # write-through: the file has every page
        assert s.tmem_puts_refused == 0 and not s.daemon_gone


@MAPS
def test_nothing_is_lost_when_the_daemon_refuses(
    start_daemon: Any, tmp_path: Path, map_pages: bool
) -> None:
    daemon = start_daemon("--memory", "64KiB")  # room for 16 pages
    with tmemclient.connect(
        daemon.socket, name="tight", timeout=IO_TIMEOUT, map_pages=map_pages
    ) as client:
        client._sock.settimeout(IO_TIMEOUT)
        with SwapStore(client.new_pool(persistent=True), batch=8) as store:
            memory = SwappedMemory(store, ram_pages=16)
            versions = churn(memory, 200, 300)
            assert all_read_back(memory, versions)
            assert store.stats.tmem_puts_refused > 0
            assert store.stats.swap_reads > 0  # what tmem refused came from the file


@MAPS
def test_persistent_pages_stay_while_other_guests_need_memory(
    start_daemon: Any, tmp_path: Path, map_pages: bool
) -> None:
    daemon = start_daemon("--memory", "1MiB")  # 256 pages
    with (
        tmemclient.connect(
            daemon.socket, name="swapper", timeout=IO_TIMEOUT, map_pages=map_pages
        ) as client,
        tmemclient.connect(daemon.socket, name="hog", timeout=IO_TIMEOUT) as hog,
    ):
        client._sock.settimeout(IO_TIMEOUT)
        hog._sock.settimeout(IO_TIMEOUT)
        with SwapStore(client.new_pool(persistent=True), batch=8) as store:
            for n in range(64):
                store.store(n, page(n))
            store.write_back()
            # Another guest fills the budget with ephemeral pages, again and again.
            cache = hog.new_pool()
            for i in range(4):
                cache.put_many([(1, i * 256 + k, page(k)) for k in range(256)])
            reads_before = store.stats.swap_reads
            assert store.load_many(list(range(64))) == [page(n) for n in range(64)]
            assert store.stats.swap_reads == reads_before  # all 64 still in tmem
            assert store.stats.tmem_gets == 64


@MAPS
def test_nothing_is_lost_when_the_daemon_goes_away(
    start_daemon: Any, tmp_path: Path, map_pages: bool
) -> None:
    daemon = start_daemon("--memory", "4MiB")
    with tmemclient.connect(
        daemon.socket, name="orphan", timeout=IO_TIMEOUT, map_pages=map_pages
    ) as client:
        client._sock.settimeout(IO_TIMEOUT)
        with SwapStore(client.new_pool(persistent=True), tmp_path / "swap", batch=8) as store:
            memory = SwappedMemory(store, ram_pages=16)
            versions = churn(memory, 128, 100, seed=2)
            assert store.stats.tmem_puts_ok > 0
            daemon.stop()  # every page that only tmem held... is in the file too
            assert all_read_back(memory, versions)
            more = churn(memory, 128, 100, seed=3)  # and it goes on, on the file alone
            assert all_read_back(memory, more)
            # (A mapped guest may read its last pages through the mapping before it notices.)
            assert store.stats.daemon_gone and not store.tmem


def test_invalidate_frees_both_copies(client: tmemclient.Client) -> None:
    pool = client.new_pool(persistent=True)
    with SwapStore(pool, batch=4) as store:
        store.store_many([(n, page(n)) for n in range(8)])  # two batches: in tmem and the file
        assert pool.get(SWAP_OID, 3) == page(3)
        store.invalidate(3)
        assert 3 not in store and pool.get(SWAP_OID, 3) is None
        with pytest.raises(KeyError):
            store.load(3)
        store.store(3, page(3, 1))  # the slot can be used again
        assert store.load(3) == page(3, 1)


def test_a_swap_file_alone_keeps_every_page(tmp_path: Path) -> None:
    with SwapStore(None, tmp_path / "swap", batch=8) as store:
        memory = SwappedMemory(store, ram_pages=8)
        versions = churn(memory, 64, 200)
        assert all_read_back(memory, versions)
        assert store.stats.swap_reads > 0 and store.stats.tmem_gets == 0


def test_bad_arguments_are_refused(client: tmemclient.Client) -> None:
    with pytest.raises(InvalidArgument):
        SwapStore(client.new_pool())  # ephemeral pages may vanish: not a swap device
    with SwapStore(None) as store:
        with pytest.raises(InvalidArgument):
            store.store(0, b"short")
        with pytest.raises(InvalidArgument):
            store.store(-1, page(0))
        with pytest.raises(InvalidArgument):
            SwappedMemory(store, ram_pages=4).read_many(list(range(5)))
