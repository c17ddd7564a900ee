"""A tokenizer from a Hugging Face model directory: `tokenizer.json` and the files beside it.

`read_hf_dir(path)` returns the Rust tokenizer and the keyword arguments of `kvmem.tokenizer.Tokenizer`:
the named special tokens from `tokenizer_config.json` (registered as special when the vocabulary has
them, so decode can skip them, as transformers does), `add_bos_token` (the config's flag, else what
`tokenizer.json`'s post-processor does), the chat template (`chat_template.jinja`, then
`chat_template.json`, then the config's own), and the extra EOS ids of `generation_config.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

__all__ = ["read_hf_dir"]


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


def read_hf_dir(path: str | os.PathLike[str]) -> tuple[RustTokenizer, dict[str, Any]]:
    """Load `tokenizer.json` (+ `tokenizer_config.json`, chat template files, `generation_config.json`);
    returns the Rust tokenizer and `Tokenizer`'s keyword arguments."""
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

    return tok, {**names, "add_bos_token": add_bos, "chat_template": template, "extra_eos_token_ids": extra_eos}
