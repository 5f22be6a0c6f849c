"""The models under test, built once and cached between runs.

- base: a randomly initialised model with the exact google/pix2struct-textcaps-base architecture
  (`train.presets.build_from_preset("base")`: 282M parameters, 2048 patches, vocab 50244), saved
  with `save_pretrained`, exported by Optimum for the Optimum system and by `export.onnx.export_bundle`
  (fp32 and int8) for the engine.
- tiny: a tiny model trained on generated images (or the checkpoint/bundles the caller names).

Everything is cached under `cache_dir`, keyed by what it was built from (library versions, the
preset, the source of the export code), and written into a temporary directory that is renamed
into place only when complete, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.settings import BENCH_IMAGES, missing_modules
from engine.errors import EdlightError, install_hint, is_installed

Log = Callable[[str], None]
BASE_SEED = 0
TINY_TRAIN_IMAGES = 64  # the quick path: enough to train one epoch in well under a minute
OPTIMUM_TASK = "image-to-text-with-past"
# Captions for the base tokenizer when the synthetic generator is not installed.
FALLBACK_CAPTIONS = [
    "a worksheet with three addition problems, two answered correctly",
    "a drawing of a tree with a brown trunk and green leaves",
    "a handwritten paragraph about the water cycle with a diagram",
    "a bar chart of favourite fruits coloured in with crayons",
    "a map of a neighbourhood with a school, a park and a river",
    "a fraction worksheet, 1/2 and 3/4 shaded in circles",
]


class BenchSetupError(EdlightError):
    """The models or images a benchmark needs cannot be found or built."""


@dataclass
class ModelSet:
    """Paths to everything the systems load, plus the model facts the report needs."""

    size: str
    checkpoint: Path | None  # save_pretrained dir: the torch system and the Optimum system's processor
    optimum_dir: Path | None  # plain Optimum export of `checkpoint`
    bundles: dict[str, Path]  # "engine" -> fp32 bundle, "engine-int8" -> int8 bundle
    images: list[Path]
    max_patches: int
    vision_config: dict[str, Any]
    parameters: int | None
    notes: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # system -> why its model could not be had
    given: list[str] = field(default_factory=list)  # the options that named models ("--checkpoint", "--model")
    cache_entries: list[Path] = field(default_factory=list)  # the cache's entries this run uses

    @property
    def title(self) -> str:
        """What was timed, for the report's title: `size` names only the models built here."""
        if "--checkpoint" in self.given or (self.checkpoint is None and self.given):
            return "given models"
        return f"{self.size} size" + (", and given bundles" if self.given else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "title": self.title,
            "given": self.given,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "optimum_dir": str(self.optimum_dir) if self.optimum_dir else None,
            "bundles": {k: str(v) for k, v in self.bundles.items()},
            "images": [str(p) for p in self.images],
            "max_patches": self.max_patches,
            "parameters": self.parameters,
            "vision_config": {k: self.vision_config.get(k) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "d_kv", "d_ff", "patch_embed_hidden_size")},
            "notes": self.notes,
        }


def _versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def _source_digest(*relative: str) -> str:
    """sha256 of the project's own source files that shape an artefact (so code changes rebuild it)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for pattern in relative:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(
    target: Path, build: Callable[[Path], None], what: str, log: Log, check: Callable[[Path], object] | None = None,
    used: list[Path] | None = None,
) -> Path:
    """Return `target` if complete (and `check` of it raises no EdlightError); otherwise build it in a
    temporary sibling and rename it into place. A damaged entry is rebuilt, not trusted at every run.
    `used` collects the entries a run takes (what `unused_cache_entries` leaves out)."""
    if used is not None:
        used.append(target)
    marker = target / ".complete"
    if marker.is_file():
        try:
            if check is not None:
                check(target)
            log(f"using cached {what}: {target}")
            return target
        except EdlightError as exc:
            log(f"warning: the cached {what} in {target} is damaged ({exc}); building it again")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        log(f"building {what} (cached afterwards in {target}) ...")
        build(tmp)
        marker_tmp = tmp / ".complete"
        marker_tmp.write_text("ok\n", encoding="utf-8")
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# The names `_cached` gives its entries (and their temporary siblings, left behind by a killed build): only
# these are ever counted or pruned, so other files in a --cache-dir are never touched.
_ENTRY_NAME = r"(?:(?:base|tiny|optimum|engine|engine-int8)-[0-9a-f]{12}|images-(?:plain|synth))"
_CACHE_ENTRY = re.compile(rf"{_ENTRY_NAME}|\.{_ENTRY_NAME}\.partial-.+")


def unused_cache_entries(cache_dir: Path, used: list[Path]) -> list[Path]:
    """The entries of the bench cache in `cache_dir` that hold none of the paths in `used` (the entries a run
    took, and the paths it was given, which may lie inside the cache): builds for other sizes or systems, builds
    by other versions of edlight or its libraries (whose keys no run asks for again), and the leftovers of builds
    that were killed. Only folders named and marked as `_cached` makes them count. Call it while holding the
    cache's lock."""
    try:
        root = cache_dir.resolve()
        children = sorted(cache_dir.iterdir())
    except OSError:
        return []
    taken = set()
    for path in used:
        try:
            inside = Path(path).resolve().relative_to(root).parts
        except (OSError, ValueError):  # elsewhere
            continue
        if not inside:  # the cache folder itself was given: all of it is in use
            return []
        taken.add(inside[0])
    return [
        path for path in children
        if path.name not in taken and _CACHE_ENTRY.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
        and (".partial-" in path.name or (path / ".complete").is_file())  # else a folder of the user's own name
    ]


def disk_bytes(path: Path) -> int:
    """Bytes of the files under `path` (links not followed; unreadable parts count as 0)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def count_parameters(checkpoint: Path) -> int | None:
    """Parameters in a checkpoint's safetensors files, read from their headers (no torch needed)."""
    total = 0
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    for path in files:
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= int(dim)
                    total += count
        except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, OverflowError, MemoryError) as exc:
            raise BenchSetupError(f"{path}: not a readable safetensors file ({exc})") from exc
    return total


# --- images -------------------------------------------------------------------------------------


def bench_images(
    cache_dir: Path, log: Log, folder: Path | None = None, limit: int = BENCH_IMAGES, used: list[Path] | None = None
) -> list[Path]:
    """The images every system captions: the first `limit` of `folder`'s images, or the generated student-work
    images (cached, BENCH_IMAGES of them; their entry appended to `used`)."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    if folder is not None:
        # Hidden files are not images of the folder (macOS's "._" twins), as `edlight caption` walks it.
        images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))[:limit]
        if not images:
            raise BenchSetupError(f"{folder}: no images (.png/.jpg/...) to benchmark with")
        _check_images(images)
        return images

    try:
        from train.synth import generate
    except ImportError:  # engine-only install: plain drawn pages (content does not change the work done)
        root = _cached(cache_dir / "images-plain", partial(_plain_images, n=BENCH_IMAGES),
                       f"{BENCH_IMAGES} benchmark images", log, used=used)
    else:
        root = _cached(cache_dir / "images-synth", lambda tmp: generate(tmp / "data", n=BENCH_IMAGES, seed=1234),
                       f"{BENCH_IMAGES} generated benchmark images", log, used=used)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes)
    if not images:
        raise BenchSetupError(f"{root}: the cached benchmark images are missing; delete the folder to rebuild it")
    return images


def _check_images(images: list[Path]) -> None:
    """Decode each image as the systems will, before any model is built: a file that cannot be captioned
    would otherwise fail every measurement, found only at the end of the run."""
    from engine.errors import ImageError
    from engine.images import load_image

    for path in images:
        try:
            load_image(path).close()
        except ImageError as exc:
            raise BenchSetupError(f"{exc}; every system would fail on it: remove it from --images") from exc


def _plain_images(out: Path, *, n: int) -> None:
    """Page-like test images drawn with PIL, for machines without the training extra."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (1024, 768), "white")
        draw = ImageDraw.Draw(image)
        for line in range(12):
            y = 60 + line * 50
            draw.text((60, y), " ".join(rng.choice(FALLBACK_CAPTIONS).split()[: rng.randint(3, 9)]), fill="black")
            draw.rectangle((700, y, 700 + rng.randint(20, 250), y + 30), outline="blue", width=3)
        image.save(out / f"page_{i:02d}.png")


def _captions_of(images: list[Path]) -> list[str]:
    """Captions from metadata.jsonl files next to `images` (the synthetic generator writes them)."""
    captions: list[str] = []
    for meta in {p.parent / "metadata.jsonl" for p in images}:
        if meta.is_file():
            for line in meta.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    captions.append(str(json.loads(line).get("text", "")))
    return [c for c in captions if c] or FALLBACK_CAPTIONS


# --- builders -----------------------------------------------------------------------------------


def build_base_checkpoint(out: Path, captions: list[str]) -> None:
    """Randomly initialised textcaps-base model + processor (max_patches 2048) saved into `out`."""
    from train.presets import build_from_preset

    model, processor = build_from_preset("base", captions, seed=BASE_SEED)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def export_optimum(checkpoint: Path, out: Path) -> None:
    """Optimum's own ONNX export (`image-to-text-with-past`, merged decoder), as a user would run it."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import Pix2StructProcessor
    from transformers.utils import logging as hf_logging

    from train.checkpoint import load_model_weights

    hf_logging.set_verbosity_error()
    model = load_model_weights(checkpoint).eval()  # weights that leave tensors out: refused, not timed at random
    processor = Pix2StructProcessor.from_pretrained(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: expected for Pix2Struct, pages of them
        # Pix2Struct's ONNX config reads the static patch count from the processor: pass the checkpoint's.
        onnx_export_from_model(
            model, out, task=OPTIMUM_TASK, preprocessors=[processor.tokenizer, processor], do_validation=False, device="cpu"
        )
    # ORTModelForPix2Struct loads the merged decoder when present; the split copies are dead weight on disk.
    if (out / "decoder_model_merged.onnx").is_file():
        for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
            for path in out.glob(f"{name}*"):
                path.unlink()


def check_optimum_export(folder: Path) -> None:
    """Raise BenchSetupError unless `folder` holds an Optimum Pix2Struct export ORTModelForPix2Struct can load: its
    encoder, a decoder and the model's config (no processor files: the worker takes the checkpoint's). A folder
    without them ran the whole bench, every optimum cell failing at the end; a damaged cached export was trusted
    at every run."""
    # Files, not empty ones (a copy cut short).
    def there(name: str) -> bool:
        return (folder / name).is_file() and (folder / name).stat().st_size > 0

    decoders = ("decoder_model_merged.onnx", "decoder_model.onnx")
    missing = [name for name in ("encoder_model.onnx", "config.json") if not there(name)]
    if not any(there(name) for name in decoders):
        missing.append(" or ".join(decoders))
    if missing:
        raise BenchSetupError(f"{folder}: not an Optimum ONNX export of Pix2Struct (no {', '.join(missing)}); export one "
                              "with `optimum-cli export onnx --task image-to-text-with-past`")


def export_engine_bundle(checkpoint: Path, out: Path, quantize: str | None) -> None:
    from export.onnx import export_bundle

    export_bundle(checkpoint, out / "bundle", quantize=quantize)


def train_tiny(out: Path, log: Log) -> None:
    """The quick tiny model: one epoch on generated images (CI and first runs)."""
    from train.loop import TrainConfig, train
    from train.synth import generate

    data = generate(out / "data", n=TINY_TRAIN_IMAGES, seed=0)
    log(f"training the tiny preset for 1 epoch on {TINY_TRAIN_IMAGES} generated images ...")
    result = train(TrainConfig(data=data, out=out / "run", preset="tiny", epochs=1, batch_size=16, seed=0))
    shutil.copytree(result.best_dir, out / "checkpoint")


# --- the set ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchSetupError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise BenchSetupError(f"{path}: expected a JSON object")
    return data


def _load_cached_bundle(root: Path) -> object:
    """A cached bundle loaded as the engine would load it (its files' sha256 checked): BundleError if damaged."""
    from engine.bundle import Bundle

    return Bundle.load(root / "bundle")


def classify_bundles(paths: list[Path]) -> dict[str, Path]:
    """Map bundles to systems by their manifest: fp32 -> "engine", int8 -> "engine-int8"."""
    from engine.bundle import Bundle

    found: dict[str, Path] = {}
    for path in paths:
        try:
            bundle = Bundle.load(path)  # verified now: a damaged bundle would fail every cell later
        except EdlightError as exc:  # a given path that is no bundle: the bench cannot run as asked
            raise BenchSetupError(str(exc)) from exc
        system = "engine-int8" if bundle.manifest.quantization == "int8" else "engine"
        if system in found:
            raise BenchSetupError(f"{path}: a second {system} bundle (first: {found[system]}); pass one fp32 and one int8")
        found[system] = Path(path)
    return found


def _needs(systems: list[str], *names: str) -> bool:
    return any(s in systems for s in names)


def prepare_models(
    size: str,
    systems: list[str],
    cache_dir: Path,
    log: Log,
    checkpoint: Path | None = None,
    bundles: list[Path] | None = None,
    optimum_dir: Path | None = None,
    images_dir: Path | None = None,
) -> ModelSet:
    """Find or build every model the requested `systems` need, and the benchmark images.

    Given paths win over building: `checkpoint` (torch, and the source of the Optimum export and
    of any bundle not given), `bundles` (fp32/int8 by their manifest), `optimum_dir`. Systems whose
    model cannot be had here (e.g. no torch to build or export) are left out of the set with a note.
    Raises BenchSetupError for unusable given paths.
    """
    notes: list[str] = []
    unavailable: dict[str, str] = {}
    cache_dir = Path(cache_dir).expanduser()
    given_checkpoint = checkpoint is not None
    if checkpoint is not None:
        _check_given_checkpoint(Path(checkpoint).expanduser())
    given = classify_bundles([Path(b) for b in bundles or []])
    user_bundles = dict(given)  # given: not built here from the checkpoint
    unused = {system: path for system, path in given.items() if system not in systems}
    if unused:  # it would be left out silently, and another model timed under its name
        system, path = next(iter(unused.items()))
        kind = "an int8" if system == "engine-int8" else "an fp32"
        raise BenchSetupError(f"{path}: {kind} bundle, timed as system {system}, which --systems leaves out; add it to --systems")
    if optimum_dir is not None and "optimum" not in systems:  # results.json would name an export that never ran
        raise BenchSetupError(f"{optimum_dir}: an Optimum export for system optimum, which --systems leaves out; "
                              "add it to --systems")
    if optimum_dir is not None:
        check_optimum_export(Path(optimum_dir))
    used: list[Path] = []  # the cache entries this run takes
    images = bench_images(cache_dir, log, images_dir, used=used)
    have_torch = is_installed("torch") and is_installed("transformers")
    export_versions = _versions("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")

    # Bundles to build: only for engine systems that can run here (no point exporting for a missing engine).
    wanted_bundles = [s for s in ("engine", "engine-int8") if s in systems and s not in given and not missing_modules(s)]
    if checkpoint is None and (_needs(systems, "torch", "optimum") or wanted_bundles):
        if not have_torch:
            if not given:
                bundles_hint = "; on an engine-only machine pass --model BUNDLE for each bundle to benchmark"
                raise BenchSetupError(
                    f"building the benchmark model needs torch and transformers ({install_hint('export')})"
                    + (bundles_hint if wanted_bundles else "")
                )
            notes.append("no torch here: the model is not built; only the given bundles are measured")
        elif size == "base":
            recipe = {"what": "base", "seed": BASE_SEED, **_versions("edlight", "torch", "transformers", "tokenizers"),
                      "presets": _source_digest("train/presets.py")}
            captions = _captions_of(images)
            root = _cached(cache_dir / f"base-{_key(recipe)}",
                           lambda tmp: build_base_checkpoint(tmp / "checkpoint", captions),
                           "the base-size model (282M parameters, random weights)", log, used=used)
            checkpoint = root / "checkpoint"
        else:
            recipe = {"what": "tiny", "images": TINY_TRAIN_IMAGES, **_versions("edlight", "torch", "transformers"),
                      "train": _source_digest("train/*.py")}
            root = _cached(cache_dir / f"tiny-{_key(recipe)}", lambda tmp: train_tiny(tmp, log),
                           "the tiny model (1 epoch on generated images)", log, used=used)
            checkpoint = root / "checkpoint"
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()

    checkpoint_id = _checkpoint_identity(checkpoint) if checkpoint is not None else None
    if "optimum" in systems and optimum_dir is None and checkpoint is not None:
        if is_installed("optimum"):
            recipe = {"what": "optimum", "checkpoint": checkpoint_id, **export_versions}
            try:
                optimum_dir = _cached(cache_dir / f"optimum-{_key(recipe)}", partial(export_optimum, checkpoint),
                                      "the plain Optimum ONNX export", log, check=check_optimum_export, used=used)
            except Exception as exc:  # as below: the other systems still get measured
                unavailable["optimum"] = f"the Optimum export failed: {type(exc).__name__}: {exc}"
                log(f"optimum: the export failed ({type(exc).__name__}: {exc}); it will be skipped")
        else:
            unavailable["optimum"] = "optimum is not installed, no Optimum export"

    for system in wanted_bundles:
        quantize = "int8" if system == "engine-int8" else None
        if checkpoint is None:
            continue
        if not is_installed("optimum"):
            unavailable[system] = "no bundle given (--model) and the export extra is not installed to make one"
            continue
        recipe = {"what": "bundle", "quantize": quantize, "checkpoint": checkpoint_id, **export_versions,
                  "export": _source_digest("export/*.py", "engine/bundle.py")}
        try:
            root = _cached(cache_dir / f"{system}-{_key(recipe)}",
                           partial(export_engine_bundle, checkpoint, quantize=quantize),
                           f"the {system} bundle (export.onnx.export_bundle, quantize={quantize})", log,
                           check=_load_cached_bundle, used=used)
        except Exception as exc:  # one failed export must not cost the other systems' numbers
            unavailable[system] = f"exporting the bundle failed: {type(exc).__name__}: {exc}"
            log(f"{system}: exporting the bundle failed ({type(exc).__name__}: {exc}); it will be skipped")
            continue
        given[system] = root / "bundle"

    config_source = checkpoint / "config.json" if checkpoint is not None else None
    if config_source is None and given:
        config_source = next(iter(given.values())) / "config.json"
    if config_source is None:
        raise BenchSetupError("nothing to benchmark: pass --checkpoint and/or --model, or install the export extra")
    config = _read_json(config_source)
    sources = {**given, **({"optimum": Path(optimum_dir)} if optimum_dir is not None else {})}
    max_patches = _max_patches(checkpoint, sources)
    beside = [system for system in ("torch", "optimum") if system in systems and system not in unavailable]
    if checkpoint is not None and beside:
        for system, bundle in user_bundles.items():
            if (note := _another_model(bundle, checkpoint, " and ".join(beside))) is not None:
                log(f"warning: {system}: {note}")
                notes.append(f"{system}: {note}")
    given_options = [option for option, value in (("--checkpoint", given_checkpoint), ("--model", bundles)) if value]
    return ModelSet(
        size=size,
        given=given_options,
        checkpoint=checkpoint,
        optimum_dir=Path(optimum_dir) if optimum_dir is not None else None,
        bundles=given,
        images=images,
        max_patches=max_patches,
        vision_config=dict(config.get("vision_config") or {}),
        parameters=count_parameters(checkpoint) if checkpoint is not None else None,
        notes=notes,
        unavailable=unavailable,
        # With what the run was given: a --checkpoint or --model may be a build inside the cache.
        cache_entries=[*used, *(p for p in (checkpoint, optimum_dir, images_dir, *given.values()) if p is not None)],
    )


def _check_given_checkpoint(checkpoint: Path) -> None:
    """Refuse a --checkpoint that is not a Pix2Struct checkpoint with its processor before anything is built
    (an edlight bundle given there, for one, failed every torch and Optimum measurement at the end)."""
    from engine.bundle import MANIFEST_NAME
    from train.checkpoint import CheckpointError, check_checkpoint_dir

    if (checkpoint / MANIFEST_NAME).is_file():
        raise BenchSetupError(
            f"{checkpoint}: an edlight bundle, not a PyTorch checkpoint; pass it with --model (and the checkpoint "
            "it was exported from, if any, with --checkpoint)"
        )
    try:
        check_checkpoint_dir(checkpoint)
    except CheckpointError as exc:
        raise BenchSetupError(str(exc)) from exc


def _another_model(bundle: Path, checkpoint: Path, beside: str) -> str | None:
    """Why the given `bundle` may not be the model `checkpoint` holds (which the systems `beside` time), else
    None. A bundle of another model timed beside them read as one model's rows (the shipped default bundle beside
    a tiny model built here, say)."""
    from engine.bundle import MANIFEST_NAME, sha256_file
    from export.parity import WEIGHT_FILE

    named = str(_read_json(bundle / MANIFEST_NAME).get("source") or "")
    source = Path(named) if named else None
    unknown = (f"whether its rows time the model of the {beside} rows ({checkpoint}) cannot be checked")
    if source is None or not source.is_dir():
        return f"{bundle} was exported from {named or 'a checkpoint it does not name'}, which is not here: {unknown}"
    if source.resolve() == checkpoint.resolve():
        return None
    weights = sorted(p.name for p in checkpoint.iterdir() if WEIGHT_FILE.fullmatch(p.name) and (source / p.name).is_file())
    try:
        same = [sha256_file(source / name) == sha256_file(checkpoint / name) for name in weights]
    except OSError:
        same = []
    if not same:  # nothing to compare (weights stored another way, unreadable)
        return f"{bundle} was exported from {source}: {unknown}"
    if all(same):
        return None
    return (f"{bundle} was exported from {source}, whose weights are not those of {checkpoint} (timed by {beside}): "
            "their rows are not one model's; pass the checkpoint it came from with --checkpoint")


def _checkpoint_identity(checkpoint: Path) -> dict[str, Any]:
    """Cheap identity of a checkpoint: its path plus size and mtime of each weight and config file."""
    files = sorted(p for p in checkpoint.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    return {"path": str(checkpoint.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def _max_patches(checkpoint: Path | None, bundles: dict[str, Path]) -> int:
    """The patch budget every system runs at; systems that disagree are not one comparison. `bundles`: each
    system's model folder (the engine's bundles, an Optimum export)."""
    sources = [checkpoint / "preprocessor_config.json"] if checkpoint is not None else []
    sources += [b / "preprocessor_config.json" for b in bundles.values()]
    found = {source: int(value) for source in sources if source.is_file() and (value := _read_json(source).get("max_patches"))}
    if not found:
        raise BenchSetupError(f"no preprocessor_config.json with max_patches in {', '.join(map(str, sources)) or 'any model'}")
    if len(set(found.values())) > 1:
        listing = "; ".join(f"{source.parent}: {value}" for source, value in found.items())
        raise BenchSetupError(f"the models to compare have different patch budgets ({listing}); give bundles of one model")
    return next(iter(found.values()))
