"""Faithfulness of attribution maps: does the model's output move the way the map says? (Quantus's faithfulness
family.)

Every metric takes ``(model_fn, params, x, attribution, target=None, *, ...)`` with Quantus 0.6.0's options and
defaults, and returns one value per example ``[B]`` (curves as a :class:`FaithfulnessCurve`). The perturbed
inputs of all examples and all perturbations are scored together, ``batch_size`` inputs per forward pass
(Quantus calls the model once per perturbation). Maps are prepared per example as Quantus's ``normalise`` /
``abs`` options say (divided by the example's own largest magnitude, never the batch's).

**Features.** ``attribution`` has ``x``'s rank and batch and broadcasts to ``x``: ``[B, C, H, W]`` ranks every
element of the image, ``[B, 1, H, W]`` ranks pixels (removing a pixel changes all its channels). Quantus
broadcasts a map to ``x`` and ranks the copies one by one; on a map of ``x``'s full shape the two agree. Ties
are broken in element order (Quantus's ``argsort`` leaves them unspecified).

**Baselines** (``perturb_baseline``): ``"black"`` (the example's minimum, over all its elements), ``"white"``
(maximum), ``"mean"``, ``"uniform"`` (a fresh ``U(0, 1)`` draw per removed element, from ``generator``), a
float, or a tensor broadcastable to ``x``. Baselines are computed from the unperturbed ``x``.

* :func:`pixel_flipping`: score while the most relevant features are removed one step at a time (Bach et al.).
* :func:`region_perturbation`: score drop while the most (or least) relevant patches are removed (Samek et al.).
* :func:`selectivity`: score while the most relevant patches are removed (Montavon et al.).
* :func:`monotonicity`: does the score rise while features are put back, least relevant first? (Arya et al.)
* :func:`monotonicity_correlation`: rank correlation of relevance and the effect of noising each feature
  (Nguyen & Martinez).
* :func:`faithfulness_estimate`: correlation of each feature group's relevance with the score drop of its
  removal (Alvarez-Melis & Jaakkola).
* :func:`faithfulness_correlation`: the same over random subsets (Bhatt et al.).
* :func:`sensitivity_n`: the same for random subsets of each size ``n`` (Ancona et al.).
* :func:`irof`: area over the score curve while segments are removed (Rieger & Hansen).
* :func:`road`: accuracy while the most relevant pixels are imputed from their neighbours (Rong et al.).
* :func:`sufficiency`: do examples with similar maps get the same class? (Dasgupta et al.)
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.arguments import check_call
from ..core.types import ModelFn, Params, Target
from . import maps as _maps

__all__ = ["FaithfulnessCurve", "SensitivityN", "Road", "pixel_flipping", "region_perturbation", "selectivity",
           "monotonicity", "monotonicity_correlation", "faithfulness_estimate", "faithfulness_correlation",
           "sensitivity_n", "irof", "road", "sufficiency"]

Baseline = Union[str, float, Tensor]
_BASELINES = ("black", "white", "mean", "uniform")


class FaithfulnessCurve(NamedTuple):
    """A perturbation curve.

    Attributes:
      curve: ``[B, S]`` one value per perturbation step (the first point has one step removed).
      auc: ``[B]`` area under the curve by the trapezoidal rule with unit spacing (Quantus's
        ``calculate_auc``).
    """

    curve: Tensor
    auc: Tensor


class SensitivityN(NamedTuple):
    """Result of :func:`sensitivity_n`.

    Attributes:
      correlation: ``[B, N]`` Pearson correlation per example and subset size.
      n: ``[N]`` the subset sizes (numbers of features removed).
    """

    correlation: Tensor
    n: Tensor


class Road(NamedTuple):
    """Result of :func:`road`.

    Attributes:
      correct: ``[B, P]`` 1.0 where the model still predicts the target with the top ``p`` % imputed, else 0.0.
      accuracy: ``[P]`` the mean over the batch (Quantus's result).
      percentages: ``[P]`` the percentages.
    """

    correct: Tensor
    accuracy: Tensor
    percentages: Tensor


# --------------------------------------------------------------------------------------- helpers
class _Setup(NamedTuple):
    values: Tensor  # [B, F] the prepared map, one row per example
    shape: Tuple[int, ...]  # the map's shape after the batch axis
    label: Tensor  # [B] the class scored
    reference: Tensor  # [B] its score on x


def _setup(fn: str, model_fn: ModelFn, params: Params, x: Tensor, attribution: Any, target: Target, *,
           abs: bool, normalise: bool, batch_size: int, image: bool = False) -> _Setup:
    target = check_call(fn, model_fn, params, x, target, min_ndim=2, ndim=4 if image else None)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _maps.broadcast_attribution(fn, attribution, x)
    values = _maps.prepare(attribution.detach().reshape(x.shape[0], -1), normalise=normalise, absolute=abs)
    out = model_fn(params, x)
    index = out.argmax(dim=1) if target is None else _targets.resolve_index(out, target, fn=fn)
    return _Setup(values, tuple(attribution.shape[1:]), index, out.gather(1, index[:, None]).squeeze(1))


def _check_baseline(fn: str, perturb_baseline: Any, x: Tensor) -> None:
    if isinstance(perturb_baseline, str):
        if perturb_baseline not in _BASELINES:
            raise _checks.unknown_name(fn, "perturb_baseline", perturb_baseline, _BASELINES)
    elif isinstance(perturb_baseline, Tensor):
        try:
            torch.broadcast_shapes(perturb_baseline.shape, x.shape)
        except RuntimeError:
            raise _checks.value_error(fn, f"perturb_baseline broadcastable to x's shape {tuple(x.shape)}",
                                      _checks.describe(perturb_baseline)) from None
    elif isinstance(perturb_baseline, bool) or not isinstance(perturb_baseline, (int, float)):
        raise _checks.type_error(fn, "perturb_baseline: 'black', 'white', 'mean', 'uniform', a float or a tensor",
                                 _checks.describe(perturb_baseline))


def _baseline(perturb_baseline: Baseline, x: Tensor, shape: Sequence[int],
              generator: Optional[torch.Generator]) -> Tensor:
    """The replacement values, broadcastable to ``shape`` = ``[B, K, *input]``."""
    batch, rest = x.shape[0], (1,) * (x.ndim - 1)
    if isinstance(perturb_baseline, Tensor):
        value = perturb_baseline.to(device=x.device, dtype=x.dtype)
        return value.unsqueeze(1) if value.ndim == x.ndim else value
    if perturb_baseline == "uniform":
        device = generator.device if generator is not None else x.device
        return torch.rand(tuple(shape), generator=generator, dtype=x.dtype, device=device).to(x.device)
    if perturb_baseline == "black":
        return x.reshape(batch, -1).amin(1).view(batch, 1, *rest)
    if perturb_baseline == "white":
        return x.reshape(batch, -1).amax(1).view(batch, 1, *rest)
    if perturb_baseline == "mean":
        return x.reshape(batch, -1).mean(1).view(batch, 1, *rest)
    return torch.full((), float(perturb_baseline), dtype=x.dtype, device=x.device)


def _scores(model_fn: ModelFn, params: Params, x: Tensor, index: Tensor, total: int, batch_size: int,
            make: Callable[[int, int], Tensor]) -> Tensor:
    """``[B, total]`` target scores of ``total`` perturbations per example; ``make(first, count)`` gives the
    inputs ``[B, count, *input]`` of perturbations ``first .. first + count - 1``. At most ``batch_size``
    inputs per forward pass (at least one example's)."""
    return _forwards(model_fn, params, x, index, total, batch_size, make,
                     lambda out, labels: out.gather(1, labels[:, None]).squeeze(1))


def _forwards(model_fn: ModelFn, params: Params, x: Tensor, index: Tensor, total: int, batch_size: int,
              make: Callable[[int, int], Tensor], read: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``[B, total]``: ``read(out, labels)`` of the model's output for each perturbed input (``make`` and the
    passes of at most ``batch_size`` inputs as :func:`_scores`), ``labels`` each input's ``index``."""
    batch = x.shape[0]
    per_chunk = max(1, batch_size // batch)
    rows: List[Tensor] = []
    for first in range(0, total, per_chunk):
        count = min(per_chunk, total - first)
        inputs = make(first, count).reshape(batch * count, *x.shape[1:])
        labels = index.repeat_interleave(count)
        parts = [read(model_fn(params, inputs[i:i + batch_size]), labels[i:i + batch_size])
                 for i in range(0, inputs.shape[0], batch_size)]
        rows.append(torch.cat(parts).view(batch, count))
    return torch.cat(rows, dim=1)


def _replace(x: Tensor, removed: Tensor, fill: Tensor) -> Tensor:
    """``x`` ``[B, *input]`` with the elements where ``removed`` (``[B, K, *map]``) is True replaced by
    ``fill``: ``[B, K, *input]``."""
    return torch.where(removed, fill, x[:, None])


def _ranks(values: Tensor, descending: bool) -> Tensor:
    """``[B, F]`` the position of each feature in the (stable) order, 0 first."""
    order = torch.argsort(values, dim=1, descending=descending, stable=True)
    positions = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of ``[B, N]`` (``nan`` for a constant row, as scipy)."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _average_ranks(v: Tensor) -> Tensor:
    """Row-wise ranks, ties sharing their average rank (scipy's ``rankdata``)."""
    ordered = torch.sort(v, dim=-1).values.contiguous()
    v = v.contiguous()
    low = torch.searchsorted(ordered, v, right=False)
    high = torch.searchsorted(ordered, v, right=True) - 1
    return (low + high).to(torch.float64) / 2


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    return _pearson(_average_ranks(a), _average_ranks(b)).to(a.dtype)


def _trapezoid(curve: Tensor) -> Tensor:
    if curve.shape[1] < 2:
        return torch.zeros_like(curve[:, 0])
    return torch.trapezoid(curve, dx=1.0, dim=1)


def _check_features_in_step(fn: str, features_in_step: int, features: int) -> None:
    _checks.check_positive_int(fn, "features_in_step", features_in_step)
    if features_in_step > features:
        raise _checks.value_error(fn, f"features_in_step <= the map's {features} features",
                                  _checks.describe(features_in_step))


def _padding(size: int, patch: int) -> Tuple[int, int]:
    extra = (-size) % patch
    return extra // 2, extra - extra // 2


def _patch_labels(height: int, width: int, patch_size: int, device: torch.device) -> Tuple[Tensor, int]:
    """``[H, W]`` the patch of each pixel on a grid of ``patch_size`` squares centred as Quantus pads the image
    (row-major patch order), and the number of patches."""
    top, bottom = _padding(height, patch_size)
    left, right = _padding(width, patch_size)
    rows = (torch.arange(height, device=device) + top) // patch_size
    cols = (torch.arange(width, device=device) + left) // patch_size
    n_cols = (width + left + right) // patch_size
    n_rows = (height + top + bottom) // patch_size
    return rows[:, None] * n_cols + cols[None, :], n_rows * n_cols


def _patch_order(fn: str, s: _Setup, x: Tensor, patch_size: int, order: str,
                 generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor, int]:
    """The patch labels ``[H, W]``, each patch's position in the removal order ``[B, P]`` and ``P``."""
    _checks.check_positive_int(fn, "patch_size", patch_size)
    height, width = x.shape[-2:]
    if patch_size > min(height, width):
        raise _checks.value_error(fn, f"patch_size <= the image's side ({height} x {width})",
                                  _checks.describe(patch_size))
    labels, patches = _patch_labels(height, width, patch_size, x.device)
    per_pixel = s.values.view(x.shape[0], -1, height, width).sum(1).reshape(x.shape[0], -1)  # channels summed
    sums = torch.zeros(x.shape[0], patches, dtype=per_pixel.dtype, device=x.device)
    sums.index_add_(1, labels.reshape(-1), per_pixel)
    if order == "random":
        device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand(sums.shape, generator=generator, device=device).to(x.device)
        rank = _ranks(keys, descending=False)
    else:
        rank = _ranks(sums, descending=order == "morf")
    return labels, rank, patches


def _patch_curve(model_fn: ModelFn, params: Params, x: Tensor, s: _Setup, labels: Tensor, rank: Tensor,
                 steps: int, fill: Tensor, batch_size: int) -> Tensor:
    """Scores ``[B, steps]`` after removing the first ``1 .. steps`` patches of the order, cumulatively."""
    pixel_rank = rank[:, labels]  # [B, H, W]

    def make(first: int, count: int) -> Tensor:
        ks = torch.arange(first + 1, first + count + 1, device=x.device)
        removed = (pixel_rank[:, None] < ks[None, :, None, None]).unsqueeze(2)  # [B, count, 1, H, W]
        return _replace(x, removed, fill)
    return _scores(model_fn, params, x, s.label, steps, batch_size, make)


def _flip_fill(perturb_baseline: Baseline, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if isinstance(perturb_baseline, str) and perturb_baseline == "uniform":  # one draw per element of x
        return _baseline(perturb_baseline, x, (x.shape[0], 1, *x.shape[1:]), generator)
    return _baseline(perturb_baseline, x, (), generator)


# --------------------------------------------------------------------------------- the metrics
@_docs.fill
def pixel_flipping(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                   features_in_step: int = 1, abs: bool = False, normalise: bool = True,
                   perturb_baseline: Baseline = "black", batch_size: int = 64,
                   generator: Optional[torch.Generator] = None) -> FaithfulnessCurve:
    """Pixel flipping: the target score while the most relevant features are removed, ``features_in_step`` at a
    time, cumulatively (Bach et al., 2015).

    Point ``s`` of the curve scores ``x`` with its ``(s + 1) * features_in_step`` most relevant features set to
    the baseline; the last point has every feature removed. A faithful map makes the score fall fast (a low
    AUC). Quantus's ``PixelFlipping`` returns the same curve (and ``return_auc_per_sample`` the same AUC).

    Args:
      {model_fn}
        ``out`` has shape ``[B, classes]``; its raw value is scored (wrap a softmax in for probabilities).
      {params}
      x: A batch ``[B, *input]``, floating point.
      attribution: ``[B, ...]`` of ``x``'s rank, broadcastable to ``x`` (its elements are the features).
      target: ``None`` (the class predicted for ``x``), an int or ``[B]`` ints.
      features_in_step: Features removed per step. Default: 1.
      abs: Rank by magnitude. Default: False.
      normalise: Divide each map by its largest magnitude first (ranking does not change). Default: True.
      perturb_baseline: What a removed feature becomes (see the module). Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` baseline. Default: the global RNG.

    Returns:
      :class:`FaithfulnessCurve` ``(curve [B, ceil(F / features_in_step)], auc [B])``.

    Raises:
      ValueError: a map that does not broadcast to ``x``, a bad ``features_in_step``, an unknown baseline.
      TypeError: non-float inputs, a callable target.

    Example:
      >>> pixel_flipping(fn, params, x, saliency(fn, params, x, y), y, features_in_step=64).auc   # [B]

    Cost: ``ceil(F / features_in_step)`` forwards of the batch, in passes of ``batch_size`` inputs.
    References: Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
      Relevance Propagation", PLoS ONE 2015.
    """
    curve = _cumulative_curve("pixel_flipping", model_fn, params, x, attribution, target, features_in_step, abs,
                              normalise, perturb_baseline, batch_size, generator, restore=False)
    return FaithfulnessCurve(curve, _trapezoid(curve))


def _cumulative_curve(fn: str, model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target,
                      features_in_step: int, abs: bool, normalise: bool, perturb_baseline: Baseline,
                      batch_size: int, generator: Optional[torch.Generator], *, restore: bool) -> Tensor:
    """Target scores ``[B, steps]`` along the map's ranking, ``features_in_step`` more features a step:
    the most relevant features removed (:func:`pixel_flipping`), or with ``restore`` the least relevant
    features kept and every other one removed (:func:`monotonicity`)."""
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size)
    _check_baseline(fn, perturb_baseline, x)
    features = s.values.shape[1]
    _check_features_in_step(fn, features_in_step, features)
    rank = _ranks(s.values, descending=not restore)
    fill = _flip_fill(perturb_baseline, x, generator)

    def make(first: int, count: int) -> Tensor:
        ks = (torch.arange(first, first + count, device=x.device) + 1) * features_in_step
        removed = rank[:, None, :] >= ks[None, :, None] if restore else rank[:, None, :] < ks[None, :, None]
        return _replace(x, removed.view(x.shape[0], count, *s.shape), fill)
    return _scores(model_fn, params, x, s.label, -(-features // features_in_step), batch_size, make)


def _check_image(fn: str, x: Tensor) -> None:
    if x.ndim != 4:
        raise _checks.value_error(fn, "images x of shape [B, C, H, W]", _checks.describe(x))


@_docs.fill
def region_perturbation(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None,
                        *, patch_size: int = 8, order: str = "morf", regions_evaluation: int = 100,
                        abs: bool = False, normalise: bool = True, perturb_baseline: Baseline = "black",
                        batch_size: int = 64, generator: Optional[torch.Generator] = None) -> FaithfulnessCurve:
    """Region perturbation: the drop of the target score while square patches are removed, cumulatively, in the
    order of their summed relevance (Samek et al., 2016).

    The image is cut into ``patch_size`` squares (a grid centred as Quantus pads the image when the side is not a
    multiple); patches are ordered by the sum of the map over them (``"morf"``: most relevant first,
    ``"lerf"``: least relevant first, ``"random"``); point ``r`` is ``f(x) - f(x with the first r + 1 patches
    removed)``. A faithful map makes the MoRF curve rise fast (a high AUC). As Quantus's ``RegionPerturbation``.

    Args:
      {args.faithfulness_images}
      patch_size: Side of the square patches. Default: 8.
      order: ``"morf"``, ``"lerf"`` or ``"random"``. Default: ``"morf"``.
      regions_evaluation: Patches removed at most (the curve's length). Default: 100.
      abs: Rank by magnitude. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed pixel becomes. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the random order and of the ``"uniform"`` baseline. Default: the global RNG.

    Returns:
      :class:`FaithfulnessCurve` ``(curve [B, min(regions_evaluation, patches)], auc [B])``.

    Raises:
      ValueError: non-image ``x``, a bad ``patch_size`` / ``order`` / ``regions_evaluation``.
      TypeError: non-float inputs.

    Example:
      >>> region_perturbation(fn, params, x, maps, y, patch_size=16).curve          # [B, 49] at 112 x 112

    Cost: ``min(regions_evaluation, patches)`` forwards of the batch, in passes of ``batch_size`` inputs.
    References: Samek et al., "Evaluating the Visualization of What a Deep Neural Network Has Learned",
      IEEE TNNLS 2017.
    """
    fn = "region_perturbation"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size,
               image=True)
    _check_baseline(fn, perturb_baseline, x)
    if order not in ("morf", "lerf", "random"):
        raise _checks.unknown_name(fn, "order", str(order), ("morf", "lerf", "random"))
    _checks.check_positive_int(fn, "regions_evaluation", regions_evaluation)
    _checks.check_generator(fn, generator)
    labels, rank, patches = _patch_order(fn, s, x, patch_size, order, generator)
    scores = _patch_curve(model_fn, params, x, s, labels, rank, min(regions_evaluation, patches),
                          _flip_fill(perturb_baseline, x, generator), batch_size)
    curve = s.reference[:, None] - scores
    return FaithfulnessCurve(curve, _trapezoid(curve))


@_docs.fill
def selectivity(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                patch_size: int = 8, abs: bool = False, normalise: bool = True, perturb_baseline: Baseline = "black",
                batch_size: int = 64, generator: Optional[torch.Generator] = None) -> FaithfulnessCurve:
    """Selectivity: the target score while all square patches are removed, most relevant first, cumulatively
    (Montavon et al., 2018).

    Patches as :func:`region_perturbation`; point ``r`` scores ``x`` with its ``r + 1`` most relevant patches
    removed. A faithful map makes the score fall fast (a low AUC). As Quantus's ``Selectivity``.

    Args:
      {args.faithfulness_images}
      patch_size: Side of the square patches. Default: 8.
      abs: Rank by magnitude. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed pixel becomes. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` baseline. Default: the global RNG.

    Returns:
      :class:`FaithfulnessCurve` ``(curve [B, patches], auc [B])``.

    Raises:
      ValueError: non-image ``x``, a bad ``patch_size``.
      TypeError: non-float inputs.

    Example:
      >>> selectivity(fn, params, x, maps, y, patch_size=16).auc                      # [B]

    Cost: one forward of the batch per patch, in passes of ``batch_size`` inputs.
    References: Montavon et al., "Methods for Interpreting and Understanding Deep Neural Networks",
      Digital Signal Processing 2018.
    """
    fn = "selectivity"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size,
               image=True)
    _check_baseline(fn, perturb_baseline, x)
    labels, rank, patches = _patch_order(fn, s, x, patch_size, "morf", None)
    curve = _patch_curve(model_fn, params, x, s, labels, rank, patches, _flip_fill(perturb_baseline, x, generator),
                         batch_size)
    return FaithfulnessCurve(curve, _trapezoid(curve))


@_docs.fill
def monotonicity(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                 features_in_step: int = 1, abs: bool = True, normalise: bool = True,
                 perturb_baseline: Baseline = "black", batch_size: int = 64,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Monotonicity: does the target score rise at every step while features are put back into the baseline,
    least relevant first? (Arya et al., 2019.)

    Starts from the baseline image and restores ``x``'s features ``features_in_step`` at a time in ascending
    order of relevance; True where the scores after each step never decrease. Quantus 0.6.0's ``Monotonicity``
    writes the baseline into the baseline image instead of restoring ``x``, so its scores never change and it
    answers True for every map; this follows the paper.

    Args:
      {args.faithfulness}
      features_in_step: Features restored per step. Default: 1.
      abs: Rank by magnitude. Default: True.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: The image features are restored into. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` baseline (drawn once). Default: the global RNG.

    Returns:
      ``[B]`` bool.

    Raises:
      ValueError: a map that does not broadcast to ``x``, a bad ``features_in_step``.
      TypeError: non-float inputs.

    Example:
      >>> monotonicity(fn, params, x, maps, y, features_in_step=64).float().mean()

    Cost: ``ceil(F / features_in_step)`` forwards of the batch.
    References: Arya et al., "One Explanation Does Not Fit All: A Toolkit and Taxonomy of AI Explainability
      Techniques", arXiv:1909.03012, 2019.
    """
    curve = _cumulative_curve("monotonicity", model_fn, params, x, attribution, target, features_in_step, abs,
                              normalise, perturb_baseline, batch_size, generator, restore=True)
    return (curve.diff(dim=1) >= 0).all(dim=1)


def _group_scores(model_fn: ModelFn, params: Params, x: Tensor, s: _Setup, rank: Tensor, features_in_step: int,
                  repeats: int, perturb_baseline: Baseline, generator: Optional[torch.Generator],
                  batch_size: int) -> Tuple[Tensor, Tensor]:
    """Scores ``[B, S, repeats]`` with only the step's group of features removed (not cumulatively), and each
    group's summed relevance ``[B, S]``."""
    steps = -(-s.values.shape[1] // features_in_step)
    group = rank // features_in_step  # [B, F]
    draws = isinstance(perturb_baseline, str) and perturb_baseline == "uniform"
    fill = None if draws else _baseline(perturb_baseline, x, (), generator)

    def make(first: int, count: int) -> Tensor:
        ids = torch.arange(first, first + count, device=x.device) // repeats
        removed = (group[:, None, :] == ids[None, :, None]).view(x.shape[0], count, *s.shape)
        value = _baseline(perturb_baseline, x, (x.shape[0], count, *x.shape[1:]), generator) if draws else fill
        assert value is not None
        return _replace(x, removed, value)
    scores = _scores(model_fn, params, x, s.label, steps * repeats, batch_size, make)
    relevance = torch.zeros(x.shape[0], steps, dtype=s.values.dtype, device=x.device)
    relevance.scatter_add_(1, group, s.values)
    return scores.view(x.shape[0], steps, repeats), relevance


@_docs.fill
def monotonicity_correlation(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor,
                             target: Target = None, *, nr_samples: int = 100, features_in_step: int = 1,
                             eps: float = 1e-5, abs: bool = True, normalise: bool = True,
                             perturb_baseline: Baseline = "uniform", batch_size: int = 64,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Monotonicity correlation: Spearman's correlation between each feature group's relevance and the effect of
    replacing that group alone (Nguyen & Martinez, 2020).

    Groups are ``features_in_step`` features in ascending order of relevance; each group is replaced by the
    baseline ``nr_samples`` times (fresh draws for ``"uniform"``), and its effect is
    ``mean_k (f(x_k) - f(x))^2 / f(x)^2`` (``1 / f(x)^2`` is 1 when ``|f(x)| < eps``). A faithful map
    correlates (towards 1). As Quantus's ``MonotonicityCorrelation``; a deterministic baseline is scored once
    per group (the ``nr_samples`` copies are equal).

    Args:
      {args.faithfulness}
      nr_samples: Draws per group. Default: 100.
      features_in_step: Features per group. Default: 1.
      eps: Below this ``|f(x)|`` the effect is not divided by ``f(x)^2``. Default: 1e-5.
      abs: Rank by magnitude. Default: True.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a replaced feature becomes. Default: ``"uniform"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` draws. Default: the global RNG.

    Returns:
      ``[B]`` correlations in ``[-1, 1]``.

    Raises:
      ValueError: a map that does not broadcast to ``x``, bad ``nr_samples`` / ``features_in_step``.
      TypeError: non-float inputs.

    Example:
      >>> monotonicity_correlation(fn, params, x, maps, y, nr_samples=10, features_in_step=64, generator=gen)

    Cost: ``ceil(F / features_in_step) * nr_samples`` forwards of the batch (one per group for a deterministic
    baseline).
    References: Nguyen & Martinez, "On Quantitative Aspects of Model Interpretability", arXiv:2007.07584, 2020.
    """
    fn = "monotonicity_correlation"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size)
    _check_baseline(fn, perturb_baseline, x)
    _checks.check_positive_int(fn, "nr_samples", nr_samples)
    _check_features_in_step(fn, features_in_step, s.values.shape[1])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise _checks.value_error(fn, "eps >= 0", _checks.describe(eps))
    draws = isinstance(perturb_baseline, str) and perturb_baseline == "uniform"
    scores, relevance = _group_scores(model_fn, params, x, s, _ranks(s.values, descending=False), features_in_step,
                                      nr_samples if draws else 1, perturb_baseline, generator, batch_size)
    magnitude = s.reference.abs()
    inverse = torch.where(magnitude >= eps, 1 / magnitude, torch.ones_like(magnitude)) ** 2
    effect = ((scores - s.reference[:, None, None]) ** 2).mean(2) * inverse[:, None]
    return _spearman(relevance, effect)


@_docs.fill
def faithfulness_estimate(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None,
                          *, features_in_step: int = 1, abs: bool = False, normalise: bool = True,
                          perturb_baseline: Baseline = "black", batch_size: int = 64,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """Faithfulness estimate: Pearson's correlation between each feature group's relevance and the drop of the
    target score when that group alone is removed (Alvarez-Melis & Jaakkola, 2018).

    Groups are ``features_in_step`` features in descending order of relevance; the drop is
    ``f(x) - f(x with the group removed)``. A faithful map correlates (towards 1). As Quantus's
    ``FaithfulnessEstimate``.

    Args:
      {args.faithfulness}
      features_in_step: Features per group. Default: 1.
      abs: Rank by magnitude. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed feature becomes. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` baseline. Default: the global RNG.

    Returns:
      ``[B]`` correlations (``nan`` where the map or the drops are constant).

    Raises:
      ValueError: a map that does not broadcast to ``x``, a bad ``features_in_step``.
      TypeError: non-float inputs.

    Example:
      >>> faithfulness_estimate(fn, params, x, maps, y, features_in_step=64)       # [B]

    Cost: ``ceil(F / features_in_step)`` forwards of the batch.
    References: Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with Self-Explaining Neural
      Networks", NeurIPS 2018.
    """
    fn = "faithfulness_estimate"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size)
    _check_baseline(fn, perturb_baseline, x)
    _check_features_in_step(fn, features_in_step, s.values.shape[1])
    scores, relevance = _group_scores(model_fn, params, x, s, _ranks(s.values, descending=True), features_in_step,
                                      1, perturb_baseline, generator, batch_size)
    return _pearson(relevance, s.reference[:, None] - scores[..., 0])


def _subset_scores(model_fn: ModelFn, params: Params, x: Tensor, s: _Setup, subsets: Tensor,
                   perturb_baseline: Baseline, generator: Optional[torch.Generator],
                   batch_size: int) -> Tuple[Tensor, Tensor]:
    """Score drops and summed relevance ``[B, R]`` of removing each subset ``subsets[:, r]`` (``[B, R, n]``
    feature indices) alone."""
    batch, runs = subsets.shape[:2]
    features = s.values.shape[1]
    draws = isinstance(perturb_baseline, str) and perturb_baseline == "uniform"
    fill = None if draws else _baseline(perturb_baseline, x, (), generator)

    def make(first: int, count: int) -> Tensor:
        removed = torch.zeros(batch, count, features, dtype=torch.bool, device=x.device)
        removed.scatter_(2, subsets[:, first:first + count], True)
        value = _baseline(perturb_baseline, x, (batch, count, *x.shape[1:]), generator) if draws else fill
        assert value is not None
        return _replace(x, removed.view(batch, count, *s.shape), value)
    scores = _scores(model_fn, params, x, s.label, runs, batch_size, make)
    relevance = s.values.gather(1, subsets.reshape(batch, -1)).view(subsets.shape).sum(2)
    return s.reference[:, None] - scores, relevance


def _random_subsets(batch: int, runs: int, features: int, size: int, generator: Optional[torch.Generator],
                    device: torch.device) -> Tensor:
    """``[B, runs, size]`` subsets of ``range(features)`` without repetition, in no particular order (the features
    of the ``size`` smallest of uniform keys: the first ``size`` of a random permutation, as a set). A partial
    selection, unsorted: a sort of all the keys cost a fifth of ``faithfulness_correlation``'s forwards on
    resnet18 at 112 px, a sorted ``topk`` of 80 % of the features a tenth of ``sensitivity_n``'s."""
    where = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(batch, runs, features, generator=generator, device=where)
    return keys.topk(size, dim=2, largest=False, sorted=False).indices.to(device)


@_docs.fill
def faithfulness_correlation(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor,
                             target: Target = None, *, nr_runs: int = 100, subset_size: int = 224,
                             abs: bool = False, normalise: bool = True, perturb_baseline: Baseline = "black",
                             batch_size: int = 64, generator: Optional[torch.Generator] = None) -> Tensor:
    """Faithfulness correlation: Pearson's correlation, over ``nr_runs`` random subsets of ``subset_size``
    features, between the subset's summed relevance and the drop of the target score when it is removed (Bhatt
    et al., 2020).

    A faithful map correlates (towards 1). As Quantus's ``FaithfulnessCorrelation`` (which draws the subsets
    with NumPy's global RNG; here they come from ``generator``).

    Args:
      {args.faithfulness}
      nr_runs: Random subsets per example. Default: 100.
      subset_size: Features per subset. Default: 224.
      abs: Use magnitudes. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed feature becomes. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the subsets (and of the ``"uniform"`` baseline). Default: the global RNG.

    Returns:
      ``[B]`` correlations.

    Raises:
      ValueError: a map that does not broadcast to ``x``, bad ``nr_runs`` / ``subset_size``.
      TypeError: non-float inputs, a bad generator.

    Example:
      >>> faithfulness_correlation(fn, params, x, maps, y, nr_runs=50, generator=gen)   # [B]

    Cost: ``nr_runs`` forwards of the batch.
    References: Bhatt et al., "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020.
    """
    fn = "faithfulness_correlation"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size)
    _check_baseline(fn, perturb_baseline, x)
    _checks.check_positive_int(fn, "nr_runs", nr_runs)
    _checks.check_positive_int(fn, "subset_size", subset_size)
    _checks.check_generator(fn, generator)
    features = s.values.shape[1]
    if subset_size > features:
        raise _checks.value_error(fn, f"subset_size <= the map's {features} features", _checks.describe(subset_size))
    subsets = _random_subsets(x.shape[0], nr_runs, features, subset_size, generator, x.device)
    drop, relevance = _subset_scores(model_fn, params, x, s, subsets, perturb_baseline, generator, batch_size)
    return _pearson(relevance, drop)


@_docs.fill
def sensitivity_n(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                  n_max_percentage: float = 0.8, features_in_step: int = 1, nr_samples: int = 100,
                  abs: bool = False, normalise: bool = True, perturb_baseline: Baseline = "black",
                  batch_size: int = 64, generator: Optional[torch.Generator] = None) -> SensitivityN:
    """Sensitivity-n: for each subset size ``n``, Pearson's correlation, per example, between the summed
    relevance of random subsets of ``n`` features and the drop of the target score when each is removed (Ancona
    et al., 2018).

    The sizes are ``n = features_in_step, 2 features_in_step, ...`` up to ``n_max_percentage`` of the features;
    each size draws ``nr_samples`` subsets. Quantus 0.6.0's ``SensitivityN`` removes the ranked features
    cumulatively and correlates each ``n``'s single value *across the examples of the batch* (so one example's
    score depends on the others, and a batch of one has none); this follows the paper: one correlation per
    example and ``n``.

    Args:
      {args.faithfulness}
      n_max_percentage: The largest ``n`` as a fraction of the features, in ``(0, 1]``. Default: 0.8.
      features_in_step: The spacing of the sizes ``n``. Default: 1.
      nr_samples: Random subsets per size. Default: 100.
      abs: Use magnitudes. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed feature becomes. Default: ``"black"``.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the subsets. Default: the global RNG.

    Returns:
      :class:`SensitivityN` ``(correlation [B, N], n [N])``.

    Raises:
      ValueError: a map that does not broadcast to ``x``, bad ``n_max_percentage`` / ``features_in_step`` /
        ``nr_samples``, no size at all.
      TypeError: non-float inputs, a bad generator.

    Example:
      >>> sensitivity_n(fn, params, x, maps, y, features_in_step=256, nr_samples=20, generator=gen).correlation

    Cost: ``N * nr_samples`` forwards of the batch.
    References: Ancona et al., "Towards Better Understanding of Gradient-Based Attribution Methods for Deep
      Neural Networks", ICLR 2018.
    """
    fn = "sensitivity_n"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size)
    _check_baseline(fn, perturb_baseline, x)
    _checks.check_positive_int(fn, "nr_samples", nr_samples)
    _checks.check_positive_int(fn, "features_in_step", features_in_step)
    _checks.check_generator(fn, generator)
    if isinstance(n_max_percentage, bool) or not isinstance(n_max_percentage, (int, float)) \
            or not 0 < n_max_percentage <= 1:
        raise _checks.value_error(fn, "n_max_percentage in (0, 1]", _checks.describe(n_max_percentage))
    features = s.values.shape[1]
    sizes = list(range(features_in_step, int(n_max_percentage * features) + 1, features_in_step))
    if not sizes:
        raise _checks.value_error(fn, f"features_in_step <= n_max_percentage * {features} features",
                                  _checks.describe(features_in_step))
    rows = []
    for n in sizes:
        subsets = _random_subsets(x.shape[0], nr_samples, features, n, generator, x.device)
        drop, relevance = _subset_scores(model_fn, params, x, s, subsets, perturb_baseline, generator, batch_size)
        rows.append(_pearson(relevance, drop))
    return SensitivityN(torch.stack(rows, dim=1), torch.tensor(sizes, device=x.device))


@_docs.fill
def irof(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
         segments: Optional[Tensor] = None, patch_size: int = 8, abs: bool = False, normalise: bool = True,
         perturb_baseline: Baseline = "mean", batch_size: int = 64,
         generator: Optional[torch.Generator] = None) -> Tensor:
    """IROF, iterative removal of features: the area over the curve of the relative target score while
    segments are removed, cumulatively, in descending order of their mean relevance (Rieger & Hansen, 2020).

    Point ``k`` of the curve is ``f(x with the first k + 1 segments removed) / f(x)``; the score is
    ``K - trapezoid(curve)`` for ``K`` segments (Quantus's formula). A faithful map makes the score fall fast
    (a high value). Quantus 0.6.0's ``IROF`` raises on 3-channel images (it segments with SLIC); here the
    segments are given (e.g. SLIC labels from scikit-image) or a grid of ``patch_size`` squares.

    Args:
      {args.faithfulness_images}
      segments: Integer segment ids ``[B, H, W]`` or ``[H, W]`` (any ids; an example's segments are the ids it
        holds). Default: None: the ``patch_size`` grid.
      patch_size: Side of the default grid's squares. Default: 8.
      abs: Use magnitudes. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      perturb_baseline: What a removed pixel becomes. Default: ``"mean"`` (of ``x``, per example).
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the ``"uniform"`` baseline. Default: the global RNG.

    Returns:
      ``[B]`` areas over the curve.

    Raises:
      ValueError: non-image ``x``, segments of another size.
      TypeError: non-float inputs, non-integer segments.

    Example:
      >>> irof(fn, params, x, maps, y, patch_size=16)                                  # [B]

    Cost: one forward of the batch per segment (the most segments of an example).
    References: Rieger & Hansen, "IROF: a Low Resource Evaluation Metric for Explanation Methods",
      arXiv:2003.08747, 2020.
    """
    fn = "irof"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size,
               image=True)
    _check_baseline(fn, perturb_baseline, x)
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    if segments is None:
        _checks.check_positive_int(fn, "patch_size", patch_size)
        segments = _patch_labels(height, width, patch_size, x.device)[0]
    if not isinstance(segments, Tensor) or segments.is_floating_point() or segments.dtype == torch.bool:
        raise _checks.type_error(fn, "segments, an integer tensor [B, H, W] or [H, W]", _checks.describe(segments))
    if segments.shape[-2:] != (height, width) or segments.ndim not in (2, 3) \
            or (segments.ndim == 3 and segments.shape[0] != batch):
        raise _checks.value_error(fn, f"segments of shape [{batch}, {height}, {width}] or [{height}, {width}]",
                                  _checks.describe(segments))
    ids = torch.unique(segments.to(x.device), return_inverse=True)[1].expand(batch, height, width)
    count = int(ids.max()) + 1
    flat = ids.reshape(batch, -1)
    per_pixel = s.values.view(batch, -1, height, width).mean(1).reshape(batch, -1)
    sums = torch.zeros(batch, count, dtype=per_pixel.dtype, device=x.device).scatter_add_(1, flat, per_pixel)
    sizes = torch.zeros(batch, count, dtype=per_pixel.dtype, device=x.device).scatter_add_(
        1, flat, torch.ones_like(per_pixel))
    present = sizes > 0
    means = torch.where(present, sums / sizes.clamp(min=1), torch.full_like(sums, -math.inf))
    rank = _ranks(means, descending=True)  # absent segments last
    held = present.sum(1)  # [B] segments per example
    steps = int(held.max())
    pixel_rank = rank.gather(1, flat).view(batch, height, width)
    fill = _flip_fill(perturb_baseline, x, generator)

    def make(first: int, count_: int) -> Tensor:
        ks = torch.arange(first + 1, first + count_ + 1, device=x.device)
        removed = (pixel_rank[:, None] < ks[None, :, None, None]).unsqueeze(2)
        return _replace(x, removed, fill)
    curve = _scores(model_fn, params, x, s.label, steps, batch_size, make) / s.reference[:, None]
    valid = torch.arange(steps, device=x.device)[None] < held[:, None]
    pairs = valid[:, 1:] & valid[:, :-1]
    area = ((curve[:, 1:] + curve[:, :-1]) / 2 * pairs).sum(1)
    return held.to(curve.dtype) - area


_IMPUTE_KERNEL = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def _impute(x: Tensor, removed: Tensor, iterations: int = 1000, tol: float = 1e-6) -> Tensor:
    """Linear imputation of ROAD: every removed pixel becomes the weighted mean of its 8 neighbours (weights
    1/6 side, 1/12 corner, over the neighbours inside the image), solved jointly for all removed pixels of each
    ``[N, 1, H, W]`` plane by conjugate gradients (the system ``(D - W) v = W x_known`` is symmetric)."""
    kernel = torch.tensor(_IMPUTE_KERNEL, dtype=torch.float64, device=x.device).view(1, 1, 3, 3)
    m = removed.to(torch.float64)
    known = x.to(torch.float64) * (1 - m)

    def conv(v: Tensor) -> Tensor:
        return F.conv2d(v, kernel, padding=1)
    degree = conv(torch.ones_like(m[:1]))

    def apply(v: Tensor) -> Tensor:
        return m * (degree * v - conv(m * v))
    rhs = m * conv(known)
    v = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = (r * r).sum((1, 2, 3), keepdim=True)
    scale = rr.amax().clamp(min=1e-300)
    for _ in range(iterations):
        if float(rr.amax()) <= tol * tol * scale:
            break
        ap = apply(p)
        pap = (p * ap).sum((1, 2, 3), keepdim=True)
        alpha = rr / torch.where(pap == 0, torch.ones_like(pap), pap)
        v = v + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum((1, 2, 3), keepdim=True)
        p = r + rr_new / torch.where(rr == 0, torch.ones_like(rr), rr) * p
        rr = rr_new
    return (known + m * v).to(x.dtype)


@_docs.fill
def road(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
         percentages: Optional[Sequence[float]] = None, noise: float = 0.01, abs: bool = False,
         normalise: bool = True, batch_size: int = 64, generator: Optional[torch.Generator] = None) -> Road:
    """ROAD, remove and debias: does the model still predict the target when the most relevant ``p`` % of the
    features are replaced by a noisy linear imputation from their neighbours? (Rong et al., 2022.)

    For each percentage, the top ``int(F * p / 100)`` features (``F`` the map's elements) are removed and
    each removed pixel of each channel is set to the weighted mean of its 8 neighbours (side 1/6, corner 1/12;
    the removed pixels are solved for jointly), plus Gaussian noise of standard deviation ``noise``. A faithful
    map makes the accuracy fall fast. Quantus 0.6.0's ``ROAD`` raises on 3-channel images; this works on any
    number of channels.

    Args:
      {args.faithfulness_images}
      percentages: Percentages of features removed, each in ``[0, 100)``. Default: 1, 3, ..., 99.
      noise: Standard deviation of the noise added to imputed pixels. Default: 0.01.
      abs: Rank by magnitude. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: True.
      batch_size: Inputs per forward pass, a memory cap. Default: 64.
      generator: Source of the noise. Default: the global RNG.

    Returns:
      :class:`Road` ``(correct [B, P], accuracy [P], percentages [P])``.

    Raises:
      ValueError: non-image ``x``, a percentage outside ``[0, 100)``, negative ``noise``.
      TypeError: non-float inputs, a bad generator.

    Example:
      >>> road(fn, params, x, maps, y, percentages=[10, 30, 50, 70, 90]).accuracy     # [5]

    Cost: ``P`` forwards of the batch, and a conjugate-gradient solve per image, percentage and channel.
    References: Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
      ICML 2022.
    """
    fn = "road"
    s = _setup(fn, model_fn, params, x, attribution, target, abs=abs, normalise=normalise, batch_size=batch_size,
               image=True)
    _checks.check_generator(fn, generator)
    chosen = list(range(1, 100, 2)) if percentages is None else list(percentages)
    if not chosen or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 100
                         for p in chosen):
        raise _checks.value_error(fn, "percentages, a non-empty list of numbers in [0, 100)",
                                  _checks.describe(percentages))
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise _checks.value_error(fn, "noise >= 0", _checks.describe(noise))
    batch, channels, height, width = x.shape
    features = s.values.shape[1]
    rank = _ranks(s.values, descending=True)
    where = generator.device if generator is not None else torch.device("cpu")

    def make(first: int, count: int) -> Tensor:
        ks = torch.tensor([int(features * p / 100) for p in chosen[first:first + count]], device=x.device)
        removed = (rank[:, None, :] < ks[None, :, None]).view(batch, count, *s.shape).expand(
            batch, count, channels, height, width)
        planes = x[:, None].expand(batch, count, channels, height, width).reshape(-1, 1, height, width)
        mask = removed.reshape(-1, 1, height, width)
        with torch.no_grad():
            imputed = _impute(planes, mask)
        draw = torch.randn(imputed.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
        imputed = torch.where(mask, imputed + noise * draw, planes)
        return imputed.view(batch, count, channels, height, width)
    correct = _predictions(model_fn, params, x, s.label, len(chosen), batch_size, make)
    return Road(correct, correct.mean(0), torch.tensor(chosen, dtype=x.dtype, device=x.device))


def _predictions(model_fn: ModelFn, params: Params, x: Tensor, index: Tensor, total: int, batch_size: int,
                 make: Callable[[int, int], Tensor]) -> Tensor:
    """``[B, total]`` 1.0 where the model's top class of each perturbed input is ``index``."""
    return _forwards(model_fn, params, x, index, total, batch_size, make,
                     lambda out, labels: out.argmax(1) == labels).to(x.dtype)


_DISTANCES = ("seuclidean", "euclidean", "cityblock", "cosine")


@_docs.fill
def sufficiency(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                threshold: float = 0.6, distance_func: str = "seuclidean", abs: bool = True,
                normalise: bool = True) -> Tensor:
    """Sufficiency: among the other examples of the batch whose maps are close to this one's, the share that the
    model puts in the same class (Dasgupta et al., 2022).

    Distances between the flattened maps (``distance_func`` as in ``scipy.spatial.distance.cdist``;
    ``"seuclidean"`` scales each element by its variance over the batch), divided by the largest distance of
    the batch; two examples are close at a distance ``<= threshold``. An example with no close one scores 0.
    The score is about the batch as a data set: an example's value depends on the others by definition. As
    Quantus's ``Sufficiency`` (with ``normalise=False``, or with ``"seuclidean"``, which ignores a common
    scale: Quantus normalises by the batch's maximum).

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, *input]``, floating point.
      attribution: ``[B, ...]`` maps, floating point.
      target: Unused (the classes compared are the model's predictions), kept for the shared signature.
      threshold: Largest normalised distance of close maps. Default: 0.6.
      distance_func: ``"seuclidean"``, ``"euclidean"``, ``"cityblock"`` or ``"cosine"``. Default: ``"seuclidean"``.
      abs: Use magnitudes. Default: True.
      normalise: Divide each map by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` shares in ``[0, 1]``.

    Raises:
      ValueError: an unknown distance, a batch of one.
      TypeError: non-float inputs.

    Example:
      >>> sufficiency(fn, params, x, maps)                                               # [B]

    Cost: one forward of the batch; ``B^2`` distances.
    References: Dasgupta et al., "Framework for Evaluating Faithfulness of Local Explanations", ICML 2022.
    """
    fn = "sufficiency"
    check_call(fn, model_fn, params, x, target, min_ndim=2)
    values = _maps.flat(fn, "attribution", attribution)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    if values.shape[0] != x.shape[0]:
        raise _checks.value_error(fn, f"attribution with batch {x.shape[0]}", _checks.describe(attribution))
    if distance_func not in _DISTANCES:
        raise _checks.unknown_name(fn, "distance_func", str(distance_func), _DISTANCES)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise _checks.type_error(fn, "threshold, a number", _checks.describe(threshold))
    if x.shape[0] < 2:
        raise _checks.value_error(fn, "a batch of at least 2 examples (the score compares examples)",
                                  _checks.describe(x))
    a = _maps.prepare(values.detach().to(torch.float64), normalise=normalise, absolute=abs)
    if distance_func == "seuclidean":
        variance = a.var(dim=0, unbiased=True)
        distance = torch.cdist(a / variance.sqrt(), a / variance.sqrt())
    elif distance_func == "euclidean":
        distance = torch.cdist(a, a)
    elif distance_func == "cityblock":
        distance = torch.cdist(a, a, p=1)
    else:
        unit = a / a.norm(dim=1, keepdim=True)
        distance = 1 - unit @ unit.T
    peak = distance.abs().max()
    if peak != 0:
        distance = distance / peak
    close = (distance <= threshold) & ~torch.eye(x.shape[0], dtype=torch.bool, device=distance.device)
    with torch.no_grad():
        classes = model_fn(params, x).argmax(dim=1).to(distance.device)
    same = classes[None, :] == classes[:, None]
    neighbours = close.sum(1)
    share = (close & same).sum(1).to(torch.float64) / neighbours.clamp(min=1)
    return share.to(x.dtype)
