"""The uint8 model input as the normalised float tensor a backbone takes (torch side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_model_input(
    batch_uint8: torch.Tensor | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """(B, 1, H, W) uint8 -> (B, 3, H, W) normalised float on `device`.

    The uint8 payload travels (4x smaller than float32 x 3 channels); the cast, the channel
    repeat and the backbone's own mean/std happen on the model's device.
    """
    x = torch.as_tensor(batch_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected uint8 (B, 1, H, W), got {tuple(x.shape)} {x.dtype}")
    x = x.to(device=device, non_blocking=True).to(dtype).div_(255.0).expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
