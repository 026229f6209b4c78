"""The evidence benchmark (python -m bench.workload) run small, as a process with its tmemd and
guest processes: its counts add up, every page it read was right, and repeated runs take the
first turn in turn. No timing assertions: the machine decides those. Its parts that need no
daemon (access patterns, the latency disk, the verdict): tests/unit/test_workload_parts.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.workload import report

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    *("--guests", "2", "--memory", "512KiB", "--local-pages", "48", "--files", "2"),
    *("--file-pages", "64", "--run", "4", "--block-pages", "4", "--put-batch", "16"),
    *("--phase-reads", "96", "--rounds", "2", "--busy-reads", "96", "--disk-latency-us", "20"),
    *("--swap-ram", "16", "--swap-pages", "64", "--swap-reads", "60"),
]


def run_small(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The runner on the SMALL setup (and ``args``), writing to ``tmp_path``; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.workload", *SMALL, *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_small_run_adds_up(tmp_path: Path) -> None:
    proc = run_small(tmp_path, "--scenarios", "phases,uniform,zipf,scan")
    assert "| phases | static | total |" in proc.stdout and "| file + tmem |" in proc.stdout
    assert "phase 4/4 (vm1 busy)" in proc.stderr  # progress goes to stderr
    result = json.loads((tmp_path / "workload.json").read_text())
    runs = {(r["scenario"], r["setup"]): r for r in result["cache"]}
    assert set(runs) == {(s, setup) for s in report.SCENARIOS for setup in ("static", "tmem")}
    for (scenario, setup), run in runs.items():
        assert run["problems"] == [], (scenario, setup)
        for row in [*run["rows"], run["total"]]:
            assert row["local_hits"] + row["tmem_hits"] + row["disk_reads"] == row["pages_read"]
            assert row["bad_pages"] == 0
        total = run["total"]
        assert total["pages_read"] == sum(r["pages_read"] for r in run["rows"])
        # 2 guests; phases: 2 rounds of 96 reads each, the others: 96 reads at once; 4 pages a read.
        reads = 2 * 2 * 96 * 4 if scenario == "phases" else 2 * 96 * 4
        assert total["pages_read"] == reads
        assert total["lent_hits"] <= total["local_hits"]  # pages kept in lent memory (§4.8)
        if setup == "static":
            assert total["tmem_hits"] == total["puts"] == total["tmem_gets"] == 0
            assert total["lends"] == total["lent_hits"] == 0
        else:
            assert total["lends"] > 0  # the tmem guests borrowed memory
        assert run["timeline"][-1][1] == total["disk_reads"]
    # Both setups read the same pages: the same accesses, only the memory differs.
    for scenario in report.SCENARIOS:
        assert (
            runs[scenario, "static"]["total"]["pages_read"]
            == runs[scenario, "tmem"]["total"]["pages_read"]
        )
    swaps = {s["setup"]: s for s in result["swap"]}
    assert swaps["file only"]["tmem_gets"] == 0 and swaps["file + tmem"]["tmem_gets"] > 0
    for s in swaps.values():
        assert s["bad_pages"] == 0
        assert s["loads"] == s["queue_hits"] + s["tmem_gets"] + s["swap_reads"]
    assert swaps["file + tmem"]["swap_reads"] < swaps["file only"]["swap_reads"]
    # Write-back writes to the file only what tmem refused; write-through writes every page.
    wb, wt = swaps["file + tmem write-back"], swaps["file + tmem"]
    assert wb["swap_writes"] == wb["tmem_puts_refused"] < wt["swap_writes"]
    assert wb["swap_writes_saved"] == wb["tmem_puts_ok"] > 0 and wb["tmem_lost"] == 0


def test_repeated_runs_take_the_first_turn_in_turn(tmp_path: Path) -> None:
    """Going first or second is not quite the same on a busy machine: with --repeats, static
    goes first in even runs and tmem in odd ones."""
    proc = run_small(tmp_path, "--no-swap", "--scenarios", "uniform", "--repeats", "2")
    runs = {
        (r["repeat"], r["setup"]): r
        for r in json.loads((tmp_path / "workload.json").read_text())["cache"]
    }
    assert runs[0, "static"]["began"] < runs[0, "tmem"]["began"]
    assert runs[1, "tmem"]["began"] < runs[1, "static"]["began"]
    assert "median of 2 runs" in proc.stdout
