"""Hand-off format between stages: numpy on the CPU, fp16 for half-precision stages, fp32 otherwise."""

from __future__ import annotations

import numpy as np
import torch


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """CPU numpy for the Ray object store (read zero-copy). bf16/fp16 travel as fp16, fp32 stays fp32."""
    t = t.detach()
    wire = torch.float32 if t.dtype == torch.float32 else torch.float16
    return t.to("cpu", wire).contiguous().numpy()


def to_torch(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
