"""The main job: a tmemd with several guest processes working against it.

    python -m bench.smoke [--guests 4] [--memory 32MiB] [--pages 6000]

Starts tmemd on a socket in a temporary directory, runs N guest processes at once — each puts
ephemeral pages (a page cache would: more than the budget holds, so some get evicted) and
persistent pages (as swap would), reads them back and verifies every byte — then prints what each
guest saw and what the daemon logged, and stops the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tmemclient
from tmemclient.wire.units import format_size, parse_size
from tmemd.launch import Tmemd


def page(guest: str, kind: str, oid: int, index: int) -> bytes:
    """Deterministic page content, different for every guest, pool, object and index."""
    stamp = f"{guest}:{kind}:{oid}:{index}|".encode()
    return (stamp * (4096 // len(stamp) + 1))[:4096]


def run_guest(socket_path: str, name: str, pages: int) -> dict[str, Any]:
    """One guest's work; returns its counts."""
    result: dict[str, Any] = {"guest": name}
    with tmemclient.connect(socket_path, name=name) as client:
        eph = client.new_pool()
        per = client.new_pool(persistent=True)
        batch = 256
        stored = 0
        for start in range(0, pages, batch):
            items = [
                (i // 64, i % 64, page(name, "e", i // 64, i % 64))
                for i in range(start, min(start + batch, pages))
            ]
            stored += sum(eph.put_many(items))
        result["eph_put_ok"] = stored
        swap_pages = pages // 4
        per_ok = sum(per.put_many([(7, i, page(name, "p", 7, i)) for i in range(swap_pages)]))
        result["per_put_ok"] = per_ok
        hits = bad = 0
        for start in range(0, pages, batch):
            keys = [(i // 64, i % 64) for i in range(start, min(start + batch, pages))]
            for (oid, index), data in zip(keys, eph.get_many(keys), strict=True):
                if data is not None:
                    hits += 1
                    bad += data != page(name, "e", oid, index)
        result["eph_hits"] = hits
        result["eph_misses"] = pages - hits
        per_data = per.get_many([(7, i) for i in range(swap_pages)])
        per_bad = sum(
            d != page(name, "p", 7, i)
            for i, d in enumerate(per_data)
            if i < per_ok or d is not None
        )
        result["per_verified"] = sum(d is not None for d in per_data) - per_bad
        result["corrupt"] = bad + per_bad
        # sub-page ops on a persistent page
        if per_ok:
            old = per.xchg(7, 0, 100, b"tmem")
            result["xchg_ok"] = (
                old == page(name, "p", 7, 0)[100:104] and per.read(7, 0, 100, 4) == b"tmem"
            )
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 1 if any guest saw a wrong byte or lost a persistent page."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.smoke", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--guests", type=int, default=4)
    parser.add_argument("--memory", type=parse_size, default=32 << 20)
    parser.add_argument("--pages", type=int, default=4096, help="ephemeral pages per guest")
    parser.add_argument("--guest", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest:  # we are one of the guest processes
        print(json.dumps(run_guest(args.socket, args.guest, args.pages)))
        return 0

    with tempfile.TemporaryDirectory(prefix="tmem-demo-") as tmp:
        log_path = Path(tmp) / "tmemd.log"  # written by the Tmemd below
        budget = args.memory
        print(f"starting tmemd: budget {format_size(budget)}, in {tmp}", flush=True)
        with Tmemd(Path(tmp), "--memory", str(budget)) as tmemd:
            sock = tmemd.socket
            total = args.guests * (args.pages + args.pages // 4) * 4096
            print(
                f"{args.guests} guests, each {args.pages} ephemeral + {args.pages // 4} persistent pages "
                f"({format_size(total)} offered in all to a {format_size(budget)} budget)",
                flush=True,
            )
            started = time.monotonic()
            guests = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.smoke",
                        "--guest",
                        f"vm{i}",
                        "--socket",
                        str(sock),
                        "--pages",
                        str(args.pages),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for i in range(args.guests)
            ]
            results: list[dict[str, Any]] = []
            for proc in guests:
                out, _ = proc.communicate(timeout=300)
                print(f"  guest finished ({len(results) + 1}/{len(guests)})", flush=True)
                if proc.returncode:
                    print(f"a guest failed with exit code {proc.returncode}", file=sys.stderr)
                    return 1
                results.append(json.loads(out))
            elapsed = time.monotonic() - started
        events = [
            json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
        ]

    cols = [
        "guest",
        "eph_put_ok",
        "eph_hits",
        "eph_misses",
        "per_put_ok",
        "per_verified",
        "corrupt",
        "xchg_ok",
    ]
    print()
    print("  ".join(f"{c:>12}" for c in cols))
    for r in results:
        print("  ".join(f"{r.get(c, '-')!s:>12}" for c in cols))
    print(f"\nall guests done in {elapsed:.2f}s")
    print("\ntmemd said, per guest at disconnect:")
    for e in events:
        if e.get("event") == "guest_disconnected":
            print(
                f"  {e['guest']}: puts {e['puts_ok']} ok / {e['puts_refused']} refused, gets {e['gets_hit']} hit / "
                f"{e['gets_miss']} miss, {e['evictions']} evicted, {e['pages_freed']} pages freed at exit"
            )
    lost = [r["guest"] for r in results if r["per_verified"] != r["per_put_ok"]]
    corrupt = [r["guest"] for r in results if r["corrupt"]]
    if lost or corrupt:
        print(f"\nFAILED: persistent pages lost by {lost}, wrong bytes seen by {corrupt}")
        return 1
    print("\nevery page read back was byte-exact; no persistent page was lost")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
