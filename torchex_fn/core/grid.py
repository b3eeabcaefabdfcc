"""Maps on a grid: resizing ``[B, C, *grid]`` maps to an input's grid (1 to 3 axes)."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize", "INTERPOLATION"]

INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``[B, C, *spatial]`` maps to ``size`` (linear / bilinear / trilinear, ``align_corners=False``)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=INTERPOLATION[len(size)], align_corners=False)
