"""One guest of the evidence workload: a process with data files, a page cache and maybe a
tmem pool, driven by the runner with JSON lines on stdin and stdout (``python -m
bench.workload.guest``)."""

from __future__ import annotations

import bisect
import ctypes
import json
import os
import random
import struct
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, TextIO

import tmemclient
from tmemclient.apps.cleancache import PageCache

PAGE = 4096
MAGIC = 0x746D656D  # "tmem"


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[workload] {message}", file=sys.stderr, flush=True)


def precise_timers() -> None:
    """Ask the kernel for 1 us timer slack (default 50 us), so short sleeps end on time."""
    # Not on Linux: sleeps overshoot more, and LatencyDisk's spin makes up for it.
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK


class LatencyDisk:
    """File I/O that takes at least ``latency_us`` per request, like a device would.

    The wait sleeps (the CPU is free, as during real I/O), waking a little early and spinning for
    what is left, if anything.
    """

    WAKE = 10e-6  # a sleep ends about this late, with 1 us timer slack

    def __init__(self, latency_us: float) -> None:
        self.latency = latency_us / 1e6
        self.requests = 0

    def wait_until(self, deadline: float) -> None:
        """Return at ``deadline`` (perf_counter seconds), sleeping as much as is safe."""
        left = deadline - time.perf_counter()
        if left > self.WAKE:
            time.sleep(left - self.WAKE)
        while time.perf_counter() < deadline:
            pass

    def read(self, fd: int, length: int, offset: int) -> bytes:
        """pread, then wait out the device latency."""
        deadline = time.perf_counter() + self.latency
        data = os.pread(fd, length, offset)
        self.requests += 1
        self.wait_until(deadline)
        return data

    def readinto(self, fd: int, buf: memoryview, offset: int) -> int:
        """preadv into ``buf``, then wait out the device latency."""
        deadline = time.perf_counter() + self.latency
        got = os.preadv(fd, [buf], offset)
        self.requests += 1
        self.wait_until(deadline)
        return got

    def write(self, fd: int, pages: list[tuple[int, bytes]]) -> None:
        """A batch of page writes submitted together: one device latency for the batch."""
        deadline = time.perf_counter() + self.latency
        for offset, data in pages:
            os.pwrite(fd, data, offset)
        self.requests += 1
        self.wait_until(deadline)


def header(guest: int, file: int, index: int) -> bytes:
    """The first 16 bytes of a data page: which guest, file and page it is."""
    return struct.pack("<IIII", MAGIC, guest, file, index)


TEXT_CORPUS = 16 << 20  # bytes of the standard library's source the text data is cut from


def text_corpus() -> bytes:
    """Up to TEXT_CORPUS bytes of this interpreter's standard library source, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if size >= TEXT_CORPUS or "site-packages" in path.parts:
            continue
        try:
            part = path.read_bytes()
        except OSError:
            continue
        parts.append(part)
        size += len(part)
    return b"".join(parts)[:TEXT_CORPUS]


def make_files(
    directory: Path, guest: int, files: int, pages: int, data: str = "random"
) -> list[str]:
    """Create a guest's data files: ``files`` files of ``pages`` pages, each page self-naming.
    ``data``: what fills a page after its header, "random" (one random filler per guest) or
    "text" (a page's worth of standard library source, different for every page: data that
    compresses as files do, for runs with ``tmemd --compress``)."""
    filler = random.Random(guest).randbytes(PAGE - 16)
    corpus = text_corpus() if data == "text" else b""
    body = PAGE - 16
    paths = []
    for f in range(files):
        path = directory / f"guest{guest}-file{f}.dat"
        chunks = []
        for i in range(pages):
            if corpus:
                start = (((guest * files + f) * pages + i) * body) % (len(corpus) - body)
                chunks.append(header(guest, f, i) + corpus[start : start + body])
            else:
                chunks.append(header(guest, f, i) + filler)
        path.write_bytes(b"".join(chunks))
        paths.append(str(path))
    return paths


def accesses(
    pattern: str, seed: int, files: int, pages: int, run: int, count: int
) -> Iterator[tuple[int, int]]:
    """``count`` reads as (file, first page), each of ``run`` pages."""
    rng = random.Random(seed)
    starts = pages - run + 1
    if pattern == "uniform":
        for _ in range(count):
            yield rng.randrange(files), rng.randrange(starts)
    elif pattern == "zipf":
        chunks = [(f, c * run) for f in range(files) for c in range(pages // run)]
        rng.shuffle(chunks)  # hot chunks anywhere in the files
        weights = [1.0 / (rank + 1) for rank in range(len(chunks))]
        cdf = []
        total = 0.0
        for w in weights:
            total += w
            cdf.append(total)
        for _ in range(count):
            yield chunks[min(bisect.bisect(cdf, rng.random() * total), len(chunks) - 1)]
    elif pattern == "scan":
        position = rng.randrange(files * (pages // run))
        for _ in range(count):
            f, c = divmod(position % (files * (pages // run)), pages // run)
            position += 1
            yield f, c * run
    else:
        raise ValueError(f"unknown access pattern {pattern!r}")


def guest_main(stdin: TextIO, stdout: TextIO) -> int:
    """A guest: configure from the first line of stdin, then run commands until ``quit``."""
    cfg = json.loads(stdin.readline())
    precise_timers()
    disk = LatencyDisk(cfg["latency_us"])
    client = None
    pool = None
    if cfg["socket"]:
        client = tmemclient.connect(
            cfg["socket"],
            name=cfg["name"],
            frames=cfg["frames"],
            map_pages=cfg["map"],
            lend_memory=cfg["map"] and cfg["borrow"] > 0,
        )
        pool = client.new_pool(page_size=cfg["tmem_page_pages"] * PAGE)
    cache = PageCache(
        pool,
        cfg["capacity"],
        block_pages=cfg["block_pages"],
        readahead=cfg["readahead"],
        put_batch=cfg["put_batch"],
        disk_read=disk.read,
        disk_readinto=disk.readinto,
        overlap=cfg["overlap"],
        borrow=cfg["borrow"],
    )
    handles = [cache.open(path) for path in cfg["files"]]
    send(stdout, {"ready": True})
    for line in stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        send(stdout, run_reads(cache, client, handles, cfg, cmd))
    send(stdout, {"final": counters(cache, client)})
    cache.close()
    if client is not None:
        client.close()
    return 0


def send(stdout: TextIO, message: dict[str, Any]) -> None:
    """One JSON line to the parent."""
    stdout.write(json.dumps(message) + "\n")
    stdout.flush()


def counters(cache: PageCache, client: tmemclient.Client | None) -> dict[str, Any]:
    """The cache's counters, with the puts tmemd refused (answers the cache did not wait for)."""
    stats = cache.stats.as_dict()
    if client is not None:
        client.wait_deferred()  # every put answered: tmemd's counters are final too
        stats["puts_refused"] += client.deferred.refused
    return stats


def run_reads(
    cache: PageCache,
    client: tmemclient.Client | None,
    handles: list[Any],
    cfg: dict[str, Any],
    cmd: dict[str, Any],
) -> dict[str, Any]:
    """Perform one command's reads; verify every page; return the counters' change."""
    run = cfg["run"]
    guest = cfg["guest"]
    before = counters(cache, client)
    bad = 0
    samples = []
    cpu = time.process_time()
    started = time.monotonic()
    reads = accesses(cmd["pattern"], cmd["seed"], len(handles), cfg["pages"], run, cmd["reads"])
    for n, (f, first) in enumerate(reads):
        data = cache.read(handles[f], first * PAGE, run * PAGE)
        for k in range(run):
            if data[k * PAGE : k * PAGE + 16] != header(guest, f, first + k):
                bad += 1
        if n % 32 == 0:
            samples.append((time.monotonic(), cache.stats.disk_reads))
    samples.append((time.monotonic(), cache.stats.disk_reads))
    seconds = time.monotonic() - started
    cpu = time.process_time() - cpu
    after = counters(cache, client)
    delta = {k: after[k] - before[k] for k in after}
    delta["cpu_seconds"] = cpu
    return {
        "stats": delta,
        "seconds": seconds,
        "bad_pages": bad,
        "samples": samples,
        "backed_off": cache.sampling,
    }


if __name__ == "__main__":
    sys.exit(guest_main(sys.stdin, sys.stdout))
