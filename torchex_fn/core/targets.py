"""``resolve(out, target) -> [B]`` scores: the one target resolver every method uses.

A target picks one scalar per example from the model's output:

* ``None``: the predicted class, ``out.argmax(1)`` per example;
* an ``int``: the same class for every example;
* an integer tensor of shape ``[B]`` (or a 0-d one): one class per example;
* a callable ``out -> [B]``: any score (segmentation, detection, margins, ...); ready-made ones for
  outputs that are not class logits live in :mod:`torchex_fn.core.tasks` and are re-exported here
  (``box_score``, ``segmentation``, ``similarity``, ``regression``, ``softmax``, ``binary``, ``rest``).

Integer targets need an output of shape ``[B, classes]``; use a callable for anything else. When the
model returns more than a tensor (a HuggingFace ``ModelOutput``, a dict, a tuple), integer and
``None`` targets index the tensor chosen by ``functionalize(model, output=...)``; by default that is
the output itself when it is a tensor, and its ``logits`` entry when it is a mapping that has one. A
callable target always receives the raw output.
Ranges are checked as soon as the output exists, before any backward pass, and so are the picked
scores: NaN or Inf there is an error naming the method (a gradient of a NaN score is NaN everywhere).
Both checks go through :func:`torchex_fn.core.checks.check_values`: a ``ValueError`` on a CPU tensor run
eagerly, ``torch._assert_async`` (no host-device synchronisation) on an accelerator and under
``torch.compile``; under ``vmap`` values are not available and the gather kernel reports bad indices.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import checks as _checks
from .inputs import split_output
from .tasks import binary, box_score, regression, rest, segmentation, similarity, softmax
from .types import output_of

__all__ = ["normalize", "resolve", "resolve_index", "check", "log_prob", "prob", "logit", "select_output", "selector",
           "check_neuron_index", "neuron_value",
           # outputs that are not class logits (core/tasks.py): detectors, segmenters, embeddings, regressors
           "box_score", "segmentation", "similarity", "regression", "softmax", "binary", "rest"]


def select_output(out: Any, output: Any = None, *, fn: str = "resolve") -> Tensor:
    """The tensor of a model's output that integer and ``None`` targets index.

    ``output``: ``None`` (the output itself if it is a tensor, else its ``"logits"`` entry), a key or
    attribute name (``"logits"``), an index into a tuple, or a callable ``out -> tensor``.
    """
    if output is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        raise _checks.value_error(
            fn, "model output of shape [B, classes] (a tensor) for an integer or None target", _checks.describe(out),
            "Choose the tensor with `functionalize(model, output='logits')` (a key, attribute, tuple index or "
            "callable), or pass a callable target `out -> [B]`.")
    if callable(output):
        chosen = output(out)
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            chosen = out[output]
        elif hasattr(out, output):
            chosen = getattr(out, output)
        else:
            keys = list(out.keys()) if isinstance(out, Mapping) else [k for k in dir(out) if not k.startswith("_")]
            raise _checks.unknown_name(fn, "model output entry (functionalize's output=)", output, keys)
    else:  # an int: a tuple index
        if not isinstance(out, (tuple, list)) or not -len(out) <= output < len(out):
            raise _checks.value_error(fn, f"a tuple model output with an element {output} (functionalize's output=)",
                                      _checks.describe(out))
        chosen = out[output]
    if not isinstance(chosen, Tensor):
        raise _checks.type_error(fn, "functionalize's output= to choose a tensor", _checks.describe(chosen))
    return chosen


def selector(model_fn: Any) -> Any:
    """The ``output=`` choice a ``model_fn`` from :func:`torchex_fn.functionalize` carries (else ``None``)."""
    return output_of(model_fn)


def normalize(target: Any) -> Any:
    """``target`` with NumPy integers made torch's: a NumPy integer scalar (``labels[i]`` of an int64 array)
    becomes an ``int``, a NumPy array a tensor; anything else is returned as it is (and checked by :func:`check`)."""
    if isinstance(target, (int, Tensor)) or target is None:
        return target
    if isinstance(target, numbers.Integral):   # numpy.int64 and friends (NumPy registers them)
        return int(target)
    if type(target).__module__ == "numpy" and type(target).__name__ == "ndarray":
        return torch.as_tensor(target)
    return target


def check(fn: str, target: Any, batch: Optional[int] = None) -> None:
    """Type and shape of ``target``, checked before any forward pass (NumPy integers :func:`normalize` accepts
    pass)."""
    target = normalize(target)
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
        expected = f"target of shape [B] = [{batch}]" if batch is not None else "target of shape [B]"
        raise _checks.value_error(fn, expected, _checks.describe(target))


def check_finite(fn: str, scores: Tensor) -> None:
    """The picked scores ``[B]`` are finite: NaN or Inf there makes every gradient and map meaningless."""
    if not scores.is_floating_point():
        return
    _checks.check_values(
        fn, ~torch.isfinite(scores), "a finite model output at the target (no NaN or Inf scores)",
        lambda: f"{int((~torch.isfinite(scores)).sum())} non-finite of {scores.numel()} scores",
        "Check the model and its input (scale, a division by zero or log of zero in the model); a callable "
        "target may have produced them.")


def resolve_index(out: Any, target: Any, *, fn: str = "resolve", output: Any = None) -> Tensor:
    """The class index per example, ``[B]`` (int64), for ``None`` / int / tensor targets.

    ``output`` is ``functionalize``'s ``output=`` choice (see :func:`select_output`). The output's
    entries at the index must be finite (:func:`check_finite`).
    """
    target = normalize(target)
    if callable(target) and not isinstance(target, Tensor):
        raise _checks.type_error(fn, "target: None, an int or an integer tensor (a class index is needed)",
                                 "a callable")
    chosen = select_output(out, output, fn=fn)
    index = _index(chosen, target, fn)
    check_finite(fn, chosen.gather(1, index[:, None]).squeeze(1))
    return index


def _index(out: Any, target: Any, fn: str) -> Tensor:
    """:func:`resolve_index` of an already selected output, without the finiteness check."""
    target = normalize(target)
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
    index = target.to(device=out.device, dtype=torch.long, non_blocking=True).expand(batch)
    bad = (index < 0) | (index >= classes)
    _checks.check_values(fn, bad, f"target values in [0, {classes})", lambda: f"{index[bad].tolist()}")
    return index


def resolve(out: Any, target: Any, *, fn: str = "resolve", output: Any = None) -> Tensor:
    """Scores ``[B]`` picked from ``out`` by ``target`` (see the module docstring).

    ``output`` is ``functionalize``'s ``output=`` choice for integer and ``None`` targets.
    """
    target = normalize(target)
    if callable(target) and not isinstance(target, Tensor):
        scores = target(out)
        expected = list(out.shape[:1]) if isinstance(out, Tensor) else None
        if not isinstance(scores, Tensor) or scores.ndim != 1 or (expected and list(scores.shape) != expected):
            raise _checks.value_error(fn, f"the target callable to return scores of shape [B] = {expected or '[B]'}",
                                      _checks.describe(scores))
        check_finite(fn, scores)
        return scores
    chosen = select_output(out, output, fn=fn)
    scores = chosen.gather(1, _index(chosen, target, fn)[:, None]).squeeze(1)
    check_finite(fn, scores)
    return scores


def is_callable(target: Any) -> bool:
    """Whether ``target`` is a callable target (not an index)."""
    return callable(target) and not isinstance(target, Tensor)


def for_blocks(target: Any, k: int, size: int, index: Optional[Tensor] = None) -> Any:
    """A target for an output of ``k`` blocks of the same ``size`` examples, block after block.

    ``index`` ``[size]`` (the resolved classes) is repeated ``k`` times; a callable receives one block's
    output at a time (so it sees the examples it was written for, e.g. per-example labels it closes
    over), whatever the output's structure; an ``int`` target is returned as it is.
    """
    target = normalize(target)
    if index is not None:
        return index.repeat(k)
    if is_callable(target):
        if k == 1:
            return target

        def blocks(out: Any) -> Tensor:
            return torch.cat([target(piece) for piece in split_output(out, size)])
        return blocks
    return target


def logit(target: Any = None) -> Callable[[Tensor], Tensor]:
    """The raw output of ``target`` (the default behaviour, as a callable)."""
    return lambda out: resolve(out, target, fn="targets.logit")


def log_prob(target: Any = None) -> Callable[[Tensor], Tensor]:
    """``log_softmax(out)[target]``, as in "Right for the Right Reasons"."""
    return lambda out: resolve(torch.log_softmax(out, dim=1), target, fn="targets.log_prob")


def prob(target: Any = None) -> Callable[[Tensor], Tensor]:
    """``softmax(out)[target]``, as RISE scores masked images."""
    return lambda out: resolve(torch.softmax(out, dim=1), target, fn="targets.prob")


def for_rows(target: Any, batch: int, g0: int, g1: int) -> Any:
    """``target`` for examples ``g0:g1``: a tensor is expanded to ``[B]`` and sliced; the others pass."""
    target = normalize(target)
    if isinstance(target, Tensor):
        return target.expand(batch)[g0:g1] if target.ndim == 0 else target[g0:g1]
    return target


# --------------------------------------------------------------------------------------------
# A neuron of a layer as the target (neuron conductance, tx.neuron).

def neuron_value(fn: str, index: Any, acts: Tensor) -> Tensor:
    """The neuron ``index`` of a layer's output ``acts`` ``[B, *layer]``: ``[B]`` (a slice is summed)."""
    if callable(index):
        value = index(acts)
        if not isinstance(value, Tensor) or value.shape != acts.shape[:1]:
            raise _checks.value_error(fn, f"index(layer output) of shape [{acts.shape[0]}] (one value per example)",
                                      _checks.describe(value))
        return value
    shape = tuple(acts.shape[1:])
    if len(index) > len(shape) or any(isinstance(i, int) and not -n <= i < n for i, n in zip(index, shape)):
        raise _checks.value_error(fn, f"index within the layer's output shape {list(shape)} (without the batch axis)",
                                  repr(index))
    picked = acts[(slice(None), *index)]
    return picked.reshape(acts.shape[0], -1).sum(1)


def check_neuron_index(fn: str, index: Any) -> Any:
    """``index`` as a tuple of ints and slices (an int is a 1-tuple), or the callable it is."""
    if callable(index):
        return index
    if isinstance(index, int) and not isinstance(index, bool):
        return (index,)
    if isinstance(index, tuple) and index and all(
            isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool)) for i in index):
        return index
    raise _checks.type_error(fn, "index, a tuple of ints (and slices) into the layer's output without the batch "
                             "axis, or a callable layer output -> [B]", _checks.describe(index))
