"""The benchmark's child processes: forked, talking to the orchestrator over a pipe, dying with
it (PR_SET_PDEATHSIG) and, run as root, each its own tenant (uid).

A child's ``target(conn, *args)`` sends ("kind", value) messages; an exception it raises is sent
as ("error", traceback). The orchestrator reads them with ``Child.expect`` / ``Child.recv``,
which never wait longer than told, and ends every child with ``Child.stop``.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from bench.peers import say

_PR_SET_PDEATHSIG = 1


def _child_entry(
    target: Callable[..., None], uid: int | None, conn: Connection, *args: Any
) -> None:
    """Start of every forked child: die with the orchestrator, leave Ctrl-C to it, and (run
    as root) become tenant ``uid``."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if uid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        target(conn, *args)
    except Exception:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def commands(conn: Connection) -> Iterator[Any]:
    """The orchestrator's commands to a child, until ("close",) or the pipe's end."""
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        if cmd[0] == "close":
            return
        yield cmd


class Child:
    """A forked process that talks to the orchestrator over a pipe."""

    def __init__(
        self,
        ctx: multiprocessing.context.ForkContext,
        name: str,
        target: Callable[..., None],
        *args: Any,
        uid: int | None = None,
    ) -> None:
        parent, child = ctx.Pipe()
        self.name = name
        self.conn = parent
        self.proc = ctx.Process(
            target=_child_entry, args=(target, uid, child, *args), name=name, daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float) -> tuple[str, Any]:
        """The child's next message ("kind", value); TimeoutError if none in ``timeout``."""
        if not self.conn.poll(max(0.0, timeout)):
            raise TimeoutError(f"{self.name} sent nothing within {timeout:.0f}s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"{self.name} exited without answering (exit code {self.proc.exitcode})"
            ) from None
        return kind, value

    def expect(self, want: str, timeout: float) -> Any:
        """The child's next message, which must be ``want``."""
        kind, value = self.recv(timeout)
        if kind != want:
            raise RuntimeError(f"{self.name}: expected {want!r}, got {kind!r}:\n{value}")
        return value

    def stop(self, grace: float = 5.0) -> None:
        """Wait for it to end, then SIGTERM, then SIGKILL; always reaps."""
        self.proc.join(timeout=grace)
        if self.proc.is_alive():
            say(f"{self.name} did not end within {grace:.0f}s: SIGTERM")
            self.proc.terminate()
            self.proc.join(timeout=grace)
        if self.proc.is_alive():
            say(f"{self.name} did not end on SIGTERM: SIGKILL")
            self.proc.kill()
            self.proc.join(timeout=grace)
        self.conn.close()
