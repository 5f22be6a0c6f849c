"""Loading and atomically saving Pix2Struct checkpoints (save_pretrained dirs with processor + tokenizer)."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.bundle import MANIFEST_NAME, checkpoint_weights
from engine.errors import EdlightError, is_count, is_installed
from engine.folder import FULL_DISK_ERRNOS, OutputError
from engine.preprocess import PatchConfig, position_limit_of


class CheckpointError(EdlightError):
    """A checkpoint is missing, is not Pix2Struct, or lacks its processor/tokenizer."""


PROCESSOR_FILES = ("preprocessor_config.json",)
FULL_DISK_BYTES = 16 * 1024**2  # less room than this when a write fails: the disk is full (storage_failure)
STORAGE_ERRNOS = FULL_DISK_ERRNOS | {errno.EROFS, errno.EIO}
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either is enough for T5TokenizerFast
PIX2STRUCT_VOCAB = 50244  # transformers' Pix2StructTextConfig default vocab_size


def check_checkpoint_dir(path: str | Path) -> Path:
    """Check that `path` is a local Pix2Struct save_pretrained dir with processor and tokenizer.

    Returns the path; raises CheckpointError naming the path and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}{hub_id_hint(path)}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint must be a save_pretrained directory, got a file: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        run_hint = run_folder_hint(path)
        if run_hint:
            raise CheckpointError(f"{path} is a training run, not a checkpoint; {run_hint}")
        raise CheckpointError(f"{path} is not a model checkpoint: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{cfg_file}: unreadable config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: the model config is not a JSON object; is it a save_pretrained checkpoint?")
    model_type = cfg.get("model_type")
    if model_type != "pix2struct":
        raise CheckpointError(f"{path} is not a Pix2Struct checkpoint (model_type={model_type!r})")
    weights = checkpoint_weights(path)
    if weights is None:  # a shard index counts: transformers reads it
        if (path / MANIFEST_NAME).is_file():
            raise CheckpointError(
                f"{path} is an ONNX bundle made by `edlight export`, not a PyTorch checkpoint; give the "
                "checkpoint it was exported from (`edlight parity` scores a bundle against it)"
            )
        raise CheckpointError(f"{path}: no model weights (model.safetensors or pytorch_model.bin)")
    if weights == "model.safetensors":
        check_safetensors_whole(path / weights)
    elif weights == "model.safetensors.index.json":  # shards: each listed one
        shards = read_json_object(path / weights, "shard index").get("weight_map")
        for shard in sorted(set(shards.values()) if isinstance(shards, dict) else ()):
            if isinstance(shard, str) and "/" not in shard and (path / shard).is_file():
                check_safetensors_whole(path / shard)
    if not all((path / f).is_file() for f in PROCESSOR_FILES):
        raise CheckpointError(
            f"{path}: no preprocessor_config.json; save the Pix2StructProcessor with the model"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer (tokenizer.json); save the Pix2StructProcessor with the model"
        )
    if not (path / "tokenizer.json").is_file() and not all(is_installed(m) for m in SENTENCEPIECE_MODULES):
        raise CheckpointError(sentencepiece_only(path))
    processor = read_json_object(path / "preprocessor_config.json", "processor config")
    generation = read_json_object(path / "generation_config.json", "generation config") if (path / "generation_config.json").exists() else {}
    max_patches = processor.get("max_patches")  # unset: transformers' (and the engine's) 2048
    if max_patches is not None and not is_count(max_patches):
        raise CheckpointError(
            f"{path / 'preprocessor_config.json'}: max_patches is {max_patches!r}; set a whole number of patches "
            "(at least 1) and re-save the processor"
        )
    check_model_settings(path, cfg, processor, generation)
    return path


def check_safetensors_whole(file: Path) -> None:
    """Raise CheckpointError when `file` is not a whole safetensors file: its header unreadable, or the file
    shorter than the tensors its header places (a copy or download cut short). Reads the header alone,
    so a checkpoint is refused before any work rather than when transformers loads it, minutes later."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > 100 * 2**20 or size < 8:  # transformers' own header limit is 100 MB
                raise ValueError(f"its header claims {length} bytes" if size >= 8 else "no header")
            if size < 8 + length:
                raise CheckpointError(
                    f"{file}: cut short ({size} bytes where its header alone takes {8 + length}); copy or save the checkpoint again"
                )
            header = json.loads(handle.read(length))
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); copy or save the checkpoint again") from exc
    if size < 8 + length + end:
        raise CheckpointError(
            f"{file}: cut short ({size} bytes where its header places {8 + length + end}); copy or save the checkpoint again"
        )


def read_json_object(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object in `path` (`what` it holds, for messages; `hint`: what to do, ending them). Raises
    CheckpointError when it cannot be read or holds anything else."""
    then = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: a JSONDecodeError or a UnicodeDecodeError
        raise CheckpointError(f"{path}: unreadable {what} ({exc}){then}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object{then}")
    return data


def check_model_settings(
    path: Path, config: dict[str, Any], processor: dict[str, Any], generation: dict[str, Any]
) -> tuple[int, int]:
    """Check the settings of a checkpoint's config files (config.json, preprocessor_config.json and
    generation_config.json, read) that loading the model and captioning with it read, naming the file and
    the setting: transformers' own errors for them named neither ("'list' object has no attribute 'get'",
    "mat1 and mat2 shapes cannot be multiplied"), or came after a whole export or evaluation. Shared by
    every command that takes a checkpoint. Returns the patch size (height, width); raises CheckpointError.
    """
    from engine.bundle import ModelSettings
    from engine.decode import GenerationSettings

    config_file = path / "config.json"
    for key in ("text_config", "vision_config"):  # else transformers builds defaults, and the checks below blame them
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{config_file}: {key} is {config[key]!r}, not an object of the {key.split('_')[0]} model's settings")
    if processor.get("is_vqa"):
        raise CheckpointError(
            f"{path / 'preprocessor_config.json'}: is_vqa is true: a VQA checkpoint reads a question rendered above "
            "each image, and edlight captions images without one; use a captioning checkpoint "
            "(e.g. pix2struct-textcaps-base)"
        )
    if generation:
        _check_token_ids(path / "generation_config.json", generation)
    _check_token_ids(config_file, config)
    try:
        # As the engine will read them: transformers' own errors for a bad length ("'<=' not supported
        # between instances of 'str' and 'int') came from loading the model, naming neither file nor setting.
        settings = ModelSettings(path=path, config=config, generation_config=generation)
        settings.check_generation_settings()
        processors = settings.token_processors
    except EdlightError as exc:
        raise CheckpointError(str(exc)) from exc
    vocab = (config.get("text_config") or {}).get("vocab_size", PIX2STRUCT_VOCAB)
    if is_count(vocab) and (unknown := GenerationSettings(max_new_tokens=0, **processors).unknown_tokens(int(vocab))):
        raise CheckpointError(
            f"{path / 'generation_config.json'}: names tokens the model does not have (vocabulary of {vocab}): {unknown}"
        )
    size = processor.get("patch_size") or {"height": 16, "width": 16}
    if not isinstance(size, dict) or not all(is_count(size.get(side)) for side in ("height", "width")):
        raise CheckpointError(
            f"{path / 'preprocessor_config.json'}: patch_size is {size!r}; write it as "
            '{"height": H, "width": W} with whole numbers of pixels (Pix2Struct uses 16 and 16)'
        )
    patch = (int(size["height"]), int(size["width"]))
    # The vision encoder embeds a patch of height x width x 3 values: a processor cutting other patches fails
    # deep inside the model ("mat1 and mat2 shapes cannot be multiplied").
    width = (config.get("vision_config") or {}).get("patch_embed_hidden_size", 768)  # Pix2Struct's default: 16 x 16 x 3
    if is_count(width) and patch[0] * patch[1] * 3 != width:
        raise CheckpointError(
            f"{path / 'preprocessor_config.json'}: patch_size {patch[0]}x{patch[1]} gives patches of "
            f"{patch[0] * patch[1] * 3} values, and the model's vision_config.patch_embed_hidden_size "
            f"(config.json) embeds {width}; use the patch size the model was trained with"
        )
    return patch


def _check_token_ids(path: Path, settings: dict[str, Any]) -> None:
    """Token ids the model and the engine read must be whole numbers (a JSON "1" breaks both)."""
    text = settings.get("text_config")
    for where, values in ((path.name, settings), (f"{path.name} text_config", text if isinstance(text, dict) else {})):
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            value = values.get(key)
            ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if value is not None and not all(is_count(i, minimum=0) for i in ids):
                raise CheckpointError(f"{path}: {key} in {where} is {value!r}; token ids are whole numbers >= 0")


# What transformers needs to turn a SentencePiece spiece.model into the fast tokenizer edlight uses.
SENTENCEPIECE_MODULES = ("sentencepiece", "google.protobuf")


def sentencepiece_only(path: Path) -> str:
    """The error for a checkpoint whose tokenizer is a spiece.model alone: how to write its tokenizer.json."""
    folder = json.dumps(str(path))  # a Python string literal for any path (quotes, backslashes), then shell-quoted
    program = f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({folder}).save_pretrained({folder})"
    return (
        f"{path}: its tokenizer is spiece.model alone (SentencePiece), and edlight reads tokenizer.json; write it "
        f"once with `pip install sentencepiece protobuf` and `python -c {shlex.quote(program)}`"
    )


def run_folder_hint(path: str | Path) -> str:
    """For a training run folder (edlight's, holding best/ or last/; a transformers Trainer's, holding
    checkpoint-N/): which of its checkpoints to pass instead; else ""."""
    path = Path(path)
    found = [path / name for name in ("best", "last") if (path / name / "config.json").is_file()]
    if found:
        what = {"best": "best test BLEU", "last": "latest epoch"}
        return "pass " + " or ".join(f"{p} ({what[p.name]})" for p in found)
    try:
        steps = [
            (int(p.name.split("-")[1]), p) for p in path.iterdir()
            if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "config.json").is_file()
        ]  # fmt: skip
    except OSError:
        return ""
    if not steps:
        return ""
    return f"pass one of its {len(steps)} checkpoint-N folders, e.g. the latest, {max(steps)[1]}"


RUN_CONFIG = "run_config.json"
# Inside each checkpoint a training run saves: the settings that read its data and pick its test split, so a
# checkpoint copied out of its run (cp -r runs/r/best models/v1) is still scored on the run's test split.
CHECKPOINT_DATA_SETTINGS = "edlight_data.json"
DATA_SETTING_NAMES = ("caption_column", "skip_bad", "test_ratio", "split_seed")
# The help of the evaluate/parity/export options whose default is the training run's setting.
RUN_DEFAULT = "Default: the training run's (recorded in the checkpoint, or RUN/run_config.json beside it), else {}."


def run_data_options(what: str, skip_bad_help: str) -> Callable[[Any], Any]:
    """The --caption-column, --skip-bad/--no-skip-bad and --test-ratio options of a command that reads a data
    folder as a checkpoint's training run did (their None defaults: see `data_settings`). `what` names the
    data folder in the help ("the metadata", "the --data metadata")."""
    import click

    from engine.click_types import FiniteFloatRange

    options = [
        click.option("--caption-column", default=None, help=f"Caption column of {what}. {RUN_DEFAULT.format('text')}"),
        click.option("--skip-bad/--no-skip-bad", default=None, help=f"{skip_bad_help} {RUN_DEFAULT.format('no')}"),
        click.option("--test-ratio", type=FiniteFloatRange(0, 1, max_open=True), default=None,
                     help=f"Test share of the hash split. {RUN_DEFAULT.format(0.1)}"),
    ]  # fmt: skip

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@dataclass(frozen=True)
class DataSettings:
    """How to read a data folder: the options of `edlight train` that shape the examples and the split.

    `recorded` names the run_config.json the values not given explicitly came from (None: defaults);
    `overridden` the settings given explicitly with another value than that file's.
    """

    caption_column: str = "text"
    skip_bad: bool = False
    test_ratio: float = 0.1
    split_seed: int = 0
    recorded: str | None = None
    overridden: tuple[str, ...] = ()

    def describe(self) -> str:
        """E.g. "caption column 'text', test_ratio 0.1, split seed 0 (from runs/r/run_config.json)"."""
        text = f"caption column {self.caption_column!r}, test_ratio {self.test_ratio}, split seed {self.split_seed}"
        text += ", skipping bad entries" if self.skip_bad else ""
        if not self.recorded:
            return text
        where = f"from {self.recorded}"
        if self.overridden:
            where += f", except {', '.join(self.overridden)} given here"
            if {"test_ratio", "split_seed"} & set(self.overridden):
                where += ": not the run's test split, so it may hold images the model was trained on"
        return f"{text} ({where})"


def data_settings(
    checkpoint: str | Path,
    caption_column: str | None = None,
    skip_bad: bool | None = None,
    test_ratio: float | None = None,
    split_seed: int | None = None,
) -> DataSettings:
    """The data settings to evaluate `checkpoint` with: the ones given win, the others are what its training
    run used (CHECKPOINT_DATA_SETTINGS in the checkpoint; for checkpoints saved before it, RUN/run_config.json
    beside RUN/best and RUN/last), else `edlight train`'s defaults.

    So evaluate, parity and export --data read the data, and pick the test split, as training did. A missing
    or unreadable file, or a value of the wrong type in it, falls back to the default.
    """
    given = {"caption_column": caption_column, "skip_bad": skip_bad, "test_ratio": test_ratio, "split_seed": split_seed}
    folder = Path(checkpoint).expanduser().resolve()  # resolved: "." is RUN/best too
    run_file = folder / CHECKPOINT_DATA_SETTINGS
    if not run_file.is_file():  # a checkpoint saved before it: its run's settings beside it
        run_file = folder.parent / RUN_CONFIG
    recorded = _read_object(run_file) if any(v is None for v in given.values()) else {}
    values: dict[str, Any] = {}
    used = False
    overridden = []
    for name, value in given.items():
        if value is None and _recordable(name, recorded.get(name)):
            value, used = recorded[name], True
        elif value is not None and _recordable(name, recorded.get(name)) and recorded[name] != value:
            overridden.append(name)
        if value is not None:
            values[name] = value
    return DataSettings(**values, recorded=str(run_file) if used else None, overridden=tuple(overridden) if used else ())


def read_run_config(run: Path) -> dict[str, Any]:
    """RUN/run_config.json as a dict; {} when it is missing, unreadable or no JSON object (for callers that
    then fall back to defaults; a resumed training run judges the file itself)."""
    return _read_object(run / RUN_CONFIG)


def _read_object(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _recordable(name: str, value: object) -> bool:
    """Whether a run_config.json value is usable for the data setting `name`."""
    if isinstance(value, bool):
        return name == "skip_bad"
    if name == "caption_column":
        return isinstance(value, str) and bool(value)
    if name == "test_ratio":
        return isinstance(value, (int, float)) and 0 <= value < 1
    return name == "split_seed" and isinstance(value, int)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # the hub's "org/name" (letters, digits, - _ .)


def is_hub_id(name: str | Path) -> bool:
    """True for "org/name" that is no local path: neither it nor its "org" folder is here (`runs/bset`
    beside runs/ is a mistyped folder, said to be not found, not asked of the hub)."""
    text = str(name)
    return HUB_ID.fullmatch(text) is not None and not Path(text.split("/")[0]).exists()


def hub_id_hint(path: str | Path) -> str:
    """For a missing `path` spelled as a hub id whose first folder is here (`google/` beside the run):
    why it was read as a folder; else ""."""
    text = str(path)
    first = text.split("/")[0]
    if HUB_ID.fullmatch(text) is None or not Path(first).is_dir():
        return ""
    return f" (taken as a folder, since {first}/ is here; the hub id {text} is read where no {first}/ folder is)"


def offline_unless_hub_id(checkpoint: str | Path) -> None:
    """Set HF_HUB_OFFLINE=1 (unless the environment sets it) for a checkpoint folder, which needs no hub;
    a hub id keeps the network, where there is one, to download it."""
    if not is_hub_id(checkpoint):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


# What a checkpoint is read from: configs, processor, tokenizer and safetensors weights; .bin weights only
# when a repo has no safetensors (textcaps-base holds both, 1.1 GB each).
HUB_FILES = ("*.json", "*.safetensors", "*.model")
HUB_BIN_WEIGHTS = ("pytorch_model*.bin",)  # not a Trainer's training_args.bin


def resolve_checkpoint(name: str | Path) -> Path:
    """The local directory of checkpoint `name`: the path itself, or for a hub id ("org/name") its snapshot
    in huggingface_hub's cache, downloaded first where a network exists (HF_HUB_OFFLINE=1: the cache only).

    Every reader then checks and loads a directory, so a hub id gets the same checks as a local
    checkpoint before any work. Raises CheckpointError when the hub cannot provide it.
    """
    if not is_hub_id(name):
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(name), allow_patterns=list(HUB_FILES)))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(name), allow_patterns=list(HUB_BIN_WEIGHTS)))
    except Exception as exc:  # huggingface_hub's own errors: offline and not cached, no such repo, gated, network
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"checkpoint not found: {name} is no local folder, and as a hub id the hub could not provide it ({why})"
        ) from exc
    return folder


def load_model_weights(path: Path) -> Any:
    """Pix2StructForConditionalGeneration from the checkpoint folder `path`.

    Raises CheckpointError when its weights leave any of the model's tensors out: transformers fills those
    with random values and only logs it, so a weights file of another model (or a config.json of another
    size) would train, evaluate and export as a random model, with exit 0.
    """
    from transformers import Pix2StructForConditionalGeneration
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its lines on missing and unused tensors: said below, in one line each
    try:
        model, loading = Pix2StructForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # the others' messages may concern any file: callers name the folder
            raise
        # A weights file cut short or overwritten: name it, not the folder (of shards, which one is not told).
        weights = checkpoint_weights(path) or ""
        where = f"{path / weights}: not" if weights.endswith(".safetensors") else f"{path}: one of its weights files is not"
        why = " ".join(str(exc).split())
        raise CheckpointError(f"{where} a readable safetensors file ({why}); re-save the model with save_pretrained") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        weights = checkpoint_weights(path) or "its weights"
        raise CheckpointError(
            f"{path / weights}: holds no values for {len(missing)} of the model's {len(model.state_dict())} tensors "
            f"({_first_names(missing)}), which would be random; the weights were saved from another model than config.json "
            "describes: re-save the model with save_pretrained"
        )
    unused = sorted(loading.get("unexpected_keys") or [])
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensors of its weights are not the model's and are left unused "
                      f"({_first_names(unused)})", stacklevel=2)
    return model


def _first_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def load_checkpoint(path: str | Path, max_patches: int | None = None) -> tuple[Any, Any]:
    """Load (Pix2StructForConditionalGeneration, Pix2StructProcessor) from a checkpoint.

    `path` is a local save_pretrained dir, or a hub id such as google/pix2struct-textcaps-base
    where a network (or the local hub cache) can provide it (resolve_checkpoint). A checkpoint whose text decoder is
    not causal (`text_config.is_decoder=False`) is fixed with a warning. `max_patches` overrides
    the processor's patch budget. Raises CheckpointError for anything that is not a complete
    Pix2Struct checkpoint.
    """
    from transformers import Pix2StructProcessor

    from train.presets import ensure_causal_decoder

    path = check_checkpoint_dir(resolve_checkpoint(path))
    try:
        model = load_model_weights(path)
        processor = Pix2StructProcessor.from_pretrained(path)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors, tokenizers and transformers raise their own types for damaged files
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: cannot load the Pix2Struct checkpoint with its processor ({why})") from exc
    if ensure_causal_decoder(model):
        warnings.warn(
            f"{path}: text_config.is_decoder was False (a non-causal decoder); set it to True",
            stacklevel=2,
        )
    if max_patches is not None:
        processor.image_processor.max_patches = int(max_patches)
    seq_len = getattr(model.config.vision_config, "seq_len", None)
    patches = processor.image_processor.max_patches
    if seq_len is not None and patches >= seq_len:  # a 1 x max_patches strip needs ids up to max_patches
        warnings.warn(
            f"{path}: max_patches={patches} reaches the model's {seq_len} row/column positions; "
            "images too long and thin for them are refused",
            stacklevel=2,
        )
    return model, processor


def position_check(path: str | Path, max_patches: int | None = None) -> tuple[PatchConfig, int] | None:
    """(patch config, row/column position limit) of a checkpoint (or bundle) folder, with max_patches
    given or its own, for train.data.load_split's `positions`. None when the files cannot tell (a damaged
    file is reported when the checkpoint loads). For a hub id, pass its resolve_checkpoint folder."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
        processor = json.loads((Path(path) / "preprocessor_config.json").read_text())
        patches = PatchConfig.from_preprocessor_config(processor, max_patches=max_patches)
        limit = position_limit_of(config)
    except (OSError, ValueError, TypeError, AttributeError, LookupError, EdlightError):
        return None
    return patches, limit


def atomic_save(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` then swap `tmp_dir` into `dest`, so `dest` is always complete or absent-but-recoverable.

    The old `dest` is first renamed to `.NAME.old` and deleted after the new one is in
    place; `recover(dest)` restores it after a kill between the two renames.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
    except Exception as exc:
        why = storage_failure(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written copy; `dest` is untouched
        if why is None:
            raise
        raise OutputError(f"{dest}: cannot save the checkpoint: {why}") from exc
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


def storage_failure(exc: BaseException, written: Path) -> str | None:
    """Why writing the folder `written` failed, when it failed for want of storage; None for anything
    else (a bug, or a file read elsewhere: shown as it is).

    An OSError anywhere in the chain (Optimum wraps it in its own words) about a file in `written`, or
    naming no file and meaning a full, read-only or failing disk. torch and safetensors report a full
    disk only as "unexpected pos ..." or "I/O error", so a failure with next to no room left on that file
    system counts as one too; their own words are kept.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and _about_storage(cause, written):
            return cause.strerror or str(cause)
        cause = cause.__cause__ or cause.__context__
    existing = next((folder for folder in (written, *written.parents) if folder.exists()), Path("."))
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return None
    if free >= FULL_DISK_BYTES:
        return None
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"no space left on the device ({free // 1024} KiB free; {type(exc).__name__}{': ' + said if said else ''})"


def _about_storage(error: OSError, written: Path) -> bool:
    if error.filename is None:
        return error.errno in STORAGE_ERRNOS
    try:
        return Path(os.fsdecode(error.filename)).absolute().is_relative_to(written.absolute())
    except (TypeError, ValueError):
        return False


def recover(dest: Path) -> None:
    """Undo a half-finished `atomic_save`: restore `.NAME.old` if `dest` is gone; drop stale temp dirs."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if not dest.exists() and old.exists():
        old.rename(dest)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
