"""Guests using request rings (PROTOCOL.md §4.6) against a real tmemd: every op with and
without rings, rings as the default, what the log says went through them, daemons that grant
none or fewer, both sides sleeping and woken by doorbells, gaps longer than the poll window,
big requests and overflowing replies over the socket, many ring guests at once, the grown
poll watch, a busy machine, and the region size a ring needs.

The pure ring is in tests/unit/test_ring.py; bad ring input from untrusted guests is in
tests/integration/test_bad_input.py, with the other bad input.
"""

from __future__ import annotations

import array
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

import tmemclient
from tmemclient.region import create_region
from tmemclient.wire import ring
from tmemclient.wire.codec import encode_frame
from tmemclient.wire.errors import TmemError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Hello, Op
from tmemclient.wire.ring import Rings
from tmemclient.wire.spingate import SpinGate
from tmemd import launch

pytestmark = pytest.mark.skipif(not ring.supported(), reason="rings need x86-64")


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The tmemd this module's tests share (conftest's ``shared_daemon``, checked after each
    test); a test that needs other options starts its own with ``start_daemon``."""
    return shared_daemon


class AlwaysOpen(SpinGate):
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


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.001)


def daemon_asleep(client: tmemclient.Client) -> None:
    """Until tmemd has stopped watching the client's request ring and sleeps (its word in the
    ring says so): the next request needs the doorbell (bounded wait)."""
    rings: Rings | None = client._rings
    assert rings is not None
    wait_until(rings.peer_sleeping, "tmemd never went to sleep on the ring")


def connect(daemon: Daemon, name: str = "r", **kwargs: Any) -> tmemclient.Client:
    """A client that uses its rings however busy the test machine is."""
    client = tmemclient.connect(daemon.socket, name=name, **kwargs)
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
    with connect(daemon, "logged-ring", ring_frames=4) as client:
        workload(client, 6)
    with tmemclient.connect(daemon.socket, name="logged-plain", ring_frames=0) as plain:
        plain.ping()
    records = {n: daemon.wait_disconnected(n) for n in ("logged-ring", "logged-plain")}
    connected = {
        r["guest"].split("/", 1)[1]: r
        for r in daemon.events("guest_connected")
        if r["guest"].endswith(("/logged-ring", "/logged-plain"))
    }
    assert connected["logged-ring"]["ring"] == 4 and connected["logged-plain"]["ring"] == 0
    ring_guest = records["logged-ring"]
    assert ring_guest["ring_request_bytes"] > 1000 and ring_guest["ring_reply_bytes"] > 100
    assert "ring_request_bytes" not in records["logged-plain"]


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
            daemon_asleep(client)  # and the client sleeps on its socket (spin_us=0)
            client.ping()


def test_idle_gaps_longer_than_the_poll_window(daemon: Daemon) -> None:
    """Each request comes after tmemd gave up watching the ring and went to sleep."""
    with connect(daemon) as client:
        client._sock.settimeout(10)  # a missed doorbell fails the test instead of hanging it
        pool = client.new_pool()
        for i in range(5):
            daemon_asleep(client)
            assert pool.put(1, i, bytes([i]) * FRAME_SIZE)
            daemon_asleep(client)
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
        subprocess.Popen(
            [sys.executable, "-c", script, f"g{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and out.strip() == "ok", err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


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


def test_a_busy_machine_takes_the_socket_while_the_daemon_sleeps(start_daemon: Any) -> None:
    """With no CPU to spare the guest does not watch its reply ring. While the daemon sleeps
    (here it never watches), a ring request would cost a doorbell each way and the ring's work
    on top, so requests take the socket; every answer is right."""
    daemon = start_daemon("--ring-poll-us", "0", name="sleepy")
    with tmemclient.connect(daemon.socket, name="r") as client:
        client._sock.settimeout(10)  # a lost request fails the test instead of hanging it
        client._gate.open = lambda: False  # type: ignore[method-assign]
        spins: list[int] = []

        def spin(rings: Rings) -> bool:
            spins.append(1)
            return False

        client._spin_for_reply = spin  # type: ignore[method-assign]
        rings = client._rings
        assert rings is not None
        for _ in range(1000):  # bounded: the poller sleeps once it has looked at the new ring
            if rings.peer_sleeping():
                break
            time.sleep(0.001)
        assert rings.peer_sleeping()
        workload(client, 5)
        assert rings.written == 0
        assert spins == []
    assert daemon.stop() == 0


def test_guests_busy_on_their_sockets_at_once_go_back_to_the_rings(start_daemon: Any) -> None:
    """Two guests that do not spin, on a daemon that never watches, start on their sockets;
    once their requests come in together the daemon says "crowded", and they use their rings
    (one wakeup of the poller then serves both), every answer right."""
    daemon = start_daemon("--ring-poll-us", "0", name="sleepy")
    other = f"""
import time
import tmemclient
c = tmemclient.connect({str(daemon.socket)!r}, name="b")
c._gate.open = lambda: False  # never spins
p = c.new_pool(persistent=True)
assert p.put(1, 0, b"b" * 4096)
print("ready", flush=True)
end = time.monotonic() + 30
for _ in range(1_000_000):  # bounded; killed once the test has seen what it waits for
    assert p.get(1, 0) == b"b" * 4096
    if time.monotonic() > end:
        break
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", other], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with tmemclient.connect(daemon.socket, name="a") as a:
            a._sock.settimeout(10)
            a._gate.open = lambda: False  # type: ignore[method-assign]
            pa = a.new_pool(persistent=True)
            assert pa.put(1, 0, b"a" * FRAME_SIZE)
            rings = a._rings
            assert rings is not None
            start = rings.written
            for _ in range(100_000):  # bounded: until a request of a's takes the ring
                assert pa.get(1, 0) == b"a" * FRAME_SIZE
                if rings.written != start:
                    break
            assert rings.written != start, "busy guests stayed on their sockets"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "Error" not in err, err
    assert daemon.stop() == 0


def test_a_guest_that_may_spin_rings_a_sleeping_daemon(start_daemon: Any) -> None:
    """A guest that will watch for its answer uses the ring even while the daemon sleeps: its
    doorbell wakes the daemon, and the answer comes back with no doorbell the other way."""
    daemon = start_daemon("--ring-poll-us", "0", name="sleepy")
    with tmemclient.connect(daemon.socket, name="r") as client:
        client._sock.settimeout(10)
        client._gate = AlwaysOpen()
        workload(client, 6)
        assert client._rings is not None and client._rings.written > 0
    assert daemon.stop() == 0


def test_the_rings_say_when_the_daemon_serves_other_guests_too(daemon: Daemon) -> None:
    """While two guests' requests come at once, their rings say "crowded" (and the guests
    sleep for replies rather than spin); a guest alone, even one using several connections in
    turn, is no crowd: its ring says so again soon after."""
    stop = threading.Event()
    with connect(daemon, name="a") as a, connect(daemon, name="b") as b:
        pa, pb = a.new_pool(persistent=True), b.new_pool(persistent=True)
        rings_a = a._rings
        assert rings_a is not None
        assert pa.put(1, 0, b"a" * FRAME_SIZE) and pb.put(1, 0, b"b" * FRAME_SIZE)

        def other() -> None:
            for _ in range(200_000):  # bounded
                if stop.is_set():
                    return
                assert pb.get(1, 0) == b"b" * FRAME_SIZE

        helper = threading.Thread(target=other)
        helper.start()
        try:
            seen = False
            for _ in range(50_000):  # bounded: until the word shows (soon, usually)
                assert pa.get(1, 0) == b"a" * FRAME_SIZE
                if rings_a.host_crowded():
                    seen = True
                    break
        finally:
            stop.set()
            helper.join(timeout=30)
        assert seen, "the rings never said the daemon was serving two guests at once"

        def alone() -> bool:  # a and b in turn, from this thread: one request at a time
            assert pa.get(1, 0) == b"a" * FRAME_SIZE
            assert pb.get(1, 0) == b"b" * FRAME_SIZE
            return not rings_a.host_crowded()

        wait_until(alone, "one thread's requests, in turn, still count as a crowd")
        pa.destroy()
        pb.destroy()


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


BUGGY_TMEMD = """
import sys
import tmemd.store
get = tmemd.store.Store.get
def buggy(self, pool, oid, index, dst):
    if oid == 0xBAD:
        raise RuntimeError("a bug injected by the test")
    return get(self, pool, oid, index, dst)
tmemd.store.Store.get = buggy
from tmemd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_serving_one_guests_ring_ends_that_guest_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one ring poller serves every guest: an error of ours serving one guest's ring (not a
    malformed frame: a bug, injected here into a pure-Python tmemd, as compiled classes cannot
    be patched) ends that guest's connection, logged, and the others are served on."""
    monkeypatch.setenv("TMEM_PURE", "1")
    sock, log = tmp_path / "t.sock", tmp_path / "tmemd.log"
    argv = [sys.executable, "-c", BUGGY_TMEMD, "--socket", str(sock), "--log-format", "json"]
    server = launch.start("tmemd", argv, sock, log)
    try:
        with tmemclient.connect(sock, name="honest") as honest:
            honest._gate = AlwaysOpen()
            mine = honest.new_pool(persistent=True)
            assert mine.put(1, 0, b"h" * FRAME_SIZE)
            for ring_frames in (16, 0):  # the bad request on the ring, then on the socket
                with tmemclient.connect(sock, name="buggy", ring_frames=ring_frames) as victim:
                    victim._gate = AlwaysOpen()
                    assert victim.rings == bool(ring_frames)
                    pool = victim.new_pool(persistent=True)
                    assert pool.put(0xBAD, 0, b"b" * FRAME_SIZE)
                    with pytest.raises(TmemError):
                        pool.get(0xBAD, 0)
                assert mine.get(1, 0) == b"h" * FRAME_SIZE  # served on, pages intact
            assert server.proc.poll() is None
        failures = [
            json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")
        ]
        failed = [r for r in failures if r.get("event") == "connection_failed"]
        assert len(failed) == 2 and all("injected" in str(r) for r in failed), log.read_text()
    finally:
        launch.stop_process(server.proc)
