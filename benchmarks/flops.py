"""Analytic FLOP count of the Pix2Struct vision encoder (multiply-add = 2 FLOPs).

Counts what the hardware must do at the padded sequence length (padding patches
cost the same as real ones): the patch projection, the attention and MLP
linear layers, and the two attention products. Norms, softmax and the
position embeddings are a rounding error and are left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class EncoderFlops:
    patches: int
    embedding: float  # patch projection (768 pixel values -> hidden)
    linear: float  # q, k, v, o and the gated MLP, all layers
    attention: float  # Q @ K^T and P @ V, all layers and heads

    @property
    def total(self) -> float:
        return self.embedding + self.linear + self.attention

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def encoder_flops(vision_config: dict[str, Any], patches: int) -> EncoderFlops:
    """FLOPs per image of an encoder with `vision_config` (a Pix2StructVisionConfig as a dict) at `patches`.

    Raises KeyError when the config lacks a size field.
    """
    n = int(patches)
    d = int(vision_config["hidden_size"])
    heads = int(vision_config["num_attention_heads"])
    inner = heads * int(vision_config["d_kv"])
    d_ff = int(vision_config["d_ff"])
    layers = int(vision_config["num_hidden_layers"])
    patch_dim = int(vision_config.get("patch_embed_hidden_size", 768))

    embedding = 2.0 * n * patch_dim * d
    qkvo = 4 * 2.0 * n * d * inner
    gated_mlp = 3 * 2.0 * n * d * d_ff  # wi_0, wi_1 (gate) and wo
    scores_and_mix = 2 * 2.0 * n * n * inner
    return EncoderFlops(
        patches=n,
        embedding=embedding,
        linear=layers * (qkvo + gated_mlp),
        attention=layers * scores_and_mix,
    )
