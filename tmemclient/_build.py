"""Which build of the hot modules is in use: compiled by mypyc, or pure Python.

The modules on the per-request path of both sides (``COMPILED``) are compiled to C extension
modules with mypyc when the project is installed (setup.py), if a C compiler is there; the same
source runs interpreted when they are not (docs/performance.md, "Compiled modules").

``TMEM_PURE=1`` in the environment chooses pure Python: at install, nothing is compiled; at run
time, the ``.py`` files are imported even where compiled modules sit next to them (the test suite
runs once each way; tmemd processes started from a pure run inherit it). This module stays
interpreted and imports only the standard library: setup.py reads ``COMPILED`` from it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

# The modules mypyc compiles, as paths from the project's root (setup.py) and module names.
COMPILED: Final = (
    "tmemclient/wire/codec.py",
    "tmemclient/wire/layout.py",
    "tmemclient/wire/messages.py",
    "tmemclient/wire/requests.py",
    "tmemclient/wire/ring.py",
    "tmemclient/core.py",
    "tmemclient/_pool.py",
    "tmemclient/_plans.py",
    "tmemclient/mapping.py",
    "tmemd/session.py",
    "tmemd/connection.py",
    "tmemd/poller.py",
    "tmemd/store.py",
    "tmemd/state.py",
    "tmemd/accounts.py",
    "tmemd/packing.py",
    "tmemd/mirroring.py",
    "tmemd/lending.py",
    "tmemd/audit.py",
    "tmemd/budget.py",
    "tmemd/deferred.py",
    "tmemd/slots.py",
    "tmemd/policy.py",
    "tmemd/zpool.py",
    "tmemd/dedup.py",
    "tmemd/memfiles.py",
    "tmemd/compress.py",
)
MODULES: Final = frozenset(p.removesuffix(".py").replace("/", ".") for p in COMPILED)
GROUP: Final = "tmemclient._hot"  # mypyc's shared library: tmemclient/_hot__mypyc.*.so


def pure_requested() -> bool:
    """Is ``TMEM_PURE`` set (to anything but empty or 0)?"""
    return os.environ.get("TMEM_PURE", "") not in ("", "0")


class _PureFinder(importlib.abc.MetaPathFinder):
    """Imports the ``.py`` file of a compiled module, not the extension module beside it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or sys.path:
            source = Path(entry) / leaf
            if source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install_pure_finder() -> None:
    """With ``TMEM_PURE`` set, make the compiled modules import as pure Python (once)."""
    if pure_requested() and not any(isinstance(f, _PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureFinder())


def compiled_modules() -> list[str]:
    """The modules of ``MODULES`` already imported that are extension modules."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        name
        for name in MODULES
        if (m := sys.modules.get(name)) is not None and (m.__file__ or "").endswith(suffixes)
    )


def build() -> str:
    """``compiled`` (every module of ``MODULES`` is a mypyc extension), ``pure`` (none is),
    or ``mixed`` (a stale or partial build: reinstall). Imports them all to find out."""
    for name in sorted(MODULES):
        importlib.import_module(name)
    compiled = len(compiled_modules())
    if compiled == len(MODULES):
        return "compiled"
    return "pure" if compiled == 0 else "mixed"


install_pure_finder()  # first thing tmemclient (and so tmemd) imports: before any of MODULES
