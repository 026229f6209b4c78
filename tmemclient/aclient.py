"""The trio tmem client: ``async with tmemclient.open_client(path, name=...) as client``.

Many tasks may use one client at once: requests are pipelined on the connection (each carries a
req_id; a reader task hands replies to the waiting tasks), and staging frames are shared out by
the region's allocator, a task waiting when none are free.

Cancellation: a request already sent keeps its staging frames until its reply arrives, so a
cancelled put can never pick up the bytes a later request staged in the same frames.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import uuid as uuid_module
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from tmemclient import _plans
from tmemclient._pool import Job, new_pool_request, pool_info
from tmemclient.apool import AsyncPool
from tmemclient.client import DEFAULT_FRAMES
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
from tmemclient.region import FrameAllocator, FrameRun, create_region
from tmemclient.wire import layout, ring
from tmemclient.wire.codec import NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.errors import (
    DaemonGone,
    DaemonShuttingDown,
    LimitExceeded,
    TmemError,
)
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Limits, Op
from tmemclient.wire.ring import Rings, fence

_RECV = 256 * 1024
_DOORBELL = encode_frame([Op.DOORBELL, 1])


class _Waiter:
    """A task waiting for the answer to one request (Pending.waiter)."""

    __slots__ = ("answer", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: Answer | None = None


class AsyncClient:
    """A trio connection to tmemd, safe to share between tasks. Made by ``open_client``.

    With request rings granted (PROTOCOL.md §4.6), requests go into the request ring (a doorbell
    on the socket only when the daemon sleeps) and replies come back in the reply ring; the
    client never watches the ring (a trio program has other tasks to run), so it keeps its
    "waiting" word set and the daemon rings it on the socket when replies are there. Requests
    go into one channel at a time, as the protocol asks."""

    def __init__(self, sock: trio.socket.SocketType, region: mmap.mmap, limits: Limits) -> None:
        self._sock = sock
        self._region = region
        self._whole = memoryview(region)
        self._view = self._whole[: limits.frames * FRAME_SIZE]
        self.limits = limits
        self.name = limits.guest
        self._core = Core(limits)  # req_ids, replies matched, notices, deferred answers
        self.deferred = self._core.deferred
        self._alloc = FrameAllocator(limits.frames)
        self._frames_freed = trio.Condition()
        self._decoder = FrameDecoder(1 << 26)
        self._send_lock = trio.Lock()
        self._rings: Rings | None = None
        self._ring_decoder = FrameDecoder(1 << 26)
        if limits.ring:
            self._rings = Rings(self._whole[len(self._view) :], limits.ring, "guest")
            self._rings.sleeping(True)  # always: the reader sleeps on the socket
        self._on_ring: set[int] = set()  # req_ids in flight through the ring
        self._on_socket: set[int] = set()  # ...and through the socket
        self._channel_free = trio.Event()  # set when a channel drains
        self._pools: weakref.WeakSet[AsyncPool] = weakref.WeakSet()  # made here, referenced
        self.mapping: Mapping | None = None  # the page mirror, when opened with map_pages

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
        """The shared region's page frames, writable (see ``Client.frames``)."""
        return self._view

    def reserve_frames(self, count: int = 1) -> FrameRun:
        """Take ``count`` contiguous frames out of the staging pool for your own use."""
        start = self._alloc.alloc(count)
        if start is None:
            raise LimitExceeded(
                f"no run of {count} free frames in the region ({self.limits.frames})"
            )
        return FrameRun(self._alloc, self._view, start, count, self._wake_frame_waiters)

    def _wake_frame_waiters(self) -> None:
        # Called from sync code (FrameRun.release): wake tasks waiting for staging frames.
        trio.lowlevel.spawn_system_task(self._notify_frames_freed)

    async def _notify_frames_freed(self) -> None:
        async with self._frames_freed:
            self._frames_freed.notify_all()

    async def new_pool(
        self,
        *,
        persistent: bool = False,
        shared: bool = False,
        uuid: uuid_module.UUID | bytes | str | None = None,
        page_size: int = FRAME_SIZE,
        name: str | None = None,
    ) -> AsyncPool:
        """Create a pool: private and ephemeral with 4096-byte pages unless told otherwise.

        ``name`` (1..64 characters of A-Z a-z 0-9 . _ -) makes a *named* private pool: asked
        again by the same guest (same name, same uid) on a later connection, the daemon gives
        back that pool with its pages (``pool.reopened``), if it asks within the daemon's
        ``reattach_seconds`` of the pool's last connection ending. The kind and page size
        must be the same; another connection holding it gets GuestConflict."""
        request, raw = new_pool_request(
            persistent=persistent, shared=shared, uuid=uuid, page_size=page_size, name=name
        )
        (result,) = await self._exchange([request], None)
        info = pool_info(result, persistent=persistent, shared=shared, uuid=raw, name=name)
        pool = AsyncPool(self, info)
        self._pools.add(pool)  # to report its mapped reads in wait_deferred
        return pool

    async def ping(self) -> None:
        """One round trip that does nothing."""
        await self._exchange([[Op.PING]], None)

    async def lend(self, want: int) -> dict[str, int]:
        """Ask to borrow ``want`` bytes in all (see ``Client.lend``)."""
        result: dict[str, int] = _plans.lend_reply(
            (await self._exchange([[Op.LEND, want]], None))[0]
        )
        return result

    # ------------------------------------------------------------------ driving plans

    async def wait_deferred(self) -> DeferredStats:
        """Report every pool's mapped reads, then wait for the answers to every
        put_many_nowait (and report) sent so far; the running counts."""
        for pool in list(self._pools):
            await pool.report_reads()
        while self._core.deferred_due:
            if self._core.closed is not None:
                raise self._core.closed
            async with self._frames_freed:
                await self._frames_freed.wait()  # notified as every deferred answer comes
        return self.deferred

    async def _run(
        self, job: Job, *, wait: bool = True, on_answer: OnAnswer | None = None, first: int = 0
    ) -> Any:
        if not job.need:
            return await self._drive(job.factory(0, 0), None)
        if job.need > self.limits.frames and (not job.unit or job.unit > self.limits.frames):
            raise LimitExceeded(f"{job.need} frames needed; the region has {self.limits.frames}")
        async with self._frames_freed:
            while True:
                count = job.need
                if job.unit:
                    count = min(count, self._alloc.largest() // job.unit * job.unit)
                # A no-wait batch is staged whole (its answer frees the run); while answers are
                # still due, frames come back, so wait for them rather than split it.
                whole = count == job.need or not self._staging_due()
                start = self._alloc.alloc(count) if count and (wait or whole) else None
                if start is not None:
                    break
                if self._core.closed is not None:
                    raise self._core.closed
                await self._frames_freed.wait()
        run = (start, count)
        if not wait and count == job.need:
            plan = job.factory(start, count)
            requests = next(plan)
            plan.close()
            answers = (
                None if on_answer is None else (_plans.first_items(requests, first), on_answer)
            )
            await self._send(requests, deferred=True, release=run, on_answer=answers)
            self.deferred.sent += 1
            return None
        try:
            results = await self._drive(job.factory(start, count), run)
        finally:
            if not self._held(run):
                await self._release(run)
        if not wait:  # no room to stage it whole: it went the slow way
            self.deferred.answered_now(results, first, on_answer)
            return None
        return results

    def _staging_due(self) -> bool:
        """Do answers still due hold staging frames (so frames will come back)?"""
        return any(p.release is not None for p in self._core.pending.values())

    def _held(self, run: tuple[int, int]) -> bool:
        """True if an answer still due will release the run (a cancelled exchange's)."""
        return any(p.release == run for p in self._core.pending.values())

    async def _release(self, run: tuple[int, int]) -> None:
        with trio.CancelScope(shield=True):
            async with self._frames_freed:
                self._alloc.release(*run)
                self._frames_freed.notify_all()

    async def _drive(self, plan: _plans.Plan[Any], run: tuple[int, int] | None) -> Any:
        try:
            requests = next(plan)
            while True:
                requests = plan.send(await self._exchange(requests, run))
        except StopIteration as stop:
            return stop.value

    async def _exchange(self, requests: list[list[Any]], run: tuple[int, int] | None) -> list[Any]:
        ids, waiters = await self._send(requests)
        try:
            for waiter in waiters:
                await waiter.event.wait()
        except BaseException:
            # Cancelled: nobody waits for the answers any more; the last one still due takes
            # the staging run, so no later request can be staged where this one's reply lands.
            due = [i for i in ids if i in self._core.pending]
            for req_id in due:
                self._core.pending[req_id].waiter = None
            if run is not None and due:
                self._core.pending[due[-1]].release = run
            raise
        if self._core.closed is not None and any(w.answer is None for w in waiters):
            raise self._core.closed
        return [w.answer.value() for w in waiters if w.answer is not None]

    async def _send(
        self,
        requests: list[list[Any]],
        *,
        deferred: bool = False,
        release: tuple[int, int] | None = None,
        on_answer: tuple[Sequence[int], OnAnswer] | None = None,
    ) -> tuple[list[int], list[_Waiter]]:
        """Send requests together, through the ring or the socket; each gets a waiter unless
        ``deferred`` (then ``release``, a staging run, is freed by the last answer, and
        ``on_answer`` is handed each answer)."""
        if self._core.closed is not None:
            raise self._core.closed
        # A frame half-written would desynchronise the stream: never cancel a send midway.
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                ids, data = self._core.send(
                    requests, deferred=deferred, release=release, on_answer=on_answer
                )
                waiters: list[_Waiter] = []
                if not deferred:
                    # Before anything yields: the reader may take an answer in at once.
                    for req_id in ids:
                        waiter = self._core.pending[req_id].waiter = _Waiter()
                        waiters.append(waiter)
                try:
                    await self._transmit(ids, data)
                except OSError as exc:
                    raise self._fail(DaemonGone(f"{GONE} ({exc})")) from exc
        return ids, waiters

    async def _transmit(self, ids: list[int], data: bytes) -> None:
        rings = self._rings
        if (
            rings is not None
            and len(data) <= rings.size // 2
            and (self._on_ring or not rings.peer_sleeping() or rings.host_crowded())
        ):
            # One channel at a time carries requests (PROTOCOL.md §4.6). The ring while the
            # daemon watches it or other guests keep it busy (client.py says why); while it
            # sleeps for us alone, a ring request would cost a doorbell each way (we sleep on
            # the socket) and the ring's work on top: then the socket.
            while self._on_socket or not rings.write(data):
                if not self._on_socket and not self._on_ring:
                    break  # it does not fit even an empty ring: the socket
                self._channel_free = trio.Event()
                await self._channel_free.wait()
                if self._core.closed is not None:
                    raise self._core.closed
            else:
                self._on_ring.update(ids)
                fence()  # we stored the request tail; now load the daemon's "idle" word
                if rings.peer_sleeping():
                    await self._sock_send(_DOORBELL)
                return
        while self._on_ring:
            self._channel_free = trio.Event()
            await self._channel_free.wait()
            if self._core.closed is not None:
                raise self._core.closed
        await self._sock_send(data)
        if rings is not None:
            self._on_socket.update(ids)

    async def _sock_send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self._sock.send(view) :]

    async def _read_replies(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        buf = bytearray(_RECV)
        task_status.started()
        try:
            while True:
                await self._take_replies(self._decoder)
                if self._rings is not None and self._rings.pending():
                    self._ring_decoder.feed(self._rings.take())
                    await self._take_replies(self._ring_decoder)
                    continue
                n = await self._sock.recv_into(buf)
                if not n and self.notice:
                    raise DaemonShuttingDown(f"{self.notice}; the connection is closed")
                if not n:
                    raise DaemonGone(GONE)
                self._decoder.feed(memoryview(buf)[:n])
        except TmemError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(DaemonGone(self.notice or f"{GONE} ({exc})"))

    async def _take_replies(self, decoder: FrameDecoder) -> None:
        """Hand every complete reply in ``decoder`` to the Core, and do what it says."""
        while (message := decoder.next_message()) is not NEED_DATA:
            answer = self._core.receive(message)
            if answer is None:
                continue  # a notice (a doorbell: the ring is looked at next)
            for channel in (self._on_ring, self._on_socket):
                if answer.req_id in channel:
                    channel.discard(answer.req_id)
                    if not channel:
                        self._channel_free.set()
            pending = answer.pending
            if pending.release is not None:  # free the frames before anyone wakes
                await self._release(pending.release)
            elif pending.deferred:
                async with self._frames_freed:
                    self._frames_freed.notify_all()  # wait_deferred looks again
            waiter = pending.waiter
            if waiter is not None:
                waiter.answer = answer
                waiter.event.set()

    def _fail(self, exc: TmemError) -> TmemError:
        closed = self._core.fail(exc)
        for pending in self._core.pending.values():
            if pending.waiter is not None:
                pending.waiter.event.set()
        self._core.pending.clear()
        self._channel_free.set()
        trio.lowlevel.spawn_system_task(self._notify_frames_freed)
        return closed

    def _close(self) -> None:
        self._fail(DaemonGone("this client is closed"))
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
            pass


@asynccontextmanager
async def open_client(
    path: str | os.PathLike[str],
    name: str,
    *,
    frames: int = DEFAULT_FRAMES,
    timeout: float = 10.0,
    ring_frames: int | None = None,
    map_pages: bool = False,
    lend_memory: bool = False,
) -> AsyncIterator[AsyncClient]:
    """Connect to tmemd as guest ``name`` with a region of ``frames`` frames (see ``connect``:
    ``ring_frames`` (rings where the machine allows them; the trio client never spins on
    them), ``map_pages`` (``client.mapping``, ``AsyncPool.read_mapped``) and ``lend_memory``
    (``client.lend``, ``client.mapping.loan``) as there)."""
    if ring_frames is None:
        ring_frames = ring.DEFAULT_RING_FRAMES if ring.supported() else 0
    hello = hello_message(name, frames, ring_frames, map_pages, lend_memory)
    fd, region = create_region(frames, layout.ring_bytes(ring_frames))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client: AsyncClient | None = None
    fds: list[int] = []
    mapping: Mapping | None = None
    try:
        with trio.fail_after(timeout):
            try:
                await sock.connect(os.fspath(path))
                await sock.sendmsg(
                    [hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                )
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonGone(
                    f"no tmemd at {path}: {exc.strerror}; is the daemon running?"
                ) from exc
            finally:
                os.close(fd)
            decoder = FrameDecoder(1 << 16)
            while (message := decoder.next_message()) is NEED_DATA:
                data, ancdata, msg_flags, _ = await sock.recvmsg(
                    4096, socket.CMSG_SPACE(8), socket.MSG_CMSG_CLOEXEC
                )
                fds += hello_fds(ancdata, msg_flags)
                if not data:
                    raise DaemonGone(f"tmemd at {path} closed the connection during the handshake")
                decoder.feed(data)
            limits = hello_reply(message, frames, ring_frames)
            mapping = hello_mapping(limits, fds, map_pages, lend_memory)
    except trio.TooSlowError as exc:
        sock.close()
        region.close()
        raise DaemonGone(f"tmemd at {path} did not answer within {timeout}s") from exc
    except BaseException:
        if mapping is not None:
            mapping.close()
        sock.close()
        region.close()
        raise
    finally:
        for received in fds:  # mapped (or refused): the descriptor itself is not kept
            os.close(received)
    client = AsyncClient(sock, region, limits)
    client.mapping = mapping
    client._decoder.feed(decoder.rest())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._read_replies)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        client._close()
