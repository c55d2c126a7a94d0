"""The compiled extension as every op module calls it, and the current CUDA stream.

`load_extension()` returns flashdelta._C behind a thin wrapper that hands each torch.Tensor
argument to the binding as a DLPack capsule (torch's C-level `_to_dlpack`) instead of the tensor
itself. nanobind accepts either; given a tensor it calls `Tensor.__dlpack__`, a Python method that
checks versions, streams and autograd first, which costs ~7 us a tensor on a 2-core host against
~1 us for the capsule: a binding taking six tensors spent ~50 us on the host before its kernel
launched, and the routing ops' forward + backward hand over ~28 tensors. The capsule path also
takes tensors that require grad (no detach needed): the binding only reads their storage.

The streams are passed explicitly to every binding (`current_stream`), so the capsule's lack of
stream negotiation changes nothing.

Hot paths whose host time is the step's time (the routing ops, called once per MoE layer and
pass) take the module itself (`extension_module()`) and make the capsules at the call site
(`to_dlpack`): the wrapper's generic argument loop costs ~4 us a call there.
"""

from typing import Any, Callable

import torch

Tensor = torch.Tensor
_to_dlpack = torch.utils.dlpack.to_dlpack

__all__ = ["load_extension", "extension_module", "to_dlpack", "current_stream", "stream_of"]

to_dlpack = _to_dlpack


def _with_capsules(fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any):
        args = [_to_dlpack(a) if isinstance(a, Tensor) else a for a in args]
        if kwargs:
            kwargs = {k: _to_dlpack(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "call")
    call.__doc__ = getattr(fn, "__doc__", None)
    return call


class _Extension:
    """flashdelta._C with tensor arguments passed as DLPack capsules (see the module note)."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if callable(attr) and not isinstance(attr, type):
            attr = _with_capsules(attr)
        setattr(self, name, attr)  # found once; later lookups skip __getattr__
        return attr


_extension = None


def load_extension() -> _Extension:
    """flashdelta._C (wrapped), imported on first use so that `import flashdelta` works
    without it."""
    global _extension
    if _extension is None:
        try:
            from flashdelta import _C
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise ImportError(
                "flashdelta's compiled extension flashdelta._C could not be imported; build and "
                "install the package with `pip install --no-build-isolation .`"
            ) from e
        _extension = _Extension(_C)
    return _extension


def extension_module():
    """flashdelta._C itself, unwrapped: its bindings take DLPack capsules (`to_dlpack(t)`), not
    tensors (see the module note)."""
    return (_extension or load_extension())._module


# torch's raw current-stream query: an int, without building a torch.cuda.Stream object per call
# (the public spelling where it is absent).
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> int:
    """The cudaStream_t of the current stream on device, as an int (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _current_raw_stream is not None:
        return _current_raw_stream(index)
    return torch.cuda.current_stream(device).cuda_stream


def stream_of(t: Tensor) -> int:
    """current_stream(t.device), without building t.device (~1 us with its .type): the CPU
    answered from t.is_cuda, a CUDA tensor's device index from t.get_device()."""
    if not t.is_cuda:
        return 0
    if _current_raw_stream is not None:
        return _current_raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream
