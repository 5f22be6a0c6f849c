"""`edlight bench`: PyTorch, Optimum and the engine measured side by side, in one run."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from benchmarks.settings import BENCH_IMAGES, DEFAULT_TOKENS, SIZES, SYSTEMS, BenchSettings
from benchmarks.settings import default_cache as settings_default_cache
from engine.click_types import (
    FiniteFloatRange,
    GivenPath,
    cannot_run,
    failed,
    interrupted_status,
    stops_held,
    unwinds_on_stop,
)
from engine.errors import EdlightError, some_names
from engine.resources import available_cores, readable_bytes

if TYPE_CHECKING:
    from benchmarks.runner import BenchRun

# What a bench run writes into --out (benchmarks.report.write_all and the workers' logs).
RESULT_FILES = ("results.json", "results.md", "chart.png")
RESULT_NAMES = (*RESULT_FILES, "logs")
# The workers' logs (benchmarks.runner): a logs/ folder holding anything else is not the bench's.
WORKER_LOG = re.compile(r"(ceiling-\w+|[\w-]+-b\d+[\w-]*)\.log")


def batch_size_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """Click callback: "1,4,8" -> [1, 4, 8] (positive integers); shared with benchmarks.batch_sizes."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not all(re.fullmatch(r"[0-9]+", v) for v in parts):  # int() would also take "1_0" and other scripts' digits
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 1,4,8")
    numbers = [int(v) for v in parts]
    if not numbers or any(n < 1 for n in numbers):
        raise click.BadParameter(f"{value!r}: batch sizes must be positive integers")
    return numbers


def _system_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise click.BadParameter(f"unknown system(s) {', '.join(unknown) or '(none)'}; choose from {','.join(SYSTEMS)}")
    return list(dict.fromkeys(names))  # each system once, in the order given


def default_cache() -> Path:
    """benchmarks.settings.default_cache for a command: no home folder is a usage error (exit 2)."""
    try:
        return settings_default_cache()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _logs_are_ours(logs: Path) -> bool:
    """Whether `logs` holds only the workers' logs of an earlier bench (a user's own logs/ must not be moved)."""
    return logs.is_dir() and all(WORKER_LOG.fullmatch(p.name) and p.is_file() for p in logs.iterdir())


def _check_writable(folder: Path, what: str) -> None:
    """Refuse (exit 2) a folder this run could not write into, before any model is built or measured."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".edlight-bench-probe-"):
            pass
    except OSError as exc:
        cannot_run(f"{folder}: cannot write the {what} there ({exc.strerror or exc})")


def _unused_cache(cache: Path, used: list[Path], prune: bool, log: Callable[[str], None]) -> None:
    """Say how much of the cache this run leaves unused (each version's builds stay until deleted), or
    with `prune` delete it. Under the cache's lock: no other bench is using them."""
    from benchmarks.models import disk_bytes, unused_cache_entries

    unused = unused_cache_entries(cache, used)
    if not unused:
        return
    sizes = {path: disk_bytes(path) for path in unused}
    if not prune:
        log(f"the cache also holds {len(unused)} build(s) this run does not use ({readable_bytes(sum(sizes.values()))}: "
            f"{some_names([path.name for path in unused])}); --prune-cache deletes them")
        return
    deleted, kept = [], []
    for path in unused:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            kept.append(f"{path} ({exc.strerror or exc})")
        else:
            deleted.append(path)
    if deleted:
        freed = readable_bytes(sum(sizes[path] for path in deleted))
        log(f"deleted {len(deleted)} unused cache build(s) ({freed} freed: {some_names([path.name for path in deleted])})")
    for problem in kept:
        log(f"warning: cannot delete {problem}; the bench goes on")


@click.command("bench")
@click.option("--size", type=click.Choice(SIZES), default="base", show_default=True,
              help="base: random weights, exact textcaps-base architecture (282M, 2048 patches); tiny: a small trained model.")
@click.option("--systems", default=",".join(SYSTEMS), show_default=True, callback=_system_list,
              help="Comma-separated systems to measure.")
@click.option("--batch-sizes", default="1,4", show_default=True, callback=batch_size_list, help="Comma-separated batch sizes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per system (default: the CPUs available).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per system and batch size.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs before them.")
@click.option("--tokens", type=click.IntRange(min=1), default=DEFAULT_TOKENS, show_default=True,
              help="Generated tokens, forced (min = max new tokens), the same for every system.")
@click.option("--model", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An engine bundle (fp32 or int8, told apart by its manifest); repeat for both. Default: exported here.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A Pix2Struct save_pretrained checkpoint for torch/optimum (and for bundles not given). Default: built here.")
@click.option("--optimum-model", "optimum_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A plain Optimum export to use for the optimum system. Default: exported here from the checkpoint.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help=f"A folder of images to caption: the first {BENCH_IMAGES} by name; a batch of b takes the first b "
                   f"of those, in turn. Default: {BENCH_IMAGES} generated student-work images (plain drawn pages on an "
                   "engine-only install).")
@click.option("--out", type=GivenPath(file_okay=False, path_type=Path), default=Path("bench-results"), show_default=True,
              help="Where results.json, results.md, chart.png and the worker logs go.")
@click.option("--cache-dir", type=GivenPath(file_okay=False, path_type=Path), default=None,
              help="Built models and exports [default: $EDLIGHT_BENCH_CACHE or ~/.cache/edlight/bench].")
@click.option("--prune-cache", is_flag=True,
              help="Delete the cache's builds this run does not use (other sizes' or systems', other versions', killed builds').")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in --out.")
@click.option("--no-interleave", is_flag=True, help="Run the systems one after another instead of round-robin.")
@click.option("--ceiling-seconds", type=FiniteFloatRange(0.1, 600), default=3.0, show_default=True,
              help="How long to time the MatMul ceiling (at the start and at the end).")
@unwinds_on_stop  # a service manager's stop or `timeout`: as Ctrl-C (earlier results put back, workers ended)
def bench(
    size: str, systems: list[str], batch_sizes: list[int], threads: int | None, repeats: int, warmup: int, tokens: int,
    bundles: tuple[Path, ...], checkpoint: Path | None, optimum_dir: Path | None, images_dir: Path | None, out: Path,
    cache_dir: Path | None, prune_cache: bool, overwrite: bool, no_interleave: bool, ceiling_seconds: float,
) -> None:
    """Latency, throughput and memory of PyTorch, Optimum and the engine (fp32, int8) in one run.

    Each system runs in its own process, warmed up, with the timed repeats interleaved across
    systems. Systems whose libraries are absent are skipped with a note. Writes results.json,
    results.md and chart.png into --out.
    """
    from benchmarks.models import BenchSetupError, prepare_models
    from benchmarks.report import markdown, write_all
    from benchmarks.runner import BenchRun
    from engine.folder import output_lock

    # Workers run in the repository root: every path the user gave is resolved here, against theirs.
    bundles = tuple(b.expanduser().absolute() for b in bundles)
    checkpoint, optimum_dir, images_dir, out = (
        None if p is None else p.expanduser().absolute() for p in (checkpoint, optimum_dir, images_dir, out)
    )
    cache = (cache_dir or default_cache()).expanduser().absolute()
    if threads is not None:
        from engine.session import too_many_threads

        problem = too_many_threads(threads)
        if problem:
            cannot_run(problem)
    # The folders this run makes for --out and the cache, removed again if still empty when it cannot run.
    made = [_first_missing(folder) for folder in (out, cache)]
    with _removed_if_refused(made):
        for folder, what in ((out, "results folder"), (cache, "model cache")):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                why = "it or a folder above it is a file" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
                cannot_run(f"{folder}: cannot create the {what} ({why})")
            _check_writable(folder, what)
        logs = out / "logs"
        if logs.exists() and not _logs_are_ours(logs):
            cannot_run(f"{logs} holds files edlight bench did not write, and the workers' logs go there; choose another --out")
        results_there = [out / name for name in RESULT_FILES if (out / name).exists()]
        if results_there and not overwrite:  # like every "cannot run" of the bench: exit 2
            cannot_run(f"{out} holds the results of an earlier run; pass --overwrite or choose another --out")
        # Logs without results are an unfinished run's (stopped, or every measurement failed): replaced, not kept.
        earlier = [*results_there, *([logs] if results_there and logs.exists() else [])]
        stale_logs = logs.exists() and not results_there
        started = time.perf_counter()

        def log(message: str) -> None:
            elapsed = int(time.perf_counter() - started)
            click.echo(f"[bench {elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        measuring = False  # errors before the measurements: the bench cannot run (2); during them: it failed (1)
        try:
            settings = BenchSettings(
                size=size, systems=systems, batch_sizes=batch_sizes, threads=threads or available_cores(), repeats=repeats,
                warmup=warmup, tokens=tokens, out=out, cache_dir=cache,
                ceiling_seconds=ceiling_seconds, interleave=not no_interleave,
            )
            # One bench at a time per results folder and per cache (two would build the same models at once
            # and time each other).
            with (
                output_lock(out / "results.json", elsewhere="pass another --out"),
                output_lock(cache / "models", elsewhere="pass another --cache-dir (the models are built again there)"),
            ):
                log(f"{size} size; systems {','.join(settings.systems)}; batch sizes {settings.batch_sizes}; "
                    f"{settings.threads} threads; cache {settings.cache_dir}")
                models = prepare_models(size, settings.systems, settings.cache_dir, log, checkpoint=checkpoint,
                                        bundles=list(bundles), optimum_dir=optimum_dir, images_dir=images_dir)
                _unused_cache(settings.cache_dir, models.cache_entries, prune_cache, log)
                # Set aside only now that the new run can start (old logs must not mix in), and put back if it
                # does not finish: an interrupted --overwrite must not lose the earlier results.
                for left in sorted(out.glob(".earlier-results-*")):  # under the lock: no run is alive to put them back
                    click.echo(f"warning: {left} holds the results an --overwrite run set aside and did not live to put "
                               "back (it was killed); move them back by hand if you want them", err=True)
                if stale_logs:
                    shutil.rmtree(logs)
                aside = Path(tempfile.mkdtemp(prefix=".earlier-results-", dir=out)) if earlier else None
                for path in earlier:
                    assert aside is not None
                    path.rename(aside / path.name)
                try:
                    measuring = True
                    run = BenchRun(settings, models, log)
                    try:
                        run.measure()
                    except KeyboardInterrupt as stop:
                        _keep_what_was_measured(run, stop, out, log, earlier_kept=aside is not None)
                        raise
                    results = run.document()
                    nothing_measured = bool(results["results"]) and not any(r.get("total_s_per_image") for r in results["results"])
                    if aside is not None and nothing_measured:
                        for cell in results["results"]:
                            first_line = ((cell.get("error") or "").splitlines() or ["failed"])[0]
                            click.echo(f"{cell['system']} at batch {cell['batch_size']}: {first_line}", err=True)
                        _put_back(aside, out)  # a run with nothing measured does not replace one that measured
                        aside = None
                        failed(f"every measurement failed; the earlier results in {out} are kept (run into another "
                               "--out to keep this run's worker logs)")
                    try:
                        # A stop now would lose a finished run or leave half-written files: it waits until they are
                        # written and the earlier results they replace are gone (then ends the run as usual).
                        with stops_held():
                            paths = write_all(results, settings.out)
                            if aside is not None:
                                shutil.rmtree(aside, ignore_errors=True)
                                aside = None
                            click.echo("")
                            click.echo(paths["markdown"].read_text(encoding="utf-8"))
                            log("wrote " + ", ".join(str(p) for p in paths.values()))
                    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the table is still shown
                        click.echo("")
                        click.echo(markdown(results))
                        _remove_results(out)  # half-written files would pass for an earlier run's results
                        failed(f"{out}: cannot write the results ({exc.strerror or exc}); the table above is what this run measured")
                except BaseException:
                    if aside is not None:
                        _put_back(aside, out)
                    raise
        except BenchSetupError as exc:  # the job cannot run here (like a missing extra): exit 2
            cannot_run(str(exc))
        except (EdlightError, ValueError) as exc:
            if not measuring:  # settings, another bench holding the results folder or cache, models that cannot load
                cannot_run(str(exc))
            failed(str(exc))
        if nothing_measured:
            failed(f"every measurement failed; see the worker logs in {out / 'logs'}")
        # Written all the same (what did run is worth keeping), but a script or a cron job must see that a cell the
        # run was asked for is missing or cut short.
        unfinished = [f"{r['system']} at batch {r['batch_size']}" for r in results["results"] if r.get("status") == "failed"]
        unfinished += [f"{r['system']}'s batch scaling" for r in results.get("batch_scaling") or [] if r.get("error")]
        if unfinished:
            asked = len(results["results"]) + len(results.get("batch_scaling") or [])
            failed(f"{len(unfinished)} of {asked} measurements failed or were cut short "
                   f"({', '.join(unfinished)}); see the table and notes above and the worker logs in {out / 'logs'}")


@contextlib.contextmanager
def _removed_if_refused(made: list[Path | None]) -> Iterator[None]:
    """A run that cannot run (cannot_run: exit 2, before anything is built or measured) leaves none of the
    folders it made behind empty."""
    try:
        yield
    except SystemExit as exc:
        if exc.code == 2:
            _remove_if_empty(made)
        raise


def _first_missing(folder: Path) -> Path | None:
    """The topmost folder of `folder`'s path that does not exist yet (what mkdir(parents=True) will make), else None."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def _remove_if_empty(made: list[Path | None]) -> None:
    """Remove the folders this run made (each the topmost it made, and all below it) where they are still
    empty: a run refused before it built or measured anything leaves no empty --out or cache behind."""
    for top in made:
        if top is None:
            continue
        for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):  # the deepest first
            with contextlib.suppress(OSError):  # not empty: kept, with everything above it
                os.rmdir(folder)


def _keep_what_was_measured(run: BenchRun, stop: KeyboardInterrupt, out: Path, log: Callable[[str], None], earlier_kept: bool) -> None:
    """A run stopped partway (Ctrl-C, SIGTERM) writes the timed runs it made, marked as partial, unless it was
    to replace an earlier run's results (those are put back whole instead)."""
    from benchmarks.report import write_all

    if not run.measured_anything():
        return
    if earlier_kept:
        log(f"stopped: the earlier results in {out} are kept; this run's measurements so far are not written")
        return
    stopped = signal.Signals(interrupted_status(stop) - 128).name
    try:
        with stops_held():  # a second Ctrl-C waits for the files
            paths = write_all(run.document(stopped=stopped), out)
            log("stopped: what was measured so far is in " + ", ".join(str(p) for p in paths.values()))
    except Exception as exc:  # a full disk, or a bug: no half-written files that would pass for results
        _remove_results(out)
        log(f"stopped: could not write what was measured ({type(exc).__name__}: {exc})")


def _remove_results(out: Path) -> None:
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)


def _put_back(aside: Path, out: Path) -> None:
    """The earlier run's files back in `out`, and nothing the unfinished run wrote left beside them."""
    for name in RESULT_NAMES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for path in aside.iterdir():
        path.rename(out / path.name)
    aside.rmdir()
