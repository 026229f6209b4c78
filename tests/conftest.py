"""Fixtures that start a real tmemd process on a Unix socket in a temporary directory."""

from __future__ import annotations

import os
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
from tmemd.launch import Tmemd

ROOT = Path(__file__).resolve().parent.parent


class Daemon(Tmemd):
    """A tmemd for one test (tmemd/launch.py, the launcher tests, benchmarks and the demo
    share); ``preexec_fn`` runs in the child before tmemd starts (e.g. to lower its limits)."""

    def __init__(
        self, workdir: Path, *args: str, preexec_fn: Callable[[], None] | None = None
    ) -> None:
        super().__init__(workdir, *args, preexec=preexec_fn)


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
    """One tmemd with a 16 MiB budget; the test fails if it died on the way."""
    d = start_daemon("--memory", "16MiB")
    yield d
    assert d.alive, f"tmemd died during the test:\n{d.log_text()}"


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
