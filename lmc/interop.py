"""torch tensors ↔ numpy arrays, bf16 included: torch's `.numpy()` and `torch.from_numpy` know no
bfloat16, so a bf16 tensor crosses as its 16-bit pattern and is viewed as `ml_dtypes.bfloat16`
(no copy either way). torch is imported lazily: the lmc core does not need it."""
from __future__ import annotations

import numpy as np

from lmc.ir.types import DType


def to_numpy(x) -> np.ndarray:
    """A torch tensor (detached, on the CPU) or anything array-like as a numpy array."""
    if not hasattr(x, "detach"):
        return np.asarray(x)
    import torch
    t = x.detach().cpu()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(DType.bf16.to_numpy())
    return t.numpy()


def to_torch(a: np.ndarray):
    """A numpy array as a torch tensor sharing its memory (bf16 viewed from its bits)."""
    import torch
    if a.dtype.name == "bfloat16":  # by name: importing ml_dtypes for f32 outputs costs ~0.7 s
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
