"""Cross-attention in the decoder: keys/values computed once per image, or folded into every step.

    .venv/bin/python benchmarks/results/base-2026-11-28-cross-attention/cross_attention_fold.py \
        [--batch-sizes 1,8] [--tokens 20] [--rounds 5] [--threads N]

The exported decoder computes each layer's cross-attention keys and values from the encoder output at its
first step (K = H Wk, V = H Wv: 2 x 12 layers of (2048 x 768) @ (768 x 768) per image at base size, 58 GFLOP,
compute-bound) and reads them back at every later step (151 MB per image per step in fp32). The algebra
allows another order that never builds them: per head, q K^T = (q Wk_h^T) H^T and p V = (p H) Wv_h, so every
step reads the encoder output H itself (6 MB, shared by all layers) and the first step's 58 GFLOP are gone,
at 0.9 GFLOP per image per step. This measures both at base-size shapes with random weights, in ONNX Runtime
with the engine's session settings: the first step's projections, one later step's cross-attention over all
layers (scores, softmax, weighted sum), and what `--tokens` steps cost per image either way. It checks first
that the two orders give the same attention outputs. Needs `onnx` (the `export` extra) to build the graphs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import click
import numpy as np


@dataclass(frozen=True)
class Shapes:
    layers: int = 12
    heads: int = 12
    head_dim: int = 64
    positions: int = 2048

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def _session(nodes: list[Any], inputs: list[Any], outputs: list[str], weights: dict[str, np.ndarray], threads: int | None) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from engine.session import SessionSettings

    graph = helper.make_graph(
        nodes, "cross_attention", inputs, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = SessionSettings(threads=threads).options()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def build(shapes: Shapes, threads: int | None, seed: int = 0) -> tuple[Any, Any, Any]:
    """The three graphs: the first step's K/V projections (H -> k_l, v_l as [batch, heads, positions, head_dim],
    as the export lays them out), a cached step over them (q, k_l, v_l -> o_l) and a folded step (q, H -> o_l)."""
    from onnx import TensorProto, helper

    s, rng = shapes, np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(s.hidden))
    wk = [rng.standard_normal((s.hidden, s.hidden), dtype=np.float32) * scale for _ in range(s.layers)]
    wv = [rng.standard_normal((s.hidden, s.hidden), dtype=np.float32) * scale for _ in range(s.layers)]
    hidden = helper.make_tensor_value_info("H", TensorProto.FLOAT, ["batch", s.positions, s.hidden])
    query = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", s.heads, 1, s.head_dim])
    split = np.array([0, s.positions, s.heads, s.head_dim], dtype=np.int64)

    nodes, outputs = [], []
    weights: dict[str, np.ndarray] = {"split": split}
    for layer in range(s.layers):
        for kind, w in (("k", wk[layer]), ("v", wv[layer])):
            weights[f"w{kind}{layer}"] = w
            nodes += [
                helper.make_node("MatMul", ["H", f"w{kind}{layer}"], [f"{kind}{layer}_flat"]),
                helper.make_node("Reshape", [f"{kind}{layer}_flat", "split"], [f"{kind}{layer}_heads"]),
                helper.make_node("Transpose", [f"{kind}{layer}_heads"], [f"{kind}{layer}"], perm=[0, 2, 1, 3]),
            ]
            outputs.append(f"{kind}{layer}")
    project = _session(nodes, [hidden], outputs, weights, threads)

    nodes, inputs = [], [query]
    for layer in range(s.layers):
        for kind in "kv":
            inputs.append(helper.make_tensor_value_info(f"{kind}{layer}", TensorProto.FLOAT, ["batch", s.heads, s.positions, s.head_dim]))
        nodes += [
            helper.make_node("Transpose", [f"k{layer}"], [f"kt{layer}"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", f"kt{layer}"], [f"s{layer}"]),
            helper.make_node("Softmax", [f"s{layer}"], [f"p{layer}"], axis=-1),
            helper.make_node("MatMul", [f"p{layer}", f"v{layer}"], [f"o{layer}"]),
        ]
    cached = _session(nodes, inputs, [f"o{layer}" for layer in range(s.layers)], {}, threads)

    # Head h's columns of Wk and Wv: q_h Wk_h^T is [1, hidden], (p_h H) Wv_h is [1, head_dim].
    nodes = [helper.make_node("Unsqueeze", ["H", "one"], ["H_all_heads"])]
    weights = {"one": np.array([1], np.int64)}
    nodes.append(helper.make_node("Transpose", ["H_all_heads"], ["HT"], perm=[0, 1, 3, 2]))
    for layer in range(s.layers):
        weights[f"wkt{layer}"] = np.ascontiguousarray(wk[layer].reshape(s.hidden, s.heads, s.head_dim).transpose(1, 2, 0))
        weights[f"wvh{layer}"] = np.ascontiguousarray(wv[layer].reshape(s.hidden, s.heads, s.head_dim).transpose(1, 0, 2))
        nodes += [
            helper.make_node("MatMul", ["q", f"wkt{layer}"], [f"qk{layer}"]),
            helper.make_node("MatMul", [f"qk{layer}", "HT"], [f"s{layer}"]),
            helper.make_node("Softmax", [f"s{layer}"], [f"p{layer}"], axis=-1),
            helper.make_node("MatMul", [f"p{layer}", "H_all_heads"], [f"ph{layer}"]),
            helper.make_node("MatMul", [f"ph{layer}", f"wvh{layer}"], [f"o{layer}"]),
        ]
    folded = _session(nodes, [query, hidden], [f"o{layer}" for layer in range(s.layers)], weights, threads)
    return project, cached, folded


def _median_seconds(run: Any, rounds: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shapes: Shapes, batch: int, tokens: int, rounds: int, threads: int | None) -> dict[str, float]:
    """Milliseconds per image: the projections, a cached step, a folded step, and `tokens` steps each way.
    Raises AssertionError when the two orders' outputs differ beyond fp32 rounding."""
    project, cached, folded = build(shapes, threads)
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((batch, shapes.positions, shapes.hidden), dtype=np.float32)
    query = rng.standard_normal((batch, shapes.heads, 1, shapes.head_dim), dtype=np.float32)
    kv = dict(zip([o.name for o in project.get_outputs()], project.run(None, {"H": hidden}), strict=True))
    by_cache = cached.run(None, {"q": query, **kv})
    by_fold = folded.run(None, {"q": query, "H": hidden})
    for one, other in zip(by_cache, by_fold, strict=True):
        np.testing.assert_allclose(one, other, rtol=1e-3, atol=1e-4)
    per_image = 1e3 / batch
    first = _median_seconds(lambda: project.run(None, {"H": hidden}), rounds) * per_image
    step = _median_seconds(lambda: cached.run(None, {"q": query, **kv}), rounds) * per_image
    fold = _median_seconds(lambda: folded.run(None, {"q": query, "H": hidden}), rounds) * per_image
    return {
        "projections_ms": first, "cached_step_ms": step, "folded_step_ms": fold,
        "cached_total_ms": first + tokens * step, "folded_total_ms": tokens * fold,
    }  # fmt: skip


@click.command()
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated.")
@click.option("--tokens", type=click.IntRange(min=1), default=20, show_default=True, help="Decoder steps per caption.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: the CPUs this process may use.")
def main(batch_sizes: str, tokens: int, rounds: int, threads: int | None) -> None:
    """Print ms per image of both cross-attention orders at base-size shapes."""
    click.echo(f"cross-attention at base size, {tokens} steps; ms per image (median of {rounds})")
    click.echo("| batch | first-step K/V projections | cached step | folded step | cached, all steps | folded, all steps |")
    click.echo("|---:|---:|---:|---:|---:|---:|")
    for batch in (int(size) for size in batch_sizes.split(",")):
        m = measure(Shapes(), batch, tokens, rounds, threads)
        click.echo(
            f"| {batch} | {m['projections_ms']:.1f} | {m['cached_step_ms']:.2f} | {m['folded_step_ms']:.2f} "
            f"| {m['cached_total_ms']:.0f} | {m['folded_total_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
