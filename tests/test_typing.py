"""The public API's type hints as a user's type checker reads them (the package ships py.typed)."""

from __future__ import annotations

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


def test_caption_takes_every_input_it_accepts_under_mypy_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """caption() was annotated Sequence[...]: a user's `mypy --strict` refused generators, sets and arrays of paths,
    all of which it takes."""
    mypy = pytest.importorskip("mypy.api")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    monkeypatch.chdir(REPO)  # the engine package as this checkout has it
    stdout, _, _ = mypy.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), str(script)])
    errors = [line for line in stdout.splitlines() if line.startswith(str(script)) and ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}:17: error: Argument 1 to \"caption\""), stdout
