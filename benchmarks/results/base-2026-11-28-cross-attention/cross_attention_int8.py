"""The base decoder's cross-attention at a cached step, K/V stored in float32 and in 8 bits (MatMulInteger).

12 layers (each its own K/V, so that no layer's tensors are still in a cache), 12 heads, 2048 positions,
head size 64, 2 threads; the query and the softmax output quantized per tensor on the fly
(DynamicQuantizeLinear), K/V as uint8 (zero point 128) or int8. Prints each of 5 runs per batch size.
Needs onnx and onnxruntime:
    .venv/bin/python benchmarks/results/base-2026-11-28-cross-attention/cross_attention_int8.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, POSITIONS, HEAD_SIZE, LAYERS = 12, 2048, 64, 12
KINDS = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


def attention_graph(batch: int, kind: str) -> bytes:
    """softmax(Q K^T) V with K (pre-transposed) and V of `kind`; Q and the output in float32."""
    kv_type = KINDS[kind]
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [batch, HEADS, 1, HEAD_SIZE])
    k = helper.make_tensor_value_info("k", kv_type, [batch, HEADS, HEAD_SIZE, POSITIONS])
    v = helper.make_tensor_value_info("v", kv_type, [batch, HEADS, POSITIONS, HEAD_SIZE])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, HEADS, 1, HEAD_SIZE])
    initializers = []
    if kind == "float32":
        nodes = [
            helper.make_node("MatMul", ["q", "k"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "v"], ["out"]),
        ]
    else:
        kv_zero = []
        if kind == "uint8":
            initializers.append(helper.make_tensor("kv_zero", TensorProto.UINT8, [], [128]))
            kv_zero = ["kv_zero"]
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["q"], ["q8", "q_scale", "q_zero"]),
            helper.make_node("MatMulInteger", ["q8", "k", "q_zero", *kv_zero], ["scores32"]),
            helper.make_node("Cast", ["scores32"], ["scores_unscaled"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["scores_unscaled", "q_scale"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
            helper.make_node("DynamicQuantizeLinear", ["probs"], ["p8", "p_scale", "p_zero"]),
            helper.make_node("MatMulInteger", ["p8", "v", "p_zero", *kv_zero], ["context32"]),
            helper.make_node("Cast", ["context32"], ["context"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["context", "p_scale"], ["out"]),
        ]
    graph = helper.make_graph(nodes, "cross_attention", [q, k, v], [out], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def main() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        for kind in KINDS:
            session = ort.InferenceSession(attention_graph(batch, kind), options, providers=["CPUExecutionProvider"])
            if kind == "float32":
                keys = [rng.standard_normal((batch, HEADS, HEAD_SIZE, POSITIONS), dtype=np.float32) for _ in range(LAYERS)]
                values = [rng.standard_normal((batch, HEADS, POSITIONS, HEAD_SIZE), dtype=np.float32) for _ in range(LAYERS)]
            else:
                low, high, dtype = (0, 256, np.uint8) if kind == "uint8" else (-127, 128, np.int8)
                keys = [rng.integers(low, high, (batch, HEADS, HEAD_SIZE, POSITIONS)).astype(dtype) for _ in range(LAYERS)]
                values = [rng.integers(low, high, (batch, HEADS, POSITIONS, HEAD_SIZE)).astype(dtype) for _ in range(LAYERS)]
            query = rng.standard_normal((batch, HEADS, 1, HEAD_SIZE), dtype=np.float32)
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                for layer in range(LAYERS):
                    session.run(None, {"q": query, "k": keys[layer], "v": values[layer]})
                runs.append((time.perf_counter() - started) * 1000)
            print(f"batch {batch}, K/V {kind}: " + ", ".join(f"{ms:.1f}" for ms in runs) + f" ms for {LAYERS} layers")


if __name__ == "__main__":
    main()
