"""Incremental detokenization: kvmem's `IncrementalDetokenizer` vs `tokenizers.decoders.DecodeStream`.

    .venv/bin/python benchmarks/detokenizer_stream.py [--tokens 4000] [--repeats 5]

Part 1, speed and output on the embedded SmolLM2 tokenizer (`load_model(None).tokenizer`): a few
thousand generated-like tokens (English, code, accents, CJK, emoji with skin tones and ZWJ
sequences, special tokens every ~40 tokens) and as many uniformly random ids (invalid UTF-8
included), skip_special_tokens on and off. Both are fed one token at a time, as the engine does:
ours `add_token` (the engine's path: `Tokenizer.decode`), DecodeStream `step` (the Rust tokenizer).
Reported: microseconds per token (min and median of the repeats), whether the final texts are
identical (and equal a full decode), and at how many steps the text emitted so far differs.

Part 2, the cases tests/engine/test_detokenizer.py pins down, driven through DecodeStream on the
tests' own small tokenizers: does DecodeStream give what the tests assert?
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from kvmem.engine.detokenizer import IncrementalDetokenizer
from kvmem.models.loader import load_model
from kvmem.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # what IncrementalDetokenizer keeps of the prompt; DecodeStream gets the same ids

SEGMENTS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Here is a function:\n```python\ndef add(a, b):\n    return a + b  # 🙂\n```\n",
    "Café, naïve, résumé, façade, Ærøskøbing, Straße. ",
    "日本語のテキストと中文文本，还有한국어 텍스트. ",
    "Emoji: 🙂👍🏽🎉 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷🇯🇵 ",
    "Math: ∀x ∈ ℝ, x² ≥ 0; π ≈ 3.14159, ∑ᵢ aᵢ. ",
    "Numbers 1234567890 and symbols ~!@#$%^&*()_+{}|:\"<>? ",
    "Ελληνικά, русский текст, עברית, العربية. ",
]


# --- the two detokenizers, fed one token at a time ------------------------------------------------
def run_ours(tok, prompt: list[int], output: list[int], skip: bool) -> tuple[list[str], str]:
    """(text emitted after each step, final text after flush)."""
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
    seen = []
    for t in output:
        detok.add_token(t)
        seen.append(detok.output_text)
    detok.flush()
    return seen, detok.output_text


def run_stream(rust: RustTokenizer, prompt: list[int], output: list[int], skip: bool) -> tuple[list[str], str]:
    """The same through DecodeStream (prefilled with the same prompt tail). It has no flush: a trailing
    incomplete character is never emitted."""
    stream = DecodeStream(ids=list(prompt[-PROMPT_CONTEXT:]), skip_special_tokens=skip)
    text, seen = "", []
    for t in output:
        chunk = stream.step(rust, t)
        if chunk is not None:
            text += chunk
        seen.append(text)
    return seen, text


def time_ours(tok, prompt, output, skip) -> float:
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(skip_special_tokens=skip))
    add = detok.add_token
    t0 = time.perf_counter()
    for t in output:
        add(t)
    detok.flush()
    return time.perf_counter() - t0


def time_stream(rust, prompt, output, skip) -> float:
    stream = DecodeStream(ids=list(prompt[-PROMPT_CONTEXT:]), skip_special_tokens=skip)
    step = stream.step
    parts = []
    t0 = time.perf_counter()
    for t in output:
        chunk = step(rust, t)
        if chunk is not None:
            parts.append(chunk)
    "".join(parts)
    return time.perf_counter() - t0


# --- part 1: SmolLM2 --------------------------------------------------------------------------------
def generated_like(tok, n: int, rng: random.Random) -> list[int]:
    specials = sorted(tok.all_special_ids)
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(rng.choice(SEGMENTS), add_special_tokens=False)
        if rng.random() < 0.3:
            ids.append(rng.choice(specials))
    return ids[:n]


def part1(n: int, repeats: int) -> None:
    tok = load_model(None).tokenizer
    rust = tok._tok  # the Rust tokenizer kvmem's Tokenizer wraps: what DecodeStream.step takes
    rng = random.Random(0)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something 🙂"}]))
    cases = {"generated-like": generated_like(tok, n, rng),
             "random ids": [rng.randrange(tok.vocab_size) for _ in range(n)]}
    print(f"SmolLM2 tokenizer, {n} tokens per case, {repeats} repeats; microseconds per token (min / median)")
    print(f"{'case':<16}{'skip_special':>13}{'ours':>16}{'DecodeStream':>16}{'ours/DS':>9}"
          f"{'same final text':>17}{'= full decode':>15}{'steps differing':>17}")
    for name, output in cases.items():
        for skip in (True, False):
            ours_seen, ours_text = run_ours(tok, prompt, output, skip)
            ds_seen, ds_text = run_stream(rust, prompt, output, skip)
            full = tok.decode(output, skip_special_tokens=skip)
            differing = sum(a != b for a, b in zip(ours_seen, ds_seen))
            t_ours, t_ds = [], []
            for _ in range(repeats):  # interleaved, so a busy machine slows both alike
                t_ours.append(time_ours(tok, prompt, output, skip))
                t_ds.append(time_stream(rust, prompt, output, skip))
            us = 1e6 / len(output)
            o_min, o_med = min(t_ours) * us, statistics.median(t_ours) * us
            d_min, d_med = min(t_ds) * us, statistics.median(t_ds) * us
            print(f"{name:<16}{str(skip):>13}{f'{o_min:.1f} / {o_med:.1f}':>16}{f'{d_min:.1f} / {d_med:.1f}':>16}"
                  f"{o_min / d_min:>8.2f}x{str(ours_text == ds_text):>17}"
                  f"{f'{ours_text == full}/{ds_text == full}':>15}{differing:>17}")


# --- part 2: the tests' cases through DecodeStream --------------------------------------------------
def tiny_bpe() -> RustTokenizer:
    """tests/engine/test_detokenizer.py's `bpe` fixture."""
    corpus = (["the quick brown fox jumps over the lazy dog. hello world, hello there!"] * 50
              + ["café 日本 🙂"] * 3 + ["résumé"] + ["cafè cafà cafÿ cafê"] * 20)
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, min_frequency=3, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


class Wrapped:
    def __init__(self, tok: RustTokenizer) -> None:
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def part2() -> None:
    bpe = tiny_bpe()
    ours = Wrapped(bpe)
    enc = lambda text: bpe.encode(text).ids  # noqa: E731
    checks: list[tuple[str, object, object, object]] = []  # (case, test expects, ours, DecodeStream)

    ids = enc("a🙂b")
    checks.append(("text per token of 'a🙂b'", ["a", "a", "a", "a", "a🙂", "a🙂b"],
                   run_ours(ours, [], ids, True)[0], run_stream(bpe, [], ids, True)[0]))
    ids = enc("café")  # ["caf\xc3", "\xa9"]: the first token ends inside é
    checks.append(("'caf' streamed at the token ending inside é", ["caf", "café"],
                   run_ours(ours, [], ids, True)[0], run_stream(bpe, [], ids, True)[0]))
    ids = enc("ok日")[:-1]
    checks.append(("trailing incomplete character at the end", "ok" + REPLACEMENT,
                   run_ours(ours, [], ids, True)[1], run_stream(bpe, [], ids, True)[1]))
    ids = enc("x日本")
    checks.append(("prompt ending inside a character", bpe.decode(ids[3:]),
                   run_ours(ours, ids[:3], ids[3:], True)[1], run_stream(bpe, ids[:3], ids[3:], True)[1]))
    eos = bpe.token_to_id("<eos>")
    for skip, want in ((True, "hi"), (False, "hi<eos>")):
        ids = enc("hi") + [eos]
        checks.append((f"special token, skip_special_tokens={skip}", want,
                       run_ours(ours, [], ids, skip)[1], run_stream(bpe, [], ids, skip)[1]))
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}
    sp = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    checks.append(("SentencePiece leading space from the prompt", " world! world",
                   run_ours(Wrapped(sp), [1], [2, 3, 2], True)[1], run_stream(sp, [1], [2, 3, 2], True)[1]))
    rng = random.Random(0)
    bad_ours = bad_ds = bad_ds_no_prompt = only_tail = 0
    for _ in range(300):
        prompt = [rng.randrange(bpe.get_vocab_size()) for _ in range(rng.randrange(0, 10))]
        output = [rng.randrange(bpe.get_vocab_size()) for _ in range(rng.randrange(1, 60))]
        skip = rng.random() < 0.5
        want = bpe.decode(output, skip_special_tokens=skip)
        bad_ours += run_ours(ours, prompt, output, skip)[1] != want
        bad_ds += run_stream(bpe, prompt, output, skip)[1] != want
        got = run_stream(bpe, [], output, skip)[1]  # no prompt prefill
        if got != want:
            bad_ds_no_prompt += 1
            only_tail += want.startswith(got) and set(want[len(got):]) == {REPLACEMENT}
    checks.append(("300 random id sequences = full decode (mismatches)", 0, bad_ours, bad_ds))
    checks.append(("  the same, DecodeStream without the prompt prefill (mismatches)", 0, bad_ours, bad_ds_no_prompt))
    checks.append(("  of those, only the trailing incomplete character missing", 0, 0, only_tail))

    print("\nThe cases tests/engine/test_detokenizer.py asserts, on its own tokenizers:")
    for case, want, a, b in checks:
        print(f"  {case}:\n    expected {want!r}\n    ours     {a!r} {'ok' if a == want else 'DIFFERS'}\n"
              f"    DS       {b!r} {'ok' if b == want else 'DIFFERS'}")
    print("  stop strings, min_tokens, take_delta's hold-back: DecodeStream has none; they would stay ours, run on "
          "the text DecodeStream emits (so a stop string is found only once DecodeStream emits its text)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    part1(args.tokens, args.repeats)
    part2()


if __name__ == "__main__":
    main()
