"""The capacity benchmark (bench/capacity.py) on tiny data sets against real tmemds: each data
set reads real pages of this machine, and a run gives the rows it promises. No timing
thresholds: pages held are exact (same-filled pages: 128 a slot), speeds only positive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from bench import capacity
from tmemd.compress import fill_word

PAGE = 4096


@pytest.mark.parametrize("name", capacity.SETS)
def test_each_data_set_gives_whole_pages_of_this_machine(name: str) -> None:
    pages = capacity.data_set(name, 32)
    assert len(pages) == 32 and all(len(p) == PAGE for p in pages)
    filled = sum(fill_word(p) is not None for p in pages)
    if name == "fill":
        assert filled == 32
    else:
        assert filled < 32  # real data: not all zero
        assert len(set(pages)) > 1


def test_file_pages_pad_each_tail_and_sample_is_fixed(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * (PAGE + 10))
    pages = list(capacity.file_pages(iter([tmp_path / "a", tmp_path / "missing"]), 10))
    assert pages == [b"x" * PAGE, b"x" * 10 + bytes(PAGE - 10)]
    many = [bytes([i]) * PAGE for i in range(100)]
    assert capacity.sample(iter(many), 10) == capacity.sample(iter(many), 10)
    assert len(set(capacity.sample(iter(many), 10))) == 10


def test_a_small_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    argv = [sys.executable, "-m", "bench.capacity", "--sets", "fill,py", "--compress", "off"]
    argv += ["--pages", "64", "--memory", "256KiB", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["set"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fill", "py"}
    assert rows["fill"]["pages_held"] == 64 * 128  # 64 slots of 128 words
    assert rows["py"]["pages_held"] == 64  # raw: a slot each
    assert rows["py"]["ratio"] == 1.0
    for row in rows.values():
        assert row["put_per_s"] > 0 and row["get_per_s"] > 0 and row["put_vs_off"] == 1.0
    assert "same-filled" in proc.stdout and "load average" in proc.stdout
