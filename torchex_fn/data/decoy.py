"""A decoy variant of :func:`torchex_fn.datasets.shapes`, for "Right for the Right Reasons".

Ross, Hughes & Doshi-Velez (IJCAI 2017) build DecoyMNIST by adding a small grey swatch in a random
corner of every digit; its shade is a function of the label in the training split and random in the
test split. A network trained on it learns the swatch (a trivially easy feature) instead of the
digit, and fails on the test split. :func:`decoy_shapes` does the same to the synthetic shapes: a
``patch x patch`` square of one flat, noise-free colour in a random corner. In the ``"train"`` split
the colour is the label's entry of a fixed palette; in the ``"test"`` split it is the palette entry
of a class drawn at random, independently of the label, so the patch carries no information about
the class. The ``"test"`` distribution is therefore also the *decoy-free* training distribution of
a reference model: it sees exactly the images a test set shows, but the patch cannot help it.

The palette uses intensities 0.15 and 0.85 (and a 0.5 grey), like DecoyMNIST's grey shades,
not the extremes 0 and 1. With saturated colours (pure red, green, blue, white: the first version of
this module) the decoy could not be unlearned with the input-gradient penalty: a ReLU network read
the saturated patch through units whose input gradient on it is ~0 (gradient masking), so the
penalised model still followed the patch (94 % agreement, 23 % test accuracy at lambda = 1;
at chance for lambda in 0.01 .. 1000). With the mid-range palette the same model and penalty recover
(see docs/training_with_explanations.md). The decoy stays strong: a plainly trained model's test
accuracy falls from 100 % (decoy-free) to 34 % and it follows the patch 84 % of the time.

The ``allowed`` mask is True everywhere except on the patch (the paper's annotation matrix ``A`` is
its complement: ``A = ~allowed``). We chose the patch's complement rather than the object mask
because it encodes only what the paper assumes a user knows, "this region is irrelevant", and
leaves the network free to use the background (whose colour the object's colour is drawn against).
The object masks are returned too, for a stricter penalty or for scoring explanations.

Example:
  >>> train = decoy_shapes(512, split="train", seed=0, size=32)
  >>> test = decoy_shapes(256, split="test", seed=1, size=32)
  >>> train.images.shape, train.allowed.shape      # [512, 3, 32, 32], [512, 1, 32, 32]
  >>> bool((train.decoys == train.labels).all()), bool((test.decoys == test.labels).all())
  (True, False)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..core import checks as _checks
from .synthetic import shapes

__all__ = ["DecoyShapes", "decoy_shapes", "PALETTE"]

PALETTE = ((0.85, 0.15, 0.15), (0.15, 0.85, 0.15), (0.15, 0.15, 0.85), (0.5, 0.5, 0.5))
"""The patch colour of each class, in label order (muted red, green, blue, and mid grey).

Mid-range values, not 0 / 1 extremes: see the module docstring (saturated colours invite gradient masking)."""

_DECOY_SEED = 0x5DEECE66D  # decorrelates the patch draws from the base images' generator


class DecoyShapes(NamedTuple):
    """A decoy data set.

    Attributes:
      images: ``[N, 3, size, size]`` float32 in [0, 1], with the patch drawn on top.
      labels: ``[N]`` int64 class indices (the object's shape).
      masks: ``[N, 1, size, size]`` bool, True on the object's visible pixels (not under the patch).
      allowed: ``[N, 1, size, size]`` bool, False on the patch, True elsewhere.
      decoys: ``[N]`` int64, the class whose palette colour the patch has (``labels`` in the
        ``"train"`` split, independent of them in the ``"test"`` split).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    allowed: Tensor
    decoys: Tensor


def decoy_shapes(
    num: int,
    *,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    patch: Optional[int] = None,
    difficulty: float = 0.5,
    num_classes: int = 4,
    device: Union[str, torch.device, None] = None,
) -> DecoyShapes:
    """:func:`~torchex_fn.datasets.shapes` with a label-revealing (train) or random (test) corner patch.

    Args:
      num: Number of examples ``N``.
      split: ``"train"``: the patch colour is ``PALETTE[label]``; ``"test"``: ``PALETTE[c]`` for a
        class ``c`` drawn uniformly at random (this is also the decoy-free training distribution).
      seed: Seeds the base images (``shapes(num, seed=seed)``) and the patches. Use different seeds
        for different splits, as with ``shapes``. Default: 0.
      size: Image height and width. Default: 64.
      patch: Side of the square patch in pixels. Default: ``max(2, size // 8)`` (4 px at 32, 8 at 64).
      difficulty: Passed to ``shapes``. Default: 0.5.
      num_classes: Passed to ``shapes`` (2 to 4). Default: 4.
      device: Where to generate. Default: CPU.

    Returns:
      :class:`DecoyShapes` ``(images, labels, masks, allowed, decoys)``.

    Raises:
      ValueError: an unknown ``split``, a ``patch`` outside ``1..size // 4``, and whatever ``shapes`` raises.
      TypeError: a non-string ``split``, a non-integer ``patch``.

    Example:
      >>> data = decoy_shapes(8, split="train", seed=0, size=32)
      >>> (data.images * ~data.allowed).flatten(2).amax(2)   # the patch colour of every image, [8, 3]

    Cost: that of ``shapes`` plus one pass over the images.
    References: Ross, Hughes & Doshi-Velez, "Right for the Right Reasons", IJCAI 2017 (DecoyMNIST).
    """
    fn = "decoy_shapes"
    if not isinstance(split, str):
        raise _checks.type_error(fn, 'split, "train" or "test"', _checks.describe(split))
    if split not in ("train", "test"):
        raise _checks.value_error(fn, 'split "train" or "test"', repr(split))
    base = shapes(num, seed=seed, size=size, difficulty=difficulty, num_classes=num_classes, device=device)
    if patch is None:
        patch = max(2, size // 8)
    if isinstance(patch, bool) or not isinstance(patch, int):
        raise _checks.type_error(fn, "patch, an int", _checks.describe(patch))
    if not 1 <= patch <= size // 4:
        raise _checks.value_error(fn, f"patch in 1..{size // 4} (a quarter of size)", _checks.describe(patch))

    device = base.images.device
    gen = torch.Generator(device=device).manual_seed(seed + _DECOY_SEED)
    corner = torch.randint(4, (num,), generator=gen, device=device)       # 0: top-left, 1: top-right, ...
    random_class = torch.randint(num_classes, (num,), generator=gen, device=device)  # drawn in both splits
    decoys = base.labels.clone() if split == "train" else random_class

    coords = torch.arange(size, device=device)
    top = (corner // 2).view(-1, 1, 1) * (size - patch)                   # row offset 0 or size - patch
    left = (corner % 2).view(-1, 1, 1) * (size - patch)
    rows = (coords.view(1, -1, 1) - top)
    cols = (coords.view(1, 1, -1) - left)
    on_patch = ((rows >= 0) & (rows < patch) & (cols >= 0) & (cols < patch)).unsqueeze(1)  # [N, 1, H, W]

    palette = torch.tensor(PALETTE, device=device, dtype=base.images.dtype)
    colour = palette[decoys].view(num, 3, 1, 1)
    images = torch.where(on_patch, colour, base.images)
    return DecoyShapes(images, base.labels, base.masks & ~on_patch, ~on_patch, decoys)
