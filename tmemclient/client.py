"""The synchronous tmem client: ``tmemclient.connect(path, name=...)``."""

from __future__ import annotations

import array
import mmap
import os
import socket
import time
import uuid as uuid_module
import weakref
from collections.abc import Sequence
from typing import Any

from tmemclient import _plans
from tmemclient._pool import Job, new_pool_request, pool_info
from tmemclient.core import (
    GONE,
    Answer,
    Core,
    DeferredStats,
    OnAnswer,
    hello_fds,
    hello_mapping,
    hello_message,
    hello_reply,
)
from tmemclient.mapping import Mapping
from tmemclient.pool import Pool
from tmemclient.region import FrameAllocator, FrameRun, create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.errors import (
    DaemonGone,
    LimitExceeded,
    ProtocolError,
    TmemError,
)
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import (
    Limits,
    Op,
    Status,
    split_reply,
)
from tmemclient.wire.ring import Rings, fence
from tmemclient.wire.spingate import SpinGate

DEFAULT_FRAMES = 256  # a 1 MiB region: 256 pages staged per pipeline round
_RECV = 256 * 1024
_DOORBELL = encode_frame([Op.DOORBELL, 1])
DEFAULT_SPIN_US = 100
_LIGHT_REQUEST = 64  # bytes: a single-page request (a batch frame is longer)
_PING = int(Op.PING)  # a plain int: msgpack packs it without a lookup


class Client:
    """A synchronous connection to tmemd. Not thread-safe: use one per thread."""

    def __init__(
        self,
        sock: socket.socket,
        region: mmap.mmap,
        limits: Limits,
        *,
        spin_us: int = DEFAULT_SPIN_US,
    ) -> None:
        self._sock = sock
        self._region = region
        self._whole = memoryview(region)
        self._view = self._whole[: limits.frames * FRAME_SIZE]
        self.limits = limits
        # Request/reply rings (PROTOCOL.md §4.6), if the daemon granted them: requests that fit
        # go there, and the replies come back there, with no syscall while both sides are busy.
        self._rings: Rings | None = None
        if limits.ring:
            self._rings = Rings(self._whole[len(self._view) :], limits.ring, "guest")
        self._ring_decoder = FrameDecoder(1 << 26)
        self._spin = spin_us / 1e6
        self._gate = SpinGate()
        self._light = False  # is the one request in the ring a small one?
        self._on_ring: set[int] = set()  # req_ids sent through the ring, not yet answered
        self._on_socket: set[int] = set()  # ...and through the socket
        self.name = limits.guest
        self._alloc = FrameAllocator(limits.frames)
        self._decoder = FrameDecoder(1 << 26)
        self._rbuf = bytearray(_RECV)
        self._core = Core(limits)  # req_ids, replies matched, notices, deferred answers
        self.deferred = self._core.deferred
        self.mapping: Mapping | None = None  # the page mirror, when connected with map_pages
        self._single: tuple[int, int] = (0, 0)  # (start, frames) kept for single-page ops
        self._pools: weakref.WeakSet[Pool] = weakref.WeakSet()  # made here, still referenced

    @property
    def notice(self) -> str | None:
        """The daemon's SHUTDOWN notice, once it sent one (it is going away)."""
        return self._core.notice

    @property
    def rings(self) -> bool:
        """Do requests go through shared-memory rings (else the socket alone)?"""
        return self._rings is not None

    @property
    def frames(self) -> memoryview:
        """The whole shared region, writable. Reserve frames with ``reserve_frames`` before using
        them with put_frame/get_frame, so the copying helpers do not stage data there."""
        return self._view

    def reserve_frames(self, count: int = 1) -> FrameRun:
        """Take ``count`` contiguous frames out of the staging pool for your own use."""
        start = self._alloc.alloc(count)
        if start is None and self._reclaim_single():
            start = self._alloc.alloc(count)
        if start is None:
            raise LimitExceeded(
                f"no run of {count} free frames in the region ({self.limits.frames})"
            )
        return FrameRun(self._alloc, self._view, start, count)

    def new_pool(
        self,
        *,
        persistent: bool = False,
        shared: bool = False,
        uuid: uuid_module.UUID | bytes | str | None = None,
        page_size: int = FRAME_SIZE,
        name: str | None = None,
    ) -> Pool:
        """Create a pool: private and ephemeral with 4096-byte pages unless told otherwise.

        ``name`` (1..64 characters of A-Z a-z 0-9 . _ -) makes a *named* private pool: asked
        again by the same guest (same name, same uid) on a later connection, the daemon gives
        back that pool with its pages (``pool.reopened``), if it asks within the daemon's
        ``reattach_seconds`` of the pool's last connection ending. The kind and page size
        must be the same; another connection holding it gets GuestConflict."""
        request, raw = new_pool_request(
            persistent=persistent, shared=shared, uuid=uuid, page_size=page_size, name=name
        )
        (result,) = self._exchange([request])
        info = pool_info(result, persistent=persistent, shared=shared, uuid=raw, name=name)
        pool = Pool(self, info)
        self._pools.add(pool)  # to report its mapped reads in wait_deferred
        return pool

    def ping(self) -> None:
        """One round trip that does nothing."""
        self._call(_PING)

    def lend(self, want: int) -> dict[str, int]:
        """Ask to borrow ``want`` bytes in all (``connect(lend_memory=True)``; PROTOCOL.md §4.8):
        fewer than we have gives the rest back. The answer: ``lent`` (bytes we may use now),
        ``low`` (what we kept from there up is gone), ``seq`` and ``room`` (bytes a put could
        have). Pass it to ``client.mapping.loan.answered``."""
        result: dict[str, int] = _plans.lend_reply(self._exchange([[Op.LEND, want]])[0])
        return result

    def close(self) -> None:
        """Close the connection; the daemon frees every private page of this guest."""
        self._core.fail(DaemonGone("this client is closed"))
        self._sock.close()
        try:
            if self.mapping is not None:
                self.mapping.close()
            if self._rings is not None:
                self._rings.release()
            self._view.release()
            self._whole.release()
            self._region.close()
        except BufferError:
            pass  # a caller still holds a view of the region; it is unmapped when that goes

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ driving plans

    def wait_deferred(self) -> DeferredStats:
        """Report every pool's mapped reads, then wait for the answers to every
        put_many_nowait (and report) sent so far; the running counts."""
        for pool in list(self._pools):
            pool.report_reads()
        while self._core.deferred_due:
            self._read_one_reply({})
        return self.deferred

    def _run(
        self, job: Job, *, wait: bool = True, on_answer: OnAnswer | None = None, first: int = 0
    ) -> Any:
        if not job.need:
            return self._drive(job.factory(0, 0))
        if not job.unit and wait:
            # Single-page operations stage in a run kept for them: no allocation per call.
            start = self._single_run(job.need)
            if start is not None:
                return self._drive(job.factory(start, job.need))
        while True:
            count = job.need
            if job.unit:
                count = min(count, self._alloc.largest() // job.unit * job.unit)
                fits = count == job.need or (wait and count > 0)
            else:
                fits = self._alloc.largest() >= count
            if fits or not self._core.deferred_due:
                break
            self._read_one_reply({})  # frames held by no-wait puts come back with answers
        slow = not wait and count < job.need  # no room to stage it whole: the slow way
        wait = wait or slow
        if not count and self._reclaim_single():
            return self._run(job, wait=not slow, on_answer=on_answer, first=first)
        start = self._alloc.alloc(count) if count else None
        if start is None:
            raise LimitExceeded(
                f"no {job.unit or job.need} free frames in the region to stage data; release "
                "reserved frames or connect with more frames"
            )
        if not wait:
            return self._send_nowait(job, start, count, on_answer, first)
        try:
            results = self._drive(job.factory(start, count))
        finally:
            self._alloc.release(start, count)
        if slow:
            self.deferred.answered_now(results, first, on_answer)
            return None
        return results

    def _reclaim_single(self) -> bool:
        """Give back the single-op staging run (the caller's needs come first)."""
        if not self._single[1]:
            return False
        self._alloc.release(*self._single)
        self._single = (0, 0)
        return True

    def _single_run(self, need: int) -> int | None:
        """Start of the staging run kept for single-page operations, grown to ``need``
        frames if it can be; None if the region has no room (then the caller allocates)."""
        start, count = self._single
        if need <= count:
            return start
        if count:
            self._alloc.release(start, count)
        new = self._alloc.alloc(need)
        if new is None:
            self._single = (0, 0)
            return None
        self._single = (new, need)
        return new

    def _send_deferred(self, requests: list[list[Any]]) -> None:
        """Send requests that stage nothing; their answers are read later, like a no-wait
        put's (an error answer is counted in ``deferred``)."""
        self._send(requests, deferred=True)

    def _send_nowait(
        self, job: Job, start: int, count: int, on_answer: OnAnswer | None, first: int
    ) -> None:
        """Send a batch plan that fits its staging run in one round, and leave its answer to
        be read later (``_read_one_reply``), which frees the run (and hands the answer to
        ``on_answer``, with the position of the request's first item)."""
        plan = job.factory(start, count)
        requests = next(plan)
        plan.close()
        answers = None if on_answer is None else (_plans.first_items(requests, first), on_answer)
        self._send(requests, deferred=True, release=(start, count), on_answer=answers)
        self.deferred.sent += 1
        return None

    def _send(
        self,
        requests: list[list[Any]],
        *,
        deferred: bool = False,
        release: tuple[int, int] | None = None,
        on_answer: tuple[Sequence[int], OnAnswer] | None = None,
    ) -> list[int]:
        ids, data = self._core.send(
            requests, deferred=deferred, release=release, on_answer=on_answer
        )
        self._transmit(ids, data)
        return ids

    def _call(self, op: int, *args: Any) -> Any:
        """One request, waited for: its result (or the error it carries, raised)."""
        req_id, data = self._core.send_one(op, args)
        self._transmit((req_id,), data)
        while True:
            answer = self._read_answer()
            if answer is not None and answer.req_id == req_id:
                return answer.value()

    def _transmit(self, ids: Sequence[int], data: bytes) -> None:
        """Put the bytes of requests ``ids`` on the wire: the request ring, or the socket."""
        rings = self._rings
        try:
            if (
                rings is not None
                and len(data) <= rings.size // 2
                and (
                    self._on_ring
                    or not rings.peer_sleeping()
                    or rings.host_crowded()
                    or self._may_spin(rings)
                )
            ):
                # The daemon serves each channel in order, not the two against each other: one
                # channel at a time carries requests (nothing is in flight on the other).
                # The ring while the daemon watches it, even if we will not spin: its poller
                # finds the request in its next round, and the answer costs one wakeup (our
                # read of its doorbell), where the socket costs a send and a read. The ring
                # too while other guests keep the daemon busy (HOST_CROWDED): one wakeup of
                # its poller serves all their rings, where each socket request costs one. But
                # a guest alone, with the daemon asleep and no spin of ours to catch the
                # answer, would pay the socket's syscalls and wakeups (a doorbell each way)
                # and the ring's work on top: then the socket carries the request.
                while self._on_socket:
                    self._read_one_reply({})
                if not rings.write(data):
                    while self._on_ring:  # all answered: the daemon has taken every byte
                        self._read_one_reply({})
                    rings.write(data)
                # A miss while waiting for one small request says the daemon did not get to
                # run (SpinGate.missed); a batch may simply take longer than a spin.
                self._light = not self._on_ring and len(data) <= _LIGHT_REQUEST
                self._on_ring.update(ids)
                fence()  # we stored our tail; now load the daemon's "idle" word (§4.6)
                if rings.peer_sleeping():
                    self._sock.sendall(_DOORBELL)
                return
            while self._on_ring:
                self._read_one_reply({})
            self._sock.sendall(data)
            if rings is not None:
                self._on_socket.update(ids)
        except OSError as exc:
            self._read_last_words()
            raise self._fail(exc) from exc

    def _read_one_reply(self, replies: dict[int, Any]) -> None:
        """Read one reply: a notice, the answer to a no-wait put (counted; its staging run
        freed), or one of the answers ``replies`` waits for (its result, or the error)."""
        answer = self._read_answer()
        if answer is not None:
            replies[answer.req_id] = answer

    def _read_answer(self) -> Answer | None:
        """Read one reply: the Answer somebody waits for, or None (a notice, or the answer to
        a no-wait request, counted and its staging run freed)."""
        try:
            answer = self._core.receive(self._next_message())
        except (OSError, ProtocolError) as exc:
            if isinstance(exc, OSError):
                self._read_last_words()
            raise self._fail(exc) from exc
        if answer is None:  # a notice
            return None
        if self._rings is not None:
            self._on_ring.discard(answer.req_id)
            self._on_socket.discard(answer.req_id)
        pending = answer.pending
        if pending.release is not None:
            self._alloc.release(*pending.release)
        return None if pending.deferred else answer

    def _drive(self, plan: _plans.Plan[Any]) -> Any:
        try:
            requests = next(plan)
            while True:
                requests = plan.send(self._exchange(requests))
        except StopIteration as stop:
            return stop.value

    def _exchange(self, requests: list[list[Any]]) -> list[Any]:
        """Send requests together, wait for all their replies; raise the first error reply."""
        ids = self._send(requests)
        replies: dict[int, Answer] = {}
        while len(replies) < len(ids):
            self._read_one_reply(replies)
        return [replies[req_id].value() for req_id in ids]

    def _read_last_words(self) -> None:
        """After a failed send: a notice the daemon sent before closing may still be waiting
        in our socket (an idle guest learns of a shutdown only now); read it if so."""
        try:
            self._sock.settimeout(0)
            while data := self._sock.recv(1 << 16):
                self._decoder.feed(data)
                while (message := self._decoder.next_message()) is not NEED_DATA:
                    req_id, status, result = split_reply(message)
                    if req_id == 0 and status == Status.SHUTDOWN:
                        self._core.notice = str(result)
        except (OSError, ProtocolError):
            pass

    def _next_message(self) -> Any:
        rings = self._rings
        while True:
            if rings is not None:
                message = self._ring_decoder.next_message()
                if message is not NEED_DATA:
                    return message
            message = self._decoder.next_message()
            if message is not NEED_DATA:
                return message
            if rings is not None:
                if rings.pending() or (
                    self._on_ring and self._may_spin(rings) and self._spin_for_reply(rings)
                ):
                    self._ring_decoder.feed(rings.take())
                    continue
                rings.sleeping(True)
                fence()  # the daemon stores its reply tail then loads our word; we the reverse
                if rings.pending():
                    rings.sleeping(False)
                    continue
                # (No doorbell here: _transmit rang it if the daemon slept when the request
                # went in; if it was awake, it saw the request before it could sleep.)
            n = self._sock.recv_into(self._rbuf)
            if rings is not None:
                rings.sleeping(False)
            if not n:
                raise ConnectionResetError(self.notice or GONE)
            self._decoder.feed(memoryview(self._rbuf)[:n])

    def _may_spin(self, rings: Rings) -> bool:
        """Is watching the reply ring for an answer worth it now? Not when spinning is off,
        nor while the daemon serves other guests too (HOST_CROWDED: the CPU we would spin on
        is theirs and the daemon's), nor with no CPU to spare (the gate)."""
        return bool(self._spin) and not rings.host_crowded() and self._gate.open()

    def _spin_for_reply(self, rings: Rings) -> bool:
        """Watch the reply ring a short while (yielding the CPU each round, so a daemon on our
        core runs) before sleeping on the socket: True if a reply came."""
        clock = time.perf_counter
        deadline = clock() + self._spin
        while clock() < deadline:
            os.sched_yield()
            if rings.pending():
                self._gate.hit()
                return True
        if self._light:
            self._gate.missed()
        return False

    def _fail(self, exc: BaseException) -> TmemError:
        """The connection is over: close the socket; what every call raises from now on."""
        closed = self._core.fail(exc)
        self._sock.close()
        return closed


def connect(
    path: str | os.PathLike[str],
    name: str,
    *,
    frames: int = DEFAULT_FRAMES,
    timeout: float | None = 10.0,
    ring_frames: int | None = None,
    spin_us: int = DEFAULT_SPIN_US,
    map_pages: bool = False,
    lend_memory: bool = False,
) -> Client:
    """Connect to tmemd as guest ``name`` with a shared region of ``frames`` 4 KiB frames.

    ``timeout`` bounds the connect and handshake; later calls block until answered.
    ``ring_frames`` asks for request/reply rings of that many frames each in the region
    (default 16 where rings work, x86-64; 0 for the socket alone); the daemon may decline.
    ``spin_us``: how long to watch the reply ring before sleeping on the socket.
    ``map_pages`` asks for a read-only mapping of this guest's own pages (``client.mapping``,
    ``Pool.read_mapped``; PROTOCOL.md §4.7); where the daemon declines, ``client.mapping`` is None.
    ``lend_memory`` (with ``map_pages``) asks for a file to borrow memory in (``client.lend``,
    ``client.mapping.loan``; §4.8); where the daemon declines, ``client.mapping.loan`` is None.
    Raises DaemonGone if no daemon answers at ``path``, and the daemon's refusal otherwise.
    """
    if ring_frames is None:
        ring_frames = ring.DEFAULT_RING_FRAMES if ring.supported() else 0
    hello = hello_message(name, frames, ring_frames, map_pages, lend_memory)
    fd, region = create_region(frames, layout.ring_bytes(ring_frames))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    mapping: Mapping | None = None
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            sock.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonGone(f"no tmemd at {path}: {exc.strerror}; is the daemon running?") from exc
        finally:
            os.close(fd)
        decoder = FrameDecoder(1 << 16)
        buf = bytearray(4096)
        while (message := decoder.next_message()) is NEED_DATA:
            n, ancdata, msg_flags, _ = sock.recvmsg_into(
                [buf], socket.CMSG_SPACE(8), socket.MSG_CMSG_CLOEXEC
            )
            fds += hello_fds(ancdata, msg_flags)
            if not n:
                raise DaemonGone(f"tmemd at {path} closed the connection during the handshake")
            decoder.feed(memoryview(buf)[:n])
        limits = hello_reply(message, frames, ring_frames)
        mapping = hello_mapping(limits, fds, map_pages, lend_memory)
        sock.settimeout(None)
        client = Client(sock, region, limits, spin_us=spin_us)
        client.mapping = mapping
        client._decoder.feed(decoder.rest())
        return client
    except BaseException as exc:
        if mapping is not None:
            mapping.close()
        sock.close()
        region.close()
        if isinstance(exc, TimeoutError):
            raise DaemonGone(f"tmemd at {path} did not answer within {timeout}s") from exc
        raise
    finally:
        for received in fds:  # mapped (or refused): the descriptor itself is not kept
            os.close(received)
