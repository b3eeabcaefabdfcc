"""Concepts (channels of a layer) and their relevance: concept relevance propagation (CRP) around ``lrp``.

CRP (Achtibat et al., Nature Machine Intelligence 2023; reference package zennit-crp) treats the
channels of a layer as *concepts*. Three questions, three functions of this module:

* how relevant is each concept for this prediction: :func:`relevance` (``[B, C]``, the relevance at
  the layer summed over positions);
* where in the input is a concept: ``tx.lrp(..., condition={layer: channels})`` (concept heatmaps,
  see :func:`torchex_fn.lrp`);
* what does a concept look like: :func:`reference_samples` ranks the examples of a data set by a
  channel's relevance (relevance maximisation) or activation (activation maximisation), zennit-crp's
  ``FeatureVisualization`` without its files on disk.

A second meaning of *concept*, a set of example inputs, is TCAV's (Kim et al., ICML 2018): :func:`cav`
(a concept activation vector, from :mod:`torchex_fn.composite.tcav`), :func:`tcav` (TCAV scores and the
test against random concepts) and :func:`ttest` are re-exported here.

The conventions are zennit-crp's (``ChannelConcept``): a channel is dimension 1 of the layer's
output; a channel's value per example is the sum (or the max) over the other dimensions; with
``normalize=True`` the values of one example are divided by the sum of their absolute values over all
channels of the layer (zennit-crp's ``abs_norm``, ``+ 1e-10``), so that examples with large and small
scores rank alike.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ..core import checks as _checks
from ..core import targets as _targets
from ..core.capture import capture, layer_shapes, resolve_layers
from ..methods.lrp import lrp
from .tcav import CAV, TCAV, TTest, cav, tcav, ttest

__all__ = ["relevance", "reference_samples", "ReferenceSamples", "cav", "tcav", "ttest", "CAV", "TCAV", "TTest"]

_MODES = ("relevance", "activation")
_REDUCE = ("sum", "max")


def _reduce(values: Tensor, how: str) -> Tensor:
    """``[B, C, ...] -> [B, C]``: sum or max over every dimension after the channel's."""
    flat = values.reshape(values.shape[0], values.shape[1], -1)
    return flat.sum(-1) if how == "sum" else flat.amax(-1)


def _normalized(values: Tensor) -> Tensor:
    return values / (values.abs().sum(-1, keepdim=True) + 1e-10)


def relevance(model_fn: Any, params: Any, x: Tensor, target: Any = None, *, layer: Any,
              composite: str = "epsilon_plus_flat", normalize: bool = False, **options: Any) -> Tensor:
    """Each channel's relevance at a layer: ``[B, C]``, the layer relevance of :func:`torchex_fn.lrp`
    (``layer=``) summed over every dimension but the batch and the channel (dimension 1).

    Where every path from the input to the output passes through the layer and the rules conserve,
    the channels' relevances sum to the input relevance (zennit-crp's ``ChannelConcept().attribute``
    with ``abs_norm=False``; ``normalize=True`` is its ``abs_norm=True``).

    Args:
      model_fn: From ``functionalize(model)`` (rules are assigned to its modules, see ``lrp``).
      params: The model's parameters, name -> tensor.
      x: Floating-point input batch ``[B, ...]``.
      target: The explained output, as for ``lrp`` (None: the predicted class).
      layer: The layer (dotted name or submodule) whose channels are the concepts.
      composite: The LRP composite (``lrp``'s names). Default: ``"epsilon_plus_flat"`` (zennit-crp's
        ``EpsilonPlusFlat`` in its examples).
      normalize: Divide each example's values by their absolute sum over channels (``+ 1e-10``).
        Default: False.
      **options: Further options of ``lrp`` (``epsilon``, ``gamma``, ``canonize``, ``rules``, ...).

    Returns:
      ``[B, C]`` on ``x``'s device and dtype.

    Example:
      >>> fn, params = tx.functionalize(vgg.eval())
      >>> tx.concepts.relevance(fn, params, images, labels, layer="features.15").topk(5).indices  # [B, 5]
    """
    _checks.check_bool("concepts.relevance", "normalize", normalize)
    if "condition" in options:
        raise _checks.type_error("concepts.relevance", "lrp options without condition=", "condition=",
                                 "Concept heatmaps come from tx.lrp(..., condition={layer: channels}).")
    layer_relevance = lrp(model_fn, params, x, target, layer=layer, composite=composite, **options)
    if layer_relevance.ndim < 2:  # pragma: no cover - lrp returns [B, ...]
        raise AssertionError(layer_relevance.shape)
    values = _reduce(layer_relevance, "sum")
    return _normalized(values) if normalize else values


class ReferenceSamples(NamedTuple):
    """What :func:`reference_samples` returns: per channel, the top ``k`` examples, best first."""

    indices: Tensor   # [K, k] int64: positions in the data set
    values: Tensor    # [K, k]: the channel's (reduced, normalised) relevance or activation there
    channels: Tensor  # [K] int64: the channels, in the order of the rows


def _channel_list(fn: str, channels: Any) -> Optional[list]:
    if channels is None:
        return None
    if isinstance(channels, Tensor):
        if channels.is_floating_point() or channels.dtype == torch.bool or channels.ndim > 1:
            raise _checks.type_error(fn, "channels, an int, a list of ints or a 1-D integer tensor",
                                     _checks.describe(channels))
        return [int(c) for c in channels.reshape(-1).tolist()]
    if isinstance(channels, int) and not isinstance(channels, bool):
        return [channels]
    if (not isinstance(channels, (list, tuple)) or not channels
            or any(isinstance(c, bool) or not isinstance(c, int) for c in channels)):
        raise _checks.type_error(fn, "channels, an int, a non-empty list of ints or a 1-D integer tensor",
                                 _checks.describe(channels))
    return list(channels)


def reference_samples(model_fn: Any, params: Any, data: Any, *, layer: Any, channels: Any = None,
                      mode: str = "relevance", k: int = 8, batch_size: int = 32, reduce: Optional[str] = None,
                      normalize: bool = True, composite: str = "epsilon_plus_flat",
                      **options: Any) -> ReferenceSamples:
    """Rank the examples of a data set by a channel's relevance or activation: the top ``k`` per channel.

    zennit-crp's ``FeatureVisualization`` (relevance maximisation, ``mode="relevance"``, and activation
    maximisation, ``mode="activation"``), in memory: the data is read in chunks of ``batch_size``, each
    chunk gives every example's value per channel (``[B, C]``), and a running top ``k`` per channel
    keeps the best examples seen so far. Relevance is ``lrp``'s at the layer (``layer=``) for each
    example's own target; activation is the layer's output in a plain forward pass (no gradient).

    Args:
      model_fn: From ``functionalize(model)``.
      params: The model's parameters, name -> tensor; their device is where the chunks are computed.
      data: A map-style ``Dataset`` of ``(input, int target)`` pairs (``-1``: the predicted class) or
        a ``DataLoader`` over one (its dataset and ``collate_fn`` are used), as ``attribute_dataset``
        takes; or a tensor ``[N, ...]`` of inputs (targets: the predicted classes).
      layer: The layer whose channels are ranked.
      channels: The channels to rank (an int, a list or a 1-D integer tensor); None: all of them.
      mode: ``"relevance"`` (default) or ``"activation"``.
      k: Examples kept per channel. Default: 8 (fewer if the data set is smaller).
      batch_size: Examples per chunk. Default: 32.
      reduce: A channel's value per example from its positions: ``"sum"`` or ``"max"``. Default: ``"sum"``
        for relevance (zennit-crp's ``max_target="sum"``), ``"max"`` for activation (a channel fires
        somewhere). zennit-crp's ``FeatureVisualization`` uses one ``max_target`` for both (default
        ``"sum"``): pass ``reduce="sum"`` to rank activations as it does.
      normalize: Divide each example's values by their absolute sum over all channels of the layer
        before ranking (zennit-crp's ``abs_norm=True``, its default). Default: True.
      composite: The LRP composite for ``mode="relevance"``. Default: ``"epsilon_plus_flat"``.
      **options: Further options of ``lrp`` for ``mode="relevance"``.

    Returns:
      :class:`ReferenceSamples` ``(indices [K, k], values [K, k], channels [K])``, best first, on the CPU.

    Raises:
      TypeError: bad ``data``, ``channels`` or option types.
      ValueError: an unknown ``mode`` or ``reduce``, a channel out of range, an unknown layer.

    Example:
      >>> best = tx.concepts.reference_samples(fn, params, dataset, layer="features.15", channels=[3, 7], k=9)
      >>> best.indices.shape                      # [2, 9]: dataset positions of the 9 top examples per channel

    Why not ``attribute_dataset``: it stores every example's map on disk to be read back later; here
    each example reduces to one number per channel at once, and only a running top ``k`` is kept. The
    same data conventions (pairs, ``-1``, a ``DataLoader``'s ``collate_fn``) are reused from it.
    """
    fn = "concepts.reference_samples"
    if not isinstance(mode, str) or mode not in _MODES:
        raise _checks.value_error(fn, f"mode one of {', '.join(repr(m) for m in _MODES)}", _checks.describe(mode))
    how = reduce if reduce is not None else ("sum" if mode == "relevance" else "max")
    if not isinstance(how, str) or how not in _REDUCE:
        raise _checks.value_error(fn, f"reduce one of {', '.join(repr(r) for r in _REDUCE)} or None",
                                  _checks.describe(reduce))
    _checks.check_positive_int(fn, "k", k)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "normalize", normalize)
    _checks.check_model_fn(fn, model_fn)
    wanted = _channel_list(fn, channels)
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(names) != 1 or isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one layer (a dotted name or module)", _checks.describe(layer))
    device = next((t.device for t in params.values() if isinstance(t, Tensor)), torch.device("cpu"))
    chunks = _chunks(fn, data, batch_size)
    best_values: Optional[Tensor] = None
    best_indices: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    start = 0
    for x, target in chunks:
        x = x.to(device)
        if rows is None:  # the channels, checked before the first chunk's relevance
            count = layer_shapes(model_fn, params, x, (names[0],), fn)[names[0]][0]
            if len(count) < 2:
                raise _checks.value_error(fn, "a layer whose output has a channel axis [B, C, ...]",
                                          f"an output of shape {tuple(count)}")
            picked = list(range(count[1])) if wanted is None else wanted
            bad = [c for c in picked if not 0 <= c < count[1]]
            if bad:
                raise _checks.value_error(fn, f"channels in [0, {count[1]}) (the layer's output has {count[1]} "
                                          "channels)", str(bad[0]))
            rows = torch.tensor(picked, dtype=torch.long)
        if mode == "relevance":
            if target is not None and bool((target < 0).any()):  # -1: the predicted class
                with torch.no_grad():
                    logits = _targets.select_output(model_fn(params, x), _targets.selector(model_fn), fn=fn)
                target = torch.where(target < 0, logits.argmax(1).to("cpu"), target)
            values = _reduce(lrp(model_fn, params, x, target if target is None else target.to(device),
                                 layer=layer, composite=composite, **options).detach(), how)
        else:
            with torch.no_grad():
                _, act = capture(model_fn, params, x, names[0])
            values = _reduce(act, how)
        if normalize:
            values = _normalized(values)
        chunk = values[:, rows.to(values.device)].T.to("cpu")                    # [K, b]
        index = torch.arange(start, start + chunk.shape[1], dtype=torch.long).expand(chunk.shape[0], -1)
        start += chunk.shape[1]
        if best_values is None or best_indices is None:
            pool_values, pool_indices = chunk, index
        else:
            pool_values, pool_indices = torch.cat([best_values, chunk], 1), torch.cat([best_indices, index], 1)
        top = pool_values.topk(min(k, pool_values.shape[1]), dim=1)
        best_values, best_indices = top.values, pool_indices.gather(1, top.indices)
    if best_values is None or best_indices is None or rows is None:
        raise _checks.value_error(fn, "a data set with at least one example", "an empty one")
    return ReferenceSamples(best_indices, best_values, rows)


def _chunks(fn: str, data: Any, batch_size: int):
    """``(x, target or None)`` per chunk of ``batch_size`` consecutive examples (``-1``: predicted class)."""
    if isinstance(data, Tensor):
        if not data.is_floating_point():
            raise _checks.type_error(fn, "data, a floating-point tensor [N, ...] or a Dataset of (input, target)",
                                     _checks.describe(data))
        for s in range(0, data.shape[0], batch_size):
            yield data[s:s + batch_size], None
        return
    collate: Any = None
    if isinstance(data, DataLoader):
        collate, data = data.collate_fn, data.dataset
    if isinstance(data, IterableDataset) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise _checks.type_error(fn, "data, a tensor [N, ...], a map-style Dataset of (input, target) pairs or a "
                                 "DataLoader over one", _checks.describe(data),
                                 "Examples are ranked by their position in the data set.")
    dataset = data
    n = len(dataset)
    sampler: List[List[int]] = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    loader = (DataLoader(dataset, batch_sampler=sampler) if collate is None
              else DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    for item in loader:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise _checks.type_error(fn, "data items that are (input, target) pairs",
                                     f"a batch of {_checks.describe(item)}")
        x, t = item
        rows = x.shape[0] if isinstance(x, Tensor) else -1
        if (not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool
                or tuple(t.shape) != (rows,)):
            raise _checks.type_error(fn, f"integer class targets, collated to a tensor of shape [{rows}]",
                                     _checks.describe(t), "Each example is (input, target) with an int target; "
                                     "use -1 for the predicted class.")
        t = t.to(torch.long)
        yield x, (None if bool((t < 0).all()) else t)
