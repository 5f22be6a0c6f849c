"""Start-up of engine bundles: a fresh process's seconds from loading a bundle to its first caption.

    python -m benchmarks.startup --model BUNDLE [--model BUNDLE ...] [--rounds 5]

Every measurement is a new Python process (as a server or a Ray actor starting), with the bundle's files
already in the page cache after the first round; the bundles alternate round by round, so a machine that
drifts slows them all alike. Each process reports the seconds to import the engine, to build the
Captioner (verify the bundle, load its ONNX Runtime sessions) and to caption one image (tokens forced as
in `edlight bench`), and its peak RSS. Prints the median of the rounds after one warm-up round per bundle.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.cli import default_cache
from benchmarks.machine import peak_rss_bytes

PARTS = ("import_s", "load_s", "first_caption_s")


def measure_once(bundle: Path, image: Path, tokens: int, threads: int | None) -> dict[str, float]:
    """Run in the fresh process: time the engine's import, the bundle's load and one caption."""
    started = time.perf_counter()
    from engine.captioner import Captioner

    imported = time.perf_counter()
    captioner = Captioner(bundle, threads=threads, batch_size=1, max_new_tokens=tokens, min_new_tokens=tokens)
    loaded = time.perf_counter()
    captioner.caption([image])
    captioned = time.perf_counter()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "first_caption_s": captioned - loaded,
        "peak_rss_gib": peak_rss_bytes() / 2**30,  # VmHWM: ru_maxrss would carry the parent's RSS at fork over
    }


def run_fresh(bundle: Path, image: Path, tokens: int, threads: int | None) -> dict[str, float]:
    """`measure_once` in a new interpreter; raises ClickException with its error output if it fails."""
    command = [sys.executable, "-m", "benchmarks.startup", "--child", str(bundle), "--image", str(image),
               "--tokens", str(tokens)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"{bundle}: the measuring process failed:\n{done.stderr.strip()[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@click.command()
@click.option("--model", "bundles", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True,
              help="An engine bundle; repeat to compare several.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds after one warm-up round.")
@click.option("--tokens", type=click.IntRange(min=1), default=20, show_default=True, help="Generated tokens, forced.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads [default: all cores].")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The image to caption [default: the first generated benchmark image of `edlight bench`].")
@click.option("--child", type=click.Path(path_type=Path), default=None, hidden=True)
def main(bundles: tuple[Path, ...], rounds: int, tokens: int, threads: int | None, image: Path | None, child: Path | None) -> None:
    """Seconds from loading a bundle to its first caption, each time in a fresh process."""
    if child is not None:
        assert image is not None
        click.echo(json.dumps(measure_once(child, image, tokens, threads)))
        return
    if not bundles:
        raise click.UsageError("give at least one --model")
    if image is None:
        from benchmarks.models import bench_images

        image = bench_images(default_cache(), lambda message: click.echo(message, err=True), None, limit=1)[0]
    runs: dict[Path, list[dict[str, float]]] = {bundle.resolve(): [] for bundle in bundles}
    for round_ in range(rounds + 1):  # round 0 warms up (the page cache, Python's bytecode cache)
        for bundle, results in runs.items():
            result = run_fresh(bundle, image.resolve(), tokens, threads)
            if round_:
                results.append(result)
    click.echo(f"median of {rounds} fresh processes per bundle, interleaved; {tokens} forced tokens, image {image}")
    for bundle, results in runs.items():
        cells = {key: statistics.median(r[key] for r in results) for key in (*PARTS, "peak_rss_gib")}
        click.echo(
            f"{bundle}: load {cells['load_s']:.2f} s + first caption {cells['first_caption_s']:.2f} s = "
            f"{cells['load_s'] + cells['first_caption_s']:.2f} s (import {cells['import_s']:.2f} s; "
            f"peak RSS {cells['peak_rss_gib']:.2f} GiB)"
        )


if __name__ == "__main__":
    main()
