"""`edlight caption`: a thin click layer over `Captioner.caption_folder`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from engine.click_types import (
    PIPE_CLOSED_STATUS,
    FiniteFloatRange,
    GivenPath,
    cannot_run,
    interrupted_status,
    say,
    unwinds_on_stop,
)
from engine.errors import MAX_BATCH_SIZE, MAX_NUM_BEAMS, EdlightError
from engine.folder import IMAGE_EXTENSIONS, is_stream, output_path, resolve_format
from engine.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from engine.folder import FolderSummary

# Parity keys worth a glance before a long run, in display order (written by export.parity).
PARITY_KEYS = ("passed", "split", "images", "bleu_torch", "bleu_engine", "bleu_diff", "identical_share")


def describe_bundle(bundle: Any) -> str:
    """One line about the model in use, with the parity results recorded at export if any."""
    manifest = bundle.manifest
    parts = [f"model: {bundle.path}", manifest.quantization or "fp32", f"{manifest.max_patches} patches"]
    parity = manifest.parity
    if isinstance(parity, dict) and parity:
        shown = [
            f"{key}={round(parity[key], 2 if abs(parity[key]) >= 1 else 3)}" if isinstance(parity[key], float) else f"{key}={parity[key]}"
            for key in PARITY_KEYS
            if key in parity
        ]
        parts.append("parity vs PyTorch: " + (", ".join(shown) or "recorded"))
    else:
        parts.append("no parity results recorded")
    return " | ".join(parts)


@click.command("caption")
@click.argument("inputs", nargs=-1, required=True, type=GivenPath(path_type=Path))
@click.option("--model", "model", type=GivenPath(path_type=Path), default=None,
              help="Bundle directory made by `edlight export` (default: the bundle shipped with edlight).")
# A string: Path() would drop a trailing slash, which engine.folder.output_path refuses (as an empty path).
@click.option("--out", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Output file (default: captions.jsonl, or captions.csv with --format csv); - is stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Output format (default: csv when --out ends in .csv, else jsonl).")
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH_SIZE), default=8, show_default=True,
              help="Images per model run (and per write to the output).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (per actor with --ray; default: the cores this process may use, with --ray each actor's share of the cluster's).")
@click.option("--num-beams", type=click.IntRange(min=1, max=MAX_NUM_BEAMS), default=1, show_default=True,
              help="Beam search width; 1 is greedy decoding.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Longest caption in tokens (default: the bundle's generation config).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images larger than this many pixels (checked before decoding).")
@click.option("--overwrite", is_flag=True, help="Start a fresh output file instead of resuming (only a caption file is replaced).")
@click.option("--recaption-changed", is_flag=True,
              help="Caption again images whose file changed since their record (size or SHA-256: replaced or edited photos), "
                   "replacing their records (default: such a resume is refused).")
@click.option("--strict", is_flag=True, help="Exit 1 if any image failed, a folder could not be listed or no image was found (default: exit 0).")
@click.option("--quiet", is_flag=True, help="No progress (a bar on a terminal; elsewhere a line at most every minute).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray: a pool of actors, each loading the model once (needs edlight[distributed]).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: an existing Ray cluster (default: start a local Ray with the cores this process may use).")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="With --ray: number of actors (default: one per 2 CPUs of the cluster).")
@click.option("--ray-timeout", type=FiniteFloatRange(min=1), default=300.0, show_default=True, metavar="SECONDS",
              help="With --ray: stop with an error when no result arrives for this long (a stalled cluster).")
@unwinds_on_stop
def caption(
    inputs: tuple[Path, ...],
    model: Path | None,
    out: str | None,
    fmt: str | None,
    batch_size: int,
    threads: int | None,
    num_beams: int,
    max_new_tokens: int | None,
    max_pixels: int,
    overwrite: bool,
    recaption_changed: bool,
    strict: bool,
    quiet: bool,
    use_ray: bool,
    ray_address: str | None,
    actors: int | None,
    ray_timeout: float,
) -> None:
    """Caption image files and folders (walked recursively, sorted) into JSONL or CSV records.

    Resumes by default: images already captioned in the output are skipped and images whose record
    is an error are tried again. Records name files relative to their input folder; an output whose
    caption of a name was written for another file (another size or SHA-256: another folder's image of
    that name, or a replaced photo) is refused unless --recaption-changed. A bad image becomes an error record
    and the run goes on. One run at a time writes an output (a second is refused), and only with the
    model and decoding settings that wrote it.

    Exit status: 0 done (see --strict), 1 --strict and something failed, 2 the job cannot run (bad
    model, input or output), 130 interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP; rerun without --overwrite to
    resume, as the message says).
    """
    from engine.resources import cpu_cores
    from engine.session import available_cores, too_many_threads

    fmt = resolve_format(fmt, out)
    cores = available_cores()
    if threads is not None and threads > cores and not (use_ray and ray_address is not None):  # a cluster's own
        if problem := too_many_threads(threads):
            cannot_run(f"--{problem}")
        say(f"warning: --threads {threads} on {cpu_cores(cores)}: threads beyond the cores wait for each other "
            "and slow the run down")
    if use_ray and actors is not None and ray_address is None and actors > cores:
        say(f"warning: --actors {actors} on a local Ray with {cpu_cores(cores)}: each actor loads the model, and "
            "actors beyond the cores only wait for each other")
    elif use_ray and threads is not None and ray_address is None and threads <= cores:
        from engine.ray_caption import plan_actors

        pool = plan_actors(cores, actors, threads).actors  # a local Ray has this machine's cores
        if pool * threads > cores:
            say(f"warning: --threads {threads} is per actor: {pool} actor(s) x {threads} threads on a local Ray with "
                f"{cpu_cores(cores)}; threads beyond the cores wait for each other and slow the run down")
    if inputs and all(_is_file(path) for path in inputs):
        # Named files only: no batch is larger than their count, and the memory check (in Captioner) should
        # not warn about a batch of 8 for `edlight caption one.jpg`.
        batch_size = min(batch_size, len(inputs))
    if use_ray:
        _caption_on_ray(inputs, model, out, fmt, batch_size, threads, num_beams, max_new_tokens, max_pixels,
                        overwrite, recaption_changed, strict, quiet, ray_address, actors, ray_timeout)
        return
    if ray_address is not None or actors is not None:
        raise click.UsageError("--ray-address and --actors need --ray")
    from engine.captioner import Captioner
    from engine.folder import one_line
    from engine.images import image_being_loaded

    shown = warnings.showwarning
    said: set[tuple[str | None, str]] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
             line: str | None = None) -> None:
        # Pillow's (a damaged EXIF block, odd TIFF tags) name a line of its source: said once per image, naming
        # it (this hook runs in the thread that decodes it). The engine's own (a batch that cannot fit, a bundle
        # this CPU computes differently) as the CLI words them, and at once: the memory warning comes before the
        # weights load, which a kill may cut short.
        if f"{os.sep}PIL{os.sep}" in filename:
            image, text = image_being_loaded(), " ".join(str(message).split())
            if (image, text) not in said:
                said.add((image, text))
                say(f"warning: {one_line(image)}: {text}" if image else f"warning: {text}")
        elif issubclass(category, UserWarning):
            say(f"warning: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # each image's own, and the engine's
        warnings.showwarning = show
        try:
            # The bundle is opened and verified before any input is looked at.
            captioner = Captioner(
                model, threads=threads, batch_size=batch_size, num_beams=num_beams,
                max_new_tokens=max_new_tokens, max_pixels=max_pixels,
            )
        except EdlightError as exc:
            _fail(exc)
        say(describe_bundle(captioner.bundle))
        before = _output_state(out, fmt)
        try:
            summary = captioner.caption_folder(list(inputs), out=out, fmt=fmt, overwrite=overwrite, progress=not quiet,
                                               recaption_changed=recaption_changed)
        except (EdlightError, FileNotFoundError) as exc:
            _fail(exc)
        except MemoryError:
            cannot_run(f"out of memory with --batch-size {batch_size} and --num-beams {num_beams}; lower them "
                       "(the records written so far are kept)")
        except KeyboardInterrupt as exc:
            _interrupted(out, fmt, overwrite, exc, before)
    _finish(summary, strict)


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False where it cannot be looked at (the folder walk names that error)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _output_state(out: str | None, fmt: str) -> tuple[int, int, int] | None:
    """The output file's (inode, size, modification time) before a run: an --overwrite run stopped before its
    first records leaves it as it was (None: no file yet, a stream, or cannot tell)."""
    try:
        target = output_path(out, fmt)
        if is_stream(target):
            return None
        info = os.stat(target)
    except (OSError, EdlightError):
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _interrupted(out: str | None, fmt: str, overwrite: bool, exc: KeyboardInterrupt,
                 before: tuple[int, int, int] | None = None) -> NoReturn:
    """Ctrl-C, SIGTERM or SIGHUP: say what is kept and how to go on; exit 130 (143, 129; not 1, which
    means images failed). `before`: _output_state before the run."""
    target = output_path(out, fmt)
    if is_stream(target):
        say("interrupted")
    elif overwrite and before is not None and _output_state(out, fmt) == before:
        say(f"interrupted before the first records: {target} is as it was; run the same command again to "
            "start it afresh")
    else:
        again = "the same command without --overwrite" if overwrite else "the same command"
        say(f"interrupted: the records written so far are kept in {target}; "
            f"run {again} again to caption the rest")
    raise SystemExit(interrupted_status(exc))


def _fail(exc: Exception) -> NoReturn:
    """A job that cannot run (bad bundle, input or output): one line, exit 2.

    A reader that stopped reading (`edlight caption ... --out /dev/stdout | head`) ends the run quietly,
    with the status of a process killed by SIGPIPE, as other command-line tools do.
    """
    if isinstance(exc.__cause__, BrokenPipeError):
        raise SystemExit(PIPE_CLOSED_STATUS) from exc
    cannot_run(str(exc))


def _finish(summary: FolderSummary, strict: bool) -> None:
    """Warnings and the summary line; exit 1 under --strict when any image failed or folder was unreadable, or
    when the inputs held no image at all (an unmounted share, a mistyped folder: nothing was captioned)."""
    for problem in summary.unreadable:
        say(f"warning: {problem} (skipped)")
    if summary.total == 0:
        say("warning: no image files found (looked for " + " ".join(sorted(IMAGE_EXTENSIONS)) + ")")
    say(summary.line())
    if strict and (summary.any_failed or summary.total == 0):
        raise SystemExit(1)


def _caption_on_ray(
    inputs: tuple[Path, ...], model: Path | None, out: str | None, fmt: str, batch_size: int,
    threads: int | None, num_beams: int, max_new_tokens: int | None, max_pixels: int, overwrite: bool,
    recaption_changed: bool, strict: bool, quiet: bool, address: str | None, actors: int | None, timeout: float,
) -> None:
    """`edlight caption --ray`: the same job through engine.ray_caption (same output, same exit codes)."""
    from engine.bundle import Bundle
    from engine.captioner import resolve_bundle
    from engine.ray_caption import caption_folder_ray, import_ray

    # A stop (SIGTERM from timeout or a service manager reaches Ray's own processes too) can leave Ray Data's
    # executor thread calling Ray after the shutdown, and Ray's auto-init then started a new local Ray there,
    # whose failing connection ended the process a minute later with exit 1. This process never needs it.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    before = _output_state(out, fmt)
    try:
        import_ray()  # a missing extra is said first, before any work
        say(describe_bundle(Bundle.load(resolve_bundle(model))))
        summary = caption_folder_ray(
            list(inputs), out, model, address=address, actors=actors, threads=threads, batch_size=batch_size,
            num_beams=num_beams, max_new_tokens=max_new_tokens, max_pixels=max_pixels, fmt=fmt,
            overwrite=overwrite, recaption_changed=recaption_changed, progress=not quiet, stall_timeout=timeout,
            log=say,
        )
    except (EdlightError, FileNotFoundError) as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:
        _interrupted(out, fmt, overwrite, exc, before)
    _finish(summary, strict)
