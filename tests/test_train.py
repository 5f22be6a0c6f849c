"""Training: presets/tokenizer, the loop (loss, checkpoints, resume, DDP), evaluation, bad input, the CLI.

The expensive pieces are shared: `tiny_run` (conftest) is the 3-epoch preset run; the other
runs here use a 40-image folder at 64 patches so each takes seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from train.checkpoint import CheckpointError, atomic_save, recover  # noqa: E402
from train.data import DataError  # noqa: E402
from train.loop import TrainConfig, TrainError, epoch_batches, train, uses_bf16  # noqa: E402
from train.presets import PRESETS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = dict(preset="tiny", batch_size=8, max_patches=64, max_new_tokens=12, progress=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 generated images (about 36 train / 4 test)."""
    from train.synth import generate

    out = tmp_path_factory.mktemp("small") / "data"
    generate(out, n=40, seed=1)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ----------------------------------------------------------------------------- presets and tokenizer


def test_tokenizer_is_t5_style_and_round_trips() -> None:
    from train.presets import EOS_ID, PAD_ID, UNK_ID, train_tokenizer

    caps = ["The student wrote 7 + 5 = 12, which is correct.", "A clock showing 10:45."] * 5
    tok = train_tokenizer(caps, vocab_size=200)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID)
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "</s>")
    text = "The student wrote 93 + 48 = 141, which is wrong."  # digits and words never seen together
    ids = tok(text).input_ids
    assert ids[-1] == EOS_ID and UNK_ID not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert "4" in tok.convert_ids_to_tokens(ids) and "141" not in tok.convert_ids_to_tokens(
        ids
    )  # digit by digit


def test_base_preset_is_textcaps_base_architecture() -> None:
    from transformers import Pix2StructConfig

    from train.presets import PRESETS, model_config

    got = model_config(PRESETS["base"], PRESETS["base"].model_vocab or 0)
    ref = Pix2StructConfig()
    for tower in ("text_config", "vision_config"):
        mine, theirs = getattr(got, tower).to_dict(), getattr(ref, tower).to_dict()
        keys = [
            k
            for k in theirs
            if k not in ("dropout_rate", "attention_dropout", "use_cache", "_name_or_path", "transformers_version")
        ]
        assert {k: mine[k] for k in keys} == {k: theirs[k] for k in keys}, tower
    assert got.text_config.vocab_size == 50244 and got.text_config.is_decoder


def test_vision_init_whitens_the_patch_projection_on_the_training_patches() -> None:
    import numpy as np
    from PIL import Image

    from train.presets import PCA_EPSILON, _patch_sample, build_from_preset

    rng = np.random.default_rng(0)
    # Ruled "pages": faint lines every 7 px at a random offset, plus noise (what the init is for).
    pages = []
    for _ in range(6):
        page = np.full((96, 128, 3), 235.0) + rng.normal(0, 4, (96, 128, 3))
        page[int(rng.integers(7)) :: 7] -= 40
        pages.append(Image.fromarray(page.clip(0, 255).astype(np.uint8)))
    captions = ["lined page", "grid page"]
    model, processor = build_from_preset("tiny", captions, max_patches=64, seed=0, images=pages)
    patches = _patch_sample(processor, pages)
    assert patches.shape[1] == 768 and len(patches) >= 128
    projection = model.encoder.embeddings.patch_projection
    with torch.no_grad():
        features = projection(torch.as_tensor(patches)).numpy()
    # Centred, and each of the 128 directions has standard deviation s / (s + eps) < 1 on the sample.
    assert np.abs(features.mean(0)).max() < 1e-3
    spread = features.std(0)
    assert spread.max() < 1.0 and spread[0] > 1.0 - PCA_EPSILON, spread[:4]
    assert np.all(np.diff(spread) <= 1e-4)  # strongest direction first
    # The reference: an SVD of the centred rows in float64 gives the same spreads and the same strongest
    # direction (the rest are nearly tied in this noise, so any rotation among them is as good).
    _, singular, directions = np.linalg.svd((patches - patches.mean(0)).astype(np.float64), full_matrices=False)
    reference = singular[:128] / len(patches) ** 0.5
    weight = projection.weight.detach().numpy().astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(weight, axis=1), 1 / (reference + PCA_EPSILON), rtol=1e-4)
    strongest = directions[0] * np.sign(directions[0][np.abs(directions[0]).argmax()])  # largest component > 0
    np.testing.assert_allclose(weight[0] * (reference[0] + PCA_EPSILON), strongest, atol=1e-5)
    assert (weight[np.arange(len(weight)), np.abs(weight).argmax(1)] > 0).all()  # every direction's sign is fixed
    # The same images and seed give the same model; no images leave the projection at its random init.
    again, _ = build_from_preset("tiny", captions, max_patches=64, seed=0, images=pages)
    assert torch.equal(again.encoder.embeddings.patch_projection.weight, projection.weight)
    plain, _ = build_from_preset("tiny", captions, max_patches=64, seed=0)
    assert not torch.allclose(plain.encoder.embeddings.patch_projection.weight, projection.weight)


def test_vision_init_makes_attention_mimetic() -> None:
    from train.presets import MIMETIC_SELF_LOGIT, MIMETIC_VO, build_from_preset

    model, _ = build_from_preset("tiny", ["a page"], max_patches=64, seed=0)
    config = model.config.vision_config
    hidden, d_kv = config.hidden_size, config.d_kv
    for layer in model.encoder.encoder.layer:
        attention = layer.attention
        query, key = attention.query.weight.detach(), attention.key.weight.detach()
        value, output = attention.value.weight.detach(), attention.output.weight.detach()
        assert torch.equal(query, key)  # W_q^T W_k is positive semi-definite: tokens attend to similar tokens
        # Orthonormal rows, scaled so that a token's own logit is about MIMETIC_SELF_LOGIT.
        gram = query @ query.T * d_kv / MIMETIC_SELF_LOGIT
        assert torch.allclose(gram, torch.eye(len(query)), atol=1e-5)
        # The value/output product is -MIMETIC_VO times the identity (heads * d_kv == hidden in tiny).
        assert torch.allclose(value.T @ output.T, -MIMETIC_VO * torch.eye(hidden), atol=1e-5)
        # Each head on its own gets a token's own logit of about MIMETIC_SELF_LOGIT at init.
        x = layer.pre_attention_layer_norm(torch.randn(256, hidden)).detach()
        q = (x @ query.T).view(256, -1, d_kv)
        self_logit = (q * q).sum(-1).mean().item()
        assert self_logit == pytest.approx(MIMETIC_SELF_LOGIT, rel=0.2)
    # The seed decides the draw.
    again, _ = build_from_preset("tiny", ["a page"], max_patches=64, seed=0)
    other, _ = build_from_preset("tiny", ["a page"], max_patches=64, seed=1)
    first = model.encoder.encoder.layer[0].attention.query.weight
    assert torch.equal(again.encoder.encoder.layer[0].attention.query.weight, first)
    assert not torch.equal(other.encoder.encoder.layer[0].attention.query.weight, first)


def test_mimetic_init_when_heads_need_more_rows_than_hidden() -> None:
    from types import SimpleNamespace

    from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

    from train.presets import MIMETIC_SELF_LOGIT, MIMETIC_VO, init_vision_tower

    for heads, d_kv in ((4, 16), (6, 32)):  # 64 and 192 projection rows for a 128-wide tower
        config = Pix2StructVisionConfig(
            hidden_size=128, num_attention_heads=heads, d_kv=d_kv, d_ff=64, num_hidden_layers=1, seq_len=32
        )

        # init_vision_tower reads model.encoder and model.config.vision_config
        model = SimpleNamespace(encoder=Pix2StructVisionModel(config), config=SimpleNamespace(vision_config=config))
        init_vision_tower(model, [])
        attention = model.encoder.encoder.layer[0].attention
        query = attention.query.weight.detach().view(heads, d_kv, 128)
        for head in query:  # orthonormal within each head, at the scale that gives the intended self logit
            assert torch.allclose(head @ head.T * d_kv / MIMETIC_SELF_LOGIT, torch.eye(d_kv), atol=1e-5)
        product = attention.output.weight.detach() @ attention.value.weight.detach()  # W_o W_v
        if heads * d_kv >= 128:
            assert torch.allclose(product, -MIMETIC_VO * torch.eye(128), atol=1e-4)
        else:  # a rank-64 projection: -MIMETIC_VO on its range
            eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
            assert torch.allclose(eigenvalues[: heads * d_kv], torch.full((heads * d_kv,), -MIMETIC_VO), atol=1e-4)


def test_caption_loss_weights_the_lead_tokens() -> None:
    from train.loop import caption_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 4:] = -100  # a shorter caption, padded
    labels[2, 2:] = -100
    plain = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits.transpose(1, 2), labels)
    assert caption_loss(logits, labels, 3, 1.0).item() == pytest.approx(plain.item(), rel=1e-6)
    assert caption_loss(logits, labels, 0, 5.0).item() == pytest.approx(plain.item(), rel=1e-6)
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    real = labels != -100
    weights = real.float()
    weights[:, :3] *= 5.0
    expected = (token * weights).sum() / weights.sum()
    assert caption_loss(logits, labels, 3, 5.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # Padding weighs nothing: changing a padded position's logits changes nothing.
    moved = logits.clone()
    moved[2, 4] += 100.0
    assert caption_loss(moved, labels, 3, 5.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # bf16 logits (autocast) are scored in fp32.
    assert caption_loss(logits.bfloat16(), labels, 3, 5.0).dtype == torch.float32
    for bad in (0.0, float("nan"), True, "5"):
        with pytest.raises(TrainError, match="lead_weight must be a positive number"):
            TrainConfig(data=".", out="run", preset="tiny", lead_weight=bad).resolved()  # type: ignore[arg-type]
    for bad_tokens in (-1, 2.5, True):
        with pytest.raises(TrainError, match="lead_tokens must be an integer"):
            TrainConfig(data=".", out="run", preset="tiny", lead_tokens=bad_tokens).resolved()  # type: ignore[arg-type]
    resolved = TrainConfig(data=".", out="run", preset="tiny").resolved()
    assert (resolved.lead_tokens, resolved.lead_weight) == (3, 5.0)
    assert TrainConfig(data=".", out="run", base="x").resolved().lead_weight == 1.0


def test_preset_processor_saves_and_reloads(tmp_path: Path) -> None:
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    from train.evaluate import encode_images
    from train.presets import build_from_preset

    model, proc = build_from_preset("tiny", ["One 1 two 2.", "Three 3 four 4."], max_patches=48)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    proc2 = Pix2StructProcessor.from_pretrained(tmp_path)
    model2 = Pix2StructForConditionalGeneration.from_pretrained(tmp_path)
    assert proc2.image_processor.max_patches == 48
    assert model2.config.decoder_start_token_id == 0 and model2.generation_config.eos_token_id == 1
    from PIL import Image

    enc = encode_images(proc2, [Image.new("RGB", (300, 200), "white")])
    assert tuple(enc["flattened_patches"].shape) == (1, 48, 770)  # the checkpoint's budget, not 2048


@pytest.mark.parametrize("height", [1, 3])
def test_images_one_or_three_pixels_high_get_the_engines_patches(height: int, tmp_path: Path) -> None:
    """transformers guesses the channel axis from the array's shape, and takes an image 1 or 3 pixels high
    (shape (1, W, 3) or (3, W, 3)) for channels-first: training crashed or trained on scrambled pixels,
    while the engine reads it right. Every place train/ calls the image processor must agree with the engine."""
    import numpy as np
    from PIL import Image
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from engine.preprocess import PatchConfig, image_to_patches
    from train.data import Example
    from train.evaluate import encode_images
    from train.loop import CaptionDataset
    from train.presets import _patch_sample, train_tokenizer

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    rng = np.random.default_rng(height)
    thin = Image.fromarray(rng.integers(0, 256, (height, 200, 3), dtype=np.uint8))
    page = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    config = PatchConfig(max_patches=64)

    def same(got: object, image: Image.Image) -> None:  # the tolerance of tests/test_preprocess_reference.py
        want = image_to_patches(image, config)
        got = np.asarray(got)
        np.testing.assert_array_equal(got[:, :2], want.flattened_patches[:, :2])  # row/column ids
        assert np.abs(got[:, 2:] - want.flattened_patches[:, 2:]).max() <= 1e-3

    for batch in ([thin], [thin, page], [page, thin]):  # transformers guesses from the first image only
        encoded = encode_images(processor, batch)
        for i, image in enumerate(batch):
            same(encoded["flattened_patches"][i], image)
    want = image_to_patches(thin, config)
    sample = _patch_sample(processor, [thin])  # the vision-tower init of a from-scratch run
    assert np.abs(sample - want.flattened_patches[want.attention_mask > 0][:, 2:]).max() <= 1e-3

    thin.save(tmp_path / "thin.png")  # and the training dataset, which loads the file
    dataset = CaptionDataset([Example("thin.png", "a", tmp_path / "thin.png")], processor, augment=False, seed=0)
    patches, mask, _ = dataset[(0, 0)]
    same(patches, thin)
    assert int(mask.sum()) == want.rows * want.cols


@pytest.mark.parametrize("name", ["scan.png", "scan.jpg"])
def test_a_large_image_trains_on_the_engines_values(name: str, tmp_path: Path) -> None:
    """Training shrinks large images once; Pix2Struct standardises each image by its own statistics,
    which shrinking changes (noise and thin strokes smooth away). For a scan like this one the model
    trained on values twice as spread out as the engine served it. Now it gets the engine's values up to
    the two resizes (the shrink's and the processor's)."""
    import numpy as np
    from PIL import Image, ImageDraw
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from engine.images import load_image
    from engine.preprocess import PatchConfig, image_to_patches
    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    page = Image.new("RGB", (1200, 1600), (250, 248, 240))
    draw = ImageDraw.Draw(page)
    for y in range(0, 1600, 40):  # ruled paper
        draw.line([(0, y), (1200, y)], fill=(160, 180, 230), width=2)
    for k in range(10):  # thin pen strokes
        draw.line([(100 + 90 * k, 150), (180 + 90 * k, 1450)], fill=(30, 30, 140), width=3)
        draw.ellipse([(200, 140 * k + 20), (300 + 60 * k, 140 * k + 110)], outline=(30, 30, 140), width=3)
    noise = np.random.default_rng(0).integers(-8, 9, (1600, 1200, 3))  # a scanner's
    Image.fromarray(np.clip(np.asarray(page, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(tmp_path / name, quality=92)

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    dataset = CaptionDataset([Example(name, "a", tmp_path / name)], processor, augment=False, seed=0)
    patches, mask, _ = dataset[(0, 0)]
    assert dataset._load(0).size[0] < 1200  # the case at hand: training works on a shrunk copy
    want = image_to_patches(load_image(tmp_path / name), PatchConfig(max_patches=64))
    count = want.rows * want.cols
    assert int(mask.sum()) == count
    got, served = np.asarray(patches)[:count, 2:], want.flattened_patches[:count, 2:]
    assert np.abs(got - served).mean() < 0.05  # 0.027 PNG, 0.034 JPEG (0.29-0.30 before)
    assert 0.95 < got.std() / served.std() < 1.05  # 1.005, 0.980 (2.05-2.06 before)


@pytest.mark.parametrize(
    ("size", "sideways"), [((302, 573), False), ((301, 300), False), ((303, 384), False), ((302, 573), True), ((2441, 50), False)]
)
def test_a_shrunk_training_image_keeps_the_engines_patch_grid(size: tuple[int, int], sideways: bool, tmp_path: Path) -> None:
    """The patch grid follows the aspect ratio, and rounding the shrunk copy to whole pixels tipped it for
    about 2.5% of sizes at 64 patches (302x573: 10x5 patches in training, 11x5 from the engine), and for
    most thin strips (a line of handwriting, 2441x50). A phone photo stored sideways with an EXIF
    orientation has its grid taken upright, as the engine does."""
    import numpy as np
    from PIL import Image
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from engine.images import load_image
    from engine.preprocess import PatchConfig, image_to_patches
    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    width, height = size
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noise = np.random.default_rng(width).integers(-20, 21, (height, width, 3))
    page = Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))
    if sideways:  # stored rotated, with the EXIF tag (6) that turns it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        page.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "page.png", exif=exif)
    else:
        page.save(tmp_path / "page.png")
    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    dataset = CaptionDataset([Example("page.png", "a", tmp_path / "page.png")], processor, augment=False, seed=0)
    patches, mask, _ = dataset[(0, 0)]
    assert dataset._load(0).size[0] < width
    assert load_image(tmp_path / "page.png").size == size
    want = image_to_patches(load_image(tmp_path / "page.png"), PatchConfig(max_patches=64))
    count = want.rows * want.cols
    np.testing.assert_array_equal(np.asarray(patches)[:, :2], want.flattened_patches[:, :2])  # row/column ids
    assert int(mask.sum()) == count
    assert np.abs(np.asarray(patches)[:count, 2:] - want.flattened_patches[:count, 2:]).mean() < 0.05


def test_an_image_replaced_during_training_is_read_as_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads after the first (the cache full) reuse the first read's size and statistics; a photo replaced
    by one turned upright was squashed into the old one's shape and grid."""
    import numpy as np
    from PIL import Image
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from engine.images import load_image
    from engine.preprocess import PatchConfig, image_to_patches
    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    rng = np.random.default_rng(0)
    path = tmp_path / "page.jpg"
    Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(path)
    dataset = CaptionDataset([Example("page.jpg", "a", path)], processor, augment=False, seed=0, cache_bytes=0)  # reads again
    dataset[(0, 0)]
    Image.fromarray(rng.integers(0, 256, (800, 600, 3), dtype=np.uint8)).save(path)  # now upright
    patches, mask, _ = dataset[(1, 0)]
    want = image_to_patches(load_image(path), PatchConfig(max_patches=64))
    np.testing.assert_array_equal(np.asarray(patches)[:, :2], want.flattened_patches[:, :2])
    assert int(mask.sum()) == want.rows * want.cols


def test_an_image_beyond_the_cache_is_read_as_it_first_was(tmp_path: Path) -> None:
    """Past the cache a JPEG was decoded at reduced scale: other patches from the second epoch on, and a run
    resumed there (whose first read is whole) trained on other images than the uninterrupted run."""
    import numpy as np
    from PIL import Image
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    path = tmp_path / "photo.jpg"
    small = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(small).resize((1600, 1200), Image.Resampling.BILINEAR).save(path, quality=90)
    examples = [Example("photo.jpg", "a", path)]
    uninterrupted = CaptionDataset(examples, processor, augment=False, seed=0, cache_bytes=0)  # the cache full
    first, later = uninterrupted[(0, 0)][0], uninterrupted[(1, 0)][0]
    resumed = CaptionDataset(examples, processor, augment=False, seed=0, cache_bytes=0)[(1, 0)][0]
    np.testing.assert_array_equal(np.asarray(later), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(later))


def test_the_image_cache_counts_what_pillow_holds(tmp_path: Path) -> None:
    """Pillow keeps an RGB image in 4 bytes a pixel: counted as 3, the 2 GiB cache held 2.7 GiB and more."""
    from PIL import Image
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    examples = []
    for i in range(3):
        Image.new("RGB", (100, 80), (i, 0, 0)).save(tmp_path / f"{i}.png")  # small: kept at this size
        examples.append(Example(f"{i}.png", "a", tmp_path / f"{i}.png"))
    dataset = CaptionDataset(examples, processor, augment=False, seed=0, cache_bytes=2 * 100 * 80 * 4)
    for i in range(3):
        dataset[(0, i)]
    assert sorted(dataset._cache) == [0, 1] and dataset._cache_bytes == 2 * 100 * 80 * 4


def test_an_image_gone_since_the_data_check_is_a_named_error(tmp_path: Path) -> None:
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor

    from engine.errors import ImageError
    from train.cli import _own_message
    from train.data import Example
    from train.loop import CaptionDataset
    from train.presets import train_tokenizer

    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=64, is_vqa=False), tokenizer=train_tokenizer(["a b c"], 100)
    )
    dataset = CaptionDataset([Example("gone.png", "a", tmp_path / "gone.png")], processor, augment=False, seed=0)
    with pytest.raises(ImageError, match=r"gone\.png: cannot read the image any more: No such file"):
        dataset[(0, 0)]
    # From a DataLoader worker the error arrives wrapped in its traceback text; the CLI prints its own line.
    wrapped = ImageError("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                         '  File "x.py", line 1, in f\nengine.errors.ImageError: /d/gone.png: cannot read the image any more')
    assert _own_message(wrapped) == "/d/gone.png: cannot read the image any more"
    assert _own_message(ImageError("plain")) == "plain"


# ----------------------------------------------------------------------------- pieces of the loop


@pytest.mark.parametrize("n,batch,world", [(35, 4, 2), (33, 4, 2), (9, 4, 3), (7, 8, 1), (17, 2, 4)])
def test_epoch_batches_cover_every_example_once(n: int, batch: int, world: int) -> None:
    per_rank = [epoch_batches(n, batch, world, r, seed=3, epoch=1) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # DDP needs the same number of steps everywhere
    flat = [i for rank in per_rank for b in rank for i in b]
    assert sorted(flat) == list(range(n))
    assert all(len(b) > 0 for rank in per_rank for b in rank)
    assert epoch_batches(n, batch, world, 0, seed=3, epoch=2) != per_rank[0] or n < 3


def test_augment_is_seeded_and_changes_the_image() -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from train.augment import augment

    img = Image.new("RGB", (200, 120), (240, 238, 230))
    ImageDraw.Draw(img).text((20, 40), "7 + 5 = 12", fill=(20, 20, 120))
    a = augment(img, np.random.default_rng([0, 1, 2]))
    b = augment(img, np.random.default_rng([0, 1, 2]))
    c = augment(img, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.mode == "RGB"


def test_atomic_save_recovers_after_a_kill_between_renames(tmp_path: Path) -> None:
    dest = tmp_path / "last"
    atomic_save(dest, lambda d: (d / "f").write_text("v1"))
    dest.rename(tmp_path / ".last.old")  # as if killed right after the first rename
    recover(dest)
    assert (dest / "f").read_text() == "v1"
    atomic_save(dest, lambda d: (d / "f").write_text("v2"))
    assert (dest / "f").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_checkpoint_save_that_runs_out_of_room_is_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-save gave torch's or safetensors' traceback ("unexpected pos ...") naming no file,
    and left the half-written copy on the full disk. Now: an OutputError naming the checkpoint (the CLI
    adds the resume note), no copy left, the previous save untouched."""
    import errno
    import shutil

    from engine.folder import OutputError

    dest = tmp_path / "last"
    atomic_save(dest, lambda d: (d / "f").write_text("v1"))

    def no_room(d: Path) -> None:
        (d / "f").write_text("v2 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"last: cannot save the checkpoint: No space left on device"):
        atomic_save(dest, no_room)
    assert (dest / "f").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    def torch_words(d: Path) -> None:
        (d / "f").write_text("v2 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7251264 vs 7251156")

    real_usage = shutil.disk_usage
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room left: not a full disk, a bug to show whole
        atomic_save(dest, torch_words)
    full = real_usage(tmp_path)._replace(free=4096)  # what the file system answers when it is full
    monkeypatch.setattr("train.checkpoint.shutil.disk_usage", lambda path: full)
    with pytest.raises(OutputError, match=r"last: cannot save the checkpoint: no space left on the device \(4 KiB free; "
                       r"RuntimeError: \[enforce fail .*unexpected pos 7251264 vs 7251156\)"):
        atomic_save(dest, torch_words)
    assert (dest / "f").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    monkeypatch.undo()

    def denied(d: Path) -> None:  # the checkpoint's own files: a write problem, named at the checkpoint
        raise PermissionError(errno.EACCES, "Permission denied", str(d / "model.safetensors"))

    with pytest.raises(OutputError, match=r"last: cannot save the checkpoint: Permission denied$"):
        atomic_save(dest, denied)

    def not_about_room(d: Path) -> None:  # a file the save reads is missing: a bug, not a full disk
        (tmp_path / "gone.json").read_text()

    with pytest.raises(FileNotFoundError, match="gone.json"):
        atomic_save(dest, not_about_room)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_evaluation_encodes_one_image_at_a_time_with_the_same_patches(tmp_path: Path) -> None:
    import tracemalloc
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image
    from transformers import Pix2StructImageProcessor

    from train.evaluate import encode_files, encode_images, load_rgb

    processor = SimpleNamespace(image_processor=Pix2StructImageProcessor(max_patches=64))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (600 + 40 * i, 800, 3), dtype=np.uint8)).save(paths[-1])
    peaks = []
    for encode in (lambda: encode_images(processor, [load_rgb(p) for p in paths]), lambda: encode_files(processor, paths)):
        tracemalloc.start()
        try:
            encoded = encode()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        if len(peaks) == 1:
            together = encoded
    for key in ("flattened_patches", "attention_mask"):
        assert torch.equal(encoded[key], together[key])
    # The processor normalises a whole batch in float32 at full size at once (7 GB for 32 phone photos).
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_a_checkpoint_in_pytorch_bin_shards_loads(tmp_path: Path) -> None:
    from train.checkpoint import check_checkpoint_dir, load_checkpoint
    from train.presets import build_from_preset

    model, processor = build_from_preset("tiny", ["three groups of two", "a clock at nine"], max_patches=16)
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="1MB")  # as older tools write
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin.index.json").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    check_checkpoint_dir(tmp_path)  # said "no model weights", though transformers (and the export) read it
    loaded, _ = load_checkpoint(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_a_checkpoint_whose_weights_were_cut_short_is_refused_before_any_work(tmp_path: Path) -> None:
    """A copy cut short was found only when transformers loaded it, after every image had been checked."""
    from train.checkpoint import CheckpointError, check_checkpoint_dir
    from train.presets import build_from_preset

    model, processor = build_from_preset("tiny", ["three groups of two", "a clock at nine"], max_patches=16)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    check_checkpoint_dir(tmp_path)
    weights = tmp_path / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: cut short \({len(whole) // 2} bytes where its header places {len(whole)}\)"):
        check_checkpoint_dir(tmp_path)
    weights.write_bytes(whole[:100])  # the header itself cut
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cut short \(100 bytes where its header alone takes \d+\)"):
        check_checkpoint_dir(tmp_path)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        check_checkpoint_dir(tmp_path)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    processor.save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    check_checkpoint_dir(sharded)
    shards[-1].write_bytes(shards[-1].read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=rf"{shards[-1].name}: cut short"):
        check_checkpoint_dir(sharded)


def test_whole_number_settings_are_checked_and_kept_as_ints() -> None:
    import numpy as np

    config = TrainConfig(data=".", out="run", preset="tiny", lead_tokens=np.int64(3), batch_size=np.int32(4), seed=np.int64(2)).resolved()
    json.dumps(config.identity())  # run_config.json: a numpy integer made it fail after the model was built
    assert (type(config.lead_tokens), type(config.batch_size), type(config.seed)) == (int, int, int)
    for bad, message in ((dict(batch_size=2.5), "batch_size must be an integer of at least 1, got 2.5"),
                         (dict(max_patches=2), "max_patches must be an integer of at least 4, got 2"),
                         (dict(lead_tokens=True), "lead_tokens must be an integer of at least 0, got True")):  # fmt: skip
        with pytest.raises(TrainError, match=re.escape(message)):
            TrainConfig(data=".", out="run", preset="tiny", **bad).resolved()  # type: ignore[arg-type]


def test_a_checkpoints_caption_length_is_read_as_generate_reads_it() -> None:
    from transformers import GenerationConfig

    from engine.bundle import stated_max_new_tokens

    def stated(**settings: int) -> int | None:  # as training reads a loaded checkpoint's
        return stated_max_new_tokens(GenerationConfig(**settings).to_diff_dict(), Path("generation_config.json"))

    assert stated(max_new_tokens=30, max_length=10) == 30
    assert stated(max_length=10) == 9  # max_length counts the start token
    assert stated(max_length=20) is None  # generate's own default: unset
    assert stated() is None
    assert TrainConfig(data=".", out="run", base="x").resolved().max_new_tokens is None  # read from the base
    assert TrainConfig(data=".", out="run", preset="tiny").resolved().max_new_tokens == 48
    assert TrainConfig(data=".", out="run", preset="tiny", resume=True, epochs=1).resolved().max_new_tokens is None


def test_corpus_scores() -> None:
    from train.evaluate import corpus_scores

    refs = ["The student wrote 7 + 5 = 12, which is correct.", "A clock showing 3:15."]
    assert corpus_scores(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    low = corpus_scores(["A clock.", "The student"], refs)
    assert 0 <= low["bleu"] < 50 and 0 < low["chrf"] < 60
    with pytest.raises(ValueError):
        corpus_scores(["x"], [])


# ----------------------------------------------------------------------------- the shared tiny run


@pytest.mark.slow
def test_tiny_run_learns_and_reloads(tiny_run: Path, synth_data: Path, tmp_path: Path) -> None:
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    from engine.folder import OutputError
    from train.evaluate import evaluate_checkpoint, generate_captions

    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    steps = [json.loads(line) for line in (tiny_run / "steps.jsonl").read_text().splitlines()]
    assert sum(s["loss"] for s in steps[-3:]) < sum(s["loss"] for s in steps[:3])
    # Each step logs the rate its update used (it logged the next step's: the peak twice, the warm-up's first never).
    from train.loop import _lr_lambda

    config = json.loads((tiny_run / "run_config.json").read_text())
    rate = _lr_lambda(len(steps), max(1, int(config["warmup_ratio"] * len(steps))))
    assert [s["lr"] for s in steps] == pytest.approx([config["lr"] * rate(i) for i in range(len(steps))], rel=1e-9)
    assert [m["lr"] for m in metrics] == [s["lr"] for s in steps if s["step"] in {m["step"] for m in metrics}]
    assert all(m["bleu"] is not None and m["images_per_s"] > 0 for m in metrics)
    assert (tiny_run / "curves.png").stat().st_size > 1000
    assert (tiny_run / "last" / "trainer_state.pt").is_file()
    assert not (tiny_run / "best" / "trainer_state.pt").exists()
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".")]  # no temp dirs left

    for ckpt in (tiny_run / "best", tiny_run / "last"):
        model = Pix2StructForConditionalGeneration.from_pretrained(ckpt)
        proc = Pix2StructProcessor.from_pretrained(ckpt)
        assert model.config.text_config.is_decoder
        assert proc.tokenizer.pad_token_id == 0 and proc.tokenizer.eos_token_id == 1

    images = sorted(synth_data.glob("*.jpg"))[:3]
    caps = generate_captions(model, proc, images, batch_size=2, max_new_tokens=8)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert generate_captions(model, proc, images[::-1], batch_size=3, max_new_tokens=8) == caps[::-1]

    out = tmp_path / "pred.jsonl"
    report = evaluate_checkpoint(tiny_run / "best", synth_data, split="test", out=out, max_new_tokens=16)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.n == len(rows) > 0 and set(rows[0]) == {"file_name", "reference", "prediction"}
    assert 0.0 <= report.bleu <= 100.0
    # Written again over its own earlier predictions; never over the data's metadata, a folder or an image,
    # and that is known before any captioning.
    assert evaluate_checkpoint(tiny_run / "best", synth_data, split="test", out=out, max_new_tokens=16).n == report.n
    metadata = synth_data / "metadata.jsonl"
    before = metadata.read_bytes()
    for target, error in ((metadata, "exists and does not hold predictions"), (tmp_path, "a folder; give a file name")):
        with pytest.raises(OutputError, match=error):
            evaluate_checkpoint(tiny_run / "nowhere", synth_data, out=target)  # the checkpoint is never read
    assert metadata.read_bytes() == before
    with pytest.raises(DataError, match=r"the test split is empty .*nothing to score"):
        evaluate_checkpoint(tiny_run / "best", synth_data, split="test", test_ratio=0.0, max_new_tokens=4)


@pytest.mark.slow
def test_evaluate_cli(tiny_run: Path, synth_data: Path, tmp_path: Path) -> None:
    from train.cli import evaluate

    out = tmp_path / "p.jsonl"
    args = [
        str(tiny_run / "best"),
        "--data",
        str(synth_data),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--json",
    ]
    res = CliRunner().invoke(evaluate, args)
    assert res.exit_code == 0, res.output
    scores = json.loads(res.stdout)  # stdout is the JSON alone (the predictions line goes to stderr)
    assert scores["split"] == "test" and scores["n"] > 0 and "bleu" in scores and out.is_file()
    assert f"predictions: {out}" in res.stderr
    # How the data was read goes to stderr, with its warning: another split may hold training images.
    other = CliRunner().invoke(evaluate, [*args[:-1], "--test-ratio", "0.3", "--json"])
    assert other.exit_code == 0 and json.loads(other.stdout)["n"] > scores["n"], other.output
    assert "not the run's test split, so it may hold images the model was trained on" in other.stderr

    res = CliRunner().invoke(evaluate, [str(synth_data), "--data", str(synth_data)])
    assert res.exit_code == 2 and "no config.json" in res.output

    # A checkpoint stating only max_length is read as generate (and the engine) read it: 3 new tokens, not 64.
    short = tmp_path / "short"
    shutil.copytree(tiny_run / "best", short)
    generation = json.loads((short / "generation_config.json").read_text())
    generation.pop("max_new_tokens")
    (short / "generation_config.json").write_text(json.dumps({**generation, "max_length": 4}))
    predictions = {}
    for name, extra in (("stated", []), ("given", ["--max-new-tokens", "3"])):
        run = CliRunner().invoke(evaluate, [str(short), "--data", str(synth_data), "--out", str(tmp_path / f"{name}.jsonl"), *extra])
        assert run.exit_code == 0, run.output
        predictions[name] = [json.loads(line)["prediction"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert predictions["stated"] == predictions["given"] and max(len(p.split()) for p in predictions["given"]) <= 3

    if Path("/dev/full").exists():  # a full disk at the end: the scores are printed before the error
        res = CliRunner().invoke(evaluate, [*args[:3], "--out", "/dev/full", *args[5:]])
        assert res.exit_code == 2 and "/dev/full: cannot write" in res.output, res.output
        assert json.loads(res.stdout.splitlines()[0]) == scores


def test_cli_refuses_out_of_range_options_before_writing_anything(small_data: Path, tmp_path: Path) -> None:
    from train.cli import evaluate as evaluate_command
    from train.cli import train as train_command

    base = ["--data", str(small_data), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    for bad in (["--test-ratio", "2"], ["--workers", "-1"], ["--max-patches", "0"], ["--epochs", "0"], ["--lr", "0"],
                ["--lr", "nan"], ["--lr", "inf"], ["--test-ratio", "nan"], ["--precision", "fp16"],
                ["--lead-weight", "0"], ["--lead-weight", "nan"], ["--lead-tokens", "-1"]):
        res = CliRunner().invoke(train_command, [*base, *bad])
        assert res.exit_code == 2 and "Invalid value for" in res.output and bad[0] in res.output, res.output
    assert not (tmp_path / "run").exists()
    for bad in (["--num-beams", "0"], ["--batch-size", "0"]):
        res = CliRunner().invoke(evaluate_command, [str(tmp_path), "--data", str(small_data), *bad])
        assert res.exit_code == 2 and bad[0] in res.output, res.output


def test_a_diverging_run_stops_with_an_error_instead_of_saving_nan_weights(small_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from train.cli import train as train_cmd

    with pytest.raises(TrainError, match="training diverged; lower --lr"):
        train(TrainConfig(data=small_data, out=tmp_path / "run", epochs=1, lr=1e6, **FAST))
    assert not (tmp_path / "run" / "best").exists()
    # Nine images, one step an epoch: the third update's gradients are NaN while its loss is finite. It ran
    # "done" (exit 0) with every weight of last/ NaN; now it stops before that update, and what was saved is finite.
    nine = tmp_path / "nine"
    nine.mkdir()
    lines = (small_data / "metadata.jsonl").read_text().splitlines()[:9]
    (nine / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        shutil.copy(small_data / json.loads(line)["file_name"], nine)
    with pytest.raises(TrainError, match=r"the gradients became nan at step \d+ .*training diverged; lower --lr"):
        train(TrainConfig(data=nine, out=tmp_path / "nan", epochs=3, lr=1e4, **FAST))
    for checkpoint in (tmp_path / "nan").glob("*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint).values()), checkpoint
    args = ["--data", str(small_data), "--out", str(tmp_path / "cli"), "--preset", "tiny", "--epochs", "1", "--lr", "1e6", "--batch-size", "8",
            "--max-patches", "64", "--no-progress"]  # fmt: skip
    diverged = CliRunner().invoke(train_cmd, args)
    assert diverged.exit_code == 1 and "training diverged" in diverged.output, diverged.output  # it ran: not 2


def test_accelerates_fp16_mixed_precision_is_refused_before_any_work(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its loss scaler's overflow steps have infinite gradients, which stop a run as diverged."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    AcceleratorState._reset_state(reset_partial_state=True)  # a process's first Accelerator fixes its settings
    try:
        with pytest.raises(TrainError, match="accelerate's fp16 mixed precision is not supported"):
            train(TrainConfig(data=small_data, out=tmp_path / "run", epochs=1, **FAST))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "run").exists()


def test_accelerates_bf16_is_edlights_own_bf16_forward_and_conflicts_with_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch --mixed_precision bf16` wrapped the model in accelerate's autocast behind edlight's back:
    a run of --precision fp32 trained (and evaluated) in bf16, while its log and run_config.json said fp32."""
    from train.loop import precision_with_accelerate

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert [precision_with_accelerate(p) for p in ("auto", "bf16", "fp32")] == ["auto", "bf16", "fp32"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "BF16")
    assert precision_with_accelerate("auto") == precision_with_accelerate("bf16") == "bf16"
    with pytest.raises(TrainError, match="accelerate asks for bf16 mixed precision .* and --precision asks for fp32"):
        precision_with_accelerate("fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(TrainError, match="accelerate's fp8 mixed precision is not supported"):
        precision_with_accelerate("auto")


def test_precision_choice() -> None:
    assert uses_bf16("bf16", "cpu") and not uses_bf16("fp32", "cpu")
    assert not uses_bf16("auto", "mps")  # no native-bf16 probe for other devices: stay fp32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert uses_bf16("auto", "cpu") == native
    with pytest.raises(TrainError, match="precision must be one of auto, bf16, fp32"):
        TrainConfig(data=".", out="run", preset="tiny", precision="fp16").resolved()


@pytest.mark.slow
def test_bf16_training_runs_autocast_and_saves_fp32_weights(small_data: Path, tmp_path: Path) -> None:
    runs = {
        p: train(TrainConfig(data=small_data, out=tmp_path / p, epochs=1, seed=3, precision=p, **FAST))
        for p in ("fp32", "bf16")
    }
    losses = {
        p: [json.loads(line)["loss"] for line in (tmp_path / p / "steps.jsonl").read_text().splitlines()]
        for p in runs
    }
    # The same steps on the same data: bf16 rounding moves the losses a little, and does move them.
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    for p, run in runs.items():
        assert json.loads((tmp_path / p / "run_config.json").read_text())["precision"] == p
        assert {w.dtype for w in _weights(run.last_dir).values()} == {torch.float32}


@pytest.mark.slow
def test_lead_weight_reaches_the_loop_and_old_runs_still_resume(small_data: Path, tmp_path: Path) -> None:
    from train.cli import train as train_command
    from train.loop import _check_out

    common = ["--data", str(small_data), "--preset", "tiny", "--batch-size", "8", "--max-patches", "64",
              "--epochs", "1", "--seed", "3", "--no-progress"]  # fmt: skip
    for name, extra in (("plain", ["--lead-weight", "1"]), ("lead", ["--lead-weight", "4", "--lead-tokens", "2"])):
        res = CliRunner().invoke(train_command, [*common, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    saved = {n: json.loads((tmp_path / n / "run_config.json").read_text()) for n in ("plain", "lead")}
    assert (saved["lead"]["lead_weight"], saved["lead"]["lead_tokens"]) == (4.0, 2)
    assert (saved["plain"]["lead_weight"], saved["plain"]["lead_tokens"]) == (1.0, 3)
    first = {
        n: json.loads((tmp_path / n / "steps.jsonl").read_text().splitlines()[0])["loss"] for n in ("plain", "lead")
    }
    assert first["lead"] != pytest.approx(first["plain"], rel=1e-3)  # same weights, same batch: another loss
    # A run written before the lead fields existed was a plain-mean run: it resumes as one, and only as one.
    old = {k: v for k, v in saved["plain"].items() if not k.startswith("lead_")}
    (tmp_path / "plain" / "run_config.json").write_text(json.dumps(old))
    settings = dict(data=small_data, out=tmp_path / "plain", preset="tiny", batch_size=8, max_patches=64,
                    epochs=2, seed=3, resume=True)  # fmt: skip
    assert _check_out(TrainConfig(**settings, lead_weight=1.0).resolved()) == "resume"
    with pytest.raises(TrainError, match="lead_weight: 1.0 -> 5.0"):
        _check_out(TrainConfig(**settings).resolved())


def test_train_refuses_threads_beyond_the_cores_and_warns_of_a_lead_weight_on_nothing(small_data: Path, tmp_path: Path) -> None:
    """`caption` refused --threads beyond 4 per CPU, `train` ran with them 5x slower; a lead weight with no lead
    tokens was taken without a word."""
    from train.cli import train as train_command

    common = ["--data", str(small_data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--epochs", "1"]
    many = CliRunner().invoke(train_command, [*common, "--threads", "100000"])
    assert many.exit_code == 2 and "--threads 100000 on" in many.output and "per core" in many.output
    assert not (tmp_path / "run").exists()
    lead = CliRunner().invoke(train_command, [*common, "--lead-tokens", "0", "--lead-weight", "5", "--data", str(tmp_path / "none")])
    assert "warning: --lead-weight 5 weighs nothing with --lead-tokens 0" in lead.output


def test_train_counts_the_threads_of_every_torchrun_process_on_the_machine(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun each process checked its own --threads: 2 ranks of 4 per core together oversubscribed the
    cores 2x without a word."""
    from engine.resources import available_cores
    from engine.session import MAX_THREADS_PER_CORE
    from train.cli import train as train_command

    most = MAX_THREADS_PER_CORE * available_cores()  # what one process may take
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = ["--data", str(small_data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--threads", str(most)]
    refused = CliRunner().invoke(train_command, args)
    assert refused.exit_code == 2, refused.output
    assert f"--threads {most} in each of 2 processes on this machine ({2 * most} in all)" in refused.output
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_caption_length(small_data: Path, tmp_path: Path) -> None:
    """--resume --max-new-tokens 10 of a run evaluating 12 tokens went on: its test BLEU fell from the truncation
    alone, and best/ and last/ then exported captions of different lengths."""
    from train.cli import train as train_command

    common = ["--data", str(small_data), "--preset", "tiny", "--batch-size", "8", "--max-patches", "64", "--seed", "3",
              "--no-progress", "--out", str(tmp_path / "run"), "--grad-accum", "50"]  # fmt: skip
    first = CliRunner().invoke(train_command, [*common, "--epochs", "1", "--max-new-tokens", "12"])
    assert first.exit_code == 0, first.output
    assert re.search(r"warning: --grad-accum 50 is more than the \d+ batch\(es\) of an epoch", first.output)
    refused = CliRunner().invoke(train_command, [*common, "--epochs", "2", "--resume", "--max-new-tokens", "10"])
    assert refused.exit_code == 2, refused.output
    assert "--max-new-tokens 10: this run evaluates 12 tokens per caption" in refused.output
    assert "resume without --max-new-tokens" in refused.output
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    again = CliRunner().invoke(train_command, [*common, "--epochs", "2", "--resume", "--max-new-tokens", "12"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run" / "last" / "generation_config.json").read_text())["max_new_tokens"] == 12


@pytest.mark.parametrize("base", ["google/pix2struct-textcaps-base", "gone/base-checkpoint"])
def test_a_run_from_a_hub_id_or_a_base_since_removed_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """Resuming loads RUN/last: the --base given is compared as given then (a hub id is never a path)."""
    from train.loop import _check_out

    monkeypatch.chdir(tmp_path)
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    if base.startswith("gone/"):
        (tmp_path / base).mkdir(parents=True)  # there when the run started ...
    config = TrainConfig(data=data, out=run, base=base, resume=True).resolved()
    (run / "last").mkdir(parents=True)
    (run / "last" / "trainer_state.pt").write_bytes(b"")
    (run / "run_config.json").write_text(json.dumps(config.identity()))
    if base.startswith("gone/"):
        (tmp_path / base).rmdir()  # ... and removed since
    assert _check_out(TrainConfig(data=data, out=run, base=base, resume=True).resolved()) == "resume"
    with pytest.raises(TrainError, match="different run.*base"):
        _check_out(TrainConfig(data=data, out=run, base="other/checkpoint", resume=True).resolved())


def test_evaluate_says_when_it_is_given_a_bundle(small_data: Path, tmp_path: Path) -> None:
    from train.cli import evaluate as evaluate_command

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"model_type": "pix2struct"}))
    (bundle / "edlight.json").write_text("{}")
    res = CliRunner().invoke(evaluate_command, [str(bundle), "--data", str(small_data)])
    assert res.exit_code == 2 and "is an ONNX bundle" in res.output and "edlight parity" in res.output


def test_evaluation_data_settings_default_to_the_training_runs(tmp_path: Path) -> None:
    from train.checkpoint import DataSettings, data_settings

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    assert data_settings(run / "best") == DataSettings()  # no run_config.json: train's defaults
    recorded = {"caption_column": "caption", "skip_bad": True, "test_ratio": 0.25, "split_seed": 3, "lr": 1.0}
    (run / "run_config.json").write_text(json.dumps(recorded))
    assert data_settings(run / "best") == DataSettings("caption", True, 0.25, 3, str(run / "run_config.json"))
    assert "caption column 'caption'" in data_settings(run / "best").describe()
    # Given values win; a run_config.json value of the wrong kind, or a torn file, is ignored.
    assert data_settings(run / "best", "text", False, 0.1, 0) == DataSettings()
    assert data_settings(run / "best", caption_column="text").test_ratio == 0.25
    # The line says which settings were given instead, and when that makes another test split.
    described = data_settings(run / "best", test_ratio=0.3).describe()
    assert described.endswith("(from " + str(run / "run_config.json") + ", except test_ratio given here: not the run's "
                              "test split, so it may hold images the model was trained on)")
    assert "except" not in data_settings(run / "best", test_ratio=0.25).describe()  # the same value: no override
    (run / "run_config.json").write_text(json.dumps({"caption_column": 5, "skip_bad": "yes", "test_ratio": 2, "split_seed": True}))
    assert data_settings(run / "best") == DataSettings()
    (run / "run_config.json").write_text("{torn")
    assert data_settings(run / "best") == DataSettings()
    # A checkpoint copied out of its run (cp -r runs/r/best models/v1) was scored on the default split, which
    # may hold images it was trained on: the run now records its data settings inside each checkpoint.
    (run / "run_config.json").write_text(json.dumps(recorded))
    inside = {"caption_column": "caption", "skip_bad": False, "test_ratio": 0.05, "split_seed": 3}
    (run / "best" / "edlight_data.json").write_text(json.dumps(inside))
    shutil.copytree(run / "best", tmp_path / "v1")
    for checkpoint in (run / "best", tmp_path / "v1"):
        expected = DataSettings("caption", False, 0.05, 3, str(checkpoint.resolve() / "edlight_data.json"))
        assert data_settings(checkpoint) == expected


def _split_folder_data(source: Path, dest: Path, column: str) -> Path:
    """16 images of `source` in the imagefolder split layout: test/ holds 4, train/ 12, captions in `column`."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()][:16]
    for split, part in (("test", rows[:4]), ("train", rows[4:])):
        (dest / split).mkdir(parents=True)
        for row in part:
            shutil.copy(source / row["file_name"], dest / split / row["file_name"])
        lines = [json.dumps({"file_name": r["file_name"], column: r["text"]}) + "\n" for r in part]
        (dest / split / "metadata.jsonl").write_text("".join(lines))
    return dest


@pytest.mark.slow
def test_split_folders_and_the_runs_caption_column_reach_train_and_evaluate(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with train/ and test/ trains on train/ only and scores on test/; `evaluate` then reads the data
    as the run did (its --caption-column from run_config.json) without being told again."""
    from train.cli import evaluate as evaluate_command

    data = _split_folder_data(small_data, tmp_path / "data", "caption")
    run = tmp_path / "run"
    train(TrainConfig(data=data, out=run, epochs=1, caption_column="caption", **FAST))
    log = capsys.readouterr().err
    assert "split (from the split folders test/ 4, train/ 12): 12 train, 4 test" in log
    assert "data: 12 train / 4 test" in log
    res = CliRunner().invoke(evaluate_command, [str(run / "best"), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.splitlines()[-1])["n"] == 4
    res = CliRunner().invoke(evaluate_command, [str(run / "best"), "--data", str(data), "--caption-column", "text"])
    assert res.exit_code == 2 and "no row has 'text'; columns seen: caption, file_name" in res.output
    # The run folder itself is not a checkpoint: say which of its checkpoints to pass.
    res = CliRunner().invoke(evaluate_command, [str(run), "--data", str(data)])
    assert res.exit_code == 2 and f"pass {run / 'best'} (best test BLEU) or {run / 'last'}" in res.output
    # A transformers Trainer's output folder: its checkpoint-N folders.
    trainer = tmp_path / "trainer"
    for step in (10, 200, 30):
        shutil.copytree(run / "last", trainer / f"checkpoint-{step}")
    res = CliRunner().invoke(evaluate_command, [str(trainer), "--data", str(data)])
    assert res.exit_code == 2
    assert f"is a training run, not a checkpoint; pass one of its 3 checkpoint-N folders, e.g. the latest, {trainer / 'checkpoint-200'}" in res.output


def test_gradient_accumulation_longer_than_a_progress_interval(small_data: Path, tmp_path: Path) -> None:
    """Without a progress bar the loop logs every quarter epoch; with --grad-accum 3 and 5 micro-batches
    the first such line comes before the first optimizer step."""
    result = train(TrainConfig(data=small_data, out=tmp_path / "run", epochs=1, grad_accum=3, **FAST))
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    micro_batches = math.ceil(result.metrics[0]["train_images"] / FAST["batch_size"])
    assert micro_batches == 5 and [s["step"] for s in steps] == [1, 2]  # groups of 3 and of the 2 left


def test_off_a_terminal_training_logs_lines_instead_of_a_bar(small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service's journal or `2> train.log`: the bar's carriage-return redraws piled up on one line there.
    Lines come at each quarter epoch and at least every LINE_PROGRESS_SECONDS (0 here: after every batch)."""
    from train import loop
    from train.cli import train as train_command

    monkeypatch.setattr(loop, "LINE_PROGRESS_SECONDS", 0.0)

    args = ["--data", str(small_data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--batch-size", "4",
            "--max-patches", "64", "--max-new-tokens", "4", "--epochs", "1"]  # fmt: skip
    res = CliRunner().invoke(train_command, args)  # its stderr is no terminal
    assert res.exit_code == 0, res.output
    assert "\r" not in res.output and "it/s" not in res.output
    said = re.findall(r"epoch 1 batch (\d+)/(\d+): loss [\d.]+, [\d.]+ img/s", res.output)
    batches = int(said[0][1])
    assert [int(n) for n, _ in said] == list(range(1, batches)), res.output  # every batch but the last


def test_an_empty_test_split_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), "white").save(data / split / f"{i}.png")
    (data / "train" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a page"}) + "\n" for i in range(2)))
    train(TrainConfig(data=data, out=tmp_path / "run", epochs=1, **FAST))
    assert f"the test split is empty; {data / 'test'} has no metadata.jsonl or metadata.csv listing its images" in capsys.readouterr().err
    shutil.rmtree(data / "test")
    train(TrainConfig(data=data, out=tmp_path / "again", epochs=1, **FAST))
    assert "the test split is empty; held-out images go in a test/ folder beside train/" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stderr_that_takes_nothing_costs_only_the_log(small_data: Path, tmp_path: Path) -> None:
    """`2>/dev/full` (or a terminal gone): the first log line raised and the run ended with status 1."""
    cmd = [sys.executable, "-m", "engine.cli", "train", "--data", str(small_data), "--out", str(tmp_path / "run"),
           "--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--max-patches", "64"]  # fmt: skip
    with open("/dev/full", "w") as full:
        done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                              stderr=full, timeout=300)  # fmt: skip
    assert done.returncode == 0
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_a_service_managers_stop_says_how_to_resume(small_data: Path, tmp_path: Path) -> None:
    """SIGTERM (systemd, `timeout`, a batch scheduler) unwinds as Ctrl-C does: the resume note, exit 143;
    it killed the run without a word. They signal the whole process group: the data workers died of it too,
    and their death turned the exit into 1, with a traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "train", "--data", str(small_data), "--out", str(out), "--preset", "tiny",
           "--epochs", "30", "--batch-size", "8", "--max-patches", "64", "--no-progress", "--workers", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not (out / "last" / "trainer_state.pt").is_file():
            time.sleep(0.1)
        time.sleep(1.0)  # within the next epoch's steps, its worker at work
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` and systemd do
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert f"interrupted: the latest finished epoch is in {out / 'last'}" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr


def test_a_data_worker_killed_mid_run_is_said_with_how_to_resume(small_data: Path, tmp_path: Path) -> None:
    """The kernel's out-of-memory killer takes a DataLoader worker: the run ended in ~80 lines of traceback
    (a reset connection, or torch's SIGCHLD handler), without a word of the finished epochs kept in last/."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "engine.cli", "train", "--data", str(small_data), "--out", str(out), "--preset", "tiny",
           "--epochs", "30", "--batch-size", "8", "--max-patches", "64", "--no-progress", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        children: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not children:  # its worker started
            time.sleep(0.1)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        time.sleep(1.0)  # at work on the first epoch's batches
        assert proc.poll() is None and children, "the run ended before its worker could be killed"
        for child in children:
            os.kill(int(child), signal.SIGKILL)  # as the out-of-memory killer does
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert "error: a data-loading worker died (" in stderr and "--workers 0" in stderr, stderr[-3000:]
    assert f"no epoch was finished; nothing to resume in {out}" in stderr and "Traceback" not in stderr


def test_only_a_workers_death_is_said_to_be_one() -> None:
    """torch re-raises a dataset's own error as "Caught RuntimeError in DataLoader worker process 0 ... Original
    Traceback": that is a bug to see in full, not a worker the out-of-memory killer took."""
    from train.loop import data_worker_died

    killed = RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed. ")
    assert data_worker_died(killed) == "DataLoader worker (pid 12) is killed by signal: Killed."
    caught = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):")
    assert data_worker_died(caught) is None and data_worker_died(ConnectionResetError(104, "reset")) is None
    import torch.utils.data

    class Truncated(torch.utils.data.Dataset[int]):  # the dataset's own EOFError, re-raised by torch in the main process
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> int:
            raise EOFError("truncated file")

    with pytest.raises(EOFError) as raised:
        next(iter(torch.utils.data.DataLoader(Truncated(), num_workers=1)))
    assert data_worker_died(raised.value) is None
    try:
        raise ValueError("shutting down") from killed
    except ValueError as chained:
        assert data_worker_died(chained) == "DataLoader worker (pid 12) is killed by signal: Killed."


# ----------------------------------------------------------------------------- resume, run dir guards


@pytest.mark.slow
def test_resume_gives_the_same_losses_and_weights(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # With dropout, as the small and base presets and most --base checkpoints have: the resumed run must
    # draw the same dropout masks as the uninterrupted one (its data workers start again in epoch 2).
    from train import evaluate as evaluation

    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], dropout=0.1))
    full = train(TrainConfig(data=small_data, out=tmp_path / "full", epochs=2, seed=5, **FAST))
    # Stopped in epoch 1's evaluation (minutes per test image at base size on a CPU): the epoch's training was
    # lost, as last/ was saved only after it. Now it is kept, and the resume evaluates it first.
    part = TrainConfig(data=small_data, out=tmp_path / "cut", epochs=2, seed=5, **FAST)

    def stopped(*args: object, **kwargs: object) -> list[str]:
        raise KeyboardInterrupt

    with monkeypatch.context() as stop:
        stop.setattr(evaluation, "generate_from_patches", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(part)
    assert torch.load(tmp_path / "cut" / "last" / "trainer_state.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "cut" / "metrics.jsonl").exists()
    capsys.readouterr()
    part.resume = True
    second = train(part)
    assert "evaluating epoch 1, which was stopped in its evaluation" in capsys.readouterr().err
    assert [m["epoch"] for m in second.metrics] == [1, 2]
    assert second.metrics[1]["wall_s"] > second.metrics[0]["wall_s"] > second.metrics[0]["train_s"]
    assert [m["bleu"] for m in second.metrics] == pytest.approx([m["bleu"] for m in full.metrics], abs=1e-6)

    def steps(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "steps.jsonl").read_text().splitlines()]

    assert len(steps(tmp_path / "cut")) == len(steps(tmp_path / "full")) > 2
    assert steps(tmp_path / "cut") == pytest.approx(steps(tmp_path / "full"), rel=1e-5, abs=1e-6)
    a, b = _weights(full.last_dir), _weights(second.last_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert second.metrics[-1]["bleu"] == pytest.approx(full.metrics[-1]["bleu"], abs=1e-6)

    # The finished run is guarded: nothing is overwritten without --resume or by a different run.
    before = (tmp_path / "full" / "last" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(TrainError, match="already holds a run with these settings; pass --resume"):
        train(TrainConfig(data=small_data, out=tmp_path / "full", epochs=2, seed=5, **FAST))
    with pytest.raises(TrainError, match="different run.*lr"):
        train(
            TrainConfig(
                data=small_data, out=tmp_path / "full", epochs=2, seed=5, lr=1e-2, resume=True, **FAST
            )
        )
    assert (tmp_path / "full" / "last" / "model.safetensors").stat().st_mtime_ns == before
    # A resume with nothing left to do is a no-op that returns the metrics.
    done = train(TrainConfig(data=small_data, out=tmp_path / "full", epochs=2, seed=5, resume=True, **FAST))
    assert [m["epoch"] for m in done.metrics] == [1, 2]
    assert (tmp_path / "full" / "last" / "model.safetensors").stat().st_mtime_ns == before


def test_refuses_foreign_out_dir_and_missing_data(small_data: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"not empty \(notes\.txt\)"):
        train(TrainConfig(data=small_data, out=foreign, **FAST))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # `edlight train --out RUN ... 2> RUN/train.log`: the shell makes the log first, and the run was refused.
    from train.loop import _check_out

    logged = tmp_path / "logged"
    logged.mkdir()
    for name in ("train.log", "nohup.out", ".DS_Store"):
        (logged / name).write_text("")
    assert _check_out(TrainConfig(data=small_data, out=logged, **FAST)) == "fresh"
    with pytest.raises(DataError, match="not found"):
        train(TrainConfig(data=tmp_path / "nope", out=tmp_path / "run", **FAST))
    with pytest.raises(TrainError, match="exactly one"):
        train(TrainConfig(data=small_data, out=tmp_path / "run", base="x", preset="tiny"))
    with pytest.raises(TrainError, match="unknown preset"):
        train(TrainConfig(data=small_data, out=tmp_path / "run", preset="huge"))
    with pytest.raises(TrainError, match="--resume: .*holds no run to continue"):  # a typo in --out
        train(TrainConfig(data=small_data, out=tmp_path / "run", resume=True, **FAST))
    assert not (tmp_path / "run").exists()


def test_a_start_that_failed_before_any_checkpoint_does_not_block_its_folder(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # What a run killed (or crashed) before its first checkpoint leaves: its settings, no last/ or best/.
    (run / "run_config.json").write_text(json.dumps({"seed": 123, "lr": 5.0}))
    config = TrainConfig(data=small_data, out=run, epochs=1, resume=True, **FAST)
    result = train(config)  # --resume of it starts over, and says so
    assert result.metrics and json.loads((run / "run_config.json").read_text())["seed"] == 0
    assert f"--resume: {run} holds no finished epoch" in capsys.readouterr().err
    (run / "last" / "trainer_state.pt").unlink()
    with pytest.raises(TrainError, match="--resume: .*holds no trainer state"):
        train(config)


# ----------------------------------------------------------------------------- bad data


@pytest.mark.slow
def test_bad_data_is_refused_or_skipped(small_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    images = sorted(data.glob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    images[1].unlink()  # listed but missing
    with pytest.raises(DataError) as info:
        train(TrainConfig(data=data, out=tmp_path / "run", epochs=1, **FAST))
    msg = str(info.value)
    assert images[0].name in msg and images[1].name in msg
    assert not (tmp_path / "run").exists()  # refused before anything was written

    res = train(TrainConfig(data=data, out=tmp_path / "run", epochs=1, skip_bad=True, **FAST))
    assert res.skipped == 2
    assert res.metrics[0]["train_images"] + 2 <= 40


# ----------------------------------------------------------------------------- fine-tuning a --base checkpoint


@pytest.mark.slow
def test_finetune_from_base_checkpoint(small_data: Path, tmp_path: Path) -> None:
    from transformers import Pix2StructProcessor

    from train.data import load_split
    from train.presets import build_from_preset

    base = tmp_path / "base"
    model, proc = build_from_preset("tiny", [e.text for e in load_split(small_data)], max_patches=64)
    model.config.text_config.is_decoder = False  # the known pitfall of some published checkpoints
    model.save_pretrained(base)
    proc.save_pretrained(base)

    with pytest.warns(UserWarning, match="is_decoder"):
        res = train(
            TrainConfig(
                data=small_data,
                out=tmp_path / "ft",
                base=base,
                epochs=1,
                lr=1e-3,
                batch_size=8,
                max_new_tokens=12,
                progress=False,
            )
        )
    cfg = json.loads((res.last_dir / "config.json").read_text())
    assert cfg["text_config"].get("is_decoder", True) is True  # True is the default, so it may be left out
    assert (
        Pix2StructProcessor.from_pretrained(res.last_dir).tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    )
    assert json.loads((res.last_dir / "preprocessor_config.json").read_text())["max_patches"] == 64
    before, after = _weights(base), _weights(res.last_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert json.loads((res.best_dir / "generation_config.json").read_text())["max_new_tokens"] == 12
    # A base that states its caption length keeps it (it became 64, and BLEU and best/ were judged on cut captions).
    again = train(TrainConfig(data=small_data, out=tmp_path / "ft-again", base=res.best_dir, epochs=1, batch_size=8, progress=False))
    assert json.loads((again.last_dir / "generation_config.json").read_text())["max_new_tokens"] == 12

    not_p2s = tmp_path / "t5"
    not_p2s.mkdir()
    (not_p2s / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="not a Pix2Struct checkpoint"):
        train(TrainConfig(data=small_data, out=tmp_path / "ft2", base=not_p2s, progress=False))
    with pytest.raises(CheckpointError, match="not found"):
        train(TrainConfig(data=small_data, out=tmp_path / "ft2", base=tmp_path / "missing", progress=False))
    assert not (tmp_path / "ft2").exists()



def _hub_cache(root: Path, repo: str, checkpoint: Path, skip: tuple[str, ...] = ()) -> Path:
    """A huggingface_hub cache holding `checkpoint`'s files as the hub repo `repo`, laid out as
    snapshot_download leaves it (refs/main names a commit; the snapshot's files link to blobs/)."""
    import hashlib

    commit = hashlib.sha1(repo.encode()).hexdigest()
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot, blobs = folder / "snapshots" / commit, folder / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for file in checkpoint.iterdir():
        if file.is_file() and file.name not in skip:
            blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.mark.slow
def test_a_hub_id_base_is_read_from_huggingface_hubs_cache(small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--base org/name` (and export's, evaluate's, parity's checkpoint) loads through huggingface_hub: here
    offline, from its cache, as a machine that downloaded it before; checked before any work like a folder."""
    import huggingface_hub.constants

    from export.onnx import ExportError, inspect_checkpoint
    from train.checkpoint import load_checkpoint, position_check, resolve_checkpoint
    from train.data import load_split
    from train.presets import build_from_preset

    base = tmp_path / "base"
    model, proc = build_from_preset("tiny", [e.text for e in load_split(small_data)], max_patches=64)
    model.save_pretrained(base)
    proc.save_pretrained(base)
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snapshot = _hub_cache(cache, "edlight-test/tiny-base", base)

    assert resolve_checkpoint("edlight-test/tiny-base") == snapshot
    assert inspect_checkpoint("edlight-test/tiny-base").path == snapshot
    assert position_check(snapshot) == position_check(base)
    res = train(TrainConfig(data=small_data, out=tmp_path / "ft", base="edlight-test/tiny-base", epochs=1, lr=1e-3,
                            batch_size=8, progress=False))  # fmt: skip
    assert json.loads((tmp_path / "ft" / "run_config.json").read_text())["base"] == "edlight-test/tiny-base"
    stated = json.loads((base / "generation_config.json").read_text())["max_new_tokens"]  # the tiny preset's 48
    assert json.loads((res.last_dir / "generation_config.json").read_text())["max_new_tokens"] == stated
    before, after = _weights(base), _weights(res.last_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained, from the cached weights

    # A repo with PyTorch .bin weights only (older uploads) loads from them.
    model.save_pretrained(tmp_path / "bin-base", safe_serialization=False)
    proc.save_pretrained(tmp_path / "bin-base")
    _hub_cache(cache, "edlight-test/bin-base", tmp_path / "bin-base")
    loaded, _ = load_checkpoint("edlight-test/bin-base")
    assert torch.equal(loaded.state_dict()["decoder.lm_head.weight"], model.state_dict()["decoder.lm_head.weight"])

    # Not in the cache and no network: named before the data is read or anything is written.
    with pytest.raises(CheckpointError, match="edlight-test/absent is no local folder, and as a hub id the hub could not provide it"):
        train(TrainConfig(data=small_data, out=tmp_path / "absent", base="edlight-test/absent", progress=False))
    assert not (tmp_path / "absent").exists()
    with pytest.raises(ExportError, match="edlight-test/absent is no local folder"):
        inspect_checkpoint("edlight-test/absent")
    from export.cli import export as export_command

    res = CliRunner().invoke(export_command, ["edlight-test/absent", "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 2 and "edlight-test/absent is no local folder" in res.output
    assert not (tmp_path / "bundle").exists()
    # A mistyped folder is not asked of the hub: "runs/bset" beside runs/ (as "./runs/bset" reaches it too).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "best").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"^runs/bset: checkpoint not found \(taken as a folder, since runs/ is here"):
        inspect_checkpoint(Path("./runs/bset"))
    with pytest.raises(CheckpointError, match=r"checkpoint not found: runs/bset \(taken as a folder, since runs/ is here; "
                                              r"the hub id runs/bset is read where no runs/ folder is\)"):  # fmt: skip
        load_checkpoint("runs/bset")
    # A cached repo missing a file gets the folder checks' words.
    _hub_cache(cache, "edlight-test/no-tokenizer", base, skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    with pytest.raises(CheckpointError, match="no-tokenizer.*no tokenizer"):
        load_checkpoint("edlight-test/no-tokenizer")


def test_weights_that_leave_tensors_out_are_refused_not_filled_at_random(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # transformers initialises what the weights lack at random and only logs it: training, evaluate and export
    # went on with a random model (exit 0).
    from train.checkpoint import CheckpointError, load_checkpoint

    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    config = json.loads((ck / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] += 1  # a config of another size than the weights
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"ck/model.safetensors: holds no values for \d+ of the model's \d+ tensors "
                                              r"\(encoder.encoder.layer.\d.*which would be random"):
        load_checkpoint(ck)
    assert "newly initialized" not in capfd.readouterr().err  # transformers' lines, which the error replaces


def test_a_sentencepiece_tokenizer_without_sentencepiece_says_how_to_write_tokenizer_json(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers' own error was a list of 60 converter names, which said neither what was missing nor how to fix it.
    import train.checkpoint
    from train.checkpoint import CheckpointError, load_checkpoint

    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (ck / "tokenizer.json").unlink()
    (ck / "spiece.model").write_bytes(b"a SentencePiece model")
    monkeypatch.setattr(train.checkpoint, "is_installed", lambda module: module != "sentencepiece")
    with pytest.raises(CheckpointError, match=r"ck: its tokenizer is spiece.model alone .* `pip install sentencepiece "
                                              r"protobuf` and `python -c 'from transformers import AutoTokenizer; AutoTokenizer.from_pretrained\(\".*ck\"\).save_pretrained"):
        load_checkpoint(ck)

@pytest.mark.slow
def test_images_too_long_and_thin_for_the_models_positions_are_named_before_any_work(small_data: Path, tmp_path: Path) -> None:
    """A checkpoint whose max_patches reach its position tables cannot embed a long strip's grid: that was an
    IndexError mid-epoch (the epoch lost), after evaluate loaded, or in the export's parity check."""
    from PIL import Image

    from engine.errors import ImageError
    from train.checkpoint import load_checkpoint
    from train.data import load_split
    from train.evaluate import evaluate_checkpoint, generate_captions
    from train.presets import build_from_preset

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    Image.new("RGB", (20000, 10), "white").save(data / "strip.png")
    with (data / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "strip.png", "text": "a number line."}) + "\n")
    base = tmp_path / "base"
    model, proc = build_from_preset("tiny", [e.text for e in load_split(small_data)], max_patches=64)
    limit = model.config.vision_config.seq_len  # 512 for the tiny preset: a grid side of 511 at most
    model.save_pretrained(base)
    proc.save_pretrained(base)
    strip = rf"strip.png: a 20000x10 image becomes a 1x\d+ patch grid, beyond this model's {limit - 1} row/column positions"
    run = dict(data=data, base=base, max_patches=limit + 16, epochs=1, batch_size=8, max_new_tokens=8, progress=False)
    with pytest.raises(DataError, match=strip):  # before the model loads
        train(TrainConfig(out=tmp_path / "refused", **run))  # type: ignore[arg-type]
    assert not (tmp_path / "refused" / "last").exists()
    with pytest.warns(UserWarning, match=f"max_patches={limit + 16} reaches the model's {limit} row/column positions"):
        trained = train(TrainConfig(out=tmp_path / "run", skip_bad=True, **run))  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="reaches the model's"), pytest.raises(DataError, match=strip):
        evaluate_checkpoint(trained.best_dir, data, split="all", skip_bad=False)
    # Called directly, generation names the image instead of failing inside the model.
    with pytest.warns(UserWarning, match="reaches the model's"):
        model, processor = load_checkpoint(trained.best_dir)
    with pytest.raises(ImageError, match=str(data / strip)):
        generate_captions(model, processor, [data / "00000.jpg", data / "strip.png"])


# ----------------------------------------------------------------------------- CLI and two processes


def test_train_cli_usage_errors(small_data: Path, tmp_path: Path) -> None:
    from train.cli import train as train_cmd

    res = CliRunner().invoke(train_cmd, ["--data", str(small_data), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "exactly one of --base" in res.output
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run_config.json").write_text(json.dumps({"preset": "tiny", "base": None}))
    res = CliRunner().invoke(train_cmd, ["--data", str(small_data), "--out", str(tmp_path / "r"), "--resume"])
    assert res.exit_code == 2 and "was started with --preset tiny: resume with the command that started it plus --resume" in res.output
    res = CliRunner().invoke(
        train_cmd, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--preset", "tiny"]
    )
    assert res.exit_code == 2 and "data folder not found" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_fewer_training_images_than_processes_is_a_named_error(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "data"
    for split, name in (("train", "a.png"), ("test", "b.png")):
        (data / split).mkdir(parents=True)
        Image.new("RGB", (40, 30), "white").save(data / split / name)
        (data / split / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a page"}) + "\n")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "engine.cli", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
        "--epochs", "1", "--max-patches", "64", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # Said once for the run (every process found it), not once per process.
    assert (proc.stdout + proc.stderr).count("1 training image(s) for 2 processes; each process needs at least one") == 1
    assert "non-empty TensorList" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(small_data: Path, tmp_path: Path) -> None:
    """Two processes on CPU (gloo): rank 0 alone logs and saves, each image is seen once per epoch, and, since
    DDP averages gradients over ranks, 2 processes x batch 4 learn like 1 process x batch 8."""
    common = ["--data", str(small_data), "--preset", "tiny", "--epochs", "3", "--lr", "2e-3", "--max-patches", "64",
              "--no-augment", "--no-progress", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {  # the port is picked just before torchrun binds it
        "one": lambda: [sys.executable, "-m", "engine.cli", "train", "--out", str(tmp_path / "one"), "--batch-size", "8"],
        "two": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), "-m", "engine.cli", "train", "--out", str(tmp_path / "two"), "--batch-size", "4"],
    }  # fmt: skip
    losses, said = {}, {}
    for name, command in runs.items():
        proc = subprocess.run(command() + common, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in metrics]
        said[name] = proc
    for curve in losses.values():
        assert curve[-1] < 0.7 * curve[0], losses  # both learn
    # Same optimizer steps on the same data, only the sharding order differs: the curves end close together.
    assert abs(losses["two"][-1] - losses["one"][-1]) <= 0.15 * losses["one"][-1], losses

    out = tmp_path / "two"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # one writer: no duplicated lines
    n_train = len(__import__("train.data", fromlist=["load_split"]).load_split(small_data, "train"))
    for m in metrics:
        assert m["processes"] == 2
        assert m["train_images"] == m["unique_images"] == n_train  # every image once per epoch
    assert said["two"].stdout.count("done: 3 epochs") == 1 and said["two"].stderr.count("epoch 3/3:") == 1  # rank 0 only
    assert sorted(p.name for p in out.iterdir()) == [
        "best", "curves.png", "last", "metrics.jsonl", "run_config.json", "steps.jsonl",
    ]  # fmt: skip
    from transformers import Pix2StructForConditionalGeneration

    assert Pix2StructForConditionalGeneration.from_pretrained(out / "last").config.text_config.is_decoder

    # Resumed on one process for a fourth epoch: the smaller global batch and the re-planned schedule are said.
    resume = [sys.executable, "-m", "engine.cli", "train", "--out", str(out), "--batch-size", "4", *common, "--resume"]
    resume[resume.index("--epochs") + 1] = "4"
    proc = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ran on 2 process(es) and now runs on 1: each optimizer step now takes 4 images instead of 8" in proc.stdout + proc.stderr
    assert [json.loads(line)["processes"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 2, 2, 1]


@pytest.mark.slow
def test_a_process_that_dies_mid_run_leaves_the_others_saying_where_the_run_stands(small_data: Path, tmp_path: Path) -> None:
    """Rank 1 stopped after epoch 1: rank 0's next collective fails. It said so in a raw gloo traceback, without
    the note on how to resume."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "engine.cli", "train", "--data", str(small_data), "--out", str(out), "--preset", "tiny",
        "--epochs", "50", "--batch-size", "4", "--max-patches", "64", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last" / "trainer_state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = {}
        for child in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                environ = dict(
                    item.split("=", 1) for item in (child / "environ").read_text().split("\0") if "=" in item
                )
                if environ.get("MASTER_PORT") == cmd[cmd.index("--master_port") + 1] and "RANK" in environ:
                    ranks[environ["RANK"]] = int(child.name)
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"], signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    # Rank 0 either meets the closed connection or is stopped by torchrun first: in both, one word and the note.
    assert "another process of this run stopped (Connection closed by peer" in stderr or "interrupted:" in stderr, stderr[-3000:]
    assert "continue with the same command plus --resume" in stderr and "GLHF" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_resume_completes_a_save_cut_short_and_says_when_the_schedule_changes(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    first = train(TrainConfig(data=small_data, out=run, epochs=1, seed=2, **FAST))
    assert first.metrics[-1]["best"]
    for checkpoint in ("best", "last"):  # its split travels with each checkpoint
        recorded = json.loads((run / checkpoint / "edlight_data.json").read_text())
        assert recorded == {"caption_column": "text", "skip_bad": False, "test_ratio": 0.1, "split_seed": 0}
    # A kill after last/ was saved and before best/ and the logs were: only last/ knows epoch 1.
    shutil.rmtree(run / "best")
    (run / "metrics.jsonl").unlink()
    capsys.readouterr()
    again = train(TrainConfig(data=small_data, out=run, epochs=1, seed=2, resume=True, **FAST))
    assert [m["epoch"] for m in again.metrics] == [1] and "evaluating epoch 1" in capsys.readouterr().err
    a, b = _weights(run / "best"), _weights(run / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # best/ is epoch 1 again
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]

    # More epochs than planned: said, with the learning rates, and recorded in run_config.json.
    longer = train(TrainConfig(data=small_data, out=run, epochs=2, seed=2, resume=True, **FAST))
    assert [m["epoch"] for m in longer.metrics] == [1, 2]
    # The total time goes on from epoch 1's, its evaluation included (last/ is saved before it).
    one, two = longer.metrics
    assert two["wall_s"] >= one["wall_s"] + two["train_s"] + two["eval_s"]
    assert "was planned for 1 epochs and now runs to 2" in capsys.readouterr().err
    assert json.loads((run / "run_config.json").read_text())["epochs"] == 2
    # A plain --resume (no --epochs) goes on with the recorded plan, not the preset's default.
    plain = train(TrainConfig(data=small_data, out=run, seed=2, resume=True, **FAST))
    assert [m["epoch"] for m in plain.metrics] == [1, 2] and "nothing to do: 2 of 2 epochs" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["weights", "tokenizer"])
def test_a_damaged_checkpoint_file_is_a_named_error(tmp_path: Path, damage: str) -> None:
    from train.checkpoint import load_checkpoint
    from train.presets import build_from_preset

    model, processor = build_from_preset("tiny", ["a caption", "another caption"], max_patches=16, seed=0)
    model.save_pretrained(tmp_path / "ck")
    processor.save_pretrained(tmp_path / "ck")
    if damage == "weights":  # cut short, as a copy that ran out of room leaves it
        weights = tmp_path / "ck" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        (tmp_path / "ck" / "tokenizer.json").write_text('{"bad": 1')
    expected = {  # the file at fault, where the library's error tells it
        "weights": r"ck/model.safetensors: cut short \(5000 bytes where its header alone takes \d+\)",
        "tokenizer": r"ck: cannot load the Pix2Struct checkpoint with its processor \(",
    }
    with pytest.raises(CheckpointError, match=expected[damage]):
        load_checkpoint(tmp_path / "ck")


def test_an_interrupted_run_says_how_to_continue(tmp_path: Path) -> None:
    from train.cli import _resume_note

    assert "no epoch was finished" in _resume_note(tmp_path)
    # Interrupted between the two renames of a save: the previous epoch waits in .last.old for --resume.
    (tmp_path / ".last.old").mkdir()
    (tmp_path / ".last.old" / "trainer_state.pt").write_bytes(b"")
    assert "continue with the same command plus --resume" in _resume_note(tmp_path)
    shutil.rmtree(tmp_path / ".last.old")
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "trainer_state.pt").write_bytes(b"")
    assert "continue with the same command plus --resume" in _resume_note(tmp_path)
    assert "best" not in _resume_note(tmp_path)  # stopped in the first epoch's evaluation: no best/ yet
    (tmp_path / "best").mkdir()
    assert f"(the best so far in {tmp_path / 'best'})" in _resume_note(tmp_path)


def test_an_out_that_cannot_be_made_is_refused_before_the_data_is_read(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    # No data folder needed: the error comes first (a missing --data would be the other error).
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(TrainError, match=r"--out .*a_file/runs/run: cannot create or write this folder \(Not a directory\)"):
        train(TrainConfig(data=data, out=tmp_path / "a_file" / "runs" / "run", **FAST))
    with pytest.raises(TrainError, match="exists and is not a directory"):
        train(TrainConfig(data=data, out=tmp_path / "a_file", **FAST))
    # The check itself leaves nothing behind.
    with pytest.raises(DataError):
        train(TrainConfig(data=data, out=tmp_path / "new" / "run", **FAST))
    assert not (tmp_path / "new").exists()


def test_a_second_train_into_a_run_folder_in_use_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # what a training run into `out` holds while it trains
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom engine.folder import output_lock\n"
         "with output_lock(Path(sys.argv[1]) / 'run_config.json'):\n    print('locked', flush=True)\n    time.sleep(60)\n",
         str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(TrainError, match=rf"--out {re.escape(str(out))}: another training run is using it"):
            train(TrainConfig(data=tmp_path, out=out, **FAST))
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(DataError):  # free again: on to the (here empty) data
        train(TrainConfig(data=tmp_path / "run", out=out, **FAST))


def test_captions_too_long_to_learn_or_generate_are_warned_about() -> None:
    from train.data import Example
    from train.loop import LABEL_TOKENS, long_caption_warnings
    from train.presets import train_tokenizer

    short, long = "A clock showing 3:30.", " ".join(["The student wrote 7 + 5 = 12."] * 30)
    tok = train_tokenizer([short, long] * 5, vocab_size=200)
    assert len(tok(long).input_ids) > LABEL_TOKENS

    def ex(name: str, text: str) -> Example:
        return Example(name, text, Path(name))

    train_ex, test_ex = [ex("a.jpg", short), ex("b.jpg", long)], [ex("c.jpg", short), ex("d.jpg", "A clock showing 10:45.")]
    n_short = len(tok(short, add_special_tokens=False).input_ids)
    warnings = long_caption_warnings(tok, train_ex, test_ex, max_new_tokens=n_short - 1)
    assert len(warnings) == 2
    assert "1 training caption(s) are cut to the 128 tokens" in warnings[0] and "b.jpg" in warnings[0]
    assert f"2 test caption(s) are longer than the {n_short - 1} tokens evaluation generates" in warnings[1]
    # A caption that fits exactly (its </s> not counted: generation may stop at the limit) is no warning.
    assert long_caption_warnings(tok, train_ex[:1], test_ex[:1], max_new_tokens=n_short) == []


def test_characters_the_tokenizer_cannot_write_are_warned_about() -> None:
    from train.data import Example
    from train.loop import unwritable_character_warnings
    from train.presets import train_tokenizer

    tok = train_tokenizer(["The student wrote 7 + 5 = 12.", "A clock showing 3:30."] * 5, vocab_size=120)
    examples = [Example(name, text, Path(name)) for name, text in (
        ("a.jpg", "The student wrote 7 + 5 = 12."), ("b.jpg", "12 ÷ 3 ≤ 5, très bien."), ("c.jpg", "7 × 5 = 35."),
    )]  # fmt: skip
    assert tok.unk_token_id in tok("12 ÷ 3", add_special_tokens=False).input_ids
    [warning] = unwritable_character_warnings(tok, examples)
    assert warning.startswith("warning: 2 caption(s) hold characters the tokenizer has no token for (")
    assert "no token for (× è ÷ ≤): they are read as <unk>" in warning and warning.endswith("e.g. b.jpg, c.jpg")
    assert unwritable_character_warnings(tok, examples[:1]) == []


def test_the_tokenizer_keeps_math_symbols_as_written() -> None:
    from train.presets import train_tokenizer

    caps = ["3² = 9 is correct.", "The student shaded ½ of the circle.", "Area is 12 m²."] * 10
    tok = train_tokenizer(caps, vocab_size=200)
    for caption in caps[:3]:  # NFKC would give "32 = 9", "1⁄2", "m2": the model could not write the reference
        assert tok.decode(tok(caption).input_ids, skip_special_tokens=True) == caption


@pytest.mark.slow
def test_resume_follows_moved_data_and_refuses_changed_data(small_data: Path, tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(small_data, data)
    train(TrainConfig(data=data, out=run, epochs=3, seed=2, stop_after=1, **FAST))
    # The same data, moved (a copy of the folder): the run goes on and records where the data now is.
    moved = tmp_path / "moved"
    data.rename(moved)
    second = train(TrainConfig(data=moved, out=run, epochs=3, seed=2, stop_after=1, resume=True, **FAST))
    assert [m["epoch"] for m in second.metrics] == [1, 2]
    assert json.loads((run / "run_config.json").read_text())["data"] == str(moved)
    # Different data: refused before the model is loaded, naming the counts, with the way to go on.
    image = sorted(moved.glob("*.jpg"))[0]
    shutil.copy(image, moved / "extra.jpg")
    with (moved / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "extra.jpg", "text": "One more clock."}) + "\n")
    before = (run / "last" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(TrainError, match=r"--resume: the data changed since .* \(then 40 examples .*now 41 .*--base .*last"):
        train(TrainConfig(data=moved, out=run, epochs=3, seed=2, resume=True, **FAST))
    assert (run / "last" / "model.safetensors").stat().st_mtime_ns == before
