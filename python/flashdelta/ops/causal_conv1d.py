"""flashdelta.causal_conv1d / flashdelta.causal_conv1d_update: the depthwise causal convolution
(+ SiLU) of Gated DeltaNet layers, on transformers' [B, C, T] layout, with a backward pass, packed
sequences (cu_seqlens) and the in-place decode update.

Custom ops (with fake implementations; the forward with autograd):
`torch.ops.flashdelta.causal_conv1d_fwd`, `..._bwd` and `torch.ops.flashdelta.causal_conv1d_update`
(which mutates conv_state), calling flashdelta._C's entry points of the same names. The math
lives in include/flashdelta/causal_conv1d.h; the references are transformers' own functions
(tests/python/test_causal_conv1d.py).
"""

from typing import Any, Mapping, Optional

import torch

from ._gated_delta_rule import _detached, _stream, _values_readable, _workspace, load_extension

Tensor = torch.Tensor

_ACTIVATIONS = (None, "silu", "swish")

# Keywords of transformers' callers (the GatedDeltaNet passes its **kwargs on) and of the
# causal-conv1d package that change nothing here.
_IGNORED_KWARGS = frozenset(
    {
        "use_cache", "cache_position", "position_ids", "num_items_in_batch",
        "output_hidden_states", "output_attentions", "output_router_logits", "cu_seq_lens_k",
        "max_length_q", "max_length_k", "is_causal", "cu_seqlens_cpu", "chunk_indices",
    }
)
# Keywords that would change the result: accepted only at the value that means "off".
_DEFAULT_ONLY_KWARGS = {
    "seq_idx": None,  # causal-conv1d's per-token sequence index: pass cu_seqlens instead
    "initial_states": None,
    "return_final_states": False,
    "final_states_out": None,
    "initial_state": None,  # FLA's names
    "output_final_state": False,
    "residual": None,
}
_UPDATE_DEFAULT_ONLY_KWARGS = {"cache_seqlens": None, "conv_state_indices": None}


def _check_kwargs(fn: str, kwargs: Mapping[str, Any], default_only: Mapping[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS:
            continue
        if name in default_only:
            default = default_only[name]
            if value is default or (isinstance(default, bool) and value is False):
                continue
            raise ValueError(
                f"{fn}: {name}={value!r} is not supported by flashdelta (it would change the "
                f"result); only {name}={default!r} is"
            )
        raise TypeError(f"{fn}() got an unexpected keyword argument '{name}'")


def _silu(fn: str, activation: Optional[str]) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"{fn}: activation must be None, 'silu' or 'swish', got {activation!r}"
        )
    return activation is not None


def _check_cu_seqlens(fn: str, x: Tensor, cu_seqlens: Optional[Tensor]) -> None:
    """Shape, dtype and (where reading them costs no synchronisation) values of cu_seqlens."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"{fn}: cu_seqlens must be a 1-d tensor [N + 1] with N >= 1, got shape "
            f"{list(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"{fn}: cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}"
        )
    if x.dim() == 3 and x.shape[0] != 1:
        raise ValueError(
            f"{fn}: cu_seqlens needs B = 1 (sequences packed along T), got x of shape "
            f"{list(x.shape)}"
        )
    if _values_readable(cu_seqlens):
        offsets = cu_seqlens.tolist()
        T = x.shape[-1]
        if offsets[0] != 0 or offsets[-1] != T or any(
                b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(
                f"{fn}: cu_seqlens must start at 0, be non-decreasing and end at T = {T}, got "
                f"{offsets}"
            )


# ----------------------------------------------------------------------------- custom ops


def _like(x: Tensor) -> Tensor:
    """An output with x's shape, dtype and (for a dense x, such as transformers' transposed
    [B, T, C] view) memory layout, so the caller's transpose back is free."""
    return torch.empty_like(x, memory_format=torch.preserve_format)


@torch.library.custom_op(
    "flashdelta::causal_conv1d_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? cu_seqlens, bool silu) -> Tensor",
)
def causal_conv1d_fwd(x, weight, bias, cu_seqlens, silu):
    y = _like(x)
    load_extension().causal_conv1d_forward(
        *_detached(x, weight, bias, cu_seqlens), silu, y, _stream(x.device))
    return y


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, cu_seqlens, silu):
    return _like(x)


def _empty_gradients(x, weight, bias):
    dbias = (torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if bias is not None
             else torch.empty((0,), dtype=weight.dtype, device=weight.device))
    return _like(x), torch.empty(weight.shape, dtype=weight.dtype, device=weight.device), dbias


@torch.library.custom_op(
    "flashdelta::causal_conv1d_bwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? cu_seqlens, bool silu, Tensor dy) "
           "-> (Tensor, Tensor, Tensor)",
)
def causal_conv1d_bwd(x, weight, bias, cu_seqlens, silu, dy):
    dx, dweight, dbias = _empty_gradients(x, weight, bias)
    C = load_extension()
    args = (*_detached(x, weight, bias, cu_seqlens), silu)
    workspace = _workspace(C.causal_conv1d_backward_workspace_bytes(*args), x.device)
    C.causal_conv1d_backward(*args, dy.detach(), dx, dweight,
                             dbias if bias is not None else None, workspace, _stream(x.device))
    return dx, dweight, dbias


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, cu_seqlens, silu, dy):
    return _empty_gradients(x, weight, bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, cu_seqlens, silu = inputs
    ctx.save_for_backward(x, weight, bias, cu_seqlens)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, cu_seqlens = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_bwd(x, weight, bias, cu_seqlens, ctx.silu, dy)
    return dx, dweight, (dbias if bias is not None else None), None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op(
    "flashdelta::causal_conv1d_update", mutates_args=("conv_state",),
    schema="(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor",
)
def causal_conv1d_update_op(x, conv_state, weight, bias, silu):
    y = _like(x)
    load_extension().causal_conv1d_update(
        x.detach(), conv_state.detach(), *_detached(weight, bias), silu, y, _stream(x.device))
    return y


@causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return _like(x)


# ----------------------------------------------------------------------------- public API


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    cu_seqlens: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    r"""Depthwise causal convolution over time, optionally followed by SiLU, with autograd.

    ``y[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (W - 1) + k])``, with inputs
    before the start of t's sequence taken as 0. The call of transformers' ``causal_conv1d_fn``.

    Args:
        x: [B, C, T], bf16 / fp16 / fp32 (fp64 on CPU), any strides. Gated DeltaNet passes a
            transposed view of a [B, T, C] tensor: it is read in place, never copied, and y (and
            the gradient of x) get the same layout.
        weight: [C, W], bf16 / fp16 / fp32 (may differ from x's dtype). W in 2..4 on CUDA, any
            W >= 1 on the CPU.
        bias: [C] in weight's dtype, or None.
        activation: None, "silu" or "swish" (the same).
        cu_seqlens: int32 / int64 [N + 1] offsets of N sequences packed along T (then B = 1), on
            x's device: the convolution does not reach across them.
        **kwargs: transformers' model keywords are ignored; causal-conv1d's and FLA's state
            keywords (seq_idx, initial_states, return_final_states, ...) are accepted only at
            their default (ValueError otherwise); others raise TypeError.

    Returns:
        y [B, C, T] in x's dtype.
    """
    fn = "causal_conv1d"
    _check_kwargs(fn, kwargs, _DEFAULT_ONLY_KWARGS)
    silu = _silu(fn, activation)
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check_cu_seqlens(fn, x, cu_seqlens)
    return causal_conv1d_fwd(x, weight, bias, cu_seqlens, silu)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    **kwargs,
) -> Tensor:
    r"""One decode step: the convolution of L new tokens against the last S inputs kept in
    conv_state, which is updated IN PLACE (shifted left by L, the new inputs appended).

    The call and the result of transformers' ``causal_conv1d_update`` (torch version): with
    ``xs = cat([conv_state, x], -1)``, ``y = act(conv1d(xs, weight)[..., -L:])`` and
    ``conv_state <- xs[..., -S:]``.

    Args:
        x: [B, C, L] (or [B, C], one token, as causal-conv1d takes it), any strides.
        conv_state: [B, C, S] with S >= W - 1, any float dtype; modified in place.
        weight, bias, activation: as for :func:`causal_conv1d`.

    Returns:
        y with x's shape and dtype.
    """
    fn = "causal_conv1d_update"
    _check_kwargs(fn, kwargs, _UPDATE_DEFAULT_ONLY_KWARGS)
    silu = _silu(fn, activation)
    if isinstance(x, Tensor) and x.dim() == 2:
        return causal_conv1d_update_op(x.unsqueeze(-1), conv_state, weight, bias, silu).squeeze(-1)
    return causal_conv1d_update_op(x, conv_state, weight, bias, silu)
