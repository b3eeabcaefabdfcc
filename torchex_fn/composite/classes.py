"""The seed's names (``CAM``, ``GradCAM``, ``SimpleGradient``): thin bindings of a module and options.

They hold nothing beyond their arguments: each call reads the module's current parameters with
:func:`torchex_fn.params_of` and calls the pure function.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..core import checks as _checks
from ..methods.cam import cam, grad_cam
from ..core.model import FunctionalModel, params_of
from ..methods.gradient import input_x_gradient, saliency
from ..methods.perturbation import rise
from ..methods.propagation import deeplift

__all__ = ["CAM", "GradCAM", "SimpleGradient", "InputXGradient", "RISE", "DeepLift"]


class _Bound:
    """A module bound to a method and its options."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise _checks.type_error(type(self).__name__, "model, an nn.Module", _checks.describe(model))
        self.model = model
        self.model_fn = FunctionalModel(model)

    def _call(self, method: Callable, image: Tensor, target: Any, **options) -> Tensor:
        return method(self.model_fn, params_of(self.model), image, target, **options)


class CAM(_Bound):
    """``CAM(model, target_layer=model.layer4, fc_layer=model.fc)(image, target=None)`` -> ``[B, 1, H, W]``."""

    def __init__(self, model: nn.Module, target_layer: Any, fc_layer: Any = None, *, relu: bool = False,
                 upsample: bool = True):
        super().__init__(model)
        self.options = dict(layer=target_layer, fc=fc_layer, relu=relu, upsample=upsample)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        return self._call(cam, image, target, **self.options)


class GradCAM(_Bound):
    """``GradCAM(model, target_layer=layer or [layers])(image, target=None)``.

    One layer gives ``[B, 1, H, W]``; a list of layers gives the maps stacked, ``[L, B, 1, H, W]``.
    """

    def __init__(self, model: nn.Module, target_layer: Any, *, relu: bool = True, upsample: bool = True):
        super().__init__(model)
        self.options = dict(layer=target_layer, relu=relu, upsample=upsample)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        maps = self._call(grad_cam, image, target, **self.options)
        return torch.stack(maps) if isinstance(maps, list) else maps


class SimpleGradient(_Bound):
    """``SimpleGradient(model, post_process=fn)(image, target=None)`` -> ``d out_c / d image``."""

    def __init__(self, model: nn.Module, post_process: Optional[Callable[[Tensor], Tensor]] = None, *,
                 abs: bool = False):
        super().__init__(model)
        self.options = dict(post_process=post_process, abs=abs)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        return self._call(saliency, image, target, **self.options)


class InputXGradient(_Bound):
    """``InputXGradient(model)(image, target=None)`` -> ``image * d out_c / d image``."""

    def __init__(self, model: nn.Module, post_process: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__(model)
        self.options = dict(post_process=post_process)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        return self._call(input_x_gradient, image, target, **self.options)


class RISE(_Bound):
    """``RISE(model, num_masks=8000, cell_size=7, probability=0.5, batch_size=256)(image, target=None)``.

    Returns ``[B, 1, H, W]``.

    A ``generator`` given here advances with each call, so repeated calls draw new masks.
    """

    def __init__(self, model: nn.Module, num_masks: int = 8000, cell_size: int = 7, probability: float = 0.5,
                 batch_size: int = 256, *, generator: Optional[torch.Generator] = None, normalization: str = "paper"):
        super().__init__(model)
        self.options = dict(num_masks=num_masks, cell_size=cell_size, probability=probability,
                            batch_size=batch_size, generator=generator, normalization=normalization)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        return self._call(rise, image, target, **self.options)


class DeepLift(_Bound):
    """``DeepLift(model, baseline=0.0, backend="native")(image, target=None)`` -> ``[B, *input]``.

    ``backend="captum"`` calls captum's ``DeepLift`` (optional extra) for comparison.
    """

    def __init__(self, model: nn.Module, baseline: Any = 0.0, backend: str = "native", *, eps: float = 1e-10):
        super().__init__(model)
        self.options = dict(baseline=baseline, eps=eps, backend=backend)

    def __call__(self, image: Tensor, target: Any = None) -> Tensor:
        return self._call(deeplift, image, target, **self.options)
