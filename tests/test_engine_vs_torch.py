"""The torch-free engine against PyTorch `generate` on the tiny trained model (full environment).

Greedy captions must be identical token for token, on both decoder layouts; beam search and
min_new_tokens must follow transformers' semantics; the engine must run with torch blocked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import Captioner
from engine.decode import DecoderState
from engine.images import load_image
from engine.preprocess import Patches, image_to_patches

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def images(synth_data: Path) -> list[Path]:
    """Thirty generated images (the split does not matter: we compare two runtimes, not quality)."""
    return sorted(p for p in synth_data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:30]


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint: Path):  # noqa: ANN201
    from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor

    model = Pix2StructForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model, Pix2StructProcessor.from_pretrained(tiny_checkpoint)


def torch_captions(torch_model, paths: list[Path], **generate_kwargs: object) -> list[str]:  # noqa: ANN001
    import torch

    model, processor = torch_model
    pixels = [load_image(p) for p in paths]
    image_processor = processor.image_processor
    # The image processor directly: Pix2StructProcessor.__call__ would force 2048 patches.
    # channels_last: HF guesses the channel axis, wrongly for images 1 or 3 pixels high.
    batch = image_processor(images=pixels, max_patches=image_processor.max_patches, return_tensors="pt",
                            input_data_format="channels_last")
    with torch.no_grad():
        out = model.generate(
            flattened_patches=batch["flattened_patches"], attention_mask=batch["attention_mask"],
            **{"max_new_tokens": MAX_NEW_TOKENS, **generate_kwargs},
        )
    # Stripped as the engine strips its captions: a caption cut at the token limit may end in a space.
    return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def other_layout_bundle(tiny_checkpoint: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint exported with the decoder layout tiny_bundle does not use."""
    from engine.bundle import Bundle
    from export.onnx import export_bundle

    layout = Bundle.load(tiny_bundle, verify_hashes=False).manifest.decoder_layout
    other = "split" if layout == "merged" else "merged"
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("layout") / other, decoder_layout=other)


def test_greedy_captions_equal_pytorch(tiny_bundle: Path, torch_model, images: list[Path]) -> None:  # noqa: ANN001
    engine = Captioner(tiny_bundle, batch_size=4, max_new_tokens=MAX_NEW_TOKENS).caption(images)
    reference = torch_captions(torch_model, images)
    assert engine == reference
    assert len(set(reference)) > 1, "the tiny model says the same thing for every image: a weak test"


def test_both_decoder_layouts_give_the_same_captions(tiny_bundle: Path, other_layout_bundle: Path, images: list[Path]) -> None:
    first = Captioner(tiny_bundle, batch_size=5, max_new_tokens=MAX_NEW_TOKENS)
    second = Captioner(other_layout_bundle, batch_size=3, max_new_tokens=MAX_NEW_TOKENS)
    assert first.bundle.manifest.decoder_layout != second.bundle.manifest.decoder_layout
    assert first.caption(images) == second.caption(images)


def with_generation_settings(bundle: Path, settings: dict, copy: Path) -> Path:
    """`bundle`, or a copy of it whose generation_config.json also says `settings` (manifest rehashed)."""
    import json
    import shutil

    from engine.bundle import Bundle, write_manifest

    if not settings:
        return bundle
    copied = Path(shutil.copytree(bundle, copy))
    config = json.loads((copied / "generation_config.json").read_text())
    (copied / "generation_config.json").write_text(json.dumps({**config, **settings}))
    write_manifest(copied, Bundle.load(copied, verify_hashes=False).manifest)
    return copied


@pytest.mark.parametrize(
    "stopping",
    [
        {},
        {"early_stopping": "never", "length_penalty": 2.0},
        {"early_stopping": True, "length_penalty": 0.5},
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    ],
)
def test_beam_search_follows_transformers(
    tiny_bundle: Path, torch_model, images: list[Path], stopping: dict, tmp_path: Path  # noqa: ANN001
) -> None:
    """With the bundle's own stopping rule, length penalty and logits processors (its generation_config.json)
    as generate reads them."""
    bundle = with_generation_settings(tiny_bundle, stopping, tmp_path / "bundle")
    subset = images[:12]
    engine = Captioner(bundle, batch_size=4, num_beams=3, max_new_tokens=MAX_NEW_TOKENS).caption(subset)
    reference = torch_captions(torch_model, subset, num_beams=3, **stopping)
    identical = sum(a == b for a, b in zip(engine, reference, strict=True))
    # Beam scores are sums of log-probabilities; a float32 near-tie may order two beams differently.
    assert identical >= len(subset) - 1, list(zip(engine, reference, strict=True))


@pytest.mark.parametrize("processors", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 0.7}])
def test_logits_processors_in_the_generation_config_follow_transformers(
    tiny_bundle: Path, torch_model, images: list[Path], processors: dict, tmp_path: Path  # noqa: ANN001
) -> None:
    """A checkpoint's repetition_penalty / no_repeat_ngram_size reach the engine as generate applies them."""
    bundle = with_generation_settings(tiny_bundle, processors, tmp_path / "bundle")
    engine = Captioner(bundle, batch_size=4, max_new_tokens=MAX_NEW_TOKENS).caption(images)
    assert engine == torch_captions(torch_model, images, **processors)
    plain = Captioner(tiny_bundle, batch_size=4, max_new_tokens=MAX_NEW_TOKENS).caption(images)
    assert engine != plain, "the setting changed no caption: a weak test"


@pytest.fixture(scope="module")
def frequent_tokens(torch_model, images: list[Path]) -> dict[str, int]:  # noqa: ANN001
    """Tokens the tiny model's greedy captions use: the commonest first and second tokens, the commonest pair
    of neighbours, and a token no caption starts with."""
    from collections import Counter

    _, processor = torch_model
    ids = [processor.tokenizer(c, add_special_tokens=False).input_ids for c in torch_captions(torch_model, images)]
    (left, right), _ = Counter((a, b) for seq in ids for a, b in zip(seq, seq[1:], strict=False)).most_common(1)[0]
    first = Counter(seq[0] for seq in ids if seq).most_common(1)[0][0]
    second = Counter(seq[1] for seq in ids if len(seq) > 1).most_common(1)[0][0]
    never_first = next(t for seq in ids for t in seq[1:] if t not in {seq[0] for seq in ids if seq})
    return {"first": first, "second": second, "left": left, "right": right, "never_first": never_first}


TOKEN_PROCESSORS = {
    "suppress_tokens": lambda t: {"suppress_tokens": [t["right"]]},
    "begin_suppress_tokens": lambda t: {"begin_suppress_tokens": [t["first"]]},
    "bad_words_ids": lambda t: {"bad_words_ids": [[t["left"], t["right"]], [1]]},  # [EOS] is never banned
    "sequence_bias": lambda t: {"sequence_bias": [[[t["left"], t["right"]], -4.0], [[t["never_first"]], 2.0]]},
    "forced_bos_token_id": lambda t: {"forced_bos_token_id": t["never_first"], "begin_suppress_tokens": [t["second"]]},
    "forced_eos_token_id": lambda t: {"forced_eos_token_id": 1, "max_new_tokens": 5},
    # All but the last at once, in beam search (which applies them to log-probabilities).
    "all, beam search": lambda t: {
        "num_beams": 3, "suppress_tokens": [t["right"]], "begin_suppress_tokens": [t["first"]],
        "bad_words_ids": [[t["left"], t["second"]]], "sequence_bias": [[[t["never_first"]], 2.0]],
        "forced_bos_token_id": t["never_first"],
    },
}


@pytest.mark.parametrize("name", list(TOKEN_PROCESSORS))
def test_token_processors_in_the_generation_config_follow_transformers(
    tiny_bundle: Path, torch_model, images: list[Path], frequent_tokens: dict, name: str, tmp_path: Path  # noqa: ANN001
) -> None:
    """A checkpoint's bad_words_ids, sequence_bias, forced and suppressed tokens reach the engine as generate
    applies them (engines before left them out, so parity failed for such checkpoints)."""
    import json

    settings = TOKEN_PROCESSORS[name](frequent_tokens)
    beams, length = settings.pop("num_beams", 1), settings.get("max_new_tokens", MAX_NEW_TOKENS)
    bundle = with_generation_settings(tiny_bundle, settings, tmp_path / "bundle")
    subset = images[:8]
    engine = Captioner(bundle, batch_size=4, num_beams=beams, max_new_tokens=length).caption(subset)
    # generate reads them as from a generation_config.json: sequence_bias as [[tokens], bias] pairs
    as_saved = json.loads(json.dumps({**settings, "max_new_tokens": length}))
    reference = torch_captions(torch_model, subset, num_beams=beams, **as_saved)
    identical = sum(a == b for a, b in zip(engine, reference, strict=True))
    # Beam scores are sums of log-probabilities; a float32 near-tie may order two beams differently.
    assert identical >= len(subset) - (beams > 1), list(zip(engine, reference, strict=True))
    plain = Captioner(tiny_bundle, batch_size=4, num_beams=beams, max_new_tokens=length).caption(subset)
    assert sum(a != b for a, b in zip(engine, plain, strict=True)) >= 2, "the setting changed too few captions: a weak test"


def test_min_new_tokens_matches_transformers(tiny_bundle: Path, torch_model, images: list[Path]) -> None:  # noqa: ANN001
    subset = images[:6]
    engine = Captioner(tiny_bundle, batch_size=3, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
    assert engine.caption(subset) == torch_captions(torch_model, subset, min_new_tokens=MAX_NEW_TOKENS)
    assert engine.timings.decode_steps == 2 * MAX_NEW_TOKENS  # two batches, every row forced to full length


def test_batch_and_single_identical_on_the_trained_model(tiny_bundle: Path, images: list[Path]) -> None:
    captioner = Captioner(tiny_bundle, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)
    subset = images[:10]
    assert captioner.caption(subset) == [captioner.caption([p])[0] for p in subset]


@pytest.mark.parametrize(("bundle_fixture", "batching"), [("tiny_bundle", "batch"), ("tiny_bundle_int8", "steps")])
def test_batches_give_each_image_the_numbers_it_gets_alone(
    bundle_fixture: str, batching: str, images: list[Path], request: pytest.FixtureRequest
) -> None:
    """The logits of every step are bit-identical alone and in a batch, for images of different sizes
    (different padding) in any order: fp32 batches everything; int8 batches the cached decoder steps
    (row-wise activation scales) and runs the encoder and the first step one image at a time."""
    import numpy as np

    bundle = request.getfixturevalue(bundle_fixture)
    # EOS suppressed: every row runs every step, so the batch's rows stay in place.
    captioner = Captioner(bundle, batch_size=8, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
    assert captioner.batching == batching and not captioner.one_image_per_run
    subset = [images[i] for i in (0, 7, 3, 11, 5)]
    pictures = [load_image(p) for p in subset]
    pictures[1] = pictures[1].resize((pictures[1].width // 3, pictures[1].height))  # fewer patches: padded in the batch
    patches = [image_to_patches(p, captioner.patch_config) for p in pictures]
    assert len({int(p.attention_mask.sum()) for p in patches}) > 1

    def step_logits(batch: list[Patches]) -> list[np.ndarray]:
        """Logits of every greedy step, per image."""
        recorded: list[np.ndarray] = []
        decoder = captioner.decoder
        start, advance = decoder.start, decoder.advance

        def record_start(*args: np.ndarray) -> tuple[np.ndarray, DecoderState]:
            logits, state = start(*args)
            recorded.append(logits.copy())
            return logits, state

        def record_advance(state: DecoderState, ids: np.ndarray) -> np.ndarray:
            logits = advance(state, ids)
            recorded.append(logits.copy())
            return logits

        decoder.start, decoder.advance = record_start, record_advance  # type: ignore[method-assign]
        try:
            captioner._run_model(batch)
        finally:
            del decoder.start, decoder.advance
        return [np.stack([step[i] for step in recorded]) for i in range(len(batch))]

    alone = [step_logits([p])[0] for p in patches]
    together = step_logits(patches)
    reordered = step_logits(patches[::-1])[::-1]
    for i, expected in enumerate(alone):
        assert np.array_equal(together[i], expected), f"image {i}: max |diff| {np.abs(together[i] - expected).max()}"
        assert np.array_equal(reordered[i], expected)
    free = Captioner(bundle, batch_size=8, max_new_tokens=MAX_NEW_TOKENS)  # rows finish at their own EOS
    assert free.caption(subset) == [free.caption([p])[0] for p in subset]


def test_engine_runs_with_torch_blocked(tiny_bundle: Path, images: list[Path]) -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "transformers", "optimum"}:
                    raise ImportError("blocked " + name)

        sys.meta_path.insert(0, Blocker())
        from engine import Captioner
        print("\\n".join(Captioner(sys.argv[1], max_new_tokens=int(sys.argv[2])).caption(sys.argv[3:])))
        """
    )
    subset = images[:3]
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_bundle), str(MAX_NEW_TOKENS), *map(str, subset)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == Captioner(tiny_bundle, max_new_tokens=MAX_NEW_TOKENS).caption(subset)
