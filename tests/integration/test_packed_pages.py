"""Packed pages against a real tmemd (docs/design.md §6.10): same-filled pages of every order
come back byte for byte through put/get, get_many, read, write and xchg, a few slots hold many
of them, tmemctl shows pages held, bytes used and the ratio per guest, and a mapped guest's
pages stay raw so it reads them through its mirror as before."""

from __future__ import annotations

import random
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
        assert (row["packed"], row["ephemeral_bytes"]) == (0, 8 * PAGE)  # raw, as §6.10 says
