"""The guest server: a thin trio adapter between Unix-socket connections and Sessions.

One task per connection. A connection's failure is caught and logged in its own handler and
never reaches the server's nursery, so no guest can take another down.

Per wakeup the connection drains every complete frame it has received, serves them in order and
sends all replies in one write: a guest that pipelines many requests pays one syscall pair for
the lot.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import time
from collections import Counter
from typing import Any

import structlog
import trio

from tmemclient import ring as rings_mod
from tmemclient.errors import ProtocolError, TmemError, VersionMismatch
from tmemclient.protocol import (
    FRAME_SIZE,
    HEADER,
    HELLO_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    Status,
    decode_body,
    encode_reply,
    status_for_error,
)
from tmemclient.protocol import (
    Limits as WireLimits,
)
from tmemclient.region import close_all
from tmemclient.ring import PollWindow, Rings, SpinGate, fence, ring_bytes
from tmemd.config import Limits
from tmemd.host import Host
from tmemd.region import fds_from_ancillary, map_region, peer_credentials
from tmemd.session import Session, protocol_error_reply
from tmemd.store import Guest, StoreError

log = structlog.get_logger("tmemd.server")

RECV_SIZE = 256 * 1024
_LET_OTHERS_RUN = 20e-6  # seconds a ring poll loop may run before other tasks get a turn
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's __and__ is Python code on the hot path
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


SHUTDOWN_NOTICE = encode_reply(0, Status.SHUTDOWN, "tmemd is shutting down; reconnect later")
DOORBELL_NOTICE = encode_reply(0, Status.OK, None)  # "replies are in your ring" (§4.6)


async def send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    """Write every byte (a stream socket may take a part at a time)."""
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class GuestServer:
    """Accepts guest connections on a listening Unix socket and serves them against a Store."""

    def __init__(self, host: Host, limits: Limits) -> None:
        self.host = host
        self.store = host.store
        self.limits = limits
        self.connections = 0
        self._per_uid: Counter[int] = Counter()
        self._accepting = trio.CancelScope()
        self._raw: set[socket.socket] = set()  # connections in their frame loop
        self._gate = SpinGate()  # watch rings only while the machine has a CPU to spare
        self.stopping = False
        self._grace_deadline = float("inf")

    async def run(
        self, listener: trio.socket.SocketType, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept connections until ``shutdown``; return when every connection has ended."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            with self._accepting:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._serve, sock)

    def shutdown(self, grace: float) -> None:
        """Stop accepting; tell every guest the daemon is going away (a SHUTDOWN notice, req_id
        0); keep serving what they send for at most ``grace`` seconds, closing each connection
        once its guest goes quiet (``drain_idle``) or closes it."""
        self.stopping = True
        self._grace_deadline = trio.current_time() + grace
        self._accepting.cancel()
        for raw in list(self._raw):
            # Wake connections idle in wait_readable so they send the notice now; the socket
            # stays open (the woken task sees ClosedResourceError and carries on).
            trio.lowlevel.notify_closing(raw)

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

    def _admit(self, uid: int) -> bool:
        return (
            self.connections < self.limits.max_connections
            and self._per_uid[uid] < self.limits.max_connections_per_uid
        )

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
            region, guest = self._open_region(hello, region_fd, uid)
        except TmemError as exc:
            log.info("handshake_refused", pid=pid, uid=uid, reason=str(exc))
            with trio.move_on_after(1), _quiet():
                await send_all(sock, encode_reply(1, status_for_error(exc), str(exc)))
            return
        finally:
            os.close(region_fd)
        try:
            await self._run_session(sock, pid, uid, guest, hello, region, leftover)
        finally:
            try:
                region.close()
            except BufferError:  # pragma: no cover - a view escaped; the mmap is freed with it
                log.error("region_still_referenced", guest=guest.name)

    async def _read_hello(self, sock: trio.socket.SocketType) -> tuple[Hello, int, bytes]:
        """The HELLO frame and the one fd that came with its first byte."""
        data, ancdata, flags, _ = await sock.recvmsg(
            HELLO_MAX_FRAME + 4, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
        )
        fds = fds_from_ancillary(ancdata, flags)
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
                extra = fds_from_ancillary(ancdata, flags)
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

    def _open_region(self, hello: Hello, fd: int, uid: int) -> tuple[mmap.mmap, Guest]:
        if hello.version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"protocol version {hello.version} is not supported; this tmemd speaks "
                f"{PROTOCOL_VERSION}"
            )
        name, policy = self.host.guest_name(uid, hello.name)
        region = map_region(
            fd, hello.frames, self.limits.max_region_frames, extra=ring_bytes(hello.ring)
        )
        try:
            return region, self.host.attach(name, policy)
        except BaseException:
            region.close()
            raise

    async def _run_session(
        self,
        sock: trio.socket.SocketType,
        pid: int,
        uid: int,
        guest: Guest,
        hello: Hello,
        region: mmap.mmap,
        leftover: bytes,
    ) -> None:
        name = guest.name
        view = memoryview(region)
        pages = view[: hello.frames * FRAME_SIZE]
        session = Session(self.host, guest, pages, self.limits)
        granted = self._ring_grant(hello.ring)
        rings = Rings(view[len(pages) :], granted, "host") if granted else None
        mirror_fd = self._map_grant(guest) if hello.map else None
        session.mapped = mirror_fd is not None
        fds = [] if mirror_fd is None else [mirror_fd]
        if (
            mirror_fd is not None
            and hello.lend
            and (loan_fd := self._lend_grant(guest)) is not None
        ):
            fds.append(loan_fd)
            session.lending = True
        self.host.join(session)
        clog = log.bind(guest=name, pid=pid, uid=uid)
        clog.info(
            "guest_connected",
            frames=hello.frames,
            ring=granted,
            mapped=mirror_fd is not None,
            lending=session.lending,
        )
        reason = "closed by guest"
        try:
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
            reason = await self._serve_frames(sock, session, leftover, rings)
        except (OSError, trio.BrokenResourceError) as exc:
            reason = f"connection error: {exc}"
        except trio.TooSlowError:
            reason = f"guest left replies unread for {self.limits.send_timeout}s"
        finally:
            close_all(fds)
            pools = len(session.pools)
            freed = session.close()
            traffic: dict[str, int] = {}
            if rings is not None:  # how much went through the rings rather than the socket
                traffic = {"ring_request_bytes": rings.read, "ring_reply_bytes": rings.written}
                rings.release()
            pages.release()
            view.release()
            clog.info(
                "guest_disconnected",
                reason=reason,
                requests=session.requests,
                pools=pools,
                pages_freed=freed,
                **traffic,
                **guest.stats.as_dict(),
            )

    def _map_grant(self, guest: Guest) -> int | None:
        """A read-only fd of the guest's page mirror (made on its first ask), or None when the
        guest already holds pages outside one, or mapping is off (``map_pages``)."""
        if not self.limits.map_pages or not rings_mod.supported():
            return None  # off, or this machine does not keep the load order §4.7 needs
        try:
            return self.store.map_guest(guest).read_only_fd()
        except StoreError:
            return None

    def _lend_grant(self, guest: Guest) -> int | None:
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

    async def _serve_frames(
        self,
        sock: trio.socket.SocketType,
        session: Session,
        leftover: bytes,
        rings: Rings | None = None,
    ) -> str:
        # The hot loop talks to the plain socket and waits with trio.lowlevel.wait_readable:
        # half the per-request overhead of trio's socket wrappers and a cancel scope per
        # read, measured on a ping-pong (40 us against 74 us, both pinned to one core).
        raw = socket.socket(fileno=sock.detach())
        raw.setblocking(False)
        self._raw.add(raw)
        try:
            return await self._frame_loop(raw, session, leftover, rings)
        finally:
            self._raw.discard(raw)
            raw.close()

    async def _frame_loop(
        self, raw: socket.socket, session: Session, leftover: bytes, rings: Rings | None
    ) -> str:
        decoder = FrameDecoder(self.limits.max_frame)
        decoder.feed(leftover)
        ring_decoder = FrameDecoder(self.limits.max_frame)
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        handle = session.handle
        anc_size = socket.CMSG_SPACE(4)
        notified = False
        waited = True  # did this round of reading wait (and so let other tasks run)?
        poller = select.poll()
        poller.register(raw, select.POLLIN)
        limits = self.limits
        watch = PollWindow(limits.ring_poll_us / 1e6, limits.ring_poll_max_us / 1e6)
        while True:
            replies: list[bytes] = []
            ring_served = False
            try:
                for message in decoder.messages():
                    replies.append(handle(message))
                if rings is not None and rings.pending():
                    await self._serve_ring(raw, rings, ring_decoder, handle, replies)
                    ring_served = waited = True  # (_poll_ring lets the others run)
                    replies = []
            except ProtocolError as exc:
                replies.append(protocol_error_reply(exc))
                await self._last_word(raw, b"".join(replies))
                return f"protocol error: {exc}"
            if replies:
                out = b"".join(replies) if len(replies) > 1 else replies[0]
                if out:  # doorbells are not answered
                    await self._send(raw, out)
            if self.stopping and not notified:
                notified = True
                await self._last_word(raw, SHUTDOWN_NOTICE)
            if rings is not None and not self.stopping and (ring_served or rings.pending()):
                # A guest on its ring: watch the ring, not the socket (a syscall per look);
                # _poll_ring looks at the socket now and then, and so do we before sleeping.
                if await self._poll_ring(raw, rings, poller, watch):
                    continue
                if not poller.poll(0):
                    if not await self._sleep(raw, rings, notified, watch):
                        return "daemon shutting down"
                    continue
            # recvmsg, not recv: fds sent after HELLO must be seen (closed, and the guest
            # dropped), not silently discarded by the kernel (DESIGN.md §4: only in the handshake).
            try:
                n, ancdata, msg_flags, _ = raw.recvmsg_into([buf], anc_size, _CMSG_CLOEXEC)
            except BlockingIOError:
                if rings is not None and (
                    rings.pending()
                    or (not self.stopping and await self._poll_ring(raw, rings, poller, watch))
                ):
                    continue
                if not await self._sleep(raw, rings, notified, watch):
                    return "daemon shutting down"
                waited = True
                continue
            if ancdata or msg_flags & _CTRUNC:
                with contextlib.suppress(ProtocolError):
                    close_all(fds_from_ancillary(ancdata, msg_flags))
                fd_error = ProtocolError("fds are accepted only with HELLO (one region memfd)")
                await self._last_word(raw, protocol_error_reply(fd_error))
                return f"protocol error: {fd_error}"
            if not n:
                return "closed by guest" if not decoder.buffered else "closed mid-frame"
            decoder.feed(view[:n])
            if not waited:
                # Data was there without waiting (a pipelining guest): let the others run too.
                await trio.lowlevel.checkpoint()
            waited = False

    async def _serve_ring(
        self,
        raw: socket.socket,
        rings: Rings,
        decoder: FrameDecoder,
        handle: Any,
        replies: list[bytes],
    ) -> None:
        """Serve the frames in the request ring, after ``replies`` (answers to socket frames,
        which came first). Replies go into the reply ring; one that does not fit there goes
        over the socket, as does everything after it (the guest matches replies by req_id), and
        so does every reply once the daemon is stopping.
        Raises ProtocolError for a malformed frame or a corrupt ring counter."""
        decoder.feed(rings.take())
        answers = replies + [handle(message) for message in decoder.messages()]
        # Once stopping, every reply takes the socket, behind the SHUTDOWN notice: a busy guest
        # reads its socket only when its ring is quiet.
        spilling = self.stopping
        spill: list[bytes] = []
        for reply in answers:
            if reply and (spilling or not rings.write(reply)):
                spilling = True
                spill.append(reply)
        fence()  # we stored the reply tail; now load the guest's "waiting" word
        if rings.peer_sleeping():
            spill.append(DOORBELL_NOTICE)
        if spill:
            await self._send(raw, b"".join(spill))

    async def _poll_ring(
        self, raw: socket.socket, rings: Rings, poller: select.poll, watch: PollWindow
    ) -> bool:
        """Watch the request ring for a while (``watch``: ``ring_poll_us``, grown towards
        ``ring_poll_max_us`` for a guest whose requests come in short gaps) before sleeping: a
        busy guest's next request is then picked up with no syscall and no wakeup on either
        side. Each round yields the CPU (a guest pinned to our core gets to run) and, when
        other guests are connected, lets their tasks run. Not while the machine has more
        runnable tasks than CPUs (SpinGate): then we would hold a CPU from the guests. True if
        a request arrived (in the ring or the socket)."""
        if not watch.window or not self._gate.open():
            watch.started = None
            return False
        clock = time.perf_counter
        now = watch.started = clock()
        deadline = now + watch.window
        others_at = now + _LET_OTHERS_RUN
        rounds = 0
        while True:
            if rings.pending():
                return True
            now = clock()
            if now > deadline:
                return False
            os.sched_yield()
            rounds += 1
            if rounds % 8 == 0 and poller.poll(0):
                return True
            if now > others_at and self.connections > 1:
                # A pass of trio's run loop costs more than a round here: take one every
                # _LET_OTHERS_RUN, so another guest's request waits at most that long.
                await trio.lowlevel.checkpoint()
                others_at = clock() + _LET_OTHERS_RUN

    async def _sleep(
        self, raw: socket.socket, rings: Rings | None, notified: bool, watch: PollWindow
    ) -> bool:
        """Wait for the guest's next word (``_wait_readable``). A guest with rings is told we
        sleep, so it rings the doorbell; then the ring is looked at once more, as a request
        stored before our word was seen needs no doorbell. How long the guest kept us waiting
        sizes the next watch of its ring."""
        if rings is None:
            return await self._wait_readable(raw, notified)
        rings.sleeping(True)
        fence()  # the guest stores its tail then loads our word; we the reverse
        try:
            if rings.pending():
                return True
            return await self._wait_readable(raw, notified)
        finally:
            rings.sleeping(False)
            watch.woke(time.perf_counter())

    async def _wait_readable(self, raw: socket.socket, notified: bool) -> bool:
        """Wait for the guest; False when, after the shutdown notice, it stayed silent for
        drain_idle or the grace period ended. ``shutdown`` wakes every waiting connection."""
        try:
            if not self.stopping:
                await trio.lowlevel.wait_readable(raw)
                return True
            deadline = min(self._grace_deadline, trio.current_time() + self.limits.drain_idle)
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(raw)
                return True
            return not notified
        except trio.ClosedResourceError:  # woken by shutdown(): loop round to send the notice
            return True

    async def _send(self, raw: socket.socket, data: bytes) -> None:
        """Write all of ``data``: at once if the socket takes it (the usual case), else wait,
        shielded so a shutdown never cuts a reply in half, for at most send_timeout."""
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        rest = memoryview(data)[sent:]
        with trio.CancelScope(shield=True), trio.fail_after(self.limits.send_timeout):
            while rest:
                try:
                    await trio.lowlevel.wait_writable(raw)
                except trio.ClosedResourceError:
                    continue  # shutdown() woke us; the socket is still ours
                try:
                    rest = rest[raw.send(rest) :]
                except BlockingIOError:
                    continue

    async def _last_word(self, raw: socket.socket, data: bytes) -> None:
        """Best effort, briefly: the peer may be gone or not reading."""
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.TooSlowError):
            await self._send(raw, data)


class _quiet:
    """Swallow the errors of a best-effort last word to a peer that may be gone."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        return isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError))
