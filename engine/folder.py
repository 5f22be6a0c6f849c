"""Folder jobs: walk inputs, caption, and stream one record per image to JSONL or CSV, resumably.

Records are ``{"file": path relative to its input folder, "caption": str|None, "error": str|None}``,
in input order (folders are walked recursively in sorted order). They are appended and flushed batch
by batch, so a killed run keeps everything it finished. By default a rerun resumes: files that already
have a record are skipped and a torn last line (the write the kill interrupted) is cut off first.
A bad image is an error record, never a crash.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from engine.errors import EdlightError

if TYPE_CHECKING:
    from engine.captioner import Captioner

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FORMATS = ("jsonl", "csv")
FIELDS = ("file", "caption", "error")


class OutputError(EdlightError):
    """The output file cannot be read back for resuming, or cannot be written."""


@dataclass(frozen=True)
class InputFile:
    path: Path  # where to read it
    file: str  # the record's "file": relative to its input folder (posix separators)


@dataclass
class FolderSummary:
    total: int  # images found under the inputs
    skipped: int  # already in the output (resume)
    captioned: int
    failed: int
    seconds: float
    out: Path
    failed_before: int = 0  # error records already in the output from earlier runs

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.failed_before)

    @property
    def images_per_s(self) -> float:
        done = self.captioned + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = f", {self.skipped} already done ({self.failed_before} of them failed)" if self.skipped else ""
        return (
            f"captioned {self.captioned}, failed {self.failed}{resumed} of {self.total} images "
            f"in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s) -> {self.out}"
        )


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str | Path]) -> list[InputFile]:
    """Expand files and folders into image files, in a reproducible order.

    A folder is walked recursively, entries sorted by name, keeping names with an image extension
    (broken symlinks and the like are kept too: they become error records, not silence). Folders
    named like images are walked like any folder. A file given explicitly is kept whatever its name.
    If two inputs yield the same relative name, records of those inputs are prefixed with the input as given.
    Raises FileNotFoundError naming an input that does not exist, OutputError for an unlistable folder.
    """
    found: list[tuple[Path, str, str]] = []  # (path, relative name, input as given)
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            for path in _walk(root):
                found.append((path, path.relative_to(root).as_posix(), str(raw)))
        elif root.exists() or root.is_symlink():
            found.append((root, root.name, str(raw)))
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
    # Two inputs can hold the same relative name (a/x.png, b/x.png): then prefix with the input.
    names = [name for _, name, _ in found]
    if len(set(names)) != len(names):
        return [InputFile(path, f"{Path(given).as_posix().rstrip('/')}/{name}" if Path(given).is_dir() else given)
                for path, name, given in found]
    return [InputFile(path, name) for path, name, _ in found]


def _walk(root: Path) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise OutputError(f"{root}: cannot list folder: {exc.strerror or exc}") from exc
    for entry in entries:
        path = Path(entry.path)
        # Directory symlinks are not followed: they could loop.
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)
        elif is_image_name(path):
            yield path


class RecordWriter:
    """Appends records to a JSONL or CSV file, one physical line each, flushed per batch."""

    def __init__(self, out: Path, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out, self.fmt = out, fmt
        self._handle: TextIO | None = None
        self._regular = True

    def __enter__(self) -> RecordWriter:
        folder = self.out.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "a file, not a folder" if folder.exists() or isinstance(exc, FileExistsError) else exc.strerror or exc
            raise OutputError(f"{self.out}: cannot create its folder {folder}: {why}") from exc
        try:
            # A device or pipe (/dev/stdout) is written as a stream: never read back, truncated or synced.
            self._regular = not self.out.exists() or self.out.is_file()
            fresh = not self.out.is_file() or self.out.stat().st_size == 0
            self._handle = open(self.out, "a", encoding="utf-8", newline="")
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write: {exc.strerror or exc}") from exc
        if fresh and self.fmt == "csv":
            self._write(",".join(FIELDS) + "\n")
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._handle is None:
            return
        try:
            self._handle.close()
        except OSError as error:
            if exc_type is None:  # otherwise the write error on its way out already says it
                raise OutputError(f"{self.out}: cannot write: {error.strerror or error}") from error

    def write(self, records: list[dict[str, Any]]) -> None:
        self._write("".join(format_record(r, self.fmt) for r in records))

    def _write(self, text: str) -> None:
        assert self._handle is not None
        try:
            self._handle.write(text)
            self._handle.flush()
            if self._regular:
                os.fsync(self._handle.fileno())
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write: {exc.strerror or exc}") from exc


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (surrogate escapes, see os.fsdecode) as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _csv_field(value: object) -> str:
    # Newlines inside a field would split a record over several lines and defeat torn-line repair.
    return " ".join(_printable(str(value)).splitlines())


def record_name(file: str, fmt: str) -> str:
    """The "file" of a record as `read_done` reads it back (how a rerun recognises a finished image)."""
    return file if fmt == "jsonl" else _csv_field(file)


def format_record(record: dict[str, Any], fmt: str) -> str:
    if fmt == "jsonl":
        fields = {k: record.get(k) for k in FIELDS}
        line = json.dumps(fields, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A file name that is not valid UTF-8: \\u escapes keep the line valid and read back exactly.
            line = json.dumps(fields, ensure_ascii=True)
        return line + "\n"
    buffer = io.StringIO()
    row = ["" if record.get(k) is None else _csv_field(record[k]) for k in FIELDS]
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


def read_done(out: Path, fmt: str) -> dict[str, bool]:
    """Files that already have a record in `out` (-> True if that record is an error).

    A torn last line is cut off the file first.

    Raises OutputError when a line other than the last is not a record (not our file, or damaged).
    """
    if not out.is_file():
        return {}  # nothing yet, or a device or pipe (/dev/stdout): nothing to resume
    try:
        data = out.read_bytes()
    except OSError as exc:
        raise OutputError(f"{out}: cannot read for resuming: {exc.strerror or exc}") from exc
    lines = data.split(b"\n")
    tail = lines.pop()  # bytes after the last newline: empty, or a record the kill cut short
    if tail:
        with open(out, "r+b") as handle:
            handle.truncate(len(data) - len(tail))
    done: dict[str, bool] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            if fmt == "csv":
                if number == 1:
                    if text.rstrip("\r").split(",") != list(FIELDS):
                        raise ValueError(f"the first line is not the CSV header {','.join(FIELDS)}")
                    continue
                row = next(csv.reader([text]))
                file, failed = row[0], len(row) > 2 and bool(row[2])
            else:
                record = json.loads(text)
                file, failed = record["file"], record.get("error") is not None
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
            raise OutputError(
                f"{out}:{number}: not a caption record ({exc}); fix the file, or start afresh with --overwrite"
            ) from exc
        done[str(file)] = failed
    return done


def default_output(fmt: str) -> Path:
    return Path("captions.jsonl" if fmt == "jsonl" else "captions.csv")


def resolve_format(fmt: str | None, out: str | Path | None) -> str:
    """The output format: `fmt` when given, else csv for an --out ending in .csv, else jsonl."""
    if fmt is not None:
        return fmt
    return "csv" if out is not None and Path(out).suffix.lower() == ".csv" else "jsonl"


def plan_folder_job(
    inputs: Sequence[str | Path] | str | Path,
    out: str | Path | None = None,
    fmt: str = "jsonl",
    overwrite: bool = False,
) -> tuple[list[InputFile], FolderSummary]:
    """The resume rule, shared by local and Ray runs: (images still to caption, summary so far).

    `overwrite` deletes `out` first; otherwise files already in `out` are skipped (its torn last line
    is cut off). Raises ValueError for an unknown format, FileNotFoundError for a missing input,
    OutputError for an unreadable output file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out_path = Path(out) if out is not None else default_output(fmt)
    files = collect_inputs(inputs)
    if overwrite and out_path.is_file():  # never unlink a device such as /dev/stdout
        try:
            out_path.unlink()
        except OSError as exc:
            raise OutputError(f"{out_path}: cannot start afresh: {exc.strerror or exc}") from exc
    done = read_done(out_path, fmt)
    todo = [f for f in files if record_name(f.file, fmt) not in done]
    summary = FolderSummary(
        total=len(files), skipped=len(files) - len(todo), captioned=0, failed=0, seconds=0.0, out=out_path,
        failed_before=sum(1 for f in files if done.get(record_name(f.file, fmt))),
    )
    return todo, summary


def write_batch(writer: RecordWriter, records: list[dict[str, Any]], summary: FolderSummary, bar: Any) -> None:
    """Append `records` to the output, count them in `summary` and advance the progress bar (if any)."""
    writer.write(records)
    failed = sum(1 for r in records if r["error"] is not None)
    summary.failed += failed
    summary.captioned += len(records) - failed
    if bar is not None:
        bar.update(len(records))


def caption_folder(
    captioner: Captioner,
    inputs: Sequence[str | Path] | str | Path,
    out: str | Path | None = None,
    fmt: str = "jsonl",
    overwrite: bool = False,
    progress: bool = True,
) -> FolderSummary:
    """Caption every image under `inputs` into `out` (default captions.jsonl / captions.csv).

    Resumes by default (see module docstring); `overwrite` starts a fresh file. Image problems are
    records; raises FileNotFoundError for a missing input, OutputError for an unusable output file,
    ModelRuntimeError if ONNX Runtime fails.
    """
    todo, summary = plan_folder_job(inputs, out, fmt=fmt, overwrite=overwrite)
    out_path = summary.out

    bar = _progress_bar(len(todo), progress)
    started = time.perf_counter()
    items = ((f.file, f.path, str(f.path)) for f in todo)
    pending: list[dict[str, Any]] = []
    try:
        with RecordWriter(out_path, fmt) as writer:
            for file, caption, error in captioner.iter_captions(items):
                pending.append({"file": file, "caption": caption, "error": error})
                if len(pending) >= captioner.batch_size:
                    write_batch(writer, pending, summary, bar)
                    pending = []
            if pending:
                write_batch(writer, pending, summary, bar)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True)
