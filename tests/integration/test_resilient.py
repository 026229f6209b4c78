"""Clients that ride through a daemon restart (tmemclient/reconnect.py, areconnect.py; issue
#17) against real tmemd processes: a broken connection reconnects to the same daemon and gets
its named pools back with their pages; a daemon killed and started again is reached again and
the pools come back empty, which the client reports; a daemon that stays away ends a call with
``Unreachable`` after the retry budget, never a hang; the trio client does the same."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import Restartable

import tmemclient
from tmemclient import DaemonGone, Reconnected, Retry, Unreachable

PAGE = 4096
# Long enough for a daemon the test already restarted to be found; never waited for in full
# unless the daemon stays away.
RETRY = Retry(attempts=40, first_delay=0.02, max_delay=0.5, connect_timeout=10)
SHORT = Retry(attempts=3, first_delay=0.01, max_delay=0.02, connect_timeout=2)


def page(tag: int) -> bytes:
    return random.Random(tag).randbytes(PAGE)


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[Restartable]:
    r = Restartable(tmp_path)
    yield r
    r.stop()


def test_broken_connection_reconnects_and_reopens_named_pools_with_pages(
    tmemd: Restartable,
) -> None:
    events: list[Reconnected] = []
    with tmemclient.connect_resilient(
        tmemd.socket, "vm", retry=RETRY, on_reconnect=events.append, ring_frames=0
    ) as client:
        swap = client.new_pool(persistent=True, name="swap")
        cache = client.new_pool()
        assert swap.put_many([(1, i, page(i)) for i in range(30)]) == [True] * 30
        assert cache.put(1, 1, page(100))
        client.client._sock.shutdown(socket.SHUT_RDWR)  # the connection breaks; tmemd lives
        assert swap.get(1, 7) == page(7)  # reconnected under the call
        assert client.reconnects == 1
        (event,) = events
        assert event.reopened == ["swap"] and event.lost_persistent == 0
        assert len(event.emptied) == 1  # the unnamed ephemeral pool came back empty
        assert swap.reopened and swap.resets == 0 and cache.resets == 1
        assert swap.get_many([(1, i) for i in range(30)]) == [page(i) for i in range(30)]
        assert cache.get(1, 1) is None
        assert cache.put(1, 2, page(2)) and cache.get(1, 2) == page(2)
    assert tmemd.daemon.alive


def test_restarted_daemon_is_reached_again_and_lost_pages_are_reported(
    tmemd: Restartable,
) -> None:
    events: list[Reconnected] = []
    with tmemclient.connect_resilient(
        tmemd.socket, "vm", retry=RETRY, on_reconnect=events.append
    ) as client:
        swap = client.new_pool(persistent=True, name="swap")
        assert swap.put(1, 1, page(1))
        tmemd.restart()  # SIGKILL: this daemon keeps no state, so the pages are gone
        assert swap.get(1, 1) is None  # a new, empty pool: reported, never wrong data
        (event,) = events
        assert event.emptied == ["swap"] and event.lost_persistent == 1
        assert not swap.reopened and swap.resets == 1
        assert swap.put(1, 1, page(2)) and swap.get(1, 1) == page(2)  # carries on


def test_call_while_the_daemon_is_away_raises_unreachable_after_the_budget(
    tmemd: Restartable,
) -> None:
    client = tmemclient.connect_resilient(tmemd.socket, "vm", retry=SHORT)
    try:
        pool = client.new_pool(persistent=True, name="swap")
        tmemd.kill()
        with pytest.raises(Unreachable, match="did not come back after 3 attempts"):
            pool.put(1, 1, page(1))
        assert isinstance(Unreachable("x"), DaemonGone)
        tmemd.daemon = tmemd._start()
        assert pool.put(1, 1, page(1))  # the next call finds the daemon again
        assert pool.get(1, 1) == page(1)
    finally:
        client.close()


def test_xchg_in_flight_is_not_repeated(tmemd: Restartable) -> None:
    # Socket only: a request ring would carry the request past a broken socket.
    with tmemclient.connect_resilient(tmemd.socket, "vm", retry=RETRY, ring_frames=0) as client:
        pool = client.new_pool(persistent=True, name="p")
        assert pool.put(1, 1, page(1))
        client.client._sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(DaemonGone, match="may or may not have been applied"):
            pool.xchg(1, 1, 0, b"abcd")
        assert pool.read(1, 1, 0, 4) == page(1)[:4]  # it was not applied twice (nor once)


def test_first_connect_is_retried_and_bounded(tmp_path: Path) -> None:
    with pytest.raises(Unreachable, match="3 attempts"):
        tmemclient.connect_resilient(tmp_path / "nobody.sock", "vm", retry=SHORT)


def test_trio_client_rides_through_a_restart(tmemd: Restartable) -> None:
    events: list[Reconnected] = []

    async def main() -> None:
        with trio.fail_after(60):
            async with tmemclient.open_resilient_client(
                tmemd.socket, "vm", retry=RETRY, on_reconnect=events.append, ring_frames=0
            ) as client:
                swap = await client.new_pool(persistent=True, name="swap")
                assert await swap.put_many([(1, i, page(i)) for i in range(10)]) == [True] * 10
                client.client._sock.shutdown(socket.SHUT_RDWR)
                # Several tasks hit the broken connection at once: one reconnect serves all.
                results: dict[int, bytes | None] = {}

                async def get(i: int) -> None:
                    results[i] = await swap.get(1, i)

                async with trio.open_nursery() as nursery:
                    for i in range(10):
                        nursery.start_soon(get, i)
                assert results == {i: page(i) for i in range(10)}
                assert client.reconnects == 1 and events[0].reopened == ["swap"]
                tmemd.restart()
                assert await swap.get(1, 0) is None
                assert swap.resets == 1 and events[1].lost_persistent == 1
                tmemd.kill()
                short = client.retry
                client.retry = SHORT
                with pytest.raises(Unreachable):
                    await swap.put(1, 1, page(1))
                client.retry = short

    trio.run(main)
