"""flashdelta.rms_norm and flashdelta.rms_norm_gated: the two RMSNorms of Qwen3.5 / Qwen3.5-MoE /
Qwen3-Next (include/flashdelta/rms_norm.h), with the dtype casts of transformers' modules:

- `rms_norm(x, weight, eps)` = Qwen3_5RMSNorm: `(x * rsqrt(mean(x^2) + eps) * (1 + weight))` in
  fp32, cast to x's dtype (the zero-centred weight of the layer norms, final norm, q/k norms);
- `rms_norm_gated(x, gate, weight, eps)` = Qwen3_5RMSNormGated: normalise in fp32, cast to x's
  dtype, multiply by weight, multiply by silu(gate) in fp32, cast to x's dtype.

Custom ops (with fake implementations and autograd): `torch.ops.flashdelta.rms_norm_fwd` /
`rms_norm_bwd` (one pair for both: `gate` is None for rms_norm). The forward keeps only the
per-row rstd (4 bytes a row) for the backward; the weight gradient is reduced deterministically.
Eager calls take the cheaper autograd.Function path over the same implementation (_rows.py).
"""

from typing import Optional, Tuple

import torch

from . import _rows

Tensor = torch.Tensor


def _entry(gate: Optional[Tensor], name: str):
    prefix = "rms_norm" if gate is None else "rms_norm_gated"
    return getattr(_rows.load_extension(), f"{prefix}_{name}")


def _empty_forward(x: Tensor) -> Tuple[Tensor, Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty((rows,), dtype=torch.float32, device=x.device))


def _empty_backward(x: Tensor, gate: Optional[Tensor], weight: Tensor):
    dgate = (torch.empty(x.shape, dtype=x.dtype, device=x.device) if gate is not None
             else torch.empty((0,), dtype=x.dtype, device=x.device))
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), dgate,
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _forward_impl(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float
                  ) -> Tuple[Tensor, Tensor]:
    y, rstd = _empty_forward(x)
    x2 = _rows.as_rows(x.detach())
    g2 = None if gate is None else _rows.as_rows(gate.detach())
    _entry(gate, "forward")(x2, g2, weight.detach(), eps, y.view(x2.shape), rstd,
                            _rows._stream(x.device))
    return y, rstd


# Workspace bytes by (device, rows, dim): the backends size it from these alone. Cached so that a
# backward makes one call into the extension, not two (the backward call validates everything).
_workspace_bytes = {}
_WORKSPACE_CACHE_ENTRIES = 4096  # varlen batches bring many row counts: keep the table small


def _workspace(x2: Tensor, g2: Optional[Tensor], w: Tensor, eps: float) -> Tensor:
    key = (x2.device, x2.shape[0], x2.shape[1])
    nbytes = _workspace_bytes.get(key)
    if nbytes is None:
        nbytes = int(_entry(g2, "backward_workspace_bytes")(x2, g2, w, eps))
        if len(_workspace_bytes) >= _WORKSPACE_CACHE_ENTRIES:
            _workspace_bytes.clear()
        _workspace_bytes[key] = nbytes
    return torch.empty(nbytes, dtype=torch.uint8, device=x2.device)


def _backward_impl(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, rstd: Tensor,
                   dy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dgate, dweight = _empty_backward(x, gate, weight)
    x2 = _rows.as_rows(x.detach())
    g2 = None if gate is None else _rows.as_rows(gate.detach())
    w = weight.detach()
    _entry(gate, "backward")(
        x2, g2, w, eps, rstd.detach(), _rows.as_rows(dy.detach()), dx.view(x2.shape),
        None if gate is None else dgate.view(x2.shape), dweight, _workspace(x2, g2, w, eps),
        _rows._stream(x.device),
    )
    return dx, dgate, dweight


@torch.library.custom_op("flashdelta::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float
                 ) -> Tuple[Tensor, Tensor]:
    return _forward_impl(x, gate, weight, eps)


@rms_norm_fwd.register_fake
def _(x, gate, weight, eps):
    return _empty_forward(x)


@torch.library.custom_op("flashdelta::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float, rstd: Tensor,
                 dy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(x, gate, weight, eps, rstd, dy)


@rms_norm_bwd.register_fake
def _(x, gate, weight, eps, rstd, dy):
    return _empty_backward(x, gate, weight)


def _setup_context(ctx, inputs, output):
    x, gate, weight, eps = inputs
    ctx.save_for_backward(x, gate, weight, output[1])
    ctx.eps = eps


def _backward(ctx, dy, _drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    dx, dgate, dweight = rms_norm_bwd(x, gate, weight, ctx.eps, rstd, dy)
    return dx, (dgate if gate is not None else None), dweight, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The eager path (see _rows.eager): the same kernels without the dispatcher's cost. Returns
    y only; rstd stays in the context."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        y, rstd = _forward_impl(x, gate, weight, eps)
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, gate, weight, rstd = ctx.saved_tensors
        dx, dgate, dweight = _backward_impl(x, gate, weight, ctx.eps, rstd, dy)
        return dx, (dgate if gate is not None else None), dweight, None


def _apply(x: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float) -> Tensor:
    if _rows.eager():
        return _Eager.apply(x, gate, weight, eps)
    return rms_norm_fwd(x, gate, weight, eps)[0]


def _check(fn: str, x, gate, weight, eps) -> None:
    _rows.require_tensor(fn, "x", x)
    _rows.require_tensor(fn, "weight", weight)
    _rows.require_float(fn, "x", x)
    _rows.require_float(fn, "weight", weight)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have a non-empty last dimension, got {_rows.shape_of(x)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{fn}: weight must have shape [D] = [{x.shape[-1]}] (x.shape[-1]), "
                         f"got {_rows.shape_of(weight)}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}; all "
                         f"tensors must be on one device")
    if gate is not None:
        _rows.require_tensor(fn, "gate", gate)
        _rows.require_same(fn, "gate", gate, "x", x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a number >= 0, got {eps!r}")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero-centred RMSNorm over the last dimension: cast_x(x * rsqrt(mean(x^2) + eps) *
    (1 + weight)), computed in fp32 (transformers' Qwen3_5RMSNorm). Any leading shape and
    strides; gradients for x and weight."""
    _check("rms_norm", x, None, weight, eps)
    return _apply(x, None, weight.contiguous(), float(eps))


def rms_norm_gated(x: Tensor, gate: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """transformers' RMSNormGated (Gated DeltaNet output norm): n = cast_x(x * rsqrt(mean(x^2) +
    eps)); y = cast_x((weight * n) * silu(gate)) with silu in fp32. gate: x's shape and dtype."""
    _check("rms_norm_gated", x, gate, weight, eps)
    return _apply(x, gate, weight.contiguous(), float(eps))
