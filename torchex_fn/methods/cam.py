"""Layer family: class activation maps (CAM, Grad-CAM, Grad-CAM++, Score-CAM, Layer-CAM, XGrad-CAM,
HiResCAM, Eigen-CAM, Ablation-CAM, FullGrad, Eigen-Grad-CAM, Seg-Eigen-CAM, element-wise Grad-CAM, FEM,
KPCA-CAM, Finer-CAM, ShapleyCAM, SS-CAM, IS-CAM, Smooth Grad-CAM++) and Deep Feature Factorization.

Layouts. Every method reads a layer's output as ``[B, K, *grid]``. A layout is never guessed: an
output is taken as it is only when it is clearly laid out like ``x`` (``[B, C, *spatial]``):

* it has ``x``'s rank (so ViT tokens ``[B, N, D]`` for an image are refused);
* each grid size is between 1 and ``x``'s matching size, and all of them are ``x``'s sizes divided
  by one common factor, within ``1 + size / 4`` (rounding, valid convolutions and mildly
  anisotropic strides pass; Swin's channels-last ``[B, 7, 7, 768]`` at 224 is refused as 768 >
  224, its ``[B, 56, 56, 96]`` because 56 and 96 imply different factors);
* a 1-D output does not keep ``x``'s second axis (``[B, T, D]`` from embeddings ``[B, T, E]``).

Anything else raises a ValueError naming ``reshape=``: a callable to ``[B, K, *grid]``, such as
``postprocess.tokens_to_grid`` or ``postprocess.channels_last_to_first``, applied to activations
and gradients alike; ``reshape=lambda a: a`` accepts an output as it is. Channels-last outputs
whose channel count happens to fit the rule (``[B, 8, 8, 8]`` for a 64 x 64 image) cannot be told
apart from ``[B, K, h, w]`` by shape and are read as the latter.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils._pytree as _pytree
from torch import Tensor, nn

from ..core import checks as _checks, inputs as _inputs
from ..core import docs as _docs
from ..core.autodiff import grad_of_sum, leaves as _leaves
from ..core.capture import (TailMismatch, is_structure, run_tail, intermediates, layer_gradients, layer_shapes,
                            resolve_layers, tap)
from ..core import grid as _grid
from ..core import targets as _targets
from ..core.model import Wrapped, skipped
from ..core.types import Layer, LayerSpec, ModelFn, Params, Target, aliases_of, module_of
from ..core.arguments import check_call

__all__ = ["cam", "grad_cam", "grad_cam_pp", "score_cam", "layer_cam", "xgrad_cam", "hires_cam", "eigen_cam",
           "ablation_cam", "fullgrad", "eigen_grad_cam", "seg_eigen_cam", "grad_cam_element_wise", "fem", "kpca_cam",
           "finer_cam", "shapley_cam", "sscam", "iscam", "smooth_grad_cam_pp", "refine_cam", "sess",
           "deep_feature_factorization", "Factorization"]


_CAM_TABULAR_HINT = ("a class activation map needs a layer with a grid; use saliency, integrated_gradients, "
                     "deeplift or occlusion.")


def _check_common(fn: str, model_fn, params, x, target, relu, upsample, reshape=None, *,
                  images_only: bool = False, resizes_x: bool = False) -> Any:
    """The checks of every CAM method. A layer is always named, so ``x`` may be token ids or a dict
    of named inputs (the map then lives on the layer's grid: ``reshape=`` and ``upsample=False``),
    except for the methods that mask or differentiate the image itself (``images_only``).

    A floating-point ``x`` is ``[B, C, *grid]``: 1 to 3 grid axes when the map or masks are
    resized to ``x``'s grid (``upsample=True``, or ``resizes_x``), any number otherwise. Returns ``target`` as
    the method uses it (NumPy integers made torch's)."""
    if images_only and not isinstance(x, Tensor):
        raise _checks.type_error(fn, "x, a floating-point tensor [B, C, *spatial] (this method masks or "
                                 "differentiates the input itself)", _checks.describe(x))
    floating = isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())
    if floating and x.ndim < 3:
        _checks.check_grid_rank(fn, x, high=5 if resizes_x else None, tabular_hint=_CAM_TABULAR_HINT)
    target = check_call(fn, model_fn, params, x, target, min_ndim=3, layer=None if images_only else True)
    _checks.check_bool(fn, "relu", relu)
    _checks.check_bool(fn, "upsample", upsample)
    _checks.check_optional_callable(fn, "reshape", reshape)
    if floating and (upsample or resizes_x):
        _checks.check_grid_rank(fn, x, high=5, tabular_hint=_CAM_TABULAR_HINT)
    return target


def _image_of(x: Any) -> Optional[Tensor]:
    """The input whose grid a map is laid out on and resized to: ``x``, the one floating-point entry
    of a dict ``x`` (``pixel_values``), or ``None`` for token ids (they have no grid)."""
    if isinstance(x, Tensor):
        return x if x.is_floating_point() or x.is_complex() else None
    floats = [v for v in x.values() if isinstance(v, Tensor) and v.is_floating_point()]
    return floats[0] if len(floats) == 1 else None


def _finish(fn: str, maps: Tensor, x: Any, relu: bool, upsample: bool) -> Tensor:
    """ReLU and resize a ``[B, 1, *spatial]`` map to ``x``'s spatial size, in ``x``'s dtype.

    Under ``torch.autocast`` the layer's activations (and so the map) may be in a lower precision than
    ``x``; the map is returned in ``x``'s dtype, as every method returns (resized in that dtype).
    """
    maps = torch.relu(maps) if relu else maps
    image = _image_of(x)
    if image is not None and maps.is_floating_point() and image.is_floating_point() and maps.dtype != image.dtype:
        maps = maps.to(image.dtype)
    if not upsample:
        return maps
    x = image
    if x is None:
        raise _checks.value_error(fn, "an image x to upsample the map to", "token ids (no grid to resize to)",
                                  "Pass upsample=False: the map stays on the layer's grid [B, 1, *grid].")
    if maps.ndim != x.ndim or maps.ndim - 2 not in (1, 2, 3):
        raise _checks.value_error(fn, f"a layer map with as many spatial dims as x ({x.ndim - 2}) to upsample",
                                  f"a map of shape {tuple(maps.shape)}", "Pass upsample=False.")
    return _grid.resize(maps, x.shape[2:])


_LAYOUT_HINT = ("Pass reshape=, a callable from the layer's output to [B, K, *grid]: "
                "tx.postprocess.tokens_to_grid(prefix_tokens=1) for ViT tokens [B, 1 + N, D], "
                "tx.postprocess.channels_last_to_first for [B, *grid, C] (Swin, ConvNeXt blocks); "
                "reshape=lambda a: a accepts the layout as it is.")


def _clear_layout(grid, x_grid) -> bool:
    """Whether a grid is plausibly ``x``'s grid down-sampled by one common factor.

    Each size is at least 1 and at most ``x``'s, and for one of the factors ``s = X_i / g_i`` every
    size lies within ``1 + g_j / 4`` of ``X_j / s`` (rounding, valid convolutions and mildly
    anisotropic strides pass; a channel axis read as a grid axis does not).
    """
    if len(grid) != len(x_grid) or not grid:
        return False
    if any(g < 1 or g > s for g, s in zip(grid, x_grid)):
        return False
    for g_i, s_i in zip(grid, x_grid):
        factor = s_i / g_i
        if all(abs(g - s / factor) <= 1 + g / 4 for g, s in zip(grid, x_grid)):
            return True
    return False


def _masking_layer(fn: str, model_fn, params, x: Tensor, layer, reshape) -> Tuple[Any, Tensor]:
    """``(out, act)``: the model's output on ``x`` and the one ``layer``'s output ``[B, K, *grid]``, which
    must have ``x``'s grid axes (its channels become masks of ``x``: Score-CAM, SS-CAM, IS-CAM)."""
    names, _ = resolve_layers(fn, model_fn, layer)
    out, acts = intermediates(model_fn, layers=names, fn=fn, structured=True)(params, x)
    act = _to_grid(fn, names[0], acts[names[0]], x, reshape)
    if act.ndim != x.ndim:
        raise _checks.value_error(fn, f"layer {names[0]!r} to output [B, K, *grid] with x's {x.ndim - 2} grid axes",
                                  _checks.describe(act), f"Name a {x.ndim - 2}-d convolutional layer.")
    return out, act


def _to_grid(fn: str, name: str, act: Any, x: Tensor, reshape) -> Tensor:
    """Layer ``name``'s output as ``[B, K, *grid]``: ``reshape(act)``, or ``act`` when its layout is clear.

    A layer that outputs a dict, list or tuple of tensors (an FPN backbone's ``OrderedDict`` of levels)
    needs ``reshape``, which receives that structure (and the structure of its gradients) as it is.

    Without ``reshape`` the layout is never guessed: the output must have ``x``'s rank and a grid
    that is ``x``'s grid down-sampled (see :func:`_clear_layout`), and a 1-D output must not keep
    x's second axis (token embeddings ``[B, T, E]`` give ``[B, T, D]``); anything else is refused.
    """
    if reshape is None and is_structure(act):
        raise _checks.value_error(
            fn, f"layer {name!r} to output a tensor [B, K, *grid], or reshape= to make one of its output",
            f"{type(act).__name__} of tensors of shapes {_structure_shapes(act)}",
            "Pass reshape=, a callable that receives that structure (and its gradients, alike) and returns "
            "[B, K, *grid]: for an FPN's levels, resize each to one grid and concatenate the channels "
            "(pytorch-grad-cam's fasterrcnn_reshape_transform), or name one tensor-valued layer (an FPN level's "
            "convolution).")
    image = _image_of(x)
    if reshape is None and image is None:
        raise _checks.value_error(fn, f"reshape= for layer {name!r} of a model of token ids", _checks.describe(act),
                                  "Token states [B, T, D] have no grid of x to check a layout against: pass "
                                  "reshape=tx.postprocess.channels_last_to_first and upsample=False.")
    x = image if image is not None else x
    if reshape is not None:
        grid = reshape(act)
        batch = (act if isinstance(act, Tensor) else _leaves(act)[0]).shape[0]
        if not isinstance(grid, Tensor) or grid.ndim < 3 or grid.shape[0] != batch:
            raise _checks.value_error(fn, f"reshape to map layer {name!r}'s output of shape {_structure_shapes(act)} "
                                      f"to [B, K, *grid] with B = {batch}", _checks.describe(grid))
        return grid
    if act.ndim < 3:
        raise _checks.value_error(fn, f"layer {name!r} to output [B, K, *spatial]", _checks.describe(act),
                                  "Name a convolutional layer (one with a spatial grid), or p" + _LAYOUT_HINT[1:])
    if act.ndim != x.ndim or not _clear_layout(tuple(act.shape[2:]), tuple(x.shape[2:])):
        raise _checks.value_error(
            fn, f"layer {name!r} to output [B, K, *spatial] laid out like x of shape {tuple(x.shape)} (the same rank, "
            "a grid down-sampled from x's by one factor)", _checks.describe(act), _LAYOUT_HINT)
    if act.ndim == 3 and act.shape[1] == x.shape[1]:
        # [B, T, E] embeddings through a sequence model give [B, T, D]: read as [B, K, grid] that is
        # K = T tokens as channels and the features as the grid. A 1-D convolution rarely keeps
        # x's channel count, so the shared axis is taken as a sign of tokens and refused.
        raise _checks.value_error(
            fn, f"layer {name!r} to output [B, K, length] with K unlike x's {x.shape[1]} channels (a 1-D layer that "
            "keeps x's second axis looks like a sequence model's tokens [B, T, D])", _checks.describe(act),
            "For tokens pass reshape=tx.postprocess.channels_last_to_first and upsample=False (x has no grid of "
            "tokens to resize to); for a 1-D convolution that keeps the channel count pass reshape=lambda a: a.")
    return act


def _structure_shapes(act: Any) -> Any:
    """``{key: [shape]}`` (or a list) of a structure of tensors, for messages."""
    if isinstance(act, Tensor):
        return tuple(act.shape)
    if isinstance(act, dict):
        return {key: _structure_shapes(value) for key, value in act.items()}
    return [_structure_shapes(value) for value in act]


def _fc_weight(fn: str, model_fn, params, fc: Any) -> Tensor:
    if isinstance(fc, Tensor):
        weight = fc
    else:
        module = module_of(model_fn)
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
            raise _checks.type_error(fn, "fc: a layer name, an nn.Linear, a weight tensor or None",
                                     _checks.describe(fc))
        key = fc if fc in params else f"{fc}.weight"
        tied = dict(aliases_of(model_fn))  # a weight tied to another module's (GPT-2's lm_head)
        key = tied.get(key, key) if key not in params else key
        if key not in params:
            raise _checks.unknown_name(fn, "fc parameter", key, params.keys())
        weight = params[key]
    if weight.ndim != 2:
        raise _checks.value_error(fn, "fc weight of shape [classes, K]", _checks.describe(weight))
    return weight


@_docs.fill
def cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
        fc: Union[None, str, nn.Module, Tensor] = None, relu: bool = False, upsample: bool = True,
        reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Class Activation Mapping: ``sum_k w[c, k] A_k`` with ``w`` the final linear layer's weights.

    For a network ending in global average pooling and a linear layer, the class score is the
    spatial mean of this map plus the bias.

    Args:
      {model_fn}
      {params}
      {x.cam}
      target: ``None`` (predicted class), int, or ``[B]`` ints (a class index is needed).
      layer: The feature layer feeding the pooling (dotted name or module), output ``[B, K, h, w]``.
      fc: The linear layer: name, module, or its weight ``[classes, K]``. Default: the model's
        last ``nn.Linear``.
      relu: Keep only positive evidence (Zhou et al. and torchcam do not). Default: False.
      {upsample.cam}
      {reshape.cam}

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
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape)
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or [B] ints (CAM weights need a class index)", "a callable")
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module", _checks.describe(layer))
    names, _ = resolve_layers(fn, model_fn, layer)
    weight = _fc_weight(fn, model_fn, params, fc)
    out, acts = intermediates(model_fn, layers=names, fn=fn, structured=True)(params, x)
    act = _to_grid(fn, names[0], acts[names[0]], x, reshape)
    if act.shape[1] != weight.shape[1]:
        raise _checks.value_error(fn, f"layer channels K equal to the fc weight's {weight.shape[1]}",
                                  f"K = {act.shape[1]}", "Name the layer that feeds the pooling and fc.")
    index = _targets.resolve_index(out, target, fn=fn, output=_targets.selector(model_fn))
    maps = torch.einsum("bk,bk...->b...", weight[index], act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


@_docs.fill
def grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
             relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Grad-CAM: channel weights are the spatial mean of ``d score / d activation``.

    ``map = relu(sum_k mean_ij(d y_c / d A_k[i, j]) A_k)``. Several layers share one forward and
    one backward pass.

    Args:
      {args.grad_cam}

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
    return _gradient_weighted("grad_cam", _grad_cam_weights, model_fn, params, x, target, layer, relu, upsample,
                              reshape)


def _grad_cam_weights(act: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM's channel weights ``[B, K, 1, ...]``: the spatial mean of the gradient."""
    del act
    return grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)


def _gradient_weighted(fn: str, channel_weights, model_fn, params, x, target, layer, relu, upsample,
                       reshape) -> Any:
    """``sum_k w_k A_k`` per layer, with ``w = channel_weights(A, d score / d A)``, in one forward + backward.

    ``w`` is ``[B, K, 1, ...]`` (one weight per channel) or ``[B, K, *grid]`` (one per position).
    See :func:`_gradient_maps`.
    """
    def combine(act: Tensor, grad: Tensor) -> Tensor:
        return (channel_weights(act, grad) * act).sum(dim=1, keepdim=True)
    return _gradient_maps(fn, combine, model_fn, params, x, target, layer, relu, upsample, reshape)


def _gradient_maps(fn: str, make_map, model_fn, params, x, target, layer, relu, upsample, reshape) -> Any:
    """``make_map(A, d score / d A)`` (``[B, 1, *grid]``) per layer, in one forward + backward.

    ``reshape`` re-indexes the activation and its gradient alike: for a re-indexing ``R`` (tokens
    to a grid, a permutation) ``R(d score / d a)`` is the gradient w.r.t. the kept entries of
    ``R(a)``, exactly, and both stay differentiable functions of ``params`` and ``x``.

    Weights and maps are computed in at least float32 and rounded to the layer's dtype once at
    the end: in float16, Grad-CAM++'s ``g ** 3`` and XGrad-CAM's ``eps`` would underflow.
    """
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    if reshape is None:  # a structured output needs reshape: refused before the backward (the shapes are memoised)
        for name, shape in layer_shapes(model_fn, params, x, names, fn, structured=True).items():
            if not isinstance(shape[0], torch.Size):
                _to_grid(fn, name, _pytree.tree_unflatten([torch.empty(s, device="meta") for s, _ in shape[1]],
                                                          shape[0]), x, None)
    result = layer_gradients(model_fn, params, x, target, layers=names, fn=fn, structured=True)
    maps: Dict[str, Tensor] = {}
    for name in dict.fromkeys(names):
        act = _to_grid(fn, name, result.acts[name], x, reshape)
        grad = result.grads[name] if reshape is None else reshape(result.grads[name])
        dtype = act.dtype
        act, grad = _at_least_float32(act), _at_least_float32(grad)
        maps[name] = _rounded(_finish(fn, make_map(act, grad), x, relu, upsample), x, dtype)
    return rebuild(maps)


def _rounded(maps: Tensor, x: Any, dtype: torch.dtype) -> Tensor:
    """A finished map in ``x``'s dtype (``_finish`` casts it) or, without a floating-point image
    (token ids), rounded to the layer's ``dtype`` once."""
    image = _image_of(x)
    return maps if image is not None and image.is_floating_point() else maps.to(dtype)


def _at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if its dtype is a 16-bit float (bfloat16, float16); as it is otherwise."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t


# Grad-CAM++'s alpha denominator gets this added, as pytorch-grad-cam does, so that a position
# where the denominator cancels gives a large but finite alpha.
_PP_EPS = 1e-6


@_docs.fill
def grad_cam_pp(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Grad-CAM++: channel weights sum the positive gradients, each scaled by a per-position alpha.

    With ``g = d y_c / d A_k`` at each position and ``S_k = sum_ij A_k[i, j]``,
    ``alpha = g^2 / (2 g^2 + S_k g^3 + 1e-6)`` (0 where ``g == 0``), ``w_k = sum_ij alpha relu(g)``
    and ``map = relu(sum_k w_k A_k)``. This is the paper's closed form for an exponentiated score
    ``exp(y_c)``, whose second and third derivatives are powers of the first; the score
    differentiated is ``y_c`` itself, as in pytorch-grad-cam, whose raw maps this reproduces.
    Several layers share one forward and one backward pass.

    Args:
      {args.grad_cam}

    Returns:
      Maps ``[B, 1, H, W]`` (``[B, 1, *spatial]`` with ``upsample=False``), in ``layer``'s structure.

    Raises:
      ValueError: an unknown layer (with close names suggested), a layer never reached in the
        forward or without a spatial grid, a target out of range, NaN input.
      TypeError: integer images, a bad target or layer type.

    Example:
      >>> grad_cam_pp(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> l3, l4 = grad_cam_pp(fn, params, images, labels, layer=["layer3", "layer4"])

    Cost: as :func:`grad_cam`: one forward, one backward from the output to the deepest ``layer``
    only (no parameter gradients).
    References: Chattopadhyay et al., "Grad-CAM++: Generalized Gradient-Based Visual Explanations
    for Deep Convolutional Networks", WACV 2018.
    """
    return _gradient_weighted("grad_cam_pp", _grad_cam_pp_weights, model_fn, params, x, target, layer, relu,
                              upsample, reshape)


def _grad_cam_pp_weights(act: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM++'s channel weights ``[B, K, 1, ...]``: ``sum_ij alpha relu(g)``."""
    spatial = tuple(range(2, grad.ndim))
    total = act.sum(dim=spatial, keepdim=True)
    g2 = grad * grad
    alpha = g2 / (2 * g2 + total * g2 * grad + _PP_EPS)
    alpha = torch.where(grad != 0, alpha, torch.zeros_like(alpha))
    return (alpha * torch.relu(grad)).sum(dim=spatial, keepdim=True)


@_docs.fill
def layer_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Layer-CAM: each position weighs the activations by its own positive gradient.

    ``map = relu(sum_k relu(d y_c / d A_k[i, j]) A_k[i, j])``: the weights are not pooled over the
    grid, so shallow layers give fine-grained maps. Several layers share one forward and one
    backward pass.

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> layer_cam(fn, params, images, labels, layer="layer3").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> l2, l3, l4 = layer_cam(fn, params, images, labels, layer=["layer2", "layer3", "layer4"])

    Cost: as :func:`grad_cam`: one forward, one backward from the output to the deepest ``layer``.
    References: Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021.
    """
    return _gradient_weighted("layer_cam", _layer_cam_weights, model_fn, params, x, target, layer, relu, upsample,
                              reshape)


def _layer_cam_weights(act: Tensor, grad: Tensor) -> Tensor:
    """Layer-CAM's weights ``[B, K, *grid]``: the positive part of the gradient at each position."""
    del act
    return torch.relu(grad)


@_docs.fill
def xgrad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None,
              eps: float = 1e-7) -> Any:
    """XGrad-CAM: channel weights are the gradient averaged with the activation's own weights.

    ``w_k = sum_ij (d y_c / d A_k[i, j]) A_k[i, j] / (sum_ij A_k[i, j] + eps)`` and
    ``map = relu(sum_k w_k A_k)``. For a ReLU network it satisfies the paper's sensitivity and
    conservation axioms. Several layers share one forward and one backward pass.

    Args:
      {args.grad_cam}
      eps: Added to each channel's activation sum, so that a channel summing to zero gets a large
        but finite weight. Default: 1e-7, as pytorch-grad-cam; torchcam adds 1e-8. It matters
        only for channels whose sum is near zero (e.g. after Hardswish or GELU).

    {text.cam_maps}

    Example:
      >>> xgrad_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: as :func:`grad_cam`: one forward, one backward from the output to the deepest ``layer``.
    References: Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation
    of CNNs", BMVC 2020.
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise _checks.value_error("xgrad_cam", "eps, a float >= 0", _checks.describe(eps))
    return _gradient_weighted("xgrad_cam", functools.partial(_xgrad_cam_weights, eps=float(eps)), model_fn, params,
                              x, target, layer, relu, upsample, reshape)


def _xgrad_cam_weights(act: Tensor, grad: Tensor, *, eps: float) -> Tensor:
    """XGrad-CAM's channel weights ``[B, K, 1, ...]``: ``sum_ij g A / (sum_ij A + eps)``."""
    spatial = tuple(range(2, grad.ndim))
    return (grad * act).sum(dim=spatial, keepdim=True) / (act.sum(dim=spatial, keepdim=True) + eps)


@_docs.fill
def hires_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """HiResCAM: the element-wise product of gradient and activation, summed over channels.

    ``map = relu(sum_k (d y_c / d A_k[i, j]) A_k[i, j])``. Unlike Grad-CAM the gradient is not
    averaged over the grid, so for a network whose score is a linear function of the layer (after
    global average pooling and a linear head) the map's mean is exactly that part of the score.
    Several layers share one forward and one backward pass.

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> hires_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: as :func:`grad_cam`: one forward, one backward from the output to the deepest ``layer``.
    References: Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891, 2020.
    """
    return _gradient_weighted("hires_cam", _hires_cam_weights, model_fn, params, x, target, layer, relu, upsample,
                              reshape)


def _hires_cam_weights(act: Tensor, grad: Tensor) -> Tensor:
    """HiResCAM's weights ``[B, K, *grid]``: the gradient itself."""
    del act
    return grad


@_docs.fill
def eigen_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Eigen-CAM: the activations projected on their first principal component (class-agnostic).

    Per example, the activations are read as ``n = h w`` points in ``R^K``, centred (the mean over
    positions is subtracted from each channel), and projected on the first right singular vector
    ``v`` of that ``[n, K]`` matrix: ``map[i, j] = (A[:, i, j] - mean) . v``. A singular vector's
    sign is arbitrary (LAPACK picks one), so the sign is fixed deterministically: ``v`` is
    flipped when ``sum_k v_k < 0``. Equivalently, the map correlates non-negatively with the
    centred channel-sum map ``sum_k (A_k - mean_k)``, so regions of strong overall activation are
    positive. pytorch-grad-cam leaves the sign to LAPACK; its maps equal these up to that sign.
    ``target`` is validated against the output but does not change the map. Several layers share one forward pass.

    The map is differentiable where the top two singular values are distinct (the projection's
    gradient divides by their gap).

    Args:
      {model_fn}
      {params}
      {x.cam}
      {target}
      {layer.cam}
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    {text.cam_maps}

    Example:
      >>> eigen_cam(fn, params, images, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: one forward pass, no backward; one SVD of ``[h w, K]`` per example and layer.
    References: Muhammad and Yeasin, "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020.
    """
    # the map is a function of the activations alone (in at least float32: no SVD for 16-bit floats)
    return _forward_maps("eigen_cam", _first_component, model_fn, params, x, target, layer, relu, upsample, reshape)


def _first_component(act: Tensor, sign: str = "sum") -> Tensor:
    """``[B, K, *grid]`` -> ``[B, 1, *grid]``: each example's ``h w`` points in ``R^K``, centred, projected on
    their first right singular vector ``v``.

    ``sign="sum"`` flips ``v`` where ``sum_k v_k < 0`` (Eigen-CAM's rule here); ``sign="extreme"``
    flips the projection where ``|min| > |max|`` (Seg-Eigen-CAM's Eq. 13).
    """
    points = act.flatten(2).transpose(1, 2)                      # [B, n, K]
    points = points - points.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(points, full_matrices=False)
    direction = vh[:, 0, :]                                       # [B, K]
    if sign == "sum":
        direction = direction * torch.where(direction.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(direction.dtype)
    projection = (points @ direction.unsqueeze(2)).squeeze(2)    # [B, n]
    if sign == "extreme":
        flip = projection.amin(dim=1, keepdim=True).abs() > projection.amax(dim=1, keepdim=True).abs()
        projection = torch.where(flip, -projection, projection)
    return projection.reshape(act.shape[0], 1, *act.shape[2:])


@_docs.fill
def ablation_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
                 batch_size: int = 32, value: float = 0.0, relu: bool = True, upsample: bool = True,
                 reshape: Optional[Callable[[Any], Tensor]] = None) -> Tensor:
    """Ablation-CAM: each channel is weighted by the relative drop of the score when it is zeroed.

    With ``y`` the target score and ``y_k`` the score when channel ``k`` of the layer's output is
    set to zero (to ``value``), ``w_k = (y - y_k) / y`` and ``map = relu(sum_k w_k A_k)``. Each of
    the ``B K`` ablations is the network's output with that channel of the layer's output set to
    ``value``, run in chunks of ``batch_size`` rows from the layer on (see Cost). With
    ``reshape``, channel ``k`` of ``reshape(output)`` is ablated: the entries of the layer's own
    output that ``reshape`` maps there (for a re-indexing such as ``tokens_to_grid``; tokens it
    drops are never ablated). A layer whose output is a dict, list or tuple of tensors ``[B, K_l,
    *grid_l]`` (an FPN backbone's levels) needs ``reshape`` to ``[B, sum_l K_l, *grid]``, and channel
    ``k`` of it is channel ``k`` of the levels' channels laid end to end, in the structure's order: the
    whole of that level's channel is ablated (pytorch-grad-cam's ``AblationLayerFasterRCNN``, which sets
    it to -1000, for any number of levels and channels).

    pytorch-grad-cam's ``AblationCAM`` zeroes the channel too when the layer's minimum is 0 (a
    ReLU output), but otherwise writes ``min - 1e7``; these maps equal its maps on layers whose
    minimum is 0, and with ``value`` set to what it writes. No gradient is needed: autograd is left as
    the caller has it, and the map is differentiable w.r.t. ``params`` and ``x`` when they require it
    (all ``B K`` forwards are then kept for the backward; wrap the call in ``torch.no_grad()`` when no
    gradient is wanted).

    Args:
      {model_fn}
      {params}
      {x.cam}
      target: ``None`` (the class predicted for the unablated image), int, ``[B]`` ints, or a
        callable ``out -> [B]``, applied to blocks of ``B`` ablated images laid out like ``x`` (row ``b``
        an ablation of image ``b``), so that a target of per-example boxes or labels sees its own examples.
      layer: One dotted module name or module.
      batch_size: The most ablated images in one forward (a memory cap; it changes the result
        only by float rounding). Default: 32.
      value: What an ablated channel's entries are set to. Default: 0.0 (the paper's).
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    Returns:
      ``[B, 1, H, W]`` (``[B, 1, *grid]`` with ``upsample=False``).

    Raises:
      ValueError: an unknown layer, a layer never reached, an output that is not
        ``[B, K, *grid]`` (pass ``reshape=``), a structured output whose levels' channels do not add
        up to ``reshape``'s, ``batch_size`` below 1, a target out of range, NaN input.
      TypeError: several layers (one per call), a bad ``batch_size``, ``value``, target, layer or reshape
        type.

    Example:
      >>> with torch.no_grad():
      ...     maps = ablation_cam(fn, params, images, labels, layer="layer4", batch_size=64)   # [8, 1, 224, 224]
      >>> # a torchvision Faster R-CNN's FPN levels, as pytorch-grad-cam's detection tutorial ablates them
      >>> ablation_cam(fn, params, images, tx.targets.box_score(boxes, labels), layer="backbone",
      ...              reshape=fpn_to_grid, value=-1000.0)

    Cost: one forward over ``x``, then for each image ``ceil(K / batch_size)`` runs of the network from
    the layer on (:func:`torchex_fn.core.capture.run_tail`): the layers before it run once per run on the
    one image, the rest on up to ``batch_size`` ablated activations (for torchvision's ResNet at
    ``layer4``, only ``avgpool`` and ``fc``); no backward. A model whose rest needs the earlier layers'
    batch (a tensor concatenated past the layer, a detector's per-image anchors), or a callable target
    with ``B > 1``, gets ``ceil(B K / batch_size)`` full forwards of up to ``batch_size`` images instead, in
    which the layer itself does not run (it returns its ablated output: a detector's backbone costs nothing
    there), unless a hook is on or inside it.
    References: Desai and Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional
    Network via Gradient-free Localization", WACV 2020.
    """
    fn = "ablation_cam"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape, images_only=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _checks.type_error(fn, "value, a float", _checks.describe(value))
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module (Ablation-CAM takes one layer per call)",
                                 _checks.describe(layer), "Call ablation_cam once per layer.")
    names, _ = resolve_layers(fn, model_fn, layer)
    name = names[0]
    out, acts = intermediates(model_fn, layers=names, fn=fn, structured=True)(params, x)
    raw = acts[name]
    act = _to_grid(fn, name, raw, x, reshape)
    batch, channels = act.shape[:2]
    structured = not isinstance(raw, Tensor)
    if structured:
        _check_level_channels(fn, name, raw, channels)
    call_target = callable(target) and not isinstance(target, Tensor)
    chosen = _targets.selector(model_fn)
    index: Any = None if call_target else _targets.resolve_index(out, target, fn=fn, output=chosen)
    base = (_targets.resolve(out, target, fn=fn) if call_target
            else _targets.select_output(out, chosen, fn=fn).gather(1, index[:, None]).squeeze(1))

    def keep_of(chunk: Tensor, onehot: Tensor) -> Tensor:
        """What the ablation removes from ``chunk`` (rows of the raw output): channel k's entries."""
        if reshape is None:
            return onehot.reshape(*onehot.shape, *([1] * (raw.ndim - 2)))
        # the entries of the raw output that reshape sends to channel k: its transpose applied to a one-hot
        mapped, transpose = torch.func.vjp(reshape, chunk)  # type: ignore[misc]  # 2 values without has_aux
        (keep_out,) = transpose(onehot.reshape(*onehot.shape, *([1] * (mapped.ndim - 2))).expand_as(mapped))
        return keep_out

    def ablated(chunk: Any, onehot: Tensor) -> Any:
        """``chunk`` (rows of the raw output) with row r's channel ``onehot[r]`` set to ``value``."""
        if structured:
            return _ablate_levels(chunk, onehot, value)
        keep = keep_of(chunk, onehot)
        return chunk - chunk * keep if value == 0 else chunk * (1 - keep) + value * keep

    def score(masked_out: Any, rows: Tensor) -> Tensor:
        if call_target:   # blocks laid out like x (one image at a time when B = 1)
            return _targets.resolve(masked_out, _targets.for_blocks(target, rows.shape[0] // batch, batch), fn=fn)
        picked = _targets.select_output(masked_out, chosen, fn=fn)
        return picked.gather(1, index.index_select(0, rows)[:, None]).squeeze(1)

    def rows_of(output: Any, rows: Tensor) -> Any:
        return _pytree.tree_map(lambda t: t.index_select(0, rows), output)

    eye = torch.eye(channels, dtype=act.dtype, device=act.device)
    scores: List[Tensor] = []
    # Fast path: the ablations of one image run as tails (capture.run_tail): the layers up to the ablated one
    # run once on that image per chunk, only the rest of the network on the chunk's ablated activations.
    # A callable target of several images must see blocks laid out like x: full forwards.
    try:
        if call_target and batch > 1:
            raise TailMismatch("a callable target of several examples")
        for b in range(batch):
            for c0 in range(0, channels, batch_size):
                c1 = min(c0 + batch_size, channels)
                rows = torch.full((c1 - c0,), b, dtype=torch.long, device=x.device)
                chunk = rows_of(raw, rows)
                scores.append(score(run_tail(model_fn, params, x[b:b + 1], name, ablated(chunk, eye[c0:c1]), fn=fn,
                                             structured=structured), rows))
        drops = torch.cat(scores).reshape(batch, channels)
    except TailMismatch:
        # The rest of this model needs the prefix's batch: full forwards of up to batch_size ablated images,
        # each with the layer's output replaced by its ablated copy. Row r of the work is image r // K with
        # its channel r % K ablated; for a callable target, image r % B with its channel r // B ablated
        # (blocks of B rows laid out like x, so that per-example targets see their own examples).
        scores = []
        k_major = call_target
        step = max(1, batch_size // batch) * batch if k_major else batch_size
        arange_b, arange_k = torch.arange(batch, device=x.device), torch.arange(channels, device=x.device)
        image_of = arange_b.repeat(channels) if k_major else arange_b.repeat_interleave(channels)
        channel_of = arange_k.repeat_interleave(batch) if k_major else arange_k.repeat(batch)
        for start in range(0, batch * channels, step):
            rows = image_of[start:start + step]
            chunk = rows_of(raw, rows)
            values = ablated(chunk, eye.index_select(0, channel_of[start:start + step]))
            with skipped(model_fn, name, values):   # the layer's own forward would be replaced whole: not run
                masked_out, _ = intermediates(model_fn, layers=names, replace={name: values}, fn=fn,
                                              structured=structured)(params, x.index_select(0, rows))
            scores.append(score(masked_out, rows))
        drops = torch.cat(scores).reshape(channels, batch).T if k_major else torch.cat(scores).reshape(batch, channels)
    weights = (base[:, None] - drops) / base[:, None]
    maps = torch.einsum("bk,bk...->b...", weights.to(act.dtype), act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


def _check_level_channels(fn: str, name: str, raw: Any, channels: int) -> None:
    """A structured output's tensors are ``[B, K_l, ...]`` whose ``K_l`` add up to ``reshape``'s ``channels``."""
    levels = _leaves(raw)
    if any(t.ndim < 2 for t in levels) or sum(t.shape[1] for t in levels) != channels:
        raise _checks.value_error(
            fn, f"layer {name!r}'s tensors [B, K_l, ...] to have as many channels in all as reshape's output "
            f"({channels}; channel k is channel k of the levels laid end to end)",
            f"shapes {_structure_shapes(raw)}",
            "Make reshape concatenate every level's channels, in the structure's order.")


def _ablate_levels(chunk: Any, onehot: Tensor, value: float) -> Any:
    """A structure of levels ``[n, K_l, ...]`` with row r's channel ``onehot[r]`` (of the levels' channels laid
    end to end) set to ``value``."""
    flat, spec = _pytree.tree_flatten(chunk)
    out, offset = [], 0
    for level in flat:
        k = level.shape[1]
        keep = onehot[:, offset:offset + k].to(level.dtype).reshape(*onehot.shape[:1], k, *([1] * (level.ndim - 2)))
        out.append(level * (1 - keep) + value * keep)
        offset += k
    return _pytree.tree_unflatten(out, spec)


# The name under which fullgrad marks the model's input with ``tap`` (no module name contains "<").
_INPUT = "<input>"


def _tap_input(x):
    """``x`` marked by ``tap``: a model_fn ``Wrapped(model_fn, before=_tap_input)`` lets :func:`layer_gradients`
    also return ``d score / d x`` from the same backward pass (the wrapper keeps the memo of layer shapes
    keyed by the user's model or function, and ``functionalize``'s choice of output)."""
    return tap(_INPUT, x)


_BIAS_MODULES = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


def _bias_layers(fn: str, model_fn, x: Tensor) -> List[str]:
    """The convolutions and batch norms with a bias whose grid has ``x``'s spatial rank."""
    module = module_of(model_fn)
    if module is None:
        raise _checks.type_error(fn, "layer (the names of the layers with biases) for a model_fn not built by "
                                 "functionalize", "None")
    kinds = _BIAS_MODULES.get(x.ndim - 2, ())
    names = [name for name, m in module.named_modules()
             if isinstance(m, kinds) and getattr(m, "bias", None) is not None and name]
    if not names:
        raise _checks.value_error(fn, f"convolutions or batch norms with a bias for x of rank {x.ndim}", "none",
                                  "Name the layers with layer=.")
    return names


def _bias_of(fn: str, model_fn, params, name: str) -> Tensor:
    """Layer ``name``'s bias per output channel; a batch norm's folds in its running statistics."""
    key = f"{name}.bias"
    if key not in params:
        raise _checks.value_error(fn, f"layer {name!r} to have a bias ({key!r} in params)", "none",
                                  "FullGrad uses the layers with biases (convolutions, batch norms).")
    bias = params[key]
    module = module_of(model_fn)
    layer = module.get_submodule(name) if module is not None else None
    mean, var = params.get(f"{name}.running_mean"), params.get(f"{name}.running_var")
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and mean is not None and var is not None:
        weight = params.get(f"{name}.weight")
        scale = torch.rsqrt(var + layer.eps) * (weight if weight is not None else 1.0)
        bias = bias - mean * scale
    return bias


def _scaled_channel_sum(maps: Tensor, x: Tensor) -> Tensor:
    """``sum_k`` of each ``[B, K, *grid]`` channel min-max scaled (``(m - min) / (max - min + 1e-7)``), at x's size.

    The resize is linear, so summing the channels before resizing equals resizing each (up to
    rounding) and needs one channel at x's size instead of K. A constant channel scales to 0; its
    gradient is taken as 0 too (the kink's zero subgradient): through ``1 / (range + 1e-7)`` it
    would otherwise be float rounding multiplied by 1e7 (a layer right before global average
    pooling has a constant gradient map).
    """
    flat = _at_least_float32(maps.flatten(2))
    flat = flat - flat.amin(dim=2, keepdim=True)
    top = flat.amax(dim=2, keepdim=True)
    flat = torch.where(top > 0, flat / (top + 1e-7), torch.zeros_like(flat))
    return _grid.resize(flat.sum(dim=1, keepdim=True).reshape(maps.shape[0], 1, *maps.shape[2:]),
                               x.shape[2:])


@_docs.fill
def fullgrad(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Any = None,
             relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """FullGrad: the input-gradient term plus the bias-gradient terms of every layer with a bias.

    ``map = sum_c psi(|d y / d x * x|_c) + sum_l sum_k psi(|b_{l,k} d y / d z_{l,k}|)``, where
    ``z_l`` is layer ``l``'s output, ``b_l`` its bias per channel (a batch norm's effective bias
    ``beta - mean gamma / sqrt(var + eps)``), and ``psi`` scales each map of one example and one
    channel to [0, 1] (``(m - min) / (max - min + 1e-7)``) and resizes it to ``x``'s size
    (bilinear). This is pytorch-grad-cam's ``FullGrad`` up to its final min-max scaling (the
    paper's ``psi`` is the same up to that normalisation). The map is built at ``x``'s size from
    one forward and one backward pass to the input.

    Args:
      {model_fn}
      {params}
      {x.cam}
      {target}
      layer: The layers whose biases count: ``None`` (default) for every convolution and batch
        norm with a bias of ``x``'s spatial rank (as pytorch-grad-cam), or names / modules.
      relu: Kept for a uniform signature: every term is non-negative, so it changes nothing.
        Default: True.
      upsample: Must be True: the map is a sum of maps at ``x``'s size. Default: True.
      reshape: A callable from each layer's output to ``[B, K, *grid]``, as in :func:`grad_cam`
        (applied to the gradients). Default: ``None``.

    Returns:
      ``[B, 1, *spatial]``, ``x``'s spatial size.

    Raises:
      ValueError: ``upsample=False``; a named layer without a bias or never reached; a target
        out of range; NaN input.
      TypeError: ``layer=None`` for a ``model_fn`` not built by ``functionalize``, integer
        images, a bad target or reshape type.

    Example:
      >>> fullgrad(fn, params, images, labels).shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: one forward, one backward to the input (no parameter gradients); memory: one map of
    ``x``'s size per example besides the backward.
    References: Srinivas and Fleuret, "Full-Gradient Representation for Neural Network
    Visualization", NeurIPS 2019.
    """
    fn = "fullgrad"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape, images_only=True, resizes_x=True)
    if not upsample:
        raise _checks.value_error(fn, "upsample=True (FullGrad sums maps resized to x's size)", "False")
    names = _bias_layers(fn, model_fn, x) if layer is None else list(dict.fromkeys(resolve_layers(fn, model_fn,
                                                                                               layer)[0]))
    biases = {name: _bias_of(fn, model_fn, params, name) for name in names}
    result = layer_gradients(Wrapped(model_fn, before=_tap_input), params, x, target, layers=[_INPUT, *names], fn=fn)
    total = _scaled_channel_sum((result.grads[_INPUT] * x).abs(), x)
    for name in names:
        grid = _to_grid(fn, name, result.acts[name], x, reshape)
        grad = result.grads[name] if reshape is None else reshape(result.grads[name])
        bias = biases[name]
        if bias.shape != grid.shape[1:2]:
            raise _checks.value_error(fn, f"layer {name!r}'s bias to have one entry per channel ({grid.shape[1]})",
                                      _checks.describe(bias))
        total = total + _scaled_channel_sum((grad * bias.reshape(1, -1, *([1] * (grad.ndim - 2)))).abs(), x)
    total = total.to(x.dtype)
    return torch.relu(total) if relu else total


_SCORE_CAM_WEIGHTS = ("prob", "softmax")


@_docs.fill
def score_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              batch_size: int = 32, upsample: bool = True, relu: bool = True, weights: str = "prob",
              align_corners: bool = False, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Score-CAM: each channel is weighted by the model's score for the input masked by that channel.

    Each activation channel ``A_k`` is resized to ``x``'s size (linear, bilinear or trilinear for
    sequences, images or volumes) and min-max normalised
    to ``M_k = (A_k - min) / (max - min + 1e-8)`` (a constant channel gives ``M_k = 0``); the
    model scores ``x * M_k``, and ``map = relu(sum_k w_k A_k)`` at the layer's resolution. The
    channel weights ``w_k`` come from the scores of the ``K`` masked copies of each image:

    * ``weights="prob"``: ``w_k = softmax(out(x * M_k))[c]``, the target's class probability, as
      in the authors' released code (a callable target's value is used as ``w_k`` directly);
    * ``weights="softmax"``: ``w = softmax_k(s_k)``, a softmax over channels of the target's raw
      score ``s_k`` (the logit, or a callable's value), as pytorch-grad-cam's ``ScoreCAM``
      computes it (which also resizes with ``align_corners=True``).

    No gradient is needed, and autograd is left as the caller has it: with ``params`` and ``x``
    not requiring gradients (``functionalize`` detaches ``params``) no graph is recorded. Under
    ``torch.func.grad`` or with inputs requiring gradients the map is differentiable (almost
    everywhere: min-max normalisation), but all ``B K`` masked forwards are kept for the backward;
    wrap the call in ``torch.no_grad()`` when no gradient is wanted.

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, C, *grid]`` with 1 to 3 grid axes: sequences ``[B, C, T]``, images
        ``[B, C, H, W]``, volumes ``[B, C, D, H, W]``.
      target: ``None`` (the class predicted for the unmasked image), int, ``[B]`` ints, or a
        callable ``out -> [n]`` applied to each batch of ``n`` masked images (it must act row by row).
      layer: One dotted module name or module with output ``[B, K, *grid]`` (``x``'s grid axes).
      batch_size: The most masked images in one forward pass (memory cap; it does not change the
        result beyond float rounding). Default: 32.
      {upsample.cam}
      {relu.cam}
      weights: ``"prob"`` or ``"softmax"``, see above. Default: ``"prob"``.
      align_corners: How the activations are resized into masks. Default: False (the authors'
        code); pytorch-grad-cam uses True.
      {reshape.cam}

    Returns:
      ``[B, 1, *grid]`` of ``x``'s grid, e.g. ``[B, 1, H, W]`` (the layer's grid with ``upsample=False``).

    Raises:
      ValueError: an unknown layer, a layer never reached or without ``x``'s grid axes, ``batch_size``
        below 1, an unknown ``weights``, ``x`` not of rank 3, 4 or 5, a target out of range, NaN input.
      TypeError: several layers (Score-CAM takes one), a bad ``batch_size``, target or layer type.

    Example:
      >>> score_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> with torch.no_grad():
      ...     maps = score_cam(fn, params, images, layer=model.layer3, batch_size=128)
      >>> score_cam(fn1d, params1d, audio, labels, layer="features").shape   # [8, 2, 16000] -> [8, 1, 16000]

    Cost: one forward over ``x`` to capture the layer, then ``ceil(B K / batch_size)`` forward
    passes of up to ``batch_size`` masked images; no backward. Memory: one such forward and its
    ``batch_size`` masks ``[H, W]`` (masks are made one chunk at a time).
    References: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
    Neural Networks", CVPR Workshops 2020.
    """
    fn = "score_cam"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape, images_only=True, resizes_x=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "align_corners", align_corners)
    if weights not in _SCORE_CAM_WEIGHTS:
        raise _checks.value_error(fn, f"weights in {_SCORE_CAM_WEIGHTS}", _checks.describe(weights))
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module (Score-CAM takes one layer per call)",
                                 _checks.describe(layer), "Call score_cam once per layer.")
    out, act = _masking_layer(fn, model_fn, params, x, layer, reshape)
    batch, channels = act.shape[:2]
    index = None
    chosen_output = _targets.selector(model_fn)
    if not (callable(target) and not isinstance(target, Tensor)):
        index = _targets.resolve_index(out, target, fn=fn, output=chosen_output)

    # Row r of the flattened work is image r // K masked by its channel r % K. Masks are made one
    # chunk at a time: all B K of them at the input's size would not fit (8 x 512 x 224 x 224 floats).
    # Masks are normalised in at least float32: in float16 the 1e-8 would round to 0 (a constant
    # channel would give 0 / 0), and bfloat16 would round the mask before the model sees it twice.
    channel_maps = act.reshape(batch * channels, 1, *act.shape[2:])
    image_of = torch.arange(batch, device=x.device).repeat_interleave(channels)
    mode = _grid.INTERPOLATION[x.ndim - 2]
    grid_dims = tuple(range(2, x.ndim))
    mask_dtype = torch.promote_types(act.dtype, torch.float32)
    scores: List[Tensor] = []
    for start in range(0, batch * channels, batch_size):
        rows = image_of[start:start + batch_size]
        masks = F.interpolate(channel_maps[start:start + batch_size].to(mask_dtype), size=x.shape[2:], mode=mode,
                              align_corners=align_corners)
        low = masks.amin(dim=grid_dims, keepdim=True)
        high = masks.amax(dim=grid_dims, keepdim=True)
        masks = ((masks - low) / (high - low + 1e-8)).to(x.dtype)
        masked_out = model_fn(params, x.index_select(0, rows) * masks)
        if index is None:
            scores.append(_targets.resolve(masked_out, target, fn=fn))
        else:
            chosen = index.index_select(0, rows)
            masked_out = _targets.select_output(masked_out, chosen_output, fn=fn)
            if weights == "prob":
                masked_out = torch.softmax(masked_out, dim=1)
            scores.append(masked_out.gather(1, chosen[:, None]).squeeze(1))
    channel_weights = torch.cat(scores).reshape(batch, channels)
    if weights == "softmax":
        channel_weights = torch.softmax(channel_weights, dim=1)
    maps = torch.einsum("bk,bk...->b...", channel_weights.to(act.dtype), act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


# --------------------------------------------------------------------------------------------
# More of pytorch-grad-cam's and torchcam's CAMs (issue 21).

@_docs.fill
def eigen_grad_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                   relu: bool = True, upsample: bool = True,
                   reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Eigen-Grad-CAM: the first principal component of ``(d y_c / d A) * A`` (class-specific Eigen-CAM).

    Per example, the element-wise products ``G = (d y_c / d A_k[i, j]) A_k[i, j]`` are read as
    ``h w`` points in ``R^K``, centred, and projected on their first right singular vector, with the
    sign fixed as :func:`eigen_cam` fixes it (``sum_k v_k >= 0``). pytorch-grad-cam's
    ``EigenGradCAM`` leaves the sign to LAPACK; its maps equal these up to that sign. Several
    layers share one forward and one backward pass; differentiable where the top two singular
    values are distinct.

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> eigen_grad_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: as :func:`grad_cam`, plus one SVD of ``[h w, K]`` per example and layer.
    References: Muhammad and Yeasin, "Eigen-CAM", IJCNN 2020; pytorch-grad-cam's ``EigenGradCAM``.
    """
    return _gradient_maps("eigen_grad_cam", lambda act, grad: _first_component(grad * act), model_fn, params, x,
                          target, layer, relu, upsample, reshape)


@_docs.fill
def seg_eigen_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                  relu: bool = True, upsample: bool = True,
                  reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Seg-Eigen-CAM: the first principal component of ``|d y_c / d A| * A``, signed so its largest
    magnitude is positive.

    As :func:`eigen_grad_cam` with the gradient's absolute value (Eq. 10 of the paper), and the
    projection negated where ``|min| > |max|`` (Eq. 13); this sign rule is deterministic, so the
    maps equal pytorch-grad-cam's ``SegEigenCAM``. Meant for segmentation targets (a category's
    logits summed over a region, a callable ``target``), it takes any target.

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> seg_eigen_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: as :func:`eigen_grad_cam`.
    References: Chung and Ying, "Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for Semantic
    Segmentation Models", Applied Sciences 15(13), 2025.
    """
    return _gradient_maps("seg_eigen_cam", lambda act, grad: _first_component(grad.abs() * act, "extreme"), model_fn,
                          params, x, target, layer, relu, upsample, reshape)


@_docs.fill
def grad_cam_element_wise(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                          relu: bool = True, upsample: bool = True,
                          reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Element-wise Grad-CAM: ``map = relu(sum_k relu(d y_c / d A_k[i, j] * A_k[i, j]))``.

    The positive part of each product of gradient and activation, summed over channels: unlike
    :func:`hires_cam` a channel with negative evidence at a position does not cancel another's
    positive evidence there. pytorch-grad-cam's ``GradCAMElementWise``. Several layers share one
    forward and one backward pass.

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> grad_cam_element_wise(fn, params, images, labels, layer="layer4").shape   # -> [8, 1, 224, 224]

    Cost: as :func:`grad_cam`.
    References: pytorch-grad-cam's ``GradCAMElementWise`` (Gildenblat et al., 2021).
    """
    return _gradient_maps("grad_cam_element_wise",
                          lambda act, grad: torch.relu(grad * act).sum(dim=1, keepdim=True), model_fn, params, x,
                          target, layer, relu, upsample, reshape)


def _forward_maps(fn: str, make_map, model_fn, params, x, target, layer, relu, upsample, reshape) -> Any:
    """``make_map(A)`` (``[B, 1, *grid]``) per layer from one forward pass; ``target`` is validated
    against the output (a class out of range is an error) but does not change the map."""
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    out, acts = intermediates(model_fn, layers=names, fn=fn, structured=True)(params, x)
    _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn))
    maps: Dict[str, Tensor] = {}
    for name in dict.fromkeys(names):
        act = _to_grid(fn, name, acts[name], x, reshape)
        dtype = act.dtype
        maps[name] = _rounded(_finish(fn, make_map(_at_least_float32(act)), x, relu, upsample), x, dtype)
    return rebuild(maps)


def _fem_map(act: Tensor, k: float) -> Tensor:
    """FEM's map: channel weights are the share of positions above ``mean + k std`` of the channel."""
    spatial = tuple(range(2, act.ndim))
    mean = act.mean(dim=spatial, keepdim=True)
    std = act.std(dim=spatial, keepdim=True, correction=0)
    weights = (act > mean + k * std).to(act.dtype).mean(dim=spatial, keepdim=True)
    return (weights * act).sum(dim=1, keepdim=True)


@_docs.fill
def fem(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer, k: float = 2.0,
        relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """FEM (Feature Explanation Method): channels weighted by how often they exceed their own ``k``-sigma level.

    ``w_k = mean_ij [A_k[i, j] > mu_k + k sigma_k]`` with ``mu_k`` and ``sigma_k`` the mean and
    (population) standard deviation of channel ``k`` over the grid, and
    ``map = relu(sum_k w_k A_k)``: class-agnostic, no gradient; ``target`` is validated against the
    output but does not change the map. Equals pytorch-grad-cam's ``FEM``. The map is
    differentiable w.r.t. the activations (the weights count positions: their gradient is 0).

    Args:
      {model_fn}
      {params}
      {x.cam}
      {target}
      {layer.cam}
      k: The threshold in standard deviations above the mean. Default: 2.0, as pytorch-grad-cam.
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    {text.cam_maps}

    Example:
      >>> fem(fn, params, images, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: one forward pass, no backward.
    References: Fuad et al., "Features Understanding in 3D CNNs for Actions Recognition in Video",
    IPTA 2020.
    """
    fn = "fem"
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != k:
        raise _checks.type_error(fn, "k, a float", _checks.describe(k))
    return _forward_maps(fn, functools.partial(_fem_map, k=float(k)), model_fn, params, x, target, layer, relu,
                         upsample, reshape)


_KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def _kernel_matrix(points: Tensor, kernel: str, gamma: float, degree: int, coef0: float) -> Tensor:
    """``[B, n, n]`` kernel matrices of ``[B, n, K]`` points (scikit-learn's ``pairwise_kernels``)."""
    if kernel == "cosine":
        unit = points / points.norm(dim=2, keepdim=True).clamp_min(torch.finfo(points.dtype).tiny)
        return unit @ unit.transpose(1, 2)
    gram = points @ points.transpose(1, 2)
    if kernel == "linear":
        return gram
    if kernel == "poly":
        return (gamma * gram + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(gamma * gram + coef0)
    sq = points.pow(2).sum(dim=2)
    return torch.exp(-gamma * (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp_min(0))


def _kpca_map(act: Tensor, kernel: str, gamma: Optional[float], degree: int, coef0: float) -> Tensor:
    """KPCA-CAM's map, computed in float64 (the ``[n, n]`` kernel matrix is small; its top eigenvector in
    float32 is off by 3e-5 of the map on the rank tests' nets), returned in ``act``'s dtype."""
    dtype = act.dtype
    act = act.double() if act.device.type != "mps" else act
    points = act.flatten(2).transpose(1, 2)                      # [B, n, K]
    points = points - points.mean(dim=1, keepdim=True)
    gram = _kernel_matrix(points, kernel, 1.0 / points.shape[2] if gamma is None else gamma, degree, coef0)
    gram = (gram - gram.mean(dim=1, keepdim=True) - gram.mean(dim=2, keepdim=True)
            + gram.mean(dim=(1, 2), keepdim=True))              # centred in feature space
    values, vectors = torch.linalg.eigh(gram)
    top = vectors[:, :, -1]                                      # [B, n], the largest eigenvalue's
    # scikit-learn's sign: the entry of largest magnitude is positive
    pick = top.abs().argmax(dim=1, keepdim=True)
    top = top * torch.sign(top.gather(1, pick))
    projection = top * values[:, -1:].clamp_min(0).sqrt()
    return projection.reshape(act.shape[0], 1, *act.shape[2:]).to(dtype)


@_docs.fill
def kpca_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
             kernel: str = "sigmoid", gamma: Optional[float] = None, degree: int = 3, coef0: float = 1.0,
             relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """KPCA-CAM: the activations' first kernel principal component (class-agnostic, like Eigen-CAM).

    Per example, the ``n = h w`` activation vectors (centred over positions) give an ``n x n``
    kernel matrix ``k(a_i, a_j)``, centred in feature space; the map is its top eigenvector times
    the square root of its eigenvalue, signed so that the entry of largest magnitude is positive.
    This is scikit-learn's ``KernelPCA(n_components=1).fit_transform`` as pytorch-grad-cam's
    ``KPCA_CAM`` calls it, with scikit-learn's kernels: ``"sigmoid"`` ``tanh(gamma <a, b> + coef0)``,
    ``"rbf"`` ``exp(-gamma |a - b|^2)``, ``"poly"`` ``(gamma <a, b> + coef0)^degree``, ``"linear"``,
    ``"cosine"``. ``target`` is validated against the output but does not change the map.
    Differentiable where the top two eigenvalues are distinct.

    Args:
      {model_fn}
      {params}
      {x.cam}
      {target}
      {layer.cam}
      kernel: One of ``"sigmoid"`` (default), ``"rbf"``, ``"poly"``, ``"linear"``, ``"cosine"``.
      gamma: The kernel's scale; ``None`` is ``1 / K`` (scikit-learn's default). Default: None.
      degree: The polynomial kernel's degree. Default: 3.
      coef0: The offset of the sigmoid and polynomial kernels. Default: 1.0.
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    {text.cam_maps}

    Example:
      >>> kpca_cam(fn, params, images, layer="layer4", kernel="rbf").shape   # -> [8, 1, 224, 224]

    Cost: one forward pass, no backward; one ``[h w, h w]`` eigendecomposition per example and layer.
    References: Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision Models
    using Kernel PCA", MMSP 2024.
    """
    fn = "kpca_cam"
    if kernel not in _KERNELS:
        raise _checks.value_error(fn, f"kernel in {_KERNELS}", _checks.describe(kernel))
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0):
        raise _checks.value_error(fn, "gamma, a float > 0 or None", _checks.describe(gamma))
    _checks.check_positive_int(fn, "degree", degree)
    if isinstance(coef0, bool) or not isinstance(coef0, (int, float)):
        raise _checks.type_error(fn, "coef0, a float", _checks.describe(coef0))
    make = functools.partial(_kpca_map, kernel=kernel, gamma=None if gamma is None else float(gamma),
                             degree=degree, coef0=float(coef0))
    return _forward_maps(fn, make, model_fn, params, x, target, layer, relu, upsample, reshape)


@_docs.fill
def finer_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
              alpha: float = 1.0, comparison: Any = (1, 2, 3), method: Optional[Callable[..., Any]] = None,
              relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """Finer-CAM: a CAM of the target class's score against the classes the model finds most similar.

    With ``y`` the logits and ``c`` the target class, the classes are ranked by ``|y_j - y_c|``
    (``c`` itself first); those at the ranks in ``comparison`` (by default the three closest) are
    compared with ``c`` through the differentiable score
    ``s = sum_j p_j (y_c - alpha y_j) / (sum_j p_j + 1e-9)``, ``p = softmax(y)``, and ``method``
    (Grad-CAM by default) explains ``s``. ``alpha = 0`` is ``method`` on ``y_c`` weighted by
    probabilities; larger ``alpha`` keeps the evidence that tells ``c`` from its neighbours. This is
    pytorch-grad-cam's ``FinerCAM`` with its ``FinerWeightedTarget`` (ranks beyond the class count
    are dropped, as there).

    Args:
      {model_fn}
      {params}
      {x.cam}
      target: ``None`` (the predicted class), int, or ``[B]`` ints (a class index is needed).
      {layer.cam}
      alpha: The comparison's strength. Default: 1.0.
      comparison: The ranks of the compared classes by closeness of their logit (0 is the target
        itself). Default: ``(1, 2, 3)``.
      method: The CAM that explains the score, any gradient CAM of this module taking
        ``(model_fn, params, x, target, layer=, relu=, upsample=, reshape=)``. Default: ``grad_cam``.
      {relu.cam}
      {upsample.cam}
      {reshape.grad_cam}

    {text.cam_maps}

    Example:
      >>> finer_cam(fn, params, images, labels, layer="layer4", alpha=0.6).shape   # -> [8, 1, 224, 224]

    Cost: as ``method`` (one forward, one backward for Grad-CAM).
    References: Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR 2025.
    """
    fn = "finer_cam"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape)
    if _targets.is_callable(target):
        raise _checks.type_error(fn, "target: None, an int or [B] ints (the comparison ranks classes)", "a callable")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha != alpha:
        raise _checks.type_error(fn, "alpha, a float", _checks.describe(alpha))
    if (not isinstance(comparison, (list, tuple)) or not comparison
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in comparison)):
        raise _checks.value_error(fn, "comparison, a non-empty tuple of ranks >= 1", _checks.describe(comparison))
    method = grad_cam if method is None else method
    _checks.check_optional_callable(fn, "method", method)
    resolve_layers(fn, model_fn, layer)   # a bad layer is named here, not by ``method``
    chosen = _targets.selector(model_fn)
    ranks = list(comparison)

    def finer_score(out: Any) -> Tensor:
        logits = _targets.select_output(out, chosen, fn=fn)
        main = _targets.resolve_index(out, target, fn=fn, output=chosen)[:, None]
        kept = [r for r in ranks if r < logits.shape[1]]
        if not kept:
            raise _checks.value_error(fn, f"comparison ranks below the class count {logits.shape[1]}",
                                      _checks.describe(comparison))
        own = logits.gather(1, main)
        order = torch.argsort((logits - own).detach().abs(), dim=1, stable=True)
        others = order[:, kept]
        probs = torch.softmax(logits, dim=1).gather(1, others)
        return (probs * (own - alpha * logits.gather(1, others))).sum(dim=1) / (probs.sum(dim=1) + 1e-9)

    return method(model_fn, params, x, finer_score, layer=layer, relu=relu, upsample=upsample, reshape=reshape)


@_docs.fill
def shapley_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Layer,
                relu: bool = True, upsample: bool = True,
                reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Any:
    """ShapleyCAM: Grad-CAM with the gradient corrected by half the Hessian applied to the activations.

    With ``g = d y_c / d A`` and ``h = (d^2 y_c / d A^2) A`` (a Hessian-vector product),
    ``w_k = mean_ij (g - h / 2)_k[i, j]`` and ``map = relu(sum_k w_k A_k)``: the second-order
    Taylor estimate of each channel's Shapley value. For a network piecewise linear after the
    layer (ReLU, max pooling, linear) ``h = 0`` almost everywhere and this is Grad-CAM. Equals
    pytorch-grad-cam's ``ShapleyCAM``. Several layers are explained one at a time (each its own
    Hessian-vector product).

    Args:
      {args.grad_cam}

    {text.cam_maps}

    Example:
      >>> shapley_cam(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: per layer one forward, one backward to the layer, and the backward of that backward
    (forward and backward twice, roughly).
    References: Cai et al., "CAMs as Shapley Value-based Explainers", arXiv:2501.06261, 2025.
    """
    fn = "shapley_cam"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    chosen = _targets.selector(model_fn)
    maps: Dict[str, Tensor] = {}
    for name in dict.fromkeys(names):
        shape, dtype = layer_shapes(model_fn, params, x, [name], fn)[name]
        zero = torch.zeros(shape, dtype=dtype, device=_inputs.device_of(x))

        def score(delta: Tensor, name: str = name) -> Any:
            out, acts = intermediates(model_fn, layers=[name], perturb={name: delta}, fn=fn)(params, x)
            return _targets.resolve(out, target, fn=fn, output=chosen).sum(), acts[name]

        def along_activation(delta: Tensor) -> Any:
            # <g(delta), A>: its gradient at delta = 0 is H A (A does not depend on delta)
            grad, act = grad_of_sum(score, delta, has_aux=True)
            return (grad * act).sum(), (grad, act)

        hvp, (grad, raw) = grad_of_sum(along_activation, zero, has_aux=True)
        act = _to_grid(fn, name, raw, x, reshape)
        if reshape is not None:
            grad, hvp = reshape(grad), reshape(hvp)
        act, grad, hvp = _at_least_float32(act), _at_least_float32(grad), _at_least_float32(hvp)
        weights = (grad - 0.5 * hvp).mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
        maps[name] = _rounded(_finish(fn, (weights * act).sum(dim=1, keepdim=True), x, relu, upsample), x, dtype)
    return rebuild(maps)


def _integrated_score_weights(fn: str, model_fn, params, x, target, layer, batch_size, reshape, samples: int,
                              masked_input: Callable[[int, Tensor, Tensor, Tensor], Tensor]) -> Any:
    """torchcam's SS-CAM / IS-CAM weights: ``softmax_k(mean_s (y(masked_input(s, masks, x, rows)) - y(x)))``.

    Each channel is min-max normalised on the layer's grid (``(A - min) / (max - min + 1e-8)``),
    then resized to ``x``'s grid (linear, bilinear or trilinear, ``align_corners=False``): the masks.
    Row ``r`` of the ``B K`` masks is image ``r // K``'s channel ``r % K``; for each sample ``s`` the
    rows are scored in chunks of ``batch_size`` (each chunk's masks are made when it runs). Returns
    ``(act [B, K, *grid], weights [B, K])``.
    """
    out, act = _masking_layer(fn, model_fn, params, x, layer, reshape)
    batch, channels = act.shape[:2]
    chosen = _targets.selector(model_fn)
    call_target = _targets.is_callable(target)
    index = None if call_target else _targets.resolve_index(out, target, fn=fn, output=chosen)

    def score(scored: Any, rows: Tensor) -> Tensor:
        if index is None:
            return _targets.resolve(scored, target, fn=fn)
        return _targets.select_output(scored, chosen, fn=fn).gather(1, index.index_select(0, rows)[:, None]).squeeze(1)

    base = score(out, torch.arange(batch, device=x.device))
    grid_dims = tuple(range(2, act.ndim))
    normed = _at_least_float32(act)
    normed = normed - normed.amin(dim=grid_dims, keepdim=True)
    normed = normed / (normed.amax(dim=grid_dims, keepdim=True) + 1e-8)
    channel_maps = normed.reshape(batch * channels, 1, *act.shape[2:])
    image_of = torch.arange(batch, device=x.device).repeat_interleave(channels)
    mode = _grid.INTERPOLATION[x.ndim - 2]
    total: Any = 0
    for s in range(samples):
        scores: List[Tensor] = []
        for start in range(0, batch * channels, batch_size):
            rows = image_of[start:start + batch_size]
            masks = F.interpolate(channel_maps[start:start + batch_size], size=x.shape[2:], mode=mode,
                                  align_corners=False)
            scored = model_fn(params, masked_input(s, masks, x.index_select(0, rows), rows).to(x.dtype))
            scores.append(score(scored, rows) - base.index_select(0, rows))
        total = total + torch.cat(scores)
    weights = torch.softmax((total / samples).reshape(batch, channels), dim=1)
    return act, weights


def _check_score_options(fn: str, model_fn, params, x, target, relu, upsample, reshape, layer, batch_size,
                         samples) -> Any:
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape, images_only=True, resizes_x=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_positive_int(fn, "samples", samples)
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module (one layer per call)",
                                 _checks.describe(layer), f"Call {fn} once per layer.")
    return target


def _check_std(fn: str, std: Any) -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std >= 0:
        raise _checks.value_error(fn, "std, a float >= 0", _checks.describe(std))
    return float(std)


@_docs.fill
def sscam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
          samples: int = 35, std: float = 2.0, batch_size: int = 32, generator: Optional[torch.Generator] = None,
          relu: bool = True, upsample: bool = True, reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """SS-CAM (Smoothed Score-CAM): Score-CAM weights averaged over masks with Gaussian noise.

    Each channel ``A_k`` is min-max normalised on the layer's grid and resized to ``x``'s
    (``align_corners=False``) into ``M_k``; for each of ``samples`` draws the model scores
    ``(M_k + n) * x`` with noise ``n ~ N(0, std^2)`` of ``x``'s grid, and
    ``w = softmax_k(mean_s (y_c((M_k + n_s) * x) - y_c(x)))``, ``map = relu(sum_k w_k A_k)`` on
    the layer's grid (raw logits ``y_c``, or a callable target's value). This is torchcam 0.5's
    ``SSCAM``, noise included: per sample, the noise is drawn as one ``[B, K, *grid]`` normal draw
    would be, row after row (chunk by chunk here, so only ``batch_size`` masks exist at once); on
    CPU these are the very numbers torchcam draws when ``generator`` is seeded as torchcam's global
    generator and ``x``'s grid has a multiple of 16 elements (torch fills CPU normals 16 at a time).
    The noise is drawn in float32.

    No gradient is needed; autograd is left as the caller has it (as :func:`score_cam`).

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, C, *grid]`` with 1 to 3 grid axes.
      target: ``None`` (the class predicted for ``x``), int, ``[B]`` ints, or a callable ``out -> [n]``
        applied to each batch of ``n`` masked inputs (row by row).
      layer: One dotted module name or module with output ``[B, K, *grid]`` (``x``'s grid axes).
      samples: Noisy draws per mask. Default: 35 (torchcam's).
      std: The noise's standard deviation. Default: 2.0 (torchcam's).
      batch_size: The most masked inputs in one forward pass. Default: 32.
      generator: The source of the noise; ``None`` draws from the global generator. Default: None.
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    Returns:
      ``[B, 1, *grid]`` of ``x``'s grid (the layer's grid with ``upsample=False``).

    Raises:
      ValueError: an unknown layer or one without ``x``'s grid axes, ``samples`` or ``batch_size``
        below 1, ``std`` below 0, a generator on another device, a target out of range, NaN input.
      TypeError: several layers, a bad ``batch_size``, target, generator or layer type.

    Example:
      >>> sscam(fn, params, images, labels, layer="layer4", generator=torch.Generator().manual_seed(0))

    Cost: one forward, then ``samples ceil(B K / batch_size)`` forwards of up to ``batch_size``
    masked inputs; no backward.
    References: Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    arXiv:2006.14255, 2020.
    """
    fn = "sscam"
    target = _check_score_options(fn, model_fn, params, x, target, relu, upsample, reshape, layer, batch_size, samples)
    spread = _check_std(fn, std)
    _checks.check_generator(fn, generator)
    _checks.check_generator_device(fn, generator, x)

    def noisy(s: int, masks: Tensor, images: Tensor, rows: Tensor) -> Tensor:
        noise = torch.randn(masks.shape, generator=generator, device=masks.device, dtype=torch.float32) * spread
        return (masks + noise.to(masks.dtype)) * images

    act, weights = _integrated_score_weights(fn, model_fn, params, x, target, layer, batch_size, reshape, samples,
                                             noisy)
    maps = torch.einsum("bk,bk...->b...", weights.to(act.dtype), act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


@_docs.fill
def iscam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
          samples: int = 10, batch_size: int = 32, relu: bool = True, upsample: bool = True,
          reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """IS-CAM (Integrated Score-CAM): Score-CAM weights integrated over scaled copies of each masked input.

    With ``M_k`` each channel min-max normalised on the layer's grid and resized to ``x``'s
    (``align_corners=False``), the model scores ``c_s M_k x`` for ``s = 1 .. N`` with
    ``c_s = sum_(j <= s) j / N``, and ``w = softmax_k(mean_s (y_c(c_s M_k x) - y_c(x)))``,
    ``map = relu(sum_k w_k A_k)`` on the layer's grid. This is torchcam 0.5's ``ISCAM``
    (its coefficients grow past 1: ``c_N = (N + 1) / 2``). Deterministic; no gradient is needed
    and autograd is left as the caller has it (as :func:`score_cam`).

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, C, *grid]`` with 1 to 3 grid axes.
      target: ``None`` (the class predicted for ``x``), int, ``[B]`` ints, or a callable ``out -> [n]``
        applied to each batch of ``n`` masked inputs (row by row).
      layer: One dotted module name or module with output ``[B, K, *grid]`` (``x``'s grid axes).
      samples: The integration steps ``N``. Default: 10 (torchcam's).
      batch_size: The most masked inputs in one forward pass. Default: 32.
      {relu.cam}
      {upsample.cam}
      {reshape.cam}

    Returns:
      ``[B, 1, *grid]`` of ``x``'s grid (the layer's grid with ``upsample=False``).

    Raises:
      ValueError: an unknown layer or one without ``x``'s grid axes, ``samples`` or ``batch_size``
        below 1, a target out of range, NaN input.
      TypeError: several layers, a bad ``batch_size``, target or layer type.

    Example:
      >>> iscam(fn, params, images, labels, layer="layer4", samples=10).shape   # -> [8, 1, 224, 224]

    Cost: one forward, then ``samples ceil(B K / batch_size)`` forwards of up to ``batch_size``
    masked inputs; no backward.
    References: Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    arXiv:2010.03023, 2020.
    """
    fn = "iscam"
    target = _check_score_options(fn, model_fn, params, x, target, relu, upsample, reshape, layer, batch_size, samples)
    coefficients = [sum(j / samples for j in range(1, s + 2)) for s in range(samples)]

    def scaled(s: int, masks: Tensor, images: Tensor, rows: Tensor) -> Tensor:
        return coefficients[s] * (masks * images)

    act, weights = _integrated_score_weights(fn, model_fn, params, x, target, layer, batch_size, reshape, samples,
                                             scaled)
    maps = torch.einsum("bk,bk...->b...", weights.to(act.dtype), act).unsqueeze(1)
    return _finish(fn, maps, x, relu, upsample)


@_docs.fill
def smooth_grad_cam_pp(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: LayerSpec,
                       samples: int = 4, std: float = 0.3, eps: float = 1e-8,
                       generator: Optional[torch.Generator] = None, relu: bool = True, upsample: bool = True,
                       reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Smooth Grad-CAM++: Grad-CAM++'s alpha from gradient powers averaged over noisy copies of ``x``.

    For ``s = 1 .. N`` the layer's activation ``A_s`` and gradient ``g_s`` are taken at
    ``x + n_s``, ``n_s ~ N(0, std^2)``; with ``A`` the activation at ``x``,
    ``alpha = mean_s g_s^2 / (2 mean_s g_s^2 + sum_ij (mean_s g_s^3) A + eps)`` (per channel,
    the sum over the grid), ``w_k = sum_ij alpha relu(g_N)`` and ``map = relu(sum_k w_k A_N)``.
    This is torchcam 0.5's ``SmoothGradCAMpp`` exactly, including two of its choices: the weights
    and the map use the LAST noisy sample's gradient and activation (torchcam's hooks keep the last
    forward's), and alpha's numerator is the averaged squared gradient (torchcam's correction to the
    paper). Noise is drawn in float32 as one ``x``-shaped draw per sample: with ``generator``
    seeded as torchcam's global generator these are torchcam's numbers.

    Args:
      {model_fn}
      {params}
      {x.cam}
      target: ``None`` (the class predicted for ``x``, kept for every noisy copy), int, ``[B]`` ints,
        or a callable ``out -> [B]`` (applied to each noisy copy's output).
      layer: One dotted module name or module.
      samples: Noisy copies ``N``. Default: 4 (torchcam's).
      std: The noise's standard deviation, in ``x``'s units. Default: 0.3 (torchcam's).
      eps: Added to alpha's denominator. Default: 1e-8 (torchcam's).
      generator: The source of the noise; ``None`` draws from the global generator. Default: None.
      {relu.cam}
      {upsample.cam}
      {reshape.grad_cam}

    {text.cam_maps}

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> smooth_grad_cam_pp(fn, params, images, labels, layer="layer4", generator=g).shape   # -> [8, 1, 224, 224]

    Cost: one forward, then ``samples`` forwards and backwards to the layer.
    References: Omeiza et al., "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
    Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224, 2019.
    """
    fn = "smooth_grad_cam_pp"
    target = _check_common(fn, model_fn, params, x, target, relu, upsample, reshape, images_only=True)
    _checks.check_positive_int(fn, "samples", samples)
    spread = _check_std(fn, std)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise _checks.value_error(fn, "eps, a float >= 0", _checks.describe(eps))
    _checks.check_generator(fn, generator)
    _checks.check_generator_device(fn, generator, x)
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module (one layer per call)",
                                 _checks.describe(layer), f"Call {fn} once per layer.")
    names, _ = resolve_layers(fn, model_fn, layer)
    name = names[0]
    out, acts = intermediates(model_fn, layers=names, fn=fn)(params, x)
    clean = _at_least_float32(_to_grid(fn, name, acts[name], x, reshape))
    if not _targets.is_callable(target):
        target = _targets.resolve_index(out, target, fn=fn, output=_targets.selector(model_fn))
    g2: Any = 0
    g3: Any = 0
    for _ in range(samples):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32) * spread
        result = layer_gradients(model_fn, params, x + noise.to(x.dtype), target, layers=names, fn=fn)
        act = _to_grid(fn, name, result.acts[name], x, reshape)
        grad = _at_least_float32(result.grads[name] if reshape is None else reshape(result.grads[name]))
        g2 = g2 + grad.pow(2)
        g3 = g3 + grad.pow(3)
    g2, g3 = g2 / samples, g3 / samples
    spatial = tuple(range(2, clean.ndim))
    alpha = g2 / (2 * g2 + (g3 * clean).sum(dim=spatial, keepdim=True) + eps)
    weights = (alpha * torch.relu(grad)).sum(dim=spatial, keepdim=True)
    maps = (weights * _at_least_float32(act)).sum(dim=1, keepdim=True)
    return _rounded(_finish(fn, maps, x, relu, upsample), x, act.dtype)


class Factorization(NamedTuple):
    """What :func:`deep_feature_factorization` returns.

    Attributes:
      maps: ``[B, n, *grid]``, each concept's map (``x``'s grid, or the layer's with ``upsample=False``).
      concepts: ``[n, K]``, each concept's embedding in the layer's ``K`` channels.
      scores: ``classifier(concepts)`` (``[n, classes]`` for a linear head), or ``None`` without a classifier.
    """

    maps: Tensor
    concepts: Tensor
    scores: Optional[Tensor]


def _nmf_sweep(X: Tensor, W: Tensor, Ht: Tensor) -> Tuple[Tensor, Tensor]:
    """One coordinate-descent sweep over ``W``'s columns for ``X ~ W Ht^T`` (``W >= 0``); the sum of the
    projected gradients' magnitudes before each update (scikit-learn's violation).

    Column ``t`` of every row moves to ``max(0, W_t - grad_t / hess_t)`` with the columns before it
    already updated (the rows are independent, so they update together)."""
    HHt = Ht.T @ Ht
    XHt = X @ Ht
    W = W.clone()
    violation = W.new_zeros(())
    for t in range(W.shape[1]):
        grad = W @ HHt[:, t] - XHt[:, t]
        projected = torch.where(W[:, t] == 0, grad.clamp_max(0), grad)
        violation = violation + projected.abs().sum()
        hess = HHt[t, t]
        if hess != 0:
            W[:, t] = (W[:, t] - grad / hess).clamp_min(0)
    return W, violation


def _nmf(X: Tensor, W: Tensor, H: Tensor, iterations: int, tol: float) -> Tuple[Tensor, Tensor]:
    """``X ~ W H`` with ``W, H >= 0`` by scikit-learn's coordinate descent (``NMF(solver="cd")``: Frobenius
    loss, no regularisation, no shuffling), from ``(W, H)``; stops when the violation falls to ``tol``
    times the first sweep's."""
    Ht = H.T
    first = None
    for _ in range(iterations):
        W, v_w = _nmf_sweep(X, W, Ht)
        Ht, v_h = _nmf_sweep(X.T, Ht, W)
        violation = float(v_w + v_h)
        first = violation if first is None else first
        if first == 0 or violation / first <= tol:
            break
    return W, Ht.T


@_docs.fill
def deep_feature_factorization(model_fn: ModelFn, params: Params, x: Tensor, *, layer: LayerSpec,
                               components: int = 5, classifier: Optional[Callable[[Tensor], Tensor]] = None,
                               iterations: int = 200, tol: float = 1e-4, init: Optional[Tuple[Tensor, Tensor]] = None,
                               generator: Optional[torch.Generator] = None, upsample: bool = True,
                               reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Factorization:
    """Deep Feature Factorization: concepts shared by a batch, by non-negative matrix factorisation of a layer.

    The layer's activations ``[B, K, *grid]`` are laid out as ``X`` ``[K, B h w]`` (a channel per row),
    each row shifted by its minimum (``X - m``, so ``X >= 0``), and factorised as ``X - m ~ W H`` with
    ``W [K, n]``, ``H [n, B h w]`` non-negative: ``H`` reshaped to ``[B, n, *grid]`` are the concept
    maps, ``W + m`` (transposed, ``[n, K]``) the concepts, and ``classifier(concepts)`` their scores
    (e.g. the model's last linear layer: which classes each concept stands for). The concepts are
    shared by the whole batch.

    The factorisation is scikit-learn's ``NMF(n, init="random", solver="cd")`` as pytorch-grad-cam's
    ``DeepFeatureFactorization`` runs it: the same initialisation recipe (``|N(0, 1)| sqrt(mean(X) /
    n)``, ``H`` drawn before ``W``, from ``generator`` here and NumPy's ``RandomState(0)`` there),
    the same coordinate-descent sweeps and stopping rule, in at least float64. Given scikit-learn's
    initial ``(W, H)`` as ``init``, the maps and concepts equal pytorch-grad-cam's (before its
    per-map min-max scaling). With another initialisation the factorisation may differ: NMF's
    solutions are unique at best up to the order and scale of the concepts. Maps are not scaled.
    The result is computed without autograd (an iterative solver with a data-dependent stop).

    Args:
      {model_fn}
      {params}
      {x.cam}
      layer: One dotted module name or module.
      components: The number of concepts ``n``. Default: 5.
      classifier: A callable applied to the concepts ``[n, K]`` (e.g. ``lambda c: fn(params_fc, c)``
        or the model's ``fc``); ``None`` leaves ``scores`` ``None``. Default: None.
      iterations: The most coordinate-descent sweeps (of ``W`` then ``H``). Default: 200 (scikit-learn's).
      tol: Stop once the projected gradient's magnitude falls to ``tol`` times the first sweep's.
        Default: 1e-4 (scikit-learn's).
      init: ``(W [K, n], H [n, B h w])``, a non-negative starting point; ``None`` draws one. Default: None.
      generator: The source of the initialisation when ``init`` is None; ``None`` draws from the
        global generator. Default: None.
      {upsample.cam}
      {reshape.cam}

    Returns:
      :class:`Factorization` ``(maps, concepts, scores)``.

    Raises:
      ValueError: an unknown layer, ``components``, ``iterations`` below 1, ``tol`` below 0, an
        ``init`` of the wrong shape or with negative entries, NaN input.
      TypeError: several layers, a bad classifier, generator or layer type.

    Example:
      >>> maps, concepts, scores = deep_feature_factorization(fn, params, images, layer="layer4",
      ...                                                     classifier=model.fc)   # maps [8, 5, 224, 224]

    Cost: one forward pass; then per sweep ``O(K B h w n)`` for the products and ``2 n`` column updates.
    References: Collins et al., "Deep Feature Factorization for Concept Discovery", ECCV 2018.
    """
    fn = "deep_feature_factorization"
    _check_common(fn, model_fn, params, x, None, True, upsample, reshape)
    _checks.check_positive_int(fn, "components", components)
    _checks.check_positive_int(fn, "iterations", iterations)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise _checks.value_error(fn, "tol, a float >= 0", _checks.describe(tol))
    _checks.check_optional_callable(fn, "classifier", classifier)
    _checks.check_generator(fn, generator)
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one dotted name or module (one layer per call)", _checks.describe(layer))
    names, _ = resolve_layers(fn, model_fn, layer)
    with torch.no_grad():
        _, acts = intermediates(model_fn, layers=names, fn=fn)(params, x)
        act = _to_grid(fn, names[0], acts[names[0]], x, reshape)
        batch, channels, grid = act.shape[0], act.shape[1], act.shape[2:]
        dtype = torch.promote_types(act.dtype, torch.float64)
        X = torch.nan_to_num(act.to(dtype).transpose(0, 1).reshape(channels, -1), nan=0.0)
        offset = X.amin(dim=1, keepdim=True)
        X = X - offset
        if init is None:
            scale = (X.mean() / components).sqrt()
            H = scale * torch.randn(components, X.shape[1], generator=generator, dtype=torch.float32,
                                    device=X.device).to(dtype).abs()
            W = scale * torch.randn(channels, components, generator=generator, dtype=torch.float32,
                                    device=X.device).to(dtype).abs()
        else:
            if (not isinstance(init, (tuple, list)) or len(init) != 2
                    or not all(isinstance(t, Tensor) for t in init)):
                raise _checks.type_error(fn, "init, a pair of tensors (W, H) or None", _checks.describe(init))
            W, H = (torch.as_tensor(t).to(device=X.device, dtype=dtype) for t in init)
            shapes_ok = W.shape == (channels, components) and H.shape == (components, X.shape[1])
            if not shapes_ok or (W < 0).any() or (H < 0).any():
                raise _checks.value_error(fn, f"init (W [{channels}, {components}], H [{components}, {X.shape[1]}]), "
                                          "non-negative", f"W {tuple(W.shape)}, H {tuple(H.shape)}")
        W, H = _nmf(X, W, H, iterations, float(tol))
        concepts = (W + offset).T.contiguous()
        maps = H.reshape(components, batch, *grid).transpose(0, 1)
        image = _image_of(x)
        if upsample:
            maps = _finish(fn, maps.reshape(batch * components, 1, *grid), x, False, True)
            maps = maps.reshape(batch, components, *maps.shape[2:])
        out_dtype = image.dtype if image is not None else act.dtype
        maps, concepts = maps.to(out_dtype), concepts.to(out_dtype)
        scores = classifier(concepts) if classifier is not None else None
    return Factorization(maps, concepts, scores)


def _min_max(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Each example's map shifted to minimum 0 and divided by ``max + eps`` (pytorch-grad-cam's scaling)."""
    flat = maps.flatten(1)
    flat = flat - flat.amin(dim=1, keepdim=True)
    return (flat / (flat.amax(dim=1, keepdim=True) + eps)).reshape(maps.shape)


@_docs.fill
def refine_cam(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Any,
               method: Optional[Callable[..., Any]] = None,
               reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """RefineCAM: the product of several layers' CAMs, each scaled to [0, 1] at ``x``'s size.

    Each layer's map ``m_l = method(..., layer=l, relu=True, upsample=True)`` is min-max scaled per
    example (``(m - min) / (max - min + 1e-7)``); the product over the layers is scaled the same
    way. A deep layer's coarse map keeps a shallow layer's fine but noisy map where the object is.
    This is pytorch-grad-cam's ``RefineCAM`` (its default ``method`` is Grad-CAM++, as here); its
    scaling before resizing changes nothing (resizing is linear, the scaling affine).

    Args:
      {model_fn}
      {params}
      {x.cam}
      {target}
      layer: A list or tuple of dotted module names or modules (one layer gives its scaled map).
      method: Any CAM of this module taking ``layer=`` (a list), ``relu=``, ``upsample=`` and
        ``reshape=``. Default: ``grad_cam_pp``.
      {reshape.grad_cam}

    Returns:
      ``[B, 1, *grid]`` of ``x``'s grid, in [0, 1].

    Raises:
      ValueError: an unknown layer, a layer never reached, a target out of range, NaN input.
      TypeError: integer images, a bad target, layer or method type.

    Example:
      >>> refine_cam(fn, params, images, labels, layer=["layer2", "layer3", "layer4"]).shape   # -> [8, 1, 224, 224]

    Cost: that of ``method`` on all the layers at once (one forward and one backward for the gradient CAMs).
    References: pytorch-grad-cam's ``RefineCAM`` (arXiv:2605.14641).
    """
    fn = "refine_cam"
    _check_common(fn, model_fn, params, x, target, True, True, reshape, resizes_x=True)
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers or isinstance(layer, dict):
        raise _checks.type_error(fn, "layer, a layer or a non-empty list or tuple of layers", _checks.describe(layer),
                                 "RefineCAM multiplies the maps of several layers.")
    resolve_layers(fn, model_fn, layers)
    method = grad_cam_pp if method is None else method
    _checks.check_optional_callable(fn, "method", method)
    maps = method(model_fn, params, x, target, layer=layers, relu=True, upsample=True, reshape=reshape)
    product = _min_max(_at_least_float32(maps[0]))
    for m in maps[1:]:
        product = product * _min_max(_at_least_float32(m))
    return _min_max(product).to(x.dtype)


_SESS_POOLS = ("mean", "max")


def _resize_short_side(image: Tensor, short: int) -> Tensor:
    """``image`` ``[1, C, H, W]`` with its shorter side resized to ``short`` and the longer to
    ``int(short * long / shorter)`` (torchvision's ``resize(image, short)``: bilinear, anti-aliased,
    ``align_corners=False``; the image itself at its own size)."""
    height, width = image.shape[2:]
    size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    if size == (height, width):
        return image
    low = image.dtype in (torch.float16, torch.bfloat16)  # anti-aliased bilinear has no half kernel on a CPU
    resized = F.interpolate(image.float() if low else image, size=size, mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.to(image.dtype)


def _window_starts(length: int, step: int, window: int) -> List[int]:
    """The starts of the windows along one side; the last one is shifted back to end at the border."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def _reflect_101(length: int, pad: int, device: Any) -> Tensor:
    """The indices of a side of ``length`` padded by ``pad`` on both ends, reflected without repeating the edge
    (OpenCV's ``BORDER_REFLECT_101``), again and again where ``pad`` exceeds the side."""
    positions = torch.arange(-pad, length + pad, device=device)
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    folded = positions.remainder(period)
    return torch.where(folded < length, folded, period - folded)


def _gaussian_blur(image: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """``[B, 1, H, W]`` blurred by a separable Gaussian (``size`` taps, ``sigma``), borders reflected
    without repeating the edge (OpenCV's default border, ``cv2.GaussianBlur``), for any image size."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(image.dtype).to(image.device)
    pad = size // 2
    height, width = image.shape[2:]
    padded = image.index_select(2, _reflect_101(height, pad, image.device))
    padded = padded.index_select(3, _reflect_101(width, pad, image.device))
    rows = F.conv2d(padded, kernel.reshape(1, 1, 1, size))
    return F.conv2d(rows, kernel.reshape(1, 1, size, 1))


def _check_sess_options(fn: str, scales, num_scales, scale_step_ratio, window_size, step_size, pre_filter_ratio,
                        theta, pool, smooth, softmax_scores, batch_size) -> None:
    _checks.check_positive_int(fn, "num_scales", num_scales)
    _checks.check_positive_int(fn, "window_size", window_size, allow_none=True)
    _checks.check_positive_int(fn, "step_size", step_size, allow_none=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "smooth", smooth)
    _checks.check_bool(fn, "softmax_scores", softmax_scores)
    if scales is not None:
        if not isinstance(scales, (list, tuple)) or not scales:
            raise _checks.type_error(fn, "scales, a non-empty list of ints or None", _checks.describe(scales))
        for scale in scales:
            _checks.check_positive_int(fn, "each of scales", scale)
    for name, value in (("scale_step_ratio", scale_step_ratio), ("pre_filter_ratio", pre_filter_ratio),
                        ("theta", theta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise _checks.type_error(fn, f"{name}, a float", _checks.describe(value))
    if scale_step_ratio < 0:
        raise _checks.value_error(fn, "scale_step_ratio >= 0", _checks.describe(scale_step_ratio))
    if not 0.0 <= pre_filter_ratio < 1.0:
        raise _checks.value_error(fn, "pre_filter_ratio in [0, 1)", _checks.describe(pre_filter_ratio))
    if pool not in _SESS_POOLS:
        raise _checks.value_error(fn, f"pool, one of {_SESS_POOLS}", _checks.describe(pool))


@_docs.fill
def sess(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Any,
         method: Optional[Callable[..., Any]] = None, scales: Optional[List[int]] = None, num_scales: int = 12,
         scale_step_ratio: float = 2.0 / 7.0, window_size: Optional[int] = None, step_size: Optional[int] = None,
         pre_filter_ratio: float = 0.0, theta: float = 0.0, pool: str = "mean", smooth: bool = True,
         softmax_scores: bool = True, batch_size: int = 32,
         reshape: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """SESS (Saliency Enhancing with Scaling and Sliding): a CAM method run on patches of the image at
    several scales, weighted by each patch's class score and fused.

    Per image of size ``H x W``: with a window ``w`` (``window_size``, default ``min(H, W)``), the image is
    resized so that its shorter side is each of ``scales`` (default ``w + i round(w scale_step_ratio)``
    for ``i < num_scales``; bilinear, anti-aliased, as torchvision's ``resize``), and a ``w x w`` window
    slides over each resized image with stride ``step_size`` (default ``w``; the last window of a row or
    column is moved back to end at the border). Each patch's score ``s`` is the target class's softmax
    probability (its logit with ``softmax_scores=False``), clipped at 0; the ``pre_filter_ratio`` lowest
    scoring patches are left out (a stable sort; their maps are computed and masked, so that the
    function runs under ``torch.func.vmap``). Each remaining patch's map is ``method`` at ``layer``
    (``relu=True``), each layer's map min-max scaled (``(m - min) / (max + 1e-7)`` after subtracting the
    min) and resized to ``w x w``, their mean scaled again, then multiplied by ``s / max s`` (1 when every
    score is 0), pasted where the patch was taken from in a zero map of the resized image's size, and
    resized to ``H x W`` (bilinear, ``align_corners=False``, no anti-aliasing). ``pool="mean"``
    averages each pixel over the patch maps above ``theta`` there (0 where none is); ``"max"`` takes
    the maximum. With ``smooth`` the result is blurred by an 11 x 11 Gaussian of sigma 5 (borders
    reflected, OpenCV's default), and each image's map is min-max scaled to [0, 1]. This is
    pytorch-grad-cam's ``SESS`` with its defaults (``base_method=GradCAM``).

    Args:
      {model_fn}
      {params}
      x: Images ``[B, C, H, W]``.
      target: ``None`` (the class the model predicts for each whole image), int, or ``[B]`` ints.
      layer: The layer(s) ``method`` reads: a dotted name or module, or a list of them (their maps
        are averaged, as pytorch-grad-cam does with several target layers).
      method: Any CAM of this module taking ``layer=``, ``relu=``, ``upsample=`` and ``reshape=``.
        Default: ``grad_cam``.
      scales: The shorter side of each resized image, each at least the window. Default: None (see above).
      num_scales: The number of default scales. Default: 12.
      scale_step_ratio: The default scales' step, a fraction of the window. Default: 2 / 7.
      window_size: The side of the square window. Default: None (``min(H, W)``).
      step_size: The window's stride. Default: None (the window, no overlap).
      pre_filter_ratio: The fraction of the lowest scoring patches left out, in [0, 1). Default: 0.0.
      theta: Patch-map values at or below it do not count in the ``"mean"`` fusion. Default: 0.0.
      pool: ``"mean"`` or ``"max"``. Default: ``"mean"``.
      smooth: Blur the fused map. Default: True.
      softmax_scores: Score patches by the softmax probability (True) or the raw logit. Default: True.
      batch_size: The most patches in one forward (scores) or one ``method`` call. Default: 32.
      {reshape.grad_cam}

    Returns:
      ``[B, 1, H, W]`` in [0, 1].

    Raises:
      ValueError: a scale below the window, ``pre_filter_ratio`` outside [0, 1), an unknown ``pool``,
        an input that is not ``[B, C, H, W]``, an unknown layer, a target out of range, NaN input.
      TypeError: a callable target (SESS scores patches by a class), a bad option type.

    Example:
      >>> sess(fn, params, images, labels, layer="layer4").shape   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> sess(fn, params, images, labels, layer="layer4", method=tx.grad_cam_pp, num_scales=4)

    Cost: per image, one forward per ``batch_size`` patches to score them, then ``method`` on every kept
    patch (for ``grad_cam``, one forward and backward per ``batch_size`` patches): at 224 x 224 with the
    defaults, 229 patches.
    References: Tan et al., "SESS: Saliency Enhancing with Scaling and Sliding", ECCV 2022.
    """
    fn = "sess"
    target = _check_common(fn, model_fn, params, x, target, True, True, reshape, images_only=True, resizes_x=True)
    if x.ndim != 4:
        raise _checks.value_error(fn, "images x of shape [B, C, H, W]", _checks.describe(x),
                                  "SESS slides a 2-D window over images.")
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or [B] ints (patches are scored by a class)",
                                 "a callable")
    method = grad_cam if method is None else method
    _checks.check_optional_callable(fn, "method", method)
    _check_sess_options(fn, scales, num_scales, scale_step_ratio, window_size, step_size, pre_filter_ratio, theta,
                        pool, smooth, softmax_scores, batch_size)
    height, width = x.shape[2:]
    window = window_size if window_size is not None else min(height, width)
    step = step_size if step_size is not None else window
    if scales is None:
        stride = int(round(window * scale_step_ratio))
        scales = [window + stride * i for i in range(num_scales)]
    if min(scales) < window:
        raise _checks.value_error(fn, f"every scale at least the window size {window}", f"scales {list(scales)}")
    resolve_layers(fn, model_fn, layer)
    chosen = _targets.selector(model_fn)
    with torch.no_grad():
        index = _targets.resolve_index(model_fn(params, x), target, fn=fn, output=chosen)
    fused = [_sess_image(fn, model_fn, params, x[b:b + 1], index[b], layer, method, list(scales), window, step,
                         pre_filter_ratio, theta, pool, softmax_scores, batch_size, reshape, chosen)
             for b in range(x.shape[0])]
    maps = torch.cat(fused)
    if smooth:
        maps = _gaussian_blur(maps)
    return _min_max(maps).to(x.dtype)


def _sess_image(fn: str, model_fn, params, image: Tensor, category: Tensor, layer, method, scales: List[int],
                window: int, step: int, pre_filter_ratio: float, theta: float, pool: str, softmax_scores: bool,
                batch_size: int, reshape, chosen) -> Tensor:
    """One image's fused SESS map ``[1, 1, H, W]`` (before the blur and the final scaling)."""
    height, width = image.shape[2:]
    patches: List[Tensor] = []
    places: List[Tuple[int, int, int, int]] = []    # x1, y1, resized height, resized width
    for scale in scales:
        scaled = _resize_short_side(image, scale)
        rows, cols = scaled.shape[2:]
        for y1 in _window_starts(rows, step, window):
            for x1 in _window_starts(cols, step, window):
                patches.append(scaled[:, :, y1:y1 + window, x1:x1 + window])
                places.append((x1, y1, rows, cols))
    batch = torch.cat(patches)
    count = batch.shape[0]
    with torch.no_grad():
        scores = []
        for start in range(0, count, batch_size):
            logits = _targets.select_output(model_fn(params, batch[start:start + batch_size]), chosen, fn=fn)
            probs = torch.softmax(logits, dim=-1) if softmax_scores else logits
            scores.append(probs.index_select(1, category.reshape(1)).squeeze(1))
        score = torch.cat(scores).float().clamp(min=0)
    # The pre_filter_ratio lowest scores (a stable sort) are left out by a mask, not by a data-dependent
    # selection, so that the function runs under torch.func.vmap; the fusion does not depend on the order.
    rank = torch.argsort(torch.argsort(score, stable=True), stable=True)
    kept = rank >= int(count * pre_filter_ratio)
    top = torch.where(kept, score, torch.zeros_like(score)).amax()
    weights = torch.where(top > 0, score / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(score))
    weights = torch.where(kept, weights, torch.zeros_like(weights))
    total = torch.zeros(1, 1, height, width, dtype=torch.float32, device=image.device)
    counts = torch.zeros_like(total)
    for start in range(0, count, batch_size):
        maps = method(model_fn, params, batch[start:start + batch_size], category, layer=layer, relu=True,
                      upsample=False, reshape=reshape)
        maps = maps if isinstance(maps, (list, tuple)) else [maps]
        layered = [_grid.resize(_min_max(_at_least_float32(m.detach())), (window, window)) for m in maps]
        cams = _min_max(torch.stack(layered).mean(dim=0)) * weights[start:start + batch_size, None, None, None]
        for offset, cam in enumerate(cams):
            x1, y1, rows, cols = places[start + offset]
            pasted = F.pad(cam[None], (x1, cols - x1 - window, y1, rows - y1 - window))
            pasted = _grid.resize(pasted, (height, width))
            if pool == "max":
                total = torch.maximum(total, pasted)   # a left-out patch is 0: it changes no maximum of maps >= 0
            else:
                above = (pasted > theta) & kept[start + offset]
                total = total + torch.where(above, pasted, torch.zeros_like(pasted))
                counts = counts + above.to(counts.dtype)
    if pool == "max":
        return total
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total))
