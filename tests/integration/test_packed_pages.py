"""Packed pages against a real tmemd (docs/design.md §6.11): same-filled pages of every order
come back byte for byte through put/get, get_many, read, write and xchg, a few slots hold many
of them, tmemctl shows pages held, bytes used and the ratio per guest, and a mapped guest's
pages stay raw so it reads them through its mirror as before. With --compress lz4 or zstd, every
kind of page round-trips and the same budget holds more text than raw slots would."""

from __future__ import annotations

import random
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from tmemctl_common import tmemctl

import tmemclient
from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER
from tmemd.ctl.client import AdminClient

PAGE = FRAME_SIZE


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The module's shared tmemd (checked clean after each test)."""
    return shared_daemon


def filled(word: int, size: int) -> bytes:
    return word.to_bytes(8, "little") * (size // 8)


def guest_row(daemon: Daemon, name: str) -> dict[str, Any]:
    assert daemon.admin_socket is not None
    with AdminClient(daemon.admin_socket, timeout=10) as admin:
        rows = admin.call("guests")
    (row,) = [r for r in rows if r["name"].endswith("/" + name)]
    return dict(row)


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
def test_same_filled_pages_of_every_order_round_trip_in_few_slots(
    daemon: Daemon, order: int
) -> None:
    size = PAGE << order
    words = [0, 1, 0xFFFF_FFFF_FFFF_FFFF, 0x0123_4567_89AB_CDEF, *range(2, 38)]
    with tmemclient.connect(daemon.socket, name="fill", frames=256) as client:
        pool = client.new_pool(page_size=size, persistent=True)
        assert all(pool.put_many([(1, i, filled(w, size)) for i, w in enumerate(words)]))
        other = random.Random(order).randbytes(size)
        assert pool.put(2, 0, other)
        row = guest_row(daemon, "fill")
        # 40 words in one slot, the random page in its own slots.
        assert row["persistent_bytes"] == PAGE + size
        assert row["pages"] == 41 and row["packed"] == 40
        assert row["page_bytes"] == 41 * size
        assert row["ratio"] == round(41 * size / (PAGE + size), 3)
        for i, w in enumerate(words):
            assert pool.get(1, i) == filled(w, size)
        got = pool.get_many([(1, i) for i in range(len(words))] + [(2, 0)])
        assert got == [filled(w, size) for w in words] + [other]
        assert pool.read(1, 3, size - 5, 5) == filled(words[3], size)[-5:]
        # A write that keeps the pattern, one that breaks it, an xchg across a slot boundary.
        assert pool.write(1, 0, 16, bytes(8))
        assert pool.get(1, 0) == bytes(size)
        assert pool.write(1, 1, 1, b"\x07")
        assert pool.get(1, 1) == filled(1, size)[:1] + b"\x07" + filled(1, size)[2:]
        span = min(size - 10, PAGE - 5)
        old = pool.xchg(1, 2, span, b"0123456789")
        assert old == filled(words[2], size)[span : span + 10]
        want = bytearray(filled(words[2], size))
        want[span : span + 10] = b"0123456789"
        assert pool.get(1, 2) == bytes(want)
        assert guest_row(daemon, "fill")["packed"] == 38


def test_ephemeral_same_filled_pages_go_with_their_get(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="fill", frames=64) as client:
        pool = client.new_pool()
        assert all(pool.put_many([(0, i, bytes(PAGE)) for i in range(60)]))
        assert guest_row(daemon, "fill")["ephemeral_bytes"] == PAGE
        assert pool.get_many([(0, i) for i in range(60)]) == [bytes(PAGE)] * 60
        assert pool.get(0, 0) is None  # exclusive gets: gone
        row = guest_row(daemon, "fill")
        assert (row["pages"], row["ephemeral_bytes"], row["ratio"]) == (0, 0, None)


def test_tmemctl_guests_shows_pages_packed_and_the_ratio(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="ratio", frames=64) as client:
        pool = client.new_pool(persistent=True)
        assert all(pool.put_many([(0, i, filled(i, PAGE)) for i in range(64)]))
        assert daemon.admin_socket is not None
        run = tmemctl("guests", sock=daemon.admin_socket)
        assert run.code == 0, run.err
        header, *lines = run.out.splitlines()
        cols = header.split()
        (line,) = [ln for ln in lines if "/ratio" in ln]
        cells = dict(zip(cols, line.split(), strict=True))
        assert (cells["PAGES"], cells["PACKED"], cells["RATIO"]) == ("64", "64", "64.00x")
        status = tmemctl("status", sock=daemon.admin_socket)
        assert "packed waste" in status.out


def test_a_mapped_guests_same_filled_pages_are_read_through_its_mirror(daemon: Daemon) -> None:
    with tmemclient.connect(daemon.socket, name="mapped", frames=64, map_pages=True) as client:
        pool = client.new_pool()
        answers: list[Any] = []
        items = [(0, i, filled(i, PAGE)) for i in range(8)]
        pool.put_many_nowait(items, lambda first, results: answers.extend(results or []))
        pool.wait_deferred()
        assert len(answers) == 8 and all(isinstance(a, list) for a in answers)
        for (_, _, data), token in zip(items, answers, strict=True):
            assert pool.read_mapped((token[0], token[1])) == data
        row = guest_row(daemon, "mapped")
        assert (row["packed"], row["ephemeral_bytes"]) == (0, 8 * PAGE)  # raw, as §6.11 says


# -------------------------------------------------------------------------------- compression

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "typing.py").read_bytes()


def text(tag: int, size: int = PAGE) -> bytes:
    start = (tag * 977) % (len(TEXT) - size)
    return TEXT[start : start + size]


@pytest.fixture(params=["lz4", "zstd"])
def compressing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    """A tmemd of its own with a 1 MiB budget and --compress lz4 or zstd."""
    d = Daemon(tmp_path, "--memory", "1MiB", "--compress", request.param, admin=True)
    try:
        yield d
        assert d.alive, f"tmemd died during the test:\n{d.log_text()}"
        assert not [e for e in d.events() if e.get("level") in ("error", "critical")]
    finally:
        d.stop()


@pytest.mark.parametrize("order", range(MAX_ORDER + 1))
def test_every_kind_of_page_round_trips_through_a_compressing_daemon(
    compressing: Daemon, order: int
) -> None:
    size = PAGE << order
    pages = [
        random.Random(order).randbytes(size),  # grows when compressed: raw
        text(order, size),
        bytes(size),
        filled(0x5A5A_0000_FFFF_1234, size),
        random.Random(9).randbytes(size * 7 // 8) + text(1, size)[: size // 8],
    ]
    with tmemclient.connect(compressing.socket, name="z", frames=256) as client:
        pool = client.new_pool(page_size=size, persistent=True)
        eph = client.new_pool(page_size=size)
        assert all(pool.put_many([(0, i, p) for i, p in enumerate(pages)]))
        assert all(eph.put_many([(0, i, p) for i, p in enumerate(pages)]))
        assert pool.get_many([(0, i) for i in range(len(pages))]) == pages
        assert [eph.get(0, i) for i in range(len(pages))] == pages
        assert [eph.get(0, i) for i in range(len(pages))] == [None] * len(pages)
        assert pool.read(0, 1, size - 100, 100) == pages[1][-100:]
        old = pool.xchg(0, 1, 10, b"swapped")
        assert old == pages[1][10:17]
        assert pool.write(0, 3, 0, b"\x01")
        assert pool.get(0, 1) == pages[1][:10] + b"swapped" + pages[1][17:]
        assert pool.get(0, 3) == b"\x01" + pages[3][1:]
        row = guest_row(compressing, "z")
        assert row["packed"] == 3  # text, zeros, the changed words page (raw: the other two)
        # (Few pages, each of a class of its own: the zspages hold more than the pages would
        # raw. The ratio says so; bigger sets are the next test's.)
        used = row["persistent_bytes"] + row["ephemeral_bytes"]
        assert row["pages"] == 5 and row["ratio"] == round(5 * size / used, 3)


def test_a_guest_rewriting_its_pages_while_they_are_compressed_hurts_no_one(
    compressing: Daemon,
) -> None:
    """A hostile guest puts pages straight from region frames (put_frame) while a thread of
    its own keeps rewriting those frames (text, zeros, random bytes: every packing decision's
    input changes under the daemon). The daemon decides on one copy, so at worst the guest
    stores a torn page of its own: tmemd stays up and logs no error (the fixture checks), the
    accounting stays within the budget, and another guest, checked between the attacker's
    puts, is served and keeps its compressed persistent pages byte for byte."""
    stop = threading.Event()
    variants = [text(7), bytes(PAGE), random.Random(3).randbytes(PAGE), filled(0x42, PAGE)]
    with (
        tmemclient.connect(compressing.socket, name="honest", frames=64) as honest,
        tmemclient.connect(compressing.socket, name="hostile", frames=64) as hostile,
    ):
        mine = honest.new_pool(persistent=True)
        kept = {i: text(100 + i) for i in range(32)}
        assert all(mine.put_many([(1, i, p) for i, p in kept.items()]))
        run = hostile.reserve_frames(8)
        view = run.view

        def scribble() -> None:
            rng = random.Random(5)
            for _ in range(200_000):  # bounded
                if stop.is_set():
                    return
                f = rng.randrange(8) * PAGE
                view[f : f + PAGE] = variants[rng.randrange(len(variants))]

        theirs = hostile.new_pool()
        scribbler = threading.Thread(target=scribble)
        scribbler.start()
        try:
            for i in range(600):  # bounded
                theirs.put_frame(2, i % 300, run.start + i % 8)
                if i % 100 == 99:  # the honest guest, served while the attack goes on
                    assert mine.get_many([(1, k) for k in kept]) == list(kept.values())
        finally:
            stop.set()
            scribbler.join(timeout=30)
        got = theirs.get_many([(2, k) for k in range(300)])
        assert all(g is None or len(g) == PAGE for g in got)
        assert mine.get_many([(1, k) for k in kept]) == list(kept.values())
        row = guest_row(compressing, "hostile")
        assert row["persistent_bytes"] + row["ephemeral_bytes"] <= 1 << 20
        run.release()
    assert compressing.alive


def test_a_compressing_daemon_holds_more_text_than_its_budget(compressing: Daemon) -> None:
    budget_pages = (1 << 20) // PAGE
    with tmemclient.connect(compressing.socket, name="z", frames=64) as client:
        pool = client.new_pool(persistent=True)
        stored = 0
        for base in range(0, 4 * budget_pages, 64):  # bounded: 4x the raw pages
            flags = pool.put_many([(0, base + k, text(base + k)) for k in range(64)])
            stored += sum(flags)
            if not all(flags):
                break
        assert stored > budget_pages * 3 // 2
        row = guest_row(compressing, "z")
        assert row["pages"] == stored and row["persistent_bytes"] <= 1 << 20
        assert row["ratio"] > 1.5 and 0 <= row["packed_waste"] < 0.5
        want = {base + k: text(base + k) for base in range(0, stored, 64) for k in range(64)}
        got = pool.get_many([(0, i) for i in range(min(stored, 256))])
        assert all(g is None or g == want[i] for i, g in enumerate(got))
        assert sum(g is not None for g in got) >= min(stored, 256) - 64
    assert compressing.events("daemon_ready")[0]["compress"] in ("lz4", "zstd")


# ------------------------------------------------------------------------------------- dedup


def test_a_deduplicating_daemon_stores_a_guests_identical_pages_once(tmp_path: Path) -> None:
    d = Daemon(tmp_path, "--memory", "1MiB", "--dedup", admin=True)
    try:
        page = random.Random(18).randbytes(PAGE)
        with (
            tmemclient.connect(d.socket, name="a", frames=64) as a,
            tmemclient.connect(d.socket, name="b", frames=64) as b,
        ):
            pa, pb = a.new_pool(persistent=True), b.new_pool(persistent=True)
            assert all(pa.put_many([(0, i, page) for i in range(100)]))
            assert all(pb.put_many([(0, i, page) for i in range(3)]))
            row_a, row_b = guest_row(d, "a"), guest_row(d, "b")
            assert (row_a["persistent_bytes"], row_a["pages"], row_a["deduped"]) == (PAGE, 100, 99)
            assert (row_b["persistent_bytes"], row_b["deduped"]) == (PAGE, 2)  # its own copy
            # Copy on write: changing one page changes no other.
            assert pa.write(0, 5, 0, b"mine")
            assert pa.xchg(0, 6, PAGE - 3, b"xyz") == page[-3:]
            got = pa.get_many([(0, i) for i in range(100)])
            assert got[5] == b"mine" + page[4:] and got[6] == page[:-3] + b"xyz"
            assert all(g == page for i, g in enumerate(got) if i not in (5, 6))
            assert pb.get_many([(0, i) for i in range(3)]) == [page] * 3
            assert guest_row(d, "a")["persistent_bytes"] == 3 * PAGE
        assert d.events("daemon_ready")[0]["dedup"] is True
        assert not [e for e in d.events() if e.get("level") in ("error", "critical")]
    finally:
        d.stop()
