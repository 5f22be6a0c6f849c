"""Export: checkpoint -> verified ONNX bundle (fp32, int8, both decoder layouts), atomicity, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.bundle import MANIFEST_NAME, SUPPORT_FILES, Bundle
from engine.errors import BundleError, ModelRuntimeError
from engine.folder import sibling_stem
from export import ExportError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

CAPTIONS = [
    "a worksheet with three red circles and the number 7",
    "a drawing of a blue house next to a green tree",
    "handwritten letters a b c on lined paper",
    "a math page with 2 + 3 = 5 written in pencil",
]


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, randomly initialised, 64 patches: fast to export, and untrained so any
    export bug that shifts logits shows up as different greedy tokens."""
    from train.presets import build_from_preset

    model, processor = build_from_preset("tiny", CAPTIONS, max_patches=64, seed=0)
    out = tmp_path_factory.mktemp("ckpt") / "random"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_fp32_bundle_manifest_verifies(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    from export.onnx import DEFAULT_LAYOUT

    bundle = Bundle.load(tiny_bundle)
    m = bundle.manifest
    assert m.format_version == 1
    assert m.decoder_batching == "batch"  # fp32: any number of images per run
    assert m.source == str(tiny_checkpoint.absolute())
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert m.max_patches == pre["max_patches"] == bundle.preprocessor_config["max_patches"]
    assert m.decoder_layout == DEFAULT_LAYOUT
    assert m.quantization is None
    assert {"torch", "transformers", "optimum", "onnxruntime"} <= set(m.versions)
    on_disk = {p.name for p in tiny_bundle.iterdir()} - {MANIFEST_NAME}
    assert set(m.files) == on_disk
    assert set(SUPPORT_FILES) | set(m.onnx_files.values()) <= on_disk
    # Nothing beyond what the engine reads (no unused decoder; a tokenizer_config.json only where it asks
    # for the clean-up of spaces, which this checkpoint's does not).
    assert len(on_disk) == len(SUPPORT_FILES) + len(m.onnx_files)
    assert m.extra["validation"]["fp32"]["identical_share"] == 1.0
    assert m.extra["validation"]["fp32"]["encoder_max_abs_diff"] < 1e-4
    assert not _leftovers(tiny_bundle.parent, tiny_bundle.name)


def test_int8_merged_quantizes_both_branches(random_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    from export.onnx import export_bundle
    from export.quantize import count_quantized_nodes

    out = export_bundle(random_checkpoint, tmp_path / "int8", quantize="int8", decoder_layout="merged")
    bundle = Bundle.load(out)
    assert bundle.manifest.quantization == "int8"
    assert set(bundle.manifest.onnx_files) == {"encoder", "decoder_merged"}
    # ONNX Runtime has already fused the encoder's integer MatMuls at export: no fp32 MatMul is left.
    encoder_ops = count_quantized_nodes(bundle.onnx_path("encoder"))
    assert encoder_ops.get("DynamicQuantizeMatMul", 0) + encoder_ops.get("MatMulIntegerToFloat", 0) > 0
    assert not any(n.op_type == "MatMul" for n in onnx.load(str(bundle.onnx_path("encoder"))).graph.node)
    assert any(r.startswith("encoder:attention") for r in bundle.manifest.graph_rewrites)
    merged = bundle.onnx_path("decoder_merged")
    # The merged decoder's weights live in the two branches of one If node: both must be int8.
    top = onnx.load(str(merged)).graph
    branches = {a.name: a.g for n in top.node if n.op_type == "If" for a in n.attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    assert [n.op_type for n in top.node] == ["If"]  # the encoder output's quantization runs in the first step only
    layers = bundle.config["text_config"]["num_layers"]
    for name, branch in branches.items():
        ops = [n.op_type for n in branch.node]
        constant_weight_matmuls = [n for n in branch.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in top.initializer}]
        assert not constant_weight_matmuls, f"{name}: fp32 weights left"
        # Token rows (one per image and step): MatMulNBits, 8-bit, int8 compute with per-row activation scales.
        nbits = [n for n in branch.node if n.op_type == "MatMulNBits"]
        assert nbits and all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.items() >= {"bits": 8, "accuracy_level": 4}.items() for n in nbits)
        assert any("lm_head" in n.name for n in nbits)
        # Image rows (the first step's cross-attention K/V projections): per-tensor dynamic int8, run one image at a time.
        expected_integer = 2 * layers if name == "else_branch" else 0
        assert ops.count("MatMulInteger") == expected_integer
        if name == "then_branch":  # cached steps: nothing scales a whole (batch) tensor at once
            assert "DynamicQuantizeLinear" not in ops and "DynamicQuantizeMatMul" not in ops
    assert bundle.manifest.decoder_batching == "steps" and bundle.manifest.batching == "steps"
    # The integer MatMuls' weights use 7 bits, which no CPU's uint8 x int8 kernel saturates (export.quantize).
    assert bundle.manifest.int8_weight_bits == 7 and not bundle.manifest.full_range_int8
    integer_weights = [
        onnx.numpy_helper.to_array(t) for path in (bundle.onnx_path("encoder"), merged)
        for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1
    ]
    assert integer_weights and all(-64 <= w.min() and w.max() <= 64 for w in integer_weights)  # 255 x 64 x 2 < 2**15
    assert max(int(abs(w).max()) for w in integer_weights) >= 63  # and they use those 7 bits
    int8 = bundle.manifest.extra["validation"]["int8"]
    assert int8["images"] == 4 and int8["encoder_max_abs_diff"] < 1.0


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_int8_export_of_other_activations(random_checkpoint: Path, tmp_path: Path, activation: str) -> None:
    """An MLP activation ONNX Runtime fuses into a contrib op (exact-erf GELU -> com.microsoft.Gelu,
    x*sigmoid(1.702x) -> QuickGelu) leaves a tensor ONNX type inference cannot type before the next
    MatMul; the int8 export still quantizes every encoder MatMul and captions."""
    import onnx

    from engine.captioner import Captioner
    from export.onnx import export_bundle

    ck = Path(shutil.copytree(random_checkpoint, tmp_path / "ck"))
    config = json.loads((ck / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["dense_act_fn"] = activation
    (ck / "config.json").write_text(json.dumps(config))
    bundle = Bundle.load(export_bundle(ck, tmp_path / "int8", quantize="int8"))
    encoder = onnx.load(str(bundle.onnx_path("encoder"))).graph.node
    assert {"Gelu": "gelu", "QuickGelu": "quick_gelu"}.get(next(n.op_type for n in encoder if n.domain == "com.microsoft" and "Gelu" in n.op_type)) == activation
    assert not any(n.op_type == "MatMul" for n in encoder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    assert [type(c) for c in Captioner(bundle.path).caption([image, image])] == [str, str]


@pytest.mark.slow
def test_the_same_checkpoint_exports_to_the_same_bundle(random_checkpoint: Path, tmp_path: Path) -> None:
    """Byte-for-byte, so a rebuilt bundle keeps its model id and resumes the captions of the first. Two
    processes with other string-hash seeds: Optimum's decoder merge picked shared weights' names by them."""
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        proc = subprocess.run(
            [sys.executable, "-m", "engine.cli", "export", str(random_checkpoint), "--out", str(out)],
            env={**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        bundle = Bundle.load(out)
        assert bundle.manifest.decoder_layout == "merged"
        digests.append((bundle.model_id, bundle.manifest.files))
    assert digests[0] == digests[1]


def test_decoder_int8_quantizes_image_rows_per_tensor_and_token_rows_per_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MatMuls reading the encoder output get dynamic int8, the others row-wise MatMulNBits; quietly."""
    import logging

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import quantize_decoder_int8

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32) * 0.1, name) for name in ("wk", "wq")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["encoder_hidden_states", "wk"], ["key"], name="proj"),
         helper.make_node("MatMul", ["tokens", "wq"], ["query"], name="proj")],  # same name, as in a merged decoder's branches
        "g",
        [helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", "patches", 64]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 1, 64])],
        [helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", "patches", 32]),
         helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", 1, 32])],
        weights,
    )
    source = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    with caplog.at_level(logging.INFO):
        quantize_decoder_int8(source, tmp_path / "decoder_int8.onnx")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("onnxruntime") or r.levelno >= logging.WARNING]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder_int8.onnx"]

    nodes = onnx.load(str(tmp_path / "decoder_int8.onnx")).graph.node
    by_output = {o: n.op_type for n in nodes for o in n.output}
    assert by_output["query"] == "MatMulNBits"
    assert "MatMulInteger" in by_output.values() and "MatMul" not in by_output.values()
    session = ort.InferenceSession(str(tmp_path / "decoder_int8.onnx"), providers=["CPUExecutionProvider"])
    hidden = rng.standard_normal((2, 5, 64)).astype(np.float32)
    tokens = rng.standard_normal((3, 1, 64)).astype(np.float32)
    key, query = session.run(["key", "query"], {"encoder_hidden_states": hidden[:1], "tokens": tokens})
    np.testing.assert_allclose(key, hidden[:1] @ numpy_helper.to_array(weights[0]), atol=0.05)
    np.testing.assert_allclose(query, tokens @ numpy_helper.to_array(weights[1]), atol=0.05)
    # Token rows do not depend on their batch-mates (image rows do, which is why the engine runs them alone).
    alone = [session.run(["query"], {"encoder_hidden_states": hidden[:1], "tokens": tokens[i : i + 1]})[0] for i in range(3)]
    assert np.array_equal(np.concatenate(alone), query)


def test_a_decoder_whose_cached_steps_scale_whole_tensors_is_refused(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import _require_row_wise_steps

    weight = numpy_helper.from_array(np.ones((8, 4), np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["past_key_values.0.decoder.key"], ["q", "scale", "zero"]),
         helper.make_node("MatMulInteger", ["q", "w", "zero"], ["y"])],
        "with_past",
        [helper.make_tensor_value_info("past_key_values.0.decoder.key", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        [weight],
    )
    path = tmp_path / "decoder_with_past_model_int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ExportError, match="decoder_with_past_model_int8.onnx: the decoder's cached steps still scale whole tensors"):
        _require_row_wise_steps(onnx.load(str(path)).graph, path)


def test_the_nbits_quantizer_leaves_logging_as_it_was() -> None:
    """Its module calls logging.basicConfig(INFO) on import; in a fresh process the root logger must stay bare."""
    script = (
        "import logging\n"
        "from export.quantize import _quantizer_logging\n"
        "with _quantizer_logging():\n"
        "    pass\n"
        "root = logging.getLogger()\n"
        "print(len(root.handlers), root.level)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["0", str(logging.WARNING)]


def test_int8_quantizer_prints_no_preprocessing_advice(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The quantizer's "consider pre-processing" advice does not apply to our graphs; other warnings stay."""
    import logging

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import count_quantized_nodes, quantize_int8

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [weight],
    )
    source = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    with caplog.at_level(logging.WARNING):
        quantize_int8(source, tmp_path / "matmul_int8.onnx")
        logging.getLogger().warning("an unrelated warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("pre-processing" in m for m in messages)
    assert "an unrelated warning" in messages
    assert count_quantized_nodes(tmp_path / "matmul_int8.onnx").get("MatMulInteger", 0) == 1


def test_split_and_merged_give_pytorch_tokens(random_checkpoint: Path, tmp_path: Path) -> None:
    """Both layouts, decoded by a plain ORT greedy loop, reproduce PyTorch's greedy tokens."""
    from export.onnx import export_bundle
    from export.validate import compare_greedy, sample_images
    from train.checkpoint import load_checkpoint

    model, processor = load_checkpoint(random_checkpoint)
    for layout in ("split", "merged"):
        bundle = Bundle.load(export_bundle(random_checkpoint, tmp_path / layout, decoder_layout=layout))
        assert bundle.manifest.extra["validation"]["fp32"]["identical_share"] == 1.0
        result = compare_greedy(model, processor, bundle.path, bundle.manifest.onnx_files, bundle.manifest.decoder_layout,
                                sample_images(), max_new_tokens=20)
        assert result.mismatches == []
        assert result.torch_tokens == result.onnx_tokens
        # An untrained model rarely emits EOS at once: the sequences are long enough to mean something.
        assert sum(len(t) for t in result.torch_tokens) > 4 * 5


def test_validation_catches_a_wrong_model(random_checkpoint: Path, tmp_path: Path) -> None:
    """The token check is not vacuous: graphs of another model (same shapes, other seed) fail it loudly."""
    from export.onnx import export_bundle, require_identical
    from export.validate import compare_greedy, sample_images
    from train.checkpoint import load_checkpoint
    from train.presets import build_from_preset

    other, processor = build_from_preset("tiny", CAPTIONS, max_patches=64, seed=1)
    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    bundle = Bundle.load(export_bundle(tmp_path / "other", tmp_path / "b"))
    model, processor = load_checkpoint(random_checkpoint)
    result = compare_greedy(model, processor, bundle.path, bundle.manifest.onnx_files, bundle.manifest.decoder_layout,
                            sample_images(), max_new_tokens=12)
    assert result.mismatches and result.identical_share < 1.0
    with pytest.raises(ExportError, match=r"greedy tokens differ from PyTorch on \d/4 validation images"):
        require_identical(result, random_checkpoint)


def test_tampered_or_missing_file_is_rejected(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    Bundle.load(copy)
    encoder = copy / Bundle.load(copy).manifest.onnx_files["encoder"]
    data = bytearray(encoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    encoder.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(copy)
    shutil.copy2(tiny_bundle / encoder.name, encoder)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json"):
        Bundle.load(copy)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_large_graphs_keep_their_weights_beside_them(
    random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantize: str | None
) -> None:
    """Above WEIGHTS_BESIDE_MIN_BYTES (here every graph) a graph's weights go to `<graph>.data`, listed and hashed in
    the manifest; the engine captions exactly as with one-file graphs, and a damaged weights file is named."""
    import export.optimize
    from engine.captioner import Captioner
    from export.onnx import export_bundle
    from export.validate import sample_images

    whole = Bundle.load(export_bundle(random_checkpoint, tmp_path / "whole", quantize=quantize))
    assert not any(name.endswith(".data") for name in whole.manifest.files)  # tiny graphs stay one file
    monkeypatch.setattr(export.optimize, "WEIGHTS_BESIDE_MIN_BYTES", 0)
    beside = Bundle.load(export_bundle(random_checkpoint, tmp_path / "beside", quantize=quantize))
    graphs = beside.manifest.onnx_files.values()
    assert {name for name in beside.manifest.files if name.endswith(".data")} == {f"{g}.data" for g in graphs}
    assert beside.manifest.graph_files() == {*graphs, *(f"{g}.data" for g in graphs)}
    for graph in graphs:
        assert (beside.path / graph).stat().st_size < (beside.path / f"{graph}.data").stat().st_size
    images = sample_images()
    assert Captioner(beside.path, threads=1).caption(images) == Captioner(whole.path, threads=1).caption(images)

    weights = beside.path / f"{beside.manifest.onnx_files['encoder']}.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{re.escape(weights.name)}: sha256 does not match"):
        Captioner(beside.path, threads=1)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # cut short: ONNX Runtime refuses it, the hash says why
    with pytest.raises(ModelRuntimeError):
        Captioner(beside.path, threads=1, verify=False)
    with pytest.raises(BundleError, match=rf"{re.escape(weights.name)}: sha256 does not match"):
        Captioner(beside.path, threads=1)

    # A graph that ONNX Runtime loads but the decoder loop cannot use (its logits renamed) is named as such,
    # and as the changed file it is when the bundle is verified.
    import onnx

    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # the weights as exported again
    decoder = beside.path / beside.manifest.onnx_files["decoder_merged"]
    graph = onnx.load(str(decoder), load_external_data=False)
    for node in graph.graph.node:
        node.output[:] = ["scores" if name == "logits" else name for name in node.output]
    next(o for o in graph.graph.output if o.name == "logits").name = "scores"
    onnx.save(graph, str(decoder))
    with pytest.raises(ModelRuntimeError, match="decoder lacks output logits"):
        Captioner(beside.path, threads=1, verify=False)
    with pytest.raises(BundleError, match=rf"{re.escape(decoder.name)}: sha256 does not match"):
        Captioner(beside.path, threads=1)


def test_existing_out_refused_unless_force(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.onnx import export_bundle

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_bundle(random_checkpoint, out)
    # --force replaces a bundle, never a folder of other files nor the folder holding the checkpoint.
    with pytest.raises(ExportError, match="is not an edlight bundle"):
        export_bundle(random_checkpoint, out, force=True)
    with pytest.raises(ExportError, match="which this export reads"):
        export_bundle(random_checkpoint, random_checkpoint.parent, force=True)
    assert (out / "keep.txt").read_text() == "mine" and (random_checkpoint / "config.json").is_file()
    # Nor inside a checkpoint (or the other checkpoint of its run): training replaces those folders whole.
    run = tmp_path / "run"
    shutil.copytree(random_checkpoint, run / "last")
    (run / "run_config.json").write_text("{}")
    for inside in (run / "last" / "onnx", run / "best" / "onnx", run / "best"):
        with pytest.raises(ExportError, match=r"inside the checkpoint folder .*replaces whole at its next save"):
            export_bundle(run / "last", inside)
        assert not inside.exists()
    (out / "keep.txt").unlink()
    export_bundle(random_checkpoint, out, force=True)  # an empty folder
    first = json.loads((out / "edlight.json").read_text())["created"]
    export_bundle(random_checkpoint, out, force=True)  # an earlier bundle
    assert json.loads((out / "edlight.json").read_text())["created"] >= first
    Bundle.load(out)
    assert not _leftovers(tmp_path, "bundle")
    (out / ".DS_Store").write_bytes(b"a Finder's view settings")  # a Finder's files go with the bundle
    (out / "._edlight.json").write_bytes(b"AppleDouble")
    export_bundle(random_checkpoint, out, force=True)
    # Other hidden files are the user's: a .git of the bundle's history, notes (--force deleted them silently).
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".notes").write_text("mine")
    with pytest.raises(ExportError, match=r"bundle: holds files that are not part of its bundle \(.git/, .notes\)"):
        export_bundle(random_checkpoint, out, force=True)
    assert (out / ".notes").read_text() == "mine" and (out / ".git" / "objects").is_dir()
    shutil.rmtree(out / ".git")
    (out / ".notes").unlink()
    # A bundle folder the user also keeps other things in: --force would delete them with the bundle.
    (out / "captions.jsonl").write_text("mine")
    (out / "archive").mkdir()
    with pytest.raises(ExportError, match=r"bundle: holds files that are not part of its bundle \(archive/, captions.jsonl\)"):
        export_bundle(random_checkpoint, out, force=True)
    assert (out / "captions.jsonl").read_text() == "mine" and (out / "archive").is_dir()


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_export(random_checkpoint: Path, tmp_path: Path) -> None:
    """A dangling link at --out was found by the final rename, after the whole export, and called a storage
    failure; a name too long for the file system, and an empty --out (the current folder), gave a traceback or
    were taken."""
    from export.cli import export
    from export.onnx import export_bundle

    dangling = tmp_path / "current"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(ExportError, match=r"current: a link to .*gone, which does not exist; remove the link or choose another --out"):
        export_bundle(random_checkpoint, dangling, force=True)
    with pytest.raises(ExportError, match=r"x{300}: cannot be the bundle's folder \(File name too long\)"):
        export_bundle(random_checkpoint, tmp_path / ("x" * 300))
    with pytest.raises(ExportError, match=r"y{300}: cannot read the checkpoint \(File name too long\)"):
        export_bundle(tmp_path / ("y" * 300), tmp_path / "out")
    empty = CliRunner().invoke(export, [str(random_checkpoint), "--out", ""])
    assert empty.exit_code == 2 and "an empty path (an unset variable?)" in empty.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current"]


def test_force_on_a_mount_point_is_refused_before_the_export(random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume mounted at --out (a container's): the finished bundle could not be renamed over it, which
    was found only after the whole export."""
    from export.onnx import export_bundle

    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)  # mounting needs privileges CI lacks
    with pytest.raises(ExportError, match=r"volume: is a mount point, which --force cannot replace; choose a folder inside it"):
        export_bundle(random_checkpoint, out, force=True)
    assert not any(out.iterdir()) and not _leftovers(tmp_path, "volume")


def test_force_on_a_linked_out_replaces_the_link_and_keeps_its_target(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.onnx import export_bundle

    real, link = tmp_path / "v3", tmp_path / "current"
    export_bundle(random_checkpoint, real)
    (real / "notes.txt").write_text("kept with v3")  # only the link is replaced: this is no reason to refuse
    link.symlink_to(real)
    export_bundle(random_checkpoint, link, force=True)
    assert link.is_dir() and not link.is_symlink()
    Bundle.load(link), Bundle.load(real)  # the link's target is another name's bundle: kept
    assert (real / "notes.txt").read_text() == "kept with v3"
    assert not _leftovers(tmp_path, "current")  # the set-aside link went too: nothing to "put back" later
    shutil.rmtree(link)
    export_bundle(random_checkpoint, link)
    assert not link.is_symlink() and not _leftovers(tmp_path, "current")


def test_bad_data_is_refused_before_the_export_runs(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.onnx import export_bundle
    from train.data import DataError

    data = tmp_path / "data"
    for split in ("train", "test"):  # split folders decide the split
        (data / split).mkdir(parents=True)
        (data / split / f"broken_{split}.png").write_bytes(b"not a png")
        (data / split / "metadata.jsonl").write_text(json.dumps({"file_name": f"broken_{split}.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="broken_test.png") as refused:
        export_bundle(random_checkpoint, tmp_path / "bundle", data=data)
    assert "broken_train.png" not in str(refused.value)  # only the test split is used, so only it is checked
    assert not (tmp_path / "bundle").exists() and not _leftovers(tmp_path, "bundle")
    from export.onnx import ExportError

    for given, message in ((tmp_path / "nowhere", "data folder not found"), (data / "test" / "metadata.jsonl", "a file, not a data folder")):
        with pytest.raises(ExportError, match=f"{re.escape(str(given))}: {message}; pass a folder with images"):
            export_bundle(random_checkpoint, tmp_path / "bundle", data=given)


def _page(path: Path, caption: str) -> dict[str, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "white").save(path)
    return {"file_name": path.name, "text": caption}


def test_an_empty_test_split_is_refused_before_the_export_runs(
    random_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--data needs test images (validation, parity): say so before minutes of export, not after."""
    from export.onnx import export_bundle

    data = tmp_path / "data"  # the split folders put everything in train/
    row = _page(data / "train" / "a.png", "a page")
    (data / "train" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with caplog.at_level(logging.INFO, logger="edlight.export"), pytest.raises(ExportError, match="the test split is empty"):
        export_bundle(random_checkpoint, tmp_path / "bundle", data=data)
    assert "exporting with Optimum" not in caplog.text
    assert not (tmp_path / "bundle").exists() and not _leftovers(tmp_path, "bundle")


def test_run_folder_is_refused_with_the_checkpoints_to_pass(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.cli import export

    shutil.copytree(random_checkpoint, tmp_path / "run" / "best")
    result = CliRunner().invoke(export, [str(tmp_path / "run"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2  # cannot run (1: a check of the export failed)
    assert f"is a training run, not a checkpoint; pass {tmp_path / 'run' / 'best'} (best test BLEU)" in result.output


def test_export_and_parity_read_the_data_as_the_training_run_did(
    random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained with --caption-column caption on a folder with train/ and test/ (the imagefolder split
    layout): export --data and parity find its captions through RUN/run_config.json and check on test/ only,
    images 1 and 3 pixels high among them; parity's options say the same for a checkpoint without a run."""
    from export.onnx import export_bundle
    from export.parity_cli import parity
    from export.validate import sample_images

    run = tmp_path / "run"
    shutil.copytree(random_checkpoint, run / "best")
    (run / "run_config.json").write_text(json.dumps({"caption_column": "caption", "skip_bad": False, "test_ratio": 0.1}))
    rng = np.random.default_rng(0)
    thin = [Image.fromarray(rng.integers(0, 256, (height, 200, 3), dtype=np.uint8)) for height in (1, 3)]
    pages = sample_images()
    data = tmp_path / "data"
    for split, images in (("test", [*thin, pages[0]]), ("train", pages[1:])):
        (data / split).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(data / split / f"{i}.png")
        rows = [json.dumps({"file_name": f"{i}.png", "caption": CAPTIONS[i]}) + "\n" for i in range(len(images))]
        (data / split / "metadata.jsonl").write_text("".join(rows))

    monkeypatch.chdir(tmp_path)  # given as typed, relative: the manifest, read from anywhere, holds absolute paths
    bundle = Bundle.load(export_bundle(Path("run/best"), tmp_path / "bundle", data=Path("data")))
    shipped = bundle.manifest.parity
    assert shipped is not None and shipped["passed"] is True and shipped["images"] == 3  # test/ only
    assert shipped["checkpoint"] == str(run / "best") and shipped["data"] == str(data)
    assert shipped["data_settings"].startswith("caption column 'caption'") and "run_config.json" in shipped["data_settings"]

    bare = tmp_path / "bare"  # the same checkpoint outside its run: nothing recorded
    shutil.copytree(random_checkpoint, bare)
    args = ["--model", str(bundle.path), "--checkpoint", str(bare), "--data", str(data)]
    result = CliRunner().invoke(parity, args)
    assert result.exit_code == 2 and "no row has 'text'; columns seen: caption, file_name" in result.output
    result = CliRunner().invoke(parity, [*args, "--caption-column", "caption"])
    assert result.exit_code == 0, result.output
    assert f"test split of {data}: 3 images" in result.output and "PASSED" in result.output
    with (data / "test" / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "missing.png", "caption": "gone"}) + "\n")
    result = CliRunner().invoke(parity, [*args, "--caption-column", "caption"])
    assert result.exit_code == 2 and "missing.png: image not found" in result.output
    result = CliRunner().invoke(parity, [*args, "--caption-column", "caption", "--skip-bad"])
    assert result.exit_code == 0 and "3 images" in result.output, result.output


def test_the_export_prints_its_own_stages_not_transformers_notices(random_checkpoint: Path, tmp_path: Path) -> None:
    """A fresh process (transformers prints each notice once per process): Optimum reloading the processor
    made transformers say to set `use_fast`, which Pix2Struct, having no fast image processor, cannot."""
    command = [sys.executable, "-m", "engine.cli", "export", str(random_checkpoint), "--out", str(tmp_path / "b")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "export: exporting with Optimum" in result.stderr
    assert "use_fast" not in result.stderr, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_export_leaves_no_bundle(random_checkpoint: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Kill a real export once its ONNX files exist: `out` must not appear and no staging dir may load."""
    out = tmp_path / "bundle"
    # Ctrl-C and a service manager's stop through the CLI (which says so and exits 130 / 143), a kill through the API.
    command = (
        ["-m", "engine.cli", "export", str(random_checkpoint), "--out", str(out)] if sig != signal.SIGKILL
        else ["-c", f"from export.onnx import export_bundle; export_bundle({str(random_checkpoint)!r}, {str(out)!r})"]
    )
    proc = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((d / "bundle").is_dir() and any((d / "bundle").glob("*.onnx")) for d in _leftovers(tmp_path, "bundle")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=60)[1]
        assert proc.returncode != 0
        if sig != signal.SIGKILL:
            assert proc.returncode == 128 + sig and f"interrupted: no partial bundle is left at {out}" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    for leftover in _leftovers(tmp_path, "bundle"):
        for candidate in [leftover, *[p for p in leftover.rglob("*") if p.is_dir()]]:
            with pytest.raises(BundleError):
                Bundle.load(candidate)
    if sig != signal.SIGKILL:  # a catchable interruption cleans up after itself
        assert not _leftovers(tmp_path, "bundle")
    else:  # a kill cannot: the next export to `out` removes what the dead one left
        from export.onnx import _clear_dead_exports

        assert _leftovers(tmp_path, "bundle")
        _clear_dead_exports(out)
        assert not _leftovers(tmp_path, "bundle")


def test_an_interrupt_between_the_two_renames_puts_the_old_bundle_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import onnx

    out, staged = tmp_path / "bundle", tmp_path / "staged"
    for folder, text in ((out, "old"), (staged, "new")):
        folder.mkdir()
        (folder / "edlight.json").write_text(text)
    replace, calls = os.replace, []

    def interrupted_second_rename(src: object, dst: object) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # the old bundle is aside, the new one not yet in place: Ctrl-C here
            raise KeyboardInterrupt
        replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        onnx._move_into_place(staged, out, force=True)
    assert (out / "edlight.json").read_text() == "old" and (staged / "edlight.json").read_text() == "new"
    assert not _leftovers(tmp_path, "bundle")


def test_a_full_disk_is_named_at_the_bundle_and_keeps_the_old_one(
    random_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optimum reports a full disk as its export failing, under the checkpoint's name ("[Errno 28]"), or
    as "The post-processing of the ONNX export failed" with the cause only in the chain. The error names
    the bundle and the cause; the old bundle stays and nothing half-built is left."""
    import errno

    from export import onnx

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "edlight.json").write_text("old")

    def optimum_out_of_room(*args: object, **kwargs: object) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:  # how Optimum's post-processing wraps it
            raise RuntimeError("The post-processing of the ONNX export failed.") from cause

    def wrapped(*args: object, **kwargs: object) -> None:
        try:
            optimum_out_of_room()
        except RuntimeError as exc:
            raise ExportError(f"{random_checkpoint}: Optimum ONNX export failed: {exc}") from exc

    monkeypatch.setattr(onnx, "_build", wrapped)
    with pytest.raises(ExportError, match=rf"^{re.escape(str(out))}: cannot write the bundle: No space left on device .*nothing at --out was changed"):
        onnx.export_bundle(random_checkpoint, out, force=True)
    assert (out / "edlight.json").read_text() == "old" and not _leftovers(tmp_path, "bundle")

    def parity_failed(*args: object, **kwargs: object) -> None:
        raise ExportError("parity check failed")  # our own error stays as it is

    monkeypatch.setattr(onnx, "_build", parity_failed)
    with pytest.raises(ExportError, match="^parity check failed$"):
        onnx.export_bundle(random_checkpoint, out, force=True)


def test_a_bundle_set_aside_by_a_killed_export_is_put_back(tmp_path: Path) -> None:
    from export.onnx import _clear_dead_exports

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(dead.stdout), socket.gethostname()  # a process that has ended
    set_aside = tmp_path / f".bundle.old-{pid}@{host}"  # killed between moving the old bundle away and the new one in
    set_aside.mkdir()
    (set_aside / "edlight.json").write_text("{}")
    keep = [
        tmp_path / f".bundle.partial-{os.getpid()}@{host}-abcd1234",  # a live export's staging folder
        tmp_path / f".bundle.partial-{pid}@another-host-abcd1234",  # a pid on another machine means nothing here
        tmp_path / f".bundle.old-2024-05.old-{pid}@{host}",  # the set-aside folder of a bundle named "bundle.old-2024-05"
        tmp_path / f".bundle.partial-99999999999999999999@{host}-abcd1234",  # no pid of ours
    ]
    for folder in keep:
        folder.mkdir()
    _clear_dead_exports(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "edlight.json").exists() and not set_aside.exists()
    assert all(folder.exists() for folder in keep)


def test_a_bundle_named_up_to_the_file_system_limit_is_staged_replaced_and_put_back(tmp_path: Path) -> None:
    """The staging folder and the set-aside bundle are named after --out: a legal name near 255 bytes made
    them too long to create ("File name too long" after the whole export)."""
    from export.onnx import LEFTOVER_SUFFIX_BYTES, _clear_dead_exports, _move_into_place, _place_temp_dir

    out = tmp_path / ("b" * 250)
    first = _place_temp_dir(out, force=False, inputs=[])
    (first / "edlight.json").write_text('{"v": 1}')
    _move_into_place(first, out, force=False)
    second = _place_temp_dir(out, force=True, inputs=[])
    (second / "edlight.json").write_text('{"v": 2}')
    _move_into_place(second, out, force=True)  # the old bundle is set aside, then discarded
    assert (out / "edlight.json").read_text() == '{"v": 2}' and [p.name for p in tmp_path.iterdir()] == [out.name]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.rename(tmp_path / f"{sibling_stem(out.name, LEFTOVER_SUFFIX_BYTES)}.old-{int(dead.stdout)}@{socket.gethostname()}")  # killed mid-swap
    _clear_dead_exports(out)
    assert (out / "edlight.json").read_text() == '{"v": 2}' and [p.name for p in tmp_path.iterdir()] == [out.name]


def _broken_copy(checkpoint: Path, tmp_path: Path, how: str) -> Path:
    ck = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    if how == "not_pix2struct":
        config = json.loads((ck / "config.json").read_text())
        config["model_type"] = "t5"
        (ck / "config.json").write_text(json.dumps(config))
    elif how == "no_processor":
        (ck / "preprocessor_config.json").unlink()
    elif how == "no_tokenizer":
        (ck / "tokenizer.json").unlink()
    elif how == "weights_of_another_model":  # transformers fills what is missing with random values, and only logs it
        from safetensors.numpy import save_file

        save_file({"unrelated": np.zeros(1, dtype=np.float32)}, str(ck / "model.safetensors"))
    elif how == "more_layers_than_the_weights":
        config = json.loads((ck / "config.json").read_text())
        config["text_config"]["num_layers"] += 1
        (ck / "config.json").write_text(json.dumps(config))
    elif how in ("length_as_text", "negative_length"):  # transformers' error named neither the file nor the setting
        generation = json.loads((ck / "generation_config.json").read_text())
        (ck / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": "20" if how == "length_as_text" else -1}))
    elif how == "text_config_not_an_object":
        config = json.loads((ck / "config.json").read_text())
        (ck / "config.json").write_text(json.dumps({**config, "text_config": [1]}))
    elif how == "patches_the_model_does_not_embed":
        processor = json.loads((ck / "preprocessor_config.json").read_text())
        (ck / "preprocessor_config.json").write_text(json.dumps({**processor, "patch_size": {"height": 8, "width": 8}}))
    elif how in ("tokenizer_not_a_tokenizer", "tokenizer_config_not_json"):
        (ck / ("tokenizer.json" if how == "tokenizer_not_a_tokenizer" else "tokenizer_config.json")).write_text("{")
    elif how == "broken_shard_index":
        (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
        (ck / "model.safetensors.index.json").write_text("not json")
    elif how == "spiece_only":  # a SentencePiece checkpoint (as T5's): transformers converts it only with sentencepiece
        (ck / "tokenizer.json").unlink()
        (ck / "spiece.model").write_bytes(b"a SentencePiece model")
    elif how == "no_weights":
        (ck / "model.safetensors").unlink()
        (ck / "training_args.bin").write_bytes(b"a Trainer's arguments, not weights")
    elif how == "non_causal":
        config = json.loads((ck / "config.json").read_text())
        config["text_config"]["is_decoder"] = False
        (ck / "config.json").write_text(json.dumps(config))
    elif how == "bad_generation":
        (ck / "generation_config.json").write_text("{not json")
    elif how == "too_few_patches":
        processor = json.loads((ck / "preprocessor_config.json").read_text())
        (ck / "preprocessor_config.json").write_text(json.dumps({**processor, "max_patches": 2}))
    elif how in ("vqa", "patch_size_number"):
        processor = json.loads((ck / "preprocessor_config.json").read_text())
        edit = {"is_vqa": True} if how == "vqa" else {"patch_size": 16}
        (ck / "preprocessor_config.json").write_text(json.dumps({**processor, **edit}))
    elif how in ("eos_as_text", "sequence_bias_as_saved_from_a_dict"):
        generation = json.loads((ck / "generation_config.json").read_text())
        # transformers saves a {(5, 6): 2.0} sequence_bias with string keys, which its generate then refuses
        edit = {"eos_token_id": "1"} if how == "eos_as_text" else {"sequence_bias": {"(5, 6)": 2.0}}
        (ck / "generation_config.json").write_text(json.dumps({**generation, **edit}))
    elif how == "suppressed_token_outside_the_vocabulary":  # the bundle was written, then every caption run refused it
        generation = json.loads((ck / "generation_config.json").read_text())
        (ck / "generation_config.json").write_text(json.dumps({**generation, "suppress_tokens": [10**6]}))
    elif how == "weights_cut_short":  # a copy cut short: the error named the folder only
        weights = ck / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "config_not_an_object":
        (ck / "config.json").write_text("[1, 2]")
    elif how == "patches_as_text":
        processor = json.loads((ck / "preprocessor_config.json").read_text())
        (ck / "preprocessor_config.json").write_text(json.dumps({**processor, "max_patches": "256"}))
    elif how == "head_counts_differ":
        config = json.loads((ck / "config.json").read_text())
        config["vision_config"]["num_attention_heads"] = 2 * config["text_config"]["num_heads"]
        (ck / "config.json").write_text(json.dumps(config))
    return ck


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("not_pix2struct", "not 'pix2struct'"),
        ("no_processor", "preprocessor_config.json: processor config missing"),
        ("no_tokenizer", "tokenizer.json: missing"),
        ("weights_of_another_model", r"model.safetensors: holds no values for (\d+) of the model's \1 tensors \(decoder"),
        ("more_layers_than_the_weights", r"model.safetensors: holds no values for \d+ of the model's \d+ tensors \(decoder.layer.\d"),
        ("length_as_text", r"generation_config.json: max_new_tokens"),
        ("negative_length", r"generation_config.json: max_new_tokens"),
        ("text_config_not_an_object", r"config.json: text_config is \[1\], not an object of the text model's settings"),
        ("patches_the_model_does_not_embed", r"preprocessor_config.json: patch_size 8x8 gives patches of 192 values, and the "
                                             r"model's vision_config.patch_embed_hidden_size \(config.json\) embeds \d+"),
        ("tokenizer_not_a_tokenizer", r"tokenizer.json: not a tokenizer the tokenizers library can read \(EOF while parsing"),
        ("tokenizer_config_not_json", r"tokenizer_config.json: unreadable tokenizer config"),
        ("broken_shard_index", r"model.safetensors.index.json: unreadable weights index"),
        ("spiece_only", r"its tokenizer is spiece.model alone \(SentencePiece\), and edlight reads tokenizer.json; write it once "
                        r"with `pip install sentencepiece protobuf` and `python -c 'from transformers import AutoTokenizer"),
        ("no_weights", "no model weights"),
        ("non_causal", "is_decoder is false"),
        ("bad_generation", "generation_config.json: unreadable generation config"),
        ("too_few_patches", "max_patches is 2; .* an integer >= 4"),
        ("vqa", "preprocessor_config.json: is_vqa is true: a VQA checkpoint"),
        ("patch_size_number", r"preprocessor_config.json: patch_size is 16; write it as \{"),
        ("eos_as_text", "generation_config.json: eos_token_id in generation_config.json is '1'; token ids are whole"),
        ("head_counts_differ", "config.json: the vision encoder has .* attention heads and the text decoder"),
        ("sequence_bias_as_saved_from_a_dict", r"generation_config.json: sequence_bias must be a non-empty list"),
        ("suppressed_token_outside_the_vocabulary", r"generation_config.json: names tokens the model does not have "
                                                    r"\(vocabulary of \d+\): \[1000000\]"),
        ("config_not_an_object", "config.json: model config is not a JSON object"),
        ("weights_cut_short", r"model.safetensors: not a readable safetensors file \(Error while deserializing header"),
    ],
)
def test_bad_checkpoint_is_one_line_error(random_checkpoint: Path, tmp_path: Path, how: str, message: str) -> None:
    from export.onnx import export_bundle

    ck = _broken_copy(random_checkpoint, tmp_path, how)
    with pytest.raises(ExportError, match=message) as info:
        export_bundle(ck, tmp_path / "out")
    assert str(ck) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("config_not_an_object", "config.json: the model config is not a JSON object"),
        ("text_config_not_an_object", r"config.json: text_config is \[1\], not an object of the text model's settings"),
        ("patches_as_text", "preprocessor_config.json: max_patches is '256'; set a whole number of patches"),
        ("patches_the_model_does_not_embed", r"preprocessor_config.json: patch_size 8x8 gives patches of 192 values"),
        ("patch_size_number", r"preprocessor_config.json: patch_size is 16; write it as \{"),
        ("vqa", "preprocessor_config.json: is_vqa is true: a VQA checkpoint"),
        ("length_as_text", "generation_config.json: max_new_tokens"),
        ("eos_as_text", "generation_config.json: eos_token_id in generation_config.json is '1'; token ids are whole"),
        ("suppressed_token_outside_the_vocabulary", r"generation_config.json: names tokens the model does not have"),
    ],
)
def test_checkpoints_refused_by_export_are_refused_by_every_command(random_checkpoint: Path, tmp_path: Path, how: str, message: str) -> None:
    """evaluate, parity, bench and train --base check a checkpoint with train.checkpoint.check_checkpoint_dir: it ran
    these into transformers' own errors ("'list' object has no attribute 'get'", "mat1 and mat2 shapes cannot be
    multiplied"), tracebacks that named no file, or into a BLEU of a model that read no patches."""
    from train.checkpoint import CheckpointError, check_checkpoint_dir

    ck = _broken_copy(random_checkpoint, tmp_path, how)
    with pytest.raises(CheckpointError, match=message) as info:
        check_checkpoint_dir(ck)
    assert str(ck) in str(info.value) and "\n" not in str(info.value)


def test_a_processor_config_without_max_patches_is_transformers_default(random_checkpoint: Path, tmp_path: Path) -> None:
    """Unset, max_patches is 2048 to transformers and to the engine: no reason to refuse the checkpoint."""
    from train.checkpoint import check_checkpoint_dir

    ck = Path(shutil.copytree(random_checkpoint, tmp_path / "ck"))
    processor = json.loads((ck / "preprocessor_config.json").read_text())
    del processor["max_patches"]
    (ck / "preprocessor_config.json").write_text(json.dumps(processor))
    assert check_checkpoint_dir(ck) == ck


def test_evaluate_names_a_bad_checkpoint_setting_exit_2(random_checkpoint: Path, synth_data: Path, tmp_path: Path) -> None:
    from train.cli import evaluate

    ck = _broken_copy(random_checkpoint, tmp_path, "vqa")
    result = CliRunner().invoke(evaluate, [str(ck), "--data", str(synth_data)])
    assert result.exit_code == 2 and f"error: {ck / 'preprocessor_config.json'}: is_vqa is true" in result.output, result.output


def test_missing_checkpoint_and_unwritable_out(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.onnx import export_bundle

    with pytest.raises(ExportError, match=r"nope: checkpoint not found"):
        export_bundle(tmp_path / "nope", tmp_path / "out")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # Root ignores permission bits, so block the output with a file where a directory must go.
    with pytest.raises(ExportError, match=r"out: cannot create its folder .*file: a file, not a folder; choose another --out"):
        export_bundle(random_checkpoint, blocker / "out")
    with pytest.raises(ExportError, match=r"out: cannot create its folder .*file/deeper: a file, not a folder"):
        export_bundle(random_checkpoint, blocker / "deeper" / "out")


def test_cli_export_and_errors(random_checkpoint: Path, tmp_path: Path) -> None:
    from export.cli import export
    from export.onnx import export_bundle

    runner = CliRunner()
    result = runner.invoke(export, [str(random_checkpoint), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    # A few tokens per image, said as such: an int8 export's 50% "identical" read as whole captions beside parity's 0%.
    assert re.search(r"identical greedy tokens \(the first \d+\) 100%", result.output), result.output
    assert Bundle.load(tmp_path / "b").manifest.extra["validation"]["fp32"]["max_new_tokens"] <= 16
    Bundle.load(tmp_path / "b")
    again = runner.invoke(export, [str(random_checkpoint), "--out", str(tmp_path / "b")])
    assert again.exit_code == 2
    assert again.output.strip().count("\n") == 0 and "--force" in again.output
    missing = runner.invoke(export, [str(tmp_path / "missing"), "--out", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output
    # The parity check's options without --data did nothing, said nothing, and the manifest had no parity.
    alone = runner.invoke(export, [str(random_checkpoint), "--out", str(tmp_path / "c"), "--tolerance", "0.5", "--test-ratio", "0.3"])
    assert alone.exit_code == 2 and "--tolerance, --test-ratio only apply with --data" in alone.output
    with pytest.raises(ExportError, match="tolerance, min_identical given without data"):
        export_bundle(random_checkpoint, tmp_path / "c", tolerance=0.5, min_identical=0.9)
    assert not (tmp_path / "c").exists()


def test_trained_fp32_bundle_tokens_equal_pytorch_on_test_images(tiny_checkpoint: Path, tiny_bundle: Path, synth_data: Path) -> None:
    """The shared tiny trained model: ONNX greedy tokens equal PyTorch's on every test image."""
    from PIL import Image

    from export.validate import compare_greedy
    from train.checkpoint import load_checkpoint
    from train.data import load_split

    model, processor = load_checkpoint(tiny_checkpoint)
    bundle = Bundle.load(tiny_bundle)
    images = [Image.open(e.path).convert("RGB") for e in load_split(synth_data, "test")]
    assert len(images) >= 10
    result = compare_greedy(model, processor, bundle.path, bundle.manifest.onnx_files, bundle.manifest.decoder_layout,
                            images, max_new_tokens=bundle.default_max_new_tokens)
    assert result.mismatches == [] and result.identical_share == 1.0


def test_pytorch_captions_leave_out_the_generation_settings_the_engine_does_not_apply(
    tiny_checkpoint: Path, tiny_bundle: Path, synth_data: Path
) -> None:
    """A checkpoint's stop_strings crashed train's per-epoch BLEU (after a whole epoch), evaluate and parity
    (transformers wants a tokenizer for them); max_time, an exponential length penalty or no EOS in
    generation_config.json changed PyTorch's captions, so parity failed and train chose best/ on a decoding
    the engine never does. edlight's PyTorch decoding is the engine's: those settings off, EOS from config.json."""
    from engine import Captioner
    from train.checkpoint import load_checkpoint
    from train.data import load_split
    from train.evaluate import generate_captions

    model, processor = load_checkpoint(tiny_checkpoint)
    images = [e.path for e in load_split(synth_data, "test")][:6]
    plain = generate_captions(model, processor, images, batch_size=3)
    assert plain == Captioner(tiny_bundle, threads=1).caption(images)
    settings = model.generation_config
    settings.stop_strings, settings.max_time, settings.eos_token_id = ["a"], 1e-9, None
    settings.exponential_decay_length_penalty = (1, 3.0)
    assert generate_captions(model, processor, images, batch_size=3) == plain
    settings.return_dict_in_generate, settings.output_scores = True, True  # generate returned an object, not ids
    settings.prompt_lookup_num_tokens, settings.use_cache = 3, False  # assisted decoding without a cache: an error
    assert generate_captions(model, processor, images, batch_size=3) == plain
    assert (settings.stop_strings, settings.eos_token_id) == (["a"], None)  # the model's own config is left as it was


def test_trained_int8_bundle_verifies(tiny_bundle_int8: Path) -> None:
    bundle = Bundle.load(tiny_bundle_int8)
    assert bundle.manifest.quantization == "int8"
    assert all(name.endswith("_int8.onnx") for name in bundle.manifest.onnx_files.values())
    # A trained model's int8 greedy tokens stay mostly those of PyTorch. On 4 images one early flip moves
    # the share a lot: measured 0.78 for this fixture, 0.70 and 0.80 for the last two shipped default bundles.
    assert bundle.manifest.extra["validation"]["int8"]["token_agreement"] >= 0.7



def test_logits_processors_lengths_and_space_clean_up_of_a_checkpoint(
    random_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repetition penalty is the PyTorch side's, not the graphs': the export validates the graphs without
    it, and the engine applies it from the bundle's generation config, as the no-repeat n-gram size, a
    minimum length, suppressed and banned tokens, and the tokenizer's clean-up of spaces."""
    from engine import Captioner
    from export.onnx import export_bundle

    ck = Path(shutil.copytree(random_checkpoint, tmp_path / "ck"))
    generation = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(
        json.dumps({**generation, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 3,
                    "suppress_tokens": [5], "bad_words_ids": [[7, 8]]})
    )
    tokenizer = json.loads((ck / "tokenizer_config.json").read_text())
    # Any true value turns the clean-up on in transformers' decode (1 was left out: only `true` was carried).
    (ck / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "clean_up_tokenization_spaces": 1}))
    # tokenizer_config.json marks <unk> special and tokenizer.json does not: transformers' decode drops it (the
    # engine, reading a copy of tokenizer.json alone, wrote "<unk>" into captions).
    pieces = json.loads((ck / "tokenizer.json").read_text())
    for token in pieces["added_tokens"]:
        token["special"] = token["content"] != "<unk>"
    (ck / "tokenizer.json").write_text(json.dumps(pieces))
    with caplog.at_level(logging.WARNING, logger="edlight.export"):
        export_bundle(ck, tmp_path / "b")
    assert "not used by the engine" not in caplog.text
    captioner = Captioner(tmp_path / "b", threads=1)
    assert (captioner.generation.repetition_penalty, captioner.generation.no_repeat_ngram_size) == (1.5, 2)
    assert captioner.generation.min_new_tokens == 3
    assert (captioner.generation.suppress_tokens, captioner.generation.bad_words_ids) == ((5,), ((7, 8),))
    assert captioner.tokenizer.clean_up_spaces
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == {"clean_up_tokenization_spaces": True}
    from transformers import Pix2StructProcessor

    processor = Pix2StructProcessor.from_pretrained(ck)
    ids = [2, *processor.tokenizer.encode("it is n't so , is it ?", add_special_tokens=False), 2]
    assert captioner.tokenizer.decode(ids) == processor.batch_decode([ids], skip_special_tokens=True)[0]
    assert "<unk>" not in captioner.tokenizer.decode(ids) and "n't" in captioner.tokenizer.decode(ids)


def test_a_bundle_tokenizer_that_decodes_other_text_than_transformers_is_refused(
    random_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import Pix2StructProcessor

    from export.onnx import _check_decoding, _write_tokenizer

    processor = Pix2StructProcessor.from_pretrained(random_checkpoint)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _write_tokenizer(processor, bundle)
    _check_decoding(processor, bundle)  # as transformers loaded it: the same text
    pieces = json.loads((bundle / "tokenizer.json").read_text())
    for token in pieces["added_tokens"]:
        token["special"] = False  # "</s>" and "<pad>" would come out as text
    (bundle / "tokenizer.json").write_text(json.dumps(pieces))
    with pytest.raises(ExportError, match=r"tokenizer.json: the engine decodes ids \[.*\] as '.*' where transformers gives"):
        _check_decoding(processor, bundle)


def test_generation_settings_the_engine_ignores_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from export.onnx import _warn_about_generation

    with caplog.at_level(logging.WARNING, logger="edlight.export"):
        _warn_about_generation(tmp_path / "g.json", {"do_sample": False, "num_beams": 1, "top_k": 50, "max_new_tokens": 48})
        # save_pretrained's "use_cache": false was warned about, with a hint on beams: it changes no caption.
        _warn_about_generation(tmp_path / "g.json", {"use_cache": False, "cache_implementation": "static"})
        assert not caplog.records  # transformers' defaults: nothing to say
        _warn_about_generation(tmp_path / "g.json", {"do_sample": True, "top_k": 1, "max_new_tokens": 100_000})
        _warn_about_generation(tmp_path / "g.json", {"guidance_scale": 1.5, "watermarking_config": {"bias": 2.0},
                                                     "num_return_sequences": 1, "stop_strings": ["."]})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "do_sample, top_k not used by the engine" in messages and "may run to 100000 tokens" in messages
    assert "guidance_scale, watermarking_config, stop_strings not used by the engine" in messages


def test_a_bind_mount_of_the_same_file_system_is_a_mount_point(tmp_path: Path) -> None:
    # `docker -v /host/dir:/bundle`: os.path.ismount compares devices and missed it, so --force ran the whole
    # export before the rename into place failed ("Device or resource busy").
    from export.onnx import is_mount_point

    volume, other = tmp_path / "my volume", tmp_path / "other"
    volume.mkdir()
    other.mkdir()
    escaped = str(volume).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n611 22 8:1 /srv/data {escaped} rw - ext4 /dev/sda1 rw\n")
    assert os.path.ismount(volume) is False
    assert is_mount_point(volume, mountinfo) and not is_mount_point(other, mountinfo)
    assert not is_mount_point(volume, tmp_path / "no-mountinfo")  # not Linux: ismount's answer
