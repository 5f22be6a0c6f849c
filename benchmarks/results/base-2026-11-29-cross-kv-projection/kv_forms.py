"""Time the 12 decoder layers' cross-attention K/V projections of the first decoding step in three ONNX forms
(2 threads, random weights, 2048 positions):

- optimum: as Optimum exports them (MatMul, Reshape, Transpose to [batch, heads, S, 64] per tensor);
- per_head: one broadcast MatMul per tensor straight into [batch, heads, S, 64] (weights [heads, 768, 64]);
- fused_kv: K and V of a layer in one MatMul, transposed together and split.

Usage: python kv_forms.py [batch] (results.md beside this file).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

LAYERS, HEADS, HEAD_DIM, HIDDEN, POSITIONS = 12, 12, 64, 768, 2048


def _model(nodes: list[NodeProto], weights: list[TensorProto], outputs: list[str]) -> ModelProto:
    graph = helper.make_graph(
        nodes, "kv", [helper.make_tensor_value_info("E", TensorProto.FLOAT, ["batch", "positions", HIDDEN])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def optimum_form(w: list[np.ndarray], outputs: list[str]) -> ModelProto:
    nodes, weights = [], [numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "heads")]
    for i, out in enumerate(outputs):
        weights.append(numpy_helper.from_array(w[i], f"w{i}"))
        nodes += [helper.make_node("MatMul", ["E", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Reshape", [f"m{i}", "heads"], [f"r{i}"]),
                  helper.make_node("Transpose", [f"r{i}"], [out], perm=[0, 2, 1, 3])]
    return _model(nodes, weights, outputs)


def per_head_form(w: list[np.ndarray], outputs: list[str]) -> ModelProto:
    nodes = [helper.make_node("Unsqueeze", ["E", "axis1"], ["E4"])]
    weights = [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    for i, out in enumerate(outputs):
        per_head = w[i].reshape(HIDDEN, HEADS, HEAD_DIM).transpose(1, 0, 2).copy()
        weights.append(numpy_helper.from_array(per_head, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["E4", f"w{i}"], [out]))
    return _model(nodes, weights, outputs)


def fused_kv_form(w: list[np.ndarray], outputs: list[str]) -> ModelProto:
    nodes = []
    weights = [numpy_helper.from_array(np.array([0, 0, 2, HEADS, HEAD_DIM], np.int64), "kv_heads"),
               numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    for layer in range(LAYERS):
        k, v = 2 * layer, 2 * layer + 1
        weights.append(numpy_helper.from_array(np.concatenate([w[k], w[v]], 1), f"w{layer}"))
        nodes += [helper.make_node("MatMul", ["E", f"w{layer}"], [f"m{layer}"]),
                  helper.make_node("Reshape", [f"m{layer}", "kv_heads"], [f"r{layer}"]),
                  helper.make_node("Transpose", [f"r{layer}"], [f"t{layer}"], perm=[2, 0, 3, 1, 4]),
                  helper.make_node("Split", [f"t{layer}"], [f"s{k}", f"s{v}"], axis=0),
                  helper.make_node("Squeeze", [f"s{k}", "axis0"], [outputs[k]]),
                  helper.make_node("Squeeze", [f"s{v}", "axis0"], [outputs[v]])]
    return _model(nodes, weights, outputs)


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.03 for _ in range(2 * LAYERS)]
    encoder_output = rng.standard_normal((batch, POSITIONS, HIDDEN)).astype(np.float32)
    outputs = [f"present{i}" for i in range(2 * LAYERS)]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = {
        name: ort.InferenceSession(build(w, outputs).SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, build in (("optimum", optimum_form), ("per_head", per_head_form), ("fused_kv", fused_kv_form))
    }
    reference = sessions["optimum"].run(None, {"E": encoder_output})
    for name, session in sessions.items():
        got = session.run(None, {"E": encoder_output})
        print(f"{name}: largest difference from optimum {max(float(np.abs(a - b).max()) for a, b in zip(reference, got, strict=True)):.2g}")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(5):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"E": encoder_output})
            times[name].append(1000 * (time.perf_counter() - start))
    flops = 2 * LAYERS * 2 * batch * POSITIONS * HIDDEN * HIDDEN
    for name, ms in times.items():
        print(f"{name:9s} batch {batch}: " + ", ".join(f"{t:.0f}" for t in ms) + f" ms; best {flops / min(ms) / 1e6:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
