"""Greedy/beam captioning with a PyTorch checkpoint, corpus BLEU/chrF, and `edlight evaluate`.

BLEU and chrF are sacrebleu's corpus scores with its defaults (BLEU: 13a
tokenizer, exp smoothing); hypotheses and references are compared verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import ImageError
from engine.folder import check_report_out, json_keys, write_report
from engine.images import describe, load_image
from engine.preprocess import PatchConfig, position_error, position_limit_of

ImageInput = str | Path | Image.Image


def load_rgb(image: ImageInput, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path or PIL image, loaded exactly as the engine loads it.

    EXIF rotation applied, alpha flattened onto white, 16-bit scaled (engine.images), so PyTorch and
    ONNX captions see the same pixels. Raises engine.errors.ImageError naming the file when it cannot
    be decoded (`name` labels an already opened PIL image in that message).
    """
    return load_image(image, name=name)


def encode_images(
    processor: Any, images: Sequence[Image.Image], standardizations: Sequence[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """Flattened patches + attention mask (torch tensors) with the processor's own max_patches.

    Calls the image processor directly: `Pix2StructProcessor.__call__` would apply
    its own default of 2048 patches and ignore the checkpoint's setting. `standardizations`: a
    (mean, std) per image to normalise with instead of the image's own (training's shrunk images).
    """
    ip = processor.image_processor
    inputs: list[Any] = list(images)
    options: dict[str, Any] = {}
    if standardizations is not None and ip.do_normalize:
        # Normalising is affine and the resize that follows keeps constants, so normalising first with
        # given statistics is what the processor does with its own.
        inputs = [(np.asarray(image, dtype=np.float32) - np.float32(mean)) / np.float32(std)
                  for image, (mean, std) in zip(inputs, standardizations, strict=True)]
        options["do_normalize"] = False
    # channels_last: PIL images are (height, width, 3), and transformers' guess reads an image 1 or 3
    # pixels high as channels-first, scrambling its pixels or failing.
    enc = ip(images=inputs, max_patches=ip.max_patches, return_tensors="pt", input_data_format="channels_last", **options)
    return {"flattened_patches": enc["flattened_patches"], "attention_mask": enc["attention_mask"]}


def patch_config_of(processor: Any) -> PatchConfig:
    """The engine's PatchConfig of a Pix2StructProcessor (its max_patches and patch size)."""
    ip = processor.image_processor
    size = getattr(ip, "patch_size", None) or {"height": 16, "width": 16}
    return PatchConfig(int(ip.max_patches), int(size["height"]), int(size["width"]))


def encode_files(processor: Any, images: Sequence[ImageInput], position_limit: int | None = None) -> dict[str, Any]:
    """`encode_images` of paths or PIL images, loaded and encoded one at a time.

    The processor normalises a whole batch in float32 at full resolution at once (about 220 MB per
    12-megapixel photo: 7 GB for an evaluation batch of 32); one at a time, only the patches add up. The
    patches are the same: the processor treats each image on its own. With `position_limit` (the model's
    row/column positions), an image whose grid goes beyond them raises ImageError naming it, as the engine
    does (the model would fail with an IndexError).
    """
    import torch

    config = patch_config_of(processor)
    encoded = []
    for image in images:
        rgb = load_rgb(image)
        beyond = None if position_limit is None else position_error(*rgb.size, config, position_limit)
        if beyond is not None:
            raise ImageError(f"{describe(image)}: {beyond}")
        encoded.append(encode_images(processor, [rgb]))
    return {key: torch.cat([enc[key] for enc in encoded]) for key in ("flattened_patches", "attention_mask")}


def generate_from_patches(
    model: Any,
    processor: Any,
    flattened_patches: Any,
    attention_mask: Any,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Decode one already-encoded batch to stripped caption strings.

    Without `max_new_tokens`, the length is the model's generation config's as `generate` reads it
    (max_new_tokens, else max_length, else 20 tokens): the rule the engine applies to a bundle.
    """
    import torch

    length = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    with torch.inference_mode():
        ids = model.generate(
            flattened_patches=flattened_patches,
            attention_mask=attention_mask,
            **{**engine_decoding(model), "num_beams": num_beams, **length},
        )
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def engine_decoding(model: Any) -> dict[str, Any]:
    """`generate` settings that decode as the engine decodes the model's export: the generation settings the
    engine does not apply switched off (engine.bundle.UNAPPLIED_GENERATION: a checkpoint's stop_strings or
    max_time broke or cut short the test BLEU of train, evaluate and parity, which then judged a decoding the
    engine never does), and the start, pad and end tokens as the engine reads them (config.json's where
    generation_config.json leaves one out, where transformers would use none)."""
    from engine.bundle import UNAPPLIED_GENERATION, ModelSettings

    where = Path(str(getattr(model, "name_or_path", "") or "."))
    settings = ModelSettings(where, model.config.to_dict(), model.generation_config.to_dict())
    return {
        **UNAPPLIED_GENERATION,
        "decoder_start_token_id": settings.decoder_start_token_id,
        "pad_token_id": settings.pad_token_id,
        "eos_token_id": settings.eos_token_ids,
    }


def generate_captions(
    model: Any,
    processor: Any,
    images: Sequence[ImageInput],
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Captions for `images` (paths or PIL images), in input order.

    Greedy when num_beams=1. `max_new_tokens` defaults to the model's generation config.
    Raises engine.errors.ImageError naming the file for an unreadable image.
    """
    was_training = model.training
    model.eval()
    out: list[str] = []
    position_limit = position_limit_of(model.config.to_dict())
    try:
        for start in range(0, len(images), batch_size):
            enc = encode_files(processor, images[start : start + batch_size], position_limit)
            out.extend(
                generate_from_patches(
                    model, processor, **enc, num_beams=num_beams, max_new_tokens=max_new_tokens
                )
            )
    finally:
        model.train(was_training)
    return out


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults) of `hypotheses` against one reference each.

    Raises ValueError if the two lists differ in length. Empty lists score 0.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return {"bleu": 0.0, "chrf": 0.0}
    hyps, refs = list(hypotheses), [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hyps, refs).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, refs).score),
    }


@dataclass
class EvalReport:
    """Scores of a checkpoint on one split, with every prediction next to its reference."""

    checkpoint: str
    data: str
    split: str
    n: int
    bleu: float
    chrf: float
    predictions: list[dict[str, str]] = field(default_factory=list)
    data_settings: str = ""  # how the data was read, and where the settings came from

    def summary(self) -> str:
        line = f"{self.split}: {self.n} images  BLEU {self.bleu:.2f}  chrF {self.chrf:.2f}"
        return f"data read with {self.data_settings}\n{line}" if self.data_settings else line

    def write_predictions(self, out: str | Path) -> None:
        """Write the predictions to `out` as JSON lines, atomically (OutputError when it cannot)."""
        write_report(Path(out), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.predictions))


PREDICTION_FIELDS = ("file_name", "reference", "prediction")  # the keys of every line of a predictions file


def check_predictions_out(out: str | Path) -> None:
    """Raise OutputError when `out` cannot take predictions: a folder, an unwritable place, or an
    existing file that holds something else (predictions are JSON lines: the first one tells)."""
    check_report_out(Path(out), "predictions", lambda head: tuple(json_keys(head.split("\n", 1)[0])) == PREDICTION_FIELDS)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    test_ratio: float | None = None,
    split_seed: int | None = None,
    caption_column: str | None = None,
    skip_bad: bool | None = None,
) -> EvalReport:
    """Caption `split` of the data folder with `checkpoint` and score it against the references.

    `out` (optional) receives JSONL lines {"file_name", "reference", "prediction"}. The data settings left
    as None are the ones the checkpoint's training run used (train.checkpoint.data_settings), so the test
    split is the one it was scored on. Raises CheckpointError for a bad checkpoint, DataError for a bad
    data folder or an empty split, ValueError for an unknown split and OutputError for an `out` that
    cannot take the predictions (checked before any captioning: a folder, an unwritable place, or an
    existing file that holds no predictions); `out` is written atomically.
    """
    from train.checkpoint import data_settings, load_checkpoint
    from train.data import DataError, load_split

    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be test, train or all, got {split!r}")
    if out is not None:
        check_predictions_out(out)
    settings = data_settings(checkpoint, caption_column, skip_bad, test_ratio, split_seed)
    model, processor = load_checkpoint(checkpoint)
    examples = load_split(
        Path(data),
        split=split,
        test_ratio=settings.test_ratio,
        seed=settings.split_seed,
        caption_column=settings.caption_column,
        skip_bad=settings.skip_bad,
        positions=(patch_config_of(processor), position_limit_of(model.config.to_dict())),
    )
    if not examples:  # a score of 0 would look like a real one
        skipped = len(getattr(examples, "skipped", []))
        why = f"{skipped} bad entries skipped, none left; " if skipped else ""
        raise DataError(f"{data}: the {split} split is empty ({why}data read with {settings.describe()}): nothing to score")
    hyps = generate_captions(
        model,
        processor,
        [e.path for e in examples],
        batch_size=batch_size,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )
    refs = [e.text for e in examples]
    scores = corpus_scores(hyps, refs)
    preds = [
        {"file_name": e.file_name, "reference": e.text, "prediction": h}
        for e, h in zip(examples, hyps, strict=True)
    ]
    report = EvalReport(
        str(checkpoint), str(data), split, len(examples), scores["bleu"], scores["chrf"], preds, settings.describe()
    )
    if out is not None:
        report.write_predictions(out)
    return report
