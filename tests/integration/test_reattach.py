"""Named pools a guest comes back to, against a real tmemd (docs/design.md §2.6, issue #17):
the same guest reopens its named pool with every page after its connection ended; a guest that
does not come back has the pool freed after ``reattach_seconds``; other guests never see it;
bad requests are refused without harm to anybody's pages."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from tmemctl_common import tmemctl

import tmemclient
from tmemclient import Client, GuestConflict, InvalidArgument
from tmemd.ctl.client import AdminClient

IO_TIMEOUT = 30.0
PAGE = 4096


def page(tag: int) -> bytes:
    return random.Random(tag).randbytes(PAGE)


def open_sync(daemon: Daemon, name: str) -> Client:
    client = tmemclient.connect(daemon.socket, name=name, frames=64, timeout=IO_TIMEOUT)
    client._sock.settimeout(IO_TIMEOUT)
    return client


def status(daemon: Daemon) -> dict[str, Any]:
    assert daemon.admin_socket is not None
    with AdminClient(daemon.admin_socket, timeout=IO_TIMEOUT) as admin:
        result: dict[str, Any] = admin.call("status")
        return result


def start(tmp_path: Path, *args: str) -> Daemon:
    workdir = tmp_path / "d"
    workdir.mkdir()
    return Daemon(workdir, "--memory", "16MiB", *args, admin=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A tmemd that keeps named pools 60 s (the default): longer than any test waits."""
    d = start(tmp_path)
    yield d
    assert d.alive, d.log_text()
    d.stop()


def test_guest_reopens_its_named_pool_with_every_page(daemon: Daemon) -> None:
    with open_sync(daemon, "vm") as client:
        swap = client.new_pool(persistent=True, name="swap")
        cache = client.new_pool()  # unnamed: dies with the connection, as before
        assert (swap.name, swap.reopened) == ("swap", False)
        assert swap.put_many([(1, i, page(i)) for i in range(50)]) == [True] * 50
        assert cache.put(1, 0, page(99))
    daemon.wait_disconnected("vm")
    kept = status(daemon)
    assert (kept["kept_pools"], kept["kept_pages"], kept["guests"]) == (1, 50, 0)
    assert kept["used"] == 50 * PAGE  # the kept pages stay billed: the budget tells the truth
    shown = tmemctl("status", sock=daemon.admin_socket)
    assert "reattach seconds  60.0" in shown.out and "kept pools        1" in shown.out, shown
    pools = tmemctl("pools", sock=daemon.admin_socket).out
    assert "persistent kept" in pools and "name=swap" in pools, pools
    with open_sync(daemon, "vm") as client:
        swap = client.new_pool(persistent=True, name="swap")
        assert swap.reopened
        assert swap.get_many([(1, i) for i in range(50)]) == [page(i) for i in range(50)]
        assert client.new_pool().get(1, 0) is None
        swap.destroy()  # and a destroyed named pool is gone for good
    daemon.wait_disconnected("vm")
    with open_sync(daemon, "vm") as client:
        assert not client.new_pool(persistent=True, name="swap").reopened
    assert not [e for e in daemon.events() if e.get("level") == "error"]


def test_named_pool_of_a_guest_that_does_not_come_back_is_freed(tmp_path: Path) -> None:
    d = start(tmp_path, "--reattach-seconds", "0.3")
    try:
        with open_sync(d, "gone") as client:
            swap = client.new_pool(persistent=True, name="swap")
            assert swap.put_many([(1, i, page(i)) for i in range(20)]) == [True] * 20
        (expired,) = d.wait_event("named_pool_expired")
        assert (expired["pool"], expired["pages_freed"]) == ("swap", 20)
        after = status(d)
        assert (after["kept_pools"], after["used"], after["reattach_seconds"]) == (0, 0, 0.3)
        with open_sync(d, "gone") as client:
            fresh = client.new_pool(persistent=True, name="swap")
            assert not fresh.reopened and fresh.get(1, 0) is None
    finally:
        d.stop()


def test_other_guests_never_open_a_named_pool(daemon: Daemon) -> None:
    with open_sync(daemon, "owner") as client:
        assert client.new_pool(persistent=True, name="swap").put(1, 1, page(1))
    daemon.wait_disconnected("owner")
    with open_sync(daemon, "thief") as client:
        theirs = client.new_pool(persistent=True, name="swap")
        assert not theirs.reopened and theirs.get(1, 1) is None
    with open_sync(daemon, "owner") as client:
        mine = client.new_pool(persistent=True, name="swap")
        assert mine.reopened and mine.get(1, 1) == page(1)


def test_bad_named_pool_requests_are_refused_and_nothing_is_lost(daemon: Daemon) -> None:
    with open_sync(daemon, "vm") as client:
        assert client.new_pool(persistent=True, name="swap").put(1, 1, page(1))
    daemon.wait_disconnected("vm")
    with open_sync(daemon, "bystander") as other:
        bystander = other.new_pool(persistent=True)
        assert bystander.put(2, 2, page(2))
        with open_sync(daemon, "vm") as client:
            with pytest.raises(InvalidArgument, match="exists as a persistent pool"):
                client.new_pool(persistent=False, name="swap")
            with pytest.raises(InvalidArgument, match="4096-byte pages"):
                client.new_pool(persistent=True, name="swap", page_size=8192)
            with pytest.raises(InvalidArgument, match="pool name"):
                client._exchange([[1, 1 << 24 | 1, None, "no/slash"]])
            with pytest.raises(InvalidArgument, match="uuid"):
                client._exchange([[1, 1 << 24 | 2, bytes(16), "swap"]])
            client.ping()  # the connection goes on
            swap = client.new_pool(persistent=True, name="swap")
            assert swap.reopened and swap.get(1, 1) == page(1)
        assert bystander.get(2, 2) == page(2)


def test_a_held_named_pool_is_not_given_to_a_second_session(tmp_path: Path) -> None:
    workdir = tmp_path / "d"
    workdir.mkdir()
    (workdir / "tmemd.toml").write_text(
        f'[daemon]\nsocket = "{workdir / "tmemd.sock"}"\n[guests.multi]\nuids = [0]\nsessions = 2\n'
    )
    d = Daemon(workdir, "--config", str(workdir / "tmemd.toml"), "--memory", "16MiB")
    try:
        with open_sync(d, "multi") as one, open_sync(d, "multi") as two:
            held = one.new_pool(persistent=True, name="swap")
            assert held.put(1, 1, page(1))
            with pytest.raises(GuestConflict, match="another connection"):
                two.new_pool(persistent=True, name="swap")
            assert held.get(1, 1) == page(1)
    finally:
        d.stop()


def test_a_tenant_reconnecting_for_new_names_is_stopped_at_max_named_pools(
    tmp_path: Path,
) -> None:
    """Each connection makes a named pool under a new name and leaves (the pool is kept): past
    --max-named-pools the next one is refused with LIMIT (the connection goes on), and the
    kept pools' pages are intact."""
    d = start(tmp_path, "--max-named-pools", "4")
    try:
        with open_sync(d, "honest") as honest:  # another guest, checked while it goes on
            mine = honest.new_pool(persistent=True)
            assert all(mine.put_many([(1, i, page(100 + i)) for i in range(16)]))
            for i in range(4):
                with open_sync(d, f"g{i}") as client:
                    pool = client.new_pool(persistent=True, name=f"swap{i}")
                    assert pool.put(1, i, page(i))
                assert mine.get(1, i) == page(100 + i)
            with open_sync(d, "g9") as client:
                with pytest.raises(tmemclient.LimitExceeded, match="max_named_pools=4"):
                    client.new_pool(persistent=True, name="swap9")
                client.ping()  # still served
                assert client.new_pool(persistent=True).put(1, 0, page(9))  # unnamed: fine
            with open_sync(d, "g0") as client:
                kept = client.new_pool(persistent=True, name="swap0")
                assert kept.reopened and kept.get(1, 0) == page(0)
            assert mine.get_many([(1, i) for i in range(16)]) == [page(100 + i) for i in range(16)]
        assert status(d)["kept_pools"] == 4
        assert d.alive, d.log_text()
    finally:
        d.stop()
