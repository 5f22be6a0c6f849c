"""Fine-tune Pix2Struct on a data folder: read top to bottom.

One process, or several unchanged under `torchrun` (DDP; gloo on CPU) or, on GPUs, `accelerate launch`.
Every process sees its own slice of each global batch; only rank 0 writes to RUN/.

RUN/ layout
  run_config.json   the settings that define the run (a rerun or --resume must match)
  metrics.jsonl     one line per epoch: loss, lr, images/s, BLEU, chrF, wall time
  steps.jsonl       one line per optimizer step: loss, lr
  curves.png        loss and BLEU per epoch
  best/             save_pretrained dir (model + processor + tokenizer) with the best test BLEU
  last/             the same after the latest epoch, plus trainer_state.pt (optimizer, scheduler,
                    RNG, epoch/step) for --resume
Both checkpoint dirs are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collate tokenises inside worker processes

from engine.bundle import stated_max_new_tokens
from engine.click_types import STOP_SIGNALS, TolerantStream, check_stop, is_terminal, say
from engine.errors import EdlightError, ImageError, is_count, some_names
from engine.folder import OutputError, output_lock, write_report
from engine.images import enable_heif, open_lazily
from engine.preprocess import (
    DEFAULT_POSITION_LIMIT,
    PatchConfig,
    grid_size,
    position_error,
    position_limit_of,
    standardization,
)
from engine.resources import available_cores
from train.evaluate import patch_config_of

# Generic defaults for fine-tuning a --base checkpoint; presets bring their own (train/presets.py).
BASE_DEFAULTS = {
    "epochs": 5, "batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.05, "max_new_tokens": 64,
    "lead_tokens": 3, "lead_weight": 1.0,
}  # fmt: skip
# Training images are shrunk once to about this multiple of the pixels the processor keeps,
# so augmentation and patch extraction work on small images. The processor then resizes again;
# see CaptionDataset for what keeps the result close to the engine's single resize.
PREDOWNSCALE_AREA = 1.6
# In-memory cache of the shrunk training images, per training process (shared out among its data workers,
# each of which caches the images it reads).
CACHE_BYTES = 2 * 1024**3
PRECISIONS = ("auto", "bf16", "fp32")
# Without a drawn bar (off a terminal, or progress=False) the loop logs a line at each quarter epoch and at
# least this often: an epoch over real data on CPUs can take hours.
LINE_PROGRESS_SECONDS = 300.0
# Caption tokens (with </s>) a training label keeps; longer captions are cut (and warned about).
LABEL_TOKENS = 128
# Settings that define a run: --resume and a second `train` into the same --out must match them.
IDENTITY_FIELDS = (
    "data", "base", "preset", "batch_size", "grad_accum", "lr", "max_patches", "seed", "augment",
    "test_ratio", "split_seed", "caption_column", "skip_bad", "warmup_ratio", "weight_decay", "max_grad_norm",
    "lead_tokens", "lead_weight",
)  # fmt: skip
# Whole-number settings and their least values (checked, and kept as ints, by TrainConfig.resolved).
COUNT_FIELDS = {
    "epochs": 1, "batch_size": 1, "grad_accum": 1, "eval_batch_size": 1, "max_patches": 4, "seed": 0, "split_seed": 0,
    "lead_tokens": 0, "max_new_tokens": 1, "num_workers": 0, "threads": 1, "stop_after": 1,
}  # fmt: skip
OPTIONAL_COUNT_FIELDS = {"max_patches", "max_new_tokens", "threads", "stop_after"}  # None: a default
# What identity fields added later meant for runs whose run_config.json predates them.
IDENTITY_BEFORE_FIELD = {"lead_tokens": 3, "lead_weight": 1.0}


class TrainError(EdlightError):
    """Training cannot start or continue: bad settings, a conflicting --out, nothing to train on."""


class TrainDiverged(TrainError):
    """The loss stopped being finite mid-run (the checkpoints of finished epochs stay)."""


@dataclass
class TrainConfig:
    """Everything `train` needs. Fields left as None take the preset's (or BASE_DEFAULTS') value."""

    data: Path | str
    out: Path | str
    base: Path | str | None = None  # a Pix2Struct save_pretrained dir to fine-tune
    preset: str | None = None  # or a named config built from scratch (train/presets.py)
    epochs: int | None = None
    batch_size: int | None = None  # per process
    grad_accum: int = 1
    lr: float | None = None
    max_patches: int | None = None  # default: the checkpoint's/preset's
    seed: int = 0
    resume: bool = False
    skip_bad: bool = False
    augment: bool = True
    test_ratio: float = 0.1
    split_seed: int = 0
    caption_column: str = "text"
    # Caption length of the per-epoch evaluation, saved in the checkpoints (None: the preset's; with --base or
    # --resume the checkpoint's own when it states one, else BASE_DEFAULTS').
    max_new_tokens: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.01
    # The first `lead_tokens` tokens of every caption weigh `lead_weight` times as much in the loss (see
    # caption_loss); 1.0 is the plain token mean.
    lead_tokens: int | None = None
    lead_weight: float | None = None
    max_grad_norm: float = 1.0
    eval_batch_size: int = 32
    num_workers: int = 1  # DataLoader workers per process: prepare batches while the model trains
    threads: int | None = None  # torch threads per process; None: the CPU cores left after the workers
    # Autocast of the training forward pass: "bf16", "fp32", or "auto" (bf16 where the processor has native
    # bf16 arithmetic, e.g. AVX512-BF16/AMX CPUs or bf16 GPUs). Weights, optimizer state and evaluation stay fp32.
    precision: str = "auto"
    progress: bool = True
    stop_after: int | None = None  # end this invocation after N epochs (schedule still spans `epochs`)

    def resolved(self) -> TrainConfig:
        """A copy with paths made absolute, None fields filled from the preset or BASE_DEFAULTS (max_new_tokens
        of --base and --resume excepted: see the field) and whole-number settings checked and made ints."""
        from train.presets import get_preset

        if (self.base is None) == (self.preset is None):
            raise TrainError("give exactly one of --base CHECKPOINT or --preset NAME")
        defaults = dict(BASE_DEFAULTS)
        if self.preset is not None:
            try:
                p = get_preset(self.preset)
            except ValueError as exc:
                raise TrainError(str(exc)) from None
            defaults.update(
                epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, warmup_ratio=p.warmup_ratio,
                max_new_tokens=p.max_new_tokens, lead_tokens=p.lead_tokens, lead_weight=p.lead_weight,
            )  # fmt: skip
        c = TrainConfig(**asdict(self))
        c.data = Path(c.data).expanduser().resolve()
        c.out = Path(c.out).expanduser().resolve()
        if c.base is not None and Path(c.base).expanduser().exists():
            c.base = str(Path(c.base).expanduser().resolve())
        if c.resume and c.epochs is None:  # a plain --resume goes on with the run's plan, not the preset's
            c.epochs = _planned_epochs(c.out)
        if c.resume or self.preset is None:
            # Left None: the checkpoint's own caption length (a base's, or the run's in last/), read when it loads.
            defaults.pop("max_new_tokens")
        for name, value in defaults.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        for name, minimum in COUNT_FIELDS.items():
            value = getattr(c, name)
            if value is None and name in OPTIONAL_COUNT_FIELDS:
                continue
            if not is_count(value, minimum):
                raise TrainError(f"{name} must be an integer of at least {minimum}, got {value!r}")
            setattr(c, name, int(value))  # a numpy integer would not go into run_config.json
        if c.lr is None or not 0 < c.lr <= 1e6:  # far beyond any use; torch's float32 overflows at 3.4e38
            raise TrainError(f"lr must be positive and at most 1e6, got {c.lr}")
        weight = c.lead_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise TrainError(f"lead_weight must be a positive number, got {weight!r}")
        c.lead_weight = float(weight)
        if c.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
        return c

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(d[k]) if isinstance(d[k], Path) else d[k]) for k in IDENTITY_FIELDS}


def caption_loss(logits: Any, labels: Any, lead_tokens: int, lead_weight: float) -> Any:
    """Token cross-entropy of a batch, the first `lead_tokens` tokens of each caption weighted `lead_weight`.

    With lead_weight 1 this is the plain mean over real tokens (what the model's own `.loss` computes). Why
    weight the lead: a caption's opening words pick the whole sentence (which of a teacher's phrasings, which
    kind of work), yet they are a few tokens among twenty, and under teacher forcing every later token is
    easy to predict from them; so the plain mean barely asks the image for that choice, and greedy
    decoding then starts the wrong sentence. Measured on the tiny preset (README, training section).
    Padding is -100 in `labels` and weighs nothing; the loss is computed in fp32 even under autocast.
    """
    import torch.nn.functional as F

    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    weights = (labels != -100).to(token_loss.dtype)
    weights[:, :lead_tokens] *= lead_weight
    return (token_loss * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass
class TrainResult:
    best_dir: Path
    last_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # bad data entries left out with skip_bad
    is_main: bool = True  # False on the other ranks of a multi-process run (they wrote nothing)


# ----------------------------------------------------------------------------- data


def _planned_epochs(out: Path) -> int | None:
    """The epochs recorded in `out`'s run_config.json (None when it has none; `_check_out` judges the file)."""
    from train.checkpoint import read_run_config

    planned = read_run_config(out).get("epochs")
    return planned if is_count(planned) else None


class CaptionDataset:
    """Training examples as (patches, mask, caption); images shrunk once, augmented per epoch.

    Keys are (epoch, index) pairs: augmentation is seeded by (seed, epoch, index), so the
    images do not depend on worker processes or on where a run was resumed.

    Pix2Struct standardises each image by its own mean and standard deviation before resizing, and
    the engine takes them from the full-resolution image. Shrinking smooths away sensor noise and
    thins strokes, so a shrunk photo's standard deviation is smaller (a third smaller for a 300-dpi
    scan) and the model would train on larger values than it is served. So the statistics of each
    shrunk image are corrected to the full-resolution ones, and carried over to its augmented copies.
    Without augmentation, a shrunk 300-dpi scan's values then come within about 0.03 of the engine's
    on average, with the same spread to 1% (0.15 and 40% apart without the correction and Lanczos).
    """

    def __init__(
        self, examples: Sequence[Any], processor: Any, augment: bool, seed: int, position_limit: int = DEFAULT_POSITION_LIMIT,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.examples = list(examples)
        self.processor = processor
        self.patch_config = patch_config_of(processor)
        self.max_patches = self.patch_config.max_patches
        self.position_limit = position_limit  # the model's row/column positions (see __getitem__)
        self.cache_bytes = cache_bytes  # what this copy may keep of the shrunk images
        self.augment = augment
        self.seed = seed
        self._cache: dict[int, Image.Image] = {}
        self._cache_bytes = 0
        self._full_views: dict[int, _FullView] = {}  # per image, from its first (full) read in this process

    def __len__(self) -> int:
        return len(self.examples)

    def _load(self, i: int) -> Image.Image:
        if i in self._cache:
            return self._cache[i]
        from train.evaluate import load_rgb

        target = self.max_patches * self.patch_config.patch_height * self.patch_config.patch_width * PREDOWNSCALE_AREA
        path = self.examples[i].path
        view = self._full_views.get(i)
        enable_heif()  # in each DataLoader worker
        try:
            handle = open_lazily(path)
        except (OSError, UnidentifiedImageError) as exc:  # checked before training; gone or changed since
            raise ImageError(f"{path}: cannot read the image any more: {getattr(exc, 'strerror', None) or exc}") from exc
        with handle as f:
            stored_size = f.size
            if view is not None and view.stored_size != stored_size:
                view = None  # the file was replaced since: read it as for the first time
            # Every read is whole, as the first (for what the engine sees), also where the cache is full: a
            # JPEG decoded at reduced scale (Pillow's draft) is cheaper, but other pixels, and a resumed run
            # then trained on other images than an uninterrupted one from the first epoch past the cache.
            # At the sizes that fill the cache (hundreds of images at 2048 patches) a step takes seconds.
            img = load_rgb(f, name=str(path))
        full = standardization(img) if view is None else None
        full_size = img.size if view is None else view.size
        if img.size[0] * img.size[1] > target:  # Lanczos: bilinear and the processor's resize blurred 8-10% flatter
            img = img.resize(_shrunk_size(img.size, target, full_size, self.patch_config), Image.Resampling.LANCZOS)
        if full is not None:
            mean, std = standardization(img)
            view = self._full_views[i] = _FullView(stored_size, full_size, full[0] - mean, full[1] / std)
        nbytes = img.size[0] * img.size[1] * 4  # Pillow keeps RGB in 4 bytes a pixel
        if self._cache_bytes + nbytes <= self.cache_bytes:
            self._cache[i] = img
            self._cache_bytes += nbytes
        return img

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any, str]:
        from train.evaluate import encode_images

        epoch, i = key
        img = self._load(i)
        if self.augment:
            from train.augment import augment

            img = augment(img, np.random.default_rng([self.seed, epoch, i]))
            if position_error(*img.size, self.patch_config, self.position_limit) is not None:
                # Stretched beyond the model's positions: the image as it is (load_split checked that it fits).
                img = self._load(i)
        mean, std = standardization(img)
        view = self._full_views[i]
        enc = encode_images(self.processor, [img], standardizations=[(mean + view.mean_shift, std * view.std_factor)])
        return enc["flattened_patches"][0], enc["attention_mask"][0], self.examples[i].text


@dataclass(frozen=True)
class _FullView:
    """What the engine sees of a training image that training shrinks."""

    stored_size: tuple[int, int]  # (width, height) as the file stores it: another one means a new file
    size: tuple[int, int]  # (width, height) at full resolution, EXIF orientation applied
    mean_shift: float  # full-resolution mean - the shrunk copy's
    std_factor: float  # full-resolution standard deviation / the shrunk copy's


def _shrunk_size(size: tuple[int, int], target: float, full_size: tuple[int, int], config: PatchConfig) -> tuple[int, int]:
    """About `target` pixels in the aspect of `size`, with the patch grid of the full image.

    The grid follows the aspect ratio alone, and rounding to whole pixels can tip it over a boundary:
    a 406x722 photo got 21x12 patches in training and 21x11 from the engine. Tried in turn: the sizes
    within a few pixels of the rounded one; sizes of exactly the full image's aspect (at 1:2 the grid
    sits on a boundary, which only the same ratio rounds the same way); the rounded short side with any
    long side (a pixel of a 50-pixel-high strip moves the grid more than a few pixels of its length).
    The rounded size when none keeps the grid.
    """
    scale = math.sqrt(target / (size[0] * size[1]))
    width, height = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    grid = grid_size(full_size[1], full_size[0], config)
    wide = width >= height
    short_side, long_side = (height, width) if wide else (width, height)
    aspect = max(full_size) / min(full_size)

    def candidates() -> Iterator[tuple[int, int]]:  # (short, long)
        yield from sorted(((short_side + ds, long_side + dl) for ds in range(-3, 4) for dl in range(-3, 4)),
                          key=lambda c: abs(c[0] - short_side) + abs(c[1] - long_side))
        for step in range(short_side // 4 + 1):
            for short in (short_side - step, short_side + step):
                yield short, round(short * aspect)
        for step in range(long_side // 2 + 1):
            yield short_side, long_side - step
            yield short_side, long_side + step

    for short, length in candidates():
        w, h = (length, short) if wide else (short, length)
        if w >= 1 and h >= 1 and grid_size(h, w, config) == grid:
            return w, h
    return width, height


def make_collate(tokenizer: Any, max_length: int = LABEL_TOKENS) -> Any:
    """Stack patches; tokenise captions (with </s>), padding -> -100 so it is not learned."""
    import torch

    def collate(items: list[tuple[Any, Any, str]]) -> dict[str, Any]:
        patches = torch.stack([it[0] for it in items])
        mask = torch.stack([it[1] for it in items])
        tok = tokenizer(
            [it[2] for it in items],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        labels = tok["input_ids"].masked_fill(tok["attention_mask"] == 0, -100)
        return {"flattened_patches": patches, "attention_mask": mask, "labels": labels}

    return collate


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's index batches for one epoch; every index is used exactly once across ranks.

    The permutation depends only on (seed, epoch), so all ranks agree without talking and
    a resumed run replays the same order. A global batch of `batch_size * world` indices is
    cut into `world` near-equal parts; a final remainder too small to give every rank an
    example is folded into the previous global batch, so no rank ever gets an empty batch
    and every rank runs the same number of steps (DDP needs that).
    """
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_step = batch_size * world
    groups = [perm[i : i + per_step] for i in range(0, n, per_step)]
    if len(groups) > 1 and len(groups[-1]) < world:
        groups[-2].extend(groups.pop())
    batches = []
    for grp in groups:
        parts = np.array_split(np.array(grp, dtype=np.int64), world)
        batches.append([int(x) for x in parts[rank]])
    return batches


# ----------------------------------------------------------------------------- run dir


def _thumbnail(image: Image.Image, side: int = 640) -> Image.Image:
    """Shrink to fit side x side (in place): plenty for the few hundred patches a from-scratch preset uses,
    and the processor then works on a small image."""
    image.thumbnail((side, side))
    return image


def _check_out(cfg: TrainConfig) -> str:
    """Decide what to do with RUN/: "fresh" or "resume". Raises TrainError on a conflicting dir."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    run_file = out / "run_config.json"
    trained = (out / "last").is_dir() or (out / "best").is_dir()
    if run_file.is_file() and not trained:
        # A start that failed or was killed before its first checkpoint: nothing to keep or continue.
        return "fresh"
    if cfg.resume and not run_file.is_file():
        raise TrainError(f"--resume: {out} holds no run to continue; check the path, or drop --resume to start one")
    if run_file.is_file():
        try:
            saved = json.loads(run_file.read_text())
        except ValueError as exc:
            raise TrainError(f"{run_file}: unreadable ({exc}); choose a new --out") from exc
        mine = cfg.identity()
        saved = {**IDENTITY_BEFORE_FIELD, **saved}
        if saved.get("base") and mine["base"] and saved["base"] != mine["base"]:
            # A --base since moved or deleted (a resumed run loads RUN/last) stays as given: the same path,
            # made absolute as resolved() made it then. A hub id is never made a path.
            if str(Path(mine["base"]).expanduser().resolve()) == saved["base"]:
                mine["base"] = saved["base"]
        # A run that recorded its data's fingerprint may find the data elsewhere: the fingerprint is
        # compared once the data is read (_check_same_data).
        moved_ok = {"data"} if isinstance(saved.get("data_fingerprint"), dict) else set()
        diffs = [
            f"{k}: {saved.get(k)!r} -> {mine[k]!r}"
            for k in IDENTITY_FIELDS if saved.get(k) != mine[k] and k not in moved_ok
        ]
        if diffs:
            raise TrainError(
                f"--out {out} holds a different run; choose a new --out. Differences: " + "; ".join(diffs)
            )
        if not cfg.resume:
            raise TrainError(
                f"--out {out} already holds a run with these settings; pass --resume to continue it (on the same "
                "data) or choose a new --out"
            )
        if (out / "last" / "trainer_state.pt").is_file():
            _check_caption_length(cfg.max_new_tokens, out / "last" / "generation_config.json")
            return "resume"
        raise TrainError(f"--resume: {out / 'last'} holds no trainer state to continue from; choose a new --out")
    if out.exists() and (others := [p.name for p in out.iterdir() if not _may_sit_beside_a_run(p)]):
        raise TrainError(
            f"--out {out} is not empty ({some_names(sorted(others))}) and holds no edlight run; choose a new or "
            "empty directory"
        )
    return "fresh"


def _may_sit_beside_a_run(path: Path) -> bool:
    """Files a new run may start beside: its lock, hidden files (.DS_Store, NFS's .nfs*) and the log it is
    writing itself (`edlight train --out RUN ... 2> RUN/train.log`: the shell makes it first). None is a
    name the run writes."""
    return path.name == RUN_LOCK or path.name.startswith(".") or (path.is_file() and path.suffix in (".log", ".out", ".err"))


def _check_caption_length(given: int | None, saved: Path) -> None:
    """Refuse a --resume whose --max-new-tokens is not the run's (`saved`: last/'s generation config). Every
    epoch's test BLEU, and so best/, is measured at the run's length: a change partway through read as a drop
    in BLEU, and left best/ and last/ exporting captions of different lengths."""
    if not given or not saved.is_file():
        return
    try:
        stated = stated_max_new_tokens(json.loads(saved.read_text()), saved)
    except (ValueError, EdlightError):
        return  # unreadable: loading the checkpoint says what is wrong with it
    if stated is not None and given != stated:
        raise TrainError(
            f"--max-new-tokens {given}: this run evaluates {stated} tokens per caption ({saved}), and its earlier "
            "epochs' test BLEU and best/ were measured at that length; resume without --max-new-tokens, or start "
            "a new --out"
        )


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a DataLoader worker: let the first SIGTERM or SIGHUP pass. `timeout`, systemd and Kubernetes signal
    the whole process group; torch's workers died of it, and their death raised a RuntimeError in the main
    process while it was unwinding from the same signal (exit 1, with a traceback, instead of 143 and the resume
    note). The main process shuts its workers down as it unwinds (`_shut_down_workers`); a second signal (as
    multiprocessing sends its children at exit) ends a worker as before."""
    import signal

    def let_pass(signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:  # nohup's stays
            signal.signal(signum, let_pass)


def _shut_down_workers(loader: Any) -> None:
    """Stop a DataLoader's persistent workers now (they read their queue's end and exit), as its iterator's
    finaliser would: at interpreter exit that came after multiprocessing's own, which signals and joins them."""
    shut_down = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if callable(shut_down):
        shut_down()


def best_record(metrics: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The metrics of the epoch best/ holds: the last one marked best (test BLEU, its ties broken by chrF;
    the training loss without a test split)."""
    return next((m for m in reversed(metrics) if m.get("best")), None)


def long_caption_warnings(tokenizer: Any, train_ex: Sequence[Any], test_ex: Sequence[Any], max_new_tokens: int) -> list[str]:
    """Warnings for captions the model cannot learn or write whole: training labels keep LABEL_TOKENS
    tokens, and generation stops after max_new_tokens, which caps BLEU on the test split."""

    def too_long(examples: Sequence[Any], limit: int, with_end: bool) -> list[tuple[int, str]]:
        if not examples:
            return []
        ids = tokenizer([e.text for e in examples], add_special_tokens=with_end)["input_ids"]
        return sorted(((len(i), e.file_name) for i, e in zip(ids, examples, strict=True) if len(i) > limit), reverse=True)

    warnings = []
    for split, examples, limit, with_end, what in (
        ("training", train_ex, LABEL_TOKENS, True, f"are cut to the {LABEL_TOKENS} tokens a training label keeps"),
        ("test", test_ex, max_new_tokens, False, f"are longer than the {max_new_tokens} tokens evaluation generates "
         "(raise --max-new-tokens), so no prediction can match them whole"),
    ):  # fmt: skip
        long = too_long(examples, limit, with_end)
        if long:
            worst = ", ".join(f"{name} ({n} tokens)" for n, name in long[:3])
            warnings.append(f"warning: {len(long)} {split} caption(s) {what}; the longest: {worst}")
    return warnings


def unwritable_character_warnings(tokenizer: Any, examples: Sequence[Any]) -> list[str]:
    """A warning naming the caption characters the tokenizer has no token for: it encodes them as <unk>,
    which decoding drops, so the model learns to write nothing there (a --base tokenizer meets symbols its
    pretraining lacked, a preset's those only test captions hold)."""
    unk = tokenizer.unk_token_id
    chars = sorted({c for e in examples for c in e.text if not c.isspace()})
    if unk is None or not chars:
        return []
    ids = tokenizer(chars, add_special_tokens=False)["input_ids"]
    missing = {c for c, i in zip(chars, ids, strict=True) if unk in i}
    affected = [e.file_name for e in examples if missing.intersection(e.text)]
    if not affected:
        return []
    shown = " ".join(sorted(missing)[:12]) + (" ..." if len(missing) > 12 else "")
    return [
        f"warning: {len(affected)} caption(s) hold characters the tokenizer has no token for ({shown}): they are "
        f"read as <unk>, which decoding drops, so the model cannot write them (spell them out in the captions to "
        f"keep their meaning); e.g. {', '.join(affected[:3])}"
    ]


def _check_writable(out: Path) -> None:
    """Raises TrainError when `out` cannot be created or written. An `out` that is a file is left to
    _check_out, which says so; folders made here and left empty are removed by _run_lock."""
    if out.exists() and not out.is_dir():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise TrainError(f"--out {out}: cannot create or write this folder ({exc.strerror or exc})") from None


def data_fingerprint(examples: Sequence[Any], split: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run's data: a digest of every usable example's file name, caption and image file's
    size in bytes (not its path, so a copied or moved folder matches; nor its content, which would mean
    reading every image at each start), with the counts for messages."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda e: e.file_name):
        digest.update(f"{example.file_name}\0{example.text}\0{example.path.stat().st_size}\n".encode())
    return {"sha256": digest.hexdigest(), "examples": len(examples), "train": split["train"], "test": split["test"]}


def _check_same_data(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuses to resume on data other than the run's: its schedule was planned for that many examples,
    and best/ compares BLEU across epochs on one test split."""
    saved = json.loads((out / "run_config.json").read_text()).get("data_fingerprint")
    if not isinstance(saved, dict) or saved.get("sha256") == fingerprint["sha256"]:
        return  # a run from before fingerprints was matched by its data path
    then = f"{saved.get('examples')} examples ({saved.get('train')} train, {saved.get('test')} test)"
    now = f"{fingerprint['examples']} ({fingerprint['train']} train, {fingerprint['test']} test)"
    raise TrainError(
        f"--resume: the data changed since {out} started (then {then}, now {now}; or captions, names or image "
        f"file sizes changed). Continuing would re-plan the schedule and compare BLEU across different test sets. "
        f"To train on the new data, start a new run from this one: --base {out / 'last'} --out NEW_FOLDER"
    )


def _older(checkpoint: Path, than: Path) -> bool:
    """Whether save_pretrained directory `checkpoint` is missing or was written before `than`."""
    try:
        return (checkpoint / "config.json").stat().st_mtime_ns < (than / "config.json").stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a torn last line from a kill
    return rows


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_report(path, json.dumps(value, indent=2) + "\n")  # whole or not at all: a kill leaves old or new


def _save_checkpoint(folder: Path, model: Any, processor: Any, cfg: TrainConfig) -> None:
    """A checkpoint: the model and processor as save_pretrained writes them, and the run's data settings (a
    checkpoint copied out of its run is still evaluated on the run's test split)."""
    from train.checkpoint import CHECKPOINT_DATA_SETTINGS, DATA_SETTING_NAMES

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    identity = cfg.identity()
    _write_json(folder / CHECKPOINT_DATA_SETTINGS, {name: identity[name] for name in DATA_SETTING_NAMES})


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_report(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(metrics: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]], path: Path) -> None:
    """PNG of train loss (per step and per epoch) and test BLEU/chrF per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        n_per_epoch = max(1, max(s["step"] for s in steps) / max(1, max(s["epoch"] for s in steps)))
        ax1.plot(
            [s["step"] / n_per_epoch for s in steps], [s["loss"] for s in steps], alpha=0.3, label="step"
        )
    ax1.plot([m["epoch"] for m in metrics], [m["loss"] for m in metrics], "o-", label="epoch mean")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax1.set_yscale("log")
    ax1.legend()
    ev = [m for m in metrics if m.get("bleu") is not None]
    ax2.plot([m["epoch"] for m in ev], [m["bleu"] for m in ev], "o-", label="BLEU")
    ax2.plot([m["epoch"] for m in ev], [m["chrf"] for m in ev], "s--", label="chrF")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test score")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- the loop


def lost_another_process(exc: BaseException) -> bool:
    """Whether `exc` is a multi-process run's collective failing because another process is gone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed

    said = str(exc)
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and any(words in said for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))
    )


def data_worker_died(exc: BaseException) -> str | None:
    """What torch said when `exc` comes of a DataLoader worker dying (the kernel's out-of-memory killer, a
    kill): a RuntimeError from the loader's SIGCHLD handler, or the connection the batch was being passed on
    reset under it. None for any other error."""
    import traceback

    seen: BaseException | None = exc
    while seen is not None:
        said = str(seen).strip()
        # Only torch's words for a death: "DataLoader worker (pid 12) is killed by signal: Killed.", "... exited
        # unexpectedly"; not "Caught RuntimeError in DataLoader worker process 0" (the dataset's own error).
        if isinstance(seen, RuntimeError) and said.startswith("DataLoader worker (pid"):
            return said.splitlines()[0]
        if isinstance(seen, (ConnectionError, EOFError)) and not said.startswith("Caught ") and any(
            frame.filename.replace(os.sep, "/").endswith("torch/utils/data/dataloader.py")
            for frame in traceback.extract_tb(seen.__traceback__)
        ):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _every_process_agrees(accelerator: Any) -> Iterator[None]:
    """Run the block's checks on every process, then wait for all of them: when any raised an EdlightError,
    every process raises one (any other exception ends its process, and the others then fail to reach it). The
    first process's error says the first failing process's words (named, when another's); the others' errors are
    marked `said_by_first_process`, so the CLI says the run's error once.

    Alone, each process printed the same error; and a process whose view of the disk differed (another
    machine's --out) failed while the rest waited for it, then died in a raw gloo traceback.
    """
    error: EdlightError | None = None
    try:
        yield
    except EdlightError as exc:
        error = exc
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    said = gather_object([None if error is None else str(error)])
    failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
    if not failed:
        return
    if accelerator.process_index != 0:
        told = error if error is not None else TrainError(f"process {failed[0][0]} of this run failed its checks")
        told.said_by_first_process = True  # type: ignore[attr-defined]
        raise told
    rank, message = failed[0]
    if rank == 0:
        assert error is not None
        raise error
    raise TrainError(
        f"process {rank} of {accelerator.num_processes}: {message} (process 0 found no such problem: with several "
        "machines, --data and --out must be the same folders on every one, e.g. on shared storage)"
    )


def _from_first_process(accelerator: Any, value: Any) -> Any:
    """`value` as the first process has it (pickled to the others), on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _log(msg: str) -> None:
    say(msg)  # a stderr that takes nothing (2>/dev/full, its reader or terminal gone) costs the log, not the run


def _lr_lambda(total: int, warmup: int) -> Any:
    """Linear warmup to the peak, then cosine decay to 5% of it."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def precision_with_accelerate(precision: str) -> str:
    """`precision` (TrainConfig.precision) with what accelerate was asked for: `accelerate launch
    --mixed_precision` or its config file set ACCELERATE_MIXED_PRECISION. bf16 is edlight's own bf16 forward;
    against an explicit --precision fp32 it is refused rather than one of the two quietly ignored."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if asked in ("", "no"):
        return precision
    if asked != "bf16":
        # fp16: its loss scaler skips steps whose gradients overflow, by design; the run stops at a non-finite one.
        raise TrainError(
            f"accelerate's {asked} mixed precision is not supported: launch without --mixed_precision {asked} (or "
            "set it to no or bf16 in accelerate's config); edlight's --precision trains in bf16 where the processor has it"
        )
    if precision == "fp32":
        raise TrainError(
            "accelerate asks for bf16 mixed precision (ACCELERATE_MIXED_PRECISION=bf16: accelerate launch "
            "--mixed_precision bf16, or its config) and --precision asks for fp32: drop one of them"
        )
    return "bf16"


def uses_bf16(precision: str, device_type: str) -> bool:
    """Whether the training forward pass runs under bf16 autocast (see TrainConfig.precision).

    "auto" picks bf16 only where the hardware computes in bf16 natively: there it is the fast path (measured
    on this project's AVX512-BF16 CPU, tiny preset: 1.8x faster steps on one thread, same losses to 3
    digits), while elsewhere PyTorch emulates bf16 and it would be slower than fp32.
    """
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def _rng_state() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class EpochSampler:
    """A batch sampler whose batches the loop replaces each epoch (persistent workers keep their cache)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train(config: TrainConfig) -> TrainResult:
    """Train per `config`; returns the best/last checkpoint dirs and the per-epoch metrics.

    Raises TrainError (bad settings, conflicting --out), DataError (missing or bad data
    folder; every bad file listed unless skip_bad) and CheckpointError (a --base that is
    not a complete Pix2Struct checkpoint). Nothing in an existing run dir is overwritten
    unless `resume` continues that same run.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as held:  # RUN/'s lock, taken in _run by the main process
            return _run(config, held)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, e.g. the rest of a test session


RUN_LOCK = ".run_config.json.lock"  # what output_lock(RUN/run_config.json) holds while a run trains


@contextlib.contextmanager
def _run_lock(out_arg: Path | str) -> Iterator[None]:
    """Hold RUN/'s lock while training: a second `train` into the same --out (or a --resume of a run still
    training) is refused instead of writing the same checkpoints and logs. Folders made for the run (by
    the lock, or _check_writable) are removed again if it leaves them empty (a run refused for its data,
    say). An --out that is a file cannot be locked: output_lock goes on without, and _check_out says so."""
    out = Path(out_arg).expanduser().resolve()
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(output_lock(out / "run_config.json"))
            except OutputError as exc:
                if isinstance(exc.__cause__, BlockingIOError):  # held: not a lock file it cannot open, say
                    raise TrainError(f"--out {out}: another training run is using it ({exc})") from None
                raise TrainError(str(exc)) from None
            yield
    finally:
        for folder in created:  # innermost first, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def _run(config: TrainConfig, held: contextlib.ExitStack) -> TrainResult:
    """The run; `held` keeps RUN/'s lock (taken here, once the main process is known) until train returns."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    from train.checkpoint import (
        atomic_save,
        check_checkpoint_dir,
        load_checkpoint,
        position_check,
        recover,
        resolve_checkpoint,
    )
    from train.data import (
        METADATA_FILES,
        SPLIT_FOLDERS,
        DataError,
        describe_split,
        load_split,
        split_counts,
        split_of,
    )
    from train.evaluate import corpus_scores, encode_files, generate_from_patches, load_rgb
    from train.presets import VISION_INIT_IMAGES, build_from_preset, count_parameters

    cfg = config.resolved()
    precision = precision_with_accelerate(cfg.precision)
    # edlight autocasts the training forward itself (evaluation stays fp32): accelerate's own mixed precision,
    # were it on too, would wrap the model and evaluate under bf16.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    # One process's worker preparing images plus intra-op threads must not exceed the cores: an
    # oversubscribed OpenMP pool spins and waits (measured here: ~10x slower steps on a busy 2-core box).
    # The processes that share this machine's cores: torchrun's ranks on this node, not those of every node.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    cores = available_cores()
    cores_each = max(1, cores // max(1, local_world) - cfg.num_workers)
    if cfg.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cfg.threads or cores_each)
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if is_main and local_world > 1 and cfg.threads is None and torch.get_num_threads() < cores_each:
        # torchrun sets OMP_NUM_THREADS=1 for its ranks unless it is set: on a large machine most cores would idle.
        _log(
            f"warning: each of the {local_world} process(es) on this machine uses {torch.get_num_threads()} torch "
            f"thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; torchrun sets 1 unless it is set) "
            f"of its {cores} cores: pass --threads {cores_each} (per process) to use them"
        )
    bf16 = uses_bf16(precision, accelerator.device.type)
    forward_precision = "bf16" if bf16 else "fp32"  # what "auto" resolved to, for the log and run_config.json
    log = _log if is_main else (lambda _msg: None)
    out = Path(cfg.out)
    data = Path(cfg.data)

    # --- checks before any work: data, checkpoint, run dir. Every process runs them; each block ends with
    # all of them agreeing, so that an error is said once, and one process's failure stops every process.
    with _every_process_agrees(accelerator):
        if is_main:  # one lock for the run's processes (accelerate numbers an MPI run's only in Accelerator())
            held.enter_context(_run_lock(cfg.out))
        if not data.exists():
            raise DataError(f"data folder not found: {data}")
        if not data.is_dir():
            raise DataError(f"data folder is not a directory: {data}")
        if is_main:
            _check_writable(out)  # now, not after the images are read and the model is built
        if is_main and out.exists():
            try:
                recover(out / "last")  # a kill between two renames of atomic_save
                recover(out / "best")
            except OSError as exc:
                raise TrainError(f"--out {out}: cannot put back a checkpoint an interrupted save set aside ({exc})") from exc
    with _every_process_agrees(accelerator):  # every rank has judged RUN/ before rank 0 writes to it
        mode = _check_out(cfg)
        base_dir = None
        if mode == "fresh" and cfg.base is not None:
            # Before anything is written. A hub id is fetched into huggingface_hub's cache (or found there) now,
            # so it gets the same checks as a folder. A resumed run loads RUN/last instead.
            base_dir = check_checkpoint_dir(resolve_checkpoint(cfg.base))
    if mode == "fresh" and cfg.resume:
        log(f"--resume: {out} holds no finished epoch (its run stopped before the first checkpoint); starting at epoch 1")
    with _every_process_agrees(accelerator):
        # Validated once (every image opened), by the first process: every process opening every image
        # multiplied the start-up's reading, on one machine's cores or one shared store. The split is a pure
        # function of the file name (its split folder, else a hash). A checkpoint whose max_patches reach its
        # position tables also refuses images too long and thin for them (a preset's tables are twice max_patches).
        checkpoint = out / "last" if mode == "resume" else base_dir
        positions = position_check(checkpoint, cfg.max_patches) if checkpoint is not None else None
        checked = load_split(
            data, split="all", test_ratio=cfg.test_ratio, seed=cfg.split_seed, caption_column=cfg.caption_column,
            skip_bad=cfg.skip_bad, positions=positions,
        ) if is_main else None  # fmt: skip
    all_ok = _from_first_process(accelerator, checked)
    with _every_process_agrees(accelerator):
        if not is_main and (unseen := [e.path for e in all_ok if not e.path.is_file()]):
            # The others only look for the files: another machine must see the same data folder.
            raise DataError(f"{data}: {len(unseen)} of its {len(all_ok)} images are not found here, e.g. {unseen[0]}")
        part = [split_of(e.file_name, test_ratio=cfg.test_ratio, seed=cfg.split_seed) for e in all_ok]
        train_ex = [e for e, s in zip(all_ok, part, strict=True) if s == "train"]
        test_ex = [e for e, s in zip(all_ok, part, strict=True) if s == "test"]
        split = split_counts((e.file_name for e in all_ok), cfg.test_ratio, cfg.split_seed)
        fingerprint = data_fingerprint(all_ok, split)
        if mode == "resume":
            _check_same_data(out, fingerprint)
        if not train_ex:
            raise TrainError(f"{data}: the train split is empty ({len(all_ok)} usable examples in all; {describe_split(split)})")
        if len(train_ex) < world:  # every process needs an image in every step (epoch_batches)
            raise TrainError(
                f"{data}: {len(train_ex)} training image(s) for {world} processes; each process needs at least one: "
                "start fewer processes, or add images"
            )
    skipped = len(getattr(all_ok, "skipped", []))  # train.data.Examples lists what skip_bad left out
    if cfg.skip_bad:
        log(f"--skip-bad: training on {len(all_ok)} good examples, skipped {skipped} bad entries")
    log(describe_split(split))
    if not test_ex:
        hint = ""
        if split["folders"] and not split["hashed"]:
            held_out = [p for p in sorted(data.iterdir()) if p.is_dir() and SPLIT_FOLDERS.get(p.name.lower()) == "test"]
            unlisted = [p for p in held_out if not any((p / name).is_file() for name in METADATA_FILES)]
            if unlisted:
                hint = f"; {unlisted[0]} has no metadata.jsonl or metadata.csv listing its images"
            elif not held_out:
                hint = "; held-out images go in a test/ folder beside train/"
        log(f"warning: {data}: the test split is empty{hint}; no BLEU, best/ follows the lowest train loss")

    # --- model, processor, optimizer
    set_seed(cfg.seed)
    if mode == "resume":
        model, processor = load_checkpoint(out / "last", max_patches=cfg.max_patches)
    elif base_dir is not None:
        model, processor = load_checkpoint(base_dir, max_patches=cfg.max_patches)
    else:
        assert cfg.preset is not None
        # A preset with vision_init reads the first few hundred training images once, as the engine loads them.
        sample = (_thumbnail(load_rgb(e.path)) for e in train_ex[:VISION_INIT_IMAGES])
        model, processor = build_from_preset(
            cfg.preset, [e.text for e in train_ex], cfg.max_patches, seed=cfg.seed, images=sample
        )
    # The per-epoch evaluation's caption length, saved in every checkpoint for the export and the engine.
    if not cfg.max_new_tokens:  # --base or --resume: the checkpoint's own, when it states one
        where = Path(str(checkpoint)) / "generation_config.json"
        stated = stated_max_new_tokens(model.generation_config.to_diff_dict(), where)
        cfg.max_new_tokens = BASE_DEFAULTS["max_new_tokens"] if stated is None else max(1, stated)
    model.generation_config.max_new_tokens = cfg.max_new_tokens
    max_patches = int(processor.image_processor.max_patches)
    if mode != "resume":
        for warning in long_caption_warnings(processor.tokenizer, train_ex, test_ex, int(cfg.max_new_tokens)) + \
                unwritable_character_warnings(processor.tokenizer, train_ex + test_ex):
            log(warning)

    dataset = CaptionDataset(
        train_ex, processor, augment=cfg.augment, seed=cfg.seed, position_limit=position_limit_of(model.config.to_dict()),
        cache_bytes=CACHE_BYTES // max(1, cfg.num_workers),  # every worker holds its own copy of the dataset
    )
    sampler = EpochSampler()
    # Workers decode/augment/patch the next batches while the model trains on this one;
    # torch gives each worker one thread, which is what small image ops want.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=make_collate(processor.tokenizer),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        # Its own generator: a DataLoader draws its workers' base seed when an iterator starts, which with
        # persistent workers is once per process. From the global RNG, that draw would come in epoch 1 of an
        # uninterrupted run but after the restored RNG of a resumed one, shifting every later dropout mask.
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=_ignore_stop_signals,
    )
    held.callback(_shut_down_workers, loader)
    steps_per_epoch = len(epoch_batches(len(train_ex), cfg.batch_size, world, rank, cfg.seed, 0))
    opt_steps_per_epoch = math.ceil(steps_per_epoch / cfg.grad_accum)
    total_steps = opt_steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))

    start_epoch, step, prev_wall = 0, 0, 0.0
    pending: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = []
    steps_log: list[dict[str, Any]] = []
    if mode == "resume":
        state = torch.load(out / "last" / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, step, prev_wall = state["epoch"], state["step"], state.get("wall_s", 0.0)
        # States written before the logs travelled with them: the log files.
        logged = _read_jsonl(out / "metrics.jsonl")
        metrics = state["metrics"] if "metrics" in state else [m for m in logged if m["epoch"] <= start_epoch]
        steps_log = state.get("steps") or [s for s in _read_jsonl(out / "steps.jsonl") if s["step"] <= step]
        pending = state.get("pending")  # saved before its evaluation: evaluated since, or still to do
        if pending is not None and (done := [m for m in logged if isinstance(m, dict) and m.get("epoch") == pending["epoch"]]):
            # Evaluated before the stop: its record, and its time (the state's stops before the evaluation).
            metrics, pending = [*metrics, done[-1]], None
            prev_wall = max(prev_wall, float(done[-1].get("wall_s") or 0.0))
        log(f"resuming {out} after epoch {start_epoch} (step {step})")
        saved = json.loads((out / "run_config.json").read_text())  # _check_out has parsed it already
        planned = saved.get("epochs")
        if isinstance(planned, int) and planned != cfg.epochs and start_epoch < cfg.epochs:
            # The restored optimizer takes one more step at the old rate; the new schedule sets the next.
            replanned_lr = cfg.lr * _lr_lambda(total_steps, warmup)(step + 1)
            log(
                f"warning: {out} was planned for {planned} epochs and now runs to {cfg.epochs}: the learning-rate "
                f"schedule is re-planned over {cfg.epochs} epochs (lr {scheduler.get_last_lr()[0]:.3g} at the end of "
                f"epoch {start_epoch}, {replanned_lr:.3g} from its second step on)"
            )
        before = (pending or (metrics[-1] if metrics else {})).get("processes")
        if isinstance(before, int) and before != world and start_epoch < cfg.epochs:
            # Each process takes --batch-size images: the global batch, the data order and the step count change.
            log(
                f"warning: {out} ran on {before} process(es) and now runs on {world}: each optimizer step now takes "
                f"{cfg.batch_size * cfg.grad_accum * world} images instead of {cfg.batch_size * cfg.grad_accum * before}, "
                f"and the learning-rate schedule is re-planned over {total_steps} steps; resume on {before} to "
                "continue the run as it was"
            )
        if is_main and start_epoch < cfg.epochs:
            # A record of what this run now is (epochs and precision may change on resume); replaced whole,
            # so a kill cannot leave a run whose settings are unreadable.
            # The data may have moved (its fingerprint matched): record where it is now.
            _write_json(
                out / "run_config.json",
                {**saved, "data": str(data), "data_fingerprint": fingerprint, "epochs": cfg.epochs,
                 "precision": forward_precision},
            )  # fmt: skip
        if is_main:
            if metrics and metrics[-1]["epoch"] == start_epoch and metrics[-1].get("best") and _older(out / "best", out / "last"):
                # The last epoch was the best so far, yet best/ predates it: a kill came between its two saves.
                atomic_save(out / "best", lambda tmp: _save_checkpoint(tmp, model, processor, cfg))
            _write_jsonl(out / "metrics.jsonl", metrics)
            _write_jsonl(out / "steps.jsonl", steps_log)
        if start_epoch >= cfg.epochs and pending is None:
            log(f"nothing to do: {start_epoch} of {cfg.epochs} epochs already done")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(
            out / "run_config.json",
            {**cfg.identity(), "data_fingerprint": fingerprint, "epochs": cfg.epochs, "precision": forward_precision},
        )
        for stale in ("metrics.jsonl", "steps.jsonl"):
            (out / stale).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    model = accelerator.prepare(model)
    model.train()
    raw_model = accelerator.unwrap_model(model)
    if mode != "resume":
        log(
            f"model: {count_parameters(raw_model) / 1e6:.2f}M parameters, {max_patches} patches, "
            f"vocab {raw_model.config.text_config.vocab_size}; data: {len(train_ex)} train / {len(test_ex)} test; "
            f"{world} process(es) x batch {cfg.batch_size} x accum {cfg.grad_accum}, {total_steps} steps, "
            f"{forward_precision} forward"
        )
        if cfg.grad_accum > steps_per_epoch:
            # Accumulation ends with the epoch: an epoch's batches make one update, the mean over fewer batches.
            log(f"warning: --grad-accum {cfg.grad_accum} is more than the {steps_per_epoch} batch(es) of an epoch: each "
                f"epoch makes one update from its {steps_per_epoch}; lower --grad-accum or --batch-size")

    # The test images never change: encode them once (unless that takes too much memory).
    test_cache: list[dict[str, Any]] | None = None
    my_test = test_ex[rank::world]
    cache_ok = len(my_test) * max_patches * 770 * 4 < 1.5 * 1024**3

    def evaluate() -> tuple[dict[str, float], list[str]]:
        nonlocal test_cache
        raw_model.eval()
        preds: list[str] = []
        batches = [my_test[i : i + cfg.eval_batch_size] for i in range(0, len(my_test), cfg.eval_batch_size)]
        if cache_ok and test_cache is None:
            test_cache = [encode_files(processor, [e.path for e in b]) for b in batches]
        for bi, b in enumerate(batches):
            enc = test_cache[bi] if test_cache is not None else encode_files(processor, [e.path for e in b])
            preds.extend(
                generate_from_patches(raw_model, processor, **enc, max_new_tokens=cfg.max_new_tokens)
            )
        raw_model.train()
        gathered = gather_object([list(zip(range(rank, len(test_ex), world), preds, strict=True))])
        flat = sorted((pair for part in gathered for pair in part), key=lambda t: t[0])
        hyps = [h for _, h in flat]
        return corpus_scores(hyps, [e.text for e in test_ex]), hyps

    def save(dest: Path, with_state: bool, epoch: int, wall: float, pending: dict[str, Any] | None = None) -> None:
        def write(tmp: Path) -> None:
            _save_checkpoint(tmp, raw_model, processor, cfg)
            if with_state:
                # The logs travel with the state: a kill before metrics.jsonl is rewritten loses no epoch.
                # `pending`: the epoch's training record, whose evaluation comes after this save; once
                # evaluated, its record is in metrics.jsonl (a resume that finds none evaluates it again).
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                     "epoch": epoch, "step": step, "wall_s": wall, "config": asdict(cfg),
                     "metrics": metrics, "steps": steps_log, "pending": pending},
                    tmp / "trainer_state.pt",
                )  # fmt: skip

        atomic_save(dest, write)

    def finish_epoch(trained: dict[str, Any]) -> None:
        """Evaluate the epoch just trained (and saved as last/), then best/, the logs and the epoch's line."""
        nonlocal best_key, best_loss
        t1 = time.perf_counter()
        scores, hyps = evaluate() if test_ex else ({}, [])
        eval_s = time.perf_counter() - t1
        wall = prev_wall + time.perf_counter() - run_start
        record = {**trained, "eval_s": eval_s, "wall_s": wall, "bleu": scores.get("bleu"), "chrf": scores.get("chrf")}
        improved = ((record["bleu"], record["chrf"]) > best_key) if test_ex else (record["loss"] < best_loss)
        record["best"] = bool(improved)
        metrics.append(record)
        if is_main:
            # best/ after last/: a kill between the two saves leaves a run that --resume continues (and
            # whose best/ it then completes), never a best/ of an epoch that cannot be resumed.
            if improved:
                save(out / "best", False, record["epoch"], wall)
            _write_jsonl(out / "metrics.jsonl", metrics)
            _write_jsonl(out / "steps.jsonl", steps_log)
            # Said before the plot, the slow part: a stop during it (resumed "after epoch N") kept this line.
            bleu_txt = f"BLEU {record['bleu']:.2f} chrF {record['chrf']:.2f}" if test_ex else "no test split"
            log(
                f"epoch {record['epoch']}/{cfg.epochs}: loss {record['loss']:.4f}  {record['images_per_s']:.1f} img/s  "
                f"{bleu_txt}  (train {record['train_s']:.0f}s, eval {eval_s:.0f}s, total {wall:.0f}s)"
                + ("  * best" if improved else "")
            )
            if hyps:
                log(f"  e.g. {hyps[0]!r}\n   vs {test_ex[0].text!r}")
            try:
                plot_curves(metrics, steps_log, out / "curves.png")
            except Exception as exc:  # a plot must never stop a training run
                log(f"warning: could not draw curves.png ({exc})")
        if improved:
            best_key = (record["bleu"], record["chrf"]) if test_ex else best_key
            best_loss = min(best_loss, record["loss"])

    # BLEU decides best/, chrF breaks its ties: on short captions corpus BLEU (4-gram matches) can sit at 0
    # for every epoch, and best/ would stay at epoch 1.
    best_key = max(
        ((m["bleu"], m.get("chrf") or 0.0) for m in metrics if m.get("bleu") is not None),
        default=(-math.inf, -math.inf),
    )
    best_loss = min((m["loss"] for m in metrics), default=math.inf)
    run_start = time.perf_counter()
    from tqdm.auto import tqdm

    if pending is not None:  # the last epoch was saved, then stopped in its evaluation: evaluated now
        if test_ex:
            log(f"evaluating epoch {pending['epoch']}, which was stopped in its evaluation")
        else:
            log(f"finishing epoch {pending['epoch']}, which was stopped before its logs were written")
        finish_epoch(pending)
        accelerator.wait_for_everyone()
    last_epoch_run = min(cfg.epochs, start_epoch + cfg.stop_after) if cfg.stop_after else cfg.epochs
    # Off a terminal (a service's journal, `2> train.log`) a bar's redraws would pile up on one line: lines
    # instead, at each quarter epoch and at least every LINE_PROGRESS_SECONDS.
    bar_drawn = is_main and cfg.progress and is_terminal(sys.stderr)
    for epoch in range(start_epoch, last_epoch_run):
        batches = epoch_batches(len(train_ex), cfg.batch_size, world, rank, cfg.seed, epoch)
        seen = [i for b in batches for i in b]
        bar = tqdm(
            total=len(batches),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not bar_drawn,
            file=TolerantStream(sys.stderr),
            leave=False,
        )
        t0, n_images, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
        line_said = t0
        group_loss, group_n = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        sampler.batches = [[(epoch, i) for i in b] for b in batches]
        for bi, batch in enumerate(loader):
            check_stop()  # a stop that library code swallowed (one during the epoch's plot once ran a run to its end)
            group_end = (bi + 1) % cfg.grad_accum == 0 or bi + 1 == len(batches)
            group_size = (
                cfg.grad_accum
                if (bi // cfg.grad_accum + 1) * cfg.grad_accum <= len(batches)
                else len(batches) % cfg.grad_accum
            )
            # Gradients are summed locally and all-reduced only on the group's last micro-batch.
            ctx = accelerator.no_sync(model) if not group_end else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
                    output = model(**batch)
                    # The model's own loss is the plain token mean: use it unless the lead is weighted.
                    loss = (
                        output.loss
                        if cfg.lead_weight == 1.0
                        else caption_loss(output.logits, batch["labels"], cfg.lead_tokens, cfg.lead_weight)
                    )
                accelerator.backward(loss / group_size)
            group_loss += float(loss.detach())
            group_n += 1
            n_images += len(batch["labels"])
            if group_end:
                step += 1
                # the logged loss is the mean over all processes, so it does not depend on the rank
                step_loss = float(accelerator.reduce(torch.tensor(group_loss / group_n), reduction="mean"))
                # Of the all-reduced gradients: the same on every rank, so all stop together. (None: DeepSpeed's
                # engine clips inside its own step, and says nothing here.)
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = 0.0 if norm is None else float(norm)
                # Checked before the update: a finite loss with infinite gradients (weights grown huge) turned
                # every weight into NaN, and on an epoch's last step that model was saved as last/.
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # every rank stops together
                    what = f"the loss became {step_loss}" if not math.isfinite(step_loss) else f"the gradients became {grad_norm}"
                    since = f" (with --base {out / 'last'} to start from the last finished epoch)" if epoch > 0 else ""
                    raise TrainDiverged(
                        f"{what} at step {step} (epoch {epoch + 1}): training diverged; lower --lr (it was {cfg.lr:g}) "
                        f"and train into a new --out{since}. Checkpoints of finished epochs in {out} are kept."
                    )
                step_lr = scheduler.get_last_lr()[0]  # the rate this update uses (scheduler.step sets the next one's)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss
                loss_n += 1
                steps_log.append({"step": step, "epoch": epoch + 1, "loss": step_loss, "lr": step_lr})
                group_loss, group_n = 0.0, 0
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                loss=f"{steps_log[-1]['loss'] if steps_log else float('nan'):.3f}",
                img_s=f"{n_images * world / max(elapsed, 1e-9):.1f}",
            )
            bar.update(1)
            if (
                is_main
                and not bar_drawn
                and ((bi + 1) % max(1, len(batches) // 4) == 0 or time.perf_counter() - line_said >= LINE_PROGRESS_SECONDS)
                and bi + 1 < len(batches)
                and loss_n  # with --grad-accum, this epoch's first optimizer step may not have come yet
            ):
                line_said = time.perf_counter()
                log(f"  epoch {epoch + 1} batch {bi + 1}/{len(batches)}: loss {steps_log[-1]['loss']:.4f}, "
                    f"{n_images * world / max(elapsed, 1e-9):.1f} img/s")  # fmt: skip
        bar.close()
        train_s = time.perf_counter() - t0
        total_images = int(accelerator.reduce(torch.tensor(n_images), reduction="sum"))
        all_seen = gather_object([seen])
        seen_flat = [i for part in all_seen for i in part]

        trained = {
            "epoch": epoch + 1, "step": step, "loss": loss_sum / max(1, loss_n),
            "lr": steps_log[-1]["lr"] if steps_log else scheduler.get_last_lr()[0],  # the epoch's last update's
            "images_per_s": total_images / train_s, "train_s": train_s, "train_images": total_images,
            "unique_images": len(set(seen_flat)), "processes": world,
        }  # fmt: skip
        if is_main:
            # last/ before the evaluation (at base size on a CPU, minutes per test image): a stop or crash
            # during it keeps the epoch's training, and --resume evaluates it first.
            save(out / "last", True, epoch + 1, prev_wall + time.perf_counter() - run_start, pending=trained)
        finish_epoch(trained)
        if is_main:
            check_stop()
        accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        best_dir=out / "best", last_dir=out / "last", metrics=metrics, skipped=skipped, is_main=is_main
    )
