"""Argument checking and plan selection shared by the sync ``Pool`` and the trio ``AsyncPool``.

Each method here checks its arguments (so bad input fails locally with a clear message, before
anything is sent) and returns a ``Job``: how many staging frames the operation needs and the plan
that performs it. The two pool classes only differ in how they drive a Job.
"""

from __future__ import annotations

import uuid as uuid_module
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mypy_extensions import mypyc_attr

from tmemclient import _plans
from tmemclient.mapping import Mapping, Token, token_of
from tmemclient.wire.errors import InvalidArgument, ProtocolError, UnknownPool
from tmemclient.wire.layout import FRAME_SIZE, MAX_ORDER
from tmemclient.wire.messages import (
    UUID_BYTES,
    Limits,
    Op,
    check_oid,
    encode_oid,
    make_pool_flags,
    valid_guest_name,
)


class Job(NamedTuple):
    """Staging needs and plan of one operation.

    ``need`` frames are wanted; a batch (``unit`` > 0) may run with fewer, in multiples of
    ``unit`` (frames per page), taking several pipeline rounds. ``need == 0`` stages nothing.
    """

    need: int
    factory: Callable[[int, int], _plans.Plan[Any]]
    unit: int = 0


# Pool and AsyncPool (interpreted: their I/O is a socket, trio) build on it.
@mypyc_attr(allow_interpreted_subclasses=True)
class PoolOps:
    """The pool API's logic, minus I/O."""

    def __init__(self, region: memoryview, limits: Limits, info: _plans.PoolInfo) -> None:
        self._region = region
        self._limits = limits
        self.info = info
        self._touched: list[int] = []  # tokens read through the mapping, not reported yet
        # oid -> index -> token of the page as this connection's last answered put stored it,
        # for gets that read the mapping instead of asking tmemd (``_mapped_get``); only for
        # persistent private pools of a mapped client (set up by the pool classes).
        self._tokens: dict[int, dict[int, Token]] | None = None

    def _track_tokens(self) -> None:
        """Called by the pool classes once ``mapping`` works: a persistent private pool of a
        mapped client answers gets through the mapping where it can (a persistent get keeps
        the page, as a mapped read does; PROTOCOL.md §4.7)."""
        info = self.info
        if self.mapping is not None and info.persistent and not info.shared:
            self._tokens = {}

    # ------------------------------------------------------------------ gets with no round trip
    # A token read through the mapping gives the page only while it is exactly the page the
    # put stored (the daemon zeroes the generation before it changes or frees it, and never
    # reuses one), so a token that is out of date simply misses: the get then asks tmemd. What
    # must never happen is a mapped read that passes a request this connection sent earlier and
    # tmemd has not served yet (a put, write or flush of the page): so a page's token is
    # forgotten when such a request is *sent*, and learnt only from the answer to a put.

    def _mapped_get(self, oid: Any, index: Any) -> bytes | None:
        """The page through the mapping, or None: ask tmemd (no token, or it no longer reads)."""
        tokens = self._tokens
        if tokens is None:
            return None
        pages = tokens.get(oid)
        token = None if pages is None else pages.get(index)
        if token is None:
            return None
        mapping = self.mapping
        assert mapping is not None and pages is not None
        data = mapping.read(token, self.info.page_size.bit_length() - 13)
        if data is None:
            del pages[index]
            if not pages:
                del tokens[oid]
            return None
        self._touched += token  # reported (the pool sees to it when a request's worth is due)
        return data

    def _reads_due(self) -> bool:
        """Have the mapped gets filled a TOUCH_MANY? (The pool then reports them and waits.)"""
        return len(self._touched) >= 2 * self._limits.max_batch

    def _get_many_mapping(self, items: Sequence[tuple[int, int]]) -> Job | list[bytes | None]:
        """``_get_many`` for either pool class; of a pool that keeps tokens, what the mapping
        gives of ``items`` at once, and a job asking tmemd only for the rest (None: no job
        needed)."""
        job = self._get_many(items)  # (checks every item, whatever the mapping holds)
        if isinstance(job, list) or self._tokens is None:
            return job
        items = items if isinstance(items, (list, tuple)) else list(items)
        results: list[bytes | None] = []
        ask: list[int] = []
        for i, (oid, index) in enumerate(items):
            data = self._mapped_get(oid, index)
            results.append(data)
            if data is None:
                ask.append(i)
        rest = self._get_many([items[i] for i in ask])
        if isinstance(rest, list):  # the mapping gave everything
            return results
        plan_of = rest.factory

        def merging(start: int, count: int) -> _plans.Plan[list[bytes | None]]:
            fetched: list[bytes | None] = yield from plan_of(start, count)
            for i, data in zip(ask, fetched, strict=True):
                results[i] = data
            return results

        return rest._replace(factory=merging)

    def _learn(self, oid: int, index: int, answer: Any) -> None:
        """A put of (oid, index) was answered ``answer`` (a token, or false)."""
        tokens = self._tokens
        if tokens is not None:
            token = token_of(answer)
            if token is not None:
                tokens.setdefault(oid, {})[index] = token

    def _put_many_learning(self, items: Sequence[tuple[int, int, Any]]) -> Job | list[bool]:
        """``_put_many`` (a bool per page) for either pool class; of a pool that keeps tokens,
        one that forgets the pages' tokens now, as it is about to be sent, and learns the
        new ones from its answer (the rule above, in one place for both clients)."""
        if self._tokens is None:
            return self._put_many(items)
        items = items if isinstance(items, (list, tuple)) else list(items)
        job = self._put_many(items, answers=True)
        if isinstance(job, list):
            return job
        self._forget_many(items)
        plan_of = job.factory

        def learning(start: int, count: int) -> _plans.Plan[list[bool]]:
            answers: list[Any] = yield from plan_of(start, count)
            for (oid, index, _data), answer in zip(items, answers, strict=False):
                self._learn(oid, index, answer)
            return [bool(answer) for answer in answers]

        return job._replace(factory=learning)

    def _forget(self, oid: int, index: int | None = None) -> None:
        """A request that changes page (oid, index), or every page of ``oid``, is being sent."""
        tokens = self._tokens
        if tokens is not None:
            if index is None:
                tokens.pop(oid, None)
            elif (pages := tokens.get(oid)) is not None:
                pages.pop(index, None)

    def _forget_many(self, items: Sequence[Sequence[Any]]) -> None:
        if self._tokens is not None:
            for item in items:
                self._forget(item[0], item[1])

    @property
    def mapping(self) -> Mapping | None:
        """The client's mapping of its pages (connected with ``map_pages=True``), or None."""
        raise NotImplementedError  # the pool classes know their client

    def read_mapped(self, token: Token, *, report: bool = True) -> bytes | None:
        """The page a ``put_many_nowait`` answer named by ``token``, read through the client's
        mapping with no round trip and no I/O (so not awaited in the trio pool either); None if
        tmem no longer holds it as it was put. The page stays in tmem (PROTOCOL.md §4.7). With
        ``report``, the read is reported to tmemd later (``report_reads``), which then counts
        it as a get hit and keeps the page as recently used; a caller that now holds the page
        itself (a page cache) may rather let tmem's copy age from its put."""
        data = self._mapped().read(token, self.info.page_size.bit_length() - 13)
        if report and data is not None and len(self._touched) < 2 * self._limits.max_batch:
            self._touched += token  # beyond one request's worth, reads go unreported
        return data

    def _touches(self) -> list[list[Any]]:
        """The TOUCH_MANY request reporting the mapped reads not reported yet (taken)."""
        entries, self._touched = self._touched, []
        return [[Op.TOUCH_MANY, self.info.handle, entries]] if entries else []

    def _mapped(self) -> Mapping:
        """The client's mapping; InvalidArgument if it has none."""
        mapping = self.mapping
        if mapping is None:
            raise InvalidArgument(
                "this client has no mapping: connect (or open_client) with map_pages=True"
            )
        return mapping

    @property
    def handle(self) -> int:
        """The daemon's handle for this pool (meaningful on this connection only)."""
        return self.info.handle

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return self.info.page_size

    @property
    def persistent(self) -> bool:
        """True for a persistent pool (pages stay until flushed), False for ephemeral."""
        return self.info.persistent

    @property
    def shared(self) -> bool:
        """True for a shared pool."""
        return self.info.shared

    @property
    def name(self) -> str | None:
        """The pool's name (``new_pool(name=...)``), or None for an unnamed pool."""
        return self.info.name

    @property
    def reopened(self) -> bool:
        """True if ``new_pool(name=...)`` found this guest's pool of that name, with its pages,
        rather than making a new, empty one (always False for an unnamed pool)."""
        return self.info.reopened

    def _alive(self) -> _plans.PoolInfo:
        if self.info.destroyed:
            raise UnknownPool(f"pool {self.info.handle} was destroyed")
        return self.info

    def _put(self, oid: Any, index: Any, data: Any) -> Job:
        info = self._alive()
        oid, index = check_oid(oid), _plans.check_index(index)
        _plans.page_view(data, info.page_size)
        return Job(
            info.frames_per_page,
            lambda start, _n: _plans.put(self._region, info, start, oid, index, data),
        )

    def _get(self, oid: Any, index: Any) -> Job:
        info = self._alive()
        oid, index = check_oid(oid), _plans.check_index(index)
        return Job(
            info.frames_per_page,
            lambda start, _n: _plans.get(self._region, info, start, oid, index),
        )

    def _frame(self, op: Op, oid: Any, index: Any, frame: Any) -> Job:
        info = self._alive()
        oid, index = check_oid(oid), _plans.check_index(index)
        frames = len(self._region) // FRAME_SIZE
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise InvalidArgument(f"frame must be an int, got {type(frame).__name__}")
        if frame < 0 or frame + info.frames_per_page > frames:
            raise InvalidArgument(
                f"frame {frame} (+{info.frames_per_page} for a {info.page_size}-byte page) is "
                f"outside the region's {frames} frames"
            )
        return Job(0, lambda _s, _n: _plans.frame_op(op, info, oid, index, frame))

    def _simple(self, op: Op, oid: Any, index: Any = None) -> Job:
        info = self._alive()
        args: list[Any] = [info.handle, encode_oid(check_oid(oid))]
        if index is not None:
            args.append(_plans.check_index(index))
        return Job(0, lambda _s, _n: _plans.simple(op, *args))

    def _read(self, oid: Any, index: Any, offset: Any, length: Any) -> Job:
        info = self._alive()
        oid, index = check_oid(oid), _plans.check_index(index)
        if isinstance(length, bool) or not isinstance(length, int):
            raise InvalidArgument(f"length must be an int, got {type(length).__name__}")
        offset = _plans.sub_range(offset, length, info.page_size)
        return Job(
            _plans.frames_for(length),
            lambda start, _n: _plans.read(self._region, info, start, oid, index, offset, length),
        )

    def _write(self, op: Op, oid: Any, index: Any, offset: Any, data: Any) -> Job:
        info = self._alive()
        oid, index = check_oid(oid), _plans.check_index(index)
        try:
            view = memoryview(data).cast("B")
        except TypeError as exc:
            raise InvalidArgument(f"data must be bytes-like, got {type(data).__name__}") from exc
        offset = _plans.sub_range(offset, len(view), info.page_size)
        return Job(
            _plans.frames_for(len(view)),
            lambda start, _n: _plans.write(self._region, info, start, op, oid, index, offset, view),
        )

    def _put_many(
        self, items: Sequence[tuple[int, int, Any]], *, answers: bool = False
    ) -> Job | list[bool]:
        """The job of a PUT_MANY; its result is a bool per page, or with ``answers`` each
        page's answer as the daemon gave it (a mapped client's token)."""
        info = self._alive()
        items = items if isinstance(items, (list, tuple)) else list(items)
        if not items:
            return []
        batch = _plans.check_batch(items, 3, info.page_size)
        return Job(
            len(batch) * info.frames_per_page,
            lambda start, n: _plans.put_many(
                self._region, info, self._limits, start, n, batch, answers=answers
            ),
            unit=info.frames_per_page,
        )

    def _get_many(self, items: Sequence[tuple[int, int]]) -> Job | list[bytes | None]:
        info = self._alive()
        items = items if isinstance(items, (list, tuple)) else list(items)
        if not items:
            return []
        batch = _plans.check_batch(items, 2)
        return Job(
            len(batch) * info.frames_per_page,
            lambda start, n: _plans.get_many(self._region, info, self._limits, start, n, batch),
            unit=info.frames_per_page,
        )

    def _flush_many(self, items: Sequence[tuple[int, int]]) -> Job:
        info = self._alive()
        items = items if isinstance(items, (list, tuple)) else list(items)
        batch = _plans.check_batch(items, 2)
        return Job(0, lambda _s, _n: _plans.flush_many(info, self._limits, batch))

    def _destroy(self) -> Job:
        info = self._alive()
        self._touched = []  # nothing to report of a pool that goes
        if self._tokens is not None:
            self._tokens.clear()
        return Job(0, lambda _s, _n: _plans.simple(Op.DESTROY_POOL, info.handle))

    def __repr__(self) -> str:
        kind = "persistent" if self.info.persistent else "ephemeral"
        share = "shared" if self.info.shared else "private"
        return (
            f"<{type(self).__name__} {self.info.handle} {kind} {share} page_size={self.page_size}>"
        )


def new_pool_request(
    *,
    persistent: bool,
    shared: bool,
    uuid: uuid_module.UUID | bytes | str | None,
    page_size: int,
    name: str | None = None,
) -> tuple[list[Any], bytes | None]:
    """The NEW_POOL request for these options, checked; and the uuid as 16 bytes."""
    if name is not None:
        if not isinstance(name, str) or not valid_guest_name(name):
            raise InvalidArgument("pool name must be 1..64 characters of A-Z a-z 0-9 . _ -")
        if shared:
            raise InvalidArgument("a shared pool is named by its uuid: leave name out")
    orders = {FRAME_SIZE << k: k for k in range(MAX_ORDER + 1)}
    if isinstance(page_size, bool) or page_size not in orders:
        raise InvalidArgument(f"page_size must be one of {sorted(orders)} (4096 << order)")
    raw: bytes | None
    if uuid is None:
        raw = None
    elif isinstance(uuid, uuid_module.UUID):
        raw = uuid.bytes
    elif isinstance(uuid, str):
        try:
            raw = uuid_module.UUID(uuid).bytes
        except ValueError as exc:
            raise InvalidArgument(f"malformed pool uuid {uuid!r}") from exc
    elif isinstance(uuid, (bytes, bytearray)) and len(uuid) == UUID_BYTES:
        raw = bytes(uuid)
    else:
        raise InvalidArgument("pool uuid must be a uuid.UUID, its string form, or 16 bytes")
    if shared and raw is None:
        raise InvalidArgument("a shared pool needs a uuid that names it")
    flags = make_pool_flags(persistent=persistent, shared=shared, order=orders[page_size])
    request: list[Any] = [Op.NEW_POOL, flags, raw if shared else None]
    if name is not None:
        request.append(name)
    return request, raw if shared else None


def pool_info(
    result: Any, *, persistent: bool, shared: bool, uuid: bytes | None, name: str | None
) -> _plans.PoolInfo:
    """What NEW_POOL's answer (``[handle, page_size]``, and ``reopened`` for a named pool)
    says of the new pool."""
    if type(result) is not list or len(result) != (3 if name is not None else 2):
        raise ProtocolError(
            f"a NEW_POOL answer must be [handle, page_size{', reopened' if name else ''}]"
        )
    handle, size = result[0], result[1]
    if (
        type(handle) is not int
        or not 0 <= handle < 1 << 32
        or type(size) is not int
        or size < FRAME_SIZE
    ):
        raise ProtocolError("bad NEW_POOL answer: handle and page_size must be unsigned integers")
    return _plans.PoolInfo(
        handle, size, persistent, shared, uuid, name=name, reopened=result[2:] == [True]
    )
