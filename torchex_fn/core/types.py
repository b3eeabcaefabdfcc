"""Type aliases shared by every module of the package.

Shape vocabulary used in docstrings: ``b`` batch, ``c h w`` an input image, ``*input`` any input,
``k`` layer channels, ``*spatial`` a layer's grid, ``classes`` model outputs, ``s`` samples/steps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Params", "ModelFn", "Target", "LayerSpec", "Layer"]

Params = Mapping[str, Tensor]
"""Name -> tensor mapping accepted by ``torch.func.functional_call`` (parameters and buffers)."""

ModelFn = Callable[[Params, Any], Any]
"""A pure ``(params, x) -> out`` function; ``x`` a tensor or a mapping of named inputs, ``out`` a tensor,
a mapping (``logits``) or a tuple."""

Target = Union[None, int, Tensor, Callable[[Tensor], Tensor]]
"""``None`` (argmax per example), an ``int``, an integer ``[B]`` tensor, or ``out -> [B]``."""

LayerSpec = Union[str, torch.nn.Module]
"""A dotted module name (``"layer4.1"``) or the module object itself."""

Layer = Union[LayerSpec, Sequence[LayerSpec], Mapping[str, LayerSpec]]
"""One layer, or a list / tuple / dict of layers; results mirror the structure."""
