"""The exceptions tmemclient raises. A refused put or a miss is not an error: they return False/None."""

from __future__ import annotations


class TmemError(Exception):
    """Base class of every tmem error."""


class InvalidArgument(TmemError, ValueError):
    """An argument was out of range or of the wrong type (checked locally or by the daemon)."""


class UnknownPool(TmemError):
    """The pool handle is unknown to the daemon, or the pool was destroyed."""


class PermissionDenied(TmemError, PermissionError):
    """The daemon's policy refused this guest the operation (a shared pool without a grant...)."""


class ProtocolError(TmemError):
    """A peer broke the wire protocol; the connection is closed."""


class VersionMismatch(ProtocolError):
    """The daemon does not speak this client's protocol version."""


class NotFound(TmemError, LookupError):
    """An administrative request named something that does not exist (a guest, a grant)."""


class LimitExceeded(TmemError):
    """A per-guest limit (pools, region size, batch size) was reached."""


class GuestConflict(TmemError):
    """The guest name is already connected and the policy allows only one session of it."""


class DaemonGone(TmemError, ConnectionError):
    """The connection to tmemd is closed: the daemon stopped, or the connection broke."""


class DaemonShuttingDown(DaemonGone):
    """The daemon announced that it is going away."""
