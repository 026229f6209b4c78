"""What is measured, from outside the daemon: its memory, CPU time, run-queue wait and fds from
/proc, its log, and the summaries of the latencies the honest guest and the prober timed."""

from __future__ import annotations

import array
import contextlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.peers import percentile

# ---------------------------------------------------------------------- /proc


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and RssShmem of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_wait(pid: int) -> int:
    """Nanoseconds a process's main thread has spent runnable but waiting for a CPU."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])


def proc_fds(pid: int) -> int:
    """Descriptors a process holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def watch_daemon(
    pid: int, guest_pid: int, start_ns: int, stop_ns: int, interval: float
) -> tuple[dict[str, Any], bool]:
    """From ``start_ns`` to ``stop_ns`` (CLOCK_MONOTONIC): the daemon's memory every
    ``interval`` seconds, its CPU time (100 % = one core) and the share of the window it and the
    guest ``guest_pid`` were runnable but waiting for a CPU (the machine's contention, not the
    daemon's choice). Also whether the daemon exited meanwhile."""
    samples: list[dict[str, Any]] = []
    exited = False
    cpu0 = cpu1 = 0.0
    waits0 = waits1 = (0, 0)
    while time.monotonic_ns() < start_ns:
        time.sleep(0.005)
    with contextlib.suppress(OSError):
        cpu0 = proc_cpu(pid)
        waits0 = (proc_wait(pid), proc_wait(guest_pid))
    t_cpu0 = time.monotonic()
    while (now := time.monotonic_ns()) < stop_ns:
        try:
            mem = proc_memory(pid)
        except OSError:
            exited = True
            break
        samples.append({"t": (now - start_ns) / 1e9, **mem})
        time.sleep(min(interval, max(0.0, (stop_ns - now) / 1e9)))
    with contextlib.suppress(OSError):
        cpu1 = proc_cpu(pid)
        waits1 = (proc_wait(pid), proc_wait(guest_pid))
    elapsed = max(1e-9, time.monotonic() - t_cpu0)
    watched = {
        "daemon_cpu_fraction": (cpu1 - cpu0) / elapsed,
        "daemon_runq_fraction": (waits1[0] - waits0[0]) / 1e9 / elapsed,
        "honest_runq_fraction": (waits1[1] - waits0[1]) / 1e9 / elapsed,
        "memory_samples": samples,
    }
    return watched, exited


def derive_memory(out: dict[str, Any]) -> None:
    """Peak growth of RssAnon and VmRSS during the window over the figure before the attack,
    per attacking connection."""
    samples = out.get("memory_samples") or []
    before = (out.get("daemon_before") or {}).get("memory")
    if not samples or not before:
        out["memory"] = None
        return
    conns = out.get("attacking_connections") or 0
    mem: dict[str, Any] = {}
    for key in ("RssAnon", "VmRSS", "RssShmem"):
        peak = max(s[key] for s in samples)
        growth = peak - before[key]
        mem[key] = {"before": before[key], "peak": peak, "growth": growth}
        mem[key]["per_connection"] = growth / conns if conns else None
    out["memory"] = mem


# ---------------------------------------------------------------------- latencies


def kept(measured: dict[str, Any], before_ns: int) -> list[int]:
    """The latencies (ns) of the calls a child timed that started before ``before_ns``."""
    lat, starts = array.array("q"), array.array("q")
    lat.frombytes(measured["lat"])
    starts.frombytes(measured["t"])
    return [d for d, t in zip(lat, starts, strict=True) if t < before_ns]


def summary_ns(samples: list[int]) -> dict[str, Any]:
    """p50, p99 and max (milliseconds) of latencies in nanoseconds, and the count."""
    samples.sort()
    return {
        "count": len(samples),
        "p50_ms": percentile(samples, 50) / 1e6,
        "p99_ms": percentile(samples, 99) / 1e6,
        "max_ms": samples[-1] / 1e6 if samples else float("nan"),
        "slowest_ms": [s / 1e6 for s in samples[-10:]],
    }


# ---------------------------------------------------------------------- the daemon's log


def read_log(path: Path) -> dict[str, Any]:
    """What the daemon logged: events by name, errors, and why attackers' connections ended."""
    events: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    other: list[str] = []
    probe = True  # the launcher's readiness probe connects and closes before HELLO, once
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if line.strip():
                other.append(line[:300])
            continue
        event = str(record.get("event"))
        if probe and event == "handshake_refused" and "before HELLO" in str(record.get("reason")):
            probe = False
            continue
        events[event] += 1
        if record.get("level") in ("error", "critical") or "exception" in record:
            errors.append(record)
        if event == "guest_disconnected" and str(record.get("guest", "")).find("atk-") >= 0:
            reasons[str(record.get("reason"))[:120]] += 1
    return {
        "events": dict(events),
        "errors": errors[:20],
        "error_count": len(errors),
        "attacker_disconnect_reasons": dict(reasons),
        "non_json_lines": other[-20:],
    }
