"""The command line: ``python -m bench.hostile`` (bench/README.md explains what it measures).

Runs the baseline and every attack asked for, each a phase on a fresh daemon
(bench/hostile/phase.py), prints the table and writes the JSON (bench/hostile/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import bench.hostile
from bench import servers
from bench.hostile.attacks import ATTACKS, LABELS
from bench.hostile.phase import run_phase
from bench.hostile.report import judge, render, write_json
from bench.peers import say
from tmemclient.wire import ring as rings_mod
from tmemclient.wire.units import parse_size

DEFAULT_JSON = Path(__file__).resolve().parent.parent / "results" / "hostile.json"

_T0 = time.monotonic()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = bench.hostile.__doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description=doc.split("\n\n")[0] + " Attacks: " + ", ".join(ATTACKS) + ".",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s windows, 512 MiB budget (about 30 s)"
    )
    p.add_argument("--seconds", type=float, help="measurement window per phase (10; quick 2)")
    p.add_argument("--settle", type=float, help="attack time before the window (2; quick 0.5)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    p.add_argument(
        "--procs",
        type=int,
        default=1,
        help="attacker processes for ring, heavy, mirror, flood (1 each)",
    )
    p.add_argument(
        "--unread-conns",
        type=int,
        default=64,
        help="connections of the unread-replies attacker (64)",
    )
    p.add_argument(
        "--flood-conns",
        type=int,
        default=1,
        help="connections of each socket-flood attacker process (1)",
    )
    p.add_argument("--keyspace", type=int, default=1024, help="honest guest's pages (1024)")
    p.add_argument(
        "--guest-ring-frames",
        type=int,
        default=None,
        help="honest guest's rings (tmemclient's default: 16 on x86-64; 0: socket)",
    )
    p.add_argument(
        "--admin-interval",
        type=float,
        default=0.01,
        help="seconds between admin status calls (0.01)",
    )
    p.add_argument(
        "--admin-persistent",
        action="store_true",
        help="one admin connection for every call (default: a fresh one per call)",
    )
    p.add_argument("--memory", type=parse_size, help="tmemd budget (1GiB; quick 512MiB)")
    p.add_argument(
        "--loan-write",
        type=parse_size,
        default=256 << 20,
        help="span of its loan file the mirror attacker writes over and over (256MiB)",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=0.1,
        help="seconds between samples of tmemd's memory (0.1)",
    )
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=15.0,
        help="seconds the daemon gets to drop the attackers' sessions and fds (15)",
    )
    p.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fill the budget once (and free it) before the figure memory growth is measured "
        "from, so stored pages' metadata is not counted as the attack's (default: on)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 10.0
    if args.settle is None:
        args.settle = 0.5 if args.quick else 2.0
    if args.memory is None:
        args.memory = (512 << 20) if args.quick else (1 << 30)
    args.attack_list = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in args.attack_list if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s): {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    if args.seconds <= 0 or args.settle < 0 or args.procs < 1:
        p.error("need --seconds > 0, --settle >= 0 and --procs >= 1")
    if args.unread_conns < 1 or args.flood_conns < 1:
        p.error("need --unread-conns >= 1 and --flood-conns >= 1")
    if args.keyspace < 1 or args.admin_interval < 0:
        p.error("need --keyspace >= 1 and --admin-interval >= 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: everything gets stopped


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tmem-hostile-") as tmpdir:
        os.chmod(tmpdir, 0o755)  # guests of other uids reach the socket in it
        yield Path(tmpdir)


def main(argv: list[str] | None = None) -> int:
    """Run every phase, print the table, write the JSON."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if not rings_mod.supported():
        print(
            "!! this machine cannot use rings or mappings (not x86-64): the ring and "
            "mirror attacks will fail",
            file=sys.stderr,
        )
    ctx = multiprocessing.get_context("fork")
    phases = ["baseline", *args.attack_list]
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
            "tmemd": servers.server_version("tmemd-sock"),
            "cpus": len(os.sched_getaffinity(0)),
            "quick": args.quick,
            "seconds": args.seconds,
            "settle": args.settle,
            "memory": args.memory,
            "keyspace": args.keyspace,
            "procs": args.procs,
            "unread_conns": args.unread_conns,
            "flood_conns": args.flood_conns,
            "admin_interval": args.admin_interval,
            "admin_persistent": args.admin_persistent,
            "loan_write": args.loan_write,
            "warm": args.warm,
            "loadavg_at_start": os.getloadavg(),
            "argv": sys.argv,
        },
        "phases": {},
    }
    if (load := os.getloadavg()[0]) > 0.5:
        say(f"!! the machine is busy (load average {load:.2f}): other work skews the numbers")
    per_phase = args.seconds + args.settle + 3
    say(f"bench.hostile: phases {', '.join(phases)}; about {len(phases) * per_phase:.0f}s")
    try:
        with _workdir() as tmp:
            for n, phase in enumerate(phases, 1):
                say(f"[{n}/{len(phases)}] {LABELS[phase]}: starting a fresh tmemd")
                ph = run_phase(phase, tmp, args, ctx)
                if phase != "baseline":
                    ph["targets"] = judge(ph)
                result["phases"][phase] = ph
                h = ph.get("honest") or {}
                a = ph.get("admin") or {}
                say(
                    f"[{n}/{len(phases)}] {LABELS[phase]}: get p50/p99/max "
                    f"{h.get('p50_ms', float('nan')):.3f}/{h.get('p99_ms', float('nan')):.3f}/"
                    f"{h.get('max_ms', float('nan')):.1f} ms, status p99/max "
                    f"{a.get('p99_ms', float('nan')):.2f}/{a.get('max_ms', float('nan')):.1f} ms"
                    + (f"; {len(ph['problems'])} problem(s)" if ph["problems"] else "")
                )
    except KeyboardInterrupt:
        say("interrupted; every process and daemon was stopped")
        return 130
    except SystemExit as exc:
        say(f"stopped by a signal; every process and daemon was stopped (exit {exc.code})")
        raise
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    result["meta"]["elapsed_s"] = round(time.monotonic() - _T0, 1)
    table = render(result)
    print(table, flush=True)
    write_json(result, table, args.json)
    say(f"done in {result['meta']['elapsed_s']:.0f}s; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
