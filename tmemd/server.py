"""The guest server: a thin trio adapter between Unix-socket connections and Sessions.

One task per connection (tmemd/connection.py serves it once the handshake is done). A
connection's failure is caught and logged in its own handler and never reaches the server's
nursery, so no guest can take another down: whatever goes wrong while serving one guest, its
session is closed (pools freed, loan taken back, account dropped with its last connection) and
every descriptor it cost is closed.

Beside the connections, one maintenance task (``maintain``) does the work no single request
should pay for: freeing big pools and punching big ranges of memory in slices and worker
threads (Store.reap, Store.later_work), and auditing what guests hold in the files they map
(Store.audit).
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import socket
from collections import Counter
from typing import Any, Protocol

import structlog
import trio

from tmemclient.wire import ring as rings_mod
from tmemclient.wire.codec import HEADER, decode_body
from tmemclient.wire.errors import ProtocolError, TmemError, VersionMismatch
from tmemclient.wire.fds import close_all
from tmemclient.wire.layout import FRAME_SIZE, ring_bytes
from tmemclient.wire.messages import (
    HELLO_MAX_FRAME,
    PROTOCOL_VERSION,
    Hello,
    Status,
    encode_reply,
    status_for_error,
)
from tmemclient.wire.messages import Limits as WireLimits
from tmemclient.wire.ring import Rings
from tmemclient.wire.spingate import SpinGate
from tmemd.accounts import StoreError
from tmemd.config import GuestPolicy, Limits
from tmemd.connection import RECV_SIZE, Connection
from tmemd.host import Host
from tmemd.poller import RingPoller
from tmemd.region import hello_fds, map_region, peer_credentials
from tmemd.session import Session, protocol_error_reply

log = structlog.get_logger("tmemd.server")
audit_log = structlog.get_logger("tmemd.audit")

# accept() errors that mean "out of something, for now": back off and go on (as trio's
# serve_listeners does); the connection stays queued in the backlog meanwhile.
_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF = 0.1  # seconds
ADMIN_WAIT = 0.002  # seconds a guest's turn waits for a ready admin request to be served
REAP_STEP = 2048  # pages a maintenance step frees at most before the others get a turn
AUDIT_STEP = 64  # guests one maintenance step audits before the others get a turn


async def send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    """Write every byte (a stream socket may take a part at a time)."""
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class AdminGate(Protocol):
    """What a guest's turn asks of the admin server: is an administrator's request ready, and
    wait (briefly) until it is served. The admin socket goes ahead of guests."""

    def waiting(self) -> bool: ...

    async def served(self) -> None: ...


class GuestServer:
    """Accepts guest connections on a listening Unix socket and serves them against a Store."""

    def __init__(self, host: Host, limits: Limits) -> None:
        self.host = host
        self.store = host.store
        self.limits = limits
        self.connections = 0
        self._per_uid: Counter[int] = Counter()
        self._turns: dict[int, trio.Lock] = {}  # per connected uid: who of it serves now
        self._accepting = trio.CancelScope()
        self._conns: dict[Session, Connection] = {}  # connections in their serving loop
        self._raw: set[socket.socket] = set()  # their sockets (shutdown wakes them)
        self.gate = SpinGate()  # watch rings only while the machine has a CPU to spare
        self.poller = RingPoller(self)  # serves every connection's rings (``poller.run``)
        self.admin_gate: AdminGate | None = None
        self.stopping = False
        self.grace_deadline = float("inf")
        # One receive buffer for every connection: each copies what it read out at once.
        self._recv_buf = bytearray(RECV_SIZE)
        self.recv_view = memoryview(self._recv_buf)
        self._work = trio.Event()  # set when the store has deferred work for ``maintain``
        self.accept_errors = 0

    async def run(
        self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until ``shutdown``; return when every connection has ended."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno not in _ACCEPT_RETRY:
                            raise
                        self._accept_failed(exc)
                        await trio.sleep(ACCEPT_BACKOFF)
                        continue
                    nursery.start_soon(self._serve, sock)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (or memory) for a new connection: say so, not too often."""
        self.accept_errors += 1
        if self.accept_errors & (self.accept_errors - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
            log.warning(
                "accept_failed",
                error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                times=self.accept_errors,
                connections=self.connections,
                hint="tmemd is out of file descriptors: raise LimitNOFILE, or lower "
                "max_connections / max_connections_per_uid; retrying",
            )

    def shutdown(self, grace: float) -> None:
        """Stop accepting; tell every guest the daemon is going away (a SHUTDOWN notice, req_id
        0); keep serving what they send for at most ``grace`` seconds, closing each connection
        once its guest goes quiet (``drain_idle``) or closes it."""
        self.stopping = True
        self.grace_deadline = trio.current_time() + grace
        self._accepting.cancel()
        for raw in list(self._raw):
            # Wake connections idle in wait_readable so they send the notice now; the socket
            # stays open (the woken task sees ClosedResourceError and carries on).
            trio.lowlevel.notify_closing(raw)

    def turn_for(self, uid: int) -> trio.Lock:
        """The turn of tenant ``uid``: held by whichever of its connections serves now, so a
        tenant is served one connection at a time however many it opens (a fair lock: its
        connections take turns in order)."""
        turn = self._turns.get(uid)
        if turn is None:
            turn = self._turns[uid] = trio.Lock()
        return turn

    async def yield_turn(self) -> None:
        """A connection used up its turn: an administrator's ready request goes first, then
        every other task gets a turn."""
        gate = self.admin_gate
        if gate is not None and gate.waiting():
            with trio.move_on_after(ADMIN_WAIT):
                await gate.served()
        await trio.lowlevel.checkpoint()

    def wake_maintenance(self) -> None:
        """The store has deferred work: ``maintain`` should not wait for its next audit."""
        self._work.set()

    def kick(self, name: str, reason: str) -> int:
        """End every connection of guest ``name`` (with a PROTOCOL notice saying ``reason``);
        returns how many."""
        kicked = 0
        for conn in list(self._conns.values()):
            if conn.session.guest.name == name:
                conn.kick(reason)
                kicked += 1
        return kicked

    # ------------------------------------------------------------------ maintenance

    async def maintain(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deferred store work (dying pools freed a step at a time; big punches in a worker
        thread) and, every ``audit_ms``, kept named pools whose time is up freed and the audit
        of what guests hold in their files. Runs until cancelled."""
        store = self.store
        task_status.started()
        next_audit = trio.current_time()
        while True:
            if store.busy:
                later = store.later_work()
                if later is not None:
                    await trio.to_thread.run_sync(later.run)
                    store.finish(later)
                else:
                    store.reap(REAP_STEP)
                    await trio.lowlevel.checkpoint()
                continue
            now = trio.current_time()
            if now >= next_audit:
                # Named pools whose guest did not come back in reattach_seconds go (their
                # pages are freed by the steps above, a slice at a time).
                if self.host.expire_named():
                    continue
                await self._audit_all()
                next_audit = trio.current_time() + self.limits.audit_ms / 1000
                continue
            self._work = trio.Event()
            with trio.move_on_at(next_audit):
                await self._work.wait()

    async def _audit_all(self) -> None:
        """Hold every mapped guest to its grant (Store.audit); close one that took far more."""
        store = self.store
        guests = [g for g in store.guests.values() if g.mirror is not None or g.loan is not None]
        for i, guest in enumerate(guests):
            if i and i % AUDIT_STEP == 0:
                await trio.lowlevel.checkpoint()
            if store.guests.get(guest.name) is not guest:
                continue  # gone meanwhile
            try:
                found = store.audit(guest)
            except OSError as exc:  # pragma: no cover - fstat/lseek of our own memfd
                log.error("audit_failed", guest=guest.name, error=str(exc))
                continue
            if not found:
                continue
            if found.close:
                audit_log.warning(
                    "guest_overdrawn",
                    guest=guest.name,
                    loan_pages=found.loan,
                    mirror_pages=found.mirror,
                    action="closed",
                )
                self.kick(
                    guest.name,
                    "it held memory it was not granted (its loan file above what is lent, or "
                    "pages of its mirror it holds nothing in); see PROTOCOL.md §4.7, §4.8",
                )
            else:
                log.info(
                    "guest_memory_punched",
                    guest=guest.name,
                    loan_pages=found.loan,
                    mirror_pages=found.mirror,
                )

    # ------------------------------------------------------------------ connections

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        try:
            pid, uid, _gid = peer_credentials(sock)  # type: ignore[arg-type]
        except OSError:
            sock.close()
            return
        with sock:
            if not self._admit(uid):
                await self._refuse(sock, pid, uid)
                return
            self.connections += 1
            self._per_uid[uid] += 1
            try:
                await self._serve_admitted(sock, pid, uid)
            except Exception:
                log.exception("connection_failed", pid=pid, uid=uid)
            finally:
                self.connections -= 1
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
                    self._turns.pop(uid, None)

    def _admit(self, uid: int) -> bool:
        per_uid = self.host.max_connections(uid, self.limits.max_connections_per_uid)
        return self.connections < self.limits.max_connections and self._per_uid[uid] < per_uid

    async def _refuse(self, sock: trio.socket.SocketType, pid: int, uid: int) -> None:
        log.warning("connection_refused", pid=pid, uid=uid, reason="connection limit")
        with trio.move_on_after(1), _quiet():
            await send_all(
                sock, encode_reply(0, Status.LIMIT, "too many connections; try again later")
            )

    async def _serve_admitted(self, sock: trio.socket.SocketType, pid: int, uid: int) -> None:
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                hello, region_fd, leftover = await self._read_hello(sock)
        except trio.TooSlowError:
            log.info("handshake_timeout", pid=pid, uid=uid)
            with trio.move_on_after(1), _quiet():
                await send_all(sock, protocol_error_reply(ProtocolError("no HELLO in time")))
            return
        except TmemError as exc:  # ProtocolError, or InvalidArgument from Hello.decode
            log.info("handshake_refused", pid=pid, uid=uid, reason=str(exc))
            with trio.move_on_after(1), _quiet():
                await send_all(sock, encode_reply(1, status_for_error(exc), str(exc)))
            return
        try:
            name, policy, region = self._open_region(hello, region_fd, uid)
        except TmemError as exc:
            log.info("handshake_refused", pid=pid, uid=uid, reason=str(exc))
            with trio.move_on_after(1), _quiet():
                await send_all(sock, encode_reply(1, status_for_error(exc), str(exc)))
            return
        finally:
            os.close(region_fd)
        try:
            await self._run_session(sock, pid, uid, name, policy, hello, region, leftover)
        except TmemError as exc:  # refused by the host (a name already connected)
            log.info("handshake_refused", pid=pid, uid=uid, reason=str(exc))
            with trio.move_on_after(1), _quiet():
                await send_all(sock, encode_reply(1, status_for_error(exc), str(exc)))
        finally:
            try:
                region.close()
            except BufferError:  # pragma: no cover - a view escaped; the mmap is freed with it
                log.error("region_still_referenced", guest=name)

    async def _read_hello(self, sock: trio.socket.SocketType) -> tuple[Hello, int, bytes]:
        """The HELLO frame and the one fd that came with its first byte."""
        data, ancdata, flags, _ = await sock.recvmsg(
            HELLO_MAX_FRAME + 4, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
        )
        fds = hello_fds(ancdata, flags)
        try:
            if not data:
                raise ProtocolError("connection closed before HELLO")
            if len(fds) != 1:
                raise ProtocolError("HELLO must carry exactly one fd (the region memfd)")
            buf = bytearray(data)
            while len(buf) < 4 or len(buf) < 4 + HEADER.unpack_from(buf)[0]:
                if len(buf) >= 4 and HEADER.unpack_from(buf)[0] > HELLO_MAX_FRAME:
                    raise ProtocolError(f"HELLO frame is larger than {HELLO_MAX_FRAME} bytes")
                # Room for an fd, so one sent with a later piece is seen (and refused) rather
                # than dropped by the kernel unnoticed.
                more, ancdata, flags, _ = await sock.recvmsg(
                    HELLO_MAX_FRAME, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
                )
                extra = hello_fds(ancdata, flags)
                if extra:
                    close_all(extra)
                    raise ProtocolError(
                        "HELLO must carry exactly one fd (the region memfd), with its first byte"
                    )
                if not more:
                    raise ProtocolError("connection closed in the middle of HELLO")
                buf += more
            (length,) = HEADER.unpack_from(buf)
            if not 0 < length <= HELLO_MAX_FRAME:
                raise ProtocolError(f"HELLO frame must be 1..{HELLO_MAX_FRAME} bytes")
            hello = Hello.decode(decode_body(bytes(buf[4 : 4 + length])))
        except BaseException:
            close_all(fds)
            raise
        return hello, fds[0], bytes(buf[4 + length :])

    def _open_region(self, hello: Hello, fd: int, uid: int) -> tuple[str, GuestPolicy, mmap.mmap]:
        if hello.version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"protocol version {hello.version} is not supported; this tmemd speaks "
                f"{PROTOCOL_VERSION}"
            )
        name, policy = self.host.guest_name(uid, hello.name)
        region = map_region(
            fd, hello.frames, self.limits.max_region_frames, extra=ring_bytes(hello.ring)
        )
        return name, policy, region

    async def _run_session(
        self,
        sock: trio.socket.SocketType,
        pid: int,
        uid: int,
        name: str,
        policy: GuestPolicy,
        hello: Hello,
        region: mmap.mmap,
        leftover: bytes,
    ) -> None:
        """Attach the guest, grant what it asked for, answer HELLO, serve it; and whatever
        happens after the attach, close its session (so its account, pools and loan go) and
        every fd it cost."""
        guest = self.host.attach(name, policy, uid=uid)  # GuestConflict: nothing to undo yet
        view = memoryview(region)
        pages = view[: hello.frames * FRAME_SIZE]
        session = Session(self.host, guest, pages, self.limits, uid=uid)
        self.host.join(session)
        rings: Rings | None = None
        fds: list[int] = []
        clog = log.bind(guest=name, pid=pid, uid=uid)
        reason = "closed by guest"
        conn: Connection | None = None
        try:
            granted = self._ring_grant(hello.ring)
            rings = Rings(view[len(pages) :], granted, "host") if granted else None
            mirror_fd = self._map_grant(guest) if hello.map else None
            session.mapped = mirror_fd is not None
            if mirror_fd is not None:
                fds.append(mirror_fd)
                if hello.lend and (loan_fd := self._lend_grant(guest)) is not None:
                    fds.append(loan_fd)
                    session.lending = True
            clog.info(
                "guest_connected",
                frames=hello.frames,
                ring=granted,
                mapped=session.mapped,
                lending=session.lending,
            )
            reply = WireLimits(
                version=PROTOCOL_VERSION,
                guest=name,
                frames=hello.frames,
                max_frame=self.limits.max_frame,
                max_batch=self.limits.max_batch,
                max_pools=self.limits.max_pools,
                ring=granted,
                map=0 if mirror_fd is None else self.store.capacity_slots,
                lend=self.store.capacity_slots if session.lending else 0,
            )
            answer = encode_reply(1, Status.OK, reply.to_wire())
            if not fds:
                await send_all(sock, answer)
            else:  # the mirror's read-only fd (and the loan's) ride on the reply's first byte
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = await sock.sendmsg([answer], rights)
                close_all(fds)
                fds = []
                await send_all(sock, answer[sent:])
            # The hot loop talks to the plain socket and waits with wait_readable: half the
            # per-request overhead of trio's socket wrappers (tmemd/connection.py).
            raw = socket.socket(fileno=sock.detach())
            raw.setblocking(False)
            conn = Connection(self, raw, session, rings, leftover)
            self._conns[session] = conn
            self._raw.add(raw)
            try:
                reason = await conn.run()
            finally:
                self._raw.discard(raw)
                raw.close()
        except (OSError, trio.BrokenResourceError) as exc:
            reason = f"connection error: {exc}"
        except trio.TooSlowError:
            reason = f"guest left replies unread for {self.limits.send_timeout}s"
        except Exception as exc:
            reason = f"internal error: {type(exc).__name__}"
            raise  # logged by _serve; the cleanup below still runs
        finally:
            self._conns.pop(session, None)
            close_all(fds)
            pools = len(session.pools)
            freed = 0
            try:
                freed = session.close()
            finally:
                traffic: dict[str, int] = {}
                if rings is not None:  # how much went through the rings rather than the socket
                    traffic = {"ring_request_bytes": rings.read, "ring_reply_bytes": rings.written}
                    rings.release()
                pages.release()
                view.release()
                if self.store.busy:
                    self.wake_maintenance()
                clog.info(
                    "guest_disconnected",
                    reason=reason,
                    requests=session.requests,
                    pools=pools,
                    pages_freed=freed,
                    **traffic,
                    **guest.stats.as_dict(),
                )

    def _map_grant(self, guest: Any) -> int | None:
        """A read-only fd of the guest's page mirror (made on its first ask), or None when the
        guest already holds pages outside one, mapping is off (``map_pages``), or tmemd is out
        of descriptors or memfds (the guest does without)."""
        if not self.limits.map_pages or not rings_mod.supported():
            return None  # off, or this machine does not keep the load order §4.7 needs
        try:
            return self.store.map_guest(guest).read_only_fd()
        except (StoreError, OSError):
            return None

    def _lend_grant(self, guest: Any) -> int | None:
        """A read-write fd of a new loan file for the guest (PROTOCOL.md §4.8), or None when
        lending is off (``lend_memory``) or another session of the guest borrows already."""
        if not self.limits.lend_memory:
            return None
        try:
            loan = self.store.open_loan(guest)
        except StoreError:
            return None
        try:
            return loan.writable_fd()
        except OSError:  # out of descriptors: the guest does without
            self.store.close_loan(guest)
            return None

    def _ring_grant(self, asked: int) -> int:
        """The rings a guest gets: what it asked for, if rings are on and this machine keeps
        their memory order (x86-64); else none, and it uses the socket alone."""
        if asked and asked <= self.limits.max_ring_frames and rings_mod.supported():
            return asked
        return 0


class _quiet:
    """Swallow the errors of a best-effort last word to a peer that may be gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError))
