"""Adversarial robustness as pure functions (``tx.robust``): FGSM, PGD, the smallest breaking perturbation and
a comparison of attacks, captum's ``captum.robust`` without objects.

* :func:`fgsm`: one step along the sign of the loss gradient (Goodfellow et al., ICLR 2015; ``norm="L2"``:
  along the gradient scaled to unit L2 norm, the fast gradient method);
* :func:`pgd`: projected gradient descent (Madry et al., ICLR 2018) in an L-infinity or L2 ball, with a
  uniform random start drawn from a ``generator``;
* :func:`min_param_perturbation`: per example, the first value of an attack's parameter (in a given order)
  whose perturbed input the model gets wrong, by a linear scan or (``mode="binary"``) a bisection;
* :func:`attack_comparator`: a metric on the original input and on each attack's output (mean, min and
  max over repeated attempts).

Every function is a function of ``params`` and ``x`` that runs under ``torch.func.vmap`` (over an ensemble's
parameters; a random start draws with a generator, which ``vmap`` allows with ``randomness="same"``), except
the binary search of :func:`min_param_perturbation`, which branches on the model's answers (it says so).
Gradients are per example: the loss is summed over the batch, and each example's input gradient is its
own loss's.

Where captum differs: its L2 ``PGD`` takes sign steps (the L-infinity step) and only rescales the
perturbation onto the ball; :func:`pgd` with ``norm="L2"`` steps along ``g / |g|_2``, then projects, as
Madry et al. do. Its L2 random start multiplies the per-example radius ``[B]`` into the last axis of the
input (right-aligned broadcasting), so it fails or mixes examples unless ``B`` is 1 or the last axis has
length ``B``; :func:`pgd` scales each example by its own radius.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import targets as _targets
from ..core.arguments import check_call
from ..core.autodiff import grad_of_sum
from ..core.env import concrete_any

__all__ = ["fgsm", "pgd", "min_param_perturbation", "attack_comparator", "MinPerturbation"]

_NORMS = ("Linf", "L2")
_LOSSES = ("cross_entropy", "neg_log")
ORIGINAL = "Original"


class MinPerturbation(NamedTuple):
    """What :func:`min_param_perturbation` returns (``B`` examples)."""

    value: Tensor      # [B] float64: the first parameter value the model gets wrong (NaN: none of them)
    perturbed: Tensor  # [B, *input]: the perturbed input at that value (the input itself where none)
    found: Tensor      # [B] bool: whether some value broke the example


def _view(t: Tensor, ndim: int) -> Tensor:
    """``[B] -> [B, 1, ..., 1]`` with ``ndim`` axes in all."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def _norms(t: Tensor) -> Tensor:
    """Per-example L2 norms ``[B, 1, ..., 1]``."""
    return _view(t.reshape(t.shape[0], -1).norm(dim=1), t.ndim)


def _check_number(fn: str, name: str, value: Any, *, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _checks.type_error(fn, f"{name}, a float", _checks.describe(value))
    if math.isnan(value) or (positive and not value > 0) or (not positive and value < 0):
        raise _checks.value_error(fn, f"{name} {'> 0' if positive else '>= 0'}", _checks.describe(value))


def _check_options(fn: str, norm: Any, loss: Any, targeted: Any, mask: Any, x: Tensor, lower: Any, upper: Any,
                   zero_threshold: Any) -> None:
    if not isinstance(norm, str) or norm not in _NORMS:
        raise _checks.value_error(fn, "norm 'Linf' or 'L2'", _checks.describe(norm))
    if not callable(loss) and (not isinstance(loss, str) or loss not in _LOSSES):
        raise _checks.value_error(fn, "loss 'cross_entropy', 'neg_log' or a callable (out, target) -> [B]",
                                  _checks.describe(loss))
    _checks.check_bool(fn, "targeted", targeted)
    _check_number(fn, "zero_threshold", zero_threshold, positive=False)
    for name, bound in (("lower_bound", lower), ("upper_bound", upper)):
        if isinstance(bound, bool) or not isinstance(bound, (int, float, Tensor)):
            raise _checks.type_error(fn, f"{name}, a float or a tensor broadcastable to x", _checks.describe(bound))
    if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and not lower <= upper:
        raise _checks.value_error(fn, "lower_bound <= upper_bound", f"{lower} > {upper}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise _checks.type_error(fn, "mask, a tensor of 0 and 1 broadcastable to x, or None",
                                     _checks.describe(mask))
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            raise _checks.value_error(fn, f"mask broadcastable to x's shape {tuple(x.shape)}",
                                      _checks.describe(mask)) from None


def _check_model_and_x(fn: str, model_fn: Any, params: Any, x: Any) -> None:
    """The checks :func:`min_param_perturbation` and :func:`attack_comparator` share: a model, its params and
    one floating-point tensor ``x`` (their targets are checked, or resolved, by each)."""
    if not isinstance(x, Tensor):
        raise _checks.type_error(fn, "x, a floating-point tensor [B, ...]", _checks.describe(x))
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _checks.check_input(fn, x, min_ndim=1, layer_option=False)


def _check_x(fn: str, model_fn: Any, params: Any, x: Any, target: Any, loss: Any) -> Any:
    """The shared checks; ``x`` must be one floating-point tensor (an attack moves the input itself)."""
    if not isinstance(x, Tensor):
        raise _checks.type_error(fn, "x, a floating-point tensor [B, ...]", _checks.describe(x))
    if callable(loss):  # the loss reads the target itself: any value
        _checks.check_model_fn(fn, model_fn)
        _checks.check_params(fn, params, model_fn)
        _checks.check_input(fn, x, min_ndim=1, layer_option=False)
        return target
    if _targets.is_callable(target):
        raise _checks.type_error(fn, "target None, an int or [B] ints (class indices for the loss)", "a callable",
                                 "A loss of your own reads any target: pass loss=callable (out, target) -> [B].")
    return check_call(fn, model_fn, params, x, target, min_ndim=1, layer_option=False)


def _resolve_target(model_fn: Any, params: Any, x: Tensor, target: Any, loss: Any, fn: str) -> Any:
    """Class indices ``[B]`` for the built-in losses (None: the class predicted for the unperturbed ``x``)."""
    if callable(loss):
        return target
    if target is None:
        with torch.no_grad():
            return _targets.select_output(model_fn(params, x), _targets.selector(model_fn), fn=fn).argmax(-1)
    if isinstance(target, Tensor):
        return target.to(x.device).reshape(-1).expand(x.shape[0]) if target.numel() == 1 else target.to(x.device)
    return torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)


def _losses(model_fn: Any, loss: Any, fn: str) -> Callable[[Any, Tensor, Any], Tensor]:
    """``(params, x, target) -> per-example loss [B]``."""
    if callable(loss):
        return lambda params, x, target: loss(model_fn(params, x), target)

    def builtin(params: Any, x: Tensor, target: Tensor) -> Tensor:
        out = _targets.select_output(model_fn(params, x), _targets.selector(model_fn), fn=fn)
        if loss == "cross_entropy":
            return F.cross_entropy(out, target, reduction="none")
        return -torch.log(out.gather(1, target[:, None]))[:, 0]

    return builtin


def _gradient(losses: Callable, params: Any, x: Tensor, target: Any) -> Tensor:
    return grad_of_sum(lambda z: losses(params, z, target).sum(), x)


def _step(x: Tensor, grad: Tensor, size: float, norm: str, sign: float, mask: Optional[Tensor],
          zero_threshold: float) -> Tensor:
    """One ascent step (``sign = -1``: descent) of length ``size`` in ``norm``."""
    if mask is not None:
        grad = grad * mask
    if norm == "Linf":
        direction = torch.where(grad.abs() > zero_threshold, grad.sign(), torch.zeros_like(grad))
    else:
        length = _norms(grad)
        direction = torch.where(length > zero_threshold, grad / length.clamp_min(torch.finfo(grad.dtype).tiny),
                                torch.zeros_like(grad))
    return x + (sign * size) * direction


def _project(center: Tensor, x: Tensor, radius: float, norm: str) -> Tensor:
    delta = x - center
    if norm == "Linf":
        return center + delta.clamp(-radius, radius)
    length = _norms(delta)
    return center + torch.where(length > radius, delta * (radius / length.clamp_min(torch.finfo(x.dtype).tiny)), delta)


def _bound(x: Tensor, lower: Any, upper: Any) -> Tensor:
    return torch.clamp(x, min=lower, max=upper)


def fgsm(model_fn: Any, params: Any, x: Tensor, target: Any = None, *, epsilon: float, norm: str = "Linf",
         targeted: bool = False, lower_bound: Union[float, Tensor] = -math.inf,
         upper_bound: Union[float, Tensor] = math.inf, loss: Any = "cross_entropy", mask: Optional[Tensor] = None,
         zero_threshold: float = 1e-6) -> Tensor:
    """The fast gradient sign method: ``x + epsilon * sign(grad_x loss)``, clamped to the bounds.

    Untargeted (default) the step increases the loss of ``target`` (the true class); ``targeted=True`` it
    decreases the loss of ``target`` (the class to reach). Gradient entries with ``|g| <= zero_threshold``
    do not move (captum's ``zero_thresh``). ``norm="L2"`` steps along ``g / |g|_2`` per example instead
    (the fast gradient method; examples whose gradient norm is ``<= zero_threshold`` do not move).
    Equal to captum's ``FGSM(model, loss_func, lower_bound, upper_bound).perturb(x, epsilon, target, ...)``
    for ``norm="Linf"`` (captum's default loss is ``loss="neg_log"``; ``"cross_entropy"`` is its
    ``loss_func=nn.CrossEntropyLoss(reduction="none")``).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, floating point.
      target: Class indices for the built-in losses: ``None`` (the class predicted for ``x``), an int or
        ``[B]`` ints; with a callable ``loss``, anything it reads.
      epsilon: The step size, ``>= 0``.
      norm: ``"Linf"`` (sign step, default) or ``"L2"``.
      targeted: Move towards ``target`` instead of away from it. Default: False.
      lower_bound: The smallest allowed input value (a float or a tensor broadcastable to ``x``).
        Default: ``-inf``.
      upper_bound: The largest allowed input value. Default: ``inf``.
      loss: ``"cross_entropy"`` (of the logits, default), ``"neg_log"`` (``-log out[target]``, for a
        model that outputs probabilities: captum's default) or a callable ``(out, target) -> [B]`` on
        the model's raw output.
      mask: 0/1 tensor broadcastable to ``x``: only the elements where it is 1 move. Default: all.
      zero_threshold: Gradient magnitudes treated as zero. Default: ``1e-6`` (captum's).

    Returns:
      The perturbed batch, ``x``'s shape and dtype.

    Raises:
      TypeError: non-float ``x``, bad option types.
      ValueError: an unknown ``norm`` or ``loss``, ``epsilon < 0``, a ``mask`` of the wrong shape.

    Example:
      >>> adversarial = tx.robust.fgsm(fn, params, images, labels, epsilon=8 / 255, lower_bound=0, upper_bound=1)
    """
    fn = "robust.fgsm"
    target = _check_x(fn, model_fn, params, x, target, loss)
    _check_number(fn, "epsilon", epsilon, positive=False)
    _check_options(fn, norm, loss, targeted, mask, x, lower_bound, upper_bound, zero_threshold)
    losses = _losses(model_fn, loss, fn)
    target = _resolve_target(model_fn, params, x, target, loss, fn)
    grad = _gradient(losses, params, x, target)
    stepped = _step(x, grad, float(epsilon), norm, -1.0 if targeted else 1.0, mask, float(zero_threshold))
    return _bound(stepped, lower_bound, upper_bound)


def _random_start(x: Tensor, radius: float, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """A uniform draw from the ball of ``radius`` around 0, per example (the draws captum makes, in its order)."""
    if norm == "Linf":
        return torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) * (2 * radius) - radius
    gauss = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    unit = gauss / _norms(gauss).clamp_min(1e-12)
    dims = x[0].numel()
    scale = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device) ** (1.0 / dims) * radius
    return _view(scale, x.ndim) * unit


def pgd(model_fn: Any, params: Any, x: Tensor, target: Any = None, *, radius: float, step_size: float,
        step_num: int, norm: str = "Linf", targeted: bool = False, random_start: bool = False,
        generator: Optional[torch.Generator] = None, lower_bound: Union[float, Tensor] = -math.inf,
        upper_bound: Union[float, Tensor] = math.inf, loss: Any = "cross_entropy", mask: Optional[Tensor] = None,
        zero_threshold: float = 1e-6) -> Tensor:
    """Projected gradient descent: ``step_num`` steps of size ``step_size``, each projected onto the ball of
    ``radius`` around ``x`` (in ``norm``) and clamped to the bounds.

    A step is :func:`fgsm`'s (``norm="Linf"``: along the gradient's sign; ``norm="L2"``: along ``g / |g|_2``);
    then the perturbation is projected onto the ball (L-infinity: clamped to ``[-radius, radius]``; L2:
    rescaled to norm ``radius`` when longer) and the input clamped to ``[lower_bound, upper_bound]``
    (before and after the projection, as captum does). ``random_start`` first moves ``x`` to a uniform
    point of the ball (L-infinity: ``U(-radius, radius)`` per element; L2: a Gaussian direction and
    radius ``radius * U^(1/d)``), drawn from ``generator`` in captum's order: with
    ``torch.manual_seed(s)`` before captum's call and ``torch.Generator().manual_seed(s)`` here, both
    start from the same point (CPU).

    Equal to captum's ``PGD(...).perturb(x, radius, step_size, step_num, target, norm="Linf", ...)``.
    captum's L2 PGD steps along the sign of the gradient and only rescales onto the ball; this one is
    Madry et al.'s L2 PGD (see the module's docstring).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, floating point: the centre of the ball.
      target: As for :func:`fgsm` (``None``: the class predicted for ``x``, kept for every step).
      radius: The ball's radius, ``> 0``.
      step_size: Each step's length, ``> 0``.
      step_num: The number of steps, ``>= 1``.
      norm: ``"Linf"`` (default) or ``"L2"``: the step and the ball.
      targeted: Move towards ``target`` instead of away from it. Default: False.
      random_start: Start from a uniform random point of the ball. Default: False.
      generator: The random start's draws; None: torch's global generator.
      lower_bound: The smallest allowed input value. Default: ``-inf``.
      upper_bound: The largest allowed input value. Default: ``inf``.
      loss: As for :func:`fgsm`. Default: ``"cross_entropy"``.
      mask: 0/1 tensor broadcastable to ``x``: only the elements where it is 1 move. Default: all.
      zero_threshold: Gradient magnitudes treated as zero. Default: ``1e-6`` (captum's).

    Returns:
      The perturbed batch, ``x``'s shape and dtype, within the ball and the bounds.

    Raises:
      TypeError: non-float ``x``, bad option types.
      ValueError: an unknown ``norm`` or ``loss``, non-positive sizes, a ``mask`` of the wrong shape.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> adversarial = tx.robust.pgd(fn, params, images, labels, radius=8 / 255, step_size=2 / 255, step_num=10,
      ...                             random_start=True, generator=g, lower_bound=0, upper_bound=1)
    """
    fn = "robust.pgd"
    target = _check_x(fn, model_fn, params, x, target, loss)
    _check_number(fn, "radius", radius)
    _check_number(fn, "step_size", step_size)
    _checks.check_positive_int(fn, "step_num", step_num)
    _checks.check_bool(fn, "random_start", random_start)
    _checks.check_generator(fn, generator)
    _checks.check_generator_device(fn, generator, x)
    _check_options(fn, norm, loss, targeted, mask, x, lower_bound, upper_bound, zero_threshold)
    losses = _losses(model_fn, loss, fn)
    target = _resolve_target(model_fn, params, x, target, loss, fn)
    radius, sign = float(radius), -1.0 if targeted else 1.0
    current = x
    if random_start:
        start = _random_start(x, radius, norm, generator)
        current = _bound(x + (start if mask is None else start * mask), lower_bound, upper_bound)
    for _ in range(step_num):
        grad = _gradient(losses, params, current, target)
        current = _bound(_step(current, grad, float(step_size), norm, sign, mask, float(zero_threshold)),
                         lower_bound, upper_bound)
        current = _bound(_project(x, current, radius, norm), lower_bound, upper_bound)
    return current


def _correct(model_fn: Any, fn: str) -> Callable[[Any, Any], Tensor]:
    def default(out: Any, target: Any) -> Tensor:
        logits = _targets.select_output(out, _targets.selector(model_fn), fn=fn)
        return logits.argmax(-1) == target
    return default


_SEARCH_MODES = ("linear", "binary")


def _refuse_transforms(fn: str) -> None:
    """The binary search branches on values: refuse ``torch.func`` transforms, before any work."""
    if torch._C._are_functorch_transforms_active():
        raise _transform_error(fn)


def _transform_error(fn: str) -> ValueError:
    return _checks.value_error(fn, "mode='linear' under torch.func.vmap (or another torch.func transform)",
                               "mode='binary'", "The binary search branches on the model's answers, which vmap "
                               "cannot; the linear mode evaluates every value and runs under vmap.")


def _attacked(fn: str, attack: Callable[[Tensor, float], Tensor], x: Tensor, value: float) -> Tensor:
    attacked = attack(x, value)
    if not isinstance(attacked, Tensor) or attacked.shape != x.shape:
        raise _checks.value_error(fn, f"attack outputs of x's shape {tuple(x.shape)}", _checks.describe(attacked))
    return attacked


def _binary_search(fn: str, model_fn: Any, params: Any, x: Tensor, target: Any,
                   attack: Callable[[Tensor, float], Tensor], values: List[float],
                   is_correct: Callable[[Any, Any], Tensor], num_attempts: int) -> MinPerturbation:
    """:func:`min_param_perturbation`'s ``mode="binary"``: every example's bisection, a round at a time."""
    batch = x.shape[0]
    lo, hi = [0] * batch, [len(values)] * batch
    searching = [True] * batch
    best = torch.full((batch,), math.nan, dtype=torch.float64, device=x.device)
    found = torch.zeros(batch, dtype=torch.bool, device=x.device)
    perturbed = x
    while True:
        mids: Dict[int, List[int]] = {}
        for i in range(batch):
            if searching[i] and hi[i] > lo[i]:
                step = (hi[i] - lo[i]) // 2
                if step == 0 and lo[i] + 1 < hi[i]:
                    step = 1
                mids.setdefault(lo[i] + step, []).append(i)
            else:
                searching[i] = False
        if not mids:
            return MinPerturbation(best, perturbed, found)
        for mid in sorted(mids):
            members, broken = mids[mid], set()
            for _ in range(num_attempts):
                attacked = _attacked(fn, attack, x, values[mid])
                right = is_correct(model_fn(params, attacked), target).to(torch.bool).reshape(batch)
                try:
                    wrong = (~right).tolist()
                except RuntimeError:   # a tensor of an enclosing transform (a closure under vmap)
                    raise _transform_error(fn) from None
                new = [i for i in members if wrong[i] and i not in broken]
                if new:
                    mask = torch.zeros(batch, dtype=torch.bool, device=x.device)
                    mask[new] = True
                    best = torch.where(mask, torch.full_like(best, float(values[mid])), best)
                    perturbed = torch.where(_view(mask, x.ndim), attacked, perturbed)
                    found = found | mask
                    broken.update(new)
                if len(broken) == len(members):
                    break
            for i in members:
                if i in broken:
                    hi[i] = mid
                if mid == lo[i]:
                    searching[i] = False
                elif i not in broken:
                    lo[i] = mid


def min_param_perturbation(model_fn: Any, params: Any, x: Tensor, target: Any = None, *,
                           attack: Callable[[Tensor, float], Tensor], values: Sequence[float],
                           correct: Optional[Callable[[Any, Any], Tensor]] = None,
                           num_attempts: int = 1, mode: str = "linear") -> MinPerturbation:
    """Per example, the first of ``values`` at which ``attack(x, value)`` makes the model wrong.

    ``mode="linear"`` (default): captum's ``MinParamPerturbation`` in its linear mode, per example and
    without early exit: ``values`` are tried in their order (captum's ``arg_min, arg_min + arg_step, ... <
    arg_max``), each ``num_attempts`` times (for random attacks), and each example keeps the first value
    (and the first attempt) whose perturbed input ``correct`` calls wrong. Every value is evaluated for
    every example (no data-dependent stop), so the function runs under ``vmap``; outside it, the search
    stops once every example is broken. With one example it equals captum's linear search (``(None, None)``
    there is ``found = False`` here).

    ``mode="binary"``: captum's binary mode, per example: a bisection over the positions of ``values``
    (ascending), which assumes that the model, once wrong at a value, stays wrong at every larger one, and
    then needs about ``log2(len(values))`` rounds instead of up to ``len(values)``. Each example starts
    with ``lo = 0`` and ``hi = len(values)``; while ``hi > lo`` it tries ``mid = lo + (hi - lo) // 2`` (``lo
    + 1`` when that is ``lo`` and ``lo + 1 < hi``) up to ``num_attempts`` times: wrong at an attempt => ``hi =
    mid``, the answer so far is ``values[mid]`` with that attempt's input; ``mid == lo`` ends the search;
    still right => ``lo = mid``. With one example it equals captum's ``mode="binary"`` with
    ``arg_min = values[0]``, ``arg_step`` the spacing of ``values`` and ``arg_max = arg_min + len(values) *
    arg_step`` (captum computes its steps in floats, ``(arg_max - arg_min) // arg_step`` and ``arg_min + k
    * arg_step``: the same where those are exact, e.g. a step of 0.125; with 0.1 they can differ by a step).
    A batch runs each example's search at once: each round calls ``attack(x, value)`` on the whole ``x``
    once per distinct ``mid`` of the examples still searching, and each of them reads its own row. The
    branching reads the model's answers, so the binary mode refuses ``torch.func`` transforms (``vmap``).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, floating point.
      target: What ``correct`` compares with: class indices (``None``: the class predicted for ``x``).
      attack: ``(x, value) -> perturbed x`` of ``x``'s shape, e.g.
        ``lambda x, eps: tx.robust.fgsm(fn, params, x, labels, epsilon=eps)``.
      values: The parameter values to try, in order (a non-empty sequence of floats or a 1-D tensor).
      correct: ``(out, target) -> [B]`` bool, True where the model is still right. Default: the argmax of
        the output (``functionalize``'s ``output=``) equals ``target``.
      num_attempts: Attempts per value (for random attacks). Default: 1.
      mode: ``"linear"`` (default) or ``"binary"`` (see above; ``values`` ascending).

    Returns:
      :class:`MinPerturbation` ``(value [B] float64 (NaN where none), perturbed [B, *input], found [B])``.

    Raises:
      TypeError: non-float ``x``, a non-callable ``attack`` or ``correct``, bad ``values``, a non-string ``mode``.
      ValueError: empty ``values``, an attack output of another shape, an unknown ``mode``; with
        ``mode="binary"``: ``values`` not strictly ascending, a call under ``torch.func.vmap`` (or another
        ``torch.func`` transform).

    Example:
      >>> noise = lambda x, std: x + std * torch.randn_like(x)
      >>> res = tx.robust.min_param_perturbation(fn, params, images, labels, attack=noise,
      ...                                        values=torch.arange(0, 2, 0.01), num_attempts=5)
    """
    fn = "robust.min_param_perturbation"
    _check_model_and_x(fn, model_fn, params, x)
    if not callable(attack):
        raise _checks.type_error(fn, "attack, a callable (x, value) -> perturbed x", _checks.describe(attack))
    _checks.check_optional_callable(fn, "correct", correct)
    _checks.check_positive_int(fn, "num_attempts", num_attempts)
    if isinstance(values, Tensor):
        if values.ndim != 1:
            raise _checks.type_error(fn, "values, a 1-D tensor or a sequence of floats", _checks.describe(values))
        values = values.tolist()
    if (not isinstance(values, (list, tuple, range))
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)):
        raise _checks.type_error(fn, "values, a sequence of floats or a 1-D tensor", _checks.describe(values))
    if not values:
        raise _checks.value_error(fn, "at least one value", "an empty sequence")
    if not isinstance(mode, str):
        raise _checks.type_error(fn, "mode, 'linear' or 'binary'", _checks.describe(mode))
    if mode not in _SEARCH_MODES:
        raise _checks.unknown_name(fn, "mode", mode, _SEARCH_MODES)
    if mode == "binary":
        if any(b <= a for a, b in zip(values, values[1:])):
            raise _checks.value_error(fn, "values in strictly ascending order for mode='binary'",
                                      _checks.describe(list(values)), "The bisection runs over their positions.")
        _refuse_transforms(fn)
    is_correct = correct if correct is not None else _correct(model_fn, fn)
    if correct is None:
        target = _resolve_target(model_fn, params, x, target, None, fn)
    if mode == "binary":
        return _binary_search(fn, model_fn, params, x, target, attack, list(values), is_correct, num_attempts)
    batch = x.shape[0]
    found = torch.zeros(batch, dtype=torch.bool, device=x.device)
    best = torch.full((batch,), math.nan, dtype=torch.float64, device=x.device)
    perturbed = x
    for value in values:
        for _ in range(num_attempts):
            attacked = _attacked(fn, attack, x, value)
            wrong = ~is_correct(model_fn(params, attacked), target).to(torch.bool).reshape(batch)
            new = wrong & ~found
            best = torch.where(new, torch.full_like(best, float(value)), best)
            perturbed = torch.where(_view(new, x.ndim), attacked, perturbed)
            found = found | wrong
        if concrete_any(~found) is False:  # every example broken (unknown under vmap: go on)
            break
    return MinPerturbation(best, perturbed, found)


def attack_comparator(model_fn: Any, params: Any, x: Tensor, target: Any = None, *,
                      attacks: Mapping[str, Callable[[Tensor], Tensor]],
                      metric: Optional[Callable[[Any, Any], Tensor]] = None,
                      num_attempts: Union[int, Mapping[str, int]] = 1) -> Dict[str, Any]:
    """A metric of the model on ``x`` and on each attack's output: captum's ``AttackComparator.evaluate``.

    Each attack ``attacks[name](x)`` runs ``num_attempts`` times (for random attacks); the metric
    ``metric(out, target)`` of each attempt's output is summarised over the attempts, element by element,
    by its mean and, with more than one attempt, its min and max.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, floating point.
      target: What ``metric`` compares with (for the default metric: class indices, ``None`` the class
        predicted for ``x``).
      attacks: Name -> ``x -> perturbed x``, e.g. ``{"fgsm": lambda x: tx.robust.fgsm(fn, params, x, y,
        epsilon=0.1)}``. The name ``"Original"`` is taken.
      metric: ``(out, target) -> tensor``. Default: per-example correctness, ``[B]`` floats (1: the
        argmax equals ``target``).
      num_attempts: Attempts per attack: one int for all, or name -> int. Default: 1.

    Returns:
      ``{"Original": metric on x, name: {"mean": ...}}``, with ``"min"`` and ``"max"`` next to
      ``"mean"`` for attacks of more than one attempt (captum's layout of one ``evaluate`` call).

    Raises:
      TypeError: non-float ``x``, attacks that are not callables, a non-callable ``metric``.
      ValueError: no attacks, an attack named ``"Original"``, ``num_attempts`` < 1 or naming an
        unknown attack.

    Example:
      >>> tx.robust.attack_comparator(fn, params, images, labels, attacks={"noise": noise}, num_attempts=5)
      {'Original': tensor([1., 1., 0.]), 'noise': {'mean': ..., 'min': ..., 'max': ...}}
    """
    fn = "robust.attack_comparator"
    _check_model_and_x(fn, model_fn, params, x)
    if not isinstance(attacks, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in attacks.items()):
        raise _checks.type_error(fn, "attacks, a mapping of names to callables x -> perturbed x",
                                 _checks.describe(attacks))
    if not attacks:
        raise _checks.value_error(fn, "at least one attack", "an empty mapping")
    if ORIGINAL in attacks:
        raise _checks.value_error(fn, f"attack names other than {ORIGINAL!r}", repr(ORIGINAL),
                                  f"{ORIGINAL!r} is the key of the unperturbed input's metric.")
    _checks.check_optional_callable(fn, "metric", metric)
    counts = dict.fromkeys(attacks, num_attempts) if not isinstance(num_attempts, Mapping) else {
        name: num_attempts.get(name, 1) for name in attacks}
    if isinstance(num_attempts, Mapping) and set(num_attempts) - set(attacks):
        raise _checks.value_error(fn, "num_attempts naming only the attacks",
                                  repr(sorted(set(num_attempts) - set(attacks))))
    for name, count in counts.items():
        _checks.check_positive_int(fn, f"num_attempts[{name!r}]", count)
    measure: Callable[[Any, Any], Tensor]
    if metric is None:
        target = _resolve_target(model_fn, params, x, target, None, fn)
        check = _correct(model_fn, fn)
        measure = lambda out, target: check(out, target).to(x.dtype)  # noqa: E731
    else:
        measure = metric
    results: Dict[str, Any] = {ORIGINAL: measure(model_fn(params, x), target)}
    for name, attack in attacks.items():
        values = torch.stack([torch.as_tensor(measure(model_fn(params, attack(x)), target))
                              for _ in range(counts[name])])
        summary = {"mean": values.mean(0)}
        if counts[name] > 1:
            summary.update(min=values.amin(0), max=values.amax(0))
        results[name] = summary
    return results
