"""tmemctl, the admin CLI, run as a real command against a real tmemd with an admin socket."""

from __future__ import annotations

import contextlib
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

import tmemclient
from tmemd.ctl.cli import main

RUN_TIMEOUT = 30.0
PAGE = 4096
GUEST = f"{os.getuid()}/vm1"
SHARED = "8d5bcd6b-6a0c-4a53-9a5e-0c6b7a1e2f30"
NOBODY = 65534

# The --json field names tmemctl documents (README.md "Administration: tmemctl"): the daemon's keys.
STATUS_KEYS = {
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
    "pools",
} | COUNTER_KEYS
POOL_KEYS = {
    "pool",
    "guest",
    "kind",
    "shared",
    "uuid",
    "members",
    "page_size",
    "pages",
    "bytes",
} | COUNTER_KEYS
SHARES_KEYS = {"grants", "pools"}
GRANT_KEYS = {"uuid", "guest"}
SHARED_POOL_KEYS = {"uuid", "members", "pages"}


@dataclass
class Admin:
    """A tmemd with an admin socket."""

    daemon: Daemon
    socket: Path


def private_dir(path: Path) -> Path:
    """A 0700 directory, as tmemd wants around its admin socket."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


@pytest.fixture
def admin(start_daemon: Any, tmp_path: Path) -> Iterator[Admin]:
    """tmemd (16 MiB) with an admin socket in a private directory."""
    sock = private_dir(tmp_path / "admin") / "admin.sock"
    daemon = start_daemon("--memory", "16MiB", "--admin-socket", str(sock))
    yield Admin(daemon, sock)
    assert daemon.alive, f"tmemd died during the test:\n{daemon.log_text()}"


@pytest.fixture
def guest(admin: Admin) -> Iterator[tmemclient.Client]:
    """Guest vm1 connected to the admin fixture's daemon."""
    with tmemclient.connect(admin.daemon.socket, name="vm1") as client:
        yield client


def tmemctl(
    *args: str,
    sock: Path | str | None,
    env: dict[str, str] | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """``python -m tmemd.ctl.cli ARGS`` with TMEM_ADMIN_SOCKET=sock; bounded in time."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.pop("TMEM_ADMIN_SOCKET", None)
    if sock is not None:
        full_env["TMEM_ADMIN_SOCKET"] = str(sock)
    full_env.update(env or {})
    return subprocess.run(
        [kw.pop("python", sys.executable), "-m", "tmemd.ctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=full_env,
        cwd=ROOT,
        check=False,
        **kw,
    )


def ok(*args: str, sock: Path) -> str:
    """Run tmemctl, insist on exit 0, return stdout."""
    proc = tmemctl(*args, sock=sock)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def ok_json(*args: str, sock: Path) -> Any:
    """Run tmemctl ... --json and parse what it printed."""
    return json.loads(ok(*args, "--json", sock=sock))


def guest_row(sock: Path, name: str = GUEST) -> dict[str, Any]:
    """``guests --json``'s row for ``name``."""
    rows = ok_json("guests", sock=sock)
    (row,) = [r for r in rows if r["name"] == name]
    return dict(row)


def page(n: int) -> bytes:
    """A recognisable 4 KiB page."""
    return bytes([n % 251]) * PAGE


# ------------------------------------------------------------------------------ read commands


def test_status_table_and_json(admin: Admin) -> None:
    out = ok("status", sock=admin.socket)
    assert re.search(r"^budget\s+16\.0MiB$", out, re.M), out
    assert re.search(r"^frozen all\s+no$", out, re.M), out
    assert re.search(r"^moved\s+0B$", out, re.M), out
    status = ok_json("status", sock=admin.socket)
    assert set(status) == STATUS_KEYS
    assert status["budget"] == 16 << 20
    assert status["guests"] == 0
    # --json is a global option too, and works before the command
    assert json.loads(ok("--json", "status", sock=admin.socket)).keys() == STATUS_KEYS


def test_guests_and_pools(admin: Admin, guest: tmemclient.Client) -> None:
    eph = guest.new_pool()
    per = guest.new_pool(persistent=True)
    for i in range(4):
        assert eph.put(1, i, page(i))
        assert per.put(2, i, page(i))
    assert eph.get(1, 0) == page(0)
    assert eph.get(1, 99) is None

    out = ok("guests", sock=admin.socket)
    header, *lines = out.splitlines()
    assert header.split()[:5] == ["NAME", "KIND", "SESS", "WEIGHT", "CAP"]
    (line,) = [ln for ln in lines if ln.startswith(GUEST)]
    assert "16.0KiB" in line  # persistent bytes, via format_size
    assert "50.0%" in line  # hit rate: one hit, one miss
    assert line.split()[4] == "-"  # no cap

    rows = ok_json("guests", sock=admin.socket)
    (row,) = rows
    assert set(row) == GUEST_KEYS
    assert row["name"] == GUEST and row["persistent_bytes"] == 4 * PAGE
    assert row["ephemeral_bytes"] == 3 * PAGE and row["cap"] is None

    pools = ok_json("pools", GUEST, sock=admin.socket)
    assert [p["kind"] for p in pools] == ["ephemeral", "persistent"]
    assert all(set(p) == POOL_KEYS for p in pools)
    assert pools[1]["bytes"] == 4 * PAGE and pools[1]["members"] == [GUEST]
    out = ok("pools", sock=admin.socket)
    assert out.splitlines()[0].split()[:3] == ["POOL", "GUEST", "KIND"]
    assert "persistent" in out and "ephemeral" in out
    assert ok_json("pools", sock=admin.socket) == pools


def test_set_weight_and_cap(admin: Admin, guest: tmemclient.Client) -> None:
    out = ok("set", GUEST, "--weight", "7", "--cap", "1MiB", sock=admin.socket)
    assert "weight 7" in out and "1.0MiB" in out
    row = guest_row(admin.socket)
    assert (row["weight"], row["cap"]) == (7, 1 << 20)

    ok("set", GUEST, "--cap", "512K", sock=admin.socket)
    assert guest_row(admin.socket)["cap"] == 512 << 10
    ok("set", GUEST, "--cap", "65536", sock=admin.socket)
    assert guest_row(admin.socket)["cap"] == 65536
    result = ok_json("set", GUEST, "--cap", "none", sock=admin.socket)
    assert result["cap"] is None and result["weight"] == 7
    row = guest_row(admin.socket)
    assert (row["weight"], row["cap"]) == (7, None)
    ok("set", GUEST, "--weight", "1", sock=admin.socket)
    assert guest_row(admin.socket)["weight"] == 1


def test_freeze_and_thaw(admin: Admin, guest: tmemclient.Client) -> None:
    pool = guest.new_pool()
    assert pool.put(1, 0, page(0))

    assert GUEST in ok("freeze", GUEST, sock=admin.socket)
    assert guest_row(admin.socket)["frozen"] is True
    assert pool.put(1, 1, page(1)) is False
    # Puts fail; reads, in-place writes (they take no memory) and flushes proceed.
    assert pool.put_many([(1, 1, page(1)), (1, 2, page(2))]) == [False, False]
    assert pool.read(1, 0, 0, 16) == page(0)[:16]
    assert pool.write(1, 0, 0, b"frozen, written") is True
    assert pool.xchg(1, 0, 0, b"F") == b"f"
    assert pool.read(1, 0, 0, 15) == b"Frozen, written"
    assert pool.write(1, 1, 0, b"x") is False  # no page there: nothing is made
    assert GUEST in ok("thaw", GUEST, sock=admin.socket)
    assert guest_row(admin.socket)["frozen"] is False
    assert pool.put(1, 1, page(1)) is True

    # no GUEST: every guest
    assert GUEST in ok("freeze", sock=admin.socket)
    assert ok_json("status", sock=admin.socket)["frozen_all"] is True
    assert pool.put(1, 2, page(2)) is False
    assert ok_json("thaw", sock=admin.socket) == [GUEST]
    assert ok_json("status", sock=admin.socket)["frozen_all"] is False
    assert pool.put(1, 2, page(2)) is True


def test_flush_drops_only_ephemeral_pages(admin: Admin, guest: tmemclient.Client) -> None:
    eph = guest.new_pool()
    per = guest.new_pool(persistent=True)
    for i in range(5):
        assert eph.put(1, i, page(i))
        assert per.put(1, i, page(i + 100))

    out = ok("flush", GUEST, sock=admin.socket)
    assert "flushed 5 ephemeral pages" in out, out
    assert all(eph.get(1, i) is None for i in range(5))
    assert all(per.get(1, i) == page(i + 100) for i in range(5))
    row = guest_row(admin.socket)
    assert (row["ephemeral_bytes"], row["persistent_bytes"]) == (0, 5 * PAGE)
    assert ok_json("flush", GUEST, sock=admin.socket) == {"pages_flushed": 0}


def test_budget_below_persistent_usage_warns_and_keeps_pages(
    admin: Admin, guest: tmemclient.Client
) -> None:
    per = guest.new_pool(persistent=True)
    for i in range(20):  # 80 KiB persistent
        assert per.put(7, i, page(i))

    proc = tmemctl("budget", "40K", sock=admin.socket)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("tmemctl: warning: "), proc.stderr
    assert "persistent" in proc.stderr
    assert "budget 40.0KiB" in proc.stdout
    assert ok_json("status", sock=admin.socket)["budget"] == 40 << 10
    assert all(per.get(7, i) == page(i) for i in range(20))

    proc = tmemctl("budget", "8MiB", sock=admin.socket)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert ok_json("status", sock=admin.socket)["budget"] == 8 << 20


def test_share_grant_list_revoke(admin: Admin, guest: tmemclient.Client) -> None:
    with pytest.raises(tmemclient.PermissionDenied):
        guest.new_pool(shared=True, uuid=SHARED)
    out = ok("share", "grant", SHARED, GUEST, sock=admin.socket)
    assert SHARED in out and GUEST in out

    shared = guest.new_pool(shared=True, uuid=SHARED)
    assert shared.put(3, 0, page(3))
    listing = ok_json("share", "list", sock=admin.socket)
    assert set(listing) == SHARES_KEYS
    assert listing["grants"] == [{"uuid": SHARED, "guest": GUEST}]
    (pool,) = listing["pools"]
    assert set(pool) == SHARED_POOL_KEYS
    assert (pool["uuid"], pool["members"], pool["pages"]) == (SHARED, [GUEST], 1)
    out = ok("share", "list", sock=admin.socket)
    assert "grants:" in out and "shared pools:" in out
    assert re.search(rf"^{SHARED}\s+{re.escape(GUEST)}$", out, re.M), out

    assert ok_json("share", "revoke", SHARED.upper(), GUEST, sock=admin.socket) == {"detached": 1}
    assert ok_json("share", "list", sock=admin.socket) == {"grants": [], "pools": []}
    assert "(none)" in ok("share", "list", sock=admin.socket)

    proc = tmemctl("share", "revoke", SHARED, GUEST, sock=admin.socket)
    assert proc.returncode == 1
    assert proc.stderr.startswith("tmemctl: ") and "no grant" in proc.stderr, proc.stderr


def test_set_caps_a_shared_pools_account(admin: Admin, guest: tmemclient.Client) -> None:
    name = f"shared:{SHARED}"
    proc = tmemctl("set", name, "--cap", "8K", sock=admin.socket)
    assert proc.returncode == 1 and "no grant names it" in proc.stderr, proc.stderr
    ok("share", "grant", SHARED, GUEST, sock=admin.socket)
    out = ok("set", name, "--cap", "8K", "--weight", "50", sock=admin.socket)
    assert "weight 50, cap 8.0KiB (not open: applies when a member opens it)" in out, out
    shared = guest.new_pool(shared=True, uuid=SHARED)
    for i in range(4):
        assert shared.put(3, i, page(i))  # ephemeral: the account's cap evicts its oldest
    row = guest_row(admin.socket, name)
    assert (row["weight"], row["cap"], row["ephemeral_bytes"]) == (50, 8192, 8192)
    out = ok("set", name, "--cap", "4K", sock=admin.socket)
    assert "evicted 1 pages to fit the cap" in out, out


def test_grant_to_a_guest_not_connected_yet(admin: Admin) -> None:
    other = str(uuid.uuid4())
    out = ok("share", "grant", other, "1000/later", sock=admin.socket)
    assert other in out
    assert ok_json("share", "list", sock=admin.socket)["grants"] == [
        {"uuid": other, "guest": "1000/later"}
    ]
    assert "detached 0" in ok("share", "revoke", other, "1000/later", sock=admin.socket)


# ------------------------------------------------------------------------------ top


def test_top_prints_one_table_per_refresh(admin: Admin, guest: tmemclient.Client) -> None:
    pool = guest.new_pool()
    assert pool.put(1, 0, page(0))
    proc = tmemctl("top", "--iterations", "2", "--interval", "0.2", sock=admin.socket)
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
        assert row.split()[:7] == [GUEST, "100", "-", "no", "4.0KiB", "0B", "0B"]


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
    proc = tmemctl(*args, sock=admin.socket)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith("tmemctl: unknown guest "), proc.stderr
    assert proc.stdout == ""


def test_refused_by_the_daemon_exits_1(admin: Admin, guest: tmemclient.Client) -> None:
    # valid locally, refused by the daemon: a cap beyond its address space, a giant budget
    proc = tmemctl("set", GUEST, "--cap", "100T", sock=admin.socket)
    assert proc.returncode == 1 and proc.stderr.startswith("tmemctl: cap must be"), proc.stderr
    proc = tmemctl("budget", "100T", sock=admin.socket)
    assert proc.returncode == 1 and proc.stderr.startswith("tmemctl: "), proc.stderr


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
        (("top", "--json"), "no --json"),
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
    proc = tmemctl(*args, sock=tmp_path / "absent.sock")
    assert proc.returncode == 2, proc
    assert message in proc.stderr, proc.stderr
    assert "tmemctl" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.sock"
    proc = tmemctl("status", sock=missing)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"tmemctl: no tmemd admin socket at {missing} ("), proc.stderr
    assert "is tmemd running" in proc.stderr
    assert proc.stdout == ""

    # a socket file left behind by a daemon that died: connection refused
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    proc = tmemctl("guests", "--json", sock=stale)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"tmemctl: no tmemd admin socket at {stale} ("), proc.stderr
    assert "is tmemd running" in proc.stderr


def test_stopped_daemon_is_a_clear_error(start_daemon: Any, tmp_path: Path) -> None:
    sock = private_dir(tmp_path / "admin") / "admin.sock"
    daemon = start_daemon("--memory", "16MiB", "--admin-socket", str(sock))
    ok("status", sock=sock)
    assert daemon.stop() == 0
    proc = tmemctl("top", "--iterations", "1", "--interval", "0.1", sock=sock)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"tmemctl: no tmemd admin socket at {sock} ("), proc.stderr
    assert "is tmemd running" in proc.stderr and "Traceback" not in proc.stderr


def test_admin_socket_option_and_environment(admin: Admin, tmp_path: Path) -> None:
    # the environment alone
    assert set(ok_json("status", sock=admin.socket)) == STATUS_KEYS
    # the option wins over a wrong environment, before or after the command
    wrong = tmp_path / "wrong.sock"
    for args in (
        ("--admin-socket", str(admin.socket), "status"),
        ("status", "--admin-socket", str(admin.socket)),
    ):
        proc = tmemctl(*args, sock=wrong)
        assert proc.returncode == 0, proc.stderr
    # a wrong environment alone is named in the error
    proc = tmemctl("status", sock=wrong)
    assert proc.returncode == 1 and str(wrong) in proc.stderr
    # unset: the default path
    proc = tmemctl("status", sock=None, env={"TMEM_ADMIN_SOCKET": ""})
    assert "/run/tmemd/admin.sock" in proc.stderr or proc.returncode == 0


def test_timeout_option(admin: Admin) -> None:
    assert set(ok_json("status", "--timeout", "5", sock=admin.socket)) == STATUS_KEYS
    proc = tmemctl("--timeout", "-1", "status", sock=admin.socket)
    assert proc.returncode == 2


def test_main_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--help"]) == 0
    assert "share" in capsys.readouterr().out
    assert main(["set", "x"]) == 2
    assert capsys.readouterr().err.startswith("tmemctl: set needs --weight")
    assert main(["--admin-socket", str(tmp_path / "none.sock"), "status"]) == 1
    assert capsys.readouterr().err.startswith("tmemctl: no tmemd admin socket")


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
            return tmemctl(
                *args,
                sock=sock,
                env=_nobody_env(site),
                python=python,
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


def test_readme_documents_the_json_fields() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Administration: tmemctl", 1)[1].split("\n## ", 1)[0]
    keys = STATUS_KEYS | GUEST_KEYS | POOL_KEYS | SHARES_KEYS | GRANT_KEYS | SHARED_POOL_KEYS
    missing = sorted(k for k in keys if f"`{k}`" not in section)
    assert not missing, f"README's tmemctl section does not document {missing}"
