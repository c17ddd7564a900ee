import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvmem.engine.detokenizer import IncrementalDetokenizer
from kvmem.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"


class TinyTokenizer:
    """Exposes only what the engine's tokenizer interface promises: decode + all_special_ids."""

    def __init__(self, tok: Tokenizer, special_tokens: list[str]) -> None:
        self.tok = tok
        self.all_special_ids = [tok.token_to_id(s) for s in special_tokens]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:  # for building tests only
        return self.tok.encode(text).ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


@pytest.fixture(scope="module")
def bpe() -> TinyTokenizer:
    """Byte-level BPE with a vocabulary small enough that multi-byte characters stay split over
    several tokens ("日本" is 6 byte tokens, "🙂" 4), plus a token "caf\\xc3" that ends in half a
    character (so "café" is ["caf\\xc3", "\\xa9"])."""
    corpus = (
        ["the quick brown fox jumps over the lazy dog. hello world, hello there!"] * 50
        + ["café 日本 🙂"] * 3
        + ["résumé"]
        + ["cafè cafà cafÿ cafê"] * 20
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290, min_frequency=3, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return TinyTokenizer(tok, ["<eos>"])


def test_fixture_splits_multibyte_chars(bpe):
    for text in ("é", "日本", "🙂"):
        ids = bpe.encode(text)
        assert len(ids) > 1
        assert all(REPLACEMENT in bpe.decode([i]) for i in ids)
    first = bpe.encode("café")[0]
    assert bpe.decode([first]) == "caf" + REPLACEMENT


def run(tok, prompt_ids, output_ids, params=None, stream=True):
    """Feed output_ids one by one; returns (detokenizer, deltas, stop string or None)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, params or SamplingParams())
    deltas: list[str] = []
    stop = None
    for t in output_ids:
        stop = detok.add_token(t)
        if stream:
            deltas.append(detok.take_delta(finished=stop is not None))
        if stop is not None:
            break
    if stop is None and stream:
        deltas.append(detok.take_delta(finished=True))
    return detok, deltas, stop


# --- text equals a full decode ------------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(list("abc fox théé日本🙂\n,.ÿ")), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, text=TEXT)
def test_valid_text_round_trips_without_replacement_chars(bpe, prompt, text):
    detok, deltas, _ = run(bpe, bpe.encode(prompt), bpe.encode(text))
    assert "".join(deltas) == detok.output_text == text
    assert not any(REPLACEMENT in d for d in deltas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_ids_match_full_decode(bpe, data):
    ids = st.lists(st.integers(0, bpe.vocab_size - 1), max_size=30)
    prompt, output = data.draw(ids), data.draw(ids)
    skip = data.draw(st.booleans())
    params = SamplingParams(skip_special_tokens=skip)
    detok, deltas, _ = run(bpe, prompt, output, params)
    expected = bpe.decode(output, skip_special_tokens=skip)
    assert detok.output_text == expected
    assert "".join(deltas) == expected


def test_text_is_not_streamed_until_a_character_is_complete(bpe):
    ids = bpe.encode("a🙂b")
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.output_text)
    assert seen == ["a", "a", "a", "a", "a🙂", "a🙂b"]


def test_chars_before_an_incomplete_char_in_the_same_token_come_out_at_once(bpe):
    caf, rest = bpe.encode("café")
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    detok.add_token(caf)
    assert detok.take_delta(finished=False) == "caf"
    detok.add_token(rest)
    assert detok.take_delta(finished=False) == "é"


def test_incomplete_tail_is_flushed_when_finished(bpe):
    ids = bpe.encode("ok日")[:-1]  # cut inside 日
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    for t in ids:
        detok.add_token(t)
    assert detok.output_text == "ok"
    assert detok.take_delta(finished=False) == "ok"
    assert detok.take_delta(finished=True) == REPLACEMENT
    assert detok.output_text == "ok" + REPLACEMENT == bpe.decode(ids)


def test_prompt_ending_inside_a_character(bpe):
    ids = bpe.encode("x日本")
    prompt, output = ids[:3], ids[3:]  # the prompt ends after 2 of 日's 3 bytes
    detok, deltas, _ = run(bpe, prompt, output)
    assert detok.output_text == bpe.decode(output) == "".join(deltas)


def test_special_tokens_are_skipped_or_kept(bpe):
    eos = bpe.all_special_ids[0]
    ids = bpe.encode("hi") + [eos]
    assert run(bpe, [], ids)[0].output_text == "hi"
    assert run(bpe, [], ids, SamplingParams(skip_special_tokens=False))[0].output_text == "hi<eos>"


def test_prompt_context_keeps_sentencepiece_leading_space():
    # A Metaspace (SentencePiece-style) decoder drops the leading space of the first token it
    # decodes, so the first generated token needs the prompt's tail as context.
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    wrapped = TinyTokenizer(tok, ["<unk>"])
    assert wrapped.decode([2]) == "world"
    detok, deltas, _ = run(wrapped, [1], [2, 3, 2])
    assert detok.output_text == " world! world" == "".join(deltas)


# --- stop strings -----------------------------------------------------------------------------------

def char_tokens(tok, text):
    """One or more tokens per character, so every character boundary is a token boundary and
    stop strings are split across tokens."""
    return [t for ch in text for t in tok.encode(ch)]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["fox", "日本", "o 🙂", "x\n"])
def test_stop_string_split_across_tokens(bpe, stop, include):
    text = f"the quick {stop} jumps {stop} again"
    ids = char_tokens(bpe, text)
    params = SamplingParams(stop=[stop, "never"], include_stop_str_in_output=include)
    detok, deltas, matched = run(bpe, [], ids, params)
    assert matched == stop and detok.stop_string == stop
    expected = "the quick " + (stop if include else "")
    assert detok.output_text == expected == "".join(deltas)
    assert detok.add_token(ids[0]) is None and detok.output_text == expected  # final


def test_stop_string_inside_one_token_and_earliest_match_wins(bpe):
    ids = bpe.encode("hello there, the quick")
    params = SamplingParams(stop=["quick", "the", "ell"])
    detok, _, matched = run(bpe, [], ids, params)
    assert matched == "ell" and detok.output_text == "h"


def test_stop_strings_wait_for_min_tokens(bpe):
    ids = char_tokens(bpe, "ab ab ab")
    params = SamplingParams(stop=["ab"], min_tokens=3)
    detok, deltas, matched = run(bpe, [], ids, params)
    assert matched == "ab" and detok.output_text == "ab " == "".join(deltas)


def test_no_stop_prefix_is_streamed_then_retracted(bpe):
    text = "the fox the fo the foxy fox"
    ids = char_tokens(bpe, text)
    params = SamplingParams(stop=["the foxy"])
    detok = IncrementalDetokenizer(bpe, [], params)
    streamed = ""
    for t in ids:
        stop = detok.add_token(t)
        streamed += detok.take_delta(finished=stop is not None)
        # whatever has been streamed is final: a prefix of the eventual output
        assert text.startswith(streamed)
        held = detok.output_text[len(streamed):]
        assert stop or len(held) < len("the foxy") and "the foxy".startswith(held)
        if stop:
            break
    assert streamed == detok.output_text == "the fox the fo "


def reference_stop(tok, ids, stops, include):
    """What a per-token stop check must produce: after the first token whose text contains any stop
    string, cut at the earliest occurrence (all of them end in that token's text)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k]).rstrip(REPLACEMENT)  # valid text: U+FFFD only marks a partial char
        hits = sorted((text.find(s), s) for s in stops if s in text)
        if hits:
            pos, stop = hits[0]
            return stop, text[:pos + len(stop)] if include else text[:pos]
    return None, tok.decode(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streaming_with_random_stops_never_retracts(bpe, data):
    alphabet = list("ab 日🙂é")
    text = data.draw(st.text(alphabet=st.sampled_from(alphabet), max_size=30))
    stops = data.draw(st.lists(st.text(alphabet=st.sampled_from(alphabet), min_size=1, max_size=4),
                               max_size=3))
    include = data.draw(st.booleans())
    ids = char_tokens(bpe, text) if data.draw(st.booleans()) else bpe.encode(text)
    want_stop, want_text = reference_stop(bpe, ids, stops, include)

    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=stops, include_stop_str_in_output=include))
    streamed = ""
    stop = None
    for t in ids:
        stop = detok.add_token(t)
        streamed += detok.take_delta(finished=stop is not None)
        assert REPLACEMENT not in streamed
        assert want_text.startswith(streamed)  # nothing streamed is ever taken back
        if stop:
            break
    if stop is None:
        streamed += detok.take_delta(finished=True)
    assert stop == want_stop
    assert streamed == detok.output_text == want_text


def test_take_delta_holds_back_only_possible_stop_prefixes(bpe):
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["STOP"]))
    for t in char_tokens(bpe, "abc S"):
        detok.add_token(t)
    assert detok.take_delta(finished=False) == "abc "  # "S" might start "STOP"
    for t in char_tokens(bpe, "x"):
        detok.add_token(t)
    assert detok.take_delta(finished=False) == "Sx"
    assert detok.take_delta(finished=True) == ""


def test_many_random_sequences_against_full_decode(bpe):
    # A quick non-hypothesis sweep with longer sequences (exercises the window sliding).
    rng = random.Random(0)
    for _ in range(50):
        prompt = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(0, 10))]
        output = [rng.randrange(bpe.vocab_size) for _ in range(rng.randrange(50, 200))]
        detok, deltas, _ = run(bpe, prompt, output)
        assert detok.output_text == bpe.decode(output) == "".join(deltas)
