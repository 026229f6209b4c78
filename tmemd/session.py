"""One guest connection's request handling: decoded message in, encoded reply out. No I/O.

The server (a thin trio adapter) owns the socket and hands every decoded message to
``Session.handle``. Everything the guest sends is untrusted: ``decode_request`` (tmemclient/wire/
requests.py) checks every argument against this connection before a typed request reaches a
handler here: pool handles are looked up only in this session's own table (so another guest's
handles are simply unknown), every number is range checked before arithmetic, and a batch is
validated whole before any page of it is touched. Handlers are chosen by the request's type.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from tmemclient.wire.errors import InvalidArgument, LimitExceeded, ProtocolError, TmemError
from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemclient.wire.messages import OK, Op, Status, encode_reply, status_for_error
from tmemclient.wire.requests import (
    DestroyPool,
    Doorbell,
    Flush,
    FlushMany,
    FlushObject,
    Get,
    Lend,
    NewPool,
    PageBatch,
    Ping,
    Put,
    SubPage,
    TouchMany,
    decode_request,
)
from tmemd.accounts import Guest, Pool
from tmemd.config import Limits
from tmemd.host import Host

FLUSH_SLICE = 256  # flushes of one request between two looks at the turn's clock


class Job:
    """A request too big to serve in one go (a batch of many pages, a flush of a big object):
    served a slice at a time, so the server can give other guests their turns in between.
    ``step`` serves one slice and returns the encoded reply once the last one is done.

    Between slices the world may change as it may between two requests (another guest's put
    evicts a page, an administrator freezes the guest or revokes a shared pool): each slice
    is served as the same single requests would be at that moment, and a pool that went away
    meanwhile answers the rest of the batch as misses and refused puts."""

    __slots__ = ("_finish", "_next", "req_id")

    def __init__(
        self, req_id: int, next_slice: Callable[[], bool], finish: Callable[[], Any]
    ) -> None:
        self.req_id = req_id
        self._next = next_slice  # serves a slice; True once the request is complete
        self._finish = finish  # the result, once complete

    def step(self) -> bytes | None:
        """Serve the next slice; the reply once the request is complete, else None."""
        if not self._next():
            return None
        return encode_reply(self.req_id, OK, self._finish())


def _slices(total: int, per_slice: int, run: Callable[[int, int], None]) -> Callable[[], bool]:
    """A ``next_slice`` for a Job that calls ``run(start, end)`` over ``range(total)`` in
    slices of ``per_slice``."""
    per_slice = max(1, per_slice)
    pos = [0]

    def next_slice() -> bool:
        start = pos[0]
        end = pos[0] = min(start + per_slice, total)
        run(start, end)
        return end >= total

    return next_slice


class Session:
    """The daemon's side of one guest connection (and the ``Context`` its requests are checked
    against: ``frames``, ``max_batch``, ``mapped``, ``lending``, ``pool_order``)."""

    def __init__(
        self, host: Host, guest: Guest, region: memoryview, limits: Limits, *, uid: int = 0
    ) -> None:
        self.host = host
        self.uid = uid  # of the peer (SO_PEERCRED)
        self.store = host.store
        self.guest = guest
        self.region = region
        self.frames = len(region) // FRAME_SIZE
        self.max_batch = limits.max_batch
        self.mapped = False  # granted a mirror in HELLO: PUT_MANY answers with tokens (§4.7)
        self.lending = False  # granted a loan file in HELLO: may LEND (§4.8)
        self.limits = limits
        self.pools: dict[int, Pool] = {}
        # Handles are a random bijection of a counter: never reused within the session (a stale
        # handle can't reach a newer pool) and not guessable from another session's.
        self._handle_mul = secrets.randbits(32) | 1
        self._handle_add = secrets.randbits(32)
        self._pools_made = 0
        self.requests = 0
        # Pages of one batch between two looks at the turn's clock (server: bounded turns).
        self._slice_bytes = limits.slice_bytes
        self._handlers: dict[type, Callable[[Any], Any]] = {
            NewPool: self._new_pool,
            DestroyPool: self._destroy_pool,
            Put: self._put,
            Get: self._get,
            Flush: self._flush,
            FlushObject: self._flush_object,
            SubPage: self._sub_page,
            PageBatch: self._page_batch,
            FlushMany: self._flush_many,
            TouchMany: self._touch_many,
            Lend: self._lend,
            Ping: lambda request: None,
        }

    def pool_order(self, handle: int) -> int | None:
        """The page order of the pool ``handle`` names on this connection (Context)."""
        pool = self.pools.get(handle)
        return None if pool is None else pool.order

    def handle(self, message: Any) -> bytes | Job:
        """Serve one request and return its encoded reply, or a Job that serves it in slices
        (``Job.step`` until it returns the reply).

        Raises ProtocolError when the message is not a request at all; the caller answers it
        (``protocol_error_reply``) and closes the connection.
        """
        try:
            request = decode_request(message, self)
        except ProtocolError:
            raise
        except TmemError as exc:  # a request, with bad arguments: answered, the connection goes on
            self.requests += 1
            return encode_reply(message[1], status_for_error(exc), str(exc))
        if type(request) is Doorbell:
            return b""  # "look at the ring": the server does so after every batch of frames
        self.requests += 1
        try:
            result = self._handlers[type(request)](request)
        except ProtocolError:
            raise
        except TmemError as exc:
            return encode_reply(request.req_id, status_for_error(exc), str(exc))
        if type(result) is Job:
            return result
        return encode_reply(request.req_id, OK, result)

    def close(self) -> int:
        """Free every page of this connection's private pools, leave its shared pools, and
        leave the host; return private pages freed (or, for big pools, being freed). Every
        step runs even if one before it failed: a connection always leaves whole."""
        freed = 0
        try:
            pools, self.pools = list(self.pools.values()), {}
            for pool in pools:
                if not pool.shared and not pool.dead and not self.host.keep_named(self, pool):
                    freed += self.store.destroy_pool(pool)
        finally:
            try:
                if self.lending:  # the loan was this session's: all of it comes back
                    self.lending = False
                    self.store.close_loan(self.guest)
            finally:
                self.host.detach(self)
        return freed

    def detach_pool(self, pool: Pool) -> None:
        """Forget every handle of ``pool`` (its shared-pool grant was revoked)."""
        for handle in [h for h, p in self.pools.items() if p is pool]:
            del self.pools[handle]

    # ------------------------------------------------------------------ handlers

    def _new_pool(self, request: NewPool) -> list[Any]:
        spec = request.spec
        if len(self.pools) >= self.limits.max_pools:
            raise LimitExceeded(f"guest already has max_pools={self.limits.max_pools} pools")
        if (FRAME_SIZE << spec.order) > len(self.region):
            raise InvalidArgument(
                f"page size {spec.page_size} does not fit the region ({len(self.region)} bytes)"
            )
        if spec.shared:
            assert spec.uuid is not None
            pool = self.host.open_shared(self, spec.uuid, spec.order)
        elif spec.name is not None:
            pool, reopened = self.host.open_named(
                self, spec.name, persistent=spec.persistent, order=spec.order
            )
        else:
            pool = self.store.new_pool(self.guest, persistent=spec.persistent, order=spec.order)
        self._pools_made += 1
        handle = (self._pools_made * self._handle_mul + self._handle_add) & 0xFFFFFFFF
        self.pools[handle] = pool
        if spec.name is not None:
            return [handle, spec.page_size, reopened]
        return [handle, spec.page_size]

    def _destroy_pool(self, request: DestroyPool) -> None:
        pool = self.pools.pop(request.pool)
        if pool.shared:
            if pool not in self.pools.values():  # the last handle of it on this connection
                self.host.leave_shared(self, pool)
        else:
            self.host.destroyed(pool)
            self.store.destroy_pool(pool)

    def _frames(self, frame: int, order: int) -> memoryview:
        return self.region[frame << FRAME_SHIFT : (frame + (1 << order)) << FRAME_SHIFT]

    def _put(self, request: Put) -> bool:
        pool = self.pools[request.pool]
        return self.store.put(
            pool,
            request.oid,
            request.index,
            self._frames(request.frame, pool.order),
            frozen=self.guest.frozen,
        )

    def _get(self, request: Get) -> bool:
        pool = self.pools[request.pool]
        frames = self._frames(request.frame, pool.order)
        return self.store.get(pool, request.oid, request.index, frames)

    def _flush(self, request: Flush) -> None:
        self.store.flush(self.pools[request.pool], request.oid, request.index)

    def _sub_page(self, request: SubPage) -> bool:
        pool = self.pools[request.pool]
        start = request.frame << FRAME_SHIFT
        view = self.region[start : start + request.length]
        serve = {Op.READ: self.store.read, Op.WRITE: self.store.write, Op.XCHG: self.store.xchg}
        return serve[request.op](pool, request.oid, request.index, request.offset, view)

    def _per_slice(self, pool: Pool) -> int:
        return self._slice_bytes >> (FRAME_SHIFT + pool.order)

    def _live(self, handle: int, pool: Pool) -> bool:
        """Is ``pool`` still reachable by ``handle`` (not destroyed, not revoked)?"""
        return not pool.dead and self.pools.get(handle) is pool

    def _page_batch(self, request: PageBatch) -> list[Any] | Job:
        """A PUT_MANY or GET_MANY: served at once when it fits one slice, else a Job serving
        it a slice at a time."""
        store, region, pool = self.store, self.region, self.pools[request.pool]
        serve: Callable[[Sequence[int], Sequence[int], Sequence[int]], list[Any]]
        if request.op == Op.PUT_MANY:

            def serve(oids: Sequence[int], idxs: Sequence[int], frames: Sequence[int]) -> list[Any]:
                frozen = self.guest.frozen
                return store.put_many(
                    pool, oids, idxs, frames, region, frozen=frozen, tokens=self.mapped
                )

        else:

            def serve(oids: Sequence[int], idxs: Sequence[int], frames: Sequence[int]) -> list[Any]:
                return store.get_many(pool, oids, idxs, frames, region)

        oids, idxs, frames = request.oids, request.idxs, request.frames
        per_slice = self._per_slice(pool)
        if len(oids) <= per_slice:
            return serve(oids, idxs, frames)
        # Kept while other guests take turns: as arrays, 4-8 bytes an entry rather than a list
        # of int objects (a 4096-entry batch holds ~100 KiB, not ~450 KiB).
        idxs, frames = array("I", idxs), array("I", frames)
        if max(oids) >> 64 == 0:
            oids = array("Q", oids)
        results: list[Any] = []
        handle = request.pool

        def run(a: int, b: int) -> None:
            if not self._live(handle, pool):
                results.extend([False] * (b - a))
                return
            results.extend(serve(oids[a:b], idxs[a:b], frames[a:b]))

        return Job(request.req_id, _slices(len(oids), per_slice, run), lambda: results)

    def _flush_many(self, request: FlushMany) -> Job | None:
        pool, handle = self.pools[request.pool], request.pool
        oids, idxs = request.oids, request.idxs
        flush = self.store.flush

        def run(a: int, b: int) -> None:
            if self._live(handle, pool):
                for oid, index in zip(oids[a:b], idxs[a:b], strict=True):
                    flush(pool, oid, index)

        if len(oids) <= FLUSH_SLICE:
            run(0, len(oids))
            return None
        return Job(request.req_id, _slices(len(oids), FLUSH_SLICE, run), lambda: None)

    def _flush_object(self, request: FlushObject) -> Job | None:
        pool, handle, oid = self.pools[request.pool], request.pool, request.oid
        store = self.store
        if store.flush_object(pool, oid, FLUSH_SLICE) < FLUSH_SLICE:
            return None
        # A big object: the rest in slices, until one finds fewer pages than it may take.

        def next_slice() -> bool:
            if not self._live(handle, pool):
                return True
            return store.flush_object(pool, oid, FLUSH_SLICE, counted=False) < FLUSH_SLICE

        return Job(request.req_id, next_slice, lambda: None)

    def _touch_many(self, request: TouchMany) -> None:
        self.store.touch_many(self.pools[request.pool], request.heads, request.gens)

    def _lend(self, request: Lend) -> dict[str, int]:
        result = self.store.lend(self.guest, request.want >> FRAME_SHIFT)
        return {
            key: value << FRAME_SHIFT if key != "seq" else value for key, value in result.items()
        }


def protocol_error_reply(exc: ProtocolError, req_id: int = 0) -> bytes:
    """The last frame a guest gets before the daemon closes a connection that broke the protocol."""
    return encode_reply(req_id, Status.PROTOCOL, str(exc))
