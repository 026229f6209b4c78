"""Clients that ride through a daemon restart: ``tmemclient.connect_resilient`` (sync) and
``tmemclient.open_resilient_client`` (trio, tmemclient/areconnect.py).

A resilient client is a plain client (client.py, aclient.py: their hot paths are untouched)
behind a thin layer that, when a call fails with ``DaemonGone`` (the daemon stopped, crashed or
dropped the connection), connects again with bounded retries and backoff (``Retry``), reopens
every pool the caller still holds, tells ``on_reconnect`` (and the log) what came back, and
runs the call again on the new connection. Only when the daemon does not come back within the
retry budget does the call raise — ``Unreachable``, a ``DaemonGone`` — and it never waits
longer than that budget plus one connect timeout per attempt.

What comes back (docs/design.md §2.6): a named pool (``new_pool(name=...)``) reopens with its
pages if the daemon kept it (``pool.reopened``: a reconnect to the same daemon within its
``reattach_seconds``); any other pool, and a named one the daemon no longer has (it restarted),
comes back *empty* (``pool.resets`` counts those times; ``Reconnected.emptied`` names them).
An empty ephemeral pool is allowed by tmem's contract; an empty persistent one means pages were
lost, which is why the event says so rather than hiding it.

A call retried after a reconnect has the effect of one call: put, get, flush, read and write are
idempotent. ``xchg`` is not (its first attempt may have been applied): it raises
``DaemonGone`` after the reconnect instead of running again. Answers to ``put_many_nowait``
that were due on the broken connection are never delivered (their ``on_answer`` is not called);
the pages are as if refused. Zero-copy frames (``reserve_frames``) belong to one connection's
region, so the resilient client does not offer them, nor ``lend_memory``.
"""

from __future__ import annotations

import os
import time
import uuid as uuid_module
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from tmemclient._pool import PoolOps
from tmemclient.client import DEFAULT_FRAMES, Client, connect
from tmemclient.core import OnAnswer
from tmemclient.mapping import Mapping, Token
from tmemclient.pool import Pool
from tmemclient.wire.errors import DaemonGone, GuestConflict, InvalidArgument, TmemError
from tmemclient.wire.layout import FRAME_SIZE

log = structlog.get_logger("tmemclient.reconnect")
T = TypeVar("T")


class Unreachable(DaemonGone):
    """tmemd did not come back within the retry budget (``Retry``)."""


@dataclass(frozen=True)
class Retry:
    """How hard a resilient client tries to reach tmemd again: ``attempts`` connects, the
    first at once, then after ``first_delay`` seconds, each wait doubling up to ``max_delay``;
    each connect bounded by ``connect_timeout``."""

    attempts: int = 10
    first_delay: float = 0.05
    max_delay: float = 2.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidArgument("attempts must be an int")
        if self.attempts < 1:
            raise InvalidArgument("attempts must be at least 1")
        if not 0 <= self.first_delay <= self.max_delay:
            raise InvalidArgument("delays must satisfy 0 <= first_delay <= max_delay")
        if self.connect_timeout <= 0:
            raise InvalidArgument("connect_timeout must be positive")

    def delays(self) -> list[float]:
        """The wait before each attempt: 0, first_delay, 2 * first_delay, ... ≤ max_delay."""
        waits = [0.0]
        delay = self.first_delay
        while len(waits) < self.attempts:
            waits.append(delay)
            delay = min(self.max_delay, delay * 2)
        return waits

    @property
    def budget(self) -> float:
        """Seconds of waiting between attempts, at most (connect timeouts not counted)."""
        return sum(self.delays())


@dataclass
class Reconnected:
    """What a reconnect found: after how many attempts and seconds, which pools came back with
    their pages (named pools the daemon kept), and which came back empty."""

    attempts: int
    seconds: float
    reopened: list[str] = field(default_factory=list)
    emptied: list[str] = field(default_factory=list)
    lost_persistent: int = 0  # persistent pools among ``emptied``: their pages are gone


OnReconnect = Callable[[Reconnected], None]


@dataclass(frozen=True)
class PoolSpec:
    """How a pool was asked for: what reopening it asks again."""

    persistent: bool
    shared: bool
    uuid: uuid_module.UUID | bytes | str | None
    page_size: int
    name: str | None

    def kwargs(self) -> dict[str, Any]:
        """``new_pool``'s arguments."""
        return {
            "persistent": self.persistent,
            "shared": self.shared,
            "uuid": self.uuid,
            "page_size": self.page_size,
            "name": self.name,
        }

    def label(self, handle: int) -> str:
        """How the pool is named in a Reconnected event."""
        return self.name if self.name is not None else f"#{handle}"


# Failures a connect attempt is retried after: the daemon is not there (yet), or it still has
# our last connection (it notices a close asynchronously), which holds the name or a named pool.
RETRYABLE = (DaemonGone, GuestConflict, OSError)


def note(event: Reconnected, pool: Any, spec: PoolSpec, handle: int) -> None:
    """Count one reopened pool (``pool.reopened``) in ``event``."""
    label = spec.label(handle)
    if pool.reopened:
        event.reopened.append(label)
    else:
        event.emptied.append(label)
        if spec.persistent:
            event.lost_persistent += 1


def announce(event: Reconnected, on_reconnect: OnReconnect | None, name: str) -> None:
    """Tell the log and the caller's callback what a reconnect found."""
    (log.warning if event.lost_persistent else log.info)(
        "tmem_reconnected",
        guest=name,
        attempts=event.attempts,
        seconds=round(event.seconds, 3),
        reopened=event.reopened,
        emptied=event.emptied,
        lost_persistent=event.lost_persistent,
    )
    if on_reconnect is not None:
        on_reconnect(event)


def gave_up(path: Any, retry: Retry, last: BaseException | None) -> Unreachable:
    """The error a call raises when tmemd did not come back."""
    return Unreachable(
        f"tmemd at {path} did not come back after {retry.attempts} attempts over "
        f"{retry.budget:.1f}s ({last}); is the daemon running?"
    )


InnerPool = TypeVar("InnerPool", bound=PoolOps)


class PoolCarrier(Generic[InnerPool]):
    """What the sync and trio resilient pools share: the pool on the current connection
    (``inner``), and what stays the same across reconnects."""

    def __init__(self, client: Any, spec: PoolSpec, inner: InnerPool) -> None:
        self._client = client
        self._spec = spec
        self._inner = inner
        self.resets = 0  # times it came back empty after a reconnect
        self._dead: TmemError | None = None

    @property
    def inner(self) -> InnerPool:
        """The pool on the current connection."""
        if self._dead is not None:
            raise self._dead
        return self._inner

    @property
    def name(self) -> str | None:
        """The pool's name, or None."""
        return self._spec.name

    @property
    def reopened(self) -> bool:
        """Did the last (re)open find this guest's named pool with its pages?"""
        return self._inner.reopened

    @property
    def persistent(self) -> bool:
        """True for a persistent pool."""
        return self._spec.persistent

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return self._inner.page_size

    @property
    def mapping(self) -> Mapping | None:
        """The current connection's mapping (``map_pages``), or None."""
        return self._inner.mapping


class ResilientPool(PoolCarrier[Pool]):
    """A pool of a ``ResilientClient``: the same methods as ``Pool``, carried over reconnects."""

    _client: ResilientClient

    def put(self, oid: int, index: int, data: Any) -> bool:
        """``Pool.put``, through reconnects."""
        return self._client._retrying(lambda: self.inner.put(oid, index, data))

    def get(self, oid: int, index: int) -> bytes | None:
        """``Pool.get``, through reconnects."""
        return self._client._retrying(lambda: self.inner.get(oid, index))

    def flush(self, oid: int, index: int) -> None:
        """``Pool.flush``, through reconnects."""
        self._client._retrying(lambda: self.inner.flush(oid, index))

    def flush_object(self, oid: int) -> None:
        """``Pool.flush_object``, through reconnects."""
        self._client._retrying(lambda: self.inner.flush_object(oid))

    def read(self, oid: int, index: int, offset: int, length: int) -> bytes | None:
        """``Pool.read``, through reconnects."""
        return self._client._retrying(lambda: self.inner.read(oid, index, offset, length))

    def write(self, oid: int, index: int, offset: int, data: Any) -> bool:
        """``Pool.write``, through reconnects."""
        return self._client._retrying(lambda: self.inner.write(oid, index, offset, data))

    def xchg(self, oid: int, index: int, offset: int, data: Any) -> bytes | None:
        """``Pool.xchg``; not run again after a reconnect (it may have been applied): then
        DaemonGone, and the next call goes to the new connection."""
        return self._client._retrying(
            lambda: self.inner.xchg(oid, index, offset, data), idempotent=False
        )

    def put_many(self, items: Sequence[tuple[int, int, Any]]) -> list[bool]:
        """``Pool.put_many``, through reconnects."""
        return self._client._retrying(lambda: self.inner.put_many(items))

    def put_many_tokens(self, items: Sequence[tuple[int, int, Any]]) -> list[Token | None]:
        """``Pool.put_many_tokens``, through reconnects."""
        return self._client._retrying(lambda: self.inner.put_many_tokens(items))

    def put_many_nowait(
        self, items: Sequence[tuple[int, int, Any]], on_answer: OnAnswer | None = None
    ) -> None:
        """``Pool.put_many_nowait``; answers due on a connection that broke never come."""
        self._client._retrying(lambda: self.inner.put_many_nowait(items, on_answer))

    def get_many(self, items: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """``Pool.get_many``, through reconnects."""
        return self._client._retrying(lambda: self.inner.get_many(items))

    def flush_many(self, items: Sequence[tuple[int, int]]) -> None:
        """``Pool.flush_many``, through reconnects."""
        self._client._retrying(lambda: self.inner.flush_many(items))

    def read_mapped(self, token: Token, *, report: bool = True) -> bytes | None:
        """``Pool.read_mapped`` on the current connection's mapping (a token of a daemon that
        restarted simply misses)."""
        return self.inner.read_mapped(token, report=report)

    def report_reads(self) -> None:
        """``Pool.report_reads``, through reconnects."""
        self._client._retrying(self.inner.report_reads)

    def wait_deferred(self) -> None:
        """``Pool.wait_deferred``, through reconnects."""
        self._client._retrying(self.inner.wait_deferred)

    def destroy(self) -> None:
        """Free every page of the pool (on a broken connection it is gone anyway)."""
        try:
            self._client._retrying(self.inner.destroy)
        finally:
            self._client._forget(self)

    def __repr__(self) -> str:
        return f"<ResilientPool {self._inner!r} resets={self.resets}>"


class ResilientClient:
    """A synchronous client that reconnects when tmemd goes away and comes back (module
    docstring). Made by ``connect_resilient``. Not thread-safe."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        retry: Retry,
        on_reconnect: OnReconnect | None,
        options: dict[str, Any],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self.retry = retry
        self.on_reconnect = on_reconnect
        self.reconnects = 0
        self._name = name
        self._options = options
        self._sleep = sleep
        self._pools: weakref.WeakSet[ResilientPool] = weakref.WeakSet()
        self._closed = False
        self._broken = False  # the connection broke and no reconnect succeeded since
        self._client: Client = self._dial(first=True)[0]

    @property
    def client(self) -> Client:
        """The plain client of the current connection."""
        return self._client

    @property
    def name(self) -> str:
        """The guest name the daemon gave us."""
        return self._client.name

    @property
    def mapping(self) -> Mapping | None:
        """The current connection's mapping (``map_pages``), or None."""
        return self._client.mapping

    def new_pool(
        self,
        *,
        persistent: bool = False,
        shared: bool = False,
        uuid: uuid_module.UUID | bytes | str | None = None,
        page_size: int = FRAME_SIZE,
        name: str | None = None,
    ) -> ResilientPool:
        """``Client.new_pool``; the pool is reopened on every reconnect (named: with its pages
        if the daemon kept them)."""
        spec = PoolSpec(persistent, shared, uuid, page_size, name)
        inner = self._retrying(lambda: self._client.new_pool(**spec.kwargs()))
        pool = ResilientPool(self, spec, inner)
        self._pools.add(pool)
        return pool

    def ping(self) -> None:
        """One round trip, through reconnects."""
        self._retrying(lambda: self._client.ping())

    def wait_deferred(self) -> None:
        """``Client.wait_deferred`` on the current connection."""
        self._retrying(lambda: self._client.wait_deferred())

    def close(self) -> None:
        """Close the connection; no more reconnects. Named pools stay kept by the daemon for
        ``reattach_seconds``."""
        self._closed = True
        self._client.close()

    def __enter__(self) -> ResilientClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reconnecting

    def _retrying(self, call: Callable[[], T], *, idempotent: bool = True) -> T:
        """``call()``, and after a DaemonGone a reconnect and ``call()`` again; at most
        ``retry.attempts`` reconnects for one call."""
        for _ in range(self.retry.attempts):
            broken = self._client
            try:
                if self._broken:  # the last reconnect gave up: try again before the call
                    raise DaemonGone("not connected")
                return call()
            except DaemonGone:
                if self._closed:
                    raise
                self._reconnect(broken)
                if not idempotent:
                    raise DaemonGone(
                        "tmemd went away during xchg, which may or may not have been applied; "
                        "reconnected: read the page to know"
                    ) from None
        return call()  # the last try: its DaemonGone is the caller's

    def _reconnect(self, broken: Client) -> None:
        if broken is not self._client:  # pragma: no cover - sync: one caller at a time
            return
        broken.close()
        self._broken = True
        client, event = self._dial(first=False)
        self._client = client
        self._broken = False
        self.reconnects += 1
        announce(event, self.on_reconnect, self._name)

    def _dial(self, *, first: bool) -> tuple[Client, Reconnected]:
        """Connect (and reopen every live pool), trying ``retry.attempts`` times."""
        started = time.monotonic()
        last: BaseException | None = None
        for attempt, delay in enumerate(self.retry.delays(), 1):
            if delay:
                self._sleep(delay)
            client: Client | None = None
            try:
                client = connect(
                    self.path, self._name, timeout=self.retry.connect_timeout, **self._options
                )
                event = Reconnected(attempt, time.monotonic() - started)
                if not first:
                    self._reopen(client, event)
                return client, event
            except RETRYABLE as exc:
                last = exc
                if client is not None:
                    client.close()
        raise gave_up(self.path, self.retry, last)

    def _reopen(self, client: Client, event: Reconnected) -> None:
        for pool in list(self._pools):
            if pool._dead is not None:
                continue
            spec = pool._spec
            try:
                inner = client.new_pool(**spec.kwargs())
            except TmemError as exc:
                if isinstance(exc, RETRYABLE):
                    raise  # the attempt failed: _dial tries again
                pool._dead = exc  # e.g. a shared pool whose grant was revoked
                event.emptied.append(spec.label(pool._inner.handle))
                continue
            note(event, inner, spec, pool._inner.handle)
            if not inner.reopened:
                pool.resets += 1
            pool._inner = inner

    def _forget(self, pool: ResilientPool) -> None:
        self._pools.discard(pool)


def connect_resilient(
    path: str | os.PathLike[str],
    name: str,
    *,
    retry: Retry | None = None,
    on_reconnect: OnReconnect | None = None,
    frames: int = DEFAULT_FRAMES,
    ring_frames: int | None = None,
    map_pages: bool = False,
) -> ResilientClient:
    """``connect``, as a client that reconnects when tmemd goes away and comes back (module
    docstring): ``retry`` bounds how long it tries (default ``Retry()``: 10 attempts over about
    9 s), ``on_reconnect`` is called with a ``Reconnected`` after each reconnect. The first
    connect is retried the same way. Raises ``Unreachable`` (a DaemonGone) when no daemon
    answered within the budget."""
    options = {"frames": frames, "ring_frames": ring_frames, "map_pages": map_pages}
    return ResilientClient(
        path, name, retry=retry or Retry(), on_reconnect=on_reconnect, options=options
    )
