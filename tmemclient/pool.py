"""A pool seen from the synchronous client (``Client.new_pool``): its calls, and the lean
path of the common single put and get."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tmemclient import _plans
from tmemclient._pool import PoolOps
from tmemclient.core import OnAnswer
from tmemclient.mapping import Mapping, Token, token_of
from tmemclient.wire.layout import FRAME_SHIFT
from tmemclient.wire.messages import INDEX_BITS, Op

if TYPE_CHECKING:
    from tmemclient.client import Client

_U64 = (1 << 64) - 1  # oids below 2**64 go as plain integers (encode_oid)
_U32 = (1 << INDEX_BITS) - 1
_PUT, _GET, _PUT_MANY = int(Op.PUT), int(Op.GET), int(Op.PUT_MANY)  # plain ints for msgpack


class Pool(PoolOps):
    """A tmem pool seen from a synchronous guest. Made by ``Client.new_pool``."""

    def __init__(self, client: Client, info: _plans.PoolInfo) -> None:
        super().__init__(client._view, client.limits, info)
        self._client = client
        self._track_tokens()

    @property
    def client(self) -> Client:
        """The connection the pool belongs to."""
        return self._client

    def put(self, oid: int, index: int, data: Any) -> bool:
        """Store one page; False if the daemon declines (no room, frozen, over cap)."""
        info = self.info
        if (
            type(data) is bytes
            and len(data) == info.page_size
            and type(oid) is int
            and type(index) is int
            and 0 <= oid <= _U64
            and 0 <= index <= _U32
            and not info.destroyed
        ):  # the common case, checked in one go: no plan, no Job
            client = self._client
            start = client._single_run(info.frames_per_page)
            if start is not None:
                base = start << FRAME_SHIFT
                self._region[base : base + len(data)] = data
                if self._tokens is None:
                    return bool(client._call(_PUT, info.handle, oid, index, start))
                # A mapped persistent pool: PUT_MANY of one page, whose answer is its token.
                self._forget(oid, index)
                (answer,) = client._call(_PUT_MANY, info.handle, [oid, index, start])
                self._learn(oid, index, answer)
                return bool(answer)
        job = self._put(oid, index, data)
        self._forget(oid, index)
        return bool(self._client._run(job))

    def get(self, oid: int, index: int) -> bytes | None:
        """The page, or None on a miss. Ephemeral private pools give the page up (exclusive).
        A persistent pool of a mapped client reads a page this connection put through the
        mapping, with no round trip."""
        if self._tokens is not None and (data := self._mapped_get(oid, index)) is not None:
            if self._reads_due():
                self._client.wait_deferred()
            return data
        info = self.info
        if (
            type(oid) is int
            and type(index) is int
            and 0 <= oid <= _U64
            and 0 <= index <= _U32
            and not info.destroyed
        ):  # as in put
            client = self._client
            start = client._single_run(info.frames_per_page)
            if start is not None:
                if not client._call(_GET, info.handle, oid, index, start):
                    return None
                base = start << FRAME_SHIFT
                return bytes(self._region[base : base + info.page_size])
        result: bytes | None = self._client._run(self._get(oid, index))
        return result

    def put_frame(self, oid: int, index: int, frame: int) -> bool:
        """Store the page held in region frame(s) ``frame..`` (zero-copy path)."""
        job = self._frame(Op.PUT, oid, index, frame)
        self._forget(oid, index)
        return bool(self._client._run(job))

    def get_frame(self, oid: int, index: int, frame: int) -> bool:
        """Fetch the page into region frame(s) ``frame..``; True on a hit."""
        return bool(self._client._run(self._frame(Op.GET, oid, index, frame)))

    def flush(self, oid: int, index: int) -> None:
        """Remove one page (idempotent)."""
        job = self._simple(Op.FLUSH, oid, index)
        self._forget(oid, index)
        self._client._run(job)

    def flush_object(self, oid: int) -> None:
        """Remove every page of an object."""
        job = self._simple(Op.FLUSH_OBJECT, oid)
        self._forget(oid)
        self._client._run(job)

    def read(self, oid: int, index: int, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a page (the page stays); None on a miss."""
        result: bytes | None = self._client._run(self._read(oid, index, offset, length))
        return result

    def write(self, oid: int, index: int, offset: int, data: Any) -> bool:
        """Overwrite bytes of an existing page; False if the page is not there."""
        job = self._write(Op.WRITE, oid, index, offset, data)
        self._forget(oid, index)
        return bool(self._client._run(job))

    def xchg(self, oid: int, index: int, offset: int, data: Any) -> bytes | None:
        """Atomically write ``data`` at ``offset`` and return the bytes it replaced; None on a miss."""
        job = self._write(Op.XCHG, oid, index, offset, data)
        self._forget(oid, index)
        result: bytes | None = self._client._run(job)
        return result

    def put_many(self, items: Sequence[tuple[int, int, Any]]) -> list[bool]:
        """Store many pages in as few frames as the region allows; one bool per item."""
        job = self._put_many_learning(items)
        return job if isinstance(job, list) else list(self._client._run(job))

    def put_many_nowait(
        self, items: Sequence[tuple[int, int, Any]], on_answer: OnAnswer | None = None
    ) -> None:
        """Send puts of many pages without waiting for the answer (the cleancache case: a
        clean page leaving the guest's cache may be dropped, so nobody needs the result).

        The daemon serves requests in order, so a later get of the same handle sees the put.
        Answers are read, counted in ``client.deferred`` and their staging frames freed
        whenever the client next talks to the daemon (or in ``wait_deferred``). Each answer
        is also handed to ``on_answer(first, results)``: ``first`` is the position in
        ``items`` of the first page it answers, ``results`` a flag per page (for a mapped
        client, the page's token for ``read_mapped`` instead of True), or None if the request
        failed.
        """
        items = items if isinstance(items, (list, tuple)) else list(items)
        self.report_reads()
        self._forget_many(items)  # (only a waited-for answer teaches a token: see _pool.py)
        # Half the region per request at most, so one batch can be staged while the answer
        # to the previous one is still on its way.
        step = max(1, self._client.limits.frames // 2 // self.info.frames_per_page)
        for i in range(0, len(items), step):
            job = self._put_many(items[i : i + step], answers=True)
            if not isinstance(job, list):
                self._client._run(job, wait=False, on_answer=on_answer, first=i)

    def put_nowait(self, oid: int, index: int, data: Any) -> None:
        """``put`` without waiting for the answer (``put_many_nowait`` of one page)."""
        self.put_many_nowait([(oid, index, data)])

    def put_many_tokens(self, items: Sequence[tuple[int, int, Any]]) -> list[Token | None]:
        """``put_many`` for a client with a mapping: the token for ``read_mapped`` of each page
        stored, None for a page refused. Waits for every ``put_many_nowait`` answer due."""
        self._mapped()
        tokens: list[Token | None] = [None] * len(items)

        def answered(first: int, results: Any) -> None:
            if results is not None:
                tokens[first : first + len(results)] = map(token_of, results)

        self.put_many_nowait(items, answered)
        self.wait_deferred()
        return tokens

    @property
    def mapping(self) -> Mapping | None:
        """The client's mapping of its pages (``connect(map_pages=True)``), or None."""
        return self._client.mapping

    def wait_deferred(self) -> None:
        """Wait for the answers to every ``put_many_nowait`` of the client (``on_answer`` has
        then been called for each), after reporting its pools' mapped reads."""
        self._client.wait_deferred()

    def report_reads(self) -> None:
        """Tell tmemd, without waiting, which pages were read through the mapping since the
        last report (PROTOCOL.md §4.7: it counts them as get hits and keeps them as recently
        used). ``put_many_nowait`` and ``wait_deferred`` do this first."""
        if self._touched:
            self._client._send_deferred(self._touches())

    def get_many(self, items: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Fetch many pages; data or None per item. As ``get``, a persistent pool of a mapped
        client reads what it can through the mapping and asks tmemd for the rest."""
        job = self._get_many_mapping(items)
        results = job if isinstance(job, list) else list(self._client._run(job))
        if self._tokens is not None and self._reads_due():
            self._client.wait_deferred()
        return results

    def flush_many(self, items: Sequence[tuple[int, int]]) -> None:
        """Remove many pages."""
        job = self._flush_many(items)
        self._forget_many(items)
        self._client._run(job)

    def destroy(self) -> None:
        """Free every page of the pool; the handle is dead afterwards."""
        self._client._run(self._destroy())
        self.info.destroyed = True
