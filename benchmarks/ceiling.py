"""The machine's ceiling: ONNX Runtime fp32 MatMul GFLOP/s at an encoder-like shape.

A (2048 x 768) @ (768 x 2048) product, the shape of the encoder's linear layers
at 2048 patches, with the right-hand side as a constant initializer so ONNX
Runtime pre-packs it exactly as it does real weights. Runs with the same thread
count as the systems under test. Needs `onnx` (to build the graph) and
`onnxruntime`; raises ImportError when either is absent.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

M, K, N = 2048, 768, 2048


@dataclass
class Ceiling:
    shape: tuple[int, int, int]
    threads: int
    gflops_median: float
    gflops_best: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def matmul_model_bytes(m: int = M, k: int = K, n: int = N) -> bytes:
    """A serialized ONNX model computing Y = X @ W with W (k x n) a constant."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "matmul_ceiling",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def measure_ceiling(threads: int, seconds: float = 3.0, min_runs: int = 10) -> Ceiling:
    """Run the MatMul for about `seconds` after a warm-up; GFLOP/s from the median and best run."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(matmul_model_bytes(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((M, K), dtype=np.float32)
    for _ in range(3):
        session.run(None, {"X": x})
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, {"X": x})
        times.append(time.perf_counter() - start)
    flops = 2.0 * M * K * N
    return Ceiling(
        shape=(M, K, N),
        threads=threads,
        gflops_median=flops / statistics.median(times) / 1e9,
        gflops_best=flops / min(times) / 1e9,
        runs=len(times),
    )
