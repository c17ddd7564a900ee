"""Load a GGUF file (llama.cpp's format): config and tokenizer from its metadata, weights dequantized
(or, for `--quantization gguf|auto`, the Q8_0/Q4_x/Q5_x/Q4_K/Q5_K/Q6_K ones kept in their blocks:
`quantized_weights`).

Tensors are renamed to Hugging Face Llama names and dequantized to float32 with the `gguf` package.
Two llama.cpp conventions are undone on the way:

* shapes: GGUF lists dimensions innermost first (`[in, out]`); numpy/torch want `(out, in)`.
* the Q/K row order: for the llama architecture, llama.cpp's converter permutes the rows of
  `q_proj`/`k_proj` so that each head's rotary pairs sit next to each other (its RoPE rotates
  adjacent elements; Hugging Face's rotates the two halves of a head). Qwen2 files are not permuted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from kvmem.models.config import ModelConfig, RopeScaling
from kvmem.models.gguf_blocks import FORMATS, QuantizedTensor
from kvmem.gguf_metadata import GGUFMetadata
from kvmem.models.source import ModelSource
from kvmem.tokenizer import Tokenizer

__all__ = ["config_from_gguf", "dequantize_tensor", "hf_tensor_name", "load_gguf", "open_gguf"]

# GGUF `general.architecture` -> the Hugging Face architecture kvmem runs it as.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Architectures whose converter permuted the Q/K rows (see the module docstring).
_PERMUTED_QK = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Llama 3's original context, the default llama.cpp also assumes when a file does not say.
_LLAMA3_ORIGINAL_CONTEXT = 8192


def served_name(path: Path) -> str:
    """The name to serve a GGUF under: its file name without the quantization label
    ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"). `general.name` is often a
    training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2"), not what users call the model."""
    return re.sub(r"[.-](?:[IQ]\d\w*|F16|F32|BF16)$", "", path.stem, flags=re.IGNORECASE) or path.stem


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors the model does not load (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _gguf_tensor_name(hf_name: str) -> str:
    """Inverse of `hf_tensor_name`, for error messages that name what the file lacks."""
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    for gguf_suffix, suffix in _BLOCK_NAMES.items():
        if m and m.group(2) == suffix:
            return f"blk.{m.group(1)}.{gguf_suffix}"
    return hf_name


def open_gguf(path: Path) -> GGUFReader:
    """Open (memory-map) a GGUF file, turning the reader's low-level errors into one that names the file."""
    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # ValueError (bad magic, short buffer), IndexError, struct.error, ...
        raise ValueError(f"{path}: not a valid GGUF file (corrupt or truncated?): {e}") from e


def dequantize_tensor(tensor: ReaderTensor, path: Path | str = "<gguf>") -> np.ndarray:
    """A GGUF tensor as float32 in numpy/torch dimension order (outermost first)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} uses quantization {tensor.tensor_type.name}, which the gguf "
            "package cannot dequantize"
        ) from None
    values = values.reshape(shape)
    # F32 tensors come back as views of the read-only memory map; torch wants memory it may write.
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32, copy=True)
    return values


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: `w.reshape(n_head, 2, rows//n_head//2, ...).swapaxes(1, 2)`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores in `rope_freqs.weight` for Llama 3 scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    original = s.original_max_position_embeddings
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    middle = 1 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen > original / s.low_freq_factor, s.factor, middle)
    return np.where(wavelen < original / s.high_freq_factor, 1.0, out)


def _rope_scaling(meta: GGUFMetadata, arch: str, theta: float, head_dim: int, rope_freqs: ReaderTensor | None) -> RopeScaling:
    """RoPE scaling from `{arch}.rope.scaling.*` keys and/or the `rope_freqs.weight` tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind not in (None, "none", "llama3") and not (factor is not None and float(factor) == 1.0):
        raise ValueError(
            f"{meta.source}: RoPE scaling type {kind!r} (factor {factor}) is not supported; "
            "kvmem supports none and llama3"
        )
    if rope_freqs is None:
        return RopeScaling()

    # Llama 3 files store the scaling as one divisor per rotary frequency. They depend only on
    # original_context/low_freq_factor and original_context/high_freq_factor, so with the original
    # context fixed (the file's, else Llama 3's 8192) the two factors follow from the ramp between.
    factors = dequantize_tensor(rope_freqs, meta.source).astype(np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ValueError(f"{meta.source}: rope_freqs.weight has {factors.shape[0]} values, expected {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return RopeScaling()
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length") or _LLAMA3_ORIGINAL_CONTEXT)
    top = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original / wavelen  # the ramp is linear in this: s = (x - low) / (high - low)
    ramp = (factors > 1.0 + 1e-6) & (factors < top - 1e-6)
    s = (1 / factors - 1 / top) / (1 - 1 / top)
    if ramp.sum() >= 2:
        slope, intercept = np.polyfit(x[ramp], s[ramp], 1)
        low = -intercept / slope
        high = low + 1 / slope
    elif ramp.sum() == 1:
        # One point fixes one relation; take Llama 3's ramp width (high - low = 3) for the other.
        low = float(x[ramp][0] - 3.0 * s[ramp][0])
        high = low + 3.0
    else:
        # A step with no frequency on the ramp: put a narrow ramp in the gap between the two plateaus.
        unscaled, scaled = x[factors <= 1.0 + 1e-6], x[factors >= top - 1e-6]
        gap = math.sqrt(unscaled.min() * scaled.max()) if len(unscaled) and len(scaled) else 1.0
        low, high = gap / 1.01, gap * 1.01
    scaling = RopeScaling("llama3", factor=round(top, 4), low_freq_factor=round(low, 4),
                          high_freq_factor=round(high, 4), original_max_position_embeddings=original)
    if not np.allclose(_llama3_factors(theta, head_dim, scaling), factors, rtol=1e-3, atol=1e-4):
        raise ValueError(
            f"{meta.source}: rope_freqs.weight does not follow Llama 3 RoPE scaling; kvmem cannot run this model's "
            "RoPE frequencies"
        )
    return scaling


def config_from_gguf(reader: GGUFReader, path: Path) -> ModelConfig:
    """`ModelConfig` from GGUF metadata (and tensor shapes, which are authoritative for the weights)."""
    meta = GGUFMetadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; kvmem serves {', '.join(sorted(_ARCHITECTURES))}"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")

    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.per_model(f"{arch}.attention.head_count") or 0)
    if heads <= 0:
        raise ValueError(f"{path}: GGUF metadata has no {arch}.attention.head_count")
    kv_heads = int(meta.per_model(f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // heads)
    ffn = int(meta.per_model(f"{arch}.feed_forward_length") or 0)
    if not ffn and "blk.0.ffn_gate.weight" in tensors:
        ffn = int(tensors["blk.0.ffn_gate.weight"].shape[-1])
    if not ffn:
        raise ValueError(f"{path}: GGUF metadata has no {arch}.feed_forward_length")
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(meta, arch, theta, head_dim, tensors.get("rope_freqs.weight"))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            architecture=_ARCHITECTURES[arch],
            # The embedding's row count, not the token list's length: the weights are what must fit.
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=int(meta.require(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            bos_token_id=bos,
            eos_token_ids=[eos] if eos is not None else [],
            torch_dtype="float32",  # what dequantization produces
            name=served_name(path),
        )
    except ValueError as e:  # ModelConfig's own checks (e.g. heads not a multiple of kv heads)
        raise ValueError(f"{path}: {e}") from e


def _weights(reader: GGUFReader, config: ModelConfig, path: Path,
             keep_quantized: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
    """(HF name, tensor) pairs: dequantized to float32, or for names in `keep_quantized`, the file's
    blocks as they are (a `QuantizedTensor`; rows of blocks permute like rows of values)."""
    unpermute = reader.fields["general.architecture"].contents() in _PERMUTED_QK
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        if name in keep_quantized:
            values = np.array(tensor.data, dtype=np.uint8)  # [rows, row bytes], copied out of the mmap
            in_features = int(tensor.shape[0])
        else:
            values = dequantize_tensor(tensor, path)
        if unpermute and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            values = _unpermute_rows(values, config.num_attention_heads)
        elif unpermute and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            values = _unpermute_rows(values, config.num_key_value_heads)
        values = torch.from_numpy(np.ascontiguousarray(values))
        yield name, QuantizedTensor(values, int(tensor.tensor_type), in_features) if name in keep_quantized else values


def quantized_types(reader: GGUFReader) -> dict[str, int]:
    """HF name -> GGML type id of the 2-D weights stored in a format kvmem keeps quantized (and whose
    rows are whole blocks of it; any other is dequantized at load)."""
    return {name: int(t.tensor_type) for t in reader.tensors
            if (name := hf_tensor_name(t.name)) is not None and int(t.tensor_type) in FORMATS and len(t.shape) == 2
            and FORMATS[int(t.tensor_type)].fits(int(t.shape[0]))}


def load_gguf(path: Path) -> ModelSource:
    """Config, tokenizer and a lazy weight iterator for a `.gguf` file."""
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tokenizer = Tokenizer.from_gguf(reader)
    present = {hf_tensor_name(t.name): t.name for t in reader.tensors}
    missing = [_gguf_tensor_name(n) for n in config.weight_names() if n not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    # The reader memory-maps the file, so each weights() pass reads tensors from it on demand.
    return ModelSource(config=config, tokenizer=tokenizer, weights=lambda: _weights(reader, config, path), path=path,
                       quantized_types=quantized_types(reader),
                       quantized_weights=lambda names: _weights(reader, config, path, frozenset(names)))
