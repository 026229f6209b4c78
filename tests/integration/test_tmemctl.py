"""tmemctl, the admin CLI, against a real tmemd with an admin socket: the read commands and
their --json, the write commands (set, freeze/thaw, flush, budget, share), top, the errors a
daemon's answer or its absence gives, where the admin socket is looked for, and a non-admin
uid refused. Usage errors, --help, top's rates and the documented fields need no daemon:
tests/unit/test_tmemctl_cli.py.

Most tests call tmemctl's ``main(argv)`` in this process (its output captured) against one tmemd
the whole module shares: each test connects under its own guest name and waits for it to leave,
and undoes what it changes daemon-wide (budget, freeze-all, grants); the ``admin`` fixture checks
that it did. A few run tmemctl as a process, for what only a process shows: exit codes through
the console script, ``top``'s output on a pipe and on a terminal, Ctrl-C, another uid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon
from tmemctl_common import (
    GUEST_KEYS,
    POOL_KEYS,
    RATE_KEYS,
    SHARED_POOL_KEYS,
    SHARES_KEYS,
    STATUS_KEYS,
    TOP_KEYS,
    tmemctl,
)

import tmemclient
from tmemd.ctl.cli import admin_socket_path
from tmemd.ctl.client import ADMIN_SOCKET_ENV, DEFAULT_ADMIN_SOCKET, AdminClient

RUN_TIMEOUT = 30.0
PAGE = 4096
BUDGET = 16 << 20
GUEST = f"{os.getuid()}/vm1"  # in usage errors: never sent
NOBODY = 65534

# ------------------------------------------------------------------------------ running tmemctl


def tmemctl_process(
    *args: str,
    sock: Path | str | None,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """tmemctl as a process (``python -m tmemd.ctl.cli`` unless ``command``) with
    TMEM_ADMIN_SOCKET=sock; bounded in time."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.pop(ADMIN_SOCKET_ENV, None)
    if sock is not None:
        full_env[ADMIN_SOCKET_ENV] = str(sock)
    full_env.update(env or {})
    return subprocess.run(
        [*(command or [sys.executable, "-m", "tmemd.ctl.cli"]), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=full_env,
        cwd=ROOT,
        check=False,
        **kw,
    )


def ok(*args: str, sock: Path) -> str:
    """Run tmemctl, insist on exit 0 and nothing on stderr, return stdout."""
    run = tmemctl(*args, sock=sock)
    assert (run.code, run.err) == (0, ""), (args, run)
    return run.out


def ok_json(*args: str, sock: Path) -> Any:
    """Run tmemctl ... --json and parse what it printed."""
    return json.loads(ok(*args, "--json", sock=sock))


# ------------------------------------------------------------------------------ the daemon


@dataclass
class Admin:
    """A tmemd with an admin socket."""

    daemon: Daemon
    socket: Path


@dataclass
class Guest:
    """A guest connected to the shared daemon, and its name as tmemctl shows it."""

    client: tmemclient.Client
    name: str


def private_dir(path: Path) -> Path:
    """A 0700 directory, as tmemd wants around its admin socket."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def start_admin(workdir: Path) -> Admin:
    """tmemd (16 MiB) with an admin socket in a private directory."""
    sock = private_dir(workdir / "admin") / "admin.sock"
    return Admin(Daemon(workdir, "--memory", "16MiB", "--admin-socket", str(sock)), sock)


@pytest.fixture(scope="module")
def shared_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    """One tmemd for the module's tests."""
    admin = start_admin(tmp_path_factory.mktemp("tmemctl"))
    try:
        yield admin
        assert admin.daemon.alive, f"tmemd died:\n{admin.daemon.log_text()}"
    finally:
        admin.daemon.stop()


def admin_call(admin: Admin, op: str, **args: Any) -> Any:
    with AdminClient(admin.socket, timeout=RUN_TIMEOUT) as client:
        return client.call(op, **args)


@pytest.fixture
def admin(shared_admin: Admin) -> Iterator[Admin]:
    """The shared tmemd; after the test, it must be as every test finds it."""
    yield shared_admin
    assert shared_admin.daemon.alive, f"tmemd died:\n{shared_admin.daemon.log_text()}"
    status = admin_call(shared_admin, "status")
    assert (status["budget"], status["frozen_all"], status["guests"]) == (BUDGET, False, 0)
    assert admin_call(shared_admin, "shares") == {"grants": [], "pools": []}


_serial = itertools.count(1)


def wait_gone(admin: Admin, name: str) -> None:
    """Until tmemd has dropped guest ``name``'s account (it notices the close); bounded."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while any(r["name"] == name for r in admin_call(admin, "guests")):
        assert time.monotonic() < deadline, f"guest {name} still listed"
        time.sleep(0.01)


@pytest.fixture
def guest(admin: Admin) -> Iterator[Guest]:
    """A guest of its own name (vmN) connected to the shared daemon, gone after the test."""
    short = f"vm{next(_serial)}"
    name = f"{os.getuid()}/{short}"
    try:
        with tmemclient.connect(admin.daemon.socket, name=short) as client:
            yield Guest(client, name)
    finally:
        wait_gone(admin, name)


def guest_row(sock: Path, name: str) -> dict[str, Any]:
    """``guests --json``'s row for ``name``."""
    rows = ok_json("guests", sock=sock)
    (row,) = [r for r in rows if r["name"] == name]
    return dict(row)


def page(n: int) -> bytes:
    """A recognisable 4 KiB page."""
    return bytes([n % 251]) * (PAGE - 1) + b"\xff"  # not same-filled: a slot each (§6.11)


# ------------------------------------------------------------------------------ read commands


def test_status_table_and_json(admin: Admin) -> None:
    out = ok("status", sock=admin.socket)
    assert re.search(r"^budget\s+16\.0MiB$", out, re.M), out
    assert re.search(r"^frozen all\s+no$", out, re.M), out
    assert re.search(r"^moved\s+0B$", out, re.M), out
    status = ok_json("status", sock=admin.socket)
    assert set(status) == STATUS_KEYS
    assert status["budget"] == BUDGET
    assert status["guests"] == 0
    # --json is a global option too, and works before the command
    assert json.loads(ok("--json", "status", sock=admin.socket)).keys() == STATUS_KEYS


def test_guests_and_pools(admin: Admin, guest: Guest) -> None:
    eph = guest.client.new_pool()
    per = guest.client.new_pool(persistent=True)
    for i in range(4):
        assert eph.put(1, i, page(i))
        assert per.put(2, i, page(i))
    assert eph.get(1, 0) == page(0)
    assert eph.get(1, 99) is None

    out = ok("guests", sock=admin.socket)
    header, *lines = out.splitlines()
    assert header.split()[:5] == ["NAME", "KIND", "SESS", "WEIGHT", "CAP"]
    (line,) = lines
    assert line.split()[0] == guest.name
    assert "16.0KiB" in line  # persistent bytes, via format_size
    assert "50.0%" in line  # hit rate: one hit, one miss
    assert line.split()[4] == "-"  # no cap

    (row,) = ok_json("guests", sock=admin.socket)
    assert set(row) == GUEST_KEYS
    assert row["name"] == guest.name and row["persistent_bytes"] == 4 * PAGE
    assert row["ephemeral_bytes"] == 3 * PAGE and row["cap"] is None

    pools = ok_json("pools", guest.name, sock=admin.socket)
    assert [p["kind"] for p in pools] == ["ephemeral", "persistent"]
    assert all(set(p) == POOL_KEYS for p in pools)
    assert pools[1]["bytes"] == 4 * PAGE and pools[1]["members"] == [guest.name]
    out = ok("pools", sock=admin.socket)
    assert out.splitlines()[0].split()[:3] == ["POOL", "GUEST", "KIND"]
    assert "persistent" in out and "ephemeral" in out
    assert ok_json("pools", sock=admin.socket) == pools


def test_uids_table_and_json(admin: Admin, guest: Guest) -> None:
    assert guest.client.new_pool(persistent=True).put(1, 0, page(1))
    (row,) = [r for r in ok_json("uids", sock=admin.socket) if r["uid"] == os.getuid()]
    assert row["guests"] == [guest.name]
    assert (row["persistent_bytes"], row["held_bytes"], row["cap"]) == (PAGE, PAGE, None)
    header, *lines = ok("uids", sock=admin.socket).splitlines()
    assert header.split() == [
        "UID", "GUESTS", "SESS", "CAP", "MAXCONN", "EPHEMERAL", "PERSISTENT", "LENT", "HELD",
    ]  # fmt: skip
    (line,) = [ln for ln in lines if ln.split()[0] == str(os.getuid())]
    assert line.split()[1:4] == [guest.name, "1", "-"]


# ------------------------------------------------------------------------------ write commands


def test_set_weight_and_cap(admin: Admin, guest: Guest) -> None:
    name = guest.name
    out = ok("set", name, "--weight", "7", "--cap", "1MiB", sock=admin.socket)
    assert "weight 7" in out and "1.0MiB" in out
    row = guest_row(admin.socket, name)
    assert (row["weight"], row["cap"]) == (7, 1 << 20)

    ok("set", name, "--cap", "512K", sock=admin.socket)
    assert guest_row(admin.socket, name)["cap"] == 512 << 10
    ok("set", name, "--cap", "65536", sock=admin.socket)
    assert guest_row(admin.socket, name)["cap"] == 65536
    result = ok_json("set", name, "--cap", "none", sock=admin.socket)
    assert result["cap"] is None and result["weight"] == 7
    row = guest_row(admin.socket, name)
    assert (row["weight"], row["cap"]) == (7, None)
    ok("set", name, "--weight", "1", sock=admin.socket)
    assert guest_row(admin.socket, name)["weight"] == 1


def test_set_before_the_guest_connects_applies_when_it_does(admin: Admin) -> None:
    short = f"later{next(_serial)}"
    name = f"{os.getuid()}/{short}"
    # Not connected, not in the config: unknown (nothing to set) ...
    assert tmemctl("set", name, "--weight", "9", sock=admin.socket).code == 1
    # ... but a uid's cap can be set ahead of its guests.
    uid = 40000 + next(_serial)
    assert ok("set", f"uid:{uid}", "--cap", "1MiB", sock=admin.socket) == f"uid {uid}: cap 1.0MiB\n"
    (row,) = [r for r in ok_json("uids", sock=admin.socket) if r["uid"] == uid]
    assert (row["cap"], row["guests"]) == (1 << 20, [])


def test_freeze_and_thaw(admin: Admin, guest: Guest) -> None:
    name = guest.name
    pool = guest.client.new_pool()
    assert pool.put(1, 0, page(0))

    assert ok("freeze", name, sock=admin.socket) == f"frozen: {name}\n"
    assert guest_row(admin.socket, name)["frozen"] is True
    assert pool.put(1, 1, page(1)) is False
    # Puts fail; reads, in-place writes (they take no memory) and flushes proceed.
    assert pool.put_many([(1, 1, page(1)), (1, 2, page(2))]) == [False, False]
    assert pool.read(1, 0, 0, 16) == page(0)[:16]
    assert pool.write(1, 0, 0, b"frozen, written") is True
    assert pool.xchg(1, 0, 0, b"F") == b"f"
    assert pool.read(1, 0, 0, 15) == b"Frozen, written"
    assert pool.write(1, 1, 0, b"x") is False  # no page there: nothing is made
    assert ok("thaw", name, sock=admin.socket) == f"thawed: {name}\n"
    assert guest_row(admin.socket, name)["frozen"] is False
    assert pool.put(1, 1, page(1)) is True

    # no GUEST: every guest
    try:
        out = ok("freeze", sock=admin.socket)
        assert out == f"frozen every guest (and guests that connect from now on): {name}\n"
        assert ok_json("status", sock=admin.socket)["frozen_all"] is True
        assert pool.put(1, 2, page(2)) is False
    finally:
        thawed = ok_json("thaw", sock=admin.socket)
    assert thawed == [name]
    assert ok_json("status", sock=admin.socket)["frozen_all"] is False
    assert pool.put(1, 2, page(2)) is True


def test_flush_drops_only_ephemeral_pages(admin: Admin, guest: Guest) -> None:
    eph = guest.client.new_pool()
    per = guest.client.new_pool(persistent=True)
    for i in range(5):
        assert eph.put(1, i, page(i))
        assert per.put(1, i, page(i + 100))

    out = ok("flush", guest.name, sock=admin.socket)
    assert out == f"flushed 5 ephemeral pages of {guest.name}\n"
    assert all(eph.get(1, i) is None for i in range(5))
    assert all(per.get(1, i) == page(i + 100) for i in range(5))
    row = guest_row(admin.socket, guest.name)
    assert (row["ephemeral_bytes"], row["persistent_bytes"]) == (0, 5 * PAGE)
    assert ok_json("flush", guest.name, sock=admin.socket) == {"pages_flushed": 0}


def test_budget_below_persistent_usage_warns_and_keeps_pages(admin: Admin, guest: Guest) -> None:
    per = guest.client.new_pool(persistent=True)
    for i in range(20):  # 80 KiB persistent
        assert per.put(7, i, page(i))

    try:
        run = tmemctl("budget", "40K", sock=admin.socket)
        assert run.code == 0, run.err
        assert run.err.startswith("tmemctl: warning: "), run.err
        assert "persistent" in run.err
        assert "budget 40.0KiB" in run.out
        assert ok_json("status", sock=admin.socket)["budget"] == 40 << 10
        assert all(per.get(7, i) == page(i) for i in range(20))
    finally:
        run = tmemctl("budget", "16MiB", sock=admin.socket)
    assert (run.code, run.err) == (0, "")
    assert run.out == "budget 16.0MiB, used 80.0KiB; evicted 0 pages\n"
    assert ok_json("status", sock=admin.socket)["budget"] == BUDGET


def test_share_grant_list_revoke(admin: Admin, guest: Guest) -> None:
    shared_uuid, name = str(uuid.uuid4()), guest.name
    with pytest.raises(tmemclient.PermissionDenied):
        guest.client.new_pool(shared=True, uuid=shared_uuid)
    out = ok("share", "grant", shared_uuid, name, sock=admin.socket)
    assert out == f"granted shared pool {shared_uuid} to {name}\n"
    try:
        shared = guest.client.new_pool(shared=True, uuid=shared_uuid)
        assert shared.put(3, 0, page(3))
        listing = ok_json("share", "list", sock=admin.socket)
        assert set(listing) == SHARES_KEYS
        assert listing["grants"] == [{"uuid": shared_uuid, "guest": name}]
        (pool,) = listing["pools"]
        assert set(pool) == SHARED_POOL_KEYS
        assert (pool["uuid"], pool["members"], pool["pages"]) == (shared_uuid, [name], 1)
        out = ok("share", "list", sock=admin.socket)
        assert "grants:" in out and "shared pools:" in out
        assert re.search(rf"^{shared_uuid}\s+{re.escape(name)}$", out, re.M), out
    finally:
        revoked = ok_json("share", "revoke", shared_uuid.upper(), name, sock=admin.socket)
    assert revoked == {"detached": 1}
    assert ok_json("share", "list", sock=admin.socket) == {"grants": [], "pools": []}
    assert "(none)" in ok("share", "list", sock=admin.socket)

    run = tmemctl("share", "revoke", shared_uuid, name, sock=admin.socket)
    assert run.code == 1
    assert run.err.startswith("tmemctl: ") and "no grant" in run.err, run.err


def test_set_caps_a_shared_pools_account(admin: Admin, guest: Guest) -> None:
    shared_uuid = str(uuid.uuid4())
    name = f"shared:{shared_uuid}"
    run = tmemctl("set", name, "--cap", "8K", sock=admin.socket)
    assert run.code == 1 and "no grant names it" in run.err, run.err
    ok("share", "grant", shared_uuid, guest.name, sock=admin.socket)
    try:
        out = ok("set", name, "--cap", "8K", "--weight", "50", sock=admin.socket)
        assert "weight 50, cap 8.0KiB (not open: applies when a member opens it)" in out, out
        shared = guest.client.new_pool(shared=True, uuid=shared_uuid)
        for i in range(4):
            assert shared.put(3, i, page(i))  # ephemeral: the account's cap evicts its oldest
        row = guest_row(admin.socket, name)
        assert (row["weight"], row["cap"], row["ephemeral_bytes"]) == (50, 8192, 8192)
        out = ok("set", name, "--cap", "4K", sock=admin.socket)
        assert "evicted 1 pages to fit the cap" in out, out
    finally:
        ok("share", "revoke", shared_uuid, guest.name, sock=admin.socket)


def test_grant_to_a_guest_not_connected_yet(admin: Admin) -> None:
    other = str(uuid.uuid4())
    out = ok("share", "grant", other, "1000/later", sock=admin.socket)
    assert other in out
    try:
        assert ok_json("share", "list", sock=admin.socket)["grants"] == [
            {"uuid": other, "guest": "1000/later"}
        ]
    finally:
        out = ok("share", "revoke", other, "1000/later", sock=admin.socket)
    assert "detached 0" in out


# ------------------------------------------------------------------------------ top


def test_top_json_prints_one_document_per_refresh(admin: Admin, guest: Guest) -> None:
    pool = guest.client.new_pool()
    assert pool.put(1, 0, page(0))
    run = tmemctl("top", "--json", "--iterations", "3", "--interval", "0.05", sock=admin.socket)
    assert (run.code, run.err) == (0, ""), run
    assert "\x1b" not in run.out
    lines = run.out.splitlines()
    assert len(lines) == 3, run.out
    docs = [json.loads(line) for line in lines]
    for doc in docs:
        assert set(doc) == TOP_KEYS
        assert doc["interval"] == 0.05
        assert set(doc["status"]) == STATUS_KEYS and doc["status"]["budget"] == BUDGET
        (row,) = doc["guests"]
        assert set(row) == GUEST_KEYS | {"rates"} and set(row["rates"]) == RATE_KEYS
        assert (row["name"], row["ephemeral_bytes"]) == (guest.name, PAGE)
        assert row["rates"] == {"hit_ratio": None, "evictions_per_s": 0.0, "puts_per_s": 0.0}
    assert docs[0]["time"] <= docs[1]["time"] <= docs[2]["time"]
    # and after the global option, as for every command
    run = tmemctl("--json", "top", "--iterations", "1", "--interval", "0.05", sock=admin.socket)
    assert run.code == 0 and set(json.loads(run.out)) == TOP_KEYS


def test_top_prints_one_table_per_refresh_on_a_pipe(admin: Admin, guest: Guest) -> None:
    pool = guest.client.new_pool()
    assert pool.put(1, 0, page(0))
    proc = tmemctl_process("top", "--iterations", "2", "--interval", "0.2", sock=admin.socket)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "\x1b" not in proc.stdout  # not a tty: no screen control codes
    tables = proc.stdout.rstrip("\n").split("\n\n")
    assert len(tables) == 2, proc.stdout
    for table in tables:
        status, header, *rows = table.splitlines()
        assert status.startswith("tmemd  budget 16.0MiB")
        assert header.split() == [
            "NAME", "WEIGHT", "CAP", "FROZEN", "EPHEMERAL", "PERSISTENT", "LENT", "HIT%",
            "EVICT/S", "PUTS/S",
        ]  # fmt: skip
        (row,) = rows
        assert row.split() == [
            guest.name,
            "100",
            "-",
            "no",
            "4.0KiB",
            "0B",
            "0B",
            "-",
            "0.0",
            "0.0",
        ]


def test_top_clears_the_screen_on_a_tty(admin: Admin) -> None:
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMEM_ADMIN_SOCKET=str(admin.socket))
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tmemd.ctl.cli",
                "top",
                "--iterations",
                "2",
                "--interval=.1",
            ],
            stdout=slave,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        os.close(slave)
        slave = -1
        assert proc.wait(timeout=RUN_TIMEOUT) == 0
        output = b""
        while select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the pty's other side is closed
                break
            if not chunk:
                break
            output += chunk
        assert proc.stderr is not None and proc.stderr.read() == b""
        proc.stderr.close()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert output.count(b"\x1b[H\x1b[2J") == 2, output
    assert output.count(b"EVICT/S") == 2


def test_top_exits_quietly_on_ctrl_c(admin: Admin) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMEM_ADMIN_SOCKET=str(admin.socket))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tmemd.ctl.cli", "top", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        # Ctrl-C as a terminal delivers it, even when the suite runs as a background job
        # (which starts with SIGINT ignored, and Python then installs no handler for it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + RUN_TIMEOUT
        while b"PUTS/S" not in seen and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                seen += os.read(proc.stdout.fileno(), 65536)
        assert b"PUTS/S" in seen, "top printed no table"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == 0
        assert err == b"", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=RUN_TIMEOUT)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "args",
    [
        ("flush", "1/nosuch"),
        ("pools", "nosuch"),
        ("set", "nosuch", "--weight", "3"),
        ("freeze", "nosuch"),
        ("thaw", "nosuch"),
    ],
)
def test_unknown_guest_exits_1(admin: Admin, args: tuple[str, ...]) -> None:
    run = tmemctl(*args, sock=admin.socket)
    assert run.code == 1, run
    assert run.err.startswith("tmemctl: unknown guest "), run.err
    assert run.out == ""


def test_refused_by_the_daemon_exits_1(admin: Admin, guest: Guest) -> None:
    # valid locally, refused by the daemon: a cap beyond its address space, a giant budget
    run = tmemctl("set", guest.name, "--cap", "100T", sock=admin.socket)
    assert run.code == 1 and run.err.startswith("tmemctl: cap must be"), run.err
    run = tmemctl("budget", "100T", sock=admin.socket)
    assert run.code == 1 and run.err.startswith("tmemctl: budget 100.0TiB exceeds"), run.err
    assert run.out == ""


def test_exit_codes_through_the_console_script(admin: Admin, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tmemctl"
    if not script.exists():
        pytest.skip(f"no console script at {script} (the project is not installed there)")
    proc = tmemctl_process("status", "--json", sock=admin.socket, command=[str(script)])
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout)["budget"] == BUDGET
    proc = tmemctl_process("flush", "1/nosuch", sock=admin.socket, command=[str(script)])
    assert proc.returncode == 1 and proc.stderr.startswith("tmemctl: unknown guest "), proc
    proc = tmemctl_process("set", GUEST, sock=admin.socket, command=[str(script)])
    assert proc.returncode == 2 and proc.stderr.startswith("tmemctl: set needs --weight"), proc
    proc = tmemctl_process("status", sock=tmp_path / "absent.sock", command=[str(script)])
    assert proc.returncode == 1 and "no tmemd admin socket" in proc.stderr, proc


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.sock"
    run = tmemctl("status", sock=missing)
    assert run.code == 1
    assert run.err.startswith(f"tmemctl: no tmemd admin socket at {missing} ("), run.err
    assert "is tmemd running" in run.err
    assert run.out == ""

    # a socket file left behind by a daemon that died: connection refused
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    run = tmemctl("guests", "--json", sock=stale)
    assert run.code == 1
    assert run.err.startswith(f"tmemctl: no tmemd admin socket at {stale} ("), run.err
    assert "is tmemd running" in run.err


def test_the_guest_socket_is_named_as_such(admin: Admin) -> None:
    guest_socket = admin.daemon.socket
    for args in (("status",), ("top", "--iterations", "1", "--interval", "0.05")):
        run = tmemctl(*args, sock=guest_socket)
        assert (run.code, run.out) == (1, ""), run
        assert run.err == (
            f"tmemctl: {guest_socket} is tmemd's guest socket, not its admin socket; use "
            f"--admin-socket PATH or TMEM_ADMIN_SOCKET (default {DEFAULT_ADMIN_SOCKET})\n"
        )


def test_stopped_daemon_is_a_clear_error(tmp_path: Path) -> None:
    own = start_admin(tmp_path)
    try:
        ok("status", sock=own.socket)
    finally:
        assert own.daemon.stop() == 0
    for args in (("status",), ("top", "--iterations", "1", "--interval", "0.1")):
        run = tmemctl(*args, sock=own.socket)
        assert run.code == 1
        assert run.err.startswith(f"tmemctl: no tmemd admin socket at {own.socket} ("), run.err
        assert "is tmemd running" in run.err and "Traceback" not in run.err


def test_admin_socket_option_then_environment_then_default(admin: Admin, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.sock"
    assert admin_socket_path("/opt", {ADMIN_SOCKET_ENV: str(wrong)}) == "/opt"
    assert admin_socket_path(None, {ADMIN_SOCKET_ENV: str(wrong)}) == str(wrong)
    assert admin_socket_path(None, {ADMIN_SOCKET_ENV: ""}) == DEFAULT_ADMIN_SOCKET
    assert admin_socket_path(None, {}) == DEFAULT_ADMIN_SOCKET
    # the environment alone
    assert set(ok_json("status", sock=admin.socket)) == STATUS_KEYS
    # the option wins over a wrong environment, before or after the command
    for args in (
        ("--admin-socket", str(admin.socket), "status"),
        ("status", "--admin-socket", str(admin.socket)),
    ):
        run = tmemctl(*args, sock=wrong)
        assert (run.code, run.err) == (0, ""), run
    # a wrong environment alone is named in the error
    run = tmemctl("status", sock=wrong)
    assert run.code == 1 and str(wrong) in run.err


def test_timeout_option(admin: Admin) -> None:
    assert set(ok_json("status", "--timeout", "5", sock=admin.socket)) == STATUS_KEYS
    run = tmemctl("--timeout", "0", "status", sock=admin.socket)
    assert run.code == 2 and "positive number of seconds" in run.err


# ------------------------------------------------------------------------------ non-admins


def _python_for(uid: int) -> str | None:
    """An interpreter that ``uid`` can run and that imports tmemctl (with the venv's packages)."""
    site = next((p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()), "")
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import tmemd.ctl.cli"],
                user=uid,
                group=uid,
                extra_groups=[],
                env=_nobody_env(site),
                cwd=ROOT,
                capture_output=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    return None


def _nobody_env(site: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), site]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run tmemctl as another uid")
def test_non_admin_uid_is_refused(start_daemon: Any) -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip(f"no Python interpreter that uid {NOBODY} can run imports tmemclient")
    site = next((p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()), "")
    # A directory uid 65534 can traverse (tmp_path's parents are 0700), not writable by others.
    workdir = Path(tempfile.mkdtemp(prefix="tmemctl-test-", dir="/tmp"))
    try:
        workdir.chmod(0o755)
        sock = workdir / "admin.sock"
        daemon = start_daemon("--memory", "16MiB", "--admin-socket", str(sock))
        assert sock.stat().st_mode & 0o777 == 0o600

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            return tmemctl_process(
                *args,
                sock=sock,
                env=_nobody_env(site),
                command=[python, "-m", "tmemd.ctl.cli"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
            )

        # the socket's mode refuses the connection (EACCES)
        proc = as_nobody("status")
        assert proc.returncode == 1, proc
        assert proc.stderr.startswith("tmemctl: ") and "permission denied" in proc.stderr
        assert "Traceback" not in proc.stderr

        # were the socket opened up by mistake, the daemon's own credential check refuses
        sock.chmod(0o666)
        proc = as_nobody("freeze")
        assert proc.returncode == 1, proc
        # tmemd answers "not an administrator" and closes at once; tmemd.ctl.client loses that
        # answer when the close wins the race with our request (EPIPE), so tmemctl then says the
        # same from the socket's owner and mode. Either way the message names the reason.
        assert proc.stderr.startswith(
            ("tmemctl: permission denied by tmemd", "tmemctl: tmemd at ")
        ), proc.stderr
        assert f"uid {NOBODY} is not an administrator of this tmemd" in proc.stderr
        daemon.wait_event("admin_refused")
        assert ok_json("status", sock=sock)["frozen_all"] is False
        assert daemon.alive
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
