"""The decoder layer's small operations: RMSNorm (with the residual add before it), SwiGLU's
silu(gate) * up, and RoPE.

On the CPU each goes to one native pass (`kvmem.attention.cpu_kernels`, csrc/cpu_fused.cpp) instead
of 4-8 torch ops: at a decode step of 64 sequences those ops cost more in dispatch and OpenMP
fork-joins than in arithmetic. Everywhere else (CUDA, no C++ toolchain, KVMEM_CPU_KERNELS=0) the
torch versions below run; they are also the reference the native ones are tested against. Both
round to the model's dtype at the same points, the points HF's Llama rounds at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmem.attention import cpu_kernels


def _native(x: torch.Tensor):
    """The native module for a CPU tensor, else None."""
    return cpu_kernels.load() if x.device.type == "cpu" else None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32, cast back, then scale: the order HF uses (it matters in bf16).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    native = _native(x)
    if native is None or x.dim() != 2 or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps)
    return native.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = residual + x. The native path adds into `residual` in place, so the
    caller must own it (the layer's running hidden state)."""
    native = _native(x)
    if native is None or x.dim() != 2 or weight.dtype != x.dtype or not residual.is_contiguous():
        h = residual + x
        return h, rms_norm_reference(h, weight, eps)
    return residual, native.add_rms_norm_(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [rows, 2 * intermediate] projection (gate first)."""
    native = _native(gate_up)
    if native is None or gate_up.dim() != 2:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return native.silu_mul(gate_up)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by its token's angle; cos, signed_sin [T, 1, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x in place (it may be a view into a larger tensor, such as the q,k,v projection's
    output) and return it."""
    native = _native(x)
    if native is None or x.dim() != 3 or cos.dtype != x.dtype:
        x.copy_(apply_rope_reference(x, cos, signed_sin))
        return x
    native.rope_(x, cos.reshape(cos.shape[0], -1), signed_sin.reshape(signed_sin.shape[0], -1))
    return x
