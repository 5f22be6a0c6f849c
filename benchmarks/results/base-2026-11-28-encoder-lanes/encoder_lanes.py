"""Two images through a bundle's encoder: one after the other on all threads, or at once, one thread each.

The idea measured: in a batch, give each image its own thread ("lanes") instead of splitting every MatMul
of one image across the threads, so that the memory-bound glue between the MatMuls runs in parallel too
and no thread waits at the end of each parallel op. Cases, interleaved round by round, full 2048 patches:
  serial         one session, intra-op threads = 2, the two images in turn (what the engine does)
  lanes          one session, intra-op threads = 1, two Python threads each running one image (ONNX Runtime
                 runs a 1-thread session's ops on the calling thread; the GIL is released in run())
  lanes-2x2      one session, intra-op threads = 2, two Python threads at once (3 threads on 2 cores)
  lanes-two      two 1-thread sessions, one per Python thread (no shared weights or arena)
Also checks that the 1- and 2-thread sessions give bit-identical encoder outputs (a lane must not change
a caption). Needs onnxruntime and numpy:
    .venv/bin/python benchmarks/results/base-2026-11-28-encoder-lanes/encoder_lanes.py BUNDLE [ROUNDS]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    bundle = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    path = bundle / "encoder_model.onnx"
    two, one, one_more = session(path, 2), session(path, 1), session(path, 1)
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((1, 2048, 770)).astype(np.float32)
    patches[..., :2] = rng.integers(1, 45, size=(1, 2048, 2))  # row and column ids
    mask_type = np.int64 if two.get_inputs()[1].type == "tensor(int64)" else np.float32
    feeds = {two.get_inputs()[0].name: patches, "attention_mask": np.ones((1, 2048), dtype=mask_type)}

    def run(s: ort.InferenceSession) -> np.ndarray:
        return s.run(None, feeds)[0]

    def at_once(first: ort.InferenceSession, second: ort.InferenceSession) -> None:
        other = threading.Thread(target=run, args=(second,))
        other.start()
        run(first)
        other.join()

    same = np.array_equal(run(two), run(one))
    print(f"1-thread and 2-thread outputs bit-identical: {same}")
    cases = {
        "serial (2 threads, in turn)": lambda: (run(two), run(two)),
        "lanes (1 session, 1 thread each)": lambda: at_once(one, one),
        "lanes-2x2 (1 session, 2 threads each)": lambda: at_once(two, two),
        "lanes-two (2 sessions, 1 thread each)": lambda: at_once(one, one_more),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            times[name].append((time.perf_counter() - started) / 2)
    for name, seconds in times.items():
        print(f"{name:40s} median {np.median(seconds):.3f} s/image  runs {[round(s, 3) for s in seconds]}")


if __name__ == "__main__":
    main()
