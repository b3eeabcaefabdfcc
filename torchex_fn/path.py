"""Path methods: integrated gradients along the straight line from a baseline to the input."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _checks, _inputs
from . import targets as _targets
from ._autodiff import grad_of_sum
from ._types import ModelFn, Params, Target
from .capture import _layer_gradients, intermediates, resolve_layers

__all__ = ["integrated_gradients", "quadrature"]

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> Tuple[List[float], List[float]]:
    """Nodes ``a_k`` in ``[0, 1]`` and weights ``w_k`` of ``integral_0^1 g(a) da ~ sum_k w_k g(a_k)``.

    The conventions are those of captum's ``IntegratedGradients`` for the same ``method`` name:
    Riemann sums use ``steps`` equally weighted points (``1 / steps``) at the left ends
    (``k / steps``), right ends (``(k + 1) / steps``) or midpoints (``(k + 1/2) / steps``) of the
    cells; ``riemann_trapezoid`` puts ``steps`` points on ``[0, 1]`` evenly (both ends included)
    with weights ``1 / steps``, halved at the two ends (so the weights sum to ``1 - 1 / steps``,
    as captum's do); ``gausslegendre`` maps the ``steps``-point Gauss-Legendre rule from
    ``[-1, 1]`` to ``[0, 1]``. Nodes are exact in float64 (captum rounds its Riemann nodes and all
    weights through float32).
    """
    n = steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return [0.5 * (1.0 + a) for a in nodes.tolist()], [0.5 * w for w in weights.tolist()]
    if method == "riemann_trapezoid":
        weights = [1.0 / n] * n
        weights[0] /= 2
        weights[-1] /= 2
        return [k / (n - 1) for k in range(n)], weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return [(k + offset) / n for k in range(n)], [1.0 / n] * n


def integrated_gradients(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
                         layer: Any = None, baseline: Any = 0.0, steps: int = 50, method: str = "gausslegendre",
                         batch_size: Optional[int] = None) -> Tensor:
    """Integrated gradients: ``(x - x0) * integral_0^1 d f(x0 + a (x - x0)) / dx da``.

    The integral is replaced by a quadrature rule ``sum_k w_k grad f(x0 + a_k (x - x0))`` whose
    nodes and weights are those of captum's ``IntegratedGradients`` with the same ``method`` and
    ``n_steps`` (see :func:`quadrature`). By the fundamental theorem of calculus, the map sums to
    ``f(x) - f(x0)`` per example up to the quadrature error ("completeness"); check it to choose
    ``steps``. The path points are evaluated in chunks: every forward pass holds some path points
    for all ``B`` examples (or, when ``B > batch_size``, one point for ``batch_size`` examples).
    Gradients flow to ``params``, ``x`` and a tensor ``baseline``: the map is an ordinary
    differentiable function (``torch.func.grad`` of a loss on it w.r.t. ``params`` works).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, or a dict of named inputs batch first (the path runs in its one
        floating-point entry; the other entries are the same at every path point). With ``layer``,
        ``x`` may be integer token ids or a tokenizer's dict.
      target: ``None`` (the class predicted for ``x``, not for each path point; costs one extra
        forward of ``x``), int, ``[B]`` ints, or a callable ``out -> [B]``. A callable receives the
        output of one chunk's examples for one path point at a time, in ``x``'s order.
      layer: Attribute to this layer's output (a dotted name or module, or a list / dict of them),
        as captum's ``LayerIntegratedGradients``: the path runs from the layer's output on the
        baseline input to its output on ``x``, each path point replacing the layer's output in a
        forward of ``x``; the map has the layer output's shape and sums to ``f(x) - f(x0)``.
        Default: None (the input).
      baseline: The reference input ``x0``, always in the input's space: a float, or a float tensor
        broadcastable to ``x`` (``[B, *input]``, ``[*input]``, ``[1, *input]``, ...); for integer
        ``x`` reference token ids (an int or an integer tensor); for a dict ``x`` a dict of the
        entries to replace, or a number / tensor for the attributed entry (with ``layer``, the
        dict's first entry, ``input_ids`` in a tokenizer's output). Default: 0.0 (a black image).
      steps: Number of path points (quadrature nodes), >= 1 (>= 2 for ``riemann_trapezoid``).
        Default: 50, as captum.
      method: ``"gausslegendre"`` (default, as captum), ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``.
      batch_size: Memory cap: the most examples in one forward pass, i.e. ``B`` times the path
        points per chunk. ``None`` (default): one path point for all ``B`` examples per forward,
        since on a CPU the cost per image grows with the batch (DESIGN.md). It never changes the
        result beyond floating-point summation order.

    Returns:
      ``[B, *input]`` attributions on ``x``'s dtype and device (the layer output's shape, or
      ``layer``'s structure of them, with ``layer``).

    Raises:
      TypeError: non-float ``x`` without ``layer`` (the hint names ``layer=``) or a baseline of the
        wrong kind, a bad ``target``, ``steps`` or ``batch_size`` type.
      ValueError: ``integrated_gradients: expected steps >= 1, got int 0.``; an unknown ``method``;
        a ``baseline`` that does not broadcast to ``x``; NaN; ``target`` out of range.

    Example:
      >>> integrated_gradients(fn, params, images, labels, steps=32).shape     # [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: integrated_gradients(fn, p, images, labels))(stacked)  # [E, 8, 3, 224, 224]

    Cost: ``steps`` forward and backward passes of ``B`` images to the input (``ceil(steps / k)``
      passes of ``k * B`` images with ``k = batch_size // B``), plus one forward for ``target=None``.
      With ``layer``: two more forwards (the layer's output on ``x`` and on the baseline, the first
      also giving ``target=None``'s class), and backward passes to the layer only.
      Memory: one forward and backward of ``max(B, batch_size)`` images plus two ``[B, *input]`` tensors.
    References: Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    fn = "integrated_gradients"
    _checks.check_call(fn, model_fn, params, x, target, layer=layer)
    _checks.check_positive_int(fn, "steps", steps)
    if not isinstance(method, str):
        raise _checks.type_error(fn, f"method, one of {METHODS}", _checks.describe(method))
    if method not in METHODS:
        raise _checks.unknown_name(fn, "method", method, METHODS)
    if method == "riemann_trapezoid" and steps < 2:
        raise _checks.value_error(fn, "steps >= 2 for method 'riemann_trapezoid' (both ends of the path)",
                                  _checks.describe(steps))
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    output = _targets.selector(model_fn)
    key = None if layer is not None or isinstance(x, Tensor) else _inputs.attributed_key(fn, x)
    base_input = _inputs.baseline_input(fn, baseline, x, key)

    batch = _inputs.batch_of(x)
    cap = batch if batch_size is None else batch_size
    per_forward = max(1, cap // batch)                                   # path points per forward
    groups = [(start, min(start + cap, batch)) for start in range(0, batch, cap)]
    index: Optional[Tensor] = None
    if layer is None:
        # The path runs in the input's space (x, or its floating-point entry).
        names, rebuild = ["input"], (lambda values: values["input"])
        ends = {"input": x if key is None else x[key]}
        starts = {"input": base_input if key is None else base_input[key]}
        if target is None:  # the class predicted for the input itself
            out = [model_fn(params, _inputs.take(x, g0, g1)) for g0, g1 in groups]
            index = torch.cat([_targets.resolve_index(o, None, fn=fn, output=output) for o in out])

        def gradients(points: Dict[str, Tensor], xs: Any, g_target: Any) -> Dict[str, Tensor]:
            def total(v: Tensor) -> Tensor:
                return _targets.resolve(model_fn(params, _inputs.replace(xs, key, v)), g_target, fn=fn,
                                        output=output).sum()
            return {"input": grad_of_sum(total, points["input"])}
    else:
        # The path runs between the layers' outputs on the baseline and on the input (captum's
        # LayerIntegratedGradients): each path point replaces the layers' outputs in a forward of x.
        names, rebuild = resolve_layers(fn, model_fn, layer)
        names = list(dict.fromkeys(names))
        out_x, ends = intermediates(model_fn, layers=names, fn=fn)(params, x)
        _, starts = intermediates(model_fn, layers=names, fn=fn)(params, base_input)
        if target is None:
            index = _targets.resolve_index(out_x, None, fn=fn, output=output)
        del out_x

        def gradients(points: Dict[str, Tensor], xs: Any, g_target: Any) -> Dict[str, Tensor]:
            return _layer_gradients(model_fn, params, xs, g_target, names, fn, replace=points).grads
    if index is None and isinstance(target, Tensor):
        index = target.to(device=_inputs.device_of(x), dtype=torch.long).expand(batch)

    alphas, weights = quadrature(method, steps)
    deltas = {n: ends[n] - starts[n] for n in names}
    sums: Dict[str, List[Tensor]] = {n: [] for n in names}
    for gi, (g0, g1) in enumerate(groups):
        size = g1 - g0
        acc: Dict[str, Optional[Tensor]] = {n: None for n in names}
        for first in range(0, steps, per_forward):
            k = len(alphas[first:first + per_forward])
            points = {}
            for n in names:
                ref = ends[n]
                a = torch.tensor(alphas[first:first + k], dtype=ref.dtype, device=ref.device)
                spatial = (1,) * (ref.ndim - 1)
                points[n] = (starts[n][g0:g1] + a.view(k, 1, *spatial) * deltas[n][g0:g1]).flatten(0, 1)
            g_target = _targets.for_blocks(target, k, size, None if index is None else index[g0:g1])
            grads = gradients(points, _inputs.repeat(_inputs.take(x, g0, g1), k), g_target)
            for n in names:
                ref = ends[n]
                w = torch.tensor(weights[first:first + k], dtype=ref.dtype, device=ref.device)
                part = torch.einsum("k,k...->...", w, grads[n].view(k, size, *ref.shape[1:]))
                acc[n] = part if acc[n] is None else acc[n] + part
        for n in names:
            sums[n].append(acc[n])
    return rebuild({n: deltas[n] * torch.cat(sums[n]) for n in names})
