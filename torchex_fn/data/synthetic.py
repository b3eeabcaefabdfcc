"""Synthetic localisation data: shapes on textured backgrounds, generated from a seed.

Every example is an RGB image with one object drawn on a textured background (noise and stripes),
its class, and the object's ground-truth mask. The class is the object's *shape* (cross, ring,
checker square, triangle); colours are drawn independently of the class, so a model has to look at
the object to classify it, and an attribution map can be scored against the mask. Nothing is
downloaded: the same seed gives the same tensors, bit for bit, on the same device.

Example:
  >>> data = shapes(256, seed=0)
  >>> data.images.shape, data.labels.shape, data.masks.shape
  (torch.Size([256, 3, 64, 64]), torch.Size([256]), torch.Size([256, 1, 64, 64]))
"""
from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Union

import torch
from torch import Tensor

from ..core import checks as _checks

__all__ = ["Shapes", "shapes", "CLASSES"]

_CHUNK = 256

CLASSES = ("cross", "ring", "checker", "triangle")
"""Class names, in label order."""


class Shapes(NamedTuple):
    """A synthetic localisation data set.

    Attributes:
      images: ``[N, 3, size, size]`` float32 in [0, 1].
      labels: ``[N]`` int64 class indices into :data:`CLASSES`.
      masks: ``[N, 1, size, size]`` bool, True on the object's pixels.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor


def _object_masks(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
    """Masks ``[N, H, W]`` of every class at normalised coordinates ``u, v`` (the object's box is [-1, 1]^2).

    The four shapes cover about half of their box each (cross 0.51, ring 0.55, checker 0.5,
    triangle 0.5), so that the mean colour of an image says little about its class.
    """
    au, av = u.abs(), v.abs()
    inside = (au <= 1) & (av <= 1)
    cross = inside & ((au <= 0.3) | (av <= 0.3))
    radius2 = u * u + v * v
    ring = (radius2 <= 1) & (radius2 >= 0.55 ** 2)
    checker = inside & (torch.floor(u * 2) + torch.floor(v * 2)).remainder(2).eq(0)
    triangle = inside & (au <= (v + 1) / 2)
    stacked = torch.stack([cross, ring, checker, triangle], dim=1)  # [N, 4, H, W]
    return stacked.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, *u.shape[1:])).squeeze(1)


def shapes(
    num: int,
    *,
    seed: int = 0,
    size: int = 64,
    difficulty: float = 0.3,
    scale: tuple = (0.14, 0.26),
    num_classes: int = 4,
    device: Union[str, torch.device, None] = None,
) -> Shapes:
    """Generate ``num`` images of one object on a textured background, with labels and masks.

    Each image has a background of a random base colour, oriented stripes of random frequency and
    Gaussian pixel noise; the object is one of :data:`CLASSES` (``labels`` balanced by cycling,
    then shuffled), drawn in a random colour far from the background's in every channel, at a
    random position and half-width. Generation is vectorised over the whole batch.

    Args:
      num: Number of examples ``N``.
      seed: Seed of the ``torch.Generator`` that draws everything. Default: 0.
      size: Image height and width in pixels. Default: 64.
      difficulty: In [0, 1]. Scales the stripe contrast (0.05 to 0.35) and the noise level
        (std 0.02 to 0.2), and lowers the object's contrast (colour gap 0.5 to 0.3). Default: 0.3
        (the demo model's training data).
      scale: Range ``(low, high)`` of the object's half-width as a fraction of ``size``.
        Default: ``(0.14, 0.26)``, i.e. objects 18 to 33 pixels wide at ``size=64``.
      num_classes: Use the first ``num_classes`` (2 to 4) shapes of :data:`CLASSES`. Default: 4.
      device: Where to generate (the generator lives there). Default: CPU.

    Returns:
      :class:`Shapes` ``(images [N, 3, size, size] float32 in [0, 1], labels [N] int64,
      masks [N, 1, size, size] bool)``.

    Raises:
      ValueError: ``num`` < 1, ``size`` < 8, ``difficulty`` outside [0, 1], a bad ``scale`` range,
        ``num_classes`` outside 2..4.
      TypeError: non-integer ``num``, ``seed`` or ``size``.

    Example:
      >>> train = shapes(4000, seed=0)
      >>> test = shapes(500, seed=1)            # a different seed gives different examples
      >>> torch.equal(shapes(8, seed=3).images, shapes(8, seed=3).images)
      True

    Cost: a few element-wise passes over ``[N, size, size]`` (about 0.1 s for 4000 images on a CPU core).
    """
    fn = "shapes"
    _checks.check_positive_int(fn, "num", num)
    _checks.check_positive_int(fn, "size", size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _checks.type_error(fn, "seed, an int", _checks.describe(seed))
    if size < 8:
        raise _checks.value_error(fn, "size >= 8", _checks.describe(size))
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not 0 <= difficulty <= 1:
        raise _checks.value_error(fn, "difficulty, a number in [0, 1]", _checks.describe(difficulty))
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(s, (int, float)) for s in scale) or not 0 < scale[0] <= scale[1] < 0.5):
        raise _checks.value_error(fn, "scale, a pair (low, high) with 0 < low <= high < 0.5", repr(scale))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(CLASSES):
        raise _checks.value_error(fn, f"num_classes in 2..{len(CLASSES)}", _checks.describe(num_classes))

    device = torch.device(device if device is not None else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    kw: Dict[str, Any] = dict(generator=gen, device=device)

    def uniform(*shape, low=0.0, high=1.0):
        return torch.rand(*shape, **kw) * (high - low) + low

    labels = torch.arange(num, device=device) % num_classes
    labels = labels[torch.randperm(num, **kw)]

    # Object geometry: half-width in pixels, centre such that the box stays inside the image.
    half = uniform(num, low=scale[0] * size, high=scale[1] * size)
    cx = half + uniform(num) * (size - 1 - 2 * half)
    cy = half + uniform(num) * (size - 1 - 2 * half)
    # Colours: the object's differs from the background's by at least `gap` in every channel.
    gap = 0.5 - 0.2 * difficulty
    background = uniform(num, 3)
    offset = gap + uniform(num, 3) * (1 - 2 * gap)
    foreground = (background + offset) % 1.0
    # Background texture: oriented stripes plus pixel noise.
    angle = uniform(num, high=math.pi)
    period = uniform(num, low=4.0, high=12.0)
    phase = uniform(num, high=2 * math.pi)
    noise = torch.randn(num, 3, size, size, **kw)
    contrast = 0.05 + 0.3 * difficulty
    noise_std = 0.02 + 0.18 * difficulty

    coords = torch.arange(size, device=device, dtype=torch.float32)
    images = torch.empty(num, 3, size, size, device=device)
    masks = torch.empty(num, 1, size, size, device=device, dtype=torch.bool)
    for start in range(0, num, _CHUNK):  # chunks that fit in cache; draws happened above, in one order
        s = slice(start, start + _CHUNK)
        n = labels[s].shape[0]
        u = (coords.view(1, 1, size) - cx[s].view(-1, 1, 1)) / half[s].view(-1, 1, 1)  # [n, 1, W]
        v = (coords.view(1, size, 1) - cy[s].view(-1, 1, 1)) / half[s].view(-1, 1, 1)  # [n, H, 1]
        u, v = torch.broadcast_tensors(u, v)
        mask = _object_masks(u, v, labels[s]).unsqueeze(1)  # [n, 1, H, W]
        along = (coords.view(1, 1, size) * torch.cos(angle[s]).view(-1, 1, 1)
                 + coords.view(1, size, 1) * torch.sin(angle[s]).view(-1, 1, 1))
        stripes = torch.sin(along * (2 * math.pi / period[s]).view(-1, 1, 1) + phase[s].view(-1, 1, 1))
        back = background[s].view(n, 3, 1, 1) + contrast * stripes.unsqueeze(1)
        img = torch.where(mask, foreground[s].view(n, 3, 1, 1), back)
        images[s] = img.add_(noise[s], alpha=noise_std).clamp_(0, 1)
        masks[s] = mask
    return Shapes(images, labels, masks)
