"""The generation loop on small hand-made cases (no ONNX model).

`ScriptedDecoder` plays the decoder: the next-token distribution is a table lookup on (image, prefix).
It keeps the prefix *in the KV cache tensors* that the loop slices, reorders and repeats, so a wrong
row bookkeeping in greedy/beam search shows up as wrong tokens.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.decode import BufferPool, DecoderState, GenerationSettings, beam_search, generate, greedy
from engine.errors import ModelRuntimeError

VOCAB = 6  # 0 = pad/start, 1 = EOS, 2..5 words
EOS = 1


def dist(**probs: float) -> np.ndarray:
    """Log-probabilities over VOCAB; unnamed tokens share what is left."""
    p = np.zeros(VOCAB)
    for name, value in probs.items():
        p[int(name[1:])] = value
    rest = [t for t in range(VOCAB) if p[t] == 0]
    p[rest] = (1.0 - p.sum()) / len(rest)
    return np.log(p).astype(np.float32)


# image id -> prefix (tuple of generated ids) -> log-probs of the next token
TABLE = {
    # image 0: "2 3" then EOS
    0: {(): dist(t2=0.9), (2,): dist(t3=0.9), (2, 3): dist(t1=0.9)},
    # image 1: "4 4 4 ..." forever
    1: {},
    # image 2: EOS at once; if EOS is suppressed, "5" then EOS
    2: {(): dist(t1=0.8, t5=0.15), (5,): dist(t1=0.9)},
    # image 3: greedy takes 2 (0.5) then must stop with p=0.3; beam search finds 3 (0.4) then EOS (0.9)
    3: {(): dist(t2=0.5, t3=0.4), (2,): dist(t1=0.3), (3,): dist(t1=0.9)},
    # image 4: after step 2 both surviving beams descend from beam 1 ("3"): the cache must be reordered
    4: {
        (): dist(t2=0.5, t3=0.4), (2,): dist(t1=0.01), (3,): dist(t5=0.6, t4=0.35),
        (3, 5): dist(t3=0.9), (3, 5, 3): dist(t1=0.9), (3, 4): dist(t2=0.9), (3, 4, 2): dist(t1=0.9),
    },
    # image 5: with 2 beams and length_penalty 2, "EOS" (-0.51) and "2 EOS" (-1.74 / 2**2 = -0.44) fill the
    # finished slots at step 2, when the open "2 3" (-2.25) scored at its length, -2.25 / 2**2 = -0.56, cannot
    # beat them; scored at the longest allowed (early_stopping="never") it can, and "2 3 EOS" wins: -2.36 / 3**2
    5: {(): dist(t1=0.6, t2=0.35), (2,): dist(t1=0.5, t3=0.3), (2, 3): dist(t1=0.9)},
}


def lookup(image: int, prefix: tuple[int, ...]) -> np.ndarray:
    if image == 1:
        return dist(t4=0.9)
    return TABLE[image].get(prefix, dist(t1=0.95))


class ScriptedDecoder:
    def __init__(self) -> None:
        self.calls = 0
        self.pool = BufferPool()  # beam search repeats rows into pooled buffers

    def _logits(self, state: DecoderState) -> np.ndarray:
        images = state.cross_kv[0][:, 0, 0, 0].astype(int)
        prefixes = state.self_kv[0][:, 0, 1:, 0].astype(int)  # drop the start token
        return np.stack([lookup(int(i), tuple(p.tolist())) for i, p in zip(images, prefixes, strict=True)])

    def start(self, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
        self.calls += 1
        rows = input_ids.shape[0]
        state = DecoderState(
            self_kv=[input_ids.astype(np.float32).reshape(rows, 1, 1, 1)],
            cross_kv=[encoder_hidden[:, :1, :1].reshape(rows, 1, 1, 1).copy()],
            encoder_hidden=encoder_hidden,
            encoder_mask=encoder_mask,
            past_len=1,
        )
        return self._logits(state), state

    def advance(self, state: DecoderState, input_ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        new = input_ids.astype(np.float32).reshape(-1, 1, 1, 1)
        state.self_kv = [np.concatenate([state.self_kv[0], new], axis=2)]
        state.past_len += 1
        return self._logits(state)


def run(images: list[int], fn=generate, **kwargs: object) -> list[list[int]]:  # noqa: ANN001
    hidden = np.array(images, dtype=np.float32).reshape(-1, 1, 1) * np.ones((1, 3, 2), dtype=np.float32)
    mask = np.ones((len(images), 3), dtype=np.int64)
    settings = GenerationSettings(max_new_tokens=kwargs.pop("max_new_tokens", 8), eos_token_ids=(EOS,), **kwargs)
    return fn(ScriptedDecoder(), hidden, mask, settings).sequences


def test_greedy_stops_each_row_at_its_own_eos_or_length() -> None:
    assert run([0, 1, 2], max_new_tokens=5) == [[2, 3], [4, 4, 4, 4, 4], []]


def test_greedy_batch_equals_single_in_any_order() -> None:
    batch = run([2, 1, 0, 3, 1], max_new_tokens=6)
    assert batch == [run([i], max_new_tokens=6)[0] for i in (2, 1, 0, 3, 1)]


def test_greedy_drops_finished_rows_from_the_batch() -> None:
    decoder = ScriptedDecoder()
    hidden = np.array([2.0, 1.0]).reshape(2, 1, 1) * np.ones((1, 3, 2), dtype=np.float32)
    result = greedy(decoder, hidden.astype(np.float32), np.ones((2, 3), np.int64), GenerationSettings(max_new_tokens=4))
    assert result.sequences == [[], [4, 4, 4, 4]]
    assert result.finished == [True, False]
    assert result.steps == decoder.calls == 4  # the finished row did not keep the loop going longer


def test_min_new_tokens_suppresses_eos_until_reached() -> None:
    assert run([2], max_new_tokens=5) == [[]]
    assert run([2], max_new_tokens=5, min_new_tokens=1) == [[5]]
    assert run([0], max_new_tokens=5, min_new_tokens=4)[0][:2] == [2, 3]
    assert len(run([0], max_new_tokens=5, min_new_tokens=4)[0]) >= 4


def test_zero_new_tokens_gives_empty_captions() -> None:
    assert run([0, 1], max_new_tokens=0) == [[], []]


def test_beam_search_finds_the_more_likely_caption_that_greedy_misses() -> None:
    assert run([3], max_new_tokens=5) == [[2]]
    assert run([3], max_new_tokens=5, num_beams=2) == [[3]]


def test_beam_search_follows_the_parents_of_the_surviving_beams() -> None:
    assert run([4], max_new_tokens=6, num_beams=2) == [[3, 5, 3]]
    assert run([4, 1, 4], max_new_tokens=6, num_beams=2)[2] == [3, 5, 3]


def test_beam_search_batch_equals_single_and_respects_length() -> None:
    images = [3, 1, 0, 2, 4]
    batch = run(images, max_new_tokens=4, num_beams=3)
    assert batch == [run([i], max_new_tokens=4, num_beams=3)[0] for i in images]
    assert batch[1] == [4, 4, 4, 4]
    assert batch[2] == [2, 3]


def test_early_stopping_never_scores_the_open_beam_at_the_longest_length() -> None:
    """transformers' rule: under a positive length penalty, "never" keeps searching while the best open beam,
    scored at max_new_tokens, could beat a finished one; False scores it at its current length."""
    beams = dict(num_beams=2, max_new_tokens=6, length_penalty=2.0)
    assert run([5], **beams) == [[2]]
    assert run([5], early_stopping=True, **beams) == [[2]]
    assert run([5], early_stopping="never", **beams) == [[2, 3]]
    assert run([5, 0, 5], early_stopping="never", **beams) == [[2, 3], [2, 3], [2, 3]]
    # With no length penalty pushing to longer captions, "never" is the False rule.
    assert run([5], early_stopping="never", num_beams=2, max_new_tokens=6, length_penalty=0.0) == run(
        [5], num_beams=2, max_new_tokens=6, length_penalty=0.0
    )


def test_repetition_penalty_and_no_repeat_ngrams_follow_the_caption_so_far() -> None:
    """transformers' processors over the start token and the caption so far. Image 1 says "4" at p=0.9
    forever, the other tokens share the rest (log 0.02 = -3.9)."""
    assert run([1], max_new_tokens=5) == [[4, 4, 4, 4, 4]]
    # A penalty of 50 makes a seen "4" -0.105 * 50 = -5.3, below the unseen tokens: the first of them, EOS.
    assert run([1], max_new_tokens=5, repetition_penalty=50.0) == [[4]]
    assert run([1], max_new_tokens=5, repetition_penalty=50.0, num_beams=2) == [[4]]
    # Every bigram once: after "0 4 4" (the start token first) "4 4" is seen, so the first of the tied rest, 0;
    # after "0 4 4 0", "0 4" bans 4 again: 0; after "... 0 0", "0 4" and "0 0" ban both: EOS.
    assert run([1], max_new_tokens=8, no_repeat_ngram_size=2) == [[4, 4, 0, 0]]
    # One-token n-grams: every token seen once is banned, the start token too.
    assert run([1], max_new_tokens=8, no_repeat_ngram_size=1) == [[4]]
    # Rows of a batch keep their own history.
    assert run([1, 0, 1], max_new_tokens=8, no_repeat_ngram_size=2) == [[4, 4, 0, 0], [2, 3], [4, 4, 0, 0]]


def test_the_caption_history_grows_with_the_caption_not_the_limit() -> None:
    # A limit far beyond memory costs nothing up front (the history was max_new_tokens long from the start).
    assert run([1], max_new_tokens=10**12, repetition_penalty=50.0) == [[4]]
    assert run([1], max_new_tokens=10**12, repetition_penalty=50.0, num_beams=2) == [[4]]
    # Past the first growth the whole history still counts: after the start token and 100 "4"s, the 99
    # last "4"s were once followed by a "4" already, so 100-grams ban it and the first of the rest, 0, follows.
    assert run([1], max_new_tokens=101, no_repeat_ngram_size=100) == [[4] * 100 + [0]]


@pytest.mark.parametrize("beams", [1, 2])
def test_token_processors_act_as_transformers_does(beams: int) -> None:
    """Image 0 says "2 3" then EOS; image 1 "4" forever; unnamed tokens tie, and a tie goes to the lowest id."""

    def caption(image: int, **settings: object) -> list[int]:
        return run([image], num_beams=beams, **settings)[0]

    assert caption(0, suppress_tokens=(3,)) == [2, 0]  # after "2", not 3: the first of the tied rest
    assert caption(0, bad_words_ids=((2, 3),)) == [2, 0]  # "2 3" never completed
    assert caption(0, bad_words_ids=((2,),)) == [0]
    assert caption(0, bad_words_ids=((EOS,),)) == [2, 3]  # EOS alone is never banned
    assert caption(0, sequence_bias=(((2,), -10.0),)) == [0]
    assert caption(0, sequence_bias=(((2, 3), -10.0),)) == [2, 0]
    assert caption(0, sequence_bias=(((2,), -10.0), ((2,), 0.0))) == [2, 3]  # the last bias given for a sequence
    assert caption(0, forced_bos_token_id=5) == [5]
    assert caption(1, max_new_tokens=5, forced_eos_token_ids=(EOS,)) == [4, 4, 4, 4]  # EOS is the 5th token
    # Forced last token over min_new_tokens' ban, as transformers orders them.
    assert caption(1, max_new_tokens=3, min_new_tokens=3, forced_eos_token_ids=(EOS,)) == [4, 4]
    assert caption(0, begin_suppress_tokens=(2,)) == [0]  # the first token only
    assert caption(0, begin_suppress_tokens=(3,)) == [2, 3]
    assert caption(0, forced_bos_token_id=5, begin_suppress_tokens=(EOS,)) == [5, 0]  # after a forced one: the second


def test_token_processors_name_only_tokens_the_model_has() -> None:
    with pytest.raises(ModelRuntimeError, match=re.escape("vocabulary of 6): [6, 9]")):
        run([0], suppress_tokens=(9,), bad_words_ids=((2, 6),))
    with pytest.raises(ValueError, match="bad_words_ids and sequence_bias take non-empty token sequences"):
        GenerationSettings(max_new_tokens=4, bad_words_ids=((),))
    with pytest.raises(ValueError, match=re.escape("suppress_tokens must hold token ids (integers >= 0), got (-1,)")):
        GenerationSettings(max_new_tokens=4, suppress_tokens=(-1,))


def test_one_beam_is_greedy() -> None:
    assert run([0, 1, 2, 3], num_beams=1) == run([0, 1, 2, 3], fn=greedy)
    assert run([3], fn=beam_search, num_beams=1, max_new_tokens=5) == [[2]]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
        ({"max_new_tokens": 4, "num_beams": 0}, "num_beams must be an integer >= 1, got 0"),
        ({"max_new_tokens": 4, "num_beams": 1.5}, "num_beams must be an integer >= 1, got 1.5"),
        ({"max_new_tokens": 4, "num_beams": 1025}, "num_beams must be an integer from 1 to 1024, got 1025"),
        ({"max_new_tokens": 4, "min_new_tokens": True}, "min_new_tokens must be an integer >= 0, got True"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be an integer >= 0, got '8'"),
        ({"max_new_tokens": 4, "early_stopping": "always"}, 'early_stopping must be True, False or "never", got \'always\''),
        ({"max_new_tokens": 4, "repetition_penalty": 0}, "repetition_penalty must be a number > 0, got 0"),
        ({"max_new_tokens": 4, "no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0, got -1"),
    ],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationSettings(**settings)


def _numbered_state(rows: int) -> DecoderState:
    """A state whose row r holds the value r in every tensor."""
    ids = np.arange(rows, dtype=np.float32)
    return DecoderState(
        self_kv=[ids.reshape(rows, 1, 1, 1) * np.ones((1, 2, 3, 4), np.float32)],
        cross_kv=[ids.reshape(rows, 1, 1, 1) * np.ones((1, 2, 5, 4), np.float32) for _ in range(2)],
        encoder_hidden=ids.reshape(rows, 1, 1) * np.ones((1, 5, 3), np.float32),
        encoder_mask=np.ones((rows, 5), np.int64) * np.arange(rows)[:, None],
        past_len=3,
    )


def test_keep_compacts_the_cross_attention_cache_in_place() -> None:
    state = _numbered_state(5)
    storage = state.cross_kv[0]
    kept = state.keep(np.array([1, 3, 4]))
    expected = np.array([1, 3, 4], np.float32)
    for tensor in (*kept.self_kv, *kept.cross_kv):
        assert tensor.shape[0] == 3 and (tensor[:, 0, 0, 0] == expected).all() and (tensor == tensor[:, :1, :1, :1]).all()
    assert kept.encoder_hidden is not None and (kept.encoder_hidden[:, 0, 0] == expected).all()
    assert (kept.encoder_mask[:, 0] == expected).all() and kept.past_len == 3
    assert np.shares_memory(kept.cross_kv[0], storage)  # no new copy of the largest tensors
    assert (storage[3:, 0, 0, 0] == [3, 4]).all()  # rows past the kept ones are left as they were


@pytest.mark.parametrize("rows", [[2, 1], [1, 1], [0, 5], [-1, 2]])
def test_keep_refuses_rows_it_cannot_compact_in_place(rows: list[int]) -> None:
    with pytest.raises(ValueError, match="ascending row indices below 5"):
        _numbered_state(5).keep(np.array(rows))


def test_buffer_pool_hands_back_the_largest_set_for_the_same_shapes() -> None:
    pool = BufferPool()
    shapes: list[tuple[int, ...]] = [(2, 6, 4), (2, 6, 4)]
    first = pool.take(4, shapes, np.dtype(np.float32))
    assert [b.shape for b in first] == [(4, 2, 6, 4)] * 2
    pool.give(first)
    again = pool.take(3, shapes, np.dtype(np.float32))  # a smaller batch reuses the larger buffers
    assert all(a is b for a, b in zip(again, first, strict=True))
    assert pool.take(3, shapes, np.dtype(np.float32))[0] is not first[0]  # taken: not handed out twice
    pool.give(again)
    assert pool.take(5, shapes, np.dtype(np.float32))[0].shape[0] == 5  # too small: a new set
    assert pool.take(2, [(2, 7, 4)], np.dtype(np.float32))[0].shape == (2, 2, 7, 4)  # other shape: new


def test_greedy_gives_pooled_buffers_back_when_done() -> None:
    pool = BufferPool()
    buffers = pool.take(2, [(1, 1, 1)], np.dtype(np.float32))

    class PooledDecoder(ScriptedDecoder):
        def start(self, encoder_hidden: np.ndarray, encoder_mask: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, DecoderState]:
            logits, state = super().start(encoder_hidden, encoder_mask, input_ids)
            buffers[0][: state.rows] = state.cross_kv[0]
            state.cross_kv, state.buffers, state.pool = [buffers[0][: state.rows]], buffers, pool
            return logits, state

    hidden = np.array([0.0, 1.0]).reshape(2, 1, 1) * np.ones((1, 3, 2), dtype=np.float32)
    settings = GenerationSettings(max_new_tokens=5, eos_token_ids=(EOS,))
    result = greedy(PooledDecoder(), hidden, np.ones((2, 3), np.int64), settings)
    assert result.sequences == [[2, 3], [4, 4, 4, 4, 4]]  # row 0 finished early: the pooled cache was compacted
    assert pool.take(2, [(1, 1, 1)], np.dtype(np.float32))[0] is buffers[0]


def test_buffer_pool_keeps_two_sets_and_hands_out_the_smallest_that_fits() -> None:
    pool = BufferPool()
    shapes: list[tuple[int, ...]] = [(1, 2, 3)]
    small, large, larger = (pool.take(rows, shapes, np.dtype(np.float32)) for rows in (2, 8, 9))
    for buffers in (small, large, larger):
        pool.give(buffers)
    assert pool.take(1, shapes, np.dtype(np.float32))[0] is large[0]  # the smallest of the two kept sets
    assert pool.take(1, shapes, np.dtype(np.float32))[0] is larger[0]
    assert pool.take(1, shapes, np.dtype(np.float32))[0] is not small[0]  # the third set was not kept


def test_beam_search_reuses_pooled_buffers_from_batch_to_batch() -> None:
    class RecordingPool(BufferPool):
        def __init__(self) -> None:
            super().__init__()
            self.handed_out: list[int] = []

        def take(self, rows: int, shapes: list[tuple[int, ...]], dtype: np.dtype) -> list[np.ndarray]:  # type: ignore[type-arg]
            buffers = super().take(rows, shapes, dtype)
            self.handed_out.append(id(buffers[0]))
            return buffers

    decoder = ScriptedDecoder()
    decoder.pool = RecordingPool()
    hidden = np.array([3.0, 4.0, 0.0]).reshape(3, 1, 1) * np.ones((1, 3, 2), dtype=np.float32)
    settings = GenerationSettings(max_new_tokens=6, eos_token_ids=(EOS,), num_beams=2)
    results = [beam_search(decoder, hidden, np.ones((3, 3), np.int64), settings).sequences for _ in range(2)]
    assert results[0] == results[1] == [[3], [3, 5, 3], [2, 3]]
    first_batch, second_batch = decoder.pool.handed_out
    assert first_batch == second_batch  # the beams' cross-attention K/V went back to the pool and came out again


def test_beam_search_memory_follows_the_captions_not_the_length_limit() -> None:
    # Image 0 ends after 2 tokens: a limit of 10**12 must not allocate 10**12 tokens per beam up front.
    assert run([0, 3], fn=beam_search, num_beams=2, max_new_tokens=10**12) == [[2, 3], [3]]
    # Image 1 never ends: its beams outgrow the first buffers (64 tokens) and are kept whole.
    assert run([1, 0], fn=beam_search, num_beams=2, max_new_tokens=150) == [[4] * 150, [2, 3]]


@pytest.mark.parametrize("fn", [greedy, beam_search])
def test_an_ordinary_token_among_the_eos_ids_keeps_its_text(fn) -> None:  # noqa: ANN001
    """transformers decodes `generate`'s output with the EOS that ended it: skip_special_tokens drops </s>
    but keeps an ordinary token listed as EOS (a ".", say). Image 0 writes "2 3" then EOS."""
    hidden = np.zeros((1, 3, 2), dtype=np.float32)
    mask = np.ones((1, 3), dtype=np.int64)
    settings = GenerationSettings(max_new_tokens=8, eos_token_ids=(EOS, 3), num_beams=1 if fn is greedy else 2)
    result = fn(ScriptedDecoder(), hidden, mask, settings)
    assert result.sequences == [[2]] and result.ends == [3] and result.text_ids() == [[2, 3]]
    plain = fn(ScriptedDecoder(), hidden, mask, GenerationSettings(max_new_tokens=8, eos_token_ids=(EOS,), num_beams=settings.num_beams))
    assert plain.text_ids() == [[2, 3, EOS]]  # </s> goes to the tokenizer, which drops it as special


def test_the_bundle_tokenizer_drops_a_special_eos_from_the_text() -> None:
    from engine.captioner import resolve_bundle
    from engine.tokenizer import CaptionTokenizer

    tokenizer = CaptionTokenizer.from_bundle_dir(resolve_bundle(None))
    ids = tokenizer.encode("The answer is correct.")  # ends with </s>
    assert ids[-1] == EOS and tokenizer.decode(ids) == tokenizer.decode(ids[:-1]) == "The answer is correct."
