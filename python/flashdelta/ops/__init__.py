"""flashdelta's ops: one module per op (or small family), each a torch.library custom op with a
fake implementation, autograd and a public function."""

from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .chunk_gated_delta_rule import chunk_gated_delta_rule
from .fused_linear_cross_entropy import causal_lm_loss, fused_linear_cross_entropy
from .fused_recurrent_gated_delta_rule import fused_recurrent_gated_delta_rule
from .gated_product import attention_gate, swiglu
from .moe_experts import moe_experts, moe_grouped_experts
from .moe_permute import moe_permute, moe_unpermute
from .moe_router import moe_router
from .partial_rotary_embedding import partial_rotary_embedding
from .rms_norm import rms_norm, rms_norm_gated

__all__ = [
    "attention_gate",
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_lm_loss",
    "chunk_gated_delta_rule",
    "fused_linear_cross_entropy",
    "fused_recurrent_gated_delta_rule",
    "moe_experts",
    "moe_grouped_experts",
    "moe_permute",
    "moe_router",
    "moe_unpermute",
    "partial_rotary_embedding",
    "rms_norm",
    "rms_norm_gated",
    "swiglu",
]
