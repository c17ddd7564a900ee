"""kvmem.tokenizer.Tokenizer against transformers' tokenizers (the oracle) on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer

from kvmem.models.loader import default_model_path
from kvmem.tokenizer import Tokenizer
from tests.conftest import CHATML_TEMPLATE, tiny_bpe_gguf_metadata, tiny_bpe_json, write_gguf

# Enough llama hyperparameters for transformers to accept a tokenizer-only GGUF.
LLAMA_META = {
    "llama.block_count": 1, "llama.context_length": 128, "llama.embedding_length": 64,
    "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4,
    "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
}

# transformers' GGUF tokenizer does not split digits (SmolLM2's real tokenizer.json does), so the
# oracle comparison uses digit-free text; digits are tested on their own below.
DIGIT_FREE_CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  multiple   spaces\tand\ttabs\n\n\nnewlines   ",
    "def fib(n):\n    if n < two:\n        return n\n    return fib(n - one) + fib(n - two)  # recursion\n",
    'const x = {"key": [true, null]}; // JSON-ish',
    "Ünïcödé — “curly quotes” and ‘single’ … ellipsis",
    "emoji 😀🎉👩‍👩‍👧 and CJK 中文字符 日本語 한국어",
    "it's I'm we'll they'd you've she's IT'S",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<repo_name>x",
    "",
    " ",
    "\n",
]
CORPUS_WITH_DIGITS = DIGIT_FREE_CORPUS + ["12345", "pi is 3.14159, year 2024!", "x1 = 42 ** 10_000", "١٢٣ ⅔ ²"]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is KV caching?"},
        {"role": "assistant", "content": "Reusing attention keys and values."},
        {"role": "user", "content": "Why does it matter?"},
    ],
    [{"role": "user", "content": "Hello! 😀"}],
]


@pytest.fixture(scope="module")
def smollm(default_source) -> Tokenizer:
    return default_source.tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    """A ChatML tokenizer from a tiny GGUF (milliseconds, unlike the embedded model)."""
    return Tokenizer.from_gguf(write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf",
                                          metadata=tiny_bpe_gguf_metadata()))


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ------------------------------------------------------------------ the embedded SmolLM2 GGUF


@pytest.mark.slow
def test_gguf_encode_matches_transformers(smollm, hf_smollm):
    for text in DIGIT_FREE_CORPUS:
        assert smollm.encode(text) == hf_smollm.encode(text, add_special_tokens=True), text


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS_WITH_DIGITS)
def test_gguf_decode_inverts_encode(smollm, text):
    assert smollm.decode(smollm.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_gguf_digits_are_single_tokens(smollm):
    ids = smollm.encode("12345 and 2024")
    tokens = [smollm.id_to_token(i) for i in ids]
    assert tokens[:5] == ["1", "2", "3", "4", "5"]
    assert tokens[-4:] == ["2", "0", "2", "4"]
    for text in CORPUS_WITH_DIGITS:
        for i in smollm.encode(text):
            piece = smollm.decode([i])
            assert not (any(c in "0123456789" for c in piece) and len(piece) > 1), (text, piece)


@pytest.mark.slow
def test_gguf_special_tokens(smollm, hf_smollm):
    assert smollm.bos_token_id == hf_smollm.bos_token_id == 1
    assert smollm.eos_token_id == hf_smollm.eos_token_id == 2
    assert smollm.pad_token_id == hf_smollm.pad_token_id == 2
    assert smollm.eos_token_ids == [2]  # <|im_end|> is both EOS and the template's end of turn
    assert smollm.add_bos_token is False
    assert smollm.vocab_size == 49152
    assert set(range(17)) <= smollm.all_special_ids  # the 17 CONTROL tokens
    assert smollm.id_to_token(1) == "<|im_start|>"
    assert smollm.encode("<|im_start|>user") == [1, smollm.encode("user")[0]]
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert smollm.decode(ids) == "user\nhi"
    assert smollm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["with-system", "no-system"])
def test_gguf_chat_template_matches_transformers(smollm, hf_smollm, conversation):
    ours = smollm.apply_chat_template(conversation, add_generation_prompt=True)
    assert ours == hf_smollm.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    no_prompt = smollm.apply_chat_template(conversation, add_generation_prompt=False)
    assert no_prompt == hf_smollm.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)


def test_chat_content_parts_are_joined(tiny):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "Hello\nworld"}]
    assert tiny.apply_chat_template(parts) == tiny.apply_chat_template(plain) == (
        "<|im_start|>user\nHello\nworld<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "messages must be a non-empty list"),
        ("hello", "messages must be a non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}], "messages[1].role"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ],
)
def test_chat_rejects_malformed_messages(tiny, messages, fragment):
    with pytest.raises(ValueError) as e:
        tiny.apply_chat_template(messages)
    assert fragment in str(e.value)


def test_template_errors_become_value_errors(gguf_file):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x"
    tok = Tokenizer.from_gguf(gguf_file(metadata=tiny_bpe_gguf_metadata(**{"tokenizer.chat_template": template})))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "x"
    with pytest.raises(ValueError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_missing_chat_template(gguf_file):
    tok = Tokenizer.from_gguf(gguf_file(metadata=tiny_bpe_gguf_metadata(**{"tokenizer.chat_template": None})))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sees_special_tokens_and_extras(gguf_file):
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ tools | tojson }}|{{ custom }}"
    tok = Tokenizer.from_gguf(gguf_file(metadata=tiny_bpe_gguf_metadata(**{"tokenizer.chat_template": template})))
    out = tok.apply_chat_template([{"role": "user", "content": "é<"}], custom="yes", tools=[{"name": "f"}])
    assert out == '<|im_start|>|<|im_end|>|[{"role": "user", "content": "é<"}]|[{"name": "f"}]|yes'


# ------------------------------------------------------------------ GGUF pre-tokenizers and vocab types


@pytest.mark.parametrize("pre", ["default", "gpt2", "llama-bpe", "qwen2"])
def test_gguf_pre_tokenizers_match_transformers(gguf_file, pre):
    from transformers import AutoTokenizer

    path = gguf_file(metadata={**LLAMA_META, **tiny_bpe_gguf_metadata(pre)})
    ours = Tokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in CORPUS_WITH_DIGITS:
        assert ours.encode(text) == ref.encode(text), (pre, text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_smollm_pre_tokenizer_splits_digits(gguf_file):
    # The tiny vocabulary learned "Ġ12345": a GPT-2 split keeps it, SmolLM2's splits digits first.
    smollm = Tokenizer.from_gguf(gguf_file("a.gguf", metadata=tiny_bpe_gguf_metadata("smollm")))
    gpt2 = Tokenizer.from_gguf(gguf_file("b.gguf", metadata=tiny_bpe_gguf_metadata("gpt2")))
    assert [gpt2.id_to_token(i) for i in gpt2.encode("x 12345")] == ["x", "Ġ12345"]
    assert [smollm.id_to_token(i) for i in smollm.encode("x 12345")] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    # It is the same split SmolLM2's tokenizer.json declares: Digits(individual) then ByteLevel.
    from tokenizers import pre_tokenizers

    real = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    rust = RustTokenizer.from_str(tiny_bpe_json())
    rust.pre_tokenizer = real
    for text in CORPUS_WITH_DIGITS:
        assert smollm.encode(text) == rust.encode(text).ids, text


def test_unknown_pre_tokenizer_and_model_name_the_file(gguf_file):
    path = gguf_file("odd-pre.gguf", metadata=tiny_bpe_gguf_metadata("made-up-pre"))
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(path)
    assert "odd-pre.gguf" in str(e.value) and "made-up-pre" in str(e.value)
    path = gguf_file("odd-model.gguf", metadata=tiny_bpe_gguf_metadata(**{"tokenizer.ggml.model": "rwkv"}))
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(path)
    assert "odd-model.gguf" in str(e.value) and "rwkv" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_gguf(path.parent / "nope.gguf")


def test_eos_ids_include_template_end_of_turn(gguf_file):
    meta = tiny_bpe_gguf_metadata()
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    meta["tokenizer.ggml.eos_token_id"] = vocab["<|endoftext|>"]  # as a base model's GGUF says
    tok = Tokenizer.from_gguf(gguf_file(metadata=meta))
    assert tok.eos_token_ids == [vocab["<|endoftext|>"], vocab["<|im_end|>"]]


def test_user_defined_tokens_stay_whole_and_survive_decode(gguf_file):
    meta = tiny_bpe_gguf_metadata()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<think>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [4]
    tok = Tokenizer.from_gguf(gguf_file(metadata=meta))
    think = len(meta["tokenizer.ggml.tokens"]) - 1
    ids = tok.encode("a<think>b")
    assert think in ids and think not in tok.all_special_ids
    assert tok.decode(ids) == "a<think>b"


def test_sentencepiece_gguf_matches_transformers(gguf_file):
    from transformers import AutoTokenizer

    pieces = ["▁", "e", "l", "o", "h", "w", "r", "d", "t", "a", "n", "s", "i", "g", "▁h", "▁w", "ll", "he", "lo",
              "or", "▁t", "th", "▁the", "▁he", "▁hel", "▁hell", "▁hello", "▁wor", "▁worl", "▁world", "in", "an",
              "▁a", "▁an", "▁in", "st", "▁st", "▁str", "▁stri", "▁strin", "▁string", "ng"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        **LLAMA_META,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    path = gguf_file(metadata=meta)
    ours = Tokenizer.from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.add_bos_token and ours.bos_token_id == 1
    # Text without special tokens in the middle: there transformers v5 and llama.cpp differ on the prefix space.
    for text in ["hello world", "hello  wörld the string", "tab\there 😀", "new\nline", "the"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------ Hugging Face directories


def _tiny_hf_tokenizer_dir(directory: Path, **config_overrides) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_str(tiny_bpe_json()), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)
    if config_overrides:
        cfg_file = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(config_overrides)
        cfg_file.write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_hf_dir_matches_transformers(tmp_path, add_bos):
    from transformers import AutoTokenizer

    overrides = {} if add_bos is None else {"add_bos_token": add_bos}
    path = _tiny_hf_tokenizer_dir(tmp_path, **overrides)
    ours = Tokenizer.from_hf_dir(path)
    ref = AutoTokenizer.from_pretrained(str(path))
    assert ours.add_bos_token is bool(add_bos)
    # transformers 5 ignores tokenizer_config's add_bos_token for a generic tokenizer.json (it keeps the
    # post-processor, which adds nothing here); transformers 4 honored the flag, and so do we.
    bos = [ours.bos_token_id] if add_bos else []
    for text in CORPUS_WITH_DIGITS:
        assert ours.encode(text) == bos + ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert set(ref.all_special_ids) <= ours.all_special_ids
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation) == ref.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)


def test_hf_post_processor_bos_is_kept_without_config_flag(tmp_path):
    # Llama 3 style: no add_bos_token in tokenizer_config.json, BOS added by tokenizer.json's post-processor.
    from tokenizers import processors

    rust = RustTokenizer.from_str(tiny_bpe_json())
    bos = rust.token_to_id("<|im_start|>")
    rust.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos_token
    assert tok.encode("hi") == [bos, *tok.encode("hi", add_special_tokens=False)]
    assert tok.chat_template is None


def test_hf_dir_config_variants(tmp_path):
    path = _tiny_hf_tokenizer_dir(tmp_path)
    # A chat_template.jinja file wins; tokenizer_config's template may also be a named list.
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(path)
    assert tok.chat_template == "D"
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.eos_token_ids == [0, 2]
    (path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_hf_dir(path).chat_template == "J"


def test_hf_dir_without_tokenizer_json(tmp_path):
    path = _tiny_hf_tokenizer_dir(tmp_path)
    shutil.move(path / "tokenizer.json", path / "elsewhere.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(path)
