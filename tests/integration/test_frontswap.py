"""The swap store (tmemclient.apps.frontswap) against a real tmemd: every page stored reads back
byte-exact, whatever the daemon refuses, evicts around it, or if it goes away mid-run;
invalidating frees both copies, and a pool that may lose pages is no swap device. The swap
file on its own is tested in tests/unit/test_swap_file.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from swap_churn import all_read_back, churn, page

import tmemclient
from tmemclient import InvalidArgument
from tmemclient.apps.frontswap import SWAP_OID, SwappedMemory, SwapStore

PAGE = 4096
IO_TIMEOUT = 30.0


MAPS = pytest.mark.parametrize("map_pages", [False, True], ids=["gets", "mapped"])


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The tmemd this module's tests share (conftest's ``shared_daemon``, checked after each
    test); a test that needs other options starts its own with ``start_daemon``."""
    return shared_daemon


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


def test_an_ephemeral_pool_is_refused_as_a_swap_device(shared_daemon: Daemon) -> None:
    with (
        tmemclient.connect(shared_daemon.socket, name="swapper", timeout=IO_TIMEOUT) as client,
        pytest.raises(InvalidArgument, match="persistent"),
    ):
        SwapStore(client.new_pool())  # ephemeral pages may vanish: not a swap device
