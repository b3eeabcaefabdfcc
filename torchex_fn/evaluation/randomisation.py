"""Randomisation checks of attribution methods: does the map change when it should? (Quantus's
randomisation family; the cascading parameter randomisation is :func:`torchex_fn.metrics.randomization_check`.)

* :func:`random_logit`: the similarity between the map of the target class and the map of another
  class drawn at random (Sixt et al., 2020); a class-sensitive method scores low.
* :func:`ssim`: the structural similarity of two maps per example, Quantus's default similarity.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target
from . import maps as _maps

__all__ = ["random_logit", "ssim"]


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7) -> Tensor:
    """Structural similarity of two ``[B, ...]`` maps per example, over the flattened maps.

    Each example's maps are flattened to signals of ``N`` values; with ``R`` the range of the two
    together (``max - min``), ``C1 = (0.01 R)^2`` and ``C2 = (0.03 R)^2``, every window of
    ``win_size`` consecutive values gives ``(2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)
    (s_a^2 + s_b^2 + C2))`` with sample (co)variances, and the score is the mean over the windows
    that lie inside the signal. This is what Quantus's random logit computes
    (``skimage.metrics.structural_similarity`` on the flattened maps).

    Args:
      a: ``[B, ...]`` maps, floating point.
      b: Maps of ``a``'s shape.
      win_size: Odd window length, at most ``N``. Default: 7 (skimage's).

    Returns:
      ``[B]`` similarities in ``[-1, 1]`` (1: equal maps), in ``a``'s dtype. Differentiable.

    Raises:
      ValueError: maps of different shapes, a bad ``win_size``.
      TypeError: non-float maps.

    Example:
      >>> ssim(saliency(fn, params, x, 0), saliency(fn, params, x, 1))    # [8, 3, 32, 32] -> [8]
    """
    fn = "ssim"
    fa, fb = _maps.flat(fn, "a", a), _maps.flat(fn, "b", b)
    if fa.shape != fb.shape:
        raise _checks.value_error(fn, f"b of a's shape {tuple(a.shape)}", _checks.describe(b))
    _checks.check_positive_int(fn, "win_size", win_size)
    if win_size % 2 == 0 or win_size > fa.shape[1]:
        raise _checks.value_error(fn, f"an odd win_size <= {fa.shape[1]} (the elements per example)",
                                  _checks.describe(win_size))
    both = torch.cat([fa, fb], dim=1)
    span = both.amax(dim=1) - both.amin(dim=1)
    c1, c2 = ((0.01 * span) ** 2)[:, None], ((0.03 * span) ** 2)[:, None]

    def mean(t: Tensor) -> Tensor:  # the windows inside the signal
        return F.avg_pool1d(t[:, None], win_size, stride=1)[:, 0]

    mu_a, mu_b = mean(fa), mean(fb)
    correction = win_size / (win_size - 1)
    var_a = correction * (mean(fa * fa) - mu_a * mu_a)
    var_b = correction * (mean(fb * fb) - mu_b * mu_b)
    cov = correction * (mean(fa * fb) - mu_a * mu_b)
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=1)


@_docs.fill
def random_logit(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor, target: Target = None,
                 *, off_target: Optional[Tensor] = None, num_classes: Optional[int] = None,
                 similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 generator: Optional[torch.Generator] = None, abs: bool = False, normalise: bool = True) -> Tensor:
    """Random logit: how similar the map of the target class is to the map of a random other class.

    For each example, a class other than its target is drawn uniformly (or given as ``off_target``),
    the method explains it, and the two maps are compared by ``similarity_func`` (:func:`ssim` by
    default, as Quantus) after the preparation (each map divided by its own largest magnitude, then
    ``abs``). Lower is better: the map should depend on the class. Quantus masks the targets of the
    *whole batch* from every example's draw (its index broadcasts over the batch) and normalises
    each batch of maps by the batch's maximum; here both are per example.

    Args:
      method: ``(model_fn, params, x, target) -> map``, e.g. ``saliency`` or
        ``functools.partial(grad_cam, layer="features")``.
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      {x.batch}
      target: ``None`` (the predicted class), an int or ``[B]`` ints.
      off_target: ``[B]`` ints, the other class to explain per example (none equal to its target).
        Default: None (drawn with ``generator``).
      num_classes: How many classes to draw from. Default: None (the model's output width).
      similarity_func: ``(map_a, map_b) -> [B]``. Default: None (:func:`ssim`).
      generator: Source of the draw, on any device. Default: the global generator.
      abs: Compare magnitudes. Default: False (Quantus's).
      normalise: Divide each map by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` similarities, in the map's dtype. Differentiable where the method and the similarity are.

    Raises:
      ValueError: an ``off_target`` equal to the target or out of range, ``num_classes`` below 2.
      TypeError: a non-callable ``method`` or ``similarity_func``, a bad generator, a non-bool flag.

    Example:
      >>> random_logit(saliency, fn, params, x, y, generator=torch.Generator().manual_seed(0))    # -> [16]

    Cost: one forward pass (for the class count or a ``None`` target) and two calls of ``method``.
    References: Sixt et al., "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020.
    """
    fn = "random_logit"
    if not callable(method):
        raise _checks.type_error(fn, "method, a callable (model_fn, params, x, target) -> map",
                                 _checks.describe(method))
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params)
    _checks.check_input(fn, x, min_ndim=1)
    _checks.check_optional_callable(fn, "similarity_func", similarity_func)
    _checks.check_generator(fn, generator)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    _checks.check_positive_int(fn, "num_classes", num_classes, allow_none=True)
    batch = x.shape[0]
    with torch.no_grad():
        out = model_fn(params, x)
    index = _targets.resolve_index(out, target, fn=fn).to(x.device)
    classes = out.shape[1] if num_classes is None else num_classes
    if classes < 2:
        raise _checks.value_error(fn, "num_classes >= 2 (a class other than the target)", _checks.describe(classes))
    if off_target is None:
        device = torch.device("cpu") if generator is None else generator.device
        draw = torch.randint(0, classes - 1, (batch,), generator=generator, device=device).to(x.device)
        off = draw + (draw >= index).long()                  # uniform over the classes other than the target
    else:
        off = _off_target(fn, off_target, index, classes)
    prepare = _prepared(abs, normalise)
    reference = prepare(method(model_fn, params, x, index))
    other = prepare(method(model_fn, params, x, off))
    similarity = ssim if similarity_func is None else similarity_func
    return similarity(reference, other)


def _off_target(fn: str, off_target: Any, index: Tensor, classes: int) -> Tensor:
    if not isinstance(off_target, Tensor) or off_target.is_floating_point() or off_target.shape != index.shape:
        raise _checks.type_error(fn, f"off_target, an integer tensor of shape {list(index.shape)}",
                                 _checks.describe(off_target))
    off = off_target.to(index.device).long()
    _checks.check_values(fn, (off == index) | (off < 0) | (off >= classes),
                         f"off_target in [0, {classes}) and different from each target",
                         "a clash or a class out of range")
    return off


def _prepared(abs: bool, normalise: bool) -> Callable[[Tensor], Tensor]:
    def prepare(m: Tensor) -> Tensor:
        flat = _maps.prepare(_maps.flat("random_logit", "the method's map", m), normalise=normalise, absolute=abs)
        return flat.reshape(m.shape)
    return prepare
