"""Export a Pix2Struct checkpoint to a verified edlight bundle.

    checkpoint (save_pretrained dir) -> Optimum ONNX export (encoder + KV-cache decoder)
      -> pick the decoder layout -> [int8] -> validate vs PyTorch on real images
      -> support files + manifest (engine.bundle owns the schema) -> [parity on --data] -> rename into place

Everything is written into a hidden temporary directory beside `out` and renamed at the end, so an
interrupted export never leaves a directory that looks like a bundle.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.bundle import (
    CHECKPOINT_WEIGHTS,
    DECODER_LAYOUTS,
    MANIFEST_NAME,
    SPEED_ONLY_GENERATION,
    SUPPORT_FILES,
    TRANSFORMERS_MAX_LENGTH,
    UNAPPLIED_GENERATION,
    Bundle,
    Manifest,
    checkpoint_weights,
    write_manifest,
)
from engine.errors import some_names
from engine.folder import mkdir_failure, sibling_stem
from export import ExportCheckFailed, ExportError

if TYPE_CHECKING:
    from export.validate import GreedyComparison
    from train.checkpoint import DataSettings
    from train.data import Example

TASK = "image-to-text-with-past"
# What follows the bundle's name in the names of its leftovers (engine.folder.sibling_stem): the longest,
# ".partial-PID@HOST-XXXXXXXX", takes 90 bytes with a 7-digit pid and a 64-byte host name.
LEFTOVER_SUFFIX_BYTES = 96
# Optimum's dummy inputs need at least a 2x2 patch grid.
MIN_PATCHES = 4
# Above this many tokens per caption, export warns: a model that rarely says EOS would take minutes an image.
LONG_CAPTION_TOKENS = 512
# Which decoder the bundle ships. Measured on this 2-core machine (ORT 1.32, 2 threads, shared and
# noisy), the engine's decode time per image is a tie: base-size decoder (768 hidden, 12 layers,
# 2048 patches, 20 tokens) split 1.37-1.97 s vs merged 1.35-2.05 s at batch 1, 0.85 vs 0.80 s at
# batch 8; small (256 hidden, 6 layers, 512 patches) 0.10-0.17 vs 0.14 s. Only a bare per-step
# micro-benchmark favours split (0.8 vs 1.0 ms on the small decoder; equal at base size). So the
# tie-break decides: the merged decoder ships one set of decoder weights instead of two (base:
# 0.76 GB instead of 1.47 GB, on disk and in RAM), and at base size memory runs out before time does.
DEFAULT_LAYOUT = "merged"
# Optimum's file names for each bundle role.
OPTIMUM_FILES = {
    "encoder": "encoder_model.onnx",
    "decoder": "decoder_model.onnx",
    "decoder_with_past": "decoder_with_past_model.onnx",
    "decoder_merged": "decoder_model_merged.onnx",
}
# Logits of a trained model reach tens; 1e-5 (Optimum's default for Pix2Struct) flags float noise.
VALIDATION_ATOL = 1e-4
# Greedy tokens compared with PyTorch during export (short: it runs on every export).
VALIDATION_TOKENS = 16
VALIDATION_IMAGES = 4
# Below this share of greedy tokens shared with PyTorch, an int8 export is reported as suspicious.
INT8_WARN_AGREEMENT = 0.5

log = logging.getLogger("edlight.export")


@dataclass
class CheckpointInfo:
    """What the export needs to know about a checkpoint, read without loading the weights."""

    path: Path
    config: dict[str, Any]
    max_patches: int
    patch_size: tuple[int, int]


def inspect_checkpoint(checkpoint: str | Path) -> CheckpointInfo:
    """Check that `checkpoint` is a Pix2Struct save_pretrained directory with processor and tokenizer.

    `checkpoint` may also be a hub id (train.checkpoint.resolve_checkpoint: its folder in huggingface_hub's
    cache). Raises ExportError (one line, naming the path and what to do) for each problem.
    """
    try:
        return _inspect_checkpoint(checkpoint)
    except OSError as exc:  # a name too long for the file system, a folder that cannot be listed
        raise ExportError(f"{checkpoint}: cannot read the checkpoint ({exc.strerror or exc})") from exc


def _inspect_checkpoint(checkpoint: str | Path) -> CheckpointInfo:
    from train.checkpoint import CheckpointError, check_model_settings, hub_id_hint, resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if not path.exists():
        raise ExportError(f"{path}: checkpoint not found{hub_id_hint(path)}; pass a directory written by `edlight train` (RUN/best)")
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory; pass a save_pretrained checkpoint directory (e.g. RUN/best)")
    if not (path / "config.json").exists():
        from train.checkpoint import run_folder_hint

        hint = run_folder_hint(path)
        if hint:
            raise ExportError(f"{path}: is a training run, not a checkpoint; {hint}")
    config = _read_json(path / "config.json", "model config", "is it a save_pretrained checkpoint?")
    model_type = config.get("model_type")
    if model_type != "pix2struct":
        raise ExportError(f"{path / 'config.json'}: model_type is {model_type!r}, not 'pix2struct'; edlight exports Pix2Struct only")
    weights = checkpoint_weights(path)
    if weights is None:  # a trainer's training_args.bin is none
        raise ExportError(f"{path}: no model weights ({' or '.join(CHECKPOINT_WEIGHTS)}); re-save the model with save_pretrained")
    if weights.endswith(".json"):  # a shard index: transformers' error named no file
        _read_json(path / weights, "weights index", "re-save the model with save_pretrained")
    pre = _read_json(
        path / "preprocessor_config.json",
        "processor config",
        "save the processor into the checkpoint (processor.save_pretrained(CHECKPOINT))",
    )
    max_patches = pre.get("max_patches")
    if not isinstance(max_patches, int) or max_patches < MIN_PATCHES:
        raise ExportError(
            f"{path / 'preprocessor_config.json'}: max_patches is {max_patches!r}; Pix2Struct's export fixes the patch "
            f"count to it, so set an integer >= {MIN_PATCHES} and re-save the processor"
        )
    generation: dict[str, Any] = {}
    if (path / "generation_config.json").exists():
        # Optional, but one that is there must be readable: its max_new_tokens goes into the bundle.
        generation = _read_json(path / "generation_config.json", "generation config", "fix or delete it")
    try:
        patch_size = check_model_settings(path, config, pre, generation)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    if generation:
        _warn_about_generation(path / "generation_config.json", generation)
    if all(source.get(key) is None for source in (generation, config) for key in ("max_new_tokens", "max_length")):
        log.warning(
            "%s: sets no caption length, so transformers' generate stops after %d tokens, and so does the engine; "
            "set max_new_tokens in its generation_config.json (edlight train writes it) or pass --max-new-tokens "
            "to edlight caption", path, TRANSFORMERS_MAX_LENGTH,
        )
    _check_head_counts(path / "config.json", config)
    if not (path / "tokenizer.json").is_file():
        if (path / "spiece.model").is_file():
            from train.checkpoint import sentencepiece_only

            raise ExportError(sentencepiece_only(path))
        raise ExportError(
            f"{path / 'tokenizer.json'}: missing; the engine needs a fast tokenizer: save one with "
            "processor.tokenizer.save_pretrained(CHECKPOINT)"
        )
    _check_tokenizer(path)
    return CheckpointInfo(path=path, config=config, max_patches=max_patches, patch_size=patch_size)


def _write_tokenizer(processor: Any, bundle: Path) -> None:
    """The bundle's tokenizer as transformers loaded it, so that the engine decodes as `processor.batch_decode`
    does: tokenizer.json with what tokenizer_config.json adds (tokens it marks special, which decode drops),
    and a tokenizer_config.json asking for the clean-up of spaces ("it is n't ." -> "it isn't.") when
    transformers' decode does it (any true value, as Python reads it: 1 and "true" too), the one setting of that
    file the engine reads. A copy of the checkpoint's tokenizer.json alone decoded such tokens as text."""
    tokenizer = processor.tokenizer
    tokenizer.backend_tokenizer.save(str(bundle / "tokenizer.json"))
    if tokenizer.clean_up_tokenization_spaces:
        (bundle / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}) + "\n", encoding="utf-8")


# Random id sequences that export decodes with transformers and with the engine's tokenizer (fixed seed: the
# same check at every export of a checkpoint).
DECODE_CHECKS, DECODE_CHECK_SEED = 512, 0


def _check_decoding(processor: Any, bundle: Path) -> None:
    """Refuse a bundle whose tokenizer turns ids into other text than transformers does (every id of the
    tokenizer, special or not, in random sequences): captions would differ from PyTorch's for the same tokens."""
    import numpy as np

    from engine.tokenizer import CaptionTokenizer

    engine = CaptionTokenizer.from_bundle_dir(bundle)
    rng = np.random.default_rng(DECODE_CHECK_SEED)
    sequences = [rng.integers(0, engine.vocab_size, size=int(rng.integers(1, 24))).tolist() for _ in range(DECODE_CHECKS)]
    expected = processor.batch_decode(sequences, skip_special_tokens=True)
    for ids, want, have in zip(sequences, expected, engine.decode_batch(sequences), strict=True):
        if want != have:
            raise ExportError(f"{bundle / 'tokenizer.json'}: the engine decodes ids {ids} as {have!r} where transformers "
                              f"gives {want!r}; the checkpoint's tokenizer files hold settings edlight does not carry")


def _check_tokenizer(path: Path) -> None:
    """tokenizer.json loads as the engine will load it, and tokenizer_config.json (if any) is JSON: transformers'
    errors for either ("EOF while parsing", "Model missing") named only the checkpoint."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # the Rust library raises a plain Exception with serde's message
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{path / 'tokenizer.json'}: not a tokenizer the tokenizers library can read ({why}); "
                          "re-save it with processor.tokenizer.save_pretrained(CHECKPOINT)") from exc
    if (path / "tokenizer_config.json").is_file():
        _read_json(path / "tokenizer_config.json", "tokenizer config", "fix or delete it")


def _check_head_counts(path: Path, config: dict[str, Any]) -> None:
    """Optimum's Pix2Struct export sizes the decoder's cross-attention cache by the vision encoder's head
    count, so a checkpoint whose two towers differ fails deep inside it; say so up front."""
    text, vision = config.get("text_config"), config.get("vision_config")
    text_heads = text.get("num_heads", 12) if isinstance(text, dict) else 12  # Pix2Struct's defaults
    vision_heads = vision.get("num_attention_heads", 12) if isinstance(vision, dict) else 12
    if text_heads != vision_heads:
        raise ExportError(
            f"{path}: the vision encoder has {vision_heads} attention heads and the text decoder {text_heads}; "
            "Optimum's Pix2Struct export needs the same count in both"
        )


def _warn_about_generation(path: Path, generation: dict[str, Any]) -> None:
    """Say which generation settings the engine will not honour, or that will make captioning slow."""
    longest = generation.get("max_new_tokens") or generation.get("max_length")
    if isinstance(longest, int) and longest > LONG_CAPTION_TOKENS:
        log.warning("%s: captions may run to %d tokens; the engine stops only there or at EOS (set max_new_tokens)",
                    path, longest)
    ignored = [k for k, default in UNAPPLIED_GENERATION.items()
               if generation.get(k, default) not in (None, default) and k not in SPEED_ONLY_GENERATION]
    if ignored:
        log.warning("%s: %s not used by the engine (greedy unless `edlight caption --num-beams`)", path, ", ".join(ignored))


def _read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    from train.checkpoint import CheckpointError, read_json_object

    if not path.is_file():
        raise ExportError(f"{path}: {what} missing; {hint}")
    try:
        return read_json_object(path, what, hint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


@contextmanager
def _optimum_validation_is_fatal() -> Iterator[list[str]]:
    """Optimum logs a failed output comparison as a warning and carries on; collect those to fail on."""
    failures: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "succeeded with the warning" in message:
                failures.append(message.split("\n")[0])

    handler = Catch(level=logging.WARNING)
    logger = logging.getLogger("optimum")
    logger.addHandler(handler)
    try:
        yield failures
    finally:
        logger.removeHandler(handler)


def _load_pytorch(info: CheckpointInfo) -> tuple[Any, Any]:
    from transformers import Pix2StructProcessor

    from train.checkpoint import CheckpointError, load_model_weights

    try:
        processor = Pix2StructProcessor.from_pretrained(info.path)
    except Exception as exc:  # transformers raises OSError/ValueError/TypeError for broken processor files
        raise ExportError(f"{info.path}: cannot load the Pix2Struct processor/tokenizer ({exc}); re-save the processor") from exc
    try:
        model = load_model_weights(info.path).eval()
    except CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    except Exception as exc:
        raise ExportError(f"{info.path}: cannot load the Pix2Struct model ({exc}); re-save it with save_pretrained") from exc
    if not getattr(model.config.text_config, "is_decoder", False):
        # A non-causal text decoder attends to future tokens: its cached ONNX decoder cannot match it.
        raise ExportError(
            f"{info.path / 'config.json'}: text_config.is_decoder is false (a non-causal decoder); "
            "set it to true (train.presets.ensure_causal_decoder) and re-save the checkpoint"
        )
    if processor.image_processor.max_patches != info.max_patches:
        raise ExportError(f"{info.path}: processor max_patches {processor.image_processor.max_patches} != preprocessor_config.json {info.max_patches}")
    return model, processor


class _NoSlowProcessorNotice(logging.Filter):
    """Drops transformers' "Using a slow image processor as `use_fast` is unset" notice, printed when
    Optimum reloads the processor: Pix2Struct has no fast image processor, so it asks nothing of the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using a slow image processor")


def _run_optimum(model: Any, processor: Any, raw: Path, layout: str) -> None:
    """Optimum export of encoder, decoder and decoder_with_past (+ the merged decoder) into `raw`."""
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    notices = logging.getLogger("transformers.models.auto.image_processing_auto")
    quiet = _NoSlowProcessorNotice()
    notices.addFilter(quiet)
    # Pix2Struct's ONNX config reads the static patch count from preprocessors[1].image_processor:
    # hand it the checkpoint's own processor rather than whatever Optimum would guess from the path.
    with contextlib.ExitStack() as cleanup, _optimum_validation_is_fatal() as failures, warnings.catch_warnings():
        cleanup.callback(notices.removeFilter, quiet)
        # Tracing chatter about Python control flow Optimum already accounts for (past/no-past graphs).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            onnx_export_from_model(
                model,
                raw,
                task=TASK,
                preprocessors=[processor.tokenizer, processor],
                atol=VALIDATION_ATOL,
                do_validation=True,
                # Post-processing merges the two decoders: a minute of work at base size, wasted for "split".
                no_post_process=layout != "merged",
                device="cpu",
            )
        except Exception as exc:
            raise ExportError(f"{model.config._name_or_path}: Optimum ONNX export failed: {exc}") from exc
    if failures:
        raise ExportCheckFailed(f"{model.config._name_or_path}: ONNX outputs differ from PyTorch (Optimum validation): {failures[0]}")


def _validation_images(examples: list[Example] | None) -> list[Any]:
    """The first images of the already validated test split, or generated samples."""
    from export.validate import sample_images

    if not examples:
        return sample_images()
    from train.evaluate import load_rgb

    # Loaded as training, evaluation and the engine load them (EXIF rotation, alpha onto white).
    return [load_rgb(example.path) for example in examples[:VALIDATION_IMAGES]]


def is_mount_point(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """os.path.ismount, and the mount points Linux lists: a bind mount of a folder of the same file system
    (a `docker -v` volume) is one that ismount, which compares devices, does not see."""
    if os.path.ismount(path):
        return True
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        target = os.path.realpath(path)
    except OSError:
        return False
    # The fifth field is the mount point, with space, tab, newline and backslash written as octal escapes.
    unescape = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = fields[4]
            for escaped, char in unescape.items():
                point = point.replace(escaped, char)
            if point == target:
                return True
    return False


def _check_replaceable(out: Path, force: bool, inputs: list[Path]) -> None:
    """`--force` replaces an earlier bundle (or an empty folder), never a run, a checkpoint or other files."""
    if out.is_symlink() and not out.exists():  # found only by the final rename, after the whole export
        raise ExportError(f"{out}: a link to {os.readlink(out)}, which does not exist; remove the link or choose another --out")
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out}: already exists; choose another --out or pass --force to replace it")
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
    if is_mount_point(out):  # the finished bundle replaces --out by a rename, which a mount point refuses
        raise ExportError(f"{out}: is a mount point, which --force cannot replace; choose a folder inside it (e.g. {out / 'bundle'})")
    resolved = out.resolve()
    for path in inputs:
        if path.resolve() == resolved or resolved in path.resolve().parents:
            raise ExportError(f"{out}: holds {path}, which this export reads; choose another --out")
    if not (out / MANIFEST_NAME).is_file() and any(not _is_finder_litter(p.name) for p in out.iterdir()):
        raise ExportError(
            f"{out}: is not an edlight bundle (no {MANIFEST_NAME}); --force replaces only a bundle or an "
            "empty folder, so choose another --out"
        )
    # A Finder's .DS_Store and ._ files go with the bundle, other hidden files (a .git, notes) are the user's; a
    # linked --out is replaced by the new bundle while the folder it leads to is kept, whatever that holds.
    own = _bundle_files(out)
    others = sorted(p.name + "/" * p.is_dir() for p in out.iterdir() if p.name not in own and not _is_finder_litter(p.name))
    if others and not out.is_symlink():
        raise ExportError(
            f"{out}: holds files that are not part of its bundle ({some_names(others, 5)}); --force replaces only the bundle: "
            "move them out or choose another --out"
        )


def _is_finder_litter(name: str) -> bool:
    """What macOS leaves in a folder it showed or copied (.DS_Store, ._NAME AppleDouble files)."""
    return name == ".DS_Store" or name.startswith("._")


def _bundle_files(bundle: Path) -> set[str]:
    """The names an earlier bundle's manifest lists (with the manifest); for an unreadable manifest, the
    names a bundle's files have, so that --force can still replace a damaged bundle."""
    try:
        listed = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8-sig"))["files"]  # as Bundle.load reads it
        if isinstance(listed, dict) and all(isinstance(name, str) for name in listed):
            return {MANIFEST_NAME, *(name.split("/")[0] for name in listed)}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {MANIFEST_NAME, "tokenizer_config.json", *SUPPORT_FILES} | {
        p.name for p in bundle.iterdir() if p.is_file() and p.name.endswith((".onnx", ".onnx.data"))
    }


def _refuse_inside_checkpoints(out: Path, checkpoint: Path) -> None:
    """Training replaces a run's best/ and last/ whole at every save: a bundle inside one would vanish."""
    checkpoint = checkpoint.resolve()
    run = checkpoint.parent
    folders = [checkpoint] + ([run / "best", run / "last"] if (run / "run_config.json").is_file() else [])
    target = out.resolve()
    for folder in folders:
        if target.is_relative_to(folder) and target != checkpoint:  # the checkpoint itself: _check_replaceable
            raise ExportError(
                f"{out}: inside the checkpoint folder {folder}, which training replaces whole at its next save "
                "(the bundle with it); choose an --out outside it"
            )


def _place_temp_dir(out: Path, force: bool, inputs: list[Path]) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out}: cannot create its folder {out.parent}: {mkdir_failure(out.parent, exc)}; choose another --out") from exc
    try:
        _clear_dead_exports(out)  # first: it may put a bundle back at `out`, which the next check must see
    except OSError as exc:
        raise ExportError(f"{out.parent}: cannot write the bundle there ({exc.strerror or exc}); choose a writable --out") from exc
    _check_replaceable(out, force, inputs)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{sibling_stem(out.name, LEFTOVER_SUFFIX_BYTES)}.partial-{_owner()}-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"{out.parent}: cannot write the bundle there ({exc.strerror or exc}); choose a writable --out") from exc


def _owner() -> str:
    """This export's mark in the names of its temporary folders: pid@host (a pid means nothing elsewhere)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _clear_dead_exports(out: Path) -> None:
    """Remove what exports to `out` killed mid-way on this machine left (their pid@host names them): partial
    bundles, and a replaced bundle set aside (put back if the new one never arrived)."""
    stem, host = sibling_stem(out.name, LEFTOVER_SUFFIX_BYTES), re.escape(socket.gethostname())
    for leftover in sorted(out.parent.glob(f"{glob.escape(stem)}.*")):
        # Exactly the names _place_temp_dir and _move_into_place give (mkdtemp adds 8 of [a-z0-9_]); another
        # bundle's ("NAME.old-2024/...") or another machine's leftovers never match.
        found = re.fullmatch(
            rf"{re.escape(stem)}\.(?:partial-(\d+)@{host}-[a-z0-9_]{{8}}|old-(\d+)@{host}|discard-(\d+)@{host})", leftover.name
        )
        if not found:
            continue
        pid = int(found.group(1) or found.group(2) or found.group(3))
        if _alive(pid):
            continue
        if found.group(2) is not None and not out.exists():
            os.replace(leftover, out)
            log.warning("%s: put back the bundle an interrupted export had set aside", out)
        else:
            _remove(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or no pid of ours: leave it alone
    return True


def _move_into_place(staged: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle to `out`; with force, the old `out` is removed only after that succeeds."""
    old = None
    if out.exists() and not force:
        raise ExportError(f"{out}: appeared during the export; pass --force to replace it")
    try:
        if out.exists():
            old = out.with_name(f"{sibling_stem(out.name, LEFTOVER_SUFFIX_BYTES)}.old-{_owner()}")
            os.replace(out, old)
        os.replace(staged, out)
    except BaseException as exc:  # also Ctrl-C or SIGTERM between the two renames: the old bundle goes back
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)
        if isinstance(exc, OSError):
            raise ExportError(f"{out}: cannot move the finished bundle into place ({exc.strerror or exc})") from exc
        raise
    if old is not None:
        # Renamed first, so that a removal cut short or failing part-way is never taken for a bundle set aside
        # by an interrupted export (_clear_dead_exports puts those back).
        discard = out.with_name(f"{sibling_stem(out.name, LEFTOVER_SUFFIX_BYTES)}.discard-{_owner()}")
        try:
            os.replace(old, discard)
        except OSError:
            discard = old
        _remove(discard)


def _remove(path: Path) -> None:
    """Remove a folder, or the link that stood for one (a linked --out: the link's target is kept)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    quantize: str | None = None,
    data: str | Path | None = None,
    force: bool = False,
    *,
    decoder_layout: str = DEFAULT_LAYOUT,
    caption_column: str | None = None,
    skip_bad: bool | None = None,
    test_ratio: float | None = None,
    split_seed: int | None = None,
    tolerance: float | None = None,
    min_identical: float | None = None,
) -> Path:
    """Export `checkpoint` (a Pix2Struct save_pretrained dir) to the bundle directory `out`.

    quantize: None (fp32) or "int8" (dynamic, per-channel weights). data: a data folder; when given,
    its test split supplies the validation images and the parity check (engine vs PyTorch BLEU),
    whose result is stored in the manifest. caption_column, skip_bad, test_ratio, split_seed: how to
    read `data` and pick its test split; those left as None are the ones the checkpoint's training run
    used (train.checkpoint.data_settings). tolerance, min_identical: the parity check's limits (see
    export.parity.run_parity; None: its defaults). force: replace an existing bundle (or empty folder) at
    `out`; a folder holding anything else, or the checkpoint or data, is never replaced. decoder_layout:
    "split" or "merged" (see DEFAULT_LAYOUT).

    Returns the bundle path. Raises ExportError for a bad checkpoint, an unwritable or existing
    `out`, and its ExportCheckFailed for an export whose outputs or greedy tokens differ from PyTorch or a
    failed parity check,
    and DataError for a bad data folder; both before any export work for a bad or empty test split.
    In every failure case no bundle is left at `out` (an existing one is kept).
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r}: supported values are None (fp32) and 'int8'")
    if decoder_layout not in DECODER_LAYOUTS:
        raise ExportError(f"decoder_layout={decoder_layout!r}: use one of {', '.join(sorted(DECODER_LAYOUTS))}")
    if data is None:  # they shape the parity check on data's test split: without it they would do nothing
        given = {"caption_column": caption_column, "skip_bad": skip_bad, "test_ratio": test_ratio,
                 "split_seed": split_seed, "tolerance": tolerance, "min_identical": min_identical}  # fmt: skip
        if unused := [name for name, value in given.items() if value is not None]:
            raise ExportError(f"{', '.join(unused)} given without data: they apply to the parity check on a data "
                              "folder's test split; pass data too, or leave them out")
    info = inspect_checkpoint(checkpoint)
    data_path = Path(data) if data is not None else None
    if data_path is not None and not data_path.is_dir():
        what = "a file, not a data folder" if data_path.exists() else "data folder not found"
        raise ExportError(f"{data_path}: {what}; pass a folder with images and metadata.jsonl")
    examples = None
    settings = None
    if data_path is not None:
        from train.checkpoint import data_settings, position_check
        from train.data import load_split

        settings = data_settings(info.path, caption_column, skip_bad, test_ratio, split_seed)
        log.info("data %s read with %s", data_path, settings.describe())
        # Before minutes of export: DataError lists every bad file of the test split (the images used, as by
        # evaluate and parity; a bad training image does not matter here), and parity needs test images.
        examples = list(load_split(
            data_path, "test", test_ratio=settings.test_ratio, seed=settings.split_seed,
            caption_column=settings.caption_column, skip_bad=settings.skip_bad, positions=position_check(info.path),
        ))
        if not examples:
            raise ExportError(
                f"{data_path}: the test split is empty ({settings.describe()}); --data needs test images for the "
                "validation and the parity check (add images, or export without --data)"
            )
    out = Path(out).expanduser().absolute()
    _refuse_inside_checkpoints(out, Path(info.path))
    try:
        tmp = _place_temp_dir(out, force, [info.path] + ([data_path] if data_path is not None else []))
    except OSError as exc:  # a name too long for the file system, a folder above it unreadable
        raise ExportError(f"{out}: cannot be the bundle's folder ({exc.strerror or exc}); choose another --out") from exc
    try:
        staged = _build(info, tmp, quantize, data_path, examples, decoder_layout, settings, tolerance, min_identical)
        _move_into_place(staged, out, force)
    except Exception as exc:
        from train.checkpoint import storage_failure

        # A full disk surfaces in Optimum's, torch's or ONNX's words, often naming the checkpoint read.
        why = storage_failure(exc, tmp)
        if why is None or (isinstance(exc, ExportError) and exc.__cause__ is None):  # our own, already precise
            raise
        raise ExportError(f"{out}: cannot write the bundle: {why} (it is built in {tmp.parent} first; "
                          "nothing at --out was changed)") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(
    info: CheckpointInfo,
    tmp: Path,
    quantize: str | None,
    data: Path | None,
    examples: list[Example] | None,
    layout: str,
    settings: DataSettings | None = None,
    tolerance: float | None = None,
    min_identical: float | None = None,
) -> Path:
    from export.optimize import OptimizeError, store_weights_beside, weights_files
    from export.validate import compare_greedy

    log.info("loading %s", info.path)
    model, processor = _load_pytorch(info)
    log.info("exporting with Optimum (%s, max_patches=%d)", TASK, info.max_patches)
    raw, bundle = tmp / "optimum", tmp / "bundle"
    bundle.mkdir()
    _run_optimum(model, processor, raw, layout)

    roles = ("encoder", *DECODER_LAYOUTS[layout])
    onnx_files = {role: OPTIMUM_FILES[role] for role in roles}
    for name in onnx_files.values():
        _move_onnx(raw, bundle, name)
    encoder_patches = _static_patch_count(bundle / onnx_files["encoder"])
    if encoder_patches != info.max_patches:
        raise ExportError(f"{info.path}: encoder was exported for {encoder_patches} patches but the processor uses {info.max_patches}")
    for name in SUPPORT_FILES:
        # Optimum's copies: it moves generation settings out of config.json consistently with the graphs.
        source = raw / name if (raw / name).is_file() else info.path / name
        if not source.is_file():
            raise ExportError(f"{info.path / name}: missing; re-save the checkpoint with model and processor save_pretrained")
        shutil.copy2(source, bundle / name)
    _write_tokenizer(processor, bundle)
    _check_decoding(processor, bundle)
    shutil.rmtree(raw)
    rewrites = _optimize_graphs(bundle, onnx_files)

    images = _validation_images(examples)
    log.info("validating the %s decoder against PyTorch on %d images", layout, len(images))
    fp32 = compare_greedy(model, processor, bundle, onnx_files, layout, images, VALIDATION_TOKENS)
    require_identical(fp32, info.path)
    validation: dict[str, Any] = {"fp32": fp32.to_dict()}

    weight_bits = None
    if quantize == "int8":
        from export.quantize import INT8_WEIGHT_BITS, quantize_decoder_int8, quantize_int8

        weight_bits = INT8_WEIGHT_BITS
        log.info("quantizing to int8")
        for role, name in onnx_files.items():
            quantized = bundle / f"{Path(name).stem}_int8.onnx"
            # The decoders' token-row MatMuls get row-wise activation scales, so that the engine can batch
            # the cached decoder steps (decoder_batching "steps"); see export.quantize.
            (quantize_int8 if role == "encoder" else quantize_decoder_int8)(bundle / name, quantized)
            if role == "encoder":
                # Let ONNX Runtime fuse the integer MatMuls once here rather than at every start-up.
                _ort_optimize(quantized)
            for fp32_file in (name, *weights_files(bundle / name)):
                (bundle / fp32_file).unlink(missing_ok=True)
            onnx_files[role] = quantized.name
        int8 = compare_greedy(model, processor, bundle, onnx_files, layout, images, VALIDATION_TOKENS, one_image_at_a_time=True)
        validation["int8"] = int8.to_dict()
        log.info(
            "int8 vs PyTorch greedy tokens on %d images: %.0f%% identical sequences, %.1f%% of positions agree",
            len(int8.torch_tokens), 100 * int8.identical_share, 100 * int8.token_agreement,
        )
        if int8.token_agreement < INT8_WARN_AGREEMENT:
            # Not fatal: an untrained model (benchmarks) has near-tied logits that int8 flips at will.
            log.warning(
                "int8 greedy tokens agree with PyTorch on only %.0f%% of positions; check captions with `edlight parity`",
                100 * int8.token_agreement,
            )

    for name in onnx_files.values():  # large graphs' weights into a side file ONNX Runtime maps (faster start)
        try:
            if store_weights_beside(bundle / name):
                log.info("%s: weights stored beside the graph in %s.data", name, name)
        except OptimizeError as exc:
            raise ExportError(f"{bundle / name}: storing the weights beside the graph failed: {exc}") from exc
    manifest = Manifest(
        source=str(info.path.absolute()),
        max_patches=info.max_patches,
        decoder_layout=layout,
        onnx_files=onnx_files,
        quantization=quantize,
        decoder_batching="steps" if quantize else "batch",
        int8_weight_bits=weight_bits,
        graph_rewrites=rewrites,
        versions=library_versions(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"validation": validation},
    )
    write_manifest(bundle, manifest)
    Bundle.load(bundle)  # the reader's own check of what we just wrote

    if data is not None:
        from export.parity import run_parity

        log.info("parity check on the test split of %s", data)
        assert settings is not None
        report = run_parity(
            bundle, info.path, data, caption_column=settings.caption_column, skip_bad=settings.skip_bad,
            test_ratio=settings.test_ratio, split_seed=settings.split_seed, tolerance=tolerance, min_identical=min_identical,
        )  # fmt: skip
        report.data_settings = settings.describe()  # with where they came from
        manifest.parity = report.to_dict(brief=True)
        write_manifest(bundle, manifest)
        if not report.passed:
            raise ExportCheckFailed(
                f"{info.path}: parity check on {data} failed: {report.summary_line()}. No bundle was written; on a "
                "small test split a difference can be noise: see `edlight parity` for the captions, or widen "
                "--tolerance / --min-identical"
            )
    return bundle


def _optimize_graphs(bundle: Path, onnx_files: dict[str, str]) -> list[str]:
    """Rewrite the exported graphs for speed (export.optimize), in place; returns the rewrites applied.

    The encoder's attention, norms and GELU are fused and its patch axis made dynamic (so the engine can
    cut trailing padding); each rewritten encoder is checked against the original on padded and unpadded
    inputs. The decoders only get the dynamic patch axis. Raises ExportError when a rewrite breaks a graph.
    """
    from export.optimize import (
        OptimizeError,
        OutputsDiffer,
        optimize_decoder,
        optimize_encoder,
        verify_encoder,
        weights_files,
    )

    staging = bundle / ".optimized"
    staging.mkdir()
    rewrites: list[str] = []
    try:
        for role, name in onnx_files.items():
            source, target = bundle / name, staging / name
            exported_weights = weights_files(source)  # Optimum's `<graph>_data` over 2 GB; the rewrite names its own
            if role == "encoder":
                report = optimize_encoder(source, target)
                worst = verify_encoder(source, target)
                log.info("encoder rewrites %s, max |diff| %.2g vs the Optimum graph", report.rewrites, worst)
                rewrites += [f"encoder:{r}" for r in report.rewrites]
                if report.ort_optimized:
                    rewrites.append("encoder:onnxruntime_extended")
            else:
                report = optimize_decoder(source, target)
                rewrites += [f"{role}:{r}" for r in report.rewrites]
            for produced in staging.iterdir():  # the graph, and its weights file if it has one
                os.replace(produced, bundle / produced.name)
            for stale in exported_weights - weights_files(bundle / name):
                (bundle / stale).unlink(missing_ok=True)
    except OutputsDiffer as exc:
        raise ExportCheckFailed(f"{bundle}: graph optimisation failed its check: {exc}") from exc
    except OptimizeError as exc:
        raise ExportError(f"{bundle}: graph optimisation failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rewrites


def _ort_optimize(path: Path) -> None:
    from export.optimize import OptimizeError, ort_optimize_file

    try:
        ort_optimize_file(path, path)
    except OptimizeError as exc:
        raise ExportError(f"{path}: {exc}") from exc


def require_identical(comparison: GreedyComparison, checkpoint: Path) -> None:
    """Raise ExportCheckFailed when an fp32 export's greedy tokens differ from PyTorch's on any image."""
    if comparison.mismatches:
        first = comparison.mismatches[0]
        raise ExportCheckFailed(
            f"{checkpoint}: ONNX greedy tokens differ from PyTorch on {len(comparison.mismatches)}/"
            f"{len(comparison.torch_tokens)} validation images (image {first['image']}, position {first['position']}: "
            f"torch {first['torch']} vs onnx {first['onnx']}); the export is not faithful, do not ship it"
        )


def _move_onnx(raw: Path, bundle: Path, name: str) -> None:
    source = raw / name
    if not source.is_file():
        raise ExportError(f"{source}: Optimum did not produce {name}; the export is incomplete")
    os.replace(source, bundle / name)  # same directory tree: a rename, not a copy of a GB file
    # Models over 2 GB keep their weights in a side file next to the graph.
    for side in raw.glob(f"{name}_data*"):
        os.replace(side, bundle / side.name)


def _static_patch_count(encoder: Path) -> int:
    import onnx

    graph = onnx.load(str(encoder), load_external_data=False).graph
    dims = next(i for i in graph.input if i.name == "flattened_patches").type.tensor_type.shape.dim
    return int(dims[1].dim_value)
