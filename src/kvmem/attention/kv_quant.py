"""Quantized KV-cache formats (`kv_cache_dtype`, vLLM's names): how K,V are stored and read back.

- `auto`: the model's dtype; nothing here applies.
- `fp8` / `fp8_e4m3` (float8_e4m3fn) and `fp8_e5m2` (float8_e5m2): one byte per element, with
  vLLM's default per-tensor scale of 1.0 and values clamped to the format's range (x = stored * 1.0).
  Why a fixed scale and not one computed from the data: a scale taken from the first write (or a
  running maximum) would make a request's tokens depend on which requests happened to come first,
  and greedy output must not depend on what else ran. vLLM without calibrated scales does the same.
  Keys and values stay far inside e4m3's +-448 (SmolLM2-135M in float32 on the text in
  benchmarks/data: |K| up to 22, |V| up to 13; 2% of elements below e4m3's smallest normal, 2^-6),
  so the cost is the 3 (e4m3) or 2 (e5m2) mantissa bits, measured in docs/benchmarks.md.
- `int8`: one byte per element plus a float32 scale per (token, KV head): symmetric absmax,
  x = stored * scale with scale = max|x| / 127 over the head's `head_dim` elements. The scales live
  beside the blocks in tensors of the blocks' addressing, `[kv_heads, num_blocks, block_size]`, so
  every block copy (copy-on-write, tier moves) copies them too. A token's scale depends on that
  token alone: batch invariant.

Bytes per token and KV head: head_dim (fp8) or head_dim + 4 (int8), against 2 * head_dim (bf16) or
4 * head_dim (fp32): with head_dim 64, 1.88x (int8) and 2x (fp8) the tokens of bf16 per byte.

Attention reads the stored bytes in place and widens them block by block (`dequantize`); no
full-precision copy of the cache is made.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")

_STORAGE = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
            "int8": torch.int8}
QUANTIZED_DTYPES = frozenset(_STORAGE.values())
FP8_SCALE = 1.0  # vLLM's default k_scale / v_scale without calibration (see the module docstring)
INT8_MAX = 127.0
SCALE_DTYPE = torch.float32  # int8's per-(token, head) scales


def check_kv_cache_dtype(name: str) -> str:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type the cache stores for `kv_cache_dtype` ('auto': the model's)."""
    check_kv_cache_dtype(kv_cache_dtype)
    return model_dtype if kv_cache_dtype == "auto" else _STORAGE[kv_cache_dtype]


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QUANTIZED_DTYPES


def has_token_scales(dtype: torch.dtype) -> bool:
    """Whether the stored format carries a scale per (token, KV head) beside the blocks."""
    return dtype == torch.int8


def scale_bytes_per_head_token(dtype: torch.dtype) -> int:
    return SCALE_DTYPE.itemsize if has_token_scales(dtype) else 0


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` [..., head_dim] in the model's dtype -> (stored [..., head_dim] in `dtype`, scales [...]
    float32 for int8, else None)."""
    if dtype == torch.int8:
        xf = x.float()
        scale = xf.abs().amax(dim=-1).div_(INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        stored = torch.round(xf / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return stored, scale
    limit = torch.finfo(dtype).max
    return (x.float() / FP8_SCALE).clamp_(-limit, limit).to(dtype), None


def dequantize(stored: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The values `stored` (and `scales`, int8) hold, in `dtype`: written into `out` when given."""
    if stored.dtype == torch.int8:
        value = stored.to(torch.float32).mul_(scales[..., None])
    else:
        value = stored.to(torch.float32)
        if FP8_SCALE != 1.0:
            value.mul_(FP8_SCALE)
    if out is None:
        return value.to(dtype)
    return out.copy_(value)


def round_trip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What reading `x` back from a cache of `dtype` gives (attention over this step's own tokens
    uses it, so that a token reads the same whether it was written this step or an earlier one)."""
    if not is_quantized(dtype):
        return x
    stored, scales = quantize(x, dtype)
    return dequantize(stored, scales, x.dtype)


def write_quantized(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scales: torch.Tensor | None,
                    v_scales: torch.Tensor | None) -> None:
    """Quantize this step's K,V ([T, kv_heads, dim]) into flat slots of the caches (and their scales)."""
    num_kv_heads, _, _, dim = k_cache.shape
    for x, cache, scales in ((k, k_cache, k_scales), (v, v_cache, v_scales)):
        stored, s = quantize(x, cache.dtype)
        # index_copy_ has no float8 kernel: copy the bytes (a layer cache may be a strided view of
        # the whole cache, so flatten per head where the layout allows, else per head and block).
        _scatter_rows(cache.view(torch.uint8), stored.view(torch.uint8).transpose(0, 1), slot_mapping)
        if s is not None:
            _scatter_rows(scales.unsqueeze(-1), s.transpose(0, 1).unsqueeze(-1), slot_mapping)


def _scatter_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache [heads, blocks, block_size, d] (any strides); rows [heads, T, d] -> flat slots."""
    heads, blocks, block_size, d = cache.shape
    if cache.stride(1) == block_size * cache.stride(2):  # blocks follow one another: one flat index
        cache.view(heads, blocks * block_size, d).index_copy_(1, slot_mapping, rows)
        return
    cache[:, slot_mapping // block_size, slot_mapping % block_size] = rows
