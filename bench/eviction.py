"""Cost of a put when every put evicts, against a put into an empty budget.

    python -m bench.eviction [--pages 200000] [--guests 8] [--repeats 5]

Two levels, median of the repeats:
- store: the pure Store (no socket), ns per put — what the weighted-LRU policy itself costs;
- daemon: pages/s of put_many(64) from one guest to a real tmemd whose budget is either far
  larger than the data (no eviction) or a tenth of it (every put evicts).
The policy scans the heads of the G guests' LRU lists per eviction (O(G)), never pages.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tmemclient
from bench.throughput import rate
from tmemclient.wire.layout import FRAME_SIZE
from tmemd.launch import Tmemd
from tmemd.store import Store

# Random bytes: a zero page would be packed (same-filled, docs/design.md §6.11), not stored in
# a slot of its own as the pages this bench is about.
PAGE = memoryview(random.Random(3).randbytes(FRAME_SIZE))


def store_put_ns(pages: int, guests: int, full: bool) -> float:
    """ns per put into a store that is empty, or full so that every put evicts."""
    budget = (pages // 4 if full else pages * 2) * FRAME_SIZE
    store = Store(budget)
    pools = [
        store.new_pool(store.add_guest(f"g{i}"), persistent=False, order=0) for i in range(guests)
    ]
    if full:  # fill the budget first, spread over all guests
        for i in range(budget // FRAME_SIZE):
            store.put(pools[i % guests], 1, i, PAGE)
    start = time.perf_counter()
    for i in range(pages):
        store.put(pools[i % guests], 2, i, PAGE)
    elapsed = time.perf_counter() - start
    evictions = store.evictions
    store.close()
    if full:
        assert evictions >= pages, "the full-budget run must evict on every put"
    return elapsed / pages * 1e9


def daemon_put_rate(budget: int, seconds: float) -> float:
    """put_many(64) pages/s from one guest."""
    with (
        tempfile.TemporaryDirectory(prefix="tmem-bench-") as tmp,
        Tmemd(Path(tmp), "--memory", str(budget)) as tmemd,
        tmemclient.connect(tmemd.socket, name="bench") as client,
    ):
        pool = client.new_pool()
        data = bytes(PAGE)  # random: not packed

        def put64(i: int) -> int:
            pool.put_many([(i, k, data) for k in range(64)])
            return 64

        rate(put64, 0.3)  # warm up: fills the small budget so every later put evicts
        return rate(put64, seconds)


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(prog="bench.eviction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=200_000)
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    rows = {}
    for label, full in (("empty", False), ("full", True)):
        runs = []
        for r in range(args.repeats):
            runs.append(store_put_ns(args.pages, args.guests, full))
            print(f"  store {label} repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        rows[f"store put ns ({label})"] = statistics.median(runs)
    for label, budget in (("empty", 1 << 30), ("full", 4 << 20)):
        runs = []
        for r in range(args.repeats):
            runs.append(daemon_put_rate(budget, args.seconds))
            print(f"  daemon {label} repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        rows[f"daemon put_many pages/s ({label})"] = statistics.median(runs)
    for name, value in rows.items():
        print(f"{name:<36} {value:>12,.0f}")
    s_ratio = rows["store put ns (empty)"] / rows["store put ns (full)"]
    d_ratio = rows["daemon put_many pages/s (full)"] / rows["daemon put_many pages/s (empty)"]
    print(f"{'store: full-budget put speed / empty':<36} {s_ratio:>12.2f}")
    print(f"{'daemon: full-budget put rate / empty':<36} {d_ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
