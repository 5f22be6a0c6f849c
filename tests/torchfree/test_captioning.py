"""End to end without torch: the Captioner API, folder runs, resume, and the CLI, on a real bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine import Captioner
from engine.caption_cli import caption as caption_command
from engine.errors import MAX_BATCH_SIZE, MAX_NUM_BEAMS, BundleError, ImageError
from engine.folder import (
    OutputError,
    collect_inputs,
    output_lock,
    read_done,
    sibling_stem,
)

REPO = Path(__file__).resolve().parents[2]


def photo(seed: int, width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def make_folder(root: Path, count: int) -> list[str]:
    """`count` distinct images spread over two levels; returns their record names in walk order."""
    names = []
    for i in range(count):
        name = f"{'nested/' if i % 3 == 0 else ''}img_{i:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        photo(i, 64 + 8 * (i % 5), 48 + 16 * (i % 4)).save(root / name)
        names.append(name)
    return [f.file for f in collect_inputs([root])]


def records_of_csv(path: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(path.open(encoding="utf-8-sig", newline="")))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def captioner(engine_bundle: Path) -> Captioner:
    return Captioner(engine_bundle, batch_size=3, threads=1)


def test_batch_equals_single_and_order_is_kept(captioner: Captioner) -> None:
    images = [photo(i, 40 + 30 * i, 200 - 20 * i) for i in range(7)]
    batched = captioner.caption(images)
    single = [captioner.caption([image])[0] for image in images]
    assert batched == single
    assert captioner.caption(images[::-1]) == batched[::-1]
    assert all(isinstance(c, str) for c in batched)


def test_path_str_bytes_and_pil_give_the_same_caption(captioner: Captioner, tmp_path: Path) -> None:
    photo(3).save(tmp_path / "a.png")
    sources = [tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes(), Image.open(tmp_path / "a.png")]
    data = (tmp_path / "a.png").read_bytes()
    with open(tmp_path / "a.png", "rb") as handle:
        sources += [bytearray(data), memoryview(data), io.BytesIO(data), handle]
        captions = captioner.caption(sources)
    assert len(set(captions)) == 1 and len(captions) == 8
    assert captioner.caption(tmp_path / "a.png") == captions[:1]  # a single source is accepted too
    assert captioner.caption(io.BytesIO(data)) == captions[:1]
    assert captioner.caption(memoryview(data)) == captions[:1]
    # An array of paths, as a DataFrame column's .values gives: one image each, not one array of pixels.
    assert captioner.caption(np.array([str(tmp_path / "a.png")] * 2)) == captions[:2]
    assert captioner.caption(np.array([tmp_path / "a.png", data], dtype=object)) == captions[:2]
    assert captioner.caption(np.array([[str(tmp_path / "a.png")]] * 2)) == captions[:2]  # df[["file"]].values


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "<empty path>: empty path"),
        (np.zeros((4, 4, 3), np.uint8), "<ndarray #0>: unsupported input type ndarray"),
        (None, "<NoneType #0>: unsupported input type"),
        (io.StringIO("text"), "file object gives str, not bytes"),
    ],
)
def test_unusable_sources_are_named_errors(captioner: Captioner, source: object, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        captioner.caption([source])  # type: ignore[list-item]


def test_one_unusable_source_outside_a_list_is_a_named_error_too(captioner: Captioner) -> None:
    with pytest.raises(ImageError, match=re.escape("<NoneType #0>: unsupported input type NoneType")):
        captioner.caption(None)  # type: ignore[arg-type]  # was a bare TypeError from iterating it
    with pytest.raises(ImageError, match=re.escape("<ndarray #0>: unsupported input type ndarray (") + ".*pass PIL.Image.fromarray"):
        captioner.caption(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]  # one image, not rows


def test_numpy_integers_are_settings_like_ints(engine_bundle: Path) -> None:
    numpy_settings = Captioner(engine_bundle, threads=np.int64(1), batch_size=np.int32(2), num_beams=np.int64(2), max_new_tokens=np.int64(5))
    assert (numpy_settings.batch_size, numpy_settings.generation.num_beams) == (2, 2)
    assert type(numpy_settings.batch_size) is int and type(numpy_settings.generation.max_new_tokens) is int
    plain = Captioner(engine_bundle, threads=1, batch_size=2, num_beams=2, max_new_tokens=5)
    assert numpy_settings.caption([photo(1), photo(2)]) == plain.caption([photo(1), photo(2)])


@pytest.mark.parametrize(
    ("setting", "value"),
    [("threads", 0), ("threads", 1.5), ("threads", "2"), ("batch_size", 2.5), ("batch_size", 10**20), ("num_beams", 10**20),
     ("max_pixels", "50000000"), ("max_pixels", 2.5), ("max_pixels", True), ("max_new_tokens", 0), ("max_new_tokens", "5")],
)
def test_bad_settings_raise_value_error_before_loading(engine_bundle: Path, setting: str, value: object) -> None:
    """A max_pixels of another type was taken, and then every image failed with a TypeError; max_new_tokens 0
    captioned every image as "" (the CLI and transformers refuse it)."""
    with pytest.raises(ValueError, match=f"{setting} must be an integer" if setting != "max_pixels" else "max_pixels must be a whole number"):
        Captioner(engine_bundle, **{setting: value})  # type: ignore[arg-type]


def test_a_batch_or_beam_width_beyond_any_use_is_a_usage_error_not_a_traceback(engine_bundle: Path, tmp_path: Path) -> None:
    """--batch-size 10**20 on a folder ended in islice's ValueError, --num-beams 10**20 in numpy's OverflowError."""
    (tmp_path / "in").mkdir()
    photo(1).save(tmp_path / "in" / "a.png")
    args = [str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(tmp_path / "c.jsonl"), "--quiet"]
    for option, most in (("--batch-size", MAX_BATCH_SIZE), ("--num-beams", MAX_NUM_BEAMS)):
        refused = CliRunner().invoke(caption_command, [*args, option, str(10**20)])
        assert refused.exit_code == 2, refused.output
        assert f"Invalid value for '{option}': 100000000000000000000 is not in the range 1<=x<={most}." in refused.output
    assert not (tmp_path / "c.jsonl").exists()


def test_an_output_path_naming_a_folder_is_refused(engine_bundle: Path, tmp_path: Path) -> None:
    """`--out results/` wrote a file named `results` (Path() drops the slash); `--out ""` meant the current folder."""
    photo(1).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(engine_bundle), "--quiet", "--out"]
    slash = CliRunner().invoke(caption_command, [*args, f"{tmp_path / 'results'}/", "--format", "csv"])
    assert slash.exit_code == 2
    assert f"results/: names a folder, not an output file; give a file name (e.g. {tmp_path / 'results'}/captions.csv)" in slash.output
    empty = CliRunner().invoke(caption_command, [*args, ""])
    assert empty.exit_code == 2 and "the output path is empty" in empty.output
    captioner = Captioner(engine_bundle, threads=1)
    with pytest.raises(OutputError, match="results/: names a folder, not an output file"):
        captioner.caption_folder([tmp_path / "a.png"], out=f"{tmp_path / 'results'}/", progress=False)
    with pytest.raises(OutputError, match="the output path is empty"):
        captioner.caption_folder([tmp_path / "a.png"], out="", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs CPU affinity and 2 CPUs")
def test_the_default_threads_stay_inside_the_cpus_the_process_was_given(engine_bundle: Path, tmp_path: Path) -> None:
    """Under `taskset -c 0`, ONNX Runtime's own default started a thread per core of the machine, pinned
    to cores outside the set."""
    photo(1).save(tmp_path / "a.png")
    script = f"""
import os
os.sched_setaffinity(0, {{0}})
from engine import Captioner
captioner = Captioner({str(engine_bundle)!r})  # kept: its sessions' threads live as long as it does
captioner.caption([{str(tmp_path / "a.png")!r}])
allowed = set()
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{{task}}/status") as status:
        allowed |= {{line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list")}}
print(sorted(allowed))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['0']"


def test_off_a_terminal_progress_is_lines_not_redraws(engine_bundle: Path, tmp_path: Path) -> None:
    """A service's journal, a CI log or `2> log`: tqdm's carriage-return redraws (and block characters) piled up
    on one line there."""
    make_folder(tmp_path / "in", 3)
    args = [str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(tmp_path / "c.jsonl"), "--batch-size", "1", "--threads", "1"]
    result = CliRunner().invoke(caption_command, args)  # its stderr is no terminal
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and "%|" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("captioned 3, failed 0 of 3 images")


def test_line_progress_says_count_rate_and_time_left() -> None:
    from engine.click_types import LineProgress

    stream = io.StringIO()
    bar = LineProgress(4, "captioning", "img", stream, interval=0.0)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"captioning: {n}/4 img" for n in (1, 2, 3)]  # not the last: the summary says it
    assert re.fullmatch(r"captioning: 1/4 img \(25%\), [0-9.e+]+ img/s, about \d+ s left", lines[0]), lines[0]
    quiet = io.StringIO()
    bar = LineProgress(4, "captioning", "img", quiet)  # at most a line a minute
    bar.update(3)
    assert quiet.getvalue() == ""
    LineProgress(4, "captioning", "img", quiet, interval=0.0).update(0)  # nothing done yet: no rate to divide by
    assert quiet.getvalue() == ""


def test_on_a_terminal_progress_is_a_bar() -> None:
    from engine.click_types import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = progress_bar(2, "captioning", "img", screen)
    bar.update(1)
    bar.close()
    assert "\r" in screen.getvalue() and "1/2" in screen.getvalue()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stderr_that_takes_nothing_costs_only_the_messages(engine_bundle: Path, tmp_path: Path) -> None:
    """`2>/dev/full`, or a reader of stderr gone (`2>&1 >out | head`): the model line or the progress bar
    raised, and the job ended with status 1 and no word, part-way."""
    for i in range(3):
        photo(i).save(tmp_path / f"{i}.png")
    base = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path), "--model", str(engine_bundle), "--threads", "1",
            "--batch-size", "1", "--out"]  # fmt: skip
    with open("/dev/full", "w") as full:
        done = subprocess.run([*base, str(tmp_path / "c.jsonl")], stderr=full, cwd=REPO, timeout=120)
        refused = subprocess.run([*base, str(tmp_path / "0.png" / "c.jsonl")], stderr=full, cwd=REPO, timeout=120)
    assert done.returncode == 0
    assert [json.loads(line)["file"] for line in (tmp_path / "c.jsonl").read_text().splitlines()] == ["0.png", "1.png", "2.png"]
    assert refused.returncode == 2  # an output it cannot write is still exit 2, with or without the message


def test_relative_paths_from_a_deleted_working_folder_are_a_named_error(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo(1).save(tmp_path / "a.png")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a shell left in a folder removed since
    with pytest.raises(OutputError, match="the working folder no longer exists .*cd to a folder that exists, or give absolute paths"):
        captioner.caption_folder(["../a.png"], out=tmp_path / "c.jsonl", progress=False)
    with pytest.raises(OutputError, match="the working folder no longer exists"):
        captioner.caption_folder([tmp_path / "a.png"], out="c.jsonl", progress=False)
    summary = captioner.caption_folder([tmp_path / "a.png"], out=tmp_path / "c.jsonl", progress=False)  # absolute: fine
    assert summary.captioned == 1


def test_threads_far_beyond_the_cores_are_refused(engine_bundle: Path, tmp_path: Path) -> None:
    """100,000 threads never captioned an image (16 GB of thread stacks); a few per core is only slow."""
    from engine.session import MAX_THREADS_PER_CORE, available_cores

    most = MAX_THREADS_PER_CORE * available_cores()
    with pytest.raises(ValueError, match=rf"threads {most + 1} on {available_cores()} CPU cores: at most {most} "):
        Captioner(engine_bundle, threads=most + 1)
    photo(1).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(engine_bundle), "--out", "-", "--quiet", "--threads"]
    refused = CliRunner().invoke(caption_command, [*args, "100000"])
    assert refused.exit_code == 2
    assert f"error: --threads 100000 on {available_cores()} CPU cores: at most {most} (" in refused.output
    slow = CliRunner().invoke(caption_command, [*args, str(available_cores() + 1)])
    assert slow.exit_code == 0 and "threads beyond the cores wait for each other" in slow.output


def test_no_pixel_cap_and_api_misuse_are_clear(engine_bundle: Path, tmp_path: Path) -> None:
    uncapped = Captioner(engine_bundle, max_pixels=None)  # no cap, as 0 is
    assert uncapped.caption([photo(1)]) == Captioner(engine_bundle, max_pixels=0).caption([photo(1)])
    for whole in (np.int64(10**8), 1.5e8):  # whole numbers of other types, as before
        assert Captioner(engine_bundle, max_pixels=whole).max_pixels == int(whole)  # type: ignore[arg-type]
    photo(2).save(tmp_path / "a.png")
    closed = Image.open(tmp_path / "a.png")
    closed.close()
    with pytest.raises(ImageError, match=r"<PIL image #0>: the PIL image was closed before it was captioned"):
        uncapped.caption([closed])
    with pytest.raises(ValueError, match=r"iter_captions takes \(key, source, label\) tuples"):
        list(uncapped.iter_captions([tmp_path / "a.png"]))  # type: ignore[list-item]
    import pickle

    with pytest.raises(TypeError, match=r"a Captioner cannot be pickled .*build one per process from its bundle"):
        pickle.dumps(uncapped)  # e.g. handed to a spawned worker; ONNX Runtime's own words gave no way on


def test_timings_accumulate_and_reset(captioner: Captioner) -> None:
    captioner.reset_timings()
    captioner.caption([photo(1), photo(2)])
    timings = captioner.timings
    assert timings.images == 2 and timings.decode_steps >= 1
    assert timings.encoder_s > 0 and timings.decode_s > 0 and timings.preprocess_s > 0
    captioner.reset_timings()
    assert captioner.timings.images == 0


def test_a_bad_image_raises_a_named_error(captioner: Captioner, tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    with pytest.raises(ImageError, match=r"bad\.jpg: not an image"):
        captioner.caption([photo(1), tmp_path / "bad.jpg"])


def test_bad_corpus_gives_one_clear_record_per_file(captioner: Captioner, bad_corpus, tmp_path: Path) -> None:  # noqa: ANN001
    root, expected = bad_corpus
    out = tmp_path / "out.jsonl"
    summary = captioner.caption_folder(root, out=out, progress=False)
    got = records(out)
    assert [r["file"] for r in got] == sorted(expected, key=lambda n: n.split("/"))
    for record in got:
        problem = expected[record["file"]]
        if problem is None:
            assert record["error"] is None and isinstance(record["caption"], str), record
        else:
            assert record["caption"] is None and problem in record["error"], record
    failed = sum(1 for p in expected.values() if p is not None)
    assert (summary.captioned, summary.failed, summary.total) == (len(expected) - failed, failed, len(expected))


def test_folder_records_match_the_api_and_keep_walk_order(captioner: Captioner, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 8)
    out = tmp_path / "captions.jsonl"
    captioner.caption_folder([tmp_path / "in"], out=out, progress=False)
    got = records(out)
    assert [r["file"] for r in got] == names == sorted(names, key=lambda n: n.split("/"))
    assert [r["caption"] for r in got] == captioner.caption([tmp_path / "in" / n for n in names])


def test_resume_repairs_a_torn_last_line(captioner: Captioner, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 7)
    out = tmp_path / "captions.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    complete = out.read_text(encoding="utf-8")
    lines = complete.splitlines(keepends=True)
    # A kill in the middle of writing record 5: 4 whole lines and half of the 5th.
    out.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2], encoding="utf-8")
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert summary.skipped == 4 and summary.captioned == 3
    assert out.read_text(encoding="utf-8") == complete
    assert [r["file"] for r in records(out)] == names


def test_an_output_named_up_to_the_file_system_limit_is_locked_resumed_and_rewritten(
    captioner: Captioner, tmp_path: Path
) -> None:
    """The lock and the temporary copies beside an output are named after it: a legal name near 255 bytes made
    them too long to create (a traceback before any image)."""
    names = make_folder(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")  # an error record, dropped by the resume's retry
    out = tmp_path / ("\u00e9" * 100 + "c" * 49 + ".jsonl")  # 255 bytes in UTF-8
    assert len(os.fsencode(out.name)) == 255
    first = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (first.captioned, first.failed) == (3, 1)
    with output_lock(out):  # held under a name the file system takes, and released
        pass
    again = captioner.caption_folder(tmp_path / "in", out=out, progress=False)  # retries broken.png: a rewrite
    assert (again.skipped, again.failed) == (3, 1)
    assert sorted(r["file"] for r in records(out)) == sorted([*names, "broken.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", out.name])  # no lock or copy left


def test_sibling_names_fit_the_file_system_and_stay_apart() -> None:
    assert sibling_stem("captions.jsonl", 96) == ".captions.jsonl"  # as before for every usual name
    assert sibling_stem("c" * 244, 5) == "." + "c" * 244  # and for every name that takes its suffix
    long_a, long_b = "\u00e9" * 120 + "a", "\u00e9" * 120 + "b"
    stems = {sibling_stem(long_a, 96), sibling_stem(long_b, 96)}
    assert len(stems) == 2  # same start, their own hashes
    for stem in stems:
        assert stem.startswith(".\u00e9") and len(os.fsencode(stem)) + 96 <= 255
        os.fsencode(stem).decode("utf-8")  # cut between characters, never inside one


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_a_stop_that_library_code_swallowed_is_raised_again(engine_bundle: Path, tmp_path: Path) -> None:
    """A SIGTERM inside a library's bare `except:` (matplotlib's import, in a training run the CI saw) was lost:
    the run went on to its end and exited 0. The loops raise it again between their steps."""
    from engine.click_types import Stopped, check_stop, stops_unwind

    check_stop()  # outside a command: nothing
    captioner = Captioner(engine_bundle, threads=1, batch_size=1)
    make_folder(tmp_path / "in", 3)
    # As a command starts: stops_unwind takes only a default handler (a Ray started by an earlier test in this
    # process leaves its own, which would end the test run).
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with stops_unwind():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here
            except BaseException:  # noqa: BLE001 - as the library did
                pass
            with pytest.raises(Stopped):
                captioner.caption_folder(tmp_path / "in", out=tmp_path / "o.jsonl", progress=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert len(records(tmp_path / "o.jsonl")) == 1  # the first batch is kept, then the stop
    check_stop()  # the command is over: nothing


def test_resume_after_a_killed_run(engine_bundle: Path, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 60)
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--out", str(out), "--batch-size", "1", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; use more images"
    before = len(read_done(out, "jsonl"))
    assert 3 <= before < len(names)

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{before} already done" in result.stderr
    got = records(out)
    assert [r["file"] for r in got] == names  # none lost, none twice, in order
    assert all(r["error"] is None for r in got)


def test_a_full_disk_keeps_the_records_and_says_how_to_go_on(engine_bundle: Path, tmp_path: Path) -> None:
    """The output's file size limit reached mid-run (EFBIG, as a full disk's ENOSPC): exit 2, the records before
    kept, the last one cut short; the same command with room resumes to one record per image."""
    import resource

    names = make_folder(tmp_path / "in", 20)
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--out", str(out), "--batch-size", "2", "--threads", "1", "--quiet"]  # fmt: skip
    limit = 1500  # bytes: a few records (Python ignores SIGXFSZ, so the write fails with EFBIG)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    assert full.returncode == 2, full.stderr[-2000:]
    assert f"{out}: cannot write: File too large; the records before are kept: make room and run the same command" in full.stderr
    assert out.stat().st_size == limit and 0 < len(read_done(out, "jsonl")) < len(names)
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["file"] for r in records(out)] == names  # none lost, none twice, in order
    # Under --overwrite "the same command" would empty the records kept again.
    afresh = subprocess.run([*command, "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    assert afresh.returncode == 2 and "make room and run it again without --overwrite to resume" in afresh.stderr


def test_no_room_for_a_rewritten_copy_keeps_the_records_to_drop(tmp_path: Path) -> None:
    """Dropping a retried image's error record rewrites a copy of the whole output: on a nearly full disk that
    failed the run (EFBIG here, as ENOSPC), though the retries' own records would have fitted."""
    import resource

    out = tmp_path / "o.jsonl"
    lines = [json.dumps({"file": "a.png", "caption": None, "error": "x"})]
    lines += [json.dumps({"file": f"{i}.png", "caption": "c" * 100, "error": None}) for i in range(20)]
    out.write_text("\n".join(lines) + "\n")
    script = ("import logging, sys; from pathlib import Path; from engine.folder import _drop_lines, _read_lines; "
              "logging.basicConfig(); out = Path(sys.argv[1]); _drop_lines(out, _read_lines(out, 'jsonl'), {'a.png'})")
    limit = out.stat().st_size - 200  # smaller than the copy, which leaves out one short record
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "there is no room for a rewritten copy (File too large)" in result.stderr and "they stay" in result.stderr
    assert out.read_text() == "\n".join(lines) + "\n" and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_keeps_the_records_and_says_how_to_go_on(engine_bundle: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C, and what `timeout`, a service manager's stop or a closed terminal send (SIGTERM, SIGHUP: the
    process died by them, leaving its lock file and no word)."""
    names = make_folder(tmp_path / "in", 60)
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--out", str(out), "--batch-size", "1", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    process.send_signal(sig)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + sig, stderr  # 130, 143, 129
    assert f"interrupted: the records written so far are kept in {out}; run the same command again" in stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob(".captions.jsonl.lock*"))  # unwound: the lock went with the run
    kept = read_done(out, "jsonl")
    assert 2 <= len(kept) < len(names)
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    assert [r["file"] for r in records(out)] == names


def test_csv_output_and_resume(captioner: Captioner, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 5)
    out = tmp_path / "c.csv"
    captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    summary = captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    assert (summary.skipped, summary.failed) == (5, 1)
    import csv

    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["file"] for r in rows] == names + ["broken.png"]
    assert rows[-1]["caption"] == "" and "broken.png" in rows[-1]["error"]
    assert all(r["caption"] and not r["error"] for r in rows[:-1])


def test_a_whole_last_record_without_its_newline_is_kept_and_a_cut_one_is_said(
    captioner: Captioner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file saved by '\\n'.join (or an editor) lacks only the last newline: that record was cut off as torn,
    and a hand-checked caption of an image no longer among the inputs was gone for good, without a word."""
    names = make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    reviewed = [{**r, "caption": "checked by hand"} if r["file"] == names[2] else r for r in records(out)]
    out.write_text("\n".join(json.dumps(r) for r in reviewed), encoding="utf-8")
    (tmp_path / "in" / names[2]).unlink()
    photo(5).save(tmp_path / "in" / "new.png")
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.skipped, summary.captioned) == (2, 1)
    assert records(out)[:3] == reviewed and records(out)[3]["file"] == "new.png"  # kept, then a newline, then the new one

    whole = out.read_text(encoding="utf-8")
    out.write_text(whole + whole.splitlines()[0][:25], encoding="utf-8")  # a record cut short by a kill
    with caplog.at_level("WARNING", logger="engine.folder"):
        again = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert again.skipped == 3 and out.read_text(encoding="utf-8") == whole
    assert "cut off its last line, a record whose writing was cut short (25 bytes" in caplog.text


def test_a_crlf_last_record_without_its_line_end_keeps_its_own_line_when_records_are_dropped(
    captioner: Captioner, tmp_path: Path
) -> None:
    """The whole last record of a CRLF file was taken to end one byte after it (as if "\n" were added): a retry's
    rewrite then copied its "\r" but not its "\n", glued the next record onto its line, and every later resume
    was refused."""
    make_folder(tmp_path / "in", 2)
    (tmp_path / "in" / "a_empty.png").write_bytes(b"")  # fails on every run: retried each time, first in line
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert records(out)[0]["error"] and not records(out)[-1]["error"]  # the last record stays
    out.write_bytes(out.read_bytes().replace(b"\n", b"\r\n").removesuffix(b"\r\n"))
    for _ in range(2):
        summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        assert (summary.skipped, summary.failed) == (2, 1)
        lines = out.read_bytes().split(b"\r\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1]) and len(lines) == 4


def test_caption_files_saved_by_spreadsheets_and_data_tools_are_resumed(captioner: Captioner, tmp_path: Path) -> None:
    """A UTF-8 BOM (Excel's "CSV UTF-8", PowerShell), a quoted header, whole numbers as floats (pandas, when a
    column has a gap) and compact JSON (jq -c) were refused as "not a caption record" (--overwrite too); CRLF
    files got LF lines appended."""
    names = make_folder(tmp_path / "in", 2)
    csv_out, jsonl_out = tmp_path / "c.csv", tmp_path / "j.jsonl"
    captioner.caption_folder(tmp_path / "in", out=csv_out, fmt="csv", progress=False)
    captioner.caption_folder(tmp_path / "in", out=jsonl_out, progress=False)
    header, *rows = csv_out.read_text(encoding="utf-8").splitlines()
    as_saved = ",".join(f'"{name}"' for name in header.split(",")) + "\r\n"
    as_saved += "".join(re.sub(r",(\d+)$", r",\1.0", row) + "\r\n" for row in rows)
    csv_out.write_text("\ufeff" + as_saved, encoding="utf-8", newline="")
    jsonl_out.write_text(
        "\ufeff" + "".join(json.dumps(r, separators=(",", ":")) + "\r\n" for r in records(jsonl_out)), encoding="utf-8", newline=""
    )
    make_folder(tmp_path / "more", 3)
    photo(8).save(tmp_path / "in" / "z_new.png")
    for out, fmt in ((csv_out, "csv"), (jsonl_out, "jsonl")):
        summary = captioner.caption_folder(tmp_path / "in", out=out, fmt=fmt, progress=False)
        assert (summary.skipped, summary.captioned) == (2, 1), fmt
        assert out.read_bytes().startswith(b"\xef\xbb\xbf")  # the file's own start is kept
        assert out.read_bytes().count(b"\r\n") == out.read_bytes().count(b"\n") == 3 + (fmt == "csv")  # and line ends
    assert [r["file"] for r in records_of_csv(csv_out)] == [*names, "z_new.png"]
    compact = tmp_path / "compact.jsonl"
    compact.write_text(json.dumps({"file": "a.png", "caption": "x", "error": None}, separators=(",", ":")) + "\n")
    assert captioner.caption_folder(tmp_path / "more", out=compact, overwrite=True, progress=False).captioned == 3


def test_an_output_emptied_with_echo_is_started_afresh_with_its_header(captioner: Captioner, tmp_path: Path) -> None:
    """`echo > out.csv` leaves one blank line: the rows followed it without the header (csv.DictReader then took
    the first row for the columns), and --overwrite refused the file as not a caption file."""
    names = make_folder(tmp_path / "in", 2)
    for overwrite in (False, True):
        out = tmp_path / f"o{overwrite}.csv"
        out.write_text("\n \r\n")
        summary = captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", overwrite=overwrite, progress=False)
        assert summary.captioned == 2
        assert [r["file"] for r in records_of_csv(out)] == names
    out = tmp_path / "o.jsonl"
    out.write_text("\n")
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert [r["file"] for r in records(out)] == names


def test_a_line_break_inside_a_csv_cell_is_named(captioner: Captioner, tmp_path: Path) -> None:
    """A spreadsheet saves a cell with a line break across two lines: the second was read as a record of its own
    ("line two"), or as another model's."""
    names = make_folder(tmp_path / "in", 2)
    out = tmp_path / "c.csv"
    captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    header, first, second = out.read_text(encoding="utf-8").splitlines()
    file, _caption, *rest = next(__import__("csv").reader([second]))
    out.write_text(f'{header}\n{first}\n{file},"line one\nline two",{",".join(rest)}\n', encoding="utf-8")
    with pytest.raises(OutputError, match=r"c\.csv:3: not a caption record \(a quoted field runs on past the end of the line"):
        captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    out.write_text(f"{header}\n{first}\nline two\n", encoding="utf-8")
    with pytest.raises(OutputError, match=r"c\.csv:3: not a caption record \(1 fields where the header has 7\)"):
        captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    assert names


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_rewrite_keeps_the_outputs_owner_and_group(captioner: Captioner, tmp_path: Path) -> None:
    """Dropping retried error records rewrites the file: it became the rewriting user's, and a team sharing the
    folder could no longer resume it."""
    make_folder(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    os.chown(out, 65534, 65534)
    os.chmod(out, 0o664)
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).failed == 1  # retried: a rewrite
    info = out.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o664)


def test_overwrite_starts_afresh(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    out.write_text('{"file": "old.png", "caption": "x", "error": null}\n')
    out.chmod(0o600)  # a private file stays private: it was deleted and made again with the umask's mode
    os.link(out, tmp_path / "backup.jsonl")
    captioner.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False)
    assert "old.png" not in out.read_text() and len(records(out)) == 3
    assert out.stat().st_mode & 0o777 == 0o600 and (tmp_path / "backup.jsonl").read_text() == out.read_text()


def test_a_hard_link_to_an_output_a_run_has_just_made_is_refused_too(captioner: Captioner, tmp_path: Path) -> None:
    # The output is locked by name before the run makes it; a second run through a hard link made
    # meanwhile wrote the same images again into the same file.
    from engine.folder import RecordWriter, folder_job

    make_folder(tmp_path / "in", 2)
    out, link = tmp_path / "o.jsonl", tmp_path / "same.jsonl"
    with folder_job([tmp_path / "in"], out, "jsonl", overwrite=False, model=captioner.captions_id), RecordWriter(out, "jsonl"):
        os.link(out, link)
        with pytest.raises(OutputError, match=r"same\.jsonl: another run is writing to it"):
            captioner.caption_folder(tmp_path / "in", out=link, progress=False)
    assert captioner.caption_folder(tmp_path / "in", out=link, progress=False).captioned == 2


def test_a_damaged_output_is_refused_not_clobbered(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    out.write_text("garbage line\n" + '{"file": "a.png", "caption": "x", "error": null}\n')
    with pytest.raises(Exception, match=r"o\.jsonl:1: not a caption record"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert out.read_text().startswith("garbage line")


def test_the_other_formats_caption_file_is_named_as_such(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    csv_out, jsonl_out = tmp_path / "c.csv", tmp_path / "j.jsonl"
    captioner.caption_folder(tmp_path / "in", out=csv_out, progress=False)
    captioner.caption_folder(tmp_path / "in", out=jsonl_out, progress=False)
    before = csv_out.read_bytes(), jsonl_out.read_bytes()
    with pytest.raises(OutputError, match=r"c\.csv: a CSV caption file, not JSONL: caption into it with --format csv$"):
        captioner.caption_folder(tmp_path / "in", out=csv_out, fmt="jsonl", progress=False)
    with pytest.raises(OutputError, match=r"j\.jsonl: a JSONL caption file, not CSV: caption into it with --format jsonl$"):
        captioner.caption_folder(tmp_path / "in", out=jsonl_out, fmt="csv", progress=False)
    assert (csv_out.read_bytes(), jsonl_out.read_bytes()) == before


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_odd_file_names_are_written_and_resumed(captioner: Captioner, tmp_path: Path, fmt: str) -> None:
    # A name that is not UTF-8 (os.fsdecode gives it surrogate escapes) and one with a newline.
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (b"ok.png", b"latin1-\xe9t\xe9.png", b"two\nlines.png"):
        photo(len(name)).save(os.fsdecode(bytes(folder) + b"/" + name))
    out = tmp_path / f"o.{fmt}"
    first = captioner.caption_folder(folder, out=out, fmt=fmt, progress=False)
    assert (first.captioned, first.failed) == (3, 0)
    text = out.read_text(encoding="utf-8")  # still a valid UTF-8 file
    assert r"latin1-\xe9t\xe9.png" in text if fmt == "csv" else r"latin1-\udce9t\udce9.png" in text
    again = captioner.caption_folder(folder, out=out, fmt=fmt, progress=False)
    assert (again.skipped, again.captioned) == (3, 0)


def test_unusable_outputs_are_named_errors(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot create its folder .*a_file: a file, not a folder"):
        captioner.caption_folder(tmp_path / "in", out=tmp_path / "a_file" / "o.jsonl", progress=False)
    jsonl = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=jsonl, progress=False)
    before = jsonl.read_bytes()
    with pytest.raises(OutputError, match=r"o\.jsonl: a JSONL caption file, not CSV"):
        captioner.caption_folder(tmp_path / "in", out=jsonl, fmt="csv", progress=False)
    assert jsonl.read_bytes() == before
    if Path("/dev/full").exists():  # writes fail with ENOSPC
        with pytest.raises(OutputError, match="/dev/full: cannot write"):
            captioner.caption_folder(tmp_path / "in", out="/dev/full", progress=False)


@pytest.mark.parametrize("how", ["deleted", "replaced", "emptied"])
def test_an_output_deleted_replaced_or_emptied_mid_run_stops_the_run(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Appends to a deleted or replaced output reach no file, and an emptied one has lost its records: the
    run reported every image captioned, exit 0. It now stops at the next batch, and a rerun finishes the job."""
    names = make_folder(tmp_path / "in", 7)
    out = tmp_path / "o.jsonl"
    original = captioner.iter_captions

    def meddling(items):  # type: ignore[no-untyped-def]
        for n, result in enumerate(original(items)):
            if n == captioner.batch_size:  # the first batch is written; someone removes or edits the file
                if how == "deleted":
                    out.unlink()
                elif how == "replaced":  # as an editor's save or `sed -i` does: a new file renamed over it
                    (tmp_path / "edited").write_text(out.read_text())
                    os.replace(tmp_path / "edited", out)
                else:  # `> o.jsonl`, or a log rotation's copytruncate
                    out.write_text("")
            yield result

    monkeypatch.setattr(captioner, "iter_captions", meddling)
    message = "emptied or cut short" if how == "emptied" else "deleted or replaced by another file"
    with pytest.raises(OutputError, match=rf"o\.jsonl: was {message} while this run wrote to it.*run the same command again"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    monkeypatch.undo()
    kept = len(records(out)) if out.exists() else 0
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert sorted(r["file"] for r in records(out)) == sorted(names)
    assert summary.captioned == 7 - kept and kept == {"deleted": 0, "replaced": 3, "emptied": 3}[how]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_out_dash_into_a_file_shared_with_stderr_keeps_every_record(engine_bundle: Path, tmp_path: Path, fmt: str) -> None:
    """`--out - > file 2>&1`, or among other output: the records were written through /dev/stdout opened
    anew, with an offset of its own, and the summary and progress bar (and an `echo` after the run)
    then overwrote them."""
    names = make_folder(tmp_path / "in", 5)
    log = tmp_path / "all.txt"
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--out", "-", "--format", fmt, "--threads", "1", "--batch-size", "2"]
    with open(log, "w") as shared:  # as the shell does for `{ echo before; edlight ...; echo after; } > all.txt 2>&1`
        shared.write("before\n")
        shared.flush()
        result = subprocess.run(command, cwd=REPO, stdout=shared, stderr=subprocess.STDOUT, timeout=300)
        shared.write("after\n")
    text = log.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert result.returncode == 0, text
    assert lines[0] == "before" and lines[-1] == "after" and any(line.startswith("captioned 5, failed 0 of 5") for line in lines)
    # A draw of the progress bar ends without a newline, so a record can follow one on its line.
    if fmt == "jsonl":
        got = [json.loads(record)["file"] for record in re.findall(r'\{"file": .*\}', text)]
    else:
        got = re.findall(r"((?:nested/)?img_\d+\.png),", text)
        assert text.count("file,caption,error,model,bytes,sha256,mtime_ns\n") == 1
    assert got == names


def test_jpeg_2000_scans_are_found_in_folders(captioner: Captioner, tmp_path: Path) -> None:
    """Pillow reads JPEG 2000 (some scanners and archives write it); a folder walk skipped those files."""
    (tmp_path / "in").mkdir()
    photo(5).save(tmp_path / "in" / "scan.jp2")
    photo(6).save(tmp_path / "in" / "page.png")
    assert sorted(f.file for f in collect_inputs([tmp_path / "in"])) == ["page.png", "scan.jp2"]
    summary = captioner.caption_folder(tmp_path / "in", out=tmp_path / "o.jsonl", progress=False)
    assert summary.captioned == 2 and summary.failed == 0


def test_cli_writes_to_a_stream_and_picks_csv_from_the_name(engine_bundle: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    # A pipe is written as a stream: not read back for resuming, not synced, not unlinked by --overwrite.
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    runner = CliRunner()
    base = [str(tmp_path / "in"), "--model", str(engine_bundle), "--quiet"]
    result = runner.invoke(caption_command, [*base, "--out", str(fifo), "--overwrite", "--format", "csv"])
    streamed = reader.communicate(timeout=60)[0].decode()
    assert result.exit_code == 0, result.output
    assert streamed.startswith("file,caption,error,model,bytes,sha256,mtime_ns\n") and len(streamed.splitlines()) == 3
    assert fifo.exists()
    named = runner.invoke(caption_command, [*base, "--out", str(tmp_path / "c.csv")])
    assert named.exit_code == 0 and (tmp_path / "c.csv").read_text().startswith("file,caption,error,model,bytes,sha256,mtime_ns\n")


def test_cli_captions_prints_a_summary_and_honours_strict(engine_bundle: Path, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 4)
    (tmp_path / "in" / "zero.jpg").write_bytes(b"")
    out = tmp_path / "cli.jsonl"
    runner = CliRunner()
    args = [str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(out), "--batch-size", "2", "--quiet"]
    result = runner.invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert "captioned 4, failed 1 of 5 images" in result.output
    assert f"model: {engine_bundle}" in result.output
    assert [r["file"] for r in records(out)] == sorted(names + ["zero.jpg"], key=lambda n: n.split("/"))
    strict = runner.invoke(caption_command, [*args, "--strict"])  # the rerun tries the failed image again
    assert strict.exit_code == 1 and "failed 1 (1 retried after failing before), 4 already done of 5" in strict.output
    assert sorted(r["file"] for r in records(out)) == sorted(names + ["zero.jpg"])  # its old error record is gone
    csv_run = runner.invoke(caption_command, [*args[:-3], "--out", str(tmp_path / "x.csv"), "--format", "csv", "--quiet"])
    assert csv_run.exit_code == 0 and (tmp_path / "x.csv").read_text().startswith("file,caption,error,model,bytes,sha256,mtime_ns\n")


def test_cli_refuses_a_missing_or_tampered_bundle_before_reading_images(engine_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    # The input does not exist: if images were looked at first, that would be the error reported.
    missing = runner.invoke(caption_command, [str(tmp_path / "no-input"), "--model", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such bundle directory" in missing.output
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    a_file = runner.invoke(caption_command, [str(tmp_path / "no-input"), "--model", str(tmp_path / "model.onnx")])
    assert a_file.exit_code == 2 and "model.onnx: a file, not a bundle directory" in a_file.output
    checkpoint = tmp_path / "run" / "best"  # what `edlight train` writes: export it first
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    not_exported = runner.invoke(caption_command, [str(tmp_path / "no-input"), "--model", str(checkpoint)])
    assert not_exported.exit_code == 2, not_exported.output
    assert f"edlight.json is missing); it holds a PyTorch checkpoint: export it with `edlight export {checkpoint} --out BUNDLE`" in not_exported.output

    tampered = tmp_path / "bundle"
    shutil.copytree(engine_bundle, tampered)
    config = tampered / "generation_config.json"
    config.write_text(config.read_text() + " ")
    result = runner.invoke(caption_command, [str(tmp_path / "no-input"), "--model", str(tampered)])
    assert result.exit_code == 2
    assert "generation_config.json: sha256 does not match" in result.output
    with pytest.raises(BundleError, match="sha256"):
        Captioner(tampered)


def test_weights_beside_the_graphs_load_without_onnx(engine_bundle: Path, tmp_path: Path) -> None:
    """Exports of large models keep each graph's weights in `<graph>.data` (export.optimize.store_weights_beside).
    The engine reads such a bundle with ONNX Runtime alone, captions as from one-file graphs, and hashes the
    weights files (while the sessions load) like every other file. ONNX Runtime itself rewrites the graphs here."""
    import onnxruntime as ort

    from engine.bundle import Bundle, write_manifest

    beside = Path(shutil.copytree(engine_bundle, tmp_path / "beside"))
    manifest = Bundle.load(beside).manifest
    for name in manifest.onnx_files.values():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as it is
        options.optimized_model_filepath = str(tmp_path / name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.data")
        # As the export writes them: small tensors (shapes, split sizes) stay in the graph, for shape inference.
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(beside / name), options, providers=["CPUExecutionProvider"])
        for written in (name, f"{name}.data"):
            shutil.move(tmp_path / written, beside / written)
    write_manifest(beside, manifest)
    assert Bundle.load(beside).manifest.graph_files() == {*manifest.onnx_files.values(), *(f"{n}.data" for n in manifest.onnx_files.values())}
    images = [photo(seed) for seed in range(3)]
    assert Captioner(beside, threads=1).caption(images) == Captioner(engine_bundle, threads=1).caption(images)

    weights = beside / f"{manifest.onnx_files['decoder_merged']}.data"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(BundleError, match=rf"{re.escape(weights.name)}: sha256 does not match"):
        Captioner(beside, threads=1)


def test_ctrl_c_while_loading_does_not_wait_for_the_hashes(engine_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graphs are hashed beside the session load (seconds for a large bundle); Ctrl-C there ends the load
    at once, and a hash mismatch found meanwhile is what a failed load reports."""
    import threading

    from engine.bundle import Bundle

    release = threading.Event()

    def slow_hashes(self: Bundle) -> None:
        release.wait(60)

    def interrupted(self: Captioner, settings: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Bundle, "verify_graph_hashes", slow_hashes)
    monkeypatch.setattr(Captioner, "_load_graphs", interrupted)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            Captioner(engine_bundle)
        assert time.monotonic() - started < 30  # not the 60 s the hashing still has to go
    finally:
        release.set()

    def mismatch(self: Bundle) -> None:
        raise BundleError(f"{self.path}/decoder.onnx: sha256 does not match edlight.json")

    def refused(self: Captioner, settings: object) -> None:
        raise RuntimeError("ONNX Runtime: cannot load")

    monkeypatch.setattr(Bundle, "verify_graph_hashes", mismatch)
    monkeypatch.setattr(Captioner, "_load_graphs", refused)
    with pytest.raises(BundleError, match="sha256 does not match") as caught:
        Captioner(engine_bundle)
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format_version": "1"}, "format_version must be an integer"),
        ({"format_version": 0}, "format_version must be 1 or more, got 0"),
        ({"files": ["config.json"]}, "files must be an object"),
        ({"max_patches": True}, "max_patches must be an integer"),
        ({"onnx_files": {"encoder": 3}}, "onnx_files must map file names to strings"),
        ({"max_patches": 64}, "max_patches 64 differs from preprocessor_config.json's"),
        ({"decoder_batching": "rows"}, "unknown decoder_batching 'rows'"),
        ({"decoder_batching": 8}, "decoder_batching must be a string or null"),
        ({"int8_weight_bits": "7"}, "int8_weight_bits must be an integer or null"),
        ({"quantization": "int4"}, "unknown quantization 'int4' \\(expected int8, or null for fp32\\)"),
        # A graph of another folder: the bundle would caption, but not as a self-contained copy.
        ({"onnx_files": {"encoder": "/elsewhere/encoder_model.onnx", "decoder_merged": "d.onnx"}}, "'/elsewhere/encoder_model.onnx' is not a file name inside the bundle"),
        ({"files": {"../other/config.json": "0" * 64}}, "'../other/config.json' is not a file name inside the bundle"),
    ],
)
def test_a_hand_edited_manifest_is_a_named_error(engine_bundle: Path, tmp_path: Path, edit: dict, message: str) -> None:
    from engine.bundle import MANIFEST_NAME, Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, **edit}))
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME}: {message}"):
        Bundle.load(bundle, verify_hashes=False)


def test_a_manifest_saved_with_a_byte_order_mark_loads(engine_bundle: Path, tmp_path: Path) -> None:
    """Notepad adds one to a UTF-8 file it saves; the manifest is not hashed, so the bundle is intact."""
    from engine.bundle import MANIFEST_NAME, Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    (bundle / MANIFEST_NAME).write_bytes(b"\xef\xbb\xbf" + (bundle / MANIFEST_NAME).read_bytes())
    assert Bundle.load(bundle).manifest == Bundle.load(engine_bundle).manifest


def test_the_start_token_is_the_generation_configs_bos_when_it_states_no_decoder_start(tmp_path: Path) -> None:
    """transformers' generate starts from generation_config's bos_token_id when decoder_start_token_id is unset
    there; the engine took config.json's decoder start (another first token, so other captions)."""
    from engine.bundle import ModelSettings

    config = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    settings = ModelSettings(path=tmp_path, config=config, generation_config={"bos_token_id": 3, "eos_token_id": 1})
    assert settings.decoder_start_token_id == 3
    stated = ModelSettings(path=tmp_path, config=config, generation_config={"decoder_start_token_id": 2, "bos_token_id": 3})
    assert stated.decoder_start_token_id == 2
    assert ModelSettings(path=tmp_path, config=config, generation_config={}).decoder_start_token_id == 0
    bad = ModelSettings(path=tmp_path, config=config, generation_config={"bos_token_id": "x"})
    with pytest.raises(BundleError, match=r"generation_config.json: bos_token_id must be an integer >= 0, got 'x'"):
        bad.decoder_start_token_id  # noqa: B018


@pytest.mark.parametrize(
    ("file", "path", "value", "message"),
    [
        ("generation_config.json", ["eos_token_id"], "x", "eos_token_id must be an integer >= 0, got 'x'"),
        ("generation_config.json", ["eos_token_id"], [], "eos_token_id is an empty list"),
        ("generation_config.json", ["max_new_tokens"], 0, "max_new_tokens must be an integer >= 1, got 0"),
        ("generation_config.json", ["decoder_start_token_id"], 1.5, "decoder_start_token_id must be an integer"),
        ("generation_config.json", ["length_penalty"], "x", "length_penalty must be a number, got 'x'"),
        ("generation_config.json", ["early_stopping"], "yes", "early_stopping must be true, false or \"never\", got 'yes'"),
        ("generation_config.json", ["min_new_tokens"], -1, "min_new_tokens must be an integer >= 0, got -1"),
        ("generation_config.json", ["repetition_penalty"], 0, "repetition_penalty must be a number > 0, got 0"),
        ("generation_config.json", ["no_repeat_ngram_size"], 1.5, "no_repeat_ngram_size must be an integer >= 0, got 1.5"),
        ("generation_config.json", ["suppress_tokens"], 7, "suppress_tokens must be a list of token ids, got 7"),
        ("generation_config.json", ["bad_words_ids"], [[3], [-1]], "each token id in bad_words_ids must be an integer >= 0, got -1"),
        ("generation_config.json", ["bad_words_ids"], [[]], "bad_words_ids holds an empty list"),
        ("generation_config.json", ["sequence_bias"], {"(5, 6)": 2.0}, "sequence_bias must be a non-empty list, got {'(5, 6)': 2.0}"),
        ("generation_config.json", ["sequence_bias"], [[[5], "x"]], "sequence_bias must be a list of [[token ids], bias] pairs"),
        ("generation_config.json", ["sequence_bias"], [[[5], 2]], "sequence_bias must be a list of [[token ids], bias] pairs with float biases, got [[5], 2]"),
        ("generation_config.json", ["sequence_bias"], [[[0, 5], 2.0]], "each token id in sequence_bias must be an integer >= 1, got 0"),
        ("generation_config.json", ["forced_eos_token_id"], [], "forced_eos_token_id is an empty list"),
        ("generation_config.json", ["forced_eos_token_id"], [1, "2"], "each token id in forced_eos_token_id must be an integer"),
        ("generation_config.json", ["begin_suppress_tokens"], [10**9], "names tokens the model does not have (vocabulary of"),
        ("config.json", ["vision_config", "seq_len"], "big", "vision_config.seq_len must be an integer >= 2"),
        ("preprocessor_config.json", ["patch_size", "height"], 0, "patch_size.height must be an integer >= 1, got 0"),
        ("preprocessor_config.json", ["patch_size"], 16, "patch_size must be an object, got 16"),
    ],
)
def test_a_bad_model_setting_in_a_bundle_is_a_named_error_before_any_image(
    engine_bundle: Path, tmp_path: Path, file: str, path: list[str], value: object, message: str
) -> None:
    # As an exporter with a bug would leave it: the hashes in the manifest match the bad file.
    from engine.bundle import MANIFEST_NAME, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    config = json.loads((bundle / file).read_text())
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (bundle / file).write_text(json.dumps(config))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"][file] = sha256_file(bundle / file)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(f"{bundle / file}: {message}")):
        Captioner(bundle)


def test_a_max_length_with_room_for_no_token_is_a_named_error(engine_bundle: Path, tmp_path: Path) -> None:
    """max_length counts the start token: 1 left 0 new tokens, taken as the bundle's length (every caption empty),
    and `parity` then passed that 0 on, to be refused as its own setting."""
    from engine.bundle import MANIFEST_NAME, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    file = bundle / "generation_config.json"
    config = json.loads(file.read_text())
    config.pop("max_new_tokens", None)
    config["max_length"] = 1
    file.write_text(json.dumps(config))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"]["generation_config.json"] = sha256_file(file)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(f"{file}: max_length must be an integer >= 2, got 1")):
        Captioner(bundle)


def test_cli_prints_the_parity_recorded_in_the_manifest(engine_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    manifest = json.loads((bundle / "edlight.json").read_text())
    manifest["parity"] = {"passed": True, "split": "test", "images": 20, "bleu_torch": 41.25, "bleu_engine": 40.5,
                          "bleu_diff": -0.75, "identical_share": 0.9, "failures": []}
    (bundle / "edlight.json").write_text(json.dumps(manifest))  # the manifest is not among the hashed files
    make_folder(tmp_path / "in", 1)
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(bundle), "--out",
                                                  str(tmp_path / "o.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "parity vs PyTorch: passed=True, split=test, images=20, bleu_torch=41.25, bleu_engine=40.5" in result.output


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", "fpu sse2 avx avx2 fma", True),  # AVX2 without VNNI: VPMADDUBSW's int16 pair sums
        ("x86_64", "avx2 avx512f avx512bw", True),  # AVX-512 without VNNI: the same instruction
        ("x86_64", "avx2 avx512f avx512_vnni", False),
        ("AMD64", "avx2 avx_vnni", False),
        ("x86_64", "sse2 sse4_1", False),  # no AVX2: kernels that widen to int16 first
        ("aarch64", "fp asimd asimddp", False),
    ],
)
def test_which_cpus_saturate_int8_products(monkeypatch: pytest.MonkeyPatch, machine: str, flags: str, saturates: bool) -> None:
    from engine import session

    monkeypatch.setattr(session.platform, "machine", lambda: machine)
    monkeypatch.setattr(session, "cpu_flags", lambda: frozenset(flags.split()))
    assert session.int8_products_saturate() is saturates


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    from engine.session import cpu_flags

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    listed = [line.split(":", 1)[1].split() for line in lines if line.split(":")[0].strip() == "flags"]
    assert cpu_flags() == frozenset(listed[0] if listed else ())
    if platform.machine() == "x86_64" and listed:
        assert "sse2" in cpu_flags()  # every x86-64 CPU has it


@pytest.mark.parametrize(("weight_bits", "saturates", "warned"), [(None, True, True), (8, True, True), (7, True, False), (None, False, False)])
def test_an_int8_bundle_with_8_bit_weights_is_warned_about_on_a_cpu_that_saturates(
    engine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight_bits: int | None, saturates: bool, warned: bool
) -> None:
    import engine.captioner

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    manifest = json.loads((bundle / "edlight.json").read_text())
    assert manifest["quantization"] == "int8"
    manifest.pop("int8_weight_bits", None)  # as bundles written before 7-bit weights
    if weight_bits is not None:
        manifest["int8_weight_bits"] = weight_bits
    (bundle / "edlight.json").write_text(json.dumps(manifest))  # the manifest is not among the hashed files
    monkeypatch.setattr(engine.captioner, "int8_products_saturate", lambda: saturates)
    make_folder(tmp_path / "in", 1)
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(bundle), "--out",
                                                  str(tmp_path / "o.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    expected = f"warning: {bundle}: this int8 bundle has 8-bit weights, which this CPU (AVX2 without VNNI)"
    assert (expected in result.output) is warned, result.output
    assert "UserWarning" not in result.output
    with warnings.catch_warnings(record=True) as caught:  # the API says it too
        warnings.simplefilter("always")
        Captioner(bundle)
    assert any("8-bit weights" in str(w.message) for w in caught) is warned


def test_a_batch_beyond_the_memory_left_is_warned_about_before_the_weights_load(
    engine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past a cgroup's memory limit the kernel kills the run (exit 137) and nothing says why.
    import engine.captioner
    from engine.bundle import Bundle

    bundle = Bundle.load(engine_bundle)
    config = json.loads((engine_bundle / "config.json").read_text())
    text, hidden = config["text_config"], config["vision_config"]["hidden_size"]
    per_image = 4 * bundle.max_patches * (2 * text["num_layers"] * text["num_heads"] * text["d_kv"] + hidden)
    assert bundle.cached_bytes_per_image() == per_image
    fixed = bundle.weights_bytes() + engine.captioner.RUNTIME_BYTES
    staged = per_image if bundle.manifest.batching == "steps" else 0  # see test_memory_shortfall_advice
    available = fixed + staged + 3 * per_image + per_image // 2  # room for 3 images
    monkeypatch.setattr(engine.captioner, "memory_available", lambda: available)
    monkeypatch.setattr(engine.captioner, "cgroup_memory_limit", lambda: 2 * available)
    make_folder(tmp_path / "in", 4)
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(out),
                                                  "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output  # a warning: the run goes on
    assert f"warning: {engine_bundle}: a batch of 4 images needs at least " in result.output, result.output
    assert "(its cgroup's memory limit is " in result.output and "lower the batch size (at most 3 can fit)" in result.output
    # Said as the Captioner is built (before the weights load, which a kill may cut short), not after it.
    assert result.output.index("a batch of 4 images") < result.output.index("model: "), result.output
    assert len(records(out)) == 4
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(engine_bundle), "--out",
                                                  str(tmp_path / "b3.jsonl"), "--batch-size", "3", "--quiet"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    # Files named one by one make batches no larger than their count: 2 images fit at the default batch size.
    files = sorted(str(path) for path in (tmp_path / "in").iterdir())[:2]
    result = CliRunner().invoke(caption_command, [*files, "--model", str(engine_bundle), "--out", str(tmp_path / "two.jsonl"), "--quiet"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert len(records(tmp_path / "two.jsonl")) == 2
    with warnings.catch_warnings(record=True) as caught:  # the API says it too
        warnings.simplefilter("always")
        Captioner(engine_bundle, batch_size=4)
    assert any("at most 3 can fit" in str(w.message) for w in caught)


def test_memory_shortfall_advice(engine_bundle: Path) -> None:
    from engine.bundle import Bundle
    from engine.captioner import RUNTIME_BYTES, memory_shortfall

    bundle = Bundle.load(engine_bundle)
    per_image, fixed = bundle.cached_bytes_per_image(), bundle.weights_bytes() + RUNTIME_BYTES
    assert per_image is not None
    staged = per_image if bundle.manifest.batching == "steps" else 0  # see below
    assert memory_shortfall(bundle, 4, 1, fixed + staged + 4 * per_image) is None  # fits exactly
    assert memory_shortfall(bundle, 4, 1, None) is None  # nothing known: nothing said
    one_image = memory_shortfall(bundle, 1, 2, fixed + per_image)  # one image fits, not with 2 beams
    with_beams = bundle.cached_bytes_per_image(2)
    assert with_beams is not None and per_image < with_beams < 2 * per_image  # the encoder states are not per beam
    assert one_image is not None and "a batch of 1 image with 2 beams needs at least" in one_image
    assert one_image.endswith("use fewer beams")
    none = memory_shortfall(bundle, 1, 1, fixed // 2)
    int8 = ", or use an int8 bundle (edlight export --quantize int8)"
    assert none is not None and none.endswith(": give it more memory" + ("" if bundle.manifest.quantization else int8))
    assert "cgroup" not in none
    # A first decoder step run image by image (int8's "steps") holds one image's output while it is copied into
    # the batch: one image more at any batch above 1. Measured at base size, int8: 1.42 GiB at batch 2 (the
    # floor was 0.82), killed under a 1.37 GiB limit with no word.
    steps = dataclasses.replace(bundle, manifest=dataclasses.replace(bundle.manifest, decoder_batching="steps"))
    assert memory_shortfall(steps, 1, 1, fixed + per_image) is None  # one image alone copies nothing
    two = memory_shortfall(steps, 2, 1, fixed + 2 * per_image)
    assert two is not None and "a batch of 2 images needs at least" in two and two.endswith("(at most 1 can fit)")
    assert memory_shortfall(steps, 2, 1, fixed + 3 * per_image) is None
    assert (memory_shortfall(steps, 4, 1, fixed + 4 * per_image) or "").endswith("(at most 3 can fit)")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("photo.jpg", None),  # an image (written below): it has newlines in its bytes, and a tail after them
        ("other.csv", b"file_name,text\na.jpg,hello\nb.jpg,world"),  # someone else's CSV without a final newline
        ("notes.jsonl", b'{"file_name": "a.jpg", "text": "hello"}\n{"file_name": "b.jpg"'),
        ("one_line.jsonl", b"just some text, no newline at all"),
    ],
)
def test_an_output_that_is_not_a_caption_file_is_left_untouched(
    captioner: Captioner, tmp_path: Path, name: str, content: bytes | None
) -> None:
    make_folder(tmp_path / "in", 2)
    target = tmp_path / name
    if content is None:
        photo(7, 320, 240).save(target, quality=90)
    else:
        target.write_bytes(content)
    before = target.read_bytes()
    with pytest.raises(OutputError, match=re.escape(name) + r":\d+: not a caption record"):
        captioner.caption_folder(tmp_path / "in", out=target, fmt="csv" if name.endswith(".csv") else "jsonl", progress=False)
    assert target.read_bytes() == before


def test_an_output_that_is_one_of_the_inputs_is_refused(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    image = tmp_path / "in" / "img_001.png"
    before = image.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="img_001.png: the output file is one of the input images"):
            captioner.caption_folder([tmp_path / "in" / "nested", image], out=image, overwrite=overwrite, progress=False)
        # Found by walking a folder: said as such (it read "not a caption record ('utf-8' codec can't decode...").
        with pytest.raises(OutputError, match="img_001.png: the output file is one of the images in an input folder"):
            captioner.caption_folder(tmp_path / "in", out=image, overwrite=overwrite, progress=False)
    assert image.read_bytes() == before


def test_an_output_inside_an_input_folder_is_not_an_input(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "in" / "captions.jsonl.png"  # named like an image, written inside the folder captioned
    first = captioner.caption_folder(tmp_path / "in", out=out, fmt="jsonl", progress=False)
    again = captioner.caption_folder(tmp_path / "in", out=out, fmt="jsonl", progress=False)
    assert (first.total, first.captioned, again.total, again.skipped) == (2, 2, 2, 2)


def test_a_failed_image_is_retried_by_the_next_run(captioner: Captioner, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 3)
    (tmp_path / "in" / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n not yet")  # e.g. still being copied
    out = tmp_path / "o.csv"
    first = captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    assert (first.captioned, first.failed) == (3, 1)
    photo(9).save(tmp_path / "in" / "late.png")
    again = captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    assert (again.skipped, again.retried, again.captioned, again.failed) == (3, 1, 1, 0)
    import csv

    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["file"] for r in rows] == [n for n in names if n != "late.png"] + ["late.png"]  # one record each
    assert all(r["caption"] and not r["error"] for r in rows)


def test_macos_metadata_files_are_not_walked_as_images(tmp_path: Path) -> None:
    # Copied from a Mac to a USB stick or share, every photo gets a "._" twin that is AppleDouble metadata.
    photo(1).save(tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (tmp_path / "__MACOSX").mkdir()  # as unzipping a Mac's archive leaves it
    photo(2).save(tmp_path / "__MACOSX" / "b.png")
    assert [f.file for f in collect_inputs([tmp_path])] == ["a.png"]
    assert [f.file for f in collect_inputs([tmp_path / "._a.png"])] == ["._a.png"]  # given explicitly: an error record


def test_folders_are_followed_through_symlinks_once_and_files_counted_once(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    make_folder(root / "real", 2)
    (root / "alias").symlink_to(root / "real")  # the same folder twice: its images are captioned once
    (root / "real" / "loop").symlink_to(root)  # a loop back to the top
    (tmp_path / "elsewhere").mkdir()
    photo(5).save(tmp_path / "elsewhere" / "linked.jpe")
    (root / "more").symlink_to(tmp_path / "elsewhere")
    duplicates: list[str] = []
    files = [f.file for f in collect_inputs([root, root, root / "real" / "img_001.png"], duplicates=duplicates)]
    # A file reached by several paths keeps the one without symlinks, wherever it comes in the walk.
    assert files == ["more/linked.jpe", "real/img_001.png", "real/nested/img_000.png"]
    assert len(duplicates) == 11 - 3  # each root gives 5 paths (2 through alias/), plus the explicit file
    # Real paths come from each folder's, resolved once: the same as os.path.realpath on every file, also for
    # a file that is itself a symlink and for a relative input.
    (root / "real" / "also.png").symlink_to(root / "real" / "img_001.png")
    monkeypatch.chdir(tmp_path)
    for given in (root, Path("in"), Path("in/alias")):
        found = collect_inputs([given])
        assert found and all(f.real == os.path.realpath(f.path) for f in found), given
    (root / "real" / "also.png").unlink()
    summary = captioner.caption_folder([root, root], out=tmp_path / "o.jsonl", progress=False)
    assert (summary.total, summary.captioned, len(summary.duplicates)) == (3, 3, 10 - 3)
    assert "path(s) to files already captioned under another name" in summary.line()


def test_a_folder_that_cannot_be_listed_is_skipped_and_reported(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine_bundle: Path
) -> None:
    root = tmp_path / "in"
    make_folder(root / "open", 2)
    (root / "locked").mkdir()
    photo(1).save(root / "locked" / "hidden.png")
    real_scandir = os.scandir

    def scandir(path: os.PathLike[str] | str) -> object:  # what a folder without read permission does (not as root)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = captioner.caption_folder(root, out=tmp_path / "o.jsonl", progress=False)
    assert (summary.captioned, summary.unreadable) == (2, [f"{root / 'locked'}: cannot list folder: Permission denied"])
    assert summary.any_failed and "1 folder(s) could not be listed" in summary.line()
    result = CliRunner().invoke(caption_command, [str(root), "--model", str(engine_bundle), "--out", str(tmp_path / "c.jsonl"),
                                                  "--quiet", "--strict"])
    assert result.exit_code == 1 and "warning: " + str(root / "locked") + ": cannot list folder" in result.output
    with pytest.raises(OutputError, match="locked: cannot list folder"):  # an input folder itself: the job cannot run
        captioner.caption_folder(root / "locked", out=tmp_path / "x.jsonl", progress=False)


def test_csv_keeps_line_breaks_in_names_apart_from_spaces(captioner: Captioner, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    photo(1).save(folder / "a b.png")
    photo(2).save(folder / "a\nb.png")
    out = tmp_path / "o.csv"
    first = captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    again = captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    assert (first.captioned, again.skipped, again.captioned) == (2, 2, 0)
    assert set(read_done(out, "csv")) == {"a b.png", "a\\nb.png"}


def test_csv_names_never_meet_in_one_escape(captioner: Captioner, tmp_path: Path) -> None:
    """A name written with a backslash and an n, and one with a line break; a literal \\xff and the byte."""
    folder = tmp_path / "in"
    folder.mkdir()
    photo(1).save(folder / "a\\nb.png")
    photo(2).save(folder / "a\nb.png")
    photo(3).save(folder / "\\xff.png")
    photo(4).save(os.fsdecode(bytes(folder) + b"/\xff.png"))
    out = tmp_path / "o.csv"
    first = captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    again = captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    assert (first.captioned, again.skipped, again.captioned) == (4, 4, 0)
    assert len(set(read_done(out, "csv"))) == 4


def test_an_older_csv_spelling_of_a_name_is_resumed_unless_it_is_another_names(captioner: Captioner, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    photo(1).save(folder / "a\nb.png")  # a line break: written a\nb.png
    out = tmp_path / "o.csv"
    captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    photo(2).save(folder / "a\\nb.png")  # backslash, n: written a\\nb.png, and a\nb.png before names doubled them
    later = captioner.caption_folder(folder, out=out, fmt="csv", progress=False)
    assert (later.skipped, later.captioned) == (1, 1)  # not taken for the other file's record
    # Nor for the record of a file gone since: a name spelt as this version writes it is that name's.
    gone = tmp_path / "gone"
    gone.mkdir()
    photo(4).save(gone / "c\nd.png")
    gone_out = tmp_path / "gone.csv"
    captioner.caption_folder(gone, out=gone_out, fmt="csv", progress=False)
    (gone / "c\nd.png").rename(gone / "c\\nd.png")  # the same bytes under the backslash-n name
    assert captioner.caption_folder(gone, out=gone_out, fmt="csv", progress=False).captioned == 1
    # A CSV written before backslashes were doubled resumes its names that have one.
    other = tmp_path / "other"
    other.mkdir()
    photo(3).save(other / "x\\y.png")
    old = tmp_path / "old.csv"
    captioner.caption_folder(other, out=old, fmt="csv", progress=False)
    old.write_text(old.read_text(encoding="utf-8").replace("x\\\\y.png", "x\\y.png"), encoding="utf-8")
    assert set(read_done(old, "csv")) == {"x\\y.png"}
    again = captioner.caption_folder(other, out=old, fmt="csv", progress=False)
    assert (again.skipped, again.captioned) == (1, 0)


@pytest.mark.parametrize(
    "line",
    [
        '{"file": "a.png", "caption": "x", "error": null, "model": null, "bytes": 1e400}',  # a float overflowing int
        '{"file": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nested beyond the JSON parser's recursion
    ],
)
def test_a_damaged_record_is_named_not_a_traceback(captioner: Captioner, tmp_path: Path, line: str) -> None:
    make_folder(tmp_path / "in", 1)
    out = tmp_path / "o.jsonl"
    out.write_text('{"file": "b.png", "caption": "y", "error": null}\n' + line + "\n")
    with pytest.raises(OutputError, match=r"o.jsonl:2: not a caption record"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)


def test_a_csv_field_beyond_the_csv_modules_limit_is_named(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 1)
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error,model,bytes\n" + "a.png," + "x" * 200_000 + ",,m,1\n")
    with pytest.raises(OutputError, match=r"o.csv:2: not a caption record \(field larger than field limit"):
        captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)


def test_a_folder_deeper_than_pythons_recursion_limit_is_walked(captioner: Captioner, tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    relative = "/".join(["d"] * (sys.getrecursionlimit() + 100))
    folder = deep
    for name in ["d"] * (sys.getrecursionlimit() + 100):  # os.makedirs itself recurses
        folder = folder / name
        folder.mkdir(parents=folder.parent == deep)
    photo(1).save(deep / relative / "x.png")
    photo(2).save(deep / "top.png")
    try:
        assert [f.file for f in collect_inputs([deep])] == [f"{relative}/x.png", "top.png"]
    finally:  # pytest's own clean-up (shutil.rmtree) recurses as deep: take the tree down from the bottom
        (folder / "x.png").unlink()
        while folder != deep:
            folder.rmdir()
            folder = folder.parent


def test_an_empty_or_unreachable_input_is_a_named_error(engine_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--model", str(engine_bundle), "--out", str(tmp_path / "o.jsonl"), "--quiet"]
    empty = runner.invoke(caption_command, ["", *base])
    assert empty.exit_code == 2 and "an empty path (an unset variable?)" in empty.output
    with pytest.raises(FileNotFoundError, match="an empty path was given as an input"):
        Captioner(engine_bundle, threads=1).caption_folder([""], out=tmp_path / "o.jsonl", progress=False)
    too_long = "x" * 300 + ".png"  # longer than a file name may be: looking at it fails, not just "missing"
    long_input = runner.invoke(caption_command, [str(tmp_path / too_long), *base])
    assert long_input.exit_code == 2 and "cannot access this input: File name too long" in long_input.output
    long_out = runner.invoke(caption_command, [str(tmp_path), "--model", str(engine_bundle), "--out", str(tmp_path / too_long)])
    assert long_out.exit_code == 2 and "cannot access the output: File name too long" in long_out.output
    with pytest.raises(BundleError, match="cannot open the bundle: File name too long"):
        Captioner(tmp_path / too_long)
    assert not (tmp_path / "o.jsonl").exists()


def test_records_for_a_closed_stdout_are_refused(engine_bundle: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 1)
    command = f"{sys.executable} -m engine.cli caption {tmp_path / 'in'} --model {engine_bundle} --out - --quiet >&-"
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "standard output is closed" in result.stderr, result.stderr


def test_ctrl_c_while_the_model_loads_exits_130(engine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import captioner as captioner_module
    from engine.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # what Ctrl-C raises in the middle of loading the ONNX sessions

    monkeypatch.setattr(captioner_module.Captioner, "__init__", interrupted)
    result = CliRunner().invoke(main, ["caption", str(tmp_path), "--model", str(engine_bundle)])
    assert result.exit_code == 130 and "interrupted" in result.output and "Aborted" not in result.output

    def interrupted_import(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # what onnxruntime's native start-up makes of Ctrl-C during its import
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(captioner_module.Captioner, "__init__", interrupted_import)
    result = CliRunner().invoke(main, ["caption", str(tmp_path), "--model", str(engine_bundle)])
    assert result.exit_code == 130 and "interrupted" in result.output

    def broken_install(*args: object, **kwargs: object) -> None:
        raise ImportError("libonnxruntime.so: cannot open shared object file")  # no Ctrl-C: not hidden

    monkeypatch.setattr(captioner_module.Captioner, "__init__", broken_install)
    result = CliRunner().invoke(main, ["caption", str(tmp_path), "--model", str(engine_bundle)])
    assert result.exit_code == 1 and isinstance(result.exception, ImportError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only file whatever its mode")
def test_a_read_only_output_is_left_as_it_was(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    (tmp_path / "in" / "bad.png").write_bytes(b"zz")
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    out.chmod(0o444)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="cannot write: the file is read-only"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)  # would retry bad.png: a rewrite
    with pytest.raises(OutputError, match="cannot write: the file is read-only"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False, overwrite=True)  # it was deleted
    assert out.read_bytes() == before


def test_a_lock_file_only_another_user_may_read_is_named_with_its_owner(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed under umask 077 leaves a lock nobody else may open, whether or not its run still goes on:
    the message names whose it is and what to do (it said only 'Permission denied'). Root may open any file,
    so this user is made someone else and the lock unopenable to them (checked for real as a second user)."""
    import engine.folder

    photo(1).save(tmp_path / "a.png")
    out, lock = tmp_path / "c.jsonl", tmp_path / ".c.jsonl.lock"
    lock.write_text("12345\n")
    lock.chmod(0o600)
    real_open = os.open

    def open_as_another_user(path: object, flags: int, *args: object) -> int:
        if Path(str(path)) == lock:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.folder.os, "open", open_as_another_user)
    monkeypatch.setattr(engine.folder.os, "geteuid", lambda: lock.stat().st_uid + 1)
    with pytest.raises(OutputError, match=rf"cannot open its lock file {re.escape(str(lock))}: it belongs to user (id )?\w+ and "
                                          "only they may read it; if no run of theirs is writing the output, remove the lock file"):  # fmt: skip
        captioner.caption_folder(tmp_path / "a.png", out=out, progress=False)
    assert not out.exists()


def _lock_in_another_process(out: Path) -> subprocess.Popen[str]:
    """A process holding `output_lock(out)` (as a run writing to it does) until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom engine.folder import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(
    captioner: Captioner, tmp_path: Path, engine_bundle: Path
) -> None:
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    holder = _lock_in_another_process(out)
    try:
        with pytest.raises(OutputError, match=rf"o\.jsonl: another run \(pid {holder.pid}\) is writing to it"):
            captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)  # the lock died with its holder
    assert summary.captioned == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.jsonl"]


def test_a_lock_held_in_this_process_is_told_from_another_process_with_our_pid(tmp_path: Path) -> None:
    """A second caption_folder on one output from the same program named its own pid as "another run"; the pid
    in the lock file cannot tell (two containers sharing a volume both run as pid 1), the held file can."""
    from engine.folder import output_lock

    out = tmp_path / "o.jsonl"
    with output_lock(out), pytest.raises(OutputError, match=r"o\.jsonl: another run in this process is writing to it"):
        with output_lock(out):
            pass
    holder = _lock_in_another_process(out)
    try:
        lock = next(p for p in tmp_path.iterdir() if p.name.endswith(".lock"))
        lock.write_text(f"{os.getpid()}\n")  # as another container's pid 1 would write it
        with pytest.raises(OutputError, match=rf"o\.jsonl: another run \(pid {os.getpid()}\) is writing to it"):
            with output_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_files_and_rewrites_never_write_through_a_symbolic_link(tmp_path: Path) -> None:
    """The lock file was opened through a link planted at its name, and the pid written truncated what it named
    (in a shared folder, another user's file); so could a rewrite's temporary copy."""
    from engine.folder import REWRITE_SUFFIX_BYTES, _drop_lines, _read_lines, output_lock, sibling_stem

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o.jsonl"
    (tmp_path / ".o.jsonl.lock").symlink_to(victim)
    with pytest.raises(OutputError, match=r"o\.jsonl: its lock file .*\.o\.jsonl\.lock is a symbolic link"):
        with output_lock(out):
            pass
    (tmp_path / ".o.jsonl.lock").unlink()
    os.mkfifo(tmp_path / ".o.jsonl.lock")  # opened for reading and writing, a FIFO does not block
    with pytest.raises(OutputError, match=r"cannot open its lock file .*: it is not a regular file; remove it"):
        with output_lock(out):
            pass
    # Another user's FIFO, which this user may only read: opened read-only, it blocked until a writer came.
    script = (
        "import os, sys; from pathlib import Path; from engine.folder import output_lock\n"
        "real = os.open\n"
        "def open_as_another_user(path, flags, *rest):\n"
        "    if str(path).endswith('.lock') and flags & os.O_RDWR: raise PermissionError(13, 'Permission denied')\n"
        "    return real(path, flags, *rest)\n"
        "os.open = open_as_another_user\n"
        "try:\n    with output_lock(Path(sys.argv[1])): pass\nexcept Exception as exc: print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert "it is not a regular file; remove it" in result.stdout, result.stderr

    out.write_text('{"file": "a.png", "caption": null, "error": "x"}\n{"file": "b.png", "caption": "b", "error": null}\n')
    temporary = out.with_name(f"{sibling_stem(out.name, REWRITE_SUFFIX_BYTES)}.{os.getpid()}.tmp")
    temporary.symlink_to(victim)
    _drop_lines(out, _read_lines(out, "jsonl"), {"a.png"})
    assert victim.read_text() == "precious" and [r["file"] for r in records(out)] == ["b.png"]


def test_a_run_through_a_hard_link_to_an_output_in_use_is_refused(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    out, link = tmp_path / "o.jsonl", tmp_path / "same.jsonl"
    out.touch()
    os.link(out, link)  # one file, two names, two lock files
    holder = _lock_in_another_process(out)
    try:
        with pytest.raises(OutputError, match=r"same\.jsonl: another run is writing to it"):
            captioner.caption_folder(tmp_path / "in", out=link, progress=False)
        assert out.read_bytes() == b"" and not (tmp_path / ".same.jsonl.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    assert captioner.caption_folder(tmp_path / "in", out=link, progress=False).captioned == 2


def test_cli_warns_when_no_image_is_found(engine_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(engine_bundle), "--out",
                                                  str(tmp_path / "o.jsonl"), "--quiet"])
    assert result.exit_code == 0 and "warning: no image files found (looked for .apng" in result.output
    # Under --strict nothing captioned is a failure: an unmounted share or a mistyped folder looks like this.
    strict = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(engine_bundle), "--out",
                                                  str(tmp_path / "o.jsonl"), "--quiet", "--strict"])
    assert strict.exit_code == 1 and "warning: no image files found" in strict.output


def test_a_reader_that_stops_reading_ends_the_run_quietly(engine_bundle: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 150)  # more than it can caption before the test closes the pipe
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--out", "/dev/stdout", "--batch-size", "1", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert json.loads(process.stdout.readline())["file"]  # like `| head -1`: one record, then the pipe closes
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and "error" not in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize(
    ("lengths", "max_new", "min_new"),
    [
        ({"max_new_tokens": 7}, 7, 0),
        ({"max_length": 9}, 8, 0),  # max_length counts the decoder's start token
        ({"max_length": 20}, 20, 0),  # generate takes its own default as unset and adds the start token
        ({}, 20, 0),  # nothing set: generate's default
        ({"max_new_tokens": 7, "max_length": 30}, 7, 0),
        ({"max_new_tokens": 7, "min_new_tokens": 3}, 7, 3),
        ({"max_new_tokens": 7, "min_length": 4}, 7, 3),
    ],
)
def test_caption_lengths_are_read_from_the_bundle_as_transformers_generate_reads_them(
    engine_bundle: Path, tmp_path: Path, lengths: dict, max_new: int, min_new: int
) -> None:
    """Measured against transformers 4.57's generate on an encoder-decoder (new tokens per caption)."""
    from engine.bundle import MANIFEST_NAME, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_bundle, bundle)
    config = json.loads((bundle / "generation_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("max_new_tokens", "max_length")}
    (bundle / "generation_config.json").write_text(json.dumps({**config, **lengths}))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"]["generation_config.json"] = sha256_file(bundle / "generation_config.json")
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    captioner = Captioner(bundle, threads=1)
    assert (captioner.generation.max_new_tokens, captioner.generation.min_new_tokens) == (max_new, min_new)
    # Records name every length a former engine read otherwise: one not given as max_new_tokens, a minimum.
    named = [f"max_new_tokens={max_new}"] * ("max_new_tokens" not in lengths) + [f"min_new_tokens={min_new}"] * bool(min_new)
    assert captioner.captions_id == " ".join([captioner.bundle.model_id, *named])
    assert Captioner(bundle, threads=1, min_new_tokens=min_new + 1).captions_id.endswith(f"min_new_tokens={min_new + 1}")


def test_records_name_the_generation_settings_former_engines_did_not_apply(engine_bundle: Path, tmp_path: Path) -> None:
    """Engines before these settings captioned such a bundle without them, under the same model id: a resume
    must not take those records for this engine's."""
    from engine.bundle import MANIFEST_NAME, sha256_file

    bundle = Path(shutil.copytree(engine_bundle, tmp_path / "bundle"))
    config = json.loads((bundle / "generation_config.json").read_text())
    settings = {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "early_stopping": "never", "length_penalty": 2.0,
                "suppress_tokens": [5], "forced_eos_token_id": 1, "begin_suppress_tokens": []}  # an empty list: none
    (bundle / "generation_config.json").write_text(json.dumps({**config, **settings}))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"]["generation_config.json"] = sha256_file(bundle / "generation_config.json")
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    greedy, beams = Captioner(bundle, threads=1), Captioner(bundle, threads=1, num_beams=2)
    named = "repetition_penalty=1.5 no_repeat_ngram_size=2"
    assert greedy.captions_id == f"{greedy.bundle.model_id} {named} forced_eos_token_id suppress_tokens"
    assert beams.captions_id == f"{greedy.bundle.model_id} num_beams=2 {named} early_stopping=never forced_eos_token_id suppress_tokens"
    out = tmp_path / "captions.jsonl"  # as a former engine wrote them: the model id alone
    out.write_text(json.dumps({"file": "a.png", "caption": "x", "error": None, "model": greedy.bundle.model_id}) + "\n")
    photo(1).save(tmp_path / "a.png")
    with pytest.raises(OutputError, match="holds captions of another model or decoding settings"):
        greedy.caption_folder(tmp_path / "a.png", out=out, progress=False)


def test_a_resume_with_another_model_is_refused(captioner: Captioner, engine_bundle: Path, tmp_path: Path) -> None:
    from engine.bundle import MANIFEST_NAME, sha256_file

    names = make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert {r["model"] for r in records(out)} == {captioner.bundle.model_id}
    other = tmp_path / "other"  # the same model with another generation config: another bundle
    shutil.copytree(engine_bundle, other)
    config = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 5}))
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["files"]["generation_config.json"] = sha256_file(other / "generation_config.json")
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    second = Captioner(other, threads=1)
    assert second.bundle.model_id != captioner.bundle.model_id
    (tmp_path / "in" / "new.png").write_bytes((tmp_path / "in" / "img_001.png").read_bytes())
    before = out.read_bytes()
    with pytest.raises(OutputError, match=rf"holds captions of another model or decoding settings \({captioner.bundle.model_id}; this run is"):
        second.caption_folder(tmp_path / "in", out=out, progress=False)
    assert out.read_bytes() == before
    replaced = second.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False)
    assert replaced.captioned == 4 and {r["model"] for r in records(out)} == {second.bundle.model_id}
    # Records written before they named their model are resumed by any model.
    out.write_text("".join(json.dumps({"file": n, "caption": "old", "error": None}) + "\n" for n in names))
    assert second.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 3


def test_a_csv_from_before_the_model_column_keeps_its_columns(captioner: Captioner, tmp_path: Path) -> None:
    import csv

    names = make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error\n" + f"{names[0]},an old caption,\n")
    summary = captioner.caption_folder(tmp_path / "in", out=out, fmt="csv", progress=False)
    assert (summary.skipped, summary.captioned) == (1, 2)
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["file", "caption", "error"] and all(len(row) == 3 for row in rows)


def test_a_csv_from_before_the_size_column_keeps_its_columns(captioner: Captioner, tmp_path: Path) -> None:
    import csv

    names = make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error,model\n" + f"{names[0]},an old caption,,{captioner.bundle.model_id}\n")
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.skipped, summary.captioned) == (1, 1)
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["file", "caption", "error", "model"] and all(len(row) == 4 for row in rows)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_records_carry_the_file_size_and_another_file_of_the_same_name_is_refused(
    captioner: Captioner, tmp_path: Path, fmt: str
) -> None:
    first, second = tmp_path / "day1", tmp_path / "day2"
    for folder, seed in ((first, 1), (second, 2)):
        folder.mkdir()
        photo(seed).save(folder / "same.png")
        photo(seed, 80, 40).save(folder / f"only_{folder.name}.png")
    photo(3, 200, 100).save(second / "same.png")  # another image under the same name (another size)
    out = tmp_path / f"captions.{fmt}"
    captioner.caption_folder(first, out=out, progress=False)
    if fmt == "jsonl":
        assert {r["file"]: r["bytes"] for r in records(out)} == {
            name: (first / name).stat().st_size for name in ("only_day1.png", "same.png")
        }
    else:
        assert out.read_text().splitlines()[0] == "file,caption,error,model,bytes,sha256,mtime_ns"
    before = out.read_bytes()
    size = (first / "same.png").stat().st_size
    with pytest.raises(OutputError, match=rf"1 of its captions were written for other files of the same names \('same\.png': {size} bytes there"):
        captioner.caption_folder(second, out=out, progress=False)
    assert out.read_bytes() == before  # nothing skipped, nothing replaced, nothing appended
    # Asked for (replaced or re-tagged photos): captioned again, the old record replaced, nothing else touched.
    replaced = tmp_path / f"replaced.{fmt}"
    shutil.copy(out, replaced)
    summary = captioner.caption_folder(second, out=replaced, recaption_changed=True, progress=False)
    assert (summary.changed, summary.retried, summary.skipped, summary.captioned) == (1, 0, 0, 2)
    assert "1 changed since their record, captioned again" in summary.line()
    again = captioner.caption_folder(second, out=replaced, progress=False)
    assert (again.skipped, again.captioned) == (2, 0)  # one record per name, each for today's file
    # The same image again, copied elsewhere (same size), resumes; so does the first folder itself.
    shutil.copy(first / "same.png", second / "same.png")
    summary = captioner.caption_folder(second, out=out, progress=False)
    assert (summary.skipped, summary.captioned) == (1, 1)
    assert captioner.caption_folder(first, out=out, progress=False).skipped == 2
    # An error record is retried whatever its size; a record without a size (older runs) is trusted.
    if fmt == "jsonl":
        out.write_text(
            json.dumps({"file": "same.png", "caption": None, "error": "unreadable", "bytes": 1}) + "\n"
            + json.dumps({"file": "only_day2.png", "caption": "old", "error": None}) + "\n"
        )
        summary = captioner.caption_folder(second, out=out, progress=False)
        assert (summary.retried, summary.skipped, summary.captioned) == (1, 1, 1)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_records_carry_the_files_sha256_and_a_same_sized_other_file_of_the_same_name_is_refused(
    captioner: Captioner, tmp_path: Path, fmt: str
) -> None:
    """Uncompressed scans of one page size all have one size: the second day's scan0.bmp was "already done"
    and kept the first day's caption, exit 0."""
    import hashlib

    first, second = tmp_path / "dayA", tmp_path / "dayB"
    for folder, seed in ((first, 1), (second, 2)):
        folder.mkdir()
        photo(seed).save(folder / "scan0.bmp")
        photo(seed + 10).save(folder / "scan1.bmp")
    photo(1).save(second / "scan1.bmp")  # dayB's scan1 is dayA's scan0, byte for byte
    assert (first / "scan0.bmp").stat().st_size == (second / "scan0.bmp").stat().st_size
    out = tmp_path / f"captions.{fmt}"
    captioner.caption_folder(first, out=out, progress=False)
    written = records(out) if fmt == "jsonl" else records_of_csv(out)
    digest = {name: hashlib.sha256((first / name).read_bytes()).hexdigest() for name in ("scan0.bmp", "scan1.bmp")}
    assert {r["file"]: r["sha256"] for r in written} == digest
    before = out.read_bytes()
    with pytest.raises(OutputError, match=(
        rf"2 of its captions were written for other files of the same names \('scan0\.bmp': SHA-256 {digest['scan0.bmp'][:12]}"
        rf"\.\.\. there, {re.escape(str(second))}/scan0\.bmp has [0-9a-f]{{12}}\.\.\. \(the same size, \d+ bytes\)"
    )):
        captioner.caption_folder(second, out=out, progress=False)
    assert out.read_bytes() == before
    summary = captioner.caption_folder(second, out=out, recaption_changed=True, progress=False)
    assert (summary.changed, summary.skipped, summary.captioned) == (2, 0, 2)
    rewritten = records(out) if fmt == "jsonl" else records_of_csv(out)
    assert {r["file"]: r["sha256"] for r in rewritten} == {
        name: hashlib.sha256((second / name).read_bytes()).hexdigest() for name in ("scan0.bmp", "scan1.bmp")
    }
    # The same bytes under a new modification time (a copy) resume: the content decides, not the clock.
    shutil.copy(second / "scan0.bmp", tmp_path / "copy.bmp")
    os.replace(tmp_path / "copy.bmp", second / "scan0.bmp")
    assert captioner.caption_folder(second, out=out, progress=False).skipped == 2


def test_a_resume_reads_only_the_images_touched_since_their_record(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every captioned image was read again at every resume: a rerun over a large archive read all of it."""
    from engine import folder as folder_module

    names = make_folder(tmp_path / "in", 4)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert [r["mtime_ns"] for r in records(out)] == [(tmp_path / "in" / n).stat().st_mtime_ns for n in names]
    checked: list[list[Path]] = []
    real = folder_module._fingerprints
    monkeypatch.setattr(folder_module, "_fingerprints", lambda paths: checked.append(paths) or real(paths))
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 4
    assert checked == [[]]
    touched = tmp_path / "in" / names[1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes, new date
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 4
    assert checked[-1] == [touched]


def test_fingerprints_open_only_regular_files(tmp_path: Path) -> None:
    """A FIFO put where an image was would block the open; a device would be read without end."""
    import hashlib

    from engine.folder import Fingerprint, _fingerprints, file_fingerprint

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "a.png").write_bytes(b"a picture")
    assert file_fingerprint(tmp_path / "pipe.png") == Fingerprint(0)
    assert file_fingerprint(tmp_path / "missing.png") == Fingerprint()
    if Path("/dev/zero").exists():
        assert file_fingerprint(Path("/dev/zero")).sha256 is None
    whole = file_fingerprint(tmp_path / "a.png")
    assert (whole.size, whole.sha256) == (9, hashlib.sha256(b"a picture").digest())
    assert _fingerprints([tmp_path / "a.png", tmp_path / "pipe.png"] * 300) == [whole, Fingerprint(0)] * 300


def test_a_record_with_a_malformed_sha256_is_named(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 1)
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"file": "x.png", "caption": "c", "error": None, "model": None, "bytes": 3, "sha256": "abc"}) + "\n")
    with pytest.raises(OutputError, match=r"o\.jsonl:1: not a caption record \(sha256 is 'abc', not 64 hexadecimal digits\)"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    # A fraction is no byte count (int() cut 10.7 to 10); a whole float is, as a spreadsheet's copy writes it.
    out.write_text(json.dumps({"file": "x.png", "caption": "c", "error": None, "model": None, "bytes": 10.7}) + "\n")
    with pytest.raises(OutputError, match=r"o\.jsonl:1: not a caption record \(bytes is 10\.7, not a whole number\)"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)


def test_a_csv_with_the_sha256_column_but_no_time_resumes(captioner: Captioner, tmp_path: Path) -> None:
    """The columns an edlight of a few commits wrote, before records had mtime_ns."""
    import csv
    import hashlib

    names = make_folder(tmp_path / "in", 2)
    first = tmp_path / "in" / names[0]
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error,model,bytes,sha256\n"
                   f"{names[0]},c,,{captioner.captions_id},{first.stat().st_size},{hashlib.sha256(first.read_bytes()).hexdigest()}\n")
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.skipped, summary.captioned) == (1, 1)
    assert all(len(row) == 6 for row in csv.reader(out.open(encoding="utf-8")))


def test_iter_captions_advances_its_items_in_the_callers_thread(captioner: Captioner) -> None:
    """A database cursor or a thread-local connection feeding items works only in the thread that made it."""
    import threading

    caller, seen = threading.current_thread(), []

    def items() -> Iterator[tuple[int, Image.Image, str]]:
        for i in range(5):
            seen.append(threading.current_thread())
            yield i, photo(i), f"photo {i}"

    assert [key for key, _, _ in captioner.iter_captions(items())] == list(range(5))
    assert seen == [caller] * 5


def test_a_csv_from_before_the_sha256_column_keeps_its_columns_and_is_trusted_by_size(
    captioner: Captioner, tmp_path: Path
) -> None:
    import csv

    names = make_folder(tmp_path / "in", 2)
    size = (tmp_path / "in" / names[0]).stat().st_size
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error,model,bytes\n" + f"{names[0]},an old caption,,{captioner.captions_id},{size}\n")
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.skipped, summary.captioned) == (1, 1)
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == ["file", "caption", "error", "model", "bytes"] and all(len(row) == 5 for row in rows)


def test_adding_an_input_that_renames_the_records_is_refused(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, more = tmp_path / "photos", tmp_path / "more"
    make_folder(photos, 2)
    more.mkdir()
    photo(9, 200, 100).save(more / "img_001.png")  # the same relative name in another folder, another photo
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(photos, out=out, progress=False)
    before = out.read_bytes()
    # Two records; "img_001.png" is the other name of both folders' img_001.png, and its size says whose it is.
    with pytest.raises(OutputError, match=r"holds records of 2 of these images under other names: 'img_001\.png' \(now '[^']*photos/img_001\.png'\), 'nested") as refused:
        captioner.caption_folder([photos, more], out=out, progress=False)
    assert "more" not in str(refused.value).split("under other names")[1].split(". Names")[0]
    assert out.read_bytes() == before
    # The other way round: records written with folder prefixes, resumed with one folder.
    both = tmp_path / "both.jsonl"
    assert captioner.caption_folder([photos, more], out=both, progress=False).captioned == 3
    with pytest.raises(OutputError, match=r"under other names: '.*photos/nested/img_000\.png' \(now 'nested/img_000\.png'\)"):
        captioner.caption_folder(photos, out=both, progress=False)
    assert captioner.caption_folder([photos, more], out=both, progress=False).skipped == 3
    # A name under the other rule that is another file's name in this run is no renaming: folder a/ holding
    # a/x.png ("a/x.png") and x.png ("x.png", other name "a/x.png"), resumed after a kill.
    nested = tmp_path / "nested"
    (nested / "a" / "a").mkdir(parents=True)
    photo(1).save(nested / "a" / "a" / "x.png")
    photo(2).save(nested / "a" / "x.png")
    first = nested / "o.jsonl"
    assert captioner.caption_folder(nested / "a", out=first, progress=False).captioned == 2
    first.write_text(first.read_text().splitlines(keepends=True)[0])  # only "a/x.png" was written
    monkeypatch.chdir(nested)  # the input given as "a", as the user would
    summary = captioner.caption_folder("a", out="o.jsonl", progress=False)
    assert (summary.skipped, summary.captioned) == (1, 1)


def test_a_run_keeps_its_working_folder_when_the_host_changes_it(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook's %cd or a service's os.chdir while caption_folder runs in another thread: relative inputs
    were opened from the new folder (every later image "no such file"), and the relative output was "deleted or
    replaced" after its first batch. Both stay where they were when the run began."""
    names = make_folder(tmp_path / "photos", 7)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    plain = captioner.iter_captions

    def moving(items):  # type: ignore[no-untyped-def]
        for done, result in enumerate(plain(items)):
            if done == 0:
                os.chdir(elsewhere)  # the next batches are read after this
            yield result

    monkeypatch.setattr(captioner, "iter_captions", moving)
    summary = captioner.caption_folder("photos", out="o.jsonl", progress=False)
    assert (summary.captioned, summary.failed) == (7, 0)
    assert [r["file"] for r in records(tmp_path / "o.jsonl")] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "o.jsonl", "photos"]  # its lock file removed
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_inputs_spelled_another_way_do_not_caption_the_images_twice(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    photos, more = tmp_path / "photos", tmp_path / "more"
    make_folder(photos, 2)
    more.mkdir()
    shutil.copy(photos / "img_001.png", more / "img_001.png")  # shared names: records are prefixed
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"o.{fmt}"
    assert captioner.caption_folder(["photos", "more/"], out=out, fmt=fmt, progress=False).captioned == 3
    before = out.read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a cron job's absolute paths, from its own working folder
    with pytest.raises(OutputError, match=r"3 of these images under another spelling of their paths: 'photos/img_001\.png' \(now '.*/photos/img_001\.png'\)"):
        captioner.caption_folder([photos, more], out=out, fmt=fmt, progress=False)
    assert out.read_bytes() == before
    # Other images of the same names in folders of other names are no respelling, nor are other images
    # (other sizes) in a folder of the same name elsewhere.
    for folder in (tmp_path / "day2" / "scans", tmp_path / "day2" / "more"):
        folder.mkdir(parents=True)
        photo(7, 90, 70).save(folder / "img_001.png")
    photo(8, 90, 70).save(tmp_path / "day2" / "more" / "img_002.png")
    summary = captioner.caption_folder([tmp_path / "day2" / "scans", tmp_path / "day2" / "more"], out=out, fmt=fmt, progress=False)
    assert summary.captioned == 3
    monkeypatch.chdir(tmp_path)
    before = out.read_bytes()
    assert captioner.caption_folder(["photos", "more"], out=out, fmt=fmt, progress=False).skipped == 3
    # Another image under an old name's spelling is no respelling: a new image beside the captioned ones.
    photo(5).save(photos / "new.png")
    summary = captioner.caption_folder(["./photos", "more"], out=out, fmt=fmt, progress=False)
    assert (summary.skipped, summary.captioned) == (3, 1)
    # One folder: names are relative to it, however it is spelled.
    single = tmp_path / f"single.{fmt}"
    assert captioner.caption_folder("more", out=single, fmt=fmt, progress=False).captioned == 1
    assert captioner.caption_folder(more, out=single, fmt=fmt, progress=False).skipped == 1


def test_overwrite_replaces_only_a_caption_file(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n\nimportant\n")
    with pytest.raises(OutputError, match=r"notes\.md:1: not a caption record .*; choose another output$"):
        captioner.caption_folder(tmp_path / "in", out=notes, progress=False)
    with pytest.raises(OutputError, match=r"notes\.md: not a caption file .*--overwrite replaces only caption files"):
        captioner.caption_folder(tmp_path / "in", out=notes, overwrite=True, progress=False)
    assert notes.read_text() == "# my notes\n\nimportant\n"
    damaged = tmp_path / "o.jsonl"  # a caption file damaged after its first line may be started afresh
    damaged.write_text('{"file": "a.png", "caption": "x", "error": null}\ngarbage\n')
    with pytest.raises(OutputError, match=r"o\.jsonl:2: .*start afresh with --overwrite"):
        captioner.caption_folder(tmp_path / "in", out=damaged, progress=False)
    assert captioner.caption_folder(tmp_path / "in", out=damaged, overwrite=True, progress=False).captioned == 2
    # Its first record damaged (its closing brace lost; re-spaced by a JSON tool): "choose another output" led
    # to captioning everything again elsewhere, and --overwrite refused the second.
    for first in ('{"file": "a.png", "caption": "x", "error": null', '{ "file" : "a.png", "caption": "x", "error": nul}'):
        damaged.write_text(first + '\n{"file": "b.png", "caption": "y", "error": null}\n')
        with pytest.raises(OutputError, match=r"o\.jsonl:1: not a caption record .*; fix the file, or start afresh with --overwrite$"):
            captioner.caption_folder(tmp_path / "in", out=damaged, progress=False)
        assert captioner.caption_folder(tmp_path / "in", out=damaged, overwrite=True, progress=False).captioned == 2


def test_captions_carry_no_surrounding_spaces(engine_bundle: Path) -> None:
    captioner = Captioner(engine_bundle, threads=1)

    class SpacedTokenizer:  # what a barely trained model decodes to: spaces before EOS or the length limit
        def decode_batch(self, sequences: list[list[int]]) -> list[str]:
            return [" a caption   " for _ in sequences]

    captioner.tokenizer = SpacedTokenizer()  # type: ignore[assignment]
    assert captioner.caption([photo(1), photo(2)]) == ["a caption", "a caption"]


def test_a_symlinked_output_is_the_file_it_points_to(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 3)
    (tmp_path / "shared").mkdir()
    real = tmp_path / "shared" / "captions.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    captioner.caption_folder(tmp_path / "in", out=link, progress=False)
    photo(4).save(tmp_path / "in" / "bad.png")
    again = captioner.caption_folder(tmp_path / "in", out=link, progress=False)  # the retry rewrites the file
    assert again.retried == 1 and link.is_symlink() and len(records(real)) == 4
    assert all(r["error"] is None for r in records(real))
    with output_lock(real), pytest.raises(OutputError, match="another run"):  # one lock for both names
        captioner.caption_folder(tmp_path / "in", out=link, progress=False)
    fresh = captioner.caption_folder(tmp_path / "in", out=link, overwrite=True, progress=False)
    assert fresh.captioned == 4 and link.is_symlink() and len(records(real)) == 4


def test_stdout_is_a_stream_even_when_redirected_to_a_file(engine_bundle: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    redirected = tmp_path / "redirected.jsonl"
    command = [sys.executable, "-m", "engine.cli", "caption", str(tmp_path / "in"), "--model", str(engine_bundle),
               "--quiet", "--out"]
    for out in ("-", "/dev/stdout"):
        with open(redirected, "a") as stdout:  # like `>> redirected.jsonl`: never resumed from, locked or rewritten
            result = subprocess.run([*command, out], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert len(records(redirected)) == 4 and not list(tmp_path.glob(".*.lock"))


def test_a_writable_output_in_a_folder_without_room_for_a_lock_file(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    (tmp_path / "in" / "bad.png").unlink()
    photo(8).save(tmp_path / "in" / "bad.png")
    # What a folder without write permission does (root ignores permissions, so it is played here).
    real_access, real_open = os.access, open

    def access(path: object, mode: int, **kwargs: object) -> bool:
        return False if Path(str(path)) == tmp_path and mode & os.W_OK else real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    def no_new_files(path: object, *args: object, **kwargs: object) -> object:
        if str(path).startswith(f"{tmp_path}/."):  # the rewrite's temporary file
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr("builtins.open", no_new_files)
    with output_lock(out), pytest.raises(OutputError, match="another run in this process is writing to it"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)  # the output itself is the lock
    again = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    monkeypatch.undo()
    assert (again.retried, again.captioned) == (1, 1) and not list(tmp_path.glob(".*"))
    assert read_done(out, "jsonl")["bad.png"] is False  # the retry's record follows the old error and wins


def test_a_lock_file_left_by_another_user_still_locks(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    lock = tmp_path / ".o.jsonl.lock"
    lock.write_text("")
    real_open = os.open

    def read_only_lock(path: object, flags: int, *args: object) -> int:  # a file of someone else's, mode 644
        if Path(str(path)) == lock and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only_lock)
    with output_lock(out), pytest.raises(OutputError, match="another run in this process is writing to it"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)  # both opened it read-only
    assert not lock.exists()  # the folder is ours to write: the run that held it removed it
    monkeypatch.undo()
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).captioned == 2


def test_a_rewrite_cut_short_leaves_no_temporary_file_behind(captioner: Captioner, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    stale = tmp_path / ".o.jsonl.12345.tmp"
    stale.write_text("half a rewrite")
    others = tmp_path / ".o.jsonl.bak.77.tmp"  # the rewrite of another output (o.jsonl.bak), under its own lock
    others.write_text("another run's rewrite")
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert not stale.exists() and others.exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno
    import fcntl

    make_folder(tmp_path / "in", 2)

    def no_locks(handle: int, operation: int) -> None:  # NFS without lockd says ENOLCK
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    summary = captioner.caption_folder(tmp_path / "in", out=tmp_path / "o.jsonl", progress=False)
    assert summary.captioned == 2 and "does not lock files (No locks available)" in caplog.text


def test_retried_error_records_stay_with_a_warning_where_the_output_cannot_be_rewritten(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder that takes no new file (read-only, where the output itself is writable): the rewrite without
    the error records cannot be made, so they stay and the retry's record follows, said in a warning."""
    import builtins
    import errno

    import engine.folder

    make_folder(tmp_path / "in", 2)
    (tmp_path / "in" / "late.png").write_bytes(b"still copying")
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    photo(5).save(tmp_path / "in" / "late.png")

    def no_new_files(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if ("w" in mode or "x" in mode) and Path(str(path)).parent == tmp_path:  # root may write any folder: say it cannot
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(engine.folder, "open", no_new_files, raising=False)
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.retried, summary.captioned) == (1, 1)
    late = [r for r in records(out) if r["file"] == "late.png"]
    assert [r["error"] is None for r in late] == [False, True]  # the error first, the caption after it
    assert "the 1 image(s) captioned again: they stay, and each image's later record is the one that counts" in caplog.text
    monkeypatch.undo()
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 3  # the later one counts


def test_a_csv_written_before_names_kept_their_line_breaks_resumes(captioner: Captioner, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    photo(2).save(folder / "two\nlines.png")
    out = tmp_path / "o.csv"
    out.write_text("file,caption,error\ntwo lines.png,an old caption,\n")
    summary = captioner.caption_folder(folder, out=out, progress=False)  # csv from the name
    assert (summary.skipped, summary.captioned) == (1, 0)


def test_api_details_format_from_the_name_path_likes_and_no_folder_for_a_failed_start(
    captioner: Captioner, tmp_path: Path
) -> None:
    make_folder(tmp_path / "in", 2)
    entry = next(e for e in os.scandir(tmp_path) if e.name == "in")  # os.PathLike, not a Path
    summary = captioner.caption_folder(entry, out=tmp_path / "o.csv", progress=False)
    assert summary.captioned == 2 and (tmp_path / "o.csv").read_text().startswith("file,caption,error,model,bytes,sha256,mtime_ns\n")
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        captioner.caption_folder([tmp_path / "nope"], out=tmp_path / "new" / "deep" / "x.jsonl", progress=False)
    assert not (tmp_path / "new").exists()


def test_reports_go_whole_to_files_through_symlinks_and_straight_to_streams(tmp_path: Path) -> None:
    from engine.folder import check_report_out, write_report

    def ours(line: str) -> bool:
        return line.startswith("report")

    real = tmp_path / "real.txt"
    real.write_text("report 1\n")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    check_report_out(link, "the report", ours)
    write_report(link, "report 2\n")
    assert link.is_symlink() and real.read_text() == "report 2\n" and real.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    (tmp_path / "notes.txt").write_text("my notes\n")
    with pytest.raises(OutputError, match=r"notes\.txt: exists and does not hold the report"):
        check_report_out(tmp_path / "notes.txt", "the report", ours)
    with pytest.raises(OutputError, match="a folder; give a file name for the report"):
        check_report_out(tmp_path, "the report", ours)
    with pytest.raises(OutputError, match="cannot create its folder .*a file, not a folder"):
        check_report_out(tmp_path / "notes.txt" / "r.txt", "the report")
    check_report_out(tmp_path / "new" / "r.txt", "the report", ours)  # a new file in a folder made for it
    with pytest.raises(OutputError, match=r"x{300}: cannot write the report there \(File name too long\)"):
        check_report_out(tmp_path / ("x" * 300), "the report", ours)  # was a traceback from Path.is_dir
    # A stream is never read (that would block on a pipe) nor replaced: written as it is.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    check_report_out(fifo, "the report", ours)
    write_report(fifo, "report 3\n")
    assert reader.communicate(timeout=30)[0] == b"report 3\n" and fifo.exists()


def test_folder_inputs_may_be_any_iterable(captioner: Captioner, tmp_path: Path) -> None:
    names = make_folder(tmp_path / "in", 3)
    summary = captioner.caption_folder((p for p in [tmp_path / "in"]), out=tmp_path / "o.jsonl", progress=False)
    assert summary.captioned == 3 and [r["file"] for r in records(tmp_path / "o.jsonl")] == names


def test_a_record_carries_the_size_of_the_file_read_not_the_one_listed(
    engine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = Captioner(engine_bundle, threads=1)
    make_folder(tmp_path / "in", 2)
    late = tmp_path / "in" / "img_001.png"
    listed = late.stat().st_size
    run = captioner.iter_captions

    def finished_copying_after_the_listing(items):  # noqa: ANN001, ANN202 - wraps Captioner.iter_captions
        photo(9, 200, 120).save(late)  # the file grows between listing and reading (a copy still running)
        return run(items)

    monkeypatch.setattr(captioner, "iter_captions", finished_copying_after_the_listing)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    sizes = {r["file"]: r["bytes"] for r in records(out)}
    assert sizes["img_001.png"] == late.stat().st_size != listed
    assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 2  # no false refusal


def test_hard_links_are_one_file_and_no_stderr_means_no_progress_bar(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = make_folder(tmp_path / "in", 2)
    os.link(tmp_path / "in" / names[0], tmp_path / "in" / "zz_same_file.png")
    files = [f.file for f in collect_inputs([tmp_path / "in"])]
    assert files == names  # the later name of the same file is left out, like a symlink's
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some service hosts: the default progress=True
    summary = captioner.caption_folder(tmp_path / "in", out=tmp_path / "o.jsonl")
    assert (summary.captioned, len(summary.duplicates)) == (2, 1)

    # Another input holding the left-out name: the records are prefixed, whichever name of the file was kept
    # (they were not when the kept name was the other one, and the run was refused once that link was gone).
    photo(7).save(tmp_path / "b.png")
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "b.png", tmp_path / "other" / "zz_same_file.png")
    os.link(tmp_path / "b.png", tmp_path / "other" / "aa_first.png")  # kept in place of zz_same_file.png
    files = [f.file for f in collect_inputs([tmp_path / "in", tmp_path / "other"])]
    assert files == [f"{tmp_path / 'in'}/{name}" for name in names] + [f"{tmp_path / 'other'}/aa_first.png"]
    # A left-out path through a symlink does not count: names stay as earlier versions wrote them.
    (tmp_path / "linked").mkdir()
    photo(9).save(tmp_path / "linked" / "real.png")
    (tmp_path / "linked" / "aa_first.png").symlink_to("real.png")  # named like other/'s file, left out for real.png
    files = [f.file for f in collect_inputs([tmp_path / "other", tmp_path / "linked"])]
    assert files == ["aa_first.png", "real.png"]


def test_a_report_to_redirected_stdout_or_stderr_appends(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from engine.folder import write_report; "
            "print('first', flush=True); write_report(Path('/dev/stdout'), 'R\\n'); write_report(Path('-'), 'D\\n'); print('last'); "
            "write_report(Path('/dev/stderr'), 'E\\n')")
    log = tmp_path / "log"
    log.write_text("earlier\n")
    with open(tmp_path / "out", "w") as stdout, open(log, "a") as stderr:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=stdout, stderr=stderr, check=True, timeout=60)
    assert (tmp_path / "out").read_text() == "first\nR\nD\nlast\n"  # "-" is stdout too
    assert log.read_text() == "earlier\nE\n"


def test_cli_recaption_changed(engine_bundle: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from engine.cli import main

    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    args = ["caption", str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(out), "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    photo(5, 300, 200).save(tmp_path / "in" / "img_001.png")  # replaced by another photo
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "--recaption-changed captions them again" in refused.output
    again = CliRunner().invoke(main, [*args, "--recaption-changed"])
    assert again.exit_code == 0 and "captioned 1, failed 0 (1 changed since their record, captioned again), 1 already done" in again.output


def test_a_resume_with_other_decoding_settings_is_refused(captioner: Captioner, engine_bundle: Path, tmp_path: Path) -> None:
    make_folder(tmp_path / "in", 3)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert {r["model"] for r in records(out)} == {captioner.bundle.model_id}  # the bundle's own settings: its id
    before = out.read_bytes()
    beams = Captioner(engine_bundle, threads=1, num_beams=3)
    assert beams.captions_id == f"{captioner.bundle.model_id} num_beams=3"
    with pytest.raises(OutputError, match=r"another model or decoding settings .*this run is \w{12} num_beams=3\)"):
        beams.caption_folder(tmp_path / "in", out=out, progress=False)
    assert out.read_bytes() == before  # greedy and beam captions are never mixed in one output
    short = Captioner(engine_bundle, threads=1, max_new_tokens=4)
    assert short.captions_id == f"{captioner.bundle.model_id} max_new_tokens=4"
    default_length = Captioner(engine_bundle, threads=1, max_new_tokens=captioner.bundle.default_max_new_tokens)
    assert default_length.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 3  # same as default


def test_dropping_retried_records_refuses_a_file_cut_short_since_it_was_read(tmp_path: Path) -> None:
    """The records to keep are copied by byte range from the file as read; on a file system without locks
    another writer may have changed it since: then the output is left as it is, not rewritten cut short."""
    from engine.folder import _drop_lines, _read_lines

    out = tmp_path / "o.jsonl"
    out.write_text("".join(json.dumps({"file": f"{name}.png", "caption": None, "error": "x", "bytes": 1}) + "\n" for name in "abc"))
    lines = _read_lines(out, "jsonl")
    _drop_lines(out, lines, {"b.png"})
    assert [r["file"] for r in records(out)] == ["a.png", "c.png"]
    lines = _read_lines(out, "jsonl")
    out.write_bytes(out.read_bytes()[:40])
    with pytest.raises(OutputError, match="the file changed while the records were being dropped"):
        _drop_lines(out, lines, {"a.png"})
    assert len(out.read_bytes()) == 40 and not list(tmp_path.glob(".o.jsonl.*.tmp"))


def test_folder_inputs_as_bytes_paths_and_wrong_kinds_of_input(captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bytes path was walked as a list of numbers ("expected str, bytes or os.PathLike object, not int"),
    # and None as "'NoneType' object is not iterable".
    make_folder(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    assert captioner.caption_folder(b"in", out=tmp_path / "o.jsonl", progress=False).captioned == 2
    assert captioner.caption_folder([os.fsencode(tmp_path / "in")], out=tmp_path / "o.jsonl", progress=False).skipped == 2
    for wrong, said in ((None, "expected a path or a list of paths, got NoneType"), ([None], "expected paths, got NoneType")):
        with pytest.raises(TypeError, match=said):
            captioner.caption_folder(wrong, out=tmp_path / "p.jsonl", progress=False)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="an empty path was given as the bundle"):
        Captioner("")  # not the working folder


def test_cli_names_the_image_pillow_warns_about(engine_bundle: Path, tmp_path: Path) -> None:
    # "PIL/TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data" named no image; once per image now.
    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "b\nc.jpg"):  # a line break in a name stays on the warning's one line
        photo(1).save(tmp_path / "in" / name, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    result = CliRunner().invoke(caption_command, [str(tmp_path / "in"), "--model", str(engine_bundle), "--out",
                                                  str(tmp_path / "o.jsonl"), "--quiet", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "Corrupt EXIF" in line]
    assert lines == [f"warning: {tmp_path / 'in' / name}: Corrupt EXIF data. Expecting to read 2 bytes but only got 0."
                     for name in ("a.jpg", "b\\nc.jpg")], result.output


@pytest.mark.parametrize("out", ["scores.json", "-", None])
def test_results_are_saved_before_they_are_printed_except_to_stdout(tmp_path: Path, out: str | None) -> None:
    """evaluate and parity printed their scores first, and a stdout that took nothing lost the file; now the file
    comes first, unless it is stdout itself (`--out -`), where the order reads as before. A file that cannot be
    written is said after the scores (exit 2), which are still printed."""
    from engine.click_types import show_and_save
    from engine.folder import OutputError

    order: list[str] = []

    @click.command()
    @click.option("--fail", is_flag=True)
    def command(fail: bool) -> None:
        def save(path: Path) -> None:
            order.append("saved")
            if fail:
                raise OutputError(f"{path}: cannot write (No space left on device)")
            click.echo("records")

        show_and_save("scores", None if out is None else Path(out), save)
        order.append("done")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 0, result.output
    if out is None:
        assert order == ["done"] and result.output == "scores\n"
    elif out == "-":
        assert result.output == "scores\nrecords\n"
    else:
        assert result.output == "records\nscores\n" and order == ["saved", "done"]
        failed = CliRunner().invoke(command, ["--fail"])
        assert failed.exit_code == 2 and failed.output == f"scores\nerror: {out}: cannot write (No space left on device)\n"


def test_stops_held_wait_for_the_block_whatever_thread_the_signal_reaches() -> None:
    """`edlight bench` writing its results and `data synth` moving its images into place hold Ctrl-C, SIGTERM
    and SIGHUP until the block ends (a stop there lost a finished run, or left a mixed data set). A signal mask
    held only for the main thread: with another thread alive (a pool's, OpenMP's) the stop came through."""
    import threading

    from engine.click_types import Stopped, stops_held, stops_unwind

    done = threading.Event()
    other = threading.Thread(target=done.wait)  # a thread that does not block the signals
    other.start()
    # As a fresh process has it: a library loaded by an earlier test (ray.init) may have set its own handler.
    earlier_sigterm = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        for signum, stop in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Stopped)):
            written: list[str] = []
            with stops_unwind(), pytest.raises(stop):
                with stops_held():
                    os.kill(os.getpid(), signum)
                    time.sleep(0.1)
                    written.append("results")
            assert written == ["results"]
    finally:
        signal.signal(signal.SIGTERM, earlier_sigterm)
        done.set()
        other.join()


def test_a_jsonl_whose_lines_only_name_files_is_not_a_caption_file(captioner: Captioner, tmp_path: Path) -> None:
    """A labelling tool's export has a "file" key too: it was resumed from (its images skipped as captioned),
    appended to, and emptied by --overwrite. Every record this tool writes has file, caption and error."""
    make_folder(tmp_path / "in", 2)
    labels = tmp_path / "labels.jsonl"
    text = '{"file": "img_001.png", "label": "counting"}\n{"file": "nested/img_000.png", "label": "sums"}\n'
    labels.write_text(text)
    with pytest.raises(OutputError, match=r'labels\.jsonl:1: not a caption record \(a JSON line without "file" and a '
                                          r'"caption" or "error"\); choose another output'):
        captioner.caption_folder(tmp_path / "in", out=labels, progress=False)
    with pytest.raises(OutputError, match=r"labels\.jsonl: not a caption file"):
        captioner.caption_folder(tmp_path / "in", out=labels, overwrite=True, progress=False)
    assert labels.read_text() == text
    ours = tmp_path / "o.jsonl"  # a later line of a caption file without them is damage, named by its line
    ours.write_text('{"file": "a.png", "caption": "x", "error": null}\n{"file": "b.png"}\n')
    with pytest.raises(OutputError, match=r'o\.jsonl:2: not a caption record \(a JSON line without "file" and'):
        captioner.caption_folder(tmp_path / "in", out=ours, progress=False)


def stopped_before_the_first_caption(*args: object, **kwargs: object) -> Iterator[object]:
    """Captioner.iter_captions as a Ctrl-C before its first caption leaves it."""
    raise KeyboardInterrupt
    yield


def test_overwrite_empties_the_output_only_when_it_writes_the_first_records(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite used to empty the output before anything was found or captioned: a folder not mounted
    (no images) or a stop before the first batch left the earlier run's records lost."""
    make_folder(tmp_path / "in", 4)
    (tmp_path / "empty").mkdir()
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"o.{fmt}"
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        before = out.read_bytes()
        none = captioner.caption_folder(tmp_path / "empty", out=out, overwrite=True, progress=False)
        assert none.total == 0 and out.read_bytes() == before

        with monkeypatch.context() as patch:
            patch.setattr(captioner, "iter_captions", stopped_before_the_first_caption)
            with pytest.raises(KeyboardInterrupt):
                captioner.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False)
        assert out.read_bytes() == before
        again = captioner.caption_folder([tmp_path / "in" / "nested"], out=out, overwrite=True, progress=False)
        assert again.captioned == 2 and again.skipped == 0  # the first batch emptied it: only the new records
        rows = records(out) if fmt == "jsonl" else records_of_csv(out)
        assert [r["file"] for r in rows] == ["img_000.png", "img_003.png"]
        assert fmt == "jsonl" or out.read_text().count("file,caption,error") == 1  # one header


def test_retried_error_records_stay_where_the_output_cannot_be_replaced(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry rewrites the output and renames the copy over it. That detached its other hard links (left
    with the old records), and on a file mounted on its own (Docker's -v file:file) the rename fails with
    EBUSY: every resume stopped with exit 2. The records stay there instead, as in a read-only folder."""
    import errno

    import engine.folder

    make_folder(tmp_path / "in", 2)
    out, link = tmp_path / "o.jsonl", tmp_path / "link.jsonl"
    for case in ("hard link", "mount point"):
        (tmp_path / "in" / "late.png").write_bytes(b"still copying")
        captioner.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False)
        photo(5).save(tmp_path / "in" / "late.png")
        caplog.clear()
        with monkeypatch.context() as patch:
            if case == "hard link":
                os.link(out, link)
                why = "it has other hard links"
            else:
                def busy(src: object, dst: object) -> None:
                    raise OSError(errno.EBUSY, "Device or resource busy")

                patch.setattr(engine.folder.os, "replace", busy)
                why = "it is mounted on its own and cannot be replaced"
            summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        assert (summary.retried, summary.captioned) == (1, 1), case
        assert [r["error"] is None for r in records(out) if r["file"] == "late.png"] == [False, True], case
        assert f"{why}, so the output is not rewritten without the earlier records" in caplog.text, case
        assert not list(tmp_path.glob(".*.tmp")), case
        if case == "hard link":
            assert os.path.samefile(out, link)
            link.unlink()
        assert captioner.caption_folder(tmp_path / "in", out=out, progress=False).skipped == 3, case


def test_resume_cuts_off_the_zero_bytes_a_crash_left_at_the_end(
    captioner: Captioner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a power loss a file system can keep a file's new size without its data: zero bytes after the last
    record written to disk, or inside a record cut short. Resuming refused the file as not a caption file."""
    names = make_folder(tmp_path / "in", 4)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    complete = out.read_bytes()
    lines = complete.splitlines(keepends=True)
    for damaged in (lines[0] + lines[1] + b"\x00" * 4096, lines[0] + lines[1][:20] + b"\x00" * 100, b"\x00" * 512):
        out.write_bytes(damaged)
        caplog.clear()
        summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        assert b"\x00" not in out.read_bytes() and [r["file"] for r in records(out)] == names
        assert summary.captioned == 4 - damaged.count(b"\n")
        assert "zero bytes" in caplog.text
    out.write_bytes(b"\x00" * 64)
    assert captioner.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False).captioned == 4
    out.write_bytes(lines[0] + b"{\x00\x00}\x00\n")  # zeros inside a line ended by a newline: damage, named
    with pytest.raises(OutputError, match=r"o\.jsonl:2: not a caption record"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)


def test_an_output_named_as_compressed_is_refused(captioner: Captioner, tmp_path: Path) -> None:
    """captions.csv.gz was written as uncompressed JSONL (the format was told by the last suffix)."""
    make_folder(tmp_path / "in", 1)
    for name in ("captions.csv.gz", "captions.jsonl.zst", "c.GZ"):
        with pytest.raises(OutputError, match=re.escape(name) + r": records are written as plain text.*compress it after"):
            captioner.caption_folder(tmp_path / "in", out=tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()


def test_hidden_and_system_files_below_an_input_are_not_walked(tmp_path: Path) -> None:
    """A photo folder's .thumbnails cache or a .Trash-1000 of deleted photos held images that were captioned; so
    did Android's bin (.trashed-<time>-<name> beside the photos) and a Synology share's @eaDir thumbnails (three
    to five of every photo)."""
    photo(1).save(tmp_path / "a.png")
    photo(2).save(tmp_path / ".trashed-1767000000-b.png")
    litter = (".thumbnails/normal/t.png", ".Trash-1000/files/old.png", "sub/.cache/c.png", "@eaDir/a.png/SYNOPHOTO_THUMB_M.png",
              "#recycle/old.png", "$RECYCLE.BIN/S-1-5-21/$R1.png", "System Volume Information/x.png")  # fmt: skip
    for name in litter:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        photo(3).save(tmp_path / name)
    photo(4).save(tmp_path / "sub" / "d.png")
    assert [f.file for f in collect_inputs([tmp_path])] == ["a.png", "sub/d.png"]
    assert [f.file for f in collect_inputs([tmp_path / ".thumbnails"])] == ["normal/t.png"]  # given: walked
    assert [f.file for f in collect_inputs([tmp_path / "#recycle", tmp_path / ".trashed-1767000000-b.png"])] == [
        "old.png", ".trashed-1767000000-b.png"
    ]


def test_an_input_folder_above_or_below_the_earlier_runs_is_refused(captioner: Captioner, tmp_path: Path) -> None:
    """Record names are relative to the input folder: captioning `photos` into an output written for
    `photos/2024` (or the other way round, or the folder's files one by one) captioned every image again under
    new names, two records each."""
    photos = tmp_path / "photos"
    names = make_folder(photos / "2024", 4)
    (photos / "2025").mkdir()
    for i in range(2):
        photo(10 + i).save(photos / "2025" / f"img_{i:03d}.png")  # the same names, other photos
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(photos / "2024", out=out, progress=False)
    before = out.read_bytes()
    shown = re.escape(f"'{names[0]}' (now '2024/{names[0]}')")
    with pytest.raises(OutputError, match=r"o\.jsonl: holds records of 4 of these images under names relative to "
                                          rf"another folder: {shown}.*resume with the inputs that wrote it"):
        captioner.caption_folder(photos, out=out, progress=False)
    assert out.read_bytes() == before
    wide = tmp_path / "wide.jsonl"
    captioner.caption_folder(photos, out=wide, progress=False)
    with pytest.raises(OutputError, match=r"holds records of 4 of these images under names relative to another folder"):
        captioner.caption_folder(photos / "2024", out=wide, progress=False)
    with pytest.raises(OutputError, match=r"holds records of 2 of these images under names relative to another folder"):
        captioner.caption_folder(sorted((photos / "2024" / "nested").iterdir()), out=wide, progress=False)
    assert captioner.caption_folder(photos, out=wide, progress=False).skipped == 6  # the same inputs resume


def test_a_file_moved_within_the_input_is_captioned_under_its_new_name(captioner: Captioner, tmp_path: Path) -> None:
    """Unlike a whole folder's change of level, a few files moved into a subfolder are new names in a run that
    resumes the rest; their old records stay, counted in the summary."""
    names = make_folder(tmp_path / "in", 4)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    moved = next(name for name in names if "/" not in name)
    (tmp_path / "in" / "sorted").mkdir()
    os.rename(tmp_path / "in" / moved, tmp_path / "in" / "sorted" / moved)
    summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (summary.captioned, summary.skipped, summary.unlisted) == (1, 3, 1)
    assert "; 1 record(s) in the output of files not among these inputs, kept -> " in summary.line()
    assert [r["file"] for r in records(out)][-1] == f"sorted/{moved}"


def test_a_same_sized_other_file_one_level_away_is_no_earlier_record(captioner: Captioner, tmp_path: Path) -> None:
    """The SHA-256 a record holds tells a file of the same size under a name one folder level away apart."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    photo(1).save(tmp_path / "a" / "sub" / "x.bmp")  # uncompressed: the same size for the same dimensions
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "a" / "sub", out=out, progress=False)
    (tmp_path / "b" / "sub").mkdir(parents=True)
    photo(2).save(tmp_path / "b" / "sub" / "x.bmp")
    assert (tmp_path / "b" / "sub" / "x.bmp").stat().st_size == (tmp_path / "a" / "sub" / "x.bmp").stat().st_size
    summary = captioner.caption_folder(tmp_path / "b", out=out, progress=False)
    assert (summary.captioned, summary.unlisted) == (1, 1)


def test_someone_elses_json_line_without_a_newline_is_not_cut_off_as_torn(captioner: Captioner, tmp_path: Path) -> None:
    """A whole JSON line at the end that is not a record was taken for one cut short and cut off (the file
    lost), once records needed caption and error keys; records of a tool that drops null fields resume."""
    make_folder(tmp_path / "in", 2)
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"file": "img_001.png", "label": "counting", "boxes": [[1, 2, 3, 4]]}')
    with pytest.raises(OutputError, match=r"labels\.jsonl:1: not a caption record \(and not one cut short\)"):
        captioner.caption_folder(tmp_path / "in", out=labels, progress=False)
    assert labels.read_text().endswith("[[1, 2, 3, 4]]}")
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    sparse = [{k: v for k, v in r.items() if v is not None} for r in records(out)]  # Spark's JSON writer
    sparse[0] = {"file": sparse[0]["file"], "error": "could not read"}
    out.write_text("".join(json.dumps(r) + "\n" for r in sparse))
    again = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    assert (again.skipped, again.retried) == (1, 1)


def test_overwrite_refuses_a_file_whose_zero_bytes_are_only_its_start(captioner: Captioner, tmp_path: Path) -> None:
    """Zero bytes only are what a crash leaves of a caption file; zeros then data are someone else's file."""
    make_folder(tmp_path / "in", 1)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x00" * 65536 + b"IMPORTANT DATA" * 100)
    with pytest.raises(OutputError, match=r"disk\.img: not a caption file"):
        captioner.caption_folder(tmp_path / "in", out=image, overwrite=True, progress=False)
    assert image.stat().st_size == 65536 + 1400


def test_a_copy_of_another_runs_photo_or_broken_links_one_level_away_are_new_names(
    captioner: Captioner, tmp_path: Path
) -> None:
    """Into an output shared by several runs, an image among many that is a copy of one recorded one folder
    level away is no change of input folder; neither are two broken links (no size to compare)."""
    names = make_folder(tmp_path / "cam", 5)
    out = tmp_path / "all.jsonl"
    captioner.caption_folder(tmp_path / "cam", out=out, progress=False)
    (tmp_path / "phone" / "imported").mkdir(parents=True)
    for i in range(7):
        photo(20 + i).save(tmp_path / "phone" / f"p_{i}.png")
    shutil.copy(tmp_path / "cam" / names[1], tmp_path / "phone" / "imported" / names[1])
    summary = captioner.caption_folder(tmp_path / "phone", out=out, progress=False)
    assert (summary.captioned, summary.unlisted) == (8, 5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.png").symlink_to(tmp_path / "nowhere")
    (tmp_path / "b" / "sub" / "x.png").symlink_to(tmp_path / "nowhere else")
    links = tmp_path / "links.jsonl"
    captioner.caption_folder(tmp_path / "a", out=links, progress=False)
    assert captioner.caption_folder(tmp_path / "b", out=links, progress=False).failed == 1


def test_a_stop_before_the_first_records_of_an_overwrite_says_the_output_is_as_it_was(
    engine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The advice after a stop was to run again without --overwrite: that resumed the records the run was
    to replace, which a stop before its first batch had left in place."""
    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    base = [str(tmp_path / "in"), "--model", str(engine_bundle), "--quiet", "--out", str(out), "--threads", "1"]
    assert CliRunner().invoke(caption_command, base).exit_code == 0
    before = out.read_bytes()

    monkeypatch.setattr(Captioner, "iter_captions", stopped_before_the_first_caption)
    result = CliRunner().invoke(caption_command, [*base, "--overwrite"])
    assert result.exit_code == 130 and out.read_bytes() == before
    assert f"interrupted before the first records: {out} is as it was; run the same command again" in result.output


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_under_the_lock_does_not_keep_it_after_the_run_is_killed(tmp_path: Path) -> None:
    """A DataLoader worker forked by `edlight train` inherited the run's lock and held it for seconds after a
    kill -9 of the run: the immediate --resume was refused, naming the dead process."""
    out, child = tmp_path / "run_config.json", tmp_path / "child.pid"
    program = f"""
import os, time
from pathlib import Path
from engine.folder import output_lock
with output_lock(Path({str(out)!r})):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    Path({str(child)!r}).write_text(str(pid))
    os._exit(0)  # as a kill -9 leaves it: the lock never released
"""
    with open(tmp_path / "stderr", "w") as errors:  # no pipe: the child would keep it open
        started = subprocess.run([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.DEVNULL, stderr=errors,
                                 timeout=60)
    assert started.returncode == 0, (tmp_path / "stderr").read_text()
    try:
        os.kill(int(child.read_text()), 0)  # the child lives on, with its copies of the lock's descriptors closed
        with output_lock(out):  # the dead run's lock is gone
            pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(child.read_text()), signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_under_the_lock_that_leaves_the_block_closes_nothing_of_its_own(tmp_path: Path) -> None:
    """The child's copies of the lock's descriptors are closed at the fork, so leaving the block closed the
    numbers again: by then a file the child had opened since."""
    out = tmp_path / "o.jsonl"
    program = f"""
import os, sys
from pathlib import Path
from engine.folder import output_lock
with output_lock(Path({str(out)!r})):
    pid = os.fork()
    if pid == 0:
        own = open({str(tmp_path / "own.txt")!r}, "w")  # takes a number the lock's copy had
    else:
        _, status = os.waitpid(pid, 0)  # the parent holds the lock until the child is done
if pid == 0:
    with_lock_file = Path({str(tmp_path / ".o.jsonl.lock")!r}).exists()
    own.write("kept")
    own.close()
    os._exit(0 if with_lock_file else 3)  # the parent's lock file is not the child's to remove
sys.exit(os.waitstatus_to_exitcode(status))
"""
    run = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "own.txt").read_text() == "kept" and not (tmp_path / ".o.jsonl.lock").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="gives the output another owner (root only)")
def test_a_teammates_retry_keeps_the_outputs_group_and_a_sticky_folder_keeps_the_records(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry's rewritten copy took the output's owner and group in one chown, which only root may do: for a
    teammate both failed, the file became theirs alone, and its owner's next resume was refused. In a sticky
    folder (1777) the rename over another user's file failed with EPERM: exit 2, nothing captioned."""
    import errno

    import engine.folder

    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    real_chown = os.chown

    def as_a_member(path: object, uid: int, gid: int) -> None:  # what chown lets a non-root group member do
        if uid != -1:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_chown(path, uid, gid)  # type: ignore[arg-type]

    for case in ("group", "sticky"):
        (tmp_path / "in" / "late.png").write_bytes(b"still copying")
        captioner.caption_folder(tmp_path / "in", out=out, overwrite=True, progress=False)
        os.chown(out, 12345, 23456)
        out.chmod(0o664)
        photo(5).save(tmp_path / "in" / "late.png")
        caplog.clear()
        with monkeypatch.context() as patch:
            patch.setattr(engine.folder.os, "chown", as_a_member)
            if case == "sticky":
                def not_yours(src: object, dst: object) -> None:
                    raise PermissionError(errno.EPERM, "Operation not permitted")

                patch.setattr(engine.folder.os, "replace", not_yours)
            summary = captioner.caption_folder(tmp_path / "in", out=out, progress=False)
        assert (summary.retried, summary.captioned) == (1, 1), case
        info = out.stat()
        assert (info.st_gid, info.st_mode & 0o777) == (23456, 0o664), case
        if case == "sticky":
            assert "this user may not replace it in its folder" in caplog.text
            assert [r["error"] is None for r in records(out) if r["file"] == "late.png"] == [False, True]
        else:
            assert info.st_uid == os.getuid() and len(records(out)) == 3


def test_an_output_on_a_read_only_mount_is_named_as_such(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`the file is read-only; make it writable` sent people to chmod a file on a read-only file system."""
    import engine.folder

    make_folder(tmp_path / "in", 1)
    out = tmp_path / "o.jsonl"
    captioner.caption_folder(tmp_path / "in", out=out, progress=False)
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path: object) -> None:
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY  # type: ignore[arg-type]

    monkeypatch.setattr(engine.folder.os, "access", lambda path, mode: False)
    monkeypatch.setattr(engine.folder.os, "statvfs", ReadOnly)
    with pytest.raises(OutputError, match=r"o\.jsonl: cannot write: it is on a file system mounted read-only; choose "
                                          r"an output on a writable one$"):
        captioner.caption_folder(tmp_path / "in", out=out, progress=False)


def test_help_and_version_into_a_full_disk_are_one_line(tmp_path: Path) -> None:
    """click writes --help and --version itself: `>/dev/full` ended them in a traceback."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    for args in (["--version"], ["--help"], ["caption", "--help"]):
        with open("/dev/full", "w") as full:
            run = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, stdout=full,
                                 stderr=subprocess.PIPE, text=True, timeout=120)
        assert run.returncode == 1 and run.stderr == "error: cannot write to stdout (No space left on device)\n", run.stderr


def test_an_unwritable_default_output_is_named_with_its_folder(
    captioner: Captioner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service whose working folder it may not write said only `captions.jsonl: cannot write: Permission
    denied`: neither where that is nor what to do."""
    import builtins
    import errno

    import engine.folder

    make_folder(tmp_path / "in", 1)
    monkeypatch.chdir(tmp_path)

    def refused(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if "a" in mode and Path(str(path)).name == "captions.jsonl":  # root may write anywhere: say it cannot
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(engine.folder, "open", refused, raising=False)
    with pytest.raises(OutputError, match=re.escape(f"captions.jsonl (in {tmp_path}): cannot write: Permission denied; "
                                                    "give --out a path this user may write")):
        captioner.caption_folder(tmp_path / "in", progress=False)


def test_logged_warnings_read_as_warnings_on_the_command_line(engine_bundle: Path, tmp_path: Path) -> None:
    """Warnings edlight logs (a torn line cut off, bad entries skipped) came out bare through Python's last-resort
    handler, unlike every other `warning: ...` line."""
    from engine.cli import main

    make_folder(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    out.write_text('{"file": "img_001.png", "cap')
    result = CliRunner().invoke(main, ["caption", str(tmp_path / "in"), "--model", str(engine_bundle), "--out", str(out),
                                       "--quiet", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(rf"^warning: {re.escape(str(out))}: cut off its last line", result.stderr, re.MULTILINE), result.stderr


def test_a_rerun_with_nothing_left_says_so_instead_of_a_rate() -> None:
    """A rerun over 100,000 captioned images said "in 0.0 s (0.00 images/s)" after 12 s of checking them."""
    from engine.folder import FolderSummary

    done = FolderSummary(total=5, skipped=5, captioned=0, failed=0, seconds=0.0, out=Path("o.jsonl"))
    assert done.line() == "captioned 0, failed 0, 5 already done of 5 images (nothing left to caption) -> o.jsonl"
    some = FolderSummary(total=5, skipped=3, captioned=2, failed=0, seconds=4.0, out=Path("o.jsonl"))
    assert some.line() == "captioned 2, failed 0, 3 already done of 5 images in 4.0 s (0.50 images/s) -> o.jsonl"
