"""Throughput of tmemd from one Python guest: single and batched put/get of 4 KiB pages.

    python -m bench.throughput [--seconds 1.0] [--repeats 5] [--batch 64] [--memory 1GiB] [--json FILE]

Starts its own tmemd on a socket in a temporary directory, measures, prints one table (median
of the repeats, pages per second) and stops the daemon. The side-by-side
comparison with memcached and redis is ``./dev bench`` (bench/peers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tmemclient
from tmemclient.wire.units import parse_size
from tmemd.launch import Tmemd

PAGE = bytes(range(256)) * 16


def rate(op: Callable[[int], int], seconds: float) -> float:
    """Pages per second of ``op(i) -> pages done`` run for about ``seconds``."""
    done = 0
    i = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        done += op(i)
        i += 1
    return done / (time.perf_counter() - start)


def measure(sock: Path, seconds: float, repeats: int, batch: int) -> dict[str, float]:
    """Median pages/s of each row."""
    rows: dict[str, list[float]] = {}
    with tmemclient.connect(sock, name="bench") as client:
        pool = client.new_pool(persistent=True)
        keyspace = 50_000

        def put1(i: int) -> int:
            pool.put(1, i % keyspace, PAGE)
            return 1

        def get1(i: int) -> int:
            pool.get(1, i % keyspace)
            return 1

        def put_n(i: int) -> int:
            base = (i * batch) % keyspace
            pool.put_many([(2, base + k, PAGE) for k in range(batch)])
            return batch

        def get_n(i: int) -> int:
            base = (i * batch) % keyspace
            pool.get_many([(2, base + k) for k in range(batch)])
            return batch

        for r in range(repeats):
            for name, op in (
                ("put", put1),
                ("get", get1),
                (f"put x{batch}", put_n),
                (f"get x{batch}", get_n),
            ):
                rows.setdefault(name, []).append(rate(op, seconds))
            print(f"  repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in rows.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per row and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory", type=parse_size, default=1 << 30)
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="tmem-bench-") as tmp,
        Tmemd(Path(tmp), "--memory", str(args.memory)) as tmemd,
    ):
        sock = tmemd.socket
        print(f"{os.cpu_count()} cpus, median of {args.repeats}", file=sys.stderr)
        results = measure(sock, args.seconds, args.repeats, args.batch)
    print(f"{'row':<12} {'pages/s':>12}")
    for name, value in results.items():
        print(f"{name:<12} {value:>12,.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
