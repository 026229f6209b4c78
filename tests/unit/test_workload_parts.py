"""Parts of the evidence benchmark (bench/workload) that need no daemon: the access patterns
stay inside the files, the latency disk reads and writes the file, and the verdict goes by the
median of repeated runs. The benchmark run small against tmemd:
tests/integration/test_workload.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.workload import guest, report, runner


def test_access_patterns_stay_inside_the_files() -> None:
    for pattern in runner.PATTERNS:
        reads = list(guest.accesses(pattern, 7, files=3, pages=40, run=4, count=500))
        assert len(reads) == 500
        assert all(0 <= f < 3 and 0 <= first <= 36 for f, first in reads)
    scan = list(guest.accesses("scan", 1, files=2, pages=16, run=4, count=8))
    assert len(set(scan)) == 8  # a scan visits every run once before it repeats


def test_the_latency_disk_reads_what_is_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"a" * 4096 + b"b" * 4096)
    fd = os.open(tmp_path / "f", os.O_RDWR)
    try:
        disk = guest.LatencyDisk(50)
        assert disk.read(fd, 4096, 4096) == b"b" * 4096
        disk.write(fd, [(0, b"c" * 4096), (4096, b"d" * 4096)])
        assert os.pread(fd, 8192, 0) == b"c" * 4096 + b"d" * 4096
        assert disk.requests == 2
    finally:
        os.close(fd)


def test_the_verdict_goes_by_the_median_of_repeated_runs() -> None:
    def run(scenario: str, setup: str, repeat: int, seconds: float, disk: int) -> dict[str, Any]:
        total = {"seconds": seconds, "disk_reads": disk}
        return {"scenario": scenario, "setup": setup, "repeat": repeat, "total": total}

    results = []
    for n, (static, tmem) in enumerate([(1.0, 1.20), (1.0, 1.04), (1.0, 1.02)]):
        results += [run("uniform", "static", n, static, 100), run("uniform", "tmem", n, tmem, 90)]
    (line,) = report.verdicts(results)
    assert "(1.20x)" in line  # the first run's own figures
    assert "median of 3 runs 1.04x (1.20, 1.04, 1.02)" in line
    assert line.endswith("target (<= 1.05x): MET")
    # One run: its ratio is the verdict, as before, with a word on how to get a sounder one.
    (line,) = report.verdicts(results[:2])
    assert "median" not in line
    assert line.endswith("NOT MET (one run; for a verdict: --scenarios uniform --repeats 21)")


def test_text_data_pages_name_themselves_and_hold_distinct_source(tmp_path: Path) -> None:
    paths = guest.make_files(tmp_path, 1, 2, 8, "text")
    page = guest.PAGE
    pages = [Path(p).read_bytes()[i * page : (i + 1) * page] for p in paths for i in range(8)]
    assert all(len(p) == page for p in pages)
    assert [p[:16] for p in pages] == [guest.header(1, f, i) for f in range(2) for i in range(8)]
    bodies = [p[16:] for p in pages]
    assert len(set(bodies)) == len(bodies)  # every page different
    assert all(b.count(b" ") > 100 for b in bodies)  # source text, not random bytes
    (tmp_path / "r").mkdir()
    (random_file,) = guest.make_files(tmp_path / "r", 1, 1, 2)  # the default: one filler
    data = Path(random_file).read_bytes()
    assert data[16:page] == data[page + 16 :] and data[16:].count(b" ") < 100
