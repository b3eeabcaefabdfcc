"""Axiomatic checks of attribution maps: does a map obey the properties an attribution should have?
(Quantus's axiomatic family.)

* :func:`completeness`: the map sums to the change of the score between the input and a baseline
  (Sundararajan et al., 2017), with the gap itself, not a float equality.
* :func:`non_sensitivity`: the features whose removal does not move the score should be those with no
  attribution, and the other way round (Nguyen & Martinez, 2020).
* :func:`input_invariance`: a constant shift of the input, undone by the first layer's bias, leaves
  the model unchanged and should leave the map unchanged (Kindermans et al., 2019).

Baselines follow Quantus's names, computed per example: ``"black"`` is the example's minimum,
``"white"`` its maximum, ``"mean"`` its mean; a float or a tensor broadcastable to ``x`` is used as given.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import inputs as _inputs
from ..core import targets as _targets
from ..core.arguments import check_call
from ..core.types import ModelFn, Params, Target
from . import maps as _maps

__all__ = ["Completeness", "completeness", "non_sensitivity", "input_invariance"]

_NAMED = ("black", "white", "mean")


class Completeness(NamedTuple):
    """Result of :func:`completeness`.

    Attributes:
      holds: ``[B]`` bool, ``|gap| <= atol + rtol * |output_func(f(x) - f(baseline))|``.
      gap: ``[B]`` ``sum(attribution) - output_func(f(x) - f(baseline))``, in ``x``'s dtype.
    """

    holds: Tensor
    gap: Tensor


def _baseline(fn: str, baseline: Any, x: Tensor) -> Tensor:
    """``baseline`` broadcast to ``x``'s shape; the named ones per example."""
    if isinstance(baseline, str):
        flat = x.reshape(x.shape[0], -1)
        if baseline not in _NAMED:
            raise _checks.value_error(fn, f"baseline, one of {list(_NAMED)}, a float or a tensor", repr(baseline))
        value = {"black": lambda: flat.amin(dim=1), "white": lambda: flat.amax(dim=1),
                 "mean": lambda: flat.mean(dim=1)}[baseline]()
        return value.view(-1, *([1] * (x.ndim - 1))).expand_as(x)
    return _inputs.check_baseline(fn, baseline, x).expand_as(x)


def _scores(fn: str, model_fn: ModelFn, params: Params, inputs: Tensor, index: Tensor) -> Tensor:
    return _targets.resolve(model_fn(params, inputs), index, fn=fn)


@_docs.fill
def completeness(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                 baseline: Union[str, float, Tensor] = "black",
                 output_func: Optional[Callable[[Tensor], Tensor]] = None,
                 abs: bool = False, normalise: bool = False, rtol: float = 1e-3, atol: float = 1e-6) -> Completeness:
    """Completeness: does the map sum to ``f(x) - f(baseline)``?

    The gap ``sum(attribution) - output_func(f_t(x) - f_t(x'))`` per example, with ``f_t`` the target's
    score and ``x'`` the baseline; it holds within ``atol + rtol * |f_t(x) - f_t(x')|``. Integrated
    gradients, DeepLIFT and LRP's epsilon rule are built to close the gap (up to their approximation);
    plain gradients are not. Quantus compares the two floats with ``==`` (a map that is complete up to
    rounding fails) and normalises the map by its maximum by default, which breaks the sum; here the
    tolerance is explicit and ``normalise`` is off by default.

    Args:
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      {x.batch}
      attribution: ``[B, ...]`` map broadcastable to ``x``'s shape (e.g. ``[B, 1, H, W]`` for images is
        summed over its own elements, not repeated per channel).
      target: ``None`` (the class predicted for ``x``), an int or ``[B]`` ints.
      baseline: ``"black"`` (each example's minimum, Quantus's default), ``"white"`` (maximum), ``"mean"``,
        a float, or a tensor broadcastable to ``x``. Default: "black".
      output_func: Applied to the score difference ``[B]`` before the comparison. Default: identity.
      abs: Take the map's magnitude first. Default: False.
      normalise: Divide each example's map by its largest magnitude first (Quantus's default is True,
        which makes the check fail for any map not already peaking at 1). Default: False.
      rtol: Relative tolerance. Default: 1e-3.
      atol: Absolute tolerance. Default: 1e-6.

    Returns:
      :class:`Completeness` ``(holds [B] bool, gap [B])``. ``gap`` is differentiable w.r.t.
      ``attribution``, ``x`` and ``params``.

    Raises:
      ValueError: a map whose batch is not ``B``, a baseline name not in the list, a target out of range,
        a negative tolerance.
      TypeError: non-float inputs, a non-callable ``output_func``, a non-bool flag.

    Example:
      >>> attr = integrated_gradients(fn, params, x, y, baseline=0.0, n_steps=200)
      >>> completeness(fn, params, x, attr, y, baseline=0.0).gap            # [16, 3, 32, 32] -> [16]

    Cost: two forward passes of the batch.
    References: Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    fn = "completeness"
    check_call(fn, model_fn, params, x, target, min_ndim=2)
    _checks.check_optional_callable(fn, "output_func", output_func)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise _checks.value_error(fn, f"{name}, a number >= 0", _checks.describe(value))
    values = _maps.flat(fn, "attribution", attribution)
    if values.shape[0] != x.shape[0]:
        raise _checks.value_error(fn, f"attribution with batch {x.shape[0]}", _checks.describe(attribution))
    total = _maps.prepare(values, normalise=normalise, absolute=abs).sum(dim=1)
    reference = _baseline(fn, baseline, x)
    out = model_fn(params, torch.cat([x, reference]))
    batch = x.shape[0]
    index = _targets.resolve_index(out[:batch], target, fn=fn)
    scores = _targets.resolve(out, index.repeat(2), fn=fn)
    change = scores[:batch] - scores[batch:]
    if output_func is not None:
        change = output_func(change)
    gap = (total - change).to(x.dtype)
    return Completeness(gap.abs() <= atol + rtol * change.abs(), gap)


@_docs.fill
def non_sensitivity(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
                    eps: float = 1e-5, features_in_step: int = 1, baseline: Union[str, float, Tensor] = "black",
                    abs: bool = True, normalise: bool = True, batch_size: int = 64) -> Tensor:
    """Non-sensitivity: how many features break "no attribution exactly where removing changes nothing".

    The elements of each example (``x`` flattened, channels first) are taken ``features_in_step`` at a
    time, in order; each group is replaced by the baseline alone and the target score is recomputed.
    A group is *inert* when the score moves by less than ``eps``, and *unattributed* when every one of
    its prepared attributions is below ``eps``. The score counts the groups that are one and not the
    other (the symmetric difference of the two sets). 0 is perfect. With ``features_in_step=1`` this
    is Quantus's value; Quantus raises for larger steps (it compares per-group and per-element arrays).

    Args:
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      {x.batch}
      attribution: ``[B, ...]`` map broadcastable to ``x``'s shape.
      target: ``None`` (the class predicted for ``x``), an int or ``[B]`` ints.
      eps: The threshold for both the score change and the attribution. Default: 1e-5.
      features_in_step: Elements replaced together. Default: 1.
      baseline: ``"black"`` (each example's minimum), ``"white"``, ``"mean"``, a float, or a tensor
        broadcastable to ``x``. Default: "black".
      abs: Take the map's magnitude first (Quantus's default). Default: True.
      normalise: Divide each example's map by its largest magnitude first (per example; Quantus divides
        by the batch's, so an example's count depends on its neighbours). Default: True.
      batch_size: Perturbed inputs per forward pass (at least one group of the whole batch).
        Default: 64.

    Returns:
      ``[B]`` int64 counts. Not differentiable.

    Raises:
      ValueError: a map that does not broadcast to ``x``, a negative ``eps``, bad ``features_in_step`` or
        ``batch_size``, a target out of range.
      TypeError: non-float inputs, a non-bool flag.

    Example:
      >>> non_sensitivity(fn, params, x, saliency(fn, params, x, y), y)   # [4, 3, 8, 8] -> [4]

    Cost: ``1 + ceil(N / features_in_step)`` forwards of the batch (``N`` elements per example), in
    passes of at most ``batch_size`` inputs.
    References: Nguyen & Martinez, "On Quantitative Aspects of Model Interpretability", arXiv 2020.
    """
    fn = "non_sensitivity"
    check_call(fn, model_fn, params, x, target, min_ndim=2)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise _checks.value_error(fn, "eps, a number >= 0", _checks.describe(eps))
    _checks.check_positive_int(fn, "features_in_step", features_in_step)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    attr = _maps.broadcast_attribution(fn, attribution, x)
    batch = x.shape[0]
    values = _maps.prepare(attr.reshape(batch, -1), normalise=normalise, absolute=abs)
    n = values.shape[1]
    groups = -(-n // features_in_step)
    group_of = torch.arange(n, device=x.device) // features_in_step           # [N]
    padded = torch.ones(batch, groups * features_in_step, dtype=torch.bool, device=x.device)
    padded[:, :n] = values < eps                                              # the last group may be short
    unattributed = padded.view(batch, groups, features_in_step).all(dim=2)

    flat_x = x.reshape(batch, -1)
    flat_base = _baseline(fn, baseline, x).reshape(batch, -1)
    with torch.no_grad():
        out = model_fn(params, x)
        index = _targets.resolve_index(out, target, fn=fn)
        reference = _targets.resolve(out, index, fn=fn)                       # [B]
        per_forward = max(1, batch_size // batch)
        inert: List[Tensor] = []
        for first in range(0, groups, per_forward):
            ids = torch.arange(first, min(groups, first + per_forward), device=x.device)   # [s]
            hit = group_of[None, :] == ids[:, None]                            # [s, N]
            perturbed = torch.where(hit[:, None], flat_base[None], flat_x[None])  # [s, B, N]
            scores = _scores(fn, model_fn, params, perturbed.reshape(-1, *x.shape[1:]), index.repeat(ids.shape[0]))
            inert.append(((scores.view(ids.shape[0], batch) - reference[None]).abs() < eps).T)
    return (torch.cat(inert, dim=1) ^ unattributed).sum(dim=1)


@_docs.fill
def input_invariance(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                     target: Target = None, *, first_layer: str, input_shift: float = -1.0, rtol: float = 1e-5,
                     atol: float = 1e-4, abs: bool = False, normalise: bool = False) -> Tensor:
    """Input invariance: is the map the same for ``x + shift`` under a model that undoes the shift?

    The shifted model has the first layer's bias ``b' = b - shift * W.sum(inputs)`` (for a ``Linear``
    weight ``[out, in]`` or a convolution ``[out, in, *kernel]``), so it gives on ``x + shift`` what the
    model gives on ``x`` (exactly for a linear layer or an unpadded convolution; a zero-padded
    convolution differs on its border). The map passes where every element agrees,
    ``|a - a'| <= atol + rtol |a'|`` (numpy's ``isclose``, Quantus's rule). Gradients pass; input x
    gradient and methods with a zero baseline fail. Quantus sets each bias from the *smallest* value of
    the layer's response to the shift (a border value of a padded convolution), so its shifted model
    is off in the interior too; here the bias follows the paper.

    Args:
      method: ``(model_fn, params, x, target) -> map``.
      {model_fn}
      {params}
      {x.batch}
      target: ``None`` (the class predicted for ``x``), an int or ``[B]`` ints.
      first_layer: Parameter-name prefix of the first layer, a ``Linear`` or convolution with a bias
        that ``x`` enters first (e.g. ``"conv1"``, ``"0"`` for an ``nn.Sequential``).
      input_shift: The constant added to ``x``. Default: -1.0 (Quantus's).
      rtol: Relative tolerance. Default: 1e-5.
      atol: Absolute tolerance. Default: 1e-4 (Quantus's).
      abs: Compare magnitudes. Default: False.
      normalise: Divide each map by its largest magnitude first. Default: False (Quantus's).

    Returns:
      ``[B]`` bool, True where the map did not change.

    Raises:
      ValueError: a ``first_layer`` without ``.weight`` and ``.bias`` in ``params``.
      TypeError: a non-callable ``method``, non-number shift or tolerances.

    Example:
      >>> input_invariance(saliency, fn, params, x, y, first_layer="conv1")          # -> [16] bool

    Cost: one forward pass (for a ``None`` target) and two calls of ``method``.
    References: Kindermans et al., "The (Un)reliability of Saliency Methods", in Explainable AI,
      Springer 2019.
    """
    fn = "input_invariance"
    _maps.check_method(fn, method)
    check_call(fn, model_fn, params, x, target, min_ndim=2)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    for name, value in (("input_shift", input_shift), ("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _checks.type_error(fn, f"{name}, a number", _checks.describe(value))
    weight_key, bias_key = f"{first_layer}.weight", f"{first_layer}.bias"
    if not isinstance(first_layer, str) or weight_key not in params or bias_key not in params:
        raise _checks.unknown_name(fn, "first_layer (a prefix with .weight and .bias)", str(first_layer),
                                   sorted({k.rsplit(".", 1)[0] for k in params if k.endswith(".bias")}))
    weight = params[weight_key]
    shifted = dict(params)
    shifted[bias_key] = params[bias_key] - input_shift * weight.sum(dim=tuple(range(1, weight.ndim)))
    if target is None:
        with torch.no_grad():
            target = _targets.resolve_index(model_fn(params, x), None, fn=fn)
    batch = x.shape[0]
    original = _maps.prepare(_maps.flat(fn, "the method's map", method(model_fn, params, x, target)),
                             normalise=normalise, absolute=abs)
    moved = _maps.prepare(_maps.flat(fn, "the method's map", method(model_fn, shifted, x + input_shift, target)),
                          normalise=normalise, absolute=abs)
    return ((original - moved).abs() <= atol + rtol * moved.abs()).reshape(batch, -1).all(dim=1)
