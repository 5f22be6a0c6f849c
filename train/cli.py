"""`edlight train` and `edlight evaluate`: thin click layers over train.loop.train and train.evaluate."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import click

from engine.click_types import (
    FiniteFloatRange,
    cannot_run,
    failed,
    interrupted_status,
    print_result,
    say,
    show_and_save,
    unwinds_on_stop,
)
from engine.errors import EdlightError, ImageError
from engine.folder import OutputError
from train.checkpoint import read_run_config, run_data_options
from train.loop import PRECISIONS, TrainDiverged, best_record, data_worker_died, lost_another_process


def _resume_note(out: Path) -> str:
    """What an interrupted run leaves in `out`, and how to go on."""
    # An interruption between the two renames of a save leaves the previous last/ set aside as .last.old,
    # which --resume puts back (train.checkpoint.recover).
    if not any((folder / "trainer_state.pt").is_file() for folder in (out / "last", out / ".last.old")):
        return f"no epoch was finished; nothing to resume in {out}"
    # best/ comes after the epoch's evaluation: a stop during the first one leaves none yet.
    best = f" (the best so far in {out / 'best'})" if (out / "best").is_dir() else ""
    return f"the latest finished epoch is in {out / 'last'}{best}; continue with the same command plus --resume"


def _own_message(exc: Exception) -> str:
    """`exc`'s message without the traceback text a DataLoader worker's error arrives wrapped in."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _gist(exc: BaseException) -> str:
    """The gist of a collective's error: gloo's first sentence, without its source location."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])  # "[.../gloo/transport/tcp/pair.cc:553] "
    return line.split(". ")[0]


@click.command()
@click.option(
    "--data", "data", required=True, type=click.Path(path_type=Path), help="Data folder (images + metadata)."
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run directory (best/, last/, metrics).",
)
@click.option(
    "--base", type=str, default=None, help="Pix2Struct checkpoint to fine-tune: a save_pretrained folder, or a hub id (e.g. google/pix2struct-textcaps-base)."
)
@click.option(
    "--preset", type=click.Choice(["tiny", "small", "base"]), default=None, help="Build a model from scratch."
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the preset's: tiny 22, small 10, base 5; 5 with --base; with --resume, the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per step per process (default: the preset's: tiny and small 16, base 4; 8 with --base).")
@click.option(
    "--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True, max=1e6), default=None, help="Peak learning rate, AdamW, warmup then cosine decay (default: the preset's: tiny 5e-4, small 1e-3, base 1e-4; 1e-4 with --base).")
@click.option("--max-patches", type=click.IntRange(min=4), default=None, help="Patch budget per image, at least 4 (default: the model's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the model's initialisation, the batch order and augmentation.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last/ checkpoint.")
@click.option(
    "--skip-bad", is_flag=True, help="Train on the good examples and skip bad files (default: refuse)."
)
@click.option("--no-augment", is_flag=True, help="Turn off training-time augmentation.")
@click.option(
    "--lead-weight", type=FiniteFloatRange(min=0, min_open=True), default=None,
    help="Loss weight of each caption's first --lead-tokens tokens (default: the preset's: tiny 5, others 1; 1 with --base).",
)
@click.option(
    "--lead-tokens", type=click.IntRange(min=0), default=None, help="How many opening tokens --lead-weight covers (default: 3)."
)
@click.option("--caption-column", default="text", show_default=True, help="Caption column of the metadata.")
@click.option(
    "--test-ratio", type=FiniteFloatRange(0, 1, max_open=True), default=0.1, show_default=True,
    help="Share of files in the test split (0 to 1); files below split folders (train/, test/, validation/ ...: see README) stay in theirs.",
)
@click.option(
    "--max-new-tokens", type=click.IntRange(min=1), default=None,
    help="Caption length of the per-epoch evaluation, saved in the checkpoints for the export and the engine "
    "(default: the preset's: tiny 48, others 64; with --base or --resume the checkpoint's own, else 64).",
)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Data loader workers per process.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Torch threads per process (default: cores left after workers)."
)
@click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="Training forward pass in bf16 autocast or fp32; auto: bf16 where the processor computes bf16 natively.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar (none off a terminal either): a line at each quarter epoch and at least every 5 minutes.")
@unwinds_on_stop  # a service manager's stop or a closed terminal: as Ctrl-C
def train(
    data: Path,
    out: Path,
    base: str | None,
    preset: str | None,
    epochs: int | None,
    batch_size: int | None,
    grad_accum: int,
    lr: float | None,
    max_patches: int | None,
    seed: int,
    resume: bool,
    skip_bad: bool,
    no_augment: bool,
    lead_weight: float | None,
    lead_tokens: int | None,
    caption_column: str,
    test_ratio: float,
    max_new_tokens: int | None,
    workers: int,
    threads: int | None,
    precision: str,
    no_progress: bool,
) -> None:
    """Fine-tune Pix2Struct on DATA; writes RUN/best, RUN/last, metrics.jsonl and curves.png.

    Runs unchanged under `torchrun` for several processes (or `accelerate launch` on GPUs; on CPUs it starts one).
    """
    from engine.session import too_many_threads
    from train.loop import TrainConfig
    from train.loop import train as run_training

    # torch's threads beyond the cores only wait (64 on 2 cores: 5x slower). Under torchrun every process on
    # this machine (LOCAL_WORLD_SIZE) runs that many.
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    processes = int(local) if local.isdigit() else 1  # set by torchrun; anything else is no count of processes
    if threads is not None and (problem := too_many_threads(threads, max(1, processes))):
        cannot_run(f"--{problem}")
    if lead_tokens == 0 and lead_weight is not None and lead_weight != 1.0 and os.environ.get("RANK", "0") == "0":
        say(f"warning: --lead-weight {lead_weight:g} weighs nothing with --lead-tokens 0")
    if (base is None) == (preset is None):
        saved = read_run_config(out) if resume and base is None and preset is None else {}
        started = (f"--preset {saved['preset']}" if isinstance(saved.get("preset"), str)
                   else f"--base {shlex.quote(saved['base'])}" if isinstance(saved.get("base"), str) else None)  # fmt: skip
        hint = f" ({shlex.quote(str(out))} was started with {started}: resume with the command that started it plus --resume)" if started else ""
        raise click.UsageError(f"give exactly one of --base CHECKPOINT or --preset NAME{hint}")
    cfg = TrainConfig(
        data=data,
        out=out,
        base=base,
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        max_patches=max_patches,
        seed=seed,
        resume=resume,
        skip_bad=skip_bad,
        augment=not no_augment,
        lead_weight=lead_weight,
        lead_tokens=lead_tokens,
        caption_column=caption_column,
        test_ratio=test_ratio,
        max_new_tokens=max_new_tokens,
        num_workers=workers,
        threads=threads,
        precision=precision,
        progress=not no_progress,
    )
    try:
        result = run_training(cfg)
    except KeyboardInterrupt as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one word for the run, not one per process
            say(f"interrupted: {_resume_note(out)}")
        raise SystemExit(interrupted_status(exc)) from None
    except EdlightError as exc:
        if getattr(exc, "said_by_first_process", False):  # a multi-process run's checks: process 0 says it
            raise SystemExit(2) from None
        if isinstance(exc, TrainDiverged):  # the run started and failed (a resume would diverge the same way)
            failed(str(exc))
        if isinstance(exc, (ImageError, OutputError)):  # an image gone since the data check, a full disk: mid-training
            failed(f"{_own_message(exc)}\n{_resume_note(out)}")
        cannot_run(str(exc))
    except (RuntimeError, ConnectionError, EOFError) as exc:
        if (worker := data_worker_died(exc)) is not None:
            failed(
                f"a data-loading worker died ({worker}); most often the kernel killed it when memory ran out: lower "
                f"--batch-size, or --workers 0 (images prepared in the training process)\n{_resume_note(out)}"
            )
        if not lost_another_process(exc):
            raise
        # Another process of a torchrun died (killed, out of memory, its own error above): this one's
        # collective failed. Its words say what happened; this one says where the run stands.
        failed(f"another process of this run stopped ({_gist(exc)})\n{_resume_note(out)}")
    if not result.is_main:
        return
    if result.metrics:
        last = result.metrics[-1]
        best = best_record(result.metrics)
        summary = f"done: {len(result.metrics)} epochs, last loss {last['loss']:.4f}"
        if best is not None and best.get("bleu") is not None:
            summary += f", best test BLEU {best['bleu']:.2f} (epoch {best['epoch']})"
        click.echo(summary)
    click.echo(f"best: {result.best_dir}\nlast: {result.last_dir}")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--data", "data", required=True, type=click.Path(path_type=Path), help="Data folder (images + metadata)."
)
@click.option("--split", type=click.Choice(["test", "train", "all"]), default="test", show_default=True)
@click.option(
    "--out", "out", type=click.Path(path_type=Path), default=None, help="Write predictions (JSONL) here."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="Default: the checkpoint's generation config.")
@run_data_options("the metadata", "Score the good examples and skip bad files.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@unwinds_on_stop
def evaluate(
    checkpoint: Path,
    data: Path,
    split: str,
    out: Path | None,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int | None,
    caption_column: str | None,
    test_ratio: float | None,
    skip_bad: bool | None,
    as_json: bool,
) -> None:
    """BLEU and chrF of CHECKPOINT's (a folder, or a hub id) captions on a split of DATA (sacrebleu defaults)."""
    from train.evaluate import check_predictions_out, evaluate_checkpoint

    try:
        if out is not None:
            check_predictions_out(out)  # before any captioning
        report = evaluate_checkpoint(
            checkpoint,
            data,
            split=split,
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            caption_column=caption_column,
            test_ratio=test_ratio,
            skip_bad=skip_bad,
        )
    except (EdlightError, ValueError, OSError) as exc:
        cannot_run(str(exc))
    except KeyboardInterrupt as exc:
        say("interrupted: nothing was written")
        raise SystemExit(interrupted_status(exc)) from None
    if as_json and report.data_settings:  # on stderr, so that stdout stays the JSON alone; its warning too
        say(f"data read with {report.data_settings}")
    scores = json.dumps({"split": report.split, "n": report.n, "bleu": report.bleu, "chrf": report.chrf}) if as_json else report.summary()
    show_and_save(scores, out, report.write_predictions)
    if out is not None and as_json:
        say(f"predictions: {out}")  # --json: stdout holds the JSON alone
    elif out is not None:
        print_result(f"predictions: {out}")
