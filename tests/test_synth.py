"""The student-work generator: determinism, variety of work and descriptions, image properties, the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main
from train.data import check_folder, read_examples
from train.synth import GLYPHS, INKS, KINDS, PAPERS, Hand, Sketch, generate, make_sample

VERDICT_KINDS = {"arithmetic", "groups", "fraction", "clock", "shapes"}


def _rows(folder: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_folders_whatever_the_workers(tmp_path: Path) -> None:
    one = generate(tmp_path / "one", 10, seed=5)
    two = generate(tmp_path / "two", 10, seed=5, workers=2)
    assert _files(one) == _files(two)
    other = generate(tmp_path / "other", 10, seed=6)
    assert _files(other)["00003.jpg"] != _files(one)["00003.jpg"]
    # Image i does not depend on how many images are generated.
    assert make_sample(5, 3).jpeg == _files(one)["00003.jpg"]


def test_generated_folder_passes_data_check(synth_data: Path) -> None:
    report = check_folder(synth_data)
    assert report.ok, report.problems
    assert not report.warnings
    assert len(report.examples) == 200
    assert [e.file_name for e in read_examples(synth_data)][:2] == ["00000.jpg", "00001.jpg"]


def test_every_kind_appears_with_at_least_three_phrasings(synth_data: Path) -> None:
    rows = _rows(synth_data)
    assert set(Counter(r["kind"] for r in rows)) == set(KINDS)
    assert len(KINDS) >= 6
    openings: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        # The opening words with numbers and object names blanked out identify the phrasing.
        words = re.sub(r"\d+", "#", r["text"]).split()[:3]
        openings[r["kind"]].add(" ".join(words))
    for kind in KINDS:
        assert len(openings[kind]) >= 3, (kind, openings[kind])


def test_descriptions_mention_numbers_and_right_or_wrong(synth_data: Path) -> None:
    rows = _rows(synth_data)
    verdicts = Counter()
    for r in rows:
        assert re.search(r"\d", r["text"]), r
        assert len(r["text"].split()) <= 25, r
        if r["kind"] in VERDICT_KINDS:
            verdict = re.findall(r"\b(correct|incorrect)\b", r["text"])
            assert len(verdict) == 1, r
            verdicts[verdict[0]] += 1
    assert verdicts["correct"] > verdicts["incorrect"] > 10


def test_arithmetic_descriptions_say_whether_the_answer_is_right(synth_data: Path) -> None:
    checked = 0
    for r in _rows(synth_data):
        m = re.search(r"(\d+) ([-+x]) (\d+) = (\d+)", r["text"])
        if r["kind"] != "arithmetic" or not m:
            continue
        a, op, b, ans = int(m[1]), m[2], int(m[3]), int(m[4])
        right = {"+": a + b, "-": a - b, "x": a * b}[op]
        assert ("incorrect" not in r["text"]) == (ans == right), r
        checked += 1
    assert checked >= 10


def test_images_vary_in_size_shape_paper_and_ink(synth_data: Path) -> None:
    sizes = []
    for p in sorted(synth_data.glob("*.jpg"))[:80]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
    assert all(300 <= min(s) and max(s) <= 1600 for s in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert max(max(s) for s in sizes) > 1200 and min(max(s) for s in sizes) < 700
    samples = [make_sample(11, i) for i in range(36)]
    assert {s.paper for s in samples} == set(PAPERS)
    assert {s.ink for s in samples} == set(INKS)


def test_images_are_not_clean_renders(synth_data: Path) -> None:
    with Image.open(synth_data / "00000.jpg") as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    # Noise: neighbouring background pixels differ; lighting: the brightest and darkest corners differ.
    assert np.abs(np.diff(pixels[:, :50], axis=1)).mean() > 0.5
    h, w = pixels.shape
    corners = [pixels[:h // 5, :w // 5], pixels[:h // 5, -w // 5:], pixels[-h // 5:, :w // 5], pixels[-h // 5:, -w // 5:]]
    medians = [float(np.median(c)) for c in corners]
    assert max(medians) - min(medians) > 3


def test_handwriting_jitters_every_time() -> None:
    rng = np.random.default_rng(0)
    hand = Hand(rng)
    first, second = Sketch(), Sketch()
    hand.write(first, "0123456789+-x=/:", 0.0, 0.0)
    hand.write(second, "0123456789+-x=/:", 0.0, 0.0)
    assert len(first.strokes) == len(second.strokes) == sum(len(GLYPHS[c][1]) for c in "0123456789+-x=/:")
    same = [a.shape == b.shape and np.allclose(a, b) for (a, _), (b, _) in zip(first.strokes, second.strokes, strict=True)]
    assert not any(same)


def test_generate_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    generate(tmp_path, 2, seed=1)
    with pytest.raises(FileExistsError):
        generate(tmp_path, 2, seed=1)
    generate(tmp_path, 3, seed=2, overwrite=True)
    assert len(_rows(tmp_path)) == 3
    # A smaller set replacing a larger one removes the images it no longer lists, and nothing else.
    (tmp_path / "notes.txt").write_text("mine")
    generate(tmp_path, 1, seed=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.jpg", "metadata.jsonl", "notes.txt"]
    with pytest.raises(ValueError):
        generate(tmp_path / "x", -1)


def test_generate_neither_overwrites_nor_mixes_into_a_data_set_it_did_not_write(tmp_path: Path) -> None:
    # Only a metadata file at the top was looked for: a folder of photos named 00000.jpg ... was overwritten,
    # a data set in train/ and test/ got synthetic images mixed in, and --overwrite deleted a user's images
    # of such names that its metadata listed.
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photos / "00000.jpg")
    before = (photos / "00000.jpg").read_bytes()
    with pytest.raises(FileExistsError, match=r"photos already holds images, folders or metadata \(00000\.jpg\)"):
        generate(photos, 2)
    with pytest.raises(FileExistsError, match=r"holds a data set data synth did not write \(00000\.jpg\)"):
        generate(photos, 2, overwrite=True)  # an image no metadata of synth's lists
    (photos / "metadata.jsonl").write_text('{"file_name": "00000.jpg", "text": "my photo"}\n')
    with pytest.raises(FileExistsError, match=r"did not write \(metadata\.jsonl\)"):
        generate(photos, 2, overwrite=True)  # listed, but by the user's own metadata
    split = tmp_path / "split"
    (split / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"\(train\)"):
        generate(split, 2, overwrite=True)
    assert (photos / "00000.jpg").read_bytes() == before and sorted(p.name for p in photos.iterdir()) == ["00000.jpg", "metadata.jsonl"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("a folder with other files takes a data set")
    assert len(_rows(generate(tmp_path / "notes", 2))) == 2
    # Hidden entries and a training run written inside the folder are no data set to protect.
    (tmp_path / "notes" / ".git").mkdir()
    (tmp_path / "notes" / "._00000.jpg").write_bytes(b"macOS resource fork")
    (tmp_path / "notes" / "runs" / "tiny").mkdir(parents=True)
    assert len(_rows(generate(tmp_path / "notes", 3, overwrite=True))) == 3


def test_a_stopped_synth_leaves_the_folder_as_it_was_and_no_workers(tmp_path: Path) -> None:
    # SIGTERM killed the main process at once: its pool's workers lived on, orphaned, holding the caller's
    # pipes, and the folder kept the images written so far. Signalled to the whole group, workers stopped
    # inside multiprocessing's queue code could hang the pool.
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "data"
    generate(out, 2, seed=1)
    before = _files(out)
    command = [sys.executable, "-m", "engine.cli", "data", "synth", "--out", str(out), "--n", "600", "--workers", "2", "--overwrite"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / ".synth-partial").is_dir() or len(os.listdir(out / ".synth-partial")) < 20:  # workers at work
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    try:
        os.killpg(run.pid, signal.SIGTERM)  # the whole group, as `timeout` and systemd do: the workers too
        stdout, stderr = run.communicate(timeout=120)  # returns only when no process holds the pipes
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 143 and "interrupted" in stderr.decode(), (run.returncode, stderr.decode())
    assert _files(out) == before  # the partial set is gone, the earlier one is as it was

    def session(pid: str) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            return None

    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and session(pid) == run.pid] == []


def test_a_stopped_synth_removes_the_folders_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM left the new --out folder behind, empty."""
    from train import synth

    made = []

    def stopped_after_two(args: tuple[int, int, str, str]) -> tuple[str, str]:
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(args[3])
        return real(args)

    real = synth._make_and_save
    monkeypatch.setattr(synth, "_make_and_save", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "new" / "data", 5, workers=1)
    assert made and not (tmp_path / "new").exists() and tmp_path.is_dir()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left, as it was
    made.clear()
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "kept", 5, workers=1)
    assert list((tmp_path / "kept").iterdir()) == []


def test_cli_synth_then_check(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--n", "8", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 8 images and metadata.jsonl" in result.output
    assert {r["kind"] for r in _rows(out)} == set(KINDS)
    again = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--n", "8"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    check = CliRunner().invoke(main, ["data", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "examples: 8 usable" in check.output
    (tmp_path / "a_file").write_text("x")
    under_a_file = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "a_file" / "d"), "--n", "1"])
    assert under_a_file.exit_code == 2 and "cannot write the data set there" in under_a_file.output
    a_file = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "a_file"), "--n", "1"])
    assert a_file.exit_code == 2 and "a_file' is a file" in a_file.output
    with pytest.raises(NotADirectoryError, match="a file is there, not a folder"):  # not "[Errno 17] File exists"
        generate(tmp_path / "a_file", 1)
    empty = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "none"), "--n", "0"])
    assert empty.exit_code == 2 and "0 is not in the range x>=1" in empty.output  # a data set of no images
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "metadata.jsonl").write_text("")
    check = CliRunner().invoke(main, ["data", "check", str(tmp_path / "none")])
    assert check.exit_code == 1 and "metadata.jsonl: lists no images" in check.output


def test_examples_folder_is_the_seed_7_sample() -> None:
    """examples/ (the README's sample folder) is `edlight data synth --out examples --n 8 --seed 7`."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    report = check_folder(examples)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    rows = _rows(examples)
    assert {r["kind"] for r in rows} == set(KINDS)
    assert [r["text"] for r in rows] == [make_sample(7, i).text for i in range(len(rows))]
    assert sum(p.stat().st_size for p in examples.iterdir()) < 1_500_000
