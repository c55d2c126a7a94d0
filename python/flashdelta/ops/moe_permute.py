"""flashdelta.moe_permute / moe_unpermute: token permutation for mixture-of-experts.

`moe_permute(hidden [T, H], indices [T, top_k], num_experts)` sorts the T * top_k (token, slot)
pairs by expert with a counting sort (no argsort, no host synchronisation, deterministic) and
gathers the rows: returns `(permuted [T * top_k, H], sorted_pairs, pair_position,
expert_offsets [E + 1])` (all int32). Expert ids outside [0, E) are dropped (sorted last, after
expert_offsets[E]), as transformers' expert-parallel sentinels are.

`moe_unpermute(rows, weights, pair_position, num_tokens)` is the inverse with the routing-weight
combine: out[t] = sum_j weights[t, j] * rows[pair_position[t * top_k + j]], summed in slot order
in fp32 (weights None: 1). Both are differentiable (hidden; rows and weights).

Custom ops: `torch.ops.flashdelta.moe_permute`, `moe_unpermute`, `moe_unpermute_bwd` (what
torch.compile traces); eager calls run the same implementations through plain
autograd.Functions (_eager.py).
"""

from typing import Optional, Tuple

import torch

from . import _eager
from ._moe_common import extension_module, stream_of, to_dlpack

Tensor = torch.Tensor


def _opt_dlpack(t):
    """to_dlpack for an optional tensor argument (None, and anything not a tensor, as is)."""
    return to_dlpack(t) if isinstance(t, Tensor) else t


# moe_permute's workspace bytes by (on cuda, T, top_k, E): all they depend on. Filled from the
# extension's answer (which also checks the arguments) the first time a key is seen.
_permute_workspace_bytes = {}


def _permute_outputs(hidden: Tensor, indices: Tensor, num_experts: int):
    P = indices.shape[0] * indices.shape[1]
    dev = hidden.device
    return (
        torch.empty(P, hidden.shape[1], dtype=hidden.dtype, device=dev),
        torch.empty(P, dtype=torch.int32, device=dev),
        torch.empty(P, dtype=torch.int32, device=dev),
        torch.empty(num_experts + 1, dtype=torch.int32, device=dev),
    )


def _permute_forward(
    hidden: Tensor, indices: Tensor, num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    C = extension_module()
    outputs = _permute_outputs(hidden, indices, num_experts)
    permuted, sorted_pairs, pair_position, expert_offsets = outputs
    key = (hidden.is_cuda, hidden.shape[0], indices.shape[-1], num_experts)
    nbytes = _permute_workspace_bytes.get(key)
    if nbytes is None:
        nbytes = C.moe_permute_workspace_bytes(to_dlpack(hidden), to_dlpack(indices), num_experts)
        if len(_permute_workspace_bytes) >= 4096:  # token counts that vary step to step
            _permute_workspace_bytes.clear()
        _permute_workspace_bytes[key] = nbytes
    workspace = (to_dlpack(torch.empty(nbytes, dtype=torch.uint8, device=hidden.device))
                 if nbytes else None)
    C.moe_permute(to_dlpack(hidden), to_dlpack(indices), num_experts, to_dlpack(permuted),
                  to_dlpack(sorted_pairs), to_dlpack(pair_position), to_dlpack(expert_offsets),
                  workspace, stream_of(hidden))
    return outputs


moe_permute_fwd = torch.library.custom_op("flashdelta::moe_permute", mutates_args=())(
    _permute_forward)


@moe_permute_fwd.register_fake
def _(hidden, indices, num_experts):
    return _permute_outputs(hidden, indices, num_experts)


def _permute_setup(ctx, inputs, output):
    hidden, indices, _ = inputs
    _, sorted_pairs, pair_position, expert_offsets = output
    ctx.save_for_backward(pair_position)
    ctx.num_tokens = hidden.shape[0]
    ctx.mark_non_differentiable(sorted_pairs, pair_position, expert_offsets)


def _permute_backward_with(unpermute):
    def backward(ctx, d_permuted, *_):
        (pair_position,) = ctx.saved_tensors
        if d_permuted is None:
            return None, None, None
        return unpermute(d_permuted.contiguous(), None, pair_position, ctx.num_tokens), None, None

    return backward


def _unpermute_forward(
    rows: Tensor, weights: Optional[Tensor], pair_position: Tensor, num_tokens: int
) -> Tensor:
    out = torch.empty(num_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    extension_module().moe_unpermute_forward(
        to_dlpack(rows), _opt_dlpack(weights), _opt_dlpack(pair_position), to_dlpack(out),
        stream_of(rows),
    )
    return out


moe_unpermute_fwd = torch.library.custom_op("flashdelta::moe_unpermute", mutates_args=())(
    _unpermute_forward)


@moe_unpermute_fwd.register_fake
def _(rows, weights, pair_position, num_tokens):
    return rows.new_empty((num_tokens, rows.shape[1]))


def _unpermute_backward_impl(
    rows: Tensor, weights: Optional[Tensor], pair_position: Tensor, d_out: Tensor
) -> Tuple[Tensor, Tensor]:
    d_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
    if weights is not None:
        d_weights = torch.empty(*weights.shape, dtype=weights.dtype, device=rows.device)
    else:
        d_weights = torch.empty(0, dtype=rows.dtype, device=rows.device)
    extension_module().moe_unpermute_backward(
        to_dlpack(rows), _opt_dlpack(weights), to_dlpack(pair_position), to_dlpack(d_out),
        to_dlpack(d_rows), to_dlpack(d_weights) if weights is not None else None,
        stream_of(rows),
    )
    return d_rows, d_weights


moe_unpermute_bwd = torch.library.custom_op("flashdelta::moe_unpermute_bwd", mutates_args=())(
    _unpermute_backward_impl)


@moe_unpermute_bwd.register_fake
def _(rows, weights, pair_position, d_out):
    d_weights = (weights.new_empty(weights.shape) if weights is not None
                 else rows.new_empty((0,)))
    return rows.new_empty(rows.shape), d_weights


def _unpermute_setup(ctx, inputs, output):
    rows, weights, pair_position, _ = inputs
    ctx.save_for_backward(rows, weights, pair_position)


def _unpermute_backward_with(unpermute_bwd):
    def backward(ctx, d_out):
        rows, weights, pair_position = ctx.saved_tensors
        d_rows, d_weights = unpermute_bwd(rows, weights, pair_position, d_out.contiguous())
        return d_rows, (d_weights if weights is not None else None), None, None

    return backward


moe_permute_fwd.register_autograd(_permute_backward_with(moe_unpermute_fwd),
                                  setup_context=_permute_setup)
moe_unpermute_fwd.register_autograd(_unpermute_backward_with(moe_unpermute_bwd),
                                    setup_context=_unpermute_setup)
_EagerPermute = _eager.twin("_EagerPermute", _permute_forward, _permute_setup,
                            _permute_backward_with(_unpermute_forward))
_EagerUnpermute = _eager.twin("_EagerUnpermute", _unpermute_forward, _unpermute_setup,
                              _unpermute_backward_with(_unpermute_backward_impl))


def moe_permute(
    hidden: Tensor, indices: Tensor, num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort (token, slot) pairs by expert and gather rows. See the module docstring."""
    if hidden.dim() != 2 or indices.dim() != 2:
        raise ValueError(f"moe_permute: hidden must be [T, H] and indices [T, top_k], got "
                         f"{list(hidden.shape)} and {list(indices.shape)}")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if _eager.plain():
        hidden, indices = _eager.unwrap(hidden), _eager.unwrap(indices)
        if _eager.untracked(hidden):
            return _permute_forward(hidden, indices, int(num_experts))
        return _EagerPermute.apply_plain(hidden, indices, int(num_experts))
    if _eager.eager():
        return _EagerPermute.apply(hidden, indices, int(num_experts))
    return moe_permute_fwd(hidden, indices, int(num_experts))


def moe_unpermute(
    rows: Tensor, weights: Optional[Tensor], pair_position: Tensor, num_tokens: int
) -> Tensor:
    """Weighted combine of sorted rows back to tokens. See the module docstring."""
    if _eager.plain():
        rows, weights = _eager.unwrap(rows.contiguous()), _eager.unwrap(weights)
        pair_position = _eager.unwrap(pair_position)
        if _eager.untracked(rows, weights):
            return _unpermute_forward(rows, weights, pair_position, int(num_tokens))
        return _EagerUnpermute.apply_plain(rows, weights, pair_position, int(num_tokens))
    if _eager.eager():
        return _EagerUnpermute.apply(rows.contiguous(), weights, pair_position, int(num_tokens))
    return moe_unpermute_fwd(rows.contiguous(), weights, pair_position, int(num_tokens))
