"""One phase of the benchmark: a fresh tmemd, the honest guest and the admin prober, the warm-up,
the attackers, the window in which everything is measured at the same moment, the recovery and
the final check. ``run_phase`` returns everything it measured (the JSON's ``phases`` entries)."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import tmemclient
from bench import servers
from bench.hostile.attacks import LABELS, ONSET, attack_main, attack_plan
from bench.hostile.children import Child
from bench.hostile.guests import admin_main, honest_main
from bench.hostile.measure import (
    derive_memory,
    kept,
    proc_fds,
    proc_memory,
    read_log,
    summary_ns,
    watch_daemon,
)
from bench.peers import say
from tmemclient.wire.errors import TmemError
from tmemd.ctl.client import AdminClient

# A tenant is its uid (turns, caps): run as root, the honest guest and the attackers are
# different tenants, as they would be on a real host. The mirror attacker stays root, tmemd's
# own uid: only there can it re-open its 0400 mirror read-write (docs/security.md).
HONEST_UID = 40001
ATTACKER_UID = 40000
HARD_LIMIT = 120.0  # seconds past its phase's end after which any child gives up on its own
REPLY_WAIT = 30.0  # seconds the orchestrator waits past a window for a child's answer (a hang)


def start_daemon(tmp: Path, phase: str, args: argparse.Namespace) -> servers.Server:
    sock, admin = tmp / f"{phase}.sock", tmp / f"{phase}.admin"
    argv = servers.tmemd_argv(sock, args.memory, admin)
    argv += ["--log-level", "info"]  # later options win: guest_disconnected gives the reasons
    argv += ["--socket-mode", "666"]  # guests run under their own uids (HONEST_UID, ...)
    return servers.start("tmemd", argv, sock, tmp / f"{phase}.log")


def wait_recovered(
    daemon: servers.Server, admin: Path, fds_before: int, timeout: float, sessions: int = 1
) -> dict[str, Any]:
    """After the attackers left: seconds until the daemon has ``sessions`` sessions (the honest
    guest, and the budget holder where there is one) and its fd count before the attack, within
    ``timeout``. The fd count is read before each admin connection is made (that connection
    costs the daemon an fd while it lasts)."""
    t0 = time.monotonic()
    status: dict[str, Any] = {}
    fds = -1
    sessions_at = fds_at = None
    while True:
        with contextlib.suppress(OSError):
            fds = proc_fds(daemon.pid)
        with contextlib.suppress(TmemError, OSError), AdminClient(admin, timeout=5) as ctl:
            status = ctl.call("status")
        elapsed = time.monotonic() - t0
        if sessions_at is None and status.get("sessions") == sessions:
            sessions_at = elapsed
        if fds_at is None and fds == fds_before:
            fds_at = elapsed
        done = status.get("sessions") == sessions and fds == fds_before
        if done or elapsed > timeout or daemon.proc.poll() is not None:
            return {
                "recovered": done,
                "seconds": elapsed,
                "sessions_back_s": sessions_at,
                "fds_back_s": fds_at,
                "fds": fds,
                "status": status,
            }
        time.sleep(0.05)


def fill_budget(
    daemon: servers.Server, name: str, budget: int, oid: int, seed: int, *, mapped: bool = False
) -> tuple[tmemclient.Client, int]:
    """A guest that fills the budget with ephemeral 64 KiB pages (object ``oid``, random bytes
    of ``seed``), its pages in its own mirror if ``mapped``; the connected client and the pages
    stored."""
    page = random.Random(seed).randbytes(64 << 10)
    pages = budget // len(page)
    client = tmemclient.connect(daemon.sock, name=name, frames=256, ring_frames=0, map_pages=mapped)
    stored = 0
    try:
        pool = client.new_pool(page_size=len(page))
        for start in range(0, pages, 64):
            items = [(oid, i, page) for i in range(start, min(pages, start + 64))]
            stored += sum(pool.put_many(items))
    except BaseException:
        client.close()
        raise
    return client, stored


def hold_budget(daemon: servers.Server, budget: int) -> tmemclient.Client:
    """A guest that fills the budget with ephemeral 64 KiB pages and stays connected: an attack
    that stores pages then evicts these one for one, so what tmemd holds per stored page (about
    200 bytes of a 64 KiB page's metadata) stays flat, and the memory measured is what the
    attacking connections cost. Close it to let go."""
    return fill_budget(daemon, "holder", budget, oid=2, seed=6)[0]


def warm_store(daemon: servers.Server, admin: Path, budget: int) -> dict[str, Any]:
    """Fill the budget once with 64 KiB pages from a guest that then leaves, and wait until
    the daemon has freed them: its per-slot metadata arrays are then grown to the whole budget
    before the figure taken before an attack, so the growth measured during the attack is what
    the attack costs, not the metadata of pages any guest may store within the budget. The
    guest maps its pages, as a first mapped guest makes the store keep generations for every
    slot (8 bytes each, once for the daemon's life): not what a mapped attacker costs."""
    with AdminClient(admin) as ctl:
        used_before = ctl.call("status")["used"]
    t0 = time.monotonic()
    client, stored = fill_budget(daemon, "warm-up", budget, oid=1, seed=5, mapped=True)
    client.close()
    filled = time.monotonic() - t0
    status: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with AdminClient(admin) as ctl:
            status = ctl.call("status")
        if status["used"] <= used_before and status["sessions"] == 1:
            break
        time.sleep(0.05)
    return {
        "pages_stored": stored,
        "fill_s": filled,
        "freed": status.get("used", -1) <= used_before,
        "total_s": time.monotonic() - t0,
    }


def run_phase(
    phase: str, tmp: Path, args: argparse.Namespace, ctx: multiprocessing.context.ForkContext
) -> dict[str, Any]:
    """One phase on a fresh daemon; everything it measured."""
    out: dict[str, Any] = {"phase": phase, "label": LABELS[phase], "problems": []}
    problems: list[str] = out["problems"]
    out["loadavg_at_start"] = os.getloadavg()
    daemon = start_daemon(tmp, phase, args)
    admin_sock = tmp / f"{phase}.admin"
    children: list[Child] = []
    attackers: list[Child] = []
    stop = ctx.Event()
    holder: tmemclient.Client | None = None
    try:
        honest = Child(
            ctx,
            "honest guest",
            honest_main,
            str(daemon.sock),
            args.keyspace,
            args.guest_ring_frames,
            uid=HONEST_UID,
        )
        children.append(honest)
        prober = Child(
            ctx,
            "admin prober",
            admin_main,
            str(admin_sock),
            args.admin_persistent,
            args.admin_interval,
        )
        children.append(prober)
        out["honest_rings"] = honest.expect("ready", 60)["rings"]
        prober.expect("ready", 30)
        if args.warm:
            out["warm_up"] = warm_store(daemon, admin_sock, args.memory)
            if not out["warm_up"]["freed"]:
                problems.append(f"the warm-up's pages were not freed: {out['warm_up']}")
        if phase == "heavy":
            holder = hold_budget(daemon, args.memory)
        time.sleep(0.3)
        fds_before = proc_fds(daemon.pid)
        mem_before = proc_memory(daemon.pid)
        out["daemon_before"] = {"fds": fds_before, "memory": mem_before}
        conns = 0
        phase_end = time.monotonic() + args.settle + args.seconds + 30
        if phase != "baseline":
            procs, per_proc, opts = attack_plan(phase, args)
            conns = procs * per_proc
            for p in range(procs):
                attackers.append(
                    Child(
                        ctx,
                        f"{phase} attacker {p}",
                        attack_main,
                        phase,
                        str(daemon.sock),
                        p,
                        per_proc,
                        stop,
                        phase_end + HARD_LIMIT,
                        opts,
                        uid=None if phase == "mirror" else ATTACKER_UID,
                    )
                )
            if phase in ONSET:
                say(f"{LABELS[phase]}: {conns} attacking connection(s) starting; measuring now")
            else:
                for child in attackers:
                    try:
                        out.setdefault("attacker_ready", []).append(child.expect("ready", 90))
                    except (TimeoutError, RuntimeError) as exc:
                        problems.append(f"{child.name} never got going: {exc}")
                say(f"{LABELS[phase]}: {conns} attacking connection(s) in full swing; settling")
                time.sleep(args.settle)
        out["attacking_connections"] = conns
        # The window: the honest guest, the admin prober and the samples, at the same moment.
        start = time.monotonic_ns() + 50_000_000
        stop_ns = start + int(args.seconds * 1e9)
        honest.send(("measure", start - int(0.2e9), start, stop_ns))
        prober.send(("measure", start, stop_ns))
        watched, exited = watch_daemon(
            daemon.pid, honest.proc.pid or 0, start, stop_ns, args.sample_interval
        )
        if exited:
            problems.append("tmemd exited during the measurement")
        out.update(watched)
        wait = args.seconds + REPLY_WAIT
        honest_raw: dict[str, Any] | None = None
        admin_raw: dict[str, Any] | None = None
        try:
            honest_raw = honest.expect("measured", wait)
        except TimeoutError:
            problems.append(
                f"HANG: the honest guest's get did not return within {wait:.0f}s of the window"
            )
        try:
            admin_raw = prober.expect("measured", wait)
        except TimeoutError:
            problems.append(f"HANG: admin status did not return within {wait:.0f}s")
        # The attack ends (and says when it reached its steady state, if it did not before).
        stop.set()
        for child in attackers:
            try:
                kind, value = child.recv(15)
                if kind == "ready":  # an onset phase did not wait for it
                    out.setdefault("attacker_ready", []).append(value)
                    kind, value = child.recv(15)
                out.setdefault("attackers", []).append(
                    value if kind == "done" else {"error": value}
                )
                if kind != "done":
                    problems.append(f"{child.name} failed:\n{value}")
            except (TimeoutError, RuntimeError) as exc:
                problems.append(f"{child.name}: {exc}")
        # An onset phase counts only what came before the attack's steady state.
        cut_ns = stop_ns
        steady = [r["t_ns"] for r in out.get("attacker_ready", []) if r]
        if phase in ONSET and steady and start < max(steady) < stop_ns:
            cut_ns = max(steady)
        out["window_s"] = (cut_ns - start) / 1e9
        if honest_raw is not None:
            lat = kept(honest_raw, cut_ns)
            out["honest"] = summary_ns(lat)
            out["honest"]["gets_per_s"] = len(lat) / out["window_s"]
            out["honest"]["bad_pages"] = honest_raw["bad"]
            out["honest"]["error"] = honest_raw["error"]
            if honest_raw["error"]:
                problems.append(f"honest guest failed: {honest_raw['error']}")
            if honest_raw["bad"]:
                problems.append(f"honest guest read {honest_raw['bad']} wrong page(s)")
        else:
            out["honest"] = None
        if admin_raw is not None:
            out["admin"] = summary_ns(kept(admin_raw, cut_ns))
            out["admin"]["errors"] = admin_raw["errors"]
            if admin_raw["errors"]:
                problems.append(f"admin status failed: {admin_raw['errors']}")
        else:
            out["admin"] = None
        for child in attackers:
            child.stop()
        attackers = []
        if phase != "baseline":
            rec = wait_recovered(
                daemon,
                admin_sock,
                fds_before,
                args.recovery_timeout,
                sessions=1 if holder is None else 2,
            )
            out["recovery"] = rec
            if not rec["recovered"]:
                problems.append(
                    f"not recovered {rec['seconds']:.1f}s after the attack: fds {rec['fds']} "
                    f"(before {fds_before}), sessions {rec['status'].get('sessions')}"
                )
        if daemon.proc.poll() is None:
            honest.send(("check",))
            try:
                checked = honest.expect("checked", 60)
                out["honest_check"] = checked
                if checked["bad"] or checked["error"]:
                    problems.append(f"honest guest's pages after the attack: {checked}")
            except (TimeoutError, RuntimeError) as exc:
                problems.append(f"honest guest's final check: {exc}")
            with contextlib.suppress(OSError):
                out["daemon_after"] = {
                    "fds": proc_fds(daemon.pid),
                    "memory": proc_memory(daemon.pid),
                }
        else:
            problems.append(f"tmemd DIED (exit status {daemon.proc.returncode})")
    finally:
        stop.set()
        # On an error or Ctrl-C a child may wait on a daemon that is going away: be brief.
        grace = 5.0 if sys.exc_info()[1] is None else 1.0
        if holder is not None:
            with contextlib.suppress(Exception):
                holder.close()
        for child in attackers + children:
            with contextlib.suppress(Exception):
                child.send(("close",))
        for child in attackers + children:
            child.stop(grace)
        exit_before_stop = daemon.proc.poll()
        servers.stop(daemon)
        out["daemon_exit"] = exit_before_stop
        out["loadavg_at_end"] = os.getloadavg()
        with contextlib.suppress(OSError):
            out["log"] = read_log(daemon.log)
            if out["log"]["error_count"]:
                problems.append(f"tmemd logged {out['log']['error_count']} error(s)")
            out["log_tail"] = servers.log_tail(daemon.log, 5).splitlines()
    derive_memory(out)
    return out
