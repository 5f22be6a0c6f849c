"""The engine never imports torch, transformers or optimum, not even indirectly.

A subprocess installs an import hook that makes those packages unimportable, imports every engine
module, captions an image with a bundle and runs the CLI. Run in the full environment, this proves
the engine does not *reach* for them even though they are installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {"torch", "transformers", "optimum", "torchvision", "accelerate"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name} (the engine must not need it)")
            return None

    sys.meta_path.insert(0, Blocker())

    import engine
    modules = sorted(m.name for m in pkgutil.walk_packages(engine.__path__, "engine."))
    for name in modules:
        importlib.import_module(name)

    from PIL import Image
    from engine import Captioner
    from engine.cli import main

    captions = Captioner(sys.argv[1], batch_size=2).caption([Image.new("RGB", (64, 48), "white")] * 3)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions), captions
    try:
        main(["caption", sys.argv[2], "--model", sys.argv[1], "--out", sys.argv[3], "--quiet"])
    except SystemExit as exit:
        assert exit.code in (0, None), exit.code
    for command in (["train", "--data", "d", "--out", "o"], ["evaluate", "x"], ["export", "x", "--out", "y"]):
        try:
            main(command)
        except SystemExit as exit:  # the missing extra is said, not a traceback
            assert exit.code == 2, (command, exit.code)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("OK", len(modules), "modules:", ",".join(modules))
    """
)


def test_engine_runs_with_torch_transformers_optimum_blocked(engine_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(engine_bundle), str(folder), str(out)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
    for module in ("engine.captioner", "engine.decode", "engine.folder", "engine.caption_cli", "engine.session"):
        assert module in result.stdout
    assert '"file": "red.png"' in out.read_text()
    assert "error: `edlight train` needs the [train] extra (torch is not installed)" in result.stderr
    assert "error: `edlight export` needs the [export] extra (torch is not installed)" in result.stderr


def test_install_hint_fits_how_edlight_was_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import errors

    source = Path(__file__).resolve().parents[2]  # this checkout: its folder is named, as pip needs it
    assert errors.install_hint("train") == f"in the edlight source folder ({source}): pip install '.[train]' -c constraints.txt"
    # A wheel's files in site-packages: no source folder to name; pip adds an installed edlight's extra.
    installed = tmp_path / "site-packages" / "engine"
    installed.mkdir(parents=True)
    monkeypatch.setattr(errors, "__file__", str(installed / "errors.py"))
    hint = errors.install_hint("train")
    assert hint == f"with pip install 'edlight[train]' -c {installed / 'constraints.txt'} (the tested versions)"
    assert "source folder" not in hint
    # The wheel carries the pins it names: the source's own file, as package data.
    assert (source / "engine" / "constraints.txt").read_text() == (source / "constraints.txt").read_text()
    assert '"constraints.txt"' in (source / "pyproject.toml").read_text()


def test_python_m_engine_is_the_edlight_command() -> None:
    """For an environment whose scripts folder is not on PATH; the version is the package's one."""
    import engine

    result = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith(f"version {engine.__version__}"), result
    assert "Captioner" in dir(engine)  # the names loaded on first use are listed too


def test_the_blocker_itself_blocks(tmp_path: Path) -> None:
    """Guard against a hook that blocks nothing: importing transformers under it must fail."""
    code = SCRIPT.split("import engine")[0] + "import transformers\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "blocked import of transformers" in result.stderr or "No module named 'transformers'" in result.stderr


def test_onnx_runtime_telemetry_is_off_unless_asked_for(engine_bundle: Path, tmp_path: Path) -> None:
    """ONNX Runtime's official builds keep a device id under ~/.cache/Microsoft and send usage events; edlight
    turns that off (ORT_DISABLE_TELEMETRY), and a setting in the environment wins."""
    import os

    script = "from engine import Captioner; import sys; Captioner(sys.argv[1], threads=1)"
    # ONNX Runtime keeps quiet by itself where one of these says it runs under CI, as this suite may.
    ci = {"CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID",
          "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", *ci}}
    for setting in (None, "0"):
        home = tmp_path / f"home-{setting}"
        home.mkdir()
        extra = {"ORT_DISABLE_TELEMETRY": setting} if setting is not None else {}
        subprocess.run([sys.executable, "-c", script, str(engine_bundle)], env={**env, "HOME": str(home), **extra},
                       check=True, timeout=120)  # fmt: skip
        found = sorted(p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file())
        if setting is None:
            assert found == [], found
        else:  # asked for: ONNX Runtime keeps its id, which shows the variable is what turns it off
            assert any("onnxruntime" in name for name in found), found
