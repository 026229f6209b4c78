"""tmemd as a systemd service, with real sockets and processes: sd_notify datagrams to a notify
socket, activated_sockets on real listening sockets, listen_fds in a child started as systemd
starts it, then tmemd itself socket-activated (ready, status, watchdog, reload, graceful stop,
restart), started by hand, and refusing to start (a missing admin group, a budget beyond the
address space, socket directories missing or unsafe). What needs no socket (the environment,
the example config, check-config) is in tests/unit/test_systemd_config.py.

Socket activation as systemd does it: the test binds both listening sockets itself, hands them
over as fds 3 and 4 (LISTEN_FDS=2, LISTEN_PID, LISTEN_FDNAMES=guest:admin) and reads a fake
NOTIFY_SOCKET. A small launcher puts the fds in place and sets LISTEN_PID to its own pid before
it execs tmemd, so the pid is exactly the daemon's. Every socket has a timeout, every wait a
bound, every process is stopped.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Daemon

import tmemclient
from tmemclient import Client, DaemonGone
from tmemd.ctl.client import AdminClient
from tmemd.systemd import ActivationError, Notifier, activated_sockets

IO_TIMEOUT = 20.0
PAGE = 4096

# ---------------------------------------------------------------------------------------------
# Notifier


@pytest.fixture
def notify_reader(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(IO_TIMEOUT)
    yield sock
    sock.close()


def test_notifier_sends_fields_in_one_datagram(
    tmp_path: Path, notify_reader: socket.socket
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert notifier.enabled
        assert notifier.ready("0 guests")
        assert notify_reader.recv(4096) == b"READY=1\nSTATUS=0 guests"
        assert notifier.status("two\nlines")
        assert notify_reader.recv(4096) == b"STATUS=two lines"  # a newline would split fields
        for method, expected in (
            (notifier.watchdog, b"WATCHDOG=1"),
            (notifier.stopping, b"STOPPING=1"),
            (notifier.reloading, b"RELOADING=1"),
        ):
            assert method()
            assert notify_reader.recv(4096) == expected
        notifier.close()
        assert notifier.watchdog()  # reopens after close
        assert notify_reader.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()


def test_notifier_speaks_to_an_abstract_socket() -> None:
    name = f"tmem-test-{uuid.uuid4().hex}"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.settimeout(IO_TIMEOUT)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        reader.bind("\0" + name)
        assert notifier.address == "\0" + name
        assert notifier.stopping()
        assert reader.recv(4096) == b"STOPPING=1"
    finally:
        notifier.close()
        reader.close()


def test_notifier_to_a_missing_socket_fails_quietly(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    try:
        assert notifier.enabled
        assert notifier.ready("x") is False
    finally:
        notifier.close()


def test_notifier_never_blocks_when_the_reader_falls_behind(
    tmp_path: Path, notify_reader: socket.socket
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    results: list[bool] = []

    def flood() -> None:
        for i in range(2000):  # the reader never reads: its queue fills after a few datagrams
            results.append(notifier.status(f"line {i}"))

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(IO_TIMEOUT)
    try:
        assert not thread.is_alive(), "Notifier.send blocked on a full notify socket"
        assert results[0] is True
        assert False in results, "the queue never filled: the test proves nothing"
        notify_reader.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(len(results)):
                notify_reader.recv(4096)
        assert notifier.status("after") is True  # the reader caught up: messages flow again
    finally:
        notifier.close()


# ---------------------------------------------------------------------------------------------
# listen_fds / activated_sockets, in this process (nothing here touches an fd)


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[Callable[..., socket.socket]]:
    """Unix sockets bound in tmp_path (listening unless told otherwise); closed at teardown."""
    made: list[socket.socket] = []

    def make(listen: bool = True, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, kind)
        made.append(sock)
        sock.bind(str(tmp_path / f"s{len(made)}.sock"))
        if listen:
            sock.listen()
        return sock

    yield make
    for sock in made:
        sock.close()


def test_activated_sockets_by_name(unix_listener: Callable[..., socket.socket]) -> None:
    g, a = unix_listener().fileno(), unix_listener().fileno()
    assert activated_sockets({"guest": [g], "admin": [a]}) == (g, a)
    assert activated_sockets({"tmemd.socket": [g], "tmemd-admin.socket": [a]}) == (g, a)
    assert activated_sockets({"guest": [g]}) == (g, None)
    assert activated_sockets({"admin": [a]}) == (None, a)
    assert activated_sockets({"unknown": [g]}) == (g, None)  # one unnamed socket: the guests'
    assert activated_sockets({}) == (None, None)
    os.fstat(g)  # still open: activated_sockets closes nothing
    os.fstat(a)


def test_activated_sockets_refuses_names_that_are_not_ours(
    unix_listener: Callable[..., socket.socket],
) -> None:
    g, a = unix_listener().fileno(), unix_listener().fileno()
    with pytest.raises(ActivationError, match="'http' is not ours"):
        activated_sockets({"guest": [g], "http": [a]})
    with pytest.raises(ActivationError, match="not ours"):
        activated_sockets({"unknown": [g, a]})  # unnamed but two of them: which is which?
    with pytest.raises(ActivationError, match="2 sockets named 'guest'"):
        activated_sockets({"guest": [g, a]})


def test_activated_sockets_refuses_a_socket_that_does_not_listen(
    unix_listener: Callable[..., socket.socket],
) -> None:
    bound = unix_listener(listen=False).fileno()
    with pytest.raises(ActivationError, match=f"fd {bound} is not a listening Unix stream"):
        activated_sockets({"guest": [bound]})
    dgram = unix_listener(listen=False, kind=socket.SOCK_DGRAM).fileno()
    with pytest.raises(ActivationError, match="not a listening Unix stream"):
        activated_sockets({"admin": [dgram]})


def test_activated_sockets_refuses_an_internet_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        with pytest.raises(ActivationError, match="not a listening Unix stream"):
            activated_sockets({"guest": [tcp.fileno()]})


# ---------------------------------------------------------------------------------------------
# Launching a process the way systemd does

# argv: SLOTS SOFT_NOFILE COMMAND...; SLOTS is a comma-separated list of this process's fd
# numbers to become fds 3, 4, ... ("-" leaves that one closed); SOFT_NOFILE lowers the soft fd
# limit ("-" keeps it). LISTEN_PID is set to our pid (which exec keeps) unless already given.
LAUNCHER = r"""
import fcntl, os, resource, sys
slots = [s for s in sys.argv[1].split(",") if s]
held = []
for s in slots:
    if s == "-":
        held.append(None)
        continue
    held.append(fcntl.fcntl(int(s), fcntl.F_DUPFD, 200))
    os.close(int(s))
for i, fd in enumerate(held):
    if fd is None:
        try:
            os.close(3 + i)
        except OSError:
            pass
    else:
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
os.closerange(3 + len(held), 1024)
if sys.argv[2] != "-":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), hard))
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"""


def launch(
    fds: list[int | None],
    command: list[str],
    env: dict[str, str],
    *,
    soft_nofile: int | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``command`` with ``fds`` as its fds 3, 4, ... (None: that one closed)."""
    slots = ",".join("-" if fd is None else str(fd) for fd in fds)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    full_env.pop("WATCHDOG_USEC", None)
    full_env.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            slots,
            "-" if soft_nofile is None else str(soft_nofile),
            *command,
        ],
        pass_fds=[fd for fd in fds if fd is not None],
        env=full_env,
        cwd=ROOT,
        **popen,
    )


ACTIVATION_CHILD = r"""
import json, os
from tmemd.systemd import ActivationError, activated_sockets, listen_fds
out = {}
try:
    fds = listen_fds()
    out["fds"] = fds
    out["cloexec"] = [not os.get_inheritable(fd) for v in fds.values() for fd in v]
    out["sockets"] = list(activated_sockets(fds))
except ActivationError as exc:
    out["error"] = str(exc)
out["env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps(out))
"""


def activation_child(fds: list[int | None], **env: str) -> dict[str, Any]:
    """What listen_fds/activated_sockets make of ``fds`` passed as 3, 4, ... with ``env``."""
    proc = launch(
        fds, [sys.executable, "-c", ACTIVATION_CHILD], env, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=IO_TIMEOUT)
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def test_listen_fds_takes_the_passed_sockets(unix_listener: Callable[..., socket.socket]) -> None:
    g, a = unix_listener(), unix_listener()
    out = activation_child([g.fileno(), a.fileno()], LISTEN_FDS="2", LISTEN_FDNAMES="guest:admin")
    assert out == {
        "fds": {"guest": [3], "admin": [4]},
        "cloexec": [True, True],  # not leaked to anything tmemd might start
        "sockets": [3, 4],
        "env": [],
    }


def test_listen_fds_refuses_fds_that_are_not_open(
    unix_listener: Callable[..., socket.socket],
) -> None:
    out = activation_child(
        [unix_listener().fileno(), None], LISTEN_FDS="2", LISTEN_FDNAMES="guest:admin"
    )
    assert out == {"error": "LISTEN_FDS=2 but fd 4 is not open", "env": []}


def test_listen_fds_ignores_sockets_meant_for_another_pid(
    unix_listener: Callable[..., socket.socket],
) -> None:
    out = activation_child([unix_listener().fileno()], LISTEN_FDS="1", LISTEN_PID="1")
    assert out == {"fds": {}, "cloexec": [], "sockets": [None, None], "env": []}


# ---------------------------------------------------------------------------------------------
# tmemd, socket-activated


def parse_notify(data: bytes) -> dict[str, str]:
    """One sd_notify datagram as a dict of its fields."""
    return dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)


class NotifyReader:
    """The fake NOTIFY_SOCKET: a thread reads it promptly, as systemd does (a reader that falls
    behind makes tmemd drop messages, by design), and keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self.store: dict[str, int] = {}  # the fd store: FDNAME -> a descriptor we hold
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            except TimeoutError:
                continue
            except OSError:
                return
            message = parse_notify(data)
            with self._changed:
                if message.get("FDSTORE") == "1":  # as systemd: keep one of each name
                    for fd in fds:
                        old = self.store.pop(message.get("FDNAME", "stored"), None)
                        if old is not None:
                            os.close(old)
                        self.store[message.get("FDNAME", "stored")] = fd
                else:
                    for fd in fds:
                        os.close(fd)
                self.messages.append(message)
                self._changed.notify_all()

    def wait(
        self, pred: Callable[[dict[str, str]], bool], start: int = 0, timeout: float = 10.0
    ) -> int:
        """Index of the first message from ``start`` on that ``pred`` accepts (bounded wait)."""
        deadline = time.monotonic() + timeout
        i = start
        with self._changed:
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no such notify message within {timeout}s: {self.messages}"
                    )
                self._changed.wait(left)

    def close(self) -> None:
        self._closing = True
        self._thread.join(5)
        self.sock.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()


def has(key: str, value: str = "1") -> Callable[[dict[str, str]], bool]:
    """A predicate: the message sets ``key`` to ``value``."""
    return lambda m: m.get(key) == value


def status_starts(prefix: str) -> Callable[[dict[str, str]], bool]:
    """A predicate: the message's STATUS= starts with ``prefix``."""
    return lambda m: m.get("STATUS", "").startswith(prefix)


class ActivatedDaemon(Daemon):
    """A tmemd started with the service's sockets (conftest's Daemon, launched differently)."""

    def __init__(self, service: Service, *args: str, soft_nofile: int | None = None) -> None:
        self.workdir = service.dir
        self.socket = service.guest_path
        self.log_path = service.dir / f"tmemd-{len(service.daemons)}.log"
        self._log = self.log_path.open("wb")
        self.args = ["--config", str(service.config), *args]
        # As systemd: the sockets, then what the fd store holds, each named.
        names = ["guest", "admin", *service.notify.store]
        self.proc = launch(
            [service.guest.fileno(), service.admin.fileno(), *service.notify.store.values()],
            [sys.executable, "-m", "tmemd", *self.args],
            {
                "LISTEN_FDS": str(len(names)),
                "LISTEN_FDNAMES": ":".join(names),
                "NOTIFY_SOCKET": str(service.notify.path),
                "WATCHDOG_USEC": "200000",
            },
            soft_nofile=soft_nofile,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        """Everything the daemon wrote, also after ``stop``."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


class Service:
    """What systemd holds for tmemd: its two listening sockets, a notify socket, the config."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.guest_path = base / "tmemd.sock"
        admin_dir = base / "admin"
        admin_dir.mkdir(mode=0o700)
        self.admin_path = admin_dir / "admin.sock"
        self.guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.guest.bind(str(self.guest_path))
        self.guest.listen(16)
        self.admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.admin.bind(str(self.admin_path))
        self.admin.listen(16)
        self.notify = NotifyReader(base / "notify")
        self.config = base / "tmemd.toml"
        # The config's own socket paths: with socket activation tmemd must not create them.
        self.unused_paths = [base / "unused.sock", admin_dir / "unused-admin.sock"]
        self.write_config()
        self.daemons: list[ActivatedDaemon] = []
        self.clients: list[Client] = []

    def write_config(self, weight: int | str = 200, limits: str = "") -> None:
        self.config.write_text(
            "[daemon]\n"
            f'socket = "{self.unused_paths[0]}"\n'
            f'admin_socket = "{self.unused_paths[1]}"\n'
            'memory = "64MiB"\n'
            'log_format = "json"\n'
            f"[limits]\n{limits}\n"
            "[guests.vm1]\n"
            f"uids = [{os.getuid()}]\n"
            f"weight = {weight}\n"
        )

    def start(self, *args: str, soft_nofile: int | None = None) -> ActivatedDaemon:
        """Start tmemd on these sockets and wait for its READY=1 (bounded)."""
        start = len(self.notify.messages)
        daemon = ActivatedDaemon(self, *args, soft_nofile=soft_nofile)
        self.daemons.append(daemon)
        try:
            self.notify.wait(has("READY"), start, timeout=15)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ntmemd's log:\n{daemon.log_text()}") from None
        return daemon

    def connect(self, name: str, frames: int = 64) -> Client:
        client = tmemclient.connect(self.guest_path, name=name, frames=frames, timeout=IO_TIMEOUT)
        client._sock.settimeout(IO_TIMEOUT)
        self.clients.append(client)
        return client

    def admin_call(self, op: str, **args: Any) -> Any:
        with AdminClient(self.admin_path, timeout=IO_TIMEOUT) as admin:
            return admin.call(op, **args)

    def account(self, name: str) -> dict[str, Any]:
        rows = [r for r in self.admin_call("guests") if r["name"] == name]
        assert len(rows) == 1, rows
        row: dict[str, Any] = rows[0]
        return row

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for daemon in self.daemons:
            daemon.stop()
        self.guest.close()
        self.admin.close()
        self.notify.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    try:
        yield s
    finally:
        s.close()


def page(name: str, idx: int, tag: int = 0) -> bytes:
    """A page no other (name, idx, tag) produces."""
    return (f"{name}:{idx}:{tag}|".encode() * PAGE)[:PAGE]


def test_activated_daemon_reports_ready_status_and_watchdog(service: Service) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = 256 if hard > 256 else None
    daemon = service.start("--log-level", "info", soft_nofile=soft)
    ready = service.notify.messages[service.notify.wait(has("READY"))]
    assert ready["STATUS"] == "0 guests, 0B of 64.0MiB used"
    event = daemon.wait_event("daemon_ready")[0]
    assert (event["socket"], event["admin_socket"]) == ("activated", "activated")
    fd_limit = daemon.wait_event("fd_limit")[0]
    assert fd_limit["hard"] == hard
    assert fd_limit["soft"] == (hard if hard != resource.RLIM_INFINITY else 1 << 20)

    client = service.connect("vm1")
    pool = client.new_pool()
    assert pool.put(1, 1, page("vm1", 1))
    service.notify.wait(status_starts("1 guests, 4.0KiB of 64.0MiB"), timeout=10)
    row = service.account("vm1")
    assert (row["weight"], row["pages"]) == (200, 1)
    assert pool.get(1, 1) == page("vm1", 1)

    first = service.notify.wait(has("WATCHDOG"))
    later = service.notify.wait(has("WATCHDOG"), first + 1)
    service.notify.wait(has("WATCHDOG"), later + 1)

    client.close()
    assert daemon.stop() == 0
    service.notify.wait(has("STOPPING"))
    # Sockets systemd made are systemd's: tmemd leaves them in place, and creates none of its own.
    assert service.guest_path.is_socket()
    assert service.admin_path.is_socket()
    assert not any(p.exists() for p in service.unused_paths)
    assert daemon.events("daemon_stopped")


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad_one(
    service: Service,
) -> None:
    daemon = service.start()
    client = service.connect("vm1")
    pool = client.new_pool(persistent=True)
    assert pool.put(1, 1, page("vm1", 1))
    assert service.account("vm1")["weight"] == 200

    service.write_config(weight=300)
    start = len(service.notify.messages)
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = service.notify.wait(has("RELOADING"), start)
    service.notify.wait(has("READY"), reloading + 1)
    assert daemon.wait_event("config_reloaded")[0]["guests_changed"] == ["vm1"]
    assert service.account("vm1")["weight"] == 300

    bad = [("[daemon\n", "not valid TOML"), (None, "guests.vm1")]
    for n, (text, error) in enumerate(bad, 1):
        if text is None:
            service.write_config(weight=0)  # out of range: the key is named
        else:
            service.config.write_text(text)
        start = len(service.notify.messages)
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = service.notify.wait(has("RELOADING"), start)
        service.notify.wait(has("READY"), reloading + 1)
        failed = daemon.wait_event("config_reload_failed", count=n)[-1]
        assert error in failed["error"], failed
        assert failed["kept"] == "old config"
        assert service.account("vm1")["weight"] == 300  # the old config still rules
        assert pool.get(1, 1) == page("vm1", 1)  # and the daemon still serves
        assert service.connect(f"other{n}").new_pool().put(1, 1, page("o", n))
    assert len(daemon.events("config_reloaded")) == 1
    assert daemon.alive


DRAIN_GUEST = r"""
import json, select, sys
import tmemclient

path, name = sys.argv[1], sys.argv[2]

def page(idx, tag):
    return (f"{name}:{idx}:{tag}|".encode() * 4096)[:4096]

report = {"batches": 0, "verified": 0, "bad": [], "notice": None, "closed": None, "outcome": None}
try:
    client = tmemclient.connect(path, name=name, frames=128, timeout=20)
    client._sock.settimeout(20)
    pool = client.new_pool(persistent=True)
    expected = {}  # index -> tag of every page whose put returned True
    for tag in range(1, 100000):  # bounded; the daemon's shutdown ends it long before
        if client.notice is not None and report["notice"] is None:
            report["notice"] = client.notice
            keys = sorted(expected)
            got = pool.get_many([(1, idx) for idx in keys])
            report["bad"] = [i for i, d in zip(keys, got) if d != page(i, expected[i])][:10]
            report["verified"] = len(keys) - len(report["bad"])
            # Silent from now on: the daemon closes the connection after drain_idle, long
            # before its grace period ends (bounded wait; the next put then finds it closed).
            poller = select.poll()
            poller.register(client._sock, select.POLLRDHUP)
            report["closed"] = bool(poller.poll(20_000))
            if not report["closed"]:
                break
        batch = [(1, (tag * 32 + k) % 2048, None) for k in range(32)]
        batch = [(oid, idx, page(idx, tag)) for oid, idx, _ in batch]
        for (_, idx, _), ok in zip(batch, pool.put_many(batch)):
            if ok:
                expected[idx] = tag
            else:
                expected.pop(idx, None)  # a refused put drops the older copy too
        report["batches"] += 1
        if report["batches"] == 4:
            print("running", flush=True)
    report["outcome"] = "never stopped"
except tmemclient.DaemonGone as exc:  # DaemonShuttingDown is a DaemonGone
    report["outcome"] = type(exc).__name__
    report["error"] = str(exc)
except BaseException as exc:
    report["outcome"] = f"unexpected {type(exc).__name__}: {exc}"
print(json.dumps(report), flush=True)
"""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of a guest's stdout, or '' if none came in time or it ended."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def test_sigterm_drains_guests_mid_batch_and_exits_cleanly(service: Service) -> None:
    """SIGTERM while four guests stream batches: each gets the SHUTDOWN notice, is served
    while it reads back its pages, and is closed once it goes quiet for drain_idle (1.5 s), not
    when the grace period (60 s) ends; then tmemd exits 0."""
    service.write_config(limits="drain_idle = 1.5")
    daemon = service.start("--shutdown-grace", "60")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    guests = [
        subprocess.Popen(
            [sys.executable, "-c", DRAIN_GUEST, str(service.guest_path), f"w{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    try:
        for guest in guests:
            assert read_line(guest, 20) == "running\n", guest.communicate(timeout=IO_TIMEOUT)
        start = len(service.notify.messages)
        daemon.proc.send_signal(signal.SIGTERM)
        reports = []
        for guest in guests:
            out, err = guest.communicate(timeout=30)
            assert guest.returncode == 0, err
            reports.append(json.loads(out.splitlines()[-1]))
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        for guest in guests:
            if guest.poll() is None:
                guest.kill()
                guest.wait(timeout=IO_TIMEOUT)
    service.notify.wait(has("STOPPING"), start)
    for report in reports:
        assert report["closed"] is True, report  # closed for its silence
        assert report["outcome"] == "DaemonShuttingDown", report
        assert report["notice"] == "tmemd is shutting down; reconnect later", report
        assert report["bad"] == [], report
        assert report["verified"] > 0, report
    assert len(daemon.events("guest_disconnected")) == 4
    assert {e["reason"] for e in daemon.events("guest_disconnected")} == {"daemon shutting down"}
    assert daemon.events("daemon_stopping")[0]["signal"] == "SIGTERM"


def test_guest_reconnects_after_a_restart_and_finds_its_pages_gone(service: Service) -> None:
    first = service.start()
    client = service.connect("vm1")
    eph, per = client.new_pool(), client.new_pool(persistent=True)
    assert eph.put(1, 1, page("vm1", 1))
    assert per.put(1, 2, page("vm1", 2))
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=15) == 0  # the idle guest is closed after drain_idle
    # The notice sits unread in the socket of this idle guest, and the send hits the closed
    # connection first: the client says DaemonGone (DaemonShuttingDown when it saw the notice).
    with pytest.raises(DaemonGone):
        per.get(1, 2)

    # Meanwhile systemd keeps the socket: a guest connecting now waits in its backlog until the
    # next tmemd accepts it.
    result: list[Client | BaseException] = []

    def reconnect() -> None:
        try:
            result.append(tmemclient.connect(service.guest_path, name="vm1", timeout=IO_TIMEOUT))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=reconnect, daemon=True)
    thread.start()
    second = service.start()
    thread.join(IO_TIMEOUT)
    assert not thread.is_alive()
    again = result[0]
    assert isinstance(again, Client), again
    service.clients.append(again)
    again._sock.settimeout(IO_TIMEOUT)
    eph2, per2 = again.new_pool(), again.new_pool(persistent=True)
    assert eph2.get(1, 1) is None  # ephemeral data simply missing
    assert per2.get(1, 2) is None  # persistent pages went with the old daemon (today)
    assert per2.put(1, 2, page("vm1", 2, tag=1))
    assert per2.get(1, 2) == page("vm1", 2, tag=1)
    assert service.account("vm1")["persistent_bytes"] == PAGE
    assert second.alive


def test_state_in_the_fd_store_survives_sigkill(service: Service) -> None:
    """With state_fdstore, tmemd hands its state memfds to the fd store (FDSTORE=1, named);
    killed, the next start gets them back in LISTEN_FDS and adopts every named page."""
    first = service.start("--state-fdstore")
    service.notify.wait(has("FDNAME", "state-pools"))
    assert set(service.notify.store) == {"state-arena", "state-index", "state-pools"}
    client = service.connect("vm1")
    swap = client.new_pool(persistent=True, name="swap")
    plain = client.new_pool(persistent=True)
    assert swap.put_many([(1, i, page("vm1", i)) for i in range(50)]) == [True] * 50
    assert plain.put(1, 1, page("vm1", 1))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=IO_TIMEOUT)
    service.start("--state-fdstore")
    state = service.admin_call("status")["state"]
    assert state["adopted"] and state["dir"] == "fd store" and state["pages"] == 50
    again = service.connect("vm1")
    swap2 = again.new_pool(persistent=True, name="swap")
    assert swap2.reopened
    assert swap2.get_many([(1, i) for i in range(50)]) == [page("vm1", i) for i in range(50)]
    assert again.new_pool(persistent=True).get(1, 1) is None  # unnamed: gone


def test_state_fdstore_without_systemd_is_refused(tmp_path: Path) -> None:
    run = run_tmemd("--socket", str(tmp_path / "t.sock"), "--state-fdstore")
    assert run.returncode == 2
    assert "state_fdstore needs systemd's fd store" in run.stderr and "--state-dir" in run.stderr


def test_activation_with_a_socket_that_is_not_ours_exits_2(
    unix_listener: Callable[..., socket.socket],
) -> None:
    proc = launch(
        [unix_listener().fileno(), unix_listener().fileno()],
        [sys.executable, "-m", "tmemd", "--memory", "16MiB"],
        {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "guest:metrics"},
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=IO_TIMEOUT)
    assert proc.returncode == 2
    assert "socket activation: socket named 'metrics' is not ours" in err


# ---------------------------------------------------------------------------------------------
# Started by hand; check-config


def test_started_by_hand_it_binds_and_removes_its_own_sockets(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    admin_path = tmp_path / "d" / "adm" / "admin.sock"
    daemon = start_daemon("--memory", "16MiB", "--admin-socket", str(admin_path))
    assert daemon.socket.is_socket()
    assert admin_path.is_socket()
    event = daemon.wait_event("daemon_ready")[0]
    assert (event["socket"], event["admin_socket"]) == (str(daemon.socket), str(admin_path))
    client = tmemclient.connect(daemon.socket, name="vm1", frames=16, timeout=IO_TIMEOUT)
    try:
        client._sock.settimeout(IO_TIMEOUT)
        assert client.new_pool().put(1, 1, page("vm1", 1))
        with AdminClient(admin_path, timeout=IO_TIMEOUT) as admin:
            assert admin.call("status")["used"] == PAGE
    finally:
        client.close()
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert not admin_path.exists()


def run_tmemd(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "tmemd", *args],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
        env=env,
        cwd=ROOT,
        check=False,
    )


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


EXAMPLE = ROOT / "systemd" / "tmemd.toml"
NO_SUCH_GROUP = "tmem-test-no-such-group"


def test_a_missing_admin_group_is_refused_at_start(tmp_path: Path) -> None:
    """check-config only warns of it (tests/unit/test_systemd_config.py); tmemd refuses to
    start, saying how to make the group, and makes no socket."""
    assert not group_exists(NO_SUCH_GROUP)
    path = tmp_path / "tmemd.toml"
    path.write_text(EXAMPLE.read_text().replace('"tmem-admin"', f'"{NO_SUCH_GROUP}"', 1))
    sock = tmp_path / "t.sock"
    admin = tmp_path / "adm" / "admin.sock"
    started = run_tmemd("--config", str(path), "--socket", str(sock), "--admin-socket", str(admin))
    assert started.returncode == 2, started.stderr
    (line,) = started.stderr.splitlines()
    assert line.startswith(f"tmemd: admin group '{NO_SUCH_GROUP}' does not exist"), line
    assert f"groupadd --system {NO_SUCH_GROUP}" in line
    assert list(tmp_path.iterdir()) == [path]


def test_a_budget_beyond_any_address_space_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The arena's address space is reserved at start (mmap); 1 PiB fits no x86-64 or arm64
    user address space, so this fails on any host, as 100TiB does on most."""
    sock = tmp_path / "t.sock"
    result = run_tmemd("--socket", str(sock), "--memory", "1024TiB", "--log-format", "json")
    assert result.returncode == 2, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if not ln.startswith("{")]
    assert line.startswith("tmemd: cannot reserve 1024.0TiB of memory for the page arena"), line
    assert "(--memory 1024.0TiB)" in line and "of RAM: give a smaller --memory" in line
    assert "Traceback" not in result.stderr
    assert not sock.exists()


def test_a_budget_the_address_space_limit_refuses_names_the_limit(tmp_path: Path) -> None:
    """Within the host's RAM, but over tmemd's RLIMIT_AS: the arena (as large as the RAM, so the
    budget can grow at run time) cannot be mapped; the line says which limit to raise."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = 1 << 30  # room for Python and trio, less than the arena
    if ram <= 2 * limit:
        pytest.skip(f"this host's RAM ({ram} bytes) leaves no gap for the test")

    def lower_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "tmemd", "--socket", str(tmp_path / "t.sock"), "--memory", "64MiB"],
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT,
        env=env,
        cwd=ROOT,
        check=False,
        preexec_fn=lower_address_space,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("tmemd: cannot reserve "), line
    assert "(the budget, 64.0MiB, may grow up to this host's RAM" in line
    assert "ulimit -v" in line


def json_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines in ``text``."""
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_a_socket_in_a_missing_directory_is_refused_and_no_directory_made(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "missing" / "deeper" / "t.sock"
    result = run_tmemd("--socket", str(sock), "--log-format", "json")
    assert result.returncode == 1, result.stderr
    (event,) = json_events(result.stderr)[-1:]
    assert event["event"] == "socket_dir_missing"
    assert event["directory"] == str(sock.parent)
    assert "does not exist; create it" in event["error"]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []

    # The admin socket's own directory is made (private); its parents never are.
    admin = tmp_path / "no" / "adm" / "admin.sock"
    result = run_tmemd(
        "--socket", str(tmp_path / "t.sock"), "--admin-socket", str(admin), "--log-format", "json"
    )
    assert result.returncode == 1, result.stderr
    (event,) = json_events(result.stderr)[-1:]
    assert (event["event"], event["directory"]) == ("socket_dir_missing", str(tmp_path / "no"))
    assert list(tmp_path.iterdir()) == []


def test_an_admin_socket_directory_others_may_write_is_its_own_event(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    guest = tmp_path / "t.sock"
    result = run_tmemd(
        "--socket", str(guest), "--admin-socket", str(shared / "a.sock"), "--log-format", "json"
    )
    assert result.returncode == 1, result.stderr
    (event,) = json_events(result.stderr)[-1:]
    assert event["event"] == "admin_socket_dir_unsafe", event
    assert (event["directory"], event["mode"]) == (str(shared), "0777")
    assert f"chmod 0700 {shared}" in event["error"]
    assert not guest.exists() and list(shared.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Under a real systemd


def test_under_real_systemd_with_systemd_run(tmp_path: Path) -> None:
    comm = Path("/proc/1/comm").read_text().strip()
    if comm != "systemd":
        pytest.skip(f"PID 1 is {comm!r}, not systemd: no real systemd-run test here")
    if os.geteuid() != 0 or shutil.which("systemd-run") is None:
        pytest.skip("a system unit needs root and systemd-run")
    unit = f"tmemd-test-{uuid.uuid4().hex[:8]}"
    sock = Path("/run") / unit / "tmemd.sock"
    subprocess.run(
        [
            "systemd-run",
            f"--unit={unit}",
            "--collect",
            "--quiet",
            f"--socket-property=ListenStream={sock}",
            "--socket-property=FileDescriptorName=guest",
            "--property=Type=notify",
            "--property=NotifyAccess=main",
            "--property=WatchdogSec=10s",
            "--property=TimeoutStopSec=20s",
            f"--property=WorkingDirectory={ROOT}",
            f"--setenv=PYTHONPATH={ROOT}",
            sys.executable,
            "-m",
            "tmemd",
            "--log-format",
            "json",
            "--memory",
            "16MiB",
        ],
        check=True,
        timeout=60,
        capture_output=True,
    )

    def show(prop: str) -> str:
        return subprocess.run(
            ["systemctl", "show", "--value", "-p", prop, f"{unit}.service"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()

    try:
        client = tmemclient.connect(sock, name="vm1", frames=16, timeout=IO_TIMEOUT)
        try:
            client._sock.settimeout(IO_TIMEOUT)
            pool = client.new_pool()
            assert pool.put(1, 1, page("vm1", 1))
            assert pool.get(1, 1) == page("vm1", 1)
            deadline = time.monotonic() + 15
            while not show("StatusText").startswith("1 guests") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert show("StatusText").startswith("1 guests")
            assert show("ActiveState") == "active"
            subprocess.run(["systemctl", "stop", f"{unit}.service"], timeout=60, check=True)
            with pytest.raises(DaemonGone):
                pool.get(1, 1)
        finally:
            client.close()
    finally:
        subprocess.run(
            ["systemctl", "stop", f"{unit}.socket", f"{unit}.service"],
            timeout=60,
            check=False,
            capture_output=True,
        )
