"""The attackers' guest, spoken by hand (PROTOCOL.md): the handshake, then a non-blocking socket
it may flood, leave unread or abuse as no tmemclient would. Built from the wire layer's pieces
(the HELLO frame, the codec, the rings, SCM_RIGHTS), not from the client."""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import time
from typing import Any

from tmemclient.core import hello_message
from tmemclient.region import create_region
from tmemclient.wire import layout
from tmemclient.wire.codec import NEED_DATA, FrameDecoder, encode_frame
from tmemclient.wire.fds import close_all, fds_from_ancillary
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import Limits, Status, split_reply
from tmemclient.wire.ring import Rings

ATTACK_FRAMES = 16  # one 64 KiB page: every page an attacker puts names frame 0


class Gone(Exception):
    """The daemon closed an attacker's connection."""


class RawGuest:
    """A guest spoken by hand (PROTOCOL.md, as tests/integration/test_bad_input.py's Raw): the
    handshake, then a non-blocking socket; keeps the fds that came with the HELLO reply (mirror,
    loan)."""

    def __init__(
        self,
        path: str,
        name: str,
        frames: int = ATTACK_FRAMES,
        *,
        ring: int = 0,
        map_pages: bool = False,
        lend: bool = False,
    ) -> None:
        fd, self.region = create_region(frames, layout.ring_bytes(ring))
        self.frames = frames
        self.fds: list[int] = []
        self.rings: Rings | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(10)
            try:
                self.sock.connect(path)
                hello = hello_message(name, frames, ring, map_pages, lend)
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                self.sock.sendmsg([hello], rights)
            finally:
                os.close(fd)
            self.decoder = FrameDecoder(64 << 20)
            buf = bytearray(1 << 16)
            deadline = time.monotonic() + 10
            while (message := self.decoder.next_message()) is NEED_DATA:
                if time.monotonic() > deadline:
                    raise Gone("no HELLO reply within 10 s")
                n, anc, flags, _ = self.sock.recvmsg_into(
                    [buf], socket.CMSG_SPACE(8), socket.MSG_CMSG_CLOEXEC
                )
                self.fds += fds_from_ancillary(anc, flags, "too many fds with the HELLO reply")
                if not n:
                    raise Gone("closed during the handshake")
                self.decoder.feed(memoryview(buf)[:n])
            _, status, result = split_reply(message)
            if status != Status.OK:
                raise Gone(f"HELLO refused: {message}")
            self.limits = Limits.from_wire(result)
            if self.limits.ring:
                area = memoryview(self.region)[frames * FRAME_SIZE :]
                self.rings = Rings(area, self.limits.ring, "guest")
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    def send_some(self, data: bytes | memoryview) -> int:
        """Bytes of ``data`` the socket took now (0 when full); Gone when the daemon left."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Gone(str(exc)) from None

    def recv_some(self, *, decode: bool = True) -> int:
        """Read what has arrived (into the decoder, unless only counted); bytes read. Gone at
        EOF."""
        got = 0
        for _ in range(64):
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                return got
            except ConnectionResetError as exc:
                raise Gone(str(exc)) from None
            if not data:
                raise Gone(self.last_words())
            if decode:
                self.decoder.feed(data)
            got += len(data)
        return got

    def last_words(self) -> str:
        """The daemon's last notice, if it sent one before closing."""
        text = "closed by tmemd"
        with contextlib.suppress(Exception):
            for message in self.decoder.messages():
                if type(message) is list and len(message) == 3 and message[0] == 0:
                    text = f"closed by tmemd: {message[2]}"
        return text

    def call(self, op: int, *args: Any, timeout: float = 10.0) -> Any:
        """One request, waiting for its reply (only while nothing else is in flight)."""
        data = encode_frame([op, 1, *args])
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            view = view[self.send_some(view) :]
            if view:
                select.select([], [self.sock], [], 0.05)
            if time.monotonic() > deadline:
                raise TimeoutError("tmemd did not take a request")
        while (message := self.decoder.next_message()) is NEED_DATA:
            select.select([self.sock], [], [], 0.05)
            self.recv_some()
            if time.monotonic() > deadline:
                raise TimeoutError("tmemd did not answer")
        if message[1] != 0:
            raise RuntimeError(f"request {op} refused: {message}")
        return message[2]

    def close(self) -> None:
        self.sock.close()
        close_all(self.fds)
        self.fds = []
        if self.rings is not None:
            self.rings.release()
            self.rings = None
        with contextlib.suppress(BufferError):
            self.region.close()
