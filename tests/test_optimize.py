"""export.optimize: the rewritten Pix2Struct encoder gives the original's outputs, faster.

The tiny model is random-initialised from the ``tiny`` preset (no training needed: the rewrites
are about graph structure) and exported with Optimum exactly as the bundle export does.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.optimize import (  # noqa: E402
    ENCODER_REWRITES,
    OptimizeError,
    encoder_feeds,
    optimize_decoder,
    optimize_encoder,
    store_weights_beside,
    verify_encoder,
    verify_same_outputs,
)

# fp32 rewrites reorder sums (packed QKV GEMM, fused norm): differences are float rounding only.
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Optimum's encoder_model.onnx for a randomly initialised `tiny` preset model."""
    import torch
    from optimum.exporters.onnx import main_export

    from train.presets import build_from_preset

    torch.manual_seed(0)
    captions = [f"a page of math homework number {i}" for i in range(20)]
    model, processor = build_from_preset("tiny", captions, seed=0)
    ckpt = tmp_path_factory.mktemp("opt") / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    out = ckpt.parent / "onnx"
    main_export(str(ckpt), output=out, task="image-to-text", do_validation=False, device="cpu")
    return out / "encoder_model.onnx"


def _shape(path: Path) -> tuple[int, int]:
    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    return dims[1].dim_value, dims[2].dim_value


def _run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], feed)[0]


def _op_counts(path: Path) -> collections.Counter[str]:
    """Op types of every node, including those inside If branches."""
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(onnx.load(str(path), load_external_data=False).graph)
    return counts


@pytest.fixture(scope="module")
def optimized(tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    target = tmp_path_factory.mktemp("optimized") / "encoder_model.onnx"
    report = optimize_encoder(tiny_encoder, target)
    return target, report


@pytest.mark.slow
def test_every_layer_is_rewritten(tiny_encoder: Path, optimized: tuple[Path, object]) -> None:
    target, report = optimized
    layers = _op_counts(tiny_encoder)["Softmax"]
    assert layers >= 2
    assert report.counts["attention"] == layers  # type: ignore[attr-defined]
    # two norms per layer plus the final one, each fused with the residual Add before it
    assert report.counts["skip_rms_norm"] == 2 * layers + 1  # type: ignore[attr-defined]
    assert report.rewrites == list(ENCODER_REWRITES)  # type: ignore[attr-defined]
    ops = _op_counts(target)
    # one If per layer: flash MultiHeadAttention when the batch has no padding, masked otherwise
    assert ops["If"] == layers
    assert ops["MultiHeadAttention"] == 2 * layers
    # the per-layer mask-bias subgraph and the unfused attention are gone
    for gone in ("Softmax", "Where", "ConstantOfShape", "Transpose", "Pow", "Tanh"):
        assert ops[gone] == 0, gone
    assert ops["Equal"] == 1  # the one "no padding in this batch" test shared by all layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1


@pytest.mark.slow
@pytest.mark.parametrize("batch,pads", [(1, [0]), (2, [0, 0]), (3, [0, 17, 100])])
def test_outputs_match_original(
    tiny_encoder: Path, optimized: tuple[Path, object], batch: int, pads: list[int]
) -> None:
    patches, dim = _shape(tiny_encoder)
    feed = encoder_feeds(batch, patches, dim, seed=batch)
    for row, pad in enumerate(pads):
        if pad:
            feed["attention_mask"][row, patches - pad :] = 0
            feed["flattened_patches"][row, patches - pad :] = 0
    ref = _run(tiny_encoder, feed)
    new = _run(optimized[0], feed)
    assert ref.shape == new.shape
    valid = feed["attention_mask"].astype(bool)
    # padded rows: the decoder never looks at them, but the rewrite keeps them equal too
    assert np.abs(ref - new)[valid].max() < ATOL
    assert np.abs(ref - new).max() < ATOL
    # the padding mask is really applied: unmasked attention would change the valid rows
    if any(pads):
        unmasked = {**feed, "attention_mask": np.ones_like(feed["attention_mask"])}
        assert np.abs(_run(optimized[0], unmasked) - new)[valid].max() > 100 * ATOL


@pytest.mark.slow
def test_verify_same_outputs_accepts_rewrite_and_rejects_other_graph(
    tiny_encoder: Path, optimized: tuple[Path, object], tmp_path: Path
) -> None:
    patches, dim = _shape(tiny_encoder)
    feeds = [encoder_feeds(1, patches, dim), encoder_feeds(2, patches, dim, pad=30, seed=1)]
    assert verify_same_outputs(tiny_encoder, optimized[0], feeds, atol=ATOL) < ATOL
    assert verify_encoder(tiny_encoder, optimized[0], atol=ATOL) < ATOL
    # a graph that ignores the padding mask must be caught
    nomask = tmp_path / "nomask.onnx"
    from export.optimize import optimize_encoder as opt

    opt(tiny_encoder, nomask, ort_optimize=False, use_mask=False)
    with pytest.raises(OptimizeError, match="last_hidden_state"):
        verify_same_outputs(tiny_encoder, nomask, feeds, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "rewrites", [["noop_casts"], ["noop_casts", "attention"], ["skip_rms_norm", "fast_gelu"]]
)
def test_each_rewrite_alone_keeps_outputs(tiny_encoder: Path, tmp_path: Path, rewrites: list[str]) -> None:
    patches, dim = _shape(tiny_encoder)
    target = tmp_path / "enc.onnx"
    report = optimize_encoder(tiny_encoder, target, rewrites, ort_optimize=False)
    assert set(report.rewrites) <= set(rewrites) | {"rms_norm"}
    feeds = [encoder_feeds(2, patches, dim, pad=40, seed=3)]
    verify_same_outputs(tiny_encoder, target, feeds, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("op,flash", [("Attention", False), ("MultiHeadAttention", False)])
def test_other_attention_variants_match(tiny_encoder: Path, tmp_path: Path, op: str, flash: bool) -> None:
    patches, dim = _shape(tiny_encoder)
    target = tmp_path / "variant.onnx"
    report = optimize_encoder(tiny_encoder, target, attention_op=op, flash_when_unpadded=flash)
    layers = _op_counts(tiny_encoder)["Softmax"]
    assert report.counts["attention"] == layers
    ops = _op_counts(target)
    assert ops[op] == layers and ops["If"] == 0
    feeds = [encoder_feeds(1, patches, dim), encoder_feeds(2, patches, dim, pad=25)]
    verify_same_outputs(tiny_encoder, target, feeds, atol=ATOL)


@pytest.mark.slow
def test_trimmed_padding_gives_the_same_valid_rows(
    tiny_encoder: Path, optimized: tuple[Path, object]
) -> None:
    """dynamic_patches: the engine may drop trailing padded patches instead of masking them."""
    patches, dim = _shape(tiny_encoder)
    keep = patches - 37
    feed = encoder_feeds(1, patches, dim, pad=patches - keep, seed=5)
    padded = _run(tiny_encoder, feed)
    trimmed = _run(optimized[0], {name: value[:, :keep] for name, value in feed.items()})
    assert trimmed.shape == (1, keep, padded.shape[2])
    assert np.abs(padded[:, :keep] - trimmed).max() < ATOL


@pytest.mark.slow
def test_decoder_accepts_trimmed_encoder_output(tiny_encoder: Path, tmp_path: Path) -> None:
    decoder = tiny_encoder.with_name("decoder_model.onnx")
    target = tmp_path / "decoder_model.onnx"
    report = optimize_decoder(decoder, target)
    assert report.rewrites == ["dynamic_patches"]
    patches, _ = _shape(tiny_encoder)
    keep = patches - 50
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, patches, _hidden(decoder))).astype(np.float32)
    mask = np.ones((2, patches), np.int64)
    mask[:, keep:] = 0
    tokens = {"input_ids": np.array([[0, 5, 7]] * 2, np.int64), "attention_mask": np.ones((2, 3), np.int64)}

    def logits(path: Path, n: int) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {**tokens, "encoder_hidden_states": hidden[:, :n], "encoder_attention_mask": mask[:, :n]}
        return session.run(["logits"], feed)[0]

    assert np.abs(logits(decoder, patches) - logits(target, keep)).max() < ATOL


def _hidden(decoder: Path) -> int:
    inputs = onnx.load(str(decoder), load_external_data=False).graph.input
    states = next(i for i in inputs if i.name == "encoder_hidden_states")
    return states.type.tensor_type.shape.dim[2].dim_value


@pytest.mark.slow
def test_int8_quantization_after_rewrite(
    optimized: tuple[Path, object], tiny_encoder: Path, tmp_path: Path
) -> None:
    """Dynamic int8 (per channel) on the rewritten graph quantizes its MatMuls and stays close."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tmp_path / "encoder_int8.onnx"
    quantize_dynamic(
        optimized[0],
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul"],
    )
    ops = _op_counts(target)
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] > 0
    assert ops["MatMul"] == 0  # every projection is int8; attention itself stays fused fp32
    patches, dim = _shape(tiny_encoder)
    feed = encoder_feeds(2, patches, dim, pad=20)
    ref, new = _run(tiny_encoder, feed).ravel(), _run(target, feed).ravel()
    cosine = float(ref @ new / (np.linalg.norm(ref) * np.linalg.norm(new)))
    assert cosine > 0.99


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown encoder rewrites"):
        optimize_encoder(tmp_path / "missing.onnx", tmp_path / "out.onnx", ["no_such_rewrite"])
    with pytest.raises(ValueError, match="attention_op"):
        optimize_encoder(tmp_path / "missing.onnx", tmp_path / "out.onnx", attention_op="Flash")
    with pytest.raises(OptimizeError, match="missing.onnx"):
        optimize_encoder(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    with pytest.raises(OptimizeError, match="missing.onnx"):
        optimize_decoder(tmp_path / "missing.onnx", tmp_path / "out.onnx")


def test_weights_move_beside_the_graph_byte_for_byte(tiny_encoder: Path, tmp_path: Path) -> None:
    import shutil

    graph = tmp_path / "encoder_model.onnx"
    shutil.copy(tiny_encoder, graph)
    graph.chmod(0o644)
    before = graph.read_bytes()
    assert not store_weights_beside(graph, min_bytes=len(before) * 2)  # small graphs stay one file
    assert graph.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [graph.name]

    assert store_weights_beside(graph, min_bytes=0)
    side = tmp_path / "encoder_model.onnx.data"
    assert side.stat().st_size > 0.9 * len(before) and graph.stat().st_size < 0.1 * len(before)
    assert side.stat().st_mode & 0o777 == 0o644  # readable by whoever deploys the bundle, like the graph
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.name, side.name]  # no staging left behind
    feeds = [encoder_feeds(1, *_shape(tiny_encoder)), encoder_feeds(2, *_shape(tiny_encoder), pad=10)]
    assert verify_same_outputs(tiny_encoder, graph, feeds, atol=0.0, rtol=0.0) == 0.0

    # A graph whose weights already sit in a side file of another name (Optimum's over 2 GB) gets ours instead.
    other = tmp_path / "other"
    other.mkdir()
    model = onnx.load(str(tiny_encoder))
    onnx.save(model, str(other / "encoder_model.onnx"), save_as_external_data=True, location="encoder_model.onnx_data")
    assert store_weights_beside(other / "encoder_model.onnx", min_bytes=0)
    assert sorted(p.name for p in other.iterdir()) == ["encoder_model.onnx", "encoder_model.onnx.data"]
    assert verify_same_outputs(tiny_encoder, other / "encoder_model.onnx", feeds, atol=0.0, rtol=0.0) == 0.0


def test_rewritten_graphs_leave_no_weights_file_behind(tiny_encoder: Path, tmp_path: Path) -> None:
    """Optimum writes the weights of graphs over 2 GB to `<graph>_data`; the rewritten graphs name their own
    (or none), so the export's rewrite step removes the exported ones instead of shipping them unused."""
    from export.onnx import _optimize_graphs
    from export.optimize import weights_files

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    roles = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx"}
    for name in roles.values():
        model = onnx.load(str(tiny_encoder.parent / name))
        onnx.save(model, str(bundle / name), save_as_external_data=True, location=f"{name}_data", size_threshold=1024)
        assert weights_files(bundle / name) == {f"{name}_data"}
    _optimize_graphs(bundle, roles)
    assert sorted(p.name for p in bundle.iterdir()) == sorted(roles.values())
    assert all(weights_files(bundle / name) == set() for name in roles.values())
    verify_encoder(tiny_encoder, bundle / "encoder_model.onnx")
