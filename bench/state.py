"""What keeping state across restarts costs (tmemd --state-dir, tmemd/persist.py; issue #17).

    python -m bench.state [--pages 1024,16384,131072] [--ops 20000] [--repeats 5]

1. **Adoption time against pages held.** In this process: a store journaling into a state
   directory on /dev/shm gets N pages in a named persistent pool; then, as after a SIGKILL
   (nothing closed), a new start opens the directory and adopts it. The time from opening the
   files to a store ready to serve, per N, and per page; extrapolated to a 16 GiB budget
   (4 Mi pages).
2. **Put and get cost, with state against without.** A real tmemd (with and without
   ``--state-dir``) and a sync guest doing single-page puts (rewrites of 1000 handles, so every
   put of a persistent page takes the copy-on-write path) and gets on a named persistent pool;
   the median of ``--repeats`` runs, alternating which goes first. And the same at the store
   alone (no socket, no client): the journal's own cost, undiluted.

Prints markdown tables and the load average (the machine is shared: read ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PAGE = 4096


def adoption(pages: int) -> dict[str, Any]:
    """Fill a state directory with ``pages`` pages; time a new start adopting them."""
    from tmemd.config import GuestPolicy, Limits, Settings
    from tmemd.host import Host
    from tmemd.persist import Found, StateDir, adopt
    from tmemd.store import Store

    capacity = pages + 1024
    root = Path(tempfile.mkdtemp(prefix="tmem-bench-state-", dir="/dev/shm"))
    try:
        path = root / "state"
        settings = Settings(socket=Path("/x"), budget=capacity * PAGE, limits=Limits())

        def start() -> tuple[StateDir, Store, Host, Any]:
            state = StateDir(path, capacity)
            arena, found = state.open()
            store = Store(capacity * PAGE, capacity=capacity * PAGE, arena=arena)
            store.journal = state
            host = Host(store, settings)
            result = adopt(state, found, store, host) if isinstance(found, Found) else None
            return state, store, host, result

        filled, store, host, _ = start()

        class Member:
            uid = 1000
            guest = host.attach("1000/bench", GuestPolicy(), uid=1000)

            def detach_pool(self, pool: Any) -> None: ...

        pool, _ = host.open_named(Member(), "swap", persistent=True, order=0)
        region = memoryview(bytearray(random.randbytes(64 * PAGE)))
        for first in range(0, pages, 64):
            n = min(64, pages - first)
            store.put_many(pool, [1] * n, range(first, first + n), range(n), region)
        filled.close()  # as a SIGKILL would: the directory's lock goes with the descriptors
        began = time.perf_counter()
        _, _, _, result = start()
        seconds = time.perf_counter() - began
        assert result is not None and result.pages == pages, result
        return {
            "pages": pages,
            "seconds": seconds,
            "us_per_page": seconds / pages * 1e6,
            "adopt_only": result.seconds,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def store_cost(ops: int, with_state: bool) -> tuple[float, float]:
    """Seconds per put and per get at the store alone, a named persistent pool."""
    from tmemd.config import GuestPolicy, Limits, Settings
    from tmemd.host import Host
    from tmemd.persist import StateDir
    from tmemd.store import Store

    slots = 4096
    root = Path(tempfile.mkdtemp(prefix="tmem-bench-cost-", dir="/dev/shm"))
    try:
        arena = None
        state = None
        if with_state:
            state = StateDir(root / "state", slots)
            arena, _ = state.open()
        store = Store(slots * PAGE, capacity=slots * PAGE, arena=arena)
        store.journal = state
        host = Host(store, Settings(socket=Path("/x"), budget=slots * PAGE, limits=Limits()))

        class Member:
            uid = 1000
            guest = host.attach("1000/bench", GuestPolicy(), uid=1000)

            def detach_pool(self, pool: Any) -> None: ...

        pool, _ = host.open_named(Member(), "swap", persistent=True, order=0)
        src = memoryview(random.randbytes(PAGE))
        dst = memoryview(bytearray(PAGE))
        put, get = store.put, store.get
        began = time.perf_counter()
        for i in range(ops):
            put(pool, 1, i % 1000, src)
        mid = time.perf_counter()
        for i in range(ops):
            get(pool, 1, i % 1000, dst)
        end = time.perf_counter()
        return (mid - began) / ops, (end - mid) / ops
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cost(ops: int, with_state: bool) -> tuple[float, float, float, float]:
    """Seconds per put and per get through a real tmemd and a sync guest: wall time, then the
    daemon's own CPU time (which other load on the machine disturbs less)."""
    import tmemclient
    from tmemd.launch import Tmemd

    root = Path(tempfile.mkdtemp(prefix="tmem-bench-daemon-", dir="/dev/shm"))
    try:
        args = ["--memory", "64MiB"]
        if with_state:
            args += ["--state-dir", str(root / "state")]
        (root / "d").mkdir()
        with (
            Tmemd(root / "d", *args) as tmemd,
            tmemclient.connect(tmemd.socket, name="bench") as client,
        ):
            pool = client.new_pool(persistent=True, name="swap")
            data = random.randbytes(PAGE)
            for i in range(1000):
                pool.put(1, i, data)
            pid = tmemd.pid
            cpu0, began = cpu_seconds(pid), time.perf_counter()
            for i in range(ops):
                pool.put(1, i % 1000, data)
            cpu1, mid = cpu_seconds(pid), time.perf_counter()
            for i in range(ops):
                pool.get(1, i % 1000)
            cpu2, end = cpu_seconds(pid), time.perf_counter()
        return (mid - began) / ops, (end - mid) / ops, (cpu1 - cpu0) / ops, (cpu2 - cpu1) / ops
    finally:
        shutil.rmtree(root, ignore_errors=True)


def medians(runs: list[tuple[float, ...]]) -> tuple[float, ...]:
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    parser.add_argument("--pages", default="1024,16384,131072,262144")
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    print("\n| pages held | bytes | start with adoption, s | of which adopt, s | us/page |")
    print("|---|---|---|---|---|")
    per_page = []
    for n in (int(x) for x in args.pages.split(",")):
        r = adoption(n)
        per_page.append(r["us_per_page"])
        print(
            f"| {n} | {n * PAGE >> 20} MiB | {r['seconds']:.3f} | {r['adopt_only']:.3f} | "
            f"{r['us_per_page']:.2f} |"
        )
    full = 4 << 20  # 16 GiB of 4 KiB pages
    print(
        f"\n16 GiB (4 Mi pages) extrapolated at the largest run's rate: "
        f"{full * per_page[-1] / 1e6:.1f} s (goal: < 1 s)"
    )
    rows = []
    measures: list[tuple[str, Any]] = [("store alone", store_cost), ("tmemd", daemon_cost)]
    for kind, fn in measures:
        without: list[tuple[float, ...]] = []
        with_: list[tuple[float, ...]] = []
        for rep in range(args.repeats):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for state in order:
                (with_ if state else without).append(fn(args.ops, state))
        m0, m1 = medians(without), medians(with_)
        rows.append((f"{kind}, wall", m0[0], m1[0], m0[1], m1[1]))
        if len(m0) > 2:
            rows.append((f"{kind}, daemon CPU", m0[2], m1[2], m0[3], m1[3]))
    print(
        "\n| path | put without, us | put with state, us | ratio | get without, us | "
        "get with state, us | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, p0, p1, g0, g1 in rows:
        print(
            f"| {kind} | {p0 * 1e6:.2f} | {p1 * 1e6:.2f} | {p1 / p0:.2f}x | {g0 * 1e6:.2f} | "
            f"{g1 * 1e6:.2f} | {g1 / g0:.2f}x |"
        )
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
