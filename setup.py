"""Build hook: compile the hot modules (tmemclient/_build.py's COMPILED) with mypyc.

Everything else about the project is in pyproject.toml. The compiled modules are C extension
modules beside the ``.py`` files they are built from; the same source runs interpreted without
them. So the build never fails for want of them: with ``TMEM_PURE=1`` set, without mypy or
without a C compiler, or if compiling fails, it says so in one line and installs pure Python.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _say(message: str) -> None:
    print(f"tmem: {message}", file=sys.stderr, flush=True)


def _build_module() -> dict[str, Any]:
    """tmemclient/_build.py's names, read without importing tmemclient (its deps may be absent)."""
    namespace: dict[str, Any] = {"__name__": "tmem_build"}
    source = ROOT / "tmemclient" / "_build.py"
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    return namespace


def _compiler() -> str | None:
    """The C compiler the build would use, if it is there."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shutil.which(cc.split()[0])


def _remove_stale(build: dict[str, Any]) -> None:
    """Remove extension modules an earlier build left in the source tree (an editable install
    builds them there): installing pure Python, they would still be imported, and be stale."""
    for path in build["COMPILED"]:
        for stale in (ROOT / path).parent.glob(Path(path).stem + ".*.so"):
            stale.unlink()
    group_dir, _, group = build["GROUP"].rpartition(".")
    for stale in (ROOT / group_dir.replace(".", "/")).glob(group + "__mypyc.*.so"):
        stale.unlink()


def ext_modules() -> list[Any]:
    build = _build_module()
    extensions = _ext_modules(build)
    if not extensions:
        _remove_stale(build)
    return extensions


def _ext_modules(build: dict[str, Any]) -> list[Any]:
    if build["pure_requested"]():
        _say("TMEM_PURE is set: installing pure Python (nothing compiled)")
        return []
    if _compiler() is None:
        _say("no C compiler found: installing pure Python (the hot modules are not compiled)")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc (mypy) is not installed: installing pure Python")
        return []
    os.chdir(ROOT)  # mypy reads its settings from pyproject.toml here
    try:
        # mypy runs over the modules as in ./dev test (pyproject.toml's strict settings), but
        # the packages it cannot find in the build's isolated environment (trio, structlog,
        # lz4...) are Any, which is all that compiling needs of them: the checks that only
        # complain of such an Any are off here (./dev test runs them with the packages there).
        return list(
            mypycify(
                [
                    "--ignore-missing-imports",
                    "--no-warn-unused-ignores",
                    "--no-warn-return-any",
                    "--allow-subclassing-any",
                    "--allow-untyped-decorators",
                    *build["COMPILED"],
                ],
                group_name=build["GROUP"],
            )
        )
    except (Exception, SystemExit) as exc:  # mypyc exits (SystemExit) on a type error
        _say(f"mypyc could not compile ({type(exc).__name__}: {exc}): installing pure Python")
        return []


class BuildExt(build_ext):
    """build_ext that installs pure Python when compiling the extension modules fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a compiler that is not one...
            _say(f"compiling failed ({type(exc).__name__}: {exc}): installing pure Python")
            # A module compiled before the failure would import, then miss its group's shared
            # library: take back everything this build made.
            for path in self.get_outputs():
                Path(path).unlink(missing_ok=True)
            self.extensions = []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
