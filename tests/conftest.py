"""Shared fixtures: one synthetic data folder, one tiny trained model and its bundles per test session.

Heavy libraries are imported inside the fixtures so the torch-free suite
(tests/torchfree, run in an environment without torch) can share this file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def built_once(
    config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]
) -> Path:
    """A folder `name` holding what `build(folder)` made, made once per test run.

    `make test` runs the suite in pytest-xdist worker processes, each of which runs session fixtures on its
    own: the first worker to ask builds into a folder they all share (the run's temporary folder, which holds
    each worker's own) while the others wait on a lock, then take it. A build that failed is tried again.
    """
    if not hasattr(config, "workerinput"):  # not an xdist worker (xdist sets it on its workers' config)
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import fcntl  # POSIX only, as xdist runs are here (make test); a plain run needs no lock

    shared = tmp_path_factory.getbasetemp().parent
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def synth_data(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 generated student-work images with metadata.jsonl (seed 0)."""
    from train.synth import generate

    return built_once(pytestconfig, tmp_path_factory, "synth", lambda folder: generate(folder / "data", n=200, seed=0)) / "data"


@pytest.fixture(scope="session")
def tiny_run(synth_data: Path, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the `tiny` preset trained briefly on `synth_data`."""
    from train.loop import TrainConfig, train

    # 3 epochs instead of the preset's 22: a higher learning rate than the preset's gets this short
    # schedule far enough that the captions are stable (int8 parity, token agreement).
    def run(folder: Path) -> None:
        train(TrainConfig(data=synth_data, out=folder / "tiny", preset="tiny", epochs=3, batch_size=16, lr=2e-3, seed=0))

    return built_once(pytestconfig, tmp_path_factory, "runs", run) / "tiny"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    return tiny_run / "best"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle exported from `tiny_checkpoint`."""
    from export.onnx import export_bundle

    return built_once(pytestconfig, tmp_path_factory, "bundle-fp32", lambda folder: export_bundle(tiny_checkpoint, folder / "fp32")) / "fp32"


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_checkpoint: Path, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 bundle exported from `tiny_checkpoint`."""
    from export.onnx import export_bundle

    def export(folder: Path) -> None:
        export_bundle(tiny_checkpoint, folder / "int8", quantize="int8")

    return built_once(pytestconfig, tmp_path_factory, "bundle-int8", export) / "int8"
