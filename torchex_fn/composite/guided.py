"""Guided Grad-CAM: guided back-propagation times the Grad-CAM map brought to the input's grid.

A composite because it combines two families (``methods/propagation.py`` and ``methods/cam.py``), which
never import each other.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core.types import Layer, ModelFn, Params, Target
from ..methods.cam import grad_cam
from ..methods.propagation import guided_backprop

__all__ = ["guided_grad_cam"]

MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


@_docs.fill
def guided_grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                    interpolate_mode: str = "nearest") -> Tensor:
    """Guided Grad-CAM: ``guided_backprop(x) * upsample(grad_cam(x))``, channel by channel.

    The Grad-CAM map of ``layer`` (:func:`torchex_fn.grad_cam`, ReLU applied, on the layer's grid) is
    resized to ``x``'s grid with ``F.interpolate(mode=interpolate_mode)`` and multiplies the guided
    back-propagation map (:func:`torchex_fn.guided_backprop`) of every input channel, as captum's
    ``GuidedGradCam`` (whose default resize is ``"nearest"``, the default here).

    Args:
      {model_fn}
      {params}
      {x.float}
      {target}
      layer: The layer of the Grad-CAM map (a dotted name or module), output ``[B, K, *grid]``.
      interpolate_mode: ``F.interpolate``'s mode from the layer's grid to ``x``'s: ``"nearest"``
        (default, as captum), ``"bilinear"``, ... (``align_corners`` left at torch's default, as captum).

    Returns:
      ``[B, *input]`` maps on ``x``'s device and dtype.

    Raises:
      TypeError: what :func:`torchex_fn.grad_cam` and :func:`torchex_fn.guided_backprop` raise; a
        non-string ``interpolate_mode``.
      ValueError: an unknown ``interpolate_mode``; an unknown layer; ``target`` out of range.

    Example:
      >>> guided_grad_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224]

    Cost: two forwards and two backwards (Grad-CAM's, down to the layer; guided back-propagation's, to
      the input).
    References: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
      Localization", ICCV 2017.
    """
    fn = "guided_grad_cam"
    if not isinstance(interpolate_mode, str):
        raise _checks.type_error(fn, f"interpolate_mode, one of {MODES}", _checks.describe(interpolate_mode))
    if interpolate_mode not in MODES:
        raise _checks.unknown_name(fn, "interpolate_mode", interpolate_mode, MODES)
    cam: Any = grad_cam(model_fn, params, x, target, layer=layer, relu=True, upsample=False)
    if not isinstance(cam, Tensor):
        raise _checks.value_error(fn, "one layer (a dotted name or module)", _checks.describe(layer))
    guided = guided_backprop(model_fn, params, x, target)
    return guided * F.interpolate(cam, size=tuple(x.shape[2:]), mode=interpolate_mode)
