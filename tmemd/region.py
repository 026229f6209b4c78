"""Checking and mapping a guest's shared region (docs/design.md §4.1: what bites in shared memory).

A guest that could shrink a file the daemon has mapped would kill the daemon with SIGBUS on its
next access. So before mapping we insist on a regular shmem file (F_GET_SEALS fails with EINVAL
on anything that cannot carry seals) with F_SEAL_SHRINK and F_SEAL_GROW set and exactly the
announced size. Then no later ftruncate by the guest can succeed.

Seals alone are not enough: a memfd on hugetlbfs (MFD_HUGETLB) carries them too, and a hole
there is filled from the huge page pool on access, raising SIGBUS once that is empty. So the
file must also live on tmpfs (``fstatfs``), where a hole is just a page of memory.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import mmap
import os
import socket
import stat

from tmemclient.wire.errors import InvalidArgument, LimitExceeded
from tmemclient.wire.fds import fds_from_ancillary
from tmemclient.wire.layout import FRAME_SIZE

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
TMPFS_MAGIC = 0x01021994  # <linux/magic.h>: shmem, where memfds live
HUGETLBFS_MAGIC = 0x958458F6


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(None, use_errno=True)
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]
_fstatfs.restype = ctypes.c_int


def filesystem_type(fd: int) -> int:
    """The magic number of the file system ``fd`` lives on (fstatfs's f_type)."""
    buf = _StatFs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def hello_fds(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    """Every fd that arrived with a guest's bytes; raises ProtocolError (after closing them) if
    the control data was truncated, i.e. the guest sent more fds than the one we allow."""
    return fds_from_ancillary(
        ancdata, flags, "HELLO must carry exactly one fd (the region memfd); got more"
    )


def map_region(fd: int, frames: int, max_frames: int, extra: int = 0) -> mmap.mmap:
    """Check the guest's memfd and map it shared; the caller still owns (and closes) ``fd``.
    ``extra`` bytes follow the page frames (the rings, PROTOCOL.md §4.6)."""
    if not 1 <= frames <= max_frames:
        raise LimitExceeded(
            f"region of {frames} frames is outside 1..{max_frames} (max_region_frames)"
        )
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument("region fd is not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise InvalidArgument(
            "region fd cannot carry seals: create it with memfd_create(MFD_ALLOW_SEALING)"
        ) from exc
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise InvalidArgument("region memfd must have F_SEAL_SHRINK and F_SEAL_GROW set")
    fs = filesystem_type(fd)
    if fs != TMPFS_MAGIC:
        kind = "hugetlbfs (MFD_HUGETLB)" if fs == HUGETLBFS_MAGIC else f"file system 0x{fs:08x}"
        raise InvalidArgument(
            f"region memfd lives on {kind}, where an access can fault: create it with "
            "memfd_create(MFD_ALLOW_SEALING) and no MFD_HUGETLB"
        )
    size = frames * FRAME_SIZE + extra
    if st.st_size != size:
        rings = f" and {extra} bytes of rings" if extra else ""
        raise InvalidArgument(
            f"region memfd is {st.st_size} bytes, HELLO announced {frames} frames{rings} = "
            f"{size} bytes"
        )
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:  # F_SEAL_WRITE/F_SEAL_FUTURE_WRITE, an O_RDONLY fd, hugetlb, ...
        raise InvalidArgument(
            f"region memfd cannot be mapped shared read-write ({exc.strerror}): send a "
            "read-write memfd without write seals"
        ) from exc


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = array.array("i", creds)
    return pid, uid, gid
