"""The public engine API: `Captioner` turns images into captions with an ONNX bundle, without torch.

Images are processed in batches. A worker thread decodes and preprocesses the next batch while ONNX
Runtime runs the current one (PIL, numpy and ONNX Runtime all release the GIL in their heavy parts),
and results always come back in input order.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from engine.bundle import MANIFEST_NAME, Bundle
from engine.decode import Decoder, GenerationSettings, generate
from engine.errors import MAX_BATCH_SIZE, BundleError, ImageError, bounded_count, is_count
from engine.images import DEFAULT_MAX_PIXELS, ImageSource, describe, load_image
from engine.preprocess import PatchConfig, Patches, image_to_patches, position_error, stack
from engine.resources import cgroup_memory_limit, memory_available, readable_bytes
from engine.session import OnnxModel, SessionSettings, int8_products_saturate
from engine.tokenizer import CaptionTokenizer

if TYPE_CHECKING:
    from engine.folder import FolderSummary

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default_bundle"

Key = TypeVar("Key")


def resolve_bundle(bundle: str | os.PathLike[str] | None) -> Path:
    """The bundle directory to use: `bundle`, or the default one shipped in the package.

    Raises BundleError when no bundle is given and the package has no default bundle.
    """
    if bundle is not None:
        if not os.fspath(bundle):  # Path("") is the working folder
            raise BundleError("an empty path was given as the bundle (an unset variable?)")
        return Path(bundle)
    if not (DEFAULT_BUNDLE / MANIFEST_NAME).is_file():
        raise BundleError(
            f"no default model is installed ({DEFAULT_BUNDLE} has no {MANIFEST_NAME}): "
            "build it with `make model`, or pass --model BUNDLE (a directory made by `edlight export`)"
        )
    return DEFAULT_BUNDLE


@dataclass
class Timings:
    """Accumulated work since the last `reset_timings()`. Preprocessing overlaps the model runs."""

    images: int = 0  # images captioned (failed images are not counted)
    preprocess_s: float = 0.0  # decoding + resizing + patching, in the worker thread
    encoder_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # decoder runs
    model_runs: int = 0  # encoder + decoding passes (a batch, or one image each for bundles that cannot batch)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class _Prepared:
    """One batch after image loading: patches for the good images, an error for the bad ones."""

    keys: list[Any]
    patches: list[Patches | None]
    errors: list[str | None]
    seconds: float


def _in_daemon_thread(work: Callable[[], None], name: str) -> Future[None]:
    """Run `work` in a daemon thread; its Future gives its outcome. Unlike an executor's thread, it does not
    hold up Ctrl-C or the end of the process (hashing a large bundle takes seconds)."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)
        else:
            future.set_result(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def generation_settings(
    bundle: Bundle, num_beams: int = 1, max_new_tokens: int | None = None, min_new_tokens: int | None = None
) -> GenerationSettings:
    """How `bundle` decodes with these overrides (None: its generation config, read as transformers' `generate`
    reads it). Raises ValueError for a bad setting, e.g. a `max_new_tokens` below 1 (transformers and the CLI
    refuse it too: 0 would caption every image as "")."""
    if max_new_tokens is not None and not is_count(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return GenerationSettings(
        max_new_tokens=bundle.default_max_new_tokens if max_new_tokens is None else max_new_tokens,
        min_new_tokens=bundle.default_min_new_tokens if min_new_tokens is None else min_new_tokens,
        num_beams=num_beams,
        length_penalty=bundle.length_penalty,
        early_stopping=bundle.early_stopping,
        repetition_penalty=bundle.repetition_penalty,
        no_repeat_ngram_size=bundle.no_repeat_ngram_size,
        decoder_start_token_id=bundle.decoder_start_token_id,
        eos_token_ids=tuple(bundle.eos_token_ids),
        **bundle.token_processors,
    )


class Captioner:
    """Caption images with a verified ONNX bundle.

    >>> captioner = Captioner()                      # the bundle shipped in engine/default_bundle
    >>> captioner.caption(["a.jpg", "b.png"])        # -> ["a drawing of ...", "..."]
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        batch_size: int = 8,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify: bool = True,
    ) -> None:
        """Open and verify `bundle` (default: the packaged one) and load its ONNX sessions.

        `threads` sets ONNX Runtime's intra-op threads (None: the cores this process may use). `max_new_tokens` and
        `min_new_tokens` default to the bundle's generation config, read as transformers' `generate` does.
        `max_pixels` is the pixel cap for decoding images (None, 0 or less: no cap). Raises BundleError (missing, incomplete or tampered bundle), ModelRuntimeError
        (ONNX Runtime cannot load a model) and ValueError (bad settings), all before any image is read.

        One Captioner may serve several threads at once (its captions are those of one thread), but a
        PIL image must not be captioned in two threads at once: PIL objects are not thread-safe, and
        loading one seeks it to its first frame. Paths and bytes are safe. It cannot be pickled: build
        one per process (one built before a fork works in the children).
        """
        batch_size = bounded_count("batch_size", batch_size, MAX_BATCH_SIZE)
        max_pixels = pixel_cap(max_pixels)
        settings = SessionSettings(threads=threads)  # checks `threads` before the bundle is read
        # The graphs' hashes (about a second for a base-size bundle) are checked while ONNX Runtime loads them.
        self.bundle = Bundle.load(resolve_bundle(bundle), verify_hashes=verify, graphs_later=True)
        self.batch_size = int(batch_size)
        self.max_pixels = max_pixels
        self.patch_config = PatchConfig.from_preprocessor_config(
            self.bundle.preprocessor_config, max_patches=self.bundle.max_patches
        )
        # Row/column ids index position tables of `seq_len` rows; a model trained with a table no larger
        # than max_patches cannot embed the grid of a very long, thin image (e.g. 10000x10).
        self.position_limit = self.bundle.position_limit
        self.tokenizer = CaptionTokenizer.from_bundle_dir(self.bundle.path)
        self.generation = generation_settings(self.bundle, num_beams, max_new_tokens, min_new_tokens)
        path = self.bundle.path
        if self.bundle.manifest.full_range_int8 and int8_products_saturate():
            warnings.warn(
                f"{path}: this int8 bundle has 8-bit weights, which this CPU (AVX2 without VNNI) multiplies in "
                "saturating 16-bit sums: its captions can differ from the model's. Export it again with this "
                "edlight (7-bit weights, exact on every CPU), or use an fp32 bundle",
                stacklevel=2,
            )
        # What may share a run (engine.bundle.DECODER_BATCHING). int8 quantizes some activations with one
        # scale per tensor: batched there, images would nudge each other's numbers, and a caption could
        # change with its neighbours in the folder (or between a run and its resume). So int8 bundles run
        # the encoder and the first decoder step one image at a time and batch only the cached steps, whose
        # activations are scaled row by row ("steps"); older int8 bundles run one image at a time ("image").
        self.batching = self.bundle.manifest.batching
        self.one_image_per_run = self.batching == "image"
        # Told before the weights load: past the memory it may take, the kernel kills the run (exit 137) unannounced.
        shortfall = memory_shortfall(
            self.bundle, 1 if self.one_image_per_run else self.batch_size, num_beams, memory_available(), cgroup_memory_limit()
        )
        if shortfall:
            warnings.warn(shortfall, stacklevel=2)
        hashed = _in_daemon_thread(self.bundle.verify_graph_hashes, "edlight-verify") if verify else None
        try:
            self._load_graphs(settings)
        except Exception as exc:  # ONNX Runtime refused a graph, or it lacks what the decoder loop needs
            damaged = hashed.exception() if hashed is not None else None  # waits for the hashes
            if damaged is not None:
                raise damaged from exc  # a file that differs from the manifest explains it better
            raise
        if hashed is not None:
            hashed.result()
        vocab = self.decoder.vocab_size
        if isinstance(vocab, int) and (unknown := self.generation.unknown_tokens(vocab)):
            raise BundleError(
                f"{path / 'generation_config.json'}: names tokens the model does not have (vocabulary of {vocab}): {unknown}"
            )
        self._encoder_input = self.encoder.input_names[0] if "flattened_patches" not in self.encoder.inputs else "flattened_patches"
        self._encoder_output = "last_hidden_state" if "last_hidden_state" in self.encoder.outputs else self.encoder.output_names[0]
        self.trims_padding = self._patch_axis_is_dynamic()
        self.timings = Timings()
        self._timings_lock = threading.Lock()  # threads sharing this Captioner add to the same counts

    def __reduce__(self) -> Any:
        # ONNX Runtime's own "cannot pickle 'InferenceSession'" does not say what to do instead.
        raise TypeError(
            f"a Captioner cannot be pickled (it holds ONNX Runtime sessions): build one per process from its "
            f"bundle, Captioner({str(self.bundle.path)!r}, ...), e.g. in a Ray actor's or a worker's set-up"
        )

    def _load_graphs(self, settings: SessionSettings) -> None:
        """The bundle's ONNX Runtime sessions: the encoder and the decoder(s) of its layout."""
        path = self.bundle.path
        per_image_first_step = self.batching == "steps"
        self.encoder = OnnxModel(self.bundle.onnx_path("encoder"), settings, bundle=path)
        if self.bundle.manifest.decoder_layout == "merged":
            merged = OnnxModel(self.bundle.onnx_path("decoder_merged"), settings, bundle=path)
            self.decoder = Decoder(merged, first_step_per_image=per_image_first_step)
        else:
            self.decoder = Decoder(
                OnnxModel(self.bundle.onnx_path("decoder"), settings, bundle=path),
                OnnxModel(self.bundle.onnx_path("decoder_with_past"), settings, bundle=path),
                first_step_per_image=per_image_first_step,
            )

    # ----------------------------------------------------------------------------------- public API
    def caption(self, images: Iterable[ImageSource] | np.ndarray | ImageSource) -> list[str]:
        """Captions for paths, encoded bytes, binary file objects or PIL images, in input order.

        A single image of any of these kinds is accepted too (a list of one caption is returned).
        Raises ImageError naming the first image that cannot be read (nothing is returned then).
        """
        # An array of paths (a DataFrame column's .values) is a sequence; any other array is pixels, one image
        # (which load_image refuses with the way to pass it).
        paths = isinstance(images, np.ndarray) and images.dtype.kind in "UO" and images.squeeze().ndim <= 1
        if paths:
            images = images.reshape(-1)  # type: ignore[union-attr]  # a column (n x 1) too
        if (
            isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) and not paths
            or hasattr(images, "getbands") or hasattr(images, "read") or not isinstance(images, Iterable)
        ):
            images = [images]  # type: ignore[list-item]  # one image; anything else is named by load_image
        items: list[tuple[int, ImageSource, str]] = [(i, source, describe(source, i)) for i, source in enumerate(images)]
        captions: list[str] = []
        for _, caption, error in self.iter_captions(items):
            if error is not None:
                raise ImageError(error)
            captions.append(caption or "")
        return captions

    def caption_folder(
        self,
        inputs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
        out: str | os.PathLike[str] | None = None,
        fmt: str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        recaption_changed: bool = False,
    ) -> FolderSummary:
        """Caption every image under `inputs` (files and folders) into a JSONL/CSV file (`fmt`, default: csv
        for an `out` ending in .csv, else jsonl); see engine.folder."""
        from engine.folder import caption_folder

        return caption_folder(self, inputs, out=out, fmt=fmt, overwrite=overwrite, progress=progress,
                              recaption_changed=recaption_changed)

    @property
    def captions_id(self) -> str:
        """What this captioner's records name as their model: the bundle, plus non-default decoding settings."""
        g = self.generation
        return self.bundle.captions_id(g.num_beams, g.max_new_tokens, g.min_new_tokens)

    def reset_timings(self) -> None:
        with self._timings_lock:
            self.timings = Timings()

    def iter_captions(
        self, items: Iterable[tuple[Key, ImageSource, str]]
    ) -> Iterator[tuple[Key, str | None, str | None]]:
        """Stream `(key, caption, error)` for `(key, source, label)` items, in input order.

        Exactly one of caption/error is None. Image problems become error strings (naming `label`);
        model failures raise ModelRuntimeError.
        """
        batches = _chunks(map(_checked_item, items), self.batch_size)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edlight-preprocess") as pool:
            first = next(batches, None)
            pending: Future[_Prepared] | None = pool.submit(self._prepare, first) if first else None
            while pending is not None:
                prepared = pending.result()
                following = next(batches, None)
                # Start loading the next batch before running the model on this one.
                pending = pool.submit(self._prepare, following) if following else None
                yield from self._finish(prepared)

    # ------------------------------------------------------------------------------------ internals
    def _prepare(self, batch: list[tuple[Any, ImageSource, str]]) -> _Prepared:
        started = time.perf_counter()
        patches: list[Patches | None] = []
        errors: list[str | None] = []
        for _, source, label in batch:
            try:
                image = load_image(source, max_pixels=self.max_pixels, name=label)
                beyond = position_error(image.width, image.height, self.patch_config, self.position_limit)
                if beyond is not None:
                    raise ImageError(f"{label}: {beyond}")
                patches.append(image_to_patches(image, self.patch_config))
                errors.append(None)
            except ImageError as exc:
                patches.append(None)
                errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - one odd file must not stop a folder of thousands
                patches.append(None)
                errors.append(f"{label}: unexpected error while reading the image: {exc!r}")
        return _Prepared([key for key, _, _ in batch], patches, errors, time.perf_counter() - started)

    def _finish(self, prepared: _Prepared) -> Iterator[tuple[Any, str | None, str | None]]:
        with self._timings_lock:
            self.timings.preprocess_s += prepared.seconds
        good = [p for p in prepared.patches if p is not None]
        captions = iter(self._run_model(good) if good else [])
        for key, patch, error in zip(prepared.keys, prepared.patches, prepared.errors, strict=True):
            yield (key, next(captions), None) if patch is not None else (key, None, error)

    def _patch_axis_is_dynamic(self) -> bool:
        """True when every graph accepts fewer patches than max_patches (bundles optimised at export)."""
        shapes = [self.encoder.input_shape(self._encoder_input), self.encoder.input_shape("attention_mask")]
        for model in self.decoder.models:
            shapes += [list(model.inputs[name].shape) for name in ("encoder_attention_mask", "encoder_hidden_states")
                       if name in model.inputs]
        return all(len(shape) > 1 and not isinstance(shape[1], int) for shape in shapes)

    def _run_model(self, patches: list[Patches]) -> list[str]:
        if self.one_image_per_run and len(patches) > 1:
            return [caption for patch in patches for caption in self._run_model([patch])]
        mask = np.stack([p.attention_mask for p in patches])
        started = time.perf_counter()
        if self.trims_padding or self.batching != "batch":
            # The encoder is compute-bound, so it runs image by image at no loss (and must, for int8). The
            # processor pads at the end, so where the graphs allow, each image's padding patches are cut
            # off: its valid rows come out the same, no image pays for another's padding, every run takes
            # ONNX Runtime's fused (unmasked) attention path, and no batch x heads x patches^2 score tensor
            # is held. The decoder, bound by reading its weights, still runs the whole batch, on encoder
            # states padded back to max_patches for every batch: a length that depended on the batch-mates
            # would change the rounding of the cross-attention sums, and so (rarely) a caption. Bundles that
            # run one image at a time have no batch-mates: they keep the image's own length.
            used = [max(int(row.sum()), 1) if self.trims_padding else mask.shape[1] for row in mask]
            hidden_rows = [self._encode(p.flattened_patches[None, :n], mask[i : i + 1, :n]) for i, (p, n) in enumerate(zip(patches, used, strict=True))]
            width = max(used) if self.one_image_per_run else mask.shape[1]
            hidden = np.zeros((len(patches), width, hidden_rows[0].shape[-1]), dtype=hidden_rows[0].dtype)
            for i, (row, n) in enumerate(zip(hidden_rows, used, strict=True)):
                hidden[i, :n] = row[0]
            mask = mask[:, :width]
        else:
            flattened, mask = stack(patches)
            hidden = self._encode(flattened, mask)
        encoded = time.perf_counter()
        result = generate(self.decoder, hidden, mask, self.generation)
        decoded = time.perf_counter()
        with self._timings_lock:
            self.timings.encoder_s += encoded - started
            self.timings.decode_s += decoded - encoded
            self.timings.decode_steps += result.steps
            self.timings.model_runs += 1
            self.timings.images += len(patches)
        # A caption is text for people: no spaces a model may emit before EOS or the length limit.
        return [text.strip() for text in self.tokenizer.decode_batch(result.text_ids())]

    def _encode(self, flattened: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {
            self._encoder_input: flattened,
            "attention_mask": mask.astype(self.encoder.input_dtype("attention_mask"), copy=False),
        }
        hidden = self.encoder.run(feeds, [self._encoder_output])[self._encoder_output]
        return np.ascontiguousarray(hidden)


# Beside the weights and the per-image caches, at the least: one image's encoder at work and ONNX Runtime's
# working buffers, beyond what the process holds when it reads the memory available (set from the runs below).
RUNTIME_BYTES = 128 * 2**20


def memory_shortfall(bundle: Bundle, batch_size: int, num_beams: int, available: int | None, limit: int | None = None) -> str | None:
    """What to do when a batch of `batch_size` images cannot fit in the `available` bytes this process can
    still take (`limit`: its cgroup's memory limit, named in the message); None when it may fit or that is not
    known.

    The need counted is a floor, so that a batch size that fits is never warned about: the weights,
    RUNTIME_BYTES, and what the decoder keeps per image (`Bundle.cached_bytes_per_image`); for a bundle whose
    first decoder step runs one image at a time (int8, decoder_batching "steps"), one image's more, the step's
    output held while it is copied into the batch. Under cgroup v1
    memory limits at base size (the process holding about 0.05 GiB when it reads what is available), fp32
    (floor 1.32 GiB at batch 1, 1.47 at 2, 1.76 at 4) ran batch 1 under a limit of 1.46 GiB, batch 2 under
    1.66 and batch 4 under 1.95, and batch 2 under 1.46 crawled, re-reading its weights from disk; int8
    (floor 0.68 GiB at batch 1, 0.82 at 2) ran batch 1 under 0.98 GiB and was killed at batch 2 under 1.37:
    its floor is far below its need (unpressured peaks 0.96, 1.42 and 1.81 GiB at batch 1, 2 and 4, 0.77 after
    loading; with the copy counted the floor is 0.96 GiB at batch 2).
    """
    per_image = bundle.cached_bytes_per_image(num_beams)
    if available is None or per_image is None:
        return None
    weights = bundle.weights_bytes()
    fixed = weights + RUNTIME_BYTES
    one_beam = bundle.cached_bytes_per_image() or per_image
    staged = one_beam if bundle.manifest.batching == "steps" else 0
    need = fixed + (staged if batch_size > 1 else 0) + batch_size * per_image
    if need <= available:
        return None
    where = f" (its cgroup's memory limit is {readable_bytes(limit)})" if limit is not None else ""
    beams = f" with {num_beams} beams" if num_beams > 1 else ""
    fits = (available - fixed - staged) // per_image
    if fits < 2:  # one image alone copies nothing
        fits = 1 if fixed + per_image <= available else 0
    if fits >= 1:
        advice = f"lower the batch size (at most {fits} can fit)"
    elif num_beams > 1 and fixed + one_beam <= available:
        advice = "use fewer beams"
    else:
        advice = "give it more memory" + ("" if bundle.manifest.quantization else ", or use an int8 bundle (edlight export --quantize int8)")
    return (
        f"{bundle.path}: a batch of {batch_size} image{'s' if batch_size > 1 else ''}{beams} needs at least {readable_bytes(need)} ({readable_bytes(weights)} "
        f"of weights, {readable_bytes(per_image)} per image), and this process can take {readable_bytes(available)}{where}; past "
        f"that it would crawl, or be killed for memory (exit 137): {advice}"
    )


def pixel_cap(max_pixels: object) -> int:
    """`max_pixels` as the int the image loader takes (0: no cap, also for None); ValueError for anything
    but a whole number (an int, a numpy integer, a float such as 1.5e8)."""
    if max_pixels is None:
        return 0
    if not isinstance(max_pixels, bool):
        with contextlib.suppress(TypeError):
            return operator.index(max_pixels)  # type: ignore[arg-type]
        if isinstance(max_pixels, float) and max_pixels.is_integer():
            return int(max_pixels)
    raise ValueError(f"max_pixels must be a whole number of pixels (0, less or None: no cap), got {max_pixels!r}")


def _checked_item(item: Any) -> tuple[Any, ImageSource, str]:
    if not isinstance(item, tuple) or len(item) != 3:
        raise ValueError(f"iter_captions takes (key, source, label) tuples, got {item!r}; caption() takes plain sources")
    return item


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(items, size)):
        yield chunk
