"""hybrid (HybridServe, arXiv 2501.01792): the policy half of KV + activation caching in host memory.

When KV no longer fits device memory, the host tier keeps, per block, either K,V or the activation
that produced them (the post-`input_layernorm` hidden state, the input of the K/V projection);
activation (ACT) blocks are half the bytes of KV blocks on multi-head models and are turned back into
K,V on the device while the next transfers are in flight.

One concept per module:
- `profile`: what the machine can do (link bytes/s, device FLOP/s, memory sizes), measured or loaded.
- `cost_model`: per-token costs of a model shape and the balanced ACT ratio (the equations).
- `policy`: the host tier split into KV and ACT blocks, per-request placement, mini-batch formation.
- `recompute`: K,V from captured activations with the model's own projection weights and RoPE.
- `simulator`: per-layer pipelined timing of prefill + decode under a policy, from the same code.

Nothing here owns device memory or runs the engine; `kvmem.memory` will hold the `hybrid` manager.
"""

from kvmem.hybrid.cost_model import ModelShape, RatioDecision, act_ratio_for_steps, balanced_act_ratio
from kvmem.hybrid.policy import HostTierPlan, RequestLoad, act_block_mask, form_minibatches
from kvmem.hybrid.profile import DEFAULT_PROFILE, HardwareProfile

__all__ = ["DEFAULT_PROFILE", "HardwareProfile", "HostTierPlan", "ModelShape", "RatioDecision", "RequestLoad",
           "act_block_mask", "act_ratio_for_steps", "balanced_act_ratio", "form_minibatches"]
