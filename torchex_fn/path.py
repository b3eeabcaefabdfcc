"""Path methods: integrated gradients along the straight line from a baseline to the input."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _checks
from . import targets as _targets
from ._autodiff import grad_of_sum
from ._types import ModelFn, Params, Target
from .propagation import _check_baseline

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
                         baseline: Any = 0.0, steps: int = 50, method: str = "gausslegendre",
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
      x: A batch ``[B, *input]``.
      target: ``None`` (the class predicted for ``x``, not for each path point; costs one extra
        forward of ``x``), int, ``[B]`` ints, or a callable ``out -> [B]``. A callable receives the
        output of one chunk's examples for one path point at a time, in ``x``'s order.
      baseline: The reference input ``x0``: a float, or a float tensor broadcastable to ``x``
        (``[B, *input]``, ``[*input]``, ``[1, *input]``, ...). Default: 0.0 (a black image).
      steps: Number of path points (quadrature nodes), >= 1 (>= 2 for ``riemann_trapezoid``).
        Default: 50, as captum.
      method: ``"gausslegendre"`` (default, as captum), ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``.
      batch_size: Memory cap: the most examples in one forward pass, i.e. ``B`` times the path
        points per chunk. ``None`` (default): one path point for all ``B`` examples per forward,
        since on a CPU the cost per image grows with the batch (DESIGN.md). It never changes the
        result beyond floating-point summation order.

    Returns:
      ``[B, *input]`` attributions on ``x``'s dtype and device.

    Raises:
      TypeError: non-float ``x`` or ``baseline``, a bad ``target``, ``steps`` or ``batch_size`` type.
      ValueError: ``integrated_gradients: expected steps >= 1, got int 0.``; an unknown ``method``;
        a ``baseline`` that does not broadcast to ``x``; NaN; ``target`` out of range.

    Example:
      >>> integrated_gradients(fn, params, images, labels, steps=32).shape     # [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: integrated_gradients(fn, p, images, labels))(stacked)  # [E, 8, 3, 224, 224]

    Cost: ``steps`` forward and backward passes of ``B`` images to the input (``ceil(steps / k)``
      passes of ``k * B`` images with ``k = batch_size // B``), plus one forward for ``target=None``.
      Memory: one forward and backward of ``max(B, batch_size)`` images plus two ``[B, *input]`` tensors.
    References: Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017.
    """
    fn = "integrated_gradients"
    _checks.check_call(fn, model_fn, params, x, target)
    _checks.check_positive_int(fn, "steps", steps)
    if not isinstance(method, str):
        raise _checks.type_error(fn, f"method, one of {METHODS}", _checks.describe(method))
    if method not in METHODS:
        raise _checks.unknown_name(fn, "method", method, METHODS)
    if method == "riemann_trapezoid" and steps < 2:
        raise _checks.value_error(fn, "steps >= 2 for method 'riemann_trapezoid' (both ends of the path)",
                                  _checks.describe(steps))
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    base = _check_baseline(fn, baseline, x)

    batch = x.shape[0]
    cap = batch if batch_size is None else batch_size
    per_forward = max(1, cap // batch)                                   # path points per forward
    groups = [(start, min(start + cap, batch)) for start in range(0, batch, cap)]
    by_index = not (callable(target) and not isinstance(target, Tensor))
    index: Optional[Tensor] = None
    if target is None:  # the class predicted for the input itself
        out = torch.cat([model_fn(params, x[g0:g1]) for g0, g1 in groups])
        index = _targets.resolve_index(out, None, fn=fn)
    elif by_index and isinstance(target, Tensor):
        index = target.to(device=x.device, dtype=torch.long).expand(batch)

    alphas, weights = quadrature(method, steps)
    base = base.expand_as(x)
    delta = x - base
    spatial = (1,) * (x.ndim - 1)
    sums: List[Optional[Tensor]] = [None] * len(groups)
    for first in range(0, steps, per_forward):
        a = torch.tensor(alphas[first:first + per_forward], dtype=x.dtype, device=x.device)
        w = torch.tensor(weights[first:first + per_forward], dtype=x.dtype, device=x.device)
        k = a.shape[0]
        for gi, (g0, g1) in enumerate(groups):
            g_target = target if not isinstance(target, Tensor) and index is None else index[g0:g1]
            points = (base[g0:g1] + a.view(k, 1, *spatial) * delta[g0:g1]).flatten(0, 1)  # [k * g, *input]

            def total(points: Tensor, g_target: Any = g_target, size: int = g1 - g0) -> Tensor:
                out = model_fn(params, points)
                return sum(_targets.resolve(piece, g_target, fn=fn).sum() for piece in out.split(size))

            grads = grad_of_sum(total, points).view(k, g1 - g0, *x.shape[1:])
            part = torch.einsum("k,k...->...", w, grads)
            sums[gi] = part if sums[gi] is None else sums[gi] + part
    return delta * torch.cat(sums)
