"""tmemctl's text output: the daemon's results as aligned tables and ``key  value`` lines, and
the one-line summaries of write commands. Pure functions of the results; no I/O.

Figures are right-aligned, names left-aligned; sizes are human-readable (``format_size``) and a
missing value is ``-``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

from tmemclient.wire.units import format_size

NONE: Final = "-"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[str] = ()
) -> str:
    """Aligned columns, two spaces apart: the ``left`` columns left-aligned, the others (figures)
    right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if headers[i] in left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


# ------------------------------------------------------------------------------ cells


def size(value: Any) -> str:
    """Bytes, human-readable; ``-`` for None (no cap)."""
    return NONE if value is None else format_size(int(value))


def yes(value: Any) -> str:
    """A flag."""
    return "yes" if value else "no"


def ratio(value: float | None) -> str:
    """A fraction as a percentage; ``-`` when there was nothing to divide."""
    return NONE if value is None else f"{100.0 * value:.1f}%"


def times(value: float | None) -> str:
    """A ratio of sizes, as ``2.53x`` (``-`` for none)."""
    return NONE if value is None else f"{value:.2f}x"


def hit_ratio(hits: float, misses: float) -> float | None:
    """hits / (hits + misses); None without any get."""
    total = hits + misses
    return None if total <= 0 else hits / total


def duration(seconds: float) -> str:
    """``12.5s``, ``3m 07s``, ``2h 05m 09s``, ``4d 1h 02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def count(value: Any) -> str:
    """A number as it is; ``-`` for None."""
    return NONE if value is None else str(value)


# ------------------------------------------------------------------------------ read commands


_STATUS_FORMAT: Final[dict[str, Callable[[Any], str]]] = {
    "budget": size,
    "used": size,
    "free": size,
    "capacity": size,
    "moved": size,
    "lent": size,
    "recalled": size,
    "resident": size,
    "overdrawn": size,
    "packed_bytes": size,
    "packed_waste": lambda v: f"{float(v):.1%}",
    "frozen_all": yes,
    "uptime": lambda v: duration(float(v)),
    "state": lambda v: state(v),
}


def state(value: Any) -> str:
    """What the start did with its state directory (``status``'s ``state``)."""
    if not value:
        return "none (pages die with the daemon; tmemd --state-dir keeps them)"
    if value.get("adopted"):
        return (
            f"adopted {value.get('pages')} pages ({size(value.get('bytes'))}) of "
            f"{value.get('pools')} pools in {float(value.get('seconds', 0)):.3f}s from "
            f"{value.get('dir')}"
        )
    return f"started empty: {value.get('reason')} ({value.get('dir')})"


def render_status(status: Mapping[str, Any]) -> str:
    """``status`` as ``key  value`` lines (sizes human-readable)."""
    labels = {key: key.replace("_", " ") for key in status}
    width = max((len(label) for label in labels.values()), default=0)
    return "\n".join(
        f"{labels[key].ljust(width)}  {_STATUS_FORMAT.get(key, count)(value)}"
        for key, value in status.items()
    )


def render_guests(rows: Sequence[Mapping[str, Any]]) -> str:
    """``guests`` as a table."""
    headers = (
        "NAME", "KIND", "SESS", "WEIGHT", "CAP", "FROZEN", "MAPPED", "EPHEMERAL", "PERSISTENT",
        "LENT", "PAGES", "PACKED", "RATIO", "POOLS", "PUTS", "REFUSED", "HIT%", "EVICTED",
    )  # fmt: skip
    body = [
        [
            str(r.get("name")),
            str(r.get("kind", NONE)),
            count(r.get("sessions")),
            count(r.get("weight")),
            size(r.get("cap")),
            yes(r.get("frozen")),
            yes(r.get("mapped")),
            size(r.get("ephemeral_bytes")),
            size(r.get("persistent_bytes")),
            size(r.get("lent_bytes")),
            count(r.get("pages")),
            count(r.get("packed")),
            times(r.get("ratio")),
            count(r.get("pools")),
            *stats_cells(r),
        ]
        for r in rows
    ]
    return (
        format_table(headers, body, left={"NAME", "KIND", "FROZEN", "MAPPED"})
        if body
        else "no guests"
    )


def stats_cells(r: Mapping[str, Any]) -> list[str]:
    """PUTS, REFUSED, HIT%, EVICTED of a guest's or a pool's row."""
    return [
        count(r.get("puts_ok")),
        count(r.get("puts_refused")),
        ratio(hit_ratio(r.get("gets_hit", 0), r.get("gets_miss", 0))),
        count(r.get("evictions")),
    ]


def render_uids(rows: Sequence[Mapping[str, Any]]) -> str:
    """``uids`` as a table."""
    headers = (
        "UID", "GUESTS", "SESS", "CAP", "MAXCONN", "EPHEMERAL", "PERSISTENT", "LENT", "HELD",
    )  # fmt: skip
    body = [
        [
            str(r.get("uid")),
            ",".join(r.get("guests") or []) or NONE,
            count(r.get("sessions")),
            size(r.get("cap")),
            count(r.get("max_connections")),
            size(r.get("ephemeral_bytes")),
            size(r.get("persistent_bytes")),
            size(r.get("lent_bytes")),
            size(r.get("held_bytes")),
        ]
        for r in rows
    ]
    return format_table(headers, body, left={"GUESTS"}) if body else "no uids"


def render_pools(rows: Sequence[Mapping[str, Any]]) -> str:
    """``pools`` as a table."""
    headers = (
        "POOL", "GUEST", "KIND", "UUID", "MEMBERS", "PAGE", "PAGES", "BYTES",
        "PUTS", "REFUSED", "HIT%", "EVICTED",
    )  # fmt: skip
    body = [
        [
            count(r.get("pool")),
            str(r.get("guest")),
            str(r.get("kind"))
            + (" shared" if r.get("shared") else "")
            + (" kept" if r.get("kept") else ""),
            str(r.get("uuid") or (f"name={r['name']}" if r.get("name") else NONE)),
            ",".join(r.get("members") or ()) if r.get("shared") else NONE,
            size(r.get("page_size")),
            count(r.get("pages")),
            size(r.get("bytes")),
            *stats_cells(r),
        ]
        for r in rows
    ]
    return (
        format_table(headers, body, left={"GUEST", "KIND", "UUID", "MEMBERS"})
        if body
        else "no pools"
    )


def render_shares(shares: Mapping[str, Any]) -> str:
    """``share list``: the grants, then the live shared pools."""
    grants = [[str(g["uuid"]), str(g["guest"])] for g in shares.get("grants", [])]
    pools = [
        [str(p["uuid"]), ",".join(p.get("members") or ()) or NONE, count(p.get("pages"))]
        for p in shares.get("pools", [])
    ]
    return "\n".join(
        [
            "grants:",
            format_table(("UUID", "GUEST"), grants, left={"UUID", "GUEST"}) if grants else "(none)",
            "",
            "shared pools:",
            format_table(("UUID", "MEMBERS", "PAGES"), pools, left={"UUID", "MEMBERS"})
            if pools
            else "(none)",
        ]
    )


# ------------------------------------------------------------------------------ write commands


def describe_set(result: Mapping[str, Any]) -> str:
    """What ``set`` did, in one line."""
    if "uid" in result:
        evicted = result.get("evicted", 0)
        return f"uid {result['uid']}: cap {size(result.get('cap'))}" + (
            f"; evicted {evicted} pages to fit the cap" if evicted else ""
        )
    name = result.get("name")
    text = f"{name}: weight {count(result.get('weight'))}, cap {size(result.get('cap'))}"
    if result.get("connected") is False:
        if str(name).startswith("shared:"):
            return text + " (not open: applies when a member opens it)"
        return text + " (not connected: applies when it connects)"
    evicted = result.get("evicted", 0)
    return text + (f"; evicted {evicted} pages to fit the cap" if evicted else "")


def describe_freeze(names: Sequence[str], guest: str | None, frozen: bool) -> str:
    """What ``freeze``/``thaw`` did, in one line."""
    verb = "frozen" if frozen else "thawed"
    if guest is not None:
        return f"{verb}: {guest}"
    listed = ", ".join(names) if names else "no guest connected"
    scope = " (and guests that connect from now on)" if frozen else ""
    return f"{verb} every guest{scope}: {listed}"


def describe_budget(result: Mapping[str, Any]) -> str:
    """What ``budget`` did, in one line (its warning goes to stderr, separately)."""
    return (
        f"budget {size(result.get('budget'))}, used {size(result.get('used'))}; "
        f"evicted {result.get('evicted', 0)} pages"
    )
