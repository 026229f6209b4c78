"""The trio client that rides through a daemon restart: ``tmemclient.open_resilient_client``.

The same rules as the sync one (tmemclient/reconnect.py, whose docstring says what comes back
and what is retried). Many tasks may share the client: when the connection breaks under several
of them, one reconnects while the others wait for it, and every call then runs again on the new
connection. Each connection is an ``open_client`` held by a task of the resilient client's own
nursery, so it is opened and closed in one task whichever caller noticed the break.
"""

from __future__ import annotations

import os
import time
import uuid as uuid_module
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from tmemclient.aclient import AsyncClient, open_client
from tmemclient.apool import AsyncPool
from tmemclient.client import DEFAULT_FRAMES
from tmemclient.mapping import Mapping
from tmemclient.reconnect import (
    RETRYABLE,
    OnReconnect,
    PoolCarrier,
    PoolSpec,
    Reconnected,
    Retry,
    announce,
    gave_up,
    note,
)
from tmemclient.wire.errors import DaemonGone, TmemError
from tmemclient.wire.layout import FRAME_SIZE

T = TypeVar("T")


class AsyncResilientPool(PoolCarrier[AsyncPool]):
    """A pool of an ``AsyncResilientClient``: ``AsyncPool``'s methods, carried over
    reconnects."""

    _client: AsyncResilientClient

    async def put(self, oid: int, index: int, data: Any) -> bool:
        """``AsyncPool.put``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.put(oid, index, data))

    async def get(self, oid: int, index: int) -> bytes | None:
        """``AsyncPool.get``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.get(oid, index))

    async def flush(self, oid: int, index: int) -> None:
        """``AsyncPool.flush``, through reconnects."""
        await self._client._retrying(lambda: self.inner.flush(oid, index))

    async def flush_object(self, oid: int) -> None:
        """``AsyncPool.flush_object``, through reconnects."""
        await self._client._retrying(lambda: self.inner.flush_object(oid))

    async def read(self, oid: int, index: int, offset: int, length: int) -> bytes | None:
        """``AsyncPool.read``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.read(oid, index, offset, length))

    async def write(self, oid: int, index: int, offset: int, data: Any) -> bool:
        """``AsyncPool.write``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.write(oid, index, offset, data))

    async def xchg(self, oid: int, index: int, offset: int, data: Any) -> bytes | None:
        """``AsyncPool.xchg``; not run again after a reconnect (see the sync one)."""
        return await self._client._retrying(
            lambda: self.inner.xchg(oid, index, offset, data), idempotent=False
        )

    async def put_many(self, items: Sequence[tuple[int, int, Any]]) -> list[bool]:
        """``AsyncPool.put_many``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.put_many(items))

    async def get_many(self, items: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """``AsyncPool.get_many``, through reconnects."""
        return await self._client._retrying(lambda: self.inner.get_many(items))

    async def flush_many(self, items: Sequence[tuple[int, int]]) -> None:
        """``AsyncPool.flush_many``, through reconnects."""
        await self._client._retrying(lambda: self.inner.flush_many(items))

    async def destroy(self) -> None:
        """Free every page of the pool."""
        try:
            await self._client._retrying(self.inner.destroy)
        finally:
            self._client._pools.discard(self)

    def __repr__(self) -> str:
        return f"<AsyncResilientPool {self._inner!r} resets={self.resets}>"


class AsyncResilientClient:
    """A trio client that reconnects when tmemd goes away and comes back. Made by
    ``open_resilient_client``; safe to share between tasks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        retry: Retry,
        on_reconnect: OnReconnect | None,
        options: dict[str, Any],
        nursery: trio.Nursery,
    ) -> None:
        self.path = path
        self.retry = retry
        self.on_reconnect = on_reconnect
        self.reconnects = 0
        self._name = name
        self._options = options
        self._nursery = nursery
        self._pools: weakref.WeakSet[AsyncResilientPool] = weakref.WeakSet()
        self._lock = trio.Lock()  # one reconnect at a time
        self._generation = 0  # connections made
        self._tries = 0  # reconnects tried, successful or not
        self._last_error: DaemonGone | None = None
        self._broken = False
        self._closed = False
        self._client: AsyncClient | None = None
        self._release = trio.Event()  # set: the current connection's task closes it

    @property
    def client(self) -> AsyncClient:
        """The plain client of the current connection."""
        if self._client is None:
            raise DaemonGone("not connected")
        return self._client

    @property
    def name(self) -> str:
        """The guest name the daemon gave us."""
        return self.client.name

    @property
    def mapping(self) -> Mapping | None:
        """The current connection's mapping, or None."""
        return self.client.mapping

    async def new_pool(
        self,
        *,
        persistent: bool = False,
        shared: bool = False,
        uuid: uuid_module.UUID | bytes | str | None = None,
        page_size: int = FRAME_SIZE,
        name: str | None = None,
    ) -> AsyncResilientPool:
        """``AsyncClient.new_pool``; reopened on every reconnect (see the sync one)."""
        spec = PoolSpec(persistent, shared, uuid, page_size, name)
        inner = await self._retrying(lambda: self.client.new_pool(**spec.kwargs()))
        pool = AsyncResilientPool(self, spec, inner)
        self._pools.add(pool)
        return pool

    async def ping(self) -> None:
        """One round trip, through reconnects."""
        await self._retrying(lambda: self.client.ping())

    # ------------------------------------------------------------------ reconnecting

    async def _retrying(self, call: Callable[[], Awaitable[T]], *, idempotent: bool = True) -> T:
        for _ in range(self.retry.attempts):
            seen = self._tries
            generation = self._generation
            try:
                if self._broken:
                    raise DaemonGone("not connected")
                return await call()
            except DaemonGone:
                if self._closed:
                    raise
                await self._reconnect(generation, seen)
                if not idempotent:
                    raise DaemonGone(
                        "tmemd went away during xchg, which may or may not have been applied; "
                        "reconnected: read the page to know"
                    ) from None
        return await call()

    async def _reconnect(self, generation: int, seen: int) -> None:
        """Reconnect, unless another task did since ``generation`` (then just go on) or tried
        and gave up since ``seen`` (then its error: one budget per break, not one per task)."""
        async with self._lock:
            if self._generation != generation and not self._broken:
                return
            if self._tries != seen and self._broken and self._last_error is not None:
                raise self._last_error
            self._tries += 1
            self._broken = True
            self._release.set()
            try:
                event = await self._dial(first=False)
            except DaemonGone as exc:
                self._last_error = exc
                raise
            self._broken = False
            self.reconnects += 1
        announce(event, self.on_reconnect, self._name)

    async def _dial(self, *, first: bool) -> Reconnected:
        started = time.monotonic()
        last: BaseException | None = None
        for attempt, delay in enumerate(self.retry.delays(), 1):
            if delay:
                await trio.sleep(delay)
            release = trio.Event()
            try:
                client = await self._nursery.start(self._hold, release)
            except RETRYABLE as exc:
                last = exc
                continue
            event = Reconnected(attempt, time.monotonic() - started)
            try:
                if not first:
                    await self._reopen(client, event)
            except RETRYABLE as exc:
                release.set()
                last = exc
                continue
            self._client, self._release = client, release
            self._generation += 1
            return event
        raise gave_up(self.path, self.retry, last)

    async def _hold(self, release: trio.Event, *, task_status: Any) -> None:
        """One connection's life: open it, hand it over, close it when told to."""
        async with open_client(
            self.path, self._name, timeout=self.retry.connect_timeout, **self._options
        ) as client:
            task_status.started(client)
            await release.wait()

    async def _reopen(self, client: AsyncClient, event: Reconnected) -> None:
        for pool in list(self._pools):
            if pool._dead is not None:
                continue
            spec = pool._spec
            try:
                inner = await client.new_pool(**spec.kwargs())
            except TmemError as exc:
                if isinstance(exc, RETRYABLE):
                    raise
                pool._dead = exc
                event.emptied.append(spec.label(pool._inner.handle))
                continue
            note(event, inner, spec, pool._inner.handle)
            if not inner.reopened:
                pool.resets += 1
            pool._inner = inner


@asynccontextmanager
async def open_resilient_client(
    path: str | os.PathLike[str],
    name: str,
    *,
    retry: Retry | None = None,
    on_reconnect: OnReconnect | None = None,
    frames: int = DEFAULT_FRAMES,
    ring_frames: int | None = None,
    map_pages: bool = False,
) -> AsyncIterator[AsyncResilientClient]:
    """``open_client``, as a client that reconnects when tmemd goes away and comes back (see
    ``connect_resilient``). Raises ``Unreachable`` when no daemon answered within the budget."""
    options = {"frames": frames, "ring_frames": ring_frames, "map_pages": map_pages}
    async with trio.open_nursery() as nursery:
        client = AsyncResilientClient(
            path,
            name,
            retry=retry or Retry(),
            on_reconnect=on_reconnect,
            options=options,
            nursery=nursery,
        )
        await client._dial(first=True)
        try:
            yield client
        finally:
            client._closed = True
            client._release.set()
