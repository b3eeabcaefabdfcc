"""Pure tensor -> tensor helpers for attribution maps."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resize", "normalize", "channel_reduce"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``[B, C, *spatial]`` maps to ``size`` (linear / bilinear / trilinear, ``align_corners=False``)."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=_MODES[len(size)], align_corners=False)


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each example of ``[B, ...]`` to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).view_as(maps)


def channel_reduce(maps: Tensor, how: str = "sum") -> Tensor:
    """Reduce ``[B, C, *spatial]`` over channels to ``[B, 1, *spatial]`` (``sum``, ``mean``, ``abs_sum``, ``max_abs``)."""
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    if how == "abs_sum":
        return maps.abs().sum(dim=1, keepdim=True)
    if how == "max_abs":
        return maps.abs().amax(dim=1, keepdim=True)
    raise ValueError(f"channel_reduce: expected how in ('sum', 'mean', 'abs_sum', 'max_abs'), got {how!r}.")
