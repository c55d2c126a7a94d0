"""What the mixture-of-experts op modules share: the extension, the stream, detaching."""

from typing import Optional

import torch

from ._gated_delta_rule import load_extension
from ._rows import _stream

Tensor = torch.Tensor

__all__ = ["load_extension", "stream_of", "detached", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stream_of(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer (0 on the CPU), without building a
    torch.cuda.Stream object per call (_rows._stream)."""
    return _stream(device)


def detached(t: Optional[Tensor]) -> Optional[Tensor]:
    """DLPack refuses tensors that require grad: hand _C detached views (no copy)."""
    return None if t is None else t.detach()
