"""``resolve(out, target) -> [B]`` scores: the one target resolver every method uses.

A target picks one scalar per example from the model's output:

* ``None``: the predicted class, ``out.argmax(1)`` per example;
* an ``int``: the same class for every example;
* an integer tensor of shape ``[B]`` (or a 0-d one): one class per example;
* a callable ``out -> [B]``: any score (segmentation, detection, margins, ...).

Integer targets need an output of shape ``[B, classes]``; use a callable for anything else.
Ranges are checked as soon as the output exists, before any backward pass, without ``.item()``
(under ``vmap`` values are not available and the gather kernel reports bad indices instead).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _checks

__all__ = ["resolve", "resolve_index", "check", "log_prob", "prob", "logit"]


def check(fn: str, target: Any, batch: Optional[int] = None) -> None:
    """Type and shape of ``target``, checked before any forward pass."""
    if target is None or callable(target) and not isinstance(target, Tensor):
        return
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise _checks.type_error(fn, "target: None, an int, an integer tensor of shape [B], or a callable out -> [B]",
                                 _checks.describe(target))
    if isinstance(target, int):
        if target < 0:
            raise _checks.value_error(fn, "target >= 0", _checks.describe(target))
        return
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise _checks.type_error(fn, "target of an integer dtype", _checks.describe(target),
                                 "Pass class indices, e.g. `labels.long()`.")
    if target.ndim > 1 or (batch is not None and target.ndim == 1 and target.shape[0] != batch):
        raise _checks.value_error(fn, f"target of shape [B] = [{batch}]" if batch is not None else "target of shape [B]",
                                  _checks.describe(target))


def resolve_index(out: Tensor, target: Any, *, fn: str = "resolve") -> Tensor:
    """The class index per example, ``[B]`` (int64), for ``None`` / int / tensor targets."""
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or an integer tensor (a class index is needed)",
                                 "a callable")
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise _checks.value_error(fn, "model output of shape [B, classes] for an integer or None target",
                                  _checks.describe(out), "Pass a callable target `out -> [B]`.")
    check(fn, target, out.shape[0])
    batch, classes = out.shape
    if target is None:
        return out.argmax(dim=1)
    if isinstance(target, int):
        if target >= classes:
            raise _checks.value_error(fn, f"target in [0, {classes})", _checks.describe(target))
        return torch.full((batch,), target, dtype=torch.long, device=out.device)
    index = target.to(device=out.device, dtype=torch.long).expand(batch)
    if _checks.concrete_any((index < 0) | (index >= classes)):
        bad = index[(index < 0) | (index >= classes)]
        raise _checks.value_error(fn, f"target values in [0, {classes})", f"{bad.tolist()}")
    return index


def resolve(out: Tensor, target: Any, *, fn: str = "resolve") -> Tensor:
    """Scores ``[B]`` picked from ``out`` by ``target`` (see the module docstring)."""
    if callable(target) and not isinstance(target, Tensor):
        scores = target(out)
        expected = list(out.shape[:1]) if isinstance(out, Tensor) else None
        if not isinstance(scores, Tensor) or scores.ndim != 1 or (expected and list(scores.shape) != expected):
            raise _checks.value_error(fn, f"the target callable to return scores of shape [B] = {expected or '[B]'}",
                                      _checks.describe(scores))
        return scores
    index = resolve_index(out, target, fn=fn)
    return out.gather(1, index[:, None]).squeeze(1)


def logit(target: Any = None) -> Callable[[Tensor], Tensor]:
    """The raw output of ``target`` (the default behaviour, as a callable)."""
    return lambda out: resolve(out, target, fn="targets.logit")


def log_prob(target: Any = None) -> Callable[[Tensor], Tensor]:
    """``log_softmax(out)[target]``, as in "Right for the Right Reasons"."""
    return lambda out: resolve(torch.log_softmax(out, dim=1), target, fn="targets.log_prob")


def prob(target: Any = None) -> Callable[[Tensor], Tensor]:
    """``softmax(out)[target]``, as RISE scores masked images."""
    return lambda out: resolve(torch.softmax(out, dim=1), target, fn="targets.prob")
