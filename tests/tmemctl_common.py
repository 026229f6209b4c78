"""What the tmemctl tests share: the ``--json`` field names tmemctl documents
(docs/operations.md "tmemctl"), and running tmemctl's ``main`` in this process."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from tmemd.ctl.cli import main
from tmemd.ctl.client import ADMIN_SOCKET_ENV

# The --json field names tmemctl documents (docs/operations.md "tmemctl"): the daemon's keys.
STATUS_KEYS = {
    "state",
    "reattach_seconds",
    "kept_pools",
    "kept_pages",
    "resident",
    "overdrawn",
    "budget",
    "used",
    "free",
    "capacity",
    "guests",
    "sessions",
    "shared_pools",
    "evictions",
    "moved",
    "lent",
    "recalled",
    "frozen_all",
    "uptime",
    "packed",
    "deduped",
    "packed_bytes",
    "packed_waste",
}
COUNTER_KEYS = {"puts_ok", "puts_refused", "gets_hit", "gets_miss", "flushes", "evictions"}
GUEST_KEYS = {
    "resident_bytes",
    "overdrawn_bytes",
    "name",
    "kind",
    "sessions",
    "weight",
    "cap",
    "frozen",
    "mapped",
    "ephemeral_bytes",
    "persistent_bytes",
    "lent_bytes",
    "pages",
    "page_bytes",
    "ratio",
    "packed",
    "deduped",
    "packed_bytes",
    "packed_waste",
    "pools",
} | COUNTER_KEYS
POOL_KEYS = {
    "pool",
    "guest",
    "kind",
    "shared",
    "uuid",
    "name",
    "kept",
    "members",
    "page_size",
    "pages",
    "bytes",
} | COUNTER_KEYS
SHARES_KEYS = {"grants", "pools"}
GRANT_KEYS = {"uuid", "guest"}
SHARED_POOL_KEYS = {"uuid", "members", "pages"}


TOP_KEYS = {"time", "interval", "status", "guests"}
RATE_KEYS = {"hit_ratio", "evictions_per_s", "puts_per_s"}


@dataclass
class Run:
    """What one tmemctl run did."""

    code: int
    out: str
    err: str


def tmemctl(*args: str, sock: Path | str | None) -> Run:
    """tmemctl's ``main(args)`` in this process, with TMEM_ADMIN_SOCKET=sock (unset: None)."""
    out, err = io.StringIO(), io.StringIO()
    env = {} if sock is None else {ADMIN_SOCKET_ENV: str(sock)}
    with mock.patch.dict(os.environ, env):
        if sock is None:
            os.environ.pop(ADMIN_SOCKET_ENV, None)
        code = main(list(args), out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())
