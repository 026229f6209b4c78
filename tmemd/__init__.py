"""tmemd: the transcendent memory host daemon."""

__version__ = "0.1.0"
