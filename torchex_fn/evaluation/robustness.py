"""Robustness of attribution methods: does the map stay put when the input barely moves? (Quantus's
robustness family.)

* :func:`avg_sensitivity` / :func:`max_sensitivity`: the mean / largest relative change of the map under
  small uniform input noise (Yeh et al., 2019).
* :func:`local_lipschitz_estimate`: the largest ratio of the map's change to the input's change under
  Gaussian noise (Alvarez-Melis & Jaakkola, 2018).
* :func:`continuity`: the largest ratio of the map's change to the input's change along horizontal
  translations (Montavon et al., 2018).
* :func:`consistency`: how often examples with the same discretised map get the same prediction
  (Dasgupta et al., 2022).
* :func:`relative_input_stability`, :func:`relative_output_stability`,
  :func:`relative_representation_stability`: the map's relative change over the relative change of the
  input, the logits or a hidden representation (Agarwal et al., 2022).

The metrics that perturb take the explanation ``method`` first, ``(method, model_fn, params, x, target=None,
*, ...)``, as :func:`torchex_fn.metrics.randomization_check`. The perturbed inputs of several draws are
stacked into one call of ``method`` (``max(1, batch_size // B)`` draws of the whole batch per call), so the
``method`` must accept any batch size and a ``[N]`` target. Maps are prepared per example (``normalise``
divides each map by its own largest magnitude, then ``abs``), never by the maximum of the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core import capture as _capture
from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.arguments import check_call
from ..core.types import ModelFn, Params, Target, module_of
from . import maps as _maps

__all__ = ["avg_sensitivity", "max_sensitivity", "local_lipschitz_estimate", "continuity", "consistency",
           "relative_input_stability", "relative_output_stability", "relative_representation_stability",
           "uniform_noise", "gaussian_noise", "top_n_sign"]

PerturbFn = Callable[[Tensor, Optional[torch.Generator]], Tensor]
Norm = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------ draws
def _device(generator: Optional[torch.Generator]) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def uniform_noise(x: Tensor, generator: Optional[torch.Generator] = None, *, lower_bound: float = 0.02,
                  upper_bound: Optional[float] = None) -> Tensor:
    """``x`` plus noise uniform in ``[-lower_bound, lower_bound]`` (``upper_bound=None``) or in
    ``[lower_bound, upper_bound]``, element by element (Quantus's ``batch_uniform_noise``).

    Drawn as ``torch.rand(x.shape, generator=generator)`` on the generator's device (CPU without one) in
    ``x``'s dtype, then moved to ``x``'s device.
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=_device(generator)).to(x.device)
    low, high = (-lower_bound, lower_bound) if upper_bound is None else (lower_bound, upper_bound)
    return x + low + (high - low) * u


def gaussian_noise(x: Tensor, generator: Optional[torch.Generator] = None, *, perturb_mean: float = 0.0,
                   perturb_std: float = 0.1) -> Tensor:
    """``x`` plus ``N(perturb_mean, perturb_std^2)`` noise, element by element (Quantus's
    ``batch_gaussian_noise``), drawn as :func:`uniform_noise` draws."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_device(generator)).to(x.device)
    return x + perturb_mean + perturb_std * noise


def top_n_sign(attribution: Tensor, n: int = 5) -> Tensor:
    """The label :func:`consistency` compares: the (sorted) positions of each row's ``n`` largest magnitudes
    and the signs there, ``[B, N] -> [B, 2 n]`` (ties: the first position wins)."""
    order = torch.argsort(attribution.abs(), dim=1, descending=True, stable=True)[:, :n]
    positions = order.sort(dim=1).values
    return torch.cat([positions.to(attribution.dtype), attribution.gather(1, positions).sign()], dim=1)


def _fro(values: Tensor) -> Tensor:
    return values.norm(dim=-1)


def _check_number(fn: str, name: str, value: Any, *, low: Optional[float] = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (low is not None and not value >= low):
        expected = f"{name}, a number" + ("" if low is None else f" >= {low}")
        raise _checks.value_error(fn, expected, _checks.describe(value))


def _index(fn: str, model_fn: ModelFn, params: Params, x: Tensor, target: Target) -> Tuple[Tensor, Tensor]:
    """The ``[B]`` class explained (``None``: the predicted one) and the ``[B]`` predicted classes."""
    with torch.no_grad():
        out = model_fn(params, x)
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or [B] ints (a class index the perturbed inputs keep)",
                                 _checks.describe(target))
    return _targets.resolve_index(out, target, fn=fn).to(x.device), out.argmax(dim=1)


class _Explainer:
    """Calls ``method`` on stacks of ``s`` perturbed batches at once and prepares the maps per example."""

    def __init__(self, fn: str, method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                 index: Tensor, abs: bool, normalise: bool) -> None:
        self.fn, self.method, self.model_fn, self.params = fn, method, model_fn, params
        self.x, self.index, self.abs, self.normalise = x, index, abs, normalise
        self.batch = x.shape[0]
        self.reference = self(x[None])[0]

    def __call__(self, inputs: Tensor) -> Tensor:
        """``[s, B, *input]`` -> prepared maps ``[s, B, N]``."""
        count = inputs.shape[0]
        maps = self.method(self.model_fn, self.params, inputs.reshape(-1, *self.x.shape[1:]),
                           self.index.repeat(count))
        if not isinstance(maps, Tensor) or not maps.is_floating_point():
            raise _checks.type_error(self.fn, "method to return a floating-point map", _checks.describe(maps))
        if maps.ndim == 0 or maps.shape[0] != count * self.batch:
            raise _checks.value_error(self.fn, f"method to return one map per input ({count * self.batch})",
                                      _checks.describe(maps))
        flat = _maps.prepare(maps.reshape(count * self.batch, -1), normalise=self.normalise, absolute=self.abs)
        return flat.view(count, self.batch, -1)


def _draw(fn: str, perturb_func: PerturbFn, x: Tensor, generator: Optional[torch.Generator], count: int) -> Tensor:
    """``count`` perturbed copies of the batch, ``[count, B, *input]``, one ``perturb_func`` call each, in order."""
    draws = []
    for _ in range(count):
        result = perturb_func(x, generator)
        if not isinstance(result, Tensor) or result.shape != x.shape:
            raise _checks.value_error(fn, f"perturb_func to return a tensor of x's shape {tuple(x.shape)}",
                                      _checks.describe(result))
        draws.append(result.to(x.dtype))
    return torch.stack(draws)


def _uniform_or(perturb_func: Optional[PerturbFn], lower_bound: float, upper_bound: Optional[float]) -> PerturbFn:
    """``perturb_func``, or (``None``) :func:`uniform_noise` with the bounds."""
    if perturb_func is not None:
        return perturb_func

    def perturb(inputs: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        return uniform_noise(inputs, gen, lower_bound=lower_bound, upper_bound=upper_bound)
    return perturb


def _chunks(total: int, batch: int, batch_size: int) -> List[int]:
    per_call = max(1, batch_size // batch)
    return [min(per_call, total - first) for first in range(0, total, per_call)]


def _predicted(model_fn: ModelFn, params: Params, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        out = model_fn(params, inputs.reshape(-1, *inputs.shape[2:]))
    return out.argmax(dim=1).view(inputs.shape[0], inputs.shape[1])


def _nan_where(changed: Tensor, value: Tensor) -> Tensor:
    """``value`` with NaN where ``changed`` (the draws whose prediction moved) is True."""
    return torch.where(changed, torch.full_like(value, float("nan")), value)


def _common(fn: str, method: Any, model_fn: ModelFn, params: Params, x: Tensor, target: Target,
            nr_samples: int, batch_size: int, generator: Any, perturb_func: Any, **flags: Any) -> Target:
    _maps.check_method(fn, method)
    target = check_call(fn, model_fn, params, x, target, min_ndim=2)
    _checks.check_positive_int(fn, "nr_samples", nr_samples)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_generator(fn, generator)
    _checks.check_optional_callable(fn, "perturb_func", perturb_func)
    _maps.check_flags(fn, **flags)
    return target


# ------------------------------------------------------------------------------ sensitivity
def _sensitivity(fn: str, explain: Callable[[Tensor], Tensor], reference: Tensor, x: Tensor,
                 draw: Callable[[int], Tensor], counts: Sequence[int],
                 similarity_func: Callable[[Tensor, Tensor], Tensor], norm_numerator: Norm,
                 norm_denominator: Norm, changed: Optional[Callable[[Tensor], Tensor]], reduce: str) -> Tensor:
    """``reduce`` (mean or max) over the draws of ``||sim(E(x), E(x'))|| / ||E(x)||`` per example.

    ``explain``: ``[s, B, *input] -> [s, B, N]``; ``reference``: ``[B, N]``; ``changed``: ``[s, B, *input] ->
    [s, B]`` bool (the draws whose value becomes NaN) or None. A zero ``||E(x)||`` counts as 1.
    """
    denominator = norm_denominator(reference)
    denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    values = []
    for count in counts:
        inputs = draw(count)
        maps = explain(inputs)
        if maps.shape[1:] != reference.shape:
            raise _checks.value_error(fn, f"maps of the same shape for perturbed inputs ({tuple(reference.shape)} "
                                      "flattened)", _checks.describe(maps[0]))
        value = norm_numerator(similarity_func(reference[None].expand_as(maps), maps)) / denominator
        if changed is not None:
            value = _nan_where(changed(inputs), value)
        values.append(value)
    stacked = torch.cat(values)  # [n, B]
    return stacked.mean(dim=0) if reduce == "mean" else stacked.amax(dim=0)


def _sensitivity_metric(fn: str, reduce: str, method: Callable[..., Tensor], model_fn: ModelFn, params: Params,
                        x: Tensor, target: Target, nr_samples: int, lower_bound: float, upper_bound: Optional[float],
                        perturb_func: Optional[PerturbFn],
                        similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]],
                        norm_numerator: Optional[Norm], norm_denominator: Optional[Norm], abs: bool, normalise: bool,
                        return_nan_when_prediction_changes: bool, batch_size: int,
                        generator: Optional[torch.Generator]) -> Tensor:
    target = _common(fn, method, model_fn, params, x, target, nr_samples, batch_size, generator, perturb_func,
                     abs=abs, normalise=normalise,
                     return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    _check_number(fn, "lower_bound", lower_bound, low=0)
    _check_number(fn, "upper_bound", upper_bound, allow_none=True)
    if upper_bound is not None and not upper_bound > lower_bound:
        raise _checks.value_error(fn, f"upper_bound > lower_bound ({lower_bound}) or None",
                                  _checks.describe(upper_bound))
    for name, value in (("similarity_func", similarity_func), ("norm_numerator", norm_numerator),
                        ("norm_denominator", norm_denominator)):
        _checks.check_optional_callable(fn, name, value)
    index, predicted = _index(fn, model_fn, params, x, target)
    explainer = _Explainer(fn, method, model_fn, params, x, index, abs, normalise)
    perturb_fn = _uniform_or(perturb_func, lower_bound, upper_bound)
    changed = None
    if return_nan_when_prediction_changes:
        def changed(inputs: Tensor) -> Tensor:
            return _predicted(model_fn, params, inputs) != predicted[None]
    return _sensitivity(fn, explainer, explainer.reference, x,
                        lambda count: _draw(fn, perturb_fn, x, generator, count),
                        _chunks(nr_samples, x.shape[0], batch_size),
                        _difference if similarity_func is None else similarity_func,
                        _fro if norm_numerator is None else norm_numerator,
                        _fro if norm_denominator is None else norm_denominator, changed, reduce)


def _difference(a: Tensor, b: Tensor) -> Tensor:
    return a - b




@_docs.fill
def avg_sensitivity(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                    target: Target = None, *, nr_samples: int = 200, lower_bound: float = 0.2,
                    upper_bound: Optional[float] = None, perturb_func: Optional[PerturbFn] = None,
                    similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                    norm_numerator: Optional[Norm] = None, norm_denominator: Optional[Norm] = None,
                    abs: bool = False, normalise: bool = False, return_nan_when_prediction_changes: bool = False,
                    batch_size: int = 64, generator: Optional[torch.Generator] = None) -> Tensor:
    """Average sensitivity: the mean relative change of the map under uniform input noise.

    ``mean_k ||E(x) - E(x + d_k)|| / ||E(x)||`` per example, ``d_k`` uniform in ``[-lower_bound,
    lower_bound]`` element by element (Quantus's ``AvgSensitivity``, its defaults). Lower is more robust.

    Args:
      {args.sensitivity}

    Returns:
      ``[B]`` sensitivities, in the map's dtype. Differentiable wherever ``method`` is.

    Raises:
      ValueError: bad counts or bounds, a perturbation or map of the wrong shape, a target out of range.
      TypeError: a non-callable ``method`` / option, non-float ``x``, a bad generator.

    Example:
      >>> avg_sensitivity(tx.saliency, fn, params, x, y, nr_samples=20, generator=gen)    # -> [B]

    Cost: ``nr_samples + 1`` maps of the batch in ``ceil(nr_samples * B / batch_size)`` calls of ``method``.
    References: Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.
    """
    return _sensitivity_metric("avg_sensitivity", "mean", method, model_fn, params, x, target, nr_samples,
                               lower_bound, upper_bound, perturb_func, similarity_func, norm_numerator,
                               norm_denominator, abs, normalise, return_nan_when_prediction_changes, batch_size,
                               generator)


@_docs.fill
def max_sensitivity(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                    target: Target = None, *, nr_samples: int = 200, lower_bound: float = 0.2,
                    upper_bound: Optional[float] = None, perturb_func: Optional[PerturbFn] = None,
                    similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                    norm_numerator: Optional[Norm] = None, norm_denominator: Optional[Norm] = None,
                    abs: bool = False, normalise: bool = False, return_nan_when_prediction_changes: bool = False,
                    batch_size: int = 64, generator: Optional[torch.Generator] = None) -> Tensor:
    """Max sensitivity: the largest relative change of the map under uniform input noise.

    ``max_k ||E(x) - E(x + d_k)|| / ||E(x)||`` per example (Quantus's ``MaxSensitivity``, its defaults).
    :func:`torchex_fn.metrics.sensitivity_max` is the same computation with captum's argument convention
    (an ``explain_fn`` of ``x`` alone, radius 0.02, 10 draws). Lower is more robust.

    Args:
      {args.sensitivity}

    Returns:
      ``[B]`` sensitivities, in the map's dtype. Differentiable wherever ``method`` is.

    Raises:
      ValueError: bad counts or bounds, a perturbation or map of the wrong shape, a target out of range.
      TypeError: a non-callable ``method`` / option, non-float ``x``, a bad generator.

    Example:
      >>> max_sensitivity(tx.saliency, fn, params, x, y, nr_samples=20, generator=gen)    # -> [B]

    Cost: ``nr_samples + 1`` maps of the batch in ``ceil(nr_samples * B / batch_size)`` calls of ``method``.
    References: Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.
    """
    return _sensitivity_metric("max_sensitivity", "max", method, model_fn, params, x, target, nr_samples,
                               lower_bound, upper_bound, perturb_func, similarity_func, norm_numerator,
                               norm_denominator, abs, normalise, return_nan_when_prediction_changes, batch_size,
                               generator)


# ------------------------------------------------------------------------- local Lipschitz
@_docs.fill
def local_lipschitz_estimate(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                             target: Target = None, *, nr_samples: int = 200, perturb_mean: float = 0.0,
                             perturb_std: float = 0.1, perturb_func: Optional[PerturbFn] = None, abs: bool = False,
                             normalise: bool = True, return_nan_when_prediction_changes: bool = False,
                             batch_size: int = 64, generator: Optional[torch.Generator] = None) -> Tensor:
    """Local Lipschitz estimate: the largest ``||E(x) - E(x')||_2 / (||x - x'||_2 + 1e-10)`` over Gaussian draws.

    ``x' = x + N(perturb_mean, perturb_std^2)`` element by element (Quantus's ``LocalLipschitzEstimate``,
    its defaults: 200 draws, std 0.1, maps normalised). Lower is more robust.

    Args:
      {args.perturbed}
      {nr_samples.perturbed}
      perturb_mean: Mean of the noise. Default: 0.
      perturb_std: Standard deviation of the noise. Default: 0.1.
      perturb_func: ``(x, generator) -> perturbed x``, called once per draw. Default: None (:func:`gaussian_noise`).
      {abs.robustness}
      normalise: Divide each map by its own largest magnitude first. Default: True.
      return_nan_when_prediction_changes: NaN for an example when any draw changes its prediction. Default: False.
      {batch_size.perturbed}
      {generator.noise}

    Returns:
      ``[B]`` estimates, in the map's dtype. Differentiable wherever ``method`` is.

    Raises:
      ValueError: bad counts or a negative ``perturb_std``, a perturbation or map of the wrong shape.
      TypeError: a non-callable ``method`` / ``perturb_func``, non-float ``x``, a bad generator.

    Example:
      >>> local_lipschitz_estimate(tx.saliency, fn, params, x, y, nr_samples=20, generator=gen)   # -> [B]

    Cost: ``nr_samples + 1`` maps of the batch, in chunks of ``batch_size`` inputs.
    References: Alvarez-Melis & Jaakkola, "On the Robustness of Interpretability Methods", ICML workshop 2018.
    """
    fn = "local_lipschitz_estimate"
    target = _common(fn, method, model_fn, params, x, target, nr_samples, batch_size, generator, perturb_func,
                     abs=abs, normalise=normalise,
                     return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    _check_number(fn, "perturb_mean", perturb_mean)
    _check_number(fn, "perturb_std", perturb_std, low=0)
    index, predicted = _index(fn, model_fn, params, x, target)
    explainer = _Explainer(fn, method, model_fn, params, x, index, abs, normalise)

    def perturb(inputs: Tensor, gen: Optional[torch.Generator]) -> Tensor:
        return gaussian_noise(inputs, gen, perturb_mean=perturb_mean, perturb_std=perturb_std)

    perturb_fn = perturb if perturb_func is None else perturb_func
    flat_x = x.reshape(x.shape[0], -1)
    values = []
    for count in _chunks(nr_samples, x.shape[0], batch_size):
        inputs = _draw(fn, perturb_fn, x, generator, count)
        maps = explainer(inputs)
        value = (maps - explainer.reference[None]).norm(dim=-1) / (
            (inputs.reshape(count, x.shape[0], -1) - flat_x[None]).norm(dim=-1) + 1e-10)
        if return_nan_when_prediction_changes:
            value = _nan_where(_predicted(model_fn, params, inputs) != predicted[None], value)
        values.append(value)
    return torch.cat(values).amax(dim=0)


# ------------------------------------------------------------------------------- continuity
def _fill(fn: str, baseline: Any, x: Tensor) -> Tensor:
    """``[B, 1, 1, 1]`` (or broadcastable) value of the pixels a translation uncovers."""
    flat = x.reshape(x.shape[0], -1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    if isinstance(baseline, str):
        named: Dict[str, Callable[[], Tensor]] = {"black": lambda: flat.amin(dim=1),
                                                  "white": lambda: flat.amax(dim=1), "mean": lambda: flat.mean(dim=1)}
        if baseline not in named:
            raise _checks.value_error(fn, f"perturb_baseline, one of {sorted(named)} or a number", repr(baseline))
        return named[baseline]().view(shape)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise _checks.type_error(fn, "perturb_baseline, one of 'black', 'white', 'mean' or a number",
                                 _checks.describe(baseline))
    return torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float(baseline), dtype=x.dtype, device=x.device)


def _translate(x: Tensor, shift: int, fill: Tensor) -> Tensor:
    """``x`` moved ``shift`` pixels along its last axis (right for positive), uncovered pixels ``fill``."""
    width = x.shape[-1]
    step = max(-width, min(width, shift))
    pad = fill.expand(*x.shape[:-1], abs(step))
    if step >= 0:
        return torch.cat([pad, x[..., :width - step]], dim=-1)
    return torch.cat([x[..., -step:], pad], dim=-1)


@_docs.fill
def continuity(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor, target: Target = None,
               *, nr_steps: int = 28, perturb_baseline: Union[str, float] = "black", abs: bool = True,
               normalise: bool = True, return_nan_when_prediction_changes: bool = False,
               batch_size: int = 64) -> Tensor:
    """Continuity: the largest ``||E(x) - E(x')||_1 / (||x - x'||_2 + 1e-9)`` over horizontal translations.

    The image moves by ``-W + k * dx`` pixels, ``k = 1 .. nr_steps``, ``dx = (2 W + 1) // nr_steps``; the
    uncovered columns take ``perturb_baseline`` (Quantus's ``Continuity``, its defaults). Quantus always
    pads with the example's minimum whatever ``perturb_baseline`` says, and normalises the maps by the
    maximum of the whole batch; here the baseline is honoured and each map is normalised alone. A
    translation that leaves the input as it is (the shift 0) counts 0, as the identical maps Quantus
    compares there. Lower is more continuous. Deterministic.

    Args:
      method: ``(model_fn, params, x, target) -> map``; called on stacks of translated batches.
      {model_fn}
      {params}
      x: Images ``[B, C, H, W]`` (or sequences ``[B, C, T]``, translated along ``T``).
      target: ``None`` (the predicted class), an int or ``[B]`` ints; kept for the translated inputs.
      nr_steps: Translations, at most ``2 W + 1``. Default: 28.
      perturb_baseline: ``"black"`` (each example's minimum), ``"white"`` (maximum), ``"mean"``, or a
        number. Default: ``"black"``.
      abs: Compare magnitudes. Default: True.
      normalise: Divide each map by its own largest magnitude first. Default: True.
      return_nan_when_prediction_changes: NaN for an example when a translation changes its predicted class
        away from ``target``. Default: False.
      batch_size: Translated inputs per call of ``method``. Default: 64.

    Returns:
      ``[B]`` values, in the map's dtype.

    Raises:
      ValueError: ``nr_steps`` above ``2 W + 1``, an unknown baseline, inputs of rank other than 3 or 4.
      TypeError: a non-callable ``method``, non-float ``x``.

    Example:
      >>> continuity(tx.saliency, fn, params, x, y, nr_steps=8)             # [8, 3, 32, 32] -> [8]

    Cost: ``nr_steps + 1`` maps of the batch (and ``nr_steps`` forwards with the NaN option).
    References: Montavon et al., "Methods for Interpreting and Understanding Deep Neural Networks",
      Digital Signal Processing 2018.
    """
    fn = "continuity"
    _maps.check_method(fn, method)
    target = check_call(fn, model_fn, params, x, target, min_ndim=3)
    if x.ndim not in (3, 4):
        raise _checks.value_error(fn, "x of shape [B, C, H, W] or [B, C, T]", _checks.describe(x))
    _checks.check_positive_int(fn, "nr_steps", nr_steps)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _maps.check_flags(fn, abs=abs, normalise=normalise,
                      return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    width = x.shape[-1]
    if nr_steps > 2 * width + 1:
        raise _checks.value_error(fn, f"nr_steps <= 2 W + 1 = {2 * width + 1}", _checks.describe(nr_steps))
    fill = _fill(fn, perturb_baseline, x)
    index, _ = _index(fn, model_fn, params, x, target)
    explainer = _Explainer(fn, method, model_fn, params, x, index, abs, normalise)
    dx = (2 * width + 1) // nr_steps
    shifts = [-width + k * dx for k in range(1, nr_steps + 1)]
    flat_x = x.reshape(x.shape[0], -1)
    values = []
    for first in range(0, nr_steps, max(1, batch_size // x.shape[0])):
        part = shifts[first:first + max(1, batch_size // x.shape[0])]
        inputs = torch.stack([_translate(x, shift, fill) for shift in part])
        maps = explainer(inputs)
        distance = (inputs.reshape(len(part), x.shape[0], -1) - flat_x[None]).norm(dim=-1)
        value = (maps - explainer.reference[None]).abs().sum(dim=-1) / (distance + 1e-9)
        # an unmoved input (the shift 0, or a constant row) is the same input: its map is the same map,
        # whatever rounding a call on another batch size brings (which 1e-9 would blow up)
        value = torch.where(distance == 0, torch.zeros_like(value), value)
        if return_nan_when_prediction_changes:
            value = _nan_where(_predicted(model_fn, params, inputs) != index[None], value)
        values.append(value)
    return torch.cat(values).amax(dim=0)


# ------------------------------------------------------------------------------ consistency
@_docs.fill
def consistency(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, *, n: int = 5,
                discretise_func: Optional[Callable[[Tensor], Tensor]] = None, abs: bool = True,
                normalise: bool = True) -> Tensor:
    """Consistency: the share of the other examples with the same discretised map that get the same prediction.

    Each map is discretised into a label (by default the positions of its ``n`` largest magnitudes and the
    signs there, :func:`top_n_sign`); example ``i`` scores ``#{{j != i: label_j = label_i, pred_j = pred_i}} /
    (#{{j != i: label_j = label_i}} + 1e-9)`` (0 when no other example shares its label). The score of an
    example depends on the batch by definition. Quantus's ``top_n_sign`` keeps the signs of the *first*
    ``n`` elements of the flattened map, whatever their size (with ``abs`` all of them are +1, so every map
    gets the same label); pass ``discretise_func=lambda a: a[:, :5].sign()`` to reproduce it.

    Args:
      {model_fn}
      {params}
      {x.batch}
      attribution: ``[B, ...]`` maps, one per example.
      n: Largest elements in the label. Default: 5.
      discretise_func: ``[B, N] -> [B, K]`` labels (equal rows: the same label). Default: None (:func:`top_n_sign`).
      abs: Take magnitudes before discretising. Default: True.
      normalise: Divide each map by its own largest magnitude first. Default: True.

    Returns:
      ``[B]`` scores in ``[0, 1]``, in the map's dtype.

    Raises:
      ValueError: a map with another batch size, a bad ``n``.
      TypeError: non-float maps, a non-callable ``discretise_func``.

    Example:
      >>> consistency(fn, params, x, tx.saliency(fn, params, x))          # -> [B]

    Cost: one forward pass.
    References: Dasgupta et al., "Framework for Evaluating Faithfulness of Local Explanations", ICML 2022.
    """
    fn = "consistency"
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _checks.check_input(fn, x, min_ndim=1)
    flat = _maps.flat(fn, "attribution", attribution)
    if flat.shape[0] != x.shape[0]:
        raise _checks.value_error(fn, f"attribution with x's batch size {x.shape[0]}", _checks.describe(attribution))
    _checks.check_positive_int(fn, "n", n)
    _checks.check_optional_callable(fn, "discretise_func", discretise_func)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    prepared = _maps.prepare(flat, normalise=normalise, absolute=abs)
    labels = top_n_sign(prepared, n) if discretise_func is None else discretise_func(prepared)
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.shape[0] != x.shape[0]:
        raise _checks.value_error(fn, f"discretise_func to return labels [B, K] with B = {x.shape[0]}",
                                  _checks.describe(labels))
    with torch.no_grad():
        predicted = model_fn(params, x).argmax(dim=1)
    others = ~torch.eye(x.shape[0], dtype=torch.bool, device=flat.device)
    same_label = (labels[:, None] == labels[None]).all(dim=-1) & others
    same_class = (predicted[:, None] == predicted[None]).to(flat.device)
    return ((same_label & same_class).sum(1).to(flat.dtype) / (same_label.sum(1).to(flat.dtype) + 1e-9))


# -------------------------------------------------------------------- relative stabilities
def _relative(values: Tensor, reference: Tensor, eps_min: float) -> Tensor:
    """``(reference - values) / reference`` with ``eps_min`` in place of a zero reference, ``[..., N]``."""
    return (reference - values) / torch.where(reference == 0, torch.full_like(reference, eps_min), reference)


def _stability(fn: str, kind: str, method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
               target: Target, nr_samples: int, lower_bound: float, upper_bound: Optional[float],
               perturb_func: Optional[PerturbFn], eps_min: float, abs: bool, normalise: bool,
               return_nan_when_prediction_changes: bool, batch_size: int, generator: Optional[torch.Generator],
               layer: Any = None) -> Tensor:
    target = _common(fn, method, model_fn, params, x, target, nr_samples, batch_size, generator, perturb_func,
                     abs=abs, normalise=normalise,
                     return_nan_when_prediction_changes=return_nan_when_prediction_changes)
    _check_number(fn, "lower_bound", lower_bound)
    _check_number(fn, "upper_bound", upper_bound, allow_none=True)
    _check_number(fn, "eps_min", eps_min, low=0)
    names: List[str] = []
    if kind == "representation":
        if layer is None:
            module = module_of(model_fn)
            if module is None:
                raise _checks.type_error(fn, "layer (module names) for a model_fn not built by functionalize",
                                         "None")
            names = [name for name, child in module.named_modules() if name and not any(True for _ in
                                                                                         child.children())]
        else:
            names, _ = _capture.resolve_layers(fn, model_fn, layer)
    index, predicted = _index(fn, model_fn, params, x, target)
    explainer = _Explainer(fn, method, model_fn, params, x, index, abs, normalise)
    batch = x.shape[0]

    def forward(inputs: Tensor) -> Tuple[Tensor, Tensor]:
        """Outputs ``[N, classes]`` and the representation compared, ``[N, M]``; with autograd on, so that the
        output and representation stabilities are differentiable in ``params`` (no graph unless they require it)."""
        if kind != "representation":
            out = model_fn(params, inputs)
            return out, inputs.reshape(inputs.shape[0], -1) if kind == "input" else out
        out, acts = _capture.intermediates(model_fn, layers=names, fn=fn)(params, inputs)
        return out, torch.cat([acts[name].reshape(inputs.shape[0], -1) for name in names], dim=1)

    reference_out, reference_rep = forward(x)
    perturb_fn = _uniform_or(perturb_func, lower_bound, upper_bound)
    values = []
    for count in _chunks(nr_samples, batch, batch_size):
        inputs = _draw(fn, perturb_fn, x, generator, count)
        maps = explainer(inputs)
        numerator = _relative(maps, explainer.reference[None], eps_min).norm(dim=-1)
        out, rep = forward(inputs.reshape(-1, *x.shape[1:]))
        rep = rep.view(count, batch, -1)
        if kind == "output":
            denominator = (reference_rep[None] - rep).norm(dim=-1)
        else:
            denominator = _relative(rep, reference_rep[None], eps_min).norm(dim=-1)
        denominator = torch.where(denominator == 0, torch.full_like(denominator, eps_min), denominator)
        value = numerator / denominator.to(numerator.dtype)
        if return_nan_when_prediction_changes:
            value = _nan_where(out.argmax(dim=1).view(count, batch) != predicted[None], value)
        values.append(value)
    return torch.cat(values).amax(dim=0)




@_docs.fill
def relative_input_stability(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                             target: Target = None, *, nr_samples: int = 200, lower_bound: float = 0.02,
                             upper_bound: Optional[float] = 0.2, perturb_func: Optional[PerturbFn] = None,
                             eps_min: float = 1e-6, abs: bool = False, normalise: bool = False,
                             return_nan_when_prediction_changes: bool = True, batch_size: int = 64,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Relative input stability: ``max ||(E(x) - E(x')) / E(x)|| / ||(x - x') / x||`` over uniform draws.

    Element-wise relative changes (``eps_min`` in place of a zero divisor), Euclidean norms over each
    example, ``x' = x + U(lower_bound, upper_bound)`` (Quantus's ``RelativeInputStability``, its defaults).
    Lower is more stable.

    Args:
      {args.perturbed}
      {args.stability}

    Returns:
      ``[B]`` values, in the map's dtype.

    Raises:
      ValueError: bad counts or bounds, a perturbation or map of the wrong shape.
      TypeError: a non-callable ``method`` / ``perturb_func``, non-float ``x``, a bad generator.

    Example:
      >>> relative_input_stability(tx.saliency, fn, params, x, y, nr_samples=20, generator=gen)   # -> [B]

    Cost: ``nr_samples + 1`` maps and forwards of the batch, in chunks of ``batch_size`` inputs.
    References: Agarwal et al., "Rethinking Stability for Attribution-based Explanations", ICLR workshop 2022.
    """
    return _stability("relative_input_stability", "input", method, model_fn, params, x, target, nr_samples,
                      lower_bound, upper_bound, perturb_func, eps_min, abs, normalise,
                      return_nan_when_prediction_changes, batch_size, generator)


@_docs.fill
def relative_output_stability(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                              target: Target = None, *, nr_samples: int = 200, lower_bound: float = 0.02,
                              upper_bound: Optional[float] = 0.2, perturb_func: Optional[PerturbFn] = None,
                              eps_min: float = 1e-6, abs: bool = False, normalise: bool = False,
                              return_nan_when_prediction_changes: bool = True, batch_size: int = 64,
                              generator: Optional[torch.Generator] = None) -> Tensor:
    """Relative output stability: ``max ||(E(x) - E(x')) / E(x)|| / ||h(x) - h(x')||`` over uniform draws.

    ``h`` the model's output (logits), otherwise as :func:`relative_input_stability` (Quantus's
    ``RelativeOutputStability``, its defaults). Lower is more stable.

    Args:
      {args.perturbed}
      {args.stability}

    Returns:
      ``[B]`` values, in the map's dtype.

    Raises:
      ValueError: bad counts or bounds, a perturbation or map of the wrong shape.
      TypeError: a non-callable ``method`` / ``perturb_func``, non-float ``x``, a bad generator.

    Example:
      >>> relative_output_stability(tx.saliency, fn, params, x, y, nr_samples=20, generator=gen)  # -> [B]

    Cost: ``nr_samples + 1`` maps and forwards of the batch, in chunks of ``batch_size`` inputs.
    References: Agarwal et al., "Rethinking Stability for Attribution-based Explanations", ICLR workshop 2022.
    """
    return _stability("relative_output_stability", "output", method, model_fn, params, x, target, nr_samples,
                      lower_bound, upper_bound, perturb_func, eps_min, abs, normalise,
                      return_nan_when_prediction_changes, batch_size, generator)


@_docs.fill
def relative_representation_stability(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                                      target: Target = None, *, layer: Any = None, nr_samples: int = 200,
                                      lower_bound: float = 0.02, upper_bound: Optional[float] = 0.2,
                                      perturb_func: Optional[PerturbFn] = None, eps_min: float = 1e-6,
                                      abs: bool = False, normalise: bool = False,
                                      return_nan_when_prediction_changes: bool = True, batch_size: int = 64,
                                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Relative representation stability: ``max ||(E(x) - E(x')) / E(x)|| / ||(L(x) - L(x')) / L(x)||``.

    ``L`` a hidden representation: the outputs of ``layer`` flattened and concatenated, otherwise as
    :func:`relative_input_stability` (Quantus's ``RelativeRepresentationStability``, its defaults; Quantus's
    default representation is every non-``Sequential`` module's output, which ``layer=None`` gives for
    models made of leaf modules). Lower is more stable.

    Args:
      {args.perturbed}
      layer: A module name or a list of them. Default: None (every leaf module of ``functionalize``'s model).
      {args.stability}

    Returns:
      ``[B]`` values, in the map's dtype.

    Raises:
      ValueError: an unknown layer, bad counts or bounds, a perturbation or map of the wrong shape.
      TypeError: a non-callable ``method`` / ``perturb_func``, non-float ``x``, a bad generator, no layer
        for a model_fn not built by ``functionalize``.

    Example:
      >>> relative_representation_stability(tx.saliency, fn, params, x, y, layer="features", nr_samples=20)

    Cost: ``nr_samples + 1`` maps and forwards of the batch, in chunks of ``batch_size`` inputs.
    References: Agarwal et al., "Rethinking Stability for Attribution-based Explanations", ICLR workshop 2022.
    """
    return _stability("relative_representation_stability", "representation", method, model_fn, params, x, target,
                      nr_samples, lower_bound, upper_bound, perturb_func, eps_min, abs, normalise,
                      return_nan_when_prediction_changes, batch_size, generator, layer)
