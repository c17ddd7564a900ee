"""The correctness oracle: Hugging Face transformers in float32 on the same weights, and tiny random
model directories the tests build themselves (never a hub download)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from kvmem.models.loader import default_model_path


@lru_cache(maxsize=1)
def hf_default_model():
    """transformers' own GGUF loader on the embedded SmolLM2 file: dequantized independently of ours."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers; min_new_tokens = max_new_tokens (EOS masked), matching
    SamplingParams(temperature=0, min_tokens=N, max_tokens=N)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def _tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE trained on a few sentences, saved in the Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "Paged attention keeps KV in blocks.",
              "Hello, world! 12345 café 日本 🙂", "Memory is the bottleneck of LLM serving."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(directory)


def make_tiny_model(directory: Path, kind: str) -> Path:
    """kind: "llama-mha" | "llama3-gqa" (llama3 rope scaling) | "qwen2-bias" | "llama-mqa6". Weights drawn with a
    large init range so that logits are peaked and greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=512, initializer_range=0.2, bos_token_id=0, eos_token_id=1)
    if kind == "llama-mha":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **common)
        cls = LlamaForCausalLM
    elif kind == "llama3-gqa":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             rope_theta=500000.0, **common)
        cls = LlamaForCausalLM
    elif kind == "qwen2-bias":
        config = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common)
        cls = Qwen2ForCausalLM
    elif kind == "llama-mqa6":  # 6 heads, 1 KV head: splits over 2 and 3 ranks, its KV head replicated
        config = LlamaConfig(num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
                             **{**common, "hidden_size": 96, "intermediate_size": 192})
        cls = LlamaForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed({"llama-mha": 1, "llama3-gqa": 2, "qwen2-bias": 3, "llama-mqa6": 4}[kind])
    model = cls(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    _tiny_tokenizer(directory)
    saved = json.loads((directory / "config.json").read_text())
    assert saved.get("architectures"), saved
    return directory
