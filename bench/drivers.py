"""One client "driver" per system, and the guest process that runs them.

Every system gets the same work: the same 4 KiB payload, the same key pattern (guest g, object 1,
index i: ``(1, i)`` in a tmem pool private to the guest, ``b"g{g}:o1:i{i}"`` in memcached and
redis), indexes walked in order and wrapped at the key space, batches of consecutive indexes.
Every get is checked against the payload (a miss or wrong data counts as bad, is reported, and
costs the same comparison on every system). Key lists and batch arguments are built before
measuring, so the timed loops only call the client.

A guest process (``guest_main``) connects to every server once and then obeys commands from the
orchestrator over a pipe: fill the key space, run an operation for a while (pages/s) or record
per-operation latencies. Start and stop are absolute times on CLOCK_MONOTONIC, which every process
on the machine shares, so several guests measure at the same moment.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import resource
import signal
import time
import traceback
from array import array
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any, Protocol

import tmemclient

PAGE_SIZE = 4096
PAGE: bytes = random.Random(4).randbytes(PAGE_SIZE)  # incompressible, the same for everyone
OPS = ("put", "get", "put_batch", "get_batch")


class Driver(Protocol):
    """What the guest process needs from a client. Each method returns the pages that went well."""

    def put(self, i: int) -> int: ...
    def get(self, i: int) -> int: ...
    def put_batch(self, b: int) -> int: ...
    def get_batch(self, b: int) -> int: ...
    def close(self) -> None: ...


class Keys:
    """The key space of one guest: index ``i`` wraps at ``size``; batch ``b`` is ``batch``
    consecutive indexes."""

    def __init__(self, guest: int, size: int, batch: int) -> None:
        self.size = size - size % batch
        self.batch = batch
        self.batches = self.size // batch
        self.names = [f"g{guest}:o1:i{i}".encode() for i in range(self.size)]

    def batch_range(self, b: int) -> range:
        start = (b % self.batches) * self.batch
        return range(start, start + self.batch)


class TmemDriver:
    """tmemclient: one persistent private pool; pages go through the shared region, requests
    through the request rings (PROTOCOL.md §4.6) or, with ``ring_frames=0``, the socket."""

    def __init__(
        self,
        sock: str,
        keys: Keys,
        guest: int,
        ring_frames: int | None = None,
        map_pages: bool = False,
    ) -> None:
        self.client = tmemclient.connect(
            sock,
            name=f"bench-g{guest}",
            frames=max(256, keys.batch),
            ring_frames=ring_frames,
            map_pages=map_pages,
        )
        self.pool = self.client.new_pool(persistent=True)
        self.size = keys.size
        self.put_items = [[(1, i, PAGE) for i in keys.batch_range(b)] for b in range(keys.batches)]
        self.get_items = [[(1, i) for i in keys.batch_range(b)] for b in range(keys.batches)]
        self.batches = keys.batches

    def put(self, i: int) -> int:
        return 1 if self.pool.put(1, i % self.size, PAGE) else 0

    def get(self, i: int) -> int:
        return 1 if self.pool.get(1, i % self.size) == PAGE else 0

    def put_batch(self, b: int) -> int:
        return sum(self.pool.put_many(self.put_items[b % self.batches]))

    def get_batch(self, b: int) -> int:
        return sum(1 for v in self.pool.get_many(self.get_items[b % self.batches]) if v == PAGE)

    def close(self) -> None:
        self.client.close()


class MemcachedDriver:
    """pymemcache: set waits for its reply (noreply=False), set_many, get_many."""

    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        base = importlib.import_module("pymemcache.client.base")
        self.client: Any = base.Client(sock, default_noreply=False, connect_timeout=10, timeout=60)
        self.names = keys.names
        self.size = keys.size
        self.batches = keys.batches
        self.set_args = [
            {keys.names[i]: PAGE for i in keys.batch_range(b)} for b in range(keys.batches)
        ]
        self.get_args = [[keys.names[i] for i in keys.batch_range(b)] for b in range(keys.batches)]

    def put(self, i: int) -> int:
        return 1 if self.client.set(self.names[i % self.size], PAGE, noreply=False) else 0

    def get(self, i: int) -> int:
        return 1 if self.client.get(self.names[i % self.size]) == PAGE else 0

    def put_batch(self, b: int) -> int:
        items = self.set_args[b % self.batches]
        return len(items) - len(self.client.set_many(items, noreply=False))

    def get_batch(self, b: int) -> int:
        got = self.client.get_many(self.get_args[b % self.batches])
        return sum(1 for v in got.values() if v == PAGE)

    def close(self) -> None:
        self.client.close()


class RedisDriver:
    """redis-py (hiredis parser when installed): SET, GET, a pipeline of SETs, MGET."""

    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        redis: Any = importlib.import_module("redis")
        self.client: Any = redis.Redis(
            unix_socket_path=sock, socket_timeout=60, socket_connect_timeout=10
        )
        self.client.ping()
        self.names = keys.names
        self.size = keys.size
        self.batches = keys.batches
        self.key_lists = [[keys.names[i] for i in keys.batch_range(b)] for b in range(keys.batches)]

    def put(self, i: int) -> int:
        return 1 if self.client.set(self.names[i % self.size], PAGE) else 0

    def get(self, i: int) -> int:
        return 1 if self.client.get(self.names[i % self.size]) == PAGE else 0

    def put_batch(self, b: int) -> int:
        pipe = self.client.pipeline(transaction=False)
        for name in self.key_lists[b % self.batches]:
            pipe.set(name, PAGE)
        return sum(1 for ok in pipe.execute() if ok)

    def get_batch(self, b: int) -> int:
        return sum(1 for v in self.client.mget(self.key_lists[b % self.batches]) if v == PAGE)

    def close(self) -> None:
        self.client.close()


class TmemMapDriver(TmemDriver):
    """tmemclient with a mapping of its pages (PROTOCOL.md §4.7), through the plain calls: a
    persistent pool's ``get`` and ``get_many`` read pages through the mapping with no request (the
    client keeps each page's token from its put's answer; a persistent GET leaves the page
    too, so the two are the same operation here)."""

    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        super().__init__(sock, keys, guest, map_pages=True)
        if self.client.mapping is None:
            raise RuntimeError("tmemd granted no mapping (is it run with --no-map-pages?)")


def tmem_socket_driver(sock: str, keys: Keys, guest: int) -> Driver:
    """tmemclient without rings: every request and reply crosses the socket."""
    return TmemDriver(sock, keys, guest, ring_frames=0)


DRIVERS: dict[str, Callable[[str, Keys, int], Driver]] = {
    "tmemd": TmemDriver,
    "tmemd-sock": tmem_socket_driver,
    "tmemd-map": TmemMapDriver,
    "memcached": MemcachedDriver,
    "redis": RedisDriver,
}


def client_problem(system: str) -> str | None:
    """Why the Python client of ``system`` cannot be used here, or None."""
    module = {
        "tmemd": "tmemclient",
        "tmemd-sock": "tmemclient",
        "tmemd-map": "tmemclient",
        "memcached": "pymemcache",
        "redis": "redis",
    }[system]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"Python client {module!r} is not installed ({exc})"
    return None


def redis_parser() -> str:
    """Which reply parser redis-py uses."""
    try:
        utils: Any = importlib.import_module("redis.utils")
    except ImportError:
        return "none"
    return "hiredis" if getattr(utils, "HIREDIS_AVAILABLE", False) else "python (hiredis missing)"


# ---------------------------------------------------------------------- the guest process


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def run_rate(fn: Callable[[int], int], first: int, units: int, start_at: float, seconds: float):
    """Call ``fn(first), fn(first+1), ...`` from ``start_at`` for ``seconds``.
    Returns (pages done, pages bad, elapsed seconds, next index)."""
    _sleep_until(start_at)
    clock = time.perf_counter
    good = 0
    i = first
    t0 = clock()
    deadline = t0 + seconds
    while True:
        good += fn(i)
        i += 1
        if clock() >= deadline:
            break
    elapsed = clock() - t0
    done = (i - first) * units
    return done, done - good, elapsed, i


def run_latency(fn: Callable[[int], int], first: int, start_at: float, stop_at: float):
    """Time each call of ``fn`` between ``start_at`` and ``stop_at``.
    Returns (latencies in ns as array bytes, pages bad, next index)."""
    _sleep_until(start_at)
    clock = time.perf_counter_ns
    stop_ns = clock() + int((stop_at - time.monotonic()) * 1e9)
    lat = array("q")
    record = lat.append
    good = 0
    i = first
    while True:
        t0 = clock()
        good += fn(i)
        t1 = clock()
        record(t1 - t0)
        i += 1
        if t1 >= stop_ns:
            break
    return lat.tobytes(), len(lat) - good, i


def _counts(drv: Any) -> dict[str, int]:
    """The process's voluntary context switches so far (``waits``: a call that slept, on its
    socket, adds one) and whatever the driver counts itself (its ``counters()``, if any)."""
    counts: dict[str, int] = {"waits": resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw}
    more = getattr(drv, "counters", None)
    if more is not None:
        counts.update(more())
    return counts


def guest_main(
    conn: Connection,
    guest: int,
    cpus: list[int] | None,
    socks: dict[str, str],
    keyspace: int,
    batch: int,
    factories: Mapping[str, Callable[[str, Keys, int], Driver]] | None = None,
) -> None:
    """A guest process: connects to every server in ``socks``, then serves commands until told to
    close or the orchestrator goes away. Replies are ("ok", value) or ("error", text).
    ``factories`` replaces ``DRIVERS`` (system -> driver class; picklable, as the process is
    spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C and ends us
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    keys = Keys(guest, keyspace, batch)
    drivers: dict[str, Driver] = {}
    cursors: dict[tuple[str, str], int] = {}
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            try:
                kind = cmd[0]
                if kind == "close":
                    conn.send(("ok", None))
                    return
                if kind == "connect":
                    for system, sock in socks.items():
                        drivers[system] = (factories or DRIVERS)[system](sock, keys, guest)
                    conn.send(("ok", None))
                elif kind == "fill":
                    drv = drivers[cmd[1]]
                    t0 = time.perf_counter()
                    bad = sum(keys.batch - drv.put_batch(b) for b in range(keys.batches))
                    conn.send(("ok", (time.perf_counter() - t0, bad)))
                elif kind == "rate":
                    _, system, op, start_at, seconds = cmd
                    fn = getattr(drivers[system], op)
                    units = batch if op.endswith("_batch") else 1
                    first = cursors.get((system, op), 0)
                    done, bad, elapsed, nxt = run_rate(fn, first, units, start_at, seconds)
                    cursors[(system, op)] = nxt
                    conn.send(("ok", (done, bad, elapsed)))
                elif kind == "latency":
                    _, system, op, start_at, stop_at = cmd
                    fn = getattr(drivers[system], op)
                    first = cursors.get((system, op), 0)
                    raw, bad, nxt = run_latency(fn, first, start_at, stop_at)
                    cursors[(system, op)] = nxt
                    conn.send(("ok", (raw, bad)))
                elif kind == "measure":
                    # latency, plus the window, CPU time and counts (bench.manyguests)
                    _, system, op, start_at, stop_at = cmd
                    fn = getattr(drivers[system], op)
                    units = batch if op.endswith("_batch") else 1
                    first = cursors.get((system, op), 0)
                    _sleep_until(start_at)
                    counts0 = _counts(drivers[system])
                    cpu0, begin = time.process_time(), time.monotonic()
                    raw, bad, nxt = run_latency(fn, first, start_at, stop_at)
                    elapsed = time.monotonic() - begin
                    cpu = time.process_time() - cpu0
                    counts = {k: v - counts0[k] for k, v in _counts(drivers[system]).items()}
                    cursors[(system, op)] = nxt
                    done = nxt - first
                    bad_pages = done * units - (done - bad)
                    conn.send(("ok", (raw, bad_pages, elapsed, cpu, counts)))
                else:
                    conn.send(("error", f"unknown command {kind!r}"))
            except Exception:
                conn.send(("error", f"guest {guest}: {traceback.format_exc()}"))
    finally:
        for drv in drivers.values():
            with contextlib.suppress(Exception):
                drv.close()
