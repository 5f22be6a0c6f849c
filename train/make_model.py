"""`make model`: rebuild the default bundle shipped in engine/default_bundle, from nothing but seeds.

1. generate the synthetic student-work data (train.synth, fixed seed);
2. train the `tiny` preset on it from scratch (fixed seed; the preset's epochs, batch size, lr);
3. export the best checkpoint as an int8 bundle, with the parity check on the test split
   (export.onnx.export_bundle(..., quantize="int8", data=...)), into engine/default_bundle.

Usage: python -m train.make_model [--n 2000] [--seed 0] [--epochs E] [--work build/model] [--out engine/default_bundle]
The work directory (data + run) is rebuilt from scratch each time; the run's metrics.jsonl and
curves.png stay there for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = REPO / "build" / "model"  # scratch: data + run, rebuilt each time
BUNDLE_DIR = REPO / "engine" / "default_bundle"  # shipped inside the package
N_IMAGES = 2000
SEED = 0


def make_model(
    n: int = N_IMAGES,
    seed: int = SEED,
    epochs: int | None = None,
    work: Path = WORK_DIR,
    out: Path = BUNDLE_DIR,
    progress: bool = True,
) -> Path:
    """Generate data, train `tiny`, export the int8 bundle to `out` (replacing it). Returns the bundle path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from export.onnx import export_bundle
    from train.loop import TrainConfig, best_record, train
    from train.synth import generate

    work, out = Path(work), Path(out)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data, run = work / "data", work / "run"

    t0 = time.perf_counter()
    generate(data, n=n, seed=seed)
    print(f"[make model] generated {n} images (seed {seed}) in {time.perf_counter() - t0:.0f}s -> {data}", flush=True)

    t1 = time.perf_counter()
    result = train(TrainConfig(data=data, out=run, preset="tiny", epochs=epochs, seed=seed, progress=progress))
    best = best_record(result.metrics)
    score = f"best test BLEU {best['bleu']:.2f} at epoch {best['epoch']}" if best and best.get("bleu") is not None else "no test split"
    print(f"[make model] trained tiny in {time.perf_counter() - t1:.0f}s: {score}", flush=True)

    t2 = time.perf_counter()
    bundle = export_bundle(result.best_dir, out, quantize="int8", data=data, force=True)
    size = sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file())
    print(f"[make model] exported int8 bundle in {time.perf_counter() - t2:.0f}s: {bundle} ({size / 1e6:.1f} MB)", flush=True)
    manifest = Path(bundle) / "edlight.json"
    if manifest.is_file():
        parity = json.loads(manifest.read_text()).get("parity")
        if parity:
            print(f"[make model] parity: {json.dumps(parity)[:300]}", flush=True)
    return Path(bundle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.make_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=N_IMAGES, help="synthetic images to generate")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the data and of training")
    ap.add_argument("--epochs", type=int, default=None, help="default: the tiny preset's")
    ap.add_argument("--work", type=Path, default=WORK_DIR, help="scratch dir for data and run (rebuilt)")
    ap.add_argument("--out", type=Path, default=BUNDLE_DIR, help="bundle directory to (re)write")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from engine.errors import EdlightError

    try:
        make_model(args.n, args.seed, args.epochs, args.work, args.out, progress=not args.no_progress)
    except EdlightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
