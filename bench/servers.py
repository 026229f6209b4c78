"""The servers the benchmarks compare: tmemd, memcached and redis-server, each on a Unix socket
in a directory the caller owns. Started and stopped by tmemd/launch.py, the one launcher tests,
benchmarks and the demo share; here are their command lines, versions and figures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tmemd.launch import Server, ServerFailed, log_tail, start, stop_process
from tmemd.launch import tmemd_argv as _tmemd_argv

__all__ = ["Server", "ServerFailed", "log_tail", "start", "stop", "stop_process"]

# How to get each peer when it is missing (Debian/Ubuntu package, Python client from PyPI).
INSTALL_HINTS = {
    "memcached": "apt-get install -y memcached && .venv/bin/pip install -e '.[bench]'",
    "redis": "apt-get install -y redis-server && .venv/bin/pip install -e '.[bench]'",
}


# ---------------------------------------------------------------------- the three systems


def tmemd_argv(sock: Path, memory: int, admin_sock: Path | None = None) -> list[str]:
    """tmemd as the interpreter running the benchmark runs it, quiet but for warnings."""
    return _tmemd_argv(sock, "--memory", str(memory), "--log-level", "warning", admin=admin_sock)


def stop(server: Server) -> None:
    """Stop a server started by ``start``."""
    stop_process(server.proc)


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
