"""Captioning on Ray (engine.ray_caption): same records as the local engine, resume after a kill, loud stalls.

The Ray tests share one local Ray with 2 CPUs (module fixture, shut down at teardown) and the session's
tiny bundle. The local reference runs with 1 ONNX Runtime thread, like each of the 2 actors, so that
captions are bit-identical whatever the thread count does to float sums.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import BundleError
from engine.folder import OutputError
from engine.ray_caption import (
    RayConnectionError,
    RayStallError,
    RayWorkerError,
    _check_reachable,
    _connect,
    _require_result_columns,
    caption_folder_ray,
    plan_actors,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# ----------------------------------------------------------------------------------- sizing (no Ray)
@pytest.mark.parametrize("cpus", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("actors", [None, 1, 2, 5])
def test_plan_leaves_a_cpu_for_ray_data_tasks(cpus: int, actors: int | None) -> None:
    plan = plan_actors(cpus, actors)
    reserve = 1.0 if cpus >= 2 else cpus / 2
    assert plan.actors == (actors or max(1, cpus // 2))
    assert 0 < plan.cpus_per_actor * plan.actors <= cpus - reserve + 1e-9
    assert plan.threads == max(1, cpus // plan.actors)


def test_plan_starts_no_actor_without_an_image_and_refuses_what_is_no_count() -> None:
    """12 actors for 10 images started 12 processes, each loading the model (3x slower than 1 actor on 2 cores);
    actors=2.5 reached Ray's internals and came back as a bare TypeError after its traceback."""
    assert (plan_actors(8.0, 12, images=10).actors, plan_actors(8.0, None, images=1).actors) == (10, 1)
    # Each keeps the share it would have had: on 2 nodes of 8 CPUs one actor reserving 15 would fit on neither.
    assert plan_actors(16.0, None, images=1).cpus_per_actor == plan_actors(16.0).cpus_per_actor == 1.875
    assert plan_actors(16.0, None, images=1).threads == plan_actors(16.0).threads == 2
    for actors, threads in ((2.5, None), (0, None), (None, 1.5), (None, "2")):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            plan_actors(8.0, actors, threads)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "value"), [("max_new_tokens", -1), ("max_new_tokens", "5"), ("min_new_tokens", -2), ("threads", 1.5), ("actors", 2.5)]
)
def test_bad_settings_are_refused_before_ray_starts(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, value: object
) -> None:
    """They were found by every actor, after Ray and the actors had started, and came back as a model failure."""
    import engine.ray_caption as ray_caption

    def no_ray(*args: object, **kwargs: object) -> bool:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_caption, "_connect", no_ray)
    with pytest.raises(ValueError, match=f"{setting} must be an integer"):
        caption_folder_ray([EXAMPLES], tmp_path / "out.jsonl", tiny_bundle, progress=False, **{setting: value})  # type: ignore[arg-type]
    assert not (tmp_path / "out.jsonl").exists()


def test_plan_on_two_cores_gives_fractional_actors() -> None:
    # The case seen to stall with whole-CPU actors: 2 actors on 2 cores must reserve half a CPU each.
    plan = plan_actors(2.0, 2)
    assert (plan.actors, plan.cpus_per_actor, plan.threads) == (2, 0.5, 1)
    assert plan_actors(2.0, None, threads=3).threads == 3


def test_an_actor_on_a_node_with_fewer_cores_than_its_share_still_starts(tiny_bundle: Path) -> None:
    """plan_actors shares out the whole cluster's cores: 1 actor on a cluster of 5 four-core nodes gets 20
    threads, which the 4-core node it lands on would refuse (Captioner's limit is per core of its machine)."""
    from engine.ray_caption import CaptionActor
    from engine.session import MAX_THREADS_PER_CORE, available_cores

    actor = CaptionActor(str(tiny_bundle), threads=10 * MAX_THREADS_PER_CORE * available_cores(), batch_size=2,
                         num_beams=1, max_new_tokens=4, max_pixels=0)  # fmt: skip
    assert actor.captioner.encoder.settings.threads == MAX_THREADS_PER_CORE * available_cores()


def test_an_unreachable_address_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RayConnectionError, match=rf"cannot reach a Ray cluster at ray://127.0.0.1:{port}"):
        _check_reachable(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    # "auto" leads where Ray would: RAY_ADDRESS, else the cluster recorded in Ray's temp folder, which a
    # cluster long gone leaves behind (ray.init then waited for minutes with only log lines).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    _check_reachable("auto")  # nothing recorded: Ray itself says at once that it finds no cluster ...
    import ray

    assert not ray.is_initialized()
    with pytest.raises(RayConnectionError, match=r"^--ray-address auto found no Ray cluster .*leave out --ray-address"):
        _connect(ray, "auto", None)  # ... in words naming edlight's option (Ray's name its own CLI's --address)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    with pytest.raises(RayConnectionError, match=rf"at 127.0.0.1:{port} \(where --ray-address auto leads: a Ray found or last"):
        _check_reachable("auto")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(RayConnectionError, match=r"auto leads: RAY_ADDRESS"):
        _check_reachable("auto")


def test_a_dashboard_address_is_named_as_one() -> None:
    # Split at its last colon, http://127.0.0.1:8265 was "cannot reach ... (Name or service not known)".
    with pytest.raises(RayConnectionError, match=r"http://127.0.0.1:8265: that is a Ray dashboard's address .*HOST:6379"):
        _check_reachable("http://127.0.0.1:8265")


def test_answers_of_another_edlights_actors_are_one_named_error() -> None:
    # A local Ray's workers import `engine` from the driver's working folder first: an older checkout there
    # answered without the failure column, and the driver died in KeyError: 'failure'.
    _require_result_columns([{"index": 0, "caption": "c", "error": None, "bytes": 3, "sha256": None, "mtime_ns": None, "failure": None}])
    _require_result_columns([])
    with pytest.raises(RayWorkerError, match=r"the Ray workers run another edlight than this one \(their answers lack bytes, sha256, mtime_ns, failure\)"):
        _require_result_columns([{"index": 0, "caption": "c", "error": None}])
    with pytest.raises(RayWorkerError, match=r"\(their answers lack sha256, mtime_ns\)"):  # an edlight from before records had it
        _require_result_columns([{"index": 0, "caption": "c", "error": None, "bytes": 3, "failure": None}])


# ------------------------------------------------------------------------------------ missing extra
def test_without_ray_the_cli_names_the_extra(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys

        class BlockRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, BlockRay())
        from engine.ray_caption import RayUnavailableError, caption_folder_ray
        try:
            caption_folder_ray([{str(EXAMPLES)!r}], {str(tmp_path / "api.jsonl")!r})
        except RayUnavailableError as exc:
            print("API:", exc)
        from engine.cli import main
        # A bundle that does not exist: the missing extra must be reported first, before any work.
        main(["caption", {str(EXAMPLES)!r}, "--ray", "--model", {str(tmp_path / "no-bundle")!r},
              "--out", {str(tmp_path / "cli.jsonl")!r}])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "API: captioning on Ray needs the [distributed] extra" in result.stdout
    assert "error: captioning on Ray needs the [distributed] extra (ray is not installed)" in result.stderr
    assert "pip install '.[distributed]' -c constraints.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cli.jsonl").exists() and not (tmp_path / "api.jsonl").exists()


# --------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def local_ray() -> Iterator[object]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        _wait_for_result_pumps()
        ray.shutdown()


def _result_pumps() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edlight-ray-results"]


def _wait_for_result_pumps(seconds: float = 120) -> None:
    """Wait until no engine thread is inside a Ray result iterator. One still inside it at ray.shutdown()
    makes Ray start a new local cluster from this process (its auto-init), whose end later terminates the
    process: the whole pytest run, silently."""
    deadline = time.monotonic() + seconds
    while _result_pumps() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/ plus a corrupt and a truncated image (error records), in a nested layout."""
    folder = tmp_path_factory.mktemp("ray-inputs") / "inputs"
    shutil.copytree(EXAMPLES, folder / "examples")
    (folder / "corrupt.jpg").write_text("this is not an image")
    data = (EXAMPLES / "00001.jpg").read_bytes()
    (folder / "examples" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return folder


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_ray_records_equal_the_local_engine(local_ray: object, tiny_bundle: Path, mixed_folder: Path,
                                            tmp_path: Path) -> None:
    from engine.captioner import Captioner

    local = Captioner(tiny_bundle, threads=1).caption_folder([mixed_folder], tmp_path / "local.jsonl", progress=False)
    lines: list[str] = []
    summary = caption_folder_ray([mixed_folder], tmp_path / "ray.jsonl", tiny_bundle, actors=2, progress=False,
                                 log=lines.append)

    assert lines == ["ray: 2 actor(s) x 0.5 CPU reserved, 1 ONNX Runtime thread(s) each, on a cluster of 2 CPUs"]
    records = _records(tmp_path / "ray.jsonl")
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()
    examples = sorted(p.name for p in EXAMPLES.glob("*.jpg")) + ["truncated.jpg"]
    assert [r["file"] for r in records] == ["corrupt.jpg"] + [f"examples/{name}" for name in examples]
    failed = {r["file"]: r["error"] for r in records if r["error"] is not None}
    assert set(failed) == {"corrupt.jpg", "examples/truncated.jpg"}
    assert all(r["caption"] for r in records if r["error"] is None)
    assert (summary.total, summary.captioned, summary.failed) == (local.total, local.captioned, local.failed) == (10, 8, 2)

    # A rerun resumes: captioned images are skipped, the two that failed are tried again (and fail again).
    again = caption_folder_ray([mixed_folder], tmp_path / "ray.jsonl", tiny_bundle, progress=False)
    assert (again.skipped, again.retried, again.captioned, again.failed) == (8, 2, 0, 2)
    assert _records(tmp_path / "ray.jsonl") == [r for r in records if r["error"] is None] + [
        r for r in records if r["error"] is not None
    ]


@pytest.mark.slow
def test_ray_takes_the_minimum_caption_length_as_a_local_run(local_ray: object, tiny_bundle: Path, tmp_path: Path) -> None:
    """caption_folder_ray had no min_new_tokens, though its settings are said to be Captioner's."""
    from engine.captioner import Captioner

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("00000.jpg", "00003.jpg"):
        shutil.copy(EXAMPLES / name, folder / name)
    local = Captioner(tiny_bundle, threads=1, min_new_tokens=30)
    local.caption_folder([folder], tmp_path / "local.jsonl", progress=False)
    caption_folder_ray([folder], tmp_path / "ray.jsonl", tiny_bundle, actors=1, min_new_tokens=30, progress=False)
    records = _records(tmp_path / "ray.jsonl")
    assert [r["caption"] for r in records] == [r["caption"] for r in _records(tmp_path / "local.jsonl")]
    assert {r["model"] for r in records} == {local.captions_id} and "min_new_tokens=30" in local.captions_id


@pytest.mark.slow
def test_an_actor_that_cannot_load_the_bundle_is_one_named_error(local_ray: object, tiny_bundle: Path, tmp_path: Path) -> None:
    """As on a node whose ONNX Runtime refuses a graph (or that lacks the bundle's path): the actor died in
    its constructor, Ray printed its traceback once per retry, and the driver ended in ActorDiedError (exit 1)."""
    from engine.bundle import MANIFEST_NAME, sha256_file
    from engine.errors import ModelRuntimeError

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    encoder = next(name for name in manifest["files"] if name.startswith("encoder") and name.endswith(".onnx"))
    (bundle / encoder).write_bytes(b"not an ONNX graph")  # hashed as it is: the driver's check passes
    manifest["files"][encoder] = sha256_file(bundle / encoder)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelRuntimeError, match=f"^a Ray actor on {re.escape(socket.gethostname())}: .*{encoder}: ONNX Runtime cannot load"):
        caption_folder_ray([EXAMPLES], tmp_path / "out.jsonl", bundle, actors=1, progress=False)
    assert (tmp_path / "out.jsonl").read_text() == ""  # no record: nothing was captioned

    from engine.ray_caption import ActorFailure, CaptionActor

    gone = CaptionActor(str(tmp_path / "elsewhere"), threads=1, batch_size=2, num_beams=1, max_new_tokens=4, max_pixels=0)
    failure = gone({"index": [0], "path": [b"x.png"], "label": [b"x.png"]}).to_pylist()[0]["failure"]
    with pytest.raises(BundleError, match="a Ray actor on .*elsewhere"):
        ActorFailure.raise_from(failure)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_ray_takes_file_names_that_are_not_utf8(local_ray: object, tiny_bundle: Path, tmp_path: Path) -> None:
    from engine.captioner import Captioner

    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(EXAMPLES / "00000.jpg", folder / "plain.jpg")
    (folder / os.fsdecode(b"good\xfe.jpg")).write_bytes((EXAMPLES / "00001.jpg").read_bytes())
    (folder / os.fsdecode(b"bad\xff.jpg")).write_text("not an image")  # its error names it
    for fmt in ("jsonl", "csv"):
        Captioner(tiny_bundle, threads=1).caption_folder([folder], tmp_path / f"local.{fmt}", progress=False)
        summary = caption_folder_ray([folder], tmp_path / f"ray.{fmt}", tiny_bundle, actors=2, progress=False)
        assert (summary.captioned, summary.failed) == (2, 1)
        assert (tmp_path / f"ray.{fmt}").read_bytes() == (tmp_path / f"local.{fmt}").read_bytes()
    # A replaced photo: refused, or captioned again with recaption_changed, as in a local run.
    shutil.copy(EXAMPLES / "00002.jpg", folder / "plain.jpg")
    with pytest.raises(OutputError, match="--recaption-changed"):
        caption_folder_ray([folder], tmp_path / "ray.jsonl", tiny_bundle, progress=False)
    again = caption_folder_ray([folder], tmp_path / "ray.jsonl", tiny_bundle, recaption_changed=True, progress=False)
    assert (again.changed, again.retried, again.captioned, again.failed) == (1, 1, 1, 1)


@pytest.mark.slow
def test_cli_ray_option_writes_the_local_csv(local_ray: object, tiny_bundle: Path, mixed_folder: Path,
                                             tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.captioner import Captioner
    from engine.cli import main

    Captioner(tiny_bundle, threads=1).caption_folder([mixed_folder], tmp_path / "local.csv", fmt="csv", progress=False)
    args = ["caption", str(mixed_folder), "--model", str(tiny_bundle), "--format", "csv", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ray.csv"), "--ray", "--actors", "2", "--strict"])
    assert result.exit_code == 1, result.output  # --strict: two images failed
    assert "ray: 2 actor(s) x 0.5 CPU reserved" in result.output
    assert "captioned 8, failed 2 of 10 images" in result.output
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()

    misuse = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.csv"), "--actors", "2"])
    assert misuse.exit_code == 2 and "--ray-address and --actors need --ray" in misuse.output


KILLED_RUN = """
import sys
from engine.ray_caption import caption_folder_ray
caption_folder_ray([sys.argv[1]], sys.argv[2], sys.argv[3], num_cpus=2, actors=2, batch_size=1, progress=False)
"""


def _wait_for_two_records(job: subprocess.Popen, out: Path, seconds: float) -> None:  # type: ignore[type-arg]
    """Until the running `job` has written two records to `out`: mid-run, where a stop means something."""
    deadline = time.monotonic() + seconds
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert job.poll() is None, f"the run ended before it could be stopped: {job.stderr.read()!r}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"the Ray run wrote nothing in {seconds:g} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_ray_run_resumes_without_loss_or_duplicates(local_ray: object, tiny_bundle: Path,
                                                           tmp_path: Path) -> None:
    from engine.captioner import Captioner
    from train.synth import generate

    folder = generate(tmp_path / "images", n=48, seed=3)
    out = tmp_path / "captions.jsonl"
    # Its own process group, so the kill takes the Ray it started (raylet, workers) down with it.
    job = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(folder), str(out), str(tiny_bundle)],
                           cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_two_records(job, out, seconds=90)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    kept = _records(out) if out.read_bytes().endswith(b"\n") else _records(out)[:-1]
    assert 2 <= len(kept) < 48, "the kill must land mid-run for this test to mean anything"

    summary = caption_folder_ray([folder], out, tiny_bundle, actors=2, progress=False)
    assert summary.skipped == len(kept) and summary.captioned + summary.failed == 48 - len(kept)

    reference = tmp_path / "local.jsonl"
    Captioner(tiny_bundle, threads=1).caption_folder([folder], reference, progress=False)
    # One record per image, none lost, none twice, in input order, and the same as an uninterrupted local run.
    assert _records(out) == _records(reference)


@pytest.mark.slow
def test_a_service_managers_stop_of_a_ray_run_says_how_to_go_on(tiny_bundle: Path, tmp_path: Path) -> None:
    """ray.init sets its own SIGTERM handler, which exited with status 15 and no word; the CLI takes it back. The
    stop goes to the whole process group, as from `timeout` or a service manager: Ray's own processes, dying at
    once, sometimes made Ray end the run with exit 1 before it could unwind."""
    from train.synth import generate

    folder = generate(tmp_path / "images", n=48, seed=4)
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "engine.cli", "caption", str(folder), "--model", str(tiny_bundle), "--out", str(out),
               "--ray", "--actors", "1", "--batch-size", "1", "--quiet"]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_two_records(job, out, seconds=120)
        os.killpg(job.pid, signal.SIGTERM)
        stderr = job.communicate(timeout=120)[1]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
    assert job.returncode == 143, stderr[-3000:]
    assert f"interrupted: the records written so far are kept in {out}" in stderr
    assert 2 <= len(_records(out)) < 48


@pytest.mark.slow
def test_a_stalled_ray_job_fails_loudly(local_ray: object, tiny_bundle: Path, mixed_folder: Path,
                                        tmp_path: Path) -> None:
    import ray

    @ray.remote(num_cpus=2)
    class Hog:  # another job holding every CPU: the caption actors can never be placed
        def ready(self) -> bool:
            return True

    hog = Hog.remote()  # type: ignore[attr-defined]
    ray.get(hog.ready.remote(), timeout=60)
    try:
        started = time.monotonic()
        with pytest.raises(RayStallError, match=r"returned no results for 5 s.*actor\(s\) x 0\.5 CPU"):
            caption_folder_ray([mixed_folder], tmp_path / "stalled.jsonl", tiny_bundle, actors=2,
                               progress=False, stall_timeout=5)
        assert time.monotonic() - started < 60
    finally:
        ray.kill(hog)
    # Once the CPUs are free the stalled job's actors start; the engine's thread then closes Ray's iterator
    # at its first result and ends (it cannot be stopped while the iterator blocks).
    _wait_for_result_pumps()
    assert not _result_pumps()
    assert (tmp_path / "stalled.jsonl").read_text() == ""  # nothing half-written


def test_records_streamed_to_stdout_keep_rays_log_lines_out(tmp_path: Path) -> None:
    """Ray prints its workers' log lines on the driver's stdout: not forwarded when the records go there."""
    from engine.folder import is_same_file
    from engine.ray_caption import _connect

    code = ("import sys; from pathlib import Path; from engine.folder import is_same_file; "
            "print([is_same_file(Path(p), sys.stdout) for p in sys.argv[1:]], file=sys.stderr)")
    other = tmp_path / "other.jsonl"
    other.write_text("")
    with open(tmp_path / "out.jsonl", "w") as stdout:
        result = subprocess.run([sys.executable, "-c", code, "/dev/stdout", "/dev/fd/1", str(tmp_path / "out.jsonl"),
                                 str(other), str(tmp_path / "missing")], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    assert result.stderr.strip() == "[True, True, True, False, False]", result.stderr
    assert not is_same_file(tmp_path / "missing", sys.stdout)

    class RayInit:  # what _connect asks of ray.init (starting a real cluster for each setting takes minutes)
        def __init__(self) -> None:
            self.options: dict[str, object] = {}

        def is_initialized(self) -> bool:
            return False

        def init(self, **options: object) -> None:
            self.options = options

    for on_stdout in (True, False):
        ray = RayInit()
        assert _connect(ray, None, 2, records_on_stdout=on_stdout)
        assert ("log_to_driver" in ray.options) == on_stdout and ray.options.get("log_to_driver", False) is False
