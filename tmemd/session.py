"""One guest connection's request handling: decoded message in, encoded reply out. No I/O.

The server (a thin trio adapter) owns the socket and hands every decoded message to
``Session.handle``. Everything the guest sends is untrusted: pool handles are looked up only in
this session's own table (so another guest's handles are simply unknown), every number is range
checked before arithmetic, and a batch is validated whole before any page of it is touched.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from tmemclient.wire.errors import (
    InvalidArgument,
    LimitExceeded,
    ProtocolError,
    TmemError,
    UnknownPool,
)
from tmemclient.wire.layout import FRAME_SHIFT, FRAME_SIZE
from tmemclient.wire.messages import (
    INDEX_BITS,
    Op,
    PoolSpec,
    Status,
    check_uint,
    decode_oid,
    encode_reply,
    split_request,
    status_for_error,
)
from tmemd.accounts import Guest, Pool
from tmemd.config import Limits
from tmemd.host import Host

FLUSH_SLICE = 256  # flushes of one request between two looks at the turn's clock

_ARGS: dict[int, tuple[str, ...]] = {
    Op.NEW_POOL: ("flags", "uuid"),
    Op.DESTROY_POOL: ("pool",),
    Op.PUT: ("pool", "oid", "index", "frame"),
    Op.GET: ("pool", "oid", "index", "frame"),
    Op.FLUSH: ("pool", "oid", "index"),
    Op.FLUSH_OBJECT: ("pool", "oid"),
    Op.READ: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.WRITE: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.XCHG: ("pool", "oid", "index", "offset", "length", "frame"),
    Op.PUT_MANY: ("pool", "entries"),
    Op.GET_MANY: ("pool", "entries"),
    Op.FLUSH_MANY: ("pool", "entries"),
    Op.TOUCH_MANY: ("pool", "entries"),
    Op.LEND: ("want",),
    Op.PING: (),
    Op.DOORBELL: (),
}


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
        return encode_reply(self.req_id, Status.OK, self._finish())


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
    """The daemon's side of one guest connection."""

    def __init__(
        self, host: Host, guest: Guest, region: memoryview, limits: Limits, *, uid: int = 0
    ) -> None:
        self.host = host
        self.uid = uid  # of the peer (SO_PEERCRED)
        self.store = host.store
        self.guest = guest
        self.region = region
        self.frames = len(region) // FRAME_SIZE
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
        self._req_id = 0  # of the request being served (for the Jobs it makes)
        # Pages of one batch between two looks at the turn's clock (server: bounded turns).
        self._slice_bytes = limits.slice_bytes
        self._handlers: dict[int, Callable[[list[Any]], Any]] = {
            Op.NEW_POOL: self._new_pool,
            Op.DESTROY_POOL: self._destroy_pool,
            Op.PUT: self._put,
            Op.GET: self._get,
            Op.FLUSH: self._flush,
            Op.FLUSH_OBJECT: self._flush_object,
            Op.READ: self._read,
            Op.WRITE: self._write,
            Op.XCHG: self._xchg,
            Op.PUT_MANY: self._put_many,
            Op.GET_MANY: self._get_many,
            Op.FLUSH_MANY: self._flush_many,
            Op.TOUCH_MANY: self._touch_many,
            Op.LEND: self._lend,
            Op.PING: lambda m: None,
            Op.DOORBELL: lambda m: None,  # only reached with arguments: an error
        }

    def handle(self, message: Any) -> bytes | Job:
        """Serve one request and return its encoded reply, or a Job that serves it in slices
        (``Job.step`` until it returns the reply).

        Raises ProtocolError when the message is not a request at all; the caller answers it
        (``protocol_error_reply``) and closes the connection.
        """
        op, req_id, m = split_request(message)
        if op == Op.DOORBELL and len(m) == 2:
            return b""  # "look at the ring": the server does so after every batch of frames
        self.requests += 1
        handler = self._handlers.get(op)
        try:
            if handler is None:
                raise InvalidArgument(f"unknown op {op}")
            want = _ARGS[op]
            if len(m) != 2 + len(want):
                raise InvalidArgument(
                    f"{Op(op).name} takes {len(want)} arguments ({', '.join(want) or 'none'}), "
                    f"got {len(m) - 2}"
                )
            self._req_id = req_id
            result = handler(m)
        except ProtocolError:
            raise
        except TmemError as exc:
            return encode_reply(req_id, status_for_error(exc), str(exc))
        if type(result) is Job:
            return result
        return encode_reply(req_id, Status.OK, result)

    def close(self) -> int:
        """Free every page of this connection's private pools, leave its shared pools, and
        leave the host; return private pages freed (or, for big pools, being freed). Every
        step runs even if one before it failed: a connection always leaves whole."""
        freed = 0
        try:
            pools, self.pools = list(self.pools.values()), {}
            for pool in pools:
                if not pool.shared and not pool.dead:
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

    # ------------------------------------------------------------------ argument checks

    def _pool(self, handle: Any) -> Pool:
        pool = self.pools.get(handle) if type(handle) is int else None
        if pool is None:
            # Never repr() the guest's value: a 1 MiB bin or 1000-deep array would bloat the
            # reply or raise RecursionError.
            shown = handle if type(handle) is int else f"handle of type {type(handle).__name__}"
            raise UnknownPool(
                f"pool {shown} is unknown to this connection (never made or destroyed)"
            )
        return pool

    def _page_frames(self, frame: Any, pool: Pool, what: str = "frame") -> memoryview:
        frame = check_uint(frame, 32, what)
        n = 1 << pool.order
        if frame + n > self.frames:
            raise InvalidArgument(
                f"{what} {frame} (+{n} for a {pool.page_size}-byte page) is outside the "
                f"region's {self.frames} frames"
            )
        return self.region[frame * FRAME_SIZE : (frame + n) * FRAME_SIZE]

    def _sub_range(self, pool: Pool, m: list[Any]) -> tuple[int, int, int, memoryview]:
        oid = decode_oid(m[3])
        index = check_uint(m[4], INDEX_BITS, "index")
        offset = check_uint(m[5], 32, "offset")
        length = check_uint(m[6], 32, "length")
        frame = check_uint(m[7], 32, "frame")
        if length == 0 or offset + length > pool.page_size:
            raise InvalidArgument(
                f"offset {offset} + length {length} must lie inside the {pool.page_size}-byte page "
                "(length at least 1)"
            )
        start = frame * FRAME_SIZE
        if start + length > len(self.region):
            raise InvalidArgument(
                f"frame {frame} + length {length} runs past the region ({len(self.region)} bytes)"
            )
        return oid, index, offset, self.region[start : start + length]

    def _entries(self, entries: Any, width: int) -> list[Any]:
        if type(entries) is not list or len(entries) % width:
            raise InvalidArgument(f"batch entries must be a flat array of {width}-tuples")
        count = len(entries) // width
        if count > self.limits.max_batch:
            raise LimitExceeded(f"batch of {count} pages exceeds max_batch {self.limits.max_batch}")
        return entries

    # ------------------------------------------------------------------ handlers

    def _new_pool(self, m: list[Any]) -> list[int]:
        spec = PoolSpec.decode(m[2], m[3])
        if spec.shared and spec.persistent:
            raise InvalidArgument("shared persistent pools are not supported (as in Xen)")
        if len(self.pools) >= self.limits.max_pools:
            raise LimitExceeded(f"guest already has max_pools={self.limits.max_pools} pools")
        if (FRAME_SIZE << spec.order) > len(self.region):
            raise InvalidArgument(
                f"page size {spec.page_size} does not fit the region ({len(self.region)} bytes)"
            )
        if spec.shared:
            assert spec.uuid is not None
            pool = self.host.open_shared(self, spec.uuid, spec.order)
        else:
            pool = self.store.new_pool(self.guest, persistent=spec.persistent, order=spec.order)
        self._pools_made += 1
        handle = (self._pools_made * self._handle_mul + self._handle_add) & 0xFFFFFFFF
        self.pools[handle] = pool
        return [handle, spec.page_size]

    def _destroy_pool(self, m: list[Any]) -> None:
        pool = self._pool(m[2])
        del self.pools[m[2]]
        if pool.shared:
            if pool not in self.pools.values():  # the last handle of it on this connection
                self.host.leave_shared(self, pool)
        else:
            self.store.destroy_pool(pool)

    def _put(self, m: list[Any]) -> bool:
        pool = self._pool(m[2])
        oid = decode_oid(m[3])
        index = check_uint(m[4], INDEX_BITS, "index")
        frozen = self.guest.frozen
        return self.store.put(pool, oid, index, self._page_frames(m[5], pool), frozen=frozen)

    def _get(self, m: list[Any]) -> bool:
        pool = self._pool(m[2])
        oid = decode_oid(m[3])
        index = check_uint(m[4], INDEX_BITS, "index")
        return self.store.get(pool, oid, index, self._page_frames(m[5], pool))

    def _flush(self, m: list[Any]) -> None:
        pool = self._pool(m[2])
        self.store.flush(pool, decode_oid(m[3]), check_uint(m[4], INDEX_BITS, "index"))

    def _read(self, m: list[Any]) -> bool:
        pool = self._pool(m[2])
        oid, index, offset, view = self._sub_range(pool, m)
        return self.store.read(pool, oid, index, offset, view)

    def _write(self, m: list[Any]) -> bool:
        pool = self._pool(m[2])
        oid, index, offset, view = self._sub_range(pool, m)
        return self.store.write(pool, oid, index, offset, view)

    def _xchg(self, m: list[Any]) -> bool:
        pool = self._pool(m[2])
        oid, index, offset, view = self._sub_range(pool, m)
        return self.store.xchg(pool, oid, index, offset, view)

    def _columns(self, entries: list[Any], width: int) -> tuple[Sequence[int], Sequence[int]]:
        """Object ids and indexes of a batch, validated whole.

        The fast path checks a column at once with C-level builtins (the set of types, min and
        max); only a batch that fails it is walked entry by entry, to name the bad entry.
        """
        oids, idxs = entries[0::width], entries[1::width]
        if not (_plain_uints(oids, 64)):
            oids = [decode_oid(o, f"entry {i} oid") for i, o in enumerate(oids)]
        if not _plain_uints(idxs, INDEX_BITS):
            idxs = [check_uint(x, INDEX_BITS, f"entry {i} index") for i, x in enumerate(idxs)]
        return oids, idxs

    def _page_batch(self, m: list[Any]) -> tuple[Pool, Sequence[int], Sequence[int], Sequence[int]]:
        pool = self._pool(m[2])
        entries = self._entries(m[3], 3)
        oids, idxs = self._columns(entries, 3)
        frames = entries[2::3]
        span = 1 << pool.order
        if not (_plain_uints(frames, 32) and (not frames or max(frames) + span <= self.frames)):
            for i, frame in enumerate(frames):
                self._page_frames(frame, pool, f"entry {i} frame")
        return pool, oids, idxs, frames

    def _per_slice(self, pool: Pool) -> int:
        return self._slice_bytes >> (FRAME_SHIFT + pool.order)

    def _live(self, handle: int, pool: Pool) -> bool:
        """Is ``pool`` still reachable by ``handle`` (not destroyed, not revoked)?"""
        return not pool.dead and self.pools.get(handle) is pool

    def _put_many(self, m: list[Any]) -> list[Any] | Job:
        store, region = self.store, self.region
        return self._sliced(
            m,
            lambda pool, oids, idxs, frames: store.put_many(
                pool, oids, idxs, frames, region, frozen=self.guest.frozen, tokens=self.mapped
            ),
        )

    def _get_many(self, m: list[Any]) -> list[Any] | Job:
        store, region = self.store, self.region
        return self._sliced(
            m,
            lambda pool, oids, idxs, frames: store.get_many(pool, oids, idxs, frames, region),
        )

    def _sliced(self, m: list[Any], serve: Callable[..., list[Any]]) -> list[Any] | Job:
        """A PUT_MANY or GET_MANY, validated whole: served at once when it fits one slice, else
        a Job serving ``serve(pool, oids, idxs, frames)`` a slice at a time."""
        pool, oids, idxs, frames = self._page_batch(m)
        per_slice = self._per_slice(pool)
        if len(oids) <= per_slice:
            return serve(pool, oids, idxs, frames)
        # Kept while other guests take turns: as arrays, 4-8 bytes an entry rather than a list
        # of int objects (a 4096-entry batch holds ~100 KiB, not ~450 KiB).
        idxs, frames = array("I", idxs), array("I", frames)
        if max(oids) >> 64 == 0:
            oids = array("Q", oids)
        results: list[Any] = []
        handle = m[2]

        def run(a: int, b: int) -> None:
            if not self._live(handle, pool):
                results.extend([False] * (b - a))
                return
            results.extend(serve(pool, oids[a:b], idxs[a:b], frames[a:b]))

        return Job(self._req_id, _slices(len(oids), per_slice, run), lambda: results)

    def _flush_many(self, m: list[Any]) -> Job | None:
        pool = self._pool(m[2])
        oids, idxs = self._columns(self._entries(m[3], 2), 2)
        flush = self.store.flush
        handle = m[2]

        def run(a: int, b: int) -> None:
            if self._live(handle, pool):
                for oid, index in zip(oids[a:b], idxs[a:b], strict=True):
                    flush(pool, oid, index)

        if len(oids) <= FLUSH_SLICE:
            run(0, len(oids))
            return None
        return Job(self._req_id, _slices(len(oids), FLUSH_SLICE, run), lambda: None)

    def _flush_object(self, m: list[Any]) -> Job | None:
        pool = self._pool(m[2])
        oid = decode_oid(m[3])
        store, handle = self.store, m[2]
        if store.flush_object(pool, oid, FLUSH_SLICE) < FLUSH_SLICE:
            return None
        # A big object: the rest in slices, until one finds fewer pages than it may take.

        def next_slice() -> bool:
            if not self._live(handle, pool):
                return True
            return store.flush_object(pool, oid, FLUSH_SLICE, counted=False) < FLUSH_SLICE

        return Job(self._req_id, next_slice, lambda: None)

    def _touch_many(self, m: list[Any]) -> None:
        pool = self._pool(m[2])
        if not self.mapped:
            raise InvalidArgument(
                "TOUCH_MANY reports reads through a mapping; this connection has none "
                "(ask for one in HELLO: map true)"
            )
        entries = self._entries(m[3], 2)
        heads, gens = entries[0::2], entries[1::2]
        if not (_plain_uints(heads, 32) and _plain_uints(gens, 64)):
            for i, (head, gen) in enumerate(zip(heads, gens, strict=True)):
                check_uint(head, 32, f"entry {i} slot")
                check_uint(gen, 64, f"entry {i} generation")
        self.store.touch_many(pool, heads, gens)

    def _lend(self, m: list[Any]) -> dict[str, int]:
        if not self.lending:
            raise InvalidArgument(
                "LEND needs a loan file; this connection has none (ask for one in HELLO: "
                "map true, lend true; the daemon may have lending off, or lend to another "
                "session of this guest already)"
            )
        want = check_uint(m[2], 64, "want") >> FRAME_SHIFT
        result = self.store.lend(self.guest, want)
        return {
            key: value << FRAME_SHIFT if key != "seq" else value for key, value in result.items()
        }


def _plain_uints(values: list[Any], bits: int) -> bool:
    """True if every value is an int (not a bool) in 0 .. 2**bits - 1."""
    return not values or (
        set(map(type, values)) == {int} and min(values) >= 0 and max(values) >> bits == 0
    )


def protocol_error_reply(exc: ProtocolError, req_id: int = 0) -> bytes:
    """The last frame a guest gets before the daemon closes a connection that broke the protocol."""
    return encode_reply(req_id, Status.PROTOCOL, str(exc))
