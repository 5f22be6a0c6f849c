"""Named model recipes: a Pix2Struct config, a tokenizer trained on the captions, training defaults.

`build_from_preset(name, captions)` returns a freshly initialised
`Pix2StructForConditionalGeneration` and a `Pix2StructProcessor` whose tokenizer
was trained on `captions` with the `tokenizers` library and wrapped as a
T5-style fast tokenizer (pad=0 "<pad>", eos=1 "</s>", unk=2 "<unk>").

Presets:
- ``tiny``: ~1.5M parameters, 128 hidden, 3+3 layers, 256 patches (digits of the
  synthetic pages stay legible at that resolution). Trains from scratch on
  2,000 synthetic images in under 20 minutes on 2 CPU cores, with its vision
  tower initialised from the training images (init_vision_tower); the
  engine's default model.
- ``small``: ~10M parameters, 256 hidden, 4+4 layers, 512 patches.
- ``base``: exactly google/pix2struct-textcaps-base (the default
  ``Pix2StructConfig()``): 768 hidden, 12+12 layers, 12 heads, gated-GELU
  d_ff 2048, vocab 50244, 2048 patches. For benchmarks. Its tokenizer is
  trained on the captions (a few hundred to a few thousand pieces) and the
  model's embedding matrix keeps the full 50244 rows: ids the tokenizer never
  produces are simply never trained, which keeps the tensor shapes (and so the
  speed) identical to textcaps-base.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image
    from transformers import (
        Pix2StructForConditionalGeneration,
        Pix2StructProcessor,
        PreTrainedTokenizerFast,
    )

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
VISION_INIT_IMAGES = 300  # training images whose patches initialise the patch projection (vision_init)
# Mimetic attention init (init_vision_tower): a token's starting attention logit to itself, and the
# value/output product, -MIMETIC_VO * identity. On cached tiny inputs (900 steps, one seed) test BLEU was
# 28.2 with (5.6, 0.5) vs 19.9 with the T5 fan-in init; (5.6, 1.0) gave 28.7 and (16, 0.5) 31.2, within
# the spread of that probe, so the full runs (and the shipped model) keep the first setting measured; a full
# 22-epoch run at (16, 0.5) reached 45.1 against 46.3.
MIMETIC_SELF_LOGIT = 5.6
MIMETIC_VO = 0.5
PCA_EPSILON = 0.1  # added to each direction's spread: the weakest directions are not blown up to noise
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# Always in the vocabulary, so a test caption with an unseen digit or sign is never <unk>.
INITIAL_ALPHABET = list(string.ascii_letters + string.digits + string.punctuation + "▁")


@dataclass(frozen=True)
class Preset:
    """A model size plus the training defaults that suit it."""

    name: str
    hidden: int  # d_model of both towers
    encoder_layers: int
    decoder_layers: int
    heads: int
    d_kv: int  # per-head size
    d_ff: int  # gated-GELU inner size
    max_patches: int  # 16x16 patches per image
    tokenizer_vocab: int  # target size of the tokenizer trained on the captions
    model_vocab: int | None = None  # fixed embedding rows; None => tokenizer size rounded up to 64
    dropout: float = 0.1
    # training defaults (TrainConfig fields left as None take these)
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    max_new_tokens: int = 64
    # The loss weight of each caption's first `lead_tokens` tokens (train.loop.caption_loss); 1.0: plain mean.
    lead_tokens: int = 3
    lead_weight: float = 1.0
    # Initialise the vision tower from the training images (see init_vision_tower): for presets trained
    # from scratch on a few thousand images, where a default-initialised ViT barely learns to read them.
    vision_init: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        hidden=128,
        encoder_layers=3,
        decoder_layers=3,
        heads=4,
        d_kv=32,
        d_ff=256,
        max_patches=256,
        tokenizer_vocab=512,
        dropout=0.0,
        epochs=22,
        batch_size=16,
        lr=5e-4,
        warmup_ratio=0.05,
        max_new_tokens=48,
        lead_weight=5.0,
        vision_init=True,
        notes="default engine model; from scratch on synthetic data",
    ),
    "small": Preset(
        name="small",
        hidden=256,
        encoder_layers=4,
        decoder_layers=4,
        heads=4,
        d_kv=64,
        d_ff=1024,
        max_patches=512,
        tokenizer_vocab=2048,
        dropout=0.1,
        epochs=10,
        batch_size=16,
        lr=1e-3,
        max_new_tokens=64,
    ),
    "base": Preset(
        name="base",
        hidden=768,
        encoder_layers=12,
        decoder_layers=12,
        heads=12,
        d_kv=64,
        d_ff=2048,
        max_patches=2048,
        tokenizer_vocab=8000,
        model_vocab=50244,
        dropout=0.1,
        epochs=5,
        batch_size=4,
        lr=1e-4,
        max_new_tokens=64,
        notes="textcaps-base architecture, for benchmarks",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; raises ValueError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def train_tokenizer(captions: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on `captions` and wrap it as a `T5TokenizerFast`.

    T5 layout: Metaspace pre-tokenisation ("▁" marks word starts), "</s>" appended to
    every encoded text, ids pad=0, eos=1, unk=2. Numbers are split into single digits so
    the model spells any number digit by digit instead of memorising whole numbers, and
    every ASCII letter, digit and sign is in the vocabulary, so no caption maps to <unk>.
    BPE rather than Unigram: on a few thousand templated captions the `tokenizers` Unigram
    trainer keeps mostly single characters (about 2x longer sequences) and orders tied
    pieces differently from run to run; BPE learns whole words and is deterministic.
    Raises ValueError when `captions` is empty.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import T5TokenizerFast

    texts = [c for c in captions if c and c.strip()]
    if not texts:
        raise ValueError("cannot train a tokenizer: no non-empty captions")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # NFC, not NFKC: compatibility folding would rewrite the math in captions ("3²" -> "32", "½" -> "1⁄2"),
    # and the model would learn to write what the references (scored as written) do not say.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Digits(True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=INITIAL_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # the whole T5 convention rests on these ids
            raise RuntimeError(f"tokenizer training put {t!r} at id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=512,
    )


def model_config(preset: Preset, vocab_size: int, max_patches: int | None = None) -> Any:
    """The `Pix2StructConfig` of `preset` with `vocab_size` embedding rows.

    `max_patches` (default: the preset's) sizes the row/column embeddings so any
    image layout that fits the patch budget has a position id.
    """
    from transformers import Pix2StructConfig

    patches = max(max_patches or preset.max_patches, preset.max_patches)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=preset.hidden,
        d_kv=preset.d_kv,
        d_ff=preset.d_ff,
        num_layers=preset.decoder_layers,
        num_heads=preset.heads,
        dropout_rate=preset.dropout,
        decoder_start_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        is_decoder=True,  # the text tower must be causal (see ensure_causal_decoder)
        use_cache=True,
    )
    vision = dict(
        hidden_size=preset.hidden,
        patch_embed_hidden_size=768,  # 16*16*3 pixels per patch: fixed by the processor
        d_ff=preset.d_ff,
        d_kv=preset.d_kv,
        num_hidden_layers=preset.encoder_layers,
        num_attention_heads=preset.heads,
        dropout_rate=preset.dropout,
        attention_dropout=preset.dropout,
        # Row/column ids are 1-based and reach max_patches for a 1-row image (e.g. 10000x10), so the
        # position tables need more than max_patches entries; textcaps-base uses 2x (4096 for 2048).
        seq_len=2 * patches,
    )
    return Pix2StructConfig(
        text_config=text,
        vision_config=vision,
        decoder_start_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


def build_from_preset(
    name: str,
    captions: Sequence[str],
    max_patches: int | None = None,
    seed: int = 0,
    images: Iterable[Image.Image] | None = None,
) -> tuple[Pix2StructForConditionalGeneration, Pix2StructProcessor]:
    """A freshly initialised model of preset `name` and a processor with a tokenizer trained on `captions`.

    `max_patches` overrides the preset's patch budget; `seed` fixes the initial weights. For a preset with
    `vision_init`, `images` (a few hundred training images; read once) initialise the vision tower.
    Raises ValueError for an unknown preset or empty captions.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Pix2StructForConditionalGeneration,
        Pix2StructImageProcessor,
        Pix2StructProcessor,
    )

    preset = get_preset(name)
    tokenizer = train_tokenizer(captions, preset.tokenizer_vocab)
    n_tokens = len(tokenizer)
    if preset.model_vocab is not None:
        if n_tokens > preset.model_vocab:
            raise ValueError(
                f"tokenizer has {n_tokens} tokens, more than preset {name}'s {preset.model_vocab}"
            )
        vocab = preset.model_vocab
    else:
        vocab = -(-n_tokens // 64) * 64
    patches = max_patches or preset.max_patches
    config = model_config(preset, vocab, patches)
    torch.manual_seed(seed)
    model = Pix2StructForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=PAD_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        max_new_tokens=preset.max_new_tokens,
        num_beams=1,
        do_sample=False,
    )
    processor = Pix2StructProcessor(
        image_processor=Pix2StructImageProcessor(max_patches=patches, is_vqa=False), tokenizer=tokenizer
    )
    if preset.vision_init:
        init_vision_tower(model, _patch_sample(processor, images or []))
    return model, processor


def _patch_sample(processor: Any, images: Iterable[Image.Image]) -> Any:
    """The flattened pixels of every real (non-padding) patch of `images`, as the processor makes them."""
    import numpy as np

    image_processor = processor.image_processor
    parts = []
    for image in images:
        encoded = image_processor(
            images=[image], max_patches=image_processor.max_patches, return_tensors="np",
            input_data_format="channels_last",  # see train.evaluate.encode_images
        )  # fmt: skip
        patches, mask = encoded["flattened_patches"][0], encoded["attention_mask"][0]
        parts.append(patches[mask > 0][:, 2:])  # drop the row/column ids
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def init_vision_tower(model: Any, patches: Any) -> None:
    """Initialise Pix2Struct's vision tower so that a from-scratch run learns to read pages sooner.

    Three parts, each measured on the synthetic pages (README, training section):
    - mimetic attention (Trockman & Kolter, 2023, "Mimetic Initialization of Self-Attention Layers"): in
      every layer W_q = W_k with orthonormal rows per head, so each head starts out attending to the tokens
      most like the query token (and, through the sin/cos tables, to its neighbours); and W_o W_v =
      -MIMETIC_VO * identity (a projection when heads * d_kv < hidden), the pattern of vision transformers
      trained on much more data. The MLP weights get T5-style fan-in scales;
    - sin/cos tables for the row and column embeddings, so that neighbouring patches start out similar;
    - the patch projection from the principal components of `patches` (rows of flattened patch pixels from
      training images), whitened: the first layer starts with the directions along which real patches vary,
      such as the faint ruling of lined or grid paper, instead of random ones. Skipped when `patches` has
      fewer rows than the hidden size.
    """
    import torch

    encoder = model.encoder
    config = model.config.vision_config
    hidden, d_kv, heads, d_ff = config.hidden_size, config.d_kv, config.num_attention_heads, config.d_ff
    with torch.no_grad():
        # Pix2Struct's attention has no 1/sqrt(d_kv), so the scale alone sets a token's starting logit to
        # itself: its RMS-normed vector (norm sqrt(hidden)) keeps about d_kv of its squared norm in a head's
        # d_kv orthonormal directions, times the scale squared.
        query_key_scale = (MIMETIC_SELF_LOGIT / d_kv) ** 0.5
        for layer in encoder.encoder.layer:
            attention, mlp = layer.attention, layer.mlp
            query_key = _head_rows(heads, d_kv, hidden)
            attention.query.weight.copy_(query_key * query_key_scale)
            attention.key.weight.copy_(query_key * query_key_scale)
            value = _head_rows(heads, d_kv, hidden)
            attention.value.weight.copy_(value)
            # Orthonormal rows: the transpose is the pseudo-inverse. More rows than hidden: it is not.
            inverse = value.T if heads * d_kv <= hidden else torch.linalg.pinv(value)
            attention.output.weight.copy_(-MIMETIC_VO * inverse)
            mlp.wi_0.weight.normal_(0.0, hidden**-0.5)
            mlp.wi_1.weight.normal_(0.0, hidden**-0.5)
            mlp.wo.weight.normal_(0.0, d_ff**-0.5)
        rows = encoder.embeddings.row_embedder.weight.shape[0]
        position = torch.arange(rows, dtype=torch.float32)[:, None]
        frequencies = 1.0 / (10000 ** (torch.arange(0, hidden, 2, dtype=torch.float32) / hidden))
        table = torch.zeros(rows, hidden)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * frequencies), torch.cos(position * frequencies)
        encoder.embeddings.row_embedder.weight.copy_(table * 0.5)
        # Columns get the same table shifted, so that a row id and a column id do not look alike.
        encoder.embeddings.column_embedder.weight.copy_(torch.roll(table, hidden // 4, dims=1) * 0.5)
        if len(patches) < hidden:
            return
        pixels = torch.as_tensor(patches, dtype=torch.float32)
        mean = pixels.mean(0)
        centred = pixels - mean
        # The principal directions as eigenvectors of the pixels' covariance (768 x 768), not from an SVD of
        # the rows themselves: the same directions and spreads (eigenvalues are the squared singular values
        # over the row count) in a fraction of the time and with fewer rows x 768 copies. 300 pages at
        # 2048 patches are 600k rows: minutes and gigabytes as an SVD, a few seconds as a covariance. The
        # float32 product loses nothing that matters here (about 1e-6 of the spreads kept); the eigen-
        # decomposition runs in float64.
        covariance = (centred.T @ centred).double() / len(pixels)
        variance, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        variance, eigenvectors = variance.flip(0)[:hidden], eigenvectors.flip(1)[:, :hidden].T
        # A direction's sign is arbitrary (LAPACK builds may differ): each one's largest component is made
        # positive, so the same pages give the same weights everywhere.
        largest = eigenvectors.abs().argmax(1, keepdim=True)
        directions = (eigenvectors * eigenvectors.gather(1, largest).sign()).float()
        spread = variance.clamp_min(0).sqrt().float()[:, None]  # standard deviation along each direction
        weight = directions / (spread + PCA_EPSILON)
        projection = encoder.embeddings.patch_projection
        projection.weight.copy_(weight)
        projection.bias.copy_(-(weight @ mean))


def _head_rows(heads: int, d_kv: int, hidden: int) -> Any:
    """(heads * d_kv, hidden) projection weights whose rows are orthonormal within each head (and across heads
    when they fit in `hidden`: the heads then see disjoint subspaces). Drawn from torch's global RNG."""
    import torch

    def orthonormal_rows(rows: int) -> Any:
        q, _ = torch.linalg.qr(torch.randn(hidden, rows))  # (hidden, rows), orthonormal columns
        return q.T

    if heads * d_kv <= hidden:
        return orthonormal_rows(heads * d_kv)
    return torch.cat([orthonormal_rows(d_kv) for _ in range(heads)])


def ensure_causal_decoder(model: Any) -> bool:
    """Make the text decoder causal if a checkpoint forgot to; returns True when it had to fix it.

    Some Pix2Struct checkpoints were saved with `text_config.is_decoder=False`,
    which makes the decoder attend to future tokens in training (a model that
    looks perfect in teacher forcing and babbles at generation time).
    """
    text_cfg = model.config.text_config
    fixed = False
    if not getattr(text_cfg, "is_decoder", False):
        text_cfg.is_decoder = True
        fixed = True
    decoder = getattr(model, "decoder", None)
    dec_cfg = getattr(decoder, "config", None)
    if dec_cfg is not None and dec_cfg is not text_cfg and not getattr(dec_cfg, "is_decoder", False):
        dec_cfg.is_decoder = True
        fixed = True
    return fixed


def count_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))
