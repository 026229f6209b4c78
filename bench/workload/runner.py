"""Does tmem save I/O? VM-like guests with page caches, static partition against tmem.

    python -m bench.workload [--scenarios phases,uniform] [--disk-latency-us 80] [--out DIR]

Starts its own tmemd (budget M) in a temporary directory and N guest processes, each with its own
data files on disk and its own page cache (``tmemclient.apps.cleancache``, blocks of ``--block-pages``
pages). The same accesses run in two setups of equal total memory:

  static   each guest's cache holds L + M/N pages; no tmem
  tmem     each guest's cache holds L pages; evicted blocks go to tmemd's shared budget of M, as
           tmem pages of ``--tmem-page-pages`` pages (only those holding something: random
           reads leave blocks partly read, and tmem is not spent on their holes)

The guests of both setups run side by side and take turns with the same accesses (static first,
then tmem; the other way round in every second ``--repeats`` run), so a machine that speeds up or
slows down during the run affects both alike. Every page
read from a data file pays ``--disk-latency-us`` on top of the real pread (an NVMe-like device: the
file is in the host's own page cache, so the added latency is the device); the caches read the
file page by page. Swap-file writes go in batches, one latency per batch.

Scenarios: ``phases`` (one guest at a time busy, its working set larger than its static share;
its reads follow ``--phase-pattern``), and ``uniform``, ``zipf``, ``scan`` (every guest busy at
once with that access pattern). Reads are runs of ``--run`` pages. Then a frontswap scenario: a
guest whose working set exceeds its RAM, swapping to a file alone and with a persistent pool in
front. Prints tables (stdout), progress (stderr), a JSON file and SVG plots of disk reads over time
into ``--out`` (drawn by report.py, nothing to install).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import Any

import tmemclient
from bench.workload.guest import (
    MAGIC,
    PAGE,
    LatencyDisk,
    make_files,
    precise_timers,
    progress,
)
from bench.workload.report import SCENARIOS, Setup, plot, summarize, swap_table, table, verdicts
from tmemclient.apps.frontswap import SwappedMemory, SwapStore
from tmemclient.wire.units import format_size, parse_size
from tmemd.ctl.client import AdminClient
from tmemd.launch import Tmemd

PATTERNS = ("uniform", "zipf", "scan")
ROOT = Path(__file__).resolve().parents[2]
REPLY_TIMEOUT = 300.0  # a guest that does not answer a command within this is a failure


class Guest:
    """A guest process, driven by JSON lines over its stdin and stdout."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.workload.guest"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,  # where bench/ is: the guest is this harness's, not an installed module
        )
        self.tell(cfg)

    def tell(self, message: dict[str, Any]) -> None:
        """Send one command."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        """The next reply (bounded wait)."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(REPLY_TIMEOUT):
                raise RuntimeError(f"guest {self.cfg['name']} did not answer in {REPLY_TIMEOUT}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"guest {self.cfg['name']} exited ({self.proc.wait(10)})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def stop(self) -> dict[str, Any]:
        """Ask it to quit; its final counters."""
        self.tell({"cmd": "quit"})
        final = self.answer()
        self.proc.wait(timeout=30)
        return final

    def kill(self) -> None:
        """Make sure it is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def guest_config(
    args: argparse.Namespace, setup: Setup, g: int, sock: Path | None, data: list[str]
) -> dict[str, Any]:
    """What guest ``g`` of ``setup`` is told when it starts."""
    return {
        "guest": g,
        "name": f"vm{g}",
        "socket": str(sock) if setup.tmem else None,
        "frames": 1024,
        "capacity": setup.capacity,
        "block_pages": args.block_pages,
        "tmem_page_pages": min(args.tmem_page_pages, args.block_pages),
        "readahead": args.readahead,
        "put_batch": args.put_batch,
        "overlap": args.overlap,
        "map": args.map,
        "borrow": args.memory if args.lend and setup.tmem else 0,
        "files": data,
        "pages": args.file_pages,
        "run": args.run,
        "latency_us": args.disk_latency_us,
    }


def run_scenario(
    args: argparse.Namespace,
    scenario: str,
    setups: list[Setup],
    data: list[list[str]],
    workdir: Path,
    repeat: int = 0,
) -> list[dict[str, Any]]:
    """One scenario in every setup, interleaved: the guests of both setups run side by side and
    take turns with the same accesses, so a machine that slows down or speeds up during the
    run affects both alike. Who goes first alternates with ``repeat`` (static first in even
    repeats), as going first or second is not quite the same. Returns each setup's summary."""
    with Tmemd(workdir, "--memory", str(args.memory), *args.tmemd_arg, admin=True) as tmemd:
        sock, admin = tmemd.socket, tmemd.admin_socket
        assert admin is not None
        tmemctl = Path(sys.executable).parent / "tmemctl"
        progress(f"  watch memory follow demand: {tmemctl} --admin-socket {admin} top")
        guests: dict[str, list[Guest]] = {}
        try:
            for setup in setups:
                guests[setup.name] = [
                    Guest(guest_config(args, setup, g, sock, data[g])) for g in range(args.guests)
                ]
            for group in guests.values():
                for guest in group:
                    guest.answer()  # ready
            runs: dict[str, list[list[dict[str, Any]]]] = {
                name: [[] for _ in group] for name, group in guests.items()
            }
            busy = dict.fromkeys(guests, 0.0)  # seconds each setup spent on the scenario
            daemon_cpu = process_cpu(str(sock))

            began: dict[str, float] = {}  # when each setup's first turn began

            def turn(name: str, members: list[int], cmd: dict[str, Any]) -> None:
                started = time.monotonic()
                began.setdefault(name, started)
                for g in members:
                    guests[name][g].tell(cmd | {"seed": cmd["seed"] + g})
                for g in members:
                    reply = guests[name][g].answer()
                    reply["offset"], reply["start"] = busy[name], started
                    runs[name][g].append(reply)
                busy[name] += time.monotonic() - started

            everyone = list(range(args.guests))
            order = list(guests) if repeat % 2 == 0 else list(reversed(guests))
            if scenario == "phases":
                for rnd in range(args.rounds):
                    for g in everyone:
                        for name in order:
                            cmd = command(args.phase_pattern, args.phase_reads, args.seed, rnd)
                            turn(name, [g], cmd)
                        progress(
                            f"  phase {rnd * args.guests + g + 1}/{args.rounds * args.guests} "
                            f"(vm{g} busy): "
                            + ", ".join(f"{n} {runs[n][g][-1]['seconds']:.2f}s" for n in guests)
                        )
            else:
                for name in order:
                    turn(name, everyone, command(scenario, args.busy_reads, args.seed, 0))
            daemon_rows = AdminClient(admin).call("guests")  # the tmem guests' accounts
            if daemon_cpu is not None:  # only the tmem guests talk to it
                daemon_cpu = (process_cpu(str(sock)) or daemon_cpu) - daemon_cpu
            finals = {name: [guest.stop() for guest in group] for name, group in guests.items()}
        finally:
            for group in guests.values():
                for guest in group:
                    guest.kill()
    return [
        summarize(
            scenario,
            setup,
            runs[setup.name],
            finals[setup.name],
            daemon_rows if setup.tmem else [],
            busy[setup.name],
            daemon_cpu if setup.tmem else None,
        )
        | {"began": began[setup.name]}
        for setup in setups
    ]


def process_cpu(marker: str) -> float | None:
    """CPU seconds used so far by the tmemd whose command line has ``marker`` (Linux /proc; None
    where there is none)."""
    with suppress(OSError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            with suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"tmemd" in cmdline and marker.encode() in cmdline:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def command(pattern: str, reads: int, seed: int, rnd: int) -> dict[str, Any]:
    """A run command (the guest's number is added to the seed): the seed depends on everything
    but the setup, so both setups see the same accesses."""
    return {"cmd": "run", "pattern": pattern, "reads": reads, "seed": (seed * 1009 + rnd) * 1009}


SWAP_SETUPS = {
    "file only": (False, False),
    "file + tmem": (True, False),
    "file + tmem write-back": (True, True),
}


def swap_scenario(args: argparse.Namespace, workdir: Path, setup: str) -> dict[str, Any]:
    """A guest whose working set exceeds its RAM, swapping to a file: alone, with tmem in front
    (write-through), or with tmem in front and only what it refuses written (write-back, a named
    pool of a resilient client)."""
    use_tmem, write_back = SWAP_SETUPS[setup]
    disk = LatencyDisk(args.disk_latency_us)
    rng = random.Random(args.seed)
    ram, pages, run = args.swap_ram, args.swap_pages, args.run
    versions = [1] * pages
    bad = 0

    def content(page: int, version: int) -> bytes:
        return struct.pack("<III", MAGIC, page, version).ljust(PAGE, b"s")

    daemon: AbstractContextManager[Tmemd | None] = (
        Tmemd(workdir, "--memory", str(args.memory)) if use_tmem else nullcontext(None)
    )
    with daemon as tmemd:
        sock = None if tmemd is None else tmemd.socket
        client: Any = None
        pool: Any = None
        if sock is not None and write_back:
            client = tmemclient.connect_resilient(sock, "swapper", map_pages=args.map)
            pool = client.new_pool(persistent=True, name="swap")
        elif sock is not None:
            client = tmemclient.connect(sock, name="swapper", map_pages=args.map)
            pool = client.new_pool(persistent=True)
        try:
            with SwapStore(
                pool,
                workdir / "swapfile",
                batch=args.put_batch,
                disk_read=disk.read,
                disk_write=disk.write,
                write_back=write_back,
            ) as store:
                memory = SwappedMemory(store, ram)
                started = time.monotonic()
                for first in range(0, pages, run):  # first touch: every page written once
                    memory.write_many(
                        [(p, content(p, 1)) for p in range(first, min(first + run, pages))]
                    )
                for _ in range(args.swap_reads):  # then runs read, a quarter of them rewritten
                    first = rng.randrange(pages - run + 1)
                    chunk = list(range(first, first + run))
                    for p, data in zip(chunk, memory.read_many(chunk), strict=True):
                        bad += data != content(p, versions[p])
                    if rng.random() < 0.25:
                        for p in chunk:
                            versions[p] += 1
                        memory.write_many([(p, content(p, versions[p])) for p in chunk])
                seconds = time.monotonic() - started
                stats = store.stats.as_dict()
        finally:
            if client is not None:
                client.close()
    return {
        "setup": setup,
        "seconds": seconds,
        "faults": memory.faults,
        "bad_pages": bad,
        **stats,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m bench.workload",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--scenarios", default="phases,uniform", help=f"comma-separated of {', '.join(SCENARIOS)}")
    add("--guests", type=int, default=4, help="guest processes (N)")
    add("--memory", type=parse_size, default=8 << 20, help="tmem budget M (default 8MiB)")
    add("--local-pages", type=int, default=512, help="each guest's own cache L, in pages")
    add("--files", type=int, default=4, help="data files per guest")
    add(
        "--data",
        choices=("random", "text"),
        default="random",
        help="what fills the data pages: random bytes, or standard library source (for runs "
        "with --tmemd-arg=--compress --tmemd-arg=zstd; needs --no-map: mapped pages stay raw)",
    )
    add("--file-pages", type=int, default=512, help="pages per data file")
    add("--run", type=int, default=8, help="pages per read")
    add("--phase-reads", type=int, default=2048, help="reads of the busy guest per phase")
    add("--phase-pattern", default="uniform", choices=PATTERNS, help="the busy guest's reads")
    add("--rounds", type=int, default=2, help="phases: times each guest gets busy")
    add("--busy-reads", type=int, default=1536, help="reads per guest in the other scenarios")
    add("--block-pages", type=int, default=8, help="pages per cache block (= tmem page)")
    add(
        "--tmem-page-pages",
        type=int,
        default=8,
        help="pages per tmem page, at most --block-pages: a block goes to tmem as the tmem pages "
        "holding something (fewer holes in tmem, more pages per round trip to handle)",
    )
    add("--readahead", type=int, default=16, help="tmem readahead pages for sequential reads")
    add("--put-batch", type=int, default=64, help="evicted pages per put_many")
    add(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="read the file while a tmem lookup is on its way (a helper thread per guest)",
    )
    add(
        "--map",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tmem guests read their pages through a read-only mapping, with no round trip "
        "(PROTOCOL.md 4.7)",
    )
    add(
        "--lend",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tmem guests borrow memory from tmemd to use as their own, which it takes back when "
        "others need it (PROTOCOL.md 4.8; needs --map)",
    )
    add("--disk-latency-us", type=float, default=80.0, help="added latency per disk read")
    add("--swap", action=argparse.BooleanOptionalAction, default=True, help="frontswap scenario")
    add("--swap-ram", type=int, default=256, help="frontswap: RAM pages")
    add("--swap-pages", type=int, default=1024, help="frontswap: working set pages")
    add("--swap-reads", type=int, default=1500, help="frontswap: reads of --run pages")
    add(
        "--tmemd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to the tmemd the runner starts (repeat: --tmemd-arg=--ring-poll-us "
        "--tmemd-arg=0)",
    )
    add(
        "--repeats",
        type=int,
        default=1,
        help="run each cache scenario this many times, with static and tmem taking the first turn "
        "in turn; the verdict goes by the median time ratio (the table and plots show the first "
        "run)",
    )
    add("--seed", type=int, default=1)
    add("--out", type=Path, default=Path("bench/results"), help="where plots and JSON go")
    args = parser.parse_args(argv)
    args.scenario_list = [s for s in args.scenarios.split(",") if s]
    for s in args.scenario_list:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    for name in (
        "guests", "local_pages", "files", "file_pages", "run", "rounds", "put_batch", "repeats",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    powers = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    if args.block_pages not in powers or args.tmem_page_pages not in powers:
        parser.error("--block-pages and --tmem-page-pages must be powers of two (4096 << order)")
    if args.run > args.file_pages or args.put_batch + args.block_pages > args.local_pages:
        parser.error("--run must fit a file, and --put-batch plus a block the local cache")
    if args.memory < args.guests * PAGE:
        parser.error("--memory must give every guest at least a page")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios; exit 1 if any count did not add up or a page read back wrong."""
    args = parse_args(argv)
    precise_timers()
    share = args.memory // PAGE // args.guests
    setups = [
        Setup("static", args.local_pages + share, tmem=False),
        Setup("tmem", args.local_pages, tmem=True),
    ]
    data_pages = args.files * args.file_pages
    progress(
        f"{args.guests} guests, each {data_pages} pages of data ({format_size(data_pages * PAGE)}),"
        f" reads of {args.run} pages; static: {setups[0].capacity} local pages each; tmem: "
        f"{args.local_pages} local + {format_size(args.memory)} shared; disk "
        f"{args.disk_latency_us:g} us/read"
    )
    results: list[dict[str, Any]] = []
    swaps: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tmem-workload-") as tmp:
        workdir = Path(tmp)
        data = [
            make_files(workdir, g, args.files, args.file_pages, args.data)
            for g in range(args.guests)
        ]
        for scenario in args.scenario_list:
            progress(f"{scenario}: static and tmem guests side by side, taking turns")
            for n in range(args.repeats):
                run_dir = workdir / scenario / str(n)
                run_dir.mkdir(parents=True)
                for res in run_scenario(args, scenario, setups, data, run_dir, n):
                    progress(
                        f"  {res['setup']}: {res['total']['disk_reads']} disk reads, "
                        f"{res['total']['seconds']:.2f}s"
                        + (f" (run {n + 1}/{args.repeats})" if args.repeats > 1 else "")
                    )
                    results.append(res | {"repeat": n})
        if args.swap:
            for n, setup in enumerate(SWAP_SETUPS):
                progress(f"frontswap / {setup}")
                run_dir = workdir / f"swap-{n}"
                run_dir.mkdir()
                swaps.append(swap_scenario(args, run_dir, setup))
    print(table(results))
    print()
    for line in verdicts(results):
        print(line)
    if swaps:
        print()
        print(swap_table(swaps))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workload.json").write_text(
        json.dumps({"cache": results, "swap": swaps}, indent=1) + "\n"
    )
    for path in plot(results, args.out):
        progress(f"plot: {path}")
    problems = [p for r in results for p in r["problems"]]
    problems += [
        f"frontswap {s['setup']}: {s['bad_pages']} wrong pages" for s in swaps if s["bad_pages"]
    ]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    progress(f"done in {time.monotonic() - started:.1f}s")
    return 1 if problems else 0
