"""The model bundle: the one directory an ops person copies to a CPU server.

This module owns the bundle format. The export stage writes bundles through
`Manifest` and `write_manifest`; the engine opens them only through
`Bundle.load`, which refuses a missing file or a hash mismatch before any image is read (the Captioner
hashes the graphs while ONNX Runtime loads them: `graphs_later`, `verify_graph_hashes`).

Layout of a bundle directory::

    edlight.json                 manifest (this schema)
    encoder_model.onnx           Pix2Struct vision encoder
    decoder_model_merged.onnx    text decoder with KV cache (layout "merged"), or
    decoder_model.onnx + decoder_with_past_model.onnx   (layout "split")
    <graph>.onnx.data            a large graph's weights (export.optimize.store_weights_beside), int8 graphs
                                 are named *_int8.onnx
    tokenizer.json, preprocessor_config.json, config.json, generation_config.json
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import BundleError, is_count, is_finite_number
from engine.preprocess import position_limit_of

FORMAT_VERSION = 1
MANIFEST_NAME = "edlight.json"
# transformers' GenerationConfig().max_length: the caption length of a checkpoint that sets none.
TRANSFORMERS_MAX_LENGTH = 20
# Generation settings the engine does not take from a checkpoint, with the transformers values that switch them
# off: sampling, beams, and the logits processors that act on the image or on probabilities. Export warns
# about them; edlight's PyTorch decoding (train's test BLEU, evaluate, parity) switches them off too, so that
# it decodes as the engine will. (The engine follows the caption lengths, length_penalty, early_stopping and
# the processors that act on tokens: engine.decode.process_scores.)
UNAPPLIED_GENERATION: dict[str, object] = {
    "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "renormalize_logits": False,
    # Classifier-free guidance and watermarking change greedy tokens too; the rest are other decoding modes.
    "guidance_scale": None, "watermarking_config": None, "penalty_alpha": None, "dola_layers": None,
    "num_return_sequences": 1, "max_time": None, "stop_strings": None, "force_words_ids": None,
    "remove_invalid_values": False, "token_healing": False, "encoder_repetition_penalty": 1.0,
    "prompt_lookup_num_tokens": None, "cache_implementation": None, "use_cache": True,
    # What generate returns: token ids alone, as the engine's callers read them.
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
    "output_attentions": False, "output_hidden_states": False,
}  # fmt: skip
# Of those, settings of how generate computes, not what: the engine's captions are the same either way (it always
# keeps a cache), and transformers' save_pretrained writes "use_cache": false. Nothing to warn about.
SPEED_ONLY_GENERATION = frozenset({"use_cache", "cache_implementation"})
SUPPORT_FILES = ("tokenizer.json", "preprocessor_config.json", "config.json", "generation_config.json")
DECODER_LAYOUTS = {
    "merged": ("decoder_merged",),
    "split": ("decoder", "decoder_with_past"),
}
# How many images one run of the graphs may hold without one image changing another's numbers
# (a quantizer that scales a whole tensor at once ties the rows of a batch together):
#   "batch": any number (fp32);
#   "steps": one image per encoder run and first decoder step, any number per cached decoder step
#            (int8 with row-wise activation scales in the cached steps, export.quantize);
#   "image": one image per run (int8 bundles written before "steps" existed).
DECODER_BATCHING = ("batch", "steps", "image")


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(root: Path, expected: dict[str, str]) -> None:
    """Raise BundleError naming the first of `expected`'s files (name -> sha256, below `root`) whose content
    differs or that cannot be read."""
    for name, digest in sorted(expected.items()):
        path = root / name
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        if actual != digest:
            raise BundleError(f"{path}: sha256 does not match {MANIFEST_NAME}; the bundle was modified or is corrupt")


# Types of the manifest's fields as JSON gives them (a hand-edited manifest gets a named error, not a crash).
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,), "max_patches": (int,), "decoder_layout": (str,), "onnx_files": (dict,), "files": (dict,),
    "format_version": (int,), "quantization": (str, type(None)), "graph_rewrites": (list,), "versions": (dict,),
    "parity": (dict, type(None)), "created": (str,), "decoder_batching": (str, type(None)),
    "int8_weight_bits": (int, type(None)),
}
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list", type(None): "null"}


@dataclass
class Manifest:
    """What `edlight.json` holds. Unknown keys from newer writers are kept in `extra`."""

    source: str  # checkpoint the bundle was exported from (path or hub id)
    max_patches: int
    decoder_layout: str  # "merged" or "split"
    onnx_files: dict[str, str]  # role ("encoder", "decoder_merged", "decoder", "decoder_with_past") -> file name
    quantization: str | None = None  # None (fp32) or "int8"
    decoder_batching: str | None = None  # one of DECODER_BATCHING; None: not recorded (see `batching`)
    # int8: bits of the per-channel weights of the integer (MatMulInteger) MatMuls, 7 since they came in
    # (see export.quantize.INT8_WEIGHT_BITS); None: fp32, or an int8 bundle written before, with 8.
    int8_weight_bits: int | None = None
    graph_rewrites: list[str] = field(default_factory=list)  # export-time graph optimisations applied
    versions: dict[str, str] = field(default_factory=dict)  # torch/transformers/optimum/onnxruntime used
    parity: dict[str, Any] | None = None  # PyTorch vs engine BLEU on the test split, when exported with --data
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, every file but the manifest
    created: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batching(self) -> str:
        """`decoder_batching`, or for bundles that do not record it: "batch" for fp32, "image" for int8."""
        if self.decoder_batching is not None:
            return self.decoder_batching
        return "batch" if self.quantization is None else "image"

    def graph_files(self) -> set[str]:
        """The listed ONNX graphs and the weights files beside them (`<graph>.data`, Optimum's `<graph>_data`)."""
        graphs = set(self.onnx_files.values())
        return {name for name in self.files if name in graphs or any(name.startswith((g + ".", g + "_")) for g in graphs)}

    @property
    def full_range_int8(self) -> bool:
        """An int8 bundle whose integer MatMuls have 8-bit weights, which CPUs without VNNI saturate."""
        return self.quantization == "int8" and (self.int8_weight_bits or 8) > 7

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> Manifest:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = [k for k in ("source", "max_patches", "decoder_layout", "onnx_files", "files") if k not in data]
        if missing:
            raise BundleError(f"{where}: manifest lacks {', '.join(missing)}")
        for key, types in _MANIFEST_TYPES.items():
            value = data.get(key)
            if key in data and (not isinstance(value, types) or isinstance(value, bool)):
                wanted = " or ".join(_TYPE_NAMES[t] for t in types)
                raise BundleError(f"{where}: {key} must be {wanted}, got {json.dumps(value)[:60]}")
        for key in ("onnx_files", "files"):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data[key].items()):
                raise BundleError(f"{where}: {key} must map file names to strings")
        # Every file is the bundle's own: a name reaching outside it would make a copy depend on another folder.
        for name in [*data["files"], *data["onnx_files"].values()]:
            parts = re.split(r"[/\\]", name)  # either separator: a bundle may be copied to Windows
            if not name or name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", name):
                raise BundleError(f"{where}: {name!r} is not a file name inside the bundle")
        if data.get("quantization") not in (None, "int8"):
            raise BundleError(f"{where}: unknown quantization {data['quantization']!r} (expected int8, or null for fp32)")
        if data["max_patches"] < 1:
            raise BundleError(f"{where}: max_patches must be positive, got {data['max_patches']}")
        version = data.get("format_version", 0)  # absent: written before the manifest had a version
        if "format_version" in data and version < 1:
            raise BundleError(f"{where}: format_version must be 1 or more, got {version}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: bundle format {version} is newer than this engine understands ({FORMAT_VERSION}); "
                "upgrade edlight"
            )
        extra = {k: v for k, v in data.items() if k not in known}
        manifest = cls(**{k: v for k, v in data.items() if k in known}, extra=extra)
        if manifest.decoder_layout not in DECODER_LAYOUTS:
            raise BundleError(f"{where}: unknown decoder_layout {manifest.decoder_layout!r}")
        if manifest.decoder_batching is not None and manifest.decoder_batching not in DECODER_BATCHING:
            raise BundleError(
                f"{where}: unknown decoder_batching {manifest.decoder_batching!r} (expected one of {', '.join(DECODER_BATCHING)})"
            )
        roles = ("encoder", *DECODER_LAYOUTS[manifest.decoder_layout])
        absent = [r for r in roles if r not in manifest.onnx_files]
        if absent:
            raise BundleError(f"{where}: manifest names no ONNX file for {', '.join(absent)}")
        return manifest


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Hash every file in `directory` into `manifest.files` and write `edlight.json`."""
    directory = Path(directory)
    manifest.files = {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    path = directory / MANIFEST_NAME
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


@dataclass
class ModelSettings:
    """The generation settings of a model folder (a bundle, or a checkpoint before it is exported), read as
    transformers' `generate` reads them; each raises BundleError naming the file and the setting. Where
    generation_config.json leaves a token id out, config.json's is taken (transformers would use none: no start
    token is an error there, and no EOS means no caption ends before its length limit)."""

    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]

    def _token_setting(self, key: str) -> tuple[Any, str, Path] | None:
        """(value, name, file) of the first `key` set in generation_config.json, config.json, then config.json's
        text_config."""
        sources = (
            (self.generation_config, "generation_config.json", key),
            (self.config, "config.json", key),
            (self._text_config(), "config.json", f"text_config.{key}"),
        )
        for source, file, name in sources:
            if source.get(key) is not None:
                return source[key], name, self.path / file
        return None

    def _text_config(self) -> dict[str, Any]:
        text = self.config.get("text_config", {})
        return text if isinstance(text, dict) else {}

    @property
    def decoder_start_token_id(self) -> int:
        # transformers starts from the generation config's bos_token_id when it states no decoder start.
        generation = self.generation_config
        if generation.get("decoder_start_token_id") is None and generation.get("bos_token_id") is not None:
            return _setting(generation["bos_token_id"], "bos_token_id", self.path / "generation_config.json")
        found = self._token_setting("decoder_start_token_id")
        return self.pad_token_id if found is None else _setting(*found)

    @property
    def pad_token_id(self) -> int:
        found = self._token_setting("pad_token_id")
        return 0 if found is None else _setting(*found)

    @property
    def eos_token_ids(self) -> list[int]:
        found = self._token_setting("eos_token_id")
        if found is None:
            return [1]
        value, name, where = found
        values = value if isinstance(value, list) else [value]
        if not values:
            raise BundleError(f"{where}: {name} is an empty list")
        return [_setting(v, name, where) for v in values]

    @property
    def default_max_new_tokens(self) -> int:
        """The caption length transformers' `generate` gives with this generation config: the stated one
        (stated_max_new_tokens), else generate's default of 20 new tokens."""
        stated = stated_max_new_tokens(self.generation_config, self.path / "generation_config.json")
        return TRANSFORMERS_MAX_LENGTH if stated is None else stated

    @property
    def default_min_new_tokens(self) -> int:
        """Tokens before EOS may end a caption, as in `generate`: min_new_tokens, else min_length less the
        start token, else 0."""
        where = self.path / "generation_config.json"
        if self.generation_config.get("min_new_tokens") is not None:
            return _setting(self.generation_config["min_new_tokens"], "min_new_tokens", where)
        if self.generation_config.get("min_length") is not None:
            return max(0, _setting(self.generation_config["min_length"], "min_length", where) - 1)
        return 0

    @property
    def length_penalty(self) -> float:
        """Beam search's length penalty (transformers' default 1.0)."""
        value = self.generation_config.get("length_penalty", 1.0)
        value = 1.0 if value is None else value
        if not is_finite_number(value):
            raise BundleError(f"{self.path / 'generation_config.json'}: length_penalty must be a number, got {value!r}")
        return float(value)

    @property
    def early_stopping(self) -> bool | str:
        """Beam search's stopping rule, as transformers reads it: True stops once num_beams captions are
        finished; False (the default) and "never" run on while the best open beam could still win, "never"
        judging that, under a positive length penalty, at the longest caption allowed."""
        value = self.generation_config.get("early_stopping", False)
        if value not in (None, True, False, "never"):
            raise BundleError(
                f"{self.path / 'generation_config.json'}: early_stopping must be true, false or \"never\", got {value!r}"
            )
        return False if value is None else value

    @property
    def repetition_penalty(self) -> float:
        """transformers' repetition_penalty (1.0: none), which `generate` applies from the generation config."""
        value = self.generation_config.get("repetition_penalty", 1.0)
        value = 1.0 if value is None else value
        if not is_finite_number(value) or value <= 0:
            raise BundleError(f"{self.path / 'generation_config.json'}: repetition_penalty must be a number > 0, got {value!r}")
        return float(value)

    @property
    def no_repeat_ngram_size(self) -> int:
        """transformers' no_repeat_ngram_size (0: none)."""
        value = self.generation_config.get("no_repeat_ngram_size", 0)
        return 0 if value is None else _setting(value, "no_repeat_ngram_size", self.path / "generation_config.json")

    @property
    def token_processors(self) -> dict[str, Any]:
        """The generation config's logits processors that name tokens (see `token_processors`)."""
        return token_processors(self.generation_config, self.path / "generation_config.json")

    def check_generation_settings(self) -> None:
        """Read every generation setting the engine uses (a bad one: BundleError now, not mid-run)."""
        _ = (self.decoder_start_token_id, self.pad_token_id, self.eos_token_ids, self.default_max_new_tokens,
             self.default_min_new_tokens, self.length_penalty, self.early_stopping, self.repetition_penalty,
             self.no_repeat_ngram_size, self.token_processors)


@dataclass
class Bundle(ModelSettings):
    """A verified bundle on disk plus the model facts the engine needs."""

    manifest: Manifest
    preprocessor_config: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True, graphs_later: bool = False) -> Bundle:
        """Open a bundle directory.

        Raises BundleError when the directory or its manifest is missing, a listed file is absent,
        (with `verify_hashes`) a file's sha256 differs from the manifest, or a model setting the engine
        reads (patch size, token ids, lengths) is not a usable integer. `graphs_later` leaves the hashes of
        the ONNX graphs and their weights files, nearly all of a bundle's bytes, to `verify_graph_hashes`,
        which a caller can run while ONNX Runtime loads them.
        """
        root = Path(path)
        manifest_path = root / MANIFEST_NAME
        try:
            if not root.is_dir():
                what = "a file, not a bundle directory" if root.exists() else "no such bundle directory"
                raise BundleError(f"{root}: {what}")
            if not manifest_path.is_file():
                fix = (
                    f"it holds a PyTorch checkpoint: export it with `edlight export {root} --out BUNDLE`"
                    if _is_checkpoint(root) else "create one with `edlight export`"
                )
                raise BundleError(f"{root}: not an edlight bundle ({MANIFEST_NAME} is missing); {fix}")
        except OSError as exc:  # a folder above it without permission, a name too long
            raise BundleError(f"{root}: cannot open the bundle: {exc.strerror or exc}") from exc
        try:
            # A byte-order mark is allowed: an editor on Windows (Notepad) adds one to a manifest it saves.
            data = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # the path is named already
            raise BundleError(f"{manifest_path}: unreadable manifest: {why}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{manifest_path}: manifest is not a JSON object")
        manifest = Manifest.from_dict(data, manifest_path)

        needed = set(SUPPORT_FILES) | set(manifest.onnx_files.values())
        unlisted = sorted(needed - set(manifest.files))
        if unlisted:
            raise BundleError(f"{root}: manifest does not list {', '.join(unlisted)}")
        for name in sorted(manifest.files):
            if not (root / name).is_file():
                raise BundleError(f"{root / name}: missing from bundle (listed in {MANIFEST_NAME})")
        later = manifest.graph_files() if graphs_later else set()
        if verify_hashes:
            verify_files(root, {name: digest for name, digest in manifest.files.items() if name not in later})

        def read_json(name: str) -> dict[str, Any]:
            try:
                loaded = json.loads((root / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundleError(f"{root / name}: unreadable JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise BundleError(f"{root / name}: expected a JSON object")
            return loaded

        preprocessor_config = read_json("preprocessor_config.json")
        # The manifest is not hashed; the processor config is: a hand-edited patch budget shows up here.
        processor_patches = preprocessor_config.get("max_patches", manifest.max_patches)
        if processor_patches != manifest.max_patches:
            raise BundleError(
                f"{manifest_path}: max_patches {manifest.max_patches} differs from preprocessor_config.json's "
                f"{processor_patches}, which the encoder was exported for"
            )
        bundle = cls(
            path=root,
            manifest=manifest,
            config=read_json("config.json"),
            generation_config=read_json("generation_config.json"),
            preprocessor_config=preprocessor_config,
        )
        bundle.check_settings()
        return bundle

    def verify_graph_hashes(self) -> None:
        """The sha256 check of the ONNX graphs and their weights files, for a bundle loaded with `graphs_later`.
        Raises BundleError naming the first file that differs from the manifest or cannot be read."""
        files = self.manifest.files
        verify_files(self.path, {name: files[name] for name in self.manifest.graph_files()})

    @property
    def model_id(self) -> str:
        """A short name for exactly this bundle's contents (12 hex digits of a hash over its files' sha256),
        written into every caption record: a resume must not mix two models' captions."""
        listing = "".join(f"{name}\0{digest}\n" for name, digest in sorted(self.manifest.files.items()))
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:12]

    def captions_id(self, num_beams: int = 1, max_new_tokens: int | None = None, min_new_tokens: int | None = None) -> str:
        """What caption records name as their "model": `model_id`, followed by the decoding settings that
        differ from the bundle's own (greedy, its generation config's max_new_tokens), e.g.
        "07775de15b7f num_beams=3". Captions of other settings differ too: a resume must not mix them."""
        changed = [f"num_beams={num_beams}"] * (num_beams != 1)
        longest = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        # A length the bundle does not state as max_new_tokens (read from max_length, or generate's default)
        # is always named: earlier versions of the engine read those otherwise, and their records must not pass
        # for this one's. A minimum is named whenever there is one, as versions that ignored the bundle's did.
        if longest != self.default_max_new_tokens or self.generation_config.get("max_new_tokens") is None:
            changed.append(f"max_new_tokens={longest}")
        shortest = self.default_min_new_tokens if min_new_tokens is None else min_new_tokens
        if shortest:
            changed.append(f"min_new_tokens={shortest}")
        # Settings of the bundle's generation config that engines before 2026-11-28 did not apply: named,
        # so that their records are not resumed as this one's (the model id alone is the same).
        if self.repetition_penalty != 1.0:
            changed.append(f"repetition_penalty={self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            changed.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size}")
        if num_beams != 1 and self.early_stopping == "never" and self.length_penalty > 0:
            changed.append("early_stopping=never")
        # Likewise for engines before 2026-11-29, which did not apply these (their values are the model id's),
        # by their names in the generation config.
        changed.extend(name.replace("forced_eos_token_ids", "forced_eos_token_id") for name in self.token_processors)
        return " ".join([self.model_id, *changed])

    def onnx_path(self, role: str) -> Path:
        return self.path / self.manifest.onnx_files[role]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def max_patches(self) -> int:
        return int(self.manifest.max_patches)

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.preprocessor_config.get("patch_size", {"height": 16, "width": 16})
        if not isinstance(size, dict):
            raise BundleError(f"{self.path / 'preprocessor_config.json'}: patch_size must be an object, got {size!r}")
        where = self.path / "preprocessor_config.json"
        return (_setting(size.get("height"), "patch_size.height", where, 1),
                _setting(size.get("width"), "patch_size.width", where, 1))

    @property
    def position_limit(self) -> int:
        """Rows of the encoder's row/column position tables (vision_config.seq_len; HF's default 4096)."""
        try:
            return position_limit_of(self.config)
        except BundleError as exc:
            raise BundleError(f"{self.path / 'config.json'}: {exc}") from None

    def weights_bytes(self) -> int:
        """Bytes of the ONNX graphs and their weights files: about what ONNX Runtime holds once it loads them."""
        return sum((self.path / name).stat().st_size for name in self.manifest.graph_files())

    def cached_bytes_per_image(self, num_beams: int = 1) -> int | None:
        """Bytes the decoder keeps for each image while it writes the caption: the cross-attention keys and
        values of every patch in every layer, for each beam, and the image's encoder states (float32, as the
        graphs take them); None where config.json does not give the sizes."""
        text, vision = self._text_config(), self.config.get("vision_config")
        sizes = [text.get("num_layers"), text.get("num_heads"), text.get("d_kv"),
                 vision.get("hidden_size") if isinstance(vision, dict) else None]  # fmt: skip
        counts = [int(size) for size in sizes if isinstance(size, int) and is_count(size)]  # JSON numbers
        if len(counts) < len(sizes):
            return None
        layers, heads, head_size, hidden = counts
        return 4 * self.max_patches * (2 * layers * heads * head_size * num_beams + hidden)

    def check_settings(self) -> None:
        """Read every model setting the engine uses, so that a bad one is a BundleError now, not mid-run."""
        _ = (self.patch_size, self.position_limit)
        self.check_generation_settings()


# The weights of a `save_pretrained` folder: one file, or the index of its shards.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_weights(root: Path) -> str | None:
    """The weights file of a `save_pretrained` folder that transformers loads (the first of CHECKPOINT_WEIGHTS
    there, its order), or None."""
    return next((name for name in CHECKPOINT_WEIGHTS if (root / name).is_file()), None)


def _is_checkpoint(root: Path) -> bool:
    """Whether `root` looks like a `save_pretrained` model folder (what `edlight export` takes)."""
    return (root / "config.json").is_file() and checkpoint_weights(root) is not None


def stated_max_new_tokens(generation_config: dict[str, Any], where: Path) -> int | None:
    """The caption length a generation config (its dict; `where` names it in errors) states, read as
    transformers' `generate` reads it: max_new_tokens; else max_length, which counts the decoder's start
    token (so one token less), except that generate takes a max_length equal to its own default (20) as
    unset; None when it states neither."""
    if generation_config.get("max_new_tokens") is not None:
        return _setting(generation_config["max_new_tokens"], "max_new_tokens", where, 1)
    if generation_config.get("max_length") is not None:
        length = _setting(generation_config["max_length"], "max_length", where, 2)  # 1 is the start token alone
        return None if length == TRANSFORMERS_MAX_LENGTH else length - 1
    return None


def token_processors(generation_config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The logits processors a generation config (its dict; `where` names it in errors) sets that name tokens,
    as engine.decode.GenerationSettings takes them (only those set): transformers' bad_words_ids,
    sequence_bias (in JSON, [[tokens], bias] pairs), forced_bos_token_id, forced_eos_token_id,
    suppress_tokens and begin_suppress_tokens."""
    config = generation_config
    found: dict[str, Any] = {}
    if config.get("bad_words_ids") is not None:
        words = [_token_ids(w, "bad_words_ids", where) for w in _nonempty_list(config["bad_words_ids"], "bad_words_ids", where)]
        if not all(words):
            raise BundleError(f"{where}: bad_words_ids holds an empty list")
        found["bad_words_ids"] = tuple(words)
    if config.get("sequence_bias") is not None:
        biases = []
        for pair in _nonempty_list(config["sequence_bias"], "sequence_bias", where):
            # As transformers' generate takes them: token ids from 1, and the bias written as a float (2.0, not 2).
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], float) and is_finite_number(pair[1])):
                raise BundleError(f"{where}: sequence_bias must be a list of [[token ids], bias] pairs with float biases, got {pair!r}")
            biases.append((_token_ids(pair[0], "sequence_bias", where, minimum=1), pair[1]))
            if not biases[-1][0]:
                raise BundleError(f"{where}: sequence_bias holds an empty list of token ids")
        found["sequence_bias"] = tuple(biases)
    if config.get("forced_bos_token_id") is not None:
        found["forced_bos_token_id"] = _setting(config["forced_bos_token_id"], "forced_bos_token_id", where)
    if config.get("forced_eos_token_id") is not None:
        value = config["forced_eos_token_id"]
        found["forced_eos_token_ids"] = _token_ids(value if isinstance(value, list) else [value], "forced_eos_token_id", where)
        if not found["forced_eos_token_ids"]:
            raise BundleError(f"{where}: forced_eos_token_id is an empty list")
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if config.get(name) is not None:
            found[name] = _token_ids(config[name], name, where)
    return {name: value for name, value in found.items() if value != ()}


def _token_ids(value: Any, name: str, where: Path, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise BundleError(f"{where}: {name} must be a list of token ids, got {value!r}")
    return tuple(_setting(t, f"each token id in {name}", where, minimum) for t in value)


def _nonempty_list(value: Any, name: str, where: Path) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise BundleError(f"{where}: {name} must be a non-empty list, got {value!r}")
    return value


def _setting(value: Any, what: str, where: Path, minimum: int = 0) -> int:
    """`value` as a setting that must be an integer >= `minimum` (JSON true/false and 16.0 are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BundleError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return value
