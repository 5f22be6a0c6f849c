"""edlight benchmarks: PyTorch, Optimum and the engine measured side by side in one run.

Entry point: `edlight bench` (benchmarks/cli.py). Module map:
- `settings.py`: what to run (systems, batch sizes, threads, repeats) and which systems this machine can run.
- `models.py`: the models under test: the base-size model built, saved, exported and cached; the tiny one.
- `torch_system.py`, `optimum_system.py`, `engine_system.py`: one module per runtime, same `run()` shape.
- `ceiling.py`, `flops.py`: the machine's MatMul ceiling and the encoder's FLOPs per image.
- `worker.py`: each system runs in its own process (peak memory does not mix); `runner.py` drives them.
- `report.py`: results.json, a markdown table and a PNG chart.
"""
