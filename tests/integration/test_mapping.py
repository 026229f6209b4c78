"""Mapped pages (PROTOCOL.md §4.7) against a real tmemd: a guest reads the pages it put through
a read-only mapping of its own mirror, with no round trip, and never sees a stale page or
another guest's bytes. Also: the mirror is read-only and freed with its guest, a daemon can
grant none, no-wait puts answer with tokens (sync and trio, slow sends included), mapped reads
are reported back so they count as hits, and busy mapped guests move little memory."""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import random
import signal
import socket
import threading
import time
from typing import Any

import pytest
import trio
from conftest import Daemon

import tmemclient
from tmemclient.apps.cleancache import AsyncPageCache
from tmemclient.core import hello_message
from tmemclient.mapping import Token
from tmemclient.region import create_region
from tmemclient.wire.codec import NEED_DATA, FrameDecoder
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Op
from tmemd.ctl.client import AdminClient

PAGE = FRAME_SIZE


@pytest.fixture
def daemon(shared_daemon: Daemon) -> Daemon:
    """The tmemd this module's tests share (conftest's ``shared_daemon``, checked after each
    test); a test that needs other options starts its own with ``start_daemon``."""
    return shared_daemon


def connect(daemon: Daemon, name: str, **kwargs: Any) -> tmemclient.Client:
    client = tmemclient.connect(daemon.socket, name=name, frames=256, map_pages=True, **kwargs)
    client._sock.settimeout(30)
    return client


def put_tokens(pool: tmemclient.Pool, items: list[tuple[int, int, bytes]]) -> list[Any]:
    """put_many_nowait, then every answer: a token (or False) per item."""
    answers: list[Any] = [None] * len(items)

    def on_answer(first: int, results: Any) -> None:
        assert results is not None
        answers[first : first + len(results)] = results

    pool.put_many_nowait(items, on_answer)
    pool.wait_deferred()
    assert None not in answers, "an answer never came"
    return answers


def as_token(value: Any) -> Token:
    assert type(value) is list and len(value) == 2, value
    return (value[0], value[1])


@pytest.mark.parametrize("page_size", [PAGE, 8 * PAGE])
def test_pages_read_through_the_mapping_are_the_pages_put(daemon: Daemon, page_size: int) -> None:
    with connect(daemon, "m") as client:
        assert client.mapping is not None
        pool = client.new_pool(page_size=page_size)
        rng = random.Random(page_size)
        items = [(7, i, rng.randbytes(page_size)) for i in range(20)]
        tokens = [as_token(t) for t in put_tokens(pool, items)]
        for (_, _, data), token in zip(items, tokens, strict=True):
            assert pool.read_mapped(token) == data
        # A mapped read is not a get: the page is still there for one.
        assert pool.get(7, 3) == items[3][2]
        assert pool.read_mapped(tokens[3]) is None  # ...which took it (exclusive)
        assert all(pool.put_many(items[:2]))  # the waiting form still answers bools


def test_a_mapped_read_misses_once_tmem_no_longer_holds_the_page(daemon: Daemon) -> None:
    with connect(daemon, "m") as client:
        pool = client.new_pool()
        first = [
            as_token(t) for t in put_tokens(pool, [(1, i, bytes([i]) * PAGE) for i in range(4)])
        ]
        pool.flush(1, 0)
        assert pool.read_mapped(first[0]) is None
        pool.flush_object(1)
        assert [pool.read_mapped(t) for t in first[1:]] == [None] * 3
        (again,) = put_tokens(pool, [(1, 1, b"new" * 1000 + b"x" * (PAGE - 3000))])
        assert pool.read_mapped(first[1]) is None  # a token never names a newer page
        assert pool.read_mapped(as_token(again)) == b"new" * 1000 + b"x" * (PAGE - 3000)


def test_evicted_pages_miss_and_nothing_read_is_ever_wrong(start_daemon: Any) -> None:
    """Two mapped guests overfill a small budget in turns, so each evicts the other's pages
    and their slots change owner: every mapped read is the page or a miss, and no guest's
    mirror shows the other's bytes."""
    daemon = start_daemon("--memory", "256KiB")  # 64 slots
    a, b = connect(daemon, "a"), connect(daemon, "b")
    try:
        pa, pb = a.new_pool(), b.new_pool()
        tokens: dict[str, list[tuple[Token, bytes]]] = {"a": [], "b": []}
        for round_ in range(6):
            for name, pool in (("a", pa), ("b", pb)):
                items = [
                    (
                        round_,
                        i,
                        name.encode() * 8 + random.Random(f"{name}{round_}{i}").randbytes(PAGE - 8),
                    )
                    for i in range(40)
                ]
                for (_, _, data), token in zip(items, put_tokens(pool, items), strict=True):
                    if token:
                        tokens[name].append((as_token(token), data))
        hits = 0
        for name, pool in (("a", pa), ("b", pb)):
            for token, data in tokens[name]:
                got = pool.read_mapped(token)
                assert got is None or got == data
                hits += got is not None
        assert 0 < hits <= 64  # the budget holds 64 pages at most
        for client, other in ((a, b"b" * 8), (b, b"a" * 8)):
            assert client.mapping is not None
            seen = bytes(client.mapping._mem[: 64 * PAGE])  # the slots the budget can use
            assert other not in seen
    finally:
        a.close()
        b.close()


def raw_mapped_hello(daemon: Daemon, name: str) -> tuple[socket.socket, dict[str, Any], list[int]]:
    """A handshake asking for the mapping; the reply and the fds that came with it."""
    fd, region = create_region(16)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    sock.sendmsg([hello_message(name, 16, 0, True)], rights)
    os.close(fd)
    region.close()
    decoder = FrameDecoder(1 << 16)
    fds: list[int] = []
    while (message := decoder.next_message()) is NEED_DATA:
        data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        for _, _, raw in anc:
            fds.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
        assert data, "tmemd closed the connection"
        decoder.feed(data)
    assert message[:2] == [1, 0], message
    return sock, message[2], fds


def test_the_mirror_can_only_be_read(daemon: Daemon) -> None:
    sock, limits, fds = raw_mapped_hello(daemon, "raw")
    try:
        assert len(fds) == 1 and limits["map"] > 0
        (fd,) = fds
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert (
            seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        )
        size = os.fstat(fd).st_size
        assert size >= limits["map"] * (PAGE + 12)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x", 0)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        view = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        view.close()
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


def test_a_daemon_with_mapping_off_grants_none(start_daemon: Any) -> None:
    daemon = start_daemon("--no-map-pages")
    sock, limits, fds = raw_mapped_hello(daemon, "raw")
    sock.close()
    assert fds == [] and "map" not in limits
    with connect(daemon, "m") as client:
        assert client.mapping is None
        pool = client.new_pool()
        assert put_tokens(pool, [(1, 0, bytes(PAGE))]) == [True]
        with pytest.raises(tmemclient.InvalidArgument, match="map_pages"):
            pool.read_mapped((0, 1))


def test_the_mirror_is_freed_when_the_guest_goes(daemon: Daemon) -> None:
    client = connect(daemon, "leaving")
    pool = client.new_pool(persistent=True)
    (token,) = put_tokens(pool, [(1, 0, b"p" * PAGE)])
    mapping = client.mapping
    assert mapping is not None
    head = token[0]
    assert bytes(mapping._mem[head * PAGE : (head + 1) * PAGE]) == b"p" * PAGE
    client.mapping = None  # keep our mapping past the connection, as any guest could
    client.close()
    daemon.wait_disconnected("leaving")
    deadline = time.monotonic() + 10
    while any(mapping._mem[head * PAGE : (head + 1) * PAGE]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(mapping._mem[head * PAGE : (head + 1) * PAGE])  # punched: the memory is gone
    mapping.close()


def test_the_admin_view_says_which_guests_are_mapped(daemon: Daemon) -> None:
    assert daemon.admin_socket is not None
    with connect(daemon, "m"), tmemclient.connect(daemon.socket, name="plain"):
        with AdminClient(daemon.admin_socket) as admin:
            rows = {r["name"].split("/")[-1]: r for r in admin.call("guests")}
        assert rows["m"]["mapped"] is True and rows["plain"]["mapped"] is False


async def test_the_trio_client_reads_through_its_mapping_too(daemon: Daemon) -> None:
    with trio.fail_after(30):
        async with tmemclient.open_client(daemon.socket, name="t", map_pages=True) as client:
            assert client.mapping is not None
            pool = await client.new_pool(page_size=4 * PAGE)
            items = [(3, i, bytes([i]) * (4 * PAGE)) for i in range(10)]
            answers: list[Any] = [None] * len(items)

            def on_answer(first: int, results: Any) -> None:
                answers[first : first + len(results)] = results

            await pool.put_many_nowait(items, on_answer)
            await pool.wait_deferred()
            for (_, _, data), token in zip(items, answers, strict=True):
                assert pool.read_mapped(as_token(token)) == data
            await pool.flush(3, 0)
            assert pool.read_mapped(as_token(answers[0])) is None
        async with tmemclient.open_client(daemon.socket, name="u") as plain:
            assert plain.mapping is None
            with pytest.raises(tmemclient.InvalidArgument):
                (await plain.new_pool()).read_mapped((0, 1))


class _SlowSend:
    """A trio socket whose send returns only well after the bytes went: the reader task takes
    the answer in meanwhile."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    async def send(self, data: Any) -> int:
        sent: int = await self._sock.send(data)
        await trio.sleep(0.05)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def test_a_trio_put_answered_before_its_send_returns_still_reaches_on_answer(
    daemon: Daemon,
) -> None:
    with trio.fail_after(30):
        async with tmemclient.open_client(daemon.socket, name="t", map_pages=True) as client:
            pool = await client.new_pool()
            client._sock = _SlowSend(client._sock)  # type: ignore[assignment]
            answers: list[Any] = []
            await pool.put_many_nowait(
                [(1, i, bytes([i]) * PAGE) for i in range(3)],
                lambda first, results: answers.extend(results),
            )
            await pool.wait_deferred()
            assert [type(a) for a in answers] == [list] * 3  # every token came


def test_a_no_wait_put_too_big_to_stage_whole_still_answers_on_answer(daemon: Daemon) -> None:
    """With most of the region reserved by the caller, a batch goes the slow way (staged in
    pieces, answered before the call returns): its answers still reach on_answer."""
    client = tmemclient.connect(daemon.socket, name="m", frames=16, map_pages=True)
    with client, client.reserve_frames(12):
        pool = client.new_pool()
        answers: list[Any] = [None] * 7
        items = [(1, i, bytes([i]) * PAGE) for i in range(7)]  # 7 pages, 4 free frames

        def on_answer(first: int, results: Any) -> None:
            answers[first : first + len(results)] = results

        pool.put_many_nowait(items, on_answer)
        client.wait_deferred()
        assert [pool.read_mapped(as_token(a)) for a in answers] == [d for _, _, d in items]
        assert client.deferred.stored == 7


async def test_the_trio_client_answers_a_slow_no_wait_put_too(daemon: Daemon) -> None:
    with trio.fail_after(30):
        async with tmemclient.open_client(
            daemon.socket, name="t", frames=16, map_pages=True
        ) as client:
            pool = await client.new_pool()
            with client.reserve_frames(12):
                answers: list[Any] = [None] * 7
                items = [(1, i, bytes([i]) * PAGE) for i in range(7)]

                def on_answer(first: int, results: Any) -> None:
                    answers[first : first + len(results)] = results

                await pool.put_many_nowait(items, on_answer)
                await pool.wait_deferred()
            assert [pool.read_mapped(as_token(a)) for a in answers] == [d for _, _, d in items]
            assert client.deferred.stored == 7


def test_put_many_tokens_says_where_each_page_went_or_that_it_was_refused(
    start_daemon: Any,
) -> None:
    daemon = start_daemon("--memory", "16KiB")  # room for 4 pages
    with connect(daemon, "m") as client:
        pool = client.new_pool(persistent=True)
        items = [(1, i, bytes([i + 1]) * PAGE) for i in range(6)]
        tokens = pool.put_many_tokens(items)
        assert [t is not None for t in tokens] == [True] * 4 + [False] * 2  # persistent: full
        for (_, _, data), token in zip(items, tokens, strict=True):
            if token is not None:
                assert pool.read_mapped(token) == data
    with (
        tmemclient.connect(daemon.socket, name="plain") as plain,
        pytest.raises(tmemclient.InvalidArgument, match="map_pages"),
    ):
        plain.new_pool().put_many_tokens(items)


@pytest.mark.parametrize("slack", [None, 0.0], ids=["default", "plain-lru"])
def test_busy_mapped_guests_move_little_memory_unless_move_slack_is_0(
    start_daemon: Any, tmp_path: Any, slack: float | None
) -> None:
    """Two mapped guests put in no fixed order into a full 256 KiB budget. By default a put
    evicts the guest's own nearly-as-old page, so little memory moves between their mirrors
    (status ``moved``); with ``move_slack = 0`` in [limits], the plain weighted LRU moves it at
    about every other put. Every page still read through the mapping is the page put."""
    admin = tmp_path / "admin" / "admin.sock"
    admin.parent.mkdir(mode=0o700)
    args = ["--memory", "256KiB", "--admin-socket", str(admin)]
    if slack is not None:
        config = tmp_path / "tmemd.toml"
        config.write_text(f"[limits]\nmove_slack = {slack}\n")
        args += ["--config", str(config)]
    daemon = start_daemon(*args)
    rng = random.Random(5)
    with connect(daemon, "a") as a, connect(daemon, "b") as b:
        pools = [a.new_pool(), b.new_pool()]
        tokens: list[dict[int, Any]] = [{}, {}]
        for i in range(464):  # 64 fill the budget, then 400 in turn at random
            n = rng.randrange(2)
            [token] = put_tokens(pools[n], [(1, i, bytes([n, i % 256]) * (PAGE // 2))])
            tokens[n][i] = as_token(token)
        moved = AdminClient(admin).call("status")["moved"] // PAGE
        if slack is None:
            assert moved <= 100, moved
        else:
            assert moved >= 150, moved
        for n, pool in enumerate(pools):
            held = 0
            for i, token in tokens[n].items():
                data = pool.read_mapped(token)
                if data is not None:
                    assert data == bytes([n, i % 256]) * (PAGE // 2)
                    held += 1
            assert 16 <= held <= 48, held  # both keep a share


def test_mapped_reads_reported_to_tmemd_keep_pages_and_count_as_hits(
    start_daemon: Any, tmp_path: Any
) -> None:
    """tmemd does not see a mapped read, so the pool reports it (TOUCH_MANY, sent with its next
    no-wait put): the page read counts as a get hit and becomes the most recently used, so it
    outlives pages put after it but not read since."""
    admin = tmp_path / "admin" / "admin.sock"
    admin.parent.mkdir(mode=0o700)
    daemon = start_daemon("--memory", "64KiB", "--admin-socket", str(admin))  # 16 pages
    with connect(daemon, "m") as client:
        pool = client.new_pool()
        tokens = [
            as_token(t) for t in put_tokens(pool, [(1, i, bytes([i]) * PAGE) for i in range(16)])
        ]
        for _ in range(3):
            assert pool.read_mapped(tokens[0]) == bytes([0]) * PAGE
        # The next puts carry the report first; 8 new pages evict the 8 least recently used.
        put_tokens(pool, [(2, i, bytes([100 + i]) * PAGE) for i in range(8)])
        kept = [pool.read_mapped(t) is not None for t in tokens]
        assert kept == [True] + [False] * 8 + [True] * 7
        pool.wait_deferred()  # reports the 8 reads just made
        row = {r["name"].split("/")[-1]: r for r in AdminClient(admin).call("guests")}["m"]
        assert row["gets_hit"] == 3 + 8
        assert client.deferred.errors == 0


async def test_the_trio_pool_reports_its_mapped_reads_too(start_daemon: Any, tmp_path: Any) -> None:
    admin = tmp_path / "admin" / "admin.sock"
    admin.parent.mkdir(mode=0o700)
    daemon = start_daemon("--memory", "64KiB", "--admin-socket", str(admin))
    with trio.fail_after(30):
        async with tmemclient.open_client(daemon.socket, name="t", map_pages=True) as client:
            pool = await client.new_pool()
            answers: list[Any] = [None] * 16

            def on_answer(first: int, results: Any) -> None:
                answers[first : first + len(results)] = results

            await pool.put_many_nowait([(1, i, bytes([i]) * PAGE) for i in range(16)], on_answer)
            await pool.wait_deferred()
            assert pool.read_mapped(as_token(answers[0])) == bytes([0]) * PAGE
            await pool.put_many_nowait([(2, i, bytes([i]) * PAGE) for i in range(8)])
            await pool.wait_deferred()
            assert pool.read_mapped(as_token(answers[0])) is not None  # kept: it was read
            assert pool.read_mapped(as_token(answers[1])) is None
            await client.wait_deferred()
            rows = await trio.to_thread.run_sync(lambda: AdminClient(admin).call("guests"))
            row = {r["name"].split("/")[-1]: r for r in rows}["t"]
            assert row["gets_hit"] == 2 and client.deferred.errors == 0


async def test_a_trio_page_cache_keeps_tokens_answered_before_the_send_returns(
    daemon: Daemon, tmp_path: Any
) -> None:
    """The put's answer (where each block went) comes while the send still yields: the page
    cache must already know the blocks, or it loses their places and looks them up."""
    path = tmp_path / "f"
    path.write_bytes(b"".join(bytes([p % 251]) * PAGE for p in range(128)))
    with trio.fail_after(30):
        async with tmemclient.open_client(daemon.socket, name="t", map_pages=True) as client:
            pool = await client.new_pool(page_size=2 * PAGE)
            client._sock = _SlowSend(client._sock)  # type: ignore[assignment]
            cache = AsyncPageCache(pool, capacity=16, put_batch=8)
            f = await cache.open(path)
            for _ in range(2):
                for first in range(0, 128, 4):
                    got = await cache.read(f, first * PAGE, 4 * PAGE)
                    assert got == b"".join(bytes([p % 251]) * PAGE for p in range(first, first + 4))
            assert cache.stats.mapped_reads > 0
            assert cache.stats.tmem_gets == 0  # every block's place was known: no lookup
            cache.close()


# ------------------------------------------------------------------ gets with no round trip


class CountingCalls:
    """Counts the requests a sync client sends (wraps ``Client._call`` and ``Client._send``)."""

    def __init__(self, client: tmemclient.Client) -> None:
        self.ops: list[int] = []
        call, send = client._call, client._send

        def counted_call(op: int, *args: Any) -> Any:
            self.ops.append(op)
            return call(op, *args)

        def counted_send(requests: list[list[Any]], **kwargs: Any) -> list[int]:
            self.ops.extend(int(r[0]) for r in requests)
            return send(requests, **kwargs)

        client._call = counted_call  # type: ignore[method-assign]
        client._send = counted_send  # type: ignore[method-assign]


@pytest.mark.parametrize("page_size", [PAGE, 4 * PAGE])
def test_a_persistent_get_of_a_mapped_client_reads_its_page_with_no_round_trip(
    daemon: Daemon, page_size: int
) -> None:
    with connect(daemon, "g") as client:
        pool = client.new_pool(persistent=True, page_size=page_size)
        pages = {i: random.Random(i).randbytes(page_size) for i in range(20)}
        for i in range(10):
            assert pool.put(1, i, pages[i])
        assert all(pool.put_many([(1, i, pages[i]) for i in range(10, 20)]))
        calls = CountingCalls(client)
        for _ in range(3):
            for i in range(20):
                assert pool.get(1, i) == pages[i]
        assert calls.ops == []  # not one request: every get read the mapping
        assert pool.get(1, 99) is None  # never put: tmemd answers
        assert calls.ops == [int(Op.GET)]
        keys = [(1, i) for i in range(20)]
        assert pool.get_many(keys) == [pages[i] for i in range(20)]
        assert calls.ops == [int(Op.GET)]  # get_many too
        assert pool.get_many([(1, 5), (1, 99), (1, 6)]) == [pages[5], None, pages[6]]
        assert calls.ops == [int(Op.GET), int(Op.GET_MANY)]  # only the miss was asked for
        pool.destroy()


def test_a_mapped_get_never_passes_a_change_sent_before_it(daemon: Daemon) -> None:
    """Whatever changed a page last — a put (waited for or not), write, xchg, flush,
    flush_object, flush_many, or tmemctl — the next get sees it, byte for byte."""
    rng = random.Random(7)
    with connect(daemon, "g") as client:
        pool = client.new_pool(persistent=True)
        model: dict[tuple[int, int], bytes] = {}
        keys = [(o, i) for o in (1, 2) for i in range(8)]
        for step in range(600):  # bounded: random changes, each followed by gets of every key
            oid, index = rng.choice(keys)
            kind = rng.randrange(8)
            data = rng.randbytes(PAGE)
            if kind == 0:
                assert pool.put(oid, index, data)
                model[(oid, index)] = data
            elif kind == 1:
                pool.put_many_nowait([(oid, index, data)])  # not waited for: the get still sees it
                model[(oid, index)] = data
            elif kind == 2:
                assert pool.put_many([(oid, index, data)]) == [True]
                model[(oid, index)] = data
            elif kind == 3 and (oid, index) in model:
                assert pool.write(oid, index, 100, b"w" * 10)
                old = model[(oid, index)]
                model[(oid, index)] = old[:100] + b"w" * 10 + old[110:]
            elif kind == 4 and (oid, index) in model:
                old = model[(oid, index)]
                assert pool.xchg(oid, index, 0, b"x" * 5) == old[:5]
                model[(oid, index)] = b"x" * 5 + old[5:]
            elif kind == 5:
                pool.flush(oid, index)
                model.pop((oid, index), None)
            elif kind == 6 and step % 20 == 0:
                pool.flush_object(oid)
                for key in [k for k in model if k[0] == oid]:
                    del model[key]
            elif kind == 7:
                pool.flush_many([(oid, index), (oid, (index + 1) % 8)])
                model.pop((oid, index), None)
                model.pop((oid, (index + 1) % 8), None)
            for key in keys:
                assert pool.get(*key) == model.get(key), f"step {step}: {key}"
            assert pool.get_many(keys) == [model.get(key) for key in keys], f"step {step}"
        pool.wait_deferred()
        assert client.deferred.errors == 0
        pool.destroy()


def test_mapped_gets_are_reported_as_hits(start_daemon: Any, tmp_path: Any) -> None:
    """tmemd counts gets it never saw: the pool reports them (TOUCH_MANY) a request's worth at
    a time, and at wait_deferred."""
    admin = tmp_path / "admin" / "admin.sock"
    admin.parent.mkdir(mode=0o700)
    daemon = start_daemon("--memory", "4MiB", "--admin-socket", str(admin))
    with connect(daemon, "m") as client:
        pool = client.new_pool(persistent=True)
        assert pool.put(1, 0, b"p" * PAGE)
        gets = 3 * client.limits.max_batch + 5  # past the report threshold more than once
        for _ in range(gets):
            assert pool.get(1, 0) == b"p" * PAGE
        client.wait_deferred()
        row = {r["name"].split("/")[-1]: r for r in AdminClient(admin).call("guests")}["m"]
        assert row["gets_hit"] == gets
        assert client.deferred.errors == 0


def test_ephemeral_and_unmapped_gets_still_ask_tmemd(daemon: Daemon) -> None:
    """An ephemeral get is exclusive (the page leaves tmem), so it must be asked for; a client
    without a mapping has nothing to read."""
    with connect(daemon, "e") as client:
        pool = client.new_pool()  # ephemeral
        assert pool.put(1, 0, b"e" * PAGE)
        calls = CountingCalls(client)
        assert pool.get(1, 0) == b"e" * PAGE
        assert pool.get(1, 0) is None  # it was given up
        assert calls.ops == [int(Op.GET)] * 2
        pool.destroy()
    with tmemclient.connect(daemon.socket, name="u") as plain:
        pool = plain.new_pool(persistent=True)
        assert pool.put(1, 0, b"u" * PAGE)
        calls = CountingCalls(plain)
        assert pool.get(1, 0) == b"u" * PAGE
        assert calls.ops == [int(Op.GET)]
        pool.destroy()


async def test_the_trio_pool_gets_through_its_mapping_too(daemon: Daemon) -> None:
    async with tmemclient.open_client(daemon.socket, name="t", map_pages=True) as client:
        pool = await client.new_pool(persistent=True)
        pages = {i: bytes([i]) * PAGE for i in range(10)}
        for i in range(5):
            assert await pool.put(1, i, pages[i])
        assert await pool.put_many([(1, i, pages[i]) for i in range(5, 10)]) == [True] * 5
        sent: list[Any] = []
        run = client._run

        async def counted(job: Any, **kwargs: Any) -> Any:
            sent.append(job)
            return await run(job, **kwargs)

        client._run = counted  # type: ignore[method-assign]
        for i in range(10):
            assert await pool.get(1, i) == pages[i]
        assert sent == []
        await pool.write(1, 3, 0, b"zz")  # a change: the next get sees it
        assert await pool.get(1, 3) == b"zz" + pages[3][2:]
        await pool.flush(1, 4)
        assert await pool.get(1, 4) is None
        await pool.destroy()


def test_a_mapped_get_waits_for_a_no_wait_put_sent_before_it(start_daemon: Any) -> None:
    """The daemon is stopped while a no-wait put of the page is on its way: the mapping still
    holds the old page, but the get must not return it; it asks tmemd, which serves the put
    first once it runs again."""
    daemon = start_daemon("--memory", "4MiB")
    with connect(daemon, "g") as client:
        pool = client.new_pool(persistent=True)
        assert pool.put(1, 0, b"A" * PAGE)
        assert pool.get(1, 0) == b"A" * PAGE
        os.kill(daemon.pid, signal.SIGSTOP)
        resume = threading.Timer(0.3, os.kill, (daemon.pid, signal.SIGCONT))
        try:
            pool.put_many_nowait([(1, 0, b"B" * PAGE)])
            resume.start()
            assert pool.get(1, 0) == b"B" * PAGE
        finally:
            resume.cancel()
            os.kill(daemon.pid, signal.SIGCONT)
        pool.wait_deferred()
        assert client.deferred.errors == 0
