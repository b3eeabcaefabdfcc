"""Path methods: integrated gradients along the straight line from a baseline to the input."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import math

import torch
from torch import Tensor

from ..core import checks as _checks, inputs as _inputs
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.autodiff import grad_of_sum, staged_grads, untracked
from ..core.types import ModelFn, Params, Target
from ..core.capture import intermediates, layer_gradients, resolve_layers
from ..core.arguments import check_call

__all__ = ["integrated_gradients", "gradient_shap", "quadrature", "layer_conductance", "internal_influence",
           "neuron_conductance"]

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _gauss_legendre(n: int) -> Tuple[List[float], List[float]]:
    """The ``n``-point Gauss-Legendre rule on ``[-1, 1]``: nodes (ascending) and weights, in float64.

    Newton's method on the Legendre polynomial ``P_n`` (three-term recurrence) from the usual
    starting points ``cos(pi (i - 1/4) / (n + 1/2))``; agrees with ``numpy.polynomial.legendre.leggauss``
    to rounding. Plain Python on numbers, so that ``torch.compile`` folds it into constants (it cannot
    trace numpy's function, which would break the graph).
    """
    nodes, weights = [], []
    for i in range(1, n + 1):
        z = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        slope = 1.0
        for _ in range(100):
            p1, p2 = 1.0, 0.0
            for j in range(1, n + 1):  # p1 = P_j(z), p2 = P_{j-1}(z)
                p1, p2 = ((2 * j - 1) * z * p1 - (j - 1) * p2) / j, p1
            slope = n * (z * p1 - p2) / (z * z - 1.0)  # P_n'(z)
            step = p1 / slope
            z -= step
            if abs(step) <= 1e-16:
                break
        p1, p2 = 1.0, 0.0
        for j in range(1, n + 1):  # the slope at the final node, for its weight
            p1, p2 = ((2 * j - 1) * z * p1 - (j - 1) * p2) / j, p1
        slope = n * (z * p1 - p2) / (z * z - 1.0)
        nodes.append(z)
        weights.append(2.0 / ((1.0 - z * z) * slope * slope))
    return nodes[::-1], weights[::-1]


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
        nodes, weights = _gauss_legendre(n)
        return [0.5 * (1.0 + a) for a in nodes], [0.5 * w for w in weights]
    if method == "riemann_trapezoid":
        weights = [1.0 / n] * n
        weights[0] /= 2
        weights[-1] /= 2
        return [k / (n - 1) for k in range(n)], weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    return [(k + offset) / n for k in range(n)], [1.0 / n] * n


@_docs.fill
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
      {model_fn}
      {params}
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
        points per chunk. ``None`` (default): as many path points per forward as the input's size
        allows, all ``steps`` for a table or a sentence (as captum's default), one for images on a
        CPU: up to 2^20 elements of the path's tensor per forward on a CPU (``_inputs.CPU_ELEMENTS``,
        ~7 images of 224 x 224), beyond which the cost per image grows (resnet18: 64 images per
        forward cost 1.37x per image what 8 cost), and 2^24 on other devices
        (``_inputs.DEVICE_ELEMENTS``). A given cap is also kept within 2^20 elements on a CPU. It
        never changes the result beyond floating-point summation order.

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
    target = check_call(fn, model_fn, params, x, target, layer=layer)
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
    groups = [(start, min(start + cap, batch)) for start in range(0, batch, cap)]
    index: Optional[Tensor] = None
    if layer is None:
        # The path runs in the input's space (x, or its floating-point entry).
        names, rebuild = ["input"], (lambda values: values["input"])
        ends: Dict[str, Any] = {"input": x if key is None else x[key]}
        starts: Dict[str, Any] = {"input": base_input if key is None else base_input[key]}
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
            return layer_gradients(model_fn, params, xs, g_target, layers=names, fn=fn, replace=points).grads
    if index is None and isinstance(target, Tensor):
        index = target.to(device=_inputs.device_of(x), dtype=torch.long, non_blocking=True).expand(batch)

    alphas, weights = quadrature(method, steps)
    # Nodes and weights reach the device once per call and per dtype (a non-blocking copy: a
    # torch.tensor(list, device=cuda) per chunk would wait for the device each time).
    table = torch.tensor([alphas, weights], dtype=torch.float64)
    on_device = {(e.dtype, e.device): table.to(device=e.device, dtype=e.dtype, non_blocking=True)
                 for e in ends.values()}
    # path points per forward: batch_size's, or by default all that fit the input's size (core.inputs)
    per_forward = min(_inputs.copies_per_forward(cap, batch, ends[n]) if batch_size is not None
                      else _inputs.default_copies(steps, batch, ends[n]) for n in names)
    deltas = {n: ends[n] - starts[n] for n in names}
    sums: Dict[str, List[Tensor]] = {n: [] for n in names}
    for g0, g1 in groups:
        size = g1 - g0
        acc: Dict[str, Any] = {n: None for n in names}
        # Without a layer the path point replaces all of x (or its one float entry, which _inputs.replace
        # puts into a fresh dict): the other entries repeat only for a dict x.
        xs_of = (lambda k: None) if layer is None and key is None else (
            lambda k, g0=g0, g1=g1: _inputs.repeat(_inputs.take(x, g0, g1), k))
        for first in range(0, steps, per_forward):
            k = len(alphas[first:first + per_forward])
            points = {}
            for n in names:
                ref = ends[n]
                a = on_device[ref.dtype, ref.device][0, first:first + k]
                spatial = (1,) * (ref.ndim - 1)
                # starts + a * deltas in one pass
                points[n] = torch.addcmul(starts[n][g0:g1], a.view(k, 1, *spatial), deltas[n][g0:g1]).flatten(0, 1)
            g_target = _targets.for_blocks(target, k, size, None if index is None else index[g0:g1])
            grads = gradients(points, xs_of(k), g_target)
            for n in names:
                ref = ends[n]
                if k == 1:  # one weighted pass: acc + w * g
                    g = grads[n]
                    acc[n] = g * weights[first] if acc[n] is None else torch.add(acc[n], g, alpha=weights[first])
                    continue
                w = on_device[ref.dtype, ref.device][1, first:first + k]
                part = torch.einsum("k,k...->...", w, grads[n].view(k, size, *ref.shape[1:]))
                acc[n] = part if acc[n] is None else acc[n] + part
        for n in names:
            sums[n].append(acc[n])
    return rebuild({n: deltas[n] * torch.cat(sums[n]) for n in names})


# --------------------------------------------------------------------------------------------
# GradientSHAP: expected gradients on random points between random baselines and noisy inputs.

def _shap_baselines(fn: str, baselines: Any, x: Any, layer: Any) -> Dict[Optional[str], Tensor]:
    """``{entry: [N, ...]}``: the baselines' distribution for each replaced entry of ``x`` (``None``: ``x``)."""
    if isinstance(x, Tensor):
        chosen: Dict[Optional[str], Any] = {None: baselines}
    elif isinstance(baselines, Mapping):
        unknown = [k for k in baselines if k not in x or not isinstance(x[k], Tensor)]
        if unknown:
            raise _checks.unknown_name(fn, "baselines entry", str(unknown[0]),
                                       [k for k, v in x.items() if isinstance(v, Tensor)])
        if not baselines:
            raise _checks.value_error(fn, "baselines with at least one entry", "an empty dict")
        chosen = dict(baselines)
    else:
        floats = [k for k, v in x.items() if isinstance(v, Tensor) and v.is_floating_point()]
        key = (_inputs.attributed_key(fn, x) if floats or layer is None
               else next(k for k, v in x.items() if isinstance(v, Tensor)))
        chosen = {key: baselines}
    out: Dict[Optional[str], Tensor] = {}
    count = None
    for key, base in chosen.items():
        value = x if key is None else x[key]
        name = "baselines" if key is None else f"baselines[{key!r}]"
        shape = f"[N, {', '.join(map(str, value.shape[1:]))}]"
        if not isinstance(base, Tensor):
            raise _checks.type_error(fn, f"{name}, a tensor {shape} of reference inputs (N >= 1)",
                                     _checks.describe(base), "One baseline is `baseline[None]`.")
        if base.is_floating_point() != value.is_floating_point() or base.is_complex():
            kind = "a floating-point" if value.is_floating_point() else "an integer (reference token ids)"
            raise _checks.type_error(fn, f"{name} of {kind} dtype like the input {value.dtype}", _checks.describe(base))
        if base.ndim != value.ndim or base.shape[1:] != value.shape[1:] or base.shape[0] < 1:
            raise _checks.value_error(fn, f"{name} of shape {shape} (a distribution of N >= 1 reference inputs)",
                                      _checks.describe(base), "One baseline is `baseline[None]`.")
        if count is not None and base.shape[0] != count:
            raise _checks.value_error(fn, "every baselines entry with the same N", f"{count} and {base.shape[0]}")
        count = base.shape[0]
        if base.is_floating_point():
            _checks.check_values(fn, torch.isnan(base), f"{name} without NaN",
                                 lambda base=base: f"{int(torch.isnan(base).sum())} NaN values")
        out[key] = base.to(device=value.device, dtype=value.dtype)
    return out


def _column(a: Tensor, ndim: int) -> Tensor:
    return a.view(a.shape[0], *([1] * (ndim - 1)))


@_docs.fill
def gradient_shap(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, baselines: Any,
                  samples: int = 5, stdev: float = 0.0, generator: Optional[torch.Generator] = None,
                  batch_size: Optional[int] = None, layer: Any = None) -> Any:
    """GradientSHAP: gradients at random points between random baselines and noisy inputs, times the difference.

    For each of ``S = samples`` draws: a baseline ``b_s`` picked uniformly from ``baselines``, a point
    ``t_s ~ U(0, 1)`` on the path and Gaussian noise ``eps_s ~ N(0, stdev^2)`` on the input, then::

        v_s = x + eps_s,   A = (1 / S) sum_s (v_s - b_s) * d f(b_s + t_s (v_s - b_s)) / d v

    as captum's ``GradientShap`` (which draws per example; here each draw is shared by the examples of
    the batch, so that a batch gives the maps of its examples one at a time, whatever ``batch_size``).
    In expectation (``stdev = 0``) it is integrated gradients averaged over the baselines' distribution
    (expected gradients, Erion et al.), so ``sum(A) ~ f(x) - E_b f(b)``; on a linear model every draw
    gives ``(v_s - b_s) * w`` exactly, and with one baseline and ``stdev = 0``, ``(x - b) * w``.

    With ``layer`` (captum's ``LayerGradientShap``): the differences and path points are taken in the
    layer's output space, ``a(v_s) - a(b_s)`` times the gradient at ``a(b_s) + t_s (a(v_s) - a(b_s))``
    (that point replacing the layer's output in a forward of ``v_s``), as :func:`integrated_gradients`
    does with ``layer``; captum interpolates the inputs instead, which agrees when the layer is affine
    in the input (a first convolution, an embedding's sum) and is impossible for token ids. For token
    ids (an integer ``x`` or a dict without a float entry) the noise is added to the layer's output on
    ``x`` (noise on ids has no meaning), so ``stdev`` is then in the layer's units.

    Args:
      {model_fn}
      {params}
      x: A batch ``[B, *input]``, or a dict of named inputs batch first (noise and path run in its one
        floating-point entry; other entries follow their example). With ``layer``, token ids too.
      target: ``None`` (the class predicted for ``x``: one extra forward), int, ``[B]`` ints (indexing
        the tensor ``functionalize(model, output=)`` chooses), or a callable ``out -> [g]`` receiving
        the raw output of one chunk's ``g`` examples for one draw at a time, in ``x``'s order.
      baselines: The reference distribution, ``[N, *input]`` with ``N >= 1`` (integer ids ``[N, T]``
        for token ids). For a dict ``x``: a tensor for its floating-point entry (with ``layer`` and no
        float entry, for its first entry, ``input_ids`` in a tokenizer's output), or a dict of such
        tensors for the entries to replace.
      samples: ``S``, the number of draws per example, >= 1. Default: 5 (captum's ``n_samples``).
      stdev: Standard deviation of the input noise, >= 0, absolute (captum's ``stdevs``). Default: 0.
      generator: The only source of randomness; per draw, in this order: the baseline index
        (``randint``), the path point (``rand``) and the noise (``randn`` of one example's shape, or of
        each layer's output shape for token ids). The same seed gives the same map. Default: None.
      batch_size: Memory cap: the most examples in one forward, ``B`` times the draws per forward
        (one draw of ``batch_size`` examples when ``B > batch_size``). Default: None (as many draws
        of all ``B`` examples per forward as the input's size allows, as :func:`integrated_gradients`).
      layer: Attribute to this layer's output (a dotted name or module, or a list / dict of them; the
        result mirrors it). Default: None (the input).

    Returns:
      ``[B, *input]`` attributions (of the floating-point entry for a dict ``x``; the layer output's
      shape, or ``layer``'s structure of them, with ``layer``), on ``x``'s dtype and device.

    Raises:
      TypeError: non-float ``x`` without ``layer``; ``baselines`` not a tensor, or of the wrong kind
        (float for token ids); bad option types.
      ValueError: ``gradient_shap: expected baselines of shape [N, 3, 8, 8] ...``; ``samples`` < 1;
        a negative ``stdev``; NaN; a target out of range.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> gradient_shap(fn, params, images, labels, baselines=torch.zeros(1, 3, 224, 224), samples=20,
      ...               stdev=0.1, generator=g).shape                           # [8, 3, 224, 224]
      >>> gradient_shap(bert_fn, bert_params, tokens, 1, baselines=pad_ids[None], layer="bert.embeddings")

    Cost: ``samples`` forward and backward passes of ``B`` examples (to the input, or to the layer),
      in ``ceil(samples / k)`` passes of ``k * B`` with ``k = batch_size // B``; with ``layer`` two more
      forwards per draw (the layer's output on the noisy input and on the baseline; one for token ids),
      plus one forward for ``target=None``.
    References: Lundberg and Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017;
      Erion et al., "Improving performance of deep learning models with axiomatic attribution priors
      and expected gradients", 2021.
    """
    fn = "gradient_shap"
    target = check_call(fn, model_fn, params, x, target, layer=layer)
    _checks.check_positive_int(fn, "samples", samples)
    if isinstance(stdev, bool) or not isinstance(stdev, (int, float)):
        raise _checks.type_error(fn, "stdev, a float >= 0", _checks.describe(stdev))
    if not stdev >= 0.0:
        raise _checks.value_error(fn, "stdev >= 0", _checks.describe(stdev))
    _checks.check_generator(fn, generator)
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    entries = _shap_baselines(fn, baselines, x, layer)
    count = next(iter(entries.values())).shape[0]
    key, value = _inputs.noised_entry("gradient_shap", x)
    device = _inputs.device_of(x)
    names = None if layer is None else list(dict.fromkeys(resolve_layers(fn, model_fn, layer)[0]))
    shapes: Dict[Any, Tuple[torch.Size, torch.dtype]] = {}
    if value is not None:
        shapes["input"] = (value.shape[1:], value.dtype)

    def draw(k: int, batch: int):
        """``k`` draws shared by the ``batch`` examples: indices ``[k, B]``, points ``[k, B]``, noise."""
        index: List[Tensor] = []
        alpha: List[Tensor] = []
        noise: Dict[Any, List[Tensor]] = {n: [] for n in shapes}
        dtype = next(iter(shapes.values()))[1]
        with _checks.draws(fn, generator):      # under vmap: every member gets the generator's draws
            for _ in range(k):
                index.append(torch.randint(count, (), generator=generator, device=device))
                alpha.append(torch.rand((), generator=generator, dtype=dtype, device=device))
                for n, (shape, n_dtype) in shapes.items():
                    noise[n].append(torch.randn(shape, generator=generator, dtype=n_dtype, device=device))
        return (torch.stack(index)[:, None].expand(k, batch), torch.stack(alpha)[:, None].expand(k, batch),
                {n: torch.stack(v)[:, None].expand(k, batch, *v[0].shape) for n, v in noise.items()})

    return _gradient_shap(fn, model_fn, params, x, target, entries, key, value, names, layer, samples,
                          float(stdev), batch_size, draw, shapes)


def _gradient_shap(fn, model_fn, params, x, target, entries, key, value, names, layer, samples, stdev,
                   batch_size, draw, shapes):
    """The estimator of :func:`gradient_shap` for any draws: ``draw(k, B) -> (index [k, B], alpha [k, B],
    {space: noise [k, B, *shape]})``, the spaces being ``"input"`` or (token ids) the layer names."""
    output = _targets.selector(model_fn)
    batch = _inputs.batch_of(x)
    cap = batch if batch_size is None else batch_size
    per_call = (_inputs.copies_per_forward(cap, batch, value) if batch_size is not None    # draws per forward
                else _inputs.default_copies(samples, batch, value))
    groups = [(start, min(start + cap, batch)) for start in range(0, batch, cap)]
    index: Optional[Tensor] = None
    clean: List[Dict[str, Tensor]] = []
    if names is not None and value is None:  # token ids: the noise goes to the layers' outputs on x
        for g0, g1 in groups:
            out, acts = intermediates(model_fn, layers=names, fn=fn)(params, _inputs.take(x, g0, g1))
            clean.append(acts)
            if target is None:
                part = _targets.resolve_index(out, None, fn=fn, output=output)
                index = part if index is None else torch.cat([index, part])
        for n in names:
            shapes.setdefault(n, (clean[0][n].shape[1:], clean[0][n].dtype))
    elif target is None:  # the class predicted for the clean input
        index = torch.cat([_targets.resolve_index(model_fn(params, _inputs.take(x, g0, g1)), None, fn=fn,
                                                  output=output) for g0, g1 in groups])
    if index is None and isinstance(target, Tensor):
        index = target.to(device=_inputs.device_of(x), dtype=torch.long, non_blocking=True).expand(batch)

    spaces = ["input"] if names is None else names
    sums: Dict[str, List[Any]] = {n: [None] * len(groups) for n in spaces}
    for start in range(0, samples, per_call):
        k = min(per_call, samples - start)
        picks, alpha, noise = draw(k, batch)
        for gi, (g0, g1) in enumerate(groups):
            size = g1 - g0
            xs = _inputs.repeat(_inputs.take(x, g0, g1), k)
            rows = picks[:, g0:g1].reshape(-1)                                     # [k * g]
            base_x = xs
            for entry, base in entries.items():
                base_x = _inputs.replace(base_x, entry, base.index_select(0, rows))
            a = alpha[:, g0:g1].reshape(-1)
            g_target = _targets.for_blocks(target, k, size, None if index is None else index[g0:g1])
            if value is not None:  # noise on the floating-point input
                noisy = _inputs.repeat(value[g0:g1], k) + stdev * noise["input"][:, g0:g1].flatten(0, 1)
                xs = _inputs.replace(xs, key, noisy)
            if names is None:
                start_point = base_x if key is None else base_x[key]
                diff = noisy - start_point
                point = start_point + _column(a, diff.ndim) * diff

                def total(p: Tensor, xs: Any = xs, g_target: Any = g_target) -> Tensor:
                    return _targets.resolve(model_fn(params, _inputs.replace(xs, key, p)), g_target, fn=fn,
                                            output=output).sum()
                attrs = {"input": diff * grad_of_sum(total, point)}
            else:
                if value is not None:
                    _, ends = intermediates(model_fn, layers=names, fn=fn)(params, xs)
                else:
                    ends = {n: _inputs.repeat(clean[gi][n], k) + stdev * noise[n][:, g0:g1].flatten(0, 1)
                            for n in names}
                _, starts = intermediates(model_fn, layers=names, fn=fn)(params, base_x)
                diffs = {n: ends[n] - starts[n] for n in names}
                points = {n: starts[n] + _column(a.to(diffs[n].dtype), diffs[n].ndim) * diffs[n] for n in names}
                grads = layer_gradients(model_fn, params, xs, g_target, layers=names, fn=fn, replace=points).grads
                attrs = {n: diffs[n] * grads[n] for n in names}
            for n in spaces:
                part = attrs[n].view(k, size, *attrs[n].shape[1:]).sum(0)
                sums[n][gi] = part if sums[n][gi] is None else sums[n][gi] + part
    result = {n: torch.cat(sums[n]) / samples for n in spaces}
    if names is None:
        return result["input"]
    return resolve_layers(fn, model_fn, layer)[1](result)


# --------------------------------------------------------------------------------------------
# Conductance: integrated gradients through a layer, with the path in the input's space.

def _check_path_options(fn: str, steps: Any, method: Any, batch_size: Any, *, nodes: int) -> None:
    """The options the path family shares; ``nodes`` is the number of quadrature nodes ``steps`` gives."""
    _checks.check_positive_int(fn, "steps", steps)
    if not isinstance(method, str):
        raise _checks.type_error(fn, f"method, one of {METHODS}", _checks.describe(method))
    if method not in METHODS:
        raise _checks.unknown_name(fn, "method", method, METHODS)
    if method == "riemann_trapezoid" and nodes < 2:
        raise _checks.value_error(fn, "steps >= 2 for method 'riemann_trapezoid' (both ends of the path)",
                                  _checks.describe(steps))
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)


class _InputPath:
    """The straight path ``x0 + a (x - x0)`` in the input's space, evaluated at ``alphas`` in chunks.

    :meth:`chunks` yields ``(group, first, k, xs, target)``: the nodes ``alphas[first:first + k]`` for
    the examples of ``group`` (``(g0, g1)``) as one input of ``k * (g1 - g0)`` examples, node after node
    (captum's layout), and the target for it. Every node of a group comes before the next group's.
    """

    def __init__(self, fn: str, model_fn: ModelFn, params: Params, x: Any, target: Target, baseline: Any,
                 alphas: List[float], batch_size: Optional[int]):
        self.fn, self.model_fn, self.params, self.x, self.target = fn, model_fn, params, x, target
        self.key = None if isinstance(x, Tensor) else _inputs.attributed_key(fn, x)
        base_input = _inputs.baseline_input(fn, baseline, x, self.key)
        self.end: Tensor = x if self.key is None else x[self.key]
        start: Tensor = base_input if self.key is None else base_input[self.key]  # type: ignore[index, assignment]
        self.start = start.expand_as(self.end)
        self.delta = self.end - self.start
        self.alphas = alphas
        batch = _inputs.batch_of(x)
        cap = batch if batch_size is None else batch_size
        self.groups = [(g0, min(g0 + cap, batch)) for g0 in range(0, batch, cap)]
        self.per_forward = (_inputs.copies_per_forward(cap, batch, self.end) if batch_size is not None
                            else _inputs.default_copies(len(alphas), batch, self.end))
        output = _targets.selector(model_fn)
        self.index: Optional[Tensor] = None
        if target is None:  # the class predicted for x itself, not for each path point
            self.index = torch.cat([_targets.resolve_index(model_fn(params, _inputs.take(x, g0, g1)), None,
                                                           fn=fn, output=output) for g0, g1 in self.groups])
        elif isinstance(target, Tensor):
            self.index = target.to(device=self.end.device, dtype=torch.long).expand(batch)

    def chunks(self):
        table = torch.tensor(self.alphas, dtype=torch.float64).to(device=self.end.device, dtype=self.end.dtype)
        spatial = (1,) * (self.end.ndim - 1)
        for g0, g1 in self.groups:
            size = g1 - g0
            for first in range(0, len(self.alphas), self.per_forward):
                k = min(self.per_forward, len(self.alphas) - first)
                a = table[first:first + k].view(k, 1, *spatial)
                points = torch.addcmul(self.start[g0:g1], a, self.delta[g0:g1]).flatten(0, 1)
                xs = points if self.key is None else _inputs.replace(
                    _inputs.repeat(_inputs.take(self.x, g0, g1), k), self.key, points)
                g_target = _targets.for_blocks(self.target, k, size, None if self.index is None else self.index[g0:g1])
                yield (g0, g1), first, k, xs, g_target


@_docs.fill
def layer_conductance(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, layer: Any,
                      baseline: Any = 0.0, steps: int = 50, method: str = "gausslegendre",
                      batch_size: Optional[int] = None) -> Any:
    """Layer conductance: the flow of ``f`` through each unit of a layer along the input's straight path.

    With ``a(t) = layer(x0 + t (x - x0))``, the conductance of unit ``j`` is
    ``integral_0^1 d f / d a_j (t) * d a_j / dt dt``, here (as captum's ``LayerConductance``) the sum
    ``sum_k d f / d a_j (t_k) * (a_j(t_{k+1}) - a_j(t_k))`` over the ``steps + 1`` nodes
    ``t_0 < ... < t_steps`` of the quadrature rule ``method`` (:func:`quadrature`; its weights are not
    used). Summed over the layer's units, the terms telescope through the chain rule, so the map sums to
    ``f(x(t_steps)) - f(x(t_0))`` up to the Riemann error; with ``method="riemann_trapezoid"`` the nodes
    are ``0`` and ``1`` at the ends and the total is ``f(x) - f(x0)`` ("completeness"). With the default
    Gauss-Legendre nodes the ends are inside ``(0, 1)``, as in captum. Unlike :func:`integrated_gradients`
    with ``layer``, the path runs in the input's space, not the layer's.

    Args:
      {model_fn}
      {params}
      {x.path}
      {target.path}
      layer: The layer (a dotted name or module, or a list / dict of them; the result mirrors it).
      {baseline.path}
      steps: Number of path segments, >= 1 (``steps + 1`` nodes, as captum's ``n_steps``). Default: 50.
      method: The quadrature rule whose nodes are taken: ``"gausslegendre"`` (default, as captum),
        ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` or ``"riemann_trapezoid"``.
      {batch_size.path}

    Returns:
      The layer output's shape ``[B, *layer]`` (or ``layer``'s structure of them), on its dtype and device.

    Raises:
      TypeError: non-float ``x``, bad option types, a bad ``target``.
      ValueError: ``layer_conductance: expected steps >= 1, got int 0.``; an unknown ``method`` or layer;
        a ``baseline`` that does not broadcast to ``x``; ``target`` out of range.

    Example:
      >>> layer_conductance(fn, params, images, labels, layer="layer3", steps=32).shape   # [8, 256, 14, 14]

    Cost: ``steps + 1`` forward passes of ``B`` examples and backward passes down to the layer (in
      ``ceil((steps + 1) / k)`` passes of ``k * B`` with ``k = batch_size // B``), plus one forward for
      ``target=None``. Memory: one forward and backward of ``max(B, batch_size)`` examples.
    References: Dhamdhere et al., "How Important Is a Neuron?", ICLR 2019.
    """
    fn = "layer_conductance"
    check_call(fn, model_fn, params, x, target)
    _check_path_options(fn, steps, method, batch_size, nodes=steps + 1)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    names = list(dict.fromkeys(names))
    path = _InputPath(fn, model_fn, params, x, target, baseline, quadrature(method, steps + 1)[0], batch_size)
    sums: Dict[str, List[Tensor]] = {n: [] for n in names}
    carry: Dict[str, Tuple[Tensor, Tensor]] = {}
    for (g0, g1), first, k, xs, g_target in path.chunks():
        size = g1 - g0
        found = layer_gradients(model_fn, params, xs, g_target, layers=names, fn=fn)
        for n in names:
            acts = found.acts[n].view(k, size, *found.acts[n].shape[1:])
            grads = found.grads[n].view(k, size, *found.grads[n].shape[1:])
            if first:  # the last node of the previous chunk starts this chunk's first segment
                last_acts, last_grads = carry[n]
                acts, grads = torch.cat([last_acts[None], acts]), torch.cat([last_grads[None], grads])
            else:
                sums[n].append(torch.zeros_like(acts[0]))
            if acts.shape[0] > 1:
                sums[n][-1] = sums[n][-1] + (grads[:-1] * (acts[1:] - acts[:-1])).sum(0)
            carry[n] = (acts[-1], grads[-1])
    return rebuild({n: torch.cat(sums[n]) for n in names})


@_docs.fill
def internal_influence(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, layer: Any,
                       baseline: Any = 0.0, steps: int = 50, method: str = "gausslegendre",
                       batch_size: Optional[int] = None) -> Any:
    """Internal influence: the gradient w.r.t. a layer's output, integrated along the input's straight path.

    ``integral_0^1 d f / d a (x0 + t (x - x0)) dt ~ sum_k w_k d f / d a (x0 + t_k (x - x0))`` with the
    nodes and weights of :func:`quadrature` (captum's ``InternalInfluence``). Not multiplied by any
    difference: it is :func:`layer_conductance` without the factor ``d a / dt``.

    Args:
      {model_fn}
      {params}
      {x.path}
      {target.path}
      layer: The layer (a dotted name or module, or a list / dict of them; the result mirrors it).
      {baseline.path}
      steps: Number of path points (quadrature nodes), >= 1 (>= 2 for ``riemann_trapezoid``). Default: 50.
      method: ``"gausslegendre"`` (default, as captum), ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``.
      {batch_size.path}

    Returns:
      The layer output's shape ``[B, *layer]`` (or ``layer``'s structure of them), on its dtype and device.

    Raises:
      TypeError: non-float ``x``, bad option types, a bad ``target``.
      ValueError: ``internal_influence: expected steps >= 1, got int 0.``; an unknown ``method`` or layer;
        a ``baseline`` that does not broadcast to ``x``; ``target`` out of range.

    Example:
      >>> internal_influence(fn, params, images, labels, layer="layer3").shape   # [8, 256, 14, 14]

    Cost: ``steps`` forward passes of ``B`` examples and backward passes down to the layer, plus one
      forward for ``target=None``.
    References: Leino et al., "Influence-Directed Explanations for Deep Convolutional Networks", 2018.
    """
    fn = "internal_influence"
    check_call(fn, model_fn, params, x, target)
    _check_path_options(fn, steps, method, batch_size, nodes=steps)
    names, rebuild = resolve_layers(fn, model_fn, layer)
    names = list(dict.fromkeys(names))
    alphas, weights = quadrature(method, steps)
    path = _InputPath(fn, model_fn, params, x, target, baseline, alphas, batch_size)
    sums: Dict[str, List[Tensor]] = {n: [] for n in names}
    for (g0, g1), first, k, xs, g_target in path.chunks():
        size = g1 - g0
        grads = layer_gradients(model_fn, params, xs, g_target, layers=names, fn=fn).grads
        w = torch.tensor(weights[first:first + k], dtype=torch.float64)
        for n in names:
            g = grads[n]
            part = torch.einsum("k,k...->...", w.to(device=g.device, dtype=g.dtype), g.view(k, size, *g.shape[1:]))
            if first:
                sums[n][-1] = sums[n][-1] + part
            else:
                sums[n].append(part)
    return rebuild({n: torch.cat(sums[n]) for n in names})


def _neuron_input_gradients(fn: str, model_fn: ModelFn, params: Params, xs: Any, key: Optional[str], target: Any,
                            name: str, index: Any, w: Tensor, size: int) -> Optional[Tensor]:
    """``w_k * d f / d n * d n / d x`` at every path point of ``xs`` (``k * size`` examples, node after node)
    from one forward: the backward from the target scores stops at the layer, the one from the neuron (scaled
    by the selection of that gradient, held constant) runs to the input. ``None`` when the model's graph
    reaches a tensor a caller tracks (see :func:`staged_grads`)."""
    point = xs if key is None else xs[key]

    def forward(v: Tensor) -> Any:
        out, acts = intermediates(model_fn, layers=[name], fn=fn)(params, v if key is None else
                                                                _inputs.replace(xs, key, v))
        scores = _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn))
        return scores.sum(), acts[name], None

    def then(acts: Tensor, d_layer: Tensor) -> Tensor:
        mid = _targets.neuron_value(fn, index, d_layer)                              # d f / d n, [k * size]
        scale = (w[:, None] * mid.view(-1, size)).reshape(-1)
        return (scale * _targets.neuron_value(fn, index, acts)).sum()

    found = staged_grads(forward, point, then)
    return None if found is None else found[1]


def _neuron_input_gradients_func(fn: str, model_fn: ModelFn, params: Params, xs: Any, key: Optional[str],
                                 target: Any, name: str, index: Any, w: Tensor, size: int) -> Tensor:
    """:func:`_neuron_input_gradients` by ``torch.func``, differentiable by a caller: ``d f / d a`` at the layer
    (one forward, a backward down to the layer), then ``d n / d x`` (a second forward, a backward from the
    neuron to the input), each through :func:`grad_of_sum`, which chooses the attention backend."""
    point = xs if key is None else xs[key]
    d_layer = layer_gradients(model_fn, params, xs, target, layers=[name], fn=fn).grads[name]
    mid = _targets.neuron_value(fn, index, d_layer)                                          # d f / d n, [k * size]
    scale = (w[:, None] * mid.view(-1, size)).reshape(-1)

    def neuron_total(v: Tensor) -> Tensor:
        _, acts = intermediates(model_fn, layers=[name], fn=fn)(params, v if key is None else
                                                                _inputs.replace(xs, key, v))
        return (scale * _targets.neuron_value(fn, index, acts[name])).sum()
    return grad_of_sum(neuron_total, point)


@_docs.fill
def neuron_conductance(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, layer: Any,
                       index: Any, baseline: Any = 0.0, steps: int = 50, method: str = "riemann_trapezoid",
                       batch_size: Optional[int] = None) -> Any:
    """Neuron conductance: the part of a neuron's conductance that flows through each input feature.

    For the neuron ``n = a[index]`` of the layer, on the input's straight path
    ``x(t) = x0 + t (x - x0)``::

        A_i = (x_i - x0_i) * integral_0^1 d f / d n (x(t)) * d n / d x_i (x(t)) dt

    with the nodes and weights of :func:`quadrature`, as captum's ``NeuronConductance`` (whose default
    rule, ``riemann_trapezoid``, is also the default here). Summed over the inputs it is the neuron's
    layer conductance (:func:`layer_conductance` at ``index``) up to the quadrature error. A slice in
    ``index`` or a callable stands for the sum of the neurons it selects: ``d f / d n`` is then the same
    selection of ``d f / d a`` (a callable is applied to the gradient w.r.t. the layer's output as well
    as to the output, as captum does; exact for a linear selection).

    Args:
      {model_fn}
      {params}
      {x.path}
      {target.path}
      layer: The layer (a dotted name or module) whose output holds the neuron.
      index: The neuron: a tuple of ints into the layer's output without the batch axis, e.g. ``(3, 5, 5)``
        for channel 3 at row 5, column 5 (slices, and the axes an index shorter than the layer's rank
        leaves, are summed: ``(3,)`` is all of channel 3); or a callable ``layer output -> [B]``.
      {baseline.path}
      steps: Number of path points (quadrature nodes), >= 1 (>= 2 for ``riemann_trapezoid``). Default: 50.
      method: ``"riemann_trapezoid"`` (default, as captum's ``NeuronConductance``), ``"gausslegendre"``,
        ``"riemann_left"``, ``"riemann_right"`` or ``"riemann_middle"``.
      {batch_size.path}

    Returns:
      ``[B, *input]`` attributions (of the floating-point entry for a dict ``x``) on ``x``'s dtype and device.

    Raises:
      TypeError: non-float ``x``, a bad ``index`` or option type, a bad ``target``.
      ValueError: ``neuron_conductance: expected steps >= 1, got int 0.``; an unknown ``method`` or layer;
        an index out of the layer's range; ``target`` out of range.

    Example:
      >>> neuron_conductance(fn, params, images, labels, layer="layer3", index=(7, 2, 2)).shape  # [8, 3, 224, 224]

    Cost: ``steps`` forward passes of ``B`` examples and, from each, two backward passes (one from the output
      down to the layer, one from the neuron to the input; captum's work), plus one forward for
      ``target=None``. When a caller differentiates the result (``torch.func`` transforms, tracked ``params``
      or ``x``), each path point takes two forwards instead, so that the result is differentiable.
    References: Dhamdhere et al., "How Important Is a Neuron?", ICLR 2019.
    """
    fn = "neuron_conductance"
    check_call(fn, model_fn, params, x, target)
    index = _targets.check_neuron_index(fn, index)
    _check_path_options(fn, steps, method, batch_size, nodes=steps)
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(names) != 1:
        raise _checks.value_error(fn, "one layer (a dotted name or module)", f"{len(names)} layers")
    name = names[0]
    alphas, weights = quadrature(method, steps)
    path = _InputPath(fn, model_fn, params, x, target, baseline, alphas, batch_size)
    key = path.key
    fast = untracked(params, x, baseline)
    sums: List[Tensor] = []
    for (g0, g1), first, k, xs, g_target in path.chunks():
        size = g1 - g0
        point = xs if key is None else xs[key]
        w = torch.tensor(weights[first:first + k], dtype=torch.float64).to(device=point.device, dtype=point.dtype)
        found = _neuron_input_gradients(fn, model_fn, params, xs, key, g_target, name, index, w, size) if fast else None
        if found is None:
            found = _neuron_input_gradients_func(fn, model_fn, params, xs, key, g_target, name, index, w, size)
        part = found.view(k, size, *found.shape[1:]).sum(0)
        if first:
            sums[-1] = sums[-1] + part
        else:
            sums.append(part)
    return path.delta * torch.cat(sums)
