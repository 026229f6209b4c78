"""tmemd side by side with memcached and redis, from the same Python guest processes.

    python -m bench.peers [--quick] [--repeats 5] [--seconds 1.0] [--json FILE]

Starts every server on a Unix socket in a temporary directory, drives each from identical guest
processes (bench/drivers.py), prints one table and writes it as JSON (default
bench/results/latest.json), then measures tmemd's own targets (bench/targets.py). Every server it
started is stopped on the way out, also on Ctrl-C and errors. bench/README.md explains the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from bench import servers, targets
from bench.drivers import client_problem, guest_main, redis_parser
from tmemclient.wire.units import format_size, parse_size

# tmemd-sock: a guest without rings; tmemd-map: a guest reading through its mapping (§4.7)
SYSTEMS = ("tmemd", "tmemd-sock", "tmemd-map", "memcached", "redis")
PEERS = ("memcached", "redis")
MODES = ("pinned", "unpinned")
GUESTS = 4
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"

_T0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line on stderr, with the time since the start."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- rows


def row_names(batch: int) -> list[tuple[str, str, str]]:
    """(key, label, unit) of each row, in table order."""
    rows = [
        ("put", "put", "pages/s"),
        ("get", "get", "pages/s"),
        ("put_batch", f"put x{batch}", "pages/s"),
        ("get_batch", f"get x{batch}", "pages/s"),
    ]
    for guests in (1, GUESTS):
        for op in ("put", "get"):
            for q in ("p50", "p99"):
                rows.append((f"{op}_{q}_{guests}g", f"{op} {q}, {guests} guest(s)", "us"))
    return rows


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[int(rank) - 1])


# ---------------------------------------------------------------------- guest processes


class Guests:
    """GUESTS (or ``count``) guest processes, each connected to every server, driven over pipes;
    ``factories`` replaces the drivers of bench/drivers.py (see ``guest_main``)."""

    def __init__(
        self,
        socks: dict[str, str],
        cpus: list[int] | None,
        keyspace: int,
        batch: int,
        count: int = GUESTS,
        factories: dict[str, Any] | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for g in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=guest_main,
                args=(child, g, cpus, socks, keyspace, batch, factories),
                name=f"bench-guest-{g}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, which: list[int], cmd: tuple[Any, ...], timeout: float) -> list[Any]:
        """Send ``cmd`` to the guests in ``which`` at once; their answers, within ``timeout``."""
        for g in which:
            self.conns[g].send(cmd)
        deadline = time.monotonic() + timeout
        answers = []
        for g in which:
            if not self.conns[g].poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"guest {g} did not answer {cmd[0]!r} within {timeout:.0f}s")
            status, value = self.conns[g].recv()
            if status != "ok":
                raise RuntimeError(f"guest {g} failed on {cmd[:3]!r}:\n{value}")
            answers.append(value)
        return answers

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("close",))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


# ---------------------------------------------------------------------- one mode


def start_servers(
    systems: list[str], tmp: Path, cpus: frozenset[int] | None, args: argparse.Namespace
) -> Iterator[servers.Server]:
    """Start each system's server; yields them as they come up (the caller stops them)."""
    for system in systems:
        sock = tmp / f"{system}.sock"
        if system.startswith("tmemd"):
            argv = servers.tmemd_argv(sock, args.memory)
        elif system == "memcached":
            argv = servers.memcached_argv(sock, args.memcached_threads, args.memcached_mb)
        else:
            argv = servers.redis_argv(sock, tmp)
        yield servers.start(system, argv, sock, tmp / f"{system}.log", cpus=cpus)


def run_mode(
    mode: str, systems: list[str], tmp: Path, args: argparse.Namespace, step: list[int]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every row for every system in one mode; {row: {system: {"median", "runs", ...}}}."""
    cpus = [args.pin_cpu] if mode == "pinned" else None
    pin = frozenset(cpus) if cpus else None
    batch = args.batch
    per_repeat: dict[str, dict[str, list[float]]] = {}
    bad: dict[str, int] = dict.fromkeys(systems, 0)
    counts: dict[str, dict[str, list[int]]] = {}
    started: list[servers.Server] = []
    guests: Guests | None = None
    try:
        for server in start_servers(systems, tmp, pin, args):
            started.append(server)
        socks = {s.system: str(s.sock) for s in started}
        say(f"{mode}: servers up ({', '.join(f'{s.system} pid {s.pid}' for s in started)})")
        guests = Guests(socks, cpus, args.keyspace, batch)
        everyone = list(range(GUESTS))
        guests.ask(everyone, ("connect",), 60)
        for system in systems:
            fills = guests.ask(everyone, ("fill", system), 600)
            bad[system] += sum(b for _, b in fills)
            warm_at = time.monotonic() + 0.05
            for op in ("put", "get", "put_batch", "get_batch"):
                guests.ask([0], ("rate", system, op, warm_at, args.warmup), 60 + args.warmup)
                warm_at = time.monotonic() + 0.05
            for op in ("put", "get"):
                t = time.monotonic() + 0.1
                guests.ask(everyone, ("latency", system, op, t, t + args.warmup), 60 + args.warmup)
            say(
                f"{mode}: {system} filled {args.keyspace:,} pages x {GUESTS} guests in "
                f"{max(f for f, _ in fills):.1f}s and warmed up"
            )
        for r in range(args.repeats):
            # Rotate the order each repeat so no system always runs first (or right after another).
            order = systems[r % len(systems) :] + systems[: r % len(systems)]
            for system in order:
                for op in ("put", "get", "put_batch", "get_batch"):
                    t = time.monotonic() + 0.05
                    ((done, b, elapsed),) = guests.ask(
                        [0], ("rate", system, op, t, args.seconds), 60 + args.seconds
                    )
                    bad[system] += b
                    per_repeat.setdefault(op, {}).setdefault(system, []).append(done / elapsed)
                for n in (1, GUESTS):
                    for op in ("put", "get"):
                        t = time.monotonic() + 0.1
                        answers = guests.ask(
                            list(range(n)),
                            ("latency", system, op, t, t + args.lat_seconds),
                            60 + args.lat_seconds,
                        )
                        lat: list[int] = []
                        for raw, b in answers:
                            lat.extend(array("q", raw))
                            bad[system] += b
                        lat.sort()
                        for q in (50, 99):
                            key = f"{op}_p{q}_{n}g"
                            us = percentile(lat, q) / 1000
                            per_repeat.setdefault(key, {}).setdefault(system, []).append(us)
                        counts.setdefault(f"{op}_{n}g", {}).setdefault(system, []).append(len(lat))
                step[0] += 1
                put_rate = per_repeat["put"][system][-1]
                say(
                    f"{mode}: repeat {r + 1}/{args.repeats} {system} done "
                    f"(put {put_rate:,.0f} pages/s) [step {step[0]}/{step[1]}]"
                )
    finally:
        if guests is not None:
            guests.close()
        for server in reversed(started):
            servers.stop(server)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, by_system in per_repeat.items():
        out[key] = {
            system: {"median": statistics.median(runs), "runs": runs}
            for system, runs in by_system.items()
        }
    for key, ops_by_system in counts.items():
        for system, ops in ops_by_system.items():
            # Single ops timed per repeat, all guests together: the throughput behind the latency.
            out[f"{key.split('_')[0]}_p50_{key.split('_')[1]}"][system]["ops_measured"] = ops
    for system in systems:
        for row in out.values():
            if system in row:
                row[system]["bad_pages_in_mode"] = bad[system]
    if any(bad.values()):
        say(f"WARNING {mode}: refused puts or wrong/missing gets: {bad}")
    return out


# ---------------------------------------------------------------------- output


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "skipped"
    if unit == "pages/s":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def render(result: dict[str, Any], batch: int) -> str:
    """The table as text."""
    peers = [p for p in PEERS if p in result["peers"]]
    meta = result["meta"]
    lines = [
        f"tmem bench: 4 KiB pages, median of {meta['repeats']} repeat(s), "
        f"{meta['seconds']} s per throughput row, {meta['lat_seconds']} s per latency row, "
        f"key space {meta['keyspace']:,} pages per guest, {meta['cpus']} cpus",
        f"load average at start {meta['loadavg_at_start'][0]:.2f}, at end "
        f"{meta['loadavg_at_end'][0]:.2f} (other work on the machine skews the numbers)",
    ]
    for system in SYSTEMS:
        lines.append(f"  {system:<10} {result['versions'].get(system, '(not measured)')}")
    for peer, why in result["skipped"].items():
        lines.append(f"  !! {peer} SKIPPED: {why}")
        lines.append(f"     install: {servers.INSTALL_HINTS[peer]}")
    head = f"{'mode':<9} {'row':<24} {'unit':<8}" + "".join(f"{s:>12}" for s in SYSTEMS)
    head += "".join(f"{'tmemd/' + p:>17}" for p in peers)
    mapped = "memcached" in peers and any(
        "tmemd-map" in c for r in result["rows"].values() for c in r.values()
    )
    if mapped:
        head += f"{'map/memcached':>15}"
    lines += ["", head, "-" * len(head)]
    for mode in result["modes"]:
        rows = result["rows"][mode]
        for key, label, unit in row_names(batch):
            cells = rows.get(key, {})
            line = f"{mode:<9} {label:<24} {unit:<8}"
            for system in SYSTEMS:
                cell = cells.get(system)
                line += f"{fmt(cell['median'] if cell else None, unit):>12}"
            for peer in peers:
                ours, theirs = cells.get("tmemd"), cells.get(peer)
                if ours and theirs and theirs["median"]:
                    line += f"{ours['median'] / theirs['median']:>17.2f}"
                else:
                    line += f"{'-':>17}"
            if mapped:
                ours, theirs = cells.get("tmemd-map"), cells.get("memcached")
                ok = ours and theirs and theirs["median"]
                line += f"{ours['median'] / theirs['median']:>15.2f}" if ok else f"{'-':>15}"
            lines.append(line)
    lines += [
        "ratios are tmemd/peer: above 1 is better for tmemd in pages/s rows, worse in latency rows",
        "map/memcached: tmemd-map against memcached; its gets are mapped reads (no request)",
        "pinned: each server and its guest processes share cpu "
        f"{meta['pin_cpu']}; unpinned: the scheduler places them on any of {meta['cpus']} cpus",
    ]
    extras = result.get("targets")
    if extras:
        lines += ["", "tmemd targets (fresh daemon each, unpinned)"]
        lines += [render_target(name, extra) for name, extra in extras.items()]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


def render_target(name: str, t: dict[str, Any]) -> str:
    if name == "metadata":
        return (
            f"  metadata per stored page: {t['bytes_per_page']:,.0f} B "
            f"(target {t['target']}): {verdict(t['met'])}  "
            f"[{t['stored']:,} pages, RSS {format_size(t['rss_before'])} -> "
            f"{format_size(t['rss_after'])}]"
        )
    if name == "startup":
        return (
            f"  startup with a {format_size(t['budget'])} budget: {t['seconds']:.3f} s "
            f"(target {t['target']}): {verdict(t['met'])}  "
            f"[RSS when accepting {format_size(int(t['rss_at_ready_median']))}]"
        )
    parts = []
    for row, ratio in t["ratio"].items():
        parts.append(
            f"  put at a full budget / empty, {row}: {ratio:.2f} "
            f"({t['full']['pages_per_s'][row]:,.0f} / {t['empty']['pages_per_s'][row]:,.0f} "
            f"pages/s) (target {t['target']}): {verdict(t['met'][row])}"
        )
    if not t["valid"]:
        parts.append("  !! eviction run INVALID: not every full-budget put evicted (see JSON)")
    return "\n".join(parts)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short durations")
    p.add_argument("--repeats", type=int, help="repeats per row; the median is shown (5)")
    p.add_argument("--seconds", type=float, help="per throughput row and repeat (1.0)")
    p.add_argument("--lat-seconds", type=float, help="per latency row and repeat (1.0)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per op after the fill (0.5)")
    p.add_argument("--keyspace", type=int, help="pages per guest, filled before measuring (16384)")
    p.add_argument("--batch", type=int, default=64, help="pages per batched call (64)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated subset of tmemd,memcached,redis",
    )
    p.add_argument("--modes", default=",".join(MODES), help="pinned,unpinned or one of them")
    p.add_argument("--pin-cpu", type=int, help="cpu for pinned runs (first allowed one)")
    p.add_argument("--memory", type=parse_size, default=1 << 30, help="tmemd budget (1GiB)")
    p.add_argument("--memcached-threads", type=int, default=1, help="memcached -t (1)")
    p.add_argument("--memcached-mb", type=int, default=2048, help="memcached -m (2048)")
    p.add_argument(
        "--targets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure tmemd's metadata, startup and eviction targets",
    )
    p.add_argument("--metadata-pages", type=int, help="pages stored for the metadata target")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeats": 1 if quick else 5,
        "seconds": 0.25 if quick else 1.0,
        "lat_seconds": 0.25 if quick else 1.0,
        "warmup": 0.1 if quick else 0.5,
        "keyspace": 2048 if quick else 16384,
        "metadata_pages": 50_000 if quick else 524_288,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pin_cpu is None:
        args.pin_cpu = min(os.sched_getaffinity(0))
    if args.repeats < 1 or args.seconds <= 0 or args.lat_seconds <= 0 or args.keyspace < args.batch:
        p.error("need --repeats >= 1, positive durations and --keyspace >= --batch")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: servers get stopped


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the table, write the JSON."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [s for s in wanted if s not in SYSTEMS] + [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown system or mode: {', '.join(unknown)}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    for peer in PEERS:
        if peer not in wanted:
            continue
        binary = {"memcached": "memcached", "redis": "redis-server"}[peer]
        if servers.server_binary(peer) is None:
            skipped[peer] = f"{binary} is not installed (not on PATH)"
        elif problem := client_problem(peer):
            skipped[peer] = problem
    for peer, why in skipped.items():
        print(
            f"!! SKIPPING {peer}: {why}\n!!   install it with: {servers.INSTALL_HINTS[peer]}",
            file=sys.stderr,
            flush=True,
        )
    systems = [s for s in SYSTEMS if s in wanted and s not in skipped]
    if "redis" in systems and (parser := redis_parser()) != "hiredis":
        print(f"!! redis-py uses the {parser} parser: install hiredis", file=sys.stderr)
    versions = {s: servers.server_version(s) for s in systems}
    if "memcached" in systems:
        versions["memcached"] += f" (-t {args.memcached_threads} -m {args.memcached_mb})"
    if "redis" in systems:
        versions["redis"] += f" (redis-py, {redis_parser()} parser)"
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": len(os.sched_getaffinity(0)),
            "pin_cpu": args.pin_cpu,
            "repeats": args.repeats,
            "seconds": args.seconds,
            "lat_seconds": args.lat_seconds,
            "warmup": args.warmup,
            "keyspace": args.keyspace,
            "batch": args.batch,
            "guests": GUESTS,
            "quick": args.quick,
            "tmemd_budget": args.memory,
            "loadavg_at_start": os.getloadavg(),
        },
        "systems": systems,
        "peers": [p for p in PEERS if p in systems],
        "skipped": skipped,
        "versions": versions,
        "modes": modes,
        "rows": {},
    }
    if (load := os.getloadavg()[0]) > 0.5:
        print(
            f"!! the machine is busy (load average {load:.2f}): other work skews the numbers",
            file=sys.stderr,
        )
    say(
        f"bench.peers: {', '.join(systems)}; modes {', '.join(modes)}; {args.repeats} repeat(s); "
        f"about {estimate(args, systems, modes):.0f}s"
    )
    step = [0, len(modes) * args.repeats * len(systems)]
    try:
        with tempfile.TemporaryDirectory(prefix="tmem-peers-") as tmpdir:
            tmp = Path(tmpdir)
            for mode in modes:
                result["rows"][mode] = run_mode(mode, systems, tmp, args, step)
            if args.targets and "tmemd" in systems:
                result["targets"] = run_targets(tmp, args)
    except KeyboardInterrupt:
        say("interrupted; every server was stopped")
        return 130
    except SystemExit as exc:  # SIGTERM (see _terminate)
        say(f"stopped by a signal; every server was stopped (exit {exc.code})")
        raise
    result["meta"]["elapsed_s"] = round(time.monotonic() - _T0, 1)
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    table = render(result, args.batch)
    print(table, flush=True)
    for peer in skipped:
        print(f"!! {peer} was SKIPPED: {skipped[peer]}", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result["table"] = table.splitlines()
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"done in {result['meta']['elapsed_s']:.0f}s; JSON in {args.json}")
    return 0


def run_targets(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """tmemd's three targets."""
    out: dict[str, Any] = {}
    say(f"targets: metadata, storing {args.metadata_pages:,} pages")
    out["metadata"] = targets.metadata_per_page(tmp, args.metadata_pages, say=say)
    say("targets: startup with a 16 GiB budget")
    out["startup"] = targets.startup(tmp, args.repeats)
    say("targets: put rate at a full budget vs an empty one")
    out["eviction"] = targets.eviction(tmp, args.seconds, args.repeats, args.batch)
    return out


def estimate(args: argparse.Namespace, systems: list[str], modes: list[str]) -> float:
    """Rough seconds for the whole run (for the progress line)."""
    seconds: float = args.seconds
    per_repeat = 4 * (seconds + 0.05) + 4 * (args.lat_seconds + 0.1)
    setup = 6 * args.warmup + 3 + args.keyspace * GUESTS / 20000
    total = len(modes) * len(systems) * (args.repeats * per_repeat + setup)
    if args.targets:
        total += args.metadata_pages / 50000 + 2 * args.repeats * (2 * seconds + 0.3) + 5
    return float(total)


if __name__ == "__main__":
    sys.exit(main())
