"""A bounded mutation fuzzer of the guest protocol, against a real tmemd: mutate valid input, and
check after each case that the server is alive and every other guest's pages are intact.

Seeds are the request frames a real tmemclient session sent (recorded off its socket while it
ran a workload touching every op), so they carry that session's real pool handles. Each case
mutates one or more seeds (bit flips, interesting bytes, inserted/deleted bytes, truncation,
duplication, splicing, bad length prefixes, and structure-aware swaps of one field for an
interesting value) and sends the result on the same session's socket, or on a fresh one.

The expected outcome is computed locally with the same codec rules (length prefix 1..max_frame,
one msgpack object, ``[op, req_id, ...]``): the replies owed, in order, and how the connection
ends. So the daemon is held to exactly: one reply per request with a known status and a short
message; a PROTOCOL notice and a close for a malformed frame; a plain close for a truncated one.
After every case the daemon must be alive and the reference guest must read back its pages
byte-exact; at the end the daemon must have logged no internal error and hold no extra fd.

Fixed seed, fixed number of cases, every read bounded: deterministic and quick.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
from conftest import EOF, read_raw_frame

import tmemclient
from tmemclient.wire.codec import HEADER, decode_body, encode_frame
from tmemclient.wire.errors import ProtocolError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Op, Status, split_request

SEED = 0x7E3D
CASES = 300
TIMEOUT = 10.0  # bound on any one reply; nothing here asserts speed
MAX_FRAME = 1 << 20
SYNC = 0xFFFF_FFF0  # req_id of the PING that closes each case on a live connection
REPLY_STATUSES = {Status.OK, Status.INVALID, Status.NO_POOL, Status.PERMISSION, Status.LIMIT}

INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xC6, 0xCF, 0xD3, 0xDB, 0xDD, 0xDF, 0xFF]
INTERESTING_VALUES: list[Any] = [
    0, 1, -1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -(2**63),
    0.5, float("nan"), True, False, None, "", "x" * 40, b"", b"\0" * 23, b"\xff" * 24,
    b"\1" * 25, [], [0] * 5, [[[[0]]]], {}, {"k": 1}, msgpack.ExtType(1, b"\0" * 8),
    list(range(30)),
]  # fmt: skip


# ------------------------------------------------------------------------------------ sessions


class Recorder:
    """Stands in for a Client's socket while it runs its workload; keeps every byte it sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = bytearray()

    def sendall(self, data: Any) -> None:
        self.sent += data
        self.sock.sendall(data)

    def recv_into(self, buf: Any, *args: Any) -> int:
        return self.sock.recv_into(buf, *args)

    def close(self) -> None:
        self.sock.close()


def split_frames(data: bytes) -> list[bytes]:
    """The length-prefixed frames of a byte stream (each with its prefix)."""
    frames, pos = [], 0
    while pos < len(data):
        (n,) = HEADER.unpack_from(data, pos)
        frames.append(bytes(data[pos : pos + 4 + n]))
        pos += 4 + n
    return frames


def workload(client: tmemclient.Client, rng: random.Random) -> None:
    """Every kind of request, with real handles, 64- and 192-bit oids, two page sizes."""
    eph = client.new_pool()
    pers = client.new_pool(persistent=True)
    big = client.new_pool(persistent=True, page_size=4 * FRAME_SIZE)
    pers.put(1, 0, rng.randbytes(FRAME_SIZE))
    pers.put(2**100, 7, rng.randbytes(FRAME_SIZE))
    pers.put_many([(3, i, rng.randbytes(FRAME_SIZE)) for i in range(4)])
    pers.get(1, 0)
    pers.get_many([(3, 0), (3, 1), (3, 9)])
    pers.read(1, 0, 100, 50)
    pers.write(1, 0, 10, b"abc")
    pers.xchg(1, 0, 20, b"xyz")
    pers.flush(3, 3)
    pers.flush_many([(3, 2), (2**100, 7)])
    pers.flush_object(2**100)
    eph.put(5, 5, rng.randbytes(FRAME_SIZE))
    eph.get(5, 5)
    big.put(9, 1, rng.randbytes(4 * FRAME_SIZE))
    big.get(9, 1)
    with client.reserve_frames(1) as run:
        pers.put_frame(4, 0, run.start)
        pers.get_frame(4, 0, run.start)
    client.ping()
    client.new_pool().destroy()


class FuzzGuest:
    """A real tmemclient session: its workload's frames are the seeds, then its socket is
    driven by hand."""

    def __init__(self, path: Path, name: str, rng: random.Random) -> None:
        self.client = tmemclient.connect(path, name=name, frames=32, ring_frames=0)
        recorder = Recorder(self.client._sock)
        setattr(self.client, "_sock", recorder)  # noqa: B010 - a test double, deliberately
        workload(self.client, rng)
        setattr(self.client, "_sock", recorder.sock)  # noqa: B010
        self.seeds = split_frames(bytes(recorder.sent))
        assert {msgpack.unpackb(s[4:])[0] for s in self.seeds} >= {
            Op.NEW_POOL, Op.DESTROY_POOL, Op.PUT, Op.GET, Op.FLUSH, Op.FLUSH_OBJECT, Op.READ,
            Op.WRITE, Op.XCHG, Op.PUT_MANY, Op.GET_MANY, Op.FLUSH_MANY, Op.PING,
        }  # fmt: skip
        self.sock = recorder.sock
        self.buf = bytearray()
        self.open = True

    def read(self) -> Any:
        """The next frame from the daemon, decoded, or EOF once it closed the connection."""
        return read_raw_frame(self.sock, self.buf, TIMEOUT)

    def close(self) -> None:
        self.open = False
        self.client.close()


# ------------------------------------------------------------------------------------ mutations


def _fix(frame: bytes, rng: random.Random) -> bytes:
    """Half the time, make the length prefix match the mutated body, so the mutation reaches
    the msgpack decoder and the handlers instead of always breaking the framing."""
    if len(frame) >= 4 and rng.random() < 0.5:
        return HEADER.pack(len(frame) - 4) + frame[4:]
    return frame


def flip_bits(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def set_byte(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    data[rng.randrange(4, len(data))] = rng.choice(INTERESTING_BYTES)
    return bytes(data)


def insert_bytes(frame: bytes, rng: random.Random) -> bytes:
    i = rng.randint(4, len(frame))
    return _fix(frame[:i] + rng.randbytes(rng.randint(1, 16)) + frame[i:], rng)


def delete_bytes(frame: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(4, len(frame))
    return _fix(frame[:i] + frame[i + rng.randint(1, 16) :], rng)


def truncate(frame: bytes, rng: random.Random) -> bytes:
    return _fix(frame[: rng.randrange(1, len(frame))], rng)


def duplicate(frame: bytes, rng: random.Random) -> bytes:
    return frame * rng.randint(2, 4)


def bad_length(frame: bytes, rng: random.Random) -> bytes:
    n = len(frame) - 4
    length = rng.choice([0, 1, n - 1, n + 1, n + 1000, MAX_FRAME, MAX_FRAME + 1, 2**32 - 1])
    return HEADER.pack(max(0, length)) + frame[4:]


def swap_field(frame: bytes, rng: random.Random) -> bytes:
    """Structure-aware: one field (op and req_id included, or a batch entry) gets an
    interesting value."""
    message = msgpack.unpackb(frame[4:])
    target = message
    lists = [i for i, v in enumerate(message) if type(v) is list and v]
    if lists and rng.random() < 0.3:
        target = message[rng.choice(lists)]
    position = rng.randrange(len(target)) if rng.random() < 0.9 else len(target)
    value = rng.choice(INTERESTING_VALUES)
    if position == len(target):
        target.append(value)
    else:
        target[position] = value
    if rng.random() < 0.1 and len(message) > 2:
        del message[rng.randrange(2, len(message))]
    return encode_frame(message)


def deep_field(frame: bytes, rng: random.Random) -> bytes:
    """Structure-aware: one field becomes arrays nested around the decoder's depth limit
    (written by hand: msgpack's packer stops at 511 levels)."""
    message = msgpack.unpackb(frame[4:])
    if len(message) >= 16:
        return frame
    position = rng.randrange(len(message))
    depth = rng.choice([100, 600, 1000, 1020, 1030, 5000])
    parts = [msgpack.packb(v) for v in message]
    parts[position] = (b"\x91" if rng.random() < 0.5 else b"\x81\xa1k") * depth + b"\x00"
    body = bytes([0x90 | len(message)]) + b"".join(parts)
    return HEADER.pack(len(body)) + body


MUTATORS: list[Callable[[bytes, random.Random], bytes]] = [
    deep_field,
    flip_bits,
    set_byte,
    insert_bytes,
    delete_bytes,
    truncate,
    duplicate,
    bad_length,
    swap_field,
    swap_field,
    swap_field,
]


def mutate(seeds: list[bytes], rng: random.Random) -> tuple[str, bytes]:
    """(description, bytes to send) of one case."""
    if rng.random() < 0.15:  # splice several seeds, one of them mutated
        parts = [rng.choice(seeds) for _ in range(rng.randint(2, 4))]
        k = rng.randrange(len(parts))
        mutator = rng.choice(MUTATORS)
        parts[k] = mutator(parts[k], rng)
        return f"splice({len(parts)}, {mutator.__name__} at {k})", b"".join(parts)
    mutator = rng.choice(MUTATORS)
    return mutator.__name__, mutator(rng.choice(seeds), rng)


# ------------------------------------------------------------------------------------ oracle


def predict(data: bytes) -> tuple[list[int], str]:
    """What the daemon owes for ``data`` sent on a connection at a frame boundary: the req_ids
    of its replies in order, and how the bytes end: "open" (every frame complete and a
    request), "protocol" (a malformed frame: PROTOCOL notice, then close) or "partial" (the
    bytes stop inside a frame)."""
    ids: list[int] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            return ids, "partial"
        (n,) = HEADER.unpack_from(data, pos)
        if n == 0 or n > MAX_FRAME:
            return ids, "protocol"
        if len(data) - pos - 4 < n:
            return ids, "partial"
        body = data[pos + 4 : pos + 4 + n]
        pos += 4 + n
        try:
            _, req_id, _ = split_request(decode_body(body))
        except ProtocolError:
            return ids, "protocol"
        ids.append(req_id)
    return ids, "open"


def expect_reply(guest: FuzzGuest, req_id: int, tally: collections.Counter[str]) -> None:
    message = guest.read()
    assert message is not EOF, f"connection closed; reply to request {req_id} still owed"
    assert type(message) is list and len(message) == 3, f"not a reply: {message!r}"
    got_id, status, result = message
    assert got_id == req_id, f"reply {message!r} out of order: expected req_id {req_id}"
    assert status in REPLY_STATUSES, f"request answered with {message!r}"
    if status != Status.OK:
        assert type(result) is str and 0 < len(result) < 1000, f"unclear error: {message!r}"
    tally[Status(status).name] += 1


def run_case(guest: FuzzGuest, data: bytes, tally: collections.Counter[str]) -> None:
    """Send one case and hold the daemon to the predicted outcome."""
    ids, ending = predict(data)
    tally[ending] += 1
    if ending == "open":
        guest.sock.sendall(data + encode_frame([Op.PING, SYNC]))
        for req_id in ids:
            expect_reply(guest, req_id, tally)
        assert guest.read() == [SYNC, Status.OK, None], "the closing PING was not answered"
        return
    guest.sock.sendall(data)
    if ending == "partial":
        guest.sock.shutdown(socket.SHUT_WR)  # the daemon sees EOF inside the frame
    for req_id in ids:
        expect_reply(guest, req_id, tally)
    if ending == "protocol":
        notice = guest.read()
        assert type(notice) is list and notice[:2] == [0, Status.PROTOCOL], notice
        assert type(notice[2]) is str and notice[2]
    last = guest.read()
    assert last is EOF, f"expected the connection closed, got {last!r}"
    guest.close()


# ------------------------------------------------------------------------------------ the test


class Reference:
    """Connected first, holding persistent pages; must read them back after every case."""

    def __init__(self, path: Path) -> None:
        self.client = tmemclient.connect(path, name="fuzz-ref", frames=64)
        self.pool = self.client.new_pool(persistent=True)
        rng = random.Random(1)
        self.pages = {
            (oid, i): rng.randbytes(FRAME_SIZE) for oid in (1, 2**64 - 1) for i in range(8)
        }
        self.pages[(2**191 + 3, 2**32 - 1)] = rng.randbytes(FRAME_SIZE)
        assert all(self.pool.put_many([(*k, v) for k, v in self.pages.items()]))
        self.keys = list(self.pages)
        self.want = [self.pages[k] for k in self.keys]

    def check(self) -> None:
        assert self.pool.get_many(self.keys) == self.want


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """The fd count once it stopped changing (the fixture's readiness probe may still be
    closing)."""
    last = daemon_fds(pid)
    for _ in range(100):
        time.sleep(0.05)
        now = daemon_fds(pid)
        if now == last:
            break
        last = now
    return last


def test_mutation_fuzz(start_daemon: Any) -> None:
    daemon = start_daemon("--memory", "16MiB", "--max-batch", "64", "--max-pools", "16")
    base_fds = settled_fds(daemon.proc.pid)  # before any guest: listeners, epoll, log
    ref = Reference(daemon.socket)
    ref.check()
    rng = random.Random(SEED)
    tally: collections.Counter[str] = collections.Counter()
    sessions = 0
    guest: FuzzGuest | None = None
    try:
        for case in range(CASES):
            if guest is None or not guest.open or rng.random() < 0.1:
                if guest is not None and guest.open:
                    guest.close()
                sessions += 1
                guest = FuzzGuest(daemon.socket, f"fuzz{sessions}", random.Random(sessions))
            what, data = mutate(guest.seeds, rng)
            try:
                run_case(guest, data, tally)
                assert daemon.alive, "tmemd died"
                ref.check()
            except AssertionError as exc:
                raise AssertionError(
                    f"case {case} ({what}): {exc}\nsent {len(data)} bytes: {data[:200].hex()}"
                    f"\n{daemon.log_text()[-3000:]}"
                ) from exc
    finally:
        if guest is not None and guest.open:
            guest.close()
    ref.check()
    ref.client.close()
    failures = daemon.events("connection_failed")
    assert not failures, f"tmemd logged an internal error: {failures[0]}"
    deadline = time.monotonic() + TIMEOUT
    while daemon_fds(daemon.proc.pid) > base_fds and time.monotonic() < deadline:
        time.sleep(0.02)  # every connection is closed: its socket and region go with it
    assert daemon_fds(daemon.proc.pid) == base_fds, "tmemd kept an fd of a closed connection"
    # The fuzzer is not degenerate: it reached every ending and the main error paths.
    for key in ("open", "protocol", "partial", "OK", "INVALID", "NO_POOL"):
        assert tally[key] >= 5, f"only {tally[key]} cases ended {key}: {tally}"
    assert sessions >= 20, tally
