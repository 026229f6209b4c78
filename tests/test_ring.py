"""Request rings (PROTOCOL.md §4.6): the pure ring, then guests using rings against a real tmemd.

Bad ring input from untrusted guests is in test_bad_input.py, with the other bad input.
"""

from __future__ import annotations

import array
import mmap
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Daemon

import tmemclient
from tmemclient.region import create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import encode_frame
from tmemclient.wire.errors import InvalidArgument, ProtocolError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Hello, Op
from tmemclient.wire.ring import Rings
from tmemd.connection import PollWindow

pytestmark = pytest.mark.skipif(not ring.supported(), reason="rings need x86-64")


# ------------------------------------------------------------------------------ the pure ring


@pytest.fixture
def pair() -> Iterator[tuple[Rings, Rings]]:
    """A guest side and a host side over one anonymous shared mapping, rings of one frame."""
    area = mmap.mmap(-1, layout.ring_bytes(1))
    host = Rings(memoryview(area), 1, "host")
    guest = Rings(memoryview(area), 1, "guest")
    yield guest, host
    guest.release()
    host.release()
    area.close()


def test_bytes_cross_both_ways_and_wrap(pair: tuple[Rings, Rings]) -> None:
    guest, host = pair
    rng = random.Random(1)
    sent = received = b""
    for _ in range(300):  # ~3 times around a 4 KiB ring, in odd sizes
        chunk = rng.randbytes(rng.randint(1, 100))
        assert guest.write(chunk)
        sent += chunk
        if rng.random() < 0.5:
            received += host.take()
    received += host.take()
    assert received == sent
    assert host.write(b"reply") and guest.take() == b"reply"
    assert not guest.pending() and not host.pending()


def test_a_full_ring_refuses_without_writing(pair: tuple[Rings, Rings]) -> None:
    guest, host = pair
    assert guest.write(b"x" * (FRAME_SIZE - 10))
    assert guest.free() == 10
    assert not guest.write(b"y" * 11)  # does not fit: nothing written
    assert guest.write(b"z" * 10)
    assert host.take() == b"x" * (FRAME_SIZE - 10) + b"z" * 10
    assert guest.free() == FRAME_SIZE


def test_sleep_words_are_seen_by_the_other_side(pair: tuple[Rings, Rings]) -> None:
    guest, host = pair
    assert not guest.peer_sleeping() and not host.peer_sleeping()
    host.sleeping(True)
    assert guest.peer_sleeping()
    guest.sleeping(True)
    assert host.peer_sleeping()
    host.sleeping(False)
    assert not guest.peer_sleeping()
    ring.fence()  # callable, and harmless


@pytest.mark.parametrize("word", [layout.SQ_TAIL, layout.CQ_HEAD])
@pytest.mark.parametrize("value", [FRAME_SIZE + 1, 2**64 - 1, 2**63])
def test_a_corrupt_guest_counter_is_a_protocol_error(
    pair: tuple[Rings, Rings], word: int, value: int
) -> None:
    guest, host = pair
    guest.words[word] = value
    with pytest.raises(ProtocolError, match="corrupt"):
        host.take() if word == layout.SQ_TAIL else host.write(b"reply")


def test_ring_sizes() -> None:
    assert layout.ring_bytes(0) == 0
    assert layout.ring_bytes(16) == 33 * FRAME_SIZE
    assert [n for n in range(300) if layout.valid_ring_frames(n)] == [
        0,
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
    ]


@pytest.mark.parametrize("value", [3, 257, 512, -1, "16", 1.0, True])
def test_hello_refuses_bad_ring_options(value: Any) -> None:
    with pytest.raises((InvalidArgument, ProtocolError)):
        Hello.decode([30, 1, 1, "x", 16, {"ring": value}])


def test_hello_ignores_unknown_options() -> None:
    assert Hello.decode([30, 1, 1, "x", 16, {"future": [1, 2]}]).ring == 0
    assert Hello.decode([30, 1, 1, "x", 16, {"ring": 8, "future": 1}]).ring == 8


# ------------------------------------------------------------------------------ a real tmemd


class AlwaysOpen(ring.SpinGate):
    """A gate that ignores how busy the machine is (the test machine may be)."""

    def open(self) -> bool:
        return True


def workload(client: tmemclient.Client, seed: int) -> None:
    """Every kind of request, each answer checked."""
    rng = random.Random(seed)
    pool = client.new_pool(persistent=True)
    pages = {(1, i): rng.randbytes(FRAME_SIZE) for i in range(200)}
    for (oid, i), data in list(pages.items())[:50]:
        assert pool.put(oid, i, data)
    assert all(pool.put_many([(o, i, d) for (o, i), d in list(pages.items())[50:]]))
    for key in rng.sample(list(pages), 40):
        assert pool.get(*key) == pages[key]
    keys = list(pages)
    assert pool.get_many(keys) == [pages[k] for k in keys]
    assert pool.read(1, 7, 100, 50) == pages[(1, 7)][100:150]
    assert pool.xchg(1, 7, 0, b"abc") == pages[(1, 7)][:3]
    pool.flush(1, 7)
    assert pool.get(1, 7) is None
    pool.flush_many([(1, i) for i in range(10)])
    assert pool.get_many([(1, i) for i in range(12)]) == [None] * 10 + [
        pages[(1, 10)],
        pages[(1, 11)],
    ]
    client.ping()
    pool.destroy()


def connect(daemon: Daemon, **kwargs: Any) -> tmemclient.Client:
    """A client that uses its rings however busy the test machine is."""
    client = tmemclient.connect(daemon.socket, name="r", **kwargs)
    client._gate = AlwaysOpen()
    return client


@pytest.mark.parametrize("ring_frames", [0, 1, 16])
def test_every_op_over_rings_and_without(daemon: Daemon, ring_frames: int) -> None:
    with connect(daemon, ring_frames=ring_frames) as client:
        assert client.rings == bool(ring_frames)
        assert client.limits.ring == ring_frames
        workload(client, ring_frames)


def test_rings_are_the_default(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="r") as client:
        assert client.rings and client.limits.ring == ring.DEFAULT_RING_FRAMES


def test_the_log_says_how_much_went_through_the_rings(daemon: Daemon) -> None:
    with connect(daemon, ring_frames=4) as client:
        workload(client, 6)
    with tmemclient.connect(daemon.socket, name="s", ring_frames=0) as plain:
        plain.ping()
    daemon.wait_event("guest_disconnected", 2)
    records = {r["guest"].split("/", 1)[1]: r for r in daemon.events("guest_disconnected")}
    connected = {r["guest"].split("/", 1)[1]: r for r in daemon.events("guest_connected")}
    assert connected["r"]["ring"] == 4 and connected["s"]["ring"] == 0
    assert records["r"]["ring_request_bytes"] > 1000 and records["r"]["ring_reply_bytes"] > 100
    assert "ring_request_bytes" not in records["s"]


def test_a_daemon_without_rings_serves_the_socket(start_daemon: Any) -> None:
    daemon = start_daemon("--max-ring-frames", "0")
    with connect(daemon) as client:
        assert not client.rings and client.limits.ring == 0
        workload(client, 1)


def test_asking_for_more_than_the_daemon_allows_gets_the_socket(start_daemon: Any) -> None:
    daemon = start_daemon("--max-ring-frames", "4")
    with connect(daemon, ring_frames=8) as client:
        assert not client.rings
        workload(client, 2)


def test_both_sides_sleep_and_wake_by_doorbell(start_daemon: Any) -> None:
    """No polling on either side: every request must wake a sleeping daemon (DOORBELL) and
    every reply a sleeping guest (the OK notice)."""
    daemon = start_daemon("--ring-poll-us", "0")
    with connect(daemon, spin_us=0) as client:
        client._sock.settimeout(10)  # a missed doorbell fails the test instead of hanging it
        assert client.rings
        workload(client, 3)
        for _ in range(3):
            time.sleep(0.05)  # long past any poll window: both asleep
            client.ping()


def test_idle_gaps_longer_than_the_poll_window(daemon: Daemon) -> None:
    with connect(daemon) as client:
        pool = client.new_pool()
        for i in range(5):
            time.sleep(0.02)
            assert pool.put(1, i, bytes([i]) * FRAME_SIZE)
            time.sleep(0.02)
            assert pool.get(1, i) == bytes([i]) * FRAME_SIZE


def test_big_requests_take_the_socket_and_order_holds(daemon: Daemon) -> None:
    """A batch too big for a one-frame ring goes over the socket; puts sent without waiting
    through one channel are seen by gets through the other."""
    with connect(daemon, ring_frames=1, frames=1024) as client:
        pool = client.new_pool(persistent=True)
        rng = random.Random(4)
        for round_ in range(4):
            big = [(2, i, rng.randbytes(FRAME_SIZE)) for i in range(400)]  # > 2 KiB of request
            pool.put_many_nowait(big)
            small = (3, round_, rng.randbytes(FRAME_SIZE))
            pool.put_many_nowait([small])  # through the ring, after the socket's batch
            assert pool.get(2, 399) == big[-1][2]
            assert pool.get(3, round_) == small[2]
            assert pool.get_many([(2, i) for i in range(400)]) == [d for _, _, d in big]
        stats = client.wait_deferred()
        assert (stats.stored, stats.refused, stats.errors) == (4 * 401, 0, 0)


def test_replies_that_overflow_the_reply_ring_come_over_the_socket(daemon: Daemon) -> None:
    """Many requests written into a one-frame ring at once: their replies (more bytes than the
    reply ring holds) arrive partly through the socket, each exactly once."""
    with tmemclient.connect(daemon.socket, name="r", ring_frames=1) as client:
        rings = client._rings
        assert rings is not None
        # 450 PINGs of 8 bytes: 3600 request bytes, ~4 KiB of replies; written by hand, all
        # at once, as the client itself never would.
        ids, data = client._core.send([[Op.PING]] * 450)
        assert rings.write(data)
        client._on_ring.update(ids)
        client._sock.sendall(encode_frame([Op.DOORBELL, 1]))
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + 10
        while len(replies) < len(ids) and time.monotonic() < deadline:
            client._read_one_reply(replies)
        assert sorted(replies) == ids
        assert all(a.status == 0 and a.result is None for a in replies.values())
        client.ping()  # and the connection goes on


def test_many_ring_guests_at_once(daemon: Daemon) -> None:
    """Four guest processes on rings, each checking every byte, with the daemon switching
    between them (and its poll loop letting the others run)."""
    script = f"""
import random, sys
import tmemclient
c = tmemclient.connect({str(daemon.socket)!r}, name=sys.argv[1])
c._gate.open = lambda: True  # use the ring however busy the machine is
assert c.rings
p = c.new_pool(persistent=True)
rng = random.Random(sys.argv[1])
pages = {{i: rng.randbytes(4096) for i in range(300)}}
for i, d in pages.items():
    assert p.put(1, i, d)
for _ in range(3):
    for i in rng.sample(range(300), 300):
        assert p.get(1, i) == pages[i]
print("ok")
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"g{n}"], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok"


def test_the_spin_gate_follows_the_runnable_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ring.runnable_tasks() >= 1  # this test is running
    gate = ring.SpinGate(period=0)
    monkeypatch.setattr(ring, "runnable_tasks", lambda: gate.cpus)
    assert gate.open()
    monkeypatch.setattr(ring, "runnable_tasks", lambda: gate.cpus + 1)
    assert not gate.open()
    slow = ring.SpinGate(period=3600)
    assert not slow.open()  # read once...
    monkeypatch.setattr(ring, "runnable_tasks", lambda: 1)
    assert not slow.open()  # ...and not again within the period


def test_a_missed_spin_shuts_the_gate_longer_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring, "runnable_tasks", lambda: 1)
    gate = ring.SpinGate(period=0.01)
    assert gate.open()
    gate.missed()
    assert not gate.open()
    first = gate._shut_until
    gate.missed()
    assert gate._shut_until - time.monotonic() > first - time.monotonic()  # doubled
    gate._shut_until = gate._next = 0.0  # the back-off is over
    assert gate.open()
    gate.hit()
    assert gate._backoff == gate.period


def test_the_poll_window_grows_to_cover_short_gaps_and_drops_after_long_ones() -> None:
    watch = PollWindow(50e-6, 1e-3)
    assert watch.window == 50e-6
    watch.woke(1.0)  # no watch began: nothing learnt
    assert watch.window == 50e-6
    watch.started = 1.0
    watch.woke(1.0 + 300e-6)  # a 300 us gap: a longer watch would have caught it
    assert watch.window == pytest.approx(375e-6)
    assert watch.started is None
    watch.started = 2.0
    watch.woke(2.0 + 400e-6)  # at least doubling
    assert watch.window == pytest.approx(750e-6)
    watch.started = 3.0
    watch.woke(3.0 + 900e-6)
    assert watch.window == pytest.approx(1e-3)  # never past the most
    watch.started = 4.0
    watch.woke(4.0 + 0.5)  # idle: watching was wasted
    assert watch.window == 50e-6
    watch.started = 5.0
    watch.woke(5.0 + 20e-6)  # inside the window: stays
    assert watch.window == 50e-6
    assert PollWindow(2e-3, 1e-3).most == 2e-3  # the most is never below the base


def test_a_guest_with_short_gaps_is_served_with_and_without_the_grown_watch(
    start_daemon: Any,
) -> None:
    """Gaps a bit longer than the base watch: the watch grows, and every answer is right
    whichever way the request was picked up (ring watched, or doorbell after a sleep)."""
    for poll_max in ("1000", "0"):
        daemon = start_daemon(
            "--ring-poll-us", "20", "--ring-poll-max-us", poll_max, name=f"d{poll_max}"
        )
        with connect(daemon, spin_us=0) as client:
            client._sock.settimeout(10)  # a lost request fails the test instead of hanging it
            assert client.rings
            pool = client.new_pool(persistent=True)
            for i in range(60):
                deadline = time.perf_counter() + 150e-6
                while time.perf_counter() < deadline:
                    pass
                assert pool.put(1, i, bytes([i]) * FRAME_SIZE)
                assert pool.get(1, i // 2) == bytes([i // 2]) * FRAME_SIZE
        assert daemon.stop() == 0


def test_a_busy_machine_sends_ring_guests_requests_over_the_socket(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="r") as client:
        client._gate.open = lambda: False  # type: ignore[method-assign]
        workload(client, 5)
        assert client._rings is not None and client._rings.written == 0


def test_region_size_includes_the_rings_asked_for(daemon: Daemon) -> None:
    """The memfd is frames + 1 + 2*ring frames; asking rings with a plain-size memfd fails."""
    fd, region = create_region(16)  # no room for rings
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(daemon.socket))
        hello = Hello(1, "r", 16, 4).encode()
        sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        data = sock.recv(4096)
        assert b"rings" in data and b"bytes" in data
    finally:
        sock.close()
        os.close(fd)
        region.close()
