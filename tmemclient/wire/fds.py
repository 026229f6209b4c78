"""Descriptors passed with SCM_RIGHTS (PROTOCOL.md §1, §4.2): received safely on both sides.

If more fds arrive than the ancillary buffer holds, the kernel sets MSG_CTRUNC, installs the
ones that fit and drops the rest (docs/design.md §4.1): every fd that did arrive is closed and the
connection is refused.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket

from tmemclient.wire.errors import ProtocolError


def fds_from_ancillary(
    ancdata: list[tuple[int, int, bytes]], flags: int, too_many: str
) -> list[int]:
    """Every fd that came with a message (SCM_RIGHTS). If the control data was truncated (the
    peer sent more fds than room was made for), closes them and raises ProtocolError(too_many).
    The daemon reads a guest's HELLO with it, and a guest the reply that may carry its mirror."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            fds.extend(got)
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise ProtocolError(too_many)
    return fds


def close_all(fds: list[int]) -> None:
    """Close fds we received but will not use."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
