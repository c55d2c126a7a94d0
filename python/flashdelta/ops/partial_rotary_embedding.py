"""flashdelta.partial_rotary_embedding (include/flashdelta/partial_rotary_embedding.h): rotate-half
RoPE of q and k together over the first rotary_dim = cos.shape[-1] channels of each head, the
rest passed through; products and sums rounded as transformers' apply_rotary_pos_emb rounds them.

Layout: q [B, T, H, head_dim] and k [B, T, HK, head_dim] (any strides with a unit last stride, so
a transposed [B, H, T, head_dim] view is taken as it is), cos / sin [B or 1, T, rotary_dim] as the
model's rotary module gives them. The outputs have q's / k's shapes; with heads_first=True their
memory is laid out [B, H, T, head_dim] (what attention kernels read), else contiguous.

Custom ops: `torch.ops.flashdelta.partial_rotary_embedding_fwd` / `_bwd` (what torch.compile
sees; eager calls take the cheaper autograd.Function path over the same implementation, _rows.py).
"""

from typing import Tuple

import torch

from . import _rows

Tensor = torch.Tensor


def _empty_like_layout(x: Tensor, heads_first: bool) -> Tensor:
    if heads_first:
        B, T, H, D = x.shape
        return torch.empty((B, H, T, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _expand(c: Tensor, q: Tensor) -> Tensor:
    """cos / sin over q's batch (a stride-0 view when they have batch 1)."""
    return c.detach().expand(q.shape[0], q.shape[1], c.shape[-1])


def _forward_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, heads_first: bool
                  ) -> Tuple[Tensor, Tensor]:
    q_out, k_out = _empty_like_layout(q, heads_first), _empty_like_layout(k, heads_first)
    _rows.load_extension().partial_rotary_embedding_forward(
        _unit_last(q.detach()), _unit_last(k.detach()), _unit_last(_expand(cos, q)),
        _unit_last(_expand(sin, q)), q_out, k_out, _rows._stream(q.device))
    return q_out, k_out


def _backward_impl(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor
                   ) -> Tuple[Tensor, Tensor]:
    dq, dk = torch.empty_like(dq_out, memory_format=torch.contiguous_format), torch.empty_like(
        dk_out, memory_format=torch.contiguous_format)
    _rows.load_extension().partial_rotary_embedding_backward(
        _unit_last(dq_out.detach()), _unit_last(dk_out.detach()),
        _unit_last(_expand(cos, dq_out)), _unit_last(_expand(sin, dq_out)), dq, dk,
        _rows._stream(dq_out.device))
    return dq, dk


@torch.library.custom_op("flashdelta::partial_rotary_embedding_fwd", mutates_args=())
def partial_rotary_embedding_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                                 heads_first: bool) -> Tuple[Tensor, Tensor]:
    return _forward_impl(q, k, cos, sin, heads_first)


@partial_rotary_embedding_fwd.register_fake
def _(q, k, cos, sin, heads_first):
    return _empty_like_layout(q, heads_first), _empty_like_layout(k, heads_first)


@torch.library.custom_op("flashdelta::partial_rotary_embedding_bwd", mutates_args=())
def partial_rotary_embedding_bwd(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor
                                 ) -> Tuple[Tensor, Tensor]:
    return _backward_impl(dq_out, dk_out, cos, sin)


@partial_rotary_embedding_bwd.register_fake
def _(dq_out, dk_out, cos, sin):
    return (torch.empty_like(dq_out, memory_format=torch.contiguous_format),
            torch.empty_like(dk_out, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, heads_first = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = partial_rotary_embedding_bwd(dq_out, dk_out, cos, sin)
    return dq, dk, None, None, None


partial_rotary_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The eager path (see _rows.eager): the same kernels without the dispatcher's cost."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, heads_first):
        ctx.save_for_backward(cos, sin)
        return _forward_impl(q, k, cos, sin, heads_first)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _backward_impl(dq_out, dk_out, cos, sin)
        return dq, dk, None, None, None


def partial_rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                             heads_first: bool = False) -> Tuple[Tensor, Tensor]:
    """(rope(q), rope(k)) over the first cos.shape[-1] channels of each head.

    Args:
        q: [B, T, H, head_dim]; k: [B, T, HK, head_dim], q's dtype.
        cos, sin: [B, T, rotary_dim] or [1, T, rotary_dim], q's dtype; rotary_dim even and
            <= head_dim. No gradient flows to them (the rotary module runs under no_grad).
        heads_first: lay the outputs out as [B, H, T, head_dim] in memory.
    """
    fn = "partial_rotary_embedding"
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _rows.require_tensor(fn, name, x)
    _rows.require_float(fn, "q", q)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{fn}: q and k must be 4-d [B, T, heads, head_dim], got "
                         f"{_rows.shape_of(q)} and {_rows.shape_of(k)}")
    _rows.require_same(fn, "k", k, "q", q, shape=False)
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"{fn}: k must have shape [B, T, HK, head_dim] = [{B}, {T}, HK, {D}] "
                         f"(from q), got {_rows.shape_of(k)}")
    for name, c in (("cos", cos), ("sin", sin)):
        _rows.require_same(fn, name, c, "q", q, shape=False)
        if c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1] != T:
            raise ValueError(f"{fn}: {name} must have shape [B or 1, T, rotary_dim] with B = {B}, "
                             f"T = {T}, got {_rows.shape_of(c)}")
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: sin must have cos's shape {_rows.shape_of(cos)}, got "
                         f"{_rows.shape_of(sin)}")
    rd = cos.shape[-1]
    if rd % 2 or rd > D:
        raise ValueError(f"{fn}: rotary_dim = cos.shape[-1] = {rd} must be even and at most "
                         f"head_dim = {D}")
    if _rows.eager():
        return _Eager.apply(q, k, cos, sin, bool(heads_first))
    return partial_rotary_embedding_fwd(q, k, cos, sin, bool(heads_first))
