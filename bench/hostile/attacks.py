"""A well-behaved guest and the admin socket while hostile guests attack tmemd (issue #14).

    python -m bench.hostile [--quick] [--seconds S] [--attacks ring,unread,...] [--json FILE]

Each phase starts a fresh tmemd (bench/servers.py) with an admin socket, connects one honest guest
(tmemclient, 4 KiB pages in a persistent pool, every key put beforehand) and one admin prober,
fills the budget once and frees it (so later memory growth is not the metadata of stored pages),
then starts the phase's attackers as separate processes, waits until the attack is in full swing
and measures, at the same moment: the honest guest's single gets in a closed loop, ``status`` on
the admin socket in a paced loop, the daemon's memory (VmRSS, RssAnon), its CPU time and how long
it and the honest guest waited for a CPU. The first phase has no attacker (the baseline); every
later one runs one attack:

  ring          request rings (HELLO ring=16) kept full of PINGs, never sleeping (PROTOCOL.md §4.6)
  unread        64 connections pipelining cheap requests and never reading a reply, measured once
                the daemon has stopped reading all of them (its steady state)
  unread-onset  the same, measured from the moment the connections open until that steady state
                (while the daemon serves what they queued before it stopped reading)
  heavy         pipelined PUT_MANY of max_batch 64 KiB pages (an order-4 pool), fresh keys each
  mirror        a mapped and lending guest rewriting its mirror through a read-write re-open of
                /proc/self/fd/N and writing its loan file far beyond what it was lent
  flood         a greedy but legal guest: pipelined PINGs on the socket, every reply read

It prints one table (values and ratios to the baseline), checks issue #14's targets and writes
everything as JSON (default bench/results/hostile.json). Progress goes to stderr. Every process
and daemon it started is stopped on the way out, also on Ctrl-C, SIGTERM and errors; children
also die with it if it is killed outright. bench/README.md explains the measurements.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import fcntl
import json
import mmap
import multiprocessing
import os
import platform
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import termios
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from types import FrameType
from typing import Any

import tmemclient
from bench import servers
from tmemclient.client import hello_message
from tmemclient.region import create_region
from tmemclient.wire import layout
from tmemclient.wire import ring as rings_mod
from tmemclient.wire.codec import NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.errors import TmemError
from tmemclient.wire.fds import close_all, fds_from_ancillary
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Op, encode_reply, make_pool_flags
from tmemclient.wire.ring import Rings
from tmemclient.wire.units import format_size, parse_size
from tmemd.ctl.client import AdminClient

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "hostile.json"

# Targets of issue #14, under every attack.
GET_P99_TARGET_MS = 5.0
GET_MAX_TARGET_MS = 50.0
ADMIN_TARGET_MS = 100.0
MEM_TARGET = 1 << 20  # daemon bytes per attacking connection (RssAnon growth)

ATTACKS = ("ring", "unread", "unread-onset", "heavy", "mirror", "flood")
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
HONEST_FRAMES = 64
# A tenant is its uid (turns, caps): run as root, the honest guest and the attackers are
# different tenants, as they would be on a real host. The mirror attacker stays root, tmemd's
# own uid: only there can it re-open its 0400 mirror read-write (docs/security.md).
HONEST_UID = 40001
ATTACKER_UID = 40000
ATTACK_FRAMES = 16  # one 64 KiB page: every page an attacker puts names frame 0
HARD_LIMIT = 120.0  # seconds past its phase's end after which any child gives up on its own
REPLY_WAIT = 30.0  # seconds the orchestrator waits past a window for a child's answer (a hang)
_PR_SET_PDEATHSIG = 1

_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line on stderr, with the time since the start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- /proc


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and RssShmem of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_wait(pid: int) -> int:
    """Nanoseconds a process's main thread has spent runnable but waiting for a CPU."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def proc_fds(pid: int) -> int:
    """Descriptors a process holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[int(rank) - 1])


def kept(measured: dict[str, Any], before_ns: int) -> list[int]:
    """The latencies (ns) of the calls a child timed that started before ``before_ns``."""
    lat, starts = array.array("q"), array.array("q")
    lat.frombytes(measured["lat"])
    starts.frombytes(measured["t"])
    return [d for d, t in zip(lat, starts, strict=True) if t < before_ns]


def summary_ns(samples: list[int]) -> dict[str, Any]:
    """p50, p99 and max (milliseconds) of latencies in nanoseconds, and the count."""
    samples.sort()
    return {
        "count": len(samples),
        "p50_ms": percentile(samples, 50) / 1e6,
        "p99_ms": percentile(samples, 99) / 1e6,
        "max_ms": samples[-1] / 1e6 if samples else float("nan"),
        "slowest_ms": [s / 1e6 for s in samples[-10:]],
    }


# ---------------------------------------------------------------------- child processes


def _child_entry(
    target: Callable[..., None], uid: int | None, conn: Connection, *args: Any
) -> None:
    """Start of every forked child: die with the orchestrator, leave Ctrl-C to it, and (run
    as root) become tenant ``uid``."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        target(conn, *args)
    except Exception:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """A forked process that talks to the orchestrator over a pipe."""

    def __init__(
        self,
        ctx: multiprocessing.context.ForkContext,
        name: str,
        target: Callable[..., None],
        *args: Any,
        uid: int | None = None,
    ) -> None:
        parent, child = ctx.Pipe()
        self.name = name
        self.conn = parent
        self.proc = ctx.Process(
            target=_child_entry, args=(target, uid, child, *args), name=name, daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float) -> tuple[str, Any]:
        """The child's next message ("kind", value); TimeoutError if none in ``timeout``."""
        if not self.conn.poll(max(0.0, timeout)):
            raise TimeoutError(f"{self.name} sent nothing within {timeout:.0f}s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"{self.name} exited without answering (exit code {self.proc.exitcode})"
            ) from None
        return kind, value

    def expect(self, want: str, timeout: float) -> Any:
        """The child's next message, which must be ``want``."""
        kind, value = self.recv(timeout)
        if kind != want:
            raise RuntimeError(f"{self.name}: expected {want!r}, got {kind!r}:\n{value}")
        return value

    def stop(self, grace: float = 5.0) -> None:
        """Wait for it to end, then SIGTERM, then SIGKILL; always reaps."""
        self.proc.join(timeout=grace)
        if self.proc.is_alive():
            say(f"{self.name} did not end within {grace:.0f}s: SIGTERM")
            self.proc.terminate()
            self.proc.join(timeout=grace)
        if self.proc.is_alive():
            say(f"{self.name} did not end on SIGTERM: SIGKILL")
            self.proc.kill()
            self.proc.join(timeout=grace)
        self.conn.close()


# ---------------------------------------------------------------------- the honest guest


def honest_page(i: int) -> bytes:
    """Page ``i`` of the honest guest: incompressible and different for every index."""
    return random.Random(i).randbytes(FRAME_SIZE)


def honest_main(conn: Connection, sock: str, keyspace: int, ring_frames: int | None) -> None:
    """Connect, put every page of the key space into a persistent pool, then obey commands:
    ("measure", warm_ns, start_ns, stop_ns): single gets in a closed loop, the latencies of
    those started in [start_ns, stop_ns); ("check",): every page read back and compared;
    ("close",)."""
    pages = [honest_page(i) for i in range(keyspace)]
    client = tmemclient.connect(sock, name="honest", frames=HONEST_FRAMES, ring_frames=ring_frames)
    try:
        pool = client.new_pool(persistent=True)
        for start in range(0, keyspace, 64):
            items = [(1, i, pages[i]) for i in range(start, min(keyspace, start + 64))]
            if not all(pool.put_many(items)):
                raise RuntimeError("the honest guest's persistent put was refused")
        conn.send(("ready", {"rings": client.rings}))
        i = 0
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd[0] == "close":
                return
            if cmd[0] == "check":
                bad = 0
                try:
                    for start in range(0, keyspace, 64):
                        keys = [(1, k) for k in range(start, min(keyspace, start + 64))]
                        got = pool.get_many(keys)
                        bad += sum(g != pages[k] for (_, k), g in zip(keys, got, strict=True))
                    conn.send(("checked", {"bad": bad, "error": None}))
                except (TmemError, OSError) as exc:
                    conn.send(("checked", {"bad": bad, "error": f"{type(exc).__name__}: {exc}"}))
                continue
            _, warm_ns, start_ns, stop_ns = cmd
            lat = array.array("q")
            starts = array.array("q")
            bad = 0
            error = None
            clock = time.monotonic_ns
            while clock() < warm_ns:
                time.sleep(0.001)
            while True:
                t0 = clock()
                try:
                    data = pool.get(1, i)
                except (TmemError, OSError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    break
                t1 = clock()
                if data != pages[i]:
                    bad += 1
                if t0 >= start_ns:
                    lat.append(t1 - t0)
                    starts.append(t0)
                i = (i + 1) % keyspace
                if t1 >= stop_ns:
                    break
            conn.send(
                (
                    "measured",
                    {"lat": lat.tobytes(), "t": starts.tobytes(), "bad": bad, "error": error},
                )
            )
    finally:
        with contextlib.suppress(Exception):
            client.close()


def admin_main(conn: Connection, admin_sock: str, persistent: bool, interval: float) -> None:
    """The admin prober: ("measure", start_ns, stop_ns) times ``status`` calls every
    ``interval`` seconds (a fresh connection each, as tmemctl makes, unless ``persistent``)."""
    ctl: AdminClient | None = AdminClient(admin_sock) if persistent else None
    conn.send(("ready", None))
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd[0] == "close":
                return
            _, start_ns, stop_ns = cmd
            lat = array.array("q")
            starts = array.array("q")
            errors: Counter[str] = Counter()
            clock = time.monotonic_ns
            next_ns = start_ns
            while True:
                now = clock()
                if now >= stop_ns:
                    break
                if now < next_ns:
                    time.sleep((next_ns - now) / 1e9)
                t0 = clock()
                try:
                    if persistent:
                        if ctl is None:
                            ctl = AdminClient(admin_sock)
                        ctl.call("status")
                    else:
                        with AdminClient(admin_sock) as fresh:
                            fresh.call("status")
                except (TmemError, OSError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    if ctl is not None:
                        ctl.close()
                        ctl = None
                t1 = clock()
                lat.append(t1 - t0)
                starts.append(t0)
                next_ns = max(next_ns + int(interval * 1e9), t1)
            conn.send(
                ("measured", {"lat": lat.tobytes(), "t": starts.tobytes(), "errors": dict(errors)})
            )
    finally:
        if ctl is not None:
            ctl.close()


# ---------------------------------------------------------------------- raw guests


class Gone(Exception):
    """The daemon closed an attacker's connection."""


class RawGuest:
    """A guest spoken by hand (PROTOCOL.md, as tests/test_bad_input.py's Raw): the handshake,
    then a non-blocking socket; keeps the fds that came with the HELLO reply (mirror, loan)."""

    def __init__(
        self,
        path: str,
        name: str,
        frames: int = ATTACK_FRAMES,
        *,
        ring: int = 0,
        map_pages: bool = False,
        lend: bool = False,
    ) -> None:
        fd, self.region = create_region(frames, layout.ring_bytes(ring))
        self.frames = frames
        self.fds: list[int] = []
        self.rings: Rings | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(10)
            try:
                self.sock.connect(path)
                hello = hello_message(name, frames, ring, map_pages, lend)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                self.sock.sendmsg([hello], rights)
            finally:
                os.close(fd)
            self.decoder = FrameDecoder(64 << 20)
            buf = bytearray(1 << 16)
            deadline = time.monotonic() + 10
            while (message := self.decoder.next_message()) is NEED_DATA:
                if time.monotonic() > deadline:
                    raise Gone("no HELLO reply within 10 s")
                n, anc, flags, _ = self.sock.recvmsg_into(
                    [buf], socket.CMSG_SPACE(8), socket.MSG_CMSG_CLOEXEC
                )
                self.fds += fds_from_ancillary(anc, flags, "too many fds with the HELLO reply")
                if not n:
                    raise Gone("closed during the handshake")
                self.decoder.feed(memoryview(buf)[:n])
            if message[1] != 0:
                raise Gone(f"HELLO refused: {message}")
            self.limits: dict[str, Any] = message[2]
            granted = self.limits.get("ring", 0)
            if granted:
                area = memoryview(self.region)[frames * FRAME_SIZE :]
                self.rings = Rings(area, granted, "guest")
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    def send_some(self, data: bytes | memoryview) -> int:
        """Bytes of ``data`` the socket took now (0 when full); Gone when the daemon left."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Gone(str(exc)) from None

    def recv_some(self, *, decode: bool = True) -> int:
        """Read what has arrived (into the decoder, unless only counted); bytes read. Gone at
        EOF."""
        got = 0
        for _ in range(64):
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                return got
            except ConnectionResetError as exc:
                raise Gone(str(exc)) from None
            if not data:
                raise Gone(self.last_words())
            if decode:
                self.decoder.feed(data)
            got += len(data)
        return got

    def last_words(self) -> str:
        """The daemon's last notice, if it sent one before closing."""
        text = "closed by tmemd"
        with contextlib.suppress(Exception):
            for message in self.decoder.messages():
                if type(message) is list and len(message) == 3 and message[0] == 0:
                    text = f"closed by tmemd: {message[2]}"
        return text

    def call(self, op: int, *args: Any, timeout: float = 10.0) -> Any:
        """One request, waiting for its reply (only while nothing else is in flight)."""
        data = encode_frame([op, 1, *args])
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            view = view[self.send_some(view) :]
            if view:
                select.select([], [self.sock], [], 0.05)
            if time.monotonic() > deadline:
                raise TimeoutError("tmemd did not take a request")
        while (message := self.decoder.next_message()) is NEED_DATA:
            select.select([self.sock], [], [], 0.05)
            self.recv_some()
            if time.monotonic() > deadline:
                raise TimeoutError("tmemd did not answer")
        if message[1] != 0:
            raise RuntimeError(f"request {op} refused: {message}")
        return message[2]

    def close(self) -> None:
        self.sock.close()
        close_all(self.fds)
        self.fds = []
        if self.rings is not None:
            self.rings.release()
            self.rings = None
        with contextlib.suppress(BufferError):
            self.region.close()


# ---------------------------------------------------------------------- attackers


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
        try:
            g = RawGuest(a.path, a.name(), ring=a.opts["ring_frames"])
        except (Gone, OSError) as exc:
            a.lost(exc)
            time.sleep(0.05)
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
        try:
            g = RawGuest(a.path, a.name())
        except (Gone, OSError) as exc:
            a.lost(exc)
            time.sleep(0.05)
            continue
        try:
            g.region[: 16 * FRAME_SIZE] = random.Random(a.proc).randbytes(16 * FRAME_SIZE)
            handle, _ = g.call(
                Op.NEW_POOL, make_pool_flags(persistent=False, shared=False, order=4), None
            )
            batch = min(a.opts["batch"], g.limits["max_batch"])
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
        try:
            g = RawGuest(a.path, a.name(), map_pages=True, lend=True)
        except (Gone, OSError) as exc:
            a.lost(exc)
            time.sleep(0.05)
            continue
        maps: list[mmap.mmap] = []
        try:
            slots, lend_slots = g.limits.get("map", 0), g.limits.get("lend", 0)
            if not slots or not lend_slots or len(g.fds) != 2:
                raise RuntimeError(f"tmemd granted no mirror and loan: {g.limits}")
            mirror_fd, loan_fd = g.fds
            gen_off = slots * FRAME_SIZE
            link_off = gen_off + 8 * slots
            ctl_off = -(-(link_off + 4 * slots) // FRAME_SIZE) * FRAME_SIZE
            size = ctl_off + FRAME_SIZE
            mirror: mmap.mmap | None = None
            try:
                rw = os.open(f"/proc/self/fd/{mirror_fd}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    mirror = mmap.mmap(rw, size, flags=mmap.MAP_SHARED)
                    maps.append(mirror)
                    a.stats["mirror_reopened_rw"] += 1
                finally:
                    os.close(rw)
            except OSError as exc:
                a.stats["mirror_reopen_refused"] += 1
                a.reasons[f"re-open of the mirror refused: {exc.strerror}"] += 1
            loan_size = (lend_slots + 1) * FRAME_SIZE
            loan = mmap.mmap(loan_fd, loan_size, flags=mmap.MAP_SHARED)
            maps.append(loan)
            loan_span = min(loan_size - FRAME_SIZE, loan_limit)
            handle, _ = g.call(
                Op.NEW_POOL, make_pool_flags(persistent=True, shared=False, order=0), None
            )
            g.region[: ATTACK_FRAMES * FRAME_SIZE] = chunk[: ATTACK_FRAMES * FRAME_SIZE]
            in_flight = 0
            index = 0
            while a.running():
                it += 1
                if mirror is not None:
                    struct.pack_into(
                        "<QQQ", mirror, ctl_off, *(nasty[(it + k) % 6] for k in range(3))
                    )
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
                try:
                    g = RawGuest(a.path, a.name(len(flows)))
                except (Gone, OSError) as exc:
                    a.lost(exc)
                    time.sleep(0.05)
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


def read_log(path: Path) -> dict[str, Any]:
    """What the daemon logged: events by name, errors, and why attackers' connections ended."""
    events: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    other: list[str] = []
    probe = True  # the launcher's readiness probe connects and closes before HELLO, once
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                other.append(line[:300])
            continue
        event = str(record.get("event"))
        if probe and event == "handshake_refused" and "before HELLO" in str(record.get("reason")):
            probe = False
            continue
        events[event] += 1
        if record.get("level") in ("error", "critical") or "exception" in record:
            errors.append(record)
        if event == "guest_disconnected" and str(record.get("guest", "")).find("atk-") >= 0:
            reasons[str(record.get("reason"))[:120]] += 1
    return {
        "events": dict(events),
        "errors": errors[:20],
        "error_count": len(errors),
        "attacker_disconnect_reasons": dict(reasons),
        "non_json_lines": other[-20:],
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


def start_daemon(tmp: Path, phase: str, args: argparse.Namespace) -> servers.Server:
    sock, admin = tmp / f"{phase}.sock", tmp / f"{phase}.admin"
    argv = servers.tmemd_argv(sock, args.memory, admin)
    argv += ["--log-level", "info"]  # later options win: guest_disconnected gives the reasons
    argv += ["--socket-mode", "666"]  # guests run under their own uids (HONEST_UID, ...)
    return servers.start("tmemd", argv, sock, tmp / f"{phase}.log")


def wait_recovered(
    daemon: servers.Server, admin: Path, fds_before: int, timeout: float
) -> dict[str, Any]:
    """After the attackers left: seconds until the daemon has one session (the honest guest)
    and its fd count before the attack, within ``timeout``. The fd count is read before each
    admin connection is made (that connection costs the daemon an fd while it lasts)."""
    t0 = time.monotonic()
    status: dict[str, Any] = {}
    fds = -1
    sessions_at = fds_at = None
    while True:
        with contextlib.suppress(OSError):
            fds = proc_fds(daemon.pid)
        with contextlib.suppress(TmemError, OSError), AdminClient(admin, timeout=5) as ctl:
            status = ctl.call("status")
        elapsed = time.monotonic() - t0
        if sessions_at is None and status.get("sessions") == 1:
            sessions_at = elapsed
        if fds_at is None and fds == fds_before:
            fds_at = elapsed
        done = status.get("sessions") == 1 and fds == fds_before
        if done or elapsed > timeout or daemon.proc.poll() is not None:
            return {
                "recovered": done,
                "seconds": elapsed,
                "sessions_back_s": sessions_at,
                "fds_back_s": fds_at,
                "fds": fds,
                "status": status,
            }
        time.sleep(0.05)


def hold_budget(daemon: servers.Server, budget: int) -> tmemclient.Client:
    """A guest that fills the budget with ephemeral 64 KiB pages and stays connected: an attack
    that stores pages then evicts these one for one, so what tmemd holds per stored page (about
    200 bytes of a 64 KiB page's metadata) stays flat, and the memory measured is what the
    attacking connections cost. Close it to let go."""
    page = random.Random(6).randbytes(64 << 10)
    client = tmemclient.connect(daemon.sock, name="holder", frames=256, ring_frames=0)
    pool = client.new_pool(page_size=len(page))
    for start in range(0, budget // len(page), 64):
        pool.put_many([(2, i, page) for i in range(start, start + 64)])
    return client


def warm_store(daemon: servers.Server, admin: Path, budget: int) -> dict[str, Any]:
    """Fill the budget once with 64 KiB pages from a guest that then leaves, and wait until
    the daemon has freed them: its per-slot metadata arrays are then grown to the whole budget
    before the figure taken before an attack, so the growth measured during the attack is what
    the attack costs, not the metadata of pages any guest may store within the budget."""
    page = random.Random(5).randbytes(64 << 10)
    pages = budget // len(page)
    with AdminClient(admin) as ctl:
        used_before = ctl.call("status")["used"]
    t0 = time.monotonic()
    stored = 0
    with tmemclient.connect(daemon.sock, name="warm-up", frames=256, ring_frames=0) as client:
        pool = client.new_pool(page_size=len(page))
        for start in range(0, pages, 64):
            items = [(1, i, page) for i in range(start, min(pages, start + 64))]
            stored += sum(pool.put_many(items))
    filled = time.monotonic() - t0
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with AdminClient(admin) as ctl:
            status = ctl.call("status")
        if status["used"] <= used_before and status["sessions"] == 1:
            break
        time.sleep(0.05)
    return {
        "pages_stored": stored,
        "fill_s": filled,
        "freed": status.get("used", -1) <= used_before,
        "total_s": time.monotonic() - t0,
    }


def run_phase(
    phase: str, tmp: Path, args: argparse.Namespace, ctx: multiprocessing.context.ForkContext
) -> dict[str, Any]:
    """One phase on a fresh daemon; everything it measured."""
    out: dict[str, Any] = {"phase": phase, "label": LABELS[phase], "problems": []}
    problems: list[str] = out["problems"]
    out["loadavg_at_start"] = os.getloadavg()
    daemon = start_daemon(tmp, phase, args)
    admin_sock = tmp / f"{phase}.admin"
    children: list[Child] = []
    attackers: list[Child] = []
    stop = ctx.Event()
    holder: tmemclient.Client | None = None
    try:
        honest = Child(
            ctx,
            "honest guest",
            honest_main,
            str(daemon.sock),
            args.keyspace,
            args.guest_ring_frames,
            uid=HONEST_UID,
        )
        children.append(honest)
        prober = Child(
            ctx,
            "admin prober",
            admin_main,
            str(admin_sock),
            args.admin_persistent,
            args.admin_interval,
        )
        children.append(prober)
        out["honest_rings"] = honest.expect("ready", 60)["rings"]
        prober.expect("ready", 30)
        if args.warm:
            out["warm_up"] = warm_store(daemon, admin_sock, args.memory)
            if not out["warm_up"]["freed"]:
                problems.append(f"the warm-up's pages were not freed: {out['warm_up']}")
        if phase == "heavy":
            holder = hold_budget(daemon, args.memory)
        time.sleep(0.3)
        fds_before = proc_fds(daemon.pid)
        mem_before = proc_memory(daemon.pid)
        out["daemon_before"] = {"fds": fds_before, "memory": mem_before}
        conns = 0
        phase_end = time.monotonic() + args.settle + args.seconds + 30
        if phase != "baseline":
            procs, per_proc, opts = attack_plan(phase, args)
            conns = procs * per_proc
            for p in range(procs):
                attackers.append(
                    Child(
                        ctx,
                        f"{phase} attacker {p}",
                        attack_main,
                        phase,
                        str(daemon.sock),
                        p,
                        per_proc,
                        stop,
                        phase_end + HARD_LIMIT,
                        opts,
                        uid=None if phase == "mirror" else ATTACKER_UID,
                    )
                )
            if phase in ONSET:
                say(f"{LABELS[phase]}: {conns} attacking connection(s) starting; measuring now")
            else:
                for child in attackers:
                    try:
                        out.setdefault("attacker_ready", []).append(child.expect("ready", 90))
                    except (TimeoutError, RuntimeError) as exc:
                        problems.append(f"{child.name} never got going: {exc}")
                say(f"{LABELS[phase]}: {conns} attacking connection(s) in full swing; settling")
                time.sleep(args.settle)
        out["attacking_connections"] = conns
        # The window: the honest guest, the admin prober and the samples, at the same moment.
        start = time.monotonic_ns() + 50_000_000
        stop_ns = start + int(args.seconds * 1e9)
        honest.send(("measure", start - int(0.2e9), start, stop_ns))
        prober.send(("measure", start, stop_ns))
        samples: list[dict[str, Any]] = []
        cpu0 = cpu1 = 0.0
        waits0 = waits1 = (0, 0)
        while time.monotonic_ns() < start:
            time.sleep(0.005)
        with contextlib.suppress(OSError):
            cpu0 = proc_cpu(daemon.pid)
            waits0 = (proc_wait(daemon.pid), proc_wait(honest.proc.pid or 0))
        t_cpu0 = time.monotonic()
        while (now := time.monotonic_ns()) < stop_ns:
            try:
                mem = proc_memory(daemon.pid)
            except OSError:
                problems.append("tmemd exited during the measurement")
                break
            samples.append({"t": (now - start) / 1e9, **mem})
            time.sleep(min(args.sample_interval, max(0.0, (stop_ns - now) / 1e9)))
        with contextlib.suppress(OSError):
            cpu1 = proc_cpu(daemon.pid)
            waits1 = (proc_wait(daemon.pid), proc_wait(honest.proc.pid or 0))
        elapsed = max(1e-9, time.monotonic() - t_cpu0)
        out["daemon_cpu_fraction"] = (cpu1 - cpu0) / elapsed
        # Time spent runnable but without a CPU: the machine's contention, not the daemon's.
        out["daemon_runq_fraction"] = (waits1[0] - waits0[0]) / 1e9 / elapsed
        out["honest_runq_fraction"] = (waits1[1] - waits0[1]) / 1e9 / elapsed
        out["memory_samples"] = samples
        wait = args.seconds + REPLY_WAIT
        honest_raw: dict[str, Any] | None = None
        admin_raw: dict[str, Any] | None = None
        try:
            honest_raw = honest.expect("measured", wait)
        except TimeoutError:
            problems.append(
                f"HANG: the honest guest's get did not return within {wait:.0f}s of the window"
            )
        try:
            admin_raw = prober.expect("measured", wait)
        except TimeoutError:
            problems.append(f"HANG: admin status did not return within {wait:.0f}s")
        # The attack ends (and says when it reached its steady state, if it did not before).
        stop.set()
        for child in attackers:
            try:
                kind, value = child.recv(15)
                if kind == "ready":  # an onset phase did not wait for it
                    out.setdefault("attacker_ready", []).append(value)
                    kind, value = child.recv(15)
                out.setdefault("attackers", []).append(
                    value if kind == "done" else {"error": value}
                )
                if kind != "done":
                    problems.append(f"{child.name} failed:\n{value}")
            except (TimeoutError, RuntimeError) as exc:
                problems.append(f"{child.name}: {exc}")
        # An onset phase counts only what came before the attack's steady state.
        cut_ns = stop_ns
        steady = [r["t_ns"] for r in out.get("attacker_ready", []) if r]
        if phase in ONSET and steady and start < max(steady) < stop_ns:
            cut_ns = max(steady)
        out["window_s"] = (cut_ns - start) / 1e9
        if honest_raw is not None:
            lat = kept(honest_raw, cut_ns)
            out["honest"] = summary_ns(lat)
            out["honest"]["gets_per_s"] = len(lat) / out["window_s"]
            out["honest"]["bad_pages"] = honest_raw["bad"]
            out["honest"]["error"] = honest_raw["error"]
            if honest_raw["error"]:
                problems.append(f"honest guest failed: {honest_raw['error']}")
            if honest_raw["bad"]:
                problems.append(f"honest guest read {honest_raw['bad']} wrong page(s)")
        else:
            out["honest"] = None
        if admin_raw is not None:
            out["admin"] = summary_ns(kept(admin_raw, cut_ns))
            out["admin"]["errors"] = admin_raw["errors"]
            if admin_raw["errors"]:
                problems.append(f"admin status failed: {admin_raw['errors']}")
        else:
            out["admin"] = None
        for child in attackers:
            child.stop()
        attackers = []
        if phase != "baseline":
            rec = wait_recovered(daemon, admin_sock, fds_before, args.recovery_timeout)
            out["recovery"] = rec
            if not rec["recovered"]:
                problems.append(
                    f"not recovered {rec['seconds']:.1f}s after the attack: fds {rec['fds']} "
                    f"(before {fds_before}), sessions {rec['status'].get('sessions')}"
                )
        if daemon.proc.poll() is None:
            honest.send(("check",))
            try:
                checked = honest.expect("checked", 60)
                out["honest_check"] = checked
                if checked["bad"] or checked["error"]:
                    problems.append(f"honest guest's pages after the attack: {checked}")
            except (TimeoutError, RuntimeError) as exc:
                problems.append(f"honest guest's final check: {exc}")
            with contextlib.suppress(OSError):
                out["daemon_after"] = {
                    "fds": proc_fds(daemon.pid),
                    "memory": proc_memory(daemon.pid),
                }
        else:
            problems.append(f"tmemd DIED (exit status {daemon.proc.returncode})")
    finally:
        stop.set()
        # On an error or Ctrl-C a child may wait on a daemon that is going away: be brief.
        grace = 5.0 if sys.exc_info()[1] is None else 1.0
        if holder is not None:
            with contextlib.suppress(Exception):
                holder.close()
        for child in attackers + children:
            with contextlib.suppress(Exception):
                child.send(("close",))
        for child in attackers + children:
            child.stop(grace)
        exit_before_stop = daemon.proc.poll()
        servers.stop(daemon)
        out["daemon_exit"] = exit_before_stop
        out["loadavg_at_end"] = os.getloadavg()
        with contextlib.suppress(OSError):
            out["log"] = read_log(daemon.log)
            if out["log"]["error_count"]:
                problems.append(f"tmemd logged {out['log']['error_count']} error(s)")
            out["log_tail"] = servers.log_tail(daemon.log, 5).splitlines()
    derive_memory(out)
    return out


def derive_memory(out: dict[str, Any]) -> None:
    """Peak growth of RssAnon and VmRSS during the window over the figure before the attack,
    per attacking connection."""
    samples = out.get("memory_samples") or []
    before = (out.get("daemon_before") or {}).get("memory")
    if not samples or not before:
        out["memory"] = None
        return
    conns = out.get("attacking_connections") or 0
    mem: dict[str, Any] = {}
    for key in ("RssAnon", "VmRSS", "RssShmem"):
        peak = max(s[key] for s in samples)
        growth = peak - before[key]
        mem[key] = {"before": before[key], "peak": peak, "growth": growth}
        mem[key]["per_connection"] = growth / conns if conns else None
    out["memory"] = mem


# ---------------------------------------------------------------------- verdicts and output


def judge(phase: dict[str, Any]) -> dict[str, Any]:
    """Issue #14's targets for one attack phase: {target: {"value", "met"}}."""
    honest, admin, mem = phase.get("honest"), phase.get("admin"), phase.get("memory")
    hang = any(p.startswith("HANG") for p in phase["problems"])
    dead = any("DIED" in p or "exited" in p for p in phase["problems"])
    out: dict[str, Any] = {}

    def put(name: str, value: float | None, limit: float, extra_fail: bool = False) -> None:
        met = value is not None and value == value and value <= limit and not extra_fail
        out[name] = {"value": value, "limit": limit, "met": met}

    failed = bool(honest and honest.get("error")) or hang or dead
    put("get_p99_ms", honest and honest["p99_ms"], GET_P99_TARGET_MS, failed)
    put("get_max_ms", honest and honest["max_ms"], GET_MAX_TARGET_MS, failed)
    admin_failed = bool(admin and admin.get("errors")) or hang or dead
    put("admin_max_ms", admin and admin["max_ms"], ADMIN_TARGET_MS, admin_failed)
    per_conn = mem["RssAnon"]["per_connection"] if mem else None
    put("mem_per_conn", per_conn, MEM_TARGET)
    return out


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base or value != value:
        return "-"
    return f"{value / base:.2f}"


def cell(value: float | None, base: float | None, scale: float, fmt: str) -> str:
    """A value and its ratio to the baseline, e.g. ``0.85 (x1.20)``."""
    if value is None or value != value:
        return "-"
    return f"{value * scale:{fmt}} (x{ratio(value, base)})"


def size_cell(value: float | None) -> str:
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    return sign + format_size(abs(int(value)))


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    base = result["phases"].get("baseline") or {}
    bh, ba = base.get("honest") or {}, base.get("admin") or {}
    admin_kind = (
        "one persistent connection"
        if meta["admin_persistent"]
        else ("a fresh connection per call, as tmemctl")
    )
    lines = [
        f"tmem hostile-guest bench: {meta['seconds']} s window per phase after "
        f"{meta['settle']} s of attack, fresh tmemd per phase ({format_size(meta['memory'])} "
        f"budget), {meta['cpus']} cpus",
        f"load average at start {meta['loadavg_at_start'][0]:.2f}, at end "
        f"{meta['loadavg_at_end'][0]:.2f} (other work on the machine skews the numbers)",
        f"honest guest: tmemclient.connect (rings: {base.get('honest_rings', '?')}), single "
        f"4 KiB gets from a persistent pool of {meta['keyspace']} pages, closed loop",
        f"admin: status every {meta['admin_interval'] * 1000:.0f} ms over {admin_kind}",
        "",
    ]
    head = (
        f"{'phase':<24}{'conns':>6}{'gets/s':>9}  {'get p50 us':<17}{'get p99 us':<18}"
        f"{'get max ms':<18}{'status p50 ms':<16}{'status p99 ms':<16}{'status max ms':<17}"
        f"{'anon/conn':>10}{'rss/conn':>10}{'tmemd cpu':>10}{'runq d/g':>10}{'load':>11}"
    )
    lines += [head, "-" * len(head)]
    for name, ph in result["phases"].items():
        h, a, mem = ph.get("honest") or {}, ph.get("admin") or {}, ph.get("memory") or {}
        conns = ph.get("attacking_connections", 0)
        anon = (mem.get("RssAnon") or {}) if mem else {}
        rss = (mem.get("VmRSS") or {}) if mem else {}
        if conns:
            anon_s, rss_s = (
                size_cell(anon.get("per_connection")),
                size_cell(rss.get("per_connection")),
            )
        else:
            anon_s = f"+{size_cell(anon.get('growth'))}" if anon else "-"
            rss_s = f"+{size_cell(rss.get('growth'))}" if rss else "-"
        load = f"{ph['loadavg_at_start'][0]:.2f}-{ph['loadavg_at_end'][0]:.2f}"
        label = LABELS[name]
        if name in ONSET:
            label += f" {ph.get('window_s', 0):.1f}s"
        cpu = ph.get("daemon_cpu_fraction")
        rq_d, rq_g = ph.get("daemon_runq_fraction"), ph.get("honest_runq_fraction")
        runq = "-" if rq_d is None or rq_g is None else f"{rq_d:.0%}/{rq_g:.0%}"
        lines.append(
            f"{label:<24}{conns:>6}{h.get('gets_per_s', 0):>9,.0f}  "
            f"{cell(h.get('p50_ms'), bh.get('p50_ms'), 1000, '.0f'):<17}"
            f"{cell(h.get('p99_ms'), bh.get('p99_ms'), 1000, '.0f'):<18}"
            f"{cell(h.get('max_ms'), bh.get('max_ms'), 1, '.1f'):<18}"
            f"{cell(a.get('p50_ms'), ba.get('p50_ms'), 1, '.2f'):<16}"
            f"{cell(a.get('p99_ms'), ba.get('p99_ms'), 1, '.2f'):<16}"
            f"{cell(a.get('max_ms'), ba.get('max_ms'), 1, '.1f'):<17}"
            f"{anon_s:>10}{rss_s:>10}"
            f"{'-' if cpu is None else f'{cpu * 100:.0f}%':>10}{runq:>10}{load:>11}"
        )
    lines += [
        "(xN): ratio to the baseline (above 1 is slower). anon/conn, rss/conn: peak growth of "
        "tmemd's RssAnon / VmRSS in the window",
        "over the figure before the attack, per attacking connection (baseline row: the growth "
        "itself); VmRSS also counts stored pages (shmem).",
        "tmemd cpu: its CPU time over the window (100% = one core). runq d/g: share of the "
        "window tmemd's main thread / the honest guest",
        "was runnable but waiting for a CPU (contention on the machine, not the daemon's "
        "choice). load: 1-min load average at the phase's start and end.",
        "",
        f"targets (issue #14), under each attack: get p99 <= {GET_P99_TARGET_MS:g} ms, every "
        f"get <= {GET_MAX_TARGET_MS:g} ms, every admin status <= {ADMIN_TARGET_MS:g} ms, "
        f"daemon memory (RssAnon) <= {format_size(MEM_TARGET)} per attacking connection",
    ]
    for name, ph in result["phases"].items():
        if name == "baseline":
            continue
        t = ph["targets"]
        parts = []
        for key, label in (
            ("get_p99_ms", "get p99"),
            ("get_max_ms", "get max"),
            ("admin_max_ms", "status max"),
        ):
            v = t[key]["value"]
            shown = "-" if v is None else f"{v:.2f} ms"
            parts.append(f"{label} {shown} {'met' if t[key]['met'] else 'MISSED'}")
        m = t["mem_per_conn"]
        parts.append(f"memory {size_cell(m['value'])}/conn {'met' if m['met'] else 'MISSED'}")
        lines.append(f"  {LABELS[name]:<22} " + "; ".join(parts))
    missed = [
        f"{LABELS[n]}: {k}"
        for n, ph in result["phases"].items()
        if n != "baseline"
        for k, v in ph["targets"].items()
        if not v["met"]
    ]
    lines.append("ALL TARGETS MET" if not missed else f"MISSED: {'; '.join(missed)}")
    notes = []
    for name, ph in result["phases"].items():
        for problem in ph["problems"]:
            notes.append(f"  !! {LABELS[name]}: {problem.splitlines()[0]}")
        for att in ph.get("attackers", []):
            stats = att.get("stats")
            if stats is not None:
                shown = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items()))
                notes.append(f"  {LABELS[name]}: attacker did {shown}")
                for why, n in att.get("closed_because", {}).items():
                    notes.append(f"     closed/refused x{n}: {why}")
        for ready in ph.get("attacker_ready", []):
            if ready and ready.get("info"):
                notes.append(f"  {LABELS[name]}: attacker in full swing: {ready['info']}")
        before, after = ph.get("daemon_before"), ph.get("daemon_after")
        if name != "baseline" and before and after:
            kept_anon = after["memory"]["RssAnon"] - before["memory"]["RssAnon"]
            notes.append(
                f"  {LABELS[name]}: tmemd RssAnon once the attack had left: "
                f"{'+' if kept_anon >= 0 else '-'}{format_size(abs(kept_anon))} over before it"
            )
        rec = ph.get("recovery")
        if rec:
            notes.append(
                f"  {LABELS[name]}: after the attack, back to 1 session and "
                f"{ph['daemon_before']['fds']} fds in {rec['seconds']:.2f}s"
                if rec["recovered"]
                else f"  !! {LABELS[name]}: NOT back to baseline after {rec['seconds']:.1f}s"
            )
        log = ph.get("log") or {}
        interesting = {
            k: v
            for k, v in (log.get("events") or {}).items()
            if k not in ("guest_connected", "guest_disconnected", "fd_limit", "daemon_ready")
            and k not in ("daemon_stopping", "daemon_stopped", "shutdown")
        }
        if interesting:
            notes.append(f"  {LABELS[name]}: tmemd log events {interesting}")
        for why, n in (log.get("attacker_disconnect_reasons") or {}).items():
            notes.append(f"     tmemd logged an attacker's connection ending x{n}: {why}")
    if notes:
        lines += ["", "notes", *notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description=doc.split("\n\n")[0] + " Attacks: " + ", ".join(ATTACKS) + ".",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s windows, 512 MiB budget (about 30 s)"
    )
    p.add_argument("--seconds", type=float, help="measurement window per phase (10; quick 2)")
    p.add_argument("--settle", type=float, help="attack time before the window (2; quick 0.5)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="attacker processes for ring, heavy, mirror, flood (1 each)",
    )
    p.add_argument(
        "--unread-conns",
        type=int,
        default=64,
        help="connections of the unread-replies attacker (64)",
    )
    p.add_argument(
        "--flood-conns",
        type=int,
        default=1,
        help="connections of each socket-flood attacker process (1)",
    )
    p.add_argument("--keyspace", type=int, default=1024, help="honest guest's pages (1024)")
    p.add_argument(
        "--guest-ring-frames",
        type=int,
        default=None,
        help="honest guest's rings (tmemclient's default: 16 on x86-64; 0: socket)",
    )
    p.add_argument(
        "--admin-interval",
        type=float,
        default=0.01,
        help="seconds between admin status calls (0.01)",
    )
    p.add_argument(
        "--admin-persistent",
        action="store_true",
        help="one admin connection for every call (default: a fresh one per call)",
    )
    p.add_argument("--memory", type=parse_size, help="tmemd budget (1GiB; quick 512MiB)")
    p.add_argument(
        "--loan-write",
        type=parse_size,
        default=256 << 20,
        help="span of its loan file the mirror attacker writes over and over (256MiB)",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        help="seconds between samples of tmemd's memory (0.1)",
    )
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=15.0,
        help="seconds the daemon gets to drop the attackers' sessions and fds (15)",
    )
    p.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill the budget once (and free it) before the figure memory growth is measured "
        "from, so stored pages' metadata is not counted as the attack's (default: on)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    if args.settle is None:
        args.settle = 0.5 if args.quick else 2.0
    if args.memory is None:
        args.memory = (512 << 20) if args.quick else (1 << 30)
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attack_list if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s): {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    if args.seconds <= 0 or args.settle < 0 or args.procs < 1:
        p.error("need --seconds > 0, --settle >= 0 and --procs >= 1")
    if args.unread_conns < 1 or args.flood_conns < 1:
        p.error("need --unread-conns >= 1 and --flood-conns >= 1")
    if args.keyspace < 1 or args.admin_interval < 0:
        p.error("need --keyspace >= 1 and --admin-interval >= 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: everything gets stopped


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tmem-hostile-") as tmpdir:
        os.chmod(tmpdir, 0o755)  # guests of other uids reach the socket in it
        yield Path(tmpdir)


def main(argv: list[str] | None = None) -> int:
    """Run every phase, print the table, write the JSON."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if not rings_mod.supported():
        print(
            "!! this machine cannot use rings or mappings (not x86-64): the ring and "
            "mirror attacks will fail",
            file=sys.stderr,
        )
    ctx = multiprocessing.get_context("fork")
    phases = ["baseline", *args.attack_list]
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
            "tmemd": servers.server_version("tmemd-sock"),
            "cpus": len(os.sched_getaffinity(0)),
            "quick": args.quick,
            "seconds": args.seconds,
            "settle": args.settle,
            "memory": args.memory,
            "keyspace": args.keyspace,
            "procs": args.procs,
            "unread_conns": args.unread_conns,
            "flood_conns": args.flood_conns,
            "admin_interval": args.admin_interval,
            "admin_persistent": args.admin_persistent,
            "loan_write": args.loan_write,
            "warm": args.warm,
            "loadavg_at_start": os.getloadavg(),
            "argv": sys.argv,
        },
        "phases": {},
    }
    if (load := os.getloadavg()[0]) > 0.5:
        say(f"!! the machine is busy (load average {load:.2f}): other work skews the numbers")
    per_phase = args.seconds + args.settle + 3
    say(f"bench.hostile: phases {', '.join(phases)}; about {len(phases) * per_phase:.0f}s")
    try:
        with _workdir() as tmp:
            for n, phase in enumerate(phases, 1):
                say(f"[{n}/{len(phases)}] {LABELS[phase]}: starting a fresh tmemd")
                ph = run_phase(phase, tmp, args, ctx)
                if phase != "baseline":
                    ph["targets"] = judge(ph)
                result["phases"][phase] = ph
                h = ph.get("honest") or {}
                a = ph.get("admin") or {}
                say(
                    f"[{n}/{len(phases)}] {LABELS[phase]}: get p50/p99/max "
                    f"{h.get('p50_ms', float('nan')):.3f}/{h.get('p99_ms', float('nan')):.3f}/"
                    f"{h.get('max_ms', float('nan')):.1f} ms, status p99/max "
                    f"{a.get('p99_ms', float('nan')):.2f}/{a.get('max_ms', float('nan')):.1f} ms"
                    + (f"; {len(ph['problems'])} problem(s)" if ph["problems"] else "")
                )
    except KeyboardInterrupt:
        say("interrupted; every process and daemon was stopped")
        return 130
    except SystemExit as exc:
        say(f"stopped by a signal; every process and daemon was stopped (exit {exc.code})")
        raise
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    result["meta"]["elapsed_s"] = round(time.monotonic() - _T0, 1)
    table = render(result)
    print(table, flush=True)
    result["table"] = table.splitlines()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"done in {result['meta']['elapsed_s']:.0f}s; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
