"""Eager twins of custom ops: the same implementation and autograd without the dispatcher.

A torch.library custom op is what torch.compile traces and what opcheck tests, but its eager call
is slow on the host: the dispatcher calls into Python at its Autograd and backend keys, wraps the
op in a generated autograd.Function and checks every output for aliasing. On the H100 host the
routing ops (router, permute, combine) spent ~1.9 ms of host time per forward + backward for
~0.8 ms of kernels. So outside torch.compile the public functions run the op's implementation
through a plain torch.autograd.Function built here (`twin`), with the op's own setup_context and
a backward that calls the backward implementations directly; under torch.compile they call the
custom op. `eager()` tells which.
"""

from typing import Callable

import torch

__all__ = ["eager", "twin"]


def eager() -> bool:
    """True when a public function should take the twin (not tracing)."""
    return not torch.compiler.is_compiling()


def twin(name: str, forward: Callable, setup_context: Callable,
         backward: Callable) -> type:
    """A torch.autograd.Function running `forward(*args)` (the custom op's implementation),
    `setup_context(ctx, args, output)` and `backward(ctx, *grads)` (one gradient or None per
    argument), as register_autograd would, but without the dispatcher."""

    def fwd(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(torch.autograd.function.once_differentiable(bwd)),
    })
