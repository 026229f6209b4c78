"""tmemd: the transcendent memory host daemon."""

# First: with TMEM_PURE set, the compiled modules import as pure Python (tmemclient/_build.py).
import tmemclient._build  # noqa: F401

__version__ = "0.1.0"
