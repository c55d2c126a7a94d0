"""flashdelta.fused_linear_cross_entropy: the causal-LM loss head (LM-head linear + cross-entropy)
without the [tokens, vocab] logits.

    loss = fused_linear_cross_entropy(hidden, weight, target)          # mean over valid tokens
    loss = fused_linear_cross_entropy(hidden, weight, target, num_items_in_batch=n)  # sum / n

The semantics are transformers' `fixed_cross_entropy(F.linear(hidden, weight).float(), target)`:
logits in the inputs' dtype upcast to fp32, targets equal to `ignore_index` skipped, mean over
the others (NaN when there are none, as torch gives), or the sum divided by `num_items_in_batch`
when that is given. The loss is an fp32 scalar.

Custom ops (flashdelta._C underneath, see include/flashdelta/fused_linear_cross_entropy.h):

- `flashdelta::fused_linear_cross_entropy_fwd(hidden, weight, target, ignore_index, chunk_rows,
  weight_grad) -> (loss_sum [1], num_valid [1], d_hidden_sum [N, H] fp32, d_weight_sum)`:
  the loss sum and, in the same pass, its gradients (d_weight_sum [V, H] in the weight's dtype
  when weight_grad, else a 0-element stand-in);
- `flashdelta::fused_linear_cross_entropy_bwd(grad_scale, d_hidden_sum, d_weight_sum,
  hidden_dtype) -> (d_hidden, d_weight)`: the stored gradients times the incoming gradient of
  loss_sum (a 1-element fp32 tensor, read on the device: no host synchronisation);
- `flashdelta::fused_linear_cross_entropy_bwd_(...the same...) -> d_hidden`: the same with
  d_weight_sum scaled in place (it mutates its argument). Eager autograd uses this one and returns
  d_weight_sum as the weight's gradient, so a trained weight costs one [V, H] buffer, not two; a
  second backward through the same loss (retain_graph=True) with a trained weight then raises
  RuntimeError. Traced backwards (torch.compile) use the out-of-place op.

The division of the sum by the count (or by num_items_in_batch) is an ordinary torch division
after the op, so autograd hands the op the right scale.
"""

from typing import Optional, Union

import torch

from ._extension import current_stream as _stream
from ._extension import load_extension

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("flashdelta::fused_linear_cross_entropy_fwd", mutates_args=())
def fused_linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int, chunk_rows: int,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    C = load_extension()
    loss_sum, num_valid, d_hidden_sum, d_weight_sum = _empty_forward_outputs(
        hidden, weight, weight_grad
    )
    args = (hidden.detach(), weight.detach(), target.detach(), ignore_index, chunk_rows,
            weight_grad)
    nbytes = C.fused_linear_cross_entropy_workspace_bytes(*args)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=hidden.device) if nbytes else None
    C.fused_linear_cross_entropy_forward(
        *args, loss_sum, num_valid, d_hidden_sum, d_weight_sum if weight_grad else None,
        workspace, _stream(hidden.device),
    )
    return loss_sum, num_valid, d_hidden_sum, d_weight_sum


def _empty_forward_outputs(hidden: Tensor, weight: Tensor, weight_grad: bool):
    device = hidden.device
    loss_sum = torch.empty((1,), dtype=torch.float32, device=device)
    num_valid = torch.empty((1,), dtype=torch.float32, device=device)
    d_hidden_sum = torch.empty(hidden.shape, dtype=torch.float32, device=device)
    shape = weight.shape if weight_grad else (0,)
    d_weight_sum = torch.empty(shape, dtype=weight.dtype, device=device)
    return loss_sum, num_valid, d_hidden_sum, d_weight_sum


@fused_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, ignore_index, chunk_rows, weight_grad):
    return _empty_forward_outputs(hidden, weight, weight_grad)


def _run_backward(grad_scale, d_hidden_sum, d_weight_sum, d_hidden, d_weight):
    has_weight = d_weight_sum.dim() == 2
    load_extension().fused_linear_cross_entropy_backward(
        grad_scale.detach().to(torch.float32).reshape(1).contiguous(), d_hidden_sum.detach(),
        d_weight_sum.detach() if has_weight else None, d_hidden,
        d_weight.detach() if has_weight else None, _stream(d_hidden_sum.device),
    )


def _empty_d_hidden(d_hidden_sum: Tensor, hidden_dtype: torch.dtype):
    return torch.empty(d_hidden_sum.shape, dtype=hidden_dtype, device=d_hidden_sum.device)


@torch.library.custom_op(
    "flashdelta::fused_linear_cross_entropy_bwd_", mutates_args=("d_weight_sum",)
)
def fused_linear_cross_entropy_bwd_(
    grad_scale: Tensor, d_hidden_sum: Tensor, d_weight_sum: Tensor, hidden_dtype: torch.dtype
) -> Tensor:
    d_hidden = _empty_d_hidden(d_hidden_sum, hidden_dtype)
    _run_backward(grad_scale, d_hidden_sum, d_weight_sum, d_hidden, d_weight_sum)  # in place
    return d_hidden


@fused_linear_cross_entropy_bwd_.register_fake
def _(grad_scale, d_hidden_sum, d_weight_sum, hidden_dtype):
    return _empty_d_hidden(d_hidden_sum, hidden_dtype)


@torch.library.custom_op("flashdelta::fused_linear_cross_entropy_bwd", mutates_args=())
def fused_linear_cross_entropy_bwd(
    grad_scale: Tensor, d_hidden_sum: Tensor, d_weight_sum: Tensor, hidden_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    d_hidden, d_weight = _empty_gradients(d_hidden_sum, d_weight_sum, hidden_dtype)
    _run_backward(grad_scale, d_hidden_sum, d_weight_sum, d_hidden, d_weight)
    return d_hidden, d_weight


def _empty_gradients(d_hidden_sum: Tensor, d_weight_sum: Tensor, hidden_dtype: torch.dtype):
    d_weight = torch.empty_like(d_weight_sum, memory_format=torch.contiguous_format)
    return _empty_d_hidden(d_hidden_sum, hidden_dtype), d_weight


@fused_linear_cross_entropy_bwd.register_fake
def _(grad_scale, d_hidden_sum, d_weight_sum, hidden_dtype):
    return _empty_gradients(d_hidden_sum, d_weight_sum, hidden_dtype)


def _setup_context(ctx, inputs, output):
    hidden, weight, target, ignore_index, chunk_rows, weight_grad = inputs
    _, _, d_hidden_sum, d_weight_sum = output
    ctx.save_for_backward(d_hidden_sum, d_weight_sum)
    # Only loss_sum's gradient is ever non-zero (the gradient buffers are outputs for autograd's
    # sake, not for differentiation): without this autograd would hand the backward zero-filled
    # gradients of d_hidden_sum and d_weight_sum, a second [V, H] buffer (1 GiB at 248k x 2048).
    ctx.set_materialize_grads(False)
    ctx.hidden_dtype = hidden.dtype
    ctx.weight_grad = weight_grad
    ctx.weight_grad_taken = False


def _is_eager(t: Tensor) -> bool:
    """A plain tensor outside any tracing (torch.compile / export run the backward on fake or
    functional tensor subclasses)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _backward(ctx, grad_loss_sum, grad_num_valid, grad_d_hidden_sum, grad_d_weight_sum):
    if ctx.weight_grad_taken:  # (before unpacking: torch would report the in-place change)
        raise RuntimeError(
            "fused_linear_cross_entropy: a second backward through the same loss with a trained "
            "weight is not supported (its weight gradient was scaled in place by the first); "
            "compute the loss again instead of retain_graph=True"
        )
    d_hidden_sum, d_weight_sum = ctx.saved_tensors
    if grad_loss_sum is None:
        grad_loss_sum = torch.zeros((1,), dtype=torch.float32, device=d_hidden_sum.device)
    if not ctx.weight_grad:
        d_hidden, _ = fused_linear_cross_entropy_bwd(
            grad_loss_sum, d_hidden_sum, d_weight_sum, ctx.hidden_dtype
        )
        return d_hidden, None, None, None, None, None
    if not _is_eager(d_weight_sum):
        # Traced graphs may not return a saved tensor mutated in the backward (AOTAutograd's
        # partitioner rejects it): a fresh weight gradient there.
        d_hidden, d_weight = fused_linear_cross_entropy_bwd(
            grad_loss_sum, d_hidden_sum, d_weight_sum, ctx.hidden_dtype
        )
        return d_hidden, d_weight, None, None, None, None
    # Eager: the weight's gradient is the forward's d_weight_sum buffer scaled in place and handed
    # to autograd as is (which takes it as weight.grad without a copy): a trained weight costs one
    # [V, H] buffer, not two. Hence a second backward through the same graph (retain_graph=True)
    # cannot scale it again (checked above).
    ctx.weight_grad_taken = True
    d_hidden = fused_linear_cross_entropy_bwd_(
        grad_loss_sum, d_hidden_sum, d_weight_sum, ctx.hidden_dtype
    )
    return d_hidden, d_weight_sum, None, None, None, None


fused_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(hidden, weight, target, ignore_index, reduction):
    fn = "fused_linear_cross_entropy"
    for name, x in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{fn}: weight must have hidden's dtype ({hidden.dtype}), got {weight.dtype}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: target must be int64 or int32, got {target.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: weight must have shape [V, H] with H = {hidden.shape[-1]} (hidden's last "
            f"dimension), got {list(weight.shape)}"
        )
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{fn}: target must have shape {list(hidden.shape[:-1])} (hidden's leading "
            f"dimensions), got {list(target.shape)}"
        )
    for name, x in (("weight", weight), ("target", target)):
        if x.device != hidden.device:
            raise ValueError(
                f"{fn}: {name} is on {x.device} but hidden is on {hidden.device}; all tensors "
                "must be on one device"
            )
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    num_items_in_batch: Optional[Union[Tensor, int, float]] = None,
    reduction: str = "mean",
    chunk_rows: int = 0,
) -> Tensor:
    r"""Cross-entropy of `hidden @ weight.T` against `target`, with autograd, without the logits.

    Args:
        hidden: [..., H] hidden states (bf16 / fp16 / fp32), any strides.
        weight: [V, H] LM-head weight, hidden's dtype. Its gradient is computed (in the forward
            pass) only when it requires grad.
        target: [...] (hidden's leading dims) class indices in [0, V), or ignore_index. Already
            shifted: for causal-LM labels use :func:`causal_lm_loss`.
        ignore_index: targets with this value count neither in the loss nor in the mean.
        num_items_in_batch: when given, the loss is the sum over valid tokens divided by it
            (transformers' gradient-accumulation convention) and `reduction` is not used.
        reduction: "mean" (over valid tokens; NaN when there are none, as torch) or "sum".
        chunk_rows: tokens per chunk (0: chosen so one chunk's logits stay within a bound).

    Returns:
        The loss, an fp32 scalar.
    """
    _check(hidden, weight, target, ignore_index, reduction)
    H = hidden.shape[-1]
    hidden_2d = hidden.reshape(-1, H)
    if hidden_2d.shape[0] > 1 and H > 1 and hidden_2d.stride(1) != 1:
        hidden_2d = hidden_2d.contiguous()
    weight_grad = bool(torch.is_grad_enabled() and weight.requires_grad)
    loss_sum, num_valid, _, _ = fused_linear_cross_entropy_fwd(
        hidden_2d, weight.contiguous(), target.reshape(-1), int(ignore_index), int(chunk_rows),
        weight_grad,
    )
    loss_sum = loss_sum.squeeze(0)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    if reduction == "sum":
        return loss_sum
    return loss_sum / num_valid.squeeze(0)


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Optional[Tensor],
    ignore_index: int = -100,
    num_items_in_batch: Optional[Union[Tensor, int, float]] = None,
    shift_labels: Optional[Tensor] = None,
    chunk_rows: int = 0,
) -> Tensor:
    """transformers' ForCausalLMLoss(F.linear(hidden, weight), labels, ...) without the logits:
    labels [B, T] are shifted left by one (the last position gets ignore_index) unless
    `shift_labels` is given; hidden is [B, T, H]."""
    if shift_labels is None:
        if not isinstance(labels, Tensor):
            raise TypeError("causal_lm_loss: labels must be a torch.Tensor (or give shift_labels)")
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.numel() != hidden.numel() // max(1, hidden.shape[-1]):
        raise ValueError(
            f"causal_lm_loss: labels must have one entry per token of hidden "
            f"{list(hidden.shape[:-1])}, got {list(shift_labels.shape)}"
        )
    return fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1), ignore_index,
        num_items_in_batch, chunk_rows=chunk_rows,
    )
