"""edlight engine: torch-free Pix2Struct captioning with ONNX Runtime.

Nothing in this package imports torch, transformers or optimum. `Captioner` is loaded on first
use, so `import engine` (and `edlight --help`) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import BundleError, EdlightError, ImageError, ModelRuntimeError

if TYPE_CHECKING:
    from engine.captioner import Captioner, Timings
    from engine.folder import FolderSummary

__version__ = "0.1.0"
__all__ = [
    "BundleError",
    "Captioner",
    "EdlightError",
    "FolderSummary",
    "ImageError",
    "ModelRuntimeError",
    "Timings",
]

_LAZY = {"Captioner": "engine.captioner", "Timings": "engine.captioner", "FolderSummary": "engine.folder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
