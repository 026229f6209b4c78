"""The two well-behaved parties whose service is measured: the honest guest (tmemclient, single
gets in a closed loop) and the admin prober (``status`` calls, paced). Each runs in a child
process (bench/hostile/children.py) and answers ("measure", ...) with the latencies it timed and
when each call started, as array bytes, so the orchestrator can cut them at any moment."""

from __future__ import annotations

import array
import contextlib
import random
import time
from collections import Counter
from multiprocessing.connection import Connection

import tmemclient
from bench.hostile.children import commands
from tmemclient.wire.errors import TmemError
from tmemclient.wire.layout import FRAME_SIZE
from tmemd.ctl.client import AdminClient

HONEST_FRAMES = 64


def honest_page(i: int) -> bytes:
    """Page ``i`` of the honest guest: incompressible and different for every index."""
    return random.Random(i).randbytes(FRAME_SIZE)


def honest_main(conn: Connection, sock: str, keyspace: int, ring_frames: int | None) -> None:
    """Connect, put every page of the key space into a persistent pool, then obey commands:
    ("measure", warm_ns, start_ns, stop_ns): single gets in a closed loop, the latencies of
    those started in [start_ns, stop_ns); ("check",): every page read back and compared;
    ("close",)."""
    pages = [honest_page(i) for i in range(keyspace)]
    client = tmemclient.connect(sock, name="honest", frames=HONEST_FRAMES, ring_frames=ring_frames)
    try:
        pool = client.new_pool(persistent=True)
        for start in range(0, keyspace, 64):
            items = [(1, i, pages[i]) for i in range(start, min(keyspace, start + 64))]
            if not all(pool.put_many(items)):
                raise RuntimeError("the honest guest's persistent put was refused")
        conn.send(("ready", {"rings": client.rings}))
        i = 0
        for cmd in commands(conn):
            if cmd[0] == "check":
                bad = 0
                try:
                    for start in range(0, keyspace, 64):
                        keys = [(1, k) for k in range(start, min(keyspace, start + 64))]
                        got = pool.get_many(keys)
                        bad += sum(g != pages[k] for (_, k), g in zip(keys, got, strict=True))
                    conn.send(("checked", {"bad": bad, "error": None}))
                except (TmemError, OSError) as exc:
                    conn.send(("checked", {"bad": bad, "error": f"{type(exc).__name__}: {exc}"}))
                continue
            _, warm_ns, start_ns, stop_ns = cmd
            lat = array.array("q")
            starts = array.array("q")
            bad = 0
            error = None
            clock = time.monotonic_ns
            while clock() < warm_ns:
                time.sleep(0.001)
            while True:
                t0 = clock()
                try:
                    data = pool.get(1, i)
                except (TmemError, OSError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    break
                t1 = clock()
                if data != pages[i]:
                    bad += 1
                if t0 >= start_ns:
                    lat.append(t1 - t0)
                    starts.append(t0)
                i = (i + 1) % keyspace
                if t1 >= stop_ns:
                    break
            conn.send(
                (
                    "measured",
                    {"lat": lat.tobytes(), "t": starts.tobytes(), "bad": bad, "error": error},
                )
            )
    finally:
        with contextlib.suppress(Exception):
            client.close()


def admin_main(conn: Connection, admin_sock: str, persistent: bool, interval: float) -> None:
    """The admin prober: ("measure", start_ns, stop_ns) times ``status`` calls every
    ``interval`` seconds (a fresh connection each, as tmemctl makes, unless ``persistent``)."""
    ctl: AdminClient | None = AdminClient(admin_sock) if persistent else None
    conn.send(("ready", None))
    try:
        for _, start_ns, stop_ns in commands(conn):
            lat = array.array("q")
            starts = array.array("q")
            errors: Counter[str] = Counter()
            clock = time.monotonic_ns
            next_ns = start_ns
            while True:
                now = clock()
                if now >= stop_ns:
                    break
                if now < next_ns:
                    time.sleep((next_ns - now) / 1e9)
                t0 = clock()
                try:
                    if persistent:
                        if ctl is None:
                            ctl = AdminClient(admin_sock)
                        ctl.call("status")
                    else:
                        with AdminClient(admin_sock) as fresh:
                            fresh.call("status")
                except (TmemError, OSError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    if ctl is not None:
                        ctl.close()
                        ctl = None
                t1 = clock()
                lat.append(t1 - t0)
                starts.append(t0)
                next_ns = max(next_ns + int(interval * 1e9), t1)
            conn.send(
                ("measured", {"lat": lat.tobytes(), "t": starts.tobytes(), "errors": dict(errors)})
            )
    finally:
        if ctl is not None:
            ctl.close()
