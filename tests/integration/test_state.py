"""State that survives the daemon (tmemd --state-dir, tmemd/persist.py; issue #17), against real
tmemd processes: named pools of several guests come back byte-exact after SIGKILL and after
SIGTERM; unnamed pools do not; a kill-at-random-points loop under load loses no answered
persistent put; state that cannot be trusted is discarded whole, never half adopted; a
directory others can write is refused."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon

import tmemclient
from tmemclient import Retry
from tmemd.ctl.client import AdminClient

PAGE = 4096
RETRY = Retry(attempts=60, first_delay=0.02, max_delay=0.5, connect_timeout=10)


def page(n: int, version: int = 0, size: int = PAGE) -> bytes:
    return random.Random(n * 100_003 + version).randbytes(size)


class Stateful:
    """A tmemd with a state directory, killed and started again on the same socket and state."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        workdir.mkdir(exist_ok=True)
        self.state = Path(f"/dev/shm/tmem-test-{os.getpid()}-{id(self)}")
        self.args = ["--memory", "16MiB", "--state-dir", str(self.state), *args]
        self.runs = 0
        self.daemon = self._start()

    def _start(self) -> Daemon:
        self.runs += 1
        log = self.workdir / "tmemd.log"
        if log.exists():
            log.rename(self.workdir / f"tmemd.{self.runs - 1}.log")
        return Daemon(self.workdir, *self.args, admin=True)

    @property
    def socket(self) -> Path:
        return self.workdir / "tmemd.sock"

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.daemon.proc.send_signal(sig)
        self.daemon.proc.wait(timeout=30)
        self.daemon = self._start()

    def status(self) -> dict[str, Any]:
        assert self.daemon.admin_socket is not None
        with AdminClient(self.daemon.admin_socket, timeout=30) as admin:
            result: dict[str, Any] = admin.call("status")
            return result

    def stop(self) -> None:
        self.daemon.stop()
        for name in os.listdir(self.state) if self.state.exists() else []:
            (self.state / name).unlink()
        if self.state.exists():
            self.state.rmdir()


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[Stateful]:
    s = Stateful(tmp_path / "d")
    yield s
    s.stop()


def fill(tmemd: Stateful) -> dict[str, Any]:
    """Two guests' named pools (4 KiB and 8 KiB pages, persistent and ephemeral), rewritten,
    flushed, and an unnamed pool; what each should hold afterwards."""
    expect: dict[str, Any] = {}
    for guest in ("vm1", "vm2"):
        with tmemclient.connect(tmemd.socket, name=guest, timeout=30) as c:
            swap = c.new_pool(persistent=True, name="swap")
            big = c.new_pool(persistent=True, name="big", page_size=8192)
            warm = c.new_pool(name="warm")
            plain = c.new_pool(persistent=True)
            tag = 1 if guest == "vm1" else 2
            assert swap.put_many([(tag, i, page(i)) for i in range(200)]) == [True] * 200
            assert swap.put_many([(tag, i, page(i, 1)) for i in range(0, 200, 3)]) == [True] * 67
            swap.flush_many([(tag, i) for i in range(1, 200, 7)])
            assert big.put_many([(1 << 150, i, page(i, 2, 8192)) for i in range(30)]) == [True] * 30
            assert warm.put_many([(tag, i, page(i, 3)) for i in range(20)]) == [True] * 20
            assert plain.put(tag, 0, page(0, 4))
            expect[guest] = fill_expectation(guest)
    return expect


def fill_expectation(guest: str) -> dict[str, Any]:
    """What ``fill`` leaves in guest ``guest``'s named pools."""
    tag = 1 if guest == "vm1" else 2
    return {
        "swap": {
            (tag, i): None if i % 7 == 1 else page(i, 1 if i % 3 == 0 else 0) for i in range(200)
        },
        "big": {(1 << 150, i): page(i, 2, 8192) for i in range(30)},
        "warm": {(tag, i): page(i, 3) for i in range(20)},
    }


def check(tmemd: Stateful, expect: dict[str, Any]) -> int:
    """Every guest reopens its named pools with every page as expected; pages checked."""
    checked = 0
    for guest, pools in expect.items():
        with tmemclient.connect(tmemd.socket, name=guest, timeout=30) as c:
            swap = c.new_pool(persistent=True, name="swap")
            big = c.new_pool(persistent=True, name="big", page_size=8192)
            warm = c.new_pool(name="warm")
            assert swap.reopened and big.reopened and warm.reopened
            for pool, name in ((swap, "swap"), (big, "big")):
                handles = list(pools[name])
                assert pool.get_many(handles) == [pools[name][h] for h in handles], (guest, name)
                checked += len(handles)
            # Ephemeral pages survive where the state did, but may be dropped: none is wrong.
            for h, data in pools["warm"].items():
                assert warm.get(*h) in (data, None)
            assert c.new_pool(persistent=True).get(1, 0) is None  # unnamed: gone
    return checked


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_named_pools_survive_the_daemon(tmemd: Stateful, sig: int) -> None:
    expect = fill(tmemd)
    tmemd.restart(sig)
    state = tmemd.status()["state"]
    assert state["adopted"] and state["pools"] == 6  # 3 named pools a guest
    # 2 x (200 - 29 flushed + 30 of 2 slots... counted as pages) and 20 ephemeral each
    assert state["pages"] == 2 * (200 - 29 + 30 + 20)
    assert tmemd.status()["kept_pools"] == 6
    assert check(tmemd, expect) == 2 * (200 + 30)
    tmemd.restart(sig)  # and again: reopened pools are recorded as before
    assert check(tmemd, expect) == 2 * (200 + 30)
    events = tmemd.daemon.events("state_adopted")
    assert len(events) == 1 and events[0]["pools"] == 6


def test_a_guest_that_does_not_come_back_after_a_restart_loses_its_pools(
    tmp_path: Path,
) -> None:
    tmemd = Stateful(tmp_path / "d", "--reattach-seconds", "0.3")
    try:
        fill(tmemd)
        tmemd.restart()
        (expired,) = tmemd.daemon.wait_event("named_pool_expired", count=6)[:1]
        assert expired["pool"] in ("swap", "big", "warm")
        deadline = time.monotonic() + 30
        while tmemd.status()["used"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tmemd.status()["used"] == 0 and tmemd.status()["kept_pools"] == 0
        tmemd.restart()  # nothing comes back: their records went with them
        assert tmemd.status()["state"]["pages"] == 0
    finally:
        tmemd.stop()


def test_another_uid_or_guest_cannot_open_adopted_pools() -> None:
    """vm1 is listed for uids 0 and 65534: after a restart, uid 65534 cannot open the pools
    uid 0 made under that name, and another guest name never sees them."""
    workdir = Path(tempfile.mkdtemp(prefix="tmem-xuid-"))
    workdir.chmod(0o755)  # uid 65534 must reach the socket
    config = workdir / "tmemd.toml"
    config.write_text("[guests.vm1]\nuids = [0, 65534]\n[guests.vm2]\nuids = [0]\n")
    tmemd = Stateful(workdir / "d", "--config", str(config), "--socket-mode", "0666")
    try:
        (workdir / "d").chmod(0o755)
        fill(tmemd)
        tmemd.restart()
        with tmemclient.connect(tmemd.socket, name="vm3", timeout=30) as other:
            theirs = other.new_pool(persistent=True, name="swap")
            assert not theirs.reopened and theirs.get(1, 0) is None
        script = (
            "import os, sys, tmemclient\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "c = tmemclient.connect(sys.argv[1], name='vm1', timeout=30)\n"
            "try:\n"
            "    c.new_pool(persistent=True, name='swap')\n"
            "except tmemclient.PermissionDenied as exc:\n"
            "    print('refused:', exc)\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script, str(tmemd.socket)],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("refused:") and "uid 0" in run.stdout, run.stdout
        assert check(tmemd, {"vm1": fill_expectation("vm1")}) == 230  # nothing was lost
    finally:
        tmemd.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_state_that_cannot_be_trusted_is_discarded_whole(tmemd: Stateful) -> None:
    fill(tmemd)
    tmemd.daemon.proc.send_signal(signal.SIGKILL)
    tmemd.daemon.proc.wait(timeout=30)
    with (tmemd.state / "pools").open("ab") as log:  # a damaged line, then a good one
        log.write(b'{"op":"new"}\t00000000\n{"op":"del","key":1}\t2a\n')
    tmemd.daemon = tmemd._start()
    state = tmemd.status()["state"]
    assert not state["adopted"] and "damaged" in state["reason"]
    assert tmemd.daemon.events("state_discarded")
    assert tmemd.status()["used"] == 0
    with tmemclient.connect(tmemd.socket, name="vm1", timeout=30) as c:
        assert not c.new_pool(persistent=True, name="swap").reopened


def test_state_kept_for_another_arena_size_starts_empty(tmemd: Stateful) -> None:
    fill(tmemd)
    tmemd.daemon.proc.send_signal(signal.SIGKILL)
    tmemd.daemon.proc.wait(timeout=30)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tmemd.args[1] = str(ram + (1 << 30))  # a budget above RAM: another arena capacity
    tmemd.daemon = tmemd._start()
    state = tmemd.status()["state"]
    assert not state["adopted"] and "start with the same" in state["reason"]


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    run = subprocess.run(
        [
            *(sys.executable, "-m", "tmemd", "--socket", str(tmp_path / "s.sock")),
            *("--state-dir", str(state), "--memory", "1MiB"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )
    assert run.returncode == 2
    assert "writable by group or others" in run.stderr and "chmod 0700" in run.stderr
    assert not (state / "arena").exists()


WRITER = """
import json, random, sys, tmemclient
from tmemclient import Retry
path, log_path, ops, seed, name = sys.argv[1:4] + [int(sys.argv[4])] + sys.argv[5:6]
size = int(sys.argv[6])
retry = Retry(attempts=200, first_delay=0.02, max_delay=0.5, connect_timeout=10)
def page(n, v):
    return random.Random(n * 100_003 + v).randbytes(size)
rng = random.Random(seed)
versions = {}
with open(log_path, "a", buffering=1) as log, tmemclient.connect_resilient(
    path, name, retry=retry, ring_frames=0
) as client:
    pool = client.new_pool(persistent=True, name="swap", page_size=size)
    for _ in range(int(ops)):
        n = rng.randrange(300)
        if rng.random() < 0.1:
            pool.flush(1, n)
            log.write(json.dumps(["flush", n]) + "\\n")
        else:
            v = versions.get(n, 0) + 1
            batch = [(1, m, page(m, v)) for m in range(n, min(n + 4, 300))]
            assert all(pool.put_many(batch)), "refused"
            for m in range(n, min(n + 4, 300)):
                versions[m] = v
            log.write(json.dumps(["put", n, min(n + 4, 300), v]) + "\\n")
    print(client.reconnects)
"""

# Two guests at once: 4 KiB pages and 8 KiB pages (two slots a page, chained in the index).
WRITERS = (("writer", 4096, 7), ("writer2", 8192, 8))


def expected_pages(log: Path) -> dict[int, int | None]:
    """Each handle's last answered version (None: flushed) from a writer's log."""
    expected: dict[int, int | None] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry[0] == "flush":
            expected[entry[1]] = None
        else:
            for m in range(entry[1], entry[2]):
                expected[m] = entry[3]
    return expected


def test_kill_at_random_points_under_load_loses_no_answered_put(tmp_path: Path) -> None:
    """Two guests put and flush as fast as they can, logging each answered request; the daemon
    is killed at random moments — SIGKILL, or now and then SIGTERM — and started again on its
    state; the guests reconnect and go on. Afterwards every page holds exactly what its last
    answered put wrote."""
    tmemd = Stateful(tmp_path / "d", "--shutdown-grace", "0.3")
    writers = []
    try:
        for name, size, seed in WRITERS:
            log = tmemd.workdir / f"{name}.jsonl"
            writers.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-c", WRITER, str(tmemd.socket), str(log), "15000"),
                        *(str(seed), name, str(size)),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                )
            )
        rng = random.Random(11)
        kills = {"SIGKILL": 0, "SIGTERM": 0}
        for _ in range(10):  # bounded: 10 kills at most
            if all(w.poll() is not None for w in writers):
                break
            time.sleep(rng.uniform(0.05, 0.6))  # a random point in the guests' work
            sig = signal.SIGTERM if rng.random() < 0.25 else signal.SIGKILL
            tmemd.restart(sig)
            kills[sig.name] += 1
        outs = [w.communicate(timeout=300) for w in writers]
        for w, (_, err) in zip(writers, outs, strict=True):
            assert w.returncode == 0, err
        assert sum(kills.values()) >= 3, "the writers finished before the daemon was killed enough"
        tmemd.restart(signal.SIGKILL)  # one more, after the last answer
        checked = lost = 0
        for name, size, _ in WRITERS:
            expected = expected_pages(tmemd.workdir / f"{name}.jsonl")
            with tmemclient.connect(tmemd.socket, name=name, timeout=30) as c:
                pool = c.new_pool(persistent=True, name="swap", page_size=size)
                assert pool.reopened
                handles = sorted(expected)
                got = pool.get_many([(1, n) for n in handles])
            want = {n: None if v is None else page(n, v, size) for n, v in expected.items()}
            lost += sum(data != want[n] for n, data in zip(handles, got, strict=True))
            checked += len(handles)
        answered = sum(
            len((tmemd.workdir / f"{n}.jsonl").read_text().splitlines()) for n, _, _ in WRITERS
        )
        reconnects = [int(out.strip().splitlines()[-1]) for out, _ in outs]
        print(
            f"kills={kills} answered_requests={answered} pages_checked={checked} lost={lost} "
            f"reconnects={reconnects}"
        )
        assert lost == 0, f"{lost} of {checked} pages differ from their last answered put"
        assert all(0 < r <= sum(kills.values()) for r in reconnects)  # they rode through
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        tmemd.stop()
