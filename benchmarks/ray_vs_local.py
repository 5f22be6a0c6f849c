"""Images/s of a local folder run vs the same run on Ray actors, interleaved in one process.

    python -m benchmarks.ray_vs_local --model BUNDLE [--images 64] [--repeats 3] [--actors 2] [--json out.json]

Both runs caption the same folder (generated student-work images, or --folder) into a fresh file with
the same bundle and batch size. Rounds alternate local and Ray so a noisy, shared machine hurts both
alike; the median and the best of the rounds are reported. Local: the Captioner with all cores
(model load not timed). Ray: one local Ray started once (its start-up is reported apart), a fresh actor
pool per round whose start-up and model loads *are* timed, so the Ray figure is a conservative one.
Needs the [distributed] extra; the synthetic folder needs train/ (no torch).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click


def _local_round(bundle: Path, folder: Path, out: Path, batch_size: int, threads: int | None) -> tuple[float, float]:
    """(images/s of the folder run, images/s counting the model load too)."""
    from engine.captioner import Captioner

    started = time.perf_counter()
    captioner = Captioner(bundle, threads=threads, batch_size=batch_size)
    summary = captioner.caption_folder([folder], out, overwrite=True, progress=False)
    done = summary.captioned + summary.failed
    return summary.images_per_s, done / (time.perf_counter() - started)


def _ray_round(bundle: Path, folder: Path, out: Path, batch_size: int, actors: int) -> tuple[float, float]:
    """(images/s including the actors' start-up, seconds until the first records reached the file)."""
    from engine.ray_caption import caption_folder_ray

    first: list[float] = []  # when the first records reached the file
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not first:
            if out.exists() and out.stat().st_size:
                first.append(time.perf_counter())
            time.sleep(0.005)

    if out.exists():
        out.unlink()
    watcher = threading.Thread(target=watch, daemon=True)
    started = time.perf_counter()
    watcher.start()
    try:
        summary = caption_folder_ray([folder], out, bundle, actors=actors, batch_size=batch_size, overwrite=True,
                                     progress=False)
    finally:
        stop.set()
        watcher.join()
    return summary.images_per_s, (first[0] - started) if first else float("nan")


@click.command()
@click.option("--model", "bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images to caption (default: --images generated ones).")
@click.option("--images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--actors", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray (default: all cores).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Local run's threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(bundle: Path, folder: Path | None, images: int, repeats: int, actors: int, cpus: int | None,
         batch_size: int, threads: int | None, json_out: Path | None) -> None:
    import ray

    from engine.session import available_cores

    with tempfile.TemporaryDirectory(prefix="edlight-raybench-") as tmp:
        work = Path(tmp)
        if folder is None:
            from train.synth import generate

            folder = generate(work / "images", n=images, seed=0)
        from engine.folder import collect_inputs

        count = len(collect_inputs([folder]))
        started = time.perf_counter()
        ray.init(address="local", num_cpus=cpus or available_cores(), include_dashboard=False, logging_level="WARNING")
        ray_start_s = time.perf_counter() - started
        local, local_load, on_ray, ray_first = [], [], [], []
        try:
            for round_ in range(repeats):
                # Alternate which goes first, so neither always gets the quieter moment.
                order = ("local", "ray") if round_ % 2 == 0 else ("ray", "local")
                for system in order:
                    if system == "local":
                        run, with_load = _local_round(bundle, folder, work / "local.jsonl", batch_size, threads)
                        local.append(run)
                        local_load.append(with_load)
                    else:
                        with_start, first_s = _ray_round(bundle, folder, work / "ray.jsonl", batch_size, actors)
                        on_ray.append(with_start)
                        ray_first.append(first_s)
                click.echo(f"round {round_ + 1}: local {local[-1]:.2f} img/s ({local_load[-1]:.2f} with model load), "
                           f"ray {on_ray[-1]:.2f} img/s (first records after {ray_first[-1]:.1f} s)", err=True)
            same = (work / "local.jsonl").read_text() == (work / "ray.jsonl").read_text()
        finally:
            ray.shutdown()
    result = {
        "images": count,
        "bundle": str(bundle),
        "batch_size": batch_size,
        "actors": actors,
        "ray_cpus": cpus or available_cores(),
        "ray_start_s": round(ray_start_s, 2),
        "local_images_per_s": [round(v, 3) for v in local],
        "local_with_load_images_per_s": [round(v, 3) for v in local_load],
        "ray_images_per_s": [round(v, 3) for v in on_ray],
        "ray_first_records_s": [round(v, 2) for v in ray_first],
        "local_median": round(statistics.median(local), 3),
        "local_with_load_median": round(statistics.median(local_load), 3),
        "ray_median": round(statistics.median(on_ray), 3),
        "ratio_median": round(statistics.median(on_ray) / statistics.median(local), 3),
        "ratio_best": round(max(on_ray) / max(local), 3),
        "ratio_median_with_load": round(statistics.median(on_ray) / statistics.median(local_load), 3),
        "identical_output": same,
    }
    click.echo(f"{'system':<22}{'median img/s':>14}{'best img/s':>12}")
    click.echo(f"{'local engine':<22}{result['local_median']:>14.2f}{max(local):>12.2f}")
    click.echo(f"{'local + model load':<22}{result['local_with_load_median']:>14.2f}{max(local_load):>12.2f}")
    click.echo(f"{f'ray, {actors} actors':<22}{result['ray_median']:>14.2f}{max(on_ray):>12.2f}")
    click.echo(f"ray/local: median {result['ratio_median']:.2f}x, best {result['ratio_best']:.2f}x "
               f"(vs local + model load: {result['ratio_median_with_load']:.2f}x); ray's first records after "
               f"{statistics.median(ray_first):.1f} s (median: actor start-up + model load + first block); "
               f"identical output: {same}; ray start-up {ray_start_s:.1f} s (not counted)")
    click.echo(json.dumps(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
