"""The attacks: what each attacker process does, by name, and what it is told.

An attacker is a child process (bench/hostile/children.py) running one of the functions in
``ATTACKERS`` on raw guests (bench/hostile/raw.py) until its phase tells it to stop; it says
("ready", ...) once the attack is in full swing and ("done", counts) at the end. Every connection
the daemon closes is counted with its reason and made again. bench/README.md's table lists them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import mmap
import os
import random
import select
import socket
import struct
import sys
import termios
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from bench.hostile.raw import ATTACK_FRAMES, Gone, RawGuest
from tmemclient.wire.codec import encode_frame
from tmemclient.wire.layout import CTL_WORDS, FRAME_SIZE, MirrorLayout, loan_size
from tmemclient.wire.messages import Op, encode_reply, make_pool_flags


@dataclass
class Attack:
    """What one attacker process is told, and how it reports."""

    kind: str
    path: str
    proc: int
    conns: int
    stop: Event
    report: Connection
    deadline: float  # time.monotonic(): give up even if never told to stop
    opts: dict[str, Any]
    stats: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    _ready: bool = False
    _generation: int = 0
    _next_look: float = 0.0
    _stopped: bool = False

    def name(self, conn: int = 0) -> str:
        """A guest name no other connection of the run used (each reconnect is a new guest)."""
        self._generation += 1
        return f"atk-{self.kind}-{self.proc}-{conn}-{self._generation}"

    def ready(self, info: Any = None) -> None:
        """Tell the orchestrator the attack is in full swing (once)."""
        if not self._ready:
            self._ready = True
            self.report.send(("ready", {"t_ns": time.monotonic_ns(), "info": info}))

    def running(self) -> bool:
        """False once told to stop or past the deadline (looked at every 10 ms at most)."""
        if self._stopped:
            return False
        now = time.monotonic()
        if now < self._next_look:
            return True
        self._next_look = now + 0.01
        self._stopped = self.stop.is_set() or now > self.deadline
        return not self._stopped

    def connect(self, conn: int = 0, **kwargs: Any) -> RawGuest | None:
        """A new raw guest for connection ``conn``; None (counted, after a short pause) when
        the daemon would not take it."""
        try:
            return RawGuest(self.path, self.name(conn), **kwargs)
        except (Gone, OSError) as exc:
            self.lost(exc)
            time.sleep(0.05)
            return None

    def lost(self, exc: BaseException) -> None:
        """A connection was closed by the daemon: count it (and why) before reconnecting."""
        self.stats["closed_by_tmemd"] += 1
        self.reasons[str(exc)[:160]] += 1

    def result(self) -> dict[str, Any]:
        return {"stats": dict(self.stats), "closed_because": dict(self.reasons)}


def attack_main(
    conn: Connection,
    kind: str,
    path: str,
    proc: int,
    conns: int,
    stop: Event,
    deadline: float,
    opts: dict[str, Any],
) -> None:
    """One attacker process: runs the attack until told to stop, then reports its counts."""
    attack = Attack(kind, path, proc, conns, stop, conn, deadline, opts)
    started = time.monotonic()
    ATTACKERS[kind](attack)
    result = attack.result()
    result["seconds"] = time.monotonic() - started
    conn.send(("done", result))


def ring_flood(a: Attack) -> None:
    """Keep the request ring full of PINGs and the reply ring drained; ring the doorbell when
    the daemon sleeps; never sleep."""
    ping = encode_frame([Op.PING, 1])
    reply_len = len(encode_reply(1, 0, None))
    doorbell = encode_frame([Op.DOORBELL, 1])
    while a.running():
        g = a.connect(ring=a.opts["ring_frames"])
        if g is None:
            continue
        try:
            rings = g.rings
            if rings is None:
                raise RuntimeError("tmemd granted no rings (not x86-64, or max_ring_frames 0)")
            full = ping * (rings.size // len(ping))
            spins = 0
            while True:
                spins += 1
                if rings.pending():
                    a.stats["replies"] += len(rings.take()) // reply_len
                n = rings.free() // len(ping)
                if n:
                    rings.write(full[: n * len(ping)])
                    a.stats["pings"] += n
                    if rings.peer_sleeping():
                        g.send_some(doorbell)
                        a.stats["doorbells"] += 1
                if spins % 64 == 0:
                    g.recv_some()  # doorbell notices, replies spilled to the socket
                    for message in g.decoder.messages():
                        a.stats["socket_notices" if message[0] == 0 else "socket_replies"] += 1
                    a.ready()
                    if not a.running():
                        break
            a.stats["spins"] += spins
        except Gone as exc:
            a.lost(exc)
        finally:
            g.close()


def queued(sock: socket.socket) -> tuple[int, int]:
    """Bytes we sent that the daemon has not read yet, and bytes it sent we have not read."""
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # SIOCOUTQ
    out = int.from_bytes(buf, sys.byteorder)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)  # SIOCINQ
    return out, int.from_bytes(buf, sys.byteorder)


def unread_replies(a: Attack) -> None:
    """``conns`` connections each pipelining PINGs and unknown ops (whose INVALID replies are
    ~20 times the size of the request) without ever reading a reply; a connection the daemon
    drops is made again. In full swing (steady) once the daemon reads no more from any of
    them: nothing moved in either direction of any connection for half a second."""
    blob = (encode_frame([Op.PING, 7]) + encode_frame([99, 7])) * 1024
    guests: dict[int, RawGuest] = {}
    queues: dict[int, tuple[int, int]] = {}
    moved: dict[int, float] = {}  # when bytes last moved on each connection
    poller = select.poll()
    by_fd: dict[int, int] = {}

    def open_one(slot: int) -> None:
        g = RawGuest(a.path, a.name(slot))
        guests[slot] = g
        by_fd[g.sock.fileno()] = slot
        poller.register(g.sock, select.POLLOUT)
        a.stats["connections_made"] += 1
        moved[slot] = time.monotonic()

    all_open: float | None = None
    try:
        while a.running():
            for slot in range(a.conns):
                if slot not in guests:
                    try:
                        open_one(slot)
                    except (Gone, OSError) as exc:
                        a.lost(exc)
            for fd, events in poller.poll(50):
                slot = by_fd[fd]
                g = guests[slot]
                try:
                    if events & (select.POLLERR | select.POLLHUP):
                        raise Gone("hung up")
                    a.stats["bytes_sent"] += g.send_some(blob)
                except Gone as exc:
                    a.lost(exc)
                    poller.unregister(g.sock)
                    g.close()
                    del guests[slot]
            now = time.monotonic()
            for slot, g in guests.items():
                q = queued(g.sock)
                if q != queues.get(slot):
                    queues[slot] = q
                    moved[slot] = now
            if len(guests) == a.conns and all_open is None:
                all_open = now
            if all_open is not None:
                still = sum(now - moved[slot] > 0.5 for slot in guests)
                if still == a.conns or now > all_open + 60:
                    a.ready({"connections": len(guests), "still": still, "after_s": now - all_open})
    finally:
        a.stats["bytes_queued_unread_by_tmemd"] = sum(q[0] for q in queues.values())
        a.stats["reply_bytes_left_unread"] = sum(q[1] for q in queues.values())
        for g in guests.values():
            g.close()
    a.stats["requests_sent"] = a.stats["bytes_sent"] // (len(blob) // 2048)


def heavy_put_many(a: Attack) -> None:
    """PUT_MANY of max_batch 64 KiB pages into an ephemeral order-4 pool, ``depth`` of them in
    flight at once, fresh keys every batch (so the budget fills and later batches evict)."""
    depth = a.opts["depth"]
    batch_no = 0
    while a.running():
        g = a.connect()
        if g is None:
            continue
        try:
            g.region[: 16 * FRAME_SIZE] = random.Random(a.proc).randbytes(16 * FRAME_SIZE)
            handle, _ = g.call(
                Op.NEW_POOL, make_pool_flags(persistent=False, shared=False, order=4), None
            )
            batch = min(a.opts["batch"], g.limits.max_batch)
            out = memoryview(b"")
            in_flight = 0
            poller = select.poll()
            while a.running():
                if not out and in_flight < depth:
                    batch_no += 1
                    oid = a.proc << 32 | batch_no
                    entries: list[int] = []
                    for i in range(batch):
                        entries += (oid, i, 0)
                    out = memoryview(encode_frame([Op.PUT_MANY, 1, handle, entries]))
                    in_flight += 1
                    a.stats["batches_sent"] += 1
                    a.stats["pages_sent"] += batch
                if out:
                    out = out[g.send_some(out) :]
                g.recv_some()
                for message in g.decoder.messages():
                    in_flight -= 1
                    a.stats["batches_answered"] += 1
                    if message[1] == 0:
                        a.stats["pages_stored"] += sum(1 for r in message[2] if r)
                    else:
                        a.stats["errors"] += 1
                        a.reasons[f"error reply: {message[2]}"[:160]] += 1
                    a.ready()
                poller.register(g.sock, select.POLLIN | (select.POLLOUT if out else 0))
                poller.poll(20)
        except Gone as exc:
            a.lost(exc)
        finally:
            g.close()


def mirror_abuse(a: Attack) -> None:
    """A mapped, lending guest that re-opens its read-only mirror read-write through
    /proc/self/fd and keeps rewriting its control words (seq, lent, low), generation and link
    words and holes of its page slots, writes its loan file far above what it was lent (and
    its ACTIVE word to 2**64-1), and meanwhile puts pages and borrows and returns memory so
    the daemon's put, lend and recall paths run over what it wrote."""
    nasty = (2**64 - 1, 1, 3, 2**63 + 1, 0, 2**32 + 7)
    loan_limit: int = a.opts["loan_bytes"]
    chunk = random.Random(a.proc).randbytes(256 << 10)
    it = 0
    while a.running():
        g = a.connect(map_pages=True, lend=True)
        if g is None:
            continue
        maps: list[mmap.mmap] = []
        try:
            slots, lend_slots = g.limits.map, g.limits.lend
            if not slots or not lend_slots or len(g.fds) != 2:
                raise RuntimeError(f"tmemd granted no mirror and loan: {g.limits}")
            mirror_fd, loan_fd = g.fds
            where = MirrorLayout(slots)
            gen_off, link_off, ctl_off = where.gen_offset, where.link_offset, where.ctl_offset
            mirror: mmap.mmap | None = None
            try:
                rw = os.open(f"/proc/self/fd/{mirror_fd}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    mirror = mmap.mmap(rw, where.size, flags=mmap.MAP_SHARED)
                    maps.append(mirror)
                    a.stats["mirror_reopened_rw"] += 1
                finally:
                    os.close(rw)
            except OSError as exc:
                a.stats["mirror_reopen_refused"] += 1
                a.reasons[f"re-open of the mirror refused: {exc.strerror}"] += 1
            loan_bytes = loan_size(lend_slots)
            loan = mmap.mmap(loan_fd, loan_bytes, flags=mmap.MAP_SHARED)
            maps.append(loan)
            loan_span = min(loan_bytes - FRAME_SIZE, loan_limit)
            handle, _ = g.call(
                Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None
            )
            g.region[: ATTACK_FRAMES * FRAME_SIZE] = chunk[: ATTACK_FRAMES * FRAME_SIZE]
            in_flight = 0
            index = 0
            while a.running():
                it += 1
                if mirror is not None:
                    words = (nasty[(it + k) % 6] for k in range(CTL_WORDS))
                    struct.pack_into(f"<{CTL_WORDS}Q", mirror, ctl_off, *words)
                    s = random.randrange(slots)
                    struct.pack_into("<Q", mirror, gen_off + 8 * s, nasty[it % 6])
                    struct.pack_into("<I", mirror, link_off + 4 * s, 0xFFFFFFFF)
                    hole = (it * 65536) % max(65536, min(gen_off, loan_limit) - 65536)
                    mirror[hole : hole + 65536] = chunk[:65536]  # touch holes of its slots
                    a.stats["mirror_bytes_written"] += 65536 + 40
                struct.pack_into("<Q", loan, 0, 2**64 - 1)  # ACTIVE: "busy forever"
                at = FRAME_SIZE + (it * len(chunk)) % max(1, loan_span - len(chunk))
                loan[at : at + len(chunk)] = chunk
                a.stats["loan_bytes_written"] += len(chunk)
                if in_flight < 2:
                    step = it % 3
                    if step == 0:
                        entries: list[int] = []
                        for f in range(ATTACK_FRAMES):
                            index += 1
                            entries += (1, index % 4096, f)
                        req = [Op.PUT_MANY, 1, handle, entries]
                    elif step == 1:
                        req = [Op.LEND, 1, 64 << 20]
                    else:
                        req = [Op.LEND, 1, 0]  # give it all back: a recall
                    data = encode_frame(req)
                    sent = 0
                    for _ in range(100):
                        sent += g.send_some(data[sent:])
                        if sent == len(data):
                            break
                        select.select([], [g.sock], [], 0.01)
                    else:
                        raise Gone("tmemd took no request for a second")
                    in_flight += 1
                    a.stats["requests"] += 1
                g.recv_some()
                for message in g.decoder.messages():
                    in_flight -= 1
                    a.stats["replies"] += 1
                    if message[1] != 0:
                        a.stats["errors"] += 1
                        a.reasons[f"error reply: {message[2]}"[:160]] += 1
                if it % 16 == 0:
                    a.ready({"mirror_rw": mirror is not None})
        except Gone as exc:
            a.lost(exc)
        finally:
            for m in maps:
                with contextlib.suppress(BufferError):
                    m.close()
            g.close()


@dataclass
class _Flow:
    """One flooding connection: what it sent and got, and the rest of a chunk to send."""

    g: RawGuest
    sent: int = 0
    got: int = 0
    out: memoryview = field(default_factory=lambda: memoryview(b""))


def socket_flood(a: Attack) -> None:
    """Pipelined PINGs on the socket, ``depth`` in flight on each of ``conns`` connections,
    every reply read: a legal, greedy guest (or ``conns`` of them)."""
    ping = encode_frame([Op.PING, 1])
    reply_len = len(encode_reply(1, 0, None))
    depth = a.opts["depth"]
    chunk = ping * 256
    flows: dict[int, _Flow] = {}  # by socket fd
    poller = select.poll()

    def count(flow: _Flow) -> None:
        a.stats["requests"] += flow.sent // len(ping)
        a.stats["replies"] += flow.got // reply_len

    try:
        while a.running():
            while len(flows) < a.conns and a.running():
                g = a.connect(len(flows))
                if g is None:
                    continue
                flows[g.sock.fileno()] = _Flow(g)
                poller.register(g.sock, select.POLLIN | select.POLLOUT)
            for fd, flow in list(flows.items()):
                try:
                    if (
                        not flow.out
                        and flow.sent // len(ping) - flow.got // reply_len + 256 <= depth
                    ):
                        flow.out = memoryview(chunk)
                    if flow.out:
                        n = flow.g.send_some(flow.out)
                        flow.out = flow.out[n:]
                        flow.sent += n
                    got = flow.g.recv_some(decode=False)  # replies of a fixed size: counted
                    flow.got += got
                    if got and len(flows) == a.conns:
                        a.ready()
                    poller.modify(fd, select.POLLIN | (select.POLLOUT if flow.out else 0))
                except Gone as exc:
                    a.lost(exc)
                    count(flow)
                    poller.unregister(fd)
                    flow.g.close()
                    del flows[fd]
            poller.poll(20)
    finally:
        for flow in flows.values():
            count(flow)
            flow.g.close()


ATTACKERS: dict[str, Callable[[Attack], None]] = {
    "ring": ring_flood,
    "unread": unread_replies,
    "unread-onset": unread_replies,
    "heavy": heavy_put_many,
    "mirror": mirror_abuse,
    "flood": socket_flood,
}


# ---------------------------------------------------------------------- one phase
ATTACKS = tuple(ATTACKERS)  # the phases after the baseline, in the order they run
ONSET = ("unread-onset",)  # measured from the attack's first moment, not its steady state
LABELS = {
    "baseline": "baseline (no attacker)",
    "ring": "1 ring flood",
    "unread": "2 unread replies",
    "unread-onset": "2b unread, onset",
    "heavy": "3 heavy PUT_MANY",
    "mirror": "4 mirror/loan abuse",
    "flood": "5 socket flood",
}


def attack_plan(kind: str, args: argparse.Namespace) -> tuple[int, int, dict[str, Any]]:
    """(processes, connections per process, options) of an attack."""
    if kind in ("unread", "unread-onset"):
        return 1, args.unread_conns, {}
    opts: dict[str, Any] = {
        "ring": {"ring_frames": 16},
        "heavy": {"depth": 2, "batch": 4096},
        "mirror": {"loan_bytes": args.loan_write},
        "flood": {"depth": 1024},
    }[kind]
    return args.procs, args.flood_conns if kind == "flood" else 1, opts
