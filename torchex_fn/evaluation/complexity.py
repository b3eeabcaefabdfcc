"""Complexity of attribution maps: how concentrated is the evidence? (Quantus's complexity family.)

Every function takes a ``[B, ...]`` map (any shape after the batch axis: images, tokens, volumes),
prepares each example as Quantus does (``normalise``: divide by the example's largest magnitude;
``abs``: take the magnitude) and returns one value per example ``[B]``. The normalisation is per
example, never over the batch, so an example's score does not depend on the others in its batch
(Quantus divides by the maximum of the whole batch). The caller's tensor is never written.

* :func:`complexity`: the entropy of the fractional contributions (Bhatt et al., 2020); lower is simpler.
* :func:`effective_complexity`: the number of elements above a threshold (Nguyen & Martinez, 2020).
* :func:`sparseness`: the Gini index of the magnitudes (Chalasani et al., 2020); higher is sparser.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import checks as _checks
from . import maps as _maps

__all__ = ["complexity", "effective_complexity", "sparseness"]


def complexity(attribution: Tensor, *, abs: bool = True, normalise: bool = True) -> Tensor:
    """Complexity: the entropy of each map's fractional contributions.

    ``p_i = a_i / sum_j |a_j|`` over the elements of one example, and the score is
    ``-sum_i p_i ln p_i`` (``0 ln 0 = 0``), from 0 (one element carries everything) to ``ln N``
    (a constant map of ``N`` elements). Lower is a simpler explanation. Quantus adds ``1e-12``
    inside the logarithm; this is the exact entropy (the two differ by at most ``N * 1e-12``).

    Args:
      attribution: ``[B, ...]`` maps, floating point (e.g. ``[B, 1, H, W]`` or ``[B, T]``).
      abs: Take the magnitude first (Quantus's default). With ``abs=False`` the map must not be
        negative (the entropy of a negative share is not defined: ``nan``). Default: True.
      normalise: Divide each example by its largest magnitude first (per example; the value does not
        depend on it here, it is kept for Quantus's signature). Default: True.

    Returns:
      ``[B]`` entropies in nats, in the map's dtype; ``nan`` for an all-zero map. Differentiable in
      ``attribution`` where no element is 0.

    Raises:
      TypeError: a non-tensor or integer map, a non-bool flag.
      ValueError: a map without a batch axis.

    Example:
      >>> complexity(saliency(fn, params, x, y).sum(1))                 # [16, 32, 32] -> [16]

    References: Bhatt et al., "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020.
    """
    fn = "complexity"
    values = _maps.flat(fn, "attribution", attribution)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    values = _maps.prepare(values, normalise=normalise, absolute=abs)
    share = values / values.abs().sum(dim=1, keepdim=True)
    return torch.special.entr(share).sum(dim=1)


def effective_complexity(attribution: Tensor, *, eps: float = 1e-5, abs: bool = True,
                         normalise: bool = True) -> Tensor:
    """Effective complexity: how many elements of each map exceed ``eps``.

    Counts ``a_i > eps`` after the preparation (by default ``|a_i| / max_j |a_j| > eps``: the
    elements within a factor ``1 / eps`` of the largest). Lower is a simpler explanation.
    With ``normalise=True`` the threshold is relative to each example's own maximum; Quantus uses
    the maximum of the whole batch, so its count for one map changes with the other maps.

    Args:
      attribution: ``[B, ...]`` maps, floating point.
      eps: The threshold, ``>= 0``. Default: 1e-5.
      abs: Count by magnitude (Quantus's default). Default: True.
      normalise: Divide each example by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` int64 counts (not differentiable).

    Raises:
      TypeError: a non-tensor or integer map, a non-bool flag.
      ValueError: a map without a batch axis, a negative or non-number ``eps``.

    Example:
      >>> effective_complexity(maps, eps=1e-3)                          # [16, 1, 32, 32] -> [16]

    References: Nguyen & Martinez, "On Quantitative Aspects of Model Interpretability", arXiv 2020.
    """
    fn = "effective_complexity"
    values = _maps.flat(fn, "attribution", attribution)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    _check_threshold(fn, "eps", eps)
    values = _maps.prepare(values, normalise=normalise, absolute=abs)
    return (values > eps).sum(dim=1)


def sparseness(attribution: Tensor, *, abs: bool = True, normalise: bool = True) -> Tensor:
    """Sparseness: the Gini index of each map.

    With the example's ``N`` values sorted ascending, ``a_(1) <= ... <= a_(N)``, the score is
    ``sum_i (2 i - N - 1) a_(i) / (N sum_i a_(i))``: 0 for a constant map, ``1 - 1/N`` for a map
    with one non-zero element. Higher is a sparser (simpler) explanation. Quantus adds ``1e-7`` to
    every element first (its guard against an all-zero map); here an all-zero map scores 0 (it is
    constant) and no value is shifted.

    Args:
      attribution: ``[B, ...]`` maps, floating point.
      abs: Take the magnitude first (Quantus's default; the Gini index is meant for non-negative
        values). Default: True.
      normalise: Divide each example by its largest magnitude first (the index does not depend on
        it; kept for Quantus's signature). Default: True.

    Returns:
      ``[B]`` Gini indices in the map's dtype. Differentiable in ``attribution``.

    Raises:
      TypeError: a non-tensor or integer map, a non-bool flag.
      ValueError: a map without a batch axis.

    Example:
      >>> sparseness(maps)                                              # [16, 1, 32, 32] -> [16]

    References: Chalasani et al., "Concise Explanations of Neural Networks using Adversarial
      Training", ICML 2020.
    """
    fn = "sparseness"
    values = _maps.flat(fn, "attribution", attribution)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    values = _maps.prepare(values, normalise=normalise, absolute=abs)
    n = values.shape[1]
    ordered = torch.sort(values, dim=1).values
    weights = 2 * torch.arange(1, n + 1, device=values.device, dtype=values.dtype) - n - 1
    total = ordered.sum(dim=1)
    gini = (weights * ordered).sum(dim=1) / (n * torch.where(total == 0, torch.ones_like(total), total))
    return gini


def _check_threshold(fn: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise _checks.value_error(fn, f"{name}, a number >= 0", _checks.describe(value))
