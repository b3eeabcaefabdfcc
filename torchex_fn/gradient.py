"""Input-gradient family: saliency (simple gradient) and input x gradient."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from . import _checks
from ._autodiff import grad_of_sum
from . import targets as _targets
from ._types import ModelFn, Params, Target

__all__ = ["saliency", "input_x_gradient", "input_gradient"]


def input_gradient(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
                   fn: str = "input_gradient") -> Tensor:
    """``d score_b / d x_b`` for every example, ``[B, *input]``, by one ``torch.func.vjp`` call.

    Examples are independent, so the gradient of the summed scores is each example's gradient.
    """
    def total(x):
        return _targets.resolve(model_fn(params, x), target, fn=fn).sum()
    return grad_of_sum(total, x)


def saliency(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
             abs: bool = False, post_process: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Simple gradient (saliency): ``d out_c / d x``.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``.
      target: ``None`` (predicted class), int, ``[B]`` ints, or a callable ``out -> [B]``.
      abs: Return ``|gradient|`` (captum's ``Saliency`` default is ``abs=True``; the seed's
        ``SimpleGradient`` and this function default to the signed gradient). Default: False.
      post_process: A callable applied to the ``[B, *input]`` map last (e.g. a normalisation).

    Returns:
      ``[B, *input]`` gradients (whatever ``post_process`` returns, if given).

    Raises:
      TypeError: non-float ``x``, a bad ``target`` type, a non-callable ``post_process``.
      ValueError: ``saliency: expected target in [0, 1000), got int 1000.`` and NaN inputs.

    Example:
      >>> saliency(fn, params, images, labels).shape              # [8, 3, 224, 224] -> [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: saliency(fn, p, images, labels))(stacked)   # ensemble [E, 8, 3, 224, 224]

    Cost: one forward, one backward to the input (no parameter gradients).
    References: Simonyan et al., "Deep Inside Convolutional Networks", ICLR workshop 2014.
    """
    _checks.check_call("saliency", model_fn, params, x, target)
    _checks.check_bool("saliency", "abs", abs)
    _checks.check_optional_callable("saliency", "post_process", post_process)
    grad = input_gradient(model_fn, params, x, target, fn="saliency")
    grad = grad.abs() if abs else grad
    return post_process(grad) if post_process is not None else grad


def input_x_gradient(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
                     post_process: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Input x gradient: ``x * d out_c / d x``, ``[B, *input]``.

    Same arguments as :func:`saliency` (without ``abs``).

    Example:
      >>> input_x_gradient(fn, params, images, labels).shape   # [8, 3, 224, 224] -> [8, 3, 224, 224]

    Cost: one forward, one backward to the input.
    References: Shrikumar et al., "Not Just a Black Box", 2016.
    """
    _checks.check_call("input_x_gradient", model_fn, params, x, target)
    _checks.check_optional_callable("input_x_gradient", "post_process", post_process)
    attr = x * input_gradient(model_fn, params, x, target, fn="input_x_gradient")
    return post_process(attr) if post_process is not None else attr
