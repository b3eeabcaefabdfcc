"""RISE's random masks, shared by the methods that dim an input with them (``rise``, ``drise``).

A mask is a coarse grid of Bernoulli cells, upsampled (linear, bilinear, trilinear) to a little more
than the input's grid and cropped at a random offset, so that its edges do not align with the cells.
Masks are drawn from the generator in fixed blocks of :data:`DRAW_BLOCK`, whatever the caller's
``batch_size`` and number of images are, so that neither changes which masks a seed gives, and
handed out in pieces: memory holds a piece and a block, never all ``num_masks``.

``rise`` and ``drise`` both draw with these functions, so one seed gives them the same masks.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks as _checks

__all__ = ["DRAW_BLOCK", "check_options", "interpolation_matrix", "draw", "pieces", "sampler"]

DRAW_BLOCK = 64


def check_options(fn: str, x: Tensor, num_masks: int, cell_size: int, batch_size: int, probability: float,
                  generator: Optional[torch.Generator], progress: bool) -> None:
    """The checks of the options ``rise`` and ``drise`` share, in one order: ``x`` (the tensor the masks
    dim) real, ``num_masks``, ``cell_size`` and ``batch_size`` positive ints, ``probability`` in ``(0, 1]``,
    ``generator`` a generator on ``x``'s device, ``progress`` a bool."""
    if x.is_complex():
        raise _checks.type_error(fn, "x of a real floating-point dtype", _checks.describe(x))
    _checks.check_positive_int(fn, "num_masks", num_masks)
    _checks.check_positive_int(fn, "cell_size", cell_size)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_probability(fn, "probability", probability)
    _checks.check_generator(fn, generator)
    _checks.check_generator_device(fn, generator, x)
    _checks.check_bool(fn, "progress", progress)


def interpolation_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n_out, n_in]``: the weights of 1-d linear upsampling from ``n_in`` to ``n_out`` (``align_corners=False``).

    Built by upsampling the unit vectors (so it is exactly ``F.interpolate``'s rule); a bilinear
    upsampling of a grid ``G`` is then ``R_h @ G @ R_w.T``.
    """
    unit = torch.eye(n_in, dtype=torch.float64, device=device)[None]
    return F.interpolate(unit, size=n_out, mode="linear", align_corners=False)[0].T.to(dtype)


def draw(count: int, cells: int, probability: float, size: Tuple[int, ...], weights: Tuple[Tensor, ...],
         generator: Optional[torch.Generator]) -> Tensor:
    """``count`` masks ``[count, *size]`` (1 to 3 grid axes) with values in ``[0, 1]``.

    ``cells`` Bernoulli(``probability``) cells per axis, upsampled to ``(cells + 1) * ceil(n / cells)``
    along an axis of ``n`` and cropped at an offset in ``[0, ceil(n / cells))``; the crop selects rows of
    ``weights[d]`` (from :func:`interpolation_matrix`), so the large grid is never built. Draws: the
    cells (float32 uniforms), then one offset per mask, axis after axis.
    """
    device, dtype, rank = weights[0].device, weights[0].dtype, len(size)
    kept = torch.rand(count, *([cells] * rank), generator=generator, device=device, dtype=torch.float32) < probability
    shifts = [torch.randint(math.ceil(n / cells), (count,), generator=generator, device=device) for n in size]
    rows = [w[s[:, None] + torch.arange(n, device=device)] for w, s, n in zip(weights, shifts, size)]  # [count, n, c]
    if rank == 2:
        return rows[0] @ kept.to(dtype) @ rows[1].transpose(1, 2)
    masks = kept.to(dtype)
    for axis in rows:   # contract the leading cell axis; the grid axis it becomes goes last
        masks = torch.einsum("nc...,nsc->n...s", masks, axis)
    return masks


def sampler(cells: int, probability: float, size: Tuple[int, ...], dtype: torch.dtype, device: torch.device,
            generator: Optional[torch.Generator]) -> Callable[[int], Tensor]:
    """``count -> masks [count, *size]`` for inputs of grid ``size`` (the interpolation weights built once)."""
    weights = tuple(interpolation_matrix(cells, (cells + 1) * math.ceil(n / cells), dtype, device) for n in size)
    return lambda count: draw(count, cells, probability, size, weights, generator)


def pieces(num_masks: int, per_piece: int, make: Callable[[int], Tensor]) -> Iterator[Tensor]:
    """Masks ``[m, *grid]`` in pieces of ``per_piece`` (the last may be smaller), drawn by ``make`` in
    blocks of :data:`DRAW_BLOCK`; at most ``per_piece + DRAW_BLOCK`` masks are alive at once."""
    waiting: List[Tensor] = []
    held = drawn = 0
    while drawn < num_masks or held:
        while held < per_piece and drawn < num_masks:
            block = make(min(DRAW_BLOCK, num_masks - drawn))
            waiting.append(block)
            held += block.shape[0]
            drawn += block.shape[0]
        masks = waiting[0] if len(waiting) == 1 else torch.cat(waiting)
        yield masks[:per_piece]
        rest = masks[per_piece:]
        waiting, held = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
