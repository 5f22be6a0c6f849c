"""Folder jobs: walk inputs, caption, and stream one record per image to JSONL or CSV, resumably.

Records are ``{"file": path relative to its input folder, "caption": str|None, "error": str|None,
"model": the bundle's captions_id, "bytes": the image file's size as read, "sha256": its SHA-256 (hex),
"mtime_ns": its modification time}``, in input order (folders are
walked recursively in sorted order). They are appended and flushed batch by batch, so a killed run keeps
everything it finished. By default a rerun resumes: files that already have a caption are skipped, files
whose record is an error are tried again (their old error records are dropped from the file first), and a
torn last line (the write a kill interrupted) is cut off. A name whose record was written for another file
(another size or SHA-256: another folder's image of the same name, or the image since replaced) stops the
run before anything is written, since skipping it would keep a wrong caption; `recaption_changed` captions
those again.
A bad image is an error record, never a crash; a folder that cannot be listed is reported and skipped.
One run at a time may write an output file (a lock next to it, `.NAME.lock`, says who), and only with
the model that wrote its records: a resume with another bundle would mix two models' captions.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from engine.click_types import check_stop, progress_bar
from engine.errors import EdlightError

try:
    import fcntl
except ImportError:  # Windows: runs on one output are not locked against each other
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from concurrent.futures import Future

    from engine.captioner import Captioner

# Photo and scan formats (HEIC/HEIF, and .hif as Canon and Fujifilm cameras name it, read with pillow-heif installed; without it they are error records
# that say so, never silently left out).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".webp", ".avif", ".heic", ".heif", ".hif",
    ".bmp", ".dib", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".jpf", ".jpx",
})
FORMATS = ("jsonl", "csv")
log = logging.getLogger(__name__)
# Out of room: on the disk, in a quota, or under the process's file size limit.
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# A folder (or file system) that takes no changes from this user.
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

FIELDS = ("file", "caption", "error", "model", "bytes", "sha256", "mtime_ns")
# CSV files written before records named their model (3 columns), their file's size (4), its digest (5) or
# its modification time (6): resumed as they are, and appended to with their own columns.
CSV_HEADERS = (FIELDS, FIELDS[:6], FIELDS[:5], FIELDS[:4], FIELDS[:3])
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
Digest = bytes  # a SHA-256 digest, raw (a name, as _Line has a field called bytes)


class OutputError(EdlightError):
    """The output file cannot be read back for resuming, or cannot be written."""


# A CSV "file" as this version writes it: every backslash begins \\, \n, \r or \xNN (see _csv_name).
CURRENT_CSV_NAME = re.compile(r"(?:[^\\]|\\[\\nr]|\\x[0-9a-f]{2})*", re.DOTALL)
# Outputs that are streams even when they resolve to a regular file (a shell redirect): never resumed,
# locked or rewritten. An --out of "-" is /dev/stdout (output_path).
STREAM_PATH = re.compile(r"/dev/(stdout|stderr)|/dev/fd/\d+|/proc/self/fd/\d+")
# The longest file name (bytes) on Linux, macOS and Windows file systems alike.
NAME_MAX_BYTES = 255
# What follows `sibling_stem` in the names of an output's rewritten copy (".PID.tmp") and of a report's
# (".PID-XXXXXXXX.tmp"), with room for a 7-digit pid.
REWRITE_SUFFIX_BYTES = 16
REPORT_SUFFIX_BYTES = 24


@dataclass(frozen=True)
class InputFile:
    path: Path  # where to read it
    file: str  # the record's "file": relative to its input folder (posix separators)
    real: str  # the file's path with symlinks resolved (one record per real file)
    bytes: int | None = None  # its size when found (None: cannot be read, e.g. a broken symlink)
    # Its "file" under the other naming rule of collect_inputs (prefixed with its input, or not): records
    # of an earlier run with other inputs may use it.
    other_name: str | None = None
    mtime_ns: int | None = None  # its modification time when found


@dataclass
class FolderSummary:
    total: int  # images found under the inputs
    skipped: int  # already captioned in the output (resume)
    captioned: int
    failed: int
    seconds: float
    out: Path
    retried: int = 0  # images whose earlier record was an error, tried again by this run
    changed: int = 0  # images whose file changed since their record, captioned again (recaption_changed)
    unreadable: list[str] = field(default_factory=list)  # folders that could not be listed (why, per folder)
    duplicates: list[str] = field(default_factory=list)  # paths left out: the same file as another input path
    # Records in the output of files not among these inputs (deleted, renamed, or from other inputs): kept.
    unlisted: int = 0

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.unreadable)

    @property
    def images_per_s(self) -> float:
        done = self.captioned + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        resumed = f", {self.skipped} already done" if self.skipped else ""
        again = [f"{self.retried} retried after failing before"] * bool(self.retried)
        again += [f"{self.changed} changed since their record, captioned again"] * bool(self.changed)
        retried = f" ({'; '.join(again)})" if again else ""
        unreadable = f"; {len(self.unreadable)} folder(s) could not be listed" if self.unreadable else ""
        duplicates = f"; {len(self.duplicates)} path(s) to files already captioned under another name" if self.duplicates else ""
        unlisted = f"; {self.unlisted} record(s) in the output of files not among these inputs, kept" if self.unlisted else ""
        # With nothing captioned, a time and a rate would be those of no work: say there was none.
        timing = (f"in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s)" if self.captioned + self.failed
                  else "(nothing left to caption)")  # fmt: skip
        return (
            f"captioned {self.captioned}, failed {self.failed}{retried}{resumed} of {self.total} images "
            f"{timing}{unreadable}{duplicates}{unlisted} -> {self.out}"
        )


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], unreadable: list[str] | None = None, duplicates: list[str] | None = None
) -> list[InputFile]:
    """Expand files and folders into image files, in a reproducible order.

    A folder is walked recursively, entries sorted by name, keeping names with an image extension
    (broken symlinks and the like are kept too: they become error records, not silence). Hidden files and
    folders below it and system folders (is_system_folder: .thumbnails, .Trash-1000, @eaDir, ...) are left
    out; folders named like images are walked like any folder; symlinked folders are followed, except back
    into a folder being walked (a loop). A file or folder given explicitly is read whatever its name.

    One record per real file: a file reached by several paths (`A A`, `A A/x.png`, a symlinked folder
    or file, hard links) keeps the path without symlinks if it has one, else the first in walk order;
    the others are appended to `duplicates`. If two inputs yield the same relative name, records of those inputs
    are prefixed with the input as given.

    A folder below an input that cannot be listed is skipped with its reason appended to `unreadable`
    (without that list, it raises OutputError). Raises FileNotFoundError naming an input that does not
    exist, OutputError for an input folder that cannot be listed.
    """
    found: list[InputFile] = []
    given: list[str] = []  # the input each file came from
    identities: list[object] = []  # (device, inode): one per real file, hard links included
    for raw in inputs:
        root = Path(raw)
        if _is_input_folder(raw):
            walked = list(_walk(root, frozenset(), unreadable, top=True))
        else:
            walked = [(root, root.name, None)]
        for path, name, real_or_none in walked:
            real = os.path.realpath(path) if real_or_none is None else real_or_none
            identity: object
            try:
                info = os.stat(path)
                size, mtime_ns = info.st_size, info.st_mtime_ns
                # Hard links share an inode; trusted only where there are several links to a real inode
                # number (some network file systems report 0 or reuse them).
                identity = (info.st_dev, info.st_ino) if info.st_nlink > 1 and info.st_ino else real
            except OSError:  # a broken symlink and the like: known by its path (it becomes an error record)
                identity, size, mtime_ns = real, None, None
            found.append(InputFile(path, name, real, size, mtime_ns=mtime_ns))
            identities.append(identity)
        given += [os.fspath(raw)] * len(walked)
    chosen: dict[object, int] = {}  # identity -> index into found
    for index, (item, key) in enumerate(zip(found, identities, strict=True)):
        first = chosen.setdefault(key, index)
        if first != index and not _without_symlinks(found[first]) and _without_symlinks(item):
            chosen[key] = index
    kept = sorted(chosen.values())
    # Two inputs can hold the same relative name (a/x.png, b/x.png): then prefix with the input. Hard-linked
    # names count even when left out, so that this does not depend on which name of such a file was kept; a
    # path through a symlink that was left out does not (as before hard links counted).
    kept_set = set(kept)
    files_named: dict[str, set[object]] = {}
    for index, (item, key) in enumerate(zip(found, identities, strict=True)):
        if index in kept_set or _without_symlinks(item):
            files_named.setdefault(item.file, set()).add(key)
    prefix = any(len(files) > 1 for files in files_named.values())
    if duplicates is not None:
        duplicates += [str(item.path) for index, item in enumerate(found) if index not in kept_set]
    found, given = [found[i] for i in kept], [given[i] for i in kept]
    # Per input, not per file: a stat and two Paths for each of a million files were seconds.
    folder_prefix = {raw: f"{Path(raw).as_posix().rstrip('/')}/" if Path(raw).is_dir() else None for raw in set(given)}
    named = []
    for item, raw in zip(found, given, strict=True):
        prefix_of_input = folder_prefix[raw]
        prefixed = raw if prefix_of_input is None else prefix_of_input + item.file
        file, other = (prefixed, item.file) if prefix else (item.file, prefixed)
        named.append(InputFile(item.path, file, item.real, item.bytes, other if other != file else None, item.mtime_ns))
    return named


def sibling_stem(name: str, suffix_bytes: int) -> str:
    """`.NAME`: how the hidden files kept next to NAME begin (its lock, temporary copies, a bundle set aside),
    before a suffix of at most `suffix_bytes`.

    A name too long to take that suffix within the file system's limit keeps its start and gains a hash of
    the whole name, so every such file can still be made, and each name still has its own. Every name that
    fits keeps `.NAME` (as before this rule: an older edlight at work on the same output uses the same lock).
    """
    stem = f".{name}"
    room = NAME_MAX_BYTES - suffix_bytes
    if len(os.fsencode(stem)) <= room:
        return stem
    mark = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    while len(os.fsencode(stem + mark)) > room:
        stem = stem[:-1]
    return stem + mark


def mkdir_failure(folder: Path, exc: OSError) -> str:
    """Why `folder` could not be created: a file where it or a folder above it should be says so."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or folder.exists():
        return "a file, not a folder"
    return str(exc.strerror or exc)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a record says of the file it was written for, as read: size, SHA-256 and modification time.

    The size alone cannot tell two scans of one format and page size apart (uncompressed BMP or TIFF), nor
    a photo replaced by one of the same length; the digest can. The modification time spares a resume from
    reading again the images that have not been touched since their record."""

    size: int | None = None  # None: cannot be read (a broken symlink)
    sha256: Digest | None = None  # None: not a regular file, or a read that failed
    mtime_ns: int | None = None

    def fields(self) -> dict[str, Any]:
        """The record's fields for it."""
        return {"bytes": self.size, "sha256": None if self.sha256 is None else self.sha256.hex(), "mtime_ns": self.mtime_ns}


def file_fingerprint(path: Path) -> Fingerprint:
    """The Fingerprint of the file at `path` (symlinks followed). Only a regular file is opened, as the image
    loader opens only those (engine.images._check_path): a FIFO would wait for a writer, a device never end."""
    try:
        listed = os.stat(path)
    except OSError:
        return Fingerprint()
    if not stat.S_ISREG(listed.st_mode):
        return Fingerprint(listed.st_size)
    try:
        with open(path, "rb") as handle:
            opened = os.fstat(handle.fileno())  # the size and time of what is hashed, not of what was listed
            return Fingerprint(opened.st_size, hashlib.file_digest(handle, "sha256").digest(), opened.st_mtime_ns)
    except OSError:
        return Fingerprint(listed.st_size, None, listed.st_mtime_ns)


@contextlib.contextmanager
def fingerprinting() -> Iterator[Callable[[Path], Future[Fingerprint]]]:
    """A function that starts a file's fingerprint in a thread of its own, beside the model's run (hashing a
    photo takes milliseconds; the caller's thread and its items stay as they are). Fingerprints not yet
    started when the block ends (a stop) are dropped."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edlight-sha256")
    try:
        yield lambda path: pool.submit(file_fingerprint, path)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fingerprints(paths: list[Path]) -> list[Fingerprint]:
    """`file_fingerprint` of each path, several files at a time (on network storage reads wait on the
    network more than on this machine), a chunk at a time: a stop waits for one chunk, not for them all."""
    if len(paths) < 2:
        return [file_fingerprint(path) for path in paths]
    from concurrent.futures import ThreadPoolExecutor

    found: list[Fingerprint] = []
    with ThreadPoolExecutor(max_workers=min(8, len(paths)), thread_name_prefix="edlight-sha256") as pool:
        try:
            for start in range(0, len(paths), 256):
                found += pool.map(file_fingerprint, paths[start : start + 256])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return found


def _is_input_folder(raw: str | os.PathLike[str]) -> bool:
    """Whether the input `raw` is a folder (else a file, or a broken symlink, which becomes an error record).
    Raises FileNotFoundError when it does not exist or is empty (Path("") is the current folder: an unset
    variable must not caption it), OutputError when it cannot be looked at (a folder above it without
    permission, a name too long)."""
    if not os.fspath(raw):
        raise FileNotFoundError("an empty path was given as an input")
    try:
        os.lstat(raw)
        return stat.S_ISDIR(os.stat(raw).st_mode)
    except FileNotFoundError:
        if os.path.lexists(raw):
            return False  # a broken symlink
        raise FileNotFoundError(f"{os.fspath(raw)}: no such file or folder") from None
    except OSError as exc:
        if os.path.islink(raw):
            return False  # a symlink loop or one into a folder it may not enter: an error record, like a broken one
        raise OutputError(f"{os.fspath(raw)}: cannot access this input: {exc.strerror or exc}") from exc


def _without_symlinks(item: InputFile) -> bool:
    return item.real == os.path.abspath(item.path)


def _walk(
    folder: Path, ancestors: frozenset[tuple[int, int]], unreadable: list[str] | None, top: bool = False
) -> Iterator[tuple[Path, str, str | None]]:
    """Image files below `folder`, sorted by name, depth first, each as (path, its name relative to `folder`
    in POSIX form, its real path or None where only os.path.realpath can tell); `ancestors`: (device, inode)
    of the folders above it. A stack of listings, not recursion: a tree may be deeper than Python's recursion
    limit. The real path of a file that is not a symlink is its folder's, resolved once per folder, plus its
    name: os.path.realpath on each file checked every folder above it again."""

    Listing = tuple[Iterator[os.DirEntry[str]], frozenset[tuple[int, int]], str]
    real_folders: dict[str, str] = {}  # resolved at a folder's first image: one that holds none is never asked

    def listing(current: Path, above: frozenset[tuple[int, int]], is_top: bool, relative: str) -> Listing | None:
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in above:
                return None  # a symlink back up the tree
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            message = f"{current}: cannot list folder: {exc.strerror or exc}"
            if is_top or unreadable is None:  # an input folder that cannot be listed stops the job
                raise OutputError(message) from exc
            unreadable.append(message)
            return None
        return iter(entries), above | {(info.st_dev, info.st_ino)}, relative

    first = listing(folder, ancestors, top, "")
    stack = [first] if first is not None else []
    while stack:
        entries, inside, relative = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path = Path(entry.path)
        try:
            is_folder = entry.is_dir()  # follows symlinks
        except OSError:
            is_folder = False  # e.g. a symlink loop: kept if named like an image, to become an error record
        if is_folder:
            if is_system_folder(entry.name):
                continue
            below = listing(path, inside, False, f"{relative}{entry.name}/")
            if below is not None:
                stack.append(below)
        elif is_image_name(path) and not entry.name.startswith("."):
            try:
                if entry.is_symlink():
                    real = None
                else:
                    parent = os.path.dirname(entry.path)
                    if parent not in real_folders:
                        real_folders[parent] = os.path.realpath(parent)
                    real = os.path.join(real_folders[parent], entry.name)
            except OSError:  # no type from the file system and lstat failed, or the folder cannot be resolved
                real = None  # (a relative one in a deleted working folder): realpath on the file, as before
            yield path, relative + entry.name, real


# Folders that operating systems and file servers keep beside photos: thumbnails of every image (Synology's
# @eaDir holds three to five per photo), recycle bins and snapshots of deleted or older copies.
SYSTEM_FOLDERS = frozenset(
    name.casefold() for name in ("@eaDir", "#recycle", "#snapshot", "@Recycle", "$RECYCLE.BIN", "System Volume Information", "__MACOSX")
)


def is_system_folder(name: str) -> bool:
    """Whether a folder met in a walk is not the user's pictures: hidden ones (a `.thumbnails` cache, a
    `.Trash-1000`, a `.git`) and SYSTEM_FOLDERS. The walks of inputs and of data folders skip them, as they skip
    hidden files (Android's `.trashed-...` photos in its bin, `.pending-...` ones still being written, the `._`
    files macOS writes beside photos on USB sticks and shares); an input given by name is read whatever its name."""
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


class RecordWriter:
    """Appends records to a JSONL or CSV file, one physical line each, flushed per batch."""

    def __init__(self, out: Path, fmt: str, model: str | None = None, replace: bool = False) -> None:
        """`model`: stamped into every record (Bundle.captions_id: the bundle and non-default decoding).
        `replace`: start the file afresh, emptying it in place (its permissions, owner, hard links and the
        run's lock kept) when the first records are written, not before."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.out, self.fmt, self.model = out, fmt, model
        self._replace = replace
        self._again = "run it again without --overwrite" if replace else "run the same command again"
        self._named = Path(os.path.abspath(out))  # what `out` names now, whatever the working folder becomes
        self.fields: tuple[str, ...] = FIELDS
        self._handle: TextIO | None = None
        self._stream: TextIO | None = None  # this process's stdout or stderr, when `out` is its file
        self._regular = True
        self._written = 0  # the size the file must have at least: as opened, plus what this run appended
        self._newline = "\n"

    def __enter__(self) -> RecordWriter:
        folder = self.out.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create its folder {folder}: {mkdir_failure(folder, exc)}") from exc
        if str(self.out) in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1") and sys.stdout is None:
            # Python found descriptor 1 closed at start-up; by now a library may have opened another file
            # there (often /dev/null), which /dev/stdout would name.
            raise OutputError(f"{self.out}: this process's standard output is closed; give --out a file")
        try:
            # A stream (/dev/stdout, a pipe, a device) is never read back, truncated or synced.
            self._regular = not is_stream(self.out)
            # A file holding only blank lines (emptied with `echo > out`) is started as a new one: a CSV got
            # its rows after a blank line and without the header readers take the columns from.
            blank = self._regular and self.out.is_file() and _is_blank(self.out)
            fresh = not self._regular or not self.out.is_file() or blank
            self._replace = self._replace and not fresh  # else nothing to empty
            fresh = fresh or self._replace
            first = b"" if fresh else _first_line(self.out)
            if self.fmt == "csv" and (header := _columns(first.decode("utf-8", "replace"))) in CSV_HEADERS:
                self.fields = header  # appended rows keep the file's columns
            if first.endswith(b"\r\n"):
                self._newline = "\r\n"  # a file saved on Windows or by a spreadsheet keeps one kind of line end
            # Through Python's own stdout when that is the output: /dev/stdout opened anew has an offset
            # of its own, so with `> file 2>&1` the progress bar and summary overwrote the records.
            self._stream = None if self._regular else _python_stream(self.out)
            if self._stream is None:
                created = self._regular and not self.out.exists()
                self._handle = open(self.out, "a", encoding="utf-8", newline="")
                if blank:
                    self._handle.truncate(0)
                self._written = os.fstat(self._handle.fileno()).st_size
                if created:
                    self._lock_created()
        except OSError as exc:
            # A relative name (the default captions.jsonl) is said with its folder: the working folder of a
            # service or cron job is rarely the one its author had in mind.
            where = self.out if self.out.is_absolute() else f"{self.out} (in {self._named.parent})"
            hint = "; give --out a path this user may write" if exc.errno in NOT_WRITABLE_ERRNOS else ""
            raise OutputError(f"{where}: cannot write: {exc.strerror or exc}{hint}") from exc
        if fresh and self.fmt == "csv" and not self._replace:
            self._write(",".join(FIELDS) + "\n")
        return self

    def _lock_created(self) -> None:
        """Flock the output this writer has just created. `output_lock` flocks an output only if it exists
        when the run starts; a hard link made to a new one meanwhile has a lock file of another name, and a
        second run through it would append the same records. Raises OutputError if such a run holds it."""
        assert self._handle is not None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._handle.close()
            self._handle = None
            raise OutputError(f"{self.out}: another run is writing to it (through another name: a hard link)") from exc
        except OSError:
            pass  # a file system without locks: output_lock has said so

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._handle is None:
            return
        try:
            self._handle.close()
        except OSError as error:
            if exc_type is None:  # otherwise the write error on its way out already says it
                raise OutputError(f"{self.out}: cannot write: {error.strerror or error}") from error

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return  # nothing to write: an output to replace stays as it is
        lines = (format_record({**r, "model": self.model}, self.fmt, self.fields) for r in records)
        if self._newline != "\n":  # every record is one line ending in "\n" (format_record)
            lines = (line[:-1] + self._newline for line in lines)
        text = "".join(lines)
        if self._replace:
            self._empty()
            text = (",".join(FIELDS) + "\n" if self.fmt == "csv" else "") + text
        self._write(text)

    def _empty(self) -> None:
        """Empty the file for `replace`, once, just before its first records."""
        assert self._handle is not None
        try:
            self._handle.truncate(0)  # appends still go to the end: now 0
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot start afresh: {exc.strerror or exc}") from exc
        self._replace, self._written = False, 0

    def _write(self, text: str) -> None:
        try:
            if self._stream is not None:
                _write_through(self._stream, text)
                return
            assert self._handle is not None
            self._handle.write(text)
            self._handle.flush()
            if self._regular:
                os.fsync(self._handle.fileno())
                self._written += len(text.encode("utf-8"))
        except OSError as exc:
            then = ""
            if self._regular and exc.errno in FULL_DISK_ERRNOS:
                then = (f"; the records before are kept: make room and {self._again} to resume "
                        "(a record cut short is written again)")
            raise OutputError(f"{self.out}: cannot write: {exc.strerror or exc}{then}") from exc
        if self._regular:
            self._check_still_named()

    def _check_still_named(self) -> None:
        """Raise OutputError when `out` no longer holds what this run appended to it.

        Deleted, or replaced (an editor's save, `sed -i`, a `mv` over it): appends then go to a file no
        name reaches. Emptied or cut short (`> out`, `truncate`, a log rotation's copytruncate): earlier
        records are gone. Either way the run would report success with records lost. Checked after
        each batch.
        """
        assert self._handle is not None
        try:
            named = os.stat(self._named)
        except FileNotFoundError:
            named = None
        except OSError:
            return  # cannot tell (a folder gone unreadable): the next write says what is wrong
        try:
            mine = os.fstat(self._handle.fileno())
        except OSError:  # ESTALE: another NFS client deleted it
            mine = None
        if named is None or mine is None or (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            what = "deleted or replaced by another file"
        elif mine.st_size < self._written:
            what = "emptied or cut short"
        else:
            return
        raise OutputError(
            f"{self.out}: was {what} while this run wrote to it, so records are missing from it; "
            "run the same command again to caption the images it lacks"
        )


def _python_stream(out: Path) -> TextIO | None:
    """sys.stdout or sys.stderr when `out` names the file it writes to, else None."""
    return next((stream for stream in (sys.stdout, sys.stderr) if stream is not None and is_same_file(out, stream)), None)


def _write_through(stream: TextIO, text: str) -> None:
    """Write `text` to one of this process's own streams, in UTF-8 (as files are) whatever its encoding."""
    stream.flush()  # what was printed before comes first
    binary = getattr(stream, "buffer", None)
    if binary is None:
        stream.write(text)
        stream.flush()
    else:
        binary.write(text.encode("utf-8"))
        binary.flush()


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (surrogate escapes, see os.fsdecode) as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(name: str) -> str:
    """A file name as one line of a log or message: its line breaks as \\r and \\n, undecodable bytes as \\xNN."""
    return _printable(name).replace("\r", "\\r").replace("\n", "\\n")


def _csv_field(value: object) -> str:
    # Newlines inside a field would split a record over several lines and defeat torn-line repair.
    return " ".join(_printable(str(value)).splitlines())


def _csv_name(file: str) -> str:
    # A file name keeps its line breaks as \n, \r: written as spaces, "a\nb.png" and "a b.png" would clash.
    # Its own backslashes are doubled first, so that no two names meet in one escape: a name written
    # a\nb.png (backslash, n) and one with a line break, or \xff and the byte 0xff, stay apart.
    return one_line(file.replace("\\", "\\\\"))


def record_name(file: str, fmt: str) -> str:
    """The "file" of a record as `read_done` reads it back (how a rerun recognises a finished image)."""
    return file if fmt == "jsonl" else _csv_name(file)


def _first_line(path: Path) -> bytes:
    """The first line of `path` with its line end (at most 64 KiB: a caption file's header or first record)."""
    with open(path, "rb") as handle:
        return handle.readline(64 * 1024)


def _columns(line: str) -> tuple[str, ...]:
    """The names in a CSV header line, as a spreadsheet may also save it: quoted, after a UTF-8 BOM."""
    try:
        return tuple(next(csv.reader([line.removeprefix(BOM).rstrip("\r\n")]), []))
    except csv.Error:
        return ()


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


@dataclass(frozen=True, slots=True)
class _Line:
    """One line of an output as a resume reads it; not its bytes (a million records would hold the file
    several times over), but where it ends: lines follow each other, so a line is the bytes from the end
    of the one before."""

    end: int  # the file offset just past its newline
    file: str | None  # None for the CSV header and blank lines
    failed: bool = False
    model: str | None = None  # the model that wrote it (None: not said, as in records before the field)
    bytes: int | None = None  # the size of the file it was written for (None: not said)
    sha256: Digest | None = None  # that file's digest (raw: 65 bytes of memory where its hex takes 113; None: not said)
    mtime_ns: int | None = None  # that file's modification time (None: not said)


JSONL_START = '{"file": '  # how every JSONL record of ours begins (format_record)
BOM = "\ufeff"  # what Excel's "CSV UTF-8" and Windows PowerShell 5 put before the first line


def read_done(out: Path, fmt: str) -> dict[str, bool]:
    """Files that already have a record in `out` (-> True if that record is an error); reads only.

    Raises OutputError when it holds anything but records and a torn last line (not our file, or damaged).
    """
    return {line.file: line.failed for line in _read_lines(out, fmt, repair=False) if line.file is not None}


def _read_lines(out: Path, fmt: str, repair: bool = True) -> list[_Line]:
    """The records of `out`; with `repair`, a torn last line is cut off the file once every line before it
    has been read as a record. Raises OutputError, leaving the file as it was, for anything else."""
    if not out.is_file():
        return []  # nothing yet, or a device or pipe (/dev/stdout): nothing to resume
    lines: list[_Line] = []
    tail = b""  # bytes after the last newline: none, or a record a kill cut short
    end, columns, line_end = 0, len(FIELDS), b"\n"
    try:
        with open(out, "rb") as handle:
            for raw in handle:  # line by line: memory for what is kept of each record, not for the file
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                end += len(raw)
                lines.append(_parse_line(out, fmt, len(lines) + 1, raw[:-1], end, columns))
                if len(lines) == 1:
                    line_end = b"\r\n" if raw.endswith(b"\r\n") else b"\n"  # the file's own, for a newline added
                    if fmt == "csv" and raw.strip():  # the header: how many fields a row has
                        columns = len(_columns(raw.decode("utf-8", "replace")))
    except OSError as exc:
        raise OutputError(f"{out}: cannot read for resuming: {exc.strerror or exc}") from exc
    if tail and fmt == "jsonl" and (whole := _whole_record(out, len(lines) + 1, tail, end + len(line_end))) is not None:
        # A whole record that only lacks its newline (a file saved by hand or by '\n'.join): kept. A cut
        # record never parses: the brace that closes it is what is written last.
        if repair:
            try:
                with open(out, "ab") as handle:
                    handle.write(line_end)
            except OSError as exc:
                raise OutputError(f"{out}: cannot end its last record with a newline: {exc.strerror or exc}") from exc
        return [*lines, whole]
    if tail:
        if not _is_torn_record(tail, fmt, first_line=not lines):
            raise OutputError(
                f"{out}:{len(lines) + 1}: not a caption record (and not one cut short); "
                "fix the file, or start afresh with --overwrite"
            )
        if not repair:
            return lines
        try:
            with open(out, "r+b") as handle:
                handle.truncate(end)
        except OSError as exc:
            raise OutputError(f"{out}: cannot cut off its torn last line: {exc.strerror or exc}") from exc
        text = tail.rstrip(b"\x00")
        shown = text[:60].decode("utf-8", "replace") + ("..." if len(text) > 60 else "")
        if len(text) < len(tail):
            shown += f"{' then ' if text else ''}{len(tail) - len(text)} zero bytes"
        log.warning("%s: cut off its last line, a record whose writing was cut short (%d bytes: %s)", out, len(tail), shown)
    return lines


def _whole_record(out: Path, number: int, tail: bytes, end: int) -> _Line | None:
    """`tail` as a complete JSONL record, else None. `end`: where it ends once its line end is added (the
    file's own: "\r\n" in a file saved on Windows), without the tail itself."""
    try:
        line = _parse_line(out, "jsonl", number, tail, end + len(tail))
    except OutputError:
        return None
    return line if line.file is not None else None


def _parse_line(out: Path, fmt: str, number: int, raw: bytes, end: int, columns: int = len(FIELDS)) -> _Line:
    """One line of `out` as a record (`columns`: how many a CSV row has, as its header says)."""
    if not raw.strip():
        return _Line(end, None)
    try:
        text = raw.decode("utf-8")
        if number == 1:
            text = text.removeprefix(BOM)
        if fmt == "csv":
            if number == 1:
                if _columns(text) not in CSV_HEADERS:
                    raise ValueError(f"the first line is not the CSV header {','.join(FIELDS)}")
                return _Line(end, None)
            if text.count('"') % 2:
                raise ValueError("a quoted field runs on past the end of the line (a line break inside a cell, as a "
                                 "spreadsheet saves one); keep each record on one line")
            row = next(csv.reader([text]))
            if len(row) != columns:
                raise ValueError(f"{len(row)} fields where the header has {columns}")
            file, failed, model = row[0], len(row) > 2 and bool(row[2]), row[3] if len(row) > 3 and row[3] else None
            size: object = row[4] if len(row) > 4 and row[4] else None
            digest: object = row[5] if len(row) > 5 and row[5] else None
            mtime: object = row[6] if len(row) > 6 and row[6] else None
        else:
            record = json.loads(text)
            if not _is_jsonl_record(record):
                raise ValueError('a JSON line without "file" and a "caption" or "error"')
            file, failed, model, size = record["file"], record.get("error") is not None, record.get("model"), record.get("bytes")
            digest, mtime = record.get("sha256"), record.get("mtime_ns")
        size = None if size is None else _whole_number(size, "bytes")
        mtime = None if mtime is None else _whole_number(mtime, "mtime_ns")
        if digest is not None and not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
            raise ValueError(f"sha256 is {digest!r}, not 64 hexadecimal digits")
    except (
        UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, StopIteration,
        OverflowError, RecursionError, csv.Error,  # 1e400 bytes, JSON nested beyond the parser, a huge CSV field
    ) as exc:  # fmt: skip
        # The first line says whose file this is: another format's, ours damaged, or not a caption file.
        other = _caption_format(raw) if number == 1 else fmt
        if other not in (None, fmt):
            raise OutputError(f"{out}: a {other.upper()} caption file, not {fmt.upper()}: caption into it with --format {other}") from exc
        # A damaged caption file may be started afresh; anything else is not ours to replace.
        ours = other == fmt
        remedy = "fix the file, or start afresh with --overwrite" if ours else "choose another output"
        raise OutputError(f"{out}:{number}: not a caption record ({exc}); {remedy}") from exc
    return _Line(end, str(file), failed, None if model is None else sys.intern(str(model)), size,  # few models
                 None if digest is None else bytes.fromhex(digest), mtime)


def _whole_number(value: object, name: str) -> int:
    """A record's byte count or time: an integer, also as a whole float (46135.0: a spreadsheet's or pandas'
    copy; a time in nanoseconds as a float is not exact, and then only ever costs a read of the file)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):  # int(10.7) is 10
        raise ValueError(f"{name} is {value!r}, not a whole number")
    try:
        return int(value)  # type: ignore[call-overload]
    except ValueError:
        number = float(value)  # type: ignore[arg-type]
        if not number.is_integer():
            raise
        return int(number)


def _caption_format(first_line: bytes) -> str | None:
    """The format of the caption file `first_line` starts ("jsonl": a record, "csv": our header), else None."""
    text = first_line.decode("utf-8", "replace").removeprefix(BOM)
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            # A record of ours, damaged (by hand, or re-spaced by a JSON tool): fixed or started afresh, not refused.
            return "jsonl" if re.match(r'\{\s*"file"\s*:', text) else None
        return "jsonl" if _is_jsonl_record(record) else None
    return "csv" if _columns(text) in CSV_HEADERS else None


def _is_jsonl_record(record: object) -> bool:
    """Every record this tool writes has "file", "caption" and "error"; a tool that drops null fields (Spark's
    JSON writer) keeps "file" and one of the others. A JSON line with only a "file" (a labelling tool's export,
    a manifest) is someone else's: never images to skip as captioned, nor a file for --overwrite to empty."""
    return isinstance(record, dict) and "file" in record and ("caption" in record or "error" in record)


def _is_torn_record(tail: bytes, fmt: str, first_line: bool) -> bool:
    """Whether `tail` (after the last newline) can be the start of a record whose write was cut short.

    Zero bytes at its end are what a crash leaves of appends whose data never reached the disk (the file's
    size was, as XFS and ext4 can after a power loss): the cut record, if any, is what comes before them."""
    tail = tail.rstrip(b"\x00")
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
    if first_line:
        text = text.removeprefix(BOM)
    if fmt == "jsonl":
        with contextlib.suppress(ValueError, RecursionError):
            # Whole: someone else's line, not a record cut short; or ours before the zeros (its newline lost).
            return _is_jsonl_record(json.loads(text))
        return text.startswith(JSONL_START) or JSONL_START.startswith(text)
    if first_line:
        return any(",".join(header).startswith(text) for header in CSV_HEADERS)
    return True  # after the header, any text can start a row


def _drop_lines(out: Path, lines: list[_Line], files: set[str]) -> None:
    """Rewrite `out` without the records of `files` (atomically: a kill leaves the old file or the new).

    Where the file cannot be replaced, the records stay: the retries' records follow them, and the later
    record of a file is the one a resume reads. So in a folder where no new file may be made, for a file
    with other hard links (a new file would leave them holding the old records), for a file mounted on its
    own (a container's single-file volume: no rename may replace a mount point), for another user's
    file in a sticky folder, and on a disk without room for the copy (the retries' records may still fit).
    """

    def records_stay(why: str) -> None:
        log.warning(
            "%s: %s, so the output is not rewritten without the earlier records (errors, or of changed files) of "
            "the %d image(s) captioned again: they stay, and each image's later record is the one that counts",
            out, why, len(files),
        )

    def cannot_rewrite(exc: OSError, not_writable: str) -> None:
        """Records stay where no copy may be written (`not_writable`: why, in this place) or fit; else the error."""
        if exc.errno in NOT_WRITABLE_ERRNOS:
            return records_stay(not_writable)
        if exc.errno in FULL_DISK_ERRNOS:  # the copy needs as much room again as the file: the appends may fit
            return records_stay(f"there is no room for a rewritten copy ({exc.strerror})")
        raise OutputError(f"{out}: cannot drop the error records of images to retry: {exc.strerror or exc}") from exc

    with contextlib.suppress(OSError):
        if os.stat(out).st_nlink > 1:
            return records_stay("it has other hard links")
    temporary = out.with_name(f"{sibling_stem(out.name, REWRITE_SUFFIX_BYTES)}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()  # a kill's leftover of this pid, or a link planted there: "x" never opens through it
        handle = open(temporary, "xb")
    except OSError as exc:
        return cannot_rewrite(exc, "its folder takes no new file")
    try:
        with handle, open(out, "rb") as source:  # the lines as read: the lock kept anyone else from writing
            start = 0
            for line in lines:
                raw = source.read(line.end - start)
                if len(raw) != line.end - start:  # cut short since it was read (a file system without locks)
                    raise OSError(errno.EIO, "the file changed while the records were being dropped; it was left as it was")
                if line.file is None or line.file not in files:
                    handle.write(raw)
                start = line.end
            handle.flush()
            os.fsync(handle.fileno())
        _take_owner_and_mode(temporary, out)
        os.replace(temporary, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if exc.errno in (errno.EBUSY, errno.EXDEV):  # `out` is a mount point (Docker's -v file:file, a subPath)
            return records_stay("it is mounted on its own and cannot be replaced")
        # Not writable here: a sticky folder (/tmp, 1777), where only its owner may replace it.
        return cannot_rewrite(exc, "this user may not replace it in its folder (a sticky folder's file of another user)")


def _take_owner_and_mode(copy: Path, original: Path) -> None:
    """Give a rewritten copy the original's permissions, owner and group before it replaces it (as far as this
    user may: a shared folder's group kept, so the team can still resume the file)."""
    try:
        info = original.stat()
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.chmod(copy, info.st_mode & 0o7777)
    if hasattr(os, "chown"):
        try:
            os.chown(copy, info.st_uid, info.st_gid)
        except OSError:
            # Only root may give a file away: a teammate's rewrite keeps the group at least (a member may set
            # it), and the mode that lets the owner, through it, write the file again.
            with contextlib.suppress(OSError):
                os.chown(copy, -1, info.st_gid)
        with contextlib.suppress(OSError):
            os.chmod(copy, info.st_mode & 0o7777)  # chown clears setuid/setgid bits


# Descriptors of the locks output_lock holds. A child forked meanwhile (a DataLoader's worker, multiprocessing's
# fork) holds copies, which keep the lock after the run is killed, until the child notices (seconds): an
# immediate resume was refused, naming the dead run. The child's copies are closed (the parent's lock stays).
_held_locks: set[int] = set()


def _drop_held_locks_in_child() -> None:
    for descriptor in _held_locks:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks_in_child)


@contextlib.contextmanager
def output_lock(out: Path, elsewhere: str = "choose another output") -> Iterator[None]:
    """Hold `.NAME.lock` next to `out` (an exclusive flock) while a run reads and writes `out`.

    Raises OutputError at once if another run holds it: two runs appending to one file would
    caption everything twice. The lock file is removed afterwards; a killed run's lock is released
    by the kernel, so a stale file never blocks anyone who may open it (another user's that only they
    may read is refused with their name: whether their run still holds it cannot be told). In a folder
    where no file may be made, the output itself is locked (no rewrite can happen there either); on a
    file system without locks (NFS without lockd, some FUSE mounts) the run goes on unlocked, with a warning.
    `elsewhere` ends the message of a held lock: how to run without waiting ("choose another output").
    """
    if fcntl is None or is_stream(out):
        yield
        return
    out = output_target(out)  # a symlinked output is locked where the records go
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # RecordWriter says why the folder cannot be made
        return
    lock = out.with_name(f"{sibling_stem(out.name, len('.lock'))}.lock")
    in_place = not lock.exists() and not os.access(folder, os.W_OK)
    if in_place and not out.is_file():
        yield  # nothing to lock, and RecordWriter cannot create the output there: it says so
        return
    handle = _flock(out, out, elsewhere, in_place=True) if in_place else _flock_lock_file(lock, out, elsewhere)
    # The output itself too, when it exists: a hard link to it has a lock file of another name, yet the
    # same records (flock belongs to the file, whatever name opened it).
    itself = None
    if handle is not None and not in_place and out.is_file():
        try:
            itself = _flock_output(out, elsewhere)
        except OutputError:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(handle)
            raise
    held, owner = {d for d in (handle, itself) if d is not None}, os.getpid()
    _held_locks.update(held)
    try:
        yield
    finally:
        _held_locks.difference_update(held)
        # A forked child leaving the block has its copies closed already; the lock and its file are the parent's.
        if os.getpid() == owner:
            if itself is not None:
                os.close(itself)
            if handle is not None:
                if not in_place:
                    with contextlib.suppress(OSError):
                        os.unlink(lock)
                os.close(handle)


def _held_here(handle: int) -> bool:
    """Whether this process holds a lock on the file `handle` is open on (through any descriptor)."""
    try:
        file = os.fstat(handle)
        return any(
            (held.st_dev, held.st_ino) == (file.st_dev, file.st_ino) for held in map(os.fstat, list(_held_locks))
        )
    except OSError:
        return False


def _flock_lock_file(lock: Path, out: Path, elsewhere: str) -> int | None:
    """An open, flocked descriptor of `lock` holding this process's pid (None: no locks on this file system)."""
    while True:
        handle = _flock(lock, out, elsewhere)
        if handle is None:
            return None
        # The holder before us may have removed the file between our open and our lock: lock the file
        # that is there now, or two runs could each hold a lock on a different file.
        try:
            current, mine = os.stat(lock), os.fstat(handle)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except OSError:
            pass
        os.close(handle)
    with contextlib.suppress(OSError):  # a lock file of another user's, opened read-only: no pid then
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode("ascii"))
    return handle


def _flock_output(out: Path, elsewhere: str) -> int | None:
    """The output file itself flocked, beside its lock file (a hard link has a lock file of another name).
    None, quietly, where it cannot be: a file this user may not open (plan_folder_job says what is wrong
    with it), or NFS, whose emulated flock wants a descriptor open for writing (the lock file holds anyway).
    Raises OutputError when another run holds it."""
    assert fcntl is not None
    try:
        handle = os.open(out, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(handle)
        raise OutputError(f"{out}: another run is writing to it; wait for it to end or {elsewhere}") from exc
    except OSError:
        os.close(handle)
        return None
    return handle


def _flock(path: Path, out: Path, elsewhere: str, in_place: bool = False) -> int | None:
    """`path` opened (created if it is a lock file) and exclusively flocked; None when the file system has
    no locks. Raises OutputError when another run holds it."""
    assert fcntl is not None
    try:
        if in_place:
            handle = os.open(path, os.O_RDONLY)
        else:
            # Never through a symbolic link: the pid written would truncate what it points to (in a shared
            # folder, anyone's file).
            # O_NONBLOCK: a FIFO planted there would block a read-only open until a writer came.
            flags = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
            except PermissionError:
                handle = os.open(path, os.O_RDONLY | flags)  # another user's lock file: flock needs no write access
            if not stat.S_ISREG(os.fstat(handle).st_mode):
                os.close(handle)
                raise OSError(errno.EINVAL, "it is not a regular file; remove it")
    except OSError as exc:
        if exc.errno == errno.ELOOP and not in_place:
            raise OutputError(f"{out}: its lock file {path} is a symbolic link, which this tool never makes; "
                              "remove it") from exc
        owner = _other_owner(path) if isinstance(exc, PermissionError) and not in_place else None
        if owner is not None:  # unreadable to us (their umask 077): whether their run holds it cannot be told
            raise OutputError(
                f"{out}: cannot open its lock file {path}: it belongs to {owner} and only they may read it; "
                f"if no run of theirs is writing the output, remove the lock file (or ask them to)"
            ) from exc
        raise OutputError(f"{out}: cannot open its lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = "" if in_place else os.pread(handle, 32, 0).decode("ascii", "replace").strip()
        # Held here: a caption_folder of this program, in another thread or one it is inside of. Told by the
        # file, not the pid written in it: two containers sharing a volume both run as pid 1.
        here = _held_here(handle)
        os.close(handle)
        who = "another run in this process" if here else f"another run{f' (pid {holder})' if holder else ''}"
        raise OutputError(f"{out}: {who} is writing to it; wait for it to end or {elsewhere}") from exc
    except OSError as exc:
        os.close(handle)
        log.warning("%s: the file system does not lock files (%s); make sure no other run writes it", out, exc.strerror or exc)
        return None
    return handle


def _on_read_only_mount(path: Path) -> bool:
    """Whether `path` lies on a file system mounted read-only (where no chmod can make it writable)."""
    try:
        return bool(os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 0))
    except (OSError, AttributeError):  # no statvfs on Windows
        return False


def _other_owner(path: Path) -> str | None:
    """The name (else uid) of the user owning `path` when it is not this process's user; else None."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):
        return f"user id {uid}"


def is_stream(out: Path) -> bool:
    """Whether `out` is written as a stream: stdout ("-", /dev/stdout, /dev/fd/N ...), a pipe or a device."""
    if STREAM_PATH.fullmatch(str(out)):
        return True
    try:
        return not stat.S_ISREG(os.stat(out).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False  # not there yet (RecordWriter says why if it cannot be made)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise OutputError(f"{out}: cannot access the output: {exc.strerror or exc}") from exc


def output_target(out: Path) -> Path:
    """Where the records of `out` really go: symlinks resolved (streams as they are)."""
    return out if is_stream(out) else Path(os.path.realpath(out))


def check_report_out(out: Path, what: str, is_ours: Callable[[str], bool] | None = None) -> None:
    """Raise OutputError unless `what` (predictions, a parity report) can be written to `out`: "-" (stdout), a
    stream, or a file in a folder that exists or can be made and is writable. Checked before the work that
    makes it. `is_ours(its first MB of text)`: an existing file must pass it to be replaced (a data set's
    metadata, an image, a bundle's manifest must not be)."""
    try:
        _check_report_out(out, what, is_ours)
    except OSError as exc:  # a name too long for the file system, a folder above it that cannot be searched
        raise OutputError(f"{out}: cannot write {what} there ({exc.strerror or exc})") from exc


def _check_report_out(out: Path, what: str, is_ours: Callable[[str], bool] | None) -> None:
    out = _stdout_if_dash(out)
    if out.is_dir():
        raise OutputError(f"{out}: a folder; give a file name for {what}")
    if is_stream(out):
        return
    target = output_target(out)
    if is_ours is not None and target.is_file() and target.stat().st_size:
        try:
            with open(target, "rb") as handle:
                head = handle.read(1 << 20).decode("utf-8", "replace")
        except OSError as exc:
            raise OutputError(f"{out}: cannot read it to check that it holds {what}: {exc.strerror or exc}") from exc
        if not is_ours(head):
            raise OutputError(f"{out}: exists and does not hold {what} (a data set's metadata, an image, another file); choose another --out")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create its folder {target.parent}: {mkdir_failure(target.parent, exc)}") from exc
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{out}: cannot write {what} there (permission denied or a read-only file system)")


def json_keys(text: str) -> list[str]:
    """The keys of the JSON object `text` holds, in order ([] for anything else): for `check_report_out`'s
    `is_ours` tests of reports written as JSON."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return list(value) if isinstance(value, dict) else []


def write_report(out: Path, text: str) -> None:
    """Write `text` to `out` whole or not at all (a full disk or a kill leaves the old file): a file, or the
    one a symlink points to, is replaced atomically and keeps its mode; a stream is appended to (this
    process's stdout or stderr through Python's own, so nothing printed before or after is overwritten)."""
    out = _stdout_if_dash(out)
    try:
        if (stream := _python_stream(out)) is not None:
            _write_through(stream, text)
            return
        if is_stream(out):
            with open(out, "a", encoding="utf-8") as handle:  # "w" would empty a file behind /dev/fd/N
                handle.write(text)
            return
        target = output_target(out)
        # A new name every time, created exclusively: never an existing file or a symlink planted there.
        temporary = target.with_name(f"{sibling_stem(target.name, REPORT_SUFFIX_BYTES)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as handle:
                handle.write(text)
            _take_owner_and_mode(temporary, target)
            try:
                os.replace(temporary, target)
            except PermissionError:
                # e.g. someone else's file in a sticky folder (/tmp): not replaceable, but writable in place.
                if not os.access(target, os.W_OK):
                    raise
                target.write_text(text, encoding="utf-8")
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write: {exc.strerror or exc}") from exc


def _stdout_if_dash(out: Path) -> Path:
    return Path("/dev/stdout") if os.fspath(out) == "-" else out


def is_same_file(path: Path, stream: Any) -> bool:
    """Whether `path` names the file an open `stream` writes to ("/dev/stdout" for sys.stdout, its file by name)."""
    try:
        named, opened = os.stat(path), os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no such file yet, or no real file behind the stream
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def default_output(fmt: str) -> Path:
    return Path("captions.jsonl" if fmt == "jsonl" else "captions.csv")


def resolve_format(fmt: str | None, out: str | os.PathLike[str] | None) -> str:
    """The output format: `fmt` when given, else csv for an --out ending in .csv, else jsonl."""
    if fmt is not None:
        return fmt
    return "csv" if out is not None and Path(out).suffix.lower() == ".csv" else "jsonl"


Inputs = Iterable[str | os.PathLike[str]] | str | os.PathLike[str]


def plan_folder_job(
    inputs: Inputs,
    out: str | os.PathLike[str] | None = None,
    fmt: str = "jsonl",
    overwrite: bool = False,
    model: str | None = None,
    recaption_changed: bool = False,
) -> tuple[list[InputFile], FolderSummary]:
    """The resume rule, shared by local and Ray runs: (images still to caption, summary so far).

    `overwrite` ignores the records in `out` (only a caption file: anything else is refused), which the run's
    RecordWriter(replace=True) empties at its first record; otherwise images
    already captioned in `out` are skipped, images whose record there is an error are tried again
    (those records are dropped from `out` first) and its torn last line is cut off. A symlinked `out`
    is the file it points to; a stream (stdout, a pipe) is only written. The output itself is never an
    input: found in an input folder it is left out, given as an input file it is refused. `model` (the
    bundle's captions_id) must be the model of every record in `out` that names one. An image that is not
    the file its record was written for (another size or SHA-256, read where its modification time is not
    the record's) is refused (see `_refuse_other_files`), or with `recaption_changed` captioned again, its old
    record dropped. Callers hold
    `output_lock(out)` from here until their last write (see `folder_job`). Raises ValueError for an
    unknown format, FileNotFoundError for a missing input, OutputError for an output file that is not
    a caption file, is an input file, or holds another model's captions.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    inputs = _as_list(inputs)
    out_path = output_path(out, fmt)
    stream = is_stream(out_path)
    target = output_target(out_path)
    unreadable: list[str] = []
    duplicates: list[str] = []
    files = collect_inputs(inputs, unreadable, duplicates)
    if not stream:
        if any(os.path.realpath(raw) == str(target) for raw in inputs):
            raise OutputError(f"{out_path}: the output file is one of the input images; choose another output")
        if target.is_file() and any(f.real == str(target) for f in files) and not _is_caption_file(target):
            raise OutputError(f"{out_path}: the output file is one of the images in an input folder; choose another output")
        files = [f for f in files if f.real != str(target)]  # an earlier run's output inside an input folder
        stem = sibling_stem(target.name, REWRITE_SUFFIX_BYTES)
        for stale in target.parent.glob(f"{glob.escape(stem)}.*.tmp"):  # a rewrite a kill cut short
            if re.fullmatch(rf"{re.escape(stem)}\.\d+\.tmp", stale.name):  # not another output's
                with contextlib.suppress(OSError):
                    stale.unlink()
    if not stream and target.is_file() and not os.access(target, os.W_OK):
        # Before anything rewrites or replaces it (a torn line cut off, error records dropped for a retry,
        # --overwrite): a file made read-only, or another user's, is kept as it is.
        if _on_read_only_mount(target):
            raise OutputError(f"{out_path}: cannot write: it is on a file system mounted read-only; choose an output "
                              "on a writable one")
        owner = _other_owner(target)
        why = f"it belongs to {owner}, and this user may not write it" if owner else "the file is read-only; make it writable"
        raise OutputError(f"{out_path}: cannot write: {why} (or choose another output)")
    if overwrite and not stream and target.is_file() and not _is_caption_file(target):
        raise OutputError(
            f"{out_path}: not a caption file (its first line is not a caption record); --overwrite replaces "
            "only caption files: choose another output, or remove it yourself"
        )
    # With `overwrite` the earlier records count for nothing, but RecordWriter(replace=True) empties the file
    # only when it writes the first record: a run with no image to caption (a share not mounted) or stopped
    # before its first batch leaves the earlier run's records as they were.
    lines = [] if stream or overwrite else _read_lines(target, fmt)
    others = sorted({line.model for line in lines if line.model is not None} - {model}) if model else []
    if others:
        raise OutputError(
            f"{out_path}: holds captions of another model or decoding settings ({', '.join(others)}; this run is "
            f"{model}); choose another output, or --overwrite to replace them"
        )
    records = {line.file: line for line in lines if line.file is not None}  # a file's later record counts
    done = {file: line.failed for file, line in records.items()}
    taken = {record_name(f.file, fmt) for f in files}
    names = {f.file: _resumed_name(f.file, fmt, done, taken) for f in files}
    current = set(names.values())  # another input's name is no other name (a/x.png beside a/a/x.png)
    _refuse_renamed(out_path, records, [
        (f, other) for f in files
        if names[f.file] not in records and f.other_name is not None
        and (other := _resumed_name(f.other_name, fmt, done, taken)) in records and other not in current
    ])
    _refuse_respelled(out_path, _respelled(files, names, records, current, fmt))
    _refuse_rescoped(out_path, _rescoped(files, names, records, current))
    changed = _changed_files([(f, records[names[f.file]]) for f in files if names[f.file] in records])
    if changed and not recaption_changed:
        _refuse_other_files(out_path, changed)
    retry = {names[f.file] for f in files if done.get(names[f.file])} | {names[f.file] for f, _ in changed}
    if retry:
        _drop_lines(target, lines, retry)
    todo = [f for f in files if names[f.file] not in done or names[f.file] in retry]
    summary = FolderSummary(
        total=len(files), skipped=len(files) - len(todo), captioned=0, failed=0, seconds=0.0, out=out_path,
        retried=len(retry) - len(changed), changed=len(changed), unreadable=unreadable, duplicates=duplicates,
        unlisted=sum(1 for name in records if name not in current),
    )
    return todo, summary


def _refuse_renamed(out: Path, records: dict[str, _Line], renamed: list[tuple[InputFile, str]]) -> None:
    """Raise OutputError if `out` holds records of these inputs under their other name (see collect_inputs),
    given as (input, the record's name).

    Adding or removing an input folder whose images share names with another's switches the names
    between `x.png` and `folder/x.png`; resuming then would caption everything again under new names.
    """
    claims: dict[str, list[InputFile]] = {}  # one record may be the other name of several inputs (A/x, B/x)
    for f, name in renamed:
        claims.setdefault(name, []).append(f)
    if claims:
        shown = []
        for name, inputs in list(claims.items())[:3]:
            sized = [f for f in inputs if f.bytes is not None and f.bytes == records[name].bytes]
            shown.append(f"{name!r} (now {' or '.join(repr(f.file) for f in sized or inputs)})")
        raise OutputError(
            f"{out}: holds records of {len(claims)} of these images under other names: {', '.join(shown)}. Names are "
            "relative to their input folder, prefixed with the folder when two inputs hold the same names: "
            "resume with the inputs that wrote it, or caption into another output"
        )


def _respelled(
    files: list[InputFile], names: dict[str, str], records: dict[str, _Line], current: set[str], fmt: str
) -> list[tuple[InputFile, str]]:
    """Inputs with no record under their name that have one under another spelling of their input folder:
    the same path below the input, after a prefix naming the same folder otherwise (`A/x.png` beside
    `/data/A/x.png`: relative and absolute, as a cron job and a manual rerun give them), for a file of the
    same size. Told from the names and sizes alone: the working folder an old name was relative to is unknown."""
    missing: dict[str, list[InputFile]] = {}  # record name below its input -> inputs
    for f in files:
        if names[f.file] not in records:
            missing.setdefault(record_name(_below_input(f), fmt), []).append(f)
    found: dict[str, tuple[InputFile, str]] = {}
    for name, line in records.items() if missing else ():
        if name in current or line.bytes is None:
            continue
        cut = name.find("/")
        while cut != -1:
            tail = name[cut + 1 :]
            for f in missing.get(tail, ()):
                now = names[f.file]
                prefix = now[: len(now) - len(tail) - 1] if now.endswith("/" + tail) else ""  # "": not prefixed
                if f.bytes == line.bytes and _same_folder_otherwise(name[:cut], prefix):
                    found.setdefault(f.file, (f, name))
            cut = name.find("/", cut + 1)
    return list(found.values())


def _below_input(f: InputFile) -> str:
    """The record name of `f` without its input's prefix (whichever naming rule the run uses)."""
    return f.other_name if f.other_name is not None and f.file.endswith("/" + f.other_name) else f.file


def _same_folder_otherwise(old: str, new: str) -> bool:
    """Whether two input prefixes look like one folder spelled two ways: one ends with the other."""
    old, new = old.rstrip("/"), new.rstrip("/")
    return old != new and bool(old) and bool(new) and (old.endswith("/" + new) or new.endswith("/" + old))


def _refuse_respelled(out: Path, respelled: list[tuple[InputFile, str]]) -> None:
    """Raise OutputError for `_respelled`: captioning them would give the output two records per image."""
    if respelled:
        shown = ", ".join(f"{old!r} (now {f.file!r})" for f, old in respelled[:3])
        raise OutputError(
            f"{out}: holds records of {len(respelled)} of these images under another spelling of their paths: "
            f"{shown}. Record names start with the inputs as given: resume with the inputs spelled as before, "
            "or caption into another output"
        )


def _rescoped(
    files: list[InputFile], names: dict[str, str], records: dict[str, _Line], current: set[str]
) -> tuple[int, list[tuple[InputFile, str]]]:
    """(how many, examples) of the inputs recorded under a name relative to a folder above or below their
    input's, when they are most of the inputs or of the records: `x.png` for `2024/x.png` when `photos/2024`
    was captioned before and now `photos` is (or the other way round, or the folder's files one by one).
    Told by the path below the shorter name and the size, confirmed by the SHA-256 records hold: at most
    RESCOPE_SAMPLE of those inputs are read. A few files moved into or out of a subfolder, or a copy of
    another run's photo, are not most: captioned under their names as any new file."""
    missing = {names[f.file]: f for f in files if names[f.file] not in records}
    candidates: dict[str, tuple[InputFile, str]] = {}  # one per input
    for name, line in records.items() if missing else ():
        if name in current or line.bytes is None:
            continue
        cut = name.find("/")
        while cut != -1:  # the record's name is longer: the input folder is now one below
            if (f := missing.get(name[cut + 1 :])) is not None and f.bytes == line.bytes:
                candidates.setdefault(f.file, (f, name))
            cut = name.find("/", cut + 1)
    for now, f in missing.items():
        cut = now.find("/") if f.bytes is not None else -1
        while cut != -1:  # the input's name is longer: the input folder is now one above
            held = records.get(old := now[cut + 1 :])
            if held is not None and old not in current and f.bytes == held.bytes:
                candidates.setdefault(f.file, (f, old))
            cut = now.find("/", cut + 1)
    if 2 * len(candidates) <= min(len(files), len(records)):
        return 0, []
    pairs = list(candidates.values())
    hashed = [pair for pair in pairs if records[pair[1]].sha256 is not None]
    sample = hashed[:: max(1, -(-len(hashed) // RESCOPE_SAMPLE))]  # spread over the inputs
    read = _fingerprints([f.path for f, _ in sample])
    same = [pair for pair, got in zip(sample, read, strict=True) if got.sha256 == records[pair[1]].sha256]
    if sample and 2 * len(same) <= len(sample):  # same names and sizes, other files (scans of one size)
        return 0, []
    unread = [pair for pair in pairs if records[pair[1]].sha256 is None]
    return len(pairs), (same + unread)[:3]


RESCOPE_SAMPLE = 64


def _refuse_rescoped(out: Path, rescoped: tuple[int, list[tuple[InputFile, str]]]) -> None:
    """Raise OutputError for `_rescoped`: captioning them would give the output two records per image."""
    count, examples = rescoped
    if count:
        shown = ", ".join(f"{old!r} (now {f.file!r})" for f, old in examples)
        raise OutputError(
            f"{out}: holds records of {count} of these images under names relative to another folder: "
            f"{shown}. Record names are relative to the input folders given, so a folder above or below the "
            "earlier run's would caption them again under new names: resume with the inputs that wrote it, "
            "or caption into another output"
        )


def _changed_files(resumed: list[tuple[InputFile, _Line]]) -> list[tuple[InputFile, str]]:
    """The inputs whose caption in the output was written for another file, with how it differs: another
    size, or else another SHA-256. A file is read to tell only when its modification time is not the
    record's (a copy with a new date is read, and resumes); the size costs nothing.

    Names are relative to their input folder, so two folders' images can share one; a replaced or
    re-tagged photo keeps its name too. Error records are retried anyway; what a record does not say
    (written before records had a size or a digest) is trusted.
    """
    changed: list[tuple[InputFile, str]] = []
    unsure: list[tuple[InputFile, _Line]] = []
    for f, line in resumed:
        if line.failed or f.bytes is None:
            continue
        if line.bytes is not None and line.bytes != f.bytes:
            changed.append((f, f"{line.bytes} bytes there, {f.path} has {f.bytes}"))
        elif line.sha256 is not None and (line.mtime_ns is None or line.mtime_ns != f.mtime_ns):
            unsure.append((f, line))
    for (f, line), now in zip(unsure, _fingerprints([f.path for f, _ in unsure]), strict=True):
        if now.sha256 is not None and now.sha256 != line.sha256:
            assert line.sha256 is not None
            same = "the same size, " if line.bytes == now.size else ""
            changed.append((f, f"SHA-256 {line.sha256.hex()[:12]}... there, {f.path} has {now.sha256.hex()[:12]}... "
                               f"({same}{now.size} bytes)"))
    return changed


def _refuse_other_files(out: Path, other: list[tuple[InputFile, str]]) -> None:
    """Raise OutputError for `_changed_files`: skipping them would keep captions of other images, and
    captioning them would replace captions that may belong to another folder's images of those names."""
    shown = "; ".join(f"{f.file!r}: {why}" for f, why in other[:3])
    more = f"; and {len(other) - 3} more" if len(other) > 3 else ""
    raise OutputError(
        f"{out}: {len(other)} of its captions were written for other files of the same names ({shown}{more}). "
        "Images of the same names from another folder: caption them into another output. Images replaced "
        "or edited since: --recaption-changed captions them again and replaces their records"
    )


def _as_list(inputs: Inputs) -> list[str | os.PathLike[str]]:
    """`inputs` as a list of paths; a path given as bytes (as os.listdir(b".") gives them) is decoded as
    Python decodes file names. Raises TypeError for anything that is not a path or an iterable of paths."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    elif not isinstance(inputs, Iterable):
        raise TypeError(f"inputs: expected a path or a list of paths, got {type(inputs).__name__}")
    paths = [os.fsdecode(item) if isinstance(item, bytes) else item for item in inputs]
    for item in paths:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"inputs: expected paths, got {type(item).__name__} ({item!r})")
    return paths


def _resumed_name(file: str, fmt: str, done: dict[str, bool], taken: set[str]) -> str:
    """The name under which `file` has (or will have) its record in an output holding `done`. `taken`: the
    record names of this run's inputs, which an older spelling of another name must not claim."""
    name = record_name(file, fmt)
    if fmt == "csv" and name not in done:
        printable = _printable(file)
        # How CSV files of earlier versions wrote it: its backslashes single (before they were doubled), or
        # its line breaks as spaces (before names kept them). Neither may be another file's record: a
        # single-backslash spelling that reads as this version's escapes ("a\\nb.png" is the current name of
        # "a<line break>b.png") is never taken, nor a spelling that is an input's current name.
        single = one_line(file)
        legacies = [] if CURRENT_CSV_NAME.fullmatch(single) else [single]
        spaced = " ".join(printable.splitlines())
        if spaced != printable:  # only a name with line breaks was ever written with spaces for them
            legacies.append(spaced)
        for legacy in legacies:
            if legacy != name and legacy in done and legacy not in taken:
                return legacy
    return name


@contextlib.contextmanager
def folder_job(
    inputs: Inputs, out: str | os.PathLike[str] | None, fmt: str, overwrite: bool, model: str | None,
    recaption_changed: bool = False,
) -> Iterator[tuple[list[InputFile], FolderSummary]]:
    """`plan_folder_job` under the output's lock, held until the block ends (the last record written)."""
    inputs = _as_list(inputs)  # read once: a generator of inputs is walked here and planned below
    target = output_path(out, fmt)
    _require_working_folder([*inputs, target])
    for raw in inputs:  # before the lock makes the output's folder
        _is_input_folder(raw)
    with output_lock(target):
        yield plan_folder_job(inputs, out, fmt=fmt, overwrite=overwrite, model=model, recaption_changed=recaption_changed)


def _require_working_folder(paths: list[str | os.PathLike[str]]) -> None:
    """Raise OutputError when a relative path is given from a working folder deleted since (a shell left in
    a removed folder): Python cannot resolve it there and would say only "No such file or directory"."""
    if all(os.path.isabs(p) for p in paths):
        return
    try:
        os.getcwd()
    except FileNotFoundError:
        raise OutputError(
            "the working folder no longer exists (deleted after this shell entered it), so relative paths cannot "
            "be read: cd to a folder that exists, or give absolute paths"
        ) from None


def _is_caption_file(path: Path) -> bool:
    """Whether `path` is empty or starts like a caption file of either format (JSONL record, CSV header)."""
    try:
        first = _first_line(path)
    except OSError:
        return False
    return not first or _caption_format(first) is not None or _is_blank(path)


def _is_blank(path: Path, limit: int = 64 * 2**20) -> bool:
    """Whether `path` holds nothing but line ends, spaces and zero bytes (at most `limit` bytes): a file emptied
    with `echo > out`, or what a crash can leave of a caption file's first appends (see _is_torn_record)."""
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > limit:
            return False
        return not any(chunk.strip(b"\x00 \t\r\n") for chunk in iter(lambda: handle.read(2**16), b""))
    return False


def output_path(out: str | os.PathLike[str] | None, fmt: str) -> Path:
    """The output as given ("-" is stdout), or the default for `fmt`."""
    if out is None:
        return default_output(fmt)
    given = os.fspath(out)
    if isinstance(given, str) and not given:  # Path("") is the current folder
        raise OutputError("the output path is empty (an unset variable?); give a file name")
    if isinstance(given, str) and given.endswith(("/", os.sep)):  # Path() would drop the slash: a file named like the folder
        raise OutputError(f"{given}: names a folder, not an output file; give a file name (e.g. {given}{default_output(fmt)})")
    if given == "-":
        return Path("/dev/stdout")
    if (suffix := Path(out).suffix.lower()) in COMPRESSED_SUFFIXES:
        raise OutputError(f"{given}: records are written as plain text, which a {suffix} name would misstate; "
                          f"name the output without {suffix} and compress it after the run")
    return Path(out)


# Output names that promise a compressed file. Records are appended and flushed batch by batch so that a
# stopped run resumes: a compressed stream cut by a kill cannot be read back (nor appended to).
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".lzma", ".zst", ".zip", ".lz4", ".lz", ".br", ".z", ".7z", ".tgz"})


def write_batch(writer: RecordWriter, records: list[dict[str, Any]], summary: FolderSummary, bar: Any) -> None:
    """Append `records` to the output, count them in `summary` and advance the progress bar (if any)."""
    writer.write(records)
    failed = sum(1 for r in records if r["error"] is not None)
    summary.failed += failed
    summary.captioned += len(records) - failed
    if bar is not None:
        bar.update(len(records))
    check_stop()  # a stop that library code swallowed while these were made (an error record is retried)


def caption_folder(
    captioner: Captioner,
    inputs: Inputs,
    out: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    recaption_changed: bool = False,
) -> FolderSummary:
    """Caption every image under `inputs` into `out` (default captions.jsonl / captions.csv).

    `fmt`: "jsonl" or "csv" (default: csv for an `out` ending in .csv, else jsonl).
    Resumes by default (see module docstring); `overwrite` starts a fresh file; `recaption_changed`
    captions again the images whose file changed since their record (another size or SHA-256; else refused). Image problems are
    records, folders that cannot be listed are in the summary's `unreadable`; raises
    FileNotFoundError for a missing input, OutputError for an unusable output file or one another run
    is writing, ModelRuntimeError if ONNX Runtime fails.
    """
    fmt = resolve_format(fmt, out)
    model = captioner.captions_id
    with folder_job(inputs, out, fmt, overwrite, model, recaption_changed) as (todo, summary):
        bar = _progress_bar(len(todo), progress)
        started = time.perf_counter()
        read_files: dict[str, Future[Fingerprint]] = {}

        # Images are opened where they were listed: a host that changes its working folder meanwhile (a
        # notebook's %cd, a service's os.chdir) would otherwise turn every later relative path into an error.
        # (A working folder deleted since matters only to relative paths: folder_job has refused those then.)
        listed_in = None if all(f.path.is_absolute() for f in todo) else Path.cwd()

        def items() -> Iterator[tuple[str, Path, str]]:
            for f in todo:
                path = f.path if listed_in is None else listed_in / f.path
                # Started as its batch is handed to the reading thread: the file as read, not as listed
                # minutes before (a file still being copied in then).
                read_files[f.file] = fingerprint(path)
                yield f.file, path, str(f.path)

        pending: list[dict[str, Any]] = []
        try:
            with RecordWriter(summary.out, fmt, model, replace=overwrite) as writer, fingerprinting() as fingerprint:
                for file, caption, error in captioner.iter_captions(items()):
                    pending.append({"file": file, "caption": caption, "error": error, **read_files.pop(file).result().fields()})
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
    if not enabled or total == 0 or sys.stderr is None:  # no stderr at all: pythonw, some service hosts
        return None
    return progress_bar(total, "captioning", "img", sys.stderr)
