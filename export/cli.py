"""`edlight export`: a thin click layer over export.onnx.export_bundle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from engine.bundle import MANIFEST_NAME
from engine.click_types import (
    FiniteFloatRange,
    GivenPath,
    cannot_run,
    failed,
    interrupted_status,
    print_result,
    say,
    unwinds_on_stop,
)
from engine.errors import EdlightError
from export import ExportCheckFailed
from train.checkpoint import offline_unless_hub_id, run_data_options


class _EchoHandler(logging.Handler):
    """Log records to click's current stderr (which CliRunner swaps per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        say(f"export: {record.getMessage()}")  # a stderr that takes nothing costs the messages, not the export


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=GivenPath(path_type=Path), help="Bundle directory to create.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="int8: dynamic int8 with 7-bit per-channel weights for the encoder and the decoder's image rows, 8-bit MatMulNBits for its token rows (see README).")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Data folder: validate on its test images and store the parity check (engine vs PyTorch BLEU) in the manifest.",
)
@click.option("--tolerance", type=FiniteFloatRange(min=0), default=None,
              help="With --data: max |BLEU difference| for the parity check (default 0.1 fp32, 1.0 int8); a failed check writes no bundle.")
@click.option("--min-identical", type=FiniteFloatRange(0, 1), default=None,
              help="With --data: min share of captions identical to PyTorch's (default 0.99 fp32, none for int8).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out (never a folder holding other files).")
@click.option(
    "--decoder-layout",
    type=click.Choice(["split", "merged"]),
    default=None,
    help="Decoder files to ship (default: merged: as fast as split in the engine, half the memory).",
)
@run_data_options("the --data metadata", "Use the good --data examples, skipping bad files.")
@unwinds_on_stop  # a service manager's stop (SIGTERM) unwinds like Ctrl-C: the half-written bundle is removed
def export(
    checkpoint: Path,
    out: Path,
    quantize: str | None,
    data: Path | None,
    tolerance: float | None,
    min_identical: float | None,
    force: bool,
    decoder_layout: str | None,
    caption_column: str | None,
    skip_bad: bool | None,
    test_ratio: float | None,
) -> None:
    """Export CHECKPOINT (a Pix2Struct save_pretrained directory, or a hub id) to a verified ONNX bundle."""
    if data is None:
        given = {"--tolerance": tolerance, "--min-identical": min_identical, "--caption-column": caption_column,
                 "--skip-bad/--no-skip-bad": skip_bad, "--test-ratio": test_ratio}  # fmt: skip
        if unused := [name for name, value in given.items() if value is not None]:
            raise click.UsageError(f"{', '.join(unused)} only apply with --data (the parity check on its test split)")
    offline_unless_hub_id(checkpoint)
    from export.onnx import DEFAULT_LAYOUT, export_bundle

    logger = logging.getLogger("edlight.export")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):  # stage messages: a base export takes minutes
        logger.addHandler(_EchoHandler())
    logger.setLevel(logging.INFO)
    propagate, logger.propagate = logger.propagate, False  # libraries configure the root logger too: print once
    try:
        bundle = export_bundle(
            checkpoint, out, quantize=quantize, data=data, force=force, decoder_layout=decoder_layout or DEFAULT_LAYOUT,
            caption_column=caption_column, skip_bad=skip_bad, test_ratio=test_ratio, tolerance=tolerance,
            min_identical=min_identical,
        )  # fmt: skip
    except ExportCheckFailed as exc:  # it ran, and what it wrote did not match PyTorch
        failed(str(exc))
    except EdlightError as exc:
        cannot_run(str(exc))
    except KeyboardInterrupt as exc:  # also a service manager's stop; the partial bundle is gone already (export_bundle's finally)
        say(f"interrupted: no partial bundle is left at {out}; run the same command again")
        raise SystemExit(interrupted_status(exc)) from None
    finally:
        logger.propagate = propagate
    manifest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    validation = manifest.get("validation", {})
    # The bundle is complete and its manifest holds all of this: a stdout that takes nothing costs only the lines.
    lines = [
        f"bundle: {bundle}",
        f"  decoder layout: {manifest['decoder_layout']}, quantization: {manifest.get('quantization') or 'fp32'}, "
        f"max_patches: {manifest['max_patches']}",
    ]
    for kind, result in validation.items():
        # The export compares a few tokens per image (a check of the graphs), not whole captions: parity does.
        first = f" (the first {result['max_new_tokens']})" if isinstance(result.get("max_new_tokens"), int) else ""
        lines.append(
            f"  {kind} vs PyTorch on {result['images']} images: identical greedy tokens{first} {result['identical_share']:.0%}, "
            f"token agreement {result['token_agreement']:.1%}, encoder max |diff| {result['encoder_max_abs_diff']:.2g}"
        )
    parity = manifest.get("parity")
    if parity:
        lines.append(
            f"  parity on {parity.get('split')} split ({parity.get('images')} images): BLEU torch {parity['bleu_torch']:.2f}, "
            f"engine {parity['bleu_engine']:.2f}, identical {parity['identical_share']:.1%} -> "
            f"{'passed' if parity['passed'] else 'FAILED'}"
        )
    print_result("\n".join(lines), essential=False)
