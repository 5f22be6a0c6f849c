"""Text generation over the exported Pix2Struct decoder: KV cache, greedy and beam search.

Two decoder layouts exist (named in the bundle manifest):

- "merged": `decoder_model_merged.onnx`, one graph with a `use_cache_branch` switch;
- "split": `decoder_model.onnx` for the first step and `decoder_with_past_model.onnx` after it.

Either way the first step computes the cross-attention keys/values from the encoder output; they
are then fed back unchanged at every later step (computed once per image). Self-attention
keys/values grow by one position per step. Rows that finish are dropped from the batch (their KV
rows are sliced away), so a long caption does not make the short ones pay, and a batch gives the
same tokens as each image alone.

Greedy and beam search follow transformers' `generate` (4.57) exactly: greedy argmax; beam search
with `2 * num_beams` candidates, length-penalised finished hypotheses, and its stopping rules for
`early_stopping` True, False (the default) and "never". The generation config's logits processors act
as transformers' do, in its order, on the logits in greedy search and on the log-probabilities in beam
search, over the start token and the caption so far: `sequence_bias`, `repetition_penalty`,
`no_repeat_ngram_size`, `bad_words_ids`, `min_new_tokens` (EOS suppressed until reached),
`forced_bos_token_id`, `forced_eos_token_id`, `suppress_tokens` and `begin_suppress_tokens`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.errors import MAX_NUM_BEAMS, ModelRuntimeError, bounded_count, is_count, is_finite_number
from engine.session import OnnxModel

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
NEG_INF = np.float32(-1.0e9)  # the "impossible" score transformers uses in beam search


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. Token ids come from the bundle's configs (see Captioner)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers' generation config
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the caption (CTRL's rule)
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this many tokens appears twice
    decoder_start_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    # Added to a token's score when the caption so far ends with the rest of its sequence (one token: always).
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # never completed (EOS alone is never banned)
    forced_bos_token_id: int | None = None  # the first token
    forced_eos_token_ids: tuple[int, ...] = ()  # the last token the length allows is one of these
    suppress_tokens: tuple[int, ...] = ()  # never generated
    begin_suppress_tokens: tuple[int, ...] = ()  # not generated first (after a forced first token: second)

    def __post_init__(self) -> None:
        for name, minimum in (("max_new_tokens", 0), ("min_new_tokens", 0), ("num_beams", 1), ("no_repeat_ngram_size", 0)):
            value = getattr(self, name)
            if not is_count(value, minimum):
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))
        bounded_count("num_beams", self.num_beams, MAX_NUM_BEAMS)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
        if not is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        tokens = {
            "bad_words_ids": [t for words in self.bad_words_ids for t in words],
            "sequence_bias": [t for sequence, _ in self.sequence_bias for t in sequence],
            "forced_bos_token_id": [] if self.forced_bos_token_id is None else [self.forced_bos_token_id],
            "forced_eos_token_ids": list(self.forced_eos_token_ids),
            "suppress_tokens": list(self.suppress_tokens),
            "begin_suppress_tokens": list(self.begin_suppress_tokens),
        }
        for name, ids in tokens.items():
            if not all(is_count(t, 0) for t in ids):
                raise ValueError(f"{name} must hold token ids (integers >= 0), got {getattr(self, name)!r}")
        if any(not words for words in self.bad_words_ids) or any(not sequence for sequence, _ in self.sequence_bias):
            raise ValueError("bad_words_ids and sequence_bias take non-empty token sequences")
        if not all(is_finite_number(bias) or bias == -np.inf for _, bias in self.sequence_bias):
            raise ValueError(f"sequence_bias must be numbers (or -inf), got {self.sequence_bias!r}")
        # As transformers reads them: one bias per sequence (the last given), and EOS alone is never banned.
        object.__setattr__(self, "sequence_bias", tuple(dict(self.sequence_bias).items()))
        banned = tuple(words for words in self.bad_words_ids if list(words) not in [[e] for e in self.eos_token_ids])
        object.__setattr__(self, "bad_words_ids", banned)

    @property
    def processes_scores(self) -> bool:
        """Whether any logits processor is set (min_new_tokens included): the loops then run `process_scores`."""
        return (
            self.reads_history or self.min_new_tokens > 0 or bool(self.sequence_bias) or bool(self.bad_words_ids)
            or self.forced_bos_token_id is not None or bool(self.forced_eos_token_ids) or bool(self.suppress_tokens)
            or bool(self.begin_suppress_tokens)
        )

    @property
    def reads_history(self) -> bool:
        """Whether the scores depend on the tokens so far."""
        return (
            self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
            or any(len(words) > 1 for words in self.bad_words_ids) or any(len(seq) > 1 for seq, _ in self.sequence_bias)
        )

    def unknown_tokens(self, vocab_size: int) -> list[int]:
        """The token ids the logits processors name that a vocabulary of `vocab_size` lacks."""
        named = {t for sequence, _ in self.sequence_bias for t in sequence} | {t for words in self.bad_words_ids for t in words}
        named |= {*self.forced_eos_token_ids, *self.suppress_tokens, *self.begin_suppress_tokens}
        if self.forced_bos_token_id is not None:
            named.add(self.forced_bos_token_id)
        return sorted(t for t in named if t >= vocab_size)

    @property
    def begin_step(self) -> int:
        """The step `begin_suppress_tokens` acts at: the first, or the second after a forced first token."""
        return 0 if self.forced_bos_token_id is None else 1


def process_scores(scores: np.ndarray, history: np.ndarray | None, step: int, settings: GenerationSettings) -> np.ndarray:
    """transformers' logits processors in its order, in place, at caption step `step`: `scores` [rows, vocab],
    `history` [rows, step + 1] the start token and the caption so far of each row (None unless
    `settings.reads_history`)."""
    if step == 0 and (unknown := settings.unknown_tokens(scores.shape[1])):
        raise ModelRuntimeError(
            f"the generation settings name tokens the model does not have (vocabulary of {scores.shape[1]}): {unknown}"
        )
    if settings.sequence_bias:
        _add_sequence_bias(scores, history, settings.sequence_bias)
    if settings.repetition_penalty != 1.0:
        assert history is not None
        seen = np.take_along_axis(scores, history, axis=1)
        penalty = np.float32(settings.repetition_penalty)
        np.put_along_axis(scores, history, np.where(seen < 0, seen * penalty, seen / penalty), axis=1)
    n = settings.no_repeat_ngram_size
    if n > 0:
        assert history is not None
        if history.shape[1] + 1 >= n:
            for row, tokens in enumerate(history.tolist()):
                tail = tokens[len(tokens) - n + 1 :] if n > 1 else []
                banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == tail]
                scores[row, banned] = -np.inf
    if settings.bad_words_ids:
        _add_sequence_bias(scores, history, tuple((words, -np.inf) for words in settings.bad_words_ids))
    if step < settings.min_new_tokens:
        scores[:, list(settings.eos_token_ids)] = -np.inf
    if settings.forced_bos_token_id is not None and step == 0:
        scores[:] = -np.inf
        scores[:, settings.forced_bos_token_id] = 0.0
    if settings.forced_eos_token_ids and step == settings.max_new_tokens - 1:
        scores[:] = -np.inf
        scores[:, list(settings.forced_eos_token_ids)] = 0.0
    if settings.suppress_tokens:
        scores[:, list(settings.suppress_tokens)] = -np.inf
    if settings.begin_suppress_tokens and step == settings.begin_step:
        scores[:, list(settings.begin_suppress_tokens)] = -np.inf
    return scores


def _add_sequence_bias(scores: np.ndarray, history: np.ndarray | None, biases: tuple[tuple[tuple[int, ...], float], ...]) -> None:
    """transformers' SequenceBias: one bias array summed first (single tokens, then sequences whose start
    ends the history), then added to the scores."""
    bias = np.zeros_like(scores)
    for sequence, value in biases:
        if len(sequence) == 1:
            bias[:, sequence[0]] = np.float32(value)  # set, not added: later single-token entries win, as there
    for sequence, value in biases:
        if len(sequence) == 1:
            continue
        assert history is not None
        if len(sequence) > history.shape[1]:
            continue
        matching = (history[:, history.shape[1] - len(sequence) + 1 :] == np.asarray(sequence[:-1])).all(axis=1)
        bias[:, sequence[-1]] += np.where(matching, np.float32(value), np.float32(0.0))
    scores += bias


class BufferPool:
    """Keeps large batch tensors (gathered cross-attention K/V) for the next batch.

    A fresh numpy array of this size pays a page fault per page on first touch, at every batch: at
    base size 1.2 GB for 8 images, which took 1.7 s to fill on this machine's VM against 0.1 s for
    reused memory. (ONNX Runtime's own outputs come from its arena and do not pay it.) Up to
    `max_sets` sets are kept, the largest ones: beam search holds two at once (one row per image
    from the first step, one row per beam after it). A smaller batch uses a set's leading rows.
    """

    def __init__(self, max_sets: int = 2) -> None:
        self._lock = threading.Lock()
        self._kept: list[list[np.ndarray]] = []
        self.max_sets = max_sets

    def take(self, rows: int, shapes: list[tuple[int, ...]], dtype: np.dtype[Any]) -> list[np.ndarray]:
        """Buffers of `shapes` (without the row axis) with at least `rows` rows; contents undefined."""
        with self._lock:
            fitting = [
                kept for kept in self._kept
                if kept[0].shape[0] >= rows and [b.shape[1:] for b in kept] == shapes and all(b.dtype == dtype for b in kept)
            ]
            if fitting:
                chosen = min(fitting, key=lambda kept: kept[0].shape[0])  # leave the larger sets for larger asks
                self._kept = [kept for kept in self._kept if kept is not chosen]
                return chosen
        return [np.empty((rows, *shape), dtype=dtype) for shape in shapes]

    def give(self, buffers: list[np.ndarray]) -> None:
        """Offer `buffers` (from `take`) for the next batch; the caller must not use them afterwards."""
        if not buffers:
            return
        with self._lock:
            self._kept.append(buffers)
            self._kept.sort(key=lambda kept: -sum(b.nbytes for b in kept))
            del self._kept[self.max_sets :]


@dataclass
class DecoderState:
    """KV cache and encoder context of the rows still being decoded."""

    self_kv: list[np.ndarray]  # in the order of `Decoder.self_names`, each [rows, heads, past_len, head_dim]
    cross_kv: list[np.ndarray]  # in the order of `Decoder.cross_names`, each [rows, heads, enc_len, head_dim]
    encoder_hidden: np.ndarray | None  # [rows, enc_len, hidden]; None once no later step needs it
    encoder_mask: np.ndarray  # [rows, enc_len]
    past_len: int = 0
    buffers: list[np.ndarray] = field(default_factory=list)  # pooled tensors behind cross_kv, if any
    pool: BufferPool | None = None  # where `release` gives them back

    @property
    def rows(self) -> int:
        return int(self.encoder_mask.shape[0])

    def select(self, rows: np.ndarray) -> DecoderState:
        """Keep/reorder/repeat rows (a gather along the batch axis of every tensor, into new tensors)."""
        return self._gathered(rows, [np.take(t, rows, axis=0) for t in self.cross_kv])

    def _gathered(
        self, rows: np.ndarray, cross_kv: list[np.ndarray], buffers: list[np.ndarray] | None = None,
        pool: BufferPool | None = None,
    ) -> DecoderState:
        """Rows `rows` of this state's self-attention cache, hidden states and mask, with `cross_kv` (already
        arranged by the caller, who knows whether they are copied, pooled or compacted in place)."""
        return DecoderState(
            self_kv=[np.take(t, rows, axis=0) for t in self.self_kv],
            cross_kv=cross_kv,
            encoder_hidden=None if self.encoder_hidden is None else np.take(self.encoder_hidden, rows, axis=0),
            encoder_mask=np.take(self.encoder_mask, rows, axis=0),
            past_len=self.past_len,
            buffers=buffers or [],
            pool=pool,
        )

    def repeat(self, times: int, pool: BufferPool) -> DecoderState:
        """Every row `times` times in a row (beam search's beams of one image), the cross-attention K/V
        into buffers from `pool` (a fresh array of beams x images rows would page-fault at every batch).

        The new state owns its buffers (`release` gives them back); this state is left as it was.
        """
        rows = self.rows * times
        index = np.repeat(np.arange(self.rows), times)
        buffers = pool.take(rows, [t.shape[1:] for t in self.cross_kv], self.cross_kv[0].dtype) if self.cross_kv else []
        for buffer, tensor in zip(buffers, self.cross_kv, strict=True):
            buffer[:rows].reshape(self.rows, times, *tensor.shape[1:])[:] = tensor[:, None]
        return self._gathered(index, [b[:rows] for b in buffers], buffers, pool)

    def keep(self, rows: np.ndarray) -> DecoderState:
        """Keep only `rows` (ascending): like `select`, but the cross-attention K/V, by far the largest
        tensors, are compacted in place instead of copied into new arrays (see BufferPool for why).

        The old state must not be used afterwards.
        """
        order = [int(r) for r in rows]
        if any(b <= a for a, b in zip(order, order[1:], strict=False)) or (order and not 0 <= order[0] <= order[-1] < self.rows):
            raise ValueError(f"keep needs ascending row indices below {self.rows}, got {order}")
        if not all(t.flags.writeable for t in self.cross_kv):
            return self.select(rows)
        for tensor in self.cross_kv:
            for new, old in enumerate(order):
                if new != old:
                    tensor[new] = tensor[old]
        return self._gathered(rows, [t[: len(order)] for t in self.cross_kv], self.buffers, self.pool)

    def release(self) -> None:
        """Give pooled tensors back for the next batch; the state must not be used afterwards."""
        if self.pool is not None:
            self.pool.give(self.buffers)
        self.buffers = []

    def reorder_self(self, rows: np.ndarray) -> None:
        """Reorder only the self-attention cache: beams of one image share their cross-attention K/V."""
        self.self_kv = [np.take(t, rows, axis=0) for t in self.self_kv]


@dataclass
class DecodeResult:
    sequences: list[list[int]]  # generated ids per input row, without the start token and the EOS
    steps: int = 0  # decoder runs
    finished: list[bool] = field(default_factory=list)  # True where the row ended with EOS
    # The EOS id that ended each row (None: the length limit). With several EOS ids one may be an ordinary
    # token ("."), whose text transformers' decode keeps: see `text_ids`.
    ends: list[int | None] = field(default_factory=list)

    def text_ids(self) -> list[list[int]]:
        """The ids to decode to text, as transformers decodes `generate`'s output: with the ending EOS id, which
        `skip_special_tokens` drops when it is a special token (as </s> is) and keeps when it is not."""
        ends = self.ends or [None] * len(self.sequences)
        return [seq if end is None else [*seq, end] for seq, end in zip(self.sequences, ends, strict=True)]


class Decoder:
    """The decoder graph(s) of a bundle behind two calls: `start` and `advance`."""

    def __init__(self, first: OnnxModel, with_past: OnnxModel | None = None, first_step_per_image: bool = False) -> None:
        """`first` is the merged decoder, or the no-past decoder of the split layout with `with_past`.

        `first_step_per_image`: run the first step one image at a time (graphs whose first step scales a
        whole tensor at once, i.e. int8 bundles with decoder_batching "steps"); later steps run batched.
        Raises ModelRuntimeError when the graphs lack the inputs/outputs this loop needs.
        """
        self.first = first
        self.first_step_per_image = first_step_per_image
        self.pool = BufferPool()
        self.with_past = with_past or first
        self.merged = with_past is None
        self.models = [first] if self.merged else [first, self.with_past]
        cached = self.with_past
        if self.merged and "use_cache_branch" not in first.inputs:
            raise ModelRuntimeError(f"{first.path}: a merged decoder needs a use_cache_branch input")
        past_names = [n for n in cached.input_names if n.startswith(PAST_PREFIX)]
        if not past_names:
            raise ModelRuntimeError(f"{cached.path}: decoder has no past_key_values inputs (exported without KV cache?)")
        self.self_names = [n for n in past_names if ".encoder." not in n]
        self.cross_names = [n for n in past_names if ".encoder." in n]
        for model, names in ((first, self.self_names + self.cross_names), (cached, self.self_names)):
            missing = [self.present(n) for n in names if self.present(n) not in model.outputs]
            if missing:
                raise ModelRuntimeError(f"{model.path}: decoder lacks outputs {', '.join(missing[:4])}")
        for model in {id(first): first, id(cached): cached}.values():
            for name in ("input_ids", "encoder_attention_mask"):
                if name not in model.inputs:
                    raise ModelRuntimeError(f"{model.path}: decoder lacks input {name}")
            if "logits" not in model.outputs:
                raise ModelRuntimeError(f"{model.path}: decoder lacks output logits")
        shape = cached.input_shape(self.self_names[0])
        if len(shape) != 4:
            raise ModelRuntimeError(f"{cached.path}: {self.self_names[0]} should be [batch, heads, length, head_dim], got {shape}")
        self.num_heads, self.head_dim = shape[1], shape[3]
        self.kv_dtype = cached.input_dtype(self.self_names[0])
        # The split layout's with-past graph reads only the cached cross K/V: states then drop the hidden
        # states, so that row selection does not copy them.
        self.steps_read_hidden = "encoder_hidden_states" in cached.inputs
        self.vocab_size = first.outputs["logits"].shape[-1]

    @staticmethod
    def present(past_name: str) -> str:
        return PRESENT_PREFIX + past_name[len(PAST_PREFIX):]

    def _common_feeds(self, model: OnnxModel, ids: np.ndarray, total_len: int, state_mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {
            "input_ids": ids.astype(model.input_dtype("input_ids"), copy=False),
            "encoder_attention_mask": state_mask.astype(model.input_dtype("encoder_attention_mask"), copy=False),
        }
        if "attention_mask" in model.inputs:  # all decoder rows have the same length: no padding
            feeds["attention_mask"] = np.ones((ids.shape[0], total_len), dtype=model.input_dtype("attention_mask"))
        return feeds

    def start(self, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        """First step from the start token(s): returns last-position logits [rows, vocab] and the cache."""
        if self.first_step_per_image and input_ids.shape[0] > 1:
            return self._start_each(encoder_hidden, encoder_mask, input_ids)
        return self._start(encoder_hidden, encoder_mask, input_ids)

    def _start_each(self, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        """`start` one image at a time, as each would run alone, gathered into one batch state.

        For graphs whose first step scales a whole activation tensor at once (int8). Each image's
        cross-attention K/V are copied into pooled batch tensors for the batched later steps.
        """
        rows = input_ids.shape[0]
        logits, self_kv = [], []
        buffers: list[np.ndarray] = []
        for row in range(rows):
            row_logits, state = self._start(encoder_hidden[row : row + 1], encoder_mask[row : row + 1], input_ids[row : row + 1])
            if not buffers:  # the first image shows the shapes; filled image by image
                shapes: list[tuple[int, ...]] = [t.shape[1:] for t in state.cross_kv]
                buffers = self.pool.take(rows, shapes, state.cross_kv[0].dtype)
            for merged, part in zip(buffers, state.cross_kv, strict=True):
                merged[row] = part[0]
            logits.append(row_logits)
            self_kv.append(state.self_kv)
        state = DecoderState(
            self_kv=[np.concatenate(parts) for parts in zip(*self_kv, strict=True)],
            cross_kv=[b[:rows] for b in buffers],
            encoder_hidden=encoder_hidden if self.steps_read_hidden else None,
            encoder_mask=encoder_mask,
            past_len=input_ids.shape[1],
            buffers=buffers,
            pool=self.pool,
        )
        return np.concatenate(logits), state

    def _start(self, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        model = self.first
        rows = input_ids.shape[0]
        feeds = self._common_feeds(model, input_ids, input_ids.shape[1], encoder_mask)
        feeds["encoder_hidden_states"] = encoder_hidden
        if self.merged:
            # The no-cache branch ignores the past inputs, but the graph still wants them: empty tensors.
            empty = np.zeros((rows, self._dim(self.num_heads), 0, self._dim(self.head_dim)), dtype=self.kv_dtype)
            for name in self.self_names + self.cross_names:
                feeds[name] = empty
            feeds["use_cache_branch"] = np.zeros((1,), dtype=np.bool_)
        names = ["logits"] + [self.present(n) for n in self.self_names + self.cross_names]
        out = model.run(feeds, names)
        state = DecoderState(
            self_kv=[out[self.present(n)] for n in self.self_names],
            cross_kv=[out[self.present(n)] for n in self.cross_names],
            encoder_hidden=encoder_hidden if self.steps_read_hidden else None,
            encoder_mask=encoder_mask,
            past_len=input_ids.shape[1],
        )
        return np.asarray(out["logits"][:, -1, :], dtype=np.float32), state

    def advance(self, state: DecoderState, input_ids: np.ndarray) -> np.ndarray:
        """One cached step: feeds one token per row, updates `state` in place, returns logits [rows, vocab]."""
        model = self.with_past
        feeds = self._common_feeds(model, input_ids, state.past_len + input_ids.shape[1], state.encoder_mask)
        feeds.update(zip(self.self_names, state.self_kv, strict=True))
        feeds.update(zip(self.cross_names, state.cross_kv, strict=True))
        if state.encoder_hidden is not None:
            feeds["encoder_hidden_states"] = state.encoder_hidden
        if self.merged:
            feeds["use_cache_branch"] = np.ones((1,), dtype=np.bool_)
        names = ["logits"] + [self.present(n) for n in self.self_names]
        out = model.run(feeds, names)
        state.self_kv = [out[self.present(n)] for n in self.self_names]
        state.past_len += input_ids.shape[1]
        return np.asarray(out["logits"][:, -1, :], dtype=np.float32)

    def _dim(self, value: int | str | None) -> int:
        if not isinstance(value, int):
            raise ModelRuntimeError(f"{self.with_past.path}: past key/value shapes need static heads and head size, got {value!r}")
        return value


def _grown(tokens: np.ndarray, limit: int) -> np.ndarray:
    """`tokens` [images, beams, n] with its last axis doubled (at most `limit`), zero-filled."""
    bigger = np.zeros((*tokens.shape[:2], min(2 * tokens.shape[2], limit)), dtype=tokens.dtype)
    bigger[:, :, : tokens.shape[2]] = tokens
    return bigger


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first (ties: lowest index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def generate(decoder: Decoder, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, settings: GenerationSettings) -> DecodeResult:
    """Caption token ids for a batch of encoded images (greedy when num_beams == 1, else beam search)."""
    if settings.num_beams == 1:
        return greedy(decoder, encoder_hidden, encoder_mask, settings)
    return beam_search(decoder, encoder_hidden, encoder_mask, settings)


def greedy(decoder: Decoder, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, settings: GenerationSettings) -> DecodeResult:
    rows = encoder_hidden.shape[0]
    if settings.max_new_tokens == 0 or rows == 0:
        return DecodeResult([[] for _ in range(rows)], 0, [False] * rows)
    start = np.full((rows, 1), settings.decoder_start_token_id, dtype=np.int64)
    logits, state = decoder.start(encoder_hidden, encoder_mask, start)
    try:
        return _greedy_loop(decoder, logits, state, rows, settings)
    finally:
        state.release()  # the loop's later states (`keep`) share these buffers


def _greedy_loop(decoder: Decoder, logits: np.ndarray, state: DecoderState, rows: int, settings: GenerationSettings) -> DecodeResult:
    sequences: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    ends: list[int | None] = [None] * rows
    eos = np.array(settings.eos_token_ids, dtype=np.int64)
    steps = 1
    active = np.arange(rows)  # input row of each row of `state`
    history = None
    if settings.reads_history:  # the start token, then each row's caption so far
        # Grown by doubling, as beam search's buffers are: a huge max_new_tokens costs nothing up front.
        history = np.full((rows, min(settings.max_new_tokens, 64) + 1), settings.decoder_start_token_id, dtype=np.int64)
    for step in range(settings.max_new_tokens):
        if history is not None and step + 1 >= history.shape[1]:
            history = np.concatenate([history, np.zeros_like(history)], axis=1)
        if settings.processes_scores:
            logits = process_scores(logits, None if history is None else history[active, : step + 1], step, settings)
        tokens = logits.argmax(axis=-1)
        if history is not None:
            history[active, step + 1] = tokens
        done = np.isin(tokens, eos)
        for row, token, is_done in zip(active, tokens, done, strict=True):
            if is_done:
                finished[row], ends[row] = True, int(token)
            else:
                sequences[row].append(int(token))
        if step + 1 >= settings.max_new_tokens:
            break
        if done.any():
            keep = np.flatnonzero(~done)
            if keep.size == 0:
                break
            state, active, tokens = state.keep(keep), active[keep], tokens[keep]
        logits = decoder.advance(state, tokens[:, None])
        steps += 1
    return DecodeResult(sequences, steps, finished, ends)


def beam_search(decoder: Decoder, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, settings: GenerationSettings) -> DecodeResult:
    """transformers' beam search (num_return_sequences=1), images decoded independently in one batch."""
    images, beams, length = encoder_hidden.shape[0], settings.num_beams, settings.max_new_tokens
    if length == 0 or images == 0:
        return DecodeResult([[] for _ in range(images)], 0, [False] * images)
    start = np.full((images, 1), settings.decoder_start_token_id, dtype=np.int64)
    logits, first = decoder.start(encoder_hidden, encoder_mask, start)
    # Every beam of an image starts identical: run the first step once per image, then repeat rows.
    try:
        state = first.repeat(beams, decoder.pool)
    finally:
        first.release()
    try:
        return _beam_loop(decoder, np.repeat(logits, beams, axis=0), state, images, settings)
    finally:
        state.release()  # the loop's later states (`keep`) share these buffers


def _beam_loop(decoder: Decoder, logits: np.ndarray, state: DecoderState, images: int, settings: GenerationSettings) -> DecodeResult:
    beams, length = settings.num_beams, settings.max_new_tokens
    eos = np.array(settings.eos_token_ids, dtype=np.int64)
    keep_k = max(2, 1 + len(eos)) * beams
    penalty = settings.length_penalty
    stop_when_full = settings.early_stopping is True  # "never" is a string: truthy, but not this rule
    # transformers' stopping heuristic scores the best open beam at its current length; with "never" and a
    # penalty favouring long captions, at the longest allowed, so the search runs on while that could win.
    at_longest = settings.early_stopping == "never" and penalty > 0
    steps = 1

    # Token buffers grow with the captions (doubling), not to max_new_tokens up front: a huge limit
    # costs nothing unless the captions really get that long.
    capacity = min(length, 64)
    running_seq = np.zeros((images, beams, capacity), dtype=np.int64)
    running_scores = np.zeros((images, beams), dtype=np.float32)
    running_scores[:, 1:] = NEG_INF  # only beam 0 may expand at the first step
    done_seq = np.zeros((images, beams, capacity), dtype=np.int64)
    done_len = np.zeros((images, beams), dtype=np.int64)
    done_scores = np.full((images, beams), NEG_INF, dtype=np.float32)
    done_flag = np.zeros((images, beams), dtype=bool)
    searching = np.ones(images, dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied
    alive = np.arange(images)  # images whose rows are in `state`, in state order
    vocab = logits.shape[-1]

    for cur in range(length):
        if cur >= running_seq.shape[2]:
            running_seq, done_seq = _grown(running_seq, length), _grown(done_seq, length)
        n = alive.size
        logp = log_softmax(logits)
        if settings.processes_scores:
            history = None
            if settings.reads_history:
                history = np.full((n * beams, cur + 1), settings.decoder_start_token_id, dtype=np.int64)
                history[:, 1:] = running_seq[alive][:, :, :cur].reshape(n * beams, cur)
            logp = process_scores(logp, history, cur, settings)
        scores = (logp.reshape(n, beams, vocab) + running_scores[alive][:, :, None]).reshape(n, beams * vocab)
        top = _top_k(scores, keep_k)
        top_scores = np.take_along_axis(scores, top, axis=1)
        source_beam, tokens = top // vocab, top % vocab
        candidates = np.take_along_axis(running_seq[alive], source_beam[:, :, None], axis=1)
        candidates[:, :, cur] = tokens
        hits = np.isin(tokens, eos) | (cur + 1 >= length)

        # Next running beams: the best candidates that did not just stop.
        open_scores = top_scores + hits.astype(np.float32) * NEG_INF
        best_open = _top_k(open_scores, beams)
        running_seq[alive] = np.take_along_axis(candidates, best_open[:, :, None], axis=1)
        running_scores[alive] = np.take_along_axis(open_scores, best_open, axis=1)
        parent = np.take_along_axis(source_beam, best_open, axis=1)

        # Finished hypotheses: only candidates within the top `beams` may enter, length-penalised.
        just_done = hits & (np.arange(top.shape[1]) < beams)[None, :]
        final_scores = top_scores / np.float32((cur + 1) ** penalty)
        if stop_when_full:
            final_scores = final_scores + (done_flag[alive].all(axis=1, keepdims=True)).astype(np.float32) * NEG_INF
        final_scores = final_scores + (~searching[alive])[:, None].astype(np.float32) * NEG_INF
        final_scores = final_scores + (~just_done).astype(np.float32) * NEG_INF
        merged_scores = np.concatenate([done_scores[alive], final_scores], axis=1)
        merged_seq = np.concatenate([done_seq[alive], candidates], axis=1)
        merged_len = np.concatenate([done_len[alive], np.full(top.shape, cur + 1)], axis=1)
        merged_flag = np.concatenate([done_flag[alive], just_done], axis=1)
        best = _top_k(merged_scores, beams)
        done_scores[alive] = np.take_along_axis(merged_scores, best, axis=1)
        done_seq[alive] = np.take_along_axis(merged_seq, best[:, :, None], axis=1)
        done_len[alive] = np.take_along_axis(merged_len, best, axis=1)
        done_flag[alive] = np.take_along_axis(merged_flag, best, axis=1)

        # Stopping heuristic: can the best open beam still beat the worst finished one?
        best_possible = running_scores[alive][:, :1] / np.float32((length if at_longest else cur + 1) ** penalty)
        worst_done = np.where(done_flag[alive], done_scores[alive].min(axis=1, keepdims=True), NEG_INF)
        searching[alive] &= (best_possible > worst_done).any(axis=1)
        if stop_when_full:
            searching[alive] &= ~done_flag[alive].all(axis=1)
        if cur + 1 >= length or hits.all() or not searching[alive].any():
            break

        # Reorder the self-attention cache to the chosen parents, then drop images that are done.
        state.reorder_self((np.arange(n)[:, None] * beams + parent).reshape(-1))
        next_tokens = np.take_along_axis(tokens, best_open, axis=1).reshape(-1)
        still = searching[alive]
        if not still.all():
            keep_rows = (np.flatnonzero(still)[:, None] * beams + np.arange(beams)).reshape(-1)
            state = state.keep(keep_rows)
            next_tokens = next_tokens[keep_rows]
            alive = alive[still]
        logits = decoder.advance(state, next_tokens[:, None])
        steps += 1

    sequences, finished, ends = [], [], []
    for image in range(images):
        seq = done_seq[image, 0, : done_len[image, 0]].tolist()
        ended = bool(seq) and seq[-1] in settings.eos_token_ids
        sequences.append(seq[:-1] if ended else seq)
        finished.append(ended)
        ends.append(seq[-1] if ended else None)
    return DecodeResult(sequences, steps, finished, ends)
