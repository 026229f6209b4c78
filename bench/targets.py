"""tmemd's own targets, measured against a fresh daemon each (no peers, no pinning).

- metadata: daemon bytes per stored 4 KiB page beyond the page itself, from VmRSS before and
  after storing N pages with put_many into a persistent pool (target <= 128 B);
- startup: exec to the socket accepting with a 16 GiB budget, and the RSS right then (the arena
  must not be touched; target < 1 s);
- eviction: put pages/s when every put evicts (budget full) over pages/s into an empty budget,
  fresh keys in an ephemeral pool in both, single puts and put_many(64) (target >= 0.80).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tmemclient
from bench import servers
from bench.drivers import PAGE, PAGE_SIZE
from tmemd.ctl.client import AdminClient

METADATA_TARGET = 128  # bytes per page, at most
STARTUP_TARGET = 1.0  # seconds, less than
EVICTION_TARGET = 0.80  # full-budget put rate over empty-budget put rate, at least

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def metadata_per_page(
    tmp: Path, pages: int, *, batch: int = 256, per_object: int = 1024, say: Progress = _stderr
) -> dict[str, Any]:
    """(RSS growth - page bytes) / pages after storing ``pages`` pages."""
    budget = (pages * PAGE_SIZE * 5) // 4 + (64 << 20)
    sock = tmp / "meta.sock"
    server = servers.start("tmemd", servers.tmemd_argv(sock, budget), sock, tmp / "meta.log")
    try:
        with tmemclient.connect(sock, name="bench-meta", frames=max(256, batch)) as client:
            pool = client.new_pool(persistent=True)
            pool.put(0, 0, PAGE)  # the first page pays for code paths and arrays; not counted
            pool.flush(0, 0)
            time.sleep(0.2)
            rss_before = servers.rss_bytes(server.pid)
            refused = 0
            t0 = time.perf_counter()
            next_report = t0 + 10
            for start in range(0, pages, batch):
                n = min(batch, pages - start)
                items = [
                    (1 + (k // per_object), k % per_object, PAGE) for k in range(start, start + n)
                ]
                refused += n - sum(pool.put_many(items))
                if time.perf_counter() > next_report:
                    say(f"  metadata: {start + n:,}/{pages:,} pages stored")
                    next_report += 10
            elapsed = time.perf_counter() - t0
            time.sleep(0.2)
            rss_after = servers.rss_bytes(server.pid)
            stored = pages - refused
    finally:
        servers.stop(server)
    growth = rss_after - rss_before
    per_page = (growth - stored * PAGE_SIZE) / stored if stored else float("nan")
    return {
        "pages": pages,
        "stored": stored,
        "refused": refused,
        "budget": budget,
        "pages_per_object": per_object,
        "batch": batch,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_growth": growth,
        "bytes_per_page": per_page,
        "store_seconds": elapsed,
        "target": f"<= {METADATA_TARGET} B",
        "met": per_page <= METADATA_TARGET,
    }


def startup(tmp: Path, repeats: int, memory: int = 16 << 30) -> dict[str, Any]:
    """Median seconds from exec to accepting, with a ``memory`` budget; RSS right then."""
    times: list[float] = []
    rss: list[int] = []
    for r in range(repeats):
        sock = tmp / f"start{r}.sock"
        server = servers.start("tmemd", servers.tmemd_argv(sock, memory), sock, tmp / "start.log")
        try:
            rss.append(servers.rss_bytes(server.pid))
            times.append(server.ready_s)
        finally:
            servers.stop(server)
    seconds = statistics.median(times)
    return {
        "budget": memory,
        "runs": times,
        "seconds": seconds,
        "rss_at_ready": rss,
        "rss_at_ready_median": statistics.median(rss),
        "target": f"< {STARTUP_TARGET} s",
        "met": seconds < STARTUP_TARGET,
    }


def _put_rates(
    tmp: Path, label: str, budget: int, prefill: int, seconds: float, repeats: int, batch: int
) -> dict[str, Any]:
    """pages/s of single puts and put_many(batch), fresh keys, ephemeral pool; evictions seen."""
    sock = tmp / f"evict-{label}.sock"
    admin = tmp / f"evict-{label}.admin"
    server = servers.start(
        "tmemd", servers.tmemd_argv(sock, budget, admin), sock, tmp / f"evict-{label}.log"
    )
    try:
        with (
            tmemclient.connect(sock, name="bench-evict", frames=max(256, batch)) as client,
            AdminClient(admin) as ctl,
        ):
            pool = client.new_pool()
            oid = 0

            def put1(i: int) -> int:
                return 1 if pool.put(oid, i, PAGE) else 0

            def put_n(i: int) -> int:
                base = i * batch
                return sum(pool.put_many([(oid, base + k, PAGE) for k in range(batch)]))

            for b in range(0, prefill, batch):  # fill (full case) and warm up
                oid = 1 + b // (1 << 20)
                pool.put_many([(oid, b % (1 << 20) + k, PAGE) for k in range(batch)])
            rows: dict[str, list[float]] = {"put": [], f"put x{batch}": []}
            evicted: dict[str, int] = {"put": 0, f"put x{batch}": 0}
            put_count: dict[str, int] = {"put": 0, f"put x{batch}": 0}
            for _ in range(repeats):
                for name, fn, units in (("put", put1, 1), (f"put x{batch}", put_n, batch)):
                    oid += 1  # fresh keys: never a replace
                    before = ctl.call("status")["evictions"]
                    done, good, elapsed = _rate(fn, units, seconds)
                    evicted[name] += ctl.call("status")["evictions"] - before
                    put_count[name] += good
                    rows[name].append(done / elapsed)
            status = ctl.call("status")
    finally:
        servers.stop(server)
    return {
        "budget": budget,
        "prefill_pages": prefill,
        "runs": rows,
        "pages_per_s": {k: statistics.median(v) for k, v in rows.items()},
        "pages_put": put_count,
        "evictions_while_measuring": evicted,
        "used_at_end": status["used"],
    }


def _rate(fn: Callable[[int], int], units: int, seconds: float) -> tuple[int, int, float]:
    good = 0
    i = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        good += fn(i)
        i += 1
        if time.perf_counter() >= deadline:
            break
    return i * units, good, time.perf_counter() - t0


def eviction(
    tmp: Path, seconds: float, repeats: int, batch: int = 64, full_budget: int = 64 << 20
) -> dict[str, Any]:
    """Put rates into an empty budget and into a full one (every put evicts)."""
    full_pages = full_budget // PAGE_SIZE
    # Empty: a budget no run can fill (the arena is MAP_NORESERVE, so a big one costs nothing).
    empty = _put_rates(tmp, "empty", 16 << 30, 4 * batch * 64, seconds, repeats, batch)
    full = _put_rates(tmp, "full", full_budget, 2 * full_pages, seconds, repeats, batch)
    ratios = {
        k: full["pages_per_s"][k] / empty["pages_per_s"][k] if empty["pages_per_s"][k] else 0.0
        for k in empty["pages_per_s"]
    }
    # The full case is valid only if every measured put evicted, the empty one if none did.
    valid = all(
        full["evictions_while_measuring"][k] >= full["pages_put"][k] for k in full["pages_put"]
    ) and not any(empty["evictions_while_measuring"].values())
    return {
        "empty": empty,
        "full": full,
        "ratio": ratios,
        "valid": valid,
        "target": f">= {EVICTION_TARGET:.2f}",
        "met": {k: v >= EVICTION_TARGET for k, v in ratios.items()},
    }
