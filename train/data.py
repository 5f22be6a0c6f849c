"""Data folders: images plus a `metadata.jsonl` or `metadata.csv` (the Hugging Face imagefolder convention).

A folder holds images (subfolders allowed) and metadata files, at its top and/or in subfolders:
- `metadata.jsonl`: one JSON object per line, `{"file_name": "sub/a.jpg", "text": "..."}`;
- `metadata.csv`: a header row with `file_name` and the caption column, then one row per image (separated by
  commas, semicolons or tabs: whichever splits the header into those columns).
`file_name` is relative to the folder holding that metadata file (so `train/metadata.jsonl` and
`test/metadata.jsonl` each list their own images, as in the Hugging Face imagefolder layout) and may not leave
it; examples are named relative to the data folder. One folder may hold only one of the two formats. The
caption column is `text` unless told otherwise. Other columns are allowed and ignored.

Three entry points, from cheap to thorough:
- `read_examples`: parses the metadata (no image is opened) and raises DataError listing every bad line;
- `check_folder`: everything wrong with a folder, each problem with its file or line, plus summary stats;
  every listed image is decoded in full, so truncated files are caught;
- `load_split`: the examples of one split, validated first (see its docstring for `skip_bad`).

The train/test split depends only on each file name, never on its position, so adding images to a folder
never moves an existing image to the other split. Images below a top-level split folder (`train/`, `test/`,
and `validation/`, `valid/`, `dev/` ... joining test: SPLIT_FOLDERS) are in that folder's split, as in the
imagefolder layout; any other image is in the test split when a hash of its name (and a seed) falls below
the test ratio.

This module needs only the standard library, Pillow and the engine's errors and image names: no torch, no numpy.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import csv
import functools
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import shlex
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from engine.errors import EdlightError
from engine.folder import (  # what the engine's folder walk captions
    IMAGE_EXTENSIONS,
    is_image_name,
    is_system_folder,
)
from engine.images import (
    DEFAULT_MAX_PIXELS,
    HEIF_MISSING,
    ICON_REFUSED,
    enable_heif,
    is_heif_file,
    is_icon_file,
    open_lazily,
)
from engine.preprocess import PatchConfig, position_error
from train.checkpoint import RUN_CONFIG

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SPLITS = ("train", "test", "all")
# Top-level folders that name a split (the Hugging Face imagefolder split names): an example below one is in
# that split whatever the hash says, so a user's own test images never reach training. edlight has one
# held-out split, "test", which validation folders join.
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
    "validation": "test", "valid": "test", "val": "test", "dev": "test",
}  # fmt: skip


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
    listed_at: str = field(default="", compare=False)  # the metadata line: "train/metadata.jsonl:12"


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
    warnings: list[Problem] = field(default_factory=list)  # folders the walk could not read and may pass by


def _as_listed(folder: Path, raw: str) -> str:
    """`raw` as it names a file: exactly, where a file has that name (" lead.jpg" is a name), else without
    the spaces a spreadsheet cell may carry around it."""
    stripped = raw.strip()
    if stripped != raw and "\x00" not in raw:
        with contextlib.suppress(OSError, ValueError):
            if os.path.lexists(folder / posixpath.normpath(raw)):
                return raw
    return stripped


def _check_name(folder: Path, raw: object, where: str, folder_label: str = "the folder") -> tuple[str | None, Problem | None]:
    """The normalised file name, or the problem with it (naming that normalised name as its file).
    `folder_label` names `folder` in those problems ("train/ (the names in train/metadata.jsonl are ...)")."""
    if raw is not None and not isinstance(raw, str):
        return None, Problem(where, f"file_name is not text: {raw!r}")
    if not isinstance(raw, str) or not raw.strip():
        return None, Problem(where, "missing or empty file_name")
    name = posixpath.normpath(_as_listed(folder, raw))
    drive = len(name) > 2 and name[0].isalpha() and name[1] == ":" and name[2] in "/\\"  # C:/x.jpg
    if posixpath.isabs(name) and os.path.isabs(name):
        with contextlib.suppress(ValueError):  # under the folder: say how to name it
            inside = Path(name).relative_to(folder.absolute()).as_posix()
            return None, Problem(where, f"file_name {raw!r} is an absolute path; names are relative to the folder: {inside!r}", name)
    if posixpath.isabs(name) or name == ".." or name.startswith("../") or drive:
        return None, Problem(where, f"file_name {raw!r} points outside {folder_label}", name)
    if "\x00" in name:
        return None, Problem(where, f"file_name {raw!r} contains a NUL character", name)
    # A symlink can still lead out of the folder.
    try:
        real, root = os.path.realpath(folder / name), os.path.realpath(folder)
    except (OSError, ValueError) as exc:
        return None, Problem(where, f"file_name {raw!r} cannot be resolved ({exc})", name)
    if os.path.commonpath([real, root]) != root:
        return None, Problem(where, f"file_name {raw!r} points outside {folder_label} (through a link)", name)
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

    @property
    def folder_label(self) -> str:  # how problems name the folder its file names may not leave
        if not self.sub:
            return "the folder"
        return f"{self.sub}/ (the names in {self.label} are relative to its folder)"


def _lone_surrogate(text: str) -> str | None:
    """The first UTF-16 surrogate standing alone in `text` (not encodable as UTF-8), if any."""
    match = re.search("[\ud800-\udfff]", text)
    return match.group() if match else None


def _visible(text: str) -> bool:
    """Whether `text` shows anything: a caption of zero-width spaces or byte-order marks reads as empty."""
    return any(not c.isspace() and unicodedata.category(c) not in _INVISIBLE for c in text)


_INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}  # controls, format characters (U+200B, U+FEFF, ...), separators
# Line breaks and tabs a caption may hold (a spreadsheet cell's Alt+Enter, FileMaker's vertical tab, a NEL from an
# old export).
_TEXT_CONTROLS = frozenset("\t\n\v\f\r\x85")


# Controls that text copied out of Word carries, and what to write instead.
_WORD_HYPHENS = {
    "\x1e": "Word's non-breaking hyphen (write '-' or U+2011)",
    "\x1f": "Word's optional hyphen (delete it, or write U+00AD)",
}


def _control_character(text: str) -> str | None:
    """The first control character in `text` that is not a line break or tab (NUL, ESC, C1 controls such as
    the \\x80-\\x9f that UTF-8 read as Latin-1 leaves), if any."""
    return next((c for c in text if unicodedata.category(c) == "Cc" and c not in _TEXT_CONTROLS), None)


def _add_entry(
    parsed: _Parsed, meta: _MetadataFile, seen: dict[str, str], raw_name: object, caption: object, column: str,
    where: str,
) -> None:
    """One metadata row of `meta`."""
    name, problem = _check_name(meta.folder, raw_name, where, meta.folder_label)
    if problem is not None:
        if problem.file_name is not None:  # named as the folder walk names it, for the unlisted-image check
            listed = posixpath.normpath(posixpath.join(meta.sub, problem.file_name))
            problem = Problem(problem.where, problem.message, listed)
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
    elif not _visible(caption):
        shown = ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in caption if not c.isspace()))
        parsed.problems.append(Problem(where, f"empty caption for {name} (only invisible characters: {shown})", name))
    elif (control := _control_character(caption)) is not None:
        what = _WORD_HYPHENS.get(control, "a damaged or mis-decoded file?")
        parsed.problems.append(Problem(
            where, f"caption of {name} contains a control character (U+{ord(control):04X}) at character "
            f"{caption.index(control) + 1}: {what}",
            name,
        ))  # fmt: skip
    elif (half := _lone_surrogate(caption)) is not None:
        # JSON's \ud800-style escapes can carry half of a character (a writer that cut an emoji in two): no
        # tokenizer, log or predictions file can take it.
        parsed.problems.append(Problem(
            where, f"caption of {name} is not valid Unicode: half of a character ({half!r}) at character {caption.index(half) + 1}",
            name,
        ))  # fmt: skip
    else:
        # NFC, as the training tokenizer writes: a reference typed decomposed (NFD) could never be matched.
        parsed.examples.append(Example(name, unicodedata.normalize("NFC", caption.strip()), meta.root / name, where))


class _NotText(Exception):
    """A metadata file that is not text edlight reads; `problem` says why, naming the file (and line)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


_SAVE_AS_UTF8 = 'save it as UTF-8 (in Excel: "CSV UTF-8"; in other editors: encoding UTF-8)'
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # as open() splits lines: old Mac exports end them with \r alone


def _metadata_encoding(meta: _MetadataFile) -> str:
    """How to read a metadata file: UTF-8 (a byte-order mark allowed), or UTF-16 with its byte-order mark
    (Excel's "Unicode Text", Windows Notepad's "Unicode"), which that mark tells apart without guessing.

    The whole file is checked first, a chunk at a time (the parse then streams it): a foreign byte found
    halfway would otherwise leave half a file read. Raises _NotText naming the line of the first byte that is
    not UTF-8, or what the file is instead; OSError as open() raises it."""
    with meta.path.open("rb") as f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):  # checked first: a small stored zip can pass as UTF-8
            what = "a zip archive (an Excel .xlsx workbook saved under this name?), not text"
            raise _NotText(Problem(meta.label, f'{what}: save the sheet as CSV ("CSV UTF-8")'))
        if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: it starts with its mark
            raise _NotText(Problem(meta.label, f"UTF-32 text: {_SAVE_AS_UTF8}"))
        utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        decoder = codecs.getincrementaldecoder("utf-16" if utf16 else "utf-8")()
        f.seek(0)
        offset = 0  # of the chunk in the file
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                if utf16:
                    raise _NotText(Problem(meta.label, f"not UTF-16 text, though it starts with UTF-16's byte-order mark ({exc.reason})")) from exc
                # The decoder's error counts from the bytes it held back from the last chunk (at most 3).
                at = offset - len(exc.object) + len(chunk) + exc.start
                f.seek(0)
                line = len(_LINE_BREAK.findall(f.read(at))) + 1
                raise _NotText(Problem(f"{meta.label}:{line}", f"not UTF-8 text ({exc.reason} at byte {at} of the file): {_SAVE_AS_UTF8}")) from exc
            if not chunk:
                return "utf-16" if utf16 else "utf-8-sig"
            offset += len(chunk)


def _not_json_lines(path: Path, encoding: str) -> str | None:
    """Why a metadata.jsonl holding JSON is not JSON Lines, said once (one error per line would hide the one
    mistake): one array, or objects spread over several lines each (json.dumps(indent=2), jq without -c), whose
    first line opens an object and nothing else, which no JSON Lines row does. None otherwise; the file is read
    whole only when its first line starts one of those. `encoding` (_metadata_encoding) drops a byte-order mark."""
    with path.open(encoding=encoding) as f:
        first = next((line for line in f if line.strip()), "")
        opening = first.strip()
        if not (opening.startswith("[") or opening == "{"):
            return None
        text = first + f.read()
    if opening.startswith("["):
        try:
            if isinstance(json.loads(text), list):
                return ('holds one JSON array, not JSON Lines: write one object per line, {"file_name": "a.jpg", '
                        '"text": "..."}, without the enclosing [ ]')
        except ValueError:
            pass
        return None
    # Objects one after another to the end (the first line opened one, so there is at least one).
    decoder, space, at = json.JSONDecoder(), re.compile(r"\s*"), 0
    while (at := space.match(text, at).end()) < len(text):  # type: ignore[union-attr]  # \s* always matches
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
    return ("holds JSON objects spread over several lines (pretty-printed), not JSON Lines: write one object per "
            "line (jq -c . FILE, or json.dumps without indent)")


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is refused (json.loads keeps the last silently)."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


def _parse_jsonl(meta: _MetadataFile, column: str, parsed: _Parsed, seen: dict[str, str]) -> None:
    first = len(parsed.problems)
    rows, columns = 0, set[str]()  # JSON objects read, and every key they used
    encoding = _metadata_encoding(meta)
    if (whole_file := _not_json_lines(meta.path, encoding)) is not None:
        parsed.fatal = True
        parsed.problems.append(Problem(meta.label, whole_file))
        return
    # Lines end at \n, \r\n or \r (open() splits them so); U+2028 and the like stay inside a caption.
    with meta.path.open(encoding=encoding) as f:
        for number, line in enumerate(f, start=1):
            where = f"{meta.label}:{number}"
            if not line.strip():
                continue  # blank lines (a trailing newline) carry nothing
            try:
                row = json.loads(line.rstrip("\r\n"), object_pairs_hook=_refuse_duplicate_keys)  # an error's column is on this line
            except json.JSONDecodeError as exc:
                parsed.problems.append(Problem(where, f"malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            except _DuplicateKey as exc:
                parsed.problems.append(Problem(where, f"key {exc.args[0]!r} appears twice in this object; keep one"))
                continue
            if not isinstance(row, dict):
                parsed.problems.append(Problem(where, f"expected a JSON object, got {type(row).__name__}"))
                continue
            rows += 1
            columns.update(row)
            _add_entry(parsed, meta, seen, row.get("file_name"), row.get(column), column, where)
    if rows > 1 and "file_name" not in columns:
        # Rows naming their image under another key ("image", "path") are one mistake too.
        del parsed.problems[first:]
        parsed.fatal = True
        parsed.problems.append(
            Problem(meta.label, f"no row has 'file_name'; columns seen: {', '.join(sorted(columns))}")
        )
    elif rows > 1 and column not in columns:
        # A wrong --caption-column is one mistake, not one per row: say it once, with the columns there are.
        missing = f"missing caption column {column!r}"
        parsed.problems[first:] = [p for p in parsed.problems[first:] if not p.message.startswith(missing)]
        parsed.fatal = True
        parsed.problems.append(
            Problem(meta.label, f"no row has {column!r}; columns seen: {', '.join(sorted(columns))}")
        )


def _csv_hint(message: str) -> str:
    if "end of data" in message:
        return "; a quote opened in this row is never closed"
    if "expected after" in message:
        return "; a quote in this row is left open or closed early (write a quote inside a quoted field as \"\")"
    return ""


# What a spreadsheet saves as "CSV" is separated by commas, or by semicolons where the comma is the decimal mark
# (Excel in much of Europe), or by tabs ("Unicode Text", tab-separated exports).
_CSV_SEPARATORS = (",", ";", "\t")
# Excel's first line naming the separator ("sep=;"); only separators a CSV reader can take.
_EXCEL_SEPARATOR_LINE = re.compile(r"sep=([,;\t|])\r?\n?")


def _csv_separator(first_line: str, column: str) -> str:
    """The separator whose header cells name `file_name` and `column` (else `file_name` alone, so that a missing
    caption column is shown among the real ones); a comma when none does."""
    for wanted in (("file_name", column), ("file_name",)):
        for separator in _CSV_SEPARATORS:
            with contextlib.suppress(csv.Error):
                cells = [cell.strip() for cell in next(csv.reader([first_line], delimiter=separator), [])]
                if all(name in cells for name in wanted):
                    return separator
    return ","


def _header_positions(header: list[str], name: str) -> list[int]:
    """Where `name` is in the header: the cells that are exactly it, else those that are it but for the spaces a
    spreadsheet cell may carry (so "text" and "text " side by side are not two caption columns)."""
    exact = [i for i, cell in enumerate(header) if cell == name]
    return exact or [i for i, cell in enumerate(header) if cell.strip() == name]


def _parse_csv(meta: _MetadataFile, column: str, parsed: _Parsed, seen: dict[str, str]) -> None:
    encoding = _metadata_encoding(meta)
    with meta.path.open(encoding=encoding, newline="") as f:  # newline="": the csv module reads line endings itself
        first_line = f.readline()
        hint = _EXCEL_SEPARATOR_LINE.fullmatch(first_line)
        skipped = 1 if hint else 0  # lines before the header
        separator = hint.group(1) if hint else _csv_separator(first_line, column)
        # strict: an unclosed quote is an error, not a caption that swallows the rows after it.
        reader = csv.reader(f if hint else itertools.chain([first_line], f), delimiter=separator, strict=True)
        start = 1 + skipped  # the line where the next row begins (a quoted field may span lines)
        try:
            header = next(reader, None) or []
            if not any(cell.strip() for cell in header):
                parsed.fatal = True
                what = "the file is empty" if not first_line else f"no header: line {start} is blank (the header row must come first)"
                parsed.problems.append(Problem(f"{meta.label}:{start}", f"{what}; it needs a header row naming 'file_name' and {column!r}"))
                return
            header_at, start = start, reader.line_num + 1 + skipped
            positions = {name: _header_positions(header, name) for name in ("file_name", column)}
            missing = [name for name, found in positions.items() if not found]
            if missing:
                parsed.fatal = True
                parsed.problems.append(
                    Problem(f"{meta.label}:{header_at}", f"no {' or '.join(repr(c) for c in missing)} column (header: {header})")
                )
                return
            repeated = [name for name, found in positions.items() if len(found) > 1]
            if repeated:
                parsed.fatal = True
                parsed.problems.append(
                    Problem(
                        f"{meta.label}:{header_at}",
                        f"column {' and '.join(repr(c) for c in repeated)} appears more than once in the header "
                        f"({header}); rename or remove the extra one",
                    )
                )
                return
            name_at, caption_at = positions["file_name"][0], positions[column][0]
            for values in reader:
                where, start = f"{meta.label}:{start}", reader.line_num + 1 + skipped
                if not any(value.strip() for value in values):
                    continue  # a blank line, or one of empty fields (",,": spreadsheets save those)
                if len(values) != len(header):
                    hint = f" (a caption holding {separator!r} must be in double quotes)" if len(values) > len(header) else ""
                    # Its image is named, when the row reaches that far: else it was also said to be unlisted.
                    named = values[name_at].strip() if len(values) > name_at else ""
                    listed = posixpath.normpath(posixpath.join(meta.sub, _as_listed(meta.folder, values[name_at]))) if named else None
                    parsed.problems.append(Problem(where, f"expected {len(header)} fields, found {len(values)}{hint}", listed))
                    continue
                _add_entry(parsed, meta, seen, values[name_at], values[caption_at], column, where)
        except csv.Error as exc:
            # Named by the line where the bad row begins; the reader may have gone on to find the error.
            found = f" (found at line {reader.line_num + skipped})" if reader.line_num + skipped > start else ""
            parsed.fatal = True
            parsed.problems.append(Problem(f"{meta.label}:{start}", f"malformed CSV{found}: {exc}{_csv_hint(str(exc))}"))


def _unreadable_folder(folder: Path, exc: OSError) -> tuple[str, str]:
    """(the folder relative to the data folder, why it cannot be read)."""
    rel = Path(exc.filename).relative_to(folder).as_posix() if exc.filename else "."
    return rel, str(exc.strerror or exc)


def _metadata_files(folder: Path, unreadable: list[tuple[str, str]], linked: list[str]) -> list[list[_MetadataFile]]:
    """The metadata files of every folder holding any (one list per folder), the top folder first. A
    folder the walk cannot read is added to `unreadable`, and a link to a folder holding metadata to
    `linked`: the walk does not follow links, and skipping either could drop a whole split unseen."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=lambda exc: unreadable.append(_unreadable_folder(folder, exc))):
        dirs[:] = sorted(d for d in dirs if not is_system_folder(d))
        rel = Path(root).relative_to(folder).as_posix()
        present = [_MetadataFile(folder, "" if rel == "." else rel, name) for name in METADATA_FILES if name in files]
        if present:
            found.append(present)
        for name in dirs:
            link = os.path.join(root, name)
            if os.path.islink(link) and _outside(link, folder) and _holds_metadata(link):
                linked.append(Path(root, name).relative_to(folder).as_posix())
    return found


def _outside(link: str, folder: Path) -> bool:
    """Whether a link leads out of the data folder (one to a folder inside it loses nothing: that is read)."""
    real, root = os.path.realpath(link), os.path.realpath(folder)
    return os.path.commonpath([real, root]) != root


def _holds_metadata(linked_folder: str) -> bool:
    """Whether a metadata file lies in `linked_folder` or below, outside hidden and system folders (as the
    data walk reads them); stops at the first."""
    for _, dirs, files in os.walk(linked_folder):
        dirs[:] = [d for d in dirs if not is_system_folder(d)]
        if any(name in files for name in METADATA_FILES):
            return True
    return False


def _parse(folder: str | Path, caption_column: str) -> _Parsed:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    if caption_column == "file_name":
        raise DataError(f"{folder}: the caption column cannot be 'file_name' (that column names the images)")
    unreadable: list[tuple[str, str]] = []
    linked: list[str] = []
    found = _metadata_files(folder, unreadable, linked)
    parsed = _Parsed(metadata=", ".join(meta.label for present in found for meta in present))
    for rel in linked:
        parsed.fatal = True
        parsed.problems.append(Problem(
            f"{rel}/", "a link to a folder holding metadata; links to folders are not followed, so its metadata and "
            "images would be left out: put the folder itself (or a copy) here",
        ))  # fmt: skip
    for rel, why in unreadable:
        if rel == "lost+found":  # the file system's own, at the top of a volume holding only the data
            parsed.warnings.append(Problem(f"{rel}/", f"cannot read this folder ({why}): any metadata and images in it are left out"))
        else:  # a metadata file in it, or a whole split folder, would be left out unseen
            parsed.fatal = True
            parsed.problems.append(Problem(f"{rel}/", f"cannot read this folder ({why}): its metadata and images would be left out"))
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
        except _NotText as exc:
            parsed.fatal = True
            parsed.problems.append(exc.problem)
        except OSError as exc:  # unreadable, a dangling link, a folder named metadata.jsonl
            parsed.fatal = True
            parsed.problems.append(Problem(meta.label, f"cannot read the file ({exc.strerror or exc})"))
    parsed.warnings += _second_names(parsed.examples) + _nested_split_folders(parsed.examples)
    return parsed


def _may_split_apart(one: str, other: str) -> bool:
    """Whether two listed names can fall in different splits: not both below one top-level split folder."""
    folder = split_folder(one)
    return folder is None or folder != split_folder(other)


def _second_names(examples: Sequence[Example]) -> list[Problem]:
    """Warnings for an image file listed under two names that may split apart (a link to it, a hard link a
    dedup tool made, a letter case a case-insensitive file system folds): the split hashes names, so one name
    could be trained on and the other tested on, inflating the test BLEU. A warning, as for copies (_copies):
    the captions are the folder's to give. Told by the file system's identity of the file."""

    def identity(example: Example) -> object:
        try:
            info = os.stat(example.path)
        except (OSError, ValueError):
            return None  # missing or unreadable: the image check names it
        return (info.st_dev, info.st_ino) if info.st_ino else os.path.realpath(example.path)

    def why(example: Example, earlier: Example) -> str:
        how = "through a link" if example.path.is_symlink() or earlier.path.is_symlink() else "under another name"
        return (f"is the image file {earlier.file_name} (listed at {earlier.listed_at}) {how}: the two names may "
                "split apart, and the image be both trained and tested on")

    return _listed_twice([(e, identity(e)) for e in examples], why)


def _listed_twice(keyed: Sequence[tuple[Example, object]], why: Callable[[Example, Example], str | None]) -> list[Problem]:
    """A warning for each example whose key (not None) an earlier one has, where their names may split apart;
    `why(example, earlier)` words it (None: nothing to say)."""
    first: dict[object, Example] = {}
    found = []
    for example, key in keyed:
        if key is None:
            continue
        earlier = first.setdefault(key, example)
        if earlier is not example and _may_split_apart(example.file_name, earlier.file_name):
            if (message := why(example, earlier)) is not None:
                found.append(Problem(example.listed_at or example.file_name, f"{example.file_name} {message}", example.file_name))
    return found


# Nested split folders named one by one up to this many; beyond, counted with a few named.
NAMED_NESTED_FOLDERS = 5


def _nested_split_folders(examples: Sequence[Example]) -> list[Problem]:
    """Folders named like splits below the top (`data/train/`, `data/test/`: a layout the Hugging Face Hub also
    takes): only top-level ones decide a split, so their images are split by hash, held-out ones into training."""
    nested: dict[str, int] = {}
    for example in examples:
        parts = example.file_name.split("/")[:-1]
        below = next((i for i, part in enumerate(parts) if i and part.lower() in SPLIT_FOLDERS), None)
        if below is not None and split_folder(example.file_name) is None:
            folder = "/".join(parts[: below + 1]) + "/"
            nested[folder] = nested.get(folder, 0) + 1
    why = ("split by hash with the rest (test images may be trained on); only top-level train/, test/ and "
           "validation/ decide a split: move them up")  # fmt: skip
    if len(nested) > NAMED_NESTED_FOLDERS:  # 1000 classes with a val/ each: one line, not 1000
        shown = ", ".join(sorted(nested)[:3])
        return [Problem(f"{len(nested)} folders", f"named like split folders but below the top ({shown}, ...), so "
                        f"their {sum(nested.values())} image(s) are {why}")]
    return [Problem(folder, f"named like a split folder but below the top, so its {n} image(s) are {why}")
            for folder, n in sorted(nested.items())]


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
    """The image's size, or why it cannot be used (with the metadata line that lists it). Decodes the whole
    file: a header can look fine while the data is cut short."""
    size, problem = _inspect_image(example)
    if problem is not None and example.listed_at:
        problem = Problem(problem.where, f"{problem.message} (listed at {example.listed_at})", problem.file_name)
    return size, problem


def _inspect_image(example: Example) -> tuple[tuple[int, int] | None, Problem | None]:
    name = example.file_name
    try:
        if not example.path.is_file():
            if example.path.exists():
                return None, Problem(name, "not a file", name)
            slash = " (file_name uses '\\'; write paths with '/')" if "\\" in name else ""
            hint = _near_name_hint(example.path) or _named_from_the_top_hint(example)
            return None, Problem(name, f"image not found{slash}{hint}", name)
    except OSError as exc:  # e.g. a name longer than the file system allows
        return None, Problem(name, f"cannot access the file: {exc.strerror or exc}", name)
    enable_heif()  # HEIC photos train when the engine can caption them
    try:
        with open_lazily(example.path) as im:
            size = im.size
            if size[0] * size[1] > DEFAULT_MAX_PIXELS:  # checked before decoding, as training loads it
                return None, Problem(
                    name,
                    f"image too large: {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} MP, above the "
                    f"{DEFAULT_MAX_PIXELS / 1e6:.0f} MP that training and the engine decode (downscale it)",
                    name,
                )
            im.load()
            # After the load: Pillow's PNG plugin reads the whole file to look for EXIF.
            sideways = _exif_orientation(im) in (5, 6, 7, 8)  # stored on its side: loaded turned upright
    except UnidentifiedImageError:
        if is_heif_file(example.path):
            why = "corrupt HEIC/HEIF image" if enable_heif() else HEIF_MISSING
            return None, Problem(name, why, name)
        if is_icon_file(example.path):
            return None, Problem(name, ICON_REFUSED, name)
        return None, Problem(name, "unreadable image (not an image format Pillow can read)", name)
    except Image.DecompressionBombError as exc:
        return None, Problem(name, f"image too large to decode safely ({exc})", name)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the file system's refusal, not the image's content
            return None, Problem(name, f"cannot read the file: {exc.strerror or exc}", name)
        kind = "truncated image" if "truncated" in str(exc) else "corrupt image"
        return None, Problem(name, f"{kind}: {exc}", name)
    if size[0] < 1 or size[1] < 1:
        return None, Problem(name, f"empty image ({size[0]}x{size[1]})", name)
    return (size[1], size[0]) if sideways else size, None


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: engine.images.to_rgb keeps the image as stored
        return None


def _named_from_the_top_hint(example: Example) -> str:
    """A hint when a subfolder's metadata names an image by its path from the data folder (train/a.jpg in
    train/metadata.jsonl, as a script walking the whole folder writes it): the name is read from train/."""
    metadata = example.listed_at.rpartition(":")[0]
    sub = posixpath.dirname(metadata)
    if not sub or not example.file_name.startswith(f"{sub}/"):
        return ""
    as_written = example.file_name[len(sub) + 1 :]
    if not as_written.startswith(f"{sub}/"):  # "a.jpg" in train/ is train/a.jpg: written as it should be
        return ""
    root = example.path.parents[len(PurePosixPath(example.file_name).parts) - 1]
    with contextlib.suppress(OSError, ValueError):
        if (root / as_written).is_file():
            inside = as_written[len(sub) + 1 :]
            return f" (the names in {metadata} are relative to {sub}/; {as_written!r} is a path from the data folder: write {inside!r})"
    return ""


def _near_name_hint(path: Path) -> str:
    """A hint when the folder holds a file whose name differs from `path`'s only in Unicode normalisation (macOS
    writes names decomposed, NFD; most editors write metadata composed, NFC) or in letter case (IMG_1.JPG listed
    as IMG_1.jpg: the same file on Windows and macOS, not on Linux): the bytes differ, so the lookup fails."""
    with contextlib.suppress(OSError, ValueError):
        while not path.parent.is_dir() and path.parent != path.parent.parent:
            path = path.parent  # a folder on the way is missing: the hint is about its name (Sub/ for sub/)
    wanted = path.name
    twins = _names_by_key(path.parent).get(_name_key(wanted), ())
    twin = next((name for name in twins if name != wanted), None)
    if twin is None:
        return ""
    if unicodedata.normalize("NFC", twin) == unicodedata.normalize("NFC", wanted):
        why = "in Unicode normalisation: NFC vs NFD"
    elif twin.casefold() == wanted.casefold():
        why = "in letter case (names are case-sensitive here)"
    else:
        why = "in Unicode normalisation and letter case"
    return f" (the folder has {twin!r}, which differs only {why}; rename one to match)"


def _name_key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


@functools.lru_cache(maxsize=64)
def _listing(folder: Path, changed: int) -> dict[str, tuple[str, ...]]:
    names: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            names.setdefault(_name_key(entry.name), []).append(entry.name)
    return {key: tuple(sorted(found)) for key, found in names.items()}


def _names_by_key(folder: Path) -> dict[str, tuple[str, ...]]:
    """A folder's file names by their normalised, case-folded form. Listed once per folder and change (its
    mtime): a folder of thousands of photos with many unmatched names is not listed once per name."""
    try:
        changed = os.stat(folder).st_mtime_ns
    except (OSError, ValueError):
        return {}
    return _listing(folder, changed)


def _inspect_all(examples: Sequence[Example]) -> list[tuple[tuple[int, int] | None, Problem | None]]:
    # Pillow releases the GIL while decoding, so a few threads make a big folder faster; map keeps order.
    if len(examples) < 32:
        return [_inspect(e) for e in examples]
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        return list(pool.map(_inspect, examples))


def _unlisted(folder: Path, listed: set[str], metadata: str) -> list[Problem]:
    found = []
    for root, dirs, files in os.walk(folder):
        # Hidden and system folders (as `edlight caption` walks), and training runs written inside the data folder
        # (their curves.png is no data).
        dirs[:] = sorted(d for d in dirs if not is_system_folder(d) and not os.path.isfile(os.path.join(root, d, RUN_CONFIG)))
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
            "split": split_counts((e.file_name for e in self.examples), test_ratio, seed),
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
                describe_split(split),
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
        problems.append(Problem(parsed.metadata, NO_IMAGES_LISTED))
    warnings: list[Problem] = list(parsed.warnings)
    warnings += [
        Problem(e.file_name, "listed, but `edlight caption` skips it in a folder walk: its name has no image "
                "extension the engine knows (such as .jpg or .png)", e.file_name)
        for e in good if not is_image_name(e.path)
    ]
    warnings += _copies(good)
    if not parsed.fatal:
        listed = {e.file_name for e in parsed.examples} | {p.file_name for p in parsed.problems if p.file_name}
        warnings += _unlisted(folder, listed, parsed.metadata)
    return CheckReport(folder, parsed.metadata, good, problems, warnings, sizes)


def _same_file(one: Example, other: Example) -> bool:
    """Whether two examples are one file (a link: _second_names says so already)."""
    try:
        return os.path.samefile(one.path, other.path)
    except (OSError, ValueError):
        return False


def _copies(examples: Sequence[Example]) -> list[Problem]:
    """Listed images whose bytes are another listed image's (`IMG_1.jpg` and `IMG_1 (1).jpg`, a download made
    twice): each name is split on its own, so a copy can be trained on and tested on."""

    def digest(example: Example) -> bytes | None:
        with contextlib.suppress(OSError), open(example.path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").digest()
        return None

    def size(example: Example) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return os.stat(example.path).st_size
        return None

    sized = [(e, n) for e in examples if (n := size(e)) is not None]
    # Only files sharing a size can share bytes: most folders have none to read again.
    count = collections.Counter(n for _, n in sized)
    alike = [e for e, n in sized if count[n] > 1]
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(digest, alike))

    def why(example: Example, earlier: Example) -> str | None:
        if _same_file(example, earlier):
            return None  # one file under two names: _second_names says so
        return (f"has the same bytes as {earlier.file_name} (listed at {earlier.listed_at}): a copy may land in "
                "the other split, and be both trained and tested on")

    return _listed_twice(list(zip(alike, digests, strict=True)), why)


# ---------------------------------------------------------------------------------------------------------
# Splits.


def split_folder(file_name: str) -> str | None:
    """The split a file name's top-level folder names (SPLIT_FOLDERS, any case), else None."""
    top, sep, _ = file_name.partition("/")
    return SPLIT_FOLDERS.get(top.lower()) if sep else None


def split_of(file_name: str, test_ratio: float = 0.1, seed: int = 0) -> str:
    """"train" or "test" for a file name (as listed in the metadata, relative to the data folder).

    Below a top-level split folder (`train/...`, `test/...`, `validation/...`: SPLIT_FOLDERS) the folder
    decides. Any other name is hashed: the first 8 bytes of the SHA-1 of f"{seed}:{file_name}" map it to
    [0, 1), and below `test_ratio` is "test". Either way adding or removing other files never changes the
    answer. Raises ValueError when test_ratio is outside [0, 1].
    """
    if not 0.0 <= test_ratio <= 1.0:
        raise ValueError(f"test_ratio must be within [0, 1], got {test_ratio}")
    by_folder = split_folder(file_name)
    if by_folder is not None:
        return by_folder
    digest = hashlib.sha1(f"{seed}:{file_name}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_ratio else "train"


def split_counts(file_names: Iterable[str], test_ratio: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """How `file_names` split: {"train": n, "test": n, "test_ratio", "seed", "folders": {"train/": n, ...}
    (the names below each split folder), "hashed": n (the names split by hash)}."""
    counts: dict[str, Any] = {"train": 0, "test": 0, "test_ratio": test_ratio, "seed": seed, "folders": {}, "hashed": 0}
    for name in file_names:
        counts[split_of(name, test_ratio, seed)] += 1
        if split_folder(name) is None:
            counts["hashed"] += 1
        else:
            top = name.partition("/")[0] + "/"
            counts["folders"][top] = counts["folders"].get(top, 0) + 1
    return counts


def describe_split(counts: dict[str, Any]) -> str:
    """One line from `split_counts`: "split (test_ratio 0.1, seed 0): 1784 train, 216 test", or with split
    folders "split (from the split folders test/ 3, train/ 9): 9 train, 3 test"."""
    how = hashing = f"test_ratio {counts['test_ratio']}, seed {counts['seed']}"
    if counts["folders"]:
        parts = []
        for top, n in sorted(counts["folders"].items()):
            split = SPLIT_FOLDERS[top[:-1].lower()]
            parts.append(f"{top} {n}" if top[:-1].lower() == split else f"{top} {n} as {split}")
        how = f"from the split folders {', '.join(parts)}"
        if counts["hashed"]:
            others = counts["hashed"]
            how += f"; {others} other file{'' if others == 1 else 's'} by hash, {hashing}"
    return f"split ({how}): {counts['train']} train, {counts['test']} test"


NO_IMAGES_LISTED = "lists no images: nothing to train or evaluate on"


def load_split(
    folder: str | Path,
    split: str = "train",
    test_ratio: float = 0.1,
    seed: int = 0,
    caption_column: str = "text",
    skip_bad: bool = False,
    positions: tuple[PatchConfig, int] | None = None,
) -> Examples:
    """The validated examples of one split ("train", "test" or "all"), in metadata order.

    `positions`: the model's (patch config, row/column position limit); an image whose patch grid the
    model cannot embed (a long, thin strip, when max_patches reach the tables) is then a problem too
    (engine.preprocess.position_error, train.checkpoint.position_check).

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
    if not parsed.examples and not parsed.problems:  # as `edlight data check` says: not an empty split
        raise _error(folder, [Problem(parsed.metadata, NO_IMAGES_LISTED)])
    for warning in parsed.warnings:
        log.warning("%s: %s", folder, warning)
    chosen = [e for e in parsed.examples if split == "all" or split_of(e.file_name, test_ratio, seed) == split]
    bad = list(parsed.problems)
    good: list[Example] = []
    for example, (size, problem) in zip(chosen, _inspect_all(chosen), strict=True):
        if problem is None and size is not None and positions is not None:
            beyond = position_error(*size, *positions)
            if beyond is not None:
                problem = Problem(example.file_name, beyond, example.file_name)
        if problem is None:
            good.append(example)
        else:
            bad.append(problem)
    if bad and not skip_bad:
        raise _error(folder, bad)
    if bad:
        log.warning("%s: skipped %d bad entries:\n%s", folder, len(bad), _spelled_out(bad))
    return Examples(good, skipped=bad)


# Problems a DataError spells out: beyond, they are counted (`edlight data check` lists every one).
SHOWN_PROBLEMS = 50


def _spelled_out(problems: Sequence[Problem], after_more: str = "") -> str:
    """The first SHOWN_PROBLEMS of `problems`, one indented line each, then how many more (`after_more` added)."""
    lines = [f"  {p}" for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more{after_more}")
    return "\n".join(lines)


def _error(folder: Path, problems: Sequence[Problem]) -> DataError:
    noun = "problem" if len(problems) == 1 else "problems"
    # 45,000 lines of "image not found" scrolled the count, on the first line, out of sight.
    listed = _spelled_out(problems, f": {len(problems)} {noun} in all (`edlight data check {shlex.quote(str(folder))}` "
                                    "lists every one)")
    return DataError(f"{folder}: {len(problems)} {noun} in the data folder:\n{listed}", problems)
