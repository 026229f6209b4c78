"""tmemclient: the guest library for tmemd, transcendent memory for Linux processes.

Synchronous::

    with tmemclient.connect("/run/tmemd/tmemd.sock", name="vm1") as client:
        pool = client.new_pool()
        pool.put(oid, index, page)      # False when the daemon declines
        pool.get(oid, index)            # bytes, or None on a miss

trio: ``async with tmemclient.open_client(path, name="vm1") as client:`` with the same methods,
awaited.
"""

# First: with TMEM_PURE set, the compiled modules import as pure Python (tmemclient/_build.py).
from tmemclient import _build  # noqa: F401
from tmemclient.aclient import AsyncClient, open_client
from tmemclient.apool import AsyncPool
from tmemclient.areconnect import AsyncResilientClient, AsyncResilientPool, open_resilient_client
from tmemclient.client import DEFAULT_FRAMES, Client, connect
from tmemclient.pool import Pool
from tmemclient.reconnect import (
    Reconnected,
    ResilientClient,
    ResilientPool,
    Retry,
    Unreachable,
    connect_resilient,
)
from tmemclient.region import FrameRun
from tmemclient.wire.errors import (
    DaemonGone,
    DaemonShuttingDown,
    GuestConflict,
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    ProtocolError,
    TmemError,
    UnknownPool,
    VersionMismatch,
)
from tmemclient.wire.layout import FRAME_SIZE
from tmemclient.wire.messages import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FRAMES",
    "FRAME_SIZE",
    "PROTOCOL_VERSION",
    "AsyncClient",
    "AsyncPool",
    "AsyncResilientClient",
    "AsyncResilientPool",
    "Client",
    "DaemonGone",
    "DaemonShuttingDown",
    "FrameRun",
    "GuestConflict",
    "InvalidArgument",
    "LimitExceeded",
    "PermissionDenied",
    "Pool",
    "ProtocolError",
    "Reconnected",
    "ResilientClient",
    "ResilientPool",
    "Retry",
    "TmemError",
    "UnknownPool",
    "Unreachable",
    "VersionMismatch",
    "connect",
    "connect_resilient",
    "open_client",
    "open_resilient_client",
]
