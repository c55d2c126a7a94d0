"""flashdelta.moe_experts: a mixture-of-experts layer's experts over transformers' parameter
layouts (gate_up_proj [E, 2I, H], down_proj [E, H, I]; no transposed copies).

- `moe_grouped_experts(permuted, expert_offsets, gate_up_proj, down_proj)`: the grouped GEMMs
  with the fused SwiGLU on rows sorted by expert (moe_permute's output); differentiable in the
  rows and, when they require grad, the weights (frozen weights cost no weight-gradient GEMMs).
- `moe_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)`: what
  transformers' experts modules compute (Qwen3_5MoeExperts.forward): permute, experts, weighted
  combine. Returns [T, H] in hidden's dtype.

Custom ops: `torch.ops.flashdelta.moe_experts` and `torch.ops.flashdelta.moe_experts_bwd`.
"""

from typing import Optional, Tuple

import torch

from ._moe_common import load_extension, current_stream
from .moe_permute import moe_permute, moe_unpermute

Tensor = torch.Tensor


def _forward_outputs(hidden: Tensor, gate_up_proj: Tensor):
    N, H = hidden.shape
    two_i = gate_up_proj.shape[1]
    new = lambda *shape: torch.empty(shape, dtype=hidden.dtype, device=hidden.device)  # noqa: E731
    return new(N, H), new(N, two_i), new(N, two_i // 2)


@torch.library.custom_op("flashdelta::moe_experts", mutates_args=())
def moe_experts_fwd(
    hidden: Tensor, expert_offsets: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tuple[Tensor, Tensor]:
    out, gate_up, act = _forward_outputs(hidden, gate_up_proj)
    load_extension().moe_experts_forward(
        hidden, expert_offsets, gate_up_proj, down_proj,
        out, gate_up, act, current_stream(hidden.device),
    )
    return out, gate_up


@moe_experts_fwd.register_fake
def _(hidden, expert_offsets, gate_up_proj, down_proj):
    out, gate_up, _ = _forward_outputs(hidden, gate_up_proj)
    return out, gate_up


@torch.library.custom_op("flashdelta::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(
    hidden: Optional[Tensor], expert_offsets: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
    d_out: Tensor, gate_up: Tensor, weight_grads: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden (the forward's rows) is read only for the weight gradients: None when frozen."""
    if d_out.stride(-1) != 1:  # the kernels read d_out rows with unit stride
        d_out = d_out.contiguous()
    if hidden is None:
        if weight_grads:
            raise ValueError("moe_experts_bwd: the weight gradients need hidden, got None")
        # The extension takes N, H, dtype and device from `hidden` and reads its elements only
        # for d_gate_up_proj: d_out, [N, H] of the same dtype and device, stands in.
        hidden = d_out
    d_hidden, d_gate_up, act = _forward_outputs(hidden, gate_up_proj)
    if weight_grads:
        d_w1 = torch.empty(gate_up_proj.shape, dtype=hidden.dtype, device=hidden.device)
        d_w2 = torch.empty(down_proj.shape, dtype=hidden.dtype, device=hidden.device)
    else:
        d_w1 = d_w2 = None
    load_extension().moe_experts_backward(
        hidden, expert_offsets, gate_up_proj, down_proj,
        d_out, gate_up, d_hidden, d_w1, d_w2, d_gate_up, act,
        current_stream(hidden.device),
    )
    if not weight_grads:  # custom ops return tensors: 0-element stand-ins
        d_w1 = hidden.new_empty((0,))
        d_w2 = hidden.new_empty((0,))
    return d_hidden, d_w1, d_w2


@moe_experts_bwd.register_fake
def _(hidden, expert_offsets, gate_up_proj, down_proj, d_out, gate_up, weight_grads):
    if weight_grads:
        return (d_out.new_empty(d_out.shape), gate_up_proj.new_empty(gate_up_proj.shape),
                down_proj.new_empty(down_proj.shape))
    return d_out.new_empty(d_out.shape), d_out.new_empty((0,)), d_out.new_empty((0,))


def _weight_grads(ctx) -> bool:
    return bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])


def _setup_context(ctx, inputs, output):
    hidden, expert_offsets, gate_up_proj, down_proj = inputs
    _, gate_up = output
    # Frozen experts (the LoRA case) need no forward rows in the backward: not keeping them
    # frees [N, H] (268 MB a layer at 8192 tokens of Qwen3.5-35B-A3B) until then.
    kept = hidden if _weight_grads(ctx) else None
    ctx.save_for_backward(kept, expert_offsets, gate_up_proj, down_proj, gate_up)
    ctx.mark_non_differentiable(gate_up)


def _backward(ctx, d_out, _d_gate_up):
    hidden, expert_offsets, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
    weight_grads = _weight_grads(ctx)
    d_hidden, d_w1, d_w2 = moe_experts_bwd(
        hidden, expert_offsets, gate_up_proj, down_proj, d_out, gate_up, weight_grads
    )
    if not weight_grads:
        d_w1 = d_w2 = None
    return (
        d_hidden,
        None,
        d_w1 if ctx.needs_input_grad[2] else None,
        d_w2 if ctx.needs_input_grad[3] else None,
    )


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def _weight(w: Tensor) -> Tensor:
    # The kernels read weights with unit stride along the last dimension (transformers' layout).
    return w if w.stride(-1) == 1 else w.contiguous()


def moe_grouped_experts(
    permuted: Tensor, expert_offsets: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """Experts on rows sorted by expert: silu(x W1_e[:I]^T) * (x W1_e[I:]^T) W2_e^T per row."""
    if permuted.stride(-1) != 1:
        permuted = permuted.contiguous()
    out, _ = moe_experts_fwd(permuted, expert_offsets, _weight(gate_up_proj), _weight(down_proj))
    return out


def moe_experts(
    hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up_proj: Tensor,
    down_proj: Tensor,
) -> Tensor:
    """transformers' experts forward: sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x_t)."""
    num_experts = gate_up_proj.shape[0]
    permuted, _, pair_position, expert_offsets = moe_permute(hidden, top_k_index, num_experts)
    rows = moe_grouped_experts(permuted, expert_offsets, gate_up_proj, down_proj)
    weights = top_k_weights if top_k_weights.dtype != torch.float64 else top_k_weights.float()
    return moe_unpermute(rows, weights, pair_position, hidden.shape[0])
