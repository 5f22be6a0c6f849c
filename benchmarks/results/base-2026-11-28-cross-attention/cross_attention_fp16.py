"""The base decoder's cross-attention at a batch-8 cached step, K/V stored in float32 and in float16.

12 layers (each its own K/V, so that no layer's tensors are still in a cache), batch 8, 12 heads,
2048 positions, head size 64, 2 threads; prints each of 3 runs. Needs onnx and onnxruntime:
    .venv/bin/python benchmarks/results/base-2026-11-28-cross-attention/cross_attention_fp16.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

BATCH, HEADS, POSITIONS, HEAD_SIZE, LAYERS = 8, 12, 2048, 64, 12


def attention_graph(kv_type: int) -> bytes:
    """softmax(Q K^T) V with Q in float32 and K (pre-transposed), V of `kv_type`; the output in float32."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [BATCH, HEADS, 1, HEAD_SIZE])
    k = helper.make_tensor_value_info("k", kv_type, [BATCH, HEADS, HEAD_SIZE, POSITIONS])
    v = helper.make_tensor_value_info("v", kv_type, [BATCH, HEADS, POSITIONS, HEAD_SIZE])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [BATCH, HEADS, 1, HEAD_SIZE])
    query = "q"
    nodes = []
    if kv_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["q"], ["q_cast"], to=kv_type))
        query = "q_cast"
    nodes += [
        helper.make_node("MatMul", [query, "k"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("Cast", ["context"], ["out"], to=TensorProto.FLOAT),
    ]
    model = helper.make_model(helper.make_graph(nodes, "cross_attention", [q, k, v], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def main() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    rng = np.random.default_rng(0)
    for kv_type, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
        session = ort.InferenceSession(attention_graph(kv_type), options, providers=["CPUExecutionProvider"])
        keys = [rng.random((BATCH, HEADS, HEAD_SIZE, POSITIONS)).astype(dtype) for _ in range(LAYERS)]
        values = [rng.random((BATCH, HEADS, POSITIONS, HEAD_SIZE)).astype(dtype) for _ in range(LAYERS)]
        query = rng.random((BATCH, HEADS, 1, HEAD_SIZE)).astype(np.float32)
        for _ in range(3):
            started = time.perf_counter()
            for layer in range(LAYERS):
                session.run(None, {"q": query, "k": keys[layer], "v": values[layer]})
            print(f"{np.dtype(dtype).name}: {(time.perf_counter() - started) * 1000:.1f} ms for {LAYERS} layers")


if __name__ == "__main__":
    main()
