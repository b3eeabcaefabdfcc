"""Overlays and figures for attribution maps, in plain torch (PNG writing needs Pillow).

Colour maps are small lookup tables interpolated linearly, so this module needs neither numpy
nor matplotlib: ``"jet"`` and ``"viridis"`` for unsigned maps, ``"diverging"`` (blue - white - red,
zero in white) for signed ones, and ``"gray"``. :func:`save_grid` writes PNGs with Pillow
(``pip install torchex-fn[viz]``), imported only when called.

Example:
  >>> heat = overlay(images, grad_cam(fn, params, images, layer="features"))   # [B, 3, H, W] in [0, 1]
  >>> save_grid([[img, h] for img, h in zip(images, heat)], "maps.png", titles=["image", "Grad-CAM"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core import checks as _checks
from . import postprocess as _postprocess

__all__ = ["CMAPS", "colorize", "overlay", "mask_overlay", "save_grid", "to_uint8"]

_Anchors = Sequence[Tuple[float, Tuple[float, float, float]]]


def _jet() -> _Anchors:
    # Classic jet: channel c is clamp(1.5 - |4 t - k_c|, 0, 1) with k = 3, 2, 1 for r, g, b. It is
    # piecewise linear with breaks at multiples of 1/8, so nine anchors reproduce it exactly.
    def channel(t: float, k: float) -> float:
        return min(1.0, max(0.0, 1.5 - abs(4 * t - k)))
    return [(i / 8, (channel(i / 8, 3), channel(i / 8, 2), channel(i / 8, 1))) for i in range(9)]


def _hex(code: str) -> Tuple[float, float, float]:
    return tuple(int(code[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


CMAPS: Dict[str, _Anchors] = {
    "jet": _jet(),
    # Nine samples of viridis, interpolated linearly (within ~2% of the original).
    "viridis": [(i / 8, _hex(c)) for i, c in enumerate(
        ["440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725"])],
    # Signed maps: 0 -> blue, 0.5 (zero) -> white, 1 -> red.
    "diverging": [(0.0, (0.02, 0.19, 0.38)), (0.25, (0.40, 0.66, 0.81)), (0.5, (1.0, 1.0, 1.0)),
                  (0.75, (0.96, 0.50, 0.40)), (1.0, (0.40, 0.0, 0.12))],
    "gray": [(0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))],
}
"""Colour maps: name -> anchors ``(position in [0, 1], (r, g, b))``, interpolated linearly."""


def _table(name: str, fn: str, size: int = 257) -> Tensor:
    """``[size, 3]`` lookup table of colour map ``name`` (odd size: 0.5 falls on an entry)."""
    if name not in CMAPS:
        raise _checks.unknown_name(fn, "cmap", str(name), CMAPS)
    anchors = CMAPS[name]
    pos = torch.tensor([a[0] for a in anchors], dtype=torch.float64)
    rgb = torch.tensor([a[1] for a in anchors], dtype=torch.float64)
    t = torch.linspace(0, 1, size, dtype=torch.float64)
    hi = torch.searchsorted(pos, t, right=True).clamp(1, len(anchors) - 1)
    lo = hi - 1
    w = ((t - pos[lo]) / (pos[hi] - pos[lo]).clamp_min(1e-12)).clamp(0, 1)[:, None]
    return (rgb[lo] * (1 - w) + rgb[hi] * w).float()


def colorize(values: Tensor, cmap: str = "jet") -> Tensor:
    """Map values in [0, 1] to colours.

    Args:
      values: ``[..., 1, H, W]`` or ``[..., H, W]`` values in [0, 1] (clamped).
      cmap: A name of :data:`CMAPS`. Default: ``"jet"``.

    Returns:
      ``[..., 3, H, W]`` RGB in [0, 1], on ``values``' device, float32.
    """
    fn = "colorize"
    if not isinstance(values, Tensor) or not values.is_floating_point() or values.ndim < 2:
        raise _checks.type_error(fn, "values, a floating-point tensor [..., H, W]", _checks.describe(values))
    if values.ndim >= 3 and values.shape[-3] == 1:
        values = values.squeeze(-3)
    table = _table(cmap, fn).to(values.device)
    index = (values.detach().float().clamp(0, 1).nan_to_num(0.0) * (table.shape[0] - 1)).round().long()
    return table[index].movedim(-1, -3)


def _normalise(maps: Tensor, signed: bool) -> Tensor:
    """Per example: signed maps to [0, 1] with 0 at 0.5 (divided by the 99th percentile of |a|,
    clipped, so that a few extreme pixels do not wash the rest out); others min-max."""
    flat = maps.flatten(1)
    if signed:
        scale = torch.quantile(flat.abs().float(), 0.99, dim=1, keepdim=True).clamp_min(1e-12)
        return (0.5 + 0.5 * flat / scale).clamp(0, 1).view_as(maps)
    return _postprocess.normalize(maps)


def overlay(image: Tensor, attribution: Tensor, *, cmap: str = "jet", alpha: float = 0.5,
            normalize: bool = True, grayscale: Optional[bool] = None) -> Tensor:
    """Blend a colour-mapped attribution map over an image.

    ``(1 - alpha) * image + alpha * colorize(map)``. With ``normalize`` each map is scaled per
    example: min-max to [0, 1] for unsigned colour maps; for ``cmap="diverging"`` divided by the
    99th percentile of ``|a|`` (clipped) and centred on 0.5 (white), so that the sign stays
    visible and a few extreme pixels do not hide the rest. With the diverging map the opacity is
    ``alpha * sqrt(|a| / scale)`` per pixel, so that pixels with no attribution keep the image's
    colours.

    Args:
      image: ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1] (one channel is repeated to three).
      attribution: ``[1, H, W]`` / ``[B, 1, H, W]`` (or ``[H, W]`` / ``[B, H, W]``); several channels
        are summed; another spatial size is resized bilinearly. Detached.
      cmap: ``"jet"`` (default), ``"viridis"``, ``"diverging"`` (signed maps) or ``"gray"``.
      alpha: Weight of the heat map, in [0, 1]. Default: 0.5.
      normalize: Scale each map as above; otherwise values are used as they are (clamped to [0, 1]).
        Default: True.
      grayscale: Show the image in grey so that the colours of the map stand out. Default: None,
        True for ``"diverging"`` and False otherwise.

    Returns:
      ``[3, H, W]`` or ``[B, 3, H, W]`` (as ``image``), float32 in [0, 1].

    Raises:
      ValueError: mismatched batch sizes, an unknown cmap, alpha outside [0, 1].
      TypeError: non-tensor inputs.

    Example:
      >>> overlay(images, maps, cmap="jet").shape                   # [8, 3, 64, 64], [8, 1, 64, 64] -> [8, 3, 64, 64]
      >>> overlay(images, saliency(fn, params, images).sum(1, keepdim=True), cmap="diverging")
    """
    fn = "overlay"
    if not isinstance(image, Tensor) or image.ndim not in (3, 4) or not image.is_floating_point():
        raise _checks.type_error(fn, "image, a float tensor [3, H, W] or [B, 3, H, W]", _checks.describe(image))
    if not isinstance(attribution, Tensor) or not attribution.is_floating_point():
        raise _checks.type_error(fn, "attribution, a float tensor [B, 1, H, W]", _checks.describe(attribution))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise _checks.value_error(fn, "alpha in [0, 1]", _checks.describe(alpha))
    if cmap not in CMAPS:
        raise _checks.unknown_name(fn, "cmap", str(cmap), CMAPS)
    single = image.ndim == 3
    images = image[None] if single else image
    maps = attribution.detach()
    if single and maps.ndim in (2, 3):
        maps = maps.view(1, 1, *maps.shape[-2:]) if maps.ndim == 2 or maps.shape[0] == 1 else maps[None]
    elif maps.ndim == 3:
        maps = maps.unsqueeze(1)
    if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise _checks.value_error(fn, f"attribution of shape [B, 1, H, W] with B = {images.shape[0]}",
                                  _checks.describe(attribution))
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise _checks.value_error(fn, "image with 3 (or 1) channels", _checks.describe(image))
    maps = maps.float().sum(dim=1, keepdim=True) if maps.shape[1] != 1 else maps.float()
    maps = _postprocess.resize(maps, images.shape[-2:])
    signed = cmap == "diverging"
    if grayscale if grayscale is not None else signed:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    if normalize:
        maps = _normalise(maps, signed=signed)
    heat = colorize(maps, cmap).to(images.device)
    # Signed maps: opacity grows with |value| so that zero (white) leaves the image as it is.
    weight = alpha * (2 * maps.to(images.device) - 1).abs().clamp(0, 1).sqrt() if signed else alpha
    out = ((1 - weight) * images.detach().float() + weight * heat).clamp(0, 1)
    return out[0] if single else out


def mask_overlay(image: Tensor, mask: Tensor, *, color: Sequence[float] = (0.0, 1.0, 0.0),
                 alpha: float = 0.75) -> Tensor:
    """Tint the pixels of ``mask`` in ``color`` and darken the rest (a ground-truth view).

    Args:
      image: ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1].
      mask: ``[1, H, W]`` / ``[B, 1, H, W]`` bool (or nonzero = object).
      color: RGB of the tint. Default: green.
      alpha: Strength of the tint. Default: 0.75.

    Returns:
      An image of ``image``'s shape in [0, 1].
    """
    fn = "mask_overlay"
    if not isinstance(image, Tensor) or not isinstance(mask, Tensor):
        raise _checks.type_error(fn, "image and mask tensors",
                                 f"{_checks.describe(image)} and {_checks.describe(mask)}")
    m = (mask != 0).to(image.dtype)
    tint = torch.tensor(color, dtype=image.dtype, device=image.device).view(3, 1, 1)
    shaded = image * (1 - 0.5 * alpha)
    return (m * ((1 - alpha) * image + alpha * tint) + (1 - m) * shaded).clamp(0, 1)


def to_uint8(image: Tensor) -> Tensor:
    """``[3, H, W]`` / ``[1, H, W]`` / ``[H, W]`` floats in [0, 1] to ``[H, W, 3]`` uint8 on the CPU."""
    image = image.detach().float().cpu()
    if image.ndim == 2:
        image = image[None]
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as err:  # pragma: no cover - exercised only without Pillow
        raise ImportError("torchex_fn.viz.save_grid needs Pillow to write PNG files; install it with "
                          "`pip install torchex-fn[viz]` (or `pip install pillow`).") from err
    return Image, ImageDraw, ImageFont


def save_grid(rows: Union[Tensor, Sequence[Sequence[Tensor]]], path: Union[str, Path], *,
              titles: Optional[Sequence[str]] = None, row_titles: Optional[Sequence[str]] = None,
              scale: int = 2, pad: int = 2) -> Path:
    """Write a grid of images to a PNG file.

    Args:
      rows: A list of rows, each a list of ``[3, H, W]`` / ``[1, H, W]`` / ``[H, W]`` images in
        [0, 1] (all of one size), or a tensor ``[R, K, 3, H, W]``.
      path: Output file (``.png``); its folder is created.
      titles: One title per column, written above the grid. Default: none.
      row_titles: One label per row, written at the left. Default: none.
      scale: Integer up-scaling of every image (nearest neighbour). Default: 2.
      pad: White pixels between images. Default: 2.

    Returns:
      The path written.

    Raises:
      ImportError: Pillow is missing (``pip install torchex-fn[viz]``).
      ValueError: an empty grid, ragged rows, images of different sizes, wrong title counts.
    """
    fn = "save_grid"
    Image, ImageDraw, ImageFont = _pil()
    grid: List[List[Tensor]] = [list(r) for r in rows]
    if not grid or not all(grid):
        raise _checks.value_error(fn, "at least one row with at least one image", f"{len(grid)} rows")
    cols = max(len(r) for r in grid)
    tiles = [[to_uint8(t) for t in r] for r in grid]
    height, width = tiles[0][0].shape[:2]
    if any(t.shape[:2] != (height, width) for r in tiles for t in r):
        raise _checks.value_error(fn, f"images of one size {height} x {width}",
                                  str(sorted({tuple(t.shape[:2]) for r in tiles for t in r})))
    if titles is not None and len(titles) != cols:
        raise _checks.value_error(fn, f"{cols} titles (one per column)", f"{len(titles)}")
    if row_titles is not None and len(row_titles) != len(grid):
        raise _checks.value_error(fn, f"{len(grid)} row_titles (one per row)", f"{len(row_titles)}")
    font = ImageFont.load_default()
    top = 16 if titles else 0
    left = 8 + 7 * max((len(t) for t in row_titles), default=0) if row_titles else 0
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (left + cols * (cell_w + pad) + pad, top + len(grid) * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(tiles):
        y = top + pad + i * (cell_h + pad)
        if row_titles:
            draw.text((4, y + cell_h // 2 - 6), str(row_titles[i]), fill=(0, 0, 0), font=font)
        for j, tile in enumerate(row):
            data = bytes(tile.flatten().tolist())
            img = Image.frombytes("RGB", (width, height), data)
            if scale != 1:
                img = img.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(img, (left + pad + j * (cell_w + pad), y))
    for j, title in enumerate(titles or []):
        text = str(title)
        x = left + pad + j * (cell_w + pad)
        limit = max(1, cell_w // 6)
        draw.text((x + 2, 2), text if len(text) <= limit else text[:limit - 1] + ".", fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
