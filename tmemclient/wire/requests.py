"""The requests of the wire protocol (PROTOCOL.md §5-7) as typed, immutable messages.

Each request is a small frozen dataclass whose fields are its arguments, by name, in wire order
(after ``req_id``; SubPage and PageBatch, one class for several ops, start with ``op``).
``decode_request`` turns a decoded frame into one, checking every argument against the
connection it arrived on (a ``Context``): the argument names and their checks exist here once,
and the daemon's session only dispatches on the type. ``to_wire`` is the inverse, for guests.

Checks run in the order PROTOCOL.md §6 fixes, so the status of a request with several bad
arguments is that of the first: the pool (an unknown pool hides every other error), then each
argument's type and range in order, then the checks that combine arguments. A batch is checked
whole before anything is served: the pool, the shape of ``entries``, their count, then each
entry in order (the message names the entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tmemclient.wire.errors import InvalidArgument, LimitExceeded, UnknownPool
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import (
    DOORBELL,
    INDEX_BITS,
    PUT,
    Op,
    PoolSpec,
    check_uint,
    decode_oid,
    encode_oid,
    split_request,
)


class Context(Protocol):
    """What checking a request needs to know of the connection it came on."""

    frames: int  # page frames of the region (the rings after them are not for pages)
    max_batch: int
    mapped: bool  # granted a mirror (TOUCH_MANY, tokens)
    lending: bool  # granted a loan file (LEND)

    def pool_order(self, handle: int) -> int | None:
        """The page order of the pool ``handle`` names on this connection, None if none."""
        ...


# ------------------------------------------------------------------------------- the requests


def flat(*columns: Sequence[Any]) -> list[Any]:
    """A batch's flat entry array: the columns' i-th values, one entry after another."""
    width = len(columns)
    entries: list[Any] = [None] * (width * len(columns[0]))
    for k, column in enumerate(columns):
        entries[k::width] = column
    return entries


@dataclass(frozen=True, slots=True)
class NewPool:
    """Create a pool (§6.1)."""

    req_id: int
    spec: PoolSpec

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        message: list[Any] = [Op.NEW_POOL, self.req_id, self.spec.flags, self.spec.uuid]
        if self.spec.name is not None:
            message.append(self.spec.name)
        return message


@dataclass(frozen=True, slots=True)
class DestroyPool:
    """Destroy a pool, or leave a shared one (§6.2)."""

    req_id: int
    pool: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.DESTROY_POOL, self.req_id, self.pool]


@dataclass(frozen=True, slots=True)
class Put:
    """Store the page in region frames ``frame..`` (§6.3)."""

    req_id: int
    pool: int
    oid: int
    index: int
    frame: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.PUT, self.req_id, self.pool, encode_oid(self.oid), self.index, self.frame]


@dataclass(frozen=True, slots=True)
class Get:
    """Copy a page into region frames ``frame..`` (§6.4)."""

    req_id: int
    pool: int
    oid: int
    index: int
    frame: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.GET, self.req_id, self.pool, encode_oid(self.oid), self.index, self.frame]


@dataclass(frozen=True, slots=True)
class Flush:
    """Remove one page (§6.5)."""

    req_id: int
    pool: int
    oid: int
    index: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.FLUSH, self.req_id, self.pool, encode_oid(self.oid), self.index]


@dataclass(frozen=True, slots=True)
class FlushObject:
    """Remove every page of one object (§6.5)."""

    req_id: int
    pool: int
    oid: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.FLUSH_OBJECT, self.req_id, self.pool, encode_oid(self.oid)]


@dataclass(frozen=True, slots=True)
class SubPage:
    """READ, WRITE or XCHG of ``length`` bytes at ``offset`` of a page, to or from the region
    at frame ``frame`` (§6.6); ``op`` says which."""

    op: Op
    req_id: int
    pool: int
    oid: int
    index: int
    offset: int
    length: int
    frame: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [
            self.op,
            self.req_id,
            self.pool,
            encode_oid(self.oid),
            self.index,
            self.offset,
            self.length,
            self.frame,
        ]


@dataclass(frozen=True, slots=True)
class PageBatch:
    """PUT_MANY or GET_MANY (§6.7): page ``i`` is (oids[i], idxs[i]) at region frame
    ``frames[i]``; ``op`` says which."""

    op: Op
    req_id: int
    pool: int
    oids: Sequence[int]
    idxs: Sequence[int]
    frames: Sequence[int]

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        entries = flat([encode_oid(o) for o in self.oids], self.idxs, self.frames)
        return [self.op, self.req_id, self.pool, entries]


@dataclass(frozen=True, slots=True)
class FlushMany:
    """Remove many pages (§6.7)."""

    req_id: int
    pool: int
    oids: Sequence[int]
    idxs: Sequence[int]

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        entries = flat([encode_oid(o) for o in self.oids], self.idxs)
        return [Op.FLUSH_MANY, self.req_id, self.pool, entries]


@dataclass(frozen=True, slots=True)
class TouchMany:
    """Mapped reads, reported afterwards: the tokens read (§4.7, §6.7)."""

    req_id: int
    pool: int
    heads: Sequence[int]
    gens: Sequence[int]

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.TOUCH_MANY, self.req_id, self.pool, flat(self.heads, self.gens)]


@dataclass(frozen=True, slots=True)
class Lend:
    """Borrow memory, or give it back: ``want`` bytes in all (§4.8, §6.10)."""

    req_id: int
    want: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.LEND, self.req_id, self.want]


@dataclass(frozen=True, slots=True)
class Ping:
    """A round trip that does nothing (§6.8)."""

    req_id: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.PING, self.req_id]


@dataclass(frozen=True, slots=True)
class Doorbell:
    """ "Look at the request ring" (§4.6); never answered."""

    req_id: int

    def to_wire(self) -> list[Any]:
        """The request as sent."""
        return [Op.DOORBELL, self.req_id]


Request = (
    NewPool
    | DestroyPool
    | Put
    | Get
    | Flush
    | FlushObject
    | SubPage
    | PageBatch
    | FlushMany
    | TouchMany
    | Lend
    | Ping
    | Doorbell
)

# Argument names by op, in wire order (the spec's tables, PROTOCOL.md §6).
ARGS: dict[int, tuple[str, ...]] = {
    Op.NEW_POOL: ("flags", "uuid", "name"),
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
# Trailing arguments a request may leave out (they read as nil): NEW_POOL's name came later.
OPTIONAL: dict[int, int] = {Op.NEW_POOL: 1}


# ------------------------------------------------------------------------------- decoding


def decode_request(message: Any, ctx: Context) -> Request:
    """The typed request a decoded frame holds, checked against the connection ``ctx``.

    Raises ProtocolError when the message is not a request at all (the connection must end),
    and the error to answer (InvalidArgument, UnknownPool, LimitExceeded) when it is a request
    with bad arguments (the connection goes on)."""
    op, req_id, m = split_request(message)
    if op == DOORBELL and len(m) == 2:
        return Doorbell(req_id)
    want = ARGS.get(op)
    if want is None:
        raise InvalidArgument(f"unknown op {op}")
    if len(m) != 2 + len(want):
        optional = OPTIONAL.get(op, 0)
        if not optional or not 2 + len(want) - optional <= len(m) < 2 + len(want):
            raise InvalidArgument(
                f"{Op(op).name} takes {_arg_count(len(want), optional)} arguments "
                f"({', '.join(want) or 'none'}), got {len(m) - 2}"
            )
        m = [*m, *[None] * (2 + len(want) - len(m))]
    request: Request = _DECODERS[op](op, req_id, m, ctx)
    return request


def _arg_count(want: int, optional: int) -> str:
    return str(want) if not optional else f"{want - optional} to {want}"


def _order(handle: Any, ctx: Context) -> int:
    """The order of the pool a handle names on this connection; UnknownPool if none."""
    order: int | None = ctx.pool_order(handle) if type(handle) is int else None
    if order is None:
        # Never repr() the guest's value: a 1 MiB bin or 1000-deep array would bloat the
        # reply or raise RecursionError.
        shown = handle if type(handle) is int else f"handle of type {type(handle).__name__}"
        raise UnknownPool(f"pool {shown} is unknown to this connection (never made or destroyed)")
    return order


def page_frame(frame: Any, order: int, frames: int, what: str = "frame") -> int:
    """A frame at which a whole page of ``order`` fits the region's ``frames`` frames."""
    start: int = check_uint(frame, 32, what)
    n = 1 << order
    if start + n > frames:
        raise InvalidArgument(
            f"{what} {start} (+{n} for a {FRAME_SIZE << order}-byte page) is outside the "
            f"region's {frames} frames"
        )
    return start


def plain_uints(values: Sequence[Any], bits: int) -> bool:
    """True if every value is an int (not a bool) in 0 .. 2**bits - 1 (checked in C)."""
    return not values or (
        set(map(type, values)) == {int} and min(values) >= 0 and max(values) >> bits == 0
    )


def _entries(entries: Any, width: int, ctx: Context) -> list[Any]:
    if type(entries) is not list or len(entries) % width:
        raise InvalidArgument(f"batch entries must be a flat array of {width}-tuples")
    count = len(entries) // width
    if count > ctx.max_batch:
        raise LimitExceeded(f"batch of {count} pages exceeds max_batch {ctx.max_batch}")
    return entries


def _columns(entries: list[Any], width: int) -> tuple[Sequence[int], Sequence[int]]:
    """Object ids and indexes of a batch, validated whole: a column at once with C-level
    builtins (the set of types, min and max); only a batch that fails that is walked entry by
    entry, to name the bad entry."""
    oids, idxs = entries[0::width], entries[1::width]
    if not plain_uints(oids, 64):
        oids = [decode_oid(o, f"entry {i} oid") for i, o in enumerate(oids)]
    if not plain_uints(idxs, INDEX_BITS):
        idxs = [check_uint(x, INDEX_BITS, f"entry {i} index") for i, x in enumerate(idxs)]
    return oids, idxs


def _new_pool(op: int, req_id: int, m: list[Any], ctx: Context) -> NewPool:
    spec = PoolSpec.decode(m[2], m[3], m[4])
    if spec.shared and spec.persistent:
        raise InvalidArgument("shared persistent pools are not supported (as in Xen)")
    return NewPool(req_id, spec)


def _destroy_pool(op: int, req_id: int, m: list[Any], ctx: Context) -> DestroyPool:
    _order(m[2], ctx)
    return DestroyPool(req_id, m[2])


def _page(op: int, req_id: int, m: list[Any], ctx: Context) -> Put | Get:
    order = _order(m[2], ctx)
    oid = decode_oid(m[3])
    index = check_uint(m[4], INDEX_BITS, "index")
    frame = page_frame(m[5], order, ctx.frames)
    return (Put if op == PUT else Get)(req_id, m[2], oid, index, frame)


def _flush(op: int, req_id: int, m: list[Any], ctx: Context) -> Flush:
    _order(m[2], ctx)
    return Flush(req_id, m[2], decode_oid(m[3]), check_uint(m[4], INDEX_BITS, "index"))


def _flush_object(op: int, req_id: int, m: list[Any], ctx: Context) -> FlushObject:
    _order(m[2], ctx)
    return FlushObject(req_id, m[2], decode_oid(m[3]))


def _sub_page(op: int, req_id: int, m: list[Any], ctx: Context) -> SubPage:
    order = _order(m[2], ctx)
    oid = decode_oid(m[3])
    index = check_uint(m[4], INDEX_BITS, "index")
    offset = check_uint(m[5], 32, "offset")
    length = check_uint(m[6], 32, "length")
    frame = check_uint(m[7], 32, "frame")
    page_size = FRAME_SIZE << order
    if length == 0 or offset + length > page_size:
        raise InvalidArgument(
            f"offset {offset} + length {length} must lie inside the {page_size}-byte page "
            "(length at least 1)"
        )
    region = ctx.frames * FRAME_SIZE
    if frame * FRAME_SIZE + length > region:
        raise InvalidArgument(
            f"frame {frame} + length {length} runs past the region ({region} bytes)"
        )
    return SubPage(Op(op), req_id, m[2], oid, index, offset, length, frame)


def _page_batch(op: int, req_id: int, m: list[Any], ctx: Context) -> PageBatch:
    order = _order(m[2], ctx)
    entries = _entries(m[3], 3, ctx)
    oids, idxs = _columns(entries, 3)
    frames = entries[2::3]
    if not (plain_uints(frames, 32) and (not frames or max(frames) + (1 << order) <= ctx.frames)):
        for i, frame in enumerate(frames):
            page_frame(frame, order, ctx.frames, f"entry {i} frame")
    return PageBatch(Op(op), req_id, m[2], oids, idxs, frames)


def _flush_many(op: int, req_id: int, m: list[Any], ctx: Context) -> FlushMany:
    _order(m[2], ctx)
    oids, idxs = _columns(_entries(m[3], 2, ctx), 2)
    return FlushMany(req_id, m[2], oids, idxs)


def _touch_many(op: int, req_id: int, m: list[Any], ctx: Context) -> TouchMany:
    _order(m[2], ctx)
    if not ctx.mapped:
        raise InvalidArgument(
            "TOUCH_MANY reports reads through a mapping; this connection has none "
            "(ask for one in HELLO: map true)"
        )
    entries = _entries(m[3], 2, ctx)
    heads, gens = entries[0::2], entries[1::2]
    if not (plain_uints(heads, 32) and plain_uints(gens, 64)):
        for i, (head, gen) in enumerate(zip(heads, gens, strict=True)):
            check_uint(head, 32, f"entry {i} slot")
            check_uint(gen, 64, f"entry {i} generation")
    return TouchMany(req_id, m[2], heads, gens)


def _lend(op: int, req_id: int, m: list[Any], ctx: Context) -> Lend:
    if not ctx.lending:
        raise InvalidArgument(
            "LEND needs a loan file; this connection has none (ask for one in HELLO: "
            "map true, lend true; the daemon may have lending off, or lend to another "
            "session of this guest already)"
        )
    return Lend(req_id, check_uint(m[2], 64, "want"))


def _ping(op: int, req_id: int, m: list[Any], ctx: Context) -> Ping:
    return Ping(req_id)


def _doorbell(op: int, req_id: int, m: list[Any], ctx: Context) -> Doorbell:  # pragma: no cover
    return Doorbell(req_id)  # (with no arguments it never gets here: see decode_request)


_DECODERS: dict[int, Any] = {
    Op.NEW_POOL: _new_pool,
    Op.DESTROY_POOL: _destroy_pool,
    Op.PUT: _page,
    Op.GET: _page,
    Op.FLUSH: _flush,
    Op.FLUSH_OBJECT: _flush_object,
    Op.READ: _sub_page,
    Op.WRITE: _sub_page,
    Op.XCHG: _sub_page,
    Op.PUT_MANY: _page_batch,
    Op.GET_MANY: _page_batch,
    Op.FLUSH_MANY: _flush_many,
    Op.TOUCH_MANY: _touch_many,
    Op.LEND: _lend,
    Op.PING: _ping,
    Op.DOORBELL: _doorbell,
}
