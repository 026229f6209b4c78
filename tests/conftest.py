"""What the integration tests share: tmemd processes on Unix sockets in temporary directories
(one per test, or one a module's tests share and must leave as they found it), guests run as
processes of their own, and reading raw frames. The unit tests (tests/unit/) use none of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tmemclient.wire.codec import HEADER
from tmemd.ctl.client import AdminClient
from tmemd.launch import Tmemd

ROOT = Path(__file__).resolve().parent.parent
SHARED_BUDGET = 16 << 20  # the module daemon's --memory
IDLE_TIMEOUT = 10.0  # bound on waiting for a shared daemon's guests to leave


class Daemon(Tmemd):
    """A tmemd for tests (tmemd/launch.py, the launcher tests, benchmarks and the demo share);
    ``preexec_fn`` runs in the child before tmemd starts (e.g. to lower its limits), ``admin``
    gives it an admin socket (``admin_socket``) in a private directory."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        preexec_fn: Callable[[], None] | None = None,
        admin: bool = False,
    ) -> None:
        super().__init__(workdir, *args, preexec=preexec_fn, admin=admin)

    def wait_disconnected(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The ``guest_disconnected`` record of guest ``name`` (as tmemd names it, or as the
        guest asked: without the ``uid/``), waited for (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.events("guest_disconnected"):
                guest = str(record.get("guest", ""))
                if guest == name or guest.endswith("/" + name):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no guest_disconnected for {name!r} within {timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.01)


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Start tmemd processes with extra CLI args; each is stopped at teardown."""
    started: list[Daemon] = []

    def start(*args: str, name: str = "d") -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir()
        daemon = Daemon(workdir, *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon: Any) -> Iterator[Daemon]:
    """One tmemd of the test's own with a 16 MiB budget; the test fails if it died on the way.
    For tests that need the daemon alone (its whole budget, its log from the start, its
    stop); the others use ``shared_daemon``."""
    d = start_daemon("--memory", "16MiB")
    yield d
    assert d.alive, f"tmemd died during the test:\n{d.log_text()}"


def errors_logged(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's log records at level error or worse (``connection_failed``: an exception
    escaped a connection's handler)."""
    return [e for e in daemon.events() if e.get("level") in ("error", "critical")]


def wait_idle(daemon: Daemon, timeout: float = IDLE_TIMEOUT) -> dict[str, Any]:
    """Until every guest has left the daemon (it notices a close asynchronously); bounded.
    Its admin ``status`` then."""
    assert daemon.admin_socket is not None
    deadline = time.monotonic() + timeout
    with AdminClient(daemon.admin_socket, timeout=timeout) as admin:
        while True:
            status: dict[str, Any] = admin.call("status")
            if status["guests"] == 0 and status["sessions"] == 0:
                status["shares"] = admin.call("shares")
                return status
            if time.monotonic() > deadline:
                rows = admin.call("guests")
                raise AssertionError(f"guests still connected after the test: {rows}")
            time.sleep(0.01)


class ModuleDaemon:
    """The tmemd a module's tests share (16 MiB, with an admin socket), started when a test
    first asks for it, and again after a test left it dirty (so one failure stays one)."""

    def __init__(self, workdirs: pytest.TempPathFactory) -> None:
        self._workdirs = workdirs
        self.daemon: Daemon | None = None

    def get(self) -> Daemon:
        if self.daemon is None or not self.daemon.alive:
            self.discard()
            workdir = self._workdirs.mktemp("shared")
            self.daemon = Daemon(workdir, "--memory", str(SHARED_BUDGET), admin=True)
        return self.daemon

    def discard(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleDaemon]:
    """The module's shared tmemd; tests take it as ``shared_daemon``."""
    shared = ModuleDaemon(tmp_path_factory)
    try:
        yield shared
    finally:
        shared.discard()


@pytest.fixture
def shared_daemon(module_daemon: ModuleDaemon) -> Iterator[Daemon]:
    """The module's tmemd, for a test that needs nothing of its own from it. Its guests may
    reuse names other tests used (each test waits for the last one's guests to leave), but
    what it reads of the log must be its own guests' records. After the test the daemon must
    be as every test finds it: alive, no guest connected, nothing stored or lent, the budget
    and the freeze unchanged, no grant, and nothing logged at level error."""
    daemon = module_daemon.get()
    before = len(errors_logged(daemon))
    yield daemon
    try:
        assert daemon.alive, f"tmemd died during the test:\n{daemon.log_text()}"
        status = wait_idle(daemon)
        left = {k: status[k] for k in ("used", "lent", "budget", "frozen_all", "shares")}
        assert left == {
            "used": 0,
            "lent": 0,
            "budget": SHARED_BUDGET,
            "frozen_all": False,
            "shares": {"grants": [], "pools": []},
        }, "the test left the shared tmemd changed"
        errors = errors_logged(daemon)[before:]
        assert not errors, f"tmemd logged an error during the test: {errors[0]}"
    except BaseException:
        module_daemon.discard()  # the next test gets a fresh one
        raise


def run_guest(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a guest as its own process (``python -c script args...``); bounded in time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


EOF: Any = type("EOF", (), {"__repr__": lambda self: "EOF"})()


def read_raw_frame(sock: socket.socket, buf: bytearray, timeout: float) -> Any:
    """The next frame the daemon sent on a raw socket, decoded, or EOF once it closed the
    connection; ``buf`` keeps what was read past that frame. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= 4:
            (n,) = HEADER.unpack_from(buf)
            assert 0 < n <= 8 << 20, f"daemon sent a frame header of {n} bytes"
            if len(buf) >= 4 + n:
                body = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                return msgpack.unpackb(body, raw=False)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"tmemd sent no complete frame within {timeout}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:  # it closed with our bytes unread: still a close
            chunk = b""
        except TimeoutError:
            raise AssertionError(f"tmemd sent no complete frame within {timeout}s") from None
        if not chunk:
            assert not buf, f"connection closed in the middle of a frame: {buf!r}"
            return EOF
        buf += chunk


class Restartable:
    """A tmemd that can be killed (SIGKILL) and started again on the same socket, in
    ``workdir``; each run's log is kept (``tmemd.N.log``)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        workdir.mkdir(exist_ok=True)
        self.args = args or ("--memory", "16MiB")
        self.generation = 0
        self.daemon = self._start()

    def _start(self) -> Daemon:
        self.generation += 1
        log = self.workdir / "tmemd.log"
        if log.exists():  # the last run's, kept for a failure's report
            log.rename(self.workdir / f"tmemd.{self.generation - 1}.log")
        return Daemon(self.workdir, *self.args)

    @property
    def socket(self) -> Path:
        return self.workdir / "tmemd.sock"

    def kill(self) -> None:
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.daemon = self._start()

    def stop(self) -> None:
        self.daemon.stop()
