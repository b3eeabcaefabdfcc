"""Pure tensor -> tensor helpers for attribution maps."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core.grid import resize

__all__ = ["resize", "normalize", "channel_reduce", "tokens_to_grid", "channels_last_to_first"]

def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max normalise each example of ``[B, ...]`` to [0, 1] (a constant map becomes 0).

    Computed in at least float32 (``eps`` would round to 0 in float16) and returned in ``maps``'s dtype.
    """
    flat = maps.flatten(1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32)) if flat.is_floating_point() else flat
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(eps)).to(maps.dtype).view_as(maps)


def channel_reduce(maps: Tensor, how: str = "sum") -> Tensor:
    """Reduce ``[B, C, *spatial]`` over channels to ``[B, 1, *spatial]``.

    ``how`` is ``sum``, ``mean``, ``abs_sum`` or ``max_abs``.
    """
    if how == "sum":
        return maps.sum(dim=1, keepdim=True)
    if how == "mean":
        return maps.mean(dim=1, keepdim=True)
    if how == "abs_sum":
        return maps.abs().sum(dim=1, keepdim=True)
    if how == "max_abs":
        return maps.abs().amax(dim=1, keepdim=True)
    raise ValueError(f"channel_reduce: expected how in ('sum', 'mean', 'abs_sum', 'max_abs'), got {how!r}.")


def tokens_to_grid(prefix_tokens: int = 1, grid: Optional[Sequence[int]] = None) -> Callable[[Tensor], Tensor]:
    """A ``reshape=`` transform for vision-transformer tokens: ``[B, P + N, D] -> [B, D, h, w]``.

    The first ``prefix_tokens`` tokens (class token, distillation token, registers) are dropped and
    the remaining ``N`` patch tokens, in row-major order, are laid on an ``h x w`` grid with the
    embedding ``D`` as the channel axis. It is a pure re-indexing, so applying it to a gradient
    gives the gradient w.r.t. the kept tokens (as pytorch-grad-cam's ``reshape_transform`` does).

    Args:
      prefix_tokens: Tokens before the patch tokens: 1 for ViT / CaiT-style class tokens, 2 for
        DeiT's class + distillation tokens, 0 for models without (LeViT, pooled ViTs). Default: 1.
      grid: ``(h, w)`` with ``h w = N``. Default: ``None``, a square ``sqrt(N) x sqrt(N)`` grid
        (``N`` must then be a perfect square).

    Returns:
      A function ``[B, P + N, D] -> [B, D, h, w]``.

    Raises:
      ValueError / TypeError: at construction for a negative ``prefix_tokens`` or a bad ``grid``;
        when applied, for a tensor that is not ``[B, P + N, D]`` with ``N`` fitting the grid.

    Example:
      >>> to_grid = tx.postprocess.tokens_to_grid(prefix_tokens=1)        # ViT-B/16 at 224: 1 + 14 * 14 tokens
      >>> to_grid(torch.randn(8, 197, 768)).shape                          # [8, 768, 14, 14]
      >>> tx.grad_cam(fn, params, images, labels, layer="encoder.layers.11.ln_1", reshape=to_grid)
      >>> tx.postprocess.tokens_to_grid(0, grid=(7, 9))(torch.randn(2, 63, 32)).shape   # [2, 32, 7, 9]

    Cost: one copy of the patch tokens (slice, reshape, permute).
    """
    fn = "tokens_to_grid"
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int):
        raise _checks.type_error(fn, "prefix_tokens, a non-negative int", _checks.describe(prefix_tokens))
    if prefix_tokens < 0:
        raise _checks.value_error(fn, "prefix_tokens >= 0", _checks.describe(prefix_tokens))
    if grid is not None:
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
            raise _checks.value_error(fn, "grid, a pair of positive ints (h, w) or None", _checks.describe(grid))
        grid = (int(grid[0]), int(grid[1]))

    def to_grid(tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.ndim != 3:
            raise _checks.value_error(fn, "tokens of shape [B, prefix_tokens + N, D]", _checks.describe(tokens),
                                      "Name a layer that outputs a token sequence.")
        count = tokens.shape[1] - prefix_tokens
        if grid is None:
            side = math.isqrt(max(count, 0))
            if count < 1 or side * side != count:
                raise _checks.value_error(fn, f"a square number of patch tokens after the {prefix_tokens} prefix "
                                          "token(s)", f"{count} tokens of shape {tuple(tokens.shape)}",
                                          "Pass grid=(h, w) for a non-square grid, or the right prefix_tokens.")
            h, w = side, side
        else:
            h, w = grid
            if count != h * w:
                raise _checks.value_error(fn, f"{h} x {w} = {h * w} patch tokens after the {prefix_tokens} prefix "
                                          "token(s)", f"{count} tokens of shape {tuple(tokens.shape)}")
        patches = tokens[:, prefix_tokens:, :]
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return to_grid


def channels_last_to_first(maps: Tensor) -> Tensor:
    """A ``reshape=`` transform for channels-last layers: ``[B, *grid, C] -> [B, C, *grid]``.

    For Swin stages (torchvision's ``swin_t`` features are ``[B, h, w, C]``), ConvNeXt blocks'
    inner layers, and any layer that keeps channels last. A pure permutation, so it maps gradients
    the same way.

    Args:
      maps: ``[B, *grid, C]`` with at least one grid dim.

    Returns:
      ``[B, C, *grid]`` (a view).

    Raises:
      ValueError: a tensor of rank below 3.

    Example:
      >>> tx.postprocess.channels_last_to_first(torch.randn(2, 7, 7, 768)).shape   # [2, 768, 7, 7]
      >>> tx.grad_cam(fn, params, images, labels, layer="features.7",
      ...             reshape=tx.postprocess.channels_last_to_first)
    """
    if not isinstance(maps, Tensor) or maps.ndim < 3:
        raise _checks.value_error("channels_last_to_first", "a tensor [B, *grid, C] of rank >= 3",
                                  _checks.describe(maps))
    return maps.movedim(-1, 1)
