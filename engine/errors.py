"""The engine's named exceptions (each message names the file and the problem), and the count check behind
the ValueErrors for bad settings."""

from __future__ import annotations

import math
import numbers
import shlex
from pathlib import Path


class EdlightError(Exception):
    """Base class for every error edlight raises on purpose."""


class BundleError(EdlightError):
    """A model bundle is missing, incomplete, tampered with or unreadable."""


class ImageError(EdlightError):
    """An image could not be read or is unsafe to decode."""


class ModelRuntimeError(EdlightError):
    """ONNX Runtime failed while loading or running a model of a bundle."""


def some_names(names: list[str], most: int = 3) -> str:
    """The first `most` of `names`, comma-separated, and how many more there are: for messages."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def is_count(value: object, minimum: int = 1) -> bool:
    """True for a whole number of at least `minimum` (a Python or numpy integer; callers keep int(value));
    False for anything else, including bools (True is an int) and floats."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum


# Far beyond any use (a batch holds its images' encoder states at once; past a few dozen beams captions stop
# improving): the bounds keep a typo such as 10**20 a clear error, not an overflow in islice or numpy (C longs).
MAX_BATCH_SIZE = 65536
MAX_NUM_BEAMS = 1024


def bounded_count(name: str, value: object, maximum: int) -> int:
    """`value` as an int when it is a whole number from 1 to `maximum`; else ValueError naming `name`."""
    if not is_count(value) or int(value) > maximum:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an integer from 1 to {maximum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def is_finite_number(value: object) -> bool:
    """True for an int or float (Python or numpy) that is finite; False for bools, strings and None."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def is_installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it (so without its start-up cost)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is absent, an import hook refuses it, a broken install
        return False


def install_hint(extra: str) -> str:
    """How to install an optional extra of edlight, as it was installed: from its source folder (a checkout, or
    an editable install of one), which this names, or from a wheel, to which pip adds the extra's packages.
    Either way with edlight's constraints.txt, which pins the tested versions (torch to its CPU build: unpinned,
    pip takes a multi-GB CUDA build); a wheel carries a copy in the engine package."""
    here = Path(__file__).resolve().parent
    source = here.parent
    if (source / "pyproject.toml").is_file() and (source / "constraints.txt").is_file():
        return f"in the edlight source folder ({source}): pip install '.[{extra}]' -c constraints.txt"
    return f"with pip install 'edlight[{extra}]' -c {shlex.quote(str(here / 'constraints.txt'))} (the tested versions)"
