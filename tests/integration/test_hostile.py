"""Hostile guests against a real tmemd (issue 14): one guest must never hurt another guest, the
daemon, or the budget.

Each attacker is written from proto/PROTOCOL.md over raw Unix sockets (never tmemclient's Client)
and runs in a forked process, under another uid when the tests run as root, while a well-behaved
*victim* (a tmemclient guest connected before the attack, holding persistent pages) goes on
working. Every test asserts:

(a) the victim's persistent pages are intact, byte for byte, after the attack;
(b) the victim is served while the attack runs: its round trips (a get, a put, and an admin
    ``status``) complete, and only then is the attacker checked to be still at it and stopped.
    Nothing here measures time: machines are shared and noisy;
(c) once the attacker has left, the daemon holds exactly the descriptors (/proc/PID/fd) and the
    accounts (admin ``status``, ``guests``, ``uids``) it held before, and the attacker's guest
    name connects again (no CONFLICT);
(d) the attacker got what the protocol promises it (plain service, an error reply, or a PROTOCOL
    notice and a close), and the daemon is alive and logged no ``connection_failed``.

Every read has a deadline, every loop is bounded, and every attacker process is killed at
teardown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import mmap
import os
import pwd
import random
import resource
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import pytest
from conftest import EOF, Daemon
from test_bad_input import TIMEOUT, Raw, Reference, daemon_fds, frame_of, settled_fds

from tmemclient.region import create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import HEADER, NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.fds import fds_from_ancillary
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import PROTOCOL_VERSION, Op, Status, make_pool_flags
from tmemclient.wire.ring import Rings
from tmemd.audit import MIRROR_SLACK_SLOTS, OVERDRAW_CLOSE_SLOTS
from tmemd.ctl.client import AdminClient
from tmemd.lending import LOAN_SLACK_SLOTS

OK, INVALID, PROTOCOL, CONFLICT = Status.OK, Status.INVALID, Status.PROTOCOL, Status.CONFLICT
PAGE = FRAME_SIZE
MIB = 1 << 20
U64_MAX = 2**64 - 1
CHILD_LIFETIME = 60.0  # an attacker process gives up on its own after this long, whatever happens
JOIN_TIMEOUT = 3 * TIMEOUT


def _unused_uid() -> int | None:
    """A uid no account uses, for attackers (None when we cannot change uid: not root)."""
    if os.geteuid() != 0:
        return None
    for uid in range(40000, 41000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    return None


ATTACKER = _unused_uid()  # the attackers' uid; None: the test's own
needs_root = pytest.mark.skipif(
    ATTACKER is None, reason="needs root: the attacker must run under another uid (setuid)"
)
needs_rings = pytest.mark.skipif(not ring.supported(), reason="request rings need x86-64")


def effective_name(uid: int | None, name: str) -> str:
    """The name tmemd gives an unlisted guest (PROTOCOL.md §4.4)."""
    return f"{os.getuid() if uid is None else uid}/{name}"


def pool_flags(*, persistent: bool, order: int = 0) -> int:
    return make_pool_flags(persistent=persistent, shared=False, order=order)


def wait_until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.01)


def resident(fd: int) -> int:
    """Bytes of memory a file holds (what the audit measures too)."""
    return os.fstat(fd).st_blocks * 512


# ================================================================================================
# Attackers: forked processes (after every import: a child that changed its uid cannot import
# from root's Python), talking to the test through a shared page of words and a result pipe.

PROGRESS, STATE, STOP = 0, 1, 2
RUNNING, READY, DONE, FAILED = 1, 2, 3, 4


class Control:
    """The attacker's side: report progress, say when the attack is in full swing, see when to
    stop (the test says so, or the process's own lifetime ran out)."""

    def __init__(self, words: memoryview) -> None:
        self.words = words
        self.deadline = time.monotonic() + CHILD_LIFETIME

    @property
    def stopped(self) -> bool:
        return self.words[STOP] != 0 or time.monotonic() > self.deadline

    def tick(self, n: int = 1) -> None:
        self.words[PROGRESS] += n

    def ready(self) -> None:
        self.words[STATE] = READY


Target = Callable[[Control], Any]


def _child(target: Target, uid: int | None, words: memoryview, pipe: int) -> NoReturn:
    code = 1
    try:
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        report: dict[str, Any] = {"ok": True, "result": target(Control(words))}
        code = 0
    except BaseException:
        report = {"ok": False, "error": traceback.format_exc()}
    try:
        words[STATE] = DONE if code == 0 else FAILED
        data = memoryview(json.dumps(report, default=repr).encode())
        while data:
            data = data[os.write(pipe, data) :]
    finally:
        os._exit(code)


class Attack:
    """One attacker process running ``target(Control)`` under ``uid`` (None: ours)."""

    def __init__(self, target: Target, uid: int | None) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: the child sees our words
        self.words = memoryview(self._page).cast("Q")
        self.words[STATE] = RUNNING
        gc.collect()  # no garbage of ours may be finalized in the child (closing fds it reuses)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(target, uid, self.words, w)
        os.close(w)
        self.pid = pid
        self._pipe = r

    @property
    def progress(self) -> int:
        return int(self.words[PROGRESS])

    def wait_ready(self, timeout: float = 2 * TIMEOUT) -> None:
        """Until the attacker says its attack is in full swing (bounded)."""
        deadline = time.monotonic() + timeout
        while self.words[STATE] == RUNNING:
            if time.monotonic() > deadline:
                raise AssertionError(f"the attacker did not get going within {timeout}s")
            time.sleep(0.01)
        if self.words[STATE] != READY:
            self.join()  # raises with the attacker's traceback
            raise AssertionError("the attacker ended before its attack was in full swing")

    def wait_progress(self, beyond: int, timeout: float = 2 * TIMEOUT) -> None:
        """Until the attacker reports progress past ``beyond`` (bounded)."""
        deadline = time.monotonic() + timeout
        while self.progress <= beyond:
            self.assert_running()
            if time.monotonic() > deadline:
                raise AssertionError(f"the attacker made no progress within {timeout}s")
            time.sleep(0.01)

    def assert_running(self) -> None:
        """The attacker is still at it (it did not end, fail or get stopped)."""
        pid, _ = os.waitpid(self.pid, os.WNOHANG)
        if pid != 0 or self.words[STATE] not in (RUNNING, READY):
            if pid != 0:
                self.pid = -pid  # reaped: join only reads its report
            self.join()
            raise AssertionError("the attack had ended by the time the victim was served")

    def stop(self) -> None:
        self.words[STOP] = 1

    def join(self, timeout: float = JOIN_TIMEOUT) -> Any:
        """Stop the attacker and wait for it (bounded); its result, or AssertionError with its
        traceback if it failed."""
        self.stop()
        deadline = time.monotonic() + timeout
        chunks = []
        while True:
            ready, _, _ = select.select([self._pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                raise AssertionError(f"the attacker did not finish within {timeout}s")
            data = os.read(self._pipe, 1 << 16)
            if not data:
                break
            chunks.append(data)
        self.kill()  # it is exiting: reap it
        report = json.loads(b"".join(chunks) or b"null")
        if not report or not report["ok"]:
            raise AssertionError(f"the attacker failed:\n{report and report['error']}")
        return report["result"]

    def kill(self) -> None:
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = 0
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1


def hello(
    path: str,
    name: str,
    frames: int = 16,
    *,
    ring_frames: int = 0,
    mapped: bool = False,
    lend: bool = False,
) -> tuple[Raw, dict[str, Any], list[int]]:
    """A raw guest past a valid HELLO (PROTOCOL.md §4.2): the connection, the HELLO reply's
    limits, and the fds that rode on the reply (mirror, then loan file: §4.7, §4.8), received
    with room for two."""
    fd, region = create_region(frames, layout.ring_bytes(ring_frames))
    g = Raw(Path(path))
    g.fd, g.region = fd, region
    options: dict[str, Any] = {}
    if ring_frames:
        options["ring"] = ring_frames
    if mapped:
        options["map"] = True
    if lend:
        options["lend"] = True
    message = [Op.HELLO, 1, PROTOCOL_VERSION, name, frames, *([options] if options else [])]
    g.send(encode_frame(message), [fd])
    fds: list[int] = []
    deadline = time.monotonic() + TIMEOUT
    while len(g.buf) < 4 or len(g.buf) < 4 + HEADER.unpack_from(g.buf)[0]:
        left = deadline - time.monotonic()
        assert left > 0, "no HELLO reply in time"
        g.sock.settimeout(left)
        data, anc, flags, _ = g.sock.recvmsg(
            1 << 16, socket.CMSG_SPACE(2 * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds += fds_from_ancillary(anc, flags, "more than two fds came with the HELLO reply")
        if not data:
            break
        g.buf += data
    g.sock.settimeout(TIMEOUT)
    limits = g.expect(1, OK)
    assert limits["guest"].endswith(name)
    if ring_frames:
        assert limits["ring"] == ring_frames, "the daemon granted no rings"
        g.rings = Rings(memoryview(region)[frames * PAGE :], ring_frames, "guest")
    return g, limits, fds


def reconnect(path: str, name: str) -> Target:
    """An attacker that only connects as ``name``, pings and leaves: its effective name."""

    def run(ctl: Control) -> str:
        g, limits, fds = hello(path, name, frames=1)
        for fd in fds:
            os.close(fd)
        g.ok(Op.PING)
        g.close()
        return str(limits["guest"])

    return run


def notice_or_eof(g: Raw) -> Any:
    """What the daemon sent next without waiting: a frame, EOF, or None (nothing yet)."""
    ready, _, _ = select.select([g.sock], [], [], 0)
    return g.read() if ready else None


# ================================================================================================
# The world an attack happens in


class World:
    """A tmemd (its socket reachable by any uid), its admin socket, the victim connected before
    any attacker, and the baseline (descriptors and accounts) the daemon must return to."""

    def __init__(
        self,
        budget: str = "16MiB",
        *args: str,
        config: str | None = None,
        mapped_victim: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tmem-hostile-"))
        self.attacks: list[Attack] = []
        self._cleanup: list[Callable[[], Any]] = [
            lambda: shutil.rmtree(self.dir, ignore_errors=True)
        ]
        try:
            self.dir.chmod(0o755)  # attackers of other uids reach the socket (mode 666)
            admin = self.dir / "admin" / "admin.sock"
            admin.parent.mkdir(mode=0o700)
            extra = []
            if config is not None:
                (self.dir / "tmemd.toml").write_text(config)
                extra = ["--config", str(self.dir / "tmemd.toml")]
            self.daemon = Daemon(
                self.dir,
                "--memory", budget,
                "--socket-mode", "666",
                "--admin-socket", str(admin),
                "--shutdown-grace", "1",
                *extra,
                *args,
                preexec_fn=preexec_fn,
            )  # fmt: skip
            self._cleanup.append(self.daemon.stop)
            self.path = str(self.daemon.socket)
            self.admin = AdminClient(admin, timeout=TIMEOUT)
            self._cleanup.append(self.admin.close)
            connect = {"map_pages": True, "lend_memory": True} if mapped_victim else {}
            self.victim = Reference(self.daemon, "victim", **connect)
            self._cleanup.append(self.victim.close)
            self.victim.client._sock.settimeout(TIMEOUT)  # every victim request is bounded
            self.scratch = self.victim.client.new_pool(persistent=True)
            self.rng = random.Random(14)
            self.victim.check()
            self.base_fds = settled_fds(self.daemon)
            self.base = self.accounts()
            self.errors = len(self.errors_logged())
        except BaseException:
            self.close()
            raise

    def errors_logged(self) -> list[dict[str, Any]]:
        """The daemon's log records at level error or worse (``connection_failed``: an exception
        escaped a connection's handler; ``region_still_referenced``, ``audit_failed``, ...)."""
        return [e for e in self.daemon.events() if e.get("level") in ("error", "critical")]

    def close(self) -> None:
        for attack in self.attacks:
            attack.kill()
        for step in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                step()

    def attack(self, target: Target, uid: int | None = ATTACKER) -> Attack:
        """Start an attacker process (by default under the attackers' uid)."""
        attack = Attack(target, uid)
        self.attacks.append(attack)
        return attack

    # ------------------------------------------------------------------ (b) the victim is served

    def served(self) -> None:
        """The victim's round trips complete and its pages are intact; so does an admin status
        call. (Each has its own deadline; none is timed.)"""
        self.victim.check()  # ping, get_many of every page, a sub-page read
        page = self.rng.randbytes(PAGE)
        if self.scratch.put(1, 0, page):  # refused if the budget is full of persistent pages
            assert self.scratch.get(1, 0) == page
        self.scratch.flush(1, 0)
        status = self.admin.call("status")
        assert status["sessions"] >= 1

    def survive(self, target: Target, uid: int | None = ATTACKER) -> dict[str, Any]:
        """The usual shape of a test: start the attacker, and once it is at it, see the victim
        served while it goes on; then stop it and return what it reported."""
        attack = self.attack(target, uid)
        attack.wait_ready()
        self.served_during(attack)
        attack.assert_running()
        report: dict[str, Any] = attack.join()
        return report

    def served_during(self, attack: Attack, rounds: int = 3) -> None:
        """The victim is served again and again while the attacker keeps going: after each of
        its round trips, the attacker makes progress again. (A daemon that served the victim
        only when the attacker paused would show the attacker stalled, or time out.)"""
        for _ in range(rounds):
            self.served()
            attack.wait_progress(attack.progress)

    # ------------------------------------------------------------------ (c) back to the baseline

    def accounts(self) -> dict[str, Any]:
        """What the admin socket says the daemon holds."""
        status = self.admin.call("status")
        # Not the traffic counters, nor resident_bytes: a mapped guest's slots keep their memory
        # in its mirror for reuse (PROTOCOL.md §4.7), so what its files hold may vary.
        keep = ("weight", "cap", "frozen", "mapped", "sessions", "pages", "pools")
        return {
            "status": {
                k: status[k]
                for k in ("budget", "used", "lent", "guests", "sessions", "shared_pools")
            },
            "guests": {
                row["name"]: {
                    k: v
                    for k, v in row.items()
                    if k in keep or (k.endswith("_bytes") and k != "resident_bytes")
                }
                for row in self.admin.call("guests")
            },
            "uids": self.admin.call("uids"),
        }

    def wait_baseline(self) -> None:
        """The daemon's descriptors and accounts are back where they were (bounded wait)."""
        deadline = time.monotonic() + 2 * TIMEOUT
        while True:
            fds, accounts = daemon_fds(self.daemon), self.accounts()
            if fds == self.base_fds and accounts == self.base:
                return
            if time.monotonic() > deadline:
                changed = [
                    f"{part}: {self.base[part]} -> {accounts[part]}"
                    for part in self.base
                    if accounts[part] != self.base[part]
                ]
                assert not changed, "tmemd's accounts did not return to the baseline:\n" + (
                    "\n".join(changed)
                )
                assert fds == self.base_fds, f"tmemd holds {fds} fds, {self.base_fds} before"
            time.sleep(0.02)

    def finish(self, *names: tuple[int | None, str, str]) -> None:
        """After the attack: (a) the victim lost nothing; (c) descriptors and accounts at the
        baseline, and each attacker name (uid, name asked, effective name) connects again;
        (d) the daemon is alive and logged no internal error (no ``connection_failed``, nothing
        at level error)."""
        assert all(a.pid == 0 for a in self.attacks), "an attacker is still running"
        self.victim.check()
        self.wait_baseline()
        for uid, name, effective in names:
            assert self.attack(reconnect(self.path, name), uid).join() == effective
        self.wait_baseline()
        self.victim.check()
        assert self.daemon.alive, f"tmemd died:\n{self.daemon.log_text()[-4000:]}"
        errors = self.errors_logged()[self.errors :]
        assert not errors, f"tmemd logged an internal error: {errors[0]}"


@pytest.fixture
def world() -> Iterator[Callable[..., World]]:
    """Make the world for an attack (``World``'s arguments); torn down whatever happens."""
    made: list[World] = []

    def make(*args: Any, **kwargs: Any) -> World:
        w = World(*args, **kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        with contextlib.suppress(Exception):  # shown by pytest only if the test failed
            print(f"--- the end of tmemd's log ---\n{w.daemon.log_text()[-6000:]}")
        w.close()


# ================================================================================================
# 1. Mirror poisoning


def poison_mirror(path: str, name: str, used: int) -> Target:
    """A mapped, lending guest that re-opens its read-only mirror read-write through
    /proc/self/fd (PROTOCOL.md §4.7) and writes everything it can reach there: the control words
    (seq = 2**64-1, lent, low), the generation and link words of the ``used`` slots a budget can
    use, its own pages and other slots; claims its loan busy forever (ACTIVE = 2**64-1); and
    keeps borrowing, putting, touching and getting."""

    def run(ctl: Control) -> dict[str, Any]:
        g, limits, fds = hello(path, name, frames=32, mapped=True, lend=True)
        assert "map" in limits and "lend" in limits and len(fds) == 2, limits
        mirror_fd, loan_fd = fds
        slots = limits["map"]
        gen_off = slots * PAGE
        link_off = gen_off + 8 * slots
        ctl_off = -(-(link_off + 4 * slots) // PAGE) * PAGE
        st = os.fstat(mirror_fd)
        assert st.st_size == ctl_off + PAGE
        report: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "fchmod": None}
        rw = -1
        try:
            rw = os.open(f"/proc/self/fd/{mirror_fd}", os.O_RDWR | os.O_CLOEXEC)
            report["reopen"] = "ok"
        except PermissionError as exc:
            report["reopen"] = errno.errorcode[exc.errno or 0]
            try:  # its owner may give itself write permission back; nobody else can
                os.fchmod(mirror_fd, 0o600)
                report["fchmod"] = "ok"
                rw = os.open(f"/proc/self/fd/{mirror_fd}", os.O_RDWR | os.O_CLOEXEC)
            except PermissionError as exc2:
                report["fchmod"] = errno.errorcode[exc2.errno or 0]
        report["writable"] = rw >= 0
        if rw >= 0:
            mirror = mmap.mmap(rw, st.st_size)
        else:
            mirror = mmap.mmap(mirror_fd, st.st_size, prot=mmap.PROT_READ)
        loan = mmap.mmap(loan_fd, os.fstat(loan_fd).st_size)
        active = memoryview(loan)[:8].cast("Q")
        pers, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=True), None)
        eph, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=False, order=1), None)
        for f in range(32):
            g.frame(f)[:] = bytes([f + 1]) * PAGE
        pers_entries = [x for k in range(64) for x in (9, k, k % 32)]
        eph_entries = [x for k in range(16) for x in (9, k, (2 * k) % 31)]
        seqs, lent_most, rounds = set(), 0, 0
        while not ctl.stopped:
            # Its puts first: once it has borrowed everything, new pages of its own find no
            # room (a put never takes the putter's own lent memory).
            tokens = [r for r in g.ok(Op.PUT_MANY, pers, pers_entries) if r]
            tokens += [r for r in g.ok(Op.PUT_MANY, eph, eph_entries) if r]
            answer = g.ok(Op.LEND, 1 << 40)  # everything it can get
            assert list(answer)[:4] == ["lent", "low", "seq", "room"], answer
            seqs.add(answer["seq"])
            lent_most = max(lent_most, answer["lent"])
            active[0] = U64_MAX  # "busy forever": the daemon clamps it to now
            loan[PAGE : PAGE + answer["lent"]] = b"\xa5" * answer["lent"]  # within its loan
            if rw >= 0:
                words = memoryview(mirror)[ctl_off : ctl_off + 24].cast("Q")
                words[0], words[1], words[2] = U64_MAX, U64_MAX - rounds, U64_MAX
                words.release()
                # The generation and link words of every slot the budget can use (the file
                # has room for the machine's memory: all of it would be an overdraft).
                mirror[gen_off : gen_off + 8 * used] = b"\xff" * (8 * used)
                mirror[link_off : link_off + 4 * used] = b"\xfe" * (4 * used)
                for head, _gen in tokens:  # its own pages...
                    mirror[head * PAGE : (head + 1) * PAGE] = b"\x66" * PAGE
                for slot in range(0, 4 * 32, 4):  # ...and slots whose memory is elsewhere
                    mirror[slot * PAGE] = 0x77
            touched = [x for head, _gen in tokens[:16] for x in (head, U64_MAX)]
            assert g.ok(Op.TOUCH_MANY, pers, [*touched, slots - 1, 1, 0, 0]) is None
            got = g.ok(Op.GET_MANY, pers, pers_entries[:48])
            assert len(got) == 16 and all(type(hit) is bool for hit in got), got
            g.ok(Op.PING)
            rounds += 1
            ctl.tick()
            if rounds == 2:
                ctl.ready()
        report.update(rounds=rounds, seqs=sorted(seqs), lent_most=lent_most, slots=slots)
        g.close()
        return report

    return run


@pytest.mark.parametrize(
    "who",
    [
        pytest.param(None, id="daemon-uid"),
        pytest.param(ATTACKER, id="other-uid", marks=needs_root),
    ],
)
def test_mirror_poisoning(world: Callable[..., World], who: int | None) -> None:
    w = world("4MiB", mapped_victim=True)
    victim = w.victim.client
    recalled = w.admin.call("status")["recalled"]
    attack = w.attack(poison_mirror(w.path, "poison", (4 * MIB) // PAGE), who)
    attack.wait_ready()
    # Puts that need room: the attacker borrowed all it could, so they recall its loan.
    pages = {(5, i): w.rng.randbytes(PAGE) for i in range(64)}
    assert all(w.scratch.put_many([(*k, v) for k, v in pages.items()]))
    assert all(w.scratch.get(*k) == v for k, v in pages.items())
    # A LEND: the victim's share comes out of the attacker's (busy) loan. The victim uses it.
    answer = victim.lend(MIB)
    lent = answer["lent"]
    assert lent > 0 and answer["seq"] % 2 == 0
    assert victim.mapping is not None and victim.mapping.loan is not None
    loan = victim.mapping.loan
    loan.answered(answer)
    mine = w.rng.randbytes(lent)
    loan.mem[:lent] = mine
    loan.mark_active()
    w.served_during(attack)
    assert w.admin.call("status")["recalled"] > recalled  # the attacker's loan was recalled
    attack.assert_running()
    report = attack.join()
    # What the victim kept in its lent memory is intact up to where (if at all) it was told
    # a recall took it (PROTOCOL.md §4.8).
    low = loan.changed()
    assert low != loan.BUSY
    kept = lent if low is None else min(low, lent)
    assert loan.mem[:kept] == mine[:kept]
    assert report["rounds"] >= 2 and report["lent_most"] > 0
    # Its seq is the daemon's own (+2 per recall), never what it wrote (2**64-1).
    assert all(s % 2 == 0 and s < 1 << 32 for s in report["seqs"]), report["seqs"]
    assert report["mode"] == 0o400
    if who is None:  # the daemon's own uid: root re-opens it, its owner after a chmod
        assert report["writable"], report
        assert report["reopen"] == "ok" or report["fchmod"] == "ok", report
    else:  # another uid cannot re-open the 0400 file, nor change its mode
        assert (report["reopen"], report["fchmod"], report["writable"]) == (
            "EACCES",
            "EPERM",
            False,
        )
    assert victim.lend(0)["lent"] == 0
    w.scratch.flush_object(5)
    w.finish((who, "poison", effective_name(who, "poison")))


# ================================================================================================
# 2. Ring flood


def ring_flood(path: str, name: str) -> Target:
    """Keep the request ring full of PINGs, take the replies, never sleep (PROTOCOL.md §4.6).
    Bytes only, no decoding: refilling the ring must outpace the daemon serving it."""

    def run(ctl: Control) -> dict[str, Any]:
        g, _, _ = hello(path, name, frames=16, ring_frames=16)
        rings = g.rings
        assert rings is not None
        ping, pong = encode_frame([Op.PING, 7]), encode_frame([7, OK, None])
        doorbell = encode_frame([Op.DOORBELL, 1])
        replies = bytearray()  # from the reply ring, not yet counted
        from_socket = FrameDecoder(1 << 20)  # replies that did not fit there, notices
        g.sock.setblocking(False)
        answered = spilled = 0
        while not ctl.stopped:
            free = rings.free()
            if free >= len(ping):
                assert rings.write(ping * (free // len(ping)))
                if rings.peer_sleeping():
                    with contextlib.suppress(BlockingIOError):
                        g.sock.send(doorbell)
            replies += rings.take()
            whole = len(replies) // len(pong) * len(pong)
            if whole:
                assert replies[:whole] == pong * (whole // len(pong)), bytes(replies[:64])
                del replies[:whole]
                answered += whole // len(pong)
            with contextlib.suppress(BlockingIOError):
                data = g.sock.recv(1 << 16)
                assert data, "tmemd closed the flooding connection"
                from_socket.feed(data)
                while (reply := from_socket.next_message()) is not NEED_DATA:
                    if reply != [0, OK, None]:  # not a doorbell notice: a spilled reply
                        assert reply == [7, OK, None], reply
                        answered += 1
                        spilled += 1
            ctl.words[PROGRESS] = answered
            if answered > 10_000:
                ctl.ready()
        g.close()
        return {"answered": answered, "spilled": spilled}

    return run


@needs_rings
def test_ring_flood(world: Callable[..., World]) -> None:
    w = world()
    report = w.survive(ring_flood(w.path, "flood"))
    assert report["answered"] > 10_000
    w.finish((ATTACKER, "flood", effective_name(ATTACKER, "flood")))


# ================================================================================================
# 3. Unread replies


def rss_anon(daemon: Daemon) -> int:
    """The daemon's anonymous resident memory (its heap), in bytes."""
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


UNREAD_CONNECTIONS = 32


def unread_replies(path: str, name: str, count: int) -> Target:
    """``count`` connections, each pipelining cheap requests (PING, and an unknown op that gets
    an INVALID reply) and never reading a reply, until none of them can send any more."""

    def run(ctl: Control) -> dict[str, Any]:
        conns = [hello(path, f"{name}{i}")[0] for i in range(count)]
        chunk = b"".join(
            encode_frame([Op.PING, 1000 + k]) + encode_frame([99, 5000 + k]) for k in range(512)
        )
        pending = [memoryview(chunk) for _ in conns]
        for g in conns:
            g.sock.setblocking(False)
        sent = 0
        last_sent = time.monotonic()
        while not ctl.stopped:
            moved = False
            for i, g in enumerate(conns):
                with contextlib.suppress(BlockingIOError):
                    n = g.sock.send(pending[i])
                    sent += n
                    moved = moved or n > 0
                    pending[i] = pending[i][n:] or memoryview(chunk)
            ctl.words[PROGRESS] = sent
            now = time.monotonic()
            if moved:
                last_sent = now
            else:
                if now - last_sent > 0.3:  # every connection blocked for a while: piled up
                    ctl.ready()
                time.sleep(0.005)
        # What did come back is well formed: the replies, in order (PROTOCOL.md §5).
        first = conns[0]
        first.sock.settimeout(TIMEOUT)
        assert first.read() == [1000, OK, None]
        reply = first.read()
        assert reply[:2] == [5000, INVALID] and "unknown op" in reply[2], reply
        for g in conns:
            g.close()
        return {"sent": sent}

    return run


def test_unread_replies(world: Callable[..., World]) -> None:
    w = world()
    before = rss_anon(w.daemon)
    attack = w.attack(unread_replies(w.path, "deaf", UNREAD_CONNECTIONS))
    attack.wait_ready()  # every connection stopped taking requests: the daemon pushes back
    grown = rss_anon(w.daemon) - before
    w.served()
    grown = max(grown, rss_anon(w.daemon) - before)
    attack.assert_running()
    report = attack.join()
    assert report["sent"] > 0
    per_connection = grown / UNREAD_CONNECTIONS
    assert per_connection <= MIB, f"tmemd grew {per_connection / MIB:.2f} MiB per connection"
    w.finish((ATTACKER, "deaf0", effective_name(ATTACKER, "deaf0")))


# ================================================================================================
# 4. Legal but heavy


def heavy_batches(path: str, name: str) -> Target:
    """Pipelined PUT_MANY and GET_MANY of max_batch 64 KiB pages (entries naming overlapping
    frames of a small region): all legal, each batch 256 MiB of copying."""

    def run(ctl: Control) -> dict[str, Any]:
        g, limits, _ = hello(path, name, frames=64)
        batch = limits["max_batch"]
        handle, size = g.ok(Op.NEW_POOL, pool_flags(persistent=False, order=4), None)
        assert size == 16 * PAGE
        for f in range(64):
            g.frame(f)[:] = bytes([f]) * PAGE
        entries = [x for k in range(batch) for x in (k % 7, k, (k * 5) % 49)]
        outstanding: deque[int] = deque()
        answered = 0
        while not ctl.stopped or outstanding:
            while not ctl.stopped and len(outstanding) < 2:
                op = Op.PUT_MANY if (answered + len(outstanding)) % 3 else Op.GET_MANY
                outstanding.append(g.request(op, handle, entries))
            result = g.expect(outstanding.popleft(), OK)
            assert len(result) == batch and all(type(r) is bool for r in result)
            answered += 1
            ctl.tick()
            if answered == 2:
                ctl.ready()
        g.close()
        return {"batches": answered, "max_batch": batch}

    return run


def test_legal_but_heavy(world: Callable[..., World]) -> None:
    w = world()
    report = w.survive(heavy_batches(w.path, "heavy"))
    assert report["max_batch"] == 4096 and report["batches"] > 2
    w.finish((ATTACKER, "heavy", effective_name(ATTACKER, "heavy")))


# ================================================================================================
# 5. A region on hugetlbfs


HUGE = 2 * MIB


def hugetlb_memfd() -> int:
    """A sealed memfd on hugetlbfs, sized for one huge page (raises OSError if the kernel
    cannot make one)."""
    fd = os.memfd_create("tmem-huge", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, HUGE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd


def hugetlb_hello(path: str, name: str) -> Target:
    """HELLO again and again with a region on hugetlbfs; each must be refused."""

    def run(ctl: Control) -> dict[str, Any]:
        refusals: set[str] = set()
        tries = 0
        while not ctl.stopped:
            fd = hugetlb_memfd()
            g = Raw(Path(path))
            g.send(encode_frame([Op.HELLO, 1, PROTOCOL_VERSION, name, HUGE // PAGE]), [fd])
            os.close(fd)
            refusals.add(g.refused(1, INVALID, "hugetlbfs"))
            g.close()
            tries += 1
            ctl.tick()
            ctl.ready()
        return {"tries": tries, "refusals": sorted(refusals)}

    return run


def test_hugetlbfs_region_is_refused(world: Callable[..., World]) -> None:
    try:
        os.close(hugetlb_memfd())
    except OSError as exc:
        pytest.skip(f"this kernel makes no sealed hugetlbfs memfd: {exc}")
    w = world()
    report = w.survive(hugetlb_hello(w.path, "huge"))
    assert report["tries"] >= 2 and report["refusals"]
    w.finish((ATTACKER, "huge", effective_name(ATTACKER, "huge")))


# ================================================================================================
# 6. Descriptor exhaustion

FD_LIMIT = 48


def low_fd_limit() -> None:
    """In the daemon's process before exec: soft and hard RLIMIT_NOFILE at FD_LIMIT (tmemd
    raises its soft limit to the hard one)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def exhaust_fds(path: str, name: str, count: int) -> Target:
    """Open ``count`` connections, each sending a whole HELLO with its region fd, more than
    tmemd has descriptors for; hold them until told to stop."""

    def run(ctl: Control) -> dict[str, Any]:
        fd, region = create_region(1)
        conns = []
        try:
            for i in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                s.setblocking(False)
                try:
                    s.connect(path)
                except BlockingIOError:  # the listen backlog is full
                    s.close()
                    break
                conns.append(s)
                frame = encode_frame([Op.HELLO, 1, PROTOCOL_VERSION, f"{name}{i}", 1])
                assert socket.send_fds(s, [frame], [fd]) == len(frame)
            ctl.ready()
            while not ctl.stopped:
                time.sleep(0.01)
            return {"connections": len(conns)}
        finally:
            for s in conns:
                s.close()
            region.close()
            os.close(fd)

    return run


def test_descriptor_exhaustion(world: Callable[..., World]) -> None:
    w = world(preexec_fn=low_fd_limit)
    assert w.daemon.wait_event("fd_limit")[0]["soft"] == FD_LIMIT
    assert w.base_fds < FD_LIMIT - 8
    attack = w.attack(exhaust_fds(w.path, "fd", 2 * FD_LIMIT))
    attack.wait_ready()
    failed = w.daemon.wait_event("accept_failed")[0]
    assert failed["error"] == "EMFILE", failed
    assert w.daemon.alive
    w.served()  # connected before: served though tmemd cannot accept anyone now
    attack.assert_running()
    report = attack.join()
    assert report["connections"] > FD_LIMIT - w.base_fds
    # The extra connections closed: tmemd accepts again (its backoff retries), serves a new
    # guest, and the first attacker name connects again.
    w.finish((ATTACKER, "fd0", effective_name(ATTACKER, "fd0")))


# ================================================================================================
# 7. Loan overdraft

AUDIT_CONFIG = "[limits]\naudit_ms = 50\n"
CHUNK_PAGES = 64  # an attacker writing in chunks looks for its notice between two
FAR = 48 * MIB  # "far beyond": its files have room for the machine's memory, not the budget's


def overdraw_loan(path: str, name: str) -> Target:
    """A lending guest that writes its loan file beyond what was lent: first a little past the
    slack (the audit punches that back, again and again, and leaves it connected), then 48 MiB
    more (the audit punches it and closes the guest)."""

    def run(ctl: Control) -> dict[str, Any]:
        g, _, fds = hello(path, name, frames=16, mapped=True, lend=True)
        assert len(fds) == 2
        loan_fd = fds[1]
        loan = mmap.mmap(loan_fd, PAGE + FAR)
        lent = g.ok(Op.LEND, MIB)["lent"]
        assert lent == MIB
        allowed = lent + (1 + LOAN_SLACK_SLOTS) * PAGE  # what the audit lets it hold
        over = allowed + (OVERDRAW_CLOSE_SLOTS // 2) * PAGE  # punched, not closed
        mine = bytes(range(256)) * (lent // 256)
        punches = 0
        while not ctl.stopped:
            loan[PAGE : PAGE + lent] = mine
            loan[PAGE + lent : over] = b"\x5a" * (over - PAGE - lent)
            wait_until(lambda: resident(loan_fd) <= allowed, "the audit punched the overdraft")
            assert loan[PAGE : PAGE + lent] == mine  # what was lent is its own: untouched
            assert g.ok(Op.PING) is None  # not closed for a little overdraft
            punches += 1
            ctl.tick()
            ctl.ready()
        # Far more, a chunk at a time, stopping once told (what it wrote after tmemd let go of
        # the file would be its own memory).
        chunk = CHUNK_PAGES * PAGE
        notice = None
        written = lent
        for start in range(PAGE + lent, PAGE + FAR, chunk):
            loan[start : start + chunk] = b"\xc3" * chunk
            written += chunk
            notice = notice_or_eof(g)
            if notice is not None:
                break
        if notice is None:
            notice = g.read()
        assert notice is not EOF and notice[:2] == [0, PROTOCOL], notice
        g.expect_closed()
        wait_until(lambda: resident(loan_fd) <= allowed + chunk, "the overdraft was punched")
        return {"punches": punches, "notice": notice[2], "written": written, "lent": lent}

    return run


def test_loan_overdraft(world: Callable[..., World]) -> None:
    w = world(config=AUDIT_CONFIG)
    attack = w.attack(overdraw_loan(w.path, "overdraw"))
    attack.wait_ready()
    w.served_during(attack)  # punched again and again while the victim is served
    attack.assert_running()
    report = attack.join()
    # It wrote more than the audit lets pass before it closes a guest.
    excess = report["written"] - report["lent"] - (1 + LOAN_SLACK_SLOTS) * PAGE
    assert excess > OVERDRAW_CLOSE_SLOTS * PAGE
    assert "not granted" in report["notice"]
    name = effective_name(ATTACKER, "overdraw")
    punched = [e for e in w.daemon.events("guest_memory_punched") if e["guest"] == name]
    assert punched and all(e["loan_pages"] > 0 for e in punched)
    closed = [e for e in w.daemon.events("guest_overdrawn") if e["guest"] == name]
    assert closed and closed[0]["action"] == "closed" and closed[0]["loan_pages"] > 0
    w.finish((ATTACKER, "overdraw", name))


# ================================================================================================
# 8. Touching the holes of a mirror


def touch_mirror(path: str, name: str) -> Target:
    """A mapped guest reading one byte of every page of a span of its mirror: reading a hole of
    a shmem file makes the kernel allocate it. First a span a little past the slack (punched,
    again and again), then 48 MiB of it (punched and closed)."""

    def run(ctl: Control) -> dict[str, Any]:
        g, limits, fds = hello(path, name, frames=16, mapped=True)
        assert len(fds) == 1
        mirror_fd, slots = fds[0], limits["map"]
        assert slots * PAGE > FAR
        mirror = mmap.mmap(mirror_fd, FAR, prot=mmap.PROT_READ)
        span = range(1024, 1024 + MIRROR_SLACK_SLOTS + OVERDRAW_CLOSE_SLOTS // 2)
        punches = 0
        while not ctl.stopped:
            assert sum(mirror[s * PAGE] for s in span) == 0  # holes read as zeros
            wait_until(
                lambda: resident(mirror_fd) <= MIRROR_SLACK_SLOTS * PAGE,
                "the audit punched the touched holes",
            )
            assert g.ok(Op.PING) is None  # not closed for a little
            punches += 1
            ctl.tick()
            ctl.ready()
        notice = None
        touched = 0
        for start in range(0, FAR // PAGE, CHUNK_PAGES):
            assert sum(mirror[s * PAGE] for s in range(start, start + CHUNK_PAGES)) == 0
            touched += CHUNK_PAGES
            notice = notice_or_eof(g)
            if notice is not None:
                break
        if notice is None:
            notice = g.read()
        assert notice is not EOF and notice[:2] == [0, PROTOCOL], notice
        g.expect_closed()
        wait_until(
            lambda: resident(mirror_fd) <= (MIRROR_SLACK_SLOTS + CHUNK_PAGES) * PAGE,
            "the touched mirror was punched",
        )
        return {"punches": punches, "notice": notice[2], "touched": touched}

    return run


def test_mirror_hole_touching(world: Callable[..., World]) -> None:
    w = world(config=AUDIT_CONFIG)
    report = w.survive(touch_mirror(w.path, "toucher"))
    assert report["touched"] > MIRROR_SLACK_SLOTS + OVERDRAW_CLOSE_SLOTS
    assert "not granted" in report["notice"]
    name = effective_name(ATTACKER, "toucher")
    punched = [e for e in w.daemon.events("guest_memory_punched") if e["guest"] == name]
    assert punched and all(e["mirror_pages"] > 0 for e in punched)
    closed = [e for e in w.daemon.events("guest_overdrawn") if e["guest"] == name]
    assert closed and closed[0]["action"] == "closed" and closed[0]["mirror_pages"] > 0
    w.finish((ATTACKER, "toucher", name))


# ================================================================================================
# 9. Escaping a cap by renaming

CAP = MIB


def rename_around_cap(path: str, names: list[str]) -> Target:
    """One uid connects under its listed name and unlisted ones (the last one borrowing a
    quarter of the cap first, and asking for far more every round), and puts persistent and
    ephemeral pages under each, more than its cap."""

    def run(ctl: Control) -> dict[str, Any]:
        guests = []
        for i, name in enumerate(names):
            lending = i == len(names) - 1
            g, _, fds = hello(path, name, frames=16, mapped=lending, lend=lending)
            for fd in fds:
                os.close(fd)
            for f in range(16):  # pages that do not pack: each costs a slot (design.md §6.11)
                g.frame(f)[:] = random.Random(f).randbytes(PAGE)
            if lending:
                assert g.ok(Op.LEND, CAP // 4)["lent"] == CAP // 4
            pers, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=True), None)
            eph, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=False), None)
            guests.append((g, pers, eph, lending))
        kept: list[set[int]] = [set() for _ in guests]  # persistent pages stored, per guest
        refused = eph_refused = lent_most = rounds = 0
        while not ctl.stopped:
            base = min(rounds, 8) * 64  # new pages for 8 rounds, then the same ones again
            entries = [x for k in range(base, base + 64) for x in (1, k, k % 16)]
            lent = 0
            for (g, pers, eph, lending), stored in zip(guests, kept, strict=True):
                results = g.ok(Op.PUT_MANY, pers, entries)
                for k, ok in zip(range(base, base + 64), results, strict=True):
                    if ok:
                        stored.add(k)
                    else:
                        refused += 1
                        stored.discard(k)  # a refused put of an existing page removes it
                eph_refused += sum(not ok for ok in g.ok(Op.PUT_MANY, eph, entries))
                if lending:
                    lent = g.ok(Op.LEND, 8 * MIB)["lent"]
                    lent_most = max(lent_most, lent)
            held = sum(len(s) for s in kept) * PAGE
            assert held + lent <= CAP, (held, lent)
            rounds += 1
            ctl.tick()
            if refused:
                ctl.ready()
        for g, *_ in guests:
            g.close()
        return {
            "rounds": rounds,
            "refused": refused,
            "eph_refused": eph_refused,
            "persistent": sum(len(s) for s in kept) * PAGE,
            "lent_most": lent_most,
        }

    return run


@needs_root
def test_escaping_a_cap_by_renaming(world: Callable[..., World]) -> None:
    config = f'[uids.{ATTACKER}]\ncap = "1MiB"\n\n[guests.listed]\nuids = [{ATTACKER}]\n'
    w = world(config=config)
    names = ["listed", "alias1", "alias2"]
    effective = ["listed", *(effective_name(ATTACKER, n) for n in names[1:])]

    def held() -> int:
        (row,) = [r for r in w.admin.call("uids") if r["uid"] == ATTACKER]
        assert row["cap"] == CAP
        rows = [r for r in w.admin.call("guests") if r["name"] in effective]
        by_rows = sum(r["persistent_bytes"] + r["ephemeral_bytes"] + r["lent_bytes"] for r in rows)
        assert row["held_bytes"] <= CAP and by_rows <= CAP, (row, rows)
        return int(row["held_bytes"])

    attack = w.attack(rename_around_cap(w.path, names))
    deadline = time.monotonic() + 2 * TIMEOUT
    while attack.words[STATE] == RUNNING:  # sampled all the way up to the cap
        held()
        assert time.monotonic() < deadline, "the attacker never reached its cap"
        time.sleep(0.005)
    attack.wait_ready()
    (row,) = [r for r in w.admin.call("uids") if r["uid"] == ATTACKER]
    assert sorted(row["guests"]) == sorted(effective)
    assert held() > CAP // 2  # it did fill up to its cap
    w.served()
    held()
    attack.assert_running()
    report = attack.join()
    assert report["refused"] > 0, report  # puts past the cap were refused
    assert report["lent_most"] >= CAP // 4  # (and within the cap with its pages, each round)
    w.finish((ATTACKER, "listed", "listed"), (ATTACKER, "alias1", effective[1]))


# ================================================================================================
# 10. Mapped PUT_MANY bigger than the budget


def mapped_overflow(path: str, name: str) -> Target:
    """A mapped guest's PUT_MANY batches bigger than the whole budget: every result must be a
    token [head, generation] or false (PROTOCOL.md §4.7), and a persistent page's token must
    read back, through the mirror, the page it stored."""

    def run(ctl: Control) -> dict[str, Any]:
        g, limits, fds = hello(path, name, frames=16, mapped=True)
        assert len(fds) == 1
        slots, batch = limits["map"], limits["max_batch"]
        mirror = mmap.mmap(fds[0], os.fstat(fds[0]).st_size, prot=mmap.PROT_READ)
        gens = memoryview(mirror)[slots * PAGE : slots * PAGE + 8 * slots].cast("Q")
        for f in range(16):
            g.frame(f)[:] = bytes([f + 1]) * PAGE
        bad: list[str] = []
        stored = refused = rounds = 0
        while not ctl.stopped:
            for persistent, order in ((False, 1), (True, 0)):
                handle, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=persistent, order=order), None)
                top = 16 - (1 << order) + 1
                entries = [x for k in range(batch) for x in (3, k, k % top)]
                results = g.ok(Op.PUT_MANY, handle, entries)
                assert len(results) == batch
                for k, r in enumerate(results):
                    if r is False:
                        refused += 1
                        continue
                    if not (
                        type(r) is list
                        and len(r) == 2
                        and all(type(x) is int for x in r)
                        and 0 <= r[0] < slots
                        and r[1] > 0
                    ):
                        bad.append(repr(r))
                        continue
                    stored += 1
                    if persistent:  # never evicted: its token reads back the page it stored
                        head, gen = r
                        assert gens[head] == gen
                        page = mirror[head * PAGE : (head + 1) * PAGE]
                        assert page == bytes([k % top + 1]) * PAGE
                        assert gens[head] == gen
                g.ok(Op.DESTROY_POOL, handle)
            rounds += 1
            ctl.tick()
            ctl.ready()
        gens.release()
        g.close()
        return {"bad": bad[:5], "bad_count": len(bad), "stored": stored, "refused": refused}

    return run


def test_mapped_put_many_bigger_than_the_budget(world: Callable[..., World]) -> None:
    w = world()
    report = w.survive(mapped_overflow(w.path, "overflow"))
    assert report["bad_count"] == 0, report["bad"]  # never nil, never a bare true
    assert report["stored"] > 0 and report["refused"] > 0  # bigger than the budget
    w.finish((ATTACKER, "overflow", effective_name(ATTACKER, "overflow")))


# ================================================================================================
# 11. Handshake strictness


def _hello_body(op: Any, req_id: Any, name: str, **pack: Any) -> bytes:
    return bytes(msgpack.packb([op, req_id, PROTOCOL_VERSION, name, 16], **pack))


STRICT: dict[str, Callable[[str], bytes]] = {
    "req_id 2": lambda name: _hello_body(30, 2, name),
    "req_id 0": lambda name: _hello_body(30, 0, name),
    "req_id 1.0": lambda name: _hello_body(30, 1.0, name),
    "req_id true": lambda name: _hello_body(30, True, name),
    "op 30.0": lambda name: _hello_body(30.0, 1, name),
    "op 30.0 float32": lambda name: _hello_body(30.0, 1, name, use_single_float=True),
}


def strict_hellos(path: str, name: str) -> Target:
    """HELLOs whose op or req_id is not the uint the spec asks for, again and again: each gets
    one PROTOCOL reply and a close; a HELLO whose req_id 1 is a uint 32 (any integer format is
    an integer, PROTOCOL.md §3) is served."""

    def run(ctl: Control) -> dict[str, Any]:
        fd, region = create_region(16)
        seen: dict[str, Any] = {}
        rounds = 0
        while not ctl.stopped:
            for case, body in STRICT.items():
                g = Raw(Path(path))
                g.send(frame_of(body(name)), [fd])
                reply = g.read()
                closed = g.read() is EOF if reply is not EOF else True
                seen[case] = [reply if reply is not EOF else "EOF", closed]
                g.close()
            g = Raw(Path(path))
            uint32_one = b"\xce\x00\x00\x00\x01"
            good = b"\x95\x1e" + uint32_one + msgpack.packb(PROTOCOL_VERSION)
            good += msgpack.packb(f"{name}{rounds}") + msgpack.packb(16)
            g.send(frame_of(good), [fd])
            seen["req_id 1 as uint32"] = [g.read(), None]
            g.ok(Op.PING)
            g.close()
            rounds += 1
            ctl.tick()
            ctl.ready()
        region.close()
        os.close(fd)
        return {"rounds": rounds, "seen": seen}

    return run


def test_handshake_strictness(world: Callable[..., World]) -> None:
    w = world()
    report = w.survive(strict_hellos(w.path, "strict"))
    for case in STRICT:
        reply, closed = report["seen"][case]
        assert reply != "EOF", f"{case}: closed without a reply"
        # One HELLO reply [1, PROTOCOL, message], then the close (PROTOCOL.md §4.4, §8).
        assert reply[:2] == [1, PROTOCOL] and type(reply[2]) is str and reply[2], (case, reply)
        assert closed, f"{case}: the connection stayed open"
    reply, _ = report["seen"]["req_id 1 as uint32"]
    assert reply[:2] == [1, OK], reply
    w.finish((ATTACKER, "strict0", effective_name(ATTACKER, "strict0")))


# ================================================================================================
# 12. Work on the way out

EXIT_PAGES = 20_000


def fill_and_leave(path: str, name: str, mode: str) -> Target:
    """Fill tens of thousands of persistent pages, then leave abruptly (a last batch sent and
    not waited for) or FLUSH_OBJECT them all (one huge object); again and again."""

    def connect() -> Raw:
        deadline = time.monotonic() + TIMEOUT
        while True:  # the previous account may still be on its way out (CONFLICT)
            fd, region = create_region(16)
            g = Raw(Path(path))
            g.fd, g.region = fd, region
            g.send(encode_frame([Op.HELLO, 1, PROTOCOL_VERSION, name, 16]), [fd])
            reply = g.read()
            if reply is not EOF and reply[:2] == [1, OK]:
                return g
            assert reply is not EOF and reply[:2] == [1, CONFLICT], reply
            g.close()
            assert time.monotonic() < deadline, "the previous account never went away"
            time.sleep(0.01)

    def run(ctl: Control) -> dict[str, Any]:
        g: Raw | None = None
        rounds = stored = 0
        while not ctl.stopped:
            if g is None:
                g = connect()
            handle, _ = g.ok(Op.NEW_POOL, pool_flags(persistent=True), None)
            for start in range(0, EXIT_PAGES, 4096):
                keys = range(start, min(EXIT_PAGES, start + 4096))
                entries = [x for k in keys for x in (1, k, k % 16)]
                if mode == "disconnect" and keys[-1] == EXIT_PAGES - 1:
                    g.request(Op.PUT_MANY, handle, entries)  # and leave without the answer
                    g.close()
                    g = None
                    break
                stored += sum(1 for ok in g.ok(Op.PUT_MANY, handle, entries) if ok)
            if g is not None:
                assert g.ok(Op.FLUSH_OBJECT, handle, 1) is None
                g.ok(Op.DESTROY_POOL, handle)
            rounds += 1
            ctl.tick()
            ctl.ready()
        if g is not None:
            g.close()
        return {"rounds": rounds, "stored": stored}

    return run


@pytest.mark.parametrize("mode", ["disconnect", "flush_object"])
def test_work_on_the_way_out(world: Callable[..., World], mode: str) -> None:
    w = world("128MiB")
    attack = w.attack(fill_and_leave(w.path, "leaver", mode))
    attack.wait_ready()
    w.served_during(attack)  # while the pages of one round after another are being freed
    attack.assert_running()
    report = attack.join()
    assert report["rounds"] >= 2 and report["stored"] >= EXIT_PAGES
    w.finish((ATTACKER, "leaver", effective_name(ATTACKER, "leaver")))
