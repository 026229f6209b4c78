"""The admin protocol, client side: ``AdminClient`` speaks to tmemd's admin socket.

Same framing as the guest protocol (4-byte big-endian length + one msgpack object). A request is
``[op, req_id, args]`` with ``op`` a string and ``args`` a map; the reply is
``[req_id, status, result]`` with the guest protocol's status codes. proto/PROTOCOL.md lists the
ops and their fields; the daemon checks the peer's credentials on every connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Final

from tmemclient.wire.codec import NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.errors import DaemonGone, ProtocolError
from tmemclient.wire.messages import Status, error_for_status, split_reply

ADMIN_SOCKET_ENV: Final = "TMEM_ADMIN_SOCKET"
DEFAULT_ADMIN_SOCKET: Final = "/run/tmemd/admin.sock"


class NotAdminSocket(ProtocolError):
    """The path is tmemd's guest socket: it refused our request as a guest handshake."""


class AdminClient:
    """A blocking connection to the admin socket."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise DaemonGone(
                f"no tmemd admin socket at {self.path} ({exc.strerror}); is tmemd running with "
                f"--admin-socket? Set --admin-socket or {ADMIN_SOCKET_ENV}"
            ) from exc
        except PermissionError as exc:
            self._sock.close()
            raise DaemonGone(
                f"cannot open {self.path}: permission denied; run as root or the admin group"
            ) from exc
        self._decoder = FrameDecoder(64 << 20)
        self._req_id = 0

    def call(self, op: str, **args: Any) -> Any:
        """One admin request; raises the TmemError subclass for an error reply."""
        self._req_id += 1
        try:
            # The daemon may have answered (a refusal) and closed first: read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(encode_frame([op, self._req_id, args]))
            while (message := self._decoder.next_message()) is NEED_DATA:
                data = self._sock.recv(1 << 16)
                if not data:
                    raise DaemonGone("tmemd closed the admin connection")
                self._decoder.feed(data)
        except TimeoutError as exc:
            raise DaemonGone(f"tmemd did not answer on {self.path}") from exc
        except OSError as exc:
            raise DaemonGone(f"admin connection to {self.path} failed: {exc}") from exc
        req_id, status, result = split_reply(message)
        if status == Status.PROTOCOL and "HELLO" in result:
            # tmemd's guest socket refuses anything but a HELLO carrying the guest's region fd
            # as a broken handshake; the admin socket's PROTOCOL errors never name HELLO.
            raise NotAdminSocket(f"{self.path} is tmemd's guest socket, not its admin socket")
        if status != Status.OK:  # also a refusal sent with req_id 0 before any request
            raise error_for_status(status, result)
        if req_id != self._req_id:
            raise ProtocolError(f"admin reply for req_id {req_id}, want {self._req_id}")
        return result

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
