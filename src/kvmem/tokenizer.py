"""Text <-> token ids, and chat messages -> prompt text.

`Tokenizer` wraps the Rust `tokenizers.Tokenizer`. It is built either from a Hugging Face model
directory (`tokenizer.json` + `tokenizer_config.json`) or from the metadata of a GGUF file, which
carries the vocabulary, the merges and the special token ids under llama.cpp's key names but no
`tokenizer.json`. transformers is never imported here: it takes seconds to import and is only a
test oracle.

Conventions, shared by both sources:

* `encode(text)` never relies on the Rust post-processor. It prepends BOS itself, exactly when
  `add_bos_token` is true, and never appends EOS (causal LMs do not want one at the end of a prompt).
  For a Hugging Face directory `add_bos_token` is `tokenizer_config.json`'s flag when it states one
  (transformers then rebuilds the post-processor from it), else whether `tokenizer.json`'s own
  post-processor adds BOS (Llama 3 does, SmolLM2 and Qwen2 do not).
* Special tokens written in the text (say "<|im_start|>") are matched whole and encoded to their id,
  as transformers and llama.cpp do by default; a chat template relies on this.
* `eos_token_ids` is every id that ends generation: the EOS token, the ids in
  `generation_config.json`'s `eos_token_id` (Hugging Face directories), and any special token from
  `END_OF_TURN_TOKENS` that the chat template writes -- a template that closes turns with
  `<|im_end|>` or `<|eot_id|>` has taught the model to emit it when its answer is done, even where
  the file names another token as EOS (Llama 3 instruct GGUFs name `<|end_of_text|>`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from kvmem.gguf_metadata import GGUFMetadata

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = ["END_OF_TURN_TOKENS", "Tokenizer"]

# Special tokens that close an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma...).
# llama.cpp treats the same strings as end-of-generation tokens.
END_OF_TURN_TOKENS = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"}
)

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


def _special_token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}: expected a string or an object with 'content'")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e


def _read_json_object(path: Path) -> dict[str, Any]:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _pick_chat_template(value: Any, source: Path) -> str | None:
    """A chat template is a string, or a list of {name, template} of which "default" is the one used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                return str(entry["template"])
        return None
    raise ValueError(
        f"{source}: chat_template must be a string or a list of {{name, template}}, got {type(value).__name__}"
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; templates that contain it
    must still parse here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps, and so do we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> jinja2.Template:
    # The same environment transformers renders with (trim_blocks, lstrip_blocks, loop controls), so that
    # prompts are byte-identical; sandboxed because templates come with downloaded models.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _normalize_messages(conversation: Any) -> list[dict[str, Any]]:
    """Validate chat messages and flatten text-part content into a string.

    Keys whose value is None are dropped, as transformers does: OpenAI-style clients send
    `content: null` next to `tool_calls`, and templates test for a missing key.
    """
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)) or not conversation:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                        "only text content is supported"
                    )
                texts.append(part["text"])
            # Separate parts by a newline, as vLLM does: most templates concatenate content into the prompt.
            message["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append(message)
    return out


class Tokenizer:
    """A byte-level BPE (or SentencePiece-BPE) tokenizer with its special tokens and chat template."""

    def __init__(
        self,
        tokenizer: RustTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        """Prefer `from_hf_dir` / `from_gguf`. `vocab_size` overrides the Rust count (GGUF vocabularies
        may hold duplicate strings, which the Rust vocabulary map collapses)."""
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
        self.chat_template = chat_template
        self.vocab_size = vocab_size if vocab_size is not None else tokenizer.get_vocab_size(with_added_tokens=True)

        special_added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        named = (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
        self.all_special_ids: set[int] = set(special_added) | {i for i in named if i is not None}

        eos_ids = [self.eos_token_id] if self.eos_token_id is not None else []
        eos_ids += [i for i in extra_eos_token_ids if 0 <= i < self.vocab_size]
        if chat_template:
            eos_ids += sorted(i for i, s in special_added.items() if s in END_OF_TURN_TOKENS and s in chat_template)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))  # ordered, deduplicated
        self._template: jinja2.Template | None = None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, chat template files, `generation_config.json`)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            hint = " (only a SentencePiece tokenizer.model is there; kvmem needs tokenizer.json)" if (
                path / "tokenizer.model").exists() else ""
            raise FileNotFoundError(f"{tokenizer_file}: no such file{hint}")
        try:
            tok = RustTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{tokenizer_file}: cannot load tokenizer: {e}") from e

        config_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = _read_json_object(config_file) if config_file.is_file() else {}
        # Named and additional special tokens must be registered as special so that decode can skip them
        # (transformers does the same); only tokens the vocabulary already has, so no id is invented.
        listed = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        try:
            names = {k: _special_token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
            extras = [_special_token_str(t) for t in listed] if isinstance(listed, list) else []
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from e
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = [s for s in (*names.values(), *extras)
                   if s is not None and s not in added and tok.token_to_id(s) is not None]
        if missing:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(missing)])

        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:
            # No flag: keep what tokenizer.json's post-processor does (Llama 3 adds <|begin_of_text|> there).
            bos_id = tok.token_to_id(names["bos_token"]) if names["bos_token"] else None
            with_special = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id

        # transformers >= 4.43 saves the template next to tokenizer_config.json; that file wins.
        template: str | None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = _pick_chat_template(_read_json_object(path / "chat_template.json").get("chat_template"),
                                           path / "chat_template.json")
        else:
            template = _pick_chat_template(cfg.get("chat_template"), config_file)

        extra_eos: list[int] = []
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos = _read_json_object(gen_file).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]

        return cls(tok, **names, add_bos_token=add_bos, chat_template=template, extra_eos_token_ids=extra_eos)

    @classmethod
    def from_gguf(cls, reader_or_path: "GGUFReader | str | os.PathLike[str]") -> "Tokenizer":
        """Build from a GGUF file's `tokenizer.*` metadata (a path or an open `gguf.GGUFReader`)."""
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
        return cls(
            tok,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
            pad_token=token_at("tokenizer.ggml.padding_token_id"),
            unk_token=token_at("tokenizer.ggml.unknown_token_id"),
            add_bos_token=default_add_bos if add_bos is None else bool(add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            vocab_size=len(tokens),
        )

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when `add_special_tokens` and `add_bos_token`."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token:
            return [self.bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 at either end decodes to U+FFFD (the detokenizer waits those out)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (byte-level spelling, e.g. "Ġthe"), or None if out of range."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self, conversation: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `conversation` with the model's chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does. `extra` reaches the template (e.g. `tools`).

        Raises ValueError when the model has no template, the messages are malformed, or the template
        itself rejects the conversation (`raise_exception`).
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
        messages = _normalize_messages(conversation)
        if self._template is None:
            try:
                self._template = _compile_chat_template(self.chat_template)
            except jinja2.TemplateError as e:
                raise ValueError(f"the model's chat template does not compile: {e}") from e
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                    "pad_token": self.pad_token}
        context: dict[str, Any] = {"tools": None, "documents": None}
        context.update({k: v for k, v in specials.items() if v is not None})
        context.update(extra)  # caller's values win, as in transformers
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template rejected the messages: {e}") from e

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos_token={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})")


# -------------------------------------------------------------------- GGUF helpers


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
