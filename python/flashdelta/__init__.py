"""flashdelta: fast Gated DeltaNet kernels (C++/CUDA) for training hybrid linear-attention models.

    o, final_state = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, ...)

The compiled extension (flashdelta._C) is imported on first use, so `import flashdelta` stays
cheap and works even where the extension is missing (the ops then raise ImportError when run).
"""

__version__ = "0.1.0"

from .ops import (
    attention_gate,
    causal_conv1d,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    moe_experts,
    moe_permute,
    moe_router,
    moe_unpermute,
    partial_rotary_embedding,
    rms_norm,
    rms_norm_gated,
    swiglu,
)

# The subpackage flashdelta.patch holds the patch layer; importing these names here binds
# `flashdelta.patch` to the function (submodules stay importable: `from flashdelta.patch import
# gdn`). It imports no transformers code until patch() runs.
from .patch import PatchReport, patch, unpatch


def build_info() -> dict:
    """What the compiled extension contains: {'cuda': bool, 'cuda_archs': str,
    'cpu_threads': int, 'cuda_ops': ['op.forward', 'op.backward' entries of the CUDA kernels]}."""
    from .ops._extension import load_extension

    return dict(load_extension().build_info())


__all__ = [
    "__version__",
    "PatchReport",
    "attention_gate",
    "build_info",
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "moe_experts",
    "moe_permute",
    "moe_router",
    "moe_unpermute",
    "partial_rotary_embedding",
    "patch",
    "rms_norm",
    "rms_norm_gated",
    "swiglu",
    "unpatch",
]
