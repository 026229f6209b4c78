"""put_many_nowait against a real tmemd: batched puts whose answers nobody waits for (the
cleancache case) are served in order, all sent even when bigger than the region, their
refusals and error answers counted rather than raised, and their staging frames freed; with the
sync and the trio client."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import Daemon

import tmemclient
import tmemclient.wire.messages


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The tmemd this module's tests share (conftest's ``shared_daemon``, checked after each
    test); a test that needs other options starts its own with ``start_daemon``."""
    return shared_daemon


def page(i: int) -> bytes:
    return i.to_bytes(4, "big") * 1023 + b"\xff" * 4  # not same-filled: a slot each


def test_nowait_puts_are_seen_by_later_gets_in_order(daemon: Any) -> None:
    with tmemclient.connect(daemon.socket, name="nw1", frames=16) as client:
        pool = client.new_pool(persistent=True)
        pool.put_many_nowait([(1, i, page(i)) for i in range(100)])
        # No answer read yet is fine: the daemon serves requests in order.
        assert pool.get(1, 99) == page(99)
        assert client.wait_deferred().stored == 100
        assert [
            d == page(i) for i, d in enumerate(pool.get_many([(1, i) for i in range(100)]))
        ] == [True] * 100


def test_nowait_batches_larger_than_the_region_are_all_sent(daemon: Any) -> None:
    with tmemclient.connect(daemon.socket, name="nw2", frames=8) as client:
        pool = client.new_pool(persistent=True)
        pool.put_many_nowait([(2, i, page(i)) for i in range(500)])
        stats = client.wait_deferred()
        assert (stats.stored, stats.refused, stats.errors) == (500, 0, 0)
        assert client._alloc.free == 8, "every staging frame came back with its answer"


def test_nowait_refusals_are_counted_not_raised(start_daemon: Any) -> None:
    small = start_daemon("--memory", "64KiB")
    with tmemclient.connect(small.socket, name="nw3", frames=8) as client:
        pool = client.new_pool(persistent=True)
        pool.put_many_nowait([(3, i, page(i)) for i in range(40)])
        stats = client.wait_deferred()
        assert stats.stored == 16  # 64 KiB of 4 KiB pages
        assert stats.refused == 24


def test_nowait_error_answers_are_recorded(daemon: Any) -> None:
    with tmemclient.connect(daemon.socket, name="nw4", frames=8) as client:
        pool = client.new_pool()
        other = client.new_pool()
        # Destroy the pool behind the client's back: the deferred put gets UnknownPool.
        client._exchange([[tmemclient.wire.messages.Op.DESTROY_POOL, pool.handle]])
        pool.put_many_nowait([(4, 0, page(0))])
        other.put(5, 0, page(5))  # reading this answer also reads the deferred one
        assert client.deferred.errors == 1
        assert "unknown" in (client.deferred.last_error or "")


async def test_trio_nowait_puts_are_counted_and_free_their_frames(daemon: Any) -> None:
    with trio.fail_after(30):
        async with tmemclient.open_client(daemon.socket, name="nw5", frames=8) as client:
            pool = await client.new_pool(persistent=True)
            await pool.put_many_nowait([(6, i, page(i)) for i in range(300)])
            assert await pool.get(6, 299) == page(299)  # served in order after the puts
            stats = await client.wait_deferred()
            assert (stats.stored, stats.refused, stats.errors) == (300, 0, 0)
            assert client._alloc.free == 8
            got = await pool.get_many([(6, i) for i in range(300)])
            assert all(d == page(i) for i, d in enumerate(got))


def test_single_nowait_puts_are_seen_and_counted(daemon: Any) -> None:
    with tmemclient.connect(daemon.socket, name="nw6", frames=16) as client:
        pool = client.new_pool(persistent=True)
        for i in range(40):
            pool.put_nowait(4, i, page(i))
        assert pool.get(4, 39) == page(39)  # served in order, answer unread or not
        assert client.wait_deferred().stored == 40
        assert pool.get_many([(4, i) for i in range(40)]) == [page(i) for i in range(40)]


async def test_single_nowait_puts_of_the_trio_client(daemon: Any) -> None:
    async with tmemclient.open_client(daemon.socket, name="nw7", frames=16) as client:
        pool = await client.new_pool(persistent=True)
        for i in range(20):
            await pool.put_nowait(5, i, page(i))
        assert (await client.wait_deferred()).stored == 20
        assert await pool.get(5, 19) == page(19)
