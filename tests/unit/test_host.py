"""Unit tests of tmemd/config.py, tmemd/host.py and tmemd/views.py, and of who may
administer (tmemd/admin.py's rule): a real Store, fake members, no sockets.

A *member* (what the host knows of a guest connection) is any object with a ``.guest`` and a
``detach_pool(pool)`` method; ``FakeMember`` records the pools it was told to forget.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tmemclient.wire.errors import GuestConflict, InvalidArgument, NotFound, PermissionDenied
from tmemclient.wire.layout import FRAME_SIZE
from tmemd import views
from tmemd.accounts import Guest, Pool
from tmemd.admin import AdminServer
from tmemd.config import (
    ConfigError,
    GuestPolicy,
    Limits,
    Settings,
    load_config,
    settings_from_doc,
)
from tmemd.host import Host
from tmemd.store import Store

PAGE = FRAME_SIZE
UUID_A = bytes(range(16))
UUID_B = bytes(range(16, 32))
UUID_A_TEXT = "00010203-0405-0607-0809-0a0b0c0d0e0f"

# ------------------------------------------------------------------------------------ helpers


class FakeMember:
    """A guest connection as the host sees it."""

    uid = 0

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.detached: list[Pool] = []

    def detach_pool(self, pool: Pool) -> None:
        self.detached.append(pool)


def page(tag: int) -> bytes:
    return random.Random(tag).randbytes(PAGE)


def put(store: Store, pool: Pool, index: int, tag: int | None = None) -> bool:
    return store.put(pool, 1, index, memoryview(page(index if tag is None else tag)))


def peek(store: Store, pool: Pool, index: int) -> bytes | None:
    """The stored page, without touching the LRU, the clock or the statistics."""
    head = store.page_slots(pool, 1, index)
    if head is None:
        return None
    dst = bytearray(PAGE)
    store._copy_out(store._mem, head, pool.order, memoryview(dst))
    return bytes(dst)


def settings(**kw: Any) -> Settings:
    return Settings(
        socket=Path("/nonexistent/tmemd.sock"), budget=kw.pop("budget", 64 * PAGE), **kw
    )


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store(64 * PAGE, capacity=256 * PAGE)
    yield s
    s.close()


def make_host(store: Store, **kw: Any) -> Host:
    return Host(store, settings(budget=store.budget, **kw))


def connect(host: Host, uid: int, asked: str) -> FakeMember:
    """What the guest server does for a new connection: name, attach, join."""
    name, policy = host.guest_name(uid, asked)
    member = FakeMember(host.attach(name, policy))
    host.join(member)
    return member


# ------------------------------------------------------------------------------------ config

GOOD = """
[daemon]
socket = "/run/tmemd/tmemd.sock"
admin_socket = "/run/tmemd/admin.sock"
admin_group = "tmem"
memory = "64MiB"
socket_mode = "0640"
log_format = "json"
log_level = "debug"
unlisted_guests = "deny"

[limits]
max_pools = 8
max_batch = 512
handshake_timeout = 2.5

[guests.vm1]
uids = [1000, 1001]
weight = 300
cap = "16MiB"
sessions = 2

[guests.batch-job_2.x]
uids = [0]
"""


def test_config_good_file(tmp_path: Path) -> None:
    path = tmp_path / "tmemd.toml"
    path.write_text(GOOD.replace("[guests.batch-job_2.x]", '[guests."batch-job_2.x"]'))
    s = load_config(path)
    assert s.socket == Path("/run/tmemd/tmemd.sock")
    assert s.admin_socket == Path("/run/tmemd/admin.sock")
    assert (s.admin_group, s.budget, s.socket_mode) == ("tmem", 64 << 20, 0o640)
    assert (s.log_format, s.log_level, s.unlisted_guests) == ("json", "debug", "deny")
    assert s.limits == Limits(max_pools=8, max_batch=512, handshake_timeout=2.5)
    assert s.guests["vm1"] == GuestPolicy(frozenset({1000, 1001}), 300, 16 << 20, 2)
    assert s.guests["batch-job_2.x"] == GuestPolicy(frozenset({0}))
    # Command-line overrides win over the file; None means "not given".
    s = load_config(path, {"budget": 1 << 20, "socket": None, "limits": {"max_pools": 3}})
    assert (s.budget, s.socket, s.limits.max_pools) == (1 << 20, Path("/run/tmemd/tmemd.sock"), 3)
    assert s.limits.max_batch == 512


def test_config_defaults() -> None:
    s = settings_from_doc({"daemon": {"socket": "/s"}}, {})
    assert (s.budget, s.unlisted_guests, s.admin_socket, s.guests) == (
        256 << 20,
        "namespaced",
        None,
        {},
    )
    assert settings_from_doc({}, {"socket": Path("/s"), "budget": 4096}).budget == 4096
    s = settings_from_doc({"daemon": {"socket": "/s", "memory": 8192, "socket_mode": 0o600}}, {})
    assert (s.budget, s.socket_mode) == (8192, 0o600)


def doc_with(**tables: Any) -> dict[str, Any]:
    return {"daemon": {"socket": "/s"}, **tables}


@pytest.mark.parametrize(
    ("doc", "names"),
    [
        # unknown tables and keys
        ({"deamon": {}}, ["[deamon]"]),
        (doc_with(extra=1), ["[extra]"]),
        ({"daemon": {"socket": "/s", "memroy": "1G"}}, ["'memroy'", "[daemon]"]),
        (doc_with(limits={"max_pool": 3}), ["'max_pool'", "[limits]"]),
        (doc_with(guests={"a": {"uids": [0], "wieght": 2}}), ["'wieght'", "[guests.a]"]),
        # wrong types
        ({"daemon": "x"}, ["[daemon]"]),
        ({"daemon": {"socket": 5}}, ["daemon.socket"]),
        ({"daemon": {"socket": "/s", "memory": True}}, ["daemon.memory"]),
        ({"daemon": {"socket": "/s", "memory": 1.5}}, ["daemon.memory"]),
        ({"daemon": {"socket": "/s", "unlisted_guests": 1}}, ["daemon.unlisted_guests"]),
        (doc_with(limits={"max_batch": "10"}), ["limits.max_batch"]),
        (doc_with(limits={"max_frame": 1.5}), ["limits.max_frame"]),
        (doc_with(limits={"handshake_timeout": True}), ["limits.handshake_timeout"]),
        (doc_with(guests=5), ["[guests]"]),
        (doc_with(guests={"a": 5}), ["[guests.a]"]),
        (doc_with(guests={"a": {"uids": 0}}), ["guests.a.uids"]),
        (doc_with(guests={"a": {"uids": ["root"]}}), ["guests.a.uids"]),
        (doc_with(guests={"a": {"uids": [True]}}), ["guests.a.uids"]),
        (doc_with(guests={"a": {"uids": [-1]}}), ["guests.a.uids"]),
        (doc_with(guests={"a": {"uids": [1 << 32]}}), ["guests.a.uids"]),
        (doc_with(guests={"a": {"uids": [0], "weight": "high"}}), ["guests.a.weight"]),
        (doc_with(guests={"a": {"uids": [0], "weight": True}}), ["guests.a.weight"]),
        (doc_with(guests={"a": {"uids": [0], "cap": 1.5}}), ["guests.a.cap"]),
        (doc_with(guests={"a": {"uids": [0], "sessions": "2"}}), ["guests.a.sessions"]),
        # bad sizes
        ({"daemon": {"socket": "/s", "memory": "lots"}}, ["daemon.memory", "'lots'"]),
        ({"daemon": {"socket": "/s", "memory": "1.5"}}, ["daemon.memory"]),
        ({"daemon": {"socket": "/s", "memory": "5 PB"}}, ["daemon.memory"]),
        ({"daemon": {"socket": "/s", "memory": "1K"}}, ["memory budget"]),
        ({"daemon": {"socket": "/s", "memory": -4096}}, ["memory budget"]),
        (doc_with(guests={"a": {"uids": [0], "cap": "1XB"}}), ["guests.a.cap"]),
        (doc_with(guests={"a": {"uids": [0], "cap": -1}}), ["guests.a.cap"]),
        # bad weights and sessions
        (doc_with(guests={"a": {"uids": [0], "weight": 0}}), ["guests.a", "weight"]),
        (doc_with(guests={"a": {"uids": [0], "weight": -1}}), ["guests.a", "weight"]),
        (doc_with(guests={"a": {"uids": [0], "weight": 10_001}}), ["guests.a", "weight"]),
        (doc_with(guests={"a": {"uids": [0], "sessions": 0}}), ["guests.a.sessions"]),
        (doc_with(guests={"a": {"uids": [0], "sessions": 1025}}), ["guests.a.sessions"]),
        # missing uids
        (doc_with(guests={"a": {"weight": 100}}), ["[guests.a]", "uids"]),
        (doc_with(guests={"a": {}}), ["[guests.a]", "uids"]),
        # bad guest names
        (doc_with(guests={"bad name": {"uids": [0]}}), ["[guests.bad name]"]),
        (doc_with(guests={"0/x": {"uids": [0]}}), ["[guests.0/x]"]),
        (doc_with(guests={"shared:x": {"uids": [0]}}), ["[guests.shared:x]"]),
        (doc_with(guests={"": {"uids": [0]}}), ["[guests.]"]),
        (doc_with(guests={"x" * 65: {"uids": [0]}}), ["x" * 65]),
        # values out of range
        ({"daemon": {"socket": "/s", "unlisted_guests": "allow"}}, ["unlisted_guests"]),
        ({"daemon": {"socket": "/s", "log_format": "xml"}}, ["log format"]),
        (doc_with(limits={"max_frame": 16}), ["max_frame"]),
        (doc_with(limits={"max_pools": 0}), ["max_pools"]),
        (doc_with(limits={"handshake_timeout": 0}), ["timeouts"]),
        (doc_with(limits={"ring_poll_us": -1}), ["ring_poll_us"]),
        (doc_with(limits={"ring_poll_max_us": 10_001}), ["ring_poll_max_us"]),
        (doc_with(limits={"map_pages": 1}), ["limits.map_pages", "wrong type"]),
        (doc_with(limits={"move_slack": -0.1}), ["move_slack", "0..0.5"]),
        (doc_with(limits={"move_slack": 0.75}), ["move_slack", "0..0.5"]),
        (doc_with(limits={"move_slack": "1/8"}), ["limits.move_slack", "wrong type"]),
        (doc_with(limits={"move_slack": True}), ["limits.move_slack", "wrong type"]),
        (doc_with(limits={"max_pools": True}), ["limits.max_pools", "wrong type"]),
        # no socket at all
        ({}, ["daemon.socket", "--socket"]),
    ],
)
def test_config_errors_name_the_key(doc: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_doc(doc, {})
    for name in names:
        assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("mode", ["rw-rw----", "0o999", -1, 0o10000])
def test_config_bad_socket_mode_names_the_key(mode: str | int) -> None:
    with pytest.raises(ConfigError, match="socket_mode"):
        settings_from_doc({"daemon": {"socket": "/s", "socket_mode": mode}}, {})


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\nsocket = '/s'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[guests.vm1]\nuids = [1000]\nwieght = 3\n")
    with pytest.raises(ConfigError, match=r"'wieght' in \[guests.vm1\]"):
        load_config(typo, {"socket": Path("/s")})


# ------------------------------------------------------------------------------------ names


def test_guest_name_rules(store: Store) -> None:
    vm1 = GuestPolicy(frozenset({1000}), weight=300)
    anyone = make_host(store, guests={"vm1": vm1})
    assert anyone.guest_name(1000, "vm1") == ("vm1", vm1)
    assert anyone.guest_name(1000, "other") == ("1000/other", GuestPolicy())
    assert anyone.guest_name(0, "other") == ("0/other", GuestPolicy())  # root is namespaced too
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(PermissionDenied, match=r"uid 1001 may not connect as guest 'vm1'"):
            anyone.guest_name(1001, "vm1")
        with pytest.raises(PermissionDenied):
            anyone.guest_name(0, "vm1")  # root gets no exception from the config
    assert [(e["event"], e["uid"], e["name"]) for e in logs] == [
        ("guest_name_refused", 1001, "vm1"),
        ("guest_name_refused", 0, "vm1"),
    ]
    assert all(e["log_level"] == "warning" for e in logs)

    strict = make_host(store, guests={"vm1": vm1}, unlisted_guests="deny")
    assert strict.guest_name(1000, "vm1") == ("vm1", vm1)
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(PermissionDenied, match="not in the tmemd config"),
    ):
        strict.guest_name(1000, "other")
    assert logs[0]["event"] == "guest_name_refused" and logs[0]["reason"] == "not in config"


# ------------------------------------------------------------------------------------ sessions


def test_attach_sessions_and_conflict(store: Store) -> None:
    duo = GuestPolicy(frozenset({7}), sessions=2)
    host = make_host(store, guests={"duo": duo})
    a = connect(host, 7, "solo")
    assert a.guest.name == "7/solo" and store.guests["7/solo"] is a.guest
    with pytest.raises(GuestConflict, match="already connected"):
        host.attach("7/solo", GuestPolicy())
    assert connect(host, 8, "solo").guest.name == "8/solo"  # another uid: another guest

    d1 = connect(host, 7, "duo")
    d2 = connect(host, 7, "duo")
    assert d1.guest is d2.guest  # one account
    with pytest.raises(GuestConflict, match="2 of 2 sessions"):
        host.attach("duo", duo)
    # Each session's pools are its own, billed to the one account.
    p1 = store.new_pool(d1.guest, persistent=False, order=0)
    p2 = store.new_pool(d2.guest, persistent=False, order=0)
    assert put(store, p1, 0) and put(store, p2, 0, tag=99)
    assert peek(store, p1, 0) == page(0) and peek(store, p2, 0) == page(99)
    row = {r["name"]: r for r in views.guests(host)}["duo"]
    assert (row["sessions"], row["pools"], row["pages"]) == (2, 2, 2)

    store.destroy_pool(p1)  # what Session.close does first
    host.detach(d1)
    assert store.guests["duo"] is d2.guest and views.status(host)["sessions"] == 3
    store.destroy_pool(p2)
    host.detach(d2)
    assert "duo" not in store.guests and "duo" not in host.sessions
    assert connect(host, 7, "duo").guest is not d1.guest  # a fresh account
    host.detach(a)
    assert connect(host, 7, "solo").guest.name == "7/solo"  # free again
    # attach() without a member only accounts; with one it also records the session.
    first = FakeMember(host.attach("9/one", GuestPolicy()))
    assert "9/one" not in host.sessions
    second = FakeMember(first.guest)
    assert host.attach("9/one", GuestPolicy(), second) is first.guest
    assert host.sessions["9/one"] == {second}
    with pytest.raises(GuestConflict):
        host.attach("9/one", GuestPolicy())
    assert views.status(host)["guests"] == 4  # 8/solo, duo, 7/solo, 9/one


def test_detach_frees_the_account(store: Store) -> None:
    host = make_host(store)
    m = connect(host, 5, "g")
    pool = store.new_pool(m.guest, persistent=True, order=0)
    assert all(put(store, pool, i) for i in range(10))
    host.detach(m)  # even a pool the session did not destroy goes with the account
    assert store.used == 0 and "5/g" not in store.guests


def test_overrides_survive_reconnect(store: Store) -> None:
    cfg = GuestPolicy(frozenset({1}), weight=50, cap=8 * PAGE)
    host = make_host(store, guests={"cfg": cfg})
    # On a configured guest before it ever connects.
    assert host.set_guest("cfg", weight=70) == {
        "name": "cfg",
        "connected": False,
        "weight": 70,
        "cap": None,
    }
    g = connect(host, 1, "cfg").guest
    assert (g.weight, g.cap_slots) == (70, 8)  # weight overridden, cap from the config

    m = connect(host, 2, "w")
    row = host.set_guest("2/w", weight=400, cap=4 * PAGE)
    assert (row["weight"], row["cap"], row["evicted"]) == (400, 4 * PAGE, 0)
    host.freeze("2/w", True)
    host.detach(m)
    assert "2/w" not in store.guests
    g = connect(host, 2, "w").guest
    assert (g.weight, g.cap_slots, g.frozen) == (400, 4, True)
    # cap=None removes the cap, also across a reconnect, even over a configured cap.
    host.set_guest("cfg", cap=None)
    assert store.guests["cfg"].cap_slots is None
    host.detach(next(iter(host.sessions["cfg"])))
    assert connect(host, 1, "cfg").guest.cap_slots is None


def test_freeze_all_affects_new_guests(store: Store) -> None:
    host = make_host(store)
    old = connect(host, 1, "old")
    assert host.freeze(None, True) == ["1/old"]
    assert old.guest.frozen and views.status(host)["frozen_all"]
    new = connect(host, 1, "new")
    assert new.guest.frozen
    pool = store.new_pool(new.guest, persistent=False, order=0)
    assert not put(store, pool, 0)  # puts refused
    assert sorted(host.freeze(None, False)) == ["1/new", "1/old"]
    assert not old.guest.frozen and not new.guest.frozen
    assert not connect(host, 1, "later").guest.frozen
    assert put(store, pool, 0)


def test_thaw_one_after_freeze_all_survives_reconnect(store: Store) -> None:
    """A choice by name after freeze-all holds across reconnects, until the next freeze-all or
    thaw-all."""
    host = make_host(store)
    m = connect(host, 1, "g")
    host.freeze(None, True)
    host.freeze("1/g", False)
    assert not m.guest.frozen
    host.detach(m)
    m = connect(host, 1, "g")
    assert not m.guest.frozen
    assert connect(host, 1, "other").guest.frozen  # the rest stay frozen
    host.freeze(None, True)  # a later freeze-all wins over the earlier thaw by name
    host.detach(m)
    m = connect(host, 1, "g")
    assert m.guest.frozen
    host.freeze(None, False)
    host.freeze("1/g", True)  # frozen by name inside thaw-all
    host.detach(m)
    assert connect(host, 1, "g").guest.frozen


def test_unknown_guests_and_bad_arguments(store: Store) -> None:
    host = make_host(store, guests={"cfg": GuestPolicy(frozenset({1}))})
    for call in (
        lambda: host.set_guest("nobody", weight=5),
        lambda: host.flush("nobody"),
        lambda: host.freeze("nobody", True),
        lambda: views.pools(host, "nobody"),
    ):
        with pytest.raises(NotFound):
            call()
    assert host.flush("cfg") == 0  # configured, not connected: nothing to flush
    for weight in (0, -1, 10_001, 10**9, "x", True, 2.0):
        with pytest.raises(InvalidArgument):
            host.set_guest("cfg", weight=weight)
    for cap in (-1, store.capacity + 1, 2**63, "1MiB", True, 1.5):
        with pytest.raises(InvalidArgument):
            host.set_guest("cfg", cap=cap)
    with pytest.raises(NotFound, match="no grant names it"):
        host.set_guest("shared:" + UUID_A_TEXT, weight=5)  # no grant: no such pool
    with pytest.raises(InvalidArgument, match="not shared:UUID"):
        host.set_guest("shared:nope", weight=5)
    assert "cfg" not in host.overrides  # nothing half-applied
    assert not any(name.startswith("shared:") for name in host.overrides)
    for budget in (0, -1, FRAME_SIZE - 1, store.capacity + 1, "1MiB", None, True, 1.5):
        with pytest.raises(InvalidArgument):
            host.set_budget(budget)
    assert store.budget == 64 * PAGE
    for name in ("", "shared:" + UUID_A_TEXT):
        with pytest.raises(InvalidArgument):
            host.grant(UUID_A, name)
    with pytest.raises(NotFound):
        host.revoke(UUID_A, "cfg")


# ------------------------------------------------------------------------------------ shared


def test_an_admin_caps_and_weighs_a_shared_pools_account(store: Store) -> None:
    """A granted guest's puts into a shared pool are billed to the pool's account, not to the
    guest: the guest's own cap does not bound them, the account's does. Set before the pool
    exists (once a grant names it), the cap and weight apply when it is opened, and again if
    it is opened afresh; set while it lives, the cap evicts down to it at once."""
    host = make_host(store)
    x = connect(host, 1, "x")
    host.set_guest("1/x", cap=0, weight=1)  # the guest itself may hold nothing
    name = "shared:" + UUID_A_TEXT
    host.grant(UUID_A, "1/x")
    assert host.set_guest(name, cap=4 * PAGE, weight=50) == {
        "name": name,
        "connected": False,
        "weight": 50,
        "cap": 4 * PAGE,
    }
    pool = host.open_shared(x, UUID_A, 0)
    account = store.guests[name]
    assert (account.weight, account.cap_slots) == (50, 4)
    for i in range(10):  # ephemeral: each put past the cap evicts the account's oldest page
        assert put(store, pool, i)
    assert account.eph_slots == 4 and x.guest.held_slots == 0
    assert [peek(store, pool, i) is not None for i in range(10)] == [False] * 6 + [True] * 4
    row = host.set_guest(name, cap=2 * PAGE)  # lowered while it lives: evicts at once
    assert row["evicted"] == 2 and account.eph_slots == 2
    host.leave_shared(x, pool)
    assert name not in store.guests
    host.open_shared(x, UUID_A, 0)  # afresh: the admin's choice still holds
    assert (store.guests[name].weight, store.guests[name].cap_slots) == (50, 2)


def test_shared_pool_lifecycle(store: Store) -> None:
    host = make_host(store)
    x, y, z = connect(host, 1, "x"), connect(host, 1, "y"), connect(host, 1, "z")
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(PermissionDenied, match="no grant"),
    ):
        host.open_shared(x, UUID_A, 0)
    assert logs[0]["event"] == "shared_pool_refused" and logs[0]["uuid"] == UUID_A_TEXT
    assert host.shared == {} and store.guests.keys() == {"1/x", "1/y", "1/z"}

    host.grant(UUID_A, "1/x")
    host.grant(UUID_A, "1/y")
    host.grant(UUID_A, "1/later")  # not connected yet: fine
    pool = host.open_shared(x, UUID_A, 0)
    assert host.open_shared(y, UUID_A, 0) is pool
    with pytest.raises(PermissionDenied):
        host.open_shared(z, UUID_A, 0)  # a grant is per (uuid, guest)
    with pytest.raises(PermissionDenied):
        host.open_shared(x, UUID_B, 0)  # ... and per uuid
    with pytest.raises(InvalidArgument, match="4096-byte pages"):
        host.open_shared(y, UUID_A, 1)

    account = store.guests[f"shared:{UUID_A_TEXT}"]
    assert pool.guest is account and pool.shared and not pool.persistent
    assert all(put(store, pool, i) for i in range(5))
    # Billed to the pool's account, never to a member.
    assert (account.eph_slots, x.guest.eph_slots, y.guest.eph_slots) == (5, 0, 0)
    rows = {r["name"]: r for r in views.guests(host)}
    assert rows[f"shared:{UUID_A_TEXT}"]["kind"] == "shared"
    assert rows[f"shared:{UUID_A_TEXT}"]["ephemeral_bytes"] == 5 * PAGE
    assert [r["members"] for r in views.pools(host, "1/y")] == [["1/x", "1/y"]]
    assert views.shares(host)["pools"] == [
        {"uuid": UUID_A_TEXT, "members": ["1/x", "1/y"], "pages": 5}
    ]

    # Members coming and going do not move the pages.
    host.detach(x)
    assert peek(store, pool, 0) == page(0) and account.eph_slots == 5
    later = connect(host, 1, "later")
    assert host.open_shared(later, UUID_A, 0) is pool

    # Revoke detaches the guest's connections at once.
    assert host.revoke(UUID_A, "1/y") == 1
    assert y.detached == [pool]
    assert views.shares(host)["pools"][0]["members"] == ["1/later"]
    with pytest.raises(PermissionDenied):
        host.open_shared(y, UUID_A, 0)
    assert host.revoke(UUID_A, "1/x") == 0  # gone already: nothing to detach
    assert ("1/x" not in {g for _, g in host.grants}) and len(host.grants) == 1

    # The pool and its pages go with the last member.
    host.leave_shared(later, pool)
    assert host.shared == {} and f"shared:{UUID_A_TEXT}" not in store.guests
    assert store.used == 0
    # A grant outlives the pool: the same guest may start it afresh.
    fresh = host.open_shared(later, UUID_A, 1)
    assert fresh is not pool and fresh.order == 1 and fresh.pages == 0
    host.detach(later)
    assert host.shared == {} and store.used == 0


def test_frozen_member_cannot_put_to_a_shared_pool(store: Store) -> None:
    host = make_host(store)
    x, y = connect(host, 1, "x"), connect(host, 1, "y")
    for m in (x, y):
        host.grant(UUID_A, m.guest.name)
    pool = host.open_shared(x, UUID_A, 0)
    host.open_shared(y, UUID_A, 0)
    host.freeze("1/x", True)
    assert not store.put(pool, 1, 0, memoryview(page(0)), frozen=x.guest.frozen)
    assert store.put(pool, 1, 0, memoryview(page(0)), frozen=y.guest.frozen)
    # freeze-all names guests only, never the shared accounts
    assert sorted(host.freeze(None, True)) == ["1/x", "1/y"]


# ------------------------------------------------------------------------------------ budget


def test_set_budget_warns_below_persistent_usage(store: Store) -> None:
    host = make_host(store)
    a, b = connect(host, 1, "a"), connect(host, 1, "b")
    pers = store.new_pool(a.guest, persistent=True, order=0)
    eph = store.new_pool(b.guest, persistent=False, order=0)
    assert all(put(store, pers, i) for i in range(20))
    assert all(put(store, eph, i) for i in range(30))

    result = host.set_budget(24 * PAGE)
    assert result == {"budget": 24 * PAGE, "used": 24 * PAGE, "evicted": 26}
    result = host.set_budget(10 * PAGE)
    assert (result["budget"], result["used"], result["evicted"]) == (10 * PAGE, 20 * PAGE, 4)
    assert "80.0KiB" in result["warning"] and "kept" in result["warning"]
    assert all(peek(store, pers, i) == page(i) for i in range(20))
    assert not put(store, pers, 100) and not put(store, eph, 100)
    assert put(store, pers, 3, tag=333)  # replacing a page in place needs no room
    assert peek(store, pers, 3) == page(333)
    assert "warning" not in host.set_budget(20 * PAGE)
    assert not put(store, eph, 100)
    assert "warning" not in host.set_budget(store.capacity)
    assert put(store, eph, 100) and put(store, pers, 100)


# ------------------------------------------------------------------------------------ store


def test_store_admin_operations_never_touch_persistent_pages() -> None:
    store = Store(32 * PAGE, capacity=64 * PAGE)
    try:
        a = store.add_guest("a", weight=1)  # the lightest guest: its pages go first
        b = store.add_guest("b", weight=10_000)
        pa = store.new_pool(a, persistent=True, order=0)
        pa1 = store.new_pool(a, persistent=True, order=1)  # 8 KiB pages: two slots each
        ea = store.new_pool(a, persistent=False, order=0)
        eb = store.new_pool(b, persistent=False, order=0)
        assert all(put(store, pa, i) for i in range(6))
        assert store.put(pa1, 1, 0, memoryview(page(50) + page(51)))
        assert all(put(store, ea, i) for i in range(8))
        assert all(put(store, eb, i) for i in range(8))
        assert (a.pers_slots, a.eph_slots, b.eph_slots) == (8, 8, 8)

        def persistent_intact() -> bool:
            big = bytearray(2 * PAGE)
            assert store.get(pa1, 1, 0, memoryview(big))  # persistent get leaves the page
            return bytes(big) == page(50) + page(51) and all(
                peek(store, pa, i) == page(i) for i in range(6)
            )

        assert store.drop_ephemeral(a) == 8
        assert (a.pers_slots, a.eph_slots, b.eph_slots) == (8, 0, 8) and persistent_intact()
        assert store.drop_ephemeral(a) == 0

        assert store.set_cap(a, 2 * PAGE) == 0  # nothing it may evict
        assert a.pers_slots == 8 and persistent_intact()
        assert not put(store, pa, 50) and not put(store, ea, 50)
        assert store.set_cap(a, 0) == 0 and persistent_intact()
        assert store.set_cap(a, None) == 0
        assert all(put(store, ea, i) for i in range(4))
        assert store.set_cap(a, 10 * PAGE) == 2  # down to the cap, ephemeral only
        assert (a.pers_slots, a.eph_slots) == (8, 2) and persistent_intact()

        assert store.set_budget(4 * PAGE) == 10  # every ephemeral page of both guests
        assert store.used == 8 * PAGE and persistent_intact()
        assert (a.eph_slots, b.eph_slots) == (0, 0)
        assert store.set_budget(FRAME_SIZE) == 0 and persistent_intact()
        assert not put(store, eb, 0)
        with pytest.raises(ValueError):
            store.set_budget(0)
        with pytest.raises(ValueError):
            store.set_budget(store.capacity + FRAME_SIZE)
        assert store.set_budget(store.capacity) == 0
        assert put(store, eb, 0) and persistent_intact()
        assert store.flush(pa, 1, 0) and not store.flush(pa, 1, 0)  # only the guest's flush
        assert a.pers_slots == 7
    finally:
        store.close()


def test_store_set_budget_evicts_by_weighted_lru() -> None:
    store = Store(16 * PAGE)
    try:
        heavy = store.add_guest("heavy", weight=300)
        light = store.add_guest("light", weight=100)
        ph = store.new_pool(heavy, persistent=False, order=0)
        pl = store.new_pool(light, persistent=False, order=0)
        for i in range(8):  # interleaved: equal ages
            assert put(store, ph, i) and put(store, pl, i)
        assert store.set_budget(8 * PAGE) == 8
        # Holdings now 3:1 (6 and 2), the survivors being each guest's newest pages.
        assert (heavy.eph_slots, light.eph_slots) == (6, 2)
        assert [i for i in range(8) if peek(store, pl, i)] == [6, 7]
        assert [i for i in range(8) if peek(store, ph, i)] == [2, 3, 4, 5, 6, 7]
    finally:
        store.close()


# ------------------------------------------------------------------------------------ admins

STRANGER = 65534 if os.getuid() != 65534 else 65533  # a uid that is neither root nor ours


def test_admin_allowed_rule() -> None:
    """Root, the daemon's own uid, or the admin group (primary or supplementary)."""
    store = Store(64 * 1024)
    try:
        host = Host(store, Settings(socket=Path("/nonexistent"), budget=64 * 1024))
        nobody = AdminServer(host, gid=None)
        assert nobody.allowed(0, 0, [])
        assert nobody.allowed(os.getuid(), 4242, [])
        assert not nobody.allowed(STRANGER, STRANGER, [])
        assert not nobody.allowed(STRANGER, 4242, [4242])  # no admin group configured
        group = AdminServer(host, gid=4242)
        assert group.allowed(STRANGER, 4242, [])
        assert group.allowed(STRANGER, STRANGER, [1, 4242, 7])
        assert not group.allowed(STRANGER, STRANGER, [1, 7])
        assert not group.allowed(STRANGER, 4243, [])
        assert group.allowed(0, STRANGER, [])
    finally:
        store.close()
