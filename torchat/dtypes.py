"""The torch dtype of each dtype name in torchat.vocabulary (the one place names meet torch objects)."""

import torch

from torchat.errors import unknown_key_error
from torchat.vocabulary import Dtype, dtype_name

TORCH_DTYPES: dict[str, torch.dtype] = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16,
                                        Dtype.FP16: torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for "fp32" (or "float32", ...); an unknown name lists the valid ones."""
    dtype = dtype_name(str(name))
    if dtype is None:
        raise unknown_key_error("dtype", name, list(Dtype))
    return TORCH_DTYPES[dtype]


def dtype_of(dtype: torch.dtype) -> Dtype:
    """The name of a torch dtype torchat runs in."""
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)
