"""Fixtures that start a real tmemd process on a Unix socket in a temporary directory."""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


class Daemon:
    """A running tmemd subprocess and what it logged."""

    def __init__(
        self, workdir: Path, *args: str, preexec_fn: Callable[[], None] | None = None
    ) -> None:
        """Start tmemd in ``workdir`` with ``args``; ``preexec_fn`` runs in the child before
        tmemd starts (e.g. to lower its resource limits)."""
        self.workdir = workdir
        self.socket = workdir / "tmemd.sock"
        self.log_path = workdir / "tmemd.log"
        self._log = self.log_path.open("wb")
        self.args = ["--socket", str(self.socket), "--log-format", "json", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tmemd", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=preexec_fn,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tmemd exited {self.proc.returncode}: {self.log_text()}")
            if self.socket.exists():
                probe = socket.socket(socket.AF_UNIX)
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.02)
        raise RuntimeError(f"tmemd did not start within {START_TIMEOUT}s: {self.log_text()}")

    def log_text(self) -> str:
        """Everything the daemon wrote so far."""
        self._log.flush()
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

    @property
    def alive(self) -> bool:
        """True while the daemon process runs."""
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a bounded wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


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
