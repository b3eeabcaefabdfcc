"""Relevance at a layer, and concept-conditional relevance (CRP), for any relevance pass.

A *relevance pass* is a run of the model whose vector-Jacobian product is the relevance: every layer's
backward is its rule, so the cotangent arriving at a tensor IS that tensor's relevance (LRP's
second pass, :mod:`torchex_fn.methods.lrp`). It is given here as ``run_pass(v, model, extra) ->
scalar``: run ``model`` on ``v`` with the rules, the tensors ``extra`` followed like ``v`` (the
interceptor's ``tainted``), and return the sum over examples of output x output relevance.

* :func:`layer_relevance`: the relevance at a layer's output. The layer's output is *replaced* by a
  copy ``u`` of its own value (:func:`torchex_fn.core.capture.intermediates` with ``replace=``), so the
  model runs on with the same values, and ``d run_pass / d u`` is the relevance arriving at the layer
  from every path after it.
* :func:`conditional_relevance`: concept relevance (CRP, Achtibat et al. 2023): the relevance at a
  layer is masked to some channels (a *concept*) before it goes on to the input. With the layer's
  output replaced by ``u``, the pass is a function of ``(v, u)`` whose two outputs are the score and
  the layer's own (unreplaced) output ``a(v)``. One ``torch.func.vjp`` gives, from the cotangent
  ``(1, 0)``, the layer relevance ``R``; from ``(0, R * m)`` the input relevance of ``R * m`` passed
  back *through the layer*: ``(d a / d v)^T (R * m)``. The rules are linear in the relevance, so the
  ``K`` masks are one ``vmap`` of the same pullback (one forward, ``K + 1`` backwards, batched).

What flows around the layer (a residual connection that skips it) is left out of a concept's
heatmap, as zennit-crp does by default (``exclude_parallel=True``): the heatmaps of all channels sum to
the relevance that passed through the layer, which is the whole input relevance when every path
from the input to the output passes through the layer (a VGG's ``features.N``, a ResNet's
``layerN``), and the input relevance minus the bypass otherwise (a convolution inside a residual block).

A *channel* is dimension 1 of the layer's output (``[B, C, ...]``: convolution channels, the features
of a linear layer), zennit-crp's ``ChannelConcept``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import checks as _checks
from .autodiff import grad_of_sum
from .capture import intermediates, resolve_layers

__all__ = ["check_layer", "check_condition", "channel_masks", "layer_relevance", "conditional_relevance"]

RunPass = Callable[[Tensor, Callable, Sequence[Tensor]], Tensor]


def check_layer(fn: str, model_fn: Any, layer: Any, what: str = "layer") -> str:
    """The name of one layer (a dotted name or a submodule of the functionalized model)."""
    if isinstance(layer, (list, tuple, Mapping)):
        raise _checks.type_error(fn, f"{what}, one layer (a dotted name or module)", _checks.describe(layer),
                                 "Relevance is read at one layer per call.")
    names, _ = resolve_layers(fn, model_fn, layer)
    return names[0]


def _channel_id(fn: str, value: Any) -> int:
    if isinstance(value, Tensor) and value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _checks.type_error(fn, "channel ids in condition, ints", _checks.describe(value))
    return value


def check_condition(fn: str, model_fn: Any, condition: Any) -> Tuple[str, List[List[int]], bool]:
    """``condition={layer: channels}`` -> ``(layer name, channel groups, one heatmap without K axis)``.

    ``channels``: an int (one concept, no concept axis), a list / 1-D integer tensor of ``K`` ints (``K``
    concepts of one channel each) or a list of ``K`` lists of ints (``K`` concepts of several channels each).
    """
    if not isinstance(condition, Mapping):
        raise _checks.type_error(fn, "condition, a dict {layer: channel ids}", _checks.describe(condition))
    if len(condition) != 1:
        raise _checks.value_error(fn, "condition with exactly one layer", f"{len(condition)} layers",
                                  "Concepts are conditioned at one layer per call; call once per layer.")
    ((layer, channels),) = condition.items()
    name = check_layer(fn, model_fn, layer, "condition's layer")
    if isinstance(channels, Tensor):
        if channels.is_floating_point() or channels.dtype == torch.bool or channels.ndim > 1:
            raise _checks.type_error(fn, "channel ids in condition, an int, a 1-D integer tensor or a list",
                                     _checks.describe(channels))
        if channels.ndim == 0:
            return name, [[int(channels)]], True
        channels = [int(c) for c in channels.tolist()]
    if isinstance(channels, (int, Tensor)) and not isinstance(channels, bool):
        return name, [[_channel_id(fn, channels)]], True
    if not isinstance(channels, (list, tuple)) or not channels:
        raise _checks.type_error(fn, "channel ids in condition: an int, a non-empty list of ints or of lists of "
                                 "ints, or a 1-D integer tensor", _checks.describe(channels))
    groups: List[List[int]] = []
    for entry in channels:
        if isinstance(entry, (list, tuple)):
            if not entry:
                raise _checks.value_error(fn, "non-empty channel groups in condition", "an empty group")
            groups.append([_channel_id(fn, c) for c in entry])
        else:
            groups.append([_channel_id(fn, entry)])
    return name, groups, False


def channel_masks(fn: str, groups: Sequence[Sequence[int]], like: Tensor) -> Tensor:
    """``[K, 1, C, 1, ...]`` masks of ones on each group's channels, for a layer output shaped as ``like``."""
    if like.ndim < 2:
        raise _checks.value_error(fn, "a conditioned layer whose output has a channel axis [B, C, ...]",
                                  _checks.describe(like))
    channels = like.shape[1]
    bad = [c for group in groups for c in group if not -channels <= c < channels]
    if bad:
        raise _checks.value_error(fn, f"channel ids in condition in [0, {channels}) (the layer's output has "
                                  f"{channels} channels, dimension 1)", f"{bad[0]}")
    masks = torch.zeros((len(groups), channels), dtype=like.dtype, device=like.device)
    for k, group in enumerate(groups):
        masks[k, list(group)] = 1
    return masks.reshape((len(groups), 1, channels) + (1,) * (like.ndim - 2))


def _replaced(model_fn: Callable, name: str, u: Tensor, fn: str, box: Dict[str, Tensor]) -> Callable:
    """``model_fn`` with layer ``name``'s output replaced by ``u``; its own output is left in ``box``."""
    inner = intermediates(model_fn, layers=[name], replace={name: u}, fn=fn)

    def model(params: Any, v: Any) -> Any:
        out, acts = inner(params, v)
        box[name] = acts[name]
        return out

    return model


def layer_relevance(fn: str, model_fn: Callable, x: Tensor, name: str, value: Tensor, run_pass: RunPass) -> Tensor:
    """The relevance at layer ``name``'s output ``[B, *layer output]`` (``value``: that output, from the
    record pass); the backward runs from the output down to the layer only."""

    def score(u: Tensor) -> Tensor:
        copy = u.clone()  # the model may write into the layer's output in place; u itself stays untouched
        return run_pass(x, _replaced(model_fn, name, copy, fn, {}), (copy,))

    return grad_of_sum(score, value)


def conditional_relevance(fn: str, model_fn: Callable, x: Tensor, name: str, value: Tensor, run_pass: RunPass,
                          masks: Tensor) -> Tensor:
    """Input relevance of the layer relevance masked by each of ``masks`` ``[K, 1, C, ...]``: ``[B, K, *x]``."""
    box: Dict[str, Tensor] = {}

    def passes(v: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        copy = u.clone()
        score = run_pass(v, _replaced(model_fn, name, copy, fn, box), (copy,))
        return score, box[name]

    (score, act), pullback = torch.func.vjp(passes, x, value)  # type: ignore[misc]  # 2 values without has_aux
    zero_score, zero_act = torch.zeros_like(score), torch.zeros_like(act)
    _, relevance = pullback((torch.ones_like(score), zero_act))
    if relevance.shape != act.shape:  # pragma: no cover - replace= checks the shape
        raise AssertionError((relevance.shape, act.shape))
    cotangents = relevance.unsqueeze(0) * masks
    heatmaps, _ = torch.func.vmap(lambda c: pullback((zero_score, c)))(cotangents)
    return heatmaps.movedim(0, 1)
