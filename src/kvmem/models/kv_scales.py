"""Per-tensor fp8 KV-cache scales carried by a checkpoint, read as vLLM reads them.

Checkpoints quantized by llm-compressor (compressed-tensors) or NVIDIA ModelOpt carry, per layer, a
scalar `k_scale` and `v_scale` calibrated for an fp8 e4m3 KV cache: K is stored as fp8(k / k_scale)
and read back as stored * k_scale (likewise V). The names vLLM accepts
(`maybe_remap_kv_scale_name` in its weight_utils), for layer N:

- `model.layers.N.self_attn.k_scale`, `...self_attn.v_scale` (llm-compressor);
- `model.layers.N.self_attn.k_proj.k_scale`, `...self_attn.v_proj.v_scale` (ModelOpt);
- `model.layers.N.self_attn.attn.k_scale`, `...attn.v_scale` (vLLM's own parameter names);
- `model.layers.N.self_attn.kv_scale` (deprecated: one scale for K and V).

How kvmem uses them (`kv_cache_dtype`):
- `fp8` / `fp8_e4m3`: used instead of the fixed scale 1.0, for every layer. They are folded into the
  attention projections as the weights are loaded: W_q * k_scale, W_k / k_scale, W_v / v_scale,
  W_o * v_scale (biases with their weights). Then the cache holds fp8(k / k_scale) and
  fp8(v / v_scale) with scale 1.0, q . k/k_scale * k_scale = q . k and o_proj(sum p v/v_scale *
  v_scale) = o_proj(sum p v): vLLM's arithmetic in exact terms (RoPE is linear, so it commutes with
  the scaling), with nothing to change in any attention backend, strategy, tier or tensor-parallel
  rank. The only difference is rounding: the scaled weights are rounded to the model's dtype once.
- `fp8_e5m2`: refused, as vLLM does ("fp8_e5m2 kv-cache is not supported with fp8 checkpoints"):
  the scales were calibrated for e4m3's range.
- `int8`: not used, and said at load: int8 computes its own scale per (token, KV head).
- `auto`: not used (the model's dtype needs no scale).

Refused with a ValueError naming the tensor or `kv_cache_dtype`: scales for another model (a layer
the model does not have, or layers without their K or V scale), non-scalar scales, zero, negative
or non-finite values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# layer, then the kind of scale (k, v or kv) from whichever of vLLM's spellings matched
SCALE_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:(k|v|kv)_scale|attn\.(k|v)_scale|"
                        r"k_proj\.(k)_scale|v_proj\.(v)_scale)$")
USING_KV_DTYPES = ("fp8", "fp8_e4m3")


def is_scale_name(name: str) -> bool:
    return SCALE_NAME.match(name) is not None


@dataclass(frozen=True)
class KVScales:
    """One K and one V scale per layer (index = layer), and the checkpoint names they came from."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    names: tuple[str, ...]

    def describe(self) -> str:
        return (f"the checkpoint's per-tensor k_scale/v_scale for all {len(self.k)} layers "
                f"(k {min(self.k):.4g}-{max(self.k):.4g}, v {min(self.v):.4g}-{max(self.v):.4g}; "
                f"e.g. {self.names[0]}), folded into the q/k/v/o projections")


def parse_kv_scales(tensors: dict[str, torch.Tensor], num_layers: int) -> KVScales:
    """Check the scale tensors of a checkpoint (name -> tensor, names matching SCALE_NAME) against a
    model of `num_layers` layers; raise a ValueError naming what is wrong."""
    k: dict[int, tuple[float, str]] = {}
    v: dict[int, tuple[float, str]] = {}
    for name, tensor in sorted(tensors.items()):
        match = SCALE_NAME.match(name)
        if match is None:
            raise ValueError(f"{name}: not a KV-cache scale name")
        layer = int(match.group(1))
        kind = next(g for g in match.groups()[1:] if g is not None)
        if tensor.numel() != 1:
            raise ValueError(f"{name}: kvmem reads per-tensor KV scales (one number), this one has shape "
                             f"{list(tensor.shape)}")
        value = float(tensor.reshape(()).to(torch.float64))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} is {value}: a KV-cache scale must be finite and > 0")
        if layer >= num_layers:
            raise ValueError(f"{name}: the model has {num_layers} layers (0-{num_layers - 1}); these KV scales "
                             "are for another model")
        for which, into in (("k", k), ("v", v)):
            if kind in (which, "kv"):
                if layer in into:
                    raise ValueError(f"{name}: layer {layer} has two {which}_scale tensors "
                                     f"({into[layer][1]} and {name})")
                into[layer] = (value, name)
    for which, found in (("k_scale", k), ("v_scale", v)):
        missing = [i for i in range(num_layers) if i not in found]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"model.layers.N.self_attn.{which}: the checkpoint's KV scales lack layer(s) {shown} "
                             f"of {num_layers}; scales for another model, or an incomplete checkpoint")
    return KVScales(tuple(k[i][0] for i in range(num_layers)), tuple(v[i][0] for i in range(num_layers)),
                    tuple(sorted({name for _, name in k.values()} | {name for _, name in v.values()})))


def resolve(tensors: dict[str, torch.Tensor], num_layers: int, kv_cache_dtype: str) -> tuple[KVScales | None, str | None]:
    """The scales to use for `kv_cache_dtype` (None where none apply) and what to tell the user (None
    where the checkpoint has none)."""
    if not tensors:
        return None, None
    if kv_cache_dtype == "fp8_e5m2":
        raise ValueError("kv_cache_dtype='fp8_e5m2' cannot use this checkpoint's KV scales (k_scale/v_scale, "
                         "calibrated for fp8 e4m3, as in vLLM, which refuses the same); use kv_cache_dtype='fp8'")
    if kv_cache_dtype in USING_KV_DTYPES:
        scales = parse_kv_scales(tensors, num_layers)
        return scales, f"KV cache scales: {scales.describe()}"
    if kv_cache_dtype == "int8":
        return None, ("KV cache scales: the checkpoint's fp8 k_scale/v_scale are not used: int8 computes its own "
                      "scale per (token, KV head)")
    return None, f"KV cache scales: the checkpoint's fp8 k_scale/v_scale are not used (kv_cache_dtype={kv_cache_dtype})"


def _layer_part(name: str) -> tuple[int, str] | None:
    match = re.match(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$", name)
    return None if match is None else (int(match.group(1)), match.group(2))


def fold(weights: Iterator[tuple[str, torch.Tensor]], scales: KVScales) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's weights with the KV scales folded into the attention projections (module
    docstring), computed in float32; the model casts them to its dtype as it loads them."""
    for name, tensor in weights:
        part = _layer_part(name)
        if part is not None:
            layer, proj = part
            wide = tensor.to(torch.float32)
            tensor = {"q": lambda: wide * scales.k[layer], "k": lambda: wide / scales.k[layer],
                      "v": lambda: wide / scales.v[layer], "o": lambda: wide * scales.v[layer]}[proj]()
        yield name, tensor


def weights_with_scales(weights: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                        scales: KVScales | None) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
    return weights if scales is None else (lambda: fold(weights(), scales))
