"""A pool seen from the trio client (``AsyncClient.new_pool``): every call awaited."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tmemclient import _plans
from tmemclient._pool import PoolOps
from tmemclient.core import OnAnswer
from tmemclient.mapping import Mapping
from tmemclient.wire.messages import Op

if TYPE_CHECKING:
    from tmemclient.aclient import AsyncClient


class AsyncPool(PoolOps):
    """A tmem pool seen from a trio guest. Made by ``AsyncClient.new_pool``; every method is
    awaited and behaves as the sync ``Pool``'s."""

    def __init__(self, client: AsyncClient, info: _plans.PoolInfo) -> None:
        super().__init__(client._view, client.limits, info)
        self._client = client
        self._track_tokens()

    @property
    def client(self) -> AsyncClient:
        """The connection the pool belongs to."""
        return self._client

    async def put(self, oid: int, index: int, data: Any) -> bool:
        """Store one page; False if the daemon declines (no room, frozen, over cap)."""
        if self._tokens is None:
            return bool(await self._client._run(self._put(oid, index, data)))
        (stored,) = await self.put_many([(oid, index, data)])  # its answer is the token
        return stored

    async def get(self, oid: int, index: int) -> bytes | None:
        """The page, or None on a miss. Ephemeral private pools give the page up (exclusive).
        A persistent pool of a mapped client reads a page this connection put through the
        mapping, with no round trip (see the sync ``Pool.get``)."""
        if self._tokens is not None and (data := self._mapped_get(oid, index)) is not None:
            if self._reads_due():
                await self._client.wait_deferred()
            return data
        result: bytes | None = await self._client._run(self._get(oid, index))
        return result

    async def put_frame(self, oid: int, index: int, frame: int) -> bool:
        """Store the page held in region frame(s) ``frame..`` (zero-copy path)."""
        job = self._frame(Op.PUT, oid, index, frame)
        self._forget(oid, index)
        return bool(await self._client._run(job))

    async def get_frame(self, oid: int, index: int, frame: int) -> bool:
        """Fetch the page into region frame(s) ``frame..``; True on a hit."""
        return bool(await self._client._run(self._frame(Op.GET, oid, index, frame)))

    async def flush(self, oid: int, index: int) -> None:
        """Remove one page (idempotent)."""
        job = self._simple(Op.FLUSH, oid, index)
        self._forget(oid, index)
        await self._client._run(job)

    async def flush_object(self, oid: int) -> None:
        """Remove every page of an object."""
        job = self._simple(Op.FLUSH_OBJECT, oid)
        self._forget(oid)
        await self._client._run(job)

    async def read(self, oid: int, index: int, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a page (the page stays); None on a miss."""
        result: bytes | None = await self._client._run(self._read(oid, index, offset, length))
        return result

    async def write(self, oid: int, index: int, offset: int, data: Any) -> bool:
        """Overwrite bytes of an existing page; False if the page is not there."""
        job = self._write(Op.WRITE, oid, index, offset, data)
        self._forget(oid, index)
        return bool(await self._client._run(job))

    async def xchg(self, oid: int, index: int, offset: int, data: Any) -> bytes | None:
        """Atomically write ``data`` at ``offset`` and return the bytes it replaced; None on a miss."""
        job = self._write(Op.XCHG, oid, index, offset, data)
        self._forget(oid, index)
        result: bytes | None = await self._client._run(job)
        return result

    async def put_many(self, items: Sequence[tuple[int, int, Any]]) -> list[bool]:
        """Store many pages; one bool per item."""
        job = self._put_many_learning(items)
        return job if isinstance(job, list) else list(await self._client._run(job))

    async def put_many_nowait(
        self, items: Sequence[tuple[int, int, Any]], on_answer: OnAnswer | None = None
    ) -> None:
        """Send puts of many pages and return once they are sent, not answered (see the sync
        ``Pool.put_many_nowait``); answers are counted in ``client.deferred`` as they arrive,
        and handed to ``on_answer(first, results)`` (from the reader task)."""
        items = items if isinstance(items, (list, tuple)) else list(items)
        await self.report_reads()
        self._forget_many(items)  # (only a waited-for answer teaches a token: see _pool.py)
        step = max(1, self._client.limits.frames // 2 // self.info.frames_per_page)
        for i in range(0, len(items), step):
            job = self._put_many(items[i : i + step], answers=True)
            if not isinstance(job, list):
                await self._client._run(job, wait=False, on_answer=on_answer, first=i)

    async def put_nowait(self, oid: int, index: int, data: Any) -> None:
        """``put`` without waiting for the answer (``put_many_nowait`` of one page)."""
        await self.put_many_nowait([(oid, index, data)])

    @property
    def mapping(self) -> Mapping | None:
        """The client's mapping of its pages (``open_client(map_pages=True)``), or None."""
        return self._client.mapping

    async def wait_deferred(self) -> None:
        """Wait for the answers to every ``put_many_nowait`` of the client, after reporting its
        pools' mapped reads."""
        await self._client.wait_deferred()

    async def report_reads(self) -> None:
        """Tell tmemd, without waiting, which pages were read through the mapping since the
        last report (see the sync ``Pool.report_reads``)."""
        if self._touched:
            await self._client._send(self._touches(), deferred=True)

    async def get_many(self, items: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Fetch many pages; data or None per item (through the mapping where the sync
        ``Pool.get_many`` would)."""
        job = self._get_many_mapping(items)
        results = job if isinstance(job, list) else list(await self._client._run(job))
        if self._tokens is not None and self._reads_due():
            await self._client.wait_deferred()
        return results

    async def flush_many(self, items: Sequence[tuple[int, int]]) -> None:
        """Remove many pages."""
        job = self._flush_many(items)
        self._forget_many(items)
        await self._client._run(job)

    async def destroy(self) -> None:
        """Free every page of the pool; the handle is dead afterwards."""
        await self._client._run(self._destroy())
        self.info.destroyed = True
