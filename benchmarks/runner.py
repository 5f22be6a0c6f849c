"""The benchmark runner: one process per system and batch size, repeats interleaved across systems.

For each batch size (ascending) the runner starts one worker per system, warms each up, then runs
the timed repeats round-robin, rotating the order each round, so slow drift of a shared machine
(other jobs, thermal state) lands on every system alike. Each worker's peak RSS is therefore that
system's at that batch size. When the workers' estimated memory would not fit in the memory
available, that batch size runs the systems one after another instead (recorded per cell).
The MatMul ceiling is measured in a worker of its own at the start and at the end of the run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from benchmarks.flops import encoder_flops
from benchmarks.machine import machine_info, memory_bytes
from benchmarks.models import BenchSetupError, ModelSet
from benchmarks.settings import SYSTEMS, BenchSettings, missing_modules
from benchmarks.timing import RunTiming, SystemSpec
from engine.errors import install_hint, is_installed

Log = Callable[[str], None]
REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_HEADROOM = 0.8  # use at most this share of the available memory for workers alive together
NOT_STARTED_ABOVE = 2.0  # a worker estimated above this multiple of the available memory is not started


class WorkerError(RuntimeError):
    """A worker reported an error or died (e.g. killed for memory)."""


class Worker:
    """A `python -m benchmarks.worker` process; its stderr goes to `log_path`."""

    def __init__(self, hello: dict[str, Any], threads: int, log_path: Path) -> None:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log: TextIO = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        self.peak_rss_bytes: int | None = None
        self.send(hello)

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the read that follows reports how the worker died

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            why = f"killed by signal {-code}" + (" (SIGKILL: out of memory, or a kill -9)" if code == -9 else "") if code < 0 else f"exit code {code}"
            raise WorkerError(f"worker died ({why}); log: {self.log_path}\n{self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if reply.get("peak_rss_bytes"):
            self.peak_rss_bytes = int(reply["peak_rss_bytes"])
        if reply.get("event") == "error":
            message = f"{reply.get('error')}; log: {self.log_path}\n{self.log_tail()}"
            self.close()
            raise WorkerError(message)
        return reply

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def log_tail(self, lines: int = 15) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def close(self) -> None:
        if self.process.poll() is None and isinstance(sys.exc_info()[1], KeyboardInterrupt):
            # Stopped (Ctrl-C, or a SIGTERM to the bench alone): the worker would finish its run first, and
            # outlive the bench if that is killed meanwhile, timing itself against the next run.
            self.process.kill()
            self.process.wait()
        if self.process.poll() is None:
            try:
                self.request({"cmd": "exit"})
            except (WorkerError, ValueError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@dataclass
class Cell:
    """One system at one batch size."""

    system: str
    batch_size: int
    status: str = "ok"  # "ok", "failed", or "not run" (a batch refused for memory: asked for, not a failure)
    error: str | None = None
    interleaved: bool = True
    load_s: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    runs: list[RunTiming] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    log: str | None = None


def _spec(system: str, models: ModelSet, settings: BenchSettings, batch_size: int) -> SystemSpec | None:
    if system in ("engine", "engine-int8"):
        model = processor = models.bundles.get(system)
    elif system == "optimum":
        model, processor = models.optimum_dir, models.checkpoint or models.optimum_dir
    else:
        model = processor = models.checkpoint
    if model is None or processor is None:
        return None
    return SystemSpec(
        system=system,
        model_path=str(model),
        processor_path=str(processor),
        threads=settings.threads,
        batch_size=batch_size,
        tokens=settings.tokens,
        max_patches=models.max_patches,
        images=[str(p) for p in models.images],
    )


def plan_systems(settings: BenchSettings, models: ModelSet) -> tuple[list[str], dict[str, str]]:
    """(systems to run, {skipped system: why}) in the order requested."""
    runnable, skipped = [], {}
    for system in settings.systems:
        missing = missing_modules(system)
        if missing:
            hint = f" (install them {install_hint('export')})" if system in ("torch", "optimum") else ""
            skipped[system] = f"not installed here: {', '.join(missing)}{hint}"
        elif system in models.unavailable:
            skipped[system] = models.unavailable[system]
        elif _spec(system, models, settings, 1) is None:
            need = {"torch": "a checkpoint (--checkpoint)", "optimum": "a checkpoint or an Optimum export",
                    "engine": "an fp32 bundle (--model)", "engine-int8": "an int8 bundle (--model)"}
            skipped[system] = f"no model: needs {need.get(system, 'a bundle (--model)')}"
        else:
            runnable.append(system)
    return runnable, skipped


WEIGHT_SUFFIXES = (".onnx", ".onnx.data", ".onnx_data", ".safetensors", ".bin")  # a large graph's weights sit beside it


def _model_bytes(path: str) -> int:
    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def estimate_peak_bytes(spec: SystemSpec, models: ModelSet, measured: dict[str, tuple[int, int]]) -> int:
    """A rough estimate of a worker's peak memory: weights, attention score tensors, slack.

    `measured` holds (batch, peak) already seen for this system; a larger batch adds the
    attention tensors of the extra images to that figure.
    """
    heads = int(models.vision_config.get("num_attention_heads", 12))
    # heads x patches^2 fp32 tensors alive at the peak, per image: a middle guess (Optimum at base size
    # holds ~10: 9.2 GB at batch 4 in BASELINE.md); the measured peak of a smaller batch refines it.
    per_image = heads * models.max_patches**2 * 4 * 6
    guess = int(_model_bytes(spec.model_path) * 1.5) + spec.batch_size * per_image + (400 << 20)
    if spec.system in measured:
        batch, peak = measured[spec.system]
        guess = max(guess, peak + (spec.batch_size - batch) * per_image)
    return guess


CEILING_SKIPPED = "ceiling: skipped (the onnx package is not installed), so the encoder's of-ceiling column is empty (-)"


def measure_ceiling(settings: BenchSettings, log: Log, when: str) -> dict[str, Any] | None:
    """ONNX Runtime MatMul GFLOP/s in a worker of its own; None (with a note) without the onnx package."""
    if not is_installed("onnx"):
        log(CEILING_SKIPPED)
        return None
    worker = Worker({"ceiling": {"threads": settings.threads, "seconds": settings.ceiling_seconds}},
                    settings.threads, settings.out / "logs" / f"ceiling-{when}.log")
    try:
        result: dict[str, Any] = worker.receive()["ceiling"]
    except WorkerError as exc:
        log(f"ceiling ({when}): failed: {exc}")
        return None
    finally:
        worker.close()
    log(f"ceiling ({when}): ONNX Runtime fp32 MatMul {result['gflops_median']:.0f} GFLOP/s median, "
        f"{result['gflops_best']:.0f} best ({settings.threads} threads)")
    return result


def _describe(run: RunTiming) -> str:
    b = run.batch_size
    return (f"{run.total_s:.2f} s ({run.total_s / b:.3f} s/image; encoder {run.encoder_s / b:.3f}, "
            f"decode {run.decode_s / b:.3f} over {run.decode_steps} steps)")


def run_batch_size(
    systems: list[str], batch_size: int, settings: BenchSettings, models: ModelSet, log: Log,
    measured: dict[str, tuple[int, int]], into: list[Cell] | None = None,
) -> list[Cell]:
    """All systems at one batch size: start, warm up, interleaved timed repeats, close. The cells are also
    appended to `into` as soon as they exist, so that a run stopped partway still has the runs they made."""
    specs = {s: spec for s in systems if (spec := _spec(s, models, settings, batch_size)) is not None}
    cells = {s: Cell(system=s, batch_size=batch_size) for s in specs}
    if into is not None:
        into.extend(cells.values())
    _, available = memory_bytes()
    for system, spec in list(specs.items()):
        alone = estimate_peak_bytes(spec, models, measured)
        # The estimate errs high (about 3x for the engine), so only a batch far beyond memory is not started.
        if available is not None and alone > NOT_STARTED_ABOVE * available:
            why = f"not run: would need ~{alone / 2**30:.0f} GiB, {available / 2**30:.1f} GiB available"
            cells[system].status, cells[system].error = "not run", why
            log(f"  b={batch_size} {system}: {why}")
            del specs[system]
    need = sum(estimate_peak_bytes(spec, models, measured) for spec in specs.values())
    interleave = settings.interleave and (available is None or need <= MEMORY_HEADROOM * available)
    if settings.interleave and not interleave:
        log(f"batch {batch_size}: the workers may need ~{need / 2**30:.1f} GiB together, "
            f"{(available or 0) / 2**30:.1f} GiB available: running the systems one after another")
    groups = [list(specs)] if interleave else [[s] for s in specs]
    for group in groups:
        workers: dict[str, Worker] = {}
        try:
            for system in group:
                cells[system].interleaved = interleave
                worker = _start(system, specs[system], settings, cells[system], log)
                if worker is not None:
                    workers[system] = worker
            for round_index in range(settings.repeats):
                order = [group[(i + round_index) % len(group)] for i in range(len(group))]
                for system in order:
                    if system not in workers:
                        continue
                    try:
                        reply = workers[system].request({"cmd": "run"})
                    except WorkerError as exc:  # the runs it made are kept, and marked as cut short
                        _fail(cells[system], exc, log)
                        dead = workers.pop(system)
                        dead.close()
                        cells[system].peak_rss_bytes = dead.peak_rss_bytes
                        continue
                    run = RunTiming(**reply["timing"])
                    cells[system].runs.append(run)
                    log(f"  b={batch_size} {system:<11} repeat {round_index + 1}/{settings.repeats}: {_describe(run)}")
        finally:
            for system, worker in workers.items():
                worker.close()
                cells[system].peak_rss_bytes = worker.peak_rss_bytes
                if worker.peak_rss_bytes:
                    measured[system] = (batch_size, worker.peak_rss_bytes)
    return list(cells.values())


def run_batch_scaling(
    systems: list[str], settings: BenchSettings, models: ModelSet, log: Log, measured: dict[str, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """Each engine system at the smallest and the largest batch size, timed interleaved: both workers alive
    at once, their timed runs alternating. The batch-size phases run one after another, so a machine that
    drifts between them skews the ratio of their throughputs; here drift falls on both alike.
    """
    small, large = min(settings.batch_sizes), max(settings.batch_sizes)
    # Both sizes caption the same images, in whole batches of each: a batch-3 side of 3 and 4 ran 3+1, and its
    # batch of one made batch 3 look slower than it is. Sizes without a small common multiple (7 and 8: 56)
    # would take many times longer: then each side takes the fewest whole batches of its own that cover the
    # larger batch (7 and 8: 14 and 8 images), from the same images in turn.
    common = math.lcm(small, large)
    per_run = {small: common, large: common} if common <= 4 * large else {small: -(-large // small) * small, large: large}
    if per_run[small] != per_run[large]:
        log(f"batch scaling: batch {small} captions {per_run[small]} images a run and batch {large} {per_run[large]} "
            f"(the same {common} for both would take {common // large}x longer)")
    scaling: list[dict[str, Any]] = []
    for system in (s for s in systems if s.startswith("engine")):
        specs = {size: _spec(system, models, settings, size) for size in (small, large)}
        if any(spec is None for spec in specs.values()):
            continue
        for size, spec in specs.items():
            assert spec is not None
            spec.images_per_run = per_run[size]
        entry = {"system": system, "batch_sizes": [small, large], "repeats": settings.repeats,
                 "images_per_run": per_run[large], "small_images_per_run": per_run[small]}  # fmt: skip
        _, available = memory_bytes()
        if available is not None and any(
            estimate_peak_bytes(spec, models, measured or {}) > NOT_STARTED_ABOVE * available for spec in specs.values() if spec
        ):  # as run_batch_size refuses to start it
            why = f"batch {large} is too large for this machine's memory"
            log(f"batch scaling, {system}: skipped ({why})")
            scaling.append({**entry, "skipped": why})
            continue
        cells = {size: Cell(system=system, batch_size=size) for size in specs}
        workers: dict[int, Worker] = {}
        log(f"batch scaling, {system}: batch {small} and {large} interleaved")
        try:
            for size, spec in specs.items():
                assert spec is not None
                worker = _start(system, spec, settings, cells[size], log, log_suffix="-scaling")
                if worker is not None:
                    workers[size] = worker
            for round_index in range(settings.repeats if len(workers) == 2 else 0):
                for size in (small, large) if round_index % 2 == 0 else (large, small):
                    run = RunTiming(**workers[size].request({"cmd": "run"})["timing"])
                    cells[size].runs.append(run)
                    log(f"  scaling {system:<11} b={size} repeat {round_index + 1}/{settings.repeats}: {_describe(run)}")
        except WorkerError as exc:
            log(f"  batch scaling of {system} failed: {str(exc).splitlines()[0]}")
            scaling.append({**entry, "error": str(exc).splitlines()[0]})  # said in the notes; the run fails
            continue
        finally:
            for worker in workers.values():
                worker.close()
        per_image = {size: statistics.median(r.total_s / r.batch_size for r in cells[size].runs) for size in cells if cells[size].runs}
        if len(per_image) == 2:
            scaling.append({
                **entry, "s_per_image": {str(size): value for size, value in per_image.items()},
                "throughput_ratio": per_image[small] / per_image[large],
            })  # fmt: skip
        elif len(workers) < 2:  # a worker that could not start: its cell says why
            scaling.append({**entry, "error": next((c.error for c in cells.values() if c.error), "a worker did not start")})
    return scaling


def _start(
    system: str, spec: SystemSpec, settings: BenchSettings, cell: Cell, log: Log, log_suffix: str = ""
) -> Worker | None:
    log_path = settings.out / "logs" / f"{system}-b{spec.batch_size}{log_suffix}.log"
    cell.log = str(log_path)
    log(f"  b={spec.batch_size} {system:<11} loading {Path(spec.model_path).name} ...")
    worker = Worker({"spec": spec.to_dict()}, settings.threads, log_path)
    try:
        cell.load_s = float(worker.receive()["load_s"])
        for i in range(settings.warmup):
            reply = worker.request({"cmd": "run"})
            run = RunTiming(**reply["timing"])
            cell.warmup_s.append(run.total_s)
            log(f"  b={spec.batch_size} {system:<11} warm-up {i + 1}/{settings.warmup}: {run.total_s:.2f} s "
                f"(loaded in {cell.load_s:.1f} s)")
    except WorkerError as exc:
        _fail(cell, exc, log)
        worker.close()
        cell.peak_rss_bytes = worker.peak_rss_bytes
        return None
    except BaseException:  # stopped while loading or warming up: the worker is not the caller's to end yet
        worker.close()
        raise
    return worker


def _fail(cell: Cell, exc: Exception, log: Log) -> None:
    cell.status, cell.error = "failed", str(exc).splitlines()[0]
    log(f"  b={cell.batch_size} {cell.system}: FAILED: {exc}")


# --- summary -------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(
    cell: Cell, ceiling_gflops: float | None, vision_config: dict[str, Any] | None = None, max_patches: int | None = None
) -> dict[str, Any]:
    """Per-image figures of one cell: medians and ranges over its timed repeats. The encoder's GFLOP/s counts
    the patches each image ran over: max_patches, or its own count where the system cut the padding off."""
    b = cell.batch_size
    runs = cell.runs
    out: dict[str, Any] = {
        "system": cell.system,
        "description": SYSTEMS[cell.system][0],
        "batch_size": b,
        "status": cell.status if runs or cell.status != "ok" else "failed",
        "error": cell.error,
        "interleaved": cell.interleaved,
        "repeats": len(runs),
        "load_s": cell.load_s,
        "warmup_s": cell.warmup_s,
        "peak_rss_bytes": cell.peak_rss_bytes,
        "log": cell.log,
    }
    if not runs:
        return out
    steps = statistics.median(r.decode_steps for r in runs)
    encoder_s = _stats([r.encoder_s / b for r in runs])
    total = _stats([r.total_s / b for r in runs])
    assert encoder_s is not None and total is not None
    out.update(
        preprocess_s_per_image=_stats([r.preprocess_s / b for r in runs]),
        encoder_s_per_image=encoder_s,
        decode_s_per_image=_stats([r.decode_s / b for r in runs]),
        total_s_per_image=total,
        decode_steps=steps,
        # One decoding step of the whole batch (what a token costs in latency) ...
        decode_ms_per_step=_stats([1000 * r.decode_s / max(r.decode_steps, 1) for r in runs]),
        # ... and per image (what it costs in throughput).
        decode_ms_per_token_per_image=_stats([1000 * r.decode_s / max(r.decode_steps, 1) / b for r in runs]),
        images_per_s=b / statistics.median(r.total_s for r in runs),
        captions=runs[-1].captions,
        raw_runs=[{k: v for k, v in r.to_dict().items() if k != "captions"} for r in runs],
    )
    patches = runs[-1].encoder_patches or ([max_patches] * b if max_patches else [])
    flops_per_image = sum(encoder_flops(vision_config, n).total for n in patches) / b if vision_config and patches else None
    if patches:
        out["encoder_patches_per_image"] = sum(patches) / len(patches)
    if flops_per_image and encoder_s["median"] > 0:
        gflops = flops_per_image / encoder_s["median"] / 1e9
        out["encoder_gflops_per_s"] = gflops
        out["encoder_ceiling_fraction"] = gflops / ceiling_gflops if ceiling_gflops else None
    return out


class BenchRun:
    """One bench run: `measure()` times every runnable system at every batch size; `document()` gives the
    results document (see report.py) of what it measured, also after a stop (Ctrl-C, SIGTERM) cut it short."""

    def __init__(self, settings: BenchSettings, models: ModelSet, log: Log) -> None:
        self.settings, self.models, self.log = settings, models, log
        self.started = time.perf_counter()
        settings.out.mkdir(parents=True, exist_ok=True)
        self.systems, self.skipped = plan_systems(settings, models)
        if not self.systems:  # a results table with no row would read as a run that measured something
            raise BenchSetupError("nothing to measure: " + "; ".join(f"{system}: {why}" for system, why in self.skipped.items()))
        self.flops = encoder_flops(models.vision_config, models.max_patches) if models.vision_config else None
        self.ceilings: list[dict[str, Any]] = []
        self.cells: list[Cell] = []
        self.scaling: list[dict[str, Any]] = []

    def measure(self) -> None:
        settings, models, log, systems = self.settings, self.models, self.log, self.systems
        for system, why in self.skipped.items():
            log(f"skipping {system}: {why}")
        if self.flops:
            log(f"encoder work: {self.flops.total / 1e9:.1f} GFLOP per image at {models.max_patches} patches "
                f"({self.flops.linear / 1e9:.1f} linear, {self.flops.attention / 1e9:.1f} attention)")
        self.ceilings += [c for c in [measure_ceiling(settings, log, "start")] if c]
        measured: dict[str, tuple[int, int]] = {}
        for batch_size in settings.batch_sizes:
            log(f"batch size {batch_size}: {', '.join(systems)} ({settings.warmup} warm-up + {settings.repeats} timed each)")
            run_batch_size(systems, batch_size, settings, models, log, measured, into=self.cells)
        if len(settings.batch_sizes) > 1 and settings.interleave:
            self.scaling = run_batch_scaling(systems, settings, models, log, measured)
        end = measure_ceiling(settings, log, "end")
        if end:
            self.ceilings.append(end)

    def measured_anything(self) -> bool:
        return any(cell.runs for cell in self.cells)

    def document(self, stopped: str | None = None) -> dict[str, Any]:
        """The results document. `stopped` names the signal that cut the run short: the cells it never reached
        are left out, and a note says the run is partial."""
        cells = [cell for cell in self.cells if cell.runs or cell.status != "ok" or not stopped]
        ceiling_gflops = statistics.mean(c["gflops_median"] for c in self.ceilings) if self.ceilings else None
        config = self.models.vision_config if self.flops else None
        results = [summarise(cell, ceiling_gflops, config, self.models.max_patches) for cell in cells]
        _compare_captions(results)
        notes = self.models.notes + ([] if self.ceilings or is_installed("onnx") else [CEILING_SKIPPED])
        if stopped:
            notes.append(f"stopped by {stopped} partway: what it had not reached is left out")
        if len(self.settings.batch_sizes) > 1 and not self.settings.interleave:
            notes.append("batch scaling not timed (--no-interleave): the table's batch sizes ran one after another, "
                         "so drift of the machine between them falls into their ratio")
        return {
            "machine": machine_info(self.settings.threads),
            "settings": self.settings.to_dict(),
            "model": self.models.to_dict() | {"encoder_flops_per_image": self.flops.to_dict() if self.flops else None},
            "ceiling": {"matmul_gflops": ceiling_gflops, "measurements": self.ceilings},
            "skipped": self.skipped,
            "notes": notes,
            "stopped": stopped,
            "results": results,
            "batch_scaling": self.scaling,
            "wall_s": time.perf_counter() - self.started,
        }


def _compare_captions(results: list[dict[str, Any]]) -> None:
    """Mark whether each fp32 system's captions equal PyTorch's on the same batch (same model, greedy).

    Compared without surrounding spaces: the engine strips them from captions, PyTorch's decode does not.
    int8 systems are not marked: their numbers differ by design (parity judges them by BLEU).
    """
    def stripped(captions: list[str]) -> list[str]:
        return [caption.strip() for caption in captions]

    reference = {r["batch_size"]: stripped(r["captions"]) for r in results if r["system"] == "torch" and r.get("captions")}
    for r in results:
        if r.get("captions") and r["batch_size"] in reference and r["system"] not in ("torch", "engine-int8"):
            r["captions_match_torch"] = stripped(r["captions"]) == reference[r["batch_size"]]
