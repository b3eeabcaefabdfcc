"""What ``explain`` chooses for a model it was only given by name: the layer, the layout, the feature mask.

* :func:`parse_reshape` reads ``--reshape``: ``tokens`` (``tokens:N`` with ``N`` prefix tokens),
  ``channels-last``, ``none``; :func:`reshape_of` turns it into a ``reshape=`` callable of the CAM family
  (:func:`torchex_fn.tools.postprocess.tokens_to_grid`, :func:`~torchex_fn.tools.postprocess.channels_last_to_first`).
* :func:`default_layer` names a layer per model family when a layer method gets no ``--layer``: a vision
  transformer's last block's first norm (its patch tokens still reach the class token there), else the
  last stage that timm's ``feature_info`` lists (Swin, ConvNeXt, ResNet, EfficientNet, ...), else
  torchvision's ``layer4`` / the last encoder block / ``features``.
* :func:`default_reshape` reads the layout of that layer's output (from one forward) when ``--reshape`` is
  not given: ``[B, P + N, D]`` tokens, ``[B, h, w, C]`` channels last, or ``[B, C, h, w]`` as it is.
* :func:`parse_features` reads ``--features``: ``grid:N`` (cells of ``N x N`` pixels, as
  ``tx.masks.grid(shape, N)``) or ``superpixels:N`` (about ``N`` segments per image, as
  ``tx.masks.superpixels(x, N)``); :func:`with_features` gives a method that builds the mask of each batch.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple

from torch import Tensor, nn

from ..tools import masks, postprocess

__all__ = ["parse_reshape", "reshape_of", "default_layer", "default_reshape", "parse_features", "with_features",
           "featured"]

Reshape = Tuple[str, Optional[int]]  # ("tokens", prefix or None), ("channels-last", None) or ("none", None)
Features = Tuple[str, int]           # ("grid", cell) or ("superpixels", segments)


def parse_reshape(text: str) -> Reshape:
    """``--reshape``'s value: ``tokens``, ``tokens:N`` (N >= 0 prefix tokens), ``channels-last`` or ``none``.

    Raises:
      ValueError: anything else (the message lists the forms).
    """
    kind, sep, count = text.partition(":")
    if kind == "tokens":
        if not sep:
            return "tokens", None
        if count.isdigit():
            return "tokens", int(count)
    elif kind in ("channels-last", "none") and not sep:
        return kind, None
    raise ValueError(f"--reshape: expected tokens, tokens:N (N >= 0 tokens before the patch tokens, e.g. tokens:1 "
                     f"for a class token), channels-last or none, got {text!r}")


def reshape_of(reshape: Reshape) -> Optional[Callable[[Tensor], Tensor]]:
    """The ``reshape=`` callable of a parsed ``--reshape`` (None for ``none``)."""
    kind, prefix = reshape
    if kind == "tokens":
        return postprocess.tokens_to_grid(prefix_tokens=0 if prefix is None else prefix)
    if kind == "channels-last":
        return postprocess.channels_last_to_first
    return None


def default_layer(model: nn.Module) -> Optional[str]:
    """A layer for layer methods by model family, or None when the family is not known."""
    blocks = getattr(model, "blocks", None)
    if isinstance(getattr(model, "num_prefix_tokens", None), int) and isinstance(blocks, nn.Sequential) \
            and len(blocks) and isinstance(getattr(blocks[-1], "norm1", None), nn.Module):
        # timm ViT / DeiT / BEiT / EVA: after the last block only the class token goes on to the head,
        # so the patch tokens have a gradient at the last block's input norm, not at its output
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return str(info[-1]["module"])
    names = dict(model.named_modules())
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if isinstance(layers, nn.Sequential) and len(layers):  # torchvision vit_*: encoder_layer_i, ln_1 as timm's norm1
        last = next(n for n, m in names.items() if m is layers[-1])
        return f"{last}.ln_1" if f"{last}.ln_1" in names else last
    for name in ("layer4", "features", "trunk_output"):  # torchvision ResNet family, VGG / DenseNet / ..., RegNet
        if name in names:
            return name
    return None


def _square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n


def default_reshape(model: nn.Module, act: Tensor) -> Reshape:
    """The layout of a layer's output ``act`` for an image: tokens, channels last, or ``[B, C, h, w]``."""
    if act.ndim == 3:
        prefix = getattr(model, "num_prefix_tokens", None)
        if not isinstance(prefix, int):
            prefix = next((p for p in range(min(8, act.shape[1])) if _square(act.shape[1] - p)), 0)
        return "tokens", prefix
    if act.ndim == 4 and act.shape[1] == act.shape[2] and act.shape[3] > act.shape[1]:
        return "channels-last", None  # [B, h, h, C] with more channels than rows (Swin stages)
    return "none", None


def parse_features(text: str) -> Features:
    """``--features``'s value: ``grid:N`` or ``superpixels:N`` with N >= 1.

    Raises:
      ValueError: anything else (the message lists the forms).
    """
    kind, sep, count = text.partition(":")
    if kind in ("grid", "superpixels") and sep and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise ValueError(f"--features: expected grid:N (cells of N x N pixels) or superpixels:N (about N segments per "
                     f"image), N >= 1, got {text!r}")


def featured(method: Callable, kind: str, count: int, model_fn: Any, params: Any, x: Tensor, target: Any = None,
             **options: Any) -> Tensor:
    """``method(model_fn, params, x, target, feature_mask=<kind:count mask of x>, **options)``."""
    if kind == "grid":
        mask = masks.grid(tuple(x.shape[-2:]), count, device=x.device)
    else:
        mask = masks.superpixels(x, count)
    return method(model_fn, params, x, target, feature_mask=mask, **options)


def with_features(method: Callable, features: Features) -> Callable:
    """``method`` with ``feature_mask=`` built for each batch it is called on (see :func:`parse_features`): a
    ``functools.partial`` of :func:`featured`, so that ``attribute_dataset``'s manifest records the mask's kind."""
    return functools.partial(featured, method, *features)
