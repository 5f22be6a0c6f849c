"""Shared fixtures: one synthetic data folder, one tiny trained model and its bundles per test session.

Heavy libraries are imported inside the fixtures so the torch-free suite
(tests/torchfree, run in an environment without torch) can share this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 generated student-work images with metadata.jsonl (seed 0)."""
    from train.synth import generate

    out = tmp_path_factory.mktemp("synth") / "data"
    generate(out, n=200, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the `tiny` preset trained briefly on `synth_data`."""
    from train.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    # 3 epochs instead of the preset's 22: a higher learning rate than the preset's gets this short
    # schedule far enough that the captions are stable (int8 parity, token agreement).
    train(TrainConfig(data=synth_data, out=out, preset="tiny", epochs=3, batch_size=16, lr=2e-3, seed=0))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: Path) -> Path:
    return tiny_run / "best"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle exported from `tiny_checkpoint`."""
    from export.onnx import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "fp32")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 bundle exported from `tiny_checkpoint`."""
    from export.onnx import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "int8", quantize="int8")
