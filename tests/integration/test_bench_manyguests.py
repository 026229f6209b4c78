"""Smoke test of the many-guest benchmark (bench/manyguests.py): a tiny run at N = 1 and 2 ends
cleanly and writes every row. No timing thresholds: only that each cell measured something."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the checkout (found upwards, so the file can move within tests/)
ROOT = next(
    p for p in Path(__file__).resolve().parents if (p / "bench" / "manyguests.py").is_file()
)
OPS = ("get", "put", "pair", "map", "put_batch", "get_batch")


@pytest.mark.slow
def test_manyguests_quick_run(tmp_path: Path) -> None:
    can_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    if shutil.which("memcached") is None and not can_install:
        pytest.skip("memcached is not installed and cannot be installed here (not root)")
    if importlib.util.find_spec("pymemcache") is None:
        pytest.skip("pymemcache is not installed (pip install -e '.[bench]')")
    out = tmp_path / "many.json"
    argv = [sys.executable, "-m", "bench.manyguests", "--quick", "--guests", "1,2"]
    argv += ["--seconds", "0.1", "--warmup", "0.05", "--keyspace", "256", "--memory", "256MiB"]
    argv += ["--memcached-mb", "64", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    if result["skipped"]:
        pytest.skip(f"memcached skipped: {result['skipped']}")
    assert result["sides"] == ["tmem", "memcached"]
    for op in OPS:
        for n in ("1", "2"):
            for side in ("tmem", "memcached"):
                cell = result["rows"][op][n][side]
                assert len(cell["runs"]) == 1
                median = cell["median"]
                assert median["ops_s"] > 0, (op, n, side)
                assert median["calls"] > 0 and median["p99_us"] >= median["p50_us"] > 0
                assert median["bad"] == 0, (op, n, side)
                assert median["server_cpu_us"] is not None
    for side in ("tmem", "memcached"):
        for method in ("get", "get_rr"):
            assert result["round_robin"][side][method]["median"]["ops_s"] > 0
    assert len(result["targets"]) == 8
    assert all(t["met"] in (True, False) for t in result["targets"])
    assert "targets (issue #16)" in proc.stdout
