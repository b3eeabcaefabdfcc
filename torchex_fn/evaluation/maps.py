"""What the metrics share to read their arguments: maps and masks in one layout, the per-example
normalisation of Quantus's ``normalise`` / ``abs`` options. Private to ``evaluation/``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import grid as _grid


def as_map(fn: str, name: str, attribution: Any, batch: int, size: Sequence[int]) -> Tensor:
    """``[B, 1, H, W]`` from ``[B, H, W]`` / ``[B, C, h, w]`` (channels summed, resized to ``size``)."""
    if not isinstance(attribution, Tensor):
        raise _checks.type_error(fn, f"{name}, a tensor of shape [B, H, W] or [B, C, H, W]",
                                 _checks.describe(attribution))
    if not attribution.is_floating_point():
        raise _checks.type_error(fn, f"{name} of a floating-point dtype", _checks.describe(attribution))
    if attribution.ndim == 3:
        attribution = attribution.unsqueeze(1)
    if attribution.ndim != 4 or attribution.shape[0] != batch:
        raise _checks.value_error(fn, f"{name} of shape [B, H, W] or [B, C, H, W] with B = {batch}",
                                  _checks.describe(attribution))
    if attribution.shape[1] != 1:
        attribution = attribution.sum(dim=1, keepdim=True)
    return _grid.resize(attribution, size)


def as_mask(fn: str, mask: Any) -> Tensor:
    """``[B, H, W]`` bool from ``[B, H, W]`` or ``[B, 1, H, W]``."""
    if not isinstance(mask, Tensor):
        raise _checks.type_error(fn, "mask, a bool tensor of shape [B, 1, H, W] or [B, H, W]", _checks.describe(mask))
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise _checks.value_error(fn, "mask of shape [B, 1, H, W] or [B, H, W]", _checks.describe(mask))
    return mask if mask.dtype == torch.bool else mask > 0



def flat(fn: str, name: str, attribution: Any) -> Tensor:
    """``[B, N]`` from a floating-point ``[B, ...]`` map (one row per example)."""
    if not isinstance(attribution, Tensor):
        raise _checks.type_error(fn, f"{name}, a floating-point tensor of shape [B, ...]",
                                 _checks.describe(attribution))
    if not attribution.is_floating_point():
        raise _checks.type_error(fn, f"{name} of a floating-point dtype", _checks.describe(attribution))
    if attribution.ndim < 2 or attribution[0].numel() == 0:
        raise _checks.value_error(fn, f"{name} of shape [B, ...] with the batch first and at least one element "
                                  "per example", _checks.describe(attribution), "A single map is `a[None]`.")
    return attribution.reshape(attribution.shape[0], -1)


def check_method(fn: str, method: Any) -> None:
    """The ``method`` argument of the metrics that call an explanation method: a callable."""
    if not callable(method):
        raise _checks.type_error(fn, "method, a callable (model_fn, params, x, target) -> map",
                                 _checks.describe(method))


def check_flags(fn: str, **flags: Any) -> None:
    for name, value in flags.items():
        _checks.check_bool(fn, name, value)


def prepare(values: Tensor, *, normalise: bool, absolute: bool) -> Tensor:
    """Quantus's preprocessing, per example: divide each row by its largest magnitude (a zero row stays),
    then take the magnitude. ``values`` is ``[B, N]``; the result is a new tensor (the caller's is never
    written), differentiable where the maximum is unique."""
    if normalise:
        peak = values.abs().amax(dim=1, keepdim=True)
        values = values / torch.where(peak == 0, torch.ones_like(peak), peak)
    return values.abs() if absolute else values


def broadcast_attribution(fn: str, attribution: Any, x: Tensor) -> Tensor:
    if not isinstance(attribution, Tensor):
        raise _checks.type_error(fn, "attribution, a tensor broadcastable to x", _checks.describe(attribution))
    if not attribution.is_floating_point():
        raise _checks.type_error(fn, "attribution of a floating-point dtype", _checks.describe(attribution))
    if attribution.ndim != x.ndim or attribution.shape[0] != x.shape[0]:
        raise _checks.value_error(fn, f"attribution of rank {x.ndim} with batch {x.shape[0]}, broadcastable to "
                                      f"x's shape {tuple(x.shape)}", _checks.describe(attribution))
    try:
        return attribution.expand_as(x)
    except RuntimeError:
        raise _checks.value_error(fn, f"attribution broadcastable to x's shape {tuple(x.shape)}",
                                  _checks.describe(attribution)) from None
