"""flashdelta.chunk_gated_delta_rule: the gated delta rule in chunks of 64 tokens (training and
prefill). Same signature and semantics as flash-linear-attention's `chunk_gated_delta_rule`.

Custom ops (registered by `_gated_delta_rule.define_ops`, with fake implementations and autograd):
`torch.ops.flashdelta.chunk_gated_delta_rule_fwd` and `..._bwd`, calling flashdelta._C's
`chunk_gated_delta_rule_forward` / `_backward`. The math reference lives in the tests
(tests/python/gdn_reference.py).
"""

from typing import Optional, Tuple

import torch

from . import _gated_delta_rule as _gdn

_OPS = _gdn.define_ops("chunk")
chunk_gated_delta_rule_fwd = _OPS.forward
chunk_gated_delta_rule_bwd = _OPS.backward

# FLA's chunk_gated_delta_rule (and transformers' torch_chunk_gated_delta_rule) also take:
_KEYWORDS = _gdn.Keywords(
    # The result does not depend on the chunk size (up to rounding); flashdelta always uses 64.
    ignored=frozenset({"chunk_size"}),
    # Context parallelism (FLA's FLACPContext) splits one sequence over devices: not supported.
    default_only={"cp_context": None},
)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gated delta rule, chunked (chunk size 64), with autograd.

    Per value head h (which reads query/key head h // (HV // H)) and sequence:
    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = scale * S_t^T q_t``, with S of shape [K, V] in fp32.

    Args:
        q, k: [B, T, H, K], bf16 / fp16 / fp32 (fp64 on CPU), the same dtype.
        v: [B, T, HV, V], q's dtype; HV a multiple of H (grouped value heads, no repeat needed).
        g: [B, T, HV] log decay (<= 0); bf16 / fp16 / fp32 (float64 when q is).
        beta: [B, T, HV] in (0, 1) (already sigmoid-ed); bf16 / fp16 / fp32 (float64 when q is).
        scale: multiplies q; None means K ** -0.5.
        initial_state: [N, HV, K, V] float32 (float64 when q is), N = B, or the number of
            sequences with cu_seqlens.
        output_final_state: also return the final state [N, HV, K, V].
        use_qk_l2norm_in_kernel: l2-normalise q and k (x / sqrt(sum(x^2) + 1e-6)) first.
        cu_seqlens: int32 / int64 [N + 1] offsets of N sequences packed along T (then B = 1),
            on q's device, starting at 0, non-decreasing, ending at T.
        **kwargs: FLA's and transformers' other keywords that change nothing (chunk_size,
            cu_seqlens_cpu, chunk_indices, head_first=False, use_cache, ...) are ignored;
            ones that would change the result (head_first=True, use_gate_in_kernel=True,
            A_log, dt_bias, state_v_first=True, cp_context, ...) raise ValueError; others
            raise TypeError.

    Returns:
        (o, final_state): o [B, T, HV, V] in q's dtype; final_state or None.

    Memory: when autograd records the call (grad enabled and an input requiring grad), the
    forward keeps the state entering every 64-token chunk for the backward, and on CUDA the
    intra-chunk products too (CUDA: 80.5 KiB per chunk and value head and 32 KiB per chunk
    and key head; CPU: the states, K x V fp32, fp64 for fp64 inputs), and the backward then does
    not replay the recurrence (the same gradients, bit for bit); FLASHDELTA_GDN_KEEP_STATES=0
    recomputes them instead.
    """
    return _gdn.run(
        _OPS, "chunk_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
        output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, kwargs, _KEYWORDS,
    )
