"""flashdelta.fused_recurrent_gated_delta_rule: the gated delta rule token by token (decoding one
or a few tokens at a time). Same signature and semantics as flash-linear-attention's
`fused_recurrent_gated_delta_rule`, with a backward pass.

Custom ops (registered by `_gated_delta_rule.define_ops`, with fake implementations and autograd):
`torch.ops.flashdelta.fused_recurrent_gated_delta_rule_fwd` and `..._bwd`, calling flashdelta._C's
`fused_recurrent_gated_delta_rule_forward` / `_backward`.
"""

from typing import Optional, Tuple

import torch

from . import _gated_delta_rule as _gdn

_OPS = _gdn.define_ops("fused_recurrent")
fused_recurrent_gated_delta_rule_fwd = _OPS.forward
fused_recurrent_gated_delta_rule_bwd = _OPS.backward

# FLA's fused_recurrent_gated_delta_rule also takes per-key / per-value decays (the gated DeltaNet
# variants of KDA and co.), which would change the result.
_KEYWORDS = _gdn.Keywords(default_only={"gk": None, "gv": None})


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    beta: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gated delta rule, one token after the other, with autograd.

    The same arguments, math and results as :func:`flashdelta.chunk_gated_delta_rule`, except:

    Args:
        g: [B, T, HV] log decay, or None for no decay (g = 0; then no gradient for it).
        beta: [B, T, HV], or None for beta = 1 (then no gradient for it).

    Cheaper than the chunked op for a handful of tokens (decoding); for long sequences use
    chunk_gated_delta_rule.

    Returns:
        (o, final_state): o [B, T, HV, V] in q's dtype; final_state [N, HV, K, V] or None.
    """
    return _gdn.run(
        _OPS, "fused_recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
        output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, kwargs, _KEYWORDS,
    )
