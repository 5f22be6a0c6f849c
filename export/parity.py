"""Parity: does the ONNX engine caption like the PyTorch model it was exported from?

Both run on the same images of a data folder's split with the same decoding settings. The report
holds BLEU/chrF of each against the references, their difference, the share of identical captions,
BLEU of the engine against PyTorch, and the first differing captions side by side. It passes when
|BLEU difference| <= tolerance and (fp32) identical share >= min_identical.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.bundle import Bundle, sha256_file
from engine.errors import EdlightError

log = logging.getLogger("edlight.parity")

# BLEU points the engine may differ from PyTorch, by bundle quantization (None = fp32).
DEFAULT_TOLERANCE = {None: 0.1, "int8": 1.0}
# Share of captions that must be identical. int8 changes some argmaxes by design: no floor there.
DEFAULT_MIN_IDENTICAL: dict[str | None, float | None] = {None: 0.99, "int8": None}


class ParityError(EdlightError):
    """Parity cannot be measured (bad bundle/checkpoint/data folder, empty split)."""


@dataclass
class ParityReport:
    """Result of one parity run; `passed` says whether the bundle may stand in for the checkpoint."""

    bundle: str
    checkpoint: str
    data: str
    split: str
    images: int
    quantization: str | None
    num_beams: int
    max_new_tokens: int
    bleu_torch: float
    chrf_torch: float
    bleu_engine: float
    chrf_engine: float
    bleu_diff: float  # engine - torch
    chrf_diff: float
    identical_share: float
    bleu_engine_vs_torch: float
    tolerance: float
    min_identical: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)
    differences: list[dict[str, str]] = field(default_factory=list)  # first differing captions
    seconds_torch: float = 0.0
    seconds_engine: float = 0.0
    data_settings: str = ""  # how the data was read: caption column, split settings and where they came from
    differences_count: int = 0  # images whose captions differ (`differences` keeps the first few)

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        """Everything as JSON-ready values; `brief` drops the caption examples (for the bundle manifest)."""
        data = asdict(self)
        if brief:
            data.pop("differences")
            data.pop("bundle")  # stored inside the bundle, whose path may change (it is staged, then moved)
        return data

    def summary_line(self) -> str:
        verdict = "passed" if self.passed else "FAILED: " + "; ".join(self.failures)
        return (
            f"BLEU torch {self.bleu_torch:.2f} vs engine {self.bleu_engine:.2f} (diff {self.bleu_diff:+.2f}, "
            f"tolerance {self.tolerance}), identical {self.identical_share:.1%} of {self.images} -> {verdict}"
        )

    def table(self) -> str:
        """A human-readable report: scores side by side, then the first differing captions."""
        rows = [
            ("", "BLEU", "chrF"),
            ("PyTorch vs references", f"{self.bleu_torch:.2f}", f"{self.chrf_torch:.2f}"),
            ("engine vs references", f"{self.bleu_engine:.2f}", f"{self.chrf_engine:.2f}"),
            ("difference (engine - PyTorch)", f"{self.bleu_diff:+.2f}", f"{self.chrf_diff:+.2f}"),
            ("engine vs PyTorch", f"{self.bleu_engine_vs_torch:.2f}", ""),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [
            f"parity: {self.bundle} ({self.quantization or 'fp32'}) vs {self.checkpoint}",
            f"  {self.split} split of {self.data}: {self.images} images, num_beams={self.num_beams}, "
            f"max_new_tokens={self.max_new_tokens}; PyTorch {self.seconds_torch:.1f}s, engine {self.seconds_engine:.1f}s",
        ]
        if self.data_settings:
            lines.append(f"  data read with {self.data_settings}")
        lines.append("")
        lines += [f"  {a:<{width}}  {b:>7}  {c:>7}" for a, b, c in rows]
        floor = f" (required >= {percent(self.min_identical)})" if self.min_identical is not None else ""
        lines += ["", f"  identical captions: {self.identical_share:.1%}{floor}", f"  BLEU tolerance: {self.tolerance}"]
        if self.differences:
            lines += ["", f"  first {len(self.differences)} differing captions:"]
            for d in self.differences:
                lines += [f"  - {d['file_name']}", f"      torch : {d['torch']}", f"      engine: {d['engine']}"]
        lines += ["", "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures)]
        return "\n".join(lines)


# Config fields that fix a Pix2Struct model's shape: a checkpoint differing in any of them is not the bundle's source.
_SHAPE_FIELDS = {
    "text_config": ("vocab_size", "hidden_size", "num_layers", "num_heads", "d_kv", "d_ff"),
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "d_kv", "d_ff", "patch_embed_hidden_size"),
}


def _shape_mismatches(checkpoint_config: dict[str, Any], bundle_config: dict[str, Any]) -> list[str]:
    found = []
    for tower, fields in _SHAPE_FIELDS.items():
        mine, theirs = checkpoint_config.get(tower) or {}, bundle_config.get(tower) or {}
        for name in fields:
            if mine.get(name) != theirs.get(name):
                found.append(f"{tower}.{name}: checkpoint {mine.get(name)}, bundle {theirs.get(name)}")
    return found


# save_pretrained's weight files: whole, or shards with their index. Not a Trainer's training_args.bin.
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _same_weights(first: Path, second: Path) -> bool:
    """False when two checkpoint directories hold different weights, as their weight files of the same
    name tell (by sha256). The same weights stored only another way (safetensors or .bin, whole or
    sharded) cannot be told from the files: True then, as when a folder cannot be read."""
    if first.resolve() == second.resolve():
        return True

    def weights(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in folder.iterdir() if WEIGHT_FILE.fullmatch(p.name) and p.is_file()}

    try:
        ours, theirs = weights(first), weights(second)
        return all(sha256_file(ours[name]) == sha256_file(theirs[name]) for name in ours.keys() & theirs.keys())
    except OSError:
        return True  # cannot tell: say nothing


def bleu_difference(bleu_torch: float, bleu_engine: float, tolerance: float) -> tuple[float, str | None]:
    """The engine's BLEU minus PyTorch's as reported (4 decimals), and the failure when it exceeds
    `tolerance`. Decided on the reported figure and said with its digits, so a --tolerance taken from an
    earlier report's bleu_diff passes the same captions."""
    diff = round(bleu_engine - bleu_torch, 4)
    return diff, f"BLEU differs by {diff:+.6g} (> {tolerance:g})" if abs(diff) > tolerance else None


def percent(share: float) -> str:
    """A share as a percentage with the digits it was given (0.804 -> "80.4%", not a rounded "80%")."""
    return f"{share * 100:.6g}%"


def run_parity(
    bundle: str | Path,
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    tolerance: float | None = None,
    min_identical: float | None = None,
    batch_size: int = 8,
    max_differences: int = 10,
    caption_column: str | None = None,
    skip_bad: bool | None = None,
    test_ratio: float | None = None,
    split_seed: int | None = None,
) -> ParityReport:
    """Caption `split` of `data` with the checkpoint (PyTorch generate) and the bundle (engine); compare.

    max_new_tokens defaults to the bundle's generation config, and both sides use the same value.
    tolerance / min_identical default from the bundle's quantization (DEFAULT_TOLERANCE,
    DEFAULT_MIN_IDENTICAL). The data settings (caption_column, skip_bad, test_ratio, split_seed) left as
    None are the ones the checkpoint's training run used (train.checkpoint.data_settings). Raises
    ParityError for an unusable bundle, checkpoint or data folder, or an empty split; a parity failure is
    not an exception but `report.passed == False`.
    """
    from engine.captioner import Captioner
    from train.checkpoint import data_settings, load_checkpoint, position_check, resolve_checkpoint
    from train.data import load_split
    from train.evaluate import corpus_scores, generate_captions

    settings = data_settings(checkpoint, caption_column, skip_bad, test_ratio, split_seed)
    try:
        loaded = Bundle.load(bundle)
        # An image too long and thin for the model's positions is a data problem (neither side can caption it).
        examples = load_split(
            Path(data), split=split, test_ratio=settings.test_ratio, seed=settings.split_seed,
            caption_column=settings.caption_column, skip_bad=settings.skip_bad,
            positions=position_check(loaded.path, loaded.max_patches),
        )  # fmt: skip
    except EdlightError as exc:
        raise ParityError(str(exc)) from exc
    if not examples:
        raise ParityError(f"{data}: the {split} split is empty ({settings.describe()}); parity needs images with references")
    quant = loaded.manifest.quantization
    tol = DEFAULT_TOLERANCE.get(quant, 1.0) if tolerance is None else float(tolerance)
    floor = DEFAULT_MIN_IDENTICAL.get(quant) if min_identical is None else float(min_identical)
    max_new = int(max_new_tokens or loaded.default_max_new_tokens)

    try:
        checkpoint_dir = resolve_checkpoint(checkpoint)  # a hub id: its folder in huggingface_hub's cache
        model, processor = load_checkpoint(checkpoint_dir)
    except (EdlightError, OSError, ValueError) as exc:
        raise ParityError(f"{checkpoint}: cannot load the PyTorch checkpoint ({exc})") from exc
    # Before the long part (captioning the split twice): a checkpoint of another shape cannot be the source.
    mismatches = _shape_mismatches(model.config.to_dict(), loaded.config)
    if processor.image_processor.max_patches != loaded.max_patches:
        mismatches.append(f"max_patches: checkpoint {processor.image_processor.max_patches}, bundle {loaded.max_patches}")
    if mismatches:
        raise ParityError(f"{checkpoint} is not the checkpoint {loaded.path} was exported from: " + "; ".join(mismatches))
    source = Path(loaded.manifest.source)
    if source.is_dir() and not _same_weights(source, checkpoint_dir):
        # Same shape, other weights (another seed or epoch): the engine is not at fault if this fails.
        log.warning("%s was exported from %s, whose weights differ from %s's: expect this check to fail",
                    loaded.path, source, checkpoint)
    failures: list[str] = []

    paths = [e.path for e in examples]
    start = time.perf_counter()
    torch_caps = generate_captions(model, processor, paths, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new)
    seconds_torch = time.perf_counter() - start
    del model

    start = time.perf_counter()
    captioner = Captioner(loaded.path, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new)
    engine_caps = captioner.caption(paths)  # stripped, as evaluate's
    seconds_engine = time.perf_counter() - start

    refs = [e.text for e in examples]
    torch_scores, engine_scores = corpus_scores(torch_caps, refs), corpus_scores(engine_caps, refs)
    same = sum(a == b for a, b in zip(torch_caps, engine_caps, strict=True))
    identical = same / len(examples)
    bleu_diff, too_far = bleu_difference(torch_scores["bleu"], engine_scores["bleu"], tol)
    if too_far:
        failures.append(too_far)
    if floor is not None and identical < floor:
        failures.append(f"identical captions {same} of {len(examples)} ({identical:.1%}) < {percent(floor)}")
    differences = [
        {"file_name": e.file_name, "reference": e.text, "torch": a, "engine": b}
        for e, a, b in zip(examples, torch_caps, engine_caps, strict=True)
        if a != b
    ][:max_differences]
    return ParityReport(
        bundle=str(loaded.path),
        # Absolute, as the manifest's source: the report (and the manifest it goes into) is read from elsewhere.
        checkpoint=str(Path(checkpoint).absolute()) if Path(checkpoint).exists() else str(checkpoint),  # else a hub id
        data=str(Path(data).absolute()),
        split=split,
        images=len(examples),
        quantization=quant,
        num_beams=num_beams,
        max_new_tokens=max_new,
        bleu_torch=round(torch_scores["bleu"], 4),
        chrf_torch=round(torch_scores["chrf"], 4),
        bleu_engine=round(engine_scores["bleu"], 4),
        chrf_engine=round(engine_scores["chrf"], 4),
        bleu_diff=bleu_diff,
        chrf_diff=round(engine_scores["chrf"] - torch_scores["chrf"], 4),
        identical_share=round(identical, 4),
        differences_count=len(examples) - same,
        bleu_engine_vs_torch=round(corpus_scores(engine_caps, torch_caps)["bleu"], 4),
        tolerance=tol,
        min_identical=floor,
        passed=not failures,
        failures=failures,
        differences=differences,
        seconds_torch=round(seconds_torch, 3),
        seconds_engine=round(seconds_engine, 3),
        data_settings=settings.describe(),
    )
