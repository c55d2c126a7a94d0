"""Eager twins of custom ops: the same implementation and autograd without the dispatcher.

A torch.library custom op is what torch.compile traces and what opcheck tests, but its eager call
is slow on the host: the dispatcher calls into Python at its Autograd and backend keys, wraps the
op in a generated autograd.Function and checks every output for aliasing. On the H100 host the
routing ops (router, permute, combine) spent ~1.9 ms of host time per forward + backward for
~0.8 ms of kernels. So outside torch.compile the public functions run the op's implementation
through a plain torch.autograd.Function built here (`twin`), with the op's own setup_context and
a backward that calls the backward implementations directly; under torch.compile they call the
custom op. `eager()` tells which.

Two more host costs are trimmed the same way (both behave as before):
- `Function.apply` is a Python preamble (default-argument binding, a functorch check, a pass
  that unwraps dead functorch wrappers) before the C apply: ~7 us a call. Where no functorch
  transform is active (`plain()`), the public functions call the twin's `apply_plain` (the C
  apply itself) on `unwrap(t)` of each tensor argument: what the preamble does there.
- Where no graph would be recorded (`untracked`: grad mode off, as in the first pass of activation
  checkpointing, or no input requiring grad; and no forward-AD level open), the public
  functions call the implementation itself: Function.apply would only wrap its outputs (~10 us).
- The outputs marked non-differentiable get no zero-filled gradients (see twin()).
- `once_differentiable` enters `torch.no_grad()` (~5 us) around every backward, though the
  engine runs backward with grad mode off unless create_graph=True; the twin's backward takes
  once_differentiable's path only when grad mode is on.
"""

from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["eager", "plain", "twin", "untracked", "unwrap"]

_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
# torch internals the shortcuts rely on (torch 2.4 to 2.11 have them). Where one is missing the
# shortcuts are off: plain() is False and the public functions take Function.apply as before.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
# Function.apply's C half (THPFunction_apply), bound per class in twin(); None where a torch
# version does not expose it, and apply_plain is then Function.apply.
_c_apply = torch._C._FunctionBase.__dict__.get("apply")
_shortcuts = _functorch_active is not None and _unwrap_if_dead is not None


def unwrap(arg):
    """A tensor argument with its dead functorch wrappers removed, as Function.apply passes it
    on; anything else as is (only called where plain() holds)."""
    return _unwrap_if_dead(arg) if isinstance(arg, torch.Tensor) else arg


def eager() -> bool:
    """True when a public function should take the twin (not tracing)."""
    return not _is_compiling()


def plain() -> bool:
    """True when a public function may take the twin's apply_plain: not tracing, and no
    functorch transform (vmap, grad, ...) active."""
    return _shortcuts and not _is_compiling() and not _functorch_active()


def untracked(t, u=None) -> bool:
    """True when a twin's apply would record nothing for inputs t (and u): grad mode off or
    neither requires grad, and no forward-AD level open (a dual tensor needs the Function, which
    raises that it has no jvp)."""
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return False
    return not _grad_enabled() or not (getattr(t, "requires_grad", False)
                                       or getattr(u, "requires_grad", False))


def twin(name: str, forward: Callable, setup_context: Callable,
         backward: Callable) -> type:
    """A torch.autograd.Function running `forward(*args)` (the custom op's implementation),
    `setup_context(ctx, args, output)` and `backward(ctx, *grads)` (one gradient or None per
    argument), as register_autograd would, but without the dispatcher. Its `apply_plain` is
    `apply` without the Python preamble (see the module note: only where plain(), on
    unwrapped tensors)."""

    def fwd(ctx, *args):
        # No zero-filled gradients for the outputs marked non-differentiable (backward ignores
        # them): the engine would otherwise allocate and fill one per such output (the
        # permutation's three index tensors, the router's indices) every backward.
        ctx._materialize_non_diff_grads = False
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    once = torch.autograd.function.once_differentiable(backward)

    def bwd(ctx, *grads):
        if _grad_enabled():  # create_graph=True: once_differentiable's error nodes
            return once(ctx, *grads)
        return backward(ctx, *grads)

    cls = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(bwd),
    })
    cls.apply_plain = _c_apply.__get__(cls, cls) if _c_apply is not None else cls.apply
    return cls
