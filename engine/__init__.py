"""edlight engine: torch-free Pix2Struct captioning with ONNX Runtime.

Nothing in this package imports torch, transformers or optimum. `Captioner` is loaded on first
use, so `import engine` (and `edlight --help`) stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# ONNX Runtime's official Linux builds send usage events to Microsoft over HTTPS and keep a device id under
# ~/.cache (warning in colour on stderr where HOME cannot be written). A captioning server for pupils' work
# may have no network or no HOME, and should not phone out unasked: off unless ORT_DISABLE_TELEMETRY says
# otherwise. ONNX Runtime reads it when it loads, and every edlight module imports this package first.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from engine.errors import BundleError, EdlightError, ImageError, ModelRuntimeError

if TYPE_CHECKING:
    from engine.captioner import Captioner, Timings
    from engine.folder import FolderSummary

__version__ = "0.1.0"  # the one place it is stated: pyproject.toml reads it
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


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
