"""Localisation of attribution maps: does the evidence lie on the object? (Quantus's localisation family.)

Every function takes ``(attribution, mask)``: maps ``[B, H, W]``, ``[B, 1, H, W]`` or ``[B, C, h, w]``
(channels summed, resized bilinearly to the mask's size, as the other metrics of ``tx.metrics``) and
masks ``[B, H, W]`` or ``[B, 1, H, W]`` (bool, or non-zero = object); it prepares each map as Quantus
does (``normalise``: divide by the example's largest magnitude, per example; ``abs``: take the
magnitude) and returns one value per example ``[B]``, ``nan`` where the mask is empty.

* :func:`attribution_localisation`: the share of positive attribution inside the mask (Kohlbrenner et al., 2020).
* :func:`relevance_mass_accuracy`: the share of attribution inside the mask (Arras et al., 2022).
* :func:`relevance_rank_accuracy`: the share of the top-``|mask|`` elements inside the mask (Arras et al., 2022).
* :func:`top_k_intersection`: the share of the top-``k`` elements inside the mask (Theiner et al., 2021).
* :func:`auc`: the ROC AUC of the map as a detector of the mask (Fawcett, 2006).
* :func:`focus`: on a mosaic of four images, the share of positive relevance on the target's
  quadrants (Arias-Duart et al., 2022).
"""
from __future__ import annotations

import warnings
from typing import Any, Tuple

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from . import maps as _maps

__all__ = ["attribution_localisation", "relevance_mass_accuracy", "relevance_rank_accuracy", "top_k_intersection",
           "auc", "focus"]


def _read(fn: str, attribution: Any, mask: Any, *, abs: bool, normalise: bool) -> Tuple[Tensor, Tensor]:
    """``([B, N] prepared map, [B, N] bool mask)``."""
    masks = _maps.as_mask(fn, mask)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    values = _maps.as_map(fn, "attribution", attribution, masks.shape[0], masks.shape[1:])
    values = _maps.prepare(values.reshape(masks.shape[0], -1), normalise=normalise, absolute=abs)
    return values, masks.reshape(masks.shape[0], -1).to(values.device)


def _empty_is_nan(score: Tensor, masks: Tensor) -> Tensor:
    return torch.where(masks.any(dim=1), score, torch.full_like(score, float("nan")))


def _ranks(values: Tensor) -> Tensor:
    """``[B, N]`` int64: 0 for each row's largest element, ties in element order."""
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    return torch.argsort(order, dim=1)


@_docs.fill
def attribution_localisation(attribution: Tensor, mask: Tensor, *, weighted: bool = False, max_size: float = 1.0,
                             positive_attributions: bool = False, abs: bool = True,
                             normalise: bool = True) -> Tensor:
    """Attribution localisation: the share of the map's mass that lies inside the mask.

    ``mu = sum(a * mask) / sum(a)`` per example (Quantus adds ``1e-9`` to the denominator; here a
    zero total counts as 1), after the preparation (by default ``|a| / max |a|``); with
    ``positive_attributions`` negative values are set to 0 first. ``weighted`` multiplies by the
    mask's share of the image, ``|mask| / (H * W)``, as the paper's weighted variant (Quantus
    divides by the number of elements of ``x_batch[2:]``, which changes with the batch size).
    A share above 1 (possible only with signed maps) is ``nan``, as in Quantus. Higher is better.

    Args:
      {attribution.map}
      {mask.object}
      weighted: Multiply by ``|mask| / (H * W)``. Default: False.
      max_size: Warn when some mask covers more than this share of its image. Default: 1.0.
      positive_attributions: Set negative values to 0 (after ``abs`` / ``normalise``). Default: False.
      abs: Take the magnitude first (Quantus's default). Default: True.
      normalise: Divide each example by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` shares in the map's dtype, ``nan`` for an empty mask. Differentiable in ``attribution``.

    Raises:
      ValueError: shapes that do not match, a ``max_size`` outside ``[0, 1]``.
      TypeError: a non-tensor or integer map, a non-bool flag.

    Example:
      >>> attribution_localisation(grad_cam(fn, params, x, y, layer="features"), masks)    # -> [16]

    References: Kohlbrenner et al., "Towards Best Practice in Explaining Neural Network Decisions with
      LRP", IJCNN 2020.
    """
    fn = "attribution_localisation"
    _maps.check_flags(fn, weighted=weighted, positive_attributions=positive_attributions)
    if isinstance(max_size, bool) or not isinstance(max_size, (int, float)) or not 0 <= max_size <= 1:
        raise _checks.value_error(fn, "max_size, a share in [0, 1]", _checks.describe(max_size))
    values, masks = _read(fn, attribution, mask, abs=abs, normalise=normalise)
    if positive_attributions:
        values = values.clamp_min(0)
    inside = (values * masks).sum(dim=1)
    total = values.sum(dim=1)
    share = inside / torch.where(total == 0, torch.ones_like(total), total)
    size = masks.sum(dim=1).to(values.dtype) / masks.shape[1]
    if bool((size > max_size).any()):
        warnings.warn(f"{fn}: some masks cover more than max_size = {max_size} of their image; the score "
                      "of a large mask says little about localisation.", stacklevel=2)
    share = torch.where(share > 1, torch.full_like(share, float("nan")), share)
    if weighted:
        share = share * size
    return _empty_is_nan(share, masks)


@_docs.fill
def relevance_mass_accuracy(attribution: Tensor, mask: Tensor, *, abs: bool = False,
                            normalise: bool = True) -> Tensor:
    """Relevance mass accuracy: the share of the map's total inside the mask.

    ``sum(a * mask) / sum(a)`` per example, after the preparation. 1 when all relevance lies on
    the object. Meant for non-negative maps (pass ``abs=True`` or a positive map); a signed map can
    score outside ``[0, 1]`` and a map summing to 0 scores ``inf`` or ``nan``, as in Quantus.

    Args:
      {attribution.map}
      {mask.object}
      abs: Take the magnitude first. Default: False (Quantus's).
      normalise: Divide each example by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` shares in the map's dtype, ``nan`` for an empty mask. Differentiable in ``attribution``.

    Raises:
      ValueError: shapes that do not match.
      TypeError: a non-tensor or integer map, a non-bool flag.

    Example:
      >>> relevance_mass_accuracy(maps.clamp_min(0), masks)             # -> [16]

    References: Arras et al., "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of
      neural network explanations", Information Fusion 2022.
    """
    fn = "relevance_mass_accuracy"
    values, masks = _read(fn, attribution, mask, abs=abs, normalise=normalise)
    return _empty_is_nan((values * masks).sum(dim=1) / values.sum(dim=1), masks)


@_docs.fill
def relevance_rank_accuracy(attribution: Tensor, mask: Tensor, *, abs: bool = False,
                            normalise: bool = True) -> Tensor:
    """Relevance rank accuracy: of the ``K = |mask|`` largest elements, the share inside the mask.

    Per example, ``K`` is the number of mask pixels; the elements are ranked by the prepared map
    (largest first, ties in pixel order) and the score is ``|top-K  and  mask| / K``, 1 when the
    ``K`` most relevant pixels are exactly the object. Quantus breaks ties in numpy's unstable sort
    order; the two agree on maps without ties.

    Args:
      {attribution.map}
      {mask.object}
      abs: Rank by magnitude. Default: False (Quantus's).
      normalise: Divide each example by its largest magnitude first (no effect on the ranks).
        Default: True.

    Returns:
      ``[B]`` shares in the map's dtype, ``nan`` for an empty mask. Not differentiable.

    Raises:
      ValueError: shapes that do not match.
      TypeError: a non-tensor or integer map, a non-bool flag.

    Example:
      >>> relevance_rank_accuracy(maps, masks)                          # -> [16]

    References: Arras et al., "CLEVR-XAI", Information Fusion 2022.
    """
    fn = "relevance_rank_accuracy"
    values, masks = _read(fn, attribution, mask, abs=abs, normalise=normalise)
    size = masks.sum(dim=1, keepdim=True)
    hits = (masks & (_ranks(values) < size)).sum(dim=1)
    return _empty_is_nan(hits.to(values.dtype) / size[:, 0].clamp_min(1), masks)


@_docs.fill
def top_k_intersection(attribution: Tensor, mask: Tensor, *, k: int = 1000, concept_influence: bool = False,
                       abs: bool = False, normalise: bool = True) -> Tensor:
    """Top-k intersection: of the ``k`` largest elements, the share inside the mask.

    Per example, the elements are ranked by the prepared map (largest first, ties in pixel order)
    and the score is ``|top-k  and  mask| / k`` (``k`` capped at the number of pixels ``N``). With
    ``concept_influence`` it is multiplied by ``N / |mask|``, the inverse of the share a random map
    would reach, so 1 is chance level.

    Args:
      {attribution.map}
      {mask.object}
      k: How many top elements. Default: 1000 (Quantus's, meant for 224 x 224 images).
      concept_influence: Divide by the mask's share of the image. Default: False.
      abs: Rank by magnitude. Default: False (Quantus's).
      normalise: Divide each example by its largest magnitude first (no effect on the ranks).
        Default: True.

    Returns:
      ``[B]`` shares in the map's dtype, ``nan`` for an empty mask. Not differentiable.

    Raises:
      ValueError: shapes that do not match, a ``k`` that is not a positive int.
      TypeError: a non-tensor or integer map, a non-bool flag.

    Example:
      >>> top_k_intersection(maps, masks, k=100)                        # [16, 1, 32, 32] -> [16]

    References: Theiner et al., "Interpretable Semantic Photo Geolocation", WACV 2022.
    """
    fn = "top_k_intersection"
    _checks.check_positive_int(fn, "k", k)
    _maps.check_flags(fn, concept_influence=concept_influence)
    values, masks = _read(fn, attribution, mask, abs=abs, normalise=normalise)
    n = values.shape[1]
    top = min(k, n)
    share = (masks & (_ranks(values) < top)).sum(dim=1).to(values.dtype) / top
    if concept_influence:
        share = share * n / masks.sum(dim=1).clamp_min(1).to(values.dtype)
    return _empty_is_nan(share, masks)


@_docs.fill
def auc(attribution: Tensor, mask: Tensor, *, abs: bool = False, normalise: bool = True) -> Tensor:
    """AUC: the area under the ROC curve of the map as a score that detects the mask's pixels.

    Equal to the probability that a random object pixel outscores a random background pixel, ties
    counting one half (the Mann-Whitney statistic, what ``sklearn.metrics.roc_auc_score`` gives):
    computed from average ranks, batched, without a loop over examples. 1 when every object pixel
    outscores every background pixel, 0.5 for a constant map.

    Args:
      {attribution.map}
      {mask.object}
      abs: Score by magnitude. Default: False (Quantus's).
      normalise: Divide each example by its largest magnitude first (no effect on the ranks).
        Default: True.

    Returns:
      ``[B]`` areas in the map's dtype; ``nan`` for a mask that is empty or covers the whole image.
      Not differentiable.

    Raises:
      ValueError: shapes that do not match.
      TypeError: a non-tensor or integer map, a non-bool flag.

    Example:
      >>> auc(maps, masks).nanmean()                                    # [16, 1, 32, 32] -> []

    References: Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 2006.
    """
    fn = "auc"
    values, masks = _read(fn, attribution, mask, abs=abs, normalise=normalise)
    ordered = torch.sort(values, dim=1).values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)   # elements strictly smaller
    up_to = torch.searchsorted(ordered, values.contiguous(), right=True)    # elements smaller or equal
    rank = (below + up_to + 1).to(torch.float64) / 2                         # 1-based, ties averaged
    positives = masks.sum(dim=1).to(torch.float64)
    negatives = masks.shape[1] - positives
    u = (rank * masks).sum(dim=1) - positives * (positives + 1) / 2
    area = u / (positives * negatives)
    area = torch.where((positives == 0) | (negatives == 0), torch.full_like(area, float("nan")), area)
    return area.to(values.dtype)


@_docs.fill
def focus(attribution: Tensor, quadrants: Tensor, *, abs: bool = False, normalise: bool = True) -> Tensor:
    """Focus: on a 2 x 2 mosaic of images, the share of positive relevance on the target's images.

    Each example is a mosaic of four images (top left, top right, bottom left, bottom right) of
    which some show the target class (``quadrants``, as Quantus's ``c_batch``); the score is
    ``sum(relu(a) on the flagged quadrants) / sum(relu(a))`` (Quantus adds ``1e-9`` to the
    denominator; here a zero total counts as 1). With two target images of four, 1 is perfect and
    0.5 is what a map blind to the class reaches.

    Args:
      {attribution.map}
      quadrants: ``[B, 4]`` bool (or 0 / 1): which quadrants, in the order top left, top right,
        bottom left, bottom right, hold an image of the target class.
      abs: Take the magnitude first. Default: False (Quantus's).
      normalise: Divide each example by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` shares in the map's dtype. Differentiable in ``attribution``.

    Raises:
      ValueError: ``quadrants`` that is not ``[B, 4]``.
      TypeError: a non-tensor map or ``quadrants``, a non-bool flag.

    Example:
      >>> focus(saliency(fn, params, mosaics, y).sum(1), quadrants)    # [8, 64, 64], [8, 4] -> [8]

    References: Arias-Duart et al., "Focus! Rating XAI Methods and Finding Biases", FUZZ-IEEE 2022.
    """
    fn = "focus"
    if not isinstance(quadrants, Tensor):
        raise _checks.type_error(fn, "quadrants, a [B, 4] bool tensor", _checks.describe(quadrants))
    if quadrants.ndim != 2 or quadrants.shape[1] != 4:
        raise _checks.value_error(fn, "quadrants of shape [B, 4] (top left, top right, bottom left, bottom right)",
                                  _checks.describe(quadrants))
    flags = quadrants if quadrants.dtype == torch.bool else quadrants != 0
    if not isinstance(attribution, Tensor) or attribution.ndim not in (3, 4):
        raise _checks.value_error(fn, "attribution of shape [B, H, W] or [B, C, H, W]", _checks.describe(attribution))
    height, width = attribution.shape[-2:]
    half_h, half_w = height // 2, width // 2
    rows = torch.arange(height, device=flags.device) >= half_h          # bottom half
    cols = torch.arange(width, device=flags.device) >= half_w           # right half
    which = rows[:, None].long() * 2 + cols[None, :].long()              # [H, W] quadrant index 0..3
    mask = flags[:, which]                                              # [B, H, W]
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    values = _maps.as_map(fn, "attribution", attribution, flags.shape[0], (height, width))
    values = _maps.prepare(values.reshape(flags.shape[0], -1), normalise=normalise, absolute=abs).clamp_min(0)
    inside = (values * mask.reshape(flags.shape[0], -1).to(values.device)).sum(dim=1)
    total = values.sum(dim=1)
    return inside / torch.where(total == 0, torch.ones_like(total), total)
