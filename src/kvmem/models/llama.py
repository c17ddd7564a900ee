"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

Each layer: h = x + o_proj(attn(rope(q), rope(k), v)) with q,k,v = qkv_proj(rmsnorm(x));
out = h + down(silu(gate(rmsnorm(h))) * up(rmsnorm(h))). The operations and their dtypes follow
Hugging Face's implementation step by step, so float32 results agree with it to rounding.

The model holds no KV: each layer writes its K,V into the memory manager's cache for that layer and
attends through the backend the runner chose (`kvmem.attention`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kvmem.attention.metadata import AttentionMetadata
from kvmem.models import fused
from kvmem.models.config import ModelConfig, RopeScaling
from kvmem.models.gguf_blocks import QuantizedTensor
from kvmem.models.quantized_embedding import QuantizedEmbedding
from kvmem.models.quantized_linear import QuantizedConcatLinear, QuantizedLinear

AttentionFn = Callable[..., torch.Tensor]
LayerCache = tuple[torch.Tensor, ...]  # (K, V), or (K, V, K scales, V scales) for an int8 cache
RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, signed sin) of this step's positions


def _mkldnn_op(name: str):
    """The op's one overload, looked up once (resolving `torch.ops.mkldnn.<name>` on every call costs
    more than a small GEMM's dispatch); None in builds without oneDNN."""
    packet = getattr(torch.ops.mkldnn, name, None) if torch.backends.mkldnn.is_available() else None
    return getattr(packet, "default", None)


_linear_pointwise = _mkldnn_op("_linear_pointwise")
_reorder_linear_weight = _mkldnn_op("_reorder_linear_weight")


class OneDNNLinear(nn.Module):
    """A frozen nn.Linear whose weight oneDNN has reordered once into its blocked layout for GEMMs
    (the layout torch.compile's CPU freezing uses). Input and output stay ordinary dense tensors."""

    # The row count oneDNN tunes the layout for; any count works. 64 is a decode step of 64 sequences.
    batch_hint = 64

    def __init__(self, linear: nn.Linear, batch_invariant: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.register_buffer("weight", _reorder_linear_weight(weight, self.batch_hint),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        # Whether a lone row must go through the GEMM (see forward): only where oneDNN's single-row
        # kernel adds in another order than its GEMM for this shape, as measured here once.
        self.pad_lone_row = batch_invariant and not _lone_row_matches_gemm(
            self.weight, linear.in_features, linear.out_features, weight.dtype)

    @staticmethod
    def available(dtype: torch.dtype) -> bool:
        return (dtype in (torch.float32, torch.bfloat16) and _linear_pointwise is not None
                and _reorder_linear_weight is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_linear(x, self.weight, self.bias, self.pad_lone_row)

    def kernel(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(_onednn_linear, weight=self.weight, bias=self.bias, pad_lone_row=self.pad_lone_row)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   pad_lone_row: bool) -> torch.Tensor:
    if pad_lone_row and x.dim() == 2 and x.shape[0] == 1:
        # oneDNN may compute a lone row with another kernel than a GEMM of 2 or more rows, and
        # the two round differently (SmolLM2's bfloat16 down_proj, K = 1536: 88 of 1,100 rows
        # differ), so a greedy answer changed with the number of requests running beside it.
        # From 2 rows on, a row's result does not depend on the others (checked for 2 to 4,096
        # rows on every SmolLM2 layer shape), so a lone row goes in twice (a stride-0 view, no
        # copy); the 2-row GEMM costs ~8 us more than the single-row kernel (docs/benchmarks.md).
        return _linear_pointwise(x.expand(2, -1), weight, bias, "none", [None], "")[:1]
    return _linear_pointwise(x, weight, bias, "none", [None], "")


_lone_row_checks: dict[tuple, bool] = {}


def _lone_row_matches_gemm(packed_weight: torch.Tensor, in_features: int, out_features: int,
                           dtype: torch.dtype, rows: int = 128) -> bool:
    """Whether oneDNN gives a row computed alone exactly what it gives that row inside a GEMM, for
    this shape and dtype with this process's threads. Either both add in one order, and every row is
    bit-identical, or they do not, and a few percent of random rows differ (8 % for the shape above,
    so 128 rows all agreeing by chance has odds of 2e-5). Measured once per shape, stopping at the
    first difference: a lone row costs one read of the weights (SmolLM2: ~0.15 s in all; a 7B
    model's five shapes: a few seconds)."""
    key = (in_features, out_features, dtype, torch.get_num_threads())
    if key not in _lone_row_checks:
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        batched = _linear_pointwise(x, packed_weight, None, "none", [None], "")
        _lone_row_checks[key] = all(
            torch.equal(_linear_pointwise(x[r:r + 1], packed_weight, None, "none", [None], "")[0], batched[r])
            for r in range(rows))
    return _lone_row_checks[key]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the running `residual`, (h, norm(h)) for h = residual + x, the residual
        add fused into the norm (vLLM's convention). `residual` may be updated in place."""
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once in float32 (as HF does) then cast.

    HF rotates with `x * cos + rotate_half(x) * sin`, rotate_half(x) = [-x2, x1]. Here the sign sits in
    the table instead: [-x2, x1] * [s1, s2] = [x2, x1] * [-s1, s2] bit for bit (negation is exact),
    which saves a negation per call.
    """

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = config.head_dim // 2
        signed_sin = emb.sin()
        signed_sin[:, :half].neg_()
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("signed_sin", signed_sin.to(dtype), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) rows for `positions`, shaped [T, 1, head_dim]: looked up once per
        forward pass and shared by every layer."""
        return self.cos[positions][:, None, :], self.signed_sin[positions][:, None, :]


class Attention(nn.Module):
    """The attention block's weights and shapes; `decoder_layer` runs it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one GEMM: one pass over the activations instead of three.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5


class MLP(nn.Module):
    """SwiGLU's weights, gate and up fused in one projection; `decoder_layer` runs it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


Linear = Callable[[torch.Tensor], torch.Tensor]


def direct_call(module: nn.Module) -> Linear:
    """`module(x)` without nn.Module's call machinery. A batch-1 decode step makes ~150 module calls;
    the hook checks and `__getattr__` lookups around each cost about as much as the small kernels
    they wrap (~0.6 ms of a ~5 ms step). A module with a `kernel()` hands out its computation with
    its weights bound; any other runs its own `forward`."""
    kernel = getattr(module, "kernel", None)
    return kernel() if kernel is not None else module.forward


@dataclass(frozen=True, slots=True)
class LayerOps:
    """One decoder layer as plain callables and the tensors they read: what `decoder_layer` runs.
    The tensors are the module's own parameter objects, so weights copied or re-pinned in place are
    seen; a module replaced afterwards is not (`LlamaForCausalLM.reset_direct_calls`)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    eps: float
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


def decoder_layer(ops: LayerOps, x: torch.Tensor, rope: RopeTables, cache: LayerCache, meta: AttentionMetadata,
                  attention: AttentionFn, capture: Callable[[torch.Tensor], None] | None = None,
                  residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer. Returns (mlp output, residual): the layer's output is their sum, which the next
    norm adds as it normalises (vLLM's convention). `residual` None: x is the first layer's input
    (the embeddings, which the layer then owns and updates in place).

    `capture`, if given, receives the normed input of the q,k,v projection: the activation from
    which the hybrid cache recomputes K,V (`kvmem.hybrid.recompute`)."""
    if residual is None:
        residual, a = x, fused.rms_norm(x, ops.input_norm, ops.eps)
    else:
        residual, a = fused.add_rms_norm(x, residual, ops.input_norm, ops.eps)
    if capture is not None:
        capture(a)
    # Attention: q and k sit side by side in each row of the projection's output; they are rotated
    # as one [T, heads + kv_heads, dim] tensor, in place.
    heads, kv_heads, dim = ops.num_heads, ops.num_kv_heads, ops.head_dim
    qkv = ops.qkv(a)
    qk = fused.apply_rope_(qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim), *rope)
    v = qkv[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
    # cache[2:]: an int8 cache's (K scales, V scales), which the backend reads with it.
    out = attention(qk[:, :heads], qk[:, heads:], v, cache[0], cache[1], meta, ops.scale, *cache[2:])
    residual, b = fused.add_rms_norm(ops.o(out.reshape(-1, heads * dim)), residual, ops.post_attention_norm,
                                     ops.eps)
    # MLP: down(silu(gate(b)) * up(b)).
    return ops.down(fused.silu_mul(ops.gate_up(b))), residual


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def ops(self) -> LayerOps:
        attn = self.self_attn
        return LayerOps(self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps,
                        direct_call(attn.qkv_proj), direct_call(attn.o_proj), direct_call(self.mlp.gate_up_proj),
                        direct_call(self.mlp.down_proj), attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: LayerCache, meta: AttentionMetadata,
                attention: AttentionFn, capture: Callable[[torch.Tensor], None] | None = None,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`decoder_layer` over this module's current weights (see there)."""
        return decoder_layer(self.ops(), x, rope, cache, meta, attention, capture, residual)


class LayerHooks(Protocol):
    """A runner's way into the forward pass, layer by layer (the hybrid runner: weights streamed from
    host memory, activations kept for the host tier). Attention needs no hook: `attention` and its
    `meta`, which the model only hands on, already belong to the runner."""

    capture: Callable[[torch.Tensor], None] | None  # receives each layer's normed q,k,v input

    def before_layer(self, j: int) -> DecoderLayer:
        """The module holding layer j's weights, ready to run (streamed weights: once copied in)."""

    def after_layer(self, j: int) -> None:
        """Layer j has run (on a GPU: its work is queued)."""


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config, max_positions, dtype)
        # The layers' computations bound once (see `direct_call`); the first forward pass binds them.
        self._direct_calls: tuple[list[LayerOps], Linear] | None = None

    @classmethod
    def build(cls, config: ModelConfig, max_positions: int, dtype: torch.dtype,
              device: torch.device, quantized: dict[str, int] | None = None) -> "LlamaForCausalLM":
        """An uninitialised model in `dtype` on `device`, ready for `load_weights`: parameters are
        created on the meta device (no random init, no float32 copy), then materialised empty.
        `quantized` (see `quantized_plan`): the layers whose weights stay in GGUF blocks, which are
        allocated at their quantized size and never at full width."""
        with torch.device("meta"):
            model = cls(config, max_positions, dtype)
        for module_path, type_id in cls._quantized_modules(config, quantized or {}).items():
            parent_path, _, leaf = module_path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, leaf)
            if isinstance(old, nn.Embedding):
                new = QuantizedEmbedding(old.num_embeddings, old.embedding_dim, type_id, dtype)
            elif isinstance(type_id, tuple):  # a fused module whose parts are stored in different types
                new = QuantizedConcatLinear(old.in_features, cls._part_features(config, leaf), type_id,
                                            bias=old.bias is not None, dtype=dtype)
            else:
                new = QuantizedLinear(old.in_features, old.out_features, type_id, bias=old.bias is not None,
                                      dtype=dtype)
            setattr(parent, leaf, new)
        model = model.to_empty(device=device).to(dtype)
        if isinstance(model.embed_tokens, QuantizedEmbedding) and config.tie_word_embeddings:
            e = model.embed_tokens  # the tied lm_head reads the embedding's blocks
            model.lm_head = QuantizedLinear(e.embedding_dim, e.num_embeddings, e.type_id, qweight=e.qweight)
        elif config.tie_word_embeddings:  # to_empty() unties; tie again
            model.lm_head.weight = model.embed_tokens.weight
        model.rope = RotaryEmbedding(config, max_positions, dtype).to(device)  # buffers are not weights
        return model.eval()

    def pack_linear_weights_for_cpu(self, batch_invariant: bool = True) -> None:
        """Store every linear layer's weight in oneDNN's blocked layout (call after load_weights).

        On the development CPU (`benchmarks/linear_cpu.py`, SmolLM2's four layer GEMMs) a decode
        step of 64 rows ran 1.6x faster than `F.linear` in bfloat16 and 2.4x in float32, and batch 1
        2.7x in bfloat16. The math is unchanged; only the order of the additions differs. A tied
        lm_head gets its own packed copy of the embedding matrix. `batch_invariant`: a lone row
        gives what it gives inside a batch (see `OneDNNLinear.forward`).
        """
        if not OneDNNLinear.available(self.norm.weight.dtype):  # the model dtype (a quantized embedding has none)
            return
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, OneDNNLinear(child, batch_invariant))
        self.reset_direct_calls()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache],
                meta: AttentionMetadata, attention: AttentionFn, logits_indices: torch.Tensor,
                hooks: LayerHooks | None = None) -> torch.Tensor:
        """Returns the logits (model dtype; the sampler widens what needs it) for the rows
        `logits_indices` of the flat batch. `hooks`: see `LayerHooks`."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions)
        residual = None
        if hooks is None:
            layers, lm_head = self._direct_calls or self._bind_direct_calls()
            for ops, cache in zip(layers, caches):
                x, residual = decoder_layer(ops, x, rope, cache, meta, attention, None, residual)
        else:
            lm_head = self.lm_head
            for j, cache in enumerate(caches):
                layer = hooks.before_layer(j)
                x, residual = layer(x, rope, cache, meta, attention, capture=hooks.capture, residual=residual)
                hooks.after_layer(j)
        # Only rows that sample need the final norm and the lm_head.
        _, x = self.norm(x[logits_indices], residual[logits_indices])
        return lm_head(x)

    def _bind_direct_calls(self) -> tuple[list[LayerOps], Linear]:
        self._direct_calls = [layer.ops() for layer in self.layers], direct_call(self.lm_head)
        return self._direct_calls

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) binds its own weights: bound calls would still read these.
        return {**super().__getstate__(), "_direct_calls": None}

    def reset_direct_calls(self) -> None:
        """Forget the layers' bound calls (`LayerOps`), after replacing modules: the next forward
        pass binds the current ones."""
        self._direct_calls = None

    # --- weights ------------------------------------------------------------------------
    # HF checkpoint name suffix -> (our parameter suffix, shard index within a fused weight)
    _FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    @classmethod
    def _module_of(cls, hf_weight_name: str) -> str:
        """The module holding an HF weight: "model.layers.0.self_attn.k_proj.weight" -> "layers.0.self_attn.qkv_proj"."""
        return cls._module_and_shard(hf_weight_name)[0]

    @classmethod
    def _module_and_shard(cls, hf_weight_name: str) -> tuple[str, int | None]:
        """The module holding an HF weight and, in a fused module, the weight's part index:
        "model.layers.0.self_attn.k_proj.weight" -> ("layers.0.self_attn.qkv_proj", 1); "model.norm.weight"
        -> ("norm", None)."""
        module_path = hf_weight_name.removeprefix("model.").rpartition(".")[0]
        parent, _, leaf = module_path.rpartition(".")
        parent, _, block = parent.rpartition(".")
        fused = cls._FUSED.get(f"{block}.{leaf}")
        return (module_path, None) if fused is None else (f"{parent}.{fused[0]}", fused[1])

    @classmethod
    def quantized_plan(cls, config: ModelConfig, types: dict[str, int]) -> dict[str, int]:
        """Of the weights a file stores in a format kvmem keeps quantized (`types`: HF name -> GGML
        type id), those the model can keep so: every weight of a module (q, k and v of the fused
        qkv_proj; gate and up) in a kept type, each part's own (parts in different types make a
        `QuantizedConcatLinear`). A module with any part in another type is dequantized whole. A
        tied lm_head follows the embedding."""
        parts: dict[str, list[str]] = {}
        for name in config.weight_names():
            if name.endswith(".weight") and not name.endswith("norm.weight"):
                parts.setdefault(cls._module_of(name), []).append(name)
        plan: dict[str, int] = {}
        for names in parts.values():
            if all(n in types for n in names):
                plan.update((n, types[n]) for n in names)
        return plan

    @classmethod
    def _quantized_modules(cls, config: ModelConfig, plan: dict[str, int]) -> dict[str, int | tuple[int, ...]]:
        """Module path -> its GGML type, or for a fused module whose parts differ, the parts' types in
        shard order (q, k, v; gate, up)."""
        shards: dict[str, dict[int, int]] = {}
        for name, type_id in plan.items():
            module, shard = cls._module_and_shard(name)
            shards.setdefault(module, {})[shard or 0] = type_id
        return {m: next(iter(t.values())) if len(set(t.values())) == 1 else tuple(t[i] for i in sorted(t))
                for m, t in shards.items()}

    @staticmethod
    def _part_features(config: ModelConfig, leaf: str) -> list[int]:
        """The output rows of each part of a fused module, in shard order."""
        if leaf == "qkv_proj":
            kv = config.num_key_value_heads * config.head_dim
            return [config.num_attention_heads * config.head_dim, kv, kv]
        return [config.intermediate_size, config.intermediate_size]  # gate_up_proj

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up. Every parameter must be
        set exactly once: a missing tensor is an error, not a silently random weight."""
        params = dict(self.named_parameters())
        # Quantized layers hold their blocks in a `qweight` buffer (and a bias buffer), named here as
        # the weight (and bias) they stand for.
        for module_name, module in self.named_modules():
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
                params[f"{module_name}.weight"] = module.qweight
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding, QuantizedConcatLinear)):
                if getattr(module, "bias", None) is not None:
                    params[f"{module_name}.bias"] = module.bias
        c = self.config
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            kind = name.rpartition(".")[2]  # weight | bias
            module, shard = self._module_and_shard(name)
            if shard is None:
                target_name, rows = name, slice(None)
            else:
                target_name = f"{module}.{kind}"
                start = sum(self._part_features(c, module.rpartition(".")[2])[:shard])
                rows = slice(start, start + tensor.shape[0])
                if f"{module}.parts.{shard}.{kind}" in params:  # a QuantizedConcatLinear's own part
                    target_name, rows = f"{module}.parts.{shard}.{kind}", slice(None)
            target = params.get(target_name)
            if target is None:
                raise ValueError(f"unexpected weight {name!r} for {c.architecture}")
            if (target.dtype == torch.uint8) != isinstance(tensor, QuantizedTensor):
                raise ValueError(f"weight {name!r}: the model was built to hold it "
                                 f"{'quantized' if target.dtype == torch.uint8 else 'dequantized'}")
            if isinstance(tensor, QuantizedTensor):
                layer = self.get_submodule(target_name.rpartition(".")[0])
                if tensor.type_id != layer.type_id:
                    raise ValueError(f"weight {name!r} is of GGML type {tensor.type_id}, its layer holds "
                                     f"{layer.format.name}")
                tensor = tensor.data
            if target.data[rows].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.data[rows].shape)}")
            target.data[rows].copy_(tensor)
            loaded.add(name)
        missing = [n for n in c.weight_names() if n.removeprefix("model.") not in loaded]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}{more}")
