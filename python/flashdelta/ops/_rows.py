"""What the fused layer ops (rms_norm, rms_norm_gated, swiglu, attention_gate,
partial_rotary_embedding) share in Python: argument checks, the [R, D] row view, the current
stream, and the choice between the custom op and the eager fast path.

The kernels take [R, D] tensors with unit stride along D and any row stride, so a per-head slice
of a projection output (q_proj's query or gate half) reaches them without a copy: `as_rows`
flattens the leading dimensions with `reshape`, which is a view whenever the strides allow it
and a copy only when they do not.

Eager fast path: each op is a torch.library custom op (what torch.compile traces, what opcheck
tests), but a custom op's eager call is slow on the host: the dispatcher calls into Python at
its Autograd and backend keys, an autograd.Function is generated around the op, and every
output is checked for aliasing. The first H100 benchmark measured 600-950 us per forward +
backward whatever the op's size (bytes floors of 22-180 us): the host, not the kernels. So
outside torch.compile the public functions call the same implementation through a plain
torch.autograd.Function (see `eager`), whose host cost is that of a couple of torch ops.
"""

from typing import Any

import torch

from ._extension import current_stream as _stream
from ._extension import load_extension

__all__ = ["FLOAT_DTYPES", "_stream", "as_rows", "eager", "load_extension", "require_float",
           "require_same", "require_tensor", "shape_of"]

def eager() -> bool:
    """True when the public functions should take the autograd.Function path (not tracing)."""
    return not torch.compiler.is_compiling()


Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shape_of(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def require_tensor(fn: str, name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")


def require_float(fn: str, name: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have dtype torch.float32, torch.float16 or torch.bfloat16, "
            f"got {x.dtype}"
        )


def require_same(fn: str, name: str, x: Tensor, ref_name: str, ref: Tensor,
                 shape: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(
            f"{fn}: {name} is on {x.device} but {ref_name} is on {ref.device}; all tensors must "
            f"be on one device"
        )
    if x.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have the dtype of {ref_name} ({ref.dtype}), "
                        f"got {x.dtype}")
    if shape and x.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have the shape of {ref_name} {shape_of(ref)}, "
                         f"got {shape_of(x)}")


def as_rows(x: Tensor) -> Tensor:
    """x as [R, D] (D = x.shape[-1]) with unit stride along D: a view when possible."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows
