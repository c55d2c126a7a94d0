"""flashdelta's ops: one module per op, each a torch.library custom op with a fake
implementation, autograd and an FLA-compatible public function."""

from .chunk_gated_delta_rule import chunk_gated_delta_rule
from .fused_linear_cross_entropy import causal_lm_loss, fused_linear_cross_entropy
from .fused_recurrent_gated_delta_rule import fused_recurrent_gated_delta_rule

__all__ = [
    "causal_lm_loss",
    "chunk_gated_delta_rule",
    "fused_linear_cross_entropy",
    "fused_recurrent_gated_delta_rule",
]
