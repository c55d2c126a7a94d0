"""What the mixture-of-experts op modules share: the extension, the stream, the dtypes."""

import torch

from ._extension import current_stream, load_extension

__all__ = ["load_extension", "current_stream", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
