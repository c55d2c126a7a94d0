"""flashdelta's ops: one module per op (or small family), each a torch.library custom op with a
fake implementation, autograd and a public function."""

from .chunk_gated_delta_rule import chunk_gated_delta_rule
from .fused_recurrent_gated_delta_rule import fused_recurrent_gated_delta_rule
from .gated_product import attention_gate, swiglu
from .partial_rotary_embedding import partial_rotary_embedding
from .rms_norm import rms_norm, rms_norm_gated

__all__ = [
    "attention_gate",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "partial_rotary_embedding",
    "rms_norm",
    "rms_norm_gated",
    "swiglu",
]
