"""`edlight parity`: a thin click layer over export.parity.run_parity.

Exit 0 passed, 1 parity failed, 2 the check cannot run (bad bundle, checkpoint, data or --out).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.click_types import (
    FiniteFloatRange,
    cannot_run,
    interrupted_status,
    print_result,
    say,
    show_and_save,
    unwinds_on_stop,
)
from engine.errors import EdlightError
from engine.folder import check_report_out, json_keys, write_report
from train.checkpoint import offline_unless_hub_id, run_data_options


@click.command("parity")
@click.option("--model", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory (edlight export).")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="PyTorch checkpoint it came from (a folder, or a hub id).")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Data folder (images + metadata).")
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True)
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the bundle's generation config.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--tolerance", type=FiniteFloatRange(min=0), default=None, help="Max |BLEU difference| (default 0.1 fp32, 1.0 int8).")
@click.option("--min-identical", type=FiniteFloatRange(0, 1), default=None, help="Min share of identical captions (default 0.99 fp32, none for int8).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the full report as JSON here.")
@run_data_options("the metadata", "Compare on the good examples, skipping bad files.")
@unwinds_on_stop
def parity(
    bundle: Path,
    checkpoint: Path,
    data: Path,
    split: str,
    num_beams: int,
    max_new_tokens: int | None,
    batch_size: int,
    tolerance: float | None,
    min_identical: float | None,
    out: Path | None,
    caption_column: str | None,
    skip_bad: bool | None,
    test_ratio: float | None,
) -> None:
    """Check that a bundle's captions and BLEU match the PyTorch checkpoint's on the same images."""
    offline_unless_hub_id(checkpoint)
    from export.parity import run_parity

    if out is not None:
        try:
            check_report_out(  # before minutes of captioning
                out, "a parity report", lambda text: {"bundle", "bleu_torch", "bleu_engine", "passed"} <= set(json_keys(text))
            )
        except EdlightError as exc:
            cannot_run(str(exc))
    try:
        report = run_parity(
            bundle,
            checkpoint,
            data,
            split=split,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            tolerance=tolerance,
            min_identical=min_identical,
            batch_size=batch_size,
            caption_column=caption_column,
            skip_bad=skip_bad,
            test_ratio=test_ratio,
        )
    except EdlightError as exc:
        cannot_run(str(exc))
    except KeyboardInterrupt as exc:  # not exit 1, which says the check failed
        say("interrupted: the check did not finish; nothing was written")
        raise SystemExit(interrupted_status(exc)) from None
    show_and_save(report.table(), out, lambda path: write_report(path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"))
    if out is not None:
        print_result(f"report: {out}")
    if not report.passed:
        click.get_current_context().exit(1)

