"""The guest's side of a connection, without I/O: the handshake's request and its checks,
req_ids, matching replies to requests, notices, and the answers nobody waits for.

The sync client (client.py) and the trio client (aclient.py) are I/O loops around a ``Core``:
they ask it for the bytes of their requests (``send``), hand it every reply they read
(``receive``), and do what it says: wake the caller waiting for an answer, free the staging
frames a no-wait batch held, or end the connection. Both therefore check the same things and
agree on every rule (the h11 shape: bytes in, events out, no socket, no clock).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tmemclient.mapping import Mapping
from tmemclient.wire.codec import encode_frame
from tmemclient.wire.errors import (
    DaemonGone,
    DaemonShuttingDown,
    InvalidArgument,
    ProtocolError,
    TmemError,
)
from tmemclient.wire.fds import fds_from_ancillary
from tmemclient.wire.messages import (
    OK,
    PROTOCOL_VERSION,
    SHUTDOWN,
    Hello,
    Limits,
    Status,
    check_ring_frames,
    error_for_status,
    split_reply,
    valid_guest_name,
)

GONE = "tmemd closed the connection (the daemon stopped or dropped it); reconnect to go on"
OnAnswer = Callable[[int, Any], None]  # put_many_nowait's answers: (first item, results)


# ------------------------------------------------------------------------------- handshake


def hello_message(
    name: str, frames: int, ring_frames: int = 0, map_pages: bool = False, lend: bool = False
) -> bytes:
    """The HELLO frame, after local checks of its arguments."""
    if not isinstance(name, str) or not valid_guest_name(name):
        raise InvalidArgument("guest name must be 1..64 characters of A-Z a-z 0-9 . _ -")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise InvalidArgument(f"frames must be a positive int, got {frames!r}")
    ring_frames = check_ring_frames(ring_frames)
    if lend and not map_pages:
        raise InvalidArgument(
            "lend_memory needs map_pages: the lent memory's state is in the mirror"
        )
    return Hello(PROTOCOL_VERSION, name, frames, ring_frames, bool(map_pages), bool(lend)).encode()


def hello_reply(message: Any, frames: int, ring_frames: int) -> Limits:
    """Decode the daemon's answer to HELLO, raising the error it carries, and check it granted
    what was asked: the region of ``frames`` frames, rings of ``ring_frames`` or none."""
    req_id, status, result = split_reply(message)
    if status != Status.OK:
        raise error_for_status(status, f"tmemd refused the connection: {result}")
    if req_id != 1:
        raise ProtocolError(f"HELLO reply has req_id {req_id}, want 1")
    limits = Limits.from_wire(result)
    if limits.ring not in (0, ring_frames) or limits.frames != frames:
        raise ProtocolError(f"tmemd granted a region other than the one asked: {limits}")
    return limits


def hello_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The descriptors that came with the HELLO reply (SCM_RIGHTS)."""
    return fds_from_ancillary(
        ancdata, msg_flags, "tmemd sent more fds with its HELLO reply than a mirror and a loan"
    )


def hello_mapping(
    limits: Limits, fds: list[int], map_pages: bool, lend: bool = False
) -> Mapping | None:
    """The mapping of the mirror (and of the loan file) that came with the HELLO reply, if
    asked for and granted (the caller closes ``fds`` either way)."""
    want = (1 if limits.map else 0) + (1 if limits.lend else 0)
    if (
        len(fds) != want
        or (limits.map and not map_pages)
        or (limits.lend and not (lend and limits.map))
    ):
        raise ProtocolError("tmemd's HELLO reply carried fds other than the mirror granted")
    if not limits.map:
        return None
    return Mapping(fds[0], limits.map, fds[1] if limits.lend else None, limits.lend)


# ------------------------------------------------------------------------------- answers


class DeferredStats:
    """What the answers to ``put_many_nowait`` said, counted as they arrive."""

    def __init__(self) -> None:
        self.sent = 0  # batches sent
        self.stored = 0  # pages the daemon took
        self.refused = 0  # pages it declined (no room, frozen, over cap): not an error
        self.errors = 0  # requests answered with an error (e.g. the pool was destroyed)
        self.last_error: str | None = None

    def answered_now(self, results: list[Any], first: int, on_answer: OnAnswer | None) -> None:
        """A no-wait batch that went the slow way (it could not be staged whole) was answered
        before the call returned: count it, and hand the answers on as a no-wait one's."""
        self.sent += 1
        self.count(Status.OK, results)
        if on_answer is not None:
            on_answer(first, results)

    def count(self, status: int, result: Any) -> None:
        """Count one answer."""
        if status != OK:
            self.errors += 1
            self.last_error = str(result)
            return
        if result is None:  # a report of mapped reads (TOUCH_MANY): no pages in it
            return
        flags = result if isinstance(result, list) else [result]
        ok = sum(1 for flag in flags if flag)
        self.stored += ok
        self.refused += len(flags) - ok

    def __repr__(self) -> str:
        return (
            f"DeferredStats(sent={self.sent}, stored={self.stored}, refused={self.refused}, "
            f"errors={self.errors})"
        )


class Pending:
    """A request sent and not answered yet."""

    __slots__ = ("deferred", "on_answer", "release", "waiter")

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred  # nobody waits for it: its answer is counted on arrival
        self.release: tuple[int, int] | None = None  # staging run (start, count) it holds
        self.on_answer: tuple[int, OnAnswer] | None = None  # (first item, handler)
        self.waiter: Any = None  # the I/O layer's (a trio Event, say)


class Answer:
    """What ``Core.receive`` made of a reply to a request: its req_id, status and result, the
    staging run it frees (if any), and whether somebody waits for it (else it was counted in
    ``deferred`` and handed to its ``on_answer``)."""

    __slots__ = ("pending", "req_id", "result", "status")

    def __init__(self, req_id: int, status: int, result: Any, pending: Pending) -> None:
        self.req_id = req_id
        self.status = status
        self.result = result
        self.pending = pending

    def value(self) -> Any:
        """The result, or the error the reply carries, raised."""
        if self.status != OK:
            raise error_for_status(self.status, self.result)
        return self.result


class Core:
    """One connection's protocol state, guest side. Not thread-safe."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.name = limits.guest
        self._req_id = 1
        self.pending: dict[int, Pending] = {}
        self.deferred = DeferredStats()
        self.notice: str | None = None  # the SHUTDOWN notice's words, once it came
        self.closed: TmemError | None = None  # why the connection ended, once it did

    def send(
        self,
        requests: Sequence[list[Any]],
        *,
        deferred: bool = False,
        release: tuple[int, int] | None = None,
        on_answer: tuple[Sequence[int], OnAnswer] | None = None,
    ) -> tuple[list[int], bytes]:
        """req_ids for ``requests`` (each ``[op, *args]``) and the bytes that carry them. With
        ``deferred`` nobody will wait for the answers (counted as they come); ``release`` is a
        staging run the last of them frees; ``on_answer`` gives each request's first item and
        the handler its answer goes to."""
        if self.closed is not None:
            raise self.closed
        ids: list[int] = []
        frames: list[bytes] = []
        for request in requests:
            self._req_id = self._req_id % 0xFFFFFFFF + 1
            req_id = self._req_id
            ids.append(req_id)
            frames.append(encode_frame([request[0], req_id, *request[1:]]))
            self.pending[req_id] = Pending(deferred)
        if release is not None:
            self.pending[ids[-1]].release = release
        if on_answer is not None:
            firsts, handler = on_answer
            for req_id, first in zip(ids, firsts, strict=True):
                self.pending[req_id].on_answer = (first, handler)
        return ids, frames[0] if len(frames) == 1 else b"".join(frames)

    def send_one(self, op: int, args: Sequence[Any]) -> tuple[int, bytes]:
        """``send`` of one request (``[op, *args]``) that its caller waits for: the common
        case, without the lists."""
        if self.closed is not None:
            raise self.closed
        self._req_id = req_id = self._req_id % 0xFFFFFFFF + 1
        self.pending[req_id] = Pending(False)
        return req_id, encode_frame([op, req_id, *args])

    def receive(self, message: Any) -> Answer | None:
        """Take one reply in. A notice gives None (a doorbell; a SHUTDOWN notice, kept in
        ``notice``), or raises the error that ends the connection. A reply to a request gives
        its Answer; a deferred one has been counted and handed to its ``on_answer`` already.
        ProtocolError for a reply that answers nothing asked."""
        req_id, status, result = split_reply(message)
        if req_id == 0:
            if status == SHUTDOWN:
                self.notice = str(result)
                return None
            if status == OK:
                return None  # a doorbell: replies are in the reply ring
            raise error_for_status(status, f"tmemd dropped the connection: {result}")
        pending = self.pending.pop(req_id, None)
        if pending is None:
            raise ProtocolError(f"tmemd answered req_id {req_id}, which is not awaited")
        if pending.deferred:
            self.deferred.count(status, result)
            if pending.on_answer is not None:
                first, handler = pending.on_answer
                handler(first, result if status == OK else None)
        return Answer(req_id, status, result, pending)

    def abandon(self, req_id: int) -> None:
        """Nobody waits for ``req_id`` any more (its caller was cancelled): its answer is
        taken as a deferred one's when it comes (it still frees its staging run)."""
        pending = self.pending.get(req_id)
        if pending is not None:
            pending.deferred = True

    def fail(self, exc: BaseException) -> TmemError:
        """The connection is over because of ``exc``: what every call raises from now on."""
        if self.closed is None:
            if isinstance(exc, TmemError):
                self.closed = exc
            elif self.notice:
                self.closed = DaemonShuttingDown(f"{self.notice}; the connection is closed")
            else:
                self.closed = DaemonGone(f"{GONE} ({exc})")
        return self.closed

    @property
    def deferred_due(self) -> bool:
        """Are answers nobody waits for still due?"""
        return any(p.deferred for p in self.pending.values())
