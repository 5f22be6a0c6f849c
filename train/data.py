"""Data folders: images plus a `metadata.jsonl` or `metadata.csv` (the Hugging Face imagefolder convention).

A folder holds images (subfolders allowed) and metadata files, at its top and/or in subfolders:
- `metadata.jsonl`: one JSON object per line, `{"file_name": "sub/a.jpg", "text": "..."}`;
- `metadata.csv`: a header row with `file_name` and the caption column, then one row per image.
`file_name` is relative to the folder holding that metadata file (so `train/metadata.jsonl` and
`test/metadata.jsonl` each list their own images, as in the Hugging Face imagefolder layout) and may not leave
it; examples are named relative to the data folder. One folder may hold only one of the two formats. The
caption column is `text` unless told otherwise. Other columns are allowed and ignored.

Three entry points, from cheap to thorough:
- `read_examples`: parses the metadata (no image is opened) and raises DataError listing every bad line;
- `check_folder`: everything wrong with a folder, each problem with its file or line, plus summary stats;
  every listed image is decoded in full, so truncated files are caught;
- `load_split`: the examples of one split, validated first (see its docstring for `skip_bad`).

The train/test split depends only on a hash of each file name (and a seed), never on its position, so
adding images to a folder never moves an existing image to the other split.

This module needs only the standard library, Pillow and the engine's errors: no torch, no numpy.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import statistics
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from engine.errors import EdlightError
from engine.images import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "test", "all")


class DataError(EdlightError):
    """A data folder or its metadata is unusable. `.problems` lists every problem found."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Example:
    """One image and its description. `file_name` is relative to the folder, in normalised POSIX form."""

    file_name: str
    text: str
    path: Path


@dataclass(frozen=True)
class Problem:
    """Something wrong in a data folder.

    `where` is the metadata file and line (`metadata.jsonl:12`) or the image (`sub/a.jpg`); `file_name`
    is the listed image the problem makes unusable, when there is one.
    """

    where: str
    message: str
    file_name: str | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class Examples(list[Example]):
    """The list `load_split` returns; `.skipped` holds the problems of the entries left out (skip_bad)."""

    def __init__(self, items: Iterable[Example] = (), skipped: Iterable[Problem] = ()) -> None:
        super().__init__(items)
        self.skipped: list[Problem] = list(skipped)


# ---------------------------------------------------------------------------------------------------------
# Reading the metadata.


@dataclass
class _Parsed:
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fatal: bool = False  # no usable metadata at all (missing file, missing column, not UTF-8)
    metadata: str = ""


def _check_name(folder: Path, raw: object, where: str) -> tuple[str | None, Problem | None]:
    """The normalised file name, or the problem with it."""
    if not isinstance(raw, str) or not raw.strip():
        return None, Problem(where, "missing or empty file_name")
    name = posixpath.normpath(raw.strip())
    drive = len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] in "/\\"  # C:/x.jpg
    if posixpath.isabs(name) or name == ".." or name.startswith("../") or drive:
        return None, Problem(where, f"file_name {raw!r} points outside the folder", raw)
    if "\x00" in name:
        return None, Problem(where, f"file_name {raw!r} contains a NUL character", raw)
    # A symlink can still lead out of the folder.
    try:
        real, root = os.path.realpath(folder / name), os.path.realpath(folder)
    except (OSError, ValueError) as exc:
        return None, Problem(where, f"file_name {raw!r} cannot be resolved ({exc})", raw)
    if os.path.commonpath([real, root]) != root:
        return None, Problem(where, f"file_name {raw!r} points outside the folder (through a link)", raw)
    return name, None


@dataclass(frozen=True)
class _MetadataFile:
    """One metadata file: `name` in the subfolder `sub` ("" for the top) of the data folder `root`."""

    root: Path
    sub: str
    name: str

    @property
    def folder(self) -> Path:  # the file names it lists are relative to this folder
        return self.root / self.sub

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def label(self) -> str:  # how problems name it: "metadata.jsonl", "train/metadata.jsonl"
        return posixpath.join(self.sub, self.name)


def _add_entry(
    parsed: _Parsed, meta: _MetadataFile, seen: dict[str, str], raw_name: object, caption: object, column: str,
    where: str,
) -> None:
    """One metadata row of `meta`."""
    name, problem = _check_name(meta.folder, raw_name, where)
    if problem is not None:
        parsed.problems.append(problem)
        return
    assert name is not None
    name = posixpath.join(meta.sub, name)  # examples are named relative to the data folder
    if name in seen:
        parsed.problems.append(Problem(where, f"duplicate file_name {name!r} (first listed at {seen[name]})", name))
        return
    seen[name] = where
    if caption is None:
        parsed.problems.append(Problem(where, f"missing caption column {column!r} for {name}", name))
    elif not isinstance(caption, str):
        parsed.problems.append(Problem(where, f"caption {column!r} of {name} is not text: {caption!r}", name))
    elif not caption.strip():
        parsed.problems.append(Problem(where, f"empty caption for {name}", name))
    else:
        parsed.examples.append(Example(name, caption.strip(), meta.root / name))


def _parse_jsonl(meta: _MetadataFile, column: str, parsed: _Parsed, seen: dict[str, str]) -> None:
    with meta.path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            where = f"{meta.label}:{number}"
            if not line.strip():
                continue  # blank lines (a trailing newline) carry nothing
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                parsed.problems.append(Problem(where, f"malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                parsed.problems.append(Problem(where, f"expected a JSON object, got {type(row).__name__}"))
                continue
            _add_entry(parsed, meta, seen, row.get("file_name"), row.get(column), column, where)


def _parse_csv(meta: _MetadataFile, column: str, parsed: _Parsed, seen: dict[str, str]) -> None:
    with meta.path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("file_name", column) if c not in header]
        if missing:
            parsed.fatal = True
            parsed.problems.append(
                Problem(f"{meta.label}:1", f"no {' or '.join(repr(c) for c in missing)} column (header: {header})")
            )
            return
        for row in reader:
            where = f"{meta.label}:{reader.line_num}"
            extra = row.get(None)  # type: ignore[call-overload]
            if extra or any(v is None for v in row.values()):
                found = len([v for k, v in row.items() if k is not None and v is not None]) + len(extra or [])
                parsed.problems.append(Problem(where, f"expected {len(header)} fields, found {found}"))
                continue
            _add_entry(parsed, meta, seen, row["file_name"], row[column], column, where)


def _metadata_files(folder: Path) -> list[list[_MetadataFile]]:
    """The metadata files of every folder holding any (one list per folder), the top folder first."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(folder).as_posix()
        present = [_MetadataFile(folder, "" if rel == "." else rel, name) for name in METADATA_FILES if name in files]
        if present:
            found.append(present)
    return found


def _parse(folder: str | Path, caption_column: str) -> _Parsed:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found = _metadata_files(folder)
    parsed = _Parsed(metadata=", ".join(meta.label for present in found for meta in present))
    if not found:
        parsed.fatal = True
        parsed.problems.append(Problem(str(folder), "no metadata.jsonl or metadata.csv (at the top or in a subfolder)"))
        return parsed
    seen: dict[str, str] = {}  # shared: an image listed by two metadata files is a duplicate
    for present in found:
        meta = present[0]
        if len(present) > 1:
            parsed.fatal = True
            parsed.problems.append(Problem(str(meta.folder), "both metadata.jsonl and metadata.csv are present; keep one"))
            continue
        try:
            if meta.path.suffix == ".jsonl":
                _parse_jsonl(meta, caption_column, parsed, seen)
            else:
                _parse_csv(meta, caption_column, parsed, seen)
        except UnicodeDecodeError as exc:
            parsed.fatal = True
            parsed.problems.append(Problem(meta.label, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
        except csv.Error as exc:
            parsed.fatal = True
            parsed.problems.append(Problem(meta.label, f"malformed CSV ({exc})"))
    return parsed


def read_examples(folder: str | Path, caption_column: str = "text") -> list[Example]:
    """Parses the folder's metadata into examples, in file order. No image is opened.

    Raises DataError listing every problem (missing or ambiguous metadata file, malformed line with its
    number, missing or empty caption, duplicate file_name, a path leading outside the folder).
    """
    parsed = _parse(folder, caption_column)
    if parsed.problems:
        raise _error(Path(folder), parsed.problems)
    return parsed.examples


# ---------------------------------------------------------------------------------------------------------
# Checking images.


def _inspect(example: Example) -> tuple[tuple[int, int] | None, Problem | None]:
    """The image's size, or why it cannot be used. Decodes the whole file: a header can look fine while
    the data is cut short."""
    name = example.file_name
    try:
        if not example.path.is_file():
            return None, Problem(name, "image not found" if not example.path.exists() else "not a file", name)
    except OSError as exc:  # e.g. a name longer than the file system allows
        return None, Problem(name, f"cannot access the file: {exc.strerror or exc}", name)
    try:
        with Image.open(example.path) as im:
            size = im.size
            if size[0] * size[1] > DEFAULT_MAX_PIXELS:  # checked before decoding, as training loads it
                return None, Problem(
                    name,
                    f"image too large: {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} MP, above the "
                    f"{DEFAULT_MAX_PIXELS / 1e6:.0f} MP that training and the engine decode (downscale it)",
                    name,
                )
            im.load()
    except UnidentifiedImageError:
        return None, Problem(name, "unreadable image (not an image format Pillow can read)", name)
    except Image.DecompressionBombError as exc:
        return None, Problem(name, f"image too large to decode safely ({exc})", name)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        kind = "truncated image" if "truncated" in str(exc) else "corrupt image"
        return None, Problem(name, f"{kind}: {exc}", name)
    if size[0] < 1 or size[1] < 1:
        return None, Problem(name, f"empty image ({size[0]}x{size[1]})", name)
    return size, None


def _inspect_all(examples: Sequence[Example]) -> list[tuple[tuple[int, int] | None, Problem | None]]:
    # Pillow releases the GIL while decoding, so a few threads make a big folder faster; map keeps order.
    if len(examples) < 32:
        return [_inspect(e) for e in examples]
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        return list(pool.map(_inspect, examples))


def _unlisted(folder: Path, listed: set[str], metadata: str) -> list[Problem]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = Path(root, name).relative_to(folder).as_posix()
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and rel not in listed and not name.startswith("."):
                found.append(Problem(rel, f"image is not listed in {metadata or 'the metadata'}", rel))
    return found


# ---------------------------------------------------------------------------------------------------------
# The report.


def _spread(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


@dataclass
class CheckReport:
    """What `check_folder` found. `ok` is true when there are no problems (warnings are allowed)."""

    folder: Path
    metadata: str
    examples: list[Example]  # listed entries whose metadata and image are both fine
    problems: list[Problem]
    warnings: list[Problem]
    sizes: dict[str, tuple[int, int]]  # file_name -> (width, height) of every readable listed image

    @property
    def ok(self) -> bool:
        return not self.problems

    def stats(self, test_ratio: float = 0.1, seed: int = 0) -> dict[str, object]:
        """Counts, caption length (words, characters) and image size spreads, and the split sizes."""
        words = [len(e.text.split()) for e in self.examples]
        chars = [len(e.text) for e in self.examples]
        widths = [w for w, _ in self.sizes.values()]
        heights = [h for _, h in self.sizes.values()]
        test = sum(split_of(e.file_name, test_ratio, seed) == "test" for e in self.examples)
        return {
            "folder": str(self.folder),
            "metadata": self.metadata,
            "examples": len(self.examples),
            "problems": len(self.problems),
            "warnings": len(self.warnings),
            "caption_words": _spread(words),
            "caption_chars": _spread(chars),
            "image_width": _spread(widths),
            "image_height": _spread(heights),
            "split": {"test_ratio": test_ratio, "seed": seed, "train": len(self.examples) - test, "test": test},
        }

    def summary(self, test_ratio: float = 0.1, seed: int = 0) -> str:
        """A few human-readable lines: counts, caption lengths, image sizes, split sizes."""
        s = self.stats(test_ratio, seed)

        def spread(d: object) -> str:
            if not isinstance(d, dict) or not d:
                return "-"
            return f"min {d['min']}, median {d['median']}, mean {d['mean']}, max {d['max']}"

        split = s["split"]
        assert isinstance(split, dict)
        return "\n".join(
            [
                f"folder: {self.folder} ({self.metadata or 'no metadata'})",
                f"examples: {s['examples']} usable, {s['problems']} problems, {s['warnings']} warnings",
                f"caption words: {spread(s['caption_words'])}",
                f"caption characters: {spread(s['caption_chars'])}",
                f"image width px: {spread(s['image_width'])}",
                f"image height px: {spread(s['image_height'])}",
                f"split (test_ratio {test_ratio}, seed {seed}): {split['train']} train, {split['test']} test",
            ]
        )


def check_folder(folder: str | Path, caption_column: str = "text") -> CheckReport:
    """Checks a data folder and reports every problem with its file or line.

    Problems: missing or ambiguous metadata file, malformed line (with its number), missing or empty
    caption, duplicate file_name, a path leading outside the folder, a listed image that is missing,
    unreadable, truncated (each image is decoded in full) or above the decode cap, a metadata file that
    lists nothing. Warnings: images present but not listed.
    Raises DataError only when `folder` is not a folder.
    """
    folder = Path(folder)
    parsed = _parse(folder, caption_column)
    problems = list(parsed.problems)
    good: list[Example] = []
    sizes: dict[str, tuple[int, int]] = {}
    for example, (size, problem) in zip(parsed.examples, _inspect_all(parsed.examples), strict=True):
        if problem is not None:
            problems.append(problem)
        else:
            assert size is not None
            good.append(example)
            sizes[example.file_name] = size
    if not parsed.fatal and not parsed.examples and not problems:
        problems.append(Problem(parsed.metadata, "lists no images: nothing to train or evaluate on"))
    warnings: list[Problem] = []
    if not parsed.fatal:
        listed = {e.file_name for e in parsed.examples} | {p.file_name for p in parsed.problems if p.file_name}
        warnings = _unlisted(folder, listed, parsed.metadata)
    return CheckReport(folder, parsed.metadata, good, problems, warnings, sizes)


# ---------------------------------------------------------------------------------------------------------
# Splits.


def split_of(file_name: str, test_ratio: float = 0.1, seed: int = 0) -> str:
    """"train" or "test" for a file name (as listed in the metadata), from a hash of f"{seed}:{file_name}".

    The first 8 bytes of its SHA-1 map the name to [0, 1); below `test_ratio` is "test". Adding or removing
    other files never changes the answer. Raises ValueError when test_ratio is outside [0, 1].
    """
    if not 0.0 <= test_ratio <= 1.0:
        raise ValueError(f"test_ratio must be within [0, 1], got {test_ratio}")
    digest = hashlib.sha1(f"{seed}:{file_name}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_ratio else "train"


def load_split(
    folder: str | Path,
    split: str = "train",
    test_ratio: float = 0.1,
    seed: int = 0,
    caption_column: str = "text",
    skip_bad: bool = False,
) -> Examples:
    """The validated examples of one split ("train", "test" or "all"), in metadata order.

    Validation covers every metadata line and decodes every image of the requested split (so loading
    both splits decodes each image once). With skip_bad=False any problem raises DataError listing them
    all. With skip_bad=True the bad entries are left out, a warning naming them is logged, and the
    returned `Examples` list carries them in `.skipped` (Problem objects; `len(result.skipped)` is the
    count). A folder without usable metadata raises DataError either way. The result may be empty (a
    tiny folder can have no test image). Raises ValueError for an unknown split or a bad test_ratio.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= test_ratio <= 1.0:
        raise ValueError(f"test_ratio must be within [0, 1], got {test_ratio}")
    folder = Path(folder)
    parsed = _parse(folder, caption_column)
    if parsed.fatal:
        raise _error(folder, parsed.problems)
    chosen = [e for e in parsed.examples if split == "all" or split_of(e.file_name, test_ratio, seed) == split]
    bad = list(parsed.problems)
    good: list[Example] = []
    for example, (_, problem) in zip(chosen, _inspect_all(chosen), strict=True):
        if problem is None:
            good.append(example)
        else:
            bad.append(problem)
    if bad and not skip_bad:
        raise _error(folder, bad)
    if bad:
        log.warning("%s: skipped %d bad entries:\n  %s", folder, len(bad), "\n  ".join(map(str, bad)))
    return Examples(good, skipped=bad)


def _error(folder: Path, problems: Sequence[Problem]) -> DataError:
    lines = "\n".join(f"  {p}" for p in problems)
    noun = "problem" if len(problems) == 1 else "problems"
    return DataError(f"{folder}: {len(problems)} {noun} in the data folder:\n{lines}", problems)
