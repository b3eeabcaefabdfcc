"""Layer family: class activation maps (CAM, Grad-CAM)."""
from __future__ import annotations

from typing import Any, Dict, Union

import torch
from torch import Tensor, nn

from . import _checks
from .capture import intermediates, layer_gradients, resolve_layers
from . import postprocess as _postprocess
from . import targets as _targets
from ._types import Layer, LayerSpec, ModelFn, Params, Target

__all__ = ["cam", "grad_cam"]


def _check_common(fn: str, model_fn, params, x, target, relu, upsample) -> None:
    _checks.check_call(fn, model_fn, params, x, target, min_ndim=3)
    _checks.check_bool(fn, "relu", relu)
    _checks.check_bool(fn, "upsample", upsample)


def _finish(fn: str, maps: Tensor, x: Tensor, relu: bool, upsample: bool) -> Tensor:
    """ReLU and resize a ``[B, 1, *spatial]`` map to ``x``'s spatial size."""
    maps = torch.relu(maps) if relu else maps
    if not upsample:
        return maps
    if maps.ndim != x.ndim or maps.ndim - 2 not in (1, 2, 3):
        raise _checks.value_error(fn, f"a layer map with as many spatial dims as x ({x.ndim - 2}) to upsample",
                                  f"a map of shape {tuple(maps.shape)}", "Pass upsample=False.")
    return _postprocess.resize(maps, x.shape[2:])


def _check_activation(fn: str, name: str, act: Tensor) -> None:
    if act.ndim < 3:
        raise _checks.value_error(fn, f"layer {name!r} to output [B, K, *spatial]", _checks.describe(act),
                                  "Name a convolutional layer (one with a spatial grid).")


def _fc_weight(fn: str, model_fn, params, fc: Any) -> Tensor:
    if isinstance(fc, Tensor):
        weight = fc
    else:
        module = getattr(model_fn, "module", None)
        if fc is None:
            if module is None:
                raise _checks.type_error(fn, "fc (a weight tensor [classes, K] or a parameter name) for a model_fn "
                                         "not built by functionalize", "None")
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise _checks.value_error(fn, "an nn.Linear in the model (or fc=)", "none")
            fc = linears[-1]
        elif isinstance(fc, nn.Module):
            fc = resolve_layers(fn, model_fn, fc)[0][0]
        if not isinstance(fc, str):
            raise _checks.type_error(fn, "fc: a layer name, an nn.Linear, a weight tensor or None", _checks.describe(fc))
        key = fc if fc in params else f"{fc}.weight"
        if key not in params:
            raise _checks.unknown_name(fn, "fc parameter", key, params.keys())
        weight = params[key]
    if weight.ndim != 2:
        raise _checks.value_error(fn, "fc weight of shape [classes, K]", _checks.describe(weight))
    return weight


def cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
        fc: Union[None, str, nn.Module, Tensor] = None, relu: bool = False, upsample: bool = True) -> Tensor:
    """Class Activation Mapping: ``sum_k w[c, k] A_k`` with ``w`` the final linear layer's weights.

    For a network ending in global average pooling and a linear layer, the class score is the
    spatial mean of this map plus the bias.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, C, *spatial]``.
      target: ``None`` (predicted class), int, or ``[B]`` ints (a class index is needed).
      layer: The feature layer feeding the pooling (dotted name or module), output ``[B, K, h, w]``.
      fc: The linear layer: name, module, or its weight ``[classes, K]``. Default: the model's
        last ``nn.Linear``.
      relu: Keep only positive evidence (Zhou et al. and torchcam do not). Default: False.
      upsample: Resize to ``x``'s spatial size (bilinear). Default: True.

    Returns:
      ``[B, 1, H, W]`` (``[B, 1, h, w]`` with ``upsample=False``).

    Raises:
      ValueError: unknown layer or fc, a layer never reached, K not matching the fc weight.
      TypeError: a callable target (CAM needs a class index).

    Example:
      >>> cam(fn, params, images, labels, layer="layer4", fc="fc").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: one forward pass, no backward.
    References: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.
    """
    fn = "cam"
    _check_common(fn, model_fn, params, x, target, relu, upsample)
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or [B] ints (CAM weights need a class index)", "a callable")
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module", _checks.describe(layer))
    names, _ = resolve_layers(fn, model_fn, layer)
    weight = _fc_weight(fn, model_fn, params, fc)
    out, acts = intermediates(model_fn, layers=names, fn=fn)(params, x)
    act = acts[names[0]]
    _check_activation(fn, names[0], act)
    if act.shape[1] != weight.shape[1]:
        raise _checks.value_error(fn, f"layer channels K equal to the fc weight's {weight.shape[1]}",
                                  f"K = {act.shape[1]}", "Name the layer that feeds the pooling and fc.")
    index = _targets.resolve_index(out, target, fn=fn)
    maps = torch.einsum("bk,bk...->b...", weight[index], act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


def grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
             relu: bool = True, upsample: bool = True) -> Any:
    """Grad-CAM: channel weights are the spatial mean of ``d score / d activation``.

    ``map = relu(sum_k mean_ij(d y_c / d A_k[i, j]) A_k)``. Several layers share one forward and
    one backward pass.

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, C, *spatial]``.
      target: ``None`` (predicted class), int, ``[B]`` ints, or ``out -> [B]``.
      layer: Dotted module name or the module; a list / tuple / dict of them gives a list / dict
        of maps.
      relu: Keep only positive evidence, as in the paper. Default: True.
      upsample: Resize to ``x``'s spatial size (bilinear, ``align_corners=False``). Default: True.

    Returns:
      Maps ``[B, 1, H, W]`` (``[B, 1, *spatial]`` with ``upsample=False``), in ``layer``'s structure.

    Raises:
      ValueError: ``grad_cam: unknown layer 'layer9'. Did you mean 'layer1' or 'layer2'?``, a layer
        never reached in the forward, a target out of range, NaN input.
      TypeError: integer images, a bad target or layer type.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> grad_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> l3, l4 = grad_cam(fn, params, images, labels, layer=["layer3", "layer4"])
      >>> torch.func.vmap(lambda p: grad_cam(fn, p, images, labels, layer="layer4"))(stacked)  # ensemble

    Cost: one forward, one backward from the output to the deepest ``layer`` only (no parameter
    gradients). The first call for a new input shape adds one forward without autograd to learn
    the layers' shapes.
    References: Selvaraju et al., "Grad-CAM", ICCV 2017.
    """
    fn = "grad_cam"
    _check_common(fn, model_fn, params, x, target, relu, upsample)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    result = layer_gradients(model_fn, params, x, target, layers=names, fn=fn)
    maps: Dict[str, Tensor] = {}
    for name in dict.fromkeys(names):
        act, grad = result.acts[name], result.grads[name]
        _check_activation(fn, name, act)
        weights = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
        maps[name] = _finish(fn, (weights * act).sum(dim=1, keepdim=True), x, relu, upsample)
    return rebuild(maps)
