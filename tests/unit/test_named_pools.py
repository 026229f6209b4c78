"""Unit tests of named pools a guest can come back to (tmemd/reattach.py, Host.open_named,
keep_named, expire_named; docs/design.md §2.6): a real Store and Host, fake members, a fake
clock, no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tmemclient.wire.errors import GuestConflict, InvalidArgument, LimitExceeded, PermissionDenied
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import PoolSpec
from tmemclient.wire.requests import NewPool, decode_request
from tmemd import views
from tmemd.accounts import Guest, Pool
from tmemd.config import GuestPolicy, Limits, Settings
from tmemd.host import Host
from tmemd.store import Store

PAGE = FRAME_SIZE


def page(i: int) -> bytes:
    """A page that does not pack (not one repeated word): a slot of its own (design.md §6.11)."""
    return bytes([i + 1]) * (PAGE - 1) + b"\xff"


class Member:
    """A guest connection as the host sees it."""

    def __init__(self, guest: Guest, uid: int = 1000) -> None:
        self.guest = guest
        self.uid = uid

    def detach_pool(self, pool: Pool) -> None:  # pragma: no cover - no shared pools here
        raise AssertionError("no shared pools in these tests")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world() -> Iterator[tuple[Host, Clock]]:
    settings = Settings(
        socket=Path("/nonexistent"),
        budget=64 * PAGE,
        limits=Limits(reattach_seconds=30.0),
        guests={"vm": GuestPolicy(frozenset({1000, 1001}), sessions=2)},
    )
    store = Store(64 * PAGE)
    host = Host(store, settings)
    clock = Clock()
    host.clock = clock
    yield host, clock
    store.close()


def connect(host: Host, name: str = "vm", uid: int = 1000) -> Member:
    guest = host.attach(name, host.settings.guests.get(name, GuestPolicy()), uid=uid)
    member = Member(guest, uid)
    host.join(member)
    return member


def disconnect(host: Host, member: Member, pools: list[Pool]) -> None:
    """What Session.close does: destroy the pools not kept, then leave the host."""
    for pool in pools:
        if not pool.dead and not host.keep_named(member, pool):
            host.store.destroy_pool(pool)
    host.detach(member)


def fill(host: Host, pool: Pool, n: int) -> None:
    for i in range(n):
        assert host.store.put(pool, 7, i, memoryview(page(i)))


def read(host: Host, pool: Pool, index: int) -> bytes | None:
    buf = bytearray(PAGE)
    return bytes(buf) if host.store.get(pool, 7, index, memoryview(buf)) else None


def test_named_pool_comes_back_with_its_pages_to_the_same_guest_and_uid(world) -> None:
    host, clock = world
    first = connect(host)
    pool, reopened = host.open_named(first, "swap", persistent=True, order=0)
    assert not reopened
    fill(host, pool, 3)
    disconnect(host, first, [pool])
    # Kept: the account stays, billed for the pages, with no connection.
    assert host.store.guests["vm"].pers_slots == 3
    assert host.store.used_slots == 3
    assert "vm" not in host.sessions
    clock.now += 29
    assert host.expire_named() == 0
    second = connect(host)
    again, reopened = host.open_named(second, "swap", persistent=True, order=0)
    assert reopened and again is pool
    assert [read(host, again, i) for i in range(3)] == [page(i) for i in range(3)]


def test_kept_pool_is_freed_after_reattach_seconds_with_its_account(world) -> None:
    host, clock = world
    member = connect(host)
    pool, _ = host.open_named(member, "swap", persistent=True, order=0)
    fill(host, pool, 4)
    disconnect(host, member, [pool])
    clock.now += 30
    assert host.expire_named() == 4
    host.store.drain()
    assert host.store.used_slots == 0
    assert "vm" not in host.store.guests
    # The name is free again: a new connection gets a new, empty pool.
    later = connect(host)
    fresh, reopened = host.open_named(later, "swap", persistent=True, order=0)
    assert not reopened and fresh is not pool and fresh.pages == 0


def test_unnamed_pools_still_die_with_their_connection(world) -> None:
    host, _ = world
    member = connect(host)
    plain = host.store.new_pool(member.guest, persistent=True, order=0)
    fill(host, plain, 2)
    disconnect(host, member, [plain])
    host.store.drain()
    assert plain.dead
    assert host.store.used_slots == 0
    assert "vm" not in host.store.guests


def test_another_uid_of_the_same_listed_name_cannot_open_it(world) -> None:
    host, _ = world
    owner = connect(host, uid=1000)
    pool, _ = host.open_named(owner, "swap", persistent=True, order=0)
    fill(host, pool, 1)
    disconnect(host, owner, [pool])
    intruder = connect(host, uid=1001)
    with pytest.raises(PermissionDenied, match="uid 1000"):
        host.open_named(intruder, "swap", persistent=True, order=0)
    # Still kept for its owner, pages intact.
    assert host.named.kept("vm") == 1
    assert read(host, pool, 0) == page(0)


def test_another_guest_name_never_sees_the_pool(world) -> None:
    host, _ = world
    owner = connect(host, name="1000/a")
    pool, _ = host.open_named(owner, "swap", persistent=True, order=0)
    fill(host, pool, 1)
    disconnect(host, owner, [pool])
    other = connect(host, name="1000/b")
    mine, reopened = host.open_named(other, "swap", persistent=True, order=0)
    assert not reopened and mine is not pool and mine.pages == 0


def test_a_held_named_pool_cannot_be_opened_twice(world) -> None:
    host, _ = world
    one, two = connect(host), connect(host)
    pool, _ = host.open_named(one, "swap", persistent=True, order=0)
    with pytest.raises(GuestConflict, match="another connection"):
        host.open_named(two, "swap", persistent=True, order=0)
    named = host.named.of(pool)
    assert named is not None and named.holder is one


def test_reopening_as_another_kind_or_page_size_is_refused_and_keeps_the_pool(world) -> None:
    host, _ = world
    member = connect(host)
    pool, _ = host.open_named(member, "swap", persistent=True, order=0)
    fill(host, pool, 2)
    disconnect(host, member, [pool])
    back = connect(host)
    with pytest.raises(InvalidArgument, match="persistent pool of 4096-byte pages"):
        host.open_named(back, "swap", persistent=False, order=0)
    with pytest.raises(InvalidArgument):
        host.open_named(back, "swap", persistent=True, order=1)
    again, reopened = host.open_named(back, "swap", persistent=True, order=0)
    assert reopened and again.pages == 2


def test_reattach_seconds_zero_frees_named_pools_with_the_connection() -> None:
    settings = Settings(socket=Path("/x"), budget=16 * PAGE, limits=Limits(reattach_seconds=0))
    store = Store(16 * PAGE)
    host = Host(store, settings)
    try:
        member = connect(host, name="1000/vm")
        pool, _ = host.open_named(member, "swap", persistent=True, order=0)
        fill(host, pool, 2)
        disconnect(host, member, [pool])
        store.drain()
        assert pool.dead and store.used_slots == 0 and not store.guests
    finally:
        store.close()


def test_destroyed_named_pool_frees_its_name(world) -> None:
    host, _ = world
    member = connect(host)
    pool, _ = host.open_named(member, "swap", persistent=True, order=0)
    host.store.destroy_pool(pool)
    host.destroyed(pool)
    fresh, reopened = host.open_named(member, "swap", persistent=True, order=0)
    assert not reopened and fresh is not pool


def test_kept_pages_count_against_caps_and_budget(world) -> None:
    host, _ = world
    member = connect(host)
    pool, _ = host.open_named(member, "swap", persistent=True, order=0)
    fill(host, pool, 60)
    disconnect(host, member, [pool])
    # 60 of 64 slots are kept for vm: another guest finds only 4 persistent pages of room.
    other = connect(host, name="1000/x")
    mine = host.store.new_pool(other.guest, persistent=True, order=0)
    stored = [host.store.put(mine, 1, i, memoryview(page(100 + i))) for i in range(6)]
    assert stored == [True] * 4 + [False] * 2


def test_status_and_pools_show_kept_named_pools(world) -> None:
    host, _ = world
    member = connect(host)
    pool, _ = host.open_named(member, "swap", persistent=True, order=0)
    fill(host, pool, 2)
    row = views.pools(host)[0]
    assert (row["name"], row["kept"]) == ("swap", False)
    disconnect(host, member, [pool])
    status = views.status(host)
    assert (status["kept_pools"], status["kept_pages"], status["reattach_seconds"]) == (1, 2, 30.0)
    assert views.pools(host)[0]["kept"] is True
    assert views.guests(host)[0]["sessions"] == 0


class Ctx:
    frames = 16
    max_batch = 16
    mapped = False
    lending = False

    def pool_order(self, handle: int) -> int | None:
        return None


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([1, 5, 1 << 24 | 1, None, ""], "pool name must be nil or 1..64"),
        ([1, 5, 1 << 24 | 1, None, "a/b"], "pool name must be nil or 1..64"),
        ([1, 5, 1 << 24 | 1, None, "x" * 65], "pool name must be nil or 1..64"),
        ([1, 5, 1 << 24 | 1, None, 7], "pool name must be nil or 1..64"),
        ([1, 5, 1 << 24 | 2, bytes(16), "swap"], "named by its uuid"),
        ([1, 5, 1 << 24, None, "swap", 1], "NEW_POOL takes 2 to 3 arguments"),
    ],
)
def test_bad_pool_names_are_refused(message: list[object], error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        decode_request(message, Ctx())


def test_new_pool_name_is_optional_on_the_wire() -> None:
    unnamed = decode_request([1, 5, 1 << 24 | 1, None], Ctx())
    named = decode_request([1, 5, 1 << 24 | 1, None, "swap"], Ctx())
    assert isinstance(unnamed, NewPool) and isinstance(named, NewPool)
    assert unnamed.spec == PoolSpec(True, False, 0, None)
    assert named.spec == PoolSpec(True, False, 0, None, "swap")
    assert named.to_wire() == [1, 5, 1 << 24 | 1, None, "swap"]
    assert unnamed.to_wire() == [1, 5, 1 << 24 | 1, None]


def test_a_uid_holds_at_most_max_named_pools_however_often_it_reconnects() -> None:
    """Kept pools outlive their connection, so max_pools (per connection) cannot bound them: a
    tenant connecting again and again, a new name each time, is stopped at max_named_pools
    (held and kept together, per uid), with a clear error; another uid is not; a pool that
    expires or is destroyed makes room again."""
    settings = Settings(
        socket=Path("/nonexistent"),
        budget=64 * PAGE,
        limits=Limits(reattach_seconds=30.0, max_named_pools=3),
    )
    store = Store(64 * PAGE)
    host = Host(store, settings)
    clock = Clock()
    host.clock = clock
    try:
        for i in range(3):  # a new connection, a new name, each time
            member = connect(host, name=f"1000/g{i}")
            pool, reopened = host.open_named(member, f"p{i}", persistent=True, order=0)
            assert not reopened
            disconnect(host, member, [pool])
        member = connect(host, name="1000/g9")
        with pytest.raises(LimitExceeded, match="max_named_pools=3"):
            host.open_named(member, "one-more", persistent=True, order=0)
        # Another uid is not held back.
        other = connect(host, name="1001/x", uid=1001)
        theirs, _ = host.open_named(other, "p0", persistent=True, order=0)
        assert theirs is not None
        clock.now += 31
        host.expire_named()  # (frees the three kept pools: empty, so no pages)
        assert host.named.of_uid(1000) == 0
        fresh, reopened = host.open_named(member, "one-more", persistent=True, order=0)
        assert not reopened and fresh is not None
    finally:
        store.close()
