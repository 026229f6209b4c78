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

from tmemclient.errors import InvalidArgument
from tmemclient.protocol import (
    FRAME_SIZE,
    INDEX_BITS,
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


def check_items(items: Sequence[Any], width: int) -> list[tuple[Any, ...]]:
    """Validate every (oid, index[, data]) before any request goes out."""
    checked = []
    for n, item in enumerate(items):
        try:
            if len(item) != width:
                raise InvalidArgument(f"expected a {width}-tuple")
            checked.append((check_oid(item[0]), check_index(item[1]), *item[2:]))
        except (TypeError, InvalidArgument) as exc:
            raise InvalidArgument(f"batch item {n}: {exc}") from exc
    return checked


def put_many(
    region: memoryview,
    pool: PoolInfo,
    limits: Limits,
    start: int,
    count: int,
    items: Sequence[tuple[int, int, Any]],
) -> Plan[list[bool]]:
    """PUT_MANY: as many pages per pipeline round as the staging run holds."""
    checked = check_items(items, 3)
    views = [page_view(data, pool.page_size) for _, _, data in checked]
    flags: list[bool] = yield from _page_batch(
        region, pool, limits, start, count, Op.PUT_MANY, checked, views
    )
    return flags


def get_many(
    region: memoryview,
    pool: PoolInfo,
    limits: Limits,
    start: int,
    count: int,
    items: Sequence[tuple[int, int]],
) -> Plan[list[bytes | None]]:
    """GET_MANY, returning data or None per item."""
    checked = check_items(items, 2)
    pages: list[bytes | None] = yield from _page_batch(
        region, pool, limits, start, count, Op.GET_MANY, checked, None
    )
    return pages


def _page_batch(
    region: memoryview,
    pool: PoolInfo,
    limits: Limits,
    start: int,
    count: int,
    op: Op,
    items: list[tuple[Any, ...]],
    views: list[memoryview] | None,
) -> Plan[Any]:
    fpp = pool.frames_per_page
    ps = pool.page_size
    per_round = count // fpp
    per_request = pages_per_request(limits)
    results: list[Any] = []
    for rnd in _chunks(len(items), per_round):
        requests = []
        slots: list[int] = []
        for sub in _chunks(len(rnd), per_request):
            entries: list[Any] = []
            for k in sub:
                i = rnd[k]
                frame = start + k * fpp
                if views is not None:
                    base = frame * FRAME_SIZE
                    region[base : base + ps] = views[i]
                entries += (encode_oid(items[i][0]), items[i][1], frame)
                slots.append(frame)
            requests.append([op, pool.handle, entries])
        replies = yield requests
        flags = [flag for reply in replies for flag in reply]
        if views is not None:
            results.extend(bool(f) for f in flags)
        else:
            for frame, hit in zip(slots, flags, strict=True):
                base = frame * FRAME_SIZE
                results.append(bytes(region[base : base + ps]) if hit else None)
    return results


def flush_many(pool: PoolInfo, limits: Limits, items: Sequence[tuple[int, int]]) -> Plan[None]:
    """FLUSH_MANY, all requests in one pipeline round."""
    checked = check_items(items, 2)
    per_request = pages_per_request(limits)
    requests = []
    for sub in _chunks(len(checked), per_request):
        entries: list[Any] = []
        for i in sub:
            entries += (encode_oid(checked[i][0]), checked[i][1])
        requests.append([Op.FLUSH_MANY, pool.handle, entries])
    if requests:
        yield requests
