"""The README's set-up (`make run`, `make test`) on a machine whose Python is too old for the pinned set."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["run", "test"])
def test_make_names_a_python_too_old_before_building_anything(tmp_path: Path, target: str) -> None:
    # A stand-in for Ubuntu 22.04's python3: answers -V as 3.10 does and fails the version check.
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-V" ]; then echo "Python 3.10.12"; exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    venvs = {"VENV": tmp_path / "venv", "ENGINE_VENV": tmp_path / "venv-engine"}
    done = subprocess.run(
        ["make", "-C", str(REPO), target, f"PYTHON={fake}", *(f"{k}={v}" for k, v in venvs.items())],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""},
    )
    assert done.returncode != 0
    assert f"edlight needs Python 3.11 or newer; {fake} is Python 3.10.12. Name another, e.g. make {target} PYTHON=python3.12" in done.stderr
    assert not any(v.exists() for v in venvs.values())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_names_a_python_that_is_not_there(tmp_path: Path) -> None:
    missing = tmp_path / "python3.12"
    done = subprocess.run(
        ["make", "-C", str(REPO), "run", f"PYTHON={missing}", f"ENGINE_VENV={tmp_path / 'venv'}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""},
    )
    assert done.returncode != 0
    assert f"edlight needs Python 3.11 or newer; {missing} was not found." in done.stderr
    assert not (tmp_path / "venv").exists()
