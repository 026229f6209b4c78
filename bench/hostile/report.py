"""What a run says: issue #14's targets judged per attack, the table (values and ratios to the
baseline, the targets, notes on what each attacker did and how the daemon recovered) and the
JSON file holding everything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.hostile.attacks import LABELS, ONSET
from tmemclient.wire.units import format_size

# Targets of issue #14, under every attack.
GET_P99_TARGET_MS = 5.0
GET_MAX_TARGET_MS = 50.0
ADMIN_TARGET_MS = 100.0
MEM_TARGET = 1 << 20  # daemon bytes per attacking connection (RssAnon growth)


def judge(phase: dict[str, Any]) -> dict[str, Any]:
    """Issue #14's targets for one attack phase: {target: {"value", "met"}}."""
    honest, admin, mem = phase.get("honest"), phase.get("admin"), phase.get("memory")
    hang = any(p.startswith("HANG") for p in phase["problems"])
    dead = any("DIED" in p or "exited" in p for p in phase["problems"])
    out: dict[str, Any] = {}

    def put(name: str, value: float | None, limit: float, extra_fail: bool = False) -> None:
        met = value is not None and value == value and value <= limit and not extra_fail
        out[name] = {"value": value, "limit": limit, "met": met}

    failed = bool(honest and honest.get("error")) or hang or dead
    put("get_p99_ms", honest and honest["p99_ms"], GET_P99_TARGET_MS, failed)
    put("get_max_ms", honest and honest["max_ms"], GET_MAX_TARGET_MS, failed)
    admin_failed = bool(admin and admin.get("errors")) or hang or dead
    put("admin_max_ms", admin and admin["max_ms"], ADMIN_TARGET_MS, admin_failed)
    per_conn = mem["RssAnon"]["per_connection"] if mem else None
    put("mem_per_conn", per_conn, MEM_TARGET)
    return out


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base or value != value:
        return "-"
    return f"{value / base:.2f}"


def cell(value: float | None, base: float | None, scale: float, fmt: str) -> str:
    """A value and its ratio to the baseline, e.g. ``0.85 (x1.20)``."""
    if value is None or value != value:
        return "-"
    return f"{value * scale:{fmt}} (x{ratio(value, base)})"


def size_cell(value: float | None) -> str:
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    return sign + format_size(abs(int(value)))


def render(result: dict[str, Any]) -> str:
    """The table printed on stdout: a header, a row per phase, the targets, the notes."""
    meta = result["meta"]
    base = result["phases"].get("baseline") or {}
    bh, ba = base.get("honest") or {}, base.get("admin") or {}
    admin_kind = (
        "one persistent connection"
        if meta["admin_persistent"]
        else ("a fresh connection per call, as tmemctl")
    )
    lines = [
        f"tmem hostile-guest bench: {meta['seconds']} s window per phase after "
        f"{meta['settle']} s of attack, fresh tmemd per phase ({format_size(meta['memory'])} "
        f"budget), {meta['cpus']} cpus",
        f"load average at start {meta['loadavg_at_start'][0]:.2f}, at end "
        f"{meta['loadavg_at_end'][0]:.2f} (other work on the machine skews the numbers)",
        f"honest guest: tmemclient.connect (rings: {base.get('honest_rings', '?')}), single "
        f"4 KiB gets from a persistent pool of {meta['keyspace']} pages, closed loop",
        f"admin: status every {meta['admin_interval'] * 1000:.0f} ms over {admin_kind}",
        "",
    ]
    head = (
        f"{'phase':<24}{'conns':>6}{'gets/s':>9}  {'get p50 us':<17}{'get p99 us':<18}"
        f"{'get max ms':<18}{'status p50 ms':<16}{'status p99 ms':<16}{'status max ms':<17}"
        f"{'anon/conn':>10}{'rss/conn':>10}{'tmemd cpu':>10}{'runq d/g':>10}{'load':>11}"
    )
    lines += [head, "-" * len(head)]
    for name, ph in result["phases"].items():
        h, a, mem = ph.get("honest") or {}, ph.get("admin") or {}, ph.get("memory") or {}
        conns = ph.get("attacking_connections", 0)
        anon = (mem.get("RssAnon") or {}) if mem else {}
        rss = (mem.get("VmRSS") or {}) if mem else {}
        if conns:
            anon_s, rss_s = (
                size_cell(anon.get("per_connection")),
                size_cell(rss.get("per_connection")),
            )
        else:
            anon_s = f"+{size_cell(anon.get('growth'))}" if anon else "-"
            rss_s = f"+{size_cell(rss.get('growth'))}" if rss else "-"
        load = f"{ph['loadavg_at_start'][0]:.2f}-{ph['loadavg_at_end'][0]:.2f}"
        label = LABELS[name]
        if name in ONSET:
            label += f" {ph.get('window_s', 0):.1f}s"
        cpu = ph.get("daemon_cpu_fraction")
        rq_d, rq_g = ph.get("daemon_runq_fraction"), ph.get("honest_runq_fraction")
        runq = "-" if rq_d is None or rq_g is None else f"{rq_d:.0%}/{rq_g:.0%}"
        lines.append(
            f"{label:<24}{conns:>6}{h.get('gets_per_s', 0):>9,.0f}  "
            f"{cell(h.get('p50_ms'), bh.get('p50_ms'), 1000, '.0f'):<17}"
            f"{cell(h.get('p99_ms'), bh.get('p99_ms'), 1000, '.0f'):<18}"
            f"{cell(h.get('max_ms'), bh.get('max_ms'), 1, '.1f'):<18}"
            f"{cell(a.get('p50_ms'), ba.get('p50_ms'), 1, '.2f'):<16}"
            f"{cell(a.get('p99_ms'), ba.get('p99_ms'), 1, '.2f'):<16}"
            f"{cell(a.get('max_ms'), ba.get('max_ms'), 1, '.1f'):<17}"
            f"{anon_s:>10}{rss_s:>10}"
            f"{'-' if cpu is None else f'{cpu * 100:.0f}%':>10}{runq:>10}{load:>11}"
        )
    lines += [
        "(xN): ratio to the baseline (above 1 is slower). anon/conn, rss/conn: peak growth of "
        "tmemd's RssAnon / VmRSS in the window",
        "over the figure before the attack, per attacking connection (baseline row: the growth "
        "itself); VmRSS also counts stored pages (shmem).",
        "tmemd cpu: its CPU time over the window (100% = one core). runq d/g: share of the "
        "window tmemd's main thread / the honest guest",
        "was runnable but waiting for a CPU (contention on the machine, not the daemon's "
        "choice). load: 1-min load average at the phase's start and end.",
        "",
        f"targets (issue #14), under each attack: get p99 <= {GET_P99_TARGET_MS:g} ms, every "
        f"get <= {GET_MAX_TARGET_MS:g} ms, every admin status <= {ADMIN_TARGET_MS:g} ms, "
        f"daemon memory (RssAnon) <= {format_size(MEM_TARGET)} per attacking connection",
    ]
    for name, ph in result["phases"].items():
        if name == "baseline":
            continue
        t = ph["targets"]
        parts = []
        for key, label in (
            ("get_p99_ms", "get p99"),
            ("get_max_ms", "get max"),
            ("admin_max_ms", "status max"),
        ):
            v = t[key]["value"]
            shown = "-" if v is None else f"{v:.2f} ms"
            parts.append(f"{label} {shown} {'met' if t[key]['met'] else 'MISSED'}")
        m = t["mem_per_conn"]
        parts.append(f"memory {size_cell(m['value'])}/conn {'met' if m['met'] else 'MISSED'}")
        lines.append(f"  {LABELS[name]:<22} " + "; ".join(parts))
    missed = [
        f"{LABELS[n]}: {k}"
        for n, ph in result["phases"].items()
        if n != "baseline"
        for k, v in ph["targets"].items()
        if not v["met"]
    ]
    lines.append("ALL TARGETS MET" if not missed else f"MISSED: {'; '.join(missed)}")
    notes = []
    for name, ph in result["phases"].items():
        for problem in ph["problems"]:
            notes.append(f"  !! {LABELS[name]}: {problem.splitlines()[0]}")
        for att in ph.get("attackers", []):
            stats = att.get("stats")
            if stats is not None:
                shown = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items()))
                notes.append(f"  {LABELS[name]}: attacker did {shown}")
                for why, n in att.get("closed_because", {}).items():
                    notes.append(f"     closed/refused x{n}: {why}")
        for ready in ph.get("attacker_ready", []):
            if ready and ready.get("info"):
                notes.append(f"  {LABELS[name]}: attacker in full swing: {ready['info']}")
        before, after = ph.get("daemon_before"), ph.get("daemon_after")
        if name != "baseline" and before and after:
            kept_anon = after["memory"]["RssAnon"] - before["memory"]["RssAnon"]
            notes.append(
                f"  {LABELS[name]}: tmemd RssAnon once the attack had left: "
                f"{'+' if kept_anon >= 0 else '-'}{format_size(abs(kept_anon))} over before it"
            )
        rec = ph.get("recovery")
        if rec:
            notes.append(
                f"  {LABELS[name]}: after the attack, back to 1 session and "
                f"{ph['daemon_before']['fds']} fds in {rec['seconds']:.2f}s"
                if rec["recovered"]
                else f"  !! {LABELS[name]}: NOT back to baseline after {rec['seconds']:.1f}s"
            )
        log = ph.get("log") or {}
        interesting = {
            k: v
            for k, v in (log.get("events") or {}).items()
            if k not in ("guest_connected", "guest_disconnected", "fd_limit", "daemon_ready")
            and k not in ("daemon_stopping", "daemon_stopped", "shutdown")
        }
        if interesting:
            notes.append(f"  {LABELS[name]}: tmemd log events {interesting}")
        for why, n in (log.get("attacker_disconnect_reasons") or {}).items():
            notes.append(f"     tmemd logged an attacker's connection ending x{n}: {why}")
    if notes:
        lines += ["", "notes", *notes]
    return "\n".join(lines)


def write_json(result: dict[str, Any], table: str, path: Path) -> None:
    """Everything the run measured, with the table's lines, as JSON at ``path``."""
    result["table"] = table.splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
