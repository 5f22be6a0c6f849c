"""Dynamic int8 quantization of exported ONNX models with ONNX Runtime.

Weights are quantized ahead of time to int8 with one scale per output channel; activations are
quantized on the fly (dynamic), so no calibration data is needed. The merged decoder keeps its two
branches in `If` subgraphs: `EnableSubgraph` makes the quantizer descend into them, otherwise
almost all of the merged decoder's weights would stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from export import ExportError

QUANTIZATION = "int8"


def quantize_int8(source: Path, target: Path) -> Path:
    """Write a dynamically int8-quantized copy of the ONNX model `source` to `target`.

    Raises ExportError naming `source` when ONNX Runtime's quantizer fails.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    try:
        with _without_preprocessing_advice():
            quantize_dynamic(
                model_input=source,
                model_output=target,
                per_channel=True,
                weight_type=QuantType.QInt8,
                # Gather (embeddings) stays fp32: per-channel int8 embeddings cost accuracy for little speed.
                op_types_to_quantize=["MatMul"],
                extra_options={"EnableSubgraph": True},
            )
    except Exception as exc:  # the quantizer raises bare ValueError/RuntimeError/onnx errors
        raise ExportError(f"{source}: int8 quantization failed: {exc}") from exc
    return target


class _DropPreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """Silence the quantizer's "Please consider pre-processing" warning, printed once per graph.

    Its pre-processing (shape inference plus ONNX Runtime graph optimisation) is for static
    quantization; these graphs come from Optimum with shapes and were already rewritten and
    optimised by export.optimize, and dynamic quantization needs no calibration shapes.
    Every other message of the quantizer still gets through.
    """
    root = logging.getLogger()
    advice = _DropPreprocessingAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def count_quantized_nodes(path: Path) -> dict[str, int]:
    """Node counts of the int8 operators in `path`, subgraphs included (to prove subgraphs were quantized)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in {"MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return counts
