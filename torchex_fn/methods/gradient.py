"""Input-gradient family: saliency (simple gradient), input x gradient, and ``smooth`` (SmoothGrad)."""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..core import checks as _checks, inputs as _inputs
from ..core import docs as _docs
from ..core.autodiff import grad_of_sum
from ..core import targets as _targets
from ..core.capture import intermediates, layer_gradients, resolve_layers
from ..core.model import Wrapped
from ..core.types import ModelFn, Params, Target, module_of
from ..core.arguments import check_call

__all__ = ["saliency", "input_x_gradient", "input_gradient", "smooth"]

SMOOTH_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def input_gradient(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *,
                   fn: str = "input_gradient") -> Tensor:
    """``d score_b / d x_b`` for every example, ``[B, *input]``, by one ``torch.func.vjp`` call.

    Examples are independent, so the gradient of the summed scores is each example's gradient.
    For a dict ``x``, the gradient w.r.t. its one floating-point entry.
    """
    return attributed_gradient(fn, model_fn, params, x, target, None)[1]


def attributed_gradient(fn: str, model_fn: ModelFn, params: Params, x: Any, target: Target, layer: Any):
    """``(value, d score / d value)`` for what a method attributes, one forward and one backward.

    ``value`` is ``x``, the floating-point entry of a dict ``x``, or (with ``layer``) the layer's
    output, each a tensor, or ``layer``'s structure of them for several layers.
    """
    output = _targets.selector(model_fn)
    if layer is not None:
        names, rebuild = resolve_layers(fn, model_fn, layer)
        result = layer_gradients(model_fn, params, x, target, layers=names, fn=fn)
        return rebuild(result.acts), rebuild(result.grads)
    key = None if isinstance(x, Tensor) else _inputs.attributed_key(fn, x)
    value = x if key is None else x[key]

    def total(v: Tensor) -> Tensor:
        return _targets.resolve(model_fn(params, _inputs.replace(x, key, v)), target, fn=fn, output=output).sum()
    return value, grad_of_sum(total, value)


def _map_structure(op: Callable[..., Tensor], *trees: Any) -> Any:
    """``op`` applied leaf by leaf to tensors or to equal lists / dicts of them."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: op(*(t[k] for t in trees)) for k in first}
    if isinstance(first, list):
        return [op(*leaves) for leaves in zip(*trees)]
    return op(*trees)


@_docs.fill
def saliency(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Any = None,
             abs: bool = False, post_process: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Simple gradient (saliency): ``d out_c / d x``.

    Args:
      {model_fn}
      {params}
      {x.gradient}
      {target}
      layer: Attribute w.r.t. this layer's output instead of the input (a dotted name or module, or a
        list / dict of them; captum's ``LayerGradient``): the map has the layer output's shape, e.g.
        ``[B, T, D]`` at an embedding layer. Default: None (the input).
      abs: Return ``|gradient|`` (captum's ``Saliency`` default is ``abs=True``; the seed's
        ``SimpleGradient`` and this function default to the signed gradient). Default: False.
      {post_process}

    Returns:
      ``[B, *input]`` gradients (the layer output's shape with ``layer``; whatever ``post_process``
      returns, if given).

    Raises:
      TypeError: non-float ``x``, a bad ``target`` type, a non-callable ``post_process``.
      ValueError: ``saliency: expected target in [0, 1000), got int 1000.`` and NaN inputs.

    Example:
      >>> saliency(fn, params, images, labels).shape              # [8, 3, 224, 224] -> [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: saliency(fn, p, images, labels))(stacked)   # ensemble [E, 8, 3, 224, 224]

    Cost: one forward, one backward to the input (to the layer with ``layer``; no parameter gradients).
    References: Simonyan et al., "Deep Inside Convolutional Networks", ICLR workshop 2014.
    """
    target = check_call("saliency", model_fn, params, x, target, layer=layer)
    _checks.check_bool("saliency", "abs", abs)
    _checks.check_optional_callable("saliency", "post_process", post_process)
    _, grad = attributed_gradient("saliency", model_fn, params, x, target, layer)
    grad = _map_structure(torch.abs, grad) if abs else grad
    return post_process(grad) if post_process is not None else grad


@_docs.fill
def input_x_gradient(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *, layer: Any = None,
                     post_process: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Input x gradient: ``x * d out_c / d x``, ``[B, *input]``.

    With ``layer``, the layer's activation times the gradient w.r.t. it, in the layer output's shape
    (captum's ``LayerGradientXActivation``). Returns and raises as :func:`saliency`.

    Args:
      {model_fn}
      {params}
      {x.gradient}
      {target}
      layer: Attribute to this layer's output instead of the input (a dotted name or module, or a
        list / dict of them; captum's ``LayerGradientXActivation``): the layer's activation times the
        gradient w.r.t. it, in the layer output's shape. Default: None (the input).
      {post_process}

    Example:
      >>> input_x_gradient(fn, params, images, labels).shape   # [8, 3, 224, 224] -> [8, 3, 224, 224]

    Cost: one forward, one backward to the input.
    References: Shrikumar et al., "Not Just a Black Box", 2016.
    """
    target = check_call("input_x_gradient", model_fn, params, x, target, layer=layer)
    _checks.check_optional_callable("input_x_gradient", "post_process", post_process)
    value, grad = attributed_gradient("input_x_gradient", model_fn, params, x, target, layer)
    attr = _map_structure(torch.mul, value, grad)
    return post_process(attr) if post_process is not None else attr


def _noise_layer(fn: str, model_fn: ModelFn, layer: Any) -> str:
    """The one layer whose output :func:`smooth` perturbs for integer inputs."""
    if module_of(model_fn) is None:
        raise _checks.type_error(fn, "a model_fn from functionalize(model) for integer x (token ids)",
                                 _checks.describe(model_fn),
                                 "The noise goes to the layer's output through a forward hook on that module.")
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(set(names)) != 1:
        raise _checks.value_error(fn, "one layer for integer x (token ids), where the noise is added", f"{names}",
                                  "Smooth one layer at a time.")
    return names[0]


def _layer_noise(model_fn: Any, name: str, noise: Tensor) -> Wrapped:
    """``model_fn`` with ``noise`` ``[n, *layer]`` added to one layer's output during each call.

    A forward hook on that module, registered by :class:`Wrapped` for the length of one call under the
    model's lock (before the capture hooks, which therefore see the noisy output). A call of ``r * n``
    examples (a method repeating its input ``r`` times block after block, as integrated gradients' path
    points do) gets the noise repeated ``r`` times; any other batch size is an error.
    """

    def add_noise(module: Any, args: Any, out: Any) -> Tensor:
        n = noise.shape[0]
        if not isinstance(out, Tensor) or out.shape[0] % n or out.shape[1:] != noise.shape[1:]:
            raise _checks.value_error(
                "smooth", f"layer {name!r} to output [r * {n}, {', '.join(map(str, noise.shape[1:]))}] "
                "(the noisy batch, possibly repeated)", _checks.describe(out),
                "The wrapped method split the batch: leave its batch_size unset and cap memory with smooth's.")
        reps = out.shape[0] // n
        repeated = noise if reps == 1 else noise.repeat(reps, *([1] * (noise.ndim - 1)))
        return out + repeated.to(out.dtype)

    return Wrapped(model_fn, hook=(name, add_noise))


def smooth(method: Callable[..., Tensor], *, samples: int = 25, stdev: float = 0.15, kind: str = "smoothgrad",
           stdev_spread: bool = True, generator: Optional[torch.Generator] = None,
           batch_size: Optional[int] = None) -> Callable[..., Tensor]:
    """SmoothGrad as a transform: ``method`` averaged over noisy copies of the input.

    ``smooth(method)(model_fn, params, x, target, **options)`` draws ``samples`` noise tensors
    ``eps_s ~ N(0, sigma_b^2)`` per example and combines the maps ``m_s = method(model_fn, params,
    x + eps_s, target, **options)``: their mean (``"smoothgrad"``), the mean of their squares
    (``"smoothgrad_sq"``) or their variance, ``mean(m_s^2) - mean(m_s)^2`` (``"vargrad"``, divided
    by ``samples``). With ``stdev_spread=True`` (default) ``sigma_b = stdev * (max(x_b) - min(x_b))``
    as in Smilkov et al. (a noise level of 10-20 % of each example's range); with
    ``stdev_spread=False`` ``sigma_b = stdev``, an absolute standard deviation as captum's
    ``NoiseTunnel(stdevs=...)`` uses (so ``stdev=0.15`` means different things in the two modes).
    The noisy copies of all examples run as one batch through ``method``, ``max(1, batch_size // B)``
    samples at a time, so memory does not grow with ``samples``. Each sample draws one standard
    normal tensor ``[*input]`` from ``generator``, shared by all examples (each scaled by its own
    ``sigma_b``): an example's map depends only on the seed, never on ``batch_size`` or on the other
    examples in the batch (the batch gives the same maps as one example at a time).

    Where the noise goes:

    * ``x`` a float tensor: ``x`` itself.
    * ``x`` a dict of named inputs: its one floating-point entry (``pixel_values`` of a HuggingFace
      ViT; ``sigma_b`` from that entry's range); every other entry goes with its example into each
      noisy batch. A dict with several float entries is an error.
    * ``x`` token ids (an integer tensor, or a dict without a float entry) with ``layer=`` (one layer):
      the output ``a`` of that layer (``sigma_b`` from the range of ``a`` on the clean input), i.e.
      SmoothGrad on the embeddings: ``method`` runs on a model whose layer outputs ``a + eps_s``,
      through a forward hook held for the length of each call. Noise on integer ids has no meaning
      (rounding it back to ids swaps tokens), and the layer is where the map lives anyway, so this is
      the one continuous space available; it equals input-space smoothing of the model that starts at
      that layer. For ``integrated_gradients(layer=...)`` the noise shifts both ends of the path (the
      layer's output on ``x`` and on the baseline) by the same ``eps_s``. ``method`` must call the model
      on the whole noisy batch (leave its own ``batch_size`` unset; ``smooth``'s caps memory).

    Structured outputs: ``target=None`` and integer targets index the tensor that
    ``functionalize(model, output=)`` chooses; a callable target receives the raw output of one
    sample's ``g`` examples at a time, in ``x``'s order.

    Args:
      method: Any method of this package, ``(model_fn, params, x, target=None, **options) -> map``
        returning one tensor ``[B, ...]`` (``saliency``, ``input_x_gradient``, ``grad_cam``,
        ``integrated_gradients``, ...).
      samples: Number of noisy copies per example, >= 1. Default: 25.
      stdev: Noise standard deviation, >= 0, relative to each example's range or absolute (see
        ``stdev_spread``). Default: 0.15.
      kind: ``"smoothgrad"`` (default), ``"smoothgrad_sq"`` or ``"vargrad"``.
      stdev_spread: ``True``: ``stdev`` is a fraction of ``max(x_b) - min(x_b)`` (the paper);
        ``False``: an absolute standard deviation (captum). Default: True.
      generator: The only source of noise (a ``torch.Generator`` on ``x``'s device, or ``None`` for
        the global one); the same seed gives the same map.
      batch_size: Memory cap: the most examples in one call of ``method``, i.e. ``B`` times the
        samples per call (one sample of ``batch_size`` examples when ``B > batch_size``).
        ``None`` (default): as many samples of all ``B`` examples per call as the input's size allows
        (all of them for a table or a sentence, one for images on a CPU; see
        :func:`integrated_gradients`).

    Returns:
      A function with ``method``'s signature, ``(model_fn, params, x, target=None, **options)``,
      returning a map of ``method``'s shape on ``x``'s dtype and device. Keyword ``options`` are
      passed to ``method`` unchanged; tensor options are not repeated over samples, so give
      per-example tensors (e.g. a baseline ``[B, *input]``) a batch dimension of 1 or none.
      ``target=None`` is resolved to the class predicted for ``x`` (one extra forward), not for each
      noisy copy; a callable target receives the output of ``B`` (or ``batch_size``) noisy examples
      of one sample at a time, in ``x``'s order. With ``layer=`` and token ids the map has the
      layer output's shape.

    Raises:
      TypeError: a non-callable ``method``, bad option types (when ``smooth`` is called); the
        checks of the wrapped call (non-float ``x``, bad ``target``), or a ``method`` that does not
        return a tensor.
      ValueError: ``smooth: expected samples >= 1, got int 0.``; an unknown ``kind``; a negative
        ``stdev``; NaN inputs; ``target`` out of range.

    Example:
      >>> smoothgrad = smooth(saliency, samples=50, generator=torch.Generator().manual_seed(0))
      >>> smoothgrad(fn, params, images, labels).shape                    # [8, 3, 224, 224]
      >>> smooth(grad_cam, kind="vargrad")(fn, params, images, labels, layer="layer4").shape  # [8, 1, 224, 224]
      >>> torch.func.vmap(lambda p: smoothgrad(fn, p, images, labels), randomness="same")(stacked)
      >>> smoothgrad(bert_fn, bert_params, tokens, 1, layer="bert.embeddings").shape   # [B, T, hidden]

    Cost: ``samples`` calls of ``method`` on ``B`` examples (``ceil(samples / k)`` calls on ``k * B``
      with ``k = batch_size // B``), plus one forward for ``target=None``. Memory: one call of
      ``method`` on ``max(B, batch_size)`` examples plus three maps.
    References: Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017; Adebayo et al.,
      "Local Explanation Methods for Deep Neural Networks Lack Sensitivity to Parameter Values"
      (VarGrad), 2018.
    """
    fn = "smooth"
    if not callable(method):
        raise _checks.type_error(fn, "method, an attribution function (model_fn, params, x, target, **options)",
                                 _checks.describe(method))
    _checks.check_positive_int(fn, "samples", samples)
    if isinstance(stdev, bool) or not isinstance(stdev, (int, float)):
        raise _checks.type_error(fn, "stdev, a float >= 0", _checks.describe(stdev))
    if not stdev >= 0.0:  # also NaN
        raise _checks.value_error(fn, "stdev >= 0", _checks.describe(stdev))
    if not isinstance(kind, str):
        raise _checks.type_error(fn, f"kind, one of {SMOOTH_KINDS}", _checks.describe(kind))
    if kind not in SMOOTH_KINDS:
        raise _checks.unknown_name(fn, "kind", kind, SMOOTH_KINDS)
    _checks.check_bool(fn, "stdev_spread", stdev_spread)
    _checks.check_generator(fn, generator)
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)

    def smoothed(model_fn: ModelFn, params: Params, x: Any, target: Target = None, **options: Any) -> Tensor:
        layer = options.get("layer")
        target = check_call(fn, model_fn, params, x, target, layer=layer)
        output = _targets.selector(model_fn)
        key, value = _inputs.noised_entry("smooth", x)
        batch = _inputs.batch_of(x)
        cap = batch if batch_size is None else batch_size
        groups = [(start, min(start + cap, batch)) for start in range(0, batch, cap)]
        name = None
        if value is None:  # token ids: the noise goes to the layer's output (SmoothGrad on embeddings)
            name = _noise_layer(fn, model_fn, layer)
            clean = [intermediates(model_fn, layers=[name], fn=fn)(params, _inputs.take(x, g0, g1))
                     for g0, g1 in groups]
            value = torch.cat([acts[name] for _, acts in clean])
            if target is None:  # the class predicted for the clean input
                target = torch.cat([_targets.resolve_index(out, None, fn=fn, output=output) for out, _ in clean])
            del clean
        elif target is None:  # the class predicted for the clean input
            target = torch.cat([_targets.resolve_index(model_fn(params, _inputs.take(x, g0, g1)), None, fn=fn,
                                                       output=output) for g0, g1 in groups])
        if isinstance(target, Tensor):
            target = target.to(device=value.device, dtype=torch.long, non_blocking=True).expand(batch)

        per_call = (_inputs.copies_per_forward(cap, batch, value) if batch_size is not None   # samples per call
                    else _inputs.default_copies(samples, batch, value))
        ones = (1,) * (value.ndim - 1)
        sigma = torch.full((), float(stdev), dtype=value.dtype, device=value.device)  # a fill: no host copy
        if stdev_spread:
            flat = value.flatten(1)
            sigma = sigma * (flat.amax(dim=1) - flat.amin(dim=1)).view(batch, *ones)

        first: List[Any] = [None] * len(groups)       # a shift that makes vargrad exact
        sums: List[Any] = [None] * len(groups)
        squares: List[Any] = [None] * len(groups)
        for start in range(0, samples, per_call):
            k = min(per_call, samples - start)
            # One draw of [*input] per sample, shared by the examples (each scaled by its own sigma):
            # a map depends neither on batch_size nor on the other examples in the batch.
            shape, dtype, device = value.shape[1:], value.dtype, value.device   # read before the draws
            with _checks.draws(fn, generator):  # under vmap: every member gets the generator's noise
                draws = [torch.randn(shape, generator=generator, dtype=dtype, device=device) for _ in range(k)]
            unit = draws[0][None] if k == 1 else torch.stack(draws)                      # [k, *input]
            for gi, (g0, g1) in enumerate(groups):
                size = g1 - g0
                index = target[g0:g1] if isinstance(target, Tensor) else None
                g_target = _targets.for_blocks(target, k, size, index)
                scale = sigma[g0:g1][None] if stdev_spread else sigma
                if name is None:  # x + sigma * eps in one pass
                    noisy = torch.addcmul(value[g0:g1][None], scale, unit[:, None]).flatten(0, 1)  # [k * g, *input]
                    xs = noisy if key is None else _inputs.replace(
                        _inputs.repeat(_inputs.take(x, g0, g1), k), key, noisy)
                    maps = method(model_fn, params, xs, g_target, **options)
                else:
                    noise = (scale * unit[:, None]).expand(k, size, *value.shape[1:]).flatten(0, 1)
                    noisy_fn = _layer_noise(model_fn, name, noise)
                    maps = method(noisy_fn, params, _inputs.repeat(_inputs.take(x, g0, g1), k), g_target, **options)
                if not isinstance(maps, Tensor):
                    raise _checks.type_error(fn, "method to return one tensor [B, ...]", _checks.describe(maps),
                                             "Wrap methods that return a list or dict of maps.")
                maps = maps.view(k, size, *maps.shape[1:])
                if kind == "vargrad":
                    if first[gi] is None:
                        first[gi] = maps[0]
                    maps = maps - first[gi]
                part = maps[0] if k == 1 else maps.sum(dim=0)                 # no copy for one sample
                sums[gi] = part if sums[gi] is None else sums[gi] + part
                if kind != "smoothgrad":
                    square = maps.square().sum(dim=0)
                    squares[gi] = square if squares[gi] is None else squares[gi] + square
        if kind == "smoothgrad":
            return torch.cat(sums) / samples
        if kind == "smoothgrad_sq":
            return torch.cat(squares) / samples
        mean = torch.cat(sums) / samples
        return torch.cat(squares) / samples - mean.square()

    smoothed.__name__ = f"smooth_{getattr(method, '__name__', 'method')}"
    smoothed.__doc__ = f"{kind} of {getattr(method, '__name__', 'method')} over {samples} noisy samples (see `smooth`)."
    return smoothed
