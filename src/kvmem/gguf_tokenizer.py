"""A `tokenizers` tokenizer built from a GGUF file's `tokenizer.*` metadata.

GGUF files carry the vocabulary, the merges (or SentencePiece scores), the token types and the
special token ids under llama.cpp's key names, but no `tokenizer.json`. `read_gguf` rebuilds what
the original model's `tokenizer.json` holds: for `tokenizer.ggml.model == "gpt2"` a byte-level BPE
with the normalizer and pre-tokenizer (split regex) that llama.cpp picks for `tokenizer.ggml.pre`;
for `"llama"` a SentencePiece-style BPE with byte fallback (merges from the file or derived from
the scores). CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from kvmem.gguf_metadata import GGUFMetadata

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = ["read_gguf"]

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# The split regexes llama.cpp applies for each `tokenizer.ggml.pre` value (llama-vocab.cpp), which are
# the ones in the original models' tokenizer.json files.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, Any, bool] | None:
    """(normalizer, pre_tokenizer, ignore_merges) for a `tokenizer.ggml.pre` value, or None if unknown."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2", "mpt", "olmo"):
        # ByteLevel's built-in regex is exactly _GPT2_SPLIT.
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("smollm", "starcoder", "refact"):
        # Each digit on its own, then the GPT-2 regex: SmolLM2's tokenizer.json has exactly this
        # Sequence[Digits(individual_digits), ByteLevel]; llama.cpp writes it as a "\p{N}" split first.
        return (
            None,
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            False,
        )
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"):
        # Llama 3's tokenizer.json sets `ignore_merges` (a word that is itself a token is taken whole);
        # llama.cpp does the same for this pre-tokenizer.
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return None, pre_tokenizers.Sequence([split, byte_level]), True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        # Qwen2's tokenizer.json NFC-normalizes first; llama.cpp does not, which only matters for
        # text that is not already NFC.
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level]), False
    return None


def read_gguf(reader_or_path: "GGUFReader | str | os.PathLike[str]") -> tuple[RustTokenizer, dict[str, Any]]:
    """Build from a GGUF file's `tokenizer.*` metadata (a path or an open `gguf.GGUFReader`); returns the
    Rust tokenizer and `kvmem.tokenizer.Tokenizer`'s keyword arguments."""
    from gguf import GGUFReader  # deferred: only GGUF users pay for it

    if isinstance(reader_or_path, GGUFReader):
        reader, source = reader_or_path, str(reader_or_path.data.filename)
    else:
        source = str(reader_or_path)
        try:
            reader = GGUFReader(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"{source}: no such file") from None
        except Exception as e:
            raise ValueError(f"{source}: not a readable GGUF file: {e}") from e
    meta = GGUFMetadata(reader, source)

    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if model == "gpt2":
        tok = _byte_level_bpe_from_gguf(meta, tokens)
        default_add_bos = False
    elif model == "llama":
        tok = _sentencepiece_bpe_from_gguf(meta, tokens)
        default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies without the flag
    else:
        raise ValueError(
            f"{source}: unsupported tokenizer.ggml.model {model!r}; kvmem reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece)"
        )

    # CONTROL tokens are special (matched whole, skipped by decode); USER_DEFINED ones (like <think> or
    # <tool_call>) are plain added tokens: matched whole, but kept by decode -- the same split that
    # llama.cpp's converter used to produce the two types from tokenizer.json's `special` flag.
    control = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_CONTROL]
    user = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_USER_DEFINED]
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return tok, {
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": default_add_bos if add_bos is None else bool(add_bos),
        "chat_template": meta.get("tokenizer.chat_template"),
        "vocab_size": len(tokens),
    }


def _byte_level_bpe_from_gguf(meta: GGUFMetadata, tokens: list[str]) -> RustTokenizer:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    parts = _byte_level_pre_tokenizer(pre)
    if parts is None:
        raise ValueError(
            f"{meta.source}: unsupported tokenizer.ggml.pre {pre!r}; kvmem knows default/gpt2, smollm/starcoder, "
            "llama-bpe (Llama 3) and qwen2"
        )
    normalizer, pre_tokenizer, ignore_merges = parts
    merges = meta.require("tokenizer.ggml.merges")
    # Byte-level tokens never hold a literal space (it is spelled "Ġ"), so the first space separates the pair.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first occurrence wins for duplicates
    tok = RustTokenizer(BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe_from_gguf(meta: GGUFMetadata, tokens: list[str]) -> RustTokenizer:
    """A SentencePiece (Llama 1/2, Mistral) vocabulary as a BPE with byte fallback, like transformers'
    LlamaTokenizer. Merges come from the file, or are derived from the token scores: a piece is merged
    from two smaller pieces, and higher-scoring pieces merge first (SentencePiece's BPE rule)."""
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.require("tokenizer.ggml.scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tok = RustTokenizer(BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # "always": a space is prepended to every stretch of text, including after a special token, as llama.cpp
    # and the original (legacy) Llama tokenizer.json do. transformers v5 prepends only at the very start.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    # Same order as transformers' `generate_merges`, so both build the same BPE from one file.
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
