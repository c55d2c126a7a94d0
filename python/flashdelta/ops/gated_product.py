"""flashdelta.swiglu and flashdelta.attention_gate (include/flashdelta/gated_product.h):

- `swiglu(gate, up)` = silu(gate) * up, the activation of the dense MLP and the shared expert
  (the Linear layers stay modules: this replaces only `act_fn(gate_proj(x)) * up_proj(x)`'s
  elementwise part);
- `attention_gate(attn, gate)` = attn * sigmoid(gate), the output gate of the gated attention.

Both round as transformers' two-kernel compositions do (activation, then product, each cast to the
storage dtype), so bf16 results are bit-identical to them; the backward recomputes the activation
(nothing is saved beyond the inputs). Custom ops: `torch.ops.flashdelta.swiglu_fwd` / `_bwd`,
`torch.ops.flashdelta.attention_gate_fwd` / `_bwd` (what torch.compile sees; eager calls take the
cheaper autograd.Function path over the same implementation, see _rows.py).
"""

from typing import Tuple

import torch

from . import _rows

Tensor = torch.Tensor


def _define(name: str, value_name: str, gate_first: bool):
    """Registers flashdelta::{name}_fwd / _bwd and the eager autograd.Function over the same
    implementation. Arguments are (first, second) in the public order: (gate, up) for swiglu,
    (attn, gate) for attention_gate."""

    def entry(direction):
        return getattr(_rows.load_extension(), f"{name}_{direction}")

    def forward_impl(first: Tensor, second: Tensor) -> Tensor:
        out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
        a, b = _rows.as_rows(first.detach()), _rows.as_rows(second.detach())
        entry("forward")(a, b, out.view(a.shape), _rows._stream(first.device))
        return out

    def backward_impl(first: Tensor, second: Tensor, d_out: Tensor) -> Tuple[Tensor, Tensor]:
        d_first = torch.empty(first.shape, dtype=first.dtype, device=first.device)
        d_second = torch.empty(first.shape, dtype=first.dtype, device=first.device)
        a, b = _rows.as_rows(first.detach()), _rows.as_rows(second.detach())
        entry("backward")(a, b, _rows.as_rows(d_out.detach()), d_first.view(a.shape),
                          d_second.view(a.shape), _rows._stream(first.device))
        return d_first, d_second

    @torch.library.custom_op(f"flashdelta::{name}_fwd", mutates_args=())
    def forward(first: Tensor, second: Tensor) -> Tensor:
        return forward_impl(first, second)

    @forward.register_fake
    def _(first, second):
        return torch.empty(first.shape, dtype=first.dtype, device=first.device)

    @torch.library.custom_op(f"flashdelta::{name}_bwd", mutates_args=())
    def backward(first: Tensor, second: Tensor, d_out: Tensor) -> Tuple[Tensor, Tensor]:
        return backward_impl(first, second, d_out)

    @backward.register_fake
    def _(first, second, d_out):
        return (torch.empty(first.shape, dtype=first.dtype, device=first.device),
                torch.empty(first.shape, dtype=first.dtype, device=first.device))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_rule(ctx, d_out):
        first, second = ctx.saved_tensors
        return backward(first, second, d_out)

    forward.register_autograd(backward_rule, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        """The eager path (see _rows.eager): the same kernels without the dispatcher's cost."""

        @staticmethod
        def forward(ctx, first, second):
            ctx.save_for_backward(first, second)
            return forward_impl(first, second)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, d_out):
            first, second = ctx.saved_tensors
            return backward_impl(first, second, d_out)

    names = ("gate", value_name) if gate_first else (value_name, "gate")

    def check(first, second) -> None:
        for n, x in zip(names, (first, second)):
            _rows.require_tensor(name, n, x)
        _rows.require_float(name, names[0], first)
        _rows.require_same(name, names[1], second, names[0], first)
        if first.dim() < 1 or first.shape[-1] == 0:
            raise ValueError(f"{name}: {names[0]} must have a non-empty last dimension, got "
                             f"{_rows.shape_of(first)}")

    def apply(first, second):
        check(first, second)
        return Eager.apply(first, second) if _rows.eager() else forward(first, second)

    return forward, backward, apply


swiglu_fwd, swiglu_bwd, _swiglu = _define("swiglu", "up", gate_first=True)
attention_gate_fwd, attention_gate_bwd, _attention_gate = _define("attention_gate", "attn",
                                                                  gate_first=False)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (as transformers' MLP computes it: act_fn(gate) * up). Same shapes and
    dtypes; any strides."""
    return _swiglu(gate, up)


def attention_gate(attn: Tensor, gate: Tensor) -> Tensor:
    """attn * sigmoid(gate) (the gated attention's output gate). Same shapes and dtypes; any
    strides (gate may be the strided half of q_proj's output)."""
    return _attention_gate(attn, gate)
