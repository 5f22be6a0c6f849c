"""Check an exported bundle against its PyTorch model on real images.

Optimum's own validation runs random dummy tensors through each graph. This module adds what a
user sees: real images through the real processor, the encoder's output compared with PyTorch's,
and a greedy generation compared token for token. The ONNX side is a minimal greedy loop over the
raw sessions (both decoder layouts), independent of the engine, so a mismatch here points at the
export, not at the engine's preprocessing or decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw

from export import ExportError


@dataclass
class GreedyComparison:
    """Greedy token sequences of PyTorch and ONNX on the same inputs (EOS included, start token excluded)."""

    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]
    encoder_max_abs_diff: float
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    max_new_tokens: int | None = None  # how many tokens each side generated at most (the export checks a few)

    @property
    def identical_share(self) -> float:
        pairs = list(zip(self.torch_tokens, self.onnx_tokens, strict=True))
        return sum(a == b for a, b in pairs) / max(len(pairs), 1)

    @property
    def token_agreement(self) -> float:
        """Share of positions (over the longer sequence of each pair) where both predicted the same token."""
        same = total = 0
        for a, b in zip(self.torch_tokens, self.onnx_tokens, strict=True):
            total += max(len(a), len(b))
            same += sum(x == y for x, y in zip(a, b, strict=False))
        return same / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": len(self.torch_tokens),
            "identical_share": round(self.identical_share, 4),
            "token_agreement": round(self.token_agreement, 4),
            "encoder_max_abs_diff": float(f"{self.encoder_max_abs_diff:.3g}"),
            **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}),
        }


def sample_images() -> list[Image.Image]:
    """A few deterministic drawings of different shapes, used when no data folder is given.

    Different aspect ratios exercise Pix2Struct's variable rows/columns and the padding of unused patches.
    """
    images = []
    for i, (width, height) in enumerate([(320, 240), (180, 420), (640, 160), (64, 64)]):
        img = Image.new("RGB", (width, height), (250, 248, 240))
        draw = ImageDraw.Draw(img)
        for k in range(6):
            x0, y0 = (37 * (k + i)) % width, (53 * (k + 2 * i)) % height
            color = ((90 * k) % 256, (40 + 70 * i) % 256, (200 - 30 * k) % 256)
            draw.rectangle([x0, y0, x0 + width // 4, y0 + height // 5], outline=color, width=3)
            draw.line([0, (k * 29) % height, width, (k * 47 + 11) % height], fill=color, width=2)
        draw.text((8, 8), f"sample {i}: 3 + {i} = {3 + i}", fill=(20, 20, 20))
        images.append(img)
    return images


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types; all mean "this file does not load"
        raise ExportError(f"{path}: ONNX Runtime cannot load the exported model: {exc}") from exc


class OrtGreedy:
    """Greedy decoding over the raw ONNX sessions of a bundle directory (merged or split decoder)."""

    def __init__(self, directory: Path, onnx_files: dict[str, str], layout: str) -> None:
        self.layout = layout
        self.encoder = _session(directory / onnx_files["encoder"])
        if layout == "merged":
            self.first = self.step = _session(directory / onnx_files["decoder_merged"])
        else:
            self.first = _session(directory / onnx_files["decoder"])
            self.step = _session(directory / onnx_files["decoder_with_past"])
        self.past_names = [i.name for i in self.step.get_inputs() if i.name.startswith("past_key_values.")]
        self.first_inputs = {i.name for i in self.first.get_inputs()}
        self.step_inputs = {i.name for i in self.step.get_inputs()}

    def encode(self, patches: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"flattened_patches": patches.astype(np.float32), "attention_mask": mask})[0]

    def generate(
        self,
        patches: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        start_id: int,
        eos_ids: list[int],
        pad_id: int,
    ) -> tuple[list[list[int]], np.ndarray]:
        """Greedy tokens per row (cut after the first EOS) and the encoder output."""
        mask = mask.astype(np.int64)
        hidden = self.encode(patches, mask)
        batch = hidden.shape[0]
        ids = np.full((batch, 1), start_id, dtype=np.int64)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.ones((batch, 1), np.int64),
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask,
        }
        if self.layout == "merged":
            # The no-cache branch ignores the past inputs, but ONNX still needs tensors: empty ones.
            for name in self.past_names:
                heads, dim = self._head_shape(name)
                feeds[name] = np.zeros((batch, heads, 0, dim), np.float32)
            feeds["use_cache_branch"] = np.array([False])
        out_names = [o.name for o in self.first.get_outputs()]
        outputs = dict(zip(out_names, self.first.run(None, {k: v for k, v in feeds.items() if k in self.first_inputs}), strict=True))
        # Cross-attention keys/values depend only on the image: keep those of the first step.
        cross = {n: outputs[n.replace("past_key_values.", "present.")] for n in self.past_names if ".encoder." in n}
        tokens: list[list[int]] = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        for step in range(max_new_tokens):
            next_ids = outputs["logits"][:, -1, :].argmax(-1)
            next_ids = np.where(finished, pad_id, next_ids)
            for row in np.flatnonzero(~finished):
                tokens[row].append(int(next_ids[row]))
            finished |= np.isin(next_ids, eos_ids)
            if finished.all() or step == max_new_tokens - 1:
                break
            past_len = step + 1
            feeds = {
                "input_ids": next_ids[:, None].astype(np.int64),
                "attention_mask": np.ones((batch, past_len + 1), np.int64),
                "encoder_attention_mask": mask,
                "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([True]),
            }
            for name in self.past_names:
                feeds[name] = cross[name] if ".encoder." in name else outputs[name.replace("past_key_values.", "present.")]
            out_names = [o.name for o in self.step.get_outputs()]
            outputs = dict(zip(out_names, self.step.run(None, {k: v for k, v in feeds.items() if k in self.step_inputs}), strict=True))
        return tokens, hidden

    def _head_shape(self, name: str) -> tuple[int, int]:
        shape = next(i.shape for i in self.step.get_inputs() if i.name == name)
        return int(shape[1]), int(shape[3])


def cut_after_eos(row: list[int], eos_ids: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[: i + 1]
    return row


def compare_greedy(
    model: Any,
    processor: Any,
    directory: Path,
    onnx_files: dict[str, str],
    layout: str,
    images: list[Image.Image],
    max_new_tokens: int,
    one_image_at_a_time: bool = False,
) -> GreedyComparison:
    """Run PyTorch `generate` (greedy) and the ONNX greedy loop on `images`; return both token lists.

    `one_image_at_a_time`: run the ONNX graphs on each image alone, as the engine runs int8 encoders and
    first decoder steps (their per-tensor activation scales would otherwise mix the images).
    """
    import torch
    from transformers import GenerationConfig

    from engine.bundle import ModelSettings

    # The token ids as the engine will read them from the bundle (start, pad, EOS and their fallbacks).
    ids = ModelSettings(path=directory, config=model.config.to_dict(), generation_config=model.generation_config.to_dict())
    start_id, pad_id, eos_ids = ids.decoder_start_token_id, ids.pad_token_id, ids.eos_token_ids

    # Plain greedy search with only the ids: this compares the graphs, so the checkpoint's logits processors
    # (repetition penalty, minimum length, ...) stay out, as they do in the ONNX loop below.
    plain = GenerationConfig(
        decoder_start_token_id=start_id, pad_token_id=pad_id, eos_token_id=eos_ids, max_new_tokens=max_new_tokens,
        num_beams=1, do_sample=False,
    )
    # The image processor with its own max_patches: Pix2StructProcessor.__call__ would silently use 2048.
    ip = processor.image_processor
    own = model.generation_config
    try:
        # channels_last: transformers would read a PIL image 1 or 3 pixels high as channels-first.
        inputs = ip(images=images, max_patches=ip.max_patches, return_tensors="pt", input_data_format="channels_last")
        # In place of the model's own: `generate` fills a given config's default values from the model's.
        model.generation_config = plain
        with torch.no_grad():
            ref_hidden = model.encoder(flattened_patches=inputs["flattened_patches"], attention_mask=inputs["attention_mask"])[0]
            generated = model.generate(flattened_patches=inputs["flattened_patches"], attention_mask=inputs["attention_mask"])
    except Exception as exc:  # an inconsistent checkpoint fails inside transformers with any exception type
        raise ExportError(
            f"{model.config._name_or_path}: the PyTorch model cannot caption the validation images "
            f"({type(exc).__name__}: {exc}); check that its config, processor and weights belong together"
        ) from exc
    finally:
        model.generation_config = own
    torch_tokens = [cut_after_eos(row[1:], eos_ids) for row in generated.tolist()]

    runner = OrtGreedy(directory, onnx_files, layout)
    patches, mask = inputs["flattened_patches"].numpy(), inputs["attention_mask"].numpy()
    groups = [slice(i, i + 1) for i in range(len(images))] if one_image_at_a_time else [slice(None)]
    runs = [runner.generate(patches[rows], mask[rows], max_new_tokens, start_id, eos_ids, pad_id) for rows in groups]
    onnx_tokens = [tokens for run_tokens, _ in runs for tokens in run_tokens]
    hidden = np.concatenate([run_hidden for _, run_hidden in runs])
    # Trailing pads after EOS differ only in how far each side kept going.
    onnx_tokens = [cut_after_eos(row, eos_ids) for row in onnx_tokens]
    diff = float(np.abs(hidden - ref_hidden.numpy()).max())
    result = GreedyComparison(torch_tokens, onnx_tokens, diff, max_new_tokens=max_new_tokens)
    for i, (a, b) in enumerate(zip(torch_tokens, onnx_tokens, strict=True)):
        if a != b:
            first = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            result.mismatches.append({"image": i, "position": first, "torch": a, "onnx": b})
    return result
