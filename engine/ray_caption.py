"""Caption folders on Ray: the same engine as a pool of Ray actors over a Ray Dataset of image paths.

The driver (this process) walks the inputs and applies the resume rule exactly as a local run does
(engine.folder), builds a Ray Dataset of the image paths still to do, and maps it through a fixed pool
of actors that each load the bundle once (a `Captioner`). Results stream back in input order
(`preserve_order`) and are appended to the same JSONL/CSV file, flushed per block, so a killed run keeps
what it finished and a rerun skips it. Output records are identical to a local run's.

Paths are read by the actors, so on a multi-node cluster the images and the bundle must be visible at
the same absolute paths on every node (a shared file system), and edlight must be installed there.

Ray is an optional extra (`pip install 'edlight[distributed]'`). It is imported only inside this
module's functions, so the engine works without it.

Why actors get fractional CPUs: on a small machine, actors that each reserve a whole CPU can leave
no CPU for Ray Data's own tasks and the job stalls with no error. The pool is sized from the
cluster's CPUs with headroom kept free, and a watchdog raises `RayStallError` when no batch comes
back for `stall_timeout` seconds, so a stall is loud instead of silent.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bundle import Bundle
from engine.captioner import generation_settings, pixel_cap, resolve_bundle
from engine.click_types import reclaim_stop_signals
from engine.errors import MAX_BATCH_SIZE, EdlightError, bounded_count, install_hint, is_count
from engine.folder import (
    Fingerprint,
    FolderSummary,
    RecordWriter,
    _progress_bar,
    fingerprinting,
    folder_job,
    is_same_file,
    resolve_format,
    write_batch,
)
from engine.images import DEFAULT_MAX_PIXELS
from engine.session import available_cores

INSTALL_HINT = install_hint("distributed")
DEFAULT_STALL_TIMEOUT_S = 300.0  # covers actor start-up and the bundle load before the first batch
# Each actor call covers a few engine batches so that the Captioner's preprocessing of the next batch
# overlaps the model run on this one; the output is still flushed every call.
ENGINE_BATCHES_PER_CALL = 2


class RayUnavailableError(EdlightError):
    """Ray is not installed: the [distributed] extra is needed."""


class RayStallError(EdlightError):
    """The Ray job returned no results for longer than the stall timeout."""


class RayWorkerError(EdlightError):
    """The Ray workers do not run this edlight."""


class RayConnectionError(EdlightError):
    """The Ray cluster at the given address cannot be reached or joined."""


@dataclass(frozen=True)
class ActorPlan:
    """How the actor pool uses the cluster."""

    actors: int
    cpus_per_actor: float  # Ray's reservation per actor (fractional: leaves room for Ray Data's tasks)
    threads: int  # ONNX Runtime threads per actor: its share of the cluster's cores
    cluster_cpus: float

    def line(self) -> str:
        return (
            f"ray: {self.actors} actor(s) x {self.cpus_per_actor:g} CPU reserved, {self.threads} ONNX Runtime "
            f"thread(s) each, on a cluster of {self.cluster_cpus:g} CPUs"
        )


def plan_actors(
    cluster_cpus: float, actors: int | None = None, threads: int | None = None, images: int | None = None
) -> ActorPlan:
    """Size the actor pool for a cluster with `cluster_cpus` CPUs (from `ray.cluster_resources()`).

    Default: one actor per 2 cores (at least 1). Actors together reserve all but one CPU (half the CPUs
    below 2), so Ray Data's tasks can always be scheduled; the threads of each actor match its share of
    the cores (`cluster_cpus / actors`, at least 1) unless `threads` is given. No more actors than `images`
    start (one without an image would only load the model), each with the share it would have had: a larger
    one might fit on no node of the cluster.
    Raises EdlightError when the cluster has no CPU, ValueError for actors/threads that are not integers >= 1.
    """
    check_actors_and_threads(actors, threads)
    if cluster_cpus <= 0:
        raise EdlightError("the Ray cluster has no CPU: it cannot run the captioning actors")
    if actors is None:
        actors = max(1, int(cluster_cpus // 2))
    reserve = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    # Rounded down to 1/1000: Ray accepts at most 4 decimals and the sum must stay within the budget.
    per_actor = math.floor((cluster_cpus - reserve) / actors * 1000) / 1000
    per_actor = max(per_actor, 0.001)
    return ActorPlan(
        actors=actors if images is None else max(1, min(actors, images)),
        cpus_per_actor=per_actor,
        threads=threads if threads is not None else max(1, int(cluster_cpus // actors)),
        cluster_cpus=cluster_cpus,
    )


def check_actors_and_threads(actors: int | None, threads: int | None) -> None:
    """Raise ValueError unless `actors` and `threads` are None or integers >= 1."""
    for name, value in (("actors", actors), ("threads", threads)):
        if value is not None and not is_count(value, 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def import_ray() -> Any:
    """The `ray` module (with ray.data loaded). Raises RayUnavailableError naming the extra to install."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module("ray.data")
    except ImportError as exc:
        raise RayUnavailableError(
            f"captioning on Ray needs the [distributed] extra ({exc.name or 'ray'} is not installed); "
            f"install it {INSTALL_HINT}"
        ) from exc
    return ray


class CaptionActor:
    """A Ray Data map_batches callable: one Captioner per actor, loaded once.

    An actor that cannot load the bundle (not at that path on its node, a graph its ONNX Runtime refuses)
    does not raise: Ray would print the traceback once per retry and the driver would die in an
    ActorDiedError. It answers its first batch with the failure instead (`ActorFailure`), which the driver
    raises as the engine's own error, said once.
    """

    def __init__(self, bundle: str, threads: int, batch_size: int, num_beams: int,
                 max_new_tokens: int | None, max_pixels: int, min_new_tokens: int | None = None) -> None:
        from engine.captioner import Captioner
        from engine.session import MAX_THREADS_PER_CORE

        self.failure: str | None = None
        try:
            # The plan shares out the whole cluster's cores; on a node with fewer, no more than the local limit
            # (more threads than that would only wait for each other, and Captioner refuses them).
            threads = min(threads, MAX_THREADS_PER_CORE * available_cores())
            self.captioner = Captioner(
                bundle, threads=threads, batch_size=batch_size, num_beams=num_beams,
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, max_pixels=max_pixels,
            )
        except Exception as exc:  # noqa: BLE001 - anything that stops the bundle loading here is the run's error
            said = str(exc) if isinstance(exc, EdlightError) else f"{type(exc).__name__}: {exc}"
            self.failure = ActorFailure(type(exc).__name__, f"a Ray actor on {socket.gethostname()}: {said}").encode()

    def __call__(self, batch: dict[str, Any]) -> Any:
        """Rows {index, path, label} -> a pyarrow table {index, caption, error, bytes, sha256, mtime_ns, failure}
        in the same order (bytes, sha256, mtime_ns: the file as it is read, as in a local run; failure: null,
        or one row saying why this actor cannot caption).

        Paths and labels travel as bytes (os.fsencode), and errors go back as bytes: a file name that is
        not valid UTF-8 (surrogate escapes in Python) is no Arrow string, and must not fail the job.
        """
        if self.failure is not None:
            return _result_table([-1], [None], [None], [Fingerprint()], [self.failure])
        read: dict[int, Future[Fingerprint]] = {}
        indices: list[int] = []
        captions: list[str | None] = []
        errors: list[bytes | None] = []
        with fingerprinting() as fingerprint:

            def items() -> Iterator[tuple[int, Path, str]]:  # fingerprinted as they are read, as locally
                for i, p, label in zip(batch["index"], batch["path"], batch["label"], strict=True):
                    path = Path(os.fsdecode(bytes(p)))
                    read[int(i)] = fingerprint(path)
                    yield int(i), path, os.fsdecode(bytes(label))

            for index, caption, error in self.captioner.iter_captions(items()):
                indices.append(index)
                captions.append(caption)
                errors.append(None if error is None else error.encode("utf-8", "surrogatepass"))
            files = [read[i].result() for i in indices]
        return _result_table(indices, captions, errors, files, [None] * len(indices))


# What CaptionActor answers for each image (_result_table), checked by the driver.
RESULT_COLUMNS = ("index", "caption", "error", "bytes", "sha256", "mtime_ns", "failure")


def _require_result_columns(results: list[dict[str, Any]]) -> None:
    """Raise RayWorkerError when the actors answered with other columns than this edlight's: they run
    another edlight (a local Ray's workers import `engine` from the driver's working folder first)."""
    if results and (missing := [c for c in RESULT_COLUMNS if c not in results[0]]):
        raise RayWorkerError(
            f"the Ray workers run another edlight than this one (their answers lack {', '.join(missing)}): a local "
            f"Ray's workers import `engine` from the working folder ({os.getcwd()}) before the installed one, so run "
            "from a folder without an edlight checkout; on a cluster, install this edlight on every node"
        )


def _result_table(
    indices: list[int], captions: list[str | None], errors: list[bytes | None],
    files: list[Fingerprint], failures: list[str | None],
) -> Any:
    import pyarrow as pa

    # An explicit schema: a block whose images all failed would otherwise get a null-typed column.
    return pa.table({
        "index": pa.array(indices, pa.int64()),
        "caption": pa.array(captions, pa.string()),
        "error": pa.array(errors, pa.binary()),
        "bytes": pa.array([f.size for f in files], pa.int64()),
        "sha256": pa.array([None if f.sha256 is None else f.sha256.hex() for f in files], pa.string()),
        "mtime_ns": pa.array([f.mtime_ns for f in files], pa.int64()),
        "failure": pa.array(failures, pa.string()),
    })


@dataclass(frozen=True)
class ActorFailure:
    """Why an actor cannot caption, as it travels to the driver: the error's class name and its words."""

    kind: str
    message: str

    def encode(self) -> str:
        return f"{self.kind}\n{self.message}"

    @staticmethod
    def raise_from(encoded: str) -> None:
        """Raise the engine's own error class of that name (BundleError, ModelRuntimeError, ...), else
        ModelRuntimeError, with the actor's words."""
        from engine import errors

        kind, _, message = encoded.partition("\n")
        error = getattr(errors, kind, None)
        if not (isinstance(error, type) and issubclass(error, EdlightError)):
            error = errors.ModelRuntimeError
        raise error(message)


def caption_folder_ray(
    inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    bundle: str | Path | None = None,
    *,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    num_cpus: int | None = None,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_new_tokens: int | None = None,
    fmt: str | None = None,
    overwrite: bool = False,
    recaption_changed: bool = False,
    progress: bool = True,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
    log: Callable[[str], None] | None = None,
) -> FolderSummary:
    """Caption every image under `inputs` into `out` with a pool of Ray actors; like `Captioner.caption_folder`.

    Ray: if this process is already connected (`ray.init` was called), that cluster is used; otherwise
    `address` connects to an existing cluster, and without it a local Ray is started with `num_cpus`
    (default: this machine's cores) and shut down at the end. `actors`/`threads`: see `plan_actors`.
    Engine settings (`bundle`, `batch_size`, `num_beams`, `max_new_tokens`, `min_new_tokens`, `max_pixels`) are
    those of `Captioner`, checked here before Ray starts; output, format, resume, `overwrite` and `recaption_changed` are those of a local run. `log` (a callable
    taking one str, e.g. click.echo) receives a line describing the actor pool.

    Returns the FolderSummary (its `seconds` start when the cluster is connected, so they include the
    actors' start-up). Raises RayUnavailableError without ray, BundleError for a bad bundle (before
    Ray starts), FileNotFoundError for a missing input, OutputError for an unusable output file,
    RayStallError when no result arrives for `stall_timeout` seconds, and whatever the actors raise
    (e.g. ModelRuntimeError).

    After a RayStallError, a thread of the job can stay blocked in Ray Data's iterator (nothing stops it
    from outside) until the stalled actors start; it then closes the job. Shutting Ray down in this
    process before that makes the thread's next Ray call start a new local Ray (Ray's auto-init).
    """
    ray = import_ray()
    bounded_count("batch_size", batch_size, MAX_BATCH_SIZE)  # before Ray starts, not in every actor
    check_actors_and_threads(actors, threads)
    if stall_timeout <= 0:
        raise ValueError(f"stall_timeout must be > 0, got {stall_timeout}")
    max_pixels = pixel_cap(max_pixels)  # here, not in every actor
    # Verified here, before Ray starts; actors reload it by absolute path (their working dir may differ).
    loaded = Bundle.load(resolve_bundle(bundle))
    generation_settings(loaded, num_beams, max_new_tokens, min_new_tokens)  # the actors' settings, checked
    bundle_dir, model = loaded.path.absolute(), loaded.captions_id(num_beams, max_new_tokens, min_new_tokens)
    fmt = resolve_format(fmt, out)
    with folder_job(inputs, out, fmt, overwrite, model, recaption_changed) as (todo, summary):
        if not todo:
            with RecordWriter(summary.out, fmt, model, replace=overwrite):  # the file exists afterwards, as after a local run
                return summary  # nothing left: no need for a cluster
        started_here = _connect(ray, address, num_cpus, records_on_stdout=is_same_file(summary.out, sys.stdout))
        try:
            started = time.perf_counter()
            plan = plan_actors(float(ray.cluster_resources().get("CPU", 0)), actors, threads, images=len(todo))
            if log is not None:
                log(plan.line())
            constructor = (str(bundle_dir), plan.threads, batch_size, num_beams, max_new_tokens, max_pixels, min_new_tokens)
            rows = [{"index": i, "path": os.fsencode(f.path.absolute()), "label": os.fsencode(f.path)}
                    for i, f in enumerate(todo)]
            files = [f.file for f in todo]
            bar = _progress_bar(len(todo), progress)
            try:
                with RecordWriter(summary.out, fmt, model, replace=overwrite) as writer:
                    for results in _stream_records(ray, rows, constructor, plan, batch_size, stall_timeout):
                        _require_result_columns(results)
                        for failure in (r["failure"] for r in results if r["failure"] is not None):
                            ActorFailure.raise_from(failure)
                        records = [
                            {"file": files[r["index"]], "caption": r["caption"],
                             "error": None if r["error"] is None else r["error"].decode("utf-8", "surrogatepass"),
                             "bytes": r["bytes"], "sha256": r["sha256"], "mtime_ns": r["mtime_ns"]}
                            for r in results
                        ]
                        write_batch(writer, records, summary, bar)
            finally:
                if bar is not None:
                    bar.close()
            summary.seconds = time.perf_counter() - started
        finally:
            if started_here:
                ray.shutdown()
    return summary


def _connect(ray: Any, address: str | None, num_cpus: int | None, records_on_stdout: bool = False) -> bool:
    """Connect to Ray; True if this call started it (then the caller shuts it down).

    `records_on_stdout`: the records stream to this process's stdout, where Ray would also print its
    workers' log lines (a worker that dies, a retried task): they are not forwarded then.
    Raises RayConnectionError when `address` cannot be reached or joined.
    """
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    if records_on_stdout:
        options["log_to_driver"] = False
    # A local Ray (a fresh instance of our own, never an unrelated cluster found through RAY_ADDRESS) starts its
    # processes with SIGTERM and SIGHUP blocked: `timeout` and service managers signal the whole process group
    # (or cgroup), and a raylet dying at once made Ray end this process with exit 1 before the stop could
    # unwind. They go with ray.shutdown(), or with this process (Ray ties them to it).
    blocked = {signal.SIGTERM, signal.SIGHUP} if not address and hasattr(signal, "pthread_sigmask") else set()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if blocked else None
    try:
        if address:
            _join(ray, address, options)
        else:
            ray.init(address="local", num_cpus=num_cpus or available_cores(), **options)
    finally:
        # ray.init's SIGTERM handler exits with status 15 and no word: the CLI unwinds instead. Taken back before
        # the mask goes, so that a stop that came during start-up reaches our handler.
        reclaim_stop_signals()
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return True


def _join(ray: Any, address: str, options: dict[str, Any]) -> None:
    """Connect to the cluster at `address`; RayConnectionError when it cannot be reached or joined."""
    # ray.init retries an unreachable address for minutes with only log lines: check it first.
    _check_reachable(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address == "auto" and _auto_address() is None:  # Ray found nothing; its words name its CLI's flag
            raise RayConnectionError(
                "--ray-address auto found no Ray cluster (RAY_ADDRESS is not set and no Ray was started on "
                "this machine with `ray start`); give the cluster's address, or leave out --ray-address to "
                "start a local Ray"
            ) from exc
        why = str(exc).rstrip(".")
        raise RayConnectionError(
            f"cannot join the Ray cluster at {address}: {why}. If the cluster uses token authentication "
            "(the default since Ray 2.52), set RAY_AUTH_MODE=token and provide its token "
            "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
        ) from exc


def _auto_address() -> tuple[str, str] | None:
    """(address, how it was found) of the cluster Ray's "auto" joins, resolved by Ray itself: RAY_ADDRESS,
    else a Ray running on this machine, else the cluster Ray last recorded here (a record it leaves behind
    after the cluster is gone). None where Ray finds nothing (ray.init then says so at once) or its private
    API has moved (the check is skipped)."""
    try:
        from ray._private import services

        resolved = services.get_ray_address_from_environment("auto", None)
    except Exception:  # ConnectionError: nothing found; anything else: the private API moved
        return None
    if not isinstance(resolved, str) or not resolved or resolved == "auto":
        return None
    given = os.environ.get("RAY_ADDRESS")
    return resolved, "RAY_ADDRESS" if given and given != "auto" else "a Ray found or last recorded on this machine"


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Raise RayConnectionError if a `host:port` (or `ray://host:port`) address refuses connections. For
    "auto", the address Ray would resolve it to: a stale record of a cluster long gone made ray.init wait
    for minutes with only log lines."""
    found = ""
    if address == "auto":
        auto = _auto_address()
        if auto is None:
            return
        address, where = auto
        found = f" (where --ray-address auto leads: {where})"
    if address.lower().startswith(("http://", "https://")):  # RAY_ADDRESS for `ray job submit` is one
        raise RayConnectionError(
            f"--ray-address {address}{found}: that is a Ray dashboard's address (for `ray job submit`), not a cluster's: "
            "give the address `ray start --head` printed (HOST:6379), or ray://HOST:10001"
        )
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # another form: Ray resolves it itself, and fails fast when it cannot
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayConnectionError(
            f"cannot reach a Ray cluster at {address}{found} ({exc.strerror or exc}): check the address, "
            "or start a cluster with `ray start --head`"
        ) from exc


def _stream_records(
    ray: Any,
    rows: list[dict[str, Any]],
    constructor: tuple[Any, ...],
    plan: ActorPlan,
    batch_size: int,
    stall_timeout: float,
) -> Iterator[list[dict[str, Any]]]:
    """Run the dataset and yield its result rows ({index, caption, error}) in input order; raise
    RayStallError on a stall."""
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars,
             getattr(context, "print_on_execution_start", None))
    context.execution_options.preserve_order = True  # records come back in input order
    context.enable_progress_bars = False  # our own bar counts images
    if saved[2] is not None:
        context.print_on_execution_start = False
    # Ray Data's INFO lines and its "progress bars disabled" warning would clutter the CLI's output.
    quieted = [(logging.getLogger(name), level) for name, level in
               (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR))]
    saved_levels = [logger.level for logger, _ in quieted]
    for logger, level in quieted:
        logger.setLevel(level)
    try:
        # Blocks of one actor call each, and small enough that every actor gets work on small folders.
        rows_per_call = max(1, min(batch_size * ENGINE_BATCHES_PER_CALL, math.ceil(len(rows) / plan.actors)))
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / rows_per_call)))
        dataset = dataset.map_batches(
            CaptionActor,
            fn_constructor_args=constructor,
            batch_size=rows_per_call,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus_per_actor,
        )
        batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        for table in _watch(batches, stall_timeout, lambda: _stall_message(ray, plan, stall_timeout)):
            yield table.to_pylist()
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved[:2]
        if saved[2] is not None:
            context.print_on_execution_start = saved[2]
        for (logger, _), level in zip(quieted, saved_levels, strict=True):
            logger.setLevel(level)


PUMP_JOIN_S = 10.0  # how long an interrupted or failed run waits for Ray's result iterator to close


def _watch(items: Any, timeout: float, message: Any) -> Iterator[Any]:
    """Yield from `items` (consumed in a helper thread); RayStallError if none arrives for `timeout` s."""
    results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        results.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    # The consumer is gone (stall or error): closing the iterator stops the Ray execution.
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
                    return
            results.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
            results.put(("error", exc))

    thread = threading.Thread(target=pump, name="edlight-ray-results", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = results.get(timeout=timeout)
            except queue.Empty:
                raise RayStallError(message()) from None
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        # Let the pump see `stop` and close the Ray iterator before the caller shuts Ray down: a pump still
        # inside the iterator after ray.shutdown() makes Ray reconnect and print tracebacks. A stalled
        # iterator may never return, so the wait is bounded.
        thread.join(timeout=PUMP_JOIN_S)


def _stall_message(ray: Any, plan: ActorPlan, timeout: float) -> str:
    try:
        available = float(ray.available_resources().get("CPU", 0))
        cpus = f"{available:g} of {plan.cluster_cpus:g} CPUs free now"
    except Exception:  # noqa: BLE001 - the message must not fail
        cpus = f"{plan.cluster_cpus:g} CPUs"
    return (
        f"the Ray job returned no results for {timeout:g} s, so it was stopped. It asked for "
        f"{plan.actors} actor(s) x {plan.cpus_per_actor:g} CPU ({cpus}). A job stalls when its actors "
        "cannot be placed (the cluster is busy with other work, or too small) or leave no CPU for Ray "
        "Data's tasks: try fewer --actors, check `ray status`, or raise the timeout if actors are just slow "
        "to start."
    )
