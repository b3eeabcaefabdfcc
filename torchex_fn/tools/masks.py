"""Feature masks: integer tensors that group the elements of an input into features.

A feature mask gives every element of an input a feature id; the feature methods
(:func:`torchex_fn.feature_ablation`, :func:`torchex_fn.shapley_values`,
:func:`torchex_fn.shapley_value_sampling`, :func:`torchex_fn.kernel_shap`, :func:`torchex_fn.lime`) switch
all elements of one id on or off together. The helpers here build masks for images without any
dependency beyond torch:

* :func:`grid`: a regular grid of rectangular cells (the same mask for every image);
* :func:`superpixels`: k-means on colour and position, started from a regular grid (SLIC's idea without
  its connectivity step), one mask per image.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core import checks as _checks

__all__ = ["grid", "superpixels"]


def _sizes(fn: str, name: str, value: Any, rank: int) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * rank
    if (not isinstance(value, (tuple, list)) or len(value) != rank
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _checks.type_error(fn, f"{name}, an int or a tuple of {rank} ints", _checks.describe(value)
                                 if not isinstance(value, (tuple, list)) else f"{tuple(value)}")
    if min(value) < 1:
        raise _checks.value_error(fn, f"{name} >= 1 in every dimension", f"{tuple(value)}")
    return tuple(value)


def grid(shape: Sequence[int], cell: Union[int, Sequence[int]], *,
         device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """A mask of rectangular cells: ids ``0 .. n - 1`` in row-major order over a regular grid.

    The cells tile ``shape`` from the origin; along a dimension whose size ``cell`` does not divide,
    the last cell is cut short. The mask has ``shape`` itself, so it broadcasts against a batch
    (``grid((H, W), 8)`` groups all channels of a pixel block of every image into one feature).

    Args:
      shape: The sizes to tile, e.g. ``(H, W)`` (all channels together) or ``(C, H, W)`` with
        ``cell=(1, h, w)`` (one feature per channel and block).
      cell: The cell's size, an int for every dimension or one size per dimension.
      device: Where to build the mask. Default: None (the default device).

    Returns:
      An int64 tensor of shape ``shape`` with ``prod_d ceil(shape_d / cell_d)`` distinct ids.

    Raises:
      ValueError: a size or cell size below 1.
      TypeError: ``shape`` or ``cell`` not ints.

    Example:
      >>> tx.masks.grid((224, 224), 56)          # 16 cells of 56 x 56 pixels, ids 0..15
      >>> tx.kernel_shap(fn, params, images, labels, feature_mask=tx.masks.grid(images.shape[-2:], 56))

    Cost: one tensor of ``shape``; no model evaluation.
    """
    fn = "masks.grid"
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape:
        raise _checks.type_error(fn, "shape, a non-empty tuple of ints such as (H, W)", _checks.describe(shape))
    shape = _sizes(fn, "shape", tuple(shape), len(shape))
    cells = _sizes(fn, "cell", cell if not isinstance(cell, list) else tuple(cell), len(shape))
    counts = [math.ceil(s / c) for s, c in zip(shape, cells)]
    ids = torch.zeros((), dtype=torch.long, device=device)
    for d, (s, c) in enumerate(zip(shape, cells)):
        index = torch.arange(s, device=device) // c * math.prod(counts[d + 1:])
        ids = ids[..., None] + index
    return ids


def superpixels(x: Tensor, segments: int = 64, *, compactness: float = 1.0, iterations: int = 10) -> Tensor:
    """Superpixels by k-means on colour and position (SLIC without its connectivity step), in torch.

    Every image gets its own segmentation. Centres start on a regular grid of about ``segments``
    cells (``round(sqrt(segments * H / W))`` rows); each of ``iterations`` rounds assigns every pixel
    to the nearest centre by::

        d^2 = ||colour - colour_k||^2 + (compactness / S)^2 ||(y, x) - (y_k, x_k)||^2

    (``S = sqrt(H W / k)``, the grid interval, so that ``compactness`` is the colour distance that
    one grid interval is worth) and moves each centre to the mean of its pixels. Unlike SLIC, a
    segment need not be connected, and a centre that loses all its pixels keeps its place and id:
    ids lie in ``[0, k)`` but some may be missing, which the feature methods accept (ids need not be
    contiguous). Deterministic: no random draws.

    Args:
      x: Images ``[B, C, H, W]``, floating point (the colours in whatever scale the model takes;
        choose ``compactness`` on that scale).
      segments: The number of centres wanted (the grid may give a few more or fewer). Default: 64.
      compactness: Weight of position against colour (larger: squarer segments). Default: 1.0.
      iterations: Assignment / update rounds. Default: 10.

    Returns:
      An int64 mask ``[B, 1, H, W]``: one segmentation per image, broadcast over channels.

    Raises:
      ValueError: ``x`` not of rank 4 or with NaN; ``segments`` or ``iterations`` below 1; a negative
        ``compactness``.
      TypeError: ``x`` not a floating-point tensor, options of the wrong type.

    Example:
      >>> mask = tx.masks.superpixels(images, 50, compactness=0.5)        # [8, 1, 224, 224]
      >>> tx.lime(fn, params, images, labels, feature_mask=mask, samples=500)

    Cost: ``iterations`` rounds of ``H W k`` distances per image, all images at once (memory
    ``B H W k`` floats); no model evaluation.
    """
    fn = "masks.superpixels"
    _checks.check_input(fn, x, ndim=4)
    _checks.check_positive_int(fn, "segments", segments)
    _checks.check_positive_int(fn, "iterations", iterations)
    if isinstance(compactness, bool) or not isinstance(compactness, (int, float)):
        raise _checks.type_error(fn, "compactness, a float >= 0", _checks.describe(compactness))
    if not compactness >= 0:
        raise _checks.value_error(fn, "compactness >= 0", _checks.describe(compactness))
    batch, channels, height, width = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = max(1, min(height, round(math.sqrt(segments * height / width))))
    cols = max(1, min(width, round(segments / rows)))
    k = rows * cols
    interval = math.sqrt(height * width / k)
    scale = compactness / interval
    ys = (torch.arange(height, device=x.device, dtype=dtype)[:, None]).expand(height, width)
    xs = (torch.arange(width, device=x.device, dtype=dtype)[None, :]).expand(height, width)
    position = torch.stack([ys, xs]).reshape(2, -1) * scale                      # [2, N]
    feats = torch.cat([x.to(dtype).reshape(batch, channels, -1),
                       position[None].expand(batch, 2, -1)], dim=1)              # [B, C + 2, N]
    cy = ((torch.arange(rows, device=x.device) + 0.5) * height / rows).long().clamp_max(height - 1)
    cx = ((torch.arange(cols, device=x.device) + 0.5) * width / cols).long().clamp_max(width - 1)
    start = (cy[:, None] * width + cx[None, :]).reshape(-1)                      # [k] pixel indices
    centres = feats[:, :, start]                                                 # [B, C + 2, k]
    for _ in range(iterations):
        # squared distances [B, N, k] = |f|^2 - 2 f.c + |c|^2 (the |f|^2 term does not change the argmin)
        cross = torch.einsum("bfn,bfk->bnk", feats, centres)
        label = (centres.pow(2).sum(1)[:, None, :] - 2 * cross).argmin(-1)        # [B, N]
        onehot = torch.nn.functional.one_hot(label, k).to(dtype)                 # [B, N, k]
        count = onehot.sum(1)                                                    # [B, k]
        sums = torch.einsum("bfn,bnk->bfk", feats, onehot)
        centres = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], centres)
    return label.reshape(batch, 1, height, width)
