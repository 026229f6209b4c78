"""Pool operations written once, as sans-I/O *plans*, for the sync and the trio client alike.

A plan is a generator. It stages data in the region, yields a list of requests (each
``[op, *args]``; the driver adds the req_id) that the driver sends together (pipelined), gets back
their results in the same order, and finally returns the operation's value. Staging frames are
given to the plan by the driver (``start``, ``count``), which allocates and releases them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tmemclient.wire.errors import InvalidArgument, ProtocolError
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import (
    INDEX_BITS,
    OID_BITS,
    OID_BYTES,
    Limits,
    Op,
    check_oid,
    check_uint,
    encode_oid,
)

T = TypeVar("T")
Request = list[Any]
Plan = Generator[list[Request], list[Any], T]

_ENTRY_BYTES = OID_BYTES + 3 + 5 + 5  # worst case of one batch entry on the wire
_FRAME_OVERHEAD = 64


@dataclass
class PoolInfo:
    """What a client knows of one of its pools."""

    handle: int
    page_size: int
    persistent: bool
    shared: bool
    uuid: bytes | None
    destroyed: bool = False
    name: str | None = None  # a named pool (new_pool(name=...)), kept for its guest to reopen
    reopened: bool = False  # the daemon gave back the named pool with its pages

    @property
    def frames_per_page(self) -> int:
        """Region frames one page spans."""
        return self.page_size // FRAME_SIZE


def check_index(index: object) -> int:
    """An index is an unsigned 32-bit integer."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidArgument(f"index must be an int, got {type(index).__name__}")
    return check_uint(int(index), INDEX_BITS, "index")


def page_view(data: Any, page_size: int) -> memoryview:
    """``data`` as a flat byte view of exactly one page."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:
        raise InvalidArgument(f"page data must be bytes-like, got {type(data).__name__}") from exc
    if len(view) != page_size:
        raise InvalidArgument(
            f"page data must be exactly {page_size} bytes (the pool's page size), got {len(view)}"
        )
    return view


def sub_range(offset: object, length: int, page_size: int) -> int:
    """Check a sub-page range; return the offset."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InvalidArgument(f"offset must be an int, got {type(offset).__name__}")
    if length < 1 or offset < 0 or offset + length > page_size:
        raise InvalidArgument(
            f"offset {offset} + length {length} must lie inside the {page_size}-byte page "
            "(length at least 1)"
        )
    return offset


def frames_for(length: int) -> int:
    """Frames needed to stage ``length`` bytes."""
    return max(1, -(-length // FRAME_SIZE))


def pages_per_request(limits: Limits) -> int:
    """Pages one batch request may carry under the daemon's max_batch and max_frame."""
    return max(1, min(limits.max_batch, (limits.max_frame - _FRAME_OVERHEAD) // _ENTRY_BYTES))


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------- single pages


def put(
    region: memoryview, pool: PoolInfo, start: int, oid: int, index: int, data: Any
) -> Plan[bool]:
    """PUT of one page staged at ``start``."""
    view = page_view(data, pool.page_size)
    base = start * FRAME_SIZE
    region[base : base + pool.page_size] = view
    (ok,) = yield [[Op.PUT, pool.handle, encode_oid(oid), index, start]]
    return bool(ok)


def get(region: memoryview, pool: PoolInfo, start: int, oid: int, index: int) -> Plan[bytes | None]:
    """GET of one page into ``start``; the copy out of the region is the caller's."""
    (hit,) = yield [[Op.GET, pool.handle, encode_oid(oid), index, start]]
    if not hit:
        return None
    base = start * FRAME_SIZE
    return bytes(region[base : base + pool.page_size])


def frame_op(op: Op, pool: PoolInfo, oid: int, index: int, frame: int) -> Plan[bool]:
    """PUT or GET naming a frame the caller manages (the zero-copy path)."""
    (ok,) = yield [[op, pool.handle, encode_oid(oid), index, frame]]
    return bool(ok)


def lend_reply(result: Any) -> dict[str, int]:
    """Check a LEND answer: a map with four unsigned integers (PROTOCOL.md §6.10; keys we do
    not know are ignored, as a later daemon may add some)."""
    keys = ("lent", "low", "seq", "room")
    if type(result) is not dict or not set(keys) <= set(result):
        raise ProtocolError(f"a LEND answer must be a map of {', '.join(keys)}")
    try:
        return {key: check_uint(result[key], 64, key) for key in keys}
    except InvalidArgument as exc:
        raise ProtocolError(f"bad LEND answer: {exc}") from exc


def simple(op: Op, *args: Any) -> Plan[Any]:
    """Any request that stages nothing."""
    (result,) = yield [[op, *args]]
    return result


def read(
    region: memoryview, pool: PoolInfo, start: int, oid: int, index: int, offset: int, length: int
) -> Plan[bytes | None]:
    """READ ``length`` bytes at ``offset`` of a page."""
    (hit,) = yield [[Op.READ, pool.handle, encode_oid(oid), index, offset, length, start]]
    if not hit:
        return None
    base = start * FRAME_SIZE
    return bytes(region[base : base + length])


def write(
    region: memoryview,
    pool: PoolInfo,
    start: int,
    op: Op,
    oid: int,
    index: int,
    offset: int,
    data: memoryview,
) -> Plan[bytes | bool | None]:
    """WRITE (returns bool) or XCHG (returns the old bytes or None) at ``offset`` of a page."""
    base = start * FRAME_SIZE
    region[base : base + len(data)] = data
    (hit,) = yield [[op, pool.handle, encode_oid(oid), index, offset, len(data), start]]
    if op is Op.WRITE:
        return bool(hit)
    return bytes(region[base : base + len(data)]) if hit else None


# ------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A batch validated whole: wire-ready object ids, indexes, and (for puts) page data."""

    oids: Sequence[int | bytes]
    idxs: Sequence[int]
    datas: Sequence[Any] | None = None

    def __len__(self) -> int:
        return len(self.idxs)


def _uints(values: Sequence[Any], bits: int) -> bool:
    """True if every value is an int (not a bool) in 0 .. 2**bits - 1 (checked in C)."""
    return not values or (
        set(map(type, values)) == {int} and min(values) >= 0 and max(values) >> bits == 0
    )


def check_batch(items: Sequence[Any], width: int, page_size: int = 0) -> Batch:
    """Validate every (oid, index[, data]) before any request goes out.

    Column-wise with C-level builtins first; a batch that fails is walked item by item so the
    error names the bad item.
    """
    try:
        fast = set(map(len, items)) == {width}
    except TypeError:
        fast = False
    if fast:
        cols = list(zip(*items, strict=True))
        oids, idxs = cols[0], cols[1]
        datas = cols[2] if width == 3 else None
        fast = _uints(oids, OID_BITS) and _uints(idxs, INDEX_BITS)
        if fast and datas is not None:
            fast = set(map(type, datas)) <= {bytes, bytearray} and set(map(len, datas)) == {
                page_size
            }
        if fast:
            if max(oids) >> 64:
                oids = tuple(encode_oid(o) for o in oids)
            return Batch(oids, idxs, datas)
    checked_oids: list[int | bytes] = []
    checked_idxs: list[int] = []
    views: list[memoryview] = []
    for n, item in enumerate(items):
        try:
            if len(item) != width:
                raise InvalidArgument(f"expected a {width}-tuple")
            checked_oids.append(encode_oid(check_oid(item[0])))
            checked_idxs.append(check_index(item[1]))
            if width == 3:
                views.append(page_view(item[2], page_size))
        except (TypeError, InvalidArgument) as exc:
            raise InvalidArgument(f"batch item {n}: {exc}") from exc
    return Batch(checked_oids, checked_idxs, views if width == 3 else None)


def _entries(batch: Batch, part: range, first_frame: int | None, fpp: int) -> list[Any]:
    """The flat entry array of one request, built with slice assignments (no per-item loop)."""
    width = 2 if first_frame is None else 3
    entries: list[Any] = [None] * (width * len(part))
    entries[0::width] = batch.oids[part.start : part.stop]
    entries[1::width] = batch.idxs[part.start : part.stop]
    if first_frame is not None:
        entries[2::3] = range(first_frame, first_frame + len(part) * fpp, fpp)
    return entries


def put_many(
    region: memoryview,
    pool: PoolInfo,
    limits: Limits,
    start: int,
    count: int,
    batch: Batch,
    *,
    answers: bool = False,
) -> Plan[list[Any]]:
    """PUT_MANY: as many pages per pipeline round as the staging run holds. A bool per page,
    or with ``answers`` what the daemon answered for each (a token, for a mapped client)."""
    flags: list[Any] = yield from _page_batch(
        region, pool, limits, start, count, Op.PUT_MANY, batch, answers
    )
    return flags


def get_many(
    region: memoryview, pool: PoolInfo, limits: Limits, start: int, count: int, batch: Batch
) -> Plan[list[bytes | None]]:
    """GET_MANY, returning data or None per item."""
    pages: list[bytes | None] = yield from _page_batch(
        region, pool, limits, start, count, Op.GET_MANY, batch
    )
    return pages


def _page_batch(
    region: memoryview,
    pool: PoolInfo,
    limits: Limits,
    start: int,
    count: int,
    op: Op,
    batch: Batch,
    answers: bool = False,
) -> Plan[Any]:
    fpp = pool.frames_per_page
    ps = pool.page_size
    per_round = count // fpp
    per_request = pages_per_request(limits)
    results: list[Any] = []
    datas = batch.datas
    for rnd in _chunks(len(batch), per_round):
        base = start * FRAME_SIZE
        if datas is not None:
            # Each page straight into its staging frames: a join first would build (and, past
            # malloc's mmap threshold, page-fault in) a copy of the whole round.
            at = base
            for data in datas[rnd.start : rnd.stop]:
                region[at : at + ps] = data
                at += ps
        requests = []
        for sub in _chunks(len(rnd), per_request):
            part = range(rnd.start + sub.start, rnd.start + sub.stop)
            requests.append([op, pool.handle, _entries(batch, part, start + sub.start * fpp, fpp)])
        replies = yield requests
        if any(type(r) is not list for r in replies) or sum(map(len, replies)) != len(rnd):
            raise ProtocolError(f"a {op.name} answer must be a list of one result per page")
        flags = [flag for reply in replies for flag in reply]
        if datas is not None:
            results.extend(flags if answers else map(bool, flags))
        else:
            for k, hit in enumerate(flags):
                results.append(bytes(region[base + k * ps : base + (k + 1) * ps]) if hit else None)
    return results


def first_items(requests: list[list[Any]], first: int) -> list[int]:
    """Where each PUT_MANY request of a batch starts among its items, the batch starting at
    ``first`` (its entries are oid, index, frame)."""
    starts = []
    for request in requests:
        starts.append(first)
        first += len(request[2]) // 3
    return starts


def flush_many(pool: PoolInfo, limits: Limits, batch: Batch) -> Plan[None]:
    """FLUSH_MANY, all requests in one pipeline round."""
    per_request = pages_per_request(limits)
    requests = [
        [Op.FLUSH_MANY, pool.handle, _entries(batch, part, None, 0)]
        for part in _chunks(len(batch), per_request)
    ]
    if requests:
        yield requests
