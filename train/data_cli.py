"""`edlight data`: generate a synthetic data folder, or check one. Needs only numpy and Pillow."""

from __future__ import annotations

import time
from pathlib import Path

import click

from engine.click_types import FiniteFloatRange, cannot_run, print_result, unwinds_on_stop
from train.data import DataError, check_folder


@click.group("data")
def data() -> None:
    """Generate and check data folders (images + metadata.jsonl / metadata.csv)."""


@data.command("synth", short_help="Write N synthetic images of student work with descriptions.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--n", "n", default=2000, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Same seed, same bytes.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Processes (default: 2 for n >= 400).")
@click.option("--overwrite", is_flag=True, help="Replace a data set that data synth wrote in OUT (its images and metadata).")
@unwinds_on_stop  # SIGTERM/SIGHUP: as Ctrl-C (exit 143/129), the workers stopped and OUT left as it was
def synth(out: Path, n: int, seed: int, workers: int | None, overwrite: bool) -> None:
    """Write N synthetic photos of student math work and their descriptions to OUT."""
    from train.synth import generate

    start = time.perf_counter()
    try:
        generate(out, n, seed=seed, workers=workers, overwrite=overwrite)
    except FileExistsError as exc:
        cannot_run(str(exc))
    except OSError as exc:
        cannot_run(f"{out}: cannot write the data set there ({exc.strerror or exc})")
    click.echo(f"wrote {n} images and metadata.jsonl to {out} in {time.perf_counter() - start:.1f}s (seed {seed})")


@data.command("check", short_help="List every problem in a data folder, or summarise it.")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--caption-column", default="text", show_default=True, help="Metadata column with the description.")
@click.option("--test-ratio", default=0.1, show_default=True, type=FiniteFloatRange(0.0, 1.0, max_open=True), help="For the split count.")
@click.option("--split-seed", default=0, show_default=True, type=int, help="For the split count.")
@unwinds_on_stop
def check(folder: Path, caption_column: str, test_ratio: float, split_seed: int) -> None:
    """Validate a data folder: list every problem (exit 1) or print a summary (exit 0)."""
    try:
        report = check_folder(folder, caption_column=caption_column)
    except DataError as exc:  # the check cannot run (e.g. --caption-column file_name): 2, as for train
        cannot_run(str(exc))
    lines = [f"error: {problem}" for problem in report.problems] + [f"warning: {warning}" for warning in report.warnings]
    if not report.ok:
        lines.append(f"{len(report.problems)} problem(s) in {folder}; {len(report.examples)} usable examples.")
    else:
        lines.append(report.summary(test_ratio=test_ratio, seed=split_seed))
    print_result("\n".join(lines))  # `| head` ends it as SIGPIPE would (141), a full disk is one line (exit 1)
    if not report.ok:
        raise SystemExit(1)
