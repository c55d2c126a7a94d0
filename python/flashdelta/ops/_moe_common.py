"""What the mixture-of-experts op modules share: the extension, the stream, the dtypes."""

import torch

from ._extension import current_stream, extension_module, load_extension, stream_of, to_dlpack

__all__ = ["load_extension", "extension_module", "to_dlpack", "current_stream", "stream_of",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
