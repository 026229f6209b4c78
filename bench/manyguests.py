"""Many guests at once: tmemd next to memcached (``-t 2``) at N = 1, 2, 4, 8, 16, 32 guest
processes (issue #16).

    python -m bench.manyguests [--quick] [--guests 1,2,4,8,16,32] [--repeats 3] [--seconds 2]

Starts two tmemd daemons (one for the plain client, one for guests reading through their mapping)
and memcached with two worker threads, each on a Unix socket in a temporary directory. For each N
it spawns N guest processes (bench/drivers.py ``guest_main``, one connection each to every
server), fills their key spaces, and measures every operation with all N guests in the same
window (absolute start and stop times on CLOCK_MONOTONIC): aggregate rate, p50/p99 per call, and
CPU per operation of the server (``/proc/PID/stat``) and of the guests (their own process time).
Then one process doing single gets round robin over 4 connections, against the same process on
one. Prints one table per operation and the issue's targets; writes everything as JSON (default
bench/results/manyguests.json). Every process it started is stopped on the way out, also on
Ctrl-C, SIGTERM and errors. bench/README.md explains the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import tmemclient.client
from bench import servers
from bench.drivers import (
    PAGE,
    Driver,
    Keys,
    MemcachedDriver,
    TmemDriver,
    TmemMapDriver,
    client_problem,
)
from bench.peers import Guests, percentile, say
from tmemclient.wire.units import format_size, parse_size

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "manyguests.json"
GUEST_COUNTS = (1, 2, 4, 8, 16, 32)
QUICK_GUEST_COUNTS = (1, 4, 16)
SIDES = ("tmem", "memcached")
MEMCACHED_THREADS = 2
RR_CONNECTIONS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The client's doorbell frame and socket are private: the counts below are a diagnostic, left
# out (None in the table) if the client no longer has them.
_DOORBELL: bytes | None = getattr(tmemclient.client, "_DOORBELL", None)


# ---------------------------------------------------------------------- guest-side drivers
# Spawned guest processes get these classes by reference (pickle), as ``guest_main``'s factories.


class _CountingSocket:
    """A client's socket that counts what is sent on it: requests (the socket path) and
    doorbells (a ring request whose reader slept). Everything else goes to the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.requests = 0
        self.doorbells = 0

    def sendall(self, data: Any) -> None:
        if data == _DOORBELL:
            self.doorbells += 1
        else:
            self.requests += 1
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class TmemGuest(TmemDriver):
    """TmemDriver (persistent pool) plus an ephemeral pool for put+get pairs, and counts of the
    requests that took the socket rather than the ring (``counters``)."""

    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        super().__init__(sock, keys, guest)
        self.ephemeral = self.client.new_pool()
        self.counting: _CountingSocket | None = None
        if _DOORBELL is not None and isinstance(getattr(self.client, "_sock", None), socket.socket):
            self.counting = _CountingSocket(self.client._sock)
            self.client._sock = self.counting  # type: ignore[assignment]

    def counters(self) -> dict[str, int]:
        if self.counting is None:
            return {}
        return {"sock": self.counting.requests, "doorbells": self.counting.doorbells}

    def pair(self, i: int) -> int:
        """Put a page into the ephemeral pool, then get it back (an exclusive get: it leaves)."""
        k = i % self.size
        if not self.ephemeral.put(1, k, PAGE):
            return 0
        return 1 if self.ephemeral.get(1, k) == PAGE else 0


class MemcachedGuest(MemcachedDriver):
    """MemcachedDriver plus set-then-get pairs, on keys of their own."""

    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        super().__init__(sock, keys, guest)
        self.pair_names = [b"e" + name for name in keys.names]

    def pair(self, i: int) -> int:
        name = self.pair_names[i % self.size]
        if not self.client.set(name, PAGE, noreply=False):
            return 0
        return 1 if self.client.get(name) == PAGE else 0


class _RoundRobin:
    """RR_CONNECTIONS connections of one process to one server: ``get`` uses the first alone,
    ``get_rr`` takes them in turn; a fill fills every connection's keys."""

    drivers: list[Driver]

    def get(self, i: int) -> int:
        return self.drivers[0].get(i)

    def get_rr(self, i: int) -> int:
        return self.drivers[i % RR_CONNECTIONS].get(i)

    def put(self, i: int) -> int:
        return self.drivers[0].put(i)

    def put_batch(self, b: int) -> int:
        return min(d.put_batch(b) for d in self.drivers)

    def get_batch(self, b: int) -> int:
        return self.drivers[0].get_batch(b)

    def close(self) -> None:
        for d in self.drivers:
            d.close()


class TmemRoundRobin(_RoundRobin):
    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        self.tmem = [TmemGuest(sock, keys, 1000 * k + guest) for k in range(RR_CONNECTIONS)]
        self.drivers = list(self.tmem)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.tmem:
            for key, value in d.counters().items():
                out[key] = out.get(key, 0) + value
        return out


class MemcachedRoundRobin(_RoundRobin):
    def __init__(self, sock: str, keys: Keys, guest: int) -> None:
        self.drivers = [MemcachedDriver(sock, keys, guest) for _ in range(RR_CONNECTIONS)]


FACTORIES: dict[str, Any] = {
    "tmemd": TmemGuest,
    "tmemd-map": TmemMapDriver,
    "memcached": MemcachedGuest,
}
RR_FACTORIES: dict[str, Any] = {"tmemd": TmemRoundRobin, "memcached": MemcachedRoundRobin}


# ---------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    unit: str  # what a counted op is
    tmem: tuple[str, str]  # (system, driver method)
    memcached: tuple[str, str]

    @property
    def batch(self) -> bool:
        return self.key.endswith("_batch")

    def side(self, side: str) -> tuple[str, str]:
        return self.tmem if side == "tmem" else self.memcached


def rows(batch: int) -> list[Row]:
    """Every operation, in table order."""
    return [
        Row(
            "get",
            "single get, persistent pool (memcached: get)",
            "ops",
            ("tmemd", "get"),
            ("memcached", "get"),
        ),
        Row(
            "put",
            "single put, persistent pool (memcached: set)",
            "ops",
            ("tmemd", "put"),
            ("memcached", "put"),
        ),
        Row(
            "pair",
            "put+get pair, ephemeral pool (memcached: set then get); 1 op = 1 pair",
            "pairs",
            ("tmemd", "pair"),
            ("memcached", "pair"),
        ),
        Row(
            "map",
            "mapped get, tmemd get of a mapped client, no request (memcached: its plain get)",
            "ops",
            ("tmemd-map", "get"),
            ("memcached", "get"),
        ),
        Row(
            "put_batch",
            f"put_many of {batch} pages (memcached: set_many); per page",
            "pages",
            ("tmemd", "put_batch"),
            ("memcached", "put_batch"),
        ),
        Row(
            "get_batch",
            f"get_many of {batch} pages (memcached: get_many); per page",
            "pages",
            ("tmemd", "get_batch"),
            ("memcached", "get_batch"),
        ),
    ]


OP_KEYS = ("get", "put", "pair", "map", "put_batch", "get_batch", "rr")


# ---------------------------------------------------------------------- measuring


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (every thread), seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def _sample_server(pid: int, start_at: float, stop_at: float, out: dict[str, float]) -> None:
    """Read the server's CPU time at ``start_at`` and at ``stop_at``."""
    for when, tag in ((start_at, "0"), (stop_at, "1")):
        time.sleep(max(0.0, when - time.monotonic()))
        try:
            out["cpu" + tag] = proc_cpu(pid)
        except OSError:
            return


def measure(
    guests: Guests, n: int, system: str, method: str, units: int, server_pid: int, seconds: float
) -> dict[str, Any]:
    """All ``n`` guests call ``method`` of their ``system`` driver in a closed loop, each call
    timed, in the same window; the aggregate figures."""
    lead = 0.1 + 0.01 * n  # time for every guest to get the command before the window opens
    start_at = time.monotonic() + lead
    stop_at = start_at + seconds
    server: dict[str, float] = {}
    sampler = threading.Thread(
        target=_sample_server, args=(server_pid, start_at, stop_at, server), daemon=True
    )
    sampler.start()
    answers = guests.ask(
        list(range(n)), ("measure", system, method, start_at, stop_at), 60 + lead + seconds
    )
    sampler.join(timeout=10)
    lat = array("q")
    per_guest: list[float] = []
    bad = 0
    guest_cpu = 0.0
    counts: dict[str, int] = {}
    for raw, bad_pages, elapsed, cpu, got in answers:
        mine = array("q", raw)
        lat.extend(mine)
        per_guest.append(len(mine) * units / elapsed if elapsed > 0 else 0.0)
        bad += bad_pages
        guest_cpu += cpu
        for key, value in got.items():
            counts[key] = counts.get(key, 0) + value
    ordered = sorted(lat)
    calls = max(1, len(ordered))
    done = calls * units
    have_server = "cpu1" in server
    return {
        "ops_s": sum(per_guest),
        "p50_us": percentile(ordered, 50) / 1000,
        "p99_us": percentile(ordered, 99) / 1000,
        "server_cpu_us": (server["cpu1"] - server["cpu0"]) * 1e6 / done if have_server else None,
        "guest_cpu_us": guest_cpu * 1e6 / done,
        # per call: the guests' sleeps (voluntary context switches) and, for tmem, requests
        # sent on the socket and doorbells rung (TmemGuest.counters)
        **{f"{key}_per_call": value / calls for key, value in counts.items()},
        "calls": len(ordered),
        "bad": bad,
        "guest_min_ops_s": min(per_guest),
        "guest_max_ops_s": max(per_guest),
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the repeats (None where a repeat has none)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["bad"] = sum(r["bad"] for r in runs)
    return out


# ---------------------------------------------------------------------- progress


class Progress:
    """Step counter with a time-left estimate: the planned cost of what is left, scaled by how
    the actual time compared with the plan so far."""

    def __init__(self, planned: list[float]) -> None:
        self.planned = planned
        self.done = 0
        self.t0 = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        spent = time.monotonic() - self.t0
        planned_done = sum(self.planned[: self.done]) or 1.0
        left = sum(self.planned[self.done :]) * spent / planned_done
        say(f"{what} [step {self.done}/{len(self.planned)}, ~{left:.0f}s left]")


def window_cost(args: argparse.Namespace, n: int, seconds: float) -> float:
    return seconds + 0.25 + 0.01 * n


def setup_cost(args: argparse.Namespace, n: int) -> float:
    return float(1.5 + 0.35 * n + n * args.keyspace * 3 / 100_000)


# ---------------------------------------------------------------------- servers


def ensure_memcached(install: bool) -> str | None:
    """Why memcached cannot be measured, or None; installs it with apt-get when missing and
    allowed (root, apt-get present, ``install``)."""
    root_apt = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if servers.server_binary("memcached") is None and install and root_apt:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (
            ["apt-get", "install", "-y", "-q", "memcached"],
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "memcached"],
        ):
            if argv[1] == "update" and servers.server_binary("memcached"):
                break
            say(f"memcached is not installed: {' '.join(argv)}")
            try:
                subprocess.run(
                    argv,
                    env=env,
                    stdout=sys.stderr,
                    stderr=sys.stderr,
                    timeout=900,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"{argv[0]} failed: {exc}")
    if servers.server_binary("memcached") is None:
        return "memcached is not installed (not on PATH) and could not be installed here"
    return client_problem("memcached")


def start_servers(
    tmp: Path, args: argparse.Namespace, with_memcached: bool
) -> dict[str, servers.Server]:
    """tmemd, tmemd-map (a second daemon, for mapped reads) and memcached -t 2; stopped by the
    caller (``stop_all``) even if one of them fails to start."""
    started: dict[str, servers.Server] = {}
    try:
        for system in ("tmemd", "tmemd-map", "memcached"):
            sock = tmp / f"{system}.sock"
            if system == "memcached":
                if not with_memcached:
                    continue
                argv = servers.memcached_argv(sock, MEMCACHED_THREADS, args.memcached_mb)
            else:
                argv = servers.tmemd_argv(sock, args.memory) + args.tmemd_arg
            started[system] = servers.start(system, argv, sock, tmp / f"{system}.log")
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(started: dict[str, servers.Server]) -> None:
    for server in reversed(list(started.values())):
        servers.stop(server)


# ---------------------------------------------------------------------- the run


def side_order(r: int, sides: list[str]) -> list[str]:
    """The systems' order in repeat ``r``: alternated, so none always goes first."""
    return sides if r % 2 == 0 else sides[::-1]


def run_n(
    n: int,
    running: dict[str, servers.Server],
    sides: list[str],
    ops: list[Row],
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every row at ``n`` guests; {row: {side: [one result per repeat]}}."""
    socks = {system: str(server.sock) for system, server in running.items()}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    guests = Guests(socks, None, args.keyspace, args.batch, count=n, factories=FACTORIES)
    try:
        everyone = list(range(n))
        guests.ask(everyone, ("connect",), 60 + 2 * n)
        for system in socks:
            fills = guests.ask(everyone, ("fill", system), 600)
            if bad := sum(b for _, b in fills):
                say(f"!! {n} guests: {bad} pages refused while filling {system}")
        for row in ops:  # warm-up: every row once, all guests, results dropped
            for side in sides:
                system, method = row.side(side)
                units = args.batch if row.batch else 1
                measure(guests, n, system, method, units, running[system].pid, args.warmup)
        progress.step(f"{n} guest(s): connected, {args.keyspace:,} pages each filled, warmed up")
        for r in range(args.repeats):
            for row in ops:
                for side in side_order(r, sides):
                    system, method = row.side(side)
                    units = args.batch if row.batch else 1
                    got = measure(
                        guests, n, system, method, units, running[system].pid, args.seconds
                    )
                    out.setdefault(row.key, {}).setdefault(side, []).append(got)
                    if got["bad"]:
                        say(f"!! {n} guests, {row.key}, {side}: {got['bad']} pages bad or missing")
                    progress.step(
                        f"{n} guest(s), repeat {r + 1}/{args.repeats}, {row.key} {side}: "
                        f"{got['ops_s']:,.0f} {row.unit}/s, p99 {got['p99_us']:,.0f} us"
                    )
    finally:
        guests.close()
    return out


def run_rr(
    running: dict[str, servers.Server],
    sides: list[str],
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """One guest process, single gets on 1 connection and round robin on RR_CONNECTIONS."""
    socks = {side_system(side): str(running[side_system(side)].sock) for side in sides}
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    guests = Guests(socks, None, args.keyspace, args.batch, count=1, factories=RR_FACTORIES)
    try:
        guests.ask([0], ("connect",), 60)
        for system in socks:
            guests.ask([0], ("fill", system), 600)
            for method in ("get", "get_rr"):
                measure(guests, 1, system, method, 1, running[system].pid, args.warmup)
        progress.step(f"round robin: 1 guest, {RR_CONNECTIONS} connections, filled, warmed up")
        for r in range(args.repeats):
            for side in side_order(r, sides):
                system = side_system(side)
                for method in ("get", "get_rr"):
                    got = measure(guests, 1, system, method, 1, running[system].pid, args.seconds)
                    out.setdefault(side, {}).setdefault(method, []).append(got)
                progress.step(f"round robin, repeat {r + 1}/{args.repeats}, {side}")
    finally:
        guests.close()
    return out


def side_system(side: str) -> str:
    return "tmemd" if side == "tmem" else "memcached"


# ---------------------------------------------------------------------- targets and table


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def judge(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue #16, each with met (True/False/None: not measured) and the numbers."""
    rows_out: dict[str, dict[str, dict[str, Any]]] = result["rows"]
    out: list[dict[str, Any]] = []

    def cell(op: str, n: str, side: str) -> dict[str, Any] | None:
        got: dict[str, Any] | None = rows_out.get(op, {}).get(n, {}).get(side, {}).get("median")
        return got

    def add(name: str, met: bool | None, detail: str) -> None:
        out.append({"target": name, "met": met, "detail": detail})

    have_mc = "memcached" in result["sides"]
    for op, label in (
        ("put", "single put"),
        ("get", "single get"),
        ("pair", "put+get pair (exclusive get)"),
        ("map", "mapped read"),
    ):
        parts, oks = [], []
        for n in sorted(rows_out.get(op, {}), key=int):
            if int(n) < 2:
                continue
            t, m = cell(op, n, "tmem"), cell(op, n, "memcached")
            if not t or not m:
                continue
            r_ops, r_p99 = ratio(t["ops_s"], m["ops_s"]), ratio(t["p99_us"], m["p99_us"])
            assert r_ops is not None and r_p99 is not None
            oks.append(r_ops >= 1.0 and r_p99 <= 1.5)
            parts.append(f"N={n} {r_ops:.2f}x/{r_p99:.2f}x")
        name = f"{label}: ops/s >= 1.0x memcached and p99 <= 1.5x at every N >= 2"
        add(name, all(oks) if oks else None, "ops/p99 ratio: " + (", ".join(parts) or "-"))
    for op, label in (("put_batch", "put_many"), ("get_batch", "get_many")):
        parts, oks = [], []
        best = 0.0
        for n in sorted(rows_out.get(op, {}), key=int):
            t, m = cell(op, n, "tmem"), cell(op, n, "memcached")
            if t:
                best = max(best, t["ops_s"])
            if not t or not m:
                continue
            r_ops = ratio(t["ops_s"], m["ops_s"])
            assert r_ops is not None
            oks.append(r_ops >= 3.0)
            parts.append(f"N={n} {r_ops:.2f}x")
        add(
            f"{label} x{result['meta']['batch']}: pages/s >= 3x memcached at every N",
            all(oks) if oks else None,
            ", ".join(parts) + f"; best {best:,.0f} pages/s (stretch 1,000,000)",
        )
    rr = result.get("round_robin", {})
    t_one = rr.get("tmem", {}).get("get", {}).get("median")
    t_rr = rr.get("tmem", {}).get("get_rr", {}).get("median")
    if t_one and t_rr:
        r = t_one["ops_s"] / t_rr["ops_s"]
        detail = (
            f"{r:.2f}x: {1e6 / t_rr['ops_s']:.1f} us a get over {RR_CONNECTIONS} connections, "
            f"{1e6 / t_one['ops_s']:.1f} us on one (p50 {t_rr['p50_us']:.1f} / {t_one['p50_us']:.1f})"
        )
        m_one = rr.get("memcached", {}).get("get", {}).get("median")
        m_rr = rr.get("memcached", {}).get("get_rr", {}).get("median")
        if m_one and m_rr:
            detail += f"; memcached {m_one['ops_s'] / m_rr['ops_s']:.2f}x"
        add(
            f"round robin over {RR_CONNECTIONS} connections <= 1.3x one connection",
            r <= 1.3,
            detail,
        )
    else:
        add(f"round robin over {RR_CONNECTIONS} connections <= 1.3x one connection", None, "-")
    t, m = cell("get", "1", "tmem"), cell("get", "1", "memcached")
    if t and m:
        r1 = t["ops_s"] / m["ops_s"]
        add(
            "one guest's single get >= 2.6x memcached",
            r1 >= 2.6,
            f"{r1:.2f}x ({t['ops_s']:,.0f} / {m['ops_s']:,.0f} ops/s)",
        )
    else:
        add("one guest's single get >= 2.6x memcached", None, "-")
    if not have_mc:
        for t_ in out:
            if "memcached" in t_["target"]:
                t_["met"] = None
    return out


def _f(value: float | None, width: int, digits: int = 0) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>{width},.{digits}f}"


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"tmem many guests (issue #16): 4 KiB pages, unpinned, median of {meta['repeats']} "
        f"repeat(s), {meta['seconds']} s windows, every guest a process with its own connection",
        f"load average at start {_loads(meta['loadavg_at_start'])}, at end "
        f"{_loads(meta['loadavg_at_end'])} on {meta['cpus']} cpus (other work skews the numbers)",
        f"  tmemd      {result['versions']['tmemd']}, --memory {format_size(meta['tmemd_budget'])}",
        f"  memcached  {result['versions'].get('memcached', '(not measured)')}",
    ]
    if result["skipped"]:
        lines.append(f"  !! memcached SKIPPED: {result['skipped']}")
        lines.append(f"     install: {servers.INSTALL_HINTS['memcached']}")
    lines += [
        "ops/s: all guests together; p50/p99: per call, us (a batch call moves "
        f"{meta['batch']} pages); cpu: us per op (per page for batches) of the server and of "
        "all guests; sock: tmem requests sent on the socket, not the ring, per call (1 per "
        "request = all on the socket); bell: doorbells per call; waits: guest sleeps "
        "(voluntary context switches) per call; ceiling: the rate the machine's CPUs allow "
        "at this CPU per op, server and guests together (cpus / (srv + guest cpu)): a rate "
        "near it is CPU-bound, and only cheaper ops raise it",
    ]
    for row in rows(meta["batch"]):
        by_n = result["rows"].get(row.key)
        if not by_n:
            continue
        unit = f"{row.unit}/s"
        lines += ["", f"{row.key}: {row.title}"]
        head = (
            f"{'N':>3} {'tmem ' + unit:>13} {'mc ' + unit:>13} {'ratio':>6} | "
            f"{'p50 tmem':>9} {'mc':>7} | {'p99 tmem':>9} {'mc':>7} {'ratio':>6} | "
            f"{'srv cpu tmem':>12} {'mc':>5} | {'guest cpu tmem':>14} {'mc':>5} | "
            f"{'sock':>5} {'bell':>5} | {'waits tmem':>10} {'mc':>5} | "
            f"{'ceiling tmem':>12} {'mc':>9}"
        )
        lines += [head, "-" * len(head)]
        for n in sorted(by_n, key=int):
            t = by_n[n].get("tmem", {}).get("median")
            m = by_n[n].get("memcached", {}).get("median") or {}
            t = t or {}
            lines.append(
                f"{n:>3} {_f(t.get('ops_s'), 13)} {_f(m.get('ops_s'), 13)} "
                f"{_f(ratio(t.get('ops_s'), m.get('ops_s')), 6, 2)} | "
                f"{_f(t.get('p50_us'), 9)} {_f(m.get('p50_us'), 7)} | "
                f"{_f(t.get('p99_us'), 9)} {_f(m.get('p99_us'), 7)} "
                f"{_f(ratio(t.get('p99_us'), m.get('p99_us')), 6, 2)} | "
                f"{_f(t.get('server_cpu_us'), 12, 1)} {_f(m.get('server_cpu_us'), 5, 1)} | "
                f"{_f(t.get('guest_cpu_us'), 14, 1)} {_f(m.get('guest_cpu_us'), 5, 1)} | "
                f"{_f(t.get('sock_per_call'), 5, 2)} {_f(t.get('doorbells_per_call'), 5, 2)} | "
                f"{_f(t.get('waits_per_call'), 10, 2)} {_f(m.get('waits_per_call'), 5, 2)} | "
                f"{_f(ceiling(t, meta['cpus']), 12)} {_f(ceiling(m, meta['cpus']), 9)}"
            )
    rr = result.get("round_robin")
    if rr:
        lines += [
            "",
            f"round robin: one process, single gets over {RR_CONNECTIONS} connections "
            "in turn vs the same process on one connection",
        ]
        head = (
            f"{'system':<10} {'1 conn us/get':>14} {'rr us/get':>10} {'ratio':>6} | "
            f"{'p50 1 conn':>10} {'rr':>7} | {'p99 1 conn':>10} {'rr':>7} | "
            f"{'sock 1 conn':>11} {'rr':>5} | {'waits 1 conn':>12} {'rr':>5}"
        )
        lines += [head, "-" * len(head)]
        for side in SIDES:
            one = rr.get(side, {}).get("get", {}).get("median")
            rob = rr.get(side, {}).get("get_rr", {}).get("median")
            if not one or not rob:
                continue
            lines.append(
                f"{side:<10} {_f(1e6 / one['ops_s'], 14, 1)} {_f(1e6 / rob['ops_s'], 10, 1)} "
                f"{_f(one['ops_s'] / rob['ops_s'], 6, 2)} | {_f(one['p50_us'], 10, 1)} "
                f"{_f(rob['p50_us'], 7, 1)} | {_f(one['p99_us'], 10, 1)} {_f(rob['p99_us'], 7, 1)}"
                f" | {_f(one.get('sock_per_call'), 11, 2)} {_f(rob.get('sock_per_call'), 5, 2)}"
                f" | {_f(one.get('waits_per_call'), 12, 2)} {_f(rob.get('waits_per_call'), 5, 2)}"
            )
    lines += ["", "targets (issue #16)"]
    for t_ in result["targets"]:
        met = {True: "MET", False: "NOT MET", None: "not judged"}[t_["met"]]
        lines.append(f"  {met:<10} {t_['target']}: {t_['detail']}")
    bad = [
        f"{op} N={n} {side}: {cell['median']['bad']}"
        for op, by_n in result["rows"].items()
        for n, sides in by_n.items()
        for side, cell in sides.items()
        if cell["median"]["bad"]
    ]
    if bad:
        lines.append("  !! pages refused, missing or wrong: " + "; ".join(bad))
    return "\n".join(lines)


def ceiling(cell: dict[str, Any], cpus: int) -> float | None:
    """Ops (pages) per second if the machine's CPUs did nothing but this op at the measured
    CPU per op of the server and the guests together."""
    srv, guest = cell.get("server_cpu_us"), cell.get("guest_cpu_us")
    if not srv or guest is None:
        return None
    return float(cpus * 1e6 / (srv + guest))


def _loads(loads: list[float] | tuple[float, ...]) -> str:
    return " ".join(f"{x:.2f}" for x in loads)


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.manyguests", description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N=1,4,16, short windows")
    p.add_argument("--guests", help="comma-separated guest counts (1,2,4,8,16,32)")
    p.add_argument("--ops", default=",".join(OP_KEYS), help=f"subset of {','.join(OP_KEYS)}")
    p.add_argument("--repeats", type=int, help="repeats per cell; the median is shown (3)")
    p.add_argument("--seconds", type=float, help="measured window per cell and repeat (2.0)")
    p.add_argument("--warmup", type=float, help="warm-up window per row and N (0.5)")
    p.add_argument("--keyspace", type=int, help="pages per guest, filled before measuring (4096)")
    p.add_argument("--batch", type=int, default=64, help="pages per batched call (64)")
    p.add_argument("--memory", type=parse_size, default=1 << 30, help="each tmemd's budget (1GiB)")
    p.add_argument("--memcached-mb", type=int, default=2048, help="memcached -m (2048)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install memcached")
    p.add_argument(
        "--tmemd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for both tmemds, e.g. --tmemd-arg=--ring-poll-us=0 (repeatable)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"(default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeats": 1 if quick else 3,
        "seconds": 0.3 if quick else 2.0,
        "warmup": 0.1 if quick else 0.5,
        "keyspace": 1024 if quick else 4096,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    counts = args.guests or ",".join(map(str, QUICK_GUEST_COUNTS if quick else GUEST_COUNTS))
    try:
        args.guest_counts = sorted({int(x) for x in counts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--guests: not a list of numbers: {counts!r}")
    args.op_keys = [x.strip() for x in args.ops.split(",") if x.strip()]
    if unknown := [x for x in args.op_keys if x not in OP_KEYS]:
        p.error(f"--ops: unknown {', '.join(unknown)} (known: {', '.join(OP_KEYS)})")
    if not args.guest_counts or min(args.guest_counts) < 1:
        p.error("--guests: need counts >= 1")
    if args.repeats < 1 or args.seconds <= 0 or args.warmup <= 0 or args.keyspace < args.batch:
        p.error("need --repeats >= 1, positive durations and --keyspace >= --batch")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: guests and servers stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    skipped = ensure_memcached(not args.no_install)
    if skipped:
        print(
            f"!! SKIPPING memcached: {skipped}\n!!   install it with: "
            f"{servers.INSTALL_HINTS['memcached']}\n!!   tmemd is measured alone; no target is judged",
            file=sys.stderr,
            flush=True,
        )
    sides = [s for s in SIDES if s == "tmem" or not skipped]
    ops = [row for row in rows(args.batch) if row.key in args.op_keys]
    versions = {"tmemd": servers.server_version("tmemd").split(" (")[0]}
    if args.tmemd_arg:
        versions["tmemd"] += " " + " ".join(args.tmemd_arg)
    if not skipped:
        versions["memcached"] = (
            f"{servers.server_version('memcached')} (-t {MEMCACHED_THREADS} -m {args.memcached_mb})"
        )
    result: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
            "cpus": len(os.sched_getaffinity(0)),
            "guests": args.guest_counts,
            "ops": args.op_keys,
            "repeats": args.repeats,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "keyspace": args.keyspace,
            "batch": args.batch,
            "quick": args.quick,
            "tmemd_budget": args.memory,
            "memcached_threads": MEMCACHED_THREADS,
            "pair_counts_as": "one op (pairs/s; latency and CPU per pair)",
            "cpu_per_op": "server: /proc/PID/stat utime+stime over the window; guests: their "
            "process_time; per op, per page for batches, per pair for pairs",
            "loadavg_at_start": os.getloadavg(),
            "loadavg_per_n": {},
        },
        "sides": sides,
        "skipped": skipped,
        "versions": versions,
        "rows": {},
    }
    planned: list[float] = []
    for n in args.guest_counts:
        planned.append(
            setup_cost(args, n) + len(ops) * len(sides) * window_cost(args, n, args.warmup)
        )
        planned += [window_cost(args, n, args.seconds)] * (args.repeats * len(ops) * len(sides))
    if "rr" in args.op_keys:
        planned.append(setup_cost(args, RR_CONNECTIONS) + 4 * window_cost(args, 1, args.warmup))
        planned += [2 * window_cost(args, 1, args.seconds)] * (args.repeats * len(sides))
    if (load := os.getloadavg()[0]) > 0.5:
        print(
            f"!! the machine is busy (load average {load:.2f}): numbers will scatter",
            file=sys.stderr,
        )
    say(
        f"bench.manyguests: N = {','.join(map(str, args.guest_counts))}; "
        f"{', '.join(r.key for r in ops)}; {', '.join(sides)}; {args.repeats} repeat(s) of "
        f"{args.seconds} s; about {sum(planned):.0f}s"
    )
    progress = Progress(planned)
    running: dict[str, servers.Server] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tmem-many-") as tmpdir:
            running = start_servers(Path(tmpdir), args, not skipped)
            say("servers up: " + ", ".join(f"{s} pid {v.pid}" for s, v in running.items()))
            try:
                for n in args.guest_counts:
                    load0 = os.getloadavg()
                    by_row = run_n(n, running, sides, ops, args, progress)
                    result["meta"]["loadavg_per_n"][str(n)] = [load0, os.getloadavg()]
                    for key, by_side in by_row.items():
                        result["rows"].setdefault(key, {})[str(n)] = {
                            side: {"median": medians(runs), "runs": runs}
                            for side, runs in by_side.items()
                        }
                if "rr" in args.op_keys:
                    rr = run_rr(running, sides, args, progress)
                    result["round_robin"] = {
                        side: {
                            method: {"median": medians(runs), "runs": runs}
                            for method, runs in by_method.items()
                        }
                        for side, by_method in rr.items()
                    }
            finally:
                for system, server in running.items():
                    if server.proc.poll() is not None:
                        say(f"!! {system} exited early (status {server.proc.returncode}):")
                        print(servers.log_tail(server.log), file=sys.stderr)
                stop_all(running)
    except KeyboardInterrupt:
        say("interrupted; every guest and server was stopped")
        return 130
    except SystemExit as exc:  # SIGTERM (see _terminate)
        say(f"stopped by a signal; every guest and server was stopped (exit {exc.code})")
        raise
    result["meta"]["loadavg_at_end"] = os.getloadavg()
    result["meta"]["elapsed_s"] = round(time.monotonic() - progress.t0, 1)
    result["targets"] = judge(result)
    table = render(result)
    print(table, flush=True)
    if skipped:
        print(f"!! memcached was SKIPPED: {skipped}", file=sys.stderr)
    result["table"] = table.splitlines()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"done in {result['meta']['elapsed_s']:.0f}s; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
