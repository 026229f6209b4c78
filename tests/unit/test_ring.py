"""Request rings (PROTOCOL.md §4.6) without a daemon: the pure ring over one anonymous shared
mapping (bytes both ways, wrapping, a full ring, the sleep words, corrupt counters), ring sizes,
the HELLO ring option, the spin gate (on a fake clock and a faked runnable count) and the
daemon's poll window. Guests on rings against a real tmemd are in
tests/integration/test_ring_guests.py."""

from __future__ import annotations

import mmap
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tmemclient.wire import layout, ring, spingate
from tmemclient.wire.errors import InvalidArgument, ProtocolError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Hello
from tmemclient.wire.ring import Rings
from tmemd.poller import PollWindow

needs_rings = pytest.mark.skipif(not ring.supported(), reason="rings need x86-64")


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


@needs_rings
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


@needs_rings
def test_a_full_ring_refuses_without_writing(pair: tuple[Rings, Rings]) -> None:
    guest, host = pair
    assert guest.write(b"x" * (FRAME_SIZE - 10))
    assert guest.free() == 10
    assert not guest.write(b"y" * 11)  # does not fit: nothing written
    assert guest.write(b"z" * 10)
    assert host.take() == b"x" * (FRAME_SIZE - 10) + b"z" * 10
    assert guest.free() == FRAME_SIZE


@needs_rings
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


@needs_rings
def test_the_crowded_word_goes_from_daemon_to_guest_and_starts_clear() -> None:
    area = mmap.mmap(-1, layout.ring_bytes(1))
    memoryview(area)[: layout.ring_bytes(1)] = b"\xff" * layout.ring_bytes(1)  # stale bytes
    host = Rings(memoryview(area), 1, "host")
    guest = Rings(memoryview(area), 1, "guest")
    try:
        assert not guest.host_crowded()  # the daemon zeroes the header when it grants rings
        host.crowded(True)
        assert guest.host_crowded()
        host.crowded(False)
        assert not guest.host_crowded()
    finally:
        guest.release()
        host.release()
        area.close()


@needs_rings
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


class FakeClock:
    """``time.monotonic`` for the spin gate, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The spin gate's clock, and a runnable count of 1 unless a test sets another."""
    fake = FakeClock()
    monkeypatch.setattr(spingate, "time", fake)
    monkeypatch.setattr(spingate, "runnable_tasks", lambda: 1)
    return fake


def test_the_runnable_count_is_read_from_the_machine() -> None:
    assert spingate.runnable_tasks() >= 1  # this test is running (0 would mean "unknown")


def test_the_spin_gate_follows_the_runnable_count(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = spingate.SpinGate(period=0.05)
    monkeypatch.setattr(spingate, "runnable_tasks", lambda: gate.cpus)
    assert gate.open()  # as many runnable tasks as CPUs: one to spare for the spinner
    monkeypatch.setattr(spingate, "runnable_tasks", lambda: gate.cpus + 1)
    assert gate.open()  # read once per period: the count is not read again yet...
    clock.now += 0.05
    assert not gate.open()  # ...and then it is: a CPU short, no spinning
    monkeypatch.setattr(spingate, "runnable_tasks", lambda: 1)
    clock.now += 0.049
    assert not gate.open()  # still within the period
    clock.now += 0.001
    assert gate.open()


def test_a_missed_spin_shuts_the_gate_longer_each_time(clock: FakeClock) -> None:
    gate = spingate.SpinGate(period=0.01)
    assert gate.open()
    shut_for = []
    for _ in range(3):  # three misses in a row: 10, 20, 40 ms
        missed_at = clock.now
        gate.missed()
        assert not gate.open()
        clock.now = gate._shut_until - 0.001
        assert not gate.open()  # shut until the back-off is over...
        clock.now = gate._shut_until
        assert gate.open()  # ...and open from then on
        shut_for.append(round(clock.now - missed_at, 6))
    assert shut_for == [0.01, 0.02, 0.04]
    gate.hit()  # a spin that got its answer: the next miss starts over
    missed_at = clock.now
    gate.missed()
    assert gate._shut_until - missed_at == pytest.approx(0.01)


def test_the_spin_gate_back_off_stops_growing_at_two_seconds(clock: FakeClock) -> None:
    gate = spingate.SpinGate(period=0.5)
    for _ in range(5):
        missed_at = clock.now
        gate.missed()
        clock.now = gate._shut_until
    assert clock.now - missed_at == pytest.approx(2.0)  # 0.5, 1, 2, 2, 2


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
