"""edlight export: PyTorch checkpoint -> verified ONNX bundle (Optimum + ONNX Runtime), and parity checks.

Modules: `onnx` (export_bundle), `quantize` (dynamic int8), `validate` (ONNX vs PyTorch on real
inputs), `parity` (engine vs PyTorch BLEU), `cli` / `parity_cli` (the click commands).
Importing this package is cheap; torch/optimum load when a module that needs them is imported.
"""

from __future__ import annotations

from engine.errors import EdlightError


class ExportError(EdlightError):
    """A checkpoint cannot be exported, or the exported model does not match PyTorch."""


class ExportCheckFailed(ExportError):
    """The export ran and a check of what it wrote failed (ONNX outputs or greedy tokens differ from
    PyTorch, or the parity check): `edlight export` exits 1 for it, 2 for an export that cannot run."""


__all__ = ["ExportCheckFailed", "ExportError"]
