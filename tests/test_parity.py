"""Parity: the engine on the exported bundle captions like PyTorch on the shared tiny trained model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from engine.bundle import Bundle, write_manifest

pytestmark = pytest.mark.slow


def test_fp32_bundle_matches_pytorch(tiny_bundle: Path, tiny_checkpoint: Path, synth_data: Path) -> None:
    from export.parity import run_parity

    report = run_parity(tiny_bundle, tiny_checkpoint, synth_data)
    print(report.table())
    assert report.images >= 10
    assert report.identical_share >= 0.99
    assert abs(report.bleu_diff) <= 0.1
    assert report.passed and report.failures == []
    # Identical and non-empty (sacrebleu scores empty-vs-empty as 0): the comparison is not vacuous.
    assert report.bleu_engine_vs_torch > 99
    assert report.tolerance == 0.1 and report.min_identical == 0.99


def test_int8_bundle_within_tolerance(tiny_bundle_int8: Path, tiny_checkpoint: Path, synth_data: Path) -> None:
    from export.parity import run_parity

    # Every image, not the 17 of the test split: this 3-epoch model is unsure of many tokens, int8 changes
    # a third of its captions, and on 17 images one caption moves BLEU by about a point.
    report = run_parity(tiny_bundle_int8, tiny_checkpoint, synth_data, split="all")
    print(report.table())  # the int8 BLEU difference, reported with -s
    assert report.quantization == "int8" and report.tolerance == 1.0 and report.min_identical is None
    assert abs(report.bleu_diff) <= 1.0
    assert report.passed


def test_cli_writes_json_and_passes(tiny_bundle: Path, tiny_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    from export.parity_cli import parity

    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        parity,
        ["--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "PyTorch vs references" in result.output and "PASSED" in result.output
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["identical_share"] >= 0.99 and report["differences_count"] >= 0
    # Its own earlier report is replaced; a data set's metadata or a bundle's manifest never is, and that is
    # known before captioning.
    again = CliRunner().invoke(
        parity,
        ["--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data), "--out", str(out)],
    )
    assert again.exit_code == 0, again.output
    for precious in (synth_data / "metadata.jsonl", tiny_bundle / "edlight.json"):
        before = precious.read_bytes()
        refused = CliRunner().invoke(
            parity,
            ["--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data), "--out", str(precious)],
        )
        assert refused.exit_code == 2 and "exists and does not hold a parity report" in refused.output
        assert "PyTorch vs references" not in refused.output and precious.read_bytes() == before


def _with_wrong_tokenizer(bundle: Path, tmp_path: Path) -> Path:
    """A copy whose tokenizer maps ids to the wrong pieces, re-hashed so the manifest still verifies."""
    broken = Path(shutil.copytree(bundle, tmp_path / "broken"))
    data = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    specials = len(data["added_tokens"])
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], position = id
        pieces = [entry[0] for entry in vocab[specials:]]
        for entry, piece in zip(vocab[specials:], reversed(pieces), strict=True):
            entry[0] = piece
    else:  # BPE / WordPiece / WordLevel: {piece: id}
        ordinary = sorted((i, t) for t, i in vocab.items() if i >= specials)
        ids = [i for i, _ in ordinary]
        for (_, piece), new_id in zip(ordinary, reversed(ids), strict=True):
            vocab[piece] = new_id
    (broken / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    manifest = Bundle.load(broken, verify_hashes=False).manifest
    write_manifest(broken, manifest)
    Bundle.load(broken)  # hashes match: only parity can tell
    return broken


def test_wrong_tokenizer_fails_with_exit_1(tiny_bundle: Path, tiny_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    from export.parity_cli import parity

    broken = _with_wrong_tokenizer(tiny_bundle, tmp_path)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        parity, ["--model", str(broken), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data), "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "engine:" in result.output  # differing captions side by side
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["identical_share"] < 0.5
    assert report["differences"] and report["differences"][0]["torch"] != report["differences"][0]["engine"]


def test_bad_inputs_are_one_line_errors(tiny_bundle: Path, tiny_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    from export.parity_cli import parity

    runner = CliRunner()
    missing = runner.invoke(parity, ["--model", str(tmp_path / "nope"), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data)])
    assert missing.exit_code == 2 and "no such bundle directory" in missing.output  # cannot run: 2, failed: 1
    empty = tmp_path / "empty"
    empty.mkdir()
    no_data = runner.invoke(parity, ["--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data", str(empty)])
    # The data folder's own error (train.data lists every problem, one per line), not a traceback.
    assert no_data.exit_code == 2 and no_data.output.startswith(f"error: {empty}")
    assert "Traceback" not in no_data.output
    base = ["--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data", str(synth_data)]
    for bad in (["--tolerance", "nan"], ["--min-identical", "nan"], ["--out", str(tmp_path)]):
        result = runner.invoke(parity, [*base, *bad])
        assert result.exit_code == 2 and bad[0] in result.output, result.output
    (tmp_path / "a_file").write_text("x")
    unwritable = runner.invoke(parity, [*base, "--out", str(tmp_path / "a_file" / "report.json")])  # before captioning
    assert unwritable.exit_code == 2 and "cannot create its folder" in unwritable.output
    assert "PyTorch vs references" not in unwritable.output


def test_a_checkpoint_of_another_shape_is_refused_before_captioning(tiny_bundle: Path, synth_data: Path, tmp_path: Path) -> None:
    from export.parity import ParityError, run_parity
    from train.presets import build_from_preset

    model, processor = build_from_preset("tiny", ["a caption", "another caption"], max_patches=64, seed=0)
    other = tmp_path / "other"
    model.save_pretrained(other)
    processor.save_pretrained(other)
    with pytest.raises(ParityError, match=r"is not the checkpoint .* was exported from: .*max_patches: checkpoint 64"):
        run_parity(tiny_bundle, other, synth_data)


def test_export_with_data_stores_parity_split_layout(tiny_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    """`edlight export --data` runs parity on the staged bundle and ships the result; here with the
    split decoder (the shared fixtures use the default, merged), so both layouts the engine reads are
    held to the same standard."""
    from export.cli import export

    out = tmp_path / "split"
    result = CliRunner().invoke(
        export, [str(tiny_checkpoint), "--out", str(out), "--data", str(synth_data), "--decoder-layout", "split",
                 "--tolerance", "0.05", "--min-identical", "0.98"]
    )
    assert result.exit_code == 0, result.output
    assert "parity on test split" in result.output and "passed" in result.output
    bundle = Bundle.load(out)
    assert bundle.manifest.decoder_layout == "split"
    shipped = bundle.manifest.parity
    assert shipped is not None and shipped["passed"] is True
    assert shipped["identical_share"] >= 0.98 and abs(shipped["bleu_diff"]) <= 0.05
    assert (shipped["tolerance"], shipped["min_identical"]) == (0.05, 0.98)  # the limits given
    assert "bundle" not in shipped and "differences" not in shipped


def test_an_export_whose_parity_fails_exits_1_and_one_that_cannot_run_2(
    tiny_checkpoint: Path, synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripts tell a bundle that failed its check (1) from an export that could not run (2), as for parity."""
    from engine.captioner import Captioner
    from export.cli import export

    # A fault put in on purpose: the engine gets one caption of the split wrong. (Whether int8 changes a
    # caption of this small model is up to its training, so it cannot be what makes the check fail.)
    caption = Captioner.caption

    def one_caption_off(self: Captioner, images: Any) -> list[str]:
        captions = caption(self, images)
        return [captions[0] + " and more", *captions[1:]]

    monkeypatch.setattr(Captioner, "caption", one_caption_off)
    failed = CliRunner().invoke(
        export, [str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--data", str(synth_data), "--min-identical", "1"]
    )
    assert failed.exit_code == 1, failed.output  # every caption asked for, one missed
    assert "identical captions" in failed.output, failed.output
    assert "parity check on" in failed.output and "failed" in failed.output and not (tmp_path / "b").exists()
    refused = CliRunner().invoke(export, [str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--data", str(tmp_path / "none")])
    assert refused.exit_code == 2 and "data folder not found" in refused.output


def test_weights_are_compared_by_content(tmp_path: Path) -> None:
    from export.parity import _same_weights

    for name, weights in (("a", b"weights of a"), ("b", b"weights of a"), ("c", b"weights of c")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(weights)
        (tmp_path / name / "config.json").write_text(name)  # not weights: not compared
    assert _same_weights(tmp_path / "a", tmp_path / "b") and _same_weights(tmp_path / "a", tmp_path / "a")
    assert not _same_weights(tmp_path / "a", tmp_path / "c")


def test_the_bleu_difference_is_judged_as_reported() -> None:
    from export.parity import bleu_difference

    # A tolerance copied from a report's bleu_diff (0.0434) passes those captions; the message has the digits.
    assert bleu_difference(45.0, 45.043404, 0.0434) == (0.0434, None)
    assert bleu_difference(45.0, 44.9565, 0.0434) == (-0.0435, "BLEU differs by -0.0435 (> 0.0434)")
    assert bleu_difference(30.0, 31.5, 1.0) == (1.5, "BLEU differs by +1.5 (> 1)")


def test_weights_stored_another_way_are_not_called_different(tmp_path: Path) -> None:
    from export.parity import _same_weights

    (tmp_path / "safe").mkdir()
    (tmp_path / "safe" / "model.safetensors").write_bytes(b"tensors")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"the same tensors, pickled")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "model.safetensors").write_bytes(b"tensors")
    (tmp_path / "trainer" / "training_args.bin").write_bytes(b"a Trainer's arguments")  # not weights
    assert _same_weights(tmp_path / "safe", tmp_path / "bin")  # cannot tell from the files: no warning
    assert _same_weights(tmp_path / "safe", tmp_path / "trainer")
    (tmp_path / "both").mkdir()  # a file of the same name that differs still tells, beside others
    (tmp_path / "both" / "model.safetensors").write_bytes(b"other tensors")
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(b"the same tensors, pickled")
    assert not _same_weights(tmp_path / "safe", tmp_path / "both")


def test_a_threshold_is_shown_with_the_digits_it_was_given() -> None:
    from export.parity import percent

    # A floor of 0.804 printed as "80%" read "identical captions 80.0% < 80%": a failure that looked like a pass.
    assert (percent(0.804), percent(0.8), percent(0.999)) == ("80.4%", "80%", "99.9%")


def _run_into(stdout: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`edlight ARGS` with stdout a full disk ("full") or a pipe whose reader has gone ("gone")."""
    command = [sys.executable, "-m", "engine.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if stdout == "full":
        with open("/dev/full", "w") as full:
            return subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    finally:
        os.close(write)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stdout_that_takes_nothing_keeps_the_files(tiny_bundle: Path, tiny_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    """`evaluate ... >/dev/full` and `parity ... | true` printed their scores first and died of it (a traceback, exit 1)
    before writing the predictions or the report; export's summary lines failed a finished bundle (exit 1)."""
    predictions = tmp_path / "predictions.jsonl"
    full = _run_into("full", "evaluate", str(tiny_checkpoint), "--data", str(synth_data), "--out", str(predictions))
    assert full.returncode == 1 and "error: cannot write to stdout (No space left on device)" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    assert len(predictions.read_text().splitlines()) > 0

    report = tmp_path / "parity.json"
    gone = _run_into("gone", "parity", "--model", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--data",
                     str(synth_data), "--out", str(report))
    assert gone.returncode == 141 and gone.stderr.strip() == "", gone.stderr  # as other tools die of SIGPIPE
    assert json.loads(report.read_text())["passed"] is True

    bundle = tmp_path / "bundle"
    exported = _run_into("gone", "export", str(tiny_checkpoint), "--out", str(bundle))
    assert exported.returncode == 0, exported.stderr  # the summary only repeats the manifest
    Bundle.load(bundle)
