"""One guest connection's serving loop: the trio adapter between its socket (and the request
rings in its region, PROTOCOL.md §4.6) and its Session.

**Fairness.** Every connection is served on the one trio thread, so a connection that kept
serving would keep every other guest, and the admin socket, waiting. So a connection serves for
at most one *turn* (``turn_us`` of work) and then yields (``GuestServer.yield_turn``), whatever
the guest does: a full request ring, a socket stream of pipelined requests, a batch of 4096
64 KiB pages (a Session Job, served in slices with the turn's clock read between slices). A
guest that waits for its answers does not notice: its request is served, and it waits anyway.

Turns are shared by tenant, not by connection: a connection serves only while it holds its
uid's *turn* (a fair lock, ``GuestServer.turn_for``), and it yields to the others *holding* it,
handing it on to its own tenant's next connection only afterwards. So a uid with 64 busy
connections has one of them runnable at a time and gets one turn in each round, like a uid with
one, and the others wait no longer for it.

**Backpressure.** A connection holds at most ``max_unsent`` bytes of replies the guest has not
read: past that it sends them, and while the guest does not read them it reads nothing more from
it (the socket's own buffers then fill, and the guest's writes block). It reads the socket only
when every frame it has is served, at most ``RECV_SIZE`` at a time, into one buffer shared by
every connection (copied out at once), and takes at most ``RING_TAKE`` bytes from a ring at a
time. So the daemon holds per connection at most about ``max_frame`` (a frame being received)
+ ``RECV_SIZE`` + ``max_unsent`` + the decoded request being served.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from typing import TYPE_CHECKING

import trio

from tmemclient.wire.codec import FrameDecoder
from tmemclient.wire.errors import ProtocolError
from tmemclient.wire.fds import close_all
from tmemclient.wire.messages import Status, encode_reply
from tmemclient.wire.ring import Rings, fence
from tmemd.region import hello_fds
from tmemd.session import Job, Session, protocol_error_reply

if TYPE_CHECKING:
    from tmemd.server import GuestServer

RECV_SIZE = 64 * 1024  # bytes read from a guest's socket at a time
RING_TAKE = 64 * 1024  # bytes copied out of a guest's request ring at a time
_LET_OTHERS_RUN = 20e-6  # seconds a ring poll loop may run before other tasks get a turn
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's __and__ is Python code on the hot path
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_ANC_SIZE = socket.CMSG_SPACE(4)

SHUTDOWN_NOTICE = encode_reply(0, Status.SHUTDOWN, "tmemd is shutting down; reconnect later")
DOORBELL_NOTICE = encode_reply(0, Status.OK, None)  # "replies are in your ring" (§4.6)


class PollWindow:
    """How long the daemon watches a guest's ring before it sleeps: adaptive, as KVM's halt
    polling (``halt_poll_ns``, grown and shrunk per vCPU in virt/kvm/kvm_main.c).

    A request that came while the daemon slept, but less than ``most`` seconds after it began
    watching, would have been caught by a longer watch: the window grows to cover that gap
    (doubling at least). A guest that stayed away longer than ``most`` is idle or thinking, and
    watching it was wasted: the window drops back to ``base``. So a guest with short gaps (a
    page cache between file reads) gets its answers with no wakeup on either side, and an idle
    one costs no more CPU than ``base``. Seconds throughout."""

    def __init__(self, base: float, most: float) -> None:
        self.base = base
        self.most = max(base, most)
        self.window = base
        self.started: float | None = None  # when the current watch began

    def woke(self, now: float) -> None:
        """The guest's next word came at ``now``, after a watch and then a sleep."""
        if self.started is None:
            return  # no watch before this sleep (not allowed, or not needed): nothing learnt
        idle = now - self.started
        self.started = None
        if idle > self.most:
            self.window = self.base
        elif idle > self.window:
            self.window = min(self.most, max(2 * self.window, 1.25 * idle))


class Connection:
    """Serves one guest connection until it ends; ``run`` returns why it ended."""

    def __init__(
        self,
        server: GuestServer,
        raw: socket.socket,
        session: Session,
        rings: Rings | None,
        leftover: bytes,
    ) -> None:
        self.server = server
        self.raw = raw
        self.session = session
        self.rings = rings
        self.decoder = FrameDecoder(server.limits.max_frame)
        self.decoder.feed(leftover)
        self.ring_decoder = FrameDecoder(server.limits.max_frame) if rings is not None else None
        limits = server.limits
        self.max_unsent = limits.max_unsent
        self.quantum = limits.turn_us / 1e6
        self.turn_end = time.perf_counter() + self.quantum
        self.watch = PollWindow(limits.ring_poll_us / 1e6, limits.ring_poll_max_us / 1e6)
        self._out: list[bytes] = []  # replies for the socket, not yet sent
        self._out_bytes = 0
        self._ring_wrote = False  # replies went into the reply ring since the last doorbell look
        self._poller = select.poll()
        self._poller.register(raw, select.POLLIN)
        self.notified = False  # the SHUTDOWN notice went out
        self.kicked: str | None = None  # the daemon ends this connection (an audit found it)
        self.turn = server.turn_for(session.uid)  # held while serving: one per tenant at once
        self._holding = False

    # ------------------------------------------------------------------ the loop

    async def run(self) -> str:
        """Serve until the guest leaves, breaks the protocol, is kicked or the daemon stops."""
        rings, server = self.rings, self.server
        try:
            while True:
                if self.decoder.has_message() or (
                    rings is not None
                    and (rings.pending() or (self.ring_decoder and self.ring_decoder.has_message()))
                ):
                    await self._take_turn()
                    try:
                        await self._serve_socket()
                        if rings is not None:
                            await self._serve_ring()
                    finally:
                        self._end_turn()
                await self._flush()
                if server.stopping and not self.notified:
                    self.notified = True
                    await self.last_word(SHUTDOWN_NOTICE)
                if self.kicked is not None:
                    await self.last_word(protocol_error_reply(ProtocolError(self.kicked)))
                    return f"closed by tmemd: {self.kicked}"
                if self.decoder.has_message() or (rings is not None and rings.pending()):
                    continue  # more to serve (the turn's clock decides when others go first)
                ended = await self._receive()
                if ended is not None:
                    return ended
        except ProtocolError as exc:
            await self._flush_quietly()
            await self.last_word(protocol_error_reply(exc))
            return f"protocol error: {exc}"

    def kick(self, reason: str) -> None:
        """End this connection with a PROTOCOL notice saying ``reason``, soon (wakes it)."""
        self.kicked = reason
        trio.lowlevel.notify_closing(self.raw)

    # ------------------------------------------------------------------ serving

    async def _serve_socket(self) -> None:
        """Serve the complete frames received; replies queue for the socket."""
        decoder, handle = self.decoder, self.session.handle
        while decoder.has_message():
            reply = handle(decoder.next_message())
            if isinstance(reply, Job):
                reply = await self._complete(reply)
            if reply:  # doorbells are not answered
                self._out.append(reply)
                self._out_bytes += len(reply)
                if self._out_bytes >= self.max_unsent:
                    await self._flush()  # (waiting for a slow reader, it lets go of the turn)
            if time.perf_counter() > self.turn_end:
                await self.next_turn()

    async def _serve_ring(self) -> None:
        """Serve the frames in the request ring. Replies go into the reply ring; one that does
        not fit there goes over the socket, and so does everything after it taken in the same
        batch (the guest matches replies by req_id); once the daemon is stopping, every reply
        takes the socket, behind the SHUTDOWN notice (a busy guest reads its socket only when
        its ring is quiet). Raises ProtocolError for a malformed frame or a corrupt counter."""
        rings, decoder = self.rings, self.ring_decoder
        assert rings is not None and decoder is not None
        handle = self.session.handle
        spilling = self.server.stopping
        while True:
            if not decoder.has_message():
                if not rings.pending():
                    break
                decoder.feed(rings.take(RING_TAKE))
                spilling = self.server.stopping
                continue
            reply = handle(decoder.next_message())
            if isinstance(reply, Job):
                reply = await self._complete(reply)
            if reply:
                if spilling or not rings.write(reply):
                    spilling = True
                    self._out.append(reply)
                    self._out_bytes += len(reply)
                else:
                    self._ring_wrote = True
            if time.perf_counter() > self.turn_end:
                await self.next_turn()

    async def _complete(self, job: Job) -> bytes:
        """Serve a Job slice by slice, yielding whenever the turn is used up."""
        while (reply := job.step()) is None:
            if time.perf_counter() > self.turn_end:
                await self.next_turn()
        return reply

    async def next_turn(self) -> None:
        """This connection used its turn: send what is ready, let every other tenant go (still
        holding this tenant's turn, so none of its other connections goes meanwhile), then
        pass the turn on to the tenant's next waiting connection, if any, and queue for it
        again; and start a new turn."""
        await self._flush()
        await self.server.yield_turn()
        if self._holding and self.turn.statistics().tasks_waiting:
            self._end_turn()
            await self._take_turn()
        self.turn_end = time.perf_counter() + self.quantum

    async def _take_turn(self) -> None:
        """Hold the tenant's turn (waiting, in order, while another connection of the same uid
        serves). The clock of the turn runs on from the last time this connection let the
        others run (waited, slept, or yielded): serving, then watching the ring, then serving
        again never yields by itself."""
        turn = self.turn
        try:
            turn.acquire_nowait()  # the usual case, with no schedule point
        except trio.WouldBlock:
            await turn.acquire()
            self.turn_end = time.perf_counter() + self.quantum  # the others ran meanwhile
        self._holding = True

    def _end_turn(self) -> None:
        if self._holding:
            self._holding = False
            self.turn.release()

    # ------------------------------------------------------------------ sending

    def _ring_doorbell(self) -> None:
        """Replies went into the reply ring: if the guest sleeps on its socket, ring it."""
        if self._ring_wrote:
            self._ring_wrote = False
            assert self.rings is not None
            fence()  # we stored the reply tail; now load the guest's "waiting" word
            if self.rings.peer_sleeping():
                self._out.append(DOORBELL_NOTICE)
                self._out_bytes += len(DOORBELL_NOTICE)

    async def _flush(self) -> None:
        """Send the queued replies (waiting while the guest does not read them)."""
        self._ring_doorbell()
        if self.server.store.busy:  # a request left work for the maintenance task
            self.server.wake_maintenance()
        if not self._out:
            return
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        self._out = []
        self._out_bytes = 0
        await self._send(data)

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.TooSlowError):
            await self._flush()

    async def _send(self, data: bytes) -> None:
        """Write all of ``data``: at once if the socket takes it (the usual case), else wait,
        shielded so a shutdown never cuts a reply in half, for at most send_timeout."""
        raw = self.raw
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        rest = memoryview(data)[sent:]
        server = self.server
        deadline = trio.current_time() + server.limits.send_timeout
        held = self._holding
        self._end_turn()  # a guest slow to read must not hold up its tenant's other connections
        with trio.CancelScope(shield=True):
            while rest:
                # Once tmemd is stopping, the grace period bounds the wait too (shutdown()
                # wakes us to look again).
                with trio.fail_at(min(deadline, server.grace_deadline + 1)):
                    try:
                        await trio.lowlevel.wait_writable(raw)
                    except trio.ClosedResourceError:
                        continue  # shutdown() or kick() woke us; the socket is still ours
                try:
                    rest = rest[raw.send(rest) :]
                except BlockingIOError:
                    continue
        if held:
            await self._take_turn()

    async def last_word(self, data: bytes) -> None:
        """Best effort, briefly: the peer may be gone or not reading."""
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.TooSlowError):
            await self._send(data)

    # ------------------------------------------------------------------ receiving, waiting

    async def _receive(self) -> str | None:
        """Read what the guest sent next (or wait for it); why the connection ended, or None."""
        raw, rings, server = self.raw, self.rings, self.server
        view = server.recv_view
        try:
            # recvmsg, not recv: fds sent after HELLO must be seen (closed, and the guest
            # dropped), not silently discarded by the kernel (docs/design.md §4).
            n, ancdata, msg_flags, _ = raw.recvmsg_into([view], _ANC_SIZE, _CMSG_CLOEXEC)
        except BlockingIOError:
            # A guest with rings: watch the ring a while (no syscall per look) before sleeping.
            if rings is not None and (
                rings.pending()
                or (not server.stopping and self.kicked is None and await self._poll_ring())
            ):
                return None
            if not await self._sleep():
                return "daemon shutting down"
            return None
        if ancdata or msg_flags & _CTRUNC:
            with contextlib.suppress(ProtocolError):
                close_all(hello_fds(ancdata, msg_flags))
            raise ProtocolError("fds are accepted only with HELLO (one region memfd)")
        if not n:
            return "closed by guest" if not self.decoder.buffered else "closed mid-frame"
        self.decoder.feed(view[:n])  # copied out now: the buffer is every connection's
        return None

    async def _poll_ring(self) -> bool:
        """Watch the request ring for a while (``watch``: ``ring_poll_us``, grown towards
        ``ring_poll_max_us`` for a guest whose requests come in short gaps) before sleeping: a
        busy guest's next request is then picked up with no syscall and no wakeup on either
        side. Each round yields the CPU (a guest pinned to our core gets to run) and, when
        other guests are connected, lets their tasks run. Not while the machine has more
        runnable tasks than CPUs (SpinGate): then we would hold a CPU from the guests. True if
        a request arrived (in the ring or the socket)."""
        rings, watch, server = self.rings, self.watch, self.server
        assert rings is not None
        if not watch.window or not server.gate.open():
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
            if now > deadline or self.kicked is not None:
                return False
            os.sched_yield()
            rounds += 1
            if rounds % 8 == 0 and self._poller.poll(0):
                return True
            if now > self.turn_end or (now > others_at and server.connections > 1):
                # Watching holds the event loop as serving does: the others get their turn
                # when this one's time is up (the admin socket and the maintenance task too),
                # and another guest's request waits at most _LET_OTHERS_RUN while guests are
                # many (a pass of trio's run loop costs more than a round here).
                await server.yield_turn()
                others_at = clock() + _LET_OTHERS_RUN
                self.turn_end = clock() + self.quantum

    async def _sleep(self) -> bool:
        """Wait for the guest's next word. A guest with rings is told we sleep, so it rings the
        doorbell; then the ring is looked at once more, as a request stored before our word
        was seen needs no doorbell. How long the guest kept us waiting sizes the next watch of
        its ring. A wait starts a new turn."""
        rings = self.rings
        try:
            if rings is None:
                return await self._wait_readable()
            rings.sleeping(True)
            fence()  # the guest stores its tail then loads our word; we the reverse
            try:
                if rings.pending():
                    return True
                return await self._wait_readable()
            finally:
                rings.sleeping(False)
                self.watch.woke(time.perf_counter())
        finally:
            self.turn_end = time.perf_counter() + self.quantum

    async def _wait_readable(self) -> bool:
        """Wait for the guest; False when, after the shutdown notice, it stayed silent for
        drain_idle or the grace period ended. ``shutdown`` and ``kick`` wake a waiting
        connection."""
        server = self.server
        try:
            if not server.stopping:
                await trio.lowlevel.wait_readable(self.raw)
                return True
            deadline = min(server.grace_deadline, trio.current_time() + server.limits.drain_idle)
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(self.raw)
                return True
            return not self.notified
        except trio.ClosedResourceError:  # woken by shutdown() or kick(): loop round
            return True
