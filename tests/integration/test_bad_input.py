"""Bad input from untrusted guests, against a real tmemd over real Unix sockets.

docs/design.md §4: a bad frame ends at most that guest's connection with a clear error; no other guest
notices. So every case here runs with a *reference guest* connected first (a tmemclient.Client
holding persistent pages), drives the bad guest by hand over a raw socket, asserts exactly the
reply it gets (status and a message saying what was wrong, or a clean close), and then proves:

- the daemon is alive and logged no internal error (``connection_failed``);
- the reference guest is still served and reads back every page byte-exact;
- the daemon holds no fd it did not hold before (counted in /proc/PID/fd), so refused regions,
  extra fds and dropped connections leak nothing.

Every socket read has a deadline and every loop is bounded.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import EOF, ROOT, Daemon, read_raw_frame

import tmemclient
from tmemclient.core import hello_message
from tmemclient.region import create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import HEADER, NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import PROTOCOL_VERSION, Op, Status, make_pool_flags
from tmemclient.wire.ring import Rings

TIMEOUT = 10.0  # generous bound on any one reply; nothing here asserts speed
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
F_SEAL_FUTURE_WRITE = 0x0010  # <linux/fcntl.h>; not exported by Python's fcntl
UID = os.getuid()
MAX_FRAME = 1 << 20  # tmemd's default max_frame; the HELLO reply confirms it
MAX_BATCH = 16  # the shared daemon's --max-batch
MAX_REGION_FRAMES = 64  # the shared daemon's --max-region-frames
GUEST_FRAMES = 16  # region of the raw bad guests

OK, INVALID, NO_POOL, PERMISSION = Status.OK, Status.INVALID, Status.NO_POOL, Status.PERMISSION
PROTOCOL, VERSION, LIMIT, CONFLICT = Status.PROTOCOL, Status.VERSION, Status.LIMIT, Status.CONFLICT

_names = itertools.count()


def unique(prefix: str = "bad") -> str:
    """A guest name no other connection of this test run uses."""
    return f"{prefix}{next(_names)}"


def frame_of(body: bytes) -> bytes:
    """A length prefix and ``body`` as given (which need not be valid msgpack)."""
    return HEADER.pack(len(body)) + body


def hello_bytes(name: Any = None, frames: Any = GUEST_FRAMES, version: Any = PROTOCOL_VERSION):
    """A HELLO frame with any field values, valid or not."""
    return encode_frame([Op.HELLO, 1, version, unique() if name is None else name, frames])


def memfd(frames: int = GUEST_FRAMES, seals: int = SEALS, *, allow_sealing: bool = True) -> int:
    """A memfd of ``frames`` frames with exactly ``seals`` added."""
    fd = os.memfd_create("tmem-test", os.MFD_ALLOW_SEALING if allow_sealing else 0)
    os.ftruncate(fd, frames * FRAME_SIZE)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def close_fds(fds: Sequence[int]) -> None:
    """Close our copies of fds (SCM_RIGHTS gave the daemon its own)."""
    for fd in fds:
        os.close(fd)


def daemon_fds(daemon: Daemon) -> int:
    """How many fds the daemon process holds open right now."""
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def settled_fds(daemon: Daemon) -> int:
    """The daemon's fd count once it stopped changing (bounded wait)."""
    last = daemon_fds(daemon)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = daemon_fds(daemon)
        if now == last:
            return now
        last = now
    return last


def wait_fds(daemon: Daemon, want: int) -> None:
    """Wait (bounded) until the daemon holds exactly ``want`` fds."""
    deadline = time.monotonic() + TIMEOUT
    while (now := daemon_fds(daemon)) != want and time.monotonic() < deadline:
        time.sleep(0.005)
    assert now == want, f"tmemd holds {now} fds, expected {want}: a received fd leaked"


def wait_consumed(sock: socket.socket) -> None:
    """Until the daemon has read everything we sent on ``sock`` (a Unix socket's send queue,
    SIOCOUTQ, holds what the peer has not read yet); bounded."""
    deadline = time.monotonic() + TIMEOUT
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]:
        assert time.monotonic() < deadline, "tmemd never read what we sent"
        time.sleep(0.001)


def assert_released(read_ends: Sequence[int]) -> None:
    """Each pipe's write ends were sent to the daemon and our copies closed: the read end sees
    EOF only once the daemon closed (or the kernel dropped) every copy it got."""
    for r in read_ends:
        ready, _, _ = select.select([r], [], [], TIMEOUT)
        assert ready, "tmemd still holds a pipe end that a guest sent it"
        assert os.read(r, 1) == b""
        os.close(r)


def wait_guest_disconnected(daemon: Daemon, name: str) -> dict[str, Any]:
    """The daemon's ``guest_disconnected`` record of guest ``name`` (bounded wait)."""
    full = f"{UID}/{name}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in daemon.events("guest_disconnected"):
            if record.get("guest") == full:
                return record
        time.sleep(0.02)
    raise AssertionError(f"no guest_disconnected for {full}:\n{daemon.log_text()[-4000:]}")


class Raw:
    """A hand-driven guest connection: exact bytes out, decoded frames in, every read bounded."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.req_id = 100
        self.region: Any = None
        self.fd = -1
        self.handles: dict[str, int] = {}
        self.rings: Rings | None = None

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """One sendmsg carrying ``fds`` with the first byte of ``data``."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def read(self, timeout: float = TIMEOUT) -> Any:
        """The next frame from the daemon, decoded, or EOF once it closed the connection."""
        return read_raw_frame(self.sock, self.buf, timeout)

    def expect(self, req_id: int, status: int, *needles: str) -> Any:
        """The next frame must be the reply [req_id, status, ...]; error messages must contain
        every needle (case-insensitive). Returns the result."""
        message = self.read()
        want = f"[{req_id}, {Status(status).name}, ...]"
        assert message is not EOF, f"tmemd closed the connection; expected {want}"
        assert type(message) is list and len(message) == 3, f"not a reply: {message!r}"
        got_id, got_status, result = message
        assert (got_id, got_status) == (req_id, status), f"got {message!r}, expected {want}"
        if status != OK:
            assert type(result) is str and result, f"error reply without a message: {message!r}"
            for needle in needles:
                assert needle.lower() in result.lower(), f"{needle!r} not in {result!r}"
        return result

    def expect_closed(self) -> None:
        """Nothing more arrives: the daemon closed the connection."""
        message = self.read()
        assert message is EOF, f"expected the connection closed, got {message!r}"

    def refused(self, req_id: int, status: int, *needles: str) -> str:
        """One error reply, then a clean close."""
        message: str = self.expect(req_id, status, *needles)
        self.expect_closed()
        return message

    def request(self, op: int, *args: Any) -> int:
        """Send one request; its req_id."""
        self.req_id += 1
        self.send(encode_frame([op, self.req_id, *args]))
        return self.req_id

    def ok(self, op: int, *args: Any) -> Any:
        """A request that must succeed; its result."""
        return self.expect(self.request(op, *args), OK)

    def fails(self, op: int, args: Sequence[Any], status: int, *needles: str) -> str:
        """A request that must fail with ``status``; the connection goes on."""
        message: str = self.expect(self.request(op, *args), status, *needles)
        return message

    def frame(self, i: int) -> memoryview:
        """Frame i of this guest's region (our mapping of it)."""
        view: memoryview = memoryview(self.region)[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]
        return view

    def close(self) -> None:
        """Close the socket and our side of the region."""
        self.sock.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.rings is not None:
            self.rings.release()
            self.rings = None
        if self.region is not None:
            self.region.close()
            self.region = None


def raw_guest(daemon: Daemon, name: str | None = None, frames: int = GUEST_FRAMES) -> Raw:
    """A raw connection that completed a valid handshake; its region fd stays open (``.fd``)."""
    fd, region = create_region(frames)
    raw = Raw(daemon.socket)
    raw.fd, raw.region = fd, region
    raw.send(hello_bytes(name, frames), [fd])
    limits = raw.expect(1, OK)
    assert limits["frames"] == frames and limits["max_frame"] == MAX_FRAME
    return raw


class Reference:
    """The innocent bystander: connected before any bad guest, holding persistent pages of two
    sizes (with 64-bit and 192-bit object ids), which it must read back byte-exact after each
    bad input."""

    def __init__(self, daemon: Daemon, name: str, **connect: Any) -> None:
        self.daemon = daemon
        self.client = tmemclient.connect(daemon.socket, name=name, frames=64, **connect)
        rng = random.Random(name)
        self.pool = self.client.new_pool(persistent=True)
        self.big = self.client.new_pool(persistent=True, page_size=4 * FRAME_SIZE)
        keys = [
            (oid, index) for oid in (0, 1, 2**64 - 1, 2**191 + 5) for index in (0, 9, 2**32 - 1)
        ]
        self.pages = {key: rng.randbytes(FRAME_SIZE) for key in keys}
        self.big_pages = {(7, i): rng.randbytes(4 * FRAME_SIZE) for i in range(3)}
        assert all(self.pool.put_many([(*k, v) for k, v in self.pages.items()]))
        assert all(self.big.put_many([(*k, v) for k, v in self.big_pages.items()]))
        self.slots = len(self.pages) + 4 * len(self.big_pages)

    def check(self) -> None:
        """Alive, served, nothing lost."""
        assert self.daemon.alive, f"tmemd died:\n{self.daemon.log_text()[-4000:]}"
        self.client.ping()
        keys = list(self.pages)
        assert self.pool.get_many(keys) == [self.pages[k] for k in keys]
        big_keys = list(self.big_pages)
        assert self.big.get_many(big_keys) == [self.big_pages[k] for k in big_keys]
        oid, index = big_keys[1]
        assert self.big.read(oid, index, 5000, 300) == self.big_pages[big_keys[1]][5000:5300]

    def close(self) -> None:
        self.client.close()


class Env:
    """A daemon, its reference guest and the raw connections one test opened."""

    def __init__(self, daemon: Daemon, ref: Reference, base_fds: int) -> None:
        self.daemon = daemon
        self.ref = ref
        self.base_fds = base_fds
        self.raws: list[Raw] = []
        self.failures = len(daemon.events("connection_failed"))

    def connect(self) -> Raw:
        """A raw connection that has sent nothing yet."""
        raw = Raw(self.daemon.socket)
        self.raws.append(raw)
        return raw

    def guest(self, frames: int = GUEST_FRAMES, name: str | None = None) -> Raw:
        """A raw guest past a valid handshake."""
        raw = raw_guest(self.daemon, name, frames)
        self.raws.append(raw)
        return raw

    def check(self) -> None:
        """The reference guest is served and lost nothing; the daemon logged no internal error
        (an exception that escaped a connection's handler) since the test began."""
        self.ref.check()
        failures = self.daemon.events("connection_failed")[self.failures :]
        assert not failures, f"tmemd logged an internal error: {failures[0]}"

    def finish(self) -> None:
        """Close this test's connections; the daemon must drop back to its baseline fds."""
        for raw in self.raws:
            raw.close()
        wait_fds(self.daemon, self.base_fds)
        self.check()


def start_world(daemon: Daemon) -> tuple[Reference, int]:
    """The reference guest on ``daemon`` and the daemon's fd count with only it connected."""
    ref = Reference(daemon, unique("ref"))
    ref.check()
    return ref, settled_fds(daemon)


@pytest.fixture(scope="module")
def shared_world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, Reference, int]]:
    """One daemon (small limits, to reach them cheaply) and its reference guest for the module."""
    daemon = Daemon(
        tmp_path_factory.mktemp("bad"),
        "--memory", "16MiB",
        "--max-batch", str(MAX_BATCH),
        "--max-region-frames", str(MAX_REGION_FRAMES),
        "--max-pools", "8",
    )  # fmt: skip
    try:
        ref, base = start_world(daemon)
        yield daemon, ref, base
        ref.close()
    finally:
        daemon.stop()


@pytest.fixture
def env(shared_world: tuple[Daemon, Reference, int]) -> Iterator[Env]:
    """The shared daemon and reference guest; at teardown every raw connection is closed and the
    daemon must be back to its baseline fds with the reference guest intact."""
    e = Env(*shared_world)
    yield e
    e.finish()


@pytest.fixture(scope="module")
def timeout_world(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Daemon, Reference, int]]:
    """A daemon with a short handshake timeout (0.5 s) and its reference guest, for the
    handshake timing cases."""
    daemon = Daemon(
        tmp_path_factory.mktemp("timeout"), "--memory", "16MiB", "--handshake-timeout", "0.5"
    )
    try:
        ref, base = start_world(daemon)
        yield daemon, ref, base
        ref.close()
    finally:
        daemon.stop()


@pytest.fixture
def timeout_env(timeout_world: tuple[Daemon, Reference, int]) -> Iterator[Env]:
    """``env`` on the short-handshake-timeout daemon."""
    e = Env(*timeout_world)
    yield e
    e.finish()


@pytest.fixture
def own_env(start_daemon: Any) -> Iterator[Callable[..., Env]]:
    """A fresh daemon with the given arguments, for cases that need their own limits."""
    made: list[Env] = []

    def make(*args: str) -> Env:
        daemon = start_daemon("--memory", "16MiB", *args, name=f"own{len(made)}")
        ref, base = start_world(daemon)
        e = Env(daemon, ref, base)
        made.append(e)
        return e

    yield make
    for e in made:
        e.finish()
        e.ref.close()


# ================================================================================================
# Garbage


GARBAGE = [
    pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", "not valid msgpack", id="reserved-byte-0xc1"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: tmem\r\n\r\n", "outside 1..1048576", id="http-request"),
    pytest.param(b"\x00\x00\x00\x02\x93\x01", "not valid msgpack", id="truncated-msgpack"),
    pytest.param(frame_of(b"\x92\x1f\x05\x92\x1f\x06"), "more than one msgpack", id="two-objects"),
    pytest.param(frame_of(b"\x93\x1f\x05\xa2\xff\xfe"), "not valid msgpack", id="bad-utf8"),
    pytest.param(frame_of(b"\x93\x1f\x05\x81\x01\x02"), "not valid msgpack", id="int-map-key"),
    pytest.param(frame_of(random.Random(7).randbytes(200)), "", id="random-bytes"),
    pytest.param(encode_frame("PING"), "must be an array", id="str-not-array"),
    pytest.param(encode_frame({"op": 31, "id": 5}), "must be an array", id="map-not-array"),
    pytest.param(encode_frame([]), "must be an array", id="empty-array"),
    pytest.param(encode_frame([31]), "must be an array", id="no-req-id"),
    pytest.param(encode_frame(["PING", 5]), "unsigned integers", id="op-str"),
    pytest.param(encode_frame([-1, 5]), "unsigned integers", id="op-negative"),
    pytest.param(encode_frame([True, 5]), "unsigned integers", id="op-bool"),
    pytest.param(encode_frame([31.0, 5]), "unsigned integers", id="op-float"),
    pytest.param(encode_frame([None, 5]), "unsigned integers", id="op-nil"),
    pytest.param(encode_frame([31, -5]), "unsigned integers", id="req-id-negative"),
    pytest.param(encode_frame([31, 1 << 32]), "unsigned integers", id="req-id-2^32"),
    pytest.param(encode_frame([31, 2**64 - 1]), "unsigned integers", id="req-id-uint64-max"),
    pytest.param(encode_frame([31, "5"]), "unsigned integers", id="req-id-str"),
    pytest.param(encode_frame([31, 5.0]), "unsigned integers", id="req-id-float"),
]


@pytest.mark.parametrize(("data", "needle"), GARBAGE)
def test_garbage_after_handshake(env: Env, data: bytes, needle: str) -> None:
    """Anything that is not a request ends the connection with a PROTOCOL notice (req_id 0)."""
    g = env.guest()
    g.ok(Op.PING)
    g.send(data)
    g.refused(0, PROTOCOL, needle)
    env.check()


def test_garbage_after_valid_requests_in_one_write(env: Env) -> None:
    """Replies owed for the valid requests before the garbage come first, then the notice."""
    name = unique()
    g = env.guest(name=name)
    g.send(encode_frame([Op.PING, 7]) + encode_frame([Op.PING, 8]) + b"\x00\x00\x00\x01\xc1")
    g.expect(7, OK)
    g.expect(8, OK)
    g.refused(0, PROTOCOL, "not valid msgpack")
    record = wait_guest_disconnected(env.daemon, name)
    assert record["reason"].startswith("protocol error: frame is not valid msgpack")
    env.check()


NEEDS_FD = [
    pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", [], "exactly one fd", id="garbage-no-fd"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", [], "exactly one fd", id="http-no-fd"),
    pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", [1], "not valid msgpack", id="garbage-with-fd"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", [1], "larger than 4096", id="http-with-fd"),
    pytest.param(b"\x00\x00\x00\x00", [1], "must be 1..4096", id="zero-length-hello"),
    pytest.param(b"\x00\x01\x00\x00" + b"\x90" * 16, [1], "larger than 4096", id="hello-64KiB"),
    pytest.param(encode_frame([Op.PING, 1]), [1], "first frame must be HELLO", id="ping-first"),
    pytest.param(encode_frame([Op.HELLO, 1, 1, "x"]), [1], "must be HELLO", id="hello-4-fields"),
    pytest.param(
        encode_frame([Op.HELLO, 1, 1, "x", 16, 0]),
        [1],
        "HELLO options must be a map",
        id="hello-options-not-a-map",
    ),
    pytest.param(
        encode_frame([Op.HELLO, 1, 1, "x", 16, {}, 0]), [1], "must be HELLO", id="hello-7-fields"
    ),
    pytest.param(encode_frame({"op": 30}), [1], "must be HELLO", id="hello-as-map"),
    pytest.param(
        frame_of(b"\x95\x1e\x01\x01\xdb\xff\xff\xff\xff"), [1], "not valid msgpack", id="name-4GiB"
    ),
]


@pytest.mark.parametrize(("data", "nfds", "needle"), NEEDS_FD)
def test_garbage_instead_of_handshake(env: Env, data: bytes, nfds: list[int], needle: str) -> None:
    """Before HELLO, anything else is refused with req_id 1 and closed; a sent fd is closed."""
    fds = [memfd() for _ in nfds]
    g = env.connect()
    g.send(data, fds)
    close_fds(fds)
    g.refused(1, PROTOCOL, needle)
    env.check()


def test_close_before_hello(env: Env) -> None:
    """A guest that shuts down its side without a byte is told so, then closed."""
    g = env.connect()
    g.sock.shutdown(socket.SHUT_WR)
    g.refused(1, PROTOCOL, "closed before HELLO")
    env.check()


def test_close_in_the_middle_of_hello(env: Env) -> None:
    """Half a HELLO (with its fd) and then EOF: refused, and the fd that came is closed."""
    r, w = os.pipe()
    hello = hello_bytes()
    g = env.connect()
    g.send(hello[:9], [w])
    os.close(w)
    g.sock.shutdown(socket.SHUT_WR)
    g.refused(1, PROTOCOL, "closed in the middle of HELLO")
    assert_released([r])
    env.check()


def test_an_fd_with_the_rest_of_hello_is_refused_and_closed(env: Env) -> None:
    """HELLO in two pieces, the region memfd with the first and a second fd with the rest: the
    second is seen (not dropped by the kernel unnoticed), the handshake refused, both closed."""
    r, w = os.pipe()
    fd = memfd()
    hello = hello_bytes()
    g = env.connect()
    g.send(hello[:9], [fd])
    wait_consumed(g.sock)  # two segments: the daemon read the first before the second is sent
    g.send(hello[9:], [w])
    close_fds([fd, w])
    g.refused(1, PROTOCOL, "exactly one fd")
    assert_released([r])
    env.check()


# ================================================================================================
# Frame size


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 1 << 24, 2**31, 2**32 - 1])
def test_frame_over_max_frame_is_refused_from_its_header(env: Env, length: int) -> None:
    """The length prefix alone is answered: the daemon does not wait for (or buffer) the body."""
    g = env.guest()
    g.send(HEADER.pack(length) + b"\x93")  # the body never follows
    g.refused(0, PROTOCOL, f"frame of {length} bytes is outside 1..{MAX_FRAME} (max_frame)")
    env.check()


def test_zero_length_frame(env: Env) -> None:
    g = env.guest()
    g.ok(Op.PING)
    g.send(HEADER.pack(0))
    g.refused(0, PROTOCOL, f"frame of 0 bytes is outside 1..{MAX_FRAME}")
    env.check()


def test_frame_of_exactly_max_frame_is_read(env: Env) -> None:
    """The limit is inclusive: a max_frame-byte request is decoded and answered per request."""
    g = env.guest()
    g.req_id += 1
    head = b"\x93" + msgpack.packb(Op.PING) + msgpack.packb(g.req_id) + b"\xc6"  # [op, id, bin32]
    pad = MAX_FRAME - len(head) - 4
    body = head + pad.to_bytes(4, "big") + b"\x00" * pad
    assert len(body) == MAX_FRAME
    g.send(frame_of(body))
    g.expect(g.req_id, INVALID, "PING takes 0 arguments")
    g.ok(Op.PING)
    env.check()


# ================================================================================================
# Absurd declared lengths and nesting


HUGE = [
    pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-4G-entries"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-4G-pairs"),
    pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-4GiB"),
    pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-4GiB"),
    pytest.param(b"\xc9\xff\xff\xff\xff\x01", id="ext32-4GiB"),
    pytest.param(b"\xdc\xff\xff", id="array16-65535"),
    pytest.param(b"\xde\xff\xff", id="map16-65535"),
    pytest.param(b"\x96\x04\x05\x00\xc6\x80\x00\x00\x00", id="bin32-2GiB-oid-in-PUT"),
    pytest.param(b"\x94\x14\x05\x00\xdd\x7f\xff\xff\xff", id="array32-2G-entries-in-PUT_MANY"),
    pytest.param(b"\x93\x1f\x05\xdf\x80\x00\x00\x00", id="map32-2G-in-PING"),
]


@pytest.mark.parametrize("body", HUGE)
def test_huge_declared_length(env: Env, body: bytes) -> None:
    """A small frame whose msgpack claims billions of entries or bytes is refused at once."""
    g = env.guest()
    g.send(frame_of(body))
    g.refused(0, PROTOCOL, "not valid msgpack")
    env.check()


class Packed(bytes):
    """msgpack bytes spliced into a message as they are (msgpack's packer refuses to nest more
    than 511 levels, so deep values are written by hand)."""


def pack(value: Any) -> bytes:
    """Encode ``value``, splicing in Packed parts."""
    if isinstance(value, Packed):
        return bytes(value)
    if type(value) is list:
        assert len(value) < 16
        return bytes([0x90 | len(value)]) + b"".join(pack(v) for v in value)
    packed: bytes = msgpack.packb(value)
    return packed


def nested(depth: int, kind: str = "array") -> Packed:
    """``depth`` single-element arrays (or maps) around a 0."""
    return Packed((b"\x91" if kind == "array" else b"\x81\xa1k") * depth + b"\x00")


@pytest.mark.parametrize("kind", ["array", "map"])
def test_nesting_beyond_the_decoder_stack(env: Env, kind: str) -> None:
    g = env.guest()
    g.send(frame_of(pack([Op.PING, 5, nested(5000, kind)])))
    g.refused(0, PROTOCOL, "not valid msgpack")
    env.check()


@pytest.mark.parametrize(
    ("op", "position", "status", "needle"),
    [
        (Op.DESTROY_POOL, 0, NO_POOL, "pool handle of type list is unknown"),
        (Op.PUT, 0, NO_POOL, "pool handle of type list is unknown"),
        (Op.PUT, 1, INVALID, "oid must be an unsigned integer, got list"),
        (Op.PUT, 2, INVALID, "index must be an unsigned integer, got list"),
        (Op.PUT_MANY, 1, INVALID, "batch entries must be a flat array of 3-tuples"),
        (Op.NEW_POOL, 0, INVALID, "pool flags must be an unsigned integer, got list"),
        (Op.PING, 0, INVALID, "PING takes 0 arguments"),
    ],
    ids=[
        "DESTROY_POOL-pool",
        "PUT-pool",
        "PUT-oid",
        "PUT-index",
        "PUT_MANY-entries",
        "NEW_POOL-flags",
        "PING-extra",
    ],
)
@pytest.mark.parametrize("kind", ["array", "map"])
def test_deep_nesting_within_the_stack_is_a_clear_error(
    env: Env, op: int, position: int, status: int, needle: str, kind: str
) -> None:
    """Nesting just inside the decoder's limit decodes; the handler must reject it without
    echoing it back (a repr of 1000 nested arrays raises RecursionError)."""
    g = env.guest()
    pool = g.ok(Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None)[0]
    args_for: dict[int, list[Any]] = {
        Op.DESTROY_POOL: [pool],
        Op.PUT: [pool, 1, 0, 0],
        Op.PUT_MANY: [pool, [1, 0, 0]],
        Op.NEW_POOL: [0, None],
        Op.PING: [None],
    }
    args = args_for[op]
    args[position] = nested(1020, kind)
    g.send(frame_of(pack([op, 77, *args])))
    if kind == "map" and status == INVALID and op != Op.PING:
        needle = needle.replace("got list", "got dict")
    if kind == "map" and status == NO_POOL:
        needle = needle.replace("type list", "type dict")
    message = g.expect(77, status, needle)
    assert len(message) < 200
    g.ok(Op.PING)
    env.check()


def test_huge_bin_pool_handle_gets_a_short_reply(env: Env) -> None:
    """A 1 MiB handle is not echoed (it would be a 4 MiB reply)."""
    g = env.guest()
    message = g.fails(Op.DESTROY_POOL, [b"\xff" * (MAX_FRAME - 64)], NO_POOL, "of type bytes")
    assert len(message) < 200
    env.check()


# ================================================================================================
# Unknown ops, argument counts and types


@pytest.mark.parametrize("op", [0, 3, 11, 19, 25, 29, Op.HELLO, 33, 127, 255, 2**32, 2**64 - 1])
def test_unknown_op(env: Env, op: int) -> None:
    """An op the daemon does not serve (HELLO included, once past the handshake) is answered
    INVALID for that request; the connection goes on."""
    g = env.guest()
    g.fails(op, [], INVALID, f"unknown op {op}")
    g.fails(op, [1, 2, 3], INVALID, f"unknown op {op}")
    g.ok(Op.PING)
    env.check()


class _Pool:
    """Placeholder in a case table for the raw guest's pool handle of a given page order."""

    def __init__(self, order: int) -> None:
        self.order = order

    def __repr__(self) -> str:
        return f"<pool order {self.order}>"


P = _Pool(0)  # persistent, 4 KiB pages
B = _Pool(2)  # persistent, 16 KiB pages
FLAGS = make_pool_flags(persistent=False, shared=False, order=0)
SHARED = make_pool_flags(persistent=False, shared=True, order=0)
UUID = bytes(range(16))

ARGUMENTS = [
    # (id, op, args, status, needle)
    ("put-3-args", Op.PUT, [P, 1, 0], INVALID, "PUT takes 4 arguments (pool, oid, index, frame), got 3"),
    ("put-5-args", Op.PUT, [P, 1, 0, 0, 0], INVALID, "PUT takes 4 arguments"),
    ("get-0-args", Op.GET, [], INVALID, "GET takes 4 arguments"),
    ("ping-1-arg", Op.PING, [0], INVALID, "PING takes 0 arguments (none), got 1"),
    ("new-pool-1-arg", Op.NEW_POOL, [FLAGS], INVALID, "NEW_POOL takes 2 to 3 arguments"),
    ("destroy-2-args", Op.DESTROY_POOL, [P, P], INVALID, "DESTROY_POOL takes 1 arguments"),
    ("read-5-args", Op.READ, [P, 1, 0, 0, 1], INVALID, "READ takes 6 arguments"),
    ("flush-many-3-args", Op.FLUSH_MANY, [P, [], 0], INVALID, "FLUSH_MANY takes 2 arguments"),
    ("index-str", Op.PUT, [P, 1, "0", 0], INVALID, "index must be an unsigned integer, got str"),
    ("index-float", Op.PUT, [P, 1, 0.0, 0], INVALID, "index must be an unsigned integer, got float"),
    ("index-bool", Op.PUT, [P, 1, True, 0], INVALID, "index must be an unsigned integer, got bool"),
    ("index-nil", Op.PUT, [P, 1, None, 0], INVALID, "index must be an unsigned integer, got NoneType"),
    ("index-bin", Op.PUT, [P, 1, b"\0", 0], INVALID, "index must be an unsigned integer, got bytes"),
    ("index-negative", Op.PUT, [P, 1, -1, 0], INVALID, "unsigned 32-bit integer, got -1"),
    ("index-int64-min", Op.GET, [P, 1, -(2**63), 0], INVALID, "got -9223372036854775808"),
    ("index-uint64-max", Op.PUT, [P, 1, 2**64 - 1, 0], INVALID, "got 18446744073709551615"),
    ("oid-str", Op.PUT, [P, "1", 0, 0], INVALID, "oid must be an unsigned integer, got str"),
    ("oid-float", Op.PUT, [P, 1.5, 0, 0], INVALID, "oid must be an unsigned integer, got float"),
    ("oid-bool", Op.PUT, [P, False, 0, 0], INVALID, "oid must be an unsigned integer, got bool"),
    ("oid-nil", Op.GET, [P, None, 0, 0], INVALID, "oid must be an unsigned integer, got NoneType"),
    ("oid-negative", Op.PUT, [P, -1, 0, 0], INVALID, "oid must be an unsigned integer, got -1"),
    ("oid-array", Op.FLUSH, [P, [1], 0], INVALID, "oid must be an unsigned integer, got list"),
    ("oid-ext", Op.PUT, [P, msgpack.ExtType(5, b"\1" * 8), 0, 0], INVALID, "got ExtType"),
    ("frame-str", Op.PUT, [P, 1, 0, "0"], INVALID, "frame must be an unsigned integer, got str"),
    ("frame-float", Op.GET, [P, 1, 0, 0.0], INVALID, "frame must be an unsigned integer, got float"),
    ("frame-bool", Op.PUT, [P, 1, 0, False], INVALID, "frame must be an unsigned integer, got bool"),
    ("frame-negative", Op.PUT, [P, 1, 0, -1], INVALID, "frame must be an unsigned 32-bit integer"),
    ("frame-uint64-max", Op.PUT, [P, 1, 0, 2**64 - 1], INVALID, "frame must be an unsigned 32-bit"),
    ("pool-str", Op.PUT, ["pool", 1, 0, 0], NO_POOL, "pool handle of type str is unknown"),
    ("pool-float", Op.GET, [1.0, 1, 0, 0], NO_POOL, "pool handle of type float is unknown"),
    ("pool-bool", Op.FLUSH, [True, 1, 0], NO_POOL, "pool handle of type bool is unknown"),
    ("pool-nil", Op.DESTROY_POOL, [None], NO_POOL, "pool handle of type NoneType is unknown"),
    ("flags-str", Op.NEW_POOL, ["persistent", None], INVALID, "pool flags must be an unsigned integer, got str"),
    ("flags-bool", Op.NEW_POOL, [True, None], INVALID, "pool flags must be an unsigned integer, got bool"),
    ("flags-negative", Op.NEW_POOL, [-1, None], INVALID, "pool flags must be an unsigned 32-bit integer, got -1"),
    ("flags-uint64-max", Op.NEW_POOL, [2**64 - 1, None], INVALID, "pool flags must be an unsigned 32-bit"),
    ("flags-unknown-bit", Op.NEW_POOL, [FLAGS | 1 << 2, None], INVALID, "set unknown bits"),
    ("flags-order-5", Op.NEW_POOL, [5 << 4 | 1 << 24, None], INVALID, "page order 5 is too large"),
    ("flags-order-15", Op.NEW_POOL, [15 << 4, None], INVALID, "page order 15 is too large"),
    ("flags-version-2", Op.NEW_POOL, [2 << 24, None], INVALID, "pool spec version 2 is not supported"),
    ("uuid-15-bytes", Op.NEW_POOL, [FLAGS, b"u" * 15], INVALID, "pool uuid must be nil or 16 bytes"),
    ("uuid-str", Op.NEW_POOL, [SHARED, "u" * 16], INVALID, "pool uuid must be nil or 16 bytes"),
    ("uuid-int", Op.NEW_POOL, [SHARED, 5], INVALID, "pool uuid must be nil or 16 bytes"),
    ("shared-no-uuid", Op.NEW_POOL, [SHARED, None], INVALID, "a shared pool needs a 16-byte uuid"),
    ("shared-persistent", Op.NEW_POOL, [SHARED | 1, UUID], INVALID, "shared persistent pools are not supported"),
    ("shared-no-grant", Op.NEW_POOL, [SHARED, UUID], PERMISSION, "no grant for shared pool"),
    ("offset-str", Op.READ, [P, 1, 0, "0", 1, 0], INVALID, "offset must be an unsigned integer, got str"),
    ("offset-negative", Op.WRITE, [P, 1, 0, -1, 1, 0], INVALID, "offset must be an unsigned 32-bit integer"),
    ("length-float", Op.READ, [P, 1, 0, 0, 1.0, 0], INVALID, "length must be an unsigned integer, got float"),
    ("length-negative", Op.XCHG, [P, 1, 0, 0, -4096, 0], INVALID, "length must be an unsigned 32-bit integer"),
    ("length-nil", Op.WRITE, [P, 1, 0, 0, None, 0], INVALID, "length must be an unsigned integer, got NoneType"),
    ("entries-map", Op.PUT_MANY, [P, {"a": 1}], INVALID, "batch entries must be a flat array of 3-tuples"),
    ("entries-nil", Op.GET_MANY, [P, None], INVALID, "flat array of 3-tuples"),
    ("entries-bin", Op.FLUSH_MANY, [P, b"\0" * 8], INVALID, "flat array of 2-tuples"),
    ("entries-width-2", Op.PUT_MANY, [P, [1, 0]], INVALID, "flat array of 3-tuples"),
    ("entries-nested", Op.PUT_MANY, [P, [[1, 0, 0]]], INVALID, "flat array of 3-tuples"),
    ("flush-entries-width-3", Op.FLUSH_MANY, [P, [1, 0, 0]], INVALID, "flat array of 2-tuples"),
]  # fmt: skip


def pool_handles(g: Raw) -> dict[int, int]:
    """Give the raw guest a persistent pool of 4 KiB pages and one of 16 KiB pages."""
    handles = {}
    for order in (0, 2):
        flags = make_pool_flags(persistent=True, shared=False, order=order)
        handle, size = g.ok(Op.NEW_POOL, flags, None)
        assert size == FRAME_SIZE << order
        handles[order] = handle
    return handles


def resolve(args: Sequence[Any], handles: dict[int, int]) -> list[Any]:
    return [handles[a.order] if isinstance(a, _Pool) else a for a in args]


class PageProbe:
    """A page the raw guest stored before the bad request: it must come out unchanged, and the
    guest's staging frames must be untouched too."""

    def __init__(self, g: Raw, handles: dict[int, int]) -> None:
        self.g = g
        self.handle = handles[0]
        self.data = random.Random(1).randbytes(FRAME_SIZE)
        g.frame(0)[:] = self.data
        assert g.ok(Op.PUT, self.handle, 1, 0, 0) is True
        self.frames = bytes(memoryview(g.region)[: GUEST_FRAMES * FRAME_SIZE])
        self.big_handle = handles[2]

    def check(self) -> None:
        g = self.g
        assert bytes(memoryview(g.region)[: GUEST_FRAMES * FRAME_SIZE]) == self.frames
        assert g.ok(Op.GET, self.handle, 1, 0, 8) is True
        assert bytes(g.frame(8)) == self.data
        for index in range(1, 3):  # nothing else appeared in the pools
            assert g.ok(Op.GET, self.handle, 1, index, 8) is False
        assert g.ok(Op.GET, self.big_handle, 1, 0, 8) is False
        g.frame(8)[:] = self.frames[8 * FRAME_SIZE : 9 * FRAME_SIZE]


@pytest.mark.parametrize(
    ("op", "args", "status", "needle"),
    [pytest.param(*case[1:], id=case[0]) for case in ARGUMENTS],
)
def test_wrong_arguments(env: Env, op: int, args: list[Any], status: int, needle: str) -> None:
    """Wrong counts and types get that request's clear error and no effect; the connection and
    every page stay."""
    g = env.guest()
    handles = pool_handles(g)
    probe = PageProbe(g, handles)
    g.fails(op, resolve(args, handles), status, needle)
    probe.check()
    g.ok(Op.PING)
    env.check()


# ================================================================================================
# Ranges: oid, index, frame, offset and length


RANGES = [
    ("oid-bin-23", Op.PUT, [P, b"\1" * 23, 1, 0], "oid as bin must be exactly 24 bytes, got 23"),
    ("oid-bin-25", Op.PUT, [P, b"\1" * 25, 1, 0], "oid as bin must be exactly 24 bytes, got 25"),
    ("oid-bin-0", Op.GET, [P, b"", 1, 0], "oid as bin must be exactly 24 bytes, got 0"),
    ("oid-bin-64KiB", Op.FLUSH, [P, b"\1" * 65536, 1], "exactly 24 bytes, got 65536"),
    ("flush-object-oid-bin-8", Op.FLUSH_OBJECT, [P, b"\0" * 7 + b"\1"], "exactly 24 bytes, got 8"),
    ("index-2^32", Op.PUT, [P, 1, 2**32, 0], "index must be an unsigned 32-bit integer, got 4294967296"),
    ("flush-index-2^32", Op.FLUSH, [P, 1, 2**32], "index must be an unsigned 32-bit integer"),
    ("read-index-2^32", Op.READ, [P, 1, 2**32, 0, 1, 0], "index must be an unsigned 32-bit"),
    ("frame-at-region-end", Op.PUT, [P, 1, 1, GUEST_FRAMES], f"frame {GUEST_FRAMES} (+1 for a 4096-byte page) is outside the region's {GUEST_FRAMES} frames"),
    ("frame-uint32-max", Op.PUT, [P, 1, 1, 2**32 - 1], "is outside the region's 16 frames"),
    ("frame-2^32", Op.PUT, [P, 1, 1, 2**32], "frame must be an unsigned 32-bit integer"),
    ("get-frame-outside", Op.GET, [P, 1, 0, GUEST_FRAMES], "outside the region"),
    ("big-page-straddles-end", Op.PUT, [B, 1, 0, GUEST_FRAMES - 3], "frame 13 (+4 for a 16384-byte page) is outside"),
    ("big-get-straddles-end", Op.GET, [B, 1, 0, GUEST_FRAMES - 1], "(+4 for a 16384-byte page)"),
    ("read-offset-past-page", Op.READ, [P, 1, 0, 4096, 1, 0], "offset 4096 + length 1 must lie inside the 4096-byte page"),
    ("read-length-past-page", Op.READ, [P, 1, 0, 1, 4096, 0], "offset 1 + length 4096 must lie inside"),
    ("read-length-0", Op.READ, [P, 1, 0, 0, 0, 0], "length at least 1"),
    ("write-length-0", Op.WRITE, [P, 1, 0, 5, 0, 0], "length at least 1"),
    ("xchg-length-0", Op.XCHG, [P, 1, 0, 0, 0, 0], "length at least 1"),
    ("read-uint32-max-both", Op.READ, [P, 1, 0, 2**32 - 1, 2**32 - 1, 0], "must lie inside"),
    ("write-offset-2^32", Op.WRITE, [P, 1, 0, 2**32, 1, 0], "offset must be an unsigned 32-bit integer"),
    ("xchg-length-2^32", Op.XCHG, [P, 1, 0, 0, 2**32, 0], "length must be an unsigned 32-bit integer"),
    ("big-read-past-page", Op.READ, [B, 1, 0, 16000, 385, 0], "must lie inside the 16384-byte page"),
    ("read-past-region", Op.READ, [P, 1, 0, 0, 1, GUEST_FRAMES], f"frame {GUEST_FRAMES} + length 1 runs past the region"),
    ("write-past-region", Op.WRITE, [P, 1, 0, 0, 4096, GUEST_FRAMES], "runs past the region (65536 bytes)"),
    ("big-xchg-tail-past-region", Op.XCHG, [B, 1, 0, 0, 8192, GUEST_FRAMES - 1], "frame 15 + length 8192 runs past the region"),
    ("write-frame-uint32-max", Op.WRITE, [P, 1, 0, 0, 1, 2**32 - 1], "runs past the region"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("op", "args", "needle"), [pytest.param(*case[1:], id=case[0]) for case in RANGES]
)
def test_out_of_range(env: Env, op: int, args: list[Any], needle: str) -> None:
    """Out-of-range numbers are INVALID for that request and have no effect: the stored page is
    unchanged, nothing new is stored, the guest's own frames are untouched."""
    g = env.guest()
    handles = pool_handles(g)
    probe = PageProbe(g, handles)
    g.fails(op, resolve(args, handles), INVALID, needle)
    probe.check()
    env.check()


def test_limits_are_exact(env: Env) -> None:
    """The edges just inside every range are served (so the refusals above are not just
    refusing everything)."""
    g = env.guest()
    handles = pool_handles(g)
    p, b = handles[0], handles[2]
    last = GUEST_FRAMES - 1
    g.frame(last)[:] = b"\x5a" * FRAME_SIZE
    for oid in (0, 2**64 - 1, b"\xff" * 24, b"\0" * 24):
        assert g.ok(Op.PUT, p, oid, 2**32 - 1, last) is True
    assert g.ok(Op.READ, p, b"\xff" * 24, 2**32 - 1, 4095, 1, 0) is True
    assert bytes(g.frame(0)[:1]) == b"\x5a"
    assert g.ok(Op.PUT, b, 3, 0, GUEST_FRAMES - 4) is True
    assert g.ok(Op.XCHG, b, 3, 0, 0, 16384, GUEST_FRAMES - 4) is True
    assert g.ok(Op.READ, p, 2**64 - 1, 2**32 - 1, 0, 4096, last) is True
    env.check()


def test_page_larger_than_the_region(env: Env) -> None:
    g = env.guest(frames=8)
    flags = make_pool_flags(persistent=False, shared=False, order=4)
    g.fails(Op.NEW_POOL, [flags, None], INVALID, "page size 65536 does not fit the region")
    env.check()


# ================================================================================================
# Pool handles


@pytest.mark.parametrize("handle", [0, 1, 12345, 2**32 - 1, 2**32, 2**64 - 1, -1, -(2**63)])
@pytest.mark.parametrize(
    ("op", "rest"),
    [
        (Op.PUT, [1, 0, 0]),
        (Op.GET, [1, 0, 0]),
        (Op.FLUSH, [1, 0]),
        (Op.FLUSH_OBJECT, [1]),
        (Op.READ, [1, 0, 0, 1, 0]),
        (Op.PUT_MANY, [[1, 0, 0]]),
        (Op.DESTROY_POOL, []),
    ],
    ids=["PUT", "GET", "FLUSH", "FLUSH_OBJECT", "READ", "PUT_MANY", "DESTROY_POOL"],
)
def test_unknown_pool_handle(env: Env, handle: int, op: int, rest: list[Any]) -> None:
    g = env.guest()
    handles = pool_handles(g)
    if handle in handles.values():  # 2**-31 odds; the handles are random
        pytest.skip("a real handle happens to equal the guess")
    g.fails(op, [handle, *rest], NO_POOL, f"pool {handle} is unknown to this connection")
    g.ok(Op.PING)
    env.check()


def test_destroyed_pool_handle_stays_dead(env: Env) -> None:
    """A destroyed handle is unknown for every op, destroying it twice included, and is never
    reused for a later pool."""
    g = env.guest()
    handle = g.ok(Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None)[0]
    assert g.ok(Op.PUT, handle, 1, 0, 0) is True
    assert g.ok(Op.DESTROY_POOL, handle) is None
    g.fails(Op.DESTROY_POOL, [handle], NO_POOL, f"pool {handle} is unknown")
    g.fails(Op.GET, [handle, 1, 0, 0], NO_POOL, f"pool {handle} is unknown")
    later = [g.ok(Op.NEW_POOL, FLAGS, None)[0] for _ in range(7)]
    assert handle not in later
    g.fails(Op.PUT, [handle, 1, 0, 0], NO_POOL, "unknown")
    env.check()


def test_too_many_pools(env: Env) -> None:
    g = env.guest()
    for _ in range(8):
        g.ok(Op.NEW_POOL, FLAGS, None)
    g.fails(Op.NEW_POOL, [FLAGS, None], LIMIT, "max_pools=8")
    env.check()


CROSS = [
    (Op.PUT, [1, 0, 0]),
    (Op.PUT, [(2**191 + 5).to_bytes(24, "big"), 0, 0]),
    (Op.GET, [0, 9, 0]),
    (Op.FLUSH, [0, 9]),
    (Op.FLUSH_OBJECT, [1]),
    (Op.READ, [1, 0, 0, 4096, 0]),
    (Op.WRITE, [1, 0, 0, 4096, 0]),
    (Op.XCHG, [1, 0, 0, 4096, 0]),
    (Op.PUT_MANY, [[1, 0, 0, 1, 9, 1]]),
    (Op.GET_MANY, [[1, 0, 0]]),
    (Op.FLUSH_MANY, [[1, 0, 1, 9, 0, 2**32 - 1]]),
    (Op.DESTROY_POOL, []),
]


@pytest.mark.parametrize(
    ("op", "rest"), CROSS, ids=[f"{Op(op).name}-{i}" for i, (op, _) in enumerate(CROSS)]
)
def test_another_connections_handle_is_unknown(env: Env, op: int, rest: list[Any]) -> None:
    """Guest B naming guest A's real pool handle reaches nothing: NO_POOL, and A's pages (the
    reference guest's) are all there, unchanged."""
    g = env.guest()
    own = pool_handles(g)
    victim = env.ref.pool.handle
    if victim in own.values():  # 2**-31 odds; the handles are random
        pytest.skip("B's own handle happens to equal A's")
    g.fails(op, [victim, *rest], NO_POOL, f"pool {victim} is unknown to this connection")
    g.fails(op, [env.ref.big.handle, *rest], NO_POOL, "unknown to this connection")
    env.check()


# ================================================================================================
# Batches


@pytest.mark.parametrize(
    ("op", "width"),
    [(Op.PUT_MANY, 3), (Op.GET_MANY, 3), (Op.FLUSH_MANY, 2)],
    ids=["PUT_MANY", "GET_MANY", "FLUSH_MANY"],
)
def test_batch_over_max_batch(env: Env, op: int, width: int) -> None:
    """max_batch+1 entries are refused whole (LIMIT); max_batch entries are served."""
    g = env.guest()
    handle = pool_handles(g)[0]

    def entries(count: int) -> list[int]:
        flat: list[int] = []
        for i in range(count):
            flat += [5, i, i % GUEST_FRAMES][:width]
        return flat

    over = MAX_BATCH + 1
    g.fails(
        op, [handle, entries(over)], LIMIT, f"batch of {over} pages exceeds max_batch {MAX_BATCH}"
    )
    # Nothing of the refused batch was stored.
    probe = [x for i in range(over) for x in (5, i, 0)]
    assert g.ok(Op.GET_MANY, handle, probe[: 3 * MAX_BATCH]) == [False] * MAX_BATCH
    assert g.ok(Op.GET, handle, 5, MAX_BATCH, 0) is False
    g.fails(op, [handle, entries(100_000)], LIMIT, "batch of 100000 pages exceeds max_batch")
    result = g.ok(op, handle, entries(MAX_BATCH))
    if op == Op.PUT_MANY:
        assert result == [True] * MAX_BATCH
    env.check()


BAD_ENTRIES = [
    # (id, field position in the entry, bad value, needle)
    ("oid-negative", 0, -1, "oid must be an unsigned integer, got -1"),
    ("oid-bin-23", 0, b"\0" * 23, "oid as bin must be exactly 24 bytes"),
    ("oid-str", 0, "x", "oid must be an unsigned integer, got str"),
    ("index-2^32", 1, 2**32, "index must be an unsigned 32-bit integer"),
    ("index-nil", 1, None, "index must be an unsigned integer, got NoneType"),
    ("frame-outside", 2, GUEST_FRAMES, "is outside the region"),
    ("frame-float", 2, 1.0, "frame must be an unsigned integer, got float"),
]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize(
    ("op", "field", "value", "needle"),
    [
        pytest.param(op, *c[1:], id=f"{op.name}-{c[0]}")
        for op in (Op.PUT_MANY, Op.GET_MANY, Op.FLUSH_MANY)
        for c in BAD_ENTRIES
        if op != Op.FLUSH_MANY or c[1] < 2  # FLUSH_MANY entries have no frame
    ],
)
def test_batch_with_one_invalid_entry_has_no_effect(
    env: Env, op: int, field: int, value: Any, needle: str, where: str
) -> None:
    """One bad entry fails the whole batch before any page is touched: a refused PUT_MANY
    stores (and overwrites) nothing, a refused GET_MANY on an ephemeral pool (exclusive gets)
    removes nothing and writes no frame, a refused FLUSH_MANY flushes nothing."""
    width = 2 if op == Op.FLUSH_MANY else 3
    g = env.guest()
    persistent = op == Op.PUT_MANY
    flags = make_pool_flags(persistent=persistent, shared=False, order=0)
    handle = g.ok(Op.NEW_POOL, flags, None)[0]
    rng = random.Random(f"{op}{field}{where}")
    count = 8
    old = [rng.randbytes(FRAME_SIZE) for _ in range(count)]
    for i in range(count):  # pages (5, i) held before the batch, from frames 0..7
        g.frame(i)[:] = old[i]
    assert g.ok(Op.PUT_MANY, handle, [x for i in range(count) for x in (5, i, i)]) == [True] * 8
    # The batch: new data in frames 8..15 for pages (5, 0..7) and new pages (6, 0..7).
    for i in range(count):
        g.frame(8 + i)[:] = rng.randbytes(FRAME_SIZE)
    before = bytes(memoryview(g.region)[: GUEST_FRAMES * FRAME_SIZE])
    entries = [[oid, i, 8 + i][:width] for oid in (5, 6) for i in range(count // 2)]
    bad_at = {"first": 0, "middle": len(entries) // 2, "last": len(entries) - 1}[where]
    entries[bad_at][field] = value
    flat = [x for entry in entries for x in entry]
    g.fails(op, [handle, flat], INVALID, f"entry {bad_at} ", needle)
    # No effect at all: the guest's frames are untouched, old pages still hold the old data,
    # and no new page was stored.
    assert bytes(memoryview(g.region)[: GUEST_FRAMES * FRAME_SIZE]) == before
    for i in range(count):
        assert g.ok(Op.GET, handle, 5, i, 0) is True, f"page (5, {i}) is gone"
        assert bytes(g.frame(0)) == old[i], f"page (5, {i}) was changed"
        assert g.ok(Op.GET, handle, 6, i, 0) is False, f"page (6, {i}) was stored"
    env.check()


# ================================================================================================
# The region fd


def _pipe(tmp: Path) -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


def _socket(tmp: Path) -> list[int]:
    a, b = socket.socketpair()
    b.close()
    return [a.detach()]


def _dev_null(tmp: Path) -> list[int]:
    return [os.open("/dev/null", os.O_RDWR)]


def _directory(tmp: Path) -> list[int]:
    return [os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)]


def _disk_file(tmp: Path) -> list[int]:
    with tempfile.TemporaryFile(dir=tmp) as f:
        os.ftruncate(f.fileno(), GUEST_FRAMES * FRAME_SIZE)
        return [os.dup(f.fileno())]


def _tmpfs_file(tmp: Path) -> list[int]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        os.ftruncate(f.fileno(), GUEST_FRAMES * FRAME_SIZE)
        return [os.dup(f.fileno())]


def _memfd(frames: int = GUEST_FRAMES, seals: int = SEALS, allow: bool = True):
    return lambda tmp: [memfd(frames, seals, allow_sealing=allow)]


def _odd_size_memfd(tmp: Path) -> list[int]:
    fd = os.memfd_create("tmem-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, GUEST_FRAMES * FRAME_SIZE + 100)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return [fd]


def _read_only_memfd(tmp: Path) -> list[int]:
    fd = memfd()
    try:
        return [os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)]
    finally:
        os.close(fd)


def _o_path_memfd(tmp: Path) -> list[int]:
    fd = memfd()
    try:
        return [os.open(f"/proc/self/fd/{fd}", os.O_PATH)]
    finally:
        os.close(fd)


REGION_BYTES = GUEST_FRAMES * FRAME_SIZE
REGIONS = [
    # (id, make fds, frames announced, status, needle)
    ("pipe", _pipe, GUEST_FRAMES, INVALID, "region fd is not a memfd (not a regular file)"),
    ("socket", _socket, GUEST_FRAMES, INVALID, "not a memfd (not a regular file)"),
    ("dev-null", _dev_null, GUEST_FRAMES, INVALID, "not a memfd (not a regular file)"),
    ("directory", _directory, GUEST_FRAMES, INVALID, "not a memfd (not a regular file)"),
    ("disk-file", _disk_file, GUEST_FRAMES, INVALID, "seal"),
    ("tmpfs-file", _tmpfs_file, GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK and F_SEAL_GROW"),
    ("memfd-not-sealable", _memfd(seals=0, allow=False), GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK and F_SEAL_GROW"),
    ("memfd-no-seals", _memfd(seals=0), GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK and F_SEAL_GROW"),
    ("memfd-only-shrink", _memfd(seals=fcntl.F_SEAL_SHRINK), GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK and F_SEAL_GROW"),
    ("memfd-only-grow", _memfd(seals=fcntl.F_SEAL_GROW), GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK and F_SEAL_GROW"),
    ("memfd-only-seal-seal", _memfd(seals=fcntl.F_SEAL_SEAL), GUEST_FRAMES, INVALID, "must have F_SEAL_SHRINK"),
    ("memfd-smaller", _memfd(GUEST_FRAMES - 1), GUEST_FRAMES, INVALID, f"region memfd is {REGION_BYTES - FRAME_SIZE} bytes, HELLO announced {GUEST_FRAMES} frames = {REGION_BYTES} bytes"),
    ("memfd-larger", _memfd(GUEST_FRAMES + 1), GUEST_FRAMES, INVALID, f"region memfd is {REGION_BYTES + FRAME_SIZE} bytes"),
    ("memfd-empty", _memfd(0), GUEST_FRAMES, INVALID, "region memfd is 0 bytes"),
    ("memfd-not-whole-frames", _odd_size_memfd, GUEST_FRAMES, INVALID, f"region memfd is {REGION_BYTES + 100} bytes"),
    ("zero-frames", _memfd(0), 0, LIMIT, f"region of 0 frames is outside 1..{MAX_REGION_FRAMES}"),
    ("zero-frames-nonempty", _memfd(), 0, LIMIT, "region of 0 frames is outside"),
    ("over-max-region-frames", _memfd(MAX_REGION_FRAMES + 1), MAX_REGION_FRAMES + 1, LIMIT, f"region of {MAX_REGION_FRAMES + 1} frames is outside 1..{MAX_REGION_FRAMES} (max_region_frames)"),
    ("frames-uint32-max", _memfd(), 2**32 - 1, LIMIT, "region of 4294967295 frames is outside"),
    ("frames-2^32", _memfd(), 2**32, INVALID, "region frames must be an unsigned 32-bit integer"),
    ("frames-negative", _memfd(), -16, INVALID, "region frames must be an unsigned 32-bit integer"),
    ("frames-str", _memfd(), "16", INVALID, "region frames must be an unsigned integer, got str"),
    ("frames-float", _memfd(), 16.0, INVALID, "region frames must be an unsigned integer, got float"),
    ("memfd-write-sealed", _memfd(seals=SEALS | fcntl.F_SEAL_WRITE), GUEST_FRAMES, INVALID, "cannot be mapped shared read-write"),
    ("memfd-future-write-sealed", _memfd(seals=SEALS | F_SEAL_FUTURE_WRITE), GUEST_FRAMES, INVALID, "cannot be mapped shared read-write"),
    ("memfd-read-only", _read_only_memfd, GUEST_FRAMES, INVALID, "cannot be mapped shared read-write"),
    ("memfd-o-path", _o_path_memfd, GUEST_FRAMES, INVALID, "cannot carry seals"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "frames", "status", "needle"), [pytest.param(*c[1:], id=c[0]) for c in REGIONS]
)
def test_bad_region(
    env: Env,
    tmp_path: Path,
    make: Callable[[Path], list[int]],
    frames: Any,
    status: int,
    needle: str,
) -> None:
    """Anything but a read-write memfd sealed against shrinking and growing, of exactly the
    announced size within max_region_frames, is refused at the handshake before it is mapped;
    the daemon closes the fd (teardown: its fd count is back to the baseline)."""
    fds = make(tmp_path)
    g = env.connect()
    g.send(hello_bytes(frames=frames), fds)
    close_fds(fds)
    g.refused(1, status, needle)
    env.check()


def test_hello_without_fd(env: Env) -> None:
    g = env.connect()
    g.send(hello_bytes())
    g.refused(1, PROTOCOL, "HELLO must carry exactly one fd (the region memfd)")
    env.check()


@pytest.mark.parametrize("extra", [1, 2, 9, 200])
def test_hello_with_extra_fds(env: Env, extra: int) -> None:
    """Two fds fit the daemon's control buffer and are refused; more set MSG_CTRUNC (the kernel
    installs what fits and drops the rest). Either way every fd that arrived is closed: the
    pipes whose write ends we sent all see EOF, and the daemon's fd count is back to where it
    was."""
    base = daemon_fds(env.daemon)
    pipes = [os.pipe() for _ in range(extra)]
    fds = [memfd(), *(w for _, w in pipes)]
    g = env.connect()
    g.send(hello_bytes(), fds)
    close_fds(fds)
    g.refused(1, PROTOCOL, "HELLO must carry exactly one fd")
    assert_released([r for r, _ in pipes])
    g.close()
    wait_fds(env.daemon, base)
    env.check()


@pytest.mark.parametrize("count", [1, 5])
def test_fd_with_a_later_frame(env: Env, count: int) -> None:
    """fds are accepted only with HELLO: one arriving with a later request drops the guest with
    a PROTOCOL notice, and the daemon closes it."""
    g = env.guest()
    g.ok(Op.PING)
    pipes = [os.pipe() for _ in range(count)]
    g.req_id += 1
    g.send(encode_frame([Op.PING, g.req_id]), [w for _, w in pipes])
    close_fds([w for _, w in pipes])
    g.refused(0, PROTOCOL, "fds are accepted only with HELLO")
    assert_released([r for r, _ in pipes])
    env.check()


def test_second_memfd_after_hello(env: Env) -> None:
    """A second region (a valid sealed memfd) sent after the handshake is refused the same way."""
    g = env.guest()
    fd = memfd()
    g.send(hello_bytes(), [fd])
    os.close(fd)
    g.refused(0, PROTOCOL, "fds are accepted only with HELLO")
    env.check()


# ================================================================================================
# A guest tampering with its own region


def test_guest_cannot_resize_its_sealed_region(env: Env) -> None:
    """Truncating or growing the sealed region fails locally with EPERM, so the daemon's mapping
    can never SIGBUS; punching a hole (allowed by these seals) only zeroes the guest's own
    frames. The daemon serves on, with the stored copy intact."""
    frames = 8
    g = env.guest(frames=frames)
    handle = g.ok(Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None)[0]
    page = random.Random(3).randbytes(FRAME_SIZE)
    g.frame(0)[:] = page
    assert g.ok(Op.PUT, handle, 1, 0, 0) is True
    for new_size in (0, FRAME_SIZE, (frames - 1) * FRAME_SIZE, (frames + 1) * FRAME_SIZE, 1 << 30):
        with pytest.raises(PermissionError) as truncate:
            os.ftruncate(g.fd, new_size)
        assert truncate.value.errno == errno.EPERM
    with pytest.raises(OSError) as grow:
        os.posix_fallocate(g.fd, 0, 2 * frames * FRAME_SIZE)
    assert grow.value.errno == errno.EPERM
    with pytest.raises(PermissionError):
        fcntl.fcntl(g.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # F_SEAL_SEAL: no more seals
    assert os.fstat(g.fd).st_size == frames * FRAME_SIZE
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert libc.fallocate(g.fd, punch, ctypes.c_long(0), ctypes.c_long(frames * FRAME_SIZE)) == 0
    assert bytes(g.frame(0)) == bytes(FRAME_SIZE)
    assert g.ok(Op.GET, handle, 1, 0, 3) is True
    assert bytes(g.frame(3)) == page
    assert g.ok(Op.PUT, handle, 2, 0, frames - 1) is True  # a punched (zero) frame is just data
    assert g.ok(Op.GET, handle, 2, 0, 4) is True
    assert bytes(g.frame(4)) == bytes(FRAME_SIZE)
    g.ok(Op.PING)
    env.check()


def test_guest_closes_its_fd_and_mapping(env: Env) -> None:
    """The daemon holds its own reference to the region: a guest that closes its memfd and
    unmaps its region right after connecting is still served."""
    g = env.guest()
    g.frame(0)[:] = b"\x11" * FRAME_SIZE
    os.close(g.fd)
    g.fd = -1
    g.region.close()
    g.region = None
    handle = g.ok(Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None)[0]
    assert g.ok(Op.PUT, handle, 1, 0, 0) is True
    assert g.ok(Op.GET, handle, 1, 0, 5) is True
    assert g.ok(Op.XCHG, handle, 1, 0, 10, 20, 6) is True
    assert g.ok(Op.PUT_MANY, handle, [2, 0, 1, 2, 1, 2]) == [True, True]
    assert g.ok(Op.GET_MANY, handle, [1, 0, 3, 2, 1, 4]) == [True, True]
    g.ok(Op.PING)
    env.check()


# ================================================================================================
# A guest killed in the middle of a batch


VICTIM = r"""
import sys, tmemclient
from tmemclient.wire.codec import encode_frame
from tmemclient.wire.messages import Op

path, name, mode = sys.argv[1:4]
client = tmemclient.connect(path, name=name, frames=1024)
pool = client.new_pool(persistent=True)
page = bytes(range(256)) * 16
stored = index = 0
while True:  # fill every slot the budget has left
    ok = pool.put_many([(7, index + k, page) for k in range(1024)])
    stored += sum(ok)
    index += 1024
    if not all(ok):
        break
if mode == "mid-frame":  # half of a max_batch PUT_MANY frame, then wait to be killed
    entries = [x for k in range(4096) for x in (7, k, k % 1024)]
    frame = encode_frame([Op.PUT_MANY, 999, pool.handle, entries])
    client._sock.sendall(frame[: len(frame) // 2])
    print(stored, flush=True)
    sys.stdin.read()
print(stored, flush=True)
pool.put_many([(7, k, page) for k in range(4096)])
print("streaming", flush=True)
while True:  # large batches, pipelined, until killed
    pool.put_many([(7, k, page) for k in range(4096)])
"""


@pytest.mark.parametrize("mode", ["pipelined", "mid-frame"])
def test_guest_killed_in_the_middle_of_a_batch(own_env: Callable[..., Env], mode: str) -> None:
    """SIGKILL a guest that holds every free page of the budget while it streams large batches
    (or with half a frame sent): the daemon logs guest_disconnected, frees all its pages, and
    another guest can then use the whole budget."""
    env = own_env()
    budget_pages = (16 << 20) // FRAME_SIZE
    name = unique("victim")
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(env.daemon.socket), name, mode],
        bufsize=0,  # unbuffered: readline takes one line, select sees the next
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the victim guest did not fill the budget in time"
        line = proc.stdout.readline()
        assert line.strip(), proc.stderr.read() if proc.stderr else ""
        stored = int(line)
        assert stored == budget_pages - env.ref.slots
        if mode == "pipelined":  # killed well into its stream of batches: one was answered
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline() == b"streaming\n", "no batch answered"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    record = wait_guest_disconnected(env.daemon, name)
    assert record["pages_freed"] == stored
    if mode == "mid-frame":
        assert record["reason"] == "closed mid-frame"
    env.check()
    heir = tmemclient.connect(env.daemon.socket, name=unique("heir"), frames=1024)
    try:
        pool = heir.new_pool(persistent=True)
        page = b"\x42" * (FRAME_SIZE - 1) + b"\x43"  # not same-filled: a slot each (§6.11)
        free = budget_pages - env.ref.slots
        items = [(1, i, page) for i in range(free)]
        # The dead guest's slots come back once their memory is scrubbed, which a large free
        # does off the event loop (the slots stay in use until the punch is done): retry,
        # bounded, until every page fits.
        deadline = time.monotonic() + TIMEOUT
        while not all(pool.put_many(items)):
            assert time.monotonic() < deadline, "the dead guest's memory never came back"
            time.sleep(0.02)
        assert pool.put(2, 0, page) is False  # and the budget is exactly full
        assert pool.get(1, free - 1) == page
    finally:
        heir.close()
    env.check()


# ================================================================================================
# Handshake timing


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"\x00\x00", id="half-header"),
        pytest.param(b"\x00\x00\x00\x40\x95\x1e\x01", id="half-hello"),
    ],
)
def test_handshake_timeout(timeout_env: Env, sent: bytes) -> None:
    """A client that connects and sends nothing, or half a HELLO (its fd included), and stalls
    is closed with a PROTOCOL notice after --handshake-timeout, and the fd is closed."""
    env = timeout_env
    before = len(env.daemon.events("handshake_timeout"))
    r, w = os.pipe()
    g = env.connect()
    start = time.monotonic()
    if sent:
        g.send(sent, [w])
    os.close(w)
    g.refused(0, PROTOCOL, "no HELLO in time")
    assert time.monotonic() - start >= 0.4  # not before the timeout (no upper bound asserted)
    if sent:
        assert_released([r])
    else:
        os.close(r)
    assert len(env.daemon.wait_event("handshake_timeout", before + 1)) == before + 1
    env.check()  # the reference guest, connected before, is past its handshake and unaffected


# ================================================================================================
# Versions and names


@pytest.mark.parametrize("version", [0, 2, 255, 2**32 - 1])
def test_wrong_protocol_version(env: Env, version: int) -> None:
    fd = memfd()
    g = env.connect()
    g.send(hello_bytes(version=version), [fd])
    os.close(fd)
    g.refused(1, VERSION, f"protocol version {version} is not supported")
    env.check()


@pytest.mark.parametrize(
    ("version", "needle"),
    [
        ("1", "protocol version must be an unsigned integer, got str"),
        (1.0, "protocol version must be an unsigned integer, got float"),
        (True, "protocol version must be an unsigned integer, got bool"),
        (-1, "protocol version must be an unsigned 32-bit integer, got -1"),
        (2**32, "protocol version must be an unsigned 32-bit integer"),
    ],
)
def test_malformed_protocol_version(env: Env, version: Any, needle: str) -> None:
    fd = memfd()
    g = env.connect()
    g.send(hello_bytes(version=version), [fd])
    os.close(fd)
    g.refused(1, INVALID, needle)
    env.check()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a b",
        "x" * 65,
        "../etc",
        "a/b",
        "ü",
        "name\n",
        "nul\0",
        "tab\t",
        123,
        None,
        b"bytes",
        ["a"],
    ],
    ids=repr,
)
def test_invalid_guest_name(env: Env, name: Any) -> None:
    fd = memfd()
    g = env.connect()
    g.send(encode_frame([Op.HELLO, 1, PROTOCOL_VERSION, name, GUEST_FRAMES]), [fd])
    os.close(fd)
    g.refused(1, INVALID, "guest name must be 1..64 characters of A-Z a-z 0-9 . _ -")
    env.check()


def test_longest_valid_guest_name(env: Env) -> None:
    name = "n" * 60 + f"{next(_names):04d}"
    g = env.guest(name=name)
    g.ok(Op.PING)
    env.check()


def test_same_guest_name_twice(env: Env) -> None:
    """While a guest is connected, a second connection asking for its name is refused with
    CONFLICT (7) and closed; the first is unaffected; once it leaves the name is free again."""
    name = unique("twice")
    first = tmemclient.connect(env.daemon.socket, name=name, frames=8)
    try:
        pool = first.new_pool(persistent=True)
        assert pool.put(1, 2, b"\x33" * FRAME_SIZE)
        fd = memfd()
        g = env.connect()
        g.send(hello_bytes(name=name), [fd])
        os.close(fd)
        g.refused(1, CONFLICT, f"guest '{UID}/{name}' is already connected")
        with pytest.raises(tmemclient.GuestConflict, match="already connected"):
            tmemclient.connect(env.daemon.socket, name=name, frames=8)
        assert pool.get(1, 2) == b"\x33" * FRAME_SIZE
    finally:
        first.close()
    wait_guest_disconnected(env.daemon, name)
    again = env.guest(name=name)
    again.ok(Op.PING)
    env.check()


# ================================================================================================
# Mapped pages (PROTOCOL.md §4.7)


@pytest.mark.parametrize("value", [1, 0, "yes", None, [True], {"on": True}])
def test_hello_with_a_bad_map_option(env: Env, value: Any) -> None:
    fd, region = create_region(GUEST_FRAMES)
    g = env.connect()
    g.fd, g.region = fd, region
    hello = [Op.HELLO, 1, PROTOCOL_VERSION, unique("map"), GUEST_FRAMES, {"map": value}]
    g.send(encode_frame(hello), [fd])
    g.refused(1, INVALID, "map must be true or false")
    env.check()


def test_a_mapped_guest_gets_no_fd_after_the_handshake_and_keeps_its_pages(env: Env) -> None:
    """A mapped guest that sends an fd later is dropped like any other; its persistent pages
    go with it, the reference guest loses nothing."""
    client = tmemclient.connect(env.daemon.socket, name=unique("map"), frames=16, map_pages=True)
    assert client.mapping is not None
    pool = client.new_pool(persistent=True)
    assert pool.put(1, 0, bytes(FRAME_SIZE))
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [memfd()]))]
    client._sock.sendmsg([encode_frame([Op.PING, 5])], rights)
    close_fds([rights[0][2][0]])
    with pytest.raises(tmemclient.TmemError):
        for _ in range(100):
            client.ping()
    client.close()
    env.check()


# ================================================================================================
# Request rings (PROTOCOL.md §4.6): the guest writes its rings' bytes and counters as it likes

needs_rings = pytest.mark.skipif(not ring.supported(), reason="rings need x86-64")


def ring_guest(env: Env, ring_frames: int = 1) -> tuple[Raw, Rings]:
    """A raw guest granted rings of ``ring_frames`` frames, and its side of them."""
    fd, region = create_region(GUEST_FRAMES, layout.ring_bytes(ring_frames))
    raw = env.connect()
    raw.fd, raw.region = fd, region
    hello = [Op.HELLO, 1, PROTOCOL_VERSION, unique("ring"), GUEST_FRAMES, {"ring": ring_frames}]
    raw.send(encode_frame(hello), [fd])
    assert raw.expect(1, OK)["ring"] == ring_frames
    raw.rings = Rings(memoryview(region)[GUEST_FRAMES * FRAME_SIZE :], ring_frames, "guest")
    return raw, raw.rings


def ring_reply(rings: Rings, decoder: FrameDecoder) -> Any:
    """The next reply in the reply ring (bounded wait)."""
    deadline = time.monotonic() + TIMEOUT
    while (message := decoder.next_message()) is NEED_DATA:
        assert time.monotonic() < deadline, "no reply in the ring"
        decoder.feed(rings.take())
        time.sleep(0.001)
    return message


@needs_rings
def test_ring_requests_are_checked_like_socket_requests(env: Env) -> None:
    """A bad argument through the ring is answered INVALID in the ring; the connection goes on."""
    g, rings = ring_guest(env)
    decoder = FrameDecoder(MAX_FRAME)
    assert rings.write(encode_frame([Op.PING, 7, "extra"]) + encode_frame([Op.PING, 8]))
    g.send(encode_frame([Op.DOORBELL, 1]))
    req_id, status, result = ring_reply(rings, decoder)
    assert (req_id, status) == (7, INVALID) and "PING takes 0 arguments" in result
    assert ring_reply(rings, decoder) == [8, OK, None]
    g.ok(Op.PING)  # the socket still works too
    env.check()


def _garbage(rings: Rings) -> None:
    rings.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # 0xc1 is never valid msgpack


def _oversize(rings: Rings) -> None:
    rings.write(HEADER.pack(MAX_FRAME + 1) + b"x" * 100)


def _not_a_request(rings: Rings) -> None:
    rings.write(encode_frame({"op": 31}))


def _tail_beyond_the_ring(rings: Rings) -> None:
    rings.words[layout.SQ_TAIL] = rings.size + 1


def _tail_backwards(rings: Rings) -> None:
    rings.write(encode_frame([Op.PING, 5]))
    rings.words[layout.SQ_TAIL] = 2**64 - 1


def _reply_head_ahead(rings: Rings) -> None:
    rings.words[layout.CQ_HEAD] = 4096 * 9  # claims to have read replies never written
    rings.write(encode_frame([Op.PING, 5]))


@needs_rings
@pytest.mark.parametrize(
    "spoil, needle",
    [
        (_garbage, "not valid msgpack"),
        (_oversize, "outside 1..1048576"),
        (_not_a_request, "a request must be an array"),
        (_tail_beyond_the_ring, "corrupt"),
        (_tail_backwards, "corrupt"),
        (_reply_head_ahead, "corrupt"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_bad_ring_contents_end_only_that_connection(
    env: Env, spoil: Callable[[Rings], None], needle: str
) -> None:
    g, rings = ring_guest(env)
    spoil(rings)
    g.send(encode_frame([Op.DOORBELL, 1]))
    notice = g.read()
    assert notice is not EOF and notice[:2] == [0, PROTOCOL], notice
    assert needle in notice[2]
    g.expect_closed()
    env.check()


@needs_rings
def test_ring_writes_while_the_daemon_reads_only_garble_that_guest(env: Env) -> None:
    """The guest keeps rewriting its request ring while the daemon serves it: whatever the
    daemon makes of the bytes, it answers or drops that guest, and nobody else notices."""
    g, rings = ring_guest(env)
    rng = random.Random(11)
    written = 0
    for i in range(200):
        if not rings.write(encode_frame([Op.PING, i + 1])):
            break
        written += 1
        start = rng.randrange(rings.size)
        rings._out[start : start + 4] = rng.randbytes(min(4, rings.size - start))
        with contextlib.suppress(OSError):
            g.send(encode_frame([Op.DOORBELL, 1]))
    assert written > 0
    # Never left hanging: a PING on the socket is answered there, or the guest was dropped
    # with a PROTOCOL notice. (Replies that did not fit the reply ring, which nobody reads
    # here, come over the socket too.)
    sync = 0xFFFF_FFF0
    with contextlib.suppress(OSError):
        g.send(encode_frame([Op.PING, sync]))
    notice = None
    for _ in range(10_000):  # bounded; so is every read
        message = g.read()
        if message is EOF:
            assert notice is not None, "tmemd closed the connection without a PROTOCOL notice"
            break
        assert type(message) is list and len(message) == 3, f"not a reply: {message!r}"
        if message == [sync, OK, None]:
            break  # still served
        if message[0] == 0:  # a notice: a doorbell, or the end of this connection
            assert message[1] in (OK, PROTOCOL), message
            if message[1] == PROTOCOL:
                notice = message[2]
    else:
        raise AssertionError("tmemd neither answered the PING nor closed the connection")
    g.close()
    env.check()


# ================================================================================================
# Connection limits and a guest that does not read its replies


def config_file(directory: Path, text: str) -> str:
    """A TOML config written in ``directory``; its path."""
    path = directory / "limits.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("key", ["max_connections", "max_connections_per_uid"])
def test_connections_beyond_the_limit_are_refused_until_one_ends(
    own_env: Callable[..., Env], tmp_path: Path, key: str
) -> None:
    """With the limit at 3 (the reference guest is one), a 4th connection gets one LIMIT reply
    saying what to do, before any handshake, and is closed; once a guest leaves, a new one is
    admitted. The daemon logs each refusal."""
    env = own_env("--config", config_file(tmp_path, f"[limits]\n{key} = 3\n"))
    first, second = env.guest(), env.guest()
    for _ in range(2):  # refused again and again, not only once
        extra = env.connect()
        message = extra.refused(0, LIMIT, "too many connections", "try again later")
        assert message
    refusals = env.daemon.events("connection_refused")
    assert len(refusals) == 2 and {r["reason"] for r in refusals} == {"connection limit"}
    first.ok(Op.PING)
    second.close()
    deadline = time.monotonic() + TIMEOUT
    while True:  # the daemon counts the connection out once it has seen the close (bounded)
        again = env.connect()
        again.fd, again.region = create_region(GUEST_FRAMES)
        again.send(hello_bytes(None, GUEST_FRAMES), [again.fd])
        message = again.read()
        if message is EOF or message[:2] != [0, LIMIT]:
            break
        assert time.monotonic() < deadline, "a freed connection slot was never reused"
        time.sleep(0.05)
    assert type(message) is list and message[:2] == [1, OK], message
    again.ok(Op.PING)
    env.check()


def test_a_guest_that_leaves_its_replies_unread_is_dropped(
    own_env: Callable[..., Env], tmp_path: Path
) -> None:
    """A guest that sends requests but never reads the replies fills its socket; the daemon
    waits at most send_timeout for it, then drops it (logged with the reason), and the other
    guests never wait on it."""
    env = own_env("--config", config_file(tmp_path, "[limits]\nsend_timeout = 0.5\n"))
    name = unique("deaf")
    deaf = env.guest(name=name)
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.sock.setblocking(False)
    ping = b"".join(encode_frame([Op.PING, 1000 + i]) for i in range(256))
    sent = 0
    stuck_since = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the daemon stops taking our requests
        try:
            sent += deaf.sock.send(ping)
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 0.2:
                break
            time.sleep(0.01)
        except OSError:
            break  # already dropped
    assert sent > 0
    env.ref.check()  # served while the deaf guest's replies pile up
    record = wait_guest_disconnected(env.daemon, name)
    assert "left replies unread for 0.5s" in record["reason"]
    deaf.sock.settimeout(TIMEOUT)
    # What was sent before the close (the last reply may be cut short: the guest is gone),
    # then the close: EOF, or a reset as it closed with our requests unread. Bounded.
    for _ in range(100_000):
        try:
            if not deaf.sock.recv(1 << 16):
                break
        except ConnectionResetError:
            break
    else:
        raise AssertionError("the connection was never closed")
    env.check()


# ================================================================================================
# TOUCH_MANY: reports of mapped reads


def mapped_guest(env: Env) -> Raw:
    """A raw guest whose handshake asked for (and got) a mapping; the mirror fd that came with
    the reply is dropped by the plain recv (the kernel closes it)."""
    fd, region = create_region(GUEST_FRAMES)
    raw = env.connect()
    raw.fd, raw.region = fd, region
    raw.send(hello_message(unique("touch"), GUEST_FRAMES, 0, True), [fd])
    limits = raw.expect(1, OK)
    assert limits["map"] > 0, "the daemon granted no mapping"
    return raw


TOUCH_BAD = [
    pytest.param([1], INVALID, "2-tuples", id="odd-length"),
    pytest.param({"a": 1}, INVALID, "2-tuples", id="not-an-array"),
    pytest.param([-1, 1], INVALID, "entry 0 slot", id="negative-slot"),
    pytest.param([2**32, 1], INVALID, "entry 0 slot", id="slot-2^32"),
    pytest.param([1, 1, 1, -1], INVALID, "entry 1 generation", id="generation-negative"),
    pytest.param([1, "1"], INVALID, "entry 0 generation", id="generation-str"),
    pytest.param([True, 1], INVALID, "entry 0 slot", id="slot-bool"),
    pytest.param([1, 1] * (MAX_BATCH + 1), LIMIT, "max_batch", id="over-max-batch"),
]


@pytest.mark.parametrize(("entries", "status", "needle"), TOUCH_BAD)
def test_touch_many_with_bad_entries_is_refused_whole(
    env: Env, entries: Any, status: int, needle: str
) -> None:
    g = mapped_guest(env)
    handle, _ = g.ok(Op.NEW_POOL, FLAGS, None)
    g.fails(Op.TOUCH_MANY, [handle, entries], status, needle)
    assert g.ok(Op.TOUCH_MANY, handle, [1, 1] * MAX_BATCH) is None  # the edge is served
    env.check()


def test_touch_many_needs_a_mapping_and_a_pool_of_ones_own(env: Env) -> None:
    """Only a mapped connection may report reads; tokens that name nothing of the guest's
    (another guest's slots, made-up generations) are answered OK and change nothing: the
    reference guest's pages and counters stay as they were."""
    plain = env.guest()
    handle, _ = plain.ok(Op.NEW_POOL, FLAGS, None)
    plain.fails(Op.TOUCH_MANY, [handle, [1, 1]], INVALID, "mapping")
    g = mapped_guest(env)
    mine, _ = g.ok(Op.NEW_POOL, FLAGS, None)
    g.fails(Op.TOUCH_MANY, [handle, [1, 1]], NO_POOL, "unknown")  # plain's handle: not ours
    guesses = [slot for s in range(64) for slot in (s, 1 + s)]  # slots 0..63, small generations
    assert g.ok(Op.TOUCH_MANY, mine, guesses[: 2 * MAX_BATCH]) is None
    assert g.ok(Op.TOUCH_MANY, mine, [0, 2**64 - 1, 2**32 - 1, 1]) is None
    env.check()
