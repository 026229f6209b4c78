"""tmemctl without a daemon: usage errors exit 2 before any request, --help, top's rates
computed from the counters, and the docs naming every --json field. Against a real tmemd:
tests/integration/test_tmemctl.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tmemctl_common import (
    GRANT_KEYS,
    GUEST_KEYS,
    POOL_KEYS,
    RATE_KEYS,
    SHARED_POOL_KEYS,
    SHARES_KEYS,
    STATUS_KEYS,
    TOP_KEYS,
    tmemctl,
)

from tmemd.ctl.top import Rates

ROOT = Path(__file__).resolve().parents[2]
GUEST = f"{os.getuid()}/vm1"  # in usage errors: never sent


def test_rates_are_the_counters_deltas_over_the_interval() -> None:
    rates = Rates()
    first = {"name": "a", "puts_ok": 10, "puts_refused": 0, "gets_hit": 5, "gets_miss": 5}
    (row,) = rates.update([{**first, "evictions": 2}], now=100.0)
    assert row["rates"] == {"hit_ratio": None, "evictions_per_s": None, "puts_per_s": None}
    assert row["name"] == "a" and row["puts_ok"] == 10  # the daemon's row, unchanged
    later = {"name": "a", "puts_ok": 16, "puts_refused": 2, "gets_hit": 8, "gets_miss": 5}
    (row,) = rates.update([{**later, "evictions": 6}], now=102.0)
    assert row["rates"] == {"hit_ratio": 1.0, "evictions_per_s": 2.0, "puts_per_s": 4.0}
    # The account was dropped and made again: its counters restarted, and count from zero.
    (row,) = rates.update([{"name": "a", "puts_ok": 3, "gets_hit": 1, "gets_miss": 3}], now=103.0)
    assert row["rates"] == {"hit_ratio": 0.25, "evictions_per_s": 0.0, "puts_per_s": 3.0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("share", "grant", "not-a-uuid", GUEST), "malformed pool uuid"),
        (("share", "revoke", "1234", GUEST), "malformed pool uuid"),
        (("set", GUEST, "--weight", "-3"), "weight must be"),
        (("set", GUEST, "--weight", "0"), "weight must be"),
        (("set", GUEST, "--weight", "99999999999"), "weight must be"),
        (("set", GUEST, "--weight", "2.5"), "weight must be an integer"),
        (("set", GUEST, "--cap", "12XB"), "cannot read size"),
        (("set", GUEST, "--cap", "-1"), "cannot read size"),
        (("budget", "lots"), "cannot read size"),
        (("budget", "1.5"), "not a whole number"),
        (("set", GUEST), "set needs --weight"),
        (("top", "--interval", "0"), "positive"),
        (("top", "--iterations", "0"), "positive integer"),
        (("top", "--json", "--interval", "x"), "want a number of seconds"),
        (("--timeout", "-1", "status"), "positive number of seconds"),
        (("share",), "required"),
        ((), "required"),
        (("frobnicate",), "invalid choice"),
        (("flush",), "required"),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    # No daemon at all: exit 2 (not 1) shows the check happened before any connection.
    run = tmemctl(*args, sock=tmp_path / "absent.sock")
    assert run.code == 2, run
    assert message in run.err, run.err
    assert "tmemctl" in run.err and "Traceback" not in run.err
    assert run.out == ""


def test_help_exits_0(tmp_path: Path) -> None:
    run = tmemctl("--help", sock=tmp_path / "absent.sock")
    assert run.code == 0 and run.err == ""
    assert "share" in run.out and "Exit codes: 0 ok" in run.out
    run = tmemctl("top", "--help", sock=None)
    assert run.code == 0 and "JSON document per refresh" in run.out


def test_docs_document_the_json_fields() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## tmemctl\n", 1)[1].split("\n## ", 1)[0]
    keys = STATUS_KEYS | GUEST_KEYS | POOL_KEYS | SHARES_KEYS | GRANT_KEYS | SHARED_POOL_KEYS
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"docs/operations.md's tmemctl section does not document {missing}"
    assert "`top --json`" in section and all(k in section for k in TOP_KEYS | RATE_KEYS)
