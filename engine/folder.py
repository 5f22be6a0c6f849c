"""Folder jobs: walk inputs, caption, and stream one record per image to JSONL or CSV, resumably.

Records are ``{"file": path relative to its input folder, "caption": str|None, "error": str|None,
"model": the bundle's model_id}``, in input order (folders are walked recursively in sorted order). They are appended and flushed batch
by batch, so a killed run keeps everything it finished. By default a rerun resumes: files that already
have a caption are skipped, files whose record is an error are tried again (their old error records
are dropped from the file first), and a torn last line (the write a kill interrupted) is cut off.
A bad image is an error record, never a crash; a folder that cannot be listed is reported and skipped.
One run at a time may write an output file (a lock next to it, `.NAME.lock`, says who), and only with
the model that wrote its records: a resume with another bundle would mix two models' captions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from engine.errors import EdlightError

try:
    import fcntl
except ImportError:  # Windows: runs on one output are not locked against each other
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from engine.captioner import Captioner

# Photo and scan formats (HEIC/HEIF read with pillow-heif installed; without it they are error records
# that say so, never silently left out).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".avif", ".heic", ".heif",
    ".bmp", ".dib", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
FORMATS = ("jsonl", "csv")
FIELDS = ("file", "caption", "error", "model")
LEGACY_CSV_FIELDS = FIELDS[:3]  # CSV files written before records named their model: resumed as they are


class OutputError(EdlightError):
    """The output file cannot be read back for resuming, or cannot be written."""


@dataclass(frozen=True)
class InputFile:
    path: Path  # where to read it
    file: str  # the record's "file": relative to its input folder (posix separators)


@dataclass
class FolderSummary:
    total: int  # images found under the inputs
    skipped: int  # already captioned in the output (resume)
    captioned: int
    failed: int
    seconds: float
    out: Path
    retried: int = 0  # images whose earlier record was an error, tried again by this run
    unreadable: list[str] = field(default_factory=list)  # folders that could not be listed (why, per folder)

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.unreadable)

    @property
    def images_per_s(self) -> float:
        done = self.captioned + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = f", {self.skipped} already done" if self.skipped else ""
        retried = f" ({self.retried} retried after failing before)" if self.retried else ""
        unreadable = f"; {len(self.unreadable)} folder(s) could not be listed" if self.unreadable else ""
        return (
            f"captioned {self.captioned}, failed {self.failed}{retried}{resumed} of {self.total} images "
            f"in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s){unreadable} -> {self.out}"
        )


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str | Path], unreadable: list[str] | None = None) -> list[InputFile]:
    """Expand files and folders into image files, in a reproducible order.

    A folder is walked recursively, entries sorted by name, keeping names with an image extension
    (broken symlinks and the like are kept too: they become error records, not silence). Folders
    named like images are walked like any folder; symlinked folders are followed once (a folder
    reached twice, e.g. through a loop, is not walked again). A file given explicitly is kept whatever
    its name. A file reached through several inputs (`A A`, `A A/x.png`) is captioned once, under the
    first. If two inputs yield the same relative name, records of those inputs are prefixed with the
    input as given.

    A folder below an input that cannot be listed is skipped with its reason appended to `unreadable`
    (without that list, it raises OutputError). Raises FileNotFoundError naming an input that does not
    exist, OutputError for an input folder that cannot be listed.
    """
    found: list[tuple[Path, str, str]] = []  # (path, relative name, input as given)
    seen_files: set[str] = set()
    walked: set[tuple[int, int]] = set()  # (device, inode) of folders already walked
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            entries = _list_folder(root, walked, None)  # an input folder that cannot be listed stops the job
            candidates = [
                (path, path.relative_to(root).as_posix())
                for entry in entries or []
                for path in _entry_images(entry, walked, unreadable)
            ]
        elif root.exists() or root.is_symlink():
            candidates = [(root, root.name)]
        else:
            raise FileNotFoundError(f"{raw}: no such file or folder")
        for path, name in candidates:
            real = os.path.realpath(path)
            if real not in seen_files:
                seen_files.add(real)
                found.append((path, name, str(raw)))
    # Two inputs can hold the same relative name (a/x.png, b/x.png): then prefix with the input.
    names = [name for _, name, _ in found]
    if len(set(names)) != len(names):
        return [InputFile(path, f"{Path(given).as_posix().rstrip('/')}/{name}" if Path(given).is_dir() else given)
                for path, name, given in found]
    return [InputFile(path, name) for path, name, _ in found]


def _list_folder(folder: Path, walked: set[tuple[int, int]], unreadable: list[str] | None) -> list[os.DirEntry[str]] | None:
    """The entries of `folder` sorted by name, or None if it was walked already or (with `unreadable`)
    cannot be listed."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in walked:
            return None
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        message = f"{folder}: cannot list folder: {exc.strerror or exc}"
        if unreadable is None:
            raise OutputError(message) from exc
        unreadable.append(message)
        return None
    walked.add((info.st_dev, info.st_ino))
    return entries


def _entry_images(entry: os.DirEntry[str], walked: set[tuple[int, int]], unreadable: list[str] | None) -> Iterator[Path]:
    """The image files at a folder entry: itself if named like an image, or those below it if a folder."""
    path = Path(entry.path)
    try:
        is_folder = entry.is_dir()  # follows symlinks; `walked` stops loops and second visits
    except OSError:
        is_folder = False  # e.g. a symlink loop: kept if named like an image, to become an error record
    if not is_folder:
        if is_image_name(path):
            yield path
        return
    for below in _list_folder(path, walked, unreadable) or []:
        yield from _entry_images(below, walked, unreadable)


class RecordWriter:
    """Appends records to a JSONL or CSV file, one physical line each, flushed per batch."""

    def __init__(self, out: Path, fmt: str, model: str | None = None) -> None:
        """`model`: stamped into every record (the bundle's model_id)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out, self.fmt, self.model = out, fmt, model
        self.fields: tuple[str, ...] = FIELDS
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
            if not fresh and self.fmt == "csv" and _csv_header(self.out) == LEGACY_CSV_FIELDS:
                self.fields = LEGACY_CSV_FIELDS  # appended rows keep the file's columns
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
        self._write("".join(format_record({**r, "model": self.model}, self.fmt, self.fields) for r in records))

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


def _csv_name(file: str) -> str:
    # A file name keeps its line breaks as \n, \r: written as spaces, "a\nb.png" and "a b.png" would clash.
    return _printable(file).replace("\r", "\\r").replace("\n", "\\n")


def record_name(file: str, fmt: str) -> str:
    """The "file" of a record as `read_done` reads it back (how a rerun recognises a finished image)."""
    return file if fmt == "jsonl" else _csv_name(file)


def _csv_header(path: Path) -> tuple[str, ...]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return tuple(handle.readline().rstrip("\r\n").split(","))


def format_record(record: dict[str, Any], fmt: str, columns: tuple[str, ...] = FIELDS) -> str:
    if fmt == "jsonl":
        fields = {k: record.get(k) for k in columns}
        line = json.dumps(fields, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A file name that is not valid UTF-8: \\u escapes keep the line valid and read back exactly.
            line = json.dumps(fields, ensure_ascii=True)
        return line + "\n"
    buffer = io.StringIO()
    row = ["" if record.get(k) is None else _csv_name(record[k]) if k == "file" else _csv_field(record[k]) for k in columns]
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Line:
    raw: bytes  # the line as stored, with its newline
    file: str | None  # None for the CSV header and blank lines
    failed: bool = False
    model: str | None = None  # the model that wrote it (None: not said, as in records before the field)


JSONL_START = '{"file": '  # how every JSONL record of ours begins (format_record)


def read_done(out: Path, fmt: str) -> dict[str, bool]:
    """Files that already have a record in `out` (-> True if that record is an error).

    A torn last line is cut off the file, once every line before it has been read as a record.
    Raises OutputError, leaving the file as it was, when it holds anything else (not our file, or damaged).
    """
    return {line.file: line.failed for line in _read_lines(out, fmt) if line.file is not None}


def _read_lines(out: Path, fmt: str) -> list[_Line]:
    if not out.is_file():
        return []  # nothing yet, or a device or pipe (/dev/stdout): nothing to resume
    try:
        data = out.read_bytes()
    except OSError as exc:
        raise OutputError(f"{out}: cannot read for resuming: {exc.strerror or exc}") from exc
    pieces = data.split(b"\n")
    tail = pieces.pop()  # bytes after the last newline: empty, or a record a kill cut short
    lines = [_parse_line(out, fmt, number, raw) for number, raw in enumerate(pieces, start=1)]
    if tail:
        if not _is_torn_record(tail, fmt, first_line=not pieces):
            raise OutputError(
                f"{out}:{len(pieces) + 1}: not a caption record (and not one cut short); "
                "fix the file, or start afresh with --overwrite"
            )
        try:
            with open(out, "r+b") as handle:
                handle.truncate(len(data) - len(tail))
        except OSError as exc:
            raise OutputError(f"{out}: cannot cut off its torn last line: {exc.strerror or exc}") from exc
    return lines


def _parse_line(out: Path, fmt: str, number: int, raw: bytes) -> _Line:
    if not raw.strip():
        return _Line(raw + b"\n", None)
    try:
        text = raw.decode("utf-8")
        if fmt == "csv":
            if number == 1:
                if tuple(text.rstrip("\r").split(",")) not in (FIELDS, LEGACY_CSV_FIELDS):
                    raise ValueError(f"the first line is not the CSV header {','.join(FIELDS)}")
                return _Line(raw + b"\n", None)
            row = next(csv.reader([text]))
            file, failed, model = row[0], len(row) > 2 and bool(row[2]), row[3] if len(row) > 3 and row[3] else None
        else:
            record = json.loads(text)
            file, failed, model = record["file"], record.get("error") is not None, record.get("model")
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
        # A damaged caption file may be started afresh; anything else is not ours to replace.
        remedy = "choose another output" if number == 1 else "fix the file, or start afresh with --overwrite"
        raise OutputError(f"{out}:{number}: not a caption record ({exc}); {remedy}") from exc
    return _Line(raw + b"\n", str(file), failed, None if model is None else str(model))


def _is_torn_record(tail: bytes, fmt: str, first_line: bool) -> bool:
    """Whether `tail` (after the last newline) can be the start of a record whose write was cut short."""
    for cut in range(4):  # the cut may split a UTF-8 character of up to 4 bytes
        try:
            text = tail[: len(tail) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    if "\x00" in text:
        return False
    if fmt == "jsonl":
        return text.startswith(JSONL_START) or JSONL_START.startswith(text)
    if first_line:
        return any(",".join(header).startswith(text) for header in (FIELDS, LEGACY_CSV_FIELDS))
    return True  # after the header, any text can start a row


def _drop_lines(out: Path, lines: list[_Line], files: set[str]) -> None:
    """Rewrite `out` without the records of `files` (atomically: a kill leaves the old file or the new)."""
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(b"".join(line.raw for line in lines if line.file is None or line.file not in files))
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):
            os.chmod(temporary, out.stat().st_mode & 0o7777)
        os.replace(temporary, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise OutputError(f"{out}: cannot drop the error records of images to retry: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` next to `out` (an exclusive flock) while a run reads and writes `out`.

    Raises OutputError at once if another run holds it: two runs appending to one file would
    caption everything twice. The lock file is removed afterwards; a killed run's lock is released
    by the kernel, so a stale file never blocks anyone.
    """
    if fcntl is None or (out.exists() and not out.is_file()):  # a device such as /dev/stdout: no lock
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # RecordWriter says why the folder cannot be made
        return
    while True:
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create its lock file {lock}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(handle)
            raise OutputError(
                f"{out}: another run (pid {holder}) is writing to this file; wait for it to end or choose another output"
            ) from exc
        # The holder before us may have removed the file between our open and our lock: lock the file
        # that is there now, or two runs could each hold a lock on a different file.
        try:
            current = os.stat(lock)
            mine = os.fstat(handle)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(handle)


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
    model: str | None = None,
) -> tuple[list[InputFile], FolderSummary]:
    """The resume rule, shared by local and Ray runs: (images still to caption, summary so far).

    `overwrite` deletes `out` first (only a caption file: anything else is refused); otherwise images
    already captioned in `out` are skipped, images whose record there is an error are tried again
    (those records are dropped from `out` first) and its torn last line is cut off. `model` (the
    bundle's model_id) must be the model of every record in `out` that names one. Callers hold
    `output_lock(out)` from here until their last write (see `folder_job`). Raises ValueError for an
    unknown format, FileNotFoundError for a missing input, OutputError for an output file that is not
    a caption file, is one of the inputs, or holds another model's captions.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out_path = output_path(out, fmt)
    unreadable: list[str] = []
    files = collect_inputs(inputs, unreadable)
    if out_path.exists() and any(os.path.samefile(f.path, out_path) for f in files if f.path.exists()):
        raise OutputError(f"{out_path}: the output file is one of the input images; choose another output")
    if overwrite and out_path.is_file():  # never unlink a device such as /dev/stdout
        if not _is_caption_file(out_path):
            raise OutputError(
                f"{out_path}: not a caption file (its first line is not a caption record); --overwrite replaces "
                "only caption files: choose another output, or remove it yourself"
            )
        try:
            out_path.unlink()
        except OSError as exc:
            raise OutputError(f"{out_path}: cannot start afresh: {exc.strerror or exc}") from exc
    lines = _read_lines(out_path, fmt)
    others = sorted({line.model for line in lines if line.model is not None} - {model}) if model else []
    if others:
        raise OutputError(
            f"{out_path}: holds captions of another model ({', '.join(others)}; this bundle is {model}); "
            "choose another output, or --overwrite to replace them"
        )
    done = {line.file: line.failed for line in lines if line.file is not None}
    names = {f.file: record_name(f.file, fmt) for f in files}
    retry = {names[f.file] for f in files if done.get(names[f.file])}
    if retry:
        _drop_lines(out_path, lines, retry)
    todo = [f for f in files if names[f.file] not in done or names[f.file] in retry]
    summary = FolderSummary(
        total=len(files), skipped=len(files) - len(todo), captioned=0, failed=0, seconds=0.0, out=out_path,
        retried=len(retry), unreadable=unreadable,
    )
    return todo, summary


@contextlib.contextmanager
def folder_job(
    inputs: Sequence[str | Path] | str | Path, out: str | Path | None, fmt: str, overwrite: bool, model: str | None
) -> Iterator[tuple[list[InputFile], FolderSummary]]:
    """`plan_folder_job` under the output's lock, held until the block ends (the last record written)."""
    with output_lock(output_path(out, fmt)):
        yield plan_folder_job(inputs, out, fmt=fmt, overwrite=overwrite, model=model)


def _is_caption_file(path: Path) -> bool:
    """Whether `path` is empty or starts like a caption file of either format (JSONL record, CSV header)."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(64 * 1024)
    except OSError:
        return False
    text = first.decode("utf-8", "replace").rstrip("\r\n")
    return not first or text.startswith(JSONL_START) or tuple(text.split(",")) in (FIELDS, LEGACY_CSV_FIELDS)


def output_path(out: str | Path | None, fmt: str) -> Path:
    return Path(out) if out is not None else default_output(fmt)


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
    records, folders that cannot be listed are in the summary's `unreadable`; raises
    FileNotFoundError for a missing input, OutputError for an unusable output file or one another run
    is writing, ModelRuntimeError if ONNX Runtime fails.
    """
    model = captioner.bundle.model_id
    with folder_job(inputs, out, fmt, overwrite, model) as (todo, summary):
        bar = _progress_bar(len(todo), progress)
        started = time.perf_counter()
        items = ((f.file, f.path, str(f.path)) for f in todo)
        pending: list[dict[str, Any]] = []
        try:
            with RecordWriter(summary.out, fmt, model) as writer:
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
