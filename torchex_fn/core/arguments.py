"""The checks every method runs on its ``(model_fn, params, x, target)`` before any forward pass."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from . import checks as _checks
from . import inputs as _inputs
from . import targets as _targets

__all__ = ["check_call"]


def check_call(fn: str, model_fn: Any, params: Any, x: Any, target: Any, *, min_ndim: int = 2,
               ndim: Optional[int] = None, layer: Any = None, layer_option: bool = True) -> Any:
    """The checks every method shares: ``model_fn``, ``params``, ``x`` and ``target``.

    ``x`` is a floating-point batch (see :func:`checks.check_input`) or a dict of named tensors batch first;
    with a ``layer`` to attribute, ``x`` may also be an integer tensor of rank 1 or 2 (token ids
    ``[B, T]``; integer images ``[B, C, H, W]`` are refused with a hint to convert them), and a dict
    needs no floating-point entry. Without one, a dict must have exactly one floating-point entry.

    Returns ``target`` as the methods use it (:func:`targets.normalize`: NumPy integers become torch's).
    """
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _checks.check_eval_mode(fn, model_fn)
    if isinstance(x, Mapping):
        _inputs.check_mapping(fn, x)
        if layer is None:
            _inputs.attributed_key(fn, x, layer_option=layer_option)
        batch = _inputs.batch_of(x)
    elif (layer is not None and isinstance(x, Tensor) and not (x.is_floating_point() or x.is_complex())
          and x.ndim <= 2 and x.dtype != torch.bool):
        # token ids [B, T] (or categorical codes [B, F]); an integer tensor of higher rank is an image
        if x.ndim < 1:
            raise _checks.value_error(fn, "x of rank >= 1 with the batch first", _checks.describe(x))
        batch = x.shape[0]
    else:
        _checks.check_input(fn, x, ndim=ndim, min_ndim=min_ndim, layer_option=layer_option)
        batch = x.shape[0]
    target = _targets.normalize(target)
    _targets.check(fn, target, batch)
    return target
