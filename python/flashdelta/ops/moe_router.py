"""flashdelta.moe_router: the mixture-of-experts router after its projection, in one kernel.

`moe_router(router_logits, top_k, normalize)` returns `(router_scores, router_indices)` as
transformers' Qwen3_5MoeTopKRouter / Qwen3NextTopKRouter compute them from their logits:
fp32 softmax over experts, top-k (largest first), renormalised to sum to 1 when `normalize`
(Qwen3.5-MoE always; Qwen3-Next: config.norm_topk_prob), scores cast back to the logits' dtype,
indices int64. Exact ties between probabilities go to the lower expert id (torch.topk leaves
their order unspecified). Differentiable with respect to the logits.

Custom ops: `torch.ops.flashdelta.moe_router` and `torch.ops.flashdelta.moe_router_bwd` (what
torch.compile traces); eager calls run the same implementation through a plain autograd.Function
(_eager.py).
"""

from typing import Tuple

import torch

from . import _eager
from ._moe_common import FLOAT_DTYPES, extension_module, stream_of, to_dlpack

Tensor = torch.Tensor


def _router_forward(logits: Tensor, top_k: int, normalize: bool) -> Tuple[Tensor, Tensor]:
    T = logits.shape[0]
    weights = torch.empty(T, top_k, dtype=logits.dtype, device=logits.device)
    indices = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    extension_module().moe_router_forward(
        to_dlpack(logits), top_k, normalize, to_dlpack(weights), to_dlpack(indices),
        stream_of(logits),
    )
    return weights, indices


moe_router_fwd = torch.library.custom_op("flashdelta::moe_router", mutates_args=())(
    _router_forward)


@moe_router_fwd.register_fake
def _(logits, top_k, normalize):
    T = logits.shape[0]
    return (
        logits.new_empty((T, top_k)),
        logits.new_empty((T, top_k), dtype=torch.int64),
    )


def _router_backward(
    logits: Tensor, indices: Tensor, d_weights: Tensor, top_k: int, normalize: bool
) -> Tensor:
    d_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    extension_module().moe_router_backward(
        to_dlpack(logits), top_k, normalize, to_dlpack(indices), to_dlpack(d_weights),
        to_dlpack(d_logits), stream_of(logits),
    )
    return d_logits


moe_router_bwd = torch.library.custom_op("flashdelta::moe_router_bwd", mutates_args=())(
    _router_backward)


@moe_router_bwd.register_fake
def _(logits, indices, d_weights, top_k, normalize):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, top_k, normalize = inputs
    _, indices = output
    ctx.save_for_backward(logits, indices)
    ctx.top_k = top_k
    ctx.normalize = normalize
    ctx.mark_non_differentiable(indices)


def _backward_with(router_bwd):
    def backward(ctx, d_weights, _d_indices):
        logits, indices = ctx.saved_tensors
        if d_weights is None:
            return None, None, None
        return router_bwd(logits, indices, d_weights, ctx.top_k, ctx.normalize), None, None

    return backward


moe_router_fwd.register_autograd(_backward_with(moe_router_bwd), setup_context=_setup_context)
_EagerRouter = _eager.twin("_EagerRouter", _router_forward, _setup_context,
                           _backward_with(_router_backward))


def moe_router(router_logits: Tensor, top_k: int, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """Softmax, top-k and renormalisation of router logits [T, E] (any float dtype).

    Returns (router_scores [T, top_k] in the logits' dtype, router_indices [T, top_k] int64).
    """
    if not isinstance(router_logits, Tensor):
        raise TypeError(f"moe_router: router_logits must be a torch.Tensor, got "
                        f"{type(router_logits).__name__}")
    if router_logits.dim() != 2:
        raise ValueError(f"moe_router: router_logits must be [T, E], got shape "
                         f"{list(router_logits.shape)}")
    if router_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"moe_router: router_logits must be float32, float16 or bfloat16, got "
                        f"{router_logits.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"moe_router: top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"moe_router: top_k must be in [1, E = {router_logits.shape[1]}], "
                         f"got {top_k}")
    if _eager.plain():
        router_logits = _eager.unwrap(router_logits)
        if _eager.untracked(router_logits):
            return _router_forward(router_logits, top_k, bool(normalize))
        return _EagerRouter.apply_plain(router_logits, top_k, bool(normalize))
    if _eager.eager():
        return _EagerRouter.apply(router_logits, top_k, bool(normalize))
    return moe_router_fwd(router_logits, top_k, bool(normalize))
