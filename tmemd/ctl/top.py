"""``tmemctl top``: a refreshing view of guests with per-interval rates.

Every ``interval`` seconds top asks the daemon for ``status`` and ``guests`` and shows each
guest's rates since the sample before: hit ratio, evictions/s, puts/s (refused puts included).
As text it prints a status line and a table (on a tty the screen is cleared before each; else
tables are separated by a blank line). With ``--json`` it prints one JSON document per refresh,
on one line (JSON lines), never a screen control code::

    {"time": UNIX_SECONDS, "interval": SECONDS, "status": {...},
     "guests": [{...the daemon's guest row..., "rates": {"hit_ratio": 0.5 | null,
                 "evictions_per_s": 0.0, "puts_per_s": 12.0}}]}

``status`` and each guest row are the daemon's results unchanged (``tmemctl status --json``,
``tmemctl guests --json``); ``rates`` is top's own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

from tmemd.ctl.client import AdminClient
from tmemd.ctl.render import NONE, count, format_table, hit_ratio, ratio, size, yes

CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
COUNTERS: Final = ("puts_ok", "puts_refused", "gets_hit", "gets_miss", "evictions")
TOP_HEADERS: Final = (
    "NAME", "WEIGHT", "CAP", "FROZEN", "EPHEMERAL", "PERSISTENT", "LENT", "HIT%", "EVICT/S",
    "PUTS/S",
)  # fmt: skip


class Rates:
    """Per-guest counter deltas between two ``guests`` samples."""

    def __init__(self) -> None:
        self.previous: dict[str, Mapping[str, Any]] = {}
        self.when: float | None = None

    def update(self, rows: Sequence[Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
        """Each row of this sample with its ``rates`` since the previous sample (all None for
        the first sample)."""
        elapsed = None if self.when is None else max(now - self.when, 1e-9)
        out = []
        for r in rows:
            name = str(r.get("name"))
            before = self.previous.get(name, {})
            if any(int(r.get(k, 0)) < int(before.get(k, 0)) for k in COUNTERS):
                before = {}  # the account was dropped and recreated: its counters restarted
            rates: dict[str, float | None]
            if elapsed is None:
                rates = {"hit_ratio": None, "evictions_per_s": None, "puts_per_s": None}
            else:
                d = {k: int(r.get(k, 0)) - int(before.get(k, 0)) for k in COUNTERS}
                rates = {
                    "hit_ratio": hit_ratio(d["gets_hit"], d["gets_miss"]),
                    "evictions_per_s": d["evictions"] / elapsed,
                    "puts_per_s": (d["puts_ok"] + d["puts_refused"]) / elapsed,
                }
            out.append({**r, "rates": rates})
        self.previous = {str(r.get("name")): r for r in rows}
        self.when = now
        return out


def _per_second(value: float | None) -> str:
    return NONE if value is None else f"{value:.1f}"


def render_top(
    status: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], interval: float, clock: str
) -> str:
    """One refresh as text: the status line, then the table of guests (rows from ``Rates``)."""
    header = (
        f"tmemd  budget {size(status.get('budget'))}  used {size(status.get('used'))}"
        f"  free {size(status.get('free'))}  guests {count(status.get('guests'))}"
        f"  frozen all {yes(status.get('frozen_all'))}"
        f"  every {interval:g}s  {clock}"
    )
    body = [
        [
            str(r.get("name")),
            count(r.get("weight")),
            size(r.get("cap")),
            yes(r.get("frozen")),
            size(r.get("ephemeral_bytes")),
            size(r.get("persistent_bytes")),
            size(r.get("lent_bytes")),
            ratio(r["rates"]["hit_ratio"]),
            _per_second(r["rates"]["evictions_per_s"]),
            _per_second(r["rates"]["puts_per_s"]),
        ]
        for r in rows
    ]
    return f"{header}\n{format_table(TOP_HEADERS, body, left={'NAME', 'FROZEN'})}"


def top_document(
    status: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], interval: float, when: float
) -> str:
    """One refresh as a single-line JSON document (see the module's docstring)."""
    doc = {"time": round(when, 3), "interval": interval, "status": status, "guests": rows}
    return json.dumps(doc, separators=(",", ":"))


Sample = tuple[dict[str, Any], list[dict[str, Any]]]


def sampler(path: str, timeout: float) -> Callable[[], Sample]:
    """A function that asks tmemd at ``path`` for (status, guests), one connection each time
    (so a restarted daemon is found again, and a stopped one is an error at once)."""

    def sample() -> Sample:
        with AdminClient(path, timeout=timeout) as admin:
            return admin.call("status"), admin.call("guests")

    return sample


def run_top(
    sample: Callable[[], Sample],
    interval: float,
    iterations: int | None,
    out: TextIO,
    *,
    as_json: bool = False,
) -> None:
    """Print ``iterations`` refreshes (None: until Ctrl-C), one per ``interval`` seconds, of
    what ``sample`` returns. TmemError from ``sample`` propagates; Ctrl-C ends quietly."""
    clear = out.isatty() and not as_json
    rates = Rates()
    try:
        _, rows = sample()
        rates.update(rows, time.monotonic())
        shown = 0
        while iterations is None or shown < iterations:
            time.sleep(interval)
            status, rows = sample()
            now = time.time()
            with_rates = rates.update(rows, time.monotonic())
            if as_json:
                out.write(top_document(status, with_rates, interval, now) + "\n")
            else:
                if clear:
                    out.write(CLEAR_SCREEN)
                elif shown:
                    out.write("\n")
                clock = time.strftime("%H:%M:%S", time.localtime(now))
                out.write(render_top(status, with_rates, interval, clock) + "\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        if clear:
            out.write("\n")
