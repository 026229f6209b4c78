"""The guest library (tmemclient's sync and trio clients) against a real tmemd over real Unix
sockets: every pool operation and its batches, pools and their handles, the checks made before
anything is sent, pressure and eviction, several guest processes, a daemon that goes away, and
what the daemon logs.

Most tests share one tmemd (conftest's ``shared_daemon``) under guest names of their own; those
that need the whole budget, other limits or a stop start their own. Every sync client gets a
socket timeout (IO_TIMEOUT) so a hang fails the test instead of blocking it; every trio test
runs under ``trio.fail_after``.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Daemon, run_guest

import tmemclient
from tmemclient import (
    Client,
    DaemonGone,
    GuestConflict,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    UnknownPool,
)
from tmemclient._plans import PoolInfo

IO_TIMEOUT = 30.0
PAGE = 4096
BUDGET_PAGES = (16 << 20) // PAGE  # the `daemon` fixture's budget


def page(tag: int, size: int = PAGE) -> bytes:
    """Page bytes that no other tag produces."""
    return random.Random(tag).randbytes(size)


Connect = Callable[..., Client]


def open_sync(daemon: Daemon, name: str, frames: int = 64) -> Client:
    """A sync client whose every blocking call is bounded (the client has no per-call timeout,
    so the test sets one on its socket: a hang turns into DaemonGone)."""
    client = tmemclient.connect(daemon.socket, name=name, frames=frames, timeout=IO_TIMEOUT)
    client._sock.settimeout(IO_TIMEOUT)
    return client


_serial = itertools.count()


def unique(name: str) -> str:
    """A guest name no other test uses, so tests can share a daemon (and its log)."""
    return f"{name}.{next(_serial)}"


def connector(daemon: Daemon) -> Iterator[Connect]:
    """Connect sync guests under unique names; all closed at teardown."""
    clients: list[Client] = []

    def make(name: str = "g", frames: int = 64) -> Client:
        client = open_sync(daemon, unique(name), frames)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def connect(shared_daemon: Daemon) -> Iterator[Connect]:
    """Sync guests of the shared daemon."""
    yield from connector(shared_daemon)


@pytest.fixture
def connect_alone(daemon: Daemon) -> Iterator[Connect]:
    """Sync guests of a daemon of their own, for tests that need the whole budget."""
    yield from connector(daemon)


def disconnect_event(daemon: Daemon, name: str) -> dict[str, Any]:
    """The daemon's guest_disconnected record for guest ``name`` (waited for, bounded)."""
    return daemon.wait_disconnected(name)


def forged_pool(client: Client, handle: int, *, persistent: bool = True) -> tmemclient.Pool:
    """A Pool object of ``client`` naming an arbitrary handle, as a guessing guest would."""
    return tmemclient.Pool(client, PoolInfo(handle, PAGE, persistent, False, None))


# ------------------------------------------------------------------------------------ sync client


def test_put_then_get_returns_the_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.put(1, 0, page(1)) is True
    assert pool.get(1, 0) == page(1)


def test_get_of_a_page_never_put_misses(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.get(1, 0) is None


def test_ephemeral_get_is_exclusive_across_the_socket(connect: Connect) -> None:
    pool = connect().new_pool()
    pool.put(1, 0, page(1))
    assert pool.get(1, 0) == page(1)
    assert pool.get(1, 0) is None


def test_persistent_get_leaves_the_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    assert pool.get(1, 0) == page(1)
    assert pool.get(1, 0) == page(1)


def test_put_put_get_returns_the_newest_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    pool.put(1, 0, page(2))
    assert pool.get(1, 0) == page(2)


def test_put_accepts_any_bytes_like_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.put(1, 0, bytearray(page(1)))
    assert pool.put(1, 1, memoryview(page(2)))
    assert (pool.get(1, 0), pool.get(1, 1)) == (page(1), page(2))


def test_flush_then_get_misses(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    pool.flush(1, 0)
    assert pool.get(1, 0) is None


def test_flush_is_idempotent(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    pool.flush(1, 0)
    pool.flush(1, 0)
    pool.flush(5, 5)
    assert pool.get(1, 0) is None


def test_flush_object_removes_that_object_only(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    for index in range(5):
        pool.put(1, index, page(index))
        pool.put(2, index, page(10 + index))
    pool.flush_object(1)
    assert [pool.get(1, i) for i in range(5)] == [None] * 5
    assert [pool.get(2, i) for i in range(5)] == [page(10 + i) for i in range(5)]


@pytest.mark.parametrize(
    "oid", [0, (1 << 64) - 1, 1 << 64, (1 << 191) + 7, (1 << 192) - 1], ids=hex
)
def test_object_ids_up_to_192_bits_round_trip(connect: Connect, oid: int) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.put(oid, 3, page(oid))
    assert pool.get(oid, 3) == page(oid)


def test_wide_object_ids_that_share_low_bits_are_distinct(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    low, high = 7, (1 << 191) | 7
    pool.put(low, 0, page(1))
    pool.put(high, 0, page(2))
    pool.flush_object(high)
    assert (pool.get(low, 0), pool.get(high, 0)) == (page(1), None)


def test_largest_index_round_trips(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.put(1, (1 << 32) - 1, page(1))
    assert pool.get(1, (1 << 32) - 1) == page(1)


@pytest.mark.parametrize("page_size", [8192, 65536])
def test_larger_page_sizes_round_trip(connect: Connect, page_size: int) -> None:
    pool = connect(frames=32).new_pool(persistent=True, page_size=page_size)
    assert pool.page_size == page_size
    assert pool.put(1, 0, page(1, page_size))
    assert pool.get(1, 0) == page(1, page_size)


def test_write_then_read_returns_the_written_bytes(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    assert pool.write(1, 0, 100, b"hello") is True
    assert pool.read(1, 0, 98, 9) == page(1)[98:100] + b"hello" + page(1)[105:107]


def test_write_changes_only_its_range_of_the_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    pool.write(1, 0, 4090, b"tail!!")
    expected = page(1)[:4090] + b"tail!!"
    assert pool.get(1, 0) == expected


def test_xchg_returns_the_old_bytes_and_stores_the_new(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    assert pool.xchg(1, 0, 0, b"NEW") == page(1)[:3]
    assert pool.read(1, 0, 0, 3) == b"NEW"


def test_sub_page_ops_across_a_frame_boundary_of_a_large_page(connect: Connect) -> None:
    pool = connect(frames=8).new_pool(persistent=True, page_size=8192)
    original = page(1, 8192)
    pool.put(1, 0, original)
    assert pool.read(1, 0, 4090, 20) == original[4090:4110]
    data = page(2, 6000)
    assert pool.write(1, 0, 1000, data)
    assert pool.xchg(1, 0, 4000, b"x" * 200) == data[3000:3200]
    expected = bytearray(original)
    expected[1000:7000] = data
    expected[4000:4200] = b"x" * 200
    assert pool.get(1, 0) == bytes(expected)


def test_read_of_the_whole_page(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.put(1, 0, page(1))
    assert pool.read(1, 0, 0, PAGE) == page(1)


def test_sub_page_ops_on_a_missing_page_miss(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    assert pool.read(1, 0, 0, 8) is None
    assert pool.write(1, 0, 0, b"data") is False
    assert pool.xchg(1, 0, 0, b"data") is None
    assert pool.get(1, 0) is None


def test_read_leaves_an_ephemeral_page_in_place(connect: Connect) -> None:
    pool = connect().new_pool()
    pool.put(1, 0, page(1))
    pool.read(1, 0, 0, 16)
    assert pool.get(1, 0) == page(1)


def test_put_many_and_get_many_split_across_a_small_region(connect: Connect) -> None:
    pool = connect(frames=8).new_pool(persistent=True)
    items = [(i % 3, i, page(i)) for i in range(100)]
    assert pool.put_many(items) == [True] * 100
    assert pool.get_many([(oid, index) for oid, index, _ in items]) == [d for _, _, d in items]


def test_put_many_of_large_pages_splits_across_a_small_region(connect: Connect) -> None:
    pool = connect(frames=8).new_pool(persistent=True, page_size=8192)
    items = [(1, i, page(i, 8192)) for i in range(30)]
    assert pool.put_many(items) == [True] * 30
    assert pool.get_many([(1, i) for i in range(30)]) == [d for _, _, d in items]


def test_get_many_reports_hits_and_misses_per_item(connect: Connect) -> None:
    pool = connect(frames=8).new_pool(persistent=True)
    pool.put_many([(1, i, page(i)) for i in range(0, 40, 2)])
    got = pool.get_many([(1, i) for i in range(40)])
    assert got == [page(i) if i % 2 == 0 else None for i in range(40)]


def test_get_many_of_ephemeral_pages_is_exclusive(connect: Connect) -> None:
    pool = connect(frames=8).new_pool()
    pool.put_many([(1, i, page(i)) for i in range(20)])
    assert pool.get_many([(1, i) for i in range(20)]) == [page(i) for i in range(20)]
    assert pool.get_many([(1, i) for i in range(20)]) == [None] * 20


def test_flush_many_removes_every_page_named(connect: Connect) -> None:
    pool = connect(frames=8).new_pool(persistent=True)
    pool.put_many([(1, i, page(i)) for i in range(100)])
    pool.flush_many([(1, i) for i in range(0, 100, 2)])
    got = pool.get_many([(1, i) for i in range(100)])
    assert got == [None if i % 2 == 0 else page(i) for i in range(100)]


def test_empty_batches_return_empty_results_and_send_nothing(shared_daemon: Daemon) -> None:
    name = unique("empty")
    client = open_sync(shared_daemon, name)
    try:
        pool = client.new_pool(persistent=True)
        assert pool.put_many([]) == []
        assert pool.get_many([]) == []
        pool.flush_many([])
    finally:
        client.close()
    assert disconnect_event(shared_daemon, name)["requests"] == 1  # NEW_POOL alone


def test_put_frame_and_get_frame_use_reserved_frames(connect: Connect) -> None:
    client = connect(frames=8)
    pool = client.new_pool(persistent=True)
    with client.reserve_frames(2) as run:
        run.frame(0)[:] = page(1)
        assert pool.put_frame(1, 0, run.start) is True
        assert pool.get_frame(1, 0, run.start + 1) is True
        assert bytes(run.frame(1)) == page(1)


def test_get_frame_of_a_missing_page_misses(connect: Connect) -> None:
    client = connect(frames=8)
    pool = client.new_pool(persistent=True)
    with client.reserve_frames(1) as run:
        assert pool.get_frame(1, 0, run.start) is False


def test_put_frame_of_a_large_page_spans_consecutive_frames(connect: Connect) -> None:
    client = connect(frames=8)
    pool = client.new_pool(persistent=True, page_size=8192)
    with client.reserve_frames(4) as run:
        run.view[:8192] = page(1, 8192)
        assert pool.put_frame(1, 0, run.start)
        assert pool.get_frame(1, 0, run.start + 2)
        assert bytes(run.view[8192:]) == page(1, 8192)


def test_copying_helpers_never_stage_in_reserved_frames(connect: Connect) -> None:
    client = connect(frames=8)
    pool = client.new_pool(persistent=True)
    with client.reserve_frames(7) as run:
        run.view[:] = b"\x5a" * len(run.view)
        assert pool.put_many([(1, i, page(i)) for i in range(20)]) == [True] * 20
        assert pool.get_many([(1, i) for i in range(20)]) == [page(i) for i in range(20)]
        assert bytes(run.view) == b"\x5a" * len(run.view)


def test_reserving_more_frames_than_free_raises_limit_exceeded(connect: Connect) -> None:
    client = connect(frames=8)
    with client.reserve_frames(6), pytest.raises(LimitExceeded):
        client.reserve_frames(3)


def test_ping_round_trips(shared_daemon: Daemon) -> None:
    """Each PING reaches tmemd, and ping() returns only once its answer came back."""
    name = unique("pinger")
    client = open_sync(shared_daemon, name)
    try:
        for _ in range(3):
            client.ping()
            assert client._core.pending == {}, "ping() returned before its answer came"
    finally:
        client.close()
    assert disconnect_event(shared_daemon, name)["requests"] == 3


def test_error_reply_leaves_the_connection_usable(connect: Connect) -> None:
    client = connect()
    with pytest.raises(PermissionDenied):
        client.new_pool(shared=True, uuid=uuid.uuid4())
    pool = client.new_pool(persistent=True)
    assert pool.put(1, 0, page(1))


def test_batches_beyond_max_batch_are_split_into_several_requests(
    start_daemon: Callable[..., Daemon],
) -> None:
    limited = start_daemon("--memory", "1MiB", "--max-batch", "16")
    client = open_sync(limited, "g", frames=64)
    try:
        pool = client.new_pool(persistent=True)
        assert pool.put_many([(1, i, page(i)) for i in range(100)]) == [True] * 100
        assert pool.get_many([(1, i) for i in range(100)]) == [page(i) for i in range(100)]
        pool.flush_many([(1, i) for i in range(100)])
        assert pool.get_many([(1, i) for i in range(100)]) == [None] * 100
    finally:
        client.close()


def test_pool_limit_raises_limit_exceeded_until_a_pool_is_destroyed(
    start_daemon: Callable[..., Daemon],
) -> None:
    limited = start_daemon("--memory", "1MiB", "--max-pools", "2")
    client = open_sync(limited, "g")
    try:
        first = client.new_pool()
        client.new_pool()
        with pytest.raises(LimitExceeded):
            client.new_pool()
        first.destroy()
        assert client.new_pool().put(1, 0, page(1))
    finally:
        client.close()


def test_region_larger_than_the_daemon_allows_is_refused(
    start_daemon: Callable[..., Daemon],
) -> None:
    limited = start_daemon("--memory", "1MiB", "--max-region-frames", "16")
    with pytest.raises(LimitExceeded):
        open_sync(limited, "g", frames=17)


def test_page_size_larger_than_the_region_is_refused(connect: Connect) -> None:
    with pytest.raises(InvalidArgument):
        connect(frames=8).new_pool(page_size=65536)


def test_sync_staging_without_free_frames_raises_limit_exceeded(connect: Connect) -> None:
    client = connect(frames=4)
    pool = client.new_pool(persistent=True)
    with client.reserve_frames(4), pytest.raises(LimitExceeded):
        pool.put(1, 0, page(1))


# ------------------------------------------------------------------------------------ pools


def test_destroy_frees_the_pools_pages(start_daemon: Callable[..., Daemon]) -> None:
    small = start_daemon("--memory", "256KiB")  # 64 pages
    client = open_sync(small, "g", frames=16)
    try:
        first = client.new_pool(persistent=True)
        assert all(first.put_many([(1, i, page(i)) for i in range(64)]))
        first.destroy()
        second = client.new_pool(persistent=True)
        assert second.put_many([(1, i, page(i)) for i in range(64)]) == [True] * 64
    finally:
        client.close()


def test_use_after_destroy_raises_unknown_pool(connect: Connect) -> None:
    pool = connect().new_pool(persistent=True)
    pool.destroy()
    with pytest.raises(UnknownPool):
        pool.put(1, 0, page(1))
    with pytest.raises(UnknownPool):
        pool.get(1, 0)
    with pytest.raises(UnknownPool):
        pool.destroy()


def test_daemon_refuses_a_destroyed_handle(connect: Connect) -> None:
    client = connect()
    pool = client.new_pool(persistent=True)
    pool.put(1, 0, page(1))
    pool.destroy()
    stale = forged_pool(client, pool.info.handle)
    with pytest.raises(UnknownPool):
        stale.get(1, 0)


def test_new_pool_handles_are_not_reused(connect: Connect) -> None:
    client = connect()
    handles = set()
    for _ in range(10):
        pool = client.new_pool()
        handles.add(pool.info.handle)
        pool.destroy()
    assert len(handles) == 10


def test_shared_pool_request_is_permission_denied(connect: Connect) -> None:
    with pytest.raises(PermissionDenied):
        connect().new_pool(shared=True, uuid=uuid.uuid4())


def test_shared_persistent_pool_request_is_invalid(connect: Connect) -> None:
    with pytest.raises(InvalidArgument):
        connect().new_pool(shared=True, persistent=True, uuid=uuid.uuid4())


def test_private_pool_is_invisible_to_another_guest(connect: Connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    secret = alice.new_pool(persistent=True)
    secret.put(1, 0, page(1))
    bob.new_pool(persistent=True)
    guess = forged_pool(bob, secret.info.handle)
    for attempt in (
        lambda: guess.get(1, 0),
        lambda: guess.put(1, 0, page(2)),
        lambda: guess.read(1, 0, 0, 8),
        lambda: guess.flush(1, 0),
        lambda: guess.flush_object(1),
        lambda: guess.destroy(),
    ):
        with pytest.raises(UnknownPool):
            attempt()
    assert secret.get(1, 0) == page(1)


def test_guessed_handle_numbers_reach_no_pool_of_another_guest(connect: Connect) -> None:
    alice, bob = connect("alice"), connect("bob")
    target = alice.new_pool(persistent=True)
    target.put(1, 0, page(1))
    own = bob.new_pool(persistent=True).info.handle
    base = target.info.handle
    guesses = {*range(0, 64), *range(base - 32, base + 32), (1 << 32) - 1} - {own}
    for handle in sorted(h for h in guesses if 0 <= h < 1 << 32):
        with pytest.raises(UnknownPool):
            forged_pool(bob, handle).get(1, 0)
    assert target.get(1, 0) == page(1)


def test_same_guest_name_cannot_connect_twice(shared_daemon: Daemon) -> None:
    name = unique("twin")
    with open_sync(shared_daemon, name), pytest.raises(GuestConflict):
        open_sync(shared_daemon, name)


# ------------------------------------------------------------------------------------ local checks


BAD_CALLS: dict[str, Callable[[Client, tmemclient.Pool], object]] = {
    "short-page": lambda c, p: p.put(1, 0, b"x" * (PAGE - 1)),
    "long-page": lambda c, p: p.put(1, 0, b"x" * (PAGE + 1)),
    "page-not-bytes": lambda c, p: p.put(1, 0, "x" * PAGE),
    "negative-oid": lambda c, p: p.get(-1, 0),
    "oid-2**192": lambda c, p: p.put(1 << 192, 0, page(1)),
    "oid-bool": lambda c, p: p.get(True, 0),
    "oid-float": lambda c, p: p.get(1.0, 0),  # type: ignore[arg-type]
    "index-2**32": lambda c, p: p.get(1, 1 << 32),
    "negative-index": lambda c, p: p.flush(1, -1),
    "flush-object-wide-oid": lambda c, p: p.flush_object(1 << 192),
    "read-past-page": lambda c, p: p.read(1, 0, PAGE - 10, 11),
    "read-zero-length": lambda c, p: p.read(1, 0, 0, 0),
    "read-negative-offset": lambda c, p: p.read(1, 0, -1, 4),
    "write-past-page": lambda c, p: p.write(1, 0, PAGE - 1, b"ab"),
    "write-empty": lambda c, p: p.write(1, 0, 0, b""),
    "xchg-past-page": lambda c, p: p.xchg(1, 0, PAGE, b"a"),
    "put-many-one-bad-page": lambda c, p: p.put_many([(1, 0, page(1)), (1, 1, b"short")]),
    "put-many-bad-tuple": lambda c, p: p.put_many([(1, 0)]),  # type: ignore[list-item]
    "get-many-bad-index": lambda c, p: p.get_many([(1, 0), (1, 1 << 32)]),
    "flush-many-bad-oid": lambda c, p: p.flush_many([(1, 0), (-5, 0)]),
    "put-frame-outside-region": lambda c, p: p.put_frame(1, 0, c.limits.frames),
    "get-frame-negative": lambda c, p: p.get_frame(1, 0, -1),
    "page-size-1000": lambda c, p: c.new_pool(page_size=1000),
    "page-size-2**17": lambda c, p: c.new_pool(page_size=PAGE << 5),
    "page-size-bool": lambda c, p: c.new_pool(page_size=True),
    "shared-without-uuid": lambda c, p: c.new_pool(shared=True),
    "malformed-uuid": lambda c, p: c.new_pool(shared=True, uuid="not-a-uuid"),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_argument_raises_invalid_argument_before_sending(
    shared_daemon: Daemon, call: Callable[[Client, tmemclient.Pool], object]
) -> None:
    name = unique("local")
    client = open_sync(shared_daemon, name, frames=8)
    try:
        pool = client.new_pool(persistent=True)  # the only request the daemon should see
        with pytest.raises(InvalidArgument):
            call(client, pool)
    finally:
        client.close()
    assert disconnect_event(shared_daemon, name)["requests"] == 1


def test_invalid_argument_is_a_value_error() -> None:
    assert issubclass(InvalidArgument, ValueError)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "sp ace"])
def test_bad_guest_name_is_refused_locally(shared_daemon: Daemon, name: str) -> None:
    before = len(shared_daemon.events())
    with pytest.raises(InvalidArgument):
        tmemclient.connect(shared_daemon.socket, name=name, timeout=IO_TIMEOUT)
    assert len(shared_daemon.events()) == before  # not even a refused handshake


# ------------------------------------------------------------------------------------ pressure


def test_ephemeral_puts_succeed_under_pressure_and_old_pages_are_evicted(
    connect_alone: Connect,
) -> None:
    pool = connect_alone(frames=256).new_pool()
    total = 2 * BUDGET_PAGES
    assert pool.put_many([(1, i, page(i)) for i in range(total)]) == [True] * total
    got = pool.get_many([(1, i) for i in range(total)])
    hits = [i for i, data in enumerate(got) if data is not None]
    assert 0 < len(hits) <= BUDGET_PAGES
    assert got[0] is None
    assert got[-1] == page(total - 1)
    assert all(got[i] == page(i) for i in hits)


def test_persistent_pages_survive_another_guests_ephemeral_flood(connect_alone: Connect) -> None:
    keeper = connect_alone("keeper", frames=256).new_pool(persistent=True)
    kept = [(1, i, page(i)) for i in range(BUDGET_PAGES // 4)]
    assert all(keeper.put_many(kept))
    flood = connect_alone("flood", frames=256).new_pool()
    total = 3 * BUDGET_PAGES
    for start in range(0, total, 1024):
        assert all(flood.put_many([(2, i, page(-i)) for i in range(start, start + 1024)]))
    assert keeper.get_many([(1, i) for _, i, _ in kept]) == [d for _, _, d in kept]


def test_persistent_put_beyond_the_budget_returns_false(
    start_daemon: Callable[..., Daemon],
) -> None:
    small = start_daemon("--memory", "1MiB")  # 256 pages
    client = open_sync(small, "g", frames=64)
    try:
        pool = client.new_pool(persistent=True)
        flags = pool.put_many([(1, i, page(i)) for i in range(300)])
        assert flags == [True] * 256 + [False] * 44
        assert pool.put(2, 0, page(0)) is False
        assert pool.get(1, 255) == page(255)
    finally:
        client.close()


def test_persistent_pages_are_not_evicted_by_ephemeral_puts_of_the_same_guest(
    start_daemon: Callable[..., Daemon],
) -> None:
    small = start_daemon("--memory", "1MiB")
    client = open_sync(small, "g", frames=64)
    try:
        pers = client.new_pool(persistent=True)
        assert all(pers.put_many([(1, i, page(i)) for i in range(200)]))
        eph = client.new_pool()
        assert all(eph.put_many([(1, i, page(-i)) for i in range(500)]))
        assert pers.get_many([(1, i) for i in range(200)]) == [page(i) for i in range(200)]
    finally:
        client.close()


def test_disconnect_frees_the_guests_pages_for_others(daemon: Daemon) -> None:
    first = open_sync(daemon, "first", frames=256)
    try:
        pool = first.new_pool(persistent=True)
        flags = pool.put_many([(1, i, page(i)) for i in range(BUDGET_PAGES)])
        assert flags == [True] * BUDGET_PAGES
    finally:
        first.close()
    assert disconnect_event(daemon, "first")["pages_freed"] == BUDGET_PAGES
    second = open_sync(daemon, "second", frames=256)
    try:
        pool = second.new_pool(persistent=True)
        flags = pool.put_many([(1, i, page(-i)) for i in range(BUDGET_PAGES)])
        assert flags == [True] * BUDGET_PAGES
    finally:
        second.close()


def test_disconnect_event_counts_every_pool(shared_daemon: Daemon) -> None:
    name = unique("counted")
    client = open_sync(shared_daemon, name, frames=16)
    try:
        client.new_pool(persistent=True).put_many([(1, i, page(i)) for i in range(10)])
        client.new_pool().put_many([(1, i, page(i)) for i in range(5)])
        client.new_pool(page_size=8192).put(1, 0, page(1, 8192))
    finally:
        client.close()
    record = disconnect_event(shared_daemon, name)
    assert (record["pages_freed"], record["pools"]) == (16, 3)


# ------------------------------------------------------------------------------------ processes


GUEST_SCRIPT = """
import sys
import tmemclient

path, name = sys.argv[1], sys.argv[2]
def page(i):
    return (name + ":" + str(i)).encode().ljust(4096, b".")

with tmemclient.connect(path, name=name, frames=16) as client:
    client._sock.settimeout(30)
    pers = client.new_pool(persistent=True)
    eph = client.new_pool()
    for rnd in range(10):
        items = [(7, i, page(rnd * 1000 + i)) for i in range(50)]
        assert all(pers.put_many(items)), "persistent put refused"
        for i in range(0, 50, 7):
            assert pers.get(7, i) == page(rnd * 1000 + i), "wrong persistent page"
            assert eph.put(7, i, page(-i))
            got = eph.get(7, i)
            assert got in (None, page(-i)), "wrong ephemeral page"
        got = pers.get_many([(7, i) for i in range(50)])
        assert got == [page(rnd * 1000 + i) for i in range(50)], "wrong batch"
print("verified", name)
"""


def test_several_guest_processes_each_see_only_their_own_pages(daemon: Daemon) -> None:
    names = [f"proc{n}" for n in range(4)]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: run_guest(GUEST_SCRIPT, str(daemon.socket), n), names))
    for name, result in zip(names, results, strict=True):
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stdout.strip() == f"verified {name}"
    connected = {r["guest"].split("/", 1)[1] for r in daemon.events("guest_connected")}
    assert connected == set(names)


def test_guest_process_killed_mid_session_frees_its_pages(shared_daemon: Daemon) -> None:
    name = unique("doomed")
    script = (
        "import os, sys, tmemclient\n"
        "c = tmemclient.connect(sys.argv[1], name=sys.argv[2], frames=64)\n"
        "p = c.new_pool(persistent=True)\n"
        "assert all(p.put_many([(1, i, bytes(4096)) for i in range(100)]))\n"
        "os._exit(0)\n"
    )
    result = run_guest(script, str(shared_daemon.socket), name)
    assert result.returncode == 0, result.stderr
    assert disconnect_event(shared_daemon, name)["pages_freed"] == 100


# ------------------------------------------------------------------------------------ daemon gone


def test_connecting_to_a_missing_socket_raises_daemon_gone(tmp_path: Path) -> None:
    with pytest.raises(DaemonGone) as info:
        tmemclient.connect(tmp_path / "missing.sock", name="g", timeout=IO_TIMEOUT)
    assert isinstance(info.value, ConnectionError)


def test_call_after_the_daemon_stopped_raises_daemon_gone(
    start_daemon: Callable[..., Daemon],
) -> None:
    short_lived = start_daemon("--memory", "1MiB")
    client = open_sync(short_lived, "g")
    try:
        pool = client.new_pool(persistent=True)
        pool.put(1, 0, page(1))
        short_lived.stop()
        with pytest.raises(DaemonGone):
            pool.get(1, 0)
        with pytest.raises(DaemonGone):
            pool.put(1, 0, page(1))
    finally:
        client.close()


def test_call_after_close_raises_daemon_gone(connect: Connect) -> None:
    client = connect()
    pool = client.new_pool(persistent=True)
    client.close()
    with pytest.raises(DaemonGone):
        pool.flush(1, 0)


# ------------------------------------------------------------------------------------ logging


def test_log_has_connect_and_disconnect_events_and_no_per_page_lines(daemon: Daemon) -> None:
    client = open_sync(daemon, "logged", frames=16)
    try:
        pool = client.new_pool(persistent=True)
        for i in range(100):
            pool.put(1, i, page(i))
            pool.get(1, i)
            pool.flush(1, i)
    finally:
        client.close()
    disconnect_event(daemon, "logged")
    lines = daemon.log_text().splitlines()
    events = [r["event"] for r in daemon.events()]
    assert len(lines) == len(events), "every log line is a JSON event"
    assert events.count("guest_connected") == events.count("guest_disconnected") == 1
    assert len(lines) < 10, f"{len(lines)} log lines for 300 page operations: {events}"
    assert not [e for e in events if any(op in e for op in ("put", "get", "flush", "page"))]


def test_connect_event_names_the_guest_and_its_region(shared_daemon: Daemon) -> None:
    name = unique("named")
    open_sync(shared_daemon, name, frames=12).close()
    disconnect_event(shared_daemon, name)
    records = shared_daemon.events("guest_connected")
    (record,) = [r for r in records if r["guest"].endswith("/" + name)]
    assert record["frames"] == 12


# ------------------------------------------------------------------------------------ trio client


async def test_trio_client_round_trips_every_pool_method(shared_daemon: Daemon) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=8
        ) as client:
            pool = await client.new_pool(persistent=True)
            wide = (1 << 192) - 1
            assert await pool.put(wide, 0, page(1))
            assert await pool.get(wide, 0) == page(1)
            assert await pool.write(wide, 0, 10, b"abc")
            assert await pool.read(wide, 0, 10, 3) == b"abc"
            assert await pool.xchg(wide, 0, 10, b"xyz") == b"abc"
            await pool.flush(wide, 0)
            assert await pool.get(wide, 0) is None
            items = [(2, i, page(i)) for i in range(30)]
            assert await pool.put_many(items) == [True] * 30
            assert await pool.get_many([(2, i) for i in range(30)]) == [d for *_, d in items]
            await pool.flush_many([(2, i) for i in range(15)])
            await pool.flush_object(2)
            assert await pool.get_many([(2, i) for i in range(30)]) == [None] * 30
            assert await pool.put_many([]) == []
            assert await pool.get_many([]) == []
            await pool.flush_many([])
            with client.reserve_frames(1) as run:
                run.frame(0)[:] = page(3)
                assert await pool.put_frame(3, 0, run.start)
                run.frame(0)[:] = bytes(PAGE)
                assert await pool.get_frame(3, 0, run.start)
                assert bytes(run.frame(0)) == page(3)
            await pool.destroy()
            with pytest.raises(UnknownPool):
                await pool.get(3, 0)


async def test_trio_ephemeral_get_is_exclusive(shared_daemon: Daemon) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(shared_daemon.socket, name=unique("t")) as client:
            pool = await client.new_pool()
            await pool.put(1, 0, page(1))
            assert await pool.get(1, 0) == page(1)
            assert await pool.get(1, 0) is None


async def test_trio_large_pages_and_sub_page_ops(shared_daemon: Daemon) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=8
        ) as client:
            pool = await client.new_pool(persistent=True, page_size=8192)
            await pool.put(1, 0, page(1, 8192))
            assert await pool.read(1, 0, 4000, 200) == page(1, 8192)[4000:4200]
            items = [(1, i, page(i, 8192)) for i in range(10)]
            assert await pool.put_many(items) == [True] * 10
            assert await pool.get_many([(1, i) for i in range(10)]) == [d for *_, d in items]


async def test_trio_many_concurrent_tasks_share_one_connection(shared_daemon: Daemon) -> None:
    tasks, rounds = 40, 15

    async def worker(pool: tmemclient.AsyncPool, n: int) -> None:
        for i in range(rounds):
            data = page(n * 1000 + i)
            assert await pool.put(n, i, data)
            assert await pool.get(n, i) == data
            assert await pool.xchg(n, i, 8, b"task") == data[8:12]
            assert await pool.read(n, i, 8, 4) == b"task"
            await trio.lowlevel.checkpoint()
        got = await pool.get_many([(n, i) for i in range(rounds)])
        assert [g[:8] + g[12:] if g else None for g in got] == [
            page(n * 1000 + i)[:8] + page(n * 1000 + i)[12:] for i in range(rounds)
        ]

    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=8
        ) as client:
            pool = await client.new_pool(persistent=True)
            async with trio.open_nursery() as nursery:
                for n in range(tasks):
                    nursery.start_soon(worker, pool, n)
            for n in range(tasks):
                assert await pool.read(n, rounds - 1, 8, 4) == b"task"


async def test_trio_concurrent_batches_larger_than_the_region(shared_daemon: Daemon) -> None:
    async def batch(pool: tmemclient.AsyncPool, oid: int) -> None:
        items = [(oid, i, page(oid * 100 + i)) for i in range(50)]
        assert await pool.put_many(items) == [True] * 50
        assert await pool.get_many([(oid, i) for i in range(50)]) == [d for *_, d in items]

    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=8
        ) as client:
            pool = await client.new_pool(persistent=True)
            async with trio.open_nursery() as nursery:
                for oid in range(8):
                    nursery.start_soon(batch, pool, oid)


async def test_trio_concurrent_pools_keep_pages_apart(shared_daemon: Daemon) -> None:
    async def use(pool: tmemclient.AsyncPool, tag: int) -> None:
        for i in range(20):
            await pool.put(1, i, page(tag * 100 + i))
        assert await pool.get_many([(1, i) for i in range(20)]) == [
            page(tag * 100 + i) for i in range(20)
        ]

    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=16
        ) as client:
            pools = [await client.new_pool(persistent=True) for _ in range(4)]
            async with trio.open_nursery() as nursery:
                for tag, pool in enumerate(pools):
                    nursery.start_soon(use, pool, tag)


async def test_trio_shared_pool_request_is_permission_denied(shared_daemon: Daemon) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(shared_daemon.socket, name=unique("t")) as client:
            with pytest.raises(PermissionDenied):
                await client.new_pool(shared=True, uuid=uuid.uuid4())
            with pytest.raises(InvalidArgument):
                await client.new_pool(shared=True, persistent=True, uuid=uuid.uuid4())


async def test_trio_bad_argument_raises_invalid_argument(shared_daemon: Daemon) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(shared_daemon.socket, name=unique("t")) as client:
            pool = await client.new_pool()
            with pytest.raises(InvalidArgument):
                await pool.put(1, 0, b"short")
            with pytest.raises(InvalidArgument):
                await pool.get(1 << 192, 0)


async def test_trio_connecting_to_a_missing_socket_raises_daemon_gone(tmp_path: Path) -> None:
    with trio.fail_after(IO_TIMEOUT), pytest.raises(DaemonGone):
        async with tmemclient.open_client(tmp_path / "missing.sock", name="t"):
            pass  # pragma: no cover - never reached


async def test_trio_call_after_the_daemon_stopped_raises_daemon_gone(
    start_daemon: Callable[..., Daemon],
) -> None:
    short_lived = start_daemon("--memory", "1MiB")
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(short_lived.socket, name="t") as client:
            pool = await client.new_pool(persistent=True)
            await pool.put(1, 0, page(1))
            await trio.to_thread.run_sync(short_lived.stop)
            with pytest.raises(DaemonGone):
                await pool.get(1, 0)


async def test_trio_cancelled_requests_never_mix_up_staged_pages(shared_daemon: Daemon) -> None:
    keys, trials = 24, 24
    put_versions: dict[int, set[int]] = {k: set() for k in range(keys)}

    def versioned(key: int, version: int) -> bytes:
        return page(key * 1000 + version)

    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=4
        ) as client:
            pool = await client.new_pool(persistent=True)
            for version in range(trials):
                async with trio.open_nursery() as nursery:

                    async def writer(key: int, version: int, nursery: trio.Nursery) -> None:
                        put_versions[key].add(version)
                        await pool.put(key, 0, versioned(key, version))
                        # cancel the others while they are in flight, holding staging
                        # frames, or waiting for them; a different one each round
                        if key == version * 5 % keys:
                            nursery.cancel_scope.cancel()

                    for key in range(keys):
                        nursery.start_soon(writer, key, version, nursery)
                await client.ping()  # every reply due has arrived after this one
                assert client._alloc.free == 4, "a cancelled request kept its staging frames"
                got = await pool.get_many([(k, 0) for k in range(keys)])
                for key, data in enumerate(got):
                    assert data is None or any(
                        data == versioned(key, v) for v in put_versions[key]
                    ), f"page {key} holds bytes that were never put there"


async def test_trio_task_waiting_for_frames_wakes_when_reserved_frames_are_released(
    shared_daemon: Daemon,
) -> None:
    with trio.fail_after(IO_TIMEOUT):
        async with tmemclient.open_client(
            shared_daemon.socket, name=unique("t"), frames=2
        ) as client:
            pool = await client.new_pool(persistent=True)
            run = client.reserve_frames(2)
            stored = trio.Event()

            async def putter() -> None:
                assert await pool.put(1, 0, page(1))
                stored.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(putter)
                await trio.testing.wait_all_tasks_blocked()  # putter waits for frames
                run.release()
                with trio.move_on_after(5):  # a bound on a hang, not a speed requirement
                    await stored.wait()
                nursery.cancel_scope.cancel()
            assert stored.is_set(), "the put never got the released frames"
