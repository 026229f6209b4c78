"""The build in use: ``./dev test`` runs the suite on pure Python (TMEM_PURE=1) and then on the
modules mypyc compiled, and says which in TMEM_BUILD; these tests make sure each run imports
what it says (a "compiled" run that silently ran pure Python would measure and test nothing
new). tmemclient/_build.py, setup.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tmemclient import _build


def wanted() -> str:
    want = os.environ.get("TMEM_BUILD")
    if want is None:
        pytest.skip("TMEM_BUILD is not set (./dev test sets it: pure, then compiled)")
    return want


def test_this_run_imports_the_build_it_asked_for() -> None:
    want = wanted()
    assert _build.build() == want, f"compiled modules: {_build.compiled_modules()}"


def test_a_tmemd_process_runs_the_same_build() -> None:
    """Integration tests run tmemd in processes of its own: they inherit the choice."""
    want = wanted()
    out = subprocess.run(
        [sys.executable, "-m", "tmemd", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith(f"({want})")


def test_tmem_pure_imports_the_python_source_whatever_is_built() -> None:
    code = "from tmemclient import _build; print(_build.build(), _build.compiled_modules())"
    env = {**os.environ, "TMEM_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.split() == ["pure", "[]"]


def test_every_compiled_module_is_a_source_file_of_the_project() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for path in _build.COMPILED:
        assert os.path.isfile(os.path.join(root, path)), path
