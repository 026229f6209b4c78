"""One guest connection's serving loop: the trio adapter between its socket and its Session.
Its request rings (PROTOCOL.md §4.6) are served by the one ring poller of the server
(tmemd/poller.py), through ``serve_ring``, which the connection also calls itself when a
doorbell wakes it.

**Fairness.** Every connection is served on the one trio thread, so a connection that kept
serving would keep every other guest, and the admin socket, waiting. So a connection serves for
at most one *turn* (``turn_us`` of work) and then yields (``GuestServer.yield_turn``), whatever
the guest does: a socket stream of pipelined requests, a batch of 4096 64 KiB pages (a Session
Job, served in slices with the turn's clock read between slices); a full request ring gets the
same quantum per round from the poller. A
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
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag's __and__ is Python code on the hot path
_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_ANC_SIZE = socket.CMSG_SPACE(4)

SHUTDOWN_NOTICE = encode_reply(0, Status.SHUTDOWN, "tmemd is shutting down; reconnect later")
DOORBELL_NOTICE = encode_reply(0, Status.OK, None)  # "replies are in your ring" (§4.6)


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
        self.ring_decoder = FrameDecoder(server.limits.max_frame)
        limits = server.limits
        self.max_unsent = limits.max_unsent
        self.quantum = limits.turn_us / 1e6
        self.turn_end = time.perf_counter() + self.quantum
        self._out: list[bytes] = []  # replies for the socket, not yet sent
        self._out_bytes = 0
        self._sending = False  # a send is waiting for the guest to read: queue behind it
        self._ring_wrote = False  # replies went into the reply ring since the last doorbell look
        self._spilling = False  # a ring reply went over the socket: the rest follow it there
        self.ring_job: Job | None = None  # a ring request being served in slices
        # Serving the ring failed: a malformed frame (ProtocolError), or a bug of ours, which
        # must end this guest's connection only, not the poller that serves every guest.
        self.failed: Exception | None = None
        self.notified = False  # the SHUTDOWN notice went out
        self.kicked: str | None = None  # the daemon ends this connection (an audit found it)
        self.turn = server.turn_for(session.uid)  # held while serving: one per tenant at once
        self._holding = False

    # ------------------------------------------------------------------ the loop

    async def run(self) -> str:
        """Serve until the guest leaves, breaks the protocol, is kicked or the daemon stops."""
        rings, server = self.rings, self.server
        poller = server.poller
        if rings is not None:
            poller.add(self)
        try:
            while True:
                if self.decoder.has_message():
                    poller.socket_request(self)
                    await self._take_turn()
                    try:
                        await self._serve_socket()
                    finally:
                        self._end_turn()
                        poller.socket_done(self)
                if rings is not None and self.ring_ready():
                    # A doorbell (the poller slept), or a request the poller has not reached:
                    # serve it now, and have the poller watch the rings from here on if
                    # watching pays (with no CPU to spare it would only go back to sleep:
                    # the next doorbell comes here again).
                    self.serve_ring(time.perf_counter() + self.quantum)
                    if server.gate.open():
                        poller.wake()
                await self._flush()
                if self.failed is not None:
                    raise self.failed
                if server.stopping and not self.notified:
                    self.notified = True
                    await self.last_word(SHUTDOWN_NOTICE)
                if self.kicked is not None:
                    await self.last_word(protocol_error_reply(ProtocolError(self.kicked)))
                    return f"closed by tmemd: {self.kicked}"
                if self.decoder.has_message():
                    continue  # more to serve (the turn's clock decides when others go first)
                if rings is not None and self.ring_ready():
                    poller.wake()  # e.g. replies it held back for are sent now
                ended = await self._receive()
                if ended is not None:
                    return ended
        except ProtocolError as exc:
            await self._flush_quietly()
            await self.last_word(protocol_error_reply(exc))
            return f"protocol error: {exc}"
        finally:
            if rings is not None:
                poller.remove(self)

    def kick(self, reason: str) -> None:
        """End this connection with a PROTOCOL notice saying ``reason``, soon (wakes it)."""
        self.kicked = reason
        self.poke()

    def poke(self) -> None:
        """Wake the connection's task if it waits for its socket (it then looks at what there
        is to do: replies to send, a broken ring, a kick)."""
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

    def ring_ready(self) -> bool:
        """Is there ring work the poller may do now? Not while replies the guest has not read
        are piling up (backpressure), nor while another connection of the tenant (or this
        one's socket side) holds the tenant's turn, nor once the connection is ending, nor,
        when the daemon is stopping, before the SHUTDOWN notice went out (replies then follow
        it)."""
        rings = self.rings
        assert rings is not None
        return (
            (self.ring_job is not None or rings.pending() or self.ring_decoder.has_message())
            and self._out_bytes < self.max_unsent
            and not self.turn.locked()  # (its holder wakes the poller when it lets go)
            and self.failed is None
            and self.kicked is None
            and (self.notified or not self.server.stopping)
        )

    def serve_ring(self, deadline: float) -> bool:
        """Serve the request ring until it is empty or the clock (perf_counter) passes
        ``deadline``; True if anything was served. No await: the poller calls it for each
        guest in turn. Replies go into the reply ring; one that does not fit there goes over
        the socket, and so does every ring reply after it until those are sent (the guest
        matches replies by req_id); once the daemon is stopping, every reply takes the socket.
        Skipped (False) while another connection of the tenant holds the tenant's turn. A
        malformed frame or a corrupt counter ends the connection (``failed``, and its task is
        woken to say so); so does any other error serving it (its task raises it, and it is
        logged as ``connection_failed``): the poller goes on serving the others."""
        if self.turn.locked():
            return False
        # No await from here on: nothing else runs, so the tenant's turn, free now, stays
        # free; there is no need to take it (a trio Lock's acquire and release cost more
        # than serving a small request).
        try:
            return self._serve_ring(deadline)
        except Exception as exc:  # ProtocolError, or a bug: this connection ends, no other
            self.failed = exc
            self.poke()
            return True
        finally:
            self._after_ring()

    def _serve_ring(self, deadline: float) -> bool:
        rings, decoder = self.rings, self.ring_decoder
        assert rings is not None
        handle = self.session.handle
        clock = time.perf_counter
        served = False
        while True:
            job = self.ring_job
            if job is not None:
                reply = job.step()
                served = True
                if reply is None:
                    if clock() > deadline:
                        return True
                    continue
                self.ring_job = None
            else:
                if not decoder.has_message():
                    if not rings.pending():
                        return served
                    decoder.feed(rings.take(RING_TAKE))
                    continue
                result = handle(decoder.next_message())
                served = True
                if isinstance(result, Job):
                    self.ring_job = result
                    continue
                reply = result
            if reply:  # doorbells are not answered
                if self._spilling or self.server.stopping or not rings.write(reply):
                    self._spilling = True
                    self._out.append(reply)
                    self._out_bytes += len(reply)
                else:
                    self._ring_wrote = True
            if clock() > deadline:
                return True

    def _after_ring(self) -> None:
        """After serving the ring: ring the guest's doorbell if it sleeps, and send what
        goes over the socket now if the socket takes it at once (else the task does)."""
        if self._ring_wrote:
            self._ring_wrote = False
            assert self.rings is not None
            fence()  # we stored the reply tail; now load the guest's "waiting" word
            if self.rings.peer_sleeping():
                self._out.append(DOORBELL_NOTICE)
                self._out_bytes += len(DOORBELL_NOTICE)
        if not self._out:
            return
        if self._sending:
            self.poke()
            return
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the guest is gone: its task finds out on its next read
            sent = 0
        if sent == len(data):
            self._out = []
            self._out_bytes = 0
            self._spilling = False
            return
        rest = data[sent:]
        self._out = [rest]
        self._out_bytes = len(rest)
        self.poke()

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
        others run (waited, slept, or yielded): serving, then waiting for the socket, then
        serving again never yields by itself."""
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
            # The poller skips a tenant whose turn is held; if it went to sleep meanwhile,
            # the tenant's ring work is now its to do.
            self.server.poller.tenant_released(self.session.uid)

    # ------------------------------------------------------------------ sending

    async def _flush(self) -> None:
        """Send the queued replies (waiting while the guest does not read them)."""
        if self.server.store.busy:  # a request left work for the maintenance task
            self.server.wake_maintenance()
        while self._out:  # (the poller may queue more while we wait for the guest to read)
            out = self._out
            data = out[0] if len(out) == 1 else b"".join(out)
            self._out = []
            self._out_bytes = 0
            self._spilling = False
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
        self._sending = True  # the poller queues behind us meanwhile
        try:
            with trio.CancelScope(shield=True):
                while rest:
                    # Once tmemd is stopping, the grace period bounds the wait too (shutdown()
                    # wakes us to look again).
                    with trio.fail_at(min(deadline, server.grace_deadline + 1)):
                        try:
                            await trio.lowlevel.wait_writable(raw)
                            writable = True
                        except trio.ClosedResourceError:
                            writable = False  # shutdown(), kick() or poke() woke us; still ours
                    if writable:
                        with contextlib.suppress(BlockingIOError):
                            rest = rest[raw.send(rest) :]
        finally:
            self._sending = False
        if held:
            await self._take_turn()

    async def last_word(self, data: bytes) -> None:
        """Best effort, briefly: the peer may be gone or not reading."""
        with trio.move_on_after(1), contextlib.suppress(OSError, trio.TooSlowError):
            await self._send(data)

    # ------------------------------------------------------------------ receiving, waiting

    async def _receive(self) -> str | None:
        """Read what the guest sent next (or wait for it); why the connection ended, or None."""
        raw = self.raw
        view = self.server.recv_view
        try:
            # recvmsg, not recv: fds sent after HELLO must be seen (closed, and the guest
            # dropped), not silently discarded by the kernel (docs/design.md §4).
            n, ancdata, msg_flags, _ = raw.recvmsg_into([view], _ANC_SIZE, _CMSG_CLOEXEC)
        except BlockingIOError:
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

    async def _sleep(self) -> bool:
        """Wait for the guest's next word (its rings are the poller's to watch). A wait
        starts a new turn."""
        try:
            return await self._wait_readable()
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
        except trio.ClosedResourceError:  # woken by shutdown(), kick() or poke(): loop round
            return True
