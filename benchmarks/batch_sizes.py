"""Seconds per image of engine bundles at several batch sizes, interleaved in one process.

    python -m benchmarks.batch_sizes --model BUNDLE [--model BUNDLE ...] [--batch-sizes 1,8] [--rounds 5]

`edlight bench` runs each batch size in its own worker processes, one batch size after another, so a
machine that drifts between them skews the ratio of two batch sizes. Here every bundle and batch size
has its own Captioner in one process, and the rounds alternate between all of them: each round captions
one batch of the largest size's images (a different image each round for smaller sizes). Tokens are
forced (min = max new tokens) as in `edlight bench`; one warm-up round is not timed. Prints the median
seconds per image and each batch size's throughput relative to the first. Imports only the engine
(and train/ for the generated images).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click

from benchmarks.cli import batch_size_list, default_cache


def measure(
    bundles: list[Path], images: list[Path], batch_sizes: list[int], rounds: int, tokens: int, threads: int | None
) -> dict[str, dict[int, list[float]]]:
    """Seconds per image of every round, per bundle and batch size."""
    from engine.captioner import Captioner

    if len(images) < max(batch_sizes):
        raise click.UsageError(f"{len(images)} images, fewer than the largest batch size {max(batch_sizes)}")
    captioners = {
        (str(bundle), size): Captioner(bundle, threads=threads, batch_size=size, max_new_tokens=tokens, min_new_tokens=tokens)
        for bundle in bundles
        for size in batch_sizes
    }
    seconds: dict[str, dict[int, list[float]]] = {str(b): {size: [] for size in batch_sizes} for b in bundles}
    for round_ in range(rounds + 1):  # round 0 warms up
        for (bundle, size), captioner in captioners.items():
            first = (round_ * size) % (len(images) - size + 1)
            batch = images[first : first + size]
            started = time.perf_counter()
            captioner.caption(batch)
            if round_:
                seconds[bundle][size].append((time.perf_counter() - started) / len(batch))
    return seconds


@click.command()
@click.option("--model", "bundles", type=click.Path(exists=True, file_okay=False, path_type=Path), multiple=True, required=True,
              help="An engine bundle; repeat to compare several.")
@click.option("--batch-sizes", "sizes", default="1,8", show_default=True, callback=batch_size_list,
              help="Comma-separated batch sizes; the first is the reference.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds after one warm-up round.")
@click.option("--tokens", type=click.IntRange(min=1), default=20, show_default=True, help="Generated tokens, forced.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads [default: all cores].")
@click.option("--images", "folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images to caption [default: the generated benchmark images of `edlight bench`].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the rounds as JSON.")
def main(bundles: tuple[Path, ...], sizes: list[int], rounds: int, tokens: int, threads: int | None, folder: Path | None, json_out: Path | None) -> None:
    """Seconds per image of engine bundles at several batch sizes, interleaved in one process."""
    from benchmarks.models import bench_images
    from benchmarks.settings import BENCH_IMAGES
    from engine.errors import EdlightError
    from engine.folder import check_report_out, json_keys, write_report

    if len({b.resolve() for b in bundles}) != len(bundles):
        raise click.UsageError("a --model is given twice")
    if json_out is not None:  # before minutes of measuring; never over a file of something else
        try:
            check_report_out(json_out, "batch-size timings", lambda text: "seconds_per_image" in json_keys(text))
        except EdlightError as exc:
            raise click.UsageError(str(exc)) from exc
    try:
        # A folder of one's own gives as many images as the largest batch needs.
        images = bench_images(default_cache(), lambda message: click.echo(message, err=True), folder,
                              limit=max(BENCH_IMAGES, *sizes))
        seconds = measure(list(bundles), images, sizes, rounds, tokens, threads)
    except EdlightError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"median seconds per image over {rounds} interleaved rounds, {tokens} forced tokens")
    for bundle, by_size in seconds.items():
        reference = statistics.median(by_size[sizes[0]])
        cells = [f"batch {size}: {statistics.median(v):.3f} s/img (x{reference / statistics.median(v):.3f})" for size, v in by_size.items()]
        click.echo(f"{bundle}: " + "; ".join(cells))
    if json_out is not None:
        try:
            write_report(json_out, json.dumps({"tokens": tokens, "rounds": rounds, "seconds_per_image": seconds}, indent=2) + "\n")
        except EdlightError as exc:
            raise click.ClickException(str(exc)) from exc



if __name__ == "__main__":
    main()
