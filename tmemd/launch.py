"""Starting and stopping servers for tests, benchmarks and the demo: one launcher for tmemd (and
the peers the benchmarks compare it with).

A server listens on a Unix socket, is started with ``subprocess`` and is ready when a
``connect()`` to its socket succeeds (a bounded loop). ``stop`` ends it: SIGTERM, then SIGKILL
if it has not gone within a few seconds. A server also gets SIGTERM from the kernel if the
process that started it dies without cleaning up (PR_SET_PDEATHSIG). tmemd is this
interpreter's ``python -m tmemd`` (the installed package), logging JSON lines to a file the
``Tmemd`` object reads back.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
START_TIMEOUT = 15.0


class ServerFailed(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class Server:
    """One running server."""

    system: str
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path
    ready_s: float  # from exec to the socket accepting
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid


def _child_setup(
    cpus: frozenset[int] | None, more: Callable[[], None] | None
) -> Callable[[], None]:
    def setup() -> None:
        # The server dies with us even if we are SIGKILLed before our cleanup runs.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if more is not None:
            more()

    return setup


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_accepting(
    proc: subprocess.Popen[bytes], sockets: Sequence[Path], started: float, timeout: float
) -> float:
    """Seconds from ``started`` until a connect() to every socket succeeds; bounded by
    ``timeout``."""
    deadline = started + timeout
    waiting = list(sockets)
    while waiting:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with status {proc.returncode} before accepting")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(waiting[0]))
            waiting.pop(0)
            continue
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        if time.perf_counter() > deadline:
            raise ServerFailed(f"socket {waiting[0]} not accepting after {timeout:.0f}s")
        time.sleep(0.002)
    return time.perf_counter() - started


def start(
    system: str,
    argv: Sequence[str],
    sock: Path,
    log: Path,
    *,
    also: Sequence[Path] = (),
    cpus: frozenset[int] | None = None,
    preexec: Callable[[], None] | None = None,
    timeout: float = START_TIMEOUT,
) -> Server:
    """Start ``argv`` (stdout and stderr to ``log``) and wait until ``sock`` (and ``also``)
    accept. ``preexec`` runs in the child before it execs (e.g. to lower its limits)."""
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(cpus, preexec),
            close_fds=True,
        )
    try:
        ready = wait_accepting(proc, [sock, *also], started, timeout)
    except BaseException as exc:
        stop_process(proc)
        if isinstance(exc, ServerFailed):
            raise ServerFailed(f"{system} did not start: {exc}\n{log_tail(log)}") from None
        raise
    return Server(system, proc, sock, log, ready, list(argv))


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps. The exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    return proc.returncode


def tmemd_argv(sock: Path, *args: str, admin: Path | None = None) -> list[str]:
    """tmemd as this interpreter runs it, on guest socket ``sock`` (and admin socket ``admin``),
    logging JSON lines, with ``args`` after those (later options win)."""
    argv = [sys.executable, "-m", "tmemd", "--socket", str(sock), "--log-format", "json"]
    if admin is not None:
        argv += ["--admin-socket", str(admin)]
    return [*argv, *args]


class Tmemd:
    """A running tmemd in ``workdir`` (its guest socket, admin socket if asked, and log there),
    and what it logged. A context manager; ``stop`` also works on its own."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        admin: bool = False,
        preexec: Callable[[], None] | None = None,
        cpus: frozenset[int] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "tmemd.sock"
        self.admin_socket: Path | None = None
        if admin:
            (workdir / "admin").mkdir(mode=0o700, exist_ok=True)
            self.admin_socket = workdir / "admin" / "admin.sock"
        self.log_path = workdir / "tmemd.log"
        self.args = tmemd_argv(self.socket, *args, admin=self.admin_socket)[3:]
        self.server = start(
            "tmemd",
            tmemd_argv(self.socket, *args, admin=self.admin_socket),
            self.socket,
            self.log_path,
            also=[self.admin_socket] if self.admin_socket is not None else [],
            cpus=cpus,
            preexec=preexec,
            timeout=timeout,
        )
        self.proc = self.server.proc

    @property
    def pid(self) -> int:
        """tmemd's process id."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """True while the daemon process runs."""
        return self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, optionally only those with event ``name``."""
        out = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or record.get("event") == name:
                out.append(record)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait (bounded) until the log holds ``count`` events called ``name``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"no {count}x {name!r} in tmemd's log within {timeout}s:\n{self.log_text()}"
        )

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a bounded wait; the exit code."""
        return stop_process(self.proc, grace=10.0)

    def __enter__(self) -> Tmemd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
