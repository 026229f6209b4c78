"""How many pages the same memory holds, and what that costs: real data from this machine into
a real tmemd with each compressor (docs/design.md §6.11).

    python -m bench.capacity [--compress off,lz4,zstd] [--pages 4096] [--memory 4MiB]
                             [--sets py,pyc,elf,proc,fill] [--repeats 3] [--json FILE]

The data sets are pages no one here wrote, read from this machine: the Python standard library's
source (``.py``) and bytecode (``.pyc``) files, ELF binaries and shared libraries under /usr, the
memory of a Python process the bench starts and fills (read through ``/proc/PID/mem``), and
same-filled pages (zeros and repeated words). Each set is ``--pages`` pages, sampled with a fixed
seed, file tails zero-padded as a page cache holds them.

For each set and compressor, one tmemd (``--compress``):

- *capacity*: with a budget of ``--memory``, persistent puts of the set's pages (again and again
  under new handles) until one is refused: pages held per MiB of budget, and the ratio against
  raw pages (a 4 KiB slot each). ``waste`` is the share of the packed pages' slots that no page
  uses (the size classes' fragmentation, ``tmemctl status``).
- *throughput*: with room for the whole set, PUT_MANY of 64 pages, then GET_MANY, every page
  checked byte for byte: pages per second (median of ``--repeats``), and against ``off``.

Every loop is bounded (pages, repeats, a put budget); progress goes to stderr, the table to
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tmemclient
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.units import format_size, parse_size
from tmemd.ctl.client import AdminClient
from tmemd.launch import Tmemd

PAGE = FRAME_SIZE
MIB = 1 << 20
BATCH = 64
SETS = ("py", "pyc", "elf", "proc", "fill")
SET_NAMES = {
    "py": "stdlib .py",
    "pyc": "stdlib .pyc",
    "elf": "ELF under /usr",
    "proc": "process memory",
    "fill": "same-filled",
}
MAX_FILE = 64 << 20  # larger files are skipped (a bounded read)
MAX_FILES = 20_000  # files looked at per set, at most
OVERFILL = 200  # capacity puts stop after this many times the budget's raw pages


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data sets


def file_pages(paths: Iterator[Path], limit: int) -> Iterator[bytes]:
    """The pages of each file in turn (the tail zero-padded); at most ``limit`` files."""
    for n, path in enumerate(paths):
        if n >= limit:
            return
        try:
            if not path.is_file() or path.stat().st_size > MAX_FILE:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        for off in range(0, len(data), PAGE):
            chunk = data[off : off + PAGE]
            yield chunk + bytes(PAGE - len(chunk))


def sample(pages: Iterator[bytes], count: int, seed: int = 18) -> list[bytes]:
    """``count`` pages drawn evenly from ``pages`` (reservoir sampling, a fixed seed)."""
    rng = random.Random(seed)
    chosen: list[bytes] = []
    for i, page in enumerate(pages):
        if len(chosen) < count:
            chosen.append(page)
        else:
            j = rng.randrange(i + 1)
            if j < count:
                chosen[j] = page
    rng.shuffle(chosen)
    return chosen


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def stdlib_files(suffix: str) -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return (p for p in sorted(root.rglob(f"*{suffix}")) if "site-packages" not in p.parts)


def elf_files() -> Iterator[Path]:
    for top in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec"):
        root = Path(top)
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if not path.is_symlink() and is_elf(path):
                    yield path


FILLER = """
import json, random, sys, time
rng = random.Random(7)
words = open(sys.argv[1]).read().split()[:200000]
records = [
    {"id": i, "name": rng.choice(words), "tags": [rng.choice(words) for _ in range(3)],
     "score": rng.random(), "count": rng.randrange(1000)}
    for i in range(60000)
]
index = {r["name"] + str(r["id"]): r for r in records}
text = " ".join(rng.choice(words) for _ in range(300000))
blob = json.dumps(records[:20000]).encode()
print("ready", flush=True)
sys.stdin.read()
"""


def process_pages(count: int) -> list[bytes]:
    """Pages of the writable memory of a Python process filled with records, text and JSON:
    started here, read through /proc/PID/mem, then ended."""
    words = Path(sysconfig.get_paths()["stdlib"]) / "typing.py"
    proc = subprocess.Popen(
        [sys.executable, "-c", FILLER, str(words)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("the process to read did not start")
        pages = []
        with (
            open(f"/proc/{proc.pid}/maps") as maps,
            open(f"/proc/{proc.pid}/mem", "rb", buffering=0) as mem,
        ):
            for entry in maps:
                fields = entry.split()
                span, perms = fields[0], fields[1]
                name = fields[5] if len(fields) > 5 else ""
                if not perms.startswith("rw") or name.startswith("[v") or name == "[stack]":
                    continue
                start, end = (int(x, 16) for x in span.split("-"))
                for addr in range(start, end, PAGE):
                    try:
                        mem.seek(addr)
                        page = mem.read(PAGE)
                    except OSError:
                        continue
                    if len(page) == PAGE:
                        pages.append(page)
        return sample(iter(pages), count)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def fill_pages(count: int) -> list[bytes]:
    """Zero pages and pages of one repeated word, half and half."""
    rng = random.Random(3)
    return [
        bytes(PAGE) if i % 2 else rng.getrandbits(64).to_bytes(8, "little") * (PAGE // 8)
        for i in range(count)
    ]


def data_set(name: str, count: int) -> list[bytes]:
    """``count`` pages of the set ``name`` (one of SETS)."""
    if name == "py":
        return sample(file_pages(stdlib_files(".py"), MAX_FILES), count)
    if name == "pyc":
        return sample(file_pages(stdlib_files(".pyc"), MAX_FILES), count)
    if name == "elf":
        return sample(file_pages(elf_files(), MAX_FILES), count)
    if name == "proc":
        return process_pages(count)
    if name == "fill":
        return fill_pages(count)
    raise ValueError(f"unknown data set {name!r}: one of {', '.join(SETS)}")


# ---------------------------------------------------------------------------------- measuring


def start_tmemd(workdir: Path, memory: int, compress: str) -> Tmemd:
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--memory", str(memory)]
    if compress != "off":
        args += ["--compress", compress]
    return Tmemd(workdir, *args, admin=True)


def guest_row(tmemd: Tmemd, name: str) -> dict[str, Any]:
    assert tmemd.admin_socket is not None
    with AdminClient(tmemd.admin_socket, timeout=30) as admin:
        rows = admin.call("guests")
    (row,) = [r for r in rows if str(r["name"]).endswith("/" + name)]
    return dict(row)


def capacity(tmemd: Tmemd, pages: list[bytes], memory: int) -> dict[str, Any]:
    """Persistent puts until one is refused (bounded); pages held and what they use."""
    budget_pages = memory // PAGE
    limit = budget_pages * OVERFILL
    put = 0
    with tmemclient.connect(tmemd.socket, name="capacity", frames=BATCH) as client:
        client._sock.settimeout(60)
        pool = client.new_pool(persistent=True)
        while put < limit:
            batch = [
                ((put + k) >> 12, (put + k) & 4095, pages[(put + k) % len(pages)])
                for k in range(BATCH)
            ]
            flags = pool.put_many(batch)
            put += BATCH
            if not all(flags):
                break
        row = guest_row(tmemd, "capacity")
    held = int(row["pages"])
    return {
        "pages_held": held,
        "pages_per_mib": held / (memory / MIB),
        "ratio": held / budget_pages,
        "waste": row["packed_waste"],
        "bounded": put >= limit,
    }


def throughput(tmemd: Tmemd, pages: list[bytes], repeats: int) -> dict[str, float]:
    """Median put and get pages/s of PUT_MANY / GET_MANY of the whole set, checked."""
    puts: list[float] = []
    gets: list[float] = []
    with tmemclient.connect(tmemd.socket, name="throughput", frames=BATCH) as client:
        client._sock.settimeout(60)
        pool = client.new_pool(persistent=True)
        batches = [
            [(0, i + k, pages[i + k]) for k in range(min(BATCH, len(pages) - i))]
            for i in range(0, len(pages), BATCH)
        ]
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                if not all(pool.put_many(batch)):
                    raise RuntimeError("a throughput put was refused: give tmemd more --memory")
            puts.append(len(pages) / (time.perf_counter() - start))
            start = time.perf_counter()
            for batch in batches:
                got = pool.get_many([(oid, index) for oid, index, _ in batch])
                if got != [data for _, _, data in batch]:
                    raise RuntimeError("a page came back different")
            gets.append(len(pages) / (time.perf_counter() - start))
            pool.flush_object(0)
    return {"put_per_s": statistics.median(puts), "get_per_s": statistics.median(gets)}


def run(
    sets: list[str],
    compressors: list[str],
    count: int,
    memory: int,
    repeats: int,
    progress: Callable[..., None] = say,
) -> list[dict[str, Any]]:
    """One row per (set, compressor)."""
    rows = []
    for name in sets:
        progress(f"reading {SET_NAMES[name]}: {count} pages")
        pages = data_set(name, count)
        if not pages:
            progress(f"  no pages found for {name}: skipped")
            continue
        for compress in compressors:
            progress(f"  {name} with --compress {compress}: capacity, then throughput")
            with tempfile.TemporaryDirectory(prefix="tmem-capacity-") as tmp:
                with start_tmemd(Path(tmp) / "a", memory, compress) as tmemd:
                    cap = capacity(tmemd, pages, memory)
                room = max(memory, 2 * len(pages) * PAGE)
                with start_tmemd(Path(tmp) / "b", room, compress) as tmemd:
                    speed = throughput(tmemd, pages, repeats)
            rows.append({"set": name, "compress": compress, "pages": len(pages), **cap, **speed})
    for row in rows:  # against "off" on the same pages
        base = next((r for r in rows if r["set"] == row["set"] and r["compress"] == "off"), None)
        row["put_vs_off"] = row["put_per_s"] / base["put_per_s"] if base else None
        row["get_vs_off"] = row["get_per_s"] / base["get_per_s"] if base else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'data set':<16} {'compress':<8} {'pages/MiB':>9} {'vs raw':>7} {'waste':>6} "
        f"{'put/s':>9} {'get/s':>9} {'put/off':>7} {'get/off':>7}"
    )
    lines = [head]
    for r in rows:
        vs = (
            f"{r['put_vs_off']:>7.2f} {r['get_vs_off']:>7.2f}"
            if r["put_vs_off"] is not None
            else f"{'-':>7} {'-':>7}"
        )
        bound = "+" if r["bounded"] else " "
        lines.append(
            f"{SET_NAMES[r['set']]:<16} {r['compress']:<8} {r['pages_per_mib']:>8.0f}{bound} "
            f"{r['ratio']:>6.2f}x {r['waste']:>6.1%} {r['put_per_s']:>9,.0f} "
            f"{r['get_per_s']:>9,.0f} {vs}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="bench.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compress", default="off,lz4,zstd", help="comma-separated compressors")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated data sets")
    parser.add_argument("--pages", type=int, default=4096, help="pages per data set")
    parser.add_argument("--memory", type=parse_size, default=4 * MIB, help="capacity budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    compressors = [c for c in args.compress.split(",") if c]
    for s in sets:
        if s not in SETS:
            parser.error(f"unknown data set {s!r}: one of {', '.join(SETS)}")
    if not 1 <= args.pages <= 1 << 20 or not 1 <= args.repeats <= 100:
        parser.error("--pages is 1..1048576 and --repeats 1..100")
    load = os.getloadavg()
    say(
        f"{os.cpu_count()} cpus, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"budget {format_size(args.memory)}, {args.pages} pages a set"
    )
    rows = run(sets, compressors, args.pages, args.memory, args.repeats)
    print(table(rows))
    end = os.getloadavg()
    print(
        f"load average {load[0]:.2f} at start, {end[0]:.2f} at end; "
        f"+: stopped by the put bound ({OVERFILL}x raw), not a refusal"
    )
    if args.json:
        args.json.write_text(json.dumps({"load": [load, end], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
