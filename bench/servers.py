"""Starting and stopping the servers the benchmarks compare: tmemd, memcached and redis-server.

Every server listens on a Unix socket in a directory the caller owns (a temporary one), is started
with ``subprocess`` and is ready when a ``connect()`` to its socket succeeds (a bounded loop).
``stop`` ends it: SIGTERM, then SIGKILL if it has not gone within a few seconds. Servers also get
SIGTERM from the kernel if the benchmark process dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1

# How to get each peer when it is missing (Debian/Ubuntu package, Python client from PyPI).
INSTALL_HINTS = {
    "memcached": "apt-get install -y memcached && .venv/bin/pip install -e '.[bench]'",
    "redis": "apt-get install -y redis-server && .venv/bin/pip install -e '.[bench]'",
}


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
        return self.proc.pid


class ServerFailed(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        # The server dies with us even if we are SIGKILLed before our cleanup runs.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_accepting(
    proc: subprocess.Popen[bytes], sock: Path, started: float, timeout: float
) -> float:
    """Seconds from ``started`` until a connect() to ``sock`` succeeds; bounded by ``timeout``."""
    deadline = started + timeout
    while True:
        if proc.poll() is not None:
            raise ServerFailed(f"exited with status {proc.returncode} before accepting")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(sock))
            return time.perf_counter() - started
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        if time.perf_counter() > deadline:
            raise ServerFailed(f"socket {sock} not accepting after {timeout:.0f}s")
        time.sleep(0.002)


def start(
    system: str,
    argv: Sequence[str],
    sock: Path,
    log: Path,
    *,
    cpus: frozenset[int] | None = None,
    timeout: float = 20.0,
) -> Server:
    """Start ``argv`` (stdout and stderr to ``log``) and wait until ``sock`` accepts."""
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup(cpus),
            close_fds=True,
        )
    try:
        ready = wait_accepting(proc, sock, started, timeout)
    except BaseException as exc:
        stop_process(proc)
        if isinstance(exc, ServerFailed):
            raise ServerFailed(f"{system} did not start: {exc}\n{log_tail(log)}") from None
        raise
    return Server(system, proc, sock, log, ready, list(argv))


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def stop(server: Server) -> None:
    """Stop a server started by ``start``."""
    stop_process(server.proc)


# ---------------------------------------------------------------------- the three systems


def tmemd_argv(sock: Path, memory: int, admin_sock: Path | None = None) -> list[str]:
    """tmemd from this checkout, with the interpreter running the benchmark."""
    argv = [sys.executable, "-m", "tmemd", "--socket", str(sock), "--memory", str(memory)]
    if admin_sock is not None:
        argv += ["--admin-socket", str(admin_sock)]
    return [*argv, "--log-format", "json", "--log-level", "warning"]


def memcached_argv(sock: Path, threads: int, memory_mb: int) -> list[str]:
    """memcached on a Unix socket only (-s disables TCP and UDP)."""
    argv = ["memcached", "-s", str(sock), "-a", "0700", "-m", str(memory_mb), "-t", str(threads)]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root unless told which user
    return argv


def redis_argv(sock: Path, workdir: Path) -> list[str]:
    """redis-server on a Unix socket only, no persistence, logging to stdout."""
    return [
        "redis-server",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--port",
        "0",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        "",
        "--daemonize",
        "no",
    ]


def server_binary(system: str) -> str | None:
    """Path of the server executable, or None when it is not installed."""
    if system == "tmemd":
        return sys.executable
    return shutil.which({"memcached": "memcached", "redis": "redis-server"}[system])


def server_version(system: str) -> str:
    """Version string of an installed server."""
    try:
        if system.startswith("tmemd"):
            import tmemd

            rings = {"tmemd": "rings", "tmemd-map": "rings, mapped reads"}.get(
                system, "socket only"
            )
            return f"tmemd {tmemd.__version__} (Python {sys.version.split()[0]}; guests: {rings})"
        flag = {"memcached": ["memcached", "-V"], "redis": ["redis-server", "--version"]}[system]
        out = subprocess.run(flag, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
