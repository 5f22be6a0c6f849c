"""`edlight bench`: the tiny-size benchmark end to end, plus its pieces (FLOPs, ceiling, workers, planning)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks.cli import bench
from benchmarks.flops import encoder_flops
from engine.preprocess import PatchConfig, grid_size

ROOT = Path(__file__).resolve().parents[1]

ALL_SYSTEMS = ("torch", "optimum", "engine", "engine-int8")
TOKENS = 8


def test_encoder_flops_of_textcaps_base_match_the_baseline() -> None:
    """BASELINE.md: about 503 GFLOP per image at 2048 patches, 348 in linear layers and 155 in attention."""
    from transformers import Pix2StructConfig

    flops = encoder_flops(Pix2StructConfig().vision_config.to_dict(), 2048)
    assert flops.linear / 1e9 == pytest.approx(347.9, abs=0.1)
    assert flops.attention / 1e9 == pytest.approx(154.6, abs=0.1)
    assert flops.total == pytest.approx(flops.embedding + flops.linear + flops.attention)
    # Attention grows with the square of the patch count, the linear layers linearly.
    half = encoder_flops(Pix2StructConfig().vision_config.to_dict(), 1024)
    assert half.attention == pytest.approx(flops.attention / 4)
    assert half.linear == pytest.approx(flops.linear / 2)


def test_matmul_ceiling_is_measured() -> None:
    from benchmarks.ceiling import measure_ceiling

    ceiling = measure_ceiling(threads=1, seconds=0.1, min_runs=2)
    assert ceiling.runs >= 2
    assert 0 < ceiling.gflops_median <= ceiling.gflops_best


def test_bad_options_are_refused_with_a_message() -> None:
    runner = CliRunner()
    result = runner.invoke(bench, ["--systems", "torch,tensorflow"])
    assert result.exit_code == 2
    assert "tensorflow" in result.output
    for sizes in ("1,zero", "1_0", "\u0663"):  # int() would take the last two (10, an Arabic-Indic 3)
        result = runner.invoke(bench, ["--batch-sizes", sizes])
        assert result.exit_code == 2 and "comma-separated integers" in result.output
    from benchmarks.cli import _system_list

    assert _system_list(None, None, "engine,torch,engine") == ["engine", "torch"]  # type: ignore[arg-type]
    for seconds in ("inf", "nan", "0"):
        result = runner.invoke(bench, ["--ceiling-seconds", seconds])
        assert result.exit_code == 2 and "--ceiling-seconds" in result.output


def test_earlier_results_are_kept_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny"])
    assert result.exit_code == 2 and "earlier run" in result.output and "--overwrite" in result.output
    assert (tmp_path / "results.json").read_text() == "{}"
    # Refused after it made its cache folder: the folder goes again (as for every refusal before any build).
    result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny", "--cache-dir", str(tmp_path / "new" / "cache")])
    assert result.exit_code == 2 and "earlier run" in result.output and not (tmp_path / "new").exists()
    # With --overwrite, a run that cannot start (a --model that is no bundle) keeps them too.
    (tmp_path / "not-a-bundle").mkdir()
    result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny", "--overwrite", "--systems", "engine",
                                        "--model", str(tmp_path / "not-a-bundle"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "not an edlight bundle" in result.output
    assert (tmp_path / "results.json").read_text() == "{}"
    # A bundle of a system --systems leaves out is refused (another model would be timed under its name).
    bundle = Path(__file__).resolve().parents[1] / "engine" / "default_bundle"  # int8
    result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny", "--overwrite", "--systems", "engine",
                                        "--model", str(bundle), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "an int8 bundle, timed as system engine-int8, which --systems leaves out" in result.output
    assert (tmp_path / "results.json").read_text() == "{}"
    # So is an Optimum export without the optimum system (results.json named it as if it had been timed).
    result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny", "--overwrite", "--systems", "engine-int8",
                                        "--model", str(bundle), "--optimum-model", str(tmp_path),
                                        "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and f"{tmp_path}: an Optimum export for system optimum, which --systems leaves out" in result.output
    assert (tmp_path / "results.json").read_text() == "{}"


def test_a_logs_folder_of_the_users_own_is_refused_and_left_alone(tmp_path: Path) -> None:
    """`--out .` in a project with its own logs/: --overwrite moved it aside and deleted it with the earlier results."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(bench, ["--out", str(tmp_path), "--size", "tiny", "--cache-dir", str(tmp_path / "c"), *extra])
        assert result.exit_code == 2, result.output
        assert f"{tmp_path / 'logs'} holds files edlight bench did not write" in result.output
        assert (tmp_path / "logs" / "app.log").read_text() == "mine"


def test_empty_paths_and_threads_beyond_the_cpus_are_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.cli import default_cache
    from engine.session import MAX_THREADS_PER_CORE, available_cores

    for option in ("--out", "--cache-dir"):  # an unset variable: the current folder, and --overwrite there
        result = CliRunner().invoke(bench, [option, "", "--size", "tiny"])
        assert result.exit_code == 2 and "an empty path (an unset variable?)" in result.output
    monkeypatch.setenv("EDLIGHT_BENCH_CACHE", "")
    assert default_cache() == Path.home() / ".cache" / "edlight" / "bench"
    threads = MAX_THREADS_PER_CORE * available_cores() + 1
    result = CliRunner().invoke(bench, ["--threads", str(threads), "--out", str(tmp_path / "o"), "--size", "tiny"])
    assert result.exit_code == 2 and f"error: threads {threads} on {available_cores()} CPU cores" in result.output
    assert not (tmp_path / "o").exists()


def test_a_user_without_a_home_is_told_what_to_pass_for_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run --user 12345` (no passwd entry, no HOME): `edlight bench`, even --help, ended in a traceback
    ("Could not determine home directory"), with --cache-dir given too."""
    import pwd

    from benchmarks import settings

    monkeypatch.delenv("EDLIGHT_BENCH_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_entry(uid: int) -> None:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(RuntimeError):
        Path.home()  # the state a user without a passwd entry is in
    assert settings.BenchSettings(size="tiny", cache_dir=tmp_path / "c").cache_dir == tmp_path / "c"
    result = CliRunner().invoke(bench, ["--size", "tiny", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no home folder to keep the benchmark's models in" in result.output
    assert "pass --cache-dir, or set EDLIGHT_BENCH_CACHE" in result.output and not (tmp_path / "o").exists()
    assert CliRunner().invoke(bench, ["--help"]).exit_code == 0
    # HOME set but empty, which Path.home() reads as "/": the cache went to /.cache/edlight/bench.
    monkeypatch.setenv("HOME", "")
    with pytest.raises(ValueError, match="no home folder"):
        settings.default_cache()
    monkeypatch.undo()
    monkeypatch.setenv("HOME", "")
    monkeypatch.delenv("EDLIGHT_BENCH_CACHE", raising=False)
    assert settings.default_cache() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "edlight" / "bench"
    monkeypatch.setenv("HOME", "/")  # a system user's
    with pytest.raises(ValueError, match="HOME is not set, or empty, or /"):
        settings.default_cache()


def test_a_failed_or_stopped_overwrite_keeps_the_earlier_results(tiny_bundle: Path, tmp_path: Path) -> None:
    """An --overwrite run that measured nothing replaced good results with a table of failures; one stopped
    by SIGTERM (timeout, a service manager) left them set aside and its worker running on."""
    import psutil

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "results.json").write_text("earlier")
    (out / "logs" / "engine-b1.log").write_text("earlier log")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "00000.jpg", images)
    # A bundle whose files match its manifest, but whose encoder ONNX Runtime cannot load: every cell fails.
    from engine.bundle import MANIFEST_NAME, sha256_file

    broken = Path(shutil.copytree(tiny_bundle, tmp_path / "broken"))
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    encoder = manifest["onnx_files"]["encoder"]
    (broken / encoder).write_bytes(b"not an ONNX graph")
    manifest["files"][encoder] = sha256_file(broken / encoder)
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    args = ["--systems", "engine", "--batch-sizes", "1", "--warmup", "0", "--images", str(images), "--cache-dir",
            str(tmp_path / "cache"), "--out", str(out), "--overwrite", "--ceiling-seconds", "0.1"]
    failed = CliRunner().invoke(bench, [*args, "--model", str(broken), "--repeats", "1"])
    assert failed.exit_code == 1 and f"every measurement failed; the earlier results in {out} are kept" in failed.output
    assert (out / "results.json").read_text() == "earlier" and (out / "logs" / "engine-b1.log").read_text() == "earlier log"

    command = [sys.executable, "-m", "engine.cli", "bench", *args, "--model", str(tiny_bundle), "--repeats", "100000"]
    run = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.stdout is not None
    for line in run.stdout:  # measuring: the worker is timing its runs
        if "repeat 2/" in line:
            break
    workers = psutil.Process(run.pid).children(recursive=True)
    assert workers
    run.send_signal(signal.SIGTERM)  # to the bench alone, not its process group
    rest = run.stdout.read()
    assert run.wait(timeout=60) == 143, rest
    assert "interrupted" in rest and f"stopped: the earlier results in {out} are kept" in rest
    assert (out / "results.json").read_text() == "earlier" and (out / "logs" / "engine-b1.log").read_text() == "earlier log"
    assert not list(out.glob(".earlier-results-*"))
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_a_damaged_cached_bundle_is_built_again(tmp_path: Path) -> None:
    """A cached bundle whose files changed failed every cell ("sha256 does not match") at every rerun."""
    from benchmarks.models import _cached, _load_cached_bundle
    from engine.bundle import Bundle

    shipped = Path(__file__).resolve().parents[1] / "engine" / "default_bundle"
    builds: list[Path] = []

    def build(where: Path) -> None:
        builds.append(where)
        shutil.copytree(shipped, where / "bundle")

    target = tmp_path / "engine-int8-abc"
    logged: list[str] = []
    assert _cached(target, build, "the bundle", logged.append, check=_load_cached_bundle) == target
    assert _cached(target, build, "the bundle", logged.append, check=_load_cached_bundle) == target
    assert len(builds) == 1 and logged[-1] == f"using cached the bundle: {target}"
    graph = next((target / "bundle").glob("encoder*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10])  # a disk error, a copy cut short
    _cached(target, build, "the bundle", logged.append, check=_load_cached_bundle)
    assert len(builds) == 2 and any(f"the cached the bundle in {target} is damaged" in line for line in logged)
    Bundle.load(target / "bundle")


def test_a_batch_far_beyond_memory_is_not_started(tmp_path: Path) -> None:
    from benchmarks import runner, settings
    from benchmarks.models import ModelSet

    models = ModelSet(size="base", checkpoint=None, optimum_dir=None, bundles={"engine": tmp_path}, images=[],
                      max_patches=2048, vision_config={"num_attention_heads": 12}, parameters=None)
    plan = settings.BenchSettings(size="base", systems=["engine"], out=tmp_path)
    logged: list[str] = []
    cells = runner.run_batch_size(["engine"], 100_000, plan, models, logged.append, {})
    assert [(c.status, c.runs, c.load_s) for c in cells] == [("not run", [], None)]
    assert cells[0].error is not None and cells[0].error.startswith("not run: would need ~")
    assert any("not run" in line for line in logged)


def test_an_optimum_folder_without_an_export_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """An --optimum-model without the export ran the whole bench (ceilings, every other system), then failed every
    optimum cell; and a damaged cached export was trusted at every run."""
    from benchmarks.models import BenchSetupError, check_optimum_export

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(bench, ["--size", "tiny", "--systems", "optimum", "--optimum-model", str(tmp_path / "empty"),
                                        "--cache-dir", str(tmp_path / "c" / "a" / "cache"), "--out", str(tmp_path / "o" / "b" / "out")])
    assert result.exit_code == 2, result.output
    assert "empty: not an Optimum ONNX export of Pix2Struct (no encoder_model.onnx, config.json, decoder_model" in result.output
    # Refused before any image or model was built: the folders it made for them are gone again, parents too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx", "config.json"):  # no processor: the checkpoint's
        (tmp_path / "empty" / name).write_text("{}")
    check_optimum_export(tmp_path / "empty")
    (tmp_path / "empty" / "decoder_model_merged.onnx").write_bytes(b"")  # a copy cut short
    with pytest.raises(BenchSetupError, match=r"no decoder_model_merged\.onnx or decoder_model\.onnx"):
        check_optimum_export(tmp_path / "empty")


def test_a_bundle_of_another_model_than_the_checkpoint_is_noted(tmp_path: Path) -> None:
    """The shipped bundle given with --model beside the tiny model built here: Optimum timed one model, the
    engine another, in one table without a word."""
    from benchmarks.models import _another_model

    checkpoint, source, bundle = tmp_path / "checkpoint", tmp_path / "source", tmp_path / "bundle"
    for folder, weights in ((checkpoint, b"one"), (source, b"two"), (bundle, b"")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
    (bundle / "edlight.json").write_text(json.dumps({"source": str(source)}))
    assert "whose weights are not those of" in (_another_model(bundle, checkpoint, "torch") or "")
    (source / "model.safetensors").write_bytes(b"one")  # a copy of the same checkpoint
    assert _another_model(bundle, checkpoint, "torch") is None
    (bundle / "edlight.json").write_text(json.dumps({"source": str(checkpoint)}))
    assert _another_model(bundle, checkpoint, "torch") is None
    (bundle / "edlight.json").write_text(json.dumps({"source": str(tmp_path / "elsewhere")}))
    assert "which is not here: whether its rows time the model of the torch rows" in (_another_model(bundle, checkpoint, "torch") or "")
    (bundle / "edlight.json").write_text(json.dumps({"source": ""}))
    assert "a checkpoint it does not name" in (_another_model(bundle, checkpoint, "torch") or "")
    (bundle / "edlight.json").write_text(json.dumps({"source": str(source)}))
    for folder in (checkpoint, source):  # .bin weights, the same in both: compared too
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"same")
    assert _another_model(bundle, checkpoint, "torch") is None


def test_a_graphs_external_weights_count_in_its_memory_estimate(tmp_path: Path) -> None:
    """A base-size fp32 graph keeps its weights in encoder_model.onnx.data (Path.suffix ".data"): they were left
    out of the estimate that decides whether a batch may start."""
    from benchmarks.runner import _model_bytes

    (tmp_path / "encoder_model.onnx").write_bytes(b"g" * 10)
    (tmp_path / "encoder_model.onnx.data").write_bytes(b"w" * 1000)
    (tmp_path / "notes.txt").write_bytes(b"n" * 100)
    assert _model_bytes(str(tmp_path)) == 1010


def test_batch_scaling_does_not_start_a_batch_refused_for_memory(tmp_path: Path) -> None:
    from benchmarks import runner, settings
    from benchmarks.models import ModelSet

    models = ModelSet(size="base", checkpoint=None, optimum_dir=None, bundles={"engine": tmp_path}, images=[],
                      max_patches=2048, vision_config={"num_attention_heads": 12}, parameters=None)
    plan = settings.BenchSettings(size="base", systems=["engine"], batch_sizes=[1, 100_000], out=tmp_path)
    logged: list[str] = []
    [skipped] = runner.run_batch_scaling(["engine"], plan, models, logged.append, {})
    assert skipped["skipped"] == "batch 100000 is too large for this machine's memory" and "throughput_ratio" not in skipped
    assert logged == ["batch scaling, engine: skipped (batch 100000 is too large for this machine's memory)"]


def test_an_out_below_a_file_and_a_damaged_checkpoint_are_one_line_errors(tmp_path: Path) -> None:
    from benchmarks.models import BenchSetupError, count_parameters

    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(bench, ["--out", str(tmp_path / "notes.txt" / "sub"), "--size", "tiny"])
    assert result.exit_code == 2 and "cannot create the results folder (it or a folder above it is a file)" in result.output
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"")
    with pytest.raises(BenchSetupError, match=r"model.safetensors: not a readable safetensors file"):
        count_parameters(tmp_path / "ck")


def test_a_bad_image_or_a_bundle_as_checkpoint_is_refused_before_anything_is_built(tiny_bundle: Path, tmp_path: Path) -> None:
    # Both failed every measurement, and so the run (exit 1), only once every model had been built and timed.
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "white").save(images / "a.png")
    (images / "b.png").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    result = CliRunner().invoke(bench, ["--out", str(tmp_path / "o"), "--size", "tiny", "--images", str(images),
                                        "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert f"{images / 'b.png'}: " in result.output and "remove it from --images" in result.output
    result = CliRunner().invoke(bench, ["--out", str(tmp_path / "o"), "--size", "tiny", "--checkpoint", str(tiny_bundle),
                                        "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert f"{tiny_bundle}: an edlight bundle, not a PyTorch checkpoint; pass it with --model" in result.output
    assert not cache.exists() and not (tmp_path / "o").exists()  # nothing built; not even an empty folder left


def test_an_unfinished_overwrite_puts_the_earlier_results_back(tmp_path: Path) -> None:
    from benchmarks.cli import _put_back

    aside = tmp_path / ".earlier-results-x"
    (aside / "logs").mkdir(parents=True)
    (aside / "results.json").write_text("earlier")
    (aside / "logs" / "engine.log").write_text("earlier log")
    (tmp_path / "logs").mkdir()  # what the interrupted run had written
    (tmp_path / "logs" / "engine.log").write_text("partial")
    (tmp_path / "chart.png").write_bytes(b"new")  # a file the earlier run did not have
    _put_back(aside, tmp_path)
    assert (tmp_path / "results.json").read_text() == "earlier" and not (tmp_path / "chart.png").exists()
    assert (tmp_path / "logs" / "engine.log").read_text() == "earlier log" and not aside.exists()


def test_systems_without_their_libraries_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from benchmarks import runner, settings
    from benchmarks.models import BenchSetupError, ModelSet

    monkeypatch.setitem(settings.SYSTEMS, "engine", ("engine needing an absent library", ("edlight_no_such_module",)))
    models = ModelSet(size="tiny", checkpoint=tmp_path, optimum_dir=None, bundles={}, images=[], max_patches=16,
                      vision_config={}, parameters=None)
    plan = settings.BenchSettings(size="tiny", systems=["torch", "engine"], out=tmp_path)
    runnable, skipped = runner.plan_systems(plan, models)
    assert runnable == ["torch"]
    assert skipped == {"engine": "not installed here: edlight_no_such_module"}
    monkeypatch.setitem(settings.SYSTEMS, "torch", ("torch needing an absent library", ("edlight_no_such_module",)))
    assert runner.plan_systems(plan, models)[1]["torch"] == (
        f"not installed here: edlight_no_such_module (install them in the edlight source folder ({ROOT}): pip install '.[export]' -c constraints.txt)"
    )
    # Nothing left to run: a table without rows would read as a finished run (it exited 0).
    only = settings.BenchSettings(size="tiny", systems=["engine"], out=tmp_path / "out")
    with pytest.raises(BenchSetupError, match=r"nothing to measure: engine: not installed here: edlight_no_such_module"):
        runner.BenchRun(only, models, lambda _message: None)


def test_a_worker_that_cannot_load_its_model_fails_with_its_log(tmp_path: Path) -> None:
    from benchmarks.runner import Worker, WorkerError
    from benchmarks.timing import SystemSpec

    spec = SystemSpec(system="engine", model_path=str(tmp_path / "missing"), processor_path=str(tmp_path / "missing"),
                      threads=1, batch_size=1, tokens=2, max_patches=16, images=[])
    worker = Worker({"spec": spec.to_dict()}, threads=1, log_path=tmp_path / "w.log")
    with pytest.raises(WorkerError, match="missing") as info:
        worker.receive()
    worker.close()
    assert str(tmp_path / "w.log") in str(info.value)
    assert worker.process.returncode == 1


@pytest.mark.slow
def test_tiny_benchmark_writes_json_table_and_chart(
    tiny_checkpoint: Path, tiny_bundle: Path, tiny_bundle_int8: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [
        "--size", "tiny", "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_bundle), "--model", str(tiny_bundle_int8),
        "--batch-sizes", "2,1", "--repeats", "2", "--warmup", "1", "--tokens", str(TOKENS), "--threads", "2",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--ceiling-seconds", "0.3",
    ]
    result = CliRunner().invoke(bench, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warm-up" in result.output and "repeat 2/2" in result.output  # progress is printed as it goes

    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    machine = doc["machine"]
    for key in ("cpu_model", "logical_cpus", "threads", "versions", "date", "memory_total_bytes"):
        assert key in machine
    assert machine["threads"] == 2
    assert {"onnxruntime", "torch", "transformers", "optimum"} <= set(machine["versions"])
    assert doc["settings"]["batch_sizes"] == [1, 2]  # sorted
    assert doc["skipped"] == {}
    assert doc["model"]["size"] == "tiny" and doc["model"]["parameters"] > 0
    assert doc["model"]["title"] == "given models" and (out / "results.md").read_text().startswith("# edlight benchmark (given models)")
    flops = doc["model"]["encoder_flops_per_image"]
    assert flops["patches"] == doc["model"]["max_patches"] and flops["total"] > 0
    assert doc["ceiling"]["matmul_gflops"] > 0 and len(doc["ceiling"]["measurements"]) == 2
    folder = Path(doc["model"]["images"][0]).parent
    assert f"Images: {len(doc['model']['images'])} from {folder}; every run at batch b captions the first b" in (out / "results.md").read_text()

    cells = {(r["system"], r["batch_size"]): r for r in doc["results"]}
    assert set(cells) == {(s, b) for s in ALL_SYSTEMS for b in (1, 2)}
    for (system, batch), r in cells.items():
        assert r["status"] == "ok", (system, batch, r["error"])
        assert r["repeats"] == 2 and len(r["raw_runs"]) == 2 and len(r["warmup_s"]) == 1
        assert r["decode_steps"] == TOKENS  # forced length: every system did the same work
        for key in ("preprocess_s_per_image", "encoder_s_per_image", "decode_s_per_image", "total_s_per_image",
                    "decode_ms_per_step"):
            stats = r[key]
            assert stats["min"] <= stats["median"] <= stats["max"], (system, key)
        assert r["encoder_s_per_image"]["median"] > 0
        assert r["total_s_per_image"]["median"] >= r["encoder_s_per_image"]["median"]
        assert r["images_per_s"] == pytest.approx(batch / (r["total_s_per_image"]["median"] * batch), rel=1e-6)
        assert r["peak_rss_bytes"] > 50 << 20  # a real process, not a placeholder
        assert r["load_s"] > 0
        assert 0 < r["encoder_ceiling_fraction"] < 5
        # The engine's bundles cut each image's padding off: its GFLOP/s counts the patches it ran.
        images = [Image.open(doc["model"]["images"][i % len(doc["model"]["images"])]) for i in range(batch)]
        own = [rows * cols for rows, cols in (grid_size(im.height, im.width, PatchConfig(doc["model"]["max_patches"])) for im in images)]
        expected = sum(own) / batch if system.startswith("engine") else doc["model"]["max_patches"]
        assert r["encoder_patches_per_image"] == expected, system
        assert len(r["captions"]) == batch and all(isinstance(c, str) for c in r["captions"])
        if system not in ("torch", "engine-int8"):  # int8 captions may differ by design: not compared
            assert isinstance(r["captions_match_torch"], bool)
        else:
            assert "captions_match_torch" not in r
    # Separate processes per system: the engine does not carry torch's memory.
    assert cells[("engine", 1)]["peak_rss_bytes"] < cells[("torch", 1)]["peak_rss_bytes"]

    # The engines' smallest and largest batch sizes again, interleaved, for their throughput ratio.
    scaling = {row["system"]: row for row in doc["batch_scaling"]}
    assert set(scaling) == {"engine", "engine-int8"}
    for row in scaling.values():
        assert row["batch_sizes"] == [1, 2] and row["repeats"] == 2 and row["images_per_run"] == 2  # the same images
        assert row["throughput_ratio"] == pytest.approx(row["s_per_image"]["1"] / row["s_per_image"]["2"])
    assert (out / "logs" / "engine-b2-scaling.log").exists()

    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| system | batch |" in table and "| load s |" in table and "of ceiling" in table
    assert "Batch scaling, timed interleaved" in table and "| engine-int8 |" in table
    for system in ALL_SYSTEMS:
        assert f"| {system} | 1 |" in table and f"| {system} | 2 |" in table
    assert table in result.output  # the table is printed too

    chart = (out / "chart.png").read_bytes()
    assert chart[:8] == b"\x89PNG\r\n\x1a\n" and len(chart) > 5000


def test_batch_sizes_are_timed_interleaved_in_one_process(tiny_bundle: Path, tiny_bundle_int8: Path, synth_data: Path, tmp_path: Path) -> None:
    from benchmarks.batch_sizes import main as batch_sizes

    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(synth_data.glob("*.jpg"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "rounds.json"
    args = ["--model", str(tiny_bundle), "--model", str(tiny_bundle_int8), "--batch-sizes", "1,3", "--rounds", "2",
            "--tokens", "4", "--images", str(folder), "--json", str(out)]
    result = CliRunner().invoke(batch_sizes, args)
    assert result.exit_code == 0, result.output
    assert f"{tiny_bundle}: batch 1: " in result.output and "batch 3: " in result.output
    rounds = json.loads(out.read_text())["seconds_per_image"]
    assert set(rounds) == {str(tiny_bundle), str(tiny_bundle_int8)}
    assert all(len(v) == 2 and min(v) > 0 for by_size in rounds.values() for v in by_size.values())

    too_few = CliRunner().invoke(batch_sizes, ["--model", str(tiny_bundle), "--batch-sizes", "1,4", "--images", str(folder)])
    assert too_few.exit_code == 2 and "3 images, fewer than the largest batch size 4" in too_few.output
    # A folder of one's own serves batches larger than the bench's 8 images; --json replaces its own
    # earlier timings only, never another file, and says so before measuring.
    big = tmp_path / "many"
    big.mkdir()
    for index, path in enumerate(sorted(synth_data.glob("*.jpg"))[:10]):
        (big / f"{index:02d}.jpg").write_bytes(path.read_bytes())
    tens = CliRunner().invoke(batch_sizes, ["--model", str(tiny_bundle), "--batch-sizes", "1,10", "--rounds", "1",
                                            "--tokens", "2", "--images", str(big), "--json", str(out)])
    assert tens.exit_code == 0 and "batch 10: " in tens.output, tens.output
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    refused = CliRunner().invoke(batch_sizes, [*args[:-1], str(notes)])
    assert refused.exit_code == 2 and "does not hold batch-size timings" in refused.output and notes.read_text() == "mine\n"


def test_startup_is_timed_in_fresh_processes(tiny_bundle: Path, tiny_bundle_int8: Path, synth_data: Path, tmp_path: Path) -> None:
    from benchmarks.startup import main as startup

    image = sorted(synth_data.glob("*.jpg"))[0]
    result = CliRunner().invoke(startup, ["--model", str(tiny_bundle), "--model", str(tiny_bundle_int8), "--rounds", "1",
                                          "--tokens", "3", "--image", str(image), "--threads", "1"])
    assert result.exit_code == 0, result.output
    for bundle in (tiny_bundle, tiny_bundle_int8):
        line = next(line for line in result.output.splitlines() if line.startswith(f"{bundle.resolve()}: "))
        load, first, total = (float(x) for x in re.findall(r"load ([\d.]+) s \+ first caption ([\d.]+) s = ([\d.]+) s", line)[0])
        assert load > 0 and first > 0 and abs(load + first - total) < 0.015 and "peak RSS" in line

    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    failed = CliRunner().invoke(startup, ["--model", str(not_a_bundle), "--rounds", "1", "--image", str(image)])
    assert failed.exit_code == 1 and "the measuring process failed" in failed.output and "not an edlight bundle" in failed.output
    assert CliRunner().invoke(startup, ["--rounds", "1"]).exit_code == 2  # no --model


def test_without_torch_the_model_cannot_be_built_and_bundles_are_suggested_only_for_the_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks import models
    from benchmarks.models import BenchSetupError

    monkeypatch.setattr(models, "is_installed", lambda module: module not in ("torch", "transformers"))
    with pytest.raises(BenchSetupError, match=r"needs torch and transformers \(in the edlight source folder \(.*\): pip install .*\)$"):
        models.prepare_models("tiny", ["torch"], tmp_path, lambda _message: None)  # a bundle cannot time torch
    with pytest.raises(BenchSetupError, match=r"constraints.txt\); on an engine-only machine pass --model BUNDLE"):
        models.prepare_models("tiny", ["engine"], tmp_path, lambda _message: None)


def test_cells_run_alone_say_why() -> None:
    from benchmarks.report import markdown

    results = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/base-2026-11-27/results.json").read_text())
    assert results["settings"]["interleave"] and "- engine at batch 8: run alone, not interleaved (memory)" in markdown(results)
    results["settings"]["interleave"] = False  # the user's --no-interleave, not the machine's memory
    table = markdown(results)
    assert "(memory)" not in table and "- each system ran alone, not interleaved (--no-interleave)" in table


def test_the_chart_marks_cut_short_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table said "cut short" for a cell with fewer timed runs than asked for; the chart drew it as a full
    measurement."""
    import matplotlib.pyplot as plt

    from benchmarks.report import write_chart

    results = json.loads((ROOT / "benchmarks/results/base-2026-11-27/results.json").read_text())
    [short] = [r for r in results["results"] if (r["system"], r["batch_size"]) == ("engine", 4)]
    short["repeats"] = results["settings"]["repeats"] - 1  # stopped before its last timed run
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at
    write_chart(results, tmp_path)
    [ax] = drawn[0].axes
    hatched = [bar for bar in ax.patches if bar.get_hatch()]
    assert len(hatched) == 2  # the total and its encoder part, of that one cell
    assert {round(bar.get_height(), 3) for bar in hatched} == {
        round(short["total_s_per_image"]["median"], 3), round(short["encoder_s_per_image"]["median"], 3)
    }
    labels = [t.get_text() for t in ax.texts]
    assert sum("cut short" in label for label in labels) == 1 and len(labels) == len(results["results"])


@pytest.mark.parametrize(
    ("checkpoint", "given", "title"),
    [(True, [], "base size"), (True, ["--model"], "base size, and given bundles"), (True, ["--checkpoint"], "given models"),
     (True, ["--checkpoint", "--model"], "given models"), (False, ["--model"], "given models")],
)
def test_results_are_titled_by_the_models_timed(tmp_path: Path, checkpoint: bool, given: list[str], title: str) -> None:
    from benchmarks.models import ModelSet

    models = ModelSet(size="base", checkpoint=tmp_path if checkpoint else None, optimum_dir=None, bundles={}, images=[],
                      max_patches=16, vision_config={}, parameters=None, given=given)
    assert models.title == title and models.to_dict()["title"] == title


def test_a_cache_in_use_by_another_bench_names_the_option_to_change(tmp_path: Path) -> None:
    from engine.folder import output_lock

    cache = tmp_path / "cache"
    with output_lock(cache / "models"):  # as a bench running beside this one holds it (here: this process, so said)
        result = CliRunner().invoke(bench, ["--out", str(tmp_path / "o"), "--size", "tiny", "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert "another run in this process is writing to it; wait for it to end or pass another --cache-dir" in result.output


def test_builds_this_run_does_not_use_are_named_and_pruned_on_request(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every version of edlight or its libraries built its models again beside the old ones (gigabytes at base
    size), and nothing said so: the run names what it leaves unused, and --prune-cache deletes only those."""
    cache = tmp_path / "cache"
    stale = cache / "engine-0123456789ab" / "bundle"  # a build by another version: a key no run asks for now
    stale.mkdir(parents=True)
    (stale / "encoder_model.onnx").write_bytes(b"\0" * 3 * 2**20)
    (stale.parent / ".complete").write_text("ok\n")
    killed = cache / ".tiny-0123456789ab.partial-k1ll3d"  # a build that was killed before it was renamed
    killed.mkdir()
    (cache / "notes").mkdir()  # the user's own: not the bench's to count or delete
    (cache / "engine-notes.txt").write_text("mine")
    (cache / "images-plain").mkdir()  # a bench name, but no build's mark: the user's folder
    given = Path(shutil.copytree(tiny_bundle, cache / "engine-aaaaaaaaaaaa" / "bundle"))  # a build, given as --model
    (given.parent / ".complete").write_text("ok\n")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "00000.jpg", images)
    args = ["--systems", "engine", "--model", str(given), "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
            "--images", str(images), "--cache-dir", str(cache), "--ceiling-seconds", "0.1"]

    told = CliRunner().invoke(bench, [*args, "--out", str(tmp_path / "told")])
    assert told.exit_code == 0, told.output
    assert ("the cache also holds 2 build(s) this run does not use (3 MiB: .tiny-0123456789ab.partial-k1ll3d, "
            "engine-0123456789ab); --prune-cache deletes them") in told.output
    assert stale.is_dir() and killed.is_dir()

    pruned = CliRunner().invoke(bench, [*args, "--out", str(tmp_path / "pruned"), "--prune-cache"])
    assert pruned.exit_code == 0, pruned.output
    assert "deleted 2 unused cache build(s) (3 MiB freed: .tiny-0123456789ab.partial-k1ll3d, engine-0123456789ab)" in pruned.output
    assert sorted(p.name for p in cache.iterdir()) == ["engine-aaaaaaaaaaaa", "engine-notes.txt", "images-plain", "notes"]
    assert (tmp_path / "pruned" / "results.json").is_file()


def test_encoder_gflops_count_the_patches_each_image_ran_over() -> None:
    """An engine that cut the padding off was credited with max_patches per image: its GFLOP/s and share of the
    ceiling read up to 10% high on the tiny examples."""
    from benchmarks.runner import Cell, summarise
    from benchmarks.timing import RunTiming

    config = {"hidden_size": 64, "num_attention_heads": 2, "d_kv": 32, "d_ff": 128, "num_hidden_layers": 2}

    def cell(patches: list[int] | None) -> Cell:
        run = RunTiming(batch_size=2, preprocess_s=0.1, encoder_s=2.0, decode_s=1.0, total_s=3.1, decode_steps=4,
                        captions=["a", "b"], encoder_patches=patches)
        return Cell(system="engine", batch_size=2, runs=[run])

    trimmed = summarise(cell([100, 200]), 10.0, config, max_patches=256)
    expected = (encoder_flops(config, 100).total + encoder_flops(config, 200).total) / 2 / 1.0 / 1e9
    assert trimmed["encoder_patches_per_image"] == 150
    assert trimmed["encoder_gflops_per_s"] == pytest.approx(expected)
    assert trimmed["encoder_ceiling_fraction"] == pytest.approx(expected / 10.0)
    padded = summarise(cell(None), 10.0, config, max_patches=256)
    assert padded["encoder_patches_per_image"] == 256
    assert padded["encoder_gflops_per_s"] == pytest.approx(encoder_flops(config, 256).total / 1e9)


def test_a_worker_stopped_while_loading_or_warming_up_is_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM) before a worker joined the run's list left it running, orphaned, timing itself
    against whatever ran next."""
    from benchmarks import runner, settings
    from benchmarks.timing import SystemSpec

    started: list[runner.Worker] = []

    class StoppedWhileLoading(runner.Worker):
        def receive(self) -> dict[str, object]:
            started.append(self)
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "Worker", StoppedWhileLoading)
    spec = SystemSpec(system="engine", model_path=str(tmp_path), processor_path=str(tmp_path), threads=1, batch_size=1,
                      tokens=2, max_patches=16, images=[])
    plan = settings.BenchSettings(size="tiny", systems=["engine"], out=tmp_path / "out")
    cell = runner.Cell(system="engine", batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        runner._start("engine", spec, plan, cell, lambda _message: None)
    assert len(started) == 1 and started[0].process.returncode is not None


def _bench_at_its_third_timed_run(bundle: Path, tmp_path: Path, out: Path, batch_sizes: str) -> subprocess.Popen[str]:
    """`edlight bench` of `bundle` with endless repeats, in its own process, returned once its third timed run is
    logged (the rest of its output still to read)."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "examples" / "00000.jpg", images)
    command = [sys.executable, "-m", "engine.cli", "bench", "--systems", "engine", "--model", str(bundle),
               "--batch-sizes", batch_sizes, "--warmup", "0", "--repeats", "100000", "--images", str(images),
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--ceiling-seconds", "0.1"]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.stdout is not None
    for line in run.stdout:
        if "repeat 3/" in line:
            break
    return run


@pytest.mark.slow
def test_a_worker_dying_mid_run_keeps_its_runs_marked_and_fails_the_run(tiny_bundle: Path, tmp_path: Path) -> None:
    """A worker killed after some timed runs: its row is those runs, marked as cut short with the reason and its
    peak memory, and the bench exits 1 (it exited 0 with a row that read as a finished cell)."""
    import psutil

    out = tmp_path / "out"
    run = _bench_at_its_third_timed_run(tiny_bundle, tmp_path, out, "1")
    assert run.stdout is not None
    [worker] = psutil.Process(run.pid).children(recursive=True)
    worker.kill()
    rest = run.stdout.read()
    assert run.wait(timeout=120) == 1, rest
    assert "1 of 1 measurements failed or were cut short (engine at batch 1)" in rest
    [cell] = json.loads((out / "results.json").read_text())["results"]
    assert cell["status"] == "failed" and "worker died (killed by signal 9" in cell["error"]
    assert cell["repeats"] >= 3 and cell["peak_rss_bytes"] and cell["total_s_per_image"]
    table = (out / "results.md").read_text()
    assert "| engine (cut short, see notes) | 1 |" in table
    assert f"- engine at batch 1: failed after {cell['repeats']} of 100000 timed runs (worker died" in table


def test_a_batch_scaling_worker_that_dies_is_said_and_fails_the_run(tiny_bundle: Path, tmp_path: Path) -> None:
    """A batch-scaling worker killed (the out-of-memory killer) was one log line: no row, no note, exit 0. And
    batch sizes that do not divide each other timed a partial batch on the smaller side (3 and 4: 3+1)."""
    import psutil

    from benchmarks import runner, settings
    from benchmarks.models import prepare_models
    from benchmarks.report import markdown

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "examples" / "00000.jpg", images)
    models = prepare_models("tiny", ["engine"], tmp_path / "cache", lambda _line: None, bundles=[tiny_bundle], images_dir=images)
    plan = settings.BenchSettings(size="tiny", systems=["engine"], batch_sizes=[3, 4], repeats=2, warmup=0,
                                  tokens=4, out=tmp_path / "out")  # fmt: skip
    (tmp_path / "out" / "logs").mkdir(parents=True)
    whole = runner.run_batch_scaling(["engine"], plan, models, lambda _line: None, {})
    assert [row["images_per_run"] for row in whole] == [12] and whole[0]["throughput_ratio"] > 0
    import dataclasses

    # 7 and 8 have no small common multiple (56: 7x the work): each side whole batches of its own covering 8.
    [wide] = runner.run_batch_scaling(["engine"], dataclasses.replace(plan, batch_sizes=[7, 8], repeats=1), models,
                                      lambda _line: None, {})  # fmt: skip
    assert (wide["small_images_per_run"], wide["images_per_run"]) == (14, 8) and wide["throughput_ratio"] > 0

    def kill_a_worker(line: str) -> None:
        if "repeat 1/" in line:  # between two timed runs: the next request finds its worker dead
            psutil.Process().children()[-1].kill()

    [failed] = runner.run_batch_scaling(["engine"], plan, models, kill_a_worker, {})
    assert "worker died" in failed["error"] and "throughput_ratio" not in failed
    bench = runner.BenchRun(plan, models, lambda _line: None)
    bench.scaling = [failed]
    assert f"- engine: batch scaling failed ({failed['error']})" in markdown(bench.document())

    alone = runner.BenchRun(dataclasses.replace(plan, interleave=False), models, lambda _line: None).document()
    assert any(note.startswith("batch scaling not timed (--no-interleave)") for note in alone["notes"])  # not dropped unsaid


@pytest.mark.slow
def test_a_stopped_run_writes_what_it_measured_marked_as_partial(tiny_bundle: Path, tmp_path: Path) -> None:
    """SIGTERM (or Ctrl-C) partway through a long run threw every timed run away; with no earlier results to
    put back, the runs made are written, marked as cut short, and the exit status is still the stop's."""
    import psutil

    out = tmp_path / "out"
    run = _bench_at_its_third_timed_run(tiny_bundle, tmp_path, out, "1,2")
    assert run.stdout is not None
    workers = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGTERM)
    rest = run.stdout.read()
    assert run.wait(timeout=120) == 143, rest
    assert "stopped: what was measured so far is in" in rest and "interrupted" in rest
    doc = json.loads((out / "results.json").read_text())
    assert doc["stopped"] == "SIGTERM"
    [cell] = doc["results"]  # batch 2 was never reached: left out, not a failed row
    assert (cell["system"], cell["batch_size"], cell["status"]) == ("engine", 1, "ok") and 3 <= cell["repeats"] < 100000
    table = (out / "results.md").read_text()
    assert "| engine (cut short, see notes) | 1 |" in table
    assert f"- engine at batch 1: stopped after {cell['repeats']} of 100000 timed runs" in table
    assert "- stopped by SIGTERM partway" in table
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_results_that_cannot_be_written_after_a_stop_say_why(tmp_path: Path) -> None:
    from benchmarks.cli import _keep_what_was_measured

    class Broken:
        def measured_anything(self) -> bool:
            return True

        def document(self, stopped: str | None = None) -> dict[str, object]:
            raise ValueError("no medians")

    (tmp_path / "results.json").write_text("half")
    logged: list[str] = []
    _keep_what_was_measured(Broken(), KeyboardInterrupt(), tmp_path, logged.append, earlier_kept=False)  # type: ignore[arg-type]
    assert logged == ["stopped: could not write what was measured (ValueError: no medians)"]
    assert not (tmp_path / "results.json").exists()


def test_every_system_gets_the_pixels_edlight_captions(tmp_path: Path) -> None:
    """The worker opened images with a plain convert("RGB"): PyTorch and Optimum captioned a phone photo on its
    side (the engine turned it upright), and transparency on black; and it held every image of the set in
    memory, which counted in each cell's peak RSS."""
    from benchmarks.worker import _load_images

    photo = Image.new("RGB", (60, 40), "white")
    exif = photo.getexif()
    exif[0x0112] = 6  # stored on its side: shown turned 90 degrees
    photo.save(tmp_path / "sideways.jpg", exif=exif)
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    paths = [str(tmp_path / "sideways.jpg"), str(tmp_path / "clear.png"), str(tmp_path / "missing.png")]
    upright, clear = _load_images(paths, 2)  # the third is never read: only what a run captions is held
    assert upright.size == (40, 60) and clear.getpixel((0, 0)) == (255, 255, 255)
    again = _load_images(paths[:2], 5)
    assert [image.size for image in again] == [(40, 60), (30, 30)] * 2 + [(40, 60)] and again[0] is again[2]


def test_runs_of_several_batches_combine_into_one_run_over_their_images() -> None:
    """The batch-scaling comparison times the smaller batch size over the larger one's images (it captioned only
    its first image, which on the bench's images has the most patches, so the ratio read about 1% high)."""
    from benchmarks.timing import RunTiming

    def run(captions: list[str], patches: list[int] | None) -> RunTiming:
        n = len(captions)
        return RunTiming(batch_size=n, preprocess_s=0.1 * n, encoder_s=1.0 * n, decode_s=0.5, total_s=1.0 * n + 0.6,
                         decode_steps=4, captions=captions, encoder_patches=patches)

    both = RunTiming.combined([run(["a"], [10]), run(["b"], [12])])
    assert (both.batch_size, both.captions, both.encoder_patches, both.decode_steps) == (2, ["a", "b"], [10, 12], 4)
    assert (both.preprocess_s, both.encoder_s, both.decode_s, both.total_s) == pytest.approx((0.2, 2.0, 1.0, 3.2))
    assert RunTiming.combined([run(["a"], None), run(["b"], None)]).encoder_patches is None

