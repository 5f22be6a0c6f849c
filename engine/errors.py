"""The engine's named exceptions. Each message names the file and the problem."""

from __future__ import annotations


class EdlightError(Exception):
    """Base class for every error edlight raises on purpose."""


class BundleError(EdlightError):
    """A model bundle is missing, incomplete, tampered with or unreadable."""


class ImageError(EdlightError):
    """An image could not be read or is unsafe to decode."""


class ModelRuntimeError(EdlightError):
    """ONNX Runtime failed while loading or running a model of a bundle."""
