"""The two drivers: ``PageCache`` (sync) and ``AsyncPageCache`` (trio) run the core's plans
against a pool, one request (requests.py) at a time.

Each driver makes every kind of request against its pool and raises on anything else. If the
daemon goes away (``DaemonGone``) a driver answers every request from then on as if tmem were
empty (``failed``), and the cache carries on with its local pages and the file.
"""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from tmemclient.apool import AsyncPool
from tmemclient.apps.cleancache.coherency import CachedFile
from tmemclient.apps.cleancache.core import _CacheCore
from tmemclient.apps.cleancache.fetcher import _Fetcher
from tmemclient.apps.cleancache.requests import (
    Answers,
    Flush,
    FlushObject,
    Get,
    GetStart,
    GetWait,
    Lend,
    Plan,
    Put,
    Request,
    failed,
    unknown,
)
from tmemclient.apps.cleancache.state import Page
from tmemclient.core import OnAnswer
from tmemclient.pool import Pool
from tmemclient.wire.errors import DaemonGone


def _put_batch(
    pool: Pool, items: list[tuple[int, int, Page]], on_answer: OnAnswer | None = None
) -> list[bool] | None:
    """Put one batch of evicted blocks without waiting for the answer (None: not known).

    A clean block may be dropped, so nothing waits for its put: the daemon serves requests in
    order, so a later get sees it, and the client counts the answers (``client.deferred``). The
    cache assumes the blocks landed; if one was refused, a later lookup misses and trims the
    shadow. To wait for the answers instead, ``return pool.put_many(items)``.
    """
    pool.put_many_nowait(items, on_answer)
    return None


class PageCache(_CacheCore):
    """A synchronous file page cache backed by an ephemeral tmem pool; ``pool=None`` makes it a
    plain local cache (the static partition to compare with).

    ``capacity`` is in file pages; ``block_pages`` pages make a block (default: the pool's page
    size, which may be smaller than a block but not larger); ``readahead`` pages are fetched
    beyond a sequential read; ``put_batch`` pages are gathered per put; while backed off 1 in
    ``sample`` blocks is used; ``window`` blocks' worth of outcomes are judged at a time (see
    shadow.py); ``disk_read`` replaces ``os.pread`` for file reads (the benchmark adds a
    device's latency there); ``overlap`` reads the file while a lookup is on its way (a helper
    thread makes the get; ``close`` ends it); ``borrow`` bytes of memory are asked of tmemd to
    extend the cache (its client connected with ``lend_memory``; see lent.py).
    ``stats`` counts what the cache did, ``sampling`` is True while it has backed off, and
    ``tmem`` turns False once the daemon went away. Not thread-safe.
    """

    _pool_type = Pool
    _pool: Pool | None
    _overlap = True
    _fetcher: _Fetcher | None = None

    def _drive(self, plan: Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(self._do(request))
        except StopIteration as stop:
            return stop.value

    def _do(self, request: Request) -> Any:
        pool = self._pool
        if isinstance(request, GetWait) and self._fetcher is not None and self._fetcher.busy:
            try:
                return self._fetcher.wait()
            except DaemonGone:
                self._daemon_gone()
                return failed(request)
        if pool is None or not self.tmem or isinstance(request, GetWait):
            return failed(request)
        try:
            match request:
                case GetStart(keys):
                    if self._fetcher is None:
                        self._fetcher = _Fetcher(pool)
                    return self._fetcher.start(keys)
                case Get(keys):
                    return pool.get_many(keys)
                case Put(items, on_answer):
                    return _put_batch(pool, items, on_answer)
                case Answers():
                    return pool.wait_deferred()
                case Lend(nbytes):
                    return pool.client.lend(nbytes)
                case Flush(keys):
                    return pool.flush_many(keys)
                case FlushObject(oid):
                    return pool.flush_object(oid)
                case _:
                    unknown(request)
        except DaemonGone:
            self._daemon_gone()
            return failed(request)

    def open(self, path: str | os.PathLike[str], *, writable: bool = False) -> CachedFile:
        """Open a file through the cache (read-only unless ``writable``)."""
        result: CachedFile = self._drive(self._open_plan(path, writable))
        return result

    def read(self, f: CachedFile, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        result: bytes = self._drive(self._read_plan(f, offset, length))
        return result

    def write(self, f: CachedFile, offset: int, data: Any) -> int:
        """Write through to the file; the cached blocks it touches are dropped."""
        result: int = self._drive(self._write_plan(f, offset, data))
        return result

    def truncate(self, f: CachedFile, size: int) -> None:
        """Truncate (or extend) the file; its cached pages are dropped here and in tmem."""
        self._drive(self._truncate_plan(f, size))

    def put_pending(self) -> None:
        """Send the evicted blocks gathering for a batch now."""
        self._drive(self._put_pending(force=True))

    def close(self) -> None:
        """Close every file opened through the cache (the pool is the caller's)."""
        super().close()
        if self._fetcher is not None:
            self._fetcher.stop()
            self._fetcher = None

    def __enter__(self) -> PageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPageCache(_CacheCore):
    """The trio page cache: ``PageCache``'s logic over an ``AsyncPool``. File reads are short
    blocking calls made from the task, as a page cache's would be. Tasks may share one: its
    operations take turns (a read in progress holds pages another's eviction would reuse)."""

    _pool_type = AsyncPool
    _pool: AsyncPool | None
    _turns: trio.Lock | None = None

    async def _drive(self, plan: Plan) -> Any:
        if self._turns is None:
            self._turns = trio.Lock()
        async with self._turns:
            try:
                request = next(plan)
                while True:
                    request = plan.send(await self._do(request))
            except StopIteration as stop:
                return stop.value

    async def _do(self, request: Request) -> Any:
        pool = self._pool
        if pool is None or not self.tmem:
            return failed(request)
        try:
            match request:
                case Get(keys):
                    return await pool.get_many(keys)
                case GetStart():  # not overlapped: the get is made at GetWait
                    return None
                case GetWait(keys):
                    started = time.perf_counter()
                    found = await pool.get_many(keys)
                    return found, time.perf_counter() - started
                case Put(items, on_answer):  # as the sync cache's: a clean block's put needs
                    await pool.put_many_nowait(items, on_answer)  # no answer
                    return None
                case Answers():
                    return await pool.wait_deferred()
                case Lend(nbytes):
                    return await pool.client.lend(nbytes)
                case Flush(keys):
                    return await pool.flush_many(keys)
                case FlushObject(oid):
                    return await pool.flush_object(oid)
                case _:
                    unknown(request)
        except DaemonGone:
            self._daemon_gone()
            return failed(request)

    async def open(self, path: str | os.PathLike[str], *, writable: bool = False) -> CachedFile:
        """Open a file through the cache (read-only unless ``writable``)."""
        result: CachedFile = await self._drive(self._open_plan(path, writable))
        return result

    async def read(self, f: CachedFile, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        result: bytes = await self._drive(self._read_plan(f, offset, length))
        return result

    async def write(self, f: CachedFile, offset: int, data: Any) -> int:
        """Write through to the file; the cached blocks it touches are dropped."""
        result: int = await self._drive(self._write_plan(f, offset, data))
        return result

    async def truncate(self, f: CachedFile, size: int) -> None:
        """Truncate (or extend) the file; its cached pages are dropped here and in tmem."""
        await self._drive(self._truncate_plan(f, size))

    async def put_pending(self) -> None:
        """Send the evicted blocks gathering for a batch now."""
        await self._drive(self._put_pending(force=True))
