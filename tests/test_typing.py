"""The public API's type hints as a user's type checker reads them (the package ships py.typed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

USER_SCRIPT = '''
from pathlib import Path

import numpy as np
from PIL import Image

from engine import Captioner

captioner = Captioner(Path("bundle"), threads=1)
paths = [Path("a.jpg"), Path("b.jpg")]
captions: list[str] = captioner.caption(paths)
captions = captioner.caption(p for p in paths)
captions = captioner.caption(np.array(["a.jpg", "b.jpg"]))
captions = captioner.caption({"a.jpg"})
captions = captioner.caption(Image.new("RGB", (4, 4)))
captions = captioner.caption(b"png bytes")
captions = captioner.caption(42)
'''


def test_caption_takes_every_input_it_accepts_under_mypy_strict(tmp_path: Path) -> None:
    """caption() was annotated Sequence[...]: a user's `mypy --strict` refused generators, sets and arrays of paths,
    all of which it takes."""
    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    # In its own process: mypy raises the interpreter's recursion limit to 16384 for good, which the tests after
    # this one would inherit. From the checkout's root, for the engine package as the checkout has it.
    stdout = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    ).stdout  # fmt: skip
    errors = [line for line in stdout.splitlines() if line.startswith(str(script)) and ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}:17: error: Argument 1 to \"caption\""), stdout
