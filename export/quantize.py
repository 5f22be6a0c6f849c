"""int8 quantization of exported ONNX models with ONNX Runtime's own quantizers.

Weights are quantized ahead of time, activations on the fly, so no calibration data is needed.
How activations are quantized decides what may share a batch:

- `quantize_dynamic` (MatMulInteger) quantizes a MatMul's whole input tensor with one scale. Fed a
  batch of images, one image's numbers would move another's. It is the fast kernel for the big
  MatMuls over image rows (the encoder, and the decoder's cross-attention key/value projections of the
  2,048 encoder positions), and the engine runs those one image at a time.
- `MatMulNBits` (8-bit weights in blocks of 32 along the input axis, ``accuracy_level=4``: int8
  compute with activations quantized per row and block) gives every row its own scales, so a row's
  result does not depend on the other rows. It quantizes the decoder's MatMuls over token rows (one
  row per image and step), which the engine batches.

The merged decoder keeps its two branches in `If` subgraphs; both quantizers descend into them, and
the branches share their quantized weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from export import ExportError
from export.optimize import all_graphs, needs_external_data, save_model

if TYPE_CHECKING:
    import onnx

QUANTIZATION = "int8"
# MatMulNBits settings for the decoder's token-row MatMuls.
NBITS_BITS = 8
NBITS_BLOCK = 32
NBITS_ACCURACY_LEVEL = 4  # int8 compute, activations quantized per row and block
# Bits of the per-channel weights of the dynamic (MatMulInteger) MatMuls: 7, ONNX Runtime's `reduce_range`.
# Their activations are uint8 over the full 0..255. x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
# multiply uint8 by int8 with VPMADDUBSW, which adds each pair of products into a saturating int16:
# 255 x 127 x 2 overflows it, 255 x 64 x 2 does not. With full-range weights the tiny model's int8 encoder
# was off by 3.0 there (0.85 with 7 bits) and its captions failed parity; VNNI sums in 32 bits, and a bundle
# runs on whatever CPU it is deployed to. MatMulNBits quantizes its activations to signed int8 and is exact
# on these CPUs at 8 bits.
INT8_WEIGHT_BITS = 7
# The decoder input holding the encoder output: MatMuls reading it run over image rows.
ENCODER_OUTPUT = "encoder_hidden_states"


def quantize_int8(source: Path, target: Path) -> Path:
    """Write a dynamically int8-quantized copy of the ONNX model `source` to `target` (encoders).

    Every MatMul with a constant weight becomes an integer MatMul with per-channel int8 weights and
    per-tensor dynamic activation scales. Raises ExportError naming `source` when quantization fails.
    """
    return _quantize_dynamic(Path(source), Path(target), (PREPROCESSING_ADVICE,))


def _quantize_dynamic(
    source: Path, target: Path, quiet: tuple[str, ...], label: Path | None = None, nodes: list[str] | None = None
) -> Path:
    """quantize_dynamic (of `nodes` only, if given) with `quiet` log messages dropped; errors name `label`."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _without_advice(*quiet):
            quantize_dynamic(
                model_input=source,
                model_output=target,
                per_channel=True,
                weight_type=QuantType.QInt8,
                reduce_range=True,  # 7-bit weights: INT8_WEIGHT_BITS
                # Gather (embeddings) stays fp32: per-channel int8 embeddings cost accuracy for little speed.
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes,
                # ONNX type inference cannot type contrib-op outputs, and ONNX Runtime's optimiser fuses
                # some MLP activations into one (exact-erf GELU -> com.microsoft.Gelu, quick_gelu ->
                # QuickGelu) that feeds the next MatMul. In these fp32 graphs such a tensor is float.
                extra_options={"EnableSubgraph": True, "DefaultTensorType": TensorProto.FLOAT},
            )
    except Exception as exc:  # the quantizer raises bare ValueError/RuntimeError/onnx errors
        raise ExportError(f"{label or source}: int8 quantization failed: {exc}") from exc
    return target


def quantize_decoder_int8(source: Path, target: Path) -> Path:
    """Write an int8 copy of the decoder `source` (merged, first-step or with-past) to `target`.

    MatMuls that read the encoder output (cross-attention key/value projections: image rows) get
    dynamic int8 as in `quantize_int8`; every other MatMul with a constant weight (token rows) becomes
    a row-independent `MatMulNBits`. Raises ExportError naming `source` when quantization fails.
    """
    import onnx

    source, target = Path(source), Path(target)
    staged = target.with_name(target.stem + ".nbits.onnx")
    try:
        try:
            model = onnx.load(str(source))
            image_rows = _name_image_row_matmuls(model)
            with _quantizer_logging():
                from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

                quantizer = MatMulNBitsQuantizer(
                    model, bits=NBITS_BITS, block_size=NBITS_BLOCK, is_symmetric=True,
                    accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=image_rows,
                )
                quantizer.process()
                large = needs_external_data(quantizer.model.model)
                quantizer.model.save_model_to_file(str(staged), use_external_data_format=large)
        except Exception as exc:  # the quantizer raises bare ValueError/RuntimeError/onnx errors
            raise ExportError(f"{source}: int8 (MatMulNBits) quantization failed: {exc}") from exc
        if image_rows:  # a with-past decoder has none: nothing is left for the dynamic pass
            _quantize_dynamic(staged, target, (PREPROCESSING_ADVICE, CONTRIB_TYPE_ADVICE), label=source, nodes=image_rows)
        else:
            os.replace(staged, target)
        quantized = onnx.load(str(target))
        if _sink_branch_only_nodes(quantized.graph):
            save_model(quantized, target)
        _require_row_wise_steps(quantized.graph, target)
        return target
    finally:
        for leftover in staged.parent.glob(staged.name + "*"):
            leftover.unlink()


# Operators that scale a whole activation tensor at once (dynamic int8).
PER_TENSOR_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"})


def _sink_branch_only_nodes(graph: onnx.GraphProto) -> bool:
    """Move top-level nodes used by one branch of a merged decoder into that branch; True if any moved.

    The dynamic quantizer puts the `DynamicQuantizeLinear` of `encoder_hidden_states` in the top-level
    graph, beside the `If`, so it would run at every cached step (over the whole padded batch: ~9 ms a
    step for 8 images at base size) although only the first-step branch reads it.
    """
    import onnx

    branch_node = next((n for n in graph.node if n.op_type == "If"), None)
    if branch_node is None:
        return False
    branches = {a.name: a.g for a in branch_node.attribute if a.type == onnx.AttributeProto.GRAPH}
    read_by = {name: {i for n in _walk_nodes(g) for i in n.input} for name, g in branches.items()}
    top_reads = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    moved = False
    for node in [n for n in graph.node if n is not branch_node]:
        users = {name for name, names in read_by.items() if any(o in names for o in node.output)}
        if len(users) == 1 and not any(o in top_reads for o in node.output):
            graph.node.remove(node)
            branches[users.pop()].node.insert(0, node)
            moved = True
    return moved


def _require_row_wise_steps(graph: onnx.GraphProto, path: Path) -> None:
    """Raise ExportError (naming `path`) unless the decoder's cached steps are free of per-tensor
    activation scales.

    The engine batches those steps for int8 bundles; a per-tensor scale there would let one image's
    numbers change another's caption.
    """
    branch_node = next((n for n in graph.node if n.op_type == "If"), None)
    if branch_node is not None:  # merged: the top level and the cached branch run at every step
        cached = next(a.g for a in branch_node.attribute if a.name == "then_branch")
        nodes = [*graph.node, *cached.node]
    elif not any(i.name.startswith("past_key_values.") for i in graph.input):  # the split layout's first step: run per image
        return
    else:  # the split layout's with-past decoder
        nodes = list(graph.node)
    found = sorted({n.op_type for n in nodes if n.op_type in PER_TENSOR_OPS})
    if found:
        raise ExportError(f"{path}: the decoder's cached steps still scale whole tensors ({', '.join(found)}); they could not be batched")


def _name_image_row_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls that read the encoder output, in every (sub)graph; makes node names unique.

    A merged decoder's two branches reuse the same node names, and the quantizer selects nodes by name.
    """
    import onnx

    seen: set[str] = set()
    image_rows: list[str] = []

    def walk(graph: onnx.GraphProto, prefix: str) -> None:
        for index, node in enumerate(graph.node):
            stem, suffix = node.name or node.op_type, 0
            while not node.name or node.name in seen:
                node.name = f"{prefix}{stem}#{index}" + (f".{suffix}" if suffix else "")
                suffix += 1
            seen.add(node.name)
            if node.op_type == "MatMul" and node.input[0] == ENCODER_OUTPUT:
                image_rows.append(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, f"{prefix}{attr.name}/")
                for sub in attr.graphs:
                    walk(sub, f"{prefix}{attr.name}/")

    walk(model.graph, "")
    return image_rows  # empty for a with-past decoder: it reads the cached cross-attention K/V instead


@contextlib.contextmanager
def _quantizer_logging() -> Iterator[None]:
    """Import and run ONNX Runtime's MatMulNBits quantizer without it taking over logging.

    Its module calls `logging.basicConfig(level=INFO)` on import (a root handler at INFO on a fresh
    process) and logs every node it skips at INFO; keep the root logger as it was and let only the
    quantizer's warnings through.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quantizer_level = quantizer_log.level
    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401 - the import is what configures logging

        root.handlers[:] = handlers
        root.setLevel(level)
        quantizer_log.setLevel(logging.WARNING)
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        quantizer_log.setLevel(quantizer_level)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# The quantizer's "Please consider pre-processing" warning, printed once per graph. Its pre-processing
# (shape inference plus ONNX Runtime graph optimisation) is for static quantization; these graphs come
# from Optimum with shapes and were already rewritten and optimised by export.optimize, and dynamic
# quantization needs no calibration shapes.
PREPROCESSING_ADVICE = "pre-processing before quantization"
# Printed per tensor when the dynamic pass meets the decoder's MatMulNBits nodes, whose output types
# its ONNX type inference does not know; it only quantizes MatMuls with constant weights, which it finds.
CONTRIB_TYPE_ADVICE = "Failed to infer data type of tensor"


@contextlib.contextmanager
def _without_advice(*fragments: str) -> Iterator[None]:
    """Silence the quantizer's log records containing `fragments`; every other message gets through."""
    root = logging.getLogger()
    advice = _DropMessages(fragments)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def count_quantized_nodes(path: Path) -> dict[str, int]:
    """Node counts of the int8 operators in `path`, subgraphs included (to prove subgraphs were quantized)."""
    import onnx

    counts: dict[str, int] = {}
    for node in _walk_nodes(onnx.load(str(path), load_external_data=False).graph):
        if node.op_type in PER_TENSOR_OPS or node.op_type == "MatMulNBits":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (If branches, loop bodies)."""
    return (node for g in all_graphs(graph) for node in g.node)
