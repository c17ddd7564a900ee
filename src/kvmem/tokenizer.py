"""Text <-> token ids, and chat messages -> prompt text.

`Tokenizer` wraps the Rust `tokenizers.Tokenizer`. It is built either from a Hugging Face model
directory (`tokenizer.json` + `tokenizer_config.json`; read by `kvmem.hf_tokenizer`) or from the
metadata of a GGUF file, which carries the vocabulary, the merges and the special token ids under
llama.cpp's key names but no `tokenizer.json` (rebuilt by `kvmem.gguf_tokenizer`). Chat templates
are rendered by `kvmem.chat_template`. transformers is never imported here: it takes seconds to
import and is only a test oracle.

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

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as RustTokenizer

from kvmem.chat_template import ChatTemplate
from kvmem.gguf_tokenizer import read_gguf
from kvmem.hf_tokenizer import read_hf_dir

if TYPE_CHECKING:
    from gguf import GGUFReader

__all__ = ["END_OF_TURN_TOKENS", "Tokenizer"]

# Special tokens that close an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma...).
# llama.cpp treats the same strings as end-of-generation tokens.
END_OF_TURN_TOKENS = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"}
)


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
        self._template: ChatTemplate | None = None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json`, chat template files, `generation_config.json`)."""
        tok, kwargs = read_hf_dir(path)
        return cls(tok, **kwargs)

    @classmethod
    def from_gguf(cls, reader_or_path: "GGUFReader | str | os.PathLike[str]") -> "Tokenizer":
        """Build from a GGUF file's `tokenizer.*` metadata (a path or an open `gguf.GGUFReader`)."""
        tok, kwargs = read_gguf(reader_or_path)
        return cls(tok, **kwargs)

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

    @property
    def backend(self) -> RustTokenizer:
        """The Rust tokenizer itself, for read-only use (a grammar compiler reads its vocabulary)."""
        return self._tok

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
        if self._template is None:
            self._template = ChatTemplate(self.chat_template)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                    "pad_token": self.pad_token}
        return self._template.render(conversation, add_generation_prompt, specials, extra)

    def set_chat_template(self, template: str) -> None:
        """Use `template` instead of the model's chat template (`--chat-template`); the end-of-turn
        special tokens it writes end generation too, as for a model's own template."""
        self.chat_template = template
        self._template = None
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        turn_ends = sorted(i for s, i in special.items() if s in END_OF_TURN_TOKENS and s in template)
        self.eos_token_ids = list(dict.fromkeys(self.eos_token_ids + turn_ends))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos_token={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})")
