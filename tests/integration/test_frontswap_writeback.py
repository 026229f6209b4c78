"""Frontswap write-back (tmemclient.apps.frontswap, ``write_back=True``; issue #17) against real
tmemd processes: only what tmem refuses goes to the swap file; every page reads back byte-exact
through refusals and a broken connection (the named pool is kept and given back); a daemon that
restarts without the pool makes the store say exactly which pages are lost — never serve stale
or wrong data — and carry on; one with a state directory comes back with every page."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Restartable
from swap_churn import all_read_back, churn, page

import tmemclient
from tmemclient import InvalidArgument, Retry
from tmemclient.apps.frontswap import PagesLost, SwappedMemory, SwapStore

RETRY = Retry(attempts=40, first_delay=0.02, max_delay=0.5, connect_timeout=10)


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[Restartable]:
    r = Restartable(tmp_path / "d", "--memory", "64KiB")  # room for 16 pages
    yield r
    r.stop()


def test_only_refused_pages_go_to_the_swap_file(tmp_path: Path) -> None:
    tmemd = Restartable(tmp_path / "d", "--memory", "1MiB")  # 256 pages: most, not all, fit
    try:
        with (
            tmemclient.connect_resilient(tmemd.socket, "swapper", retry=RETRY) as client,
            SwapStore(
                client.new_pool(persistent=True, name="swap"),
                tmp_path / "swap",
                batch=8,
                write_back=True,
            ) as store,
        ):
            memory = SwappedMemory(store, ram_pages=16)
            versions = churn(memory, 320, 400)
            assert all_read_back(memory, versions)
            s = store.stats
            assert s.tmem_puts_ok > 0 and s.tmem_puts_refused > 0
            assert s.swap_writes == s.tmem_puts_refused  # nothing tmem took was written
            assert s.swap_writes_saved == s.tmem_puts_ok
            assert s.tmem_lost == 0 and not store.lost
    finally:
        tmemd.stop()


def test_pages_survive_a_broken_connection(tmemd: Restartable, tmp_path: Path) -> None:
    with (
        tmemclient.connect_resilient(tmemd.socket, "swapper", retry=RETRY, ring_frames=0) as client,
        SwapStore(client.new_pool(persistent=True, name="swap"), batch=4, write_back=True) as store,
    ):
        memory = SwappedMemory(store, ram_pages=8)
        versions = churn(memory, 24, 60, seed=4)
        held = set(store._tmem_only)
        assert held  # some pages are only in tmem
        client.client._sock.shutdown(socket.SHUT_RDWR)  # the connection breaks
        assert all_read_back(memory, versions)  # ...and the kept pool is given back
        assert client.reconnects == 1 and store.stats.tmem_lost == 0
        more = churn(memory, 24, 60, seed=5)
        assert all_read_back(memory, more)


def test_a_daemon_restarted_without_the_pool_makes_lost_pages_known(
    tmemd: Restartable,
) -> None:
    with (
        tmemclient.connect_resilient(tmemd.socket, "swapper", retry=RETRY) as client,
        SwapStore(client.new_pool(persistent=True, name="swap"), batch=4, write_back=True) as store,
    ):
        store.store_many([(n, page(n)) for n in range(12)])  # three batches, into tmem only
        assert store.stats.swap_writes == 0
        tmemd.restart()  # SIGKILL: this tmemd keeps no pages across a restart
        with pytest.raises(PagesLost, match="were held only by tmem") as lost:
            store.load_many([0, 5])
        assert lost.value.slots == [0, 5]
        assert store.lost == set(range(12)) and store.stats.tmem_lost == 12
        with pytest.raises(PagesLost):
            store.load(11)  # every lost slot says so, never stale or zero data
        store.store(5, page(5, 1))  # a new page for a lost slot replaces it
        store.store_many([(n, page(n, 1)) for n in range(20, 23)])  # a batch goes out
        assert store.load(5) == page(5, 1)
        assert 5 not in store.lost


def test_write_back_needs_a_named_pool_of_a_resilient_client(start_daemon: Any) -> None:
    daemon: Daemon = start_daemon("--memory", "1MiB")
    with (
        tmemclient.connect(daemon.socket, name="plain") as plain,
        pytest.raises(InvalidArgument, match="named persistent pool of a resilient"),
    ):
        SwapStore(plain.new_pool(persistent=True, name="swap"), write_back=True)
    with tmemclient.connect_resilient(daemon.socket, "resilient") as client:
        with pytest.raises(InvalidArgument, match="named persistent pool"):
            SwapStore(client.new_pool(persistent=True), write_back=True)
        with SwapStore(client.new_pool(persistent=True, name="swap"), write_back=True) as store:
            store.store(1, page(1))
            assert store.load(1) == page(1)


def test_pages_survive_a_daemon_killed_and_restarted_with_state(tmp_path: Path) -> None:
    """With --state-dir, write-back loses nothing when the daemon is SIGKILLed: it comes back
    with the pool and every answered page."""
    state = Path(tempfile.mkdtemp(prefix="tmem-wb-", dir="/dev/shm"))
    tmemd = Restartable(tmp_path / "d", "--memory", "1MiB", "--state-dir", str(state / "s"))
    try:
        with (
            tmemclient.connect_resilient(tmemd.socket, "swapper", retry=RETRY) as client,
            SwapStore(
                client.new_pool(persistent=True, name="swap"), batch=4, write_back=True
            ) as store,
        ):
            memory = SwappedMemory(store, ram_pages=8)
            versions = churn(memory, 64, 120, seed=6)
            assert store._tmem_only  # pages only tmem holds
            tmemd.restart()  # SIGKILL, then a start that adopts the state
            assert all_read_back(memory, versions)
            assert store.stats.tmem_lost == 0 and not store.lost and client.reconnects == 1
            more = churn(memory, 64, 120, seed=7)
            assert all_read_back(memory, more)
            assert store.stats.swap_writes_saved > 0
    finally:
        tmemd.stop()
        shutil.rmtree(state, ignore_errors=True)
