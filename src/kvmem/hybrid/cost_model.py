"""What a token costs, per layer, in the host tier: bytes to move, FLOPs to recompute; and the ACT ratio.

Notation (one decoder layer; b = bytes per element of the dtype):

    s_kv = 2 · kv_heads · head_dim · b           bytes of one token's K and V
    s_act = hidden · b                            bytes of one token's activation (post input_layernorm)
    f     = 2 · hidden · (2 · kv_heads · head_dim) FLOPs to turn one activation back into K,V
                                                  (a GEMM row against [W_K; W_V]; bias and RoPE are
                                                  elementwise, O(kv_size), and left out)
    W     = weight bytes of the layer (attention q,k,v,o + MLP), streamed per layer when offloaded

An activation block pays only where s_act < s_kv, i.e. hidden < 2 · kv_heads · head_dim: multi-head
models (Llama-2, OPT: s_act = s_kv / 2). With grouped-query attention (Llama-3-8B: 4096 vs 2·8·128 =
2048; SmolLM2-135M: 576 vs 384) an activation is *larger* than the K,V it makes, so it saves no
transfer and costs recompute: the policy keeps KV only.

The balanced ratio. Of the N host-tier tokens of a layer, a fraction r is kept as activations. While
the device computes layer j (C seconds: its GEMMs and attention) and recomputes layer j's activation
tokens, the link brings layer j+1's weights (if offloaded), KV tokens and activation tokens:

    t_link(r) = [W + N · ((1 − r) · s_kv + r · s_act)] / BW_h2d
    t_dev(r)  = C + r · N · f / F

t_link falls and t_dev rises with r, so the layer time max(t_link, t_dev) is smallest where they meet:

    r* = (W / BW_h2d + N · s_kv / BW_h2d − C) / (N · (s_kv − s_act) / BW_h2d + N · f / F)

clamped to [0, 1]. r* ≤ 0 means the device is already the longer stream at KV-only (recompute would
only lengthen it); r* ≥ 1 means even all-activation leaves the link the longer stream. Without
weights and layer compute (W = C = 0) this is the per-token balance r* = (s_kv/BW) / ((s_kv − s_act)/BW
+ f/F): a layer's transfer time and its recompute time finish together.

Over a decode the host tier grows (N_s tokens and C_s seconds at step s) while blocks, once written,
keep their kind, so one ratio serves every step. `act_ratio_for_steps` minimises the summed layer time

    J(r) = Σ_s max(t_link,s(r), t_dev,s(r))

J is convex and piecewise linear in r (a sum of maxima of linear functions), so its minimum lies at
0, 1 or one of the steps' own balance points r*_s: those are the only candidates tried. With one step
it is `balanced_act_ratio`.

Assumptions: the two streams overlap perfectly within a layer (the simulator checks what pipelining
with finite buffers gives); every GEMM runs at the profile's projection-shaped rate F, bounded below by
reading its weights from device memory (a roofline); attention reads each context token's K,V once
from device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvmem.hybrid.profile import HardwareProfile

logger = logging.getLogger(__name__)
_logged_kv_only: set[str] = set()


def _log_kv_only_once(shape: "ModelShape") -> str:
    """The GQA fallback, said once per model (ratio searches ask many times)."""
    reason = shape.why_activations_do_not_pay()
    if shape.name not in _logged_kv_only:
        _logged_kv_only.add(shape.name)
        logger.info("hybrid policy: %s", reason)
    return reason


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs; constructors for the paper's models and from kvmem's config."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    mlp_matrices: int = 3  # SwiGLU gate, up, down = 3; OPT's fc1, fc2 = 2
    tie_word_embeddings: bool = False
    # Bytes of one token of one KV head in K (or V) as the cache stores it; None = head_dim * dtype_bytes.
    # A quantized KV cache (kv_cache_dtype int8 / fp8) makes KV blocks smaller, activations not.
    kv_token_head_bytes: int | None = None

    @classmethod
    def opt_30b(cls) -> "ModelShape":
        # facebook/opt-30b config.json: 48 layers, d_model 7168, 56 heads, ffn_dim 28672, vocab 50272, tied.
        return cls("OPT-30B", 48, 7168, 56, 56, 128, 28672, 50272, mlp_matrices=2, tie_word_embeddings=True)

    @classmethod
    def llama2_7b(cls) -> "ModelShape":
        return cls("Llama-2-7B", 32, 4096, 32, 32, 128, 11008, 32000)

    @classmethod
    def llama3_8b(cls) -> "ModelShape":
        return cls("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256)

    @classmethod
    def from_model_config(cls, config, dtype_bytes: int = 2, kv_token_head_bytes: int | None = None) -> "ModelShape":
        """From a `kvmem.models.config.ModelConfig` (a Llama-family model: SwiGLU MLP)."""
        return cls(config.name, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, config.head_dim, config.intermediate_size, config.vocab_size,
                   dtype_bytes=dtype_bytes, mlp_matrices=3, tie_word_embeddings=config.tie_word_embeddings,
                   kv_token_head_bytes=kv_token_head_bytes)

    # --- per token, per layer -------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        if self.kv_token_head_bytes is not None:
            return 2 * self.num_kv_heads * self.kv_token_head_bytes
        return 2 * self.kv_size * self.dtype_bytes

    @property
    def act_bytes_per_token_per_layer(self) -> int:
        return self.hidden_size * self.dtype_bytes

    @property
    def recompute_flops_per_token_per_layer(self) -> int:
        return 2 * self.hidden_size * 2 * self.kv_size

    # --- weights --------------------------------------------------------------------------------
    @property
    def weight_params_per_layer(self) -> int:
        h = self.hidden_size
        attention = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        return attention + self.mlp_matrices * h * self.intermediate_size

    @property
    def weight_bytes_per_layer(self) -> int:
        return self.weight_params_per_layer * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        """Input embedding plus lm_head (one matrix when tied); they stay on the device."""
        return (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def weight_bytes_total(self) -> int:
        return self.num_layers * self.weight_bytes_per_layer + self.embedding_bytes

    # --- the GQA condition ----------------------------------------------------------------------
    @property
    def activations_pay_off(self) -> bool:
        return self.hidden_size < 2 * self.kv_size

    def why_activations_do_not_pay(self) -> str:
        return (f"{self.name}: hidden_size {self.hidden_size} >= 2 x kv_heads x head_dim = "
                f"2 x {self.num_kv_heads} x {self.head_dim} = {2 * self.kv_size} (grouped-query attention), so an "
                f"activation ({self.act_bytes_per_token_per_layer} B/token/layer) is not smaller than the K,V it "
                f"recomputes ({self.kv_bytes_per_token_per_layer} B): it saves no transfer and costs recompute; "
                f"KV only")


# --- device compute of a layer (the roofline the cost model and the simulator share) ---------------
def gemm_s(shape: ModelShape, profile: HardwareProfile, num_tokens: int) -> float:
    """The layer's weight GEMMs for `num_tokens` rows: FLOPs at F, but never faster than reading the
    weights once from device memory (decode GEMMs of a small batch are bound by that read)."""
    if num_tokens <= 0:
        return 0.0
    flops = 2 * shape.weight_params_per_layer * num_tokens
    return max(flops / profile.device_matmul_flops_per_s, shape.weight_bytes_per_layer / profile.device_memory_bytes_per_s)


def decode_attention_s(shape: ModelShape, profile: HardwareProfile, context_tokens: int) -> float:
    """Decode attention of one layer over `context_tokens` keys in all (one query per sequence):
    4 · heads · head_dim FLOPs per key (QKᵀ and PV), each key's K,V read once from device memory."""
    flops = 4 * shape.q_size * context_tokens
    return max(flops / profile.device_matmul_flops_per_s,
               context_tokens * shape.kv_bytes_per_token_per_layer / profile.device_memory_bytes_per_s)


def prefill_attention_s(shape: ModelShape, profile: HardwareProfile, num_sequences: int, prompt_len: int) -> float:
    """Causal attention over a prompt: query i sees i + 1 keys, p(p + 1)/2 query-key pairs per sequence."""
    pairs = num_sequences * prompt_len * (prompt_len + 1) // 2
    return 4 * shape.q_size * pairs / profile.device_matmul_flops_per_s


def recompute_s(shape: ModelShape, profile: HardwareProfile, act_tokens: int) -> float:
    return act_tokens * shape.recompute_flops_per_token_per_layer / profile.device_matmul_flops_per_s


# --- the balanced ratio ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RatioDecision:
    """The fraction of host-tier tokens kept as activations, and why."""

    act_ratio: float
    reason: str
    link_s_kv_only: float  # t_link(0): one layer's host->device transfer with the host tier all KV
    device_s_kv_only: float  # t_dev(0)
    link_s: float  # t_link(act_ratio)
    device_s: float  # t_dev(act_ratio)
    # max(t_link, t_dev) at act_ratio and at 0 (over several steps: the mean of the per-step maxima)
    layer_s: float
    layer_s_kv_only: float


def layer_stream_times(shape: ModelShape, profile: HardwareProfile, host_tokens: int, act_ratio: float,
                       layer_compute_s: float = 0.0, streamed_weight_bytes: int = 0) -> tuple[float, float]:
    """(t_link, t_dev) of one layer at `act_ratio` (the module docstring's equations)."""
    bw = profile.host_to_device_bytes_per_s
    s_kv, s_act = shape.kv_bytes_per_token_per_layer, shape.act_bytes_per_token_per_layer
    link = (streamed_weight_bytes + host_tokens * ((1 - act_ratio) * s_kv + act_ratio * s_act)) / bw
    device = layer_compute_s + act_ratio * host_tokens * shape.recompute_flops_per_token_per_layer / profile.device_matmul_flops_per_s
    return link, device


def balanced_act_ratio(shape: ModelShape, profile: HardwareProfile, host_tokens_per_layer: int,
                       layer_compute_s: float = 0.0, streamed_weight_bytes_per_layer: int = 0) -> RatioDecision:
    """r* = (W/BW + N·s_kv/BW − C) / (N·(s_kv − s_act)/BW + N·f/F), clamped to [0, 1]; 0 with the reason
    when activations cannot pay (GQA, no host tier, or the device already the longer stream).

    `host_tokens_per_layer` (N): host-tier tokens of the whole batch in one layer; `layer_compute_s` (C):
    the device's own work on the layer (GEMMs + attention); `streamed_weight_bytes_per_layer` (W): the
    layer's weights when they stream from the host (0 when resident).
    """
    n, c, w = host_tokens_per_layer, layer_compute_s, streamed_weight_bytes_per_layer
    link0, dev0 = layer_stream_times(shape, profile, n, 0.0, c, w)

    def decision(ratio: float, reason: str) -> RatioDecision:
        link, dev = layer_stream_times(shape, profile, n, ratio, c, w)
        return RatioDecision(ratio, reason, link0, dev0, link, dev, max(link, dev), max(link0, dev0))

    if not shape.activations_pay_off:
        return decision(0.0, _log_kv_only_once(shape))
    if n <= 0:
        return decision(0.0, "no host-tier tokens: everything is on the device, nothing to transfer or recompute")
    bw, flops = profile.host_to_device_bytes_per_s, profile.device_matmul_flops_per_s
    s_kv, s_act, f = (shape.kv_bytes_per_token_per_layer, shape.act_bytes_per_token_per_layer,
                      shape.recompute_flops_per_token_per_layer)
    numerator = w / bw + n * s_kv / bw - c
    denominator = n * (s_kv - s_act) / bw + n * f / flops
    if numerator <= 0:
        return decision(0.0, f"device-bound: at KV only the device needs {dev0 * 1e3:.3g} ms per layer and the link "
                             f"{link0 * 1e3:.3g} ms; recompute would only lengthen the longer stream; KV only")
    ratio = numerator / denominator
    if ratio >= 1.0:
        link1, dev1 = layer_stream_times(shape, profile, n, 1.0, c, w)
        return decision(1.0, f"link-bound even with every host-tier token as an activation (link {link1 * 1e3:.3g} "
                             f"ms vs device {dev1 * 1e3:.3g} ms per layer): all activations")
    link, _ = layer_stream_times(shape, profile, n, ratio, c, w)
    return decision(ratio, f"balanced: link and device both {link * 1e3:.3g} ms per layer at {ratio:.1%} activations "
                           f"(KV only: link {link0 * 1e3:.3g} ms, device {dev0 * 1e3:.3g} ms)")


def act_ratio_for_steps(shape: ModelShape, profile: HardwareProfile, host_tokens_per_step: Sequence[int],
                        layer_compute_s_per_step: Sequence[float], streamed_weight_bytes_per_layer: int = 0) -> RatioDecision:
    """The one ratio minimising Σ_s max(t_link,s(r), t_dev,s(r)) over a decode's steps (module docstring).

    Candidates: 0, 1 and every step's `balanced_act_ratio`; ties go to the smaller ratio (less recompute).
    The returned link/device times are per layer, averaged over the steps."""
    if len(host_tokens_per_step) != len(layer_compute_s_per_step) or not host_tokens_per_step:
        raise ValueError("need one compute time per step, and at least one step")
    if len(host_tokens_per_step) == 1:
        return balanced_act_ratio(shape, profile, host_tokens_per_step[0], layer_compute_s_per_step[0],
                                  streamed_weight_bytes_per_layer)
    steps = list(zip(host_tokens_per_step, layer_compute_s_per_step))
    w = streamed_weight_bytes_per_layer

    def mean_times(ratio: float) -> tuple[float, float, float]:
        """(mean link, mean device, mean max) per layer over the steps at `ratio`."""
        link = dev = layer = 0.0
        for n, c in steps:
            tl, td = layer_stream_times(shape, profile, n, ratio, c, w)
            link, dev, layer = link + tl, dev + td, layer + max(tl, td)
        k = len(steps)
        return link / k, dev / k, layer / k

    link0, dev0, layer0 = mean_times(0.0)
    if not shape.activations_pay_off:
        return RatioDecision(0.0, _log_kv_only_once(shape), link0, dev0, link0, dev0, layer0, layer0)
    candidates = sorted({0.0, 1.0} | {balanced_act_ratio(shape, profile, n, c, w).act_ratio for n, c in steps})
    best = min(candidates, key=lambda r: (round(mean_times(r)[2], 15), r))
    link, dev, layer = mean_times(best)
    if best == 0.0:
        reason = (f"KV only: over the decode's {len(steps)} steps no share of activations shortens the layers "
                  f"(KV only: link {link0 * 1e3:.3g} ms, device {dev0 * 1e3:.3g} ms per layer on average)")
    elif best == 1.0:
        reason = (f"all activations: link-bound on average even then (link {link * 1e3:.3g} ms vs device "
                  f"{dev * 1e3:.3g} ms per layer, mean over {len(steps)} steps)")
    else:
        reason = (f"balanced over {len(steps)} decode steps at {best:.1%} activations: link {link * 1e3:.3g} ms, device "
                  f"{dev * 1e3:.3g} ms per layer on average (KV only: link {link0 * 1e3:.3g} ms, device {dev0 * 1e3:.3g} ms)")
    return RatioDecision(best, reason, link0, dev0, link, dev, layer, layer0)
