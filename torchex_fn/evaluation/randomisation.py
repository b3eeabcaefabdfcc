"""Randomisation checks of attribution methods: does the map change when it should? (Quantus's
randomisation family; the cascading parameter randomisation is :func:`torchex_fn.metrics.randomization_check`.)

* :func:`random_logit`: the similarity between the map of the target class and the map of another
  class drawn at random (Sixt et al., 2020); a class-sensitive method scores low.
* :func:`ssim`: the structural similarity of two maps per example, Quantus's default similarity.
* :func:`mprt`, :func:`smooth_mprt`, :func:`efficient_mprt`: the model parameter randomisation test
  (Adebayo et al., 2018) and its two repairs (Hedstroem et al., 2023); randomising is a pure operation on
  the ``params`` dict (:func:`randomised_params`).
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target, module_of
from . import maps as _maps

__all__ = ["random_logit", "ssim", "Mprt", "mprt", "smooth_mprt", "efficient_mprt", "spearman_correlation",
           "randomised_params", "discrete_entropy"]


def ssim(a: Tensor, b: Tensor, *, win_size: int = 7) -> Tensor:
    """Structural similarity of two ``[B, ...]`` maps per example, over the flattened maps.

    Each example's maps are flattened to signals of ``N`` values; with ``R`` the range of the two
    together (``max - min``), ``C1 = (0.01 R)^2`` and ``C2 = (0.03 R)^2``, every window of
    ``win_size`` consecutive values gives ``(2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)
    (s_a^2 + s_b^2 + C2))`` with sample (co)variances, and the score is the mean over the windows
    that lie inside the signal. This is what Quantus's random logit computes
    (``skimage.metrics.structural_similarity`` on the flattened maps).

    Args:
      a: ``[B, ...]`` maps, floating point.
      b: Maps of ``a``'s shape.
      win_size: Odd window length, at most ``N``. Default: 7 (skimage's).

    Returns:
      ``[B]`` similarities in ``[-1, 1]`` (1: equal maps), in ``a``'s dtype. Differentiable.

    Raises:
      ValueError: maps of different shapes, a bad ``win_size``.
      TypeError: non-float maps.

    Example:
      >>> ssim(saliency(fn, params, x, 0), saliency(fn, params, x, 1))    # [8, 3, 32, 32] -> [8]
    """
    fn = "ssim"
    fa, fb = _maps.flat(fn, "a", a), _maps.flat(fn, "b", b)
    if fa.shape != fb.shape:
        raise _checks.value_error(fn, f"b of a's shape {tuple(a.shape)}", _checks.describe(b))
    _checks.check_positive_int(fn, "win_size", win_size)
    if win_size % 2 == 0 or win_size > fa.shape[1]:
        raise _checks.value_error(fn, f"an odd win_size <= {fa.shape[1]} (the elements per example)",
                                  _checks.describe(win_size))
    both = torch.cat([fa, fb], dim=1)
    span = both.amax(dim=1) - both.amin(dim=1)
    c1, c2 = ((0.01 * span) ** 2)[:, None], ((0.03 * span) ** 2)[:, None]

    def mean(t: Tensor) -> Tensor:  # the windows inside the signal
        return F.avg_pool1d(t[:, None], win_size, stride=1)[:, 0]

    mu_a, mu_b = mean(fa), mean(fb)
    correction = win_size / (win_size - 1)
    var_a = correction * (mean(fa * fa) - mu_a * mu_a)
    var_b = correction * (mean(fb * fb) - mu_b * mu_b)
    cov = correction * (mean(fa * fb) - mu_a * mu_b)
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=1)


@_docs.fill
def random_logit(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor, target: Target = None,
                 *, off_target: Optional[Tensor] = None, num_classes: Optional[int] = None,
                 similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 generator: Optional[torch.Generator] = None, abs: bool = False, normalise: bool = True) -> Tensor:
    """Random logit: how similar the map of the target class is to the map of a random other class.

    For each example, a class other than its target is drawn uniformly (or given as ``off_target``),
    the method explains it, and the two maps are compared by ``similarity_func`` (:func:`ssim` by
    default, as Quantus) after the preparation (each map divided by its own largest magnitude, then
    ``abs``). Lower is better: the map should depend on the class. Quantus masks the targets of the
    *whole batch* from every example's draw (its index broadcasts over the batch) and normalises
    each batch of maps by the batch's maximum; here both are per example.

    Args:
      method: ``(model_fn, params, x, target) -> map``, e.g. ``saliency`` or
        ``functools.partial(grad_cam, layer="features")``.
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      {x.batch}
      target: ``None`` (the predicted class), an int or ``[B]`` ints.
      off_target: ``[B]`` ints, the other class to explain per example (none equal to its target).
        Default: None (drawn with ``generator``).
      num_classes: How many classes to draw from. Default: None (the model's output width).
      similarity_func: ``(map_a, map_b) -> [B]``. Default: None (:func:`ssim`).
      generator: Source of the draw, on any device. Default: the global generator.
      abs: Compare magnitudes. Default: False (Quantus's).
      normalise: Divide each map by its largest magnitude first. Default: True.

    Returns:
      ``[B]`` similarities, in the map's dtype. Differentiable where the method and the similarity are.

    Raises:
      ValueError: an ``off_target`` equal to the target or out of range, ``num_classes`` below 2.
      TypeError: a non-callable ``method`` or ``similarity_func``, a bad generator, a non-bool flag.

    Example:
      >>> random_logit(saliency, fn, params, x, y, generator=torch.Generator().manual_seed(0))    # -> [16]

    Cost: one forward pass (for the class count or a ``None`` target) and two calls of ``method``.
    References: Sixt et al., "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020.
    """
    fn = "random_logit"
    _maps.check_method(fn, method)
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params)
    _checks.check_input(fn, x, min_ndim=1)
    _checks.check_optional_callable(fn, "similarity_func", similarity_func)
    _checks.check_generator(fn, generator)
    _maps.check_flags(fn, abs=abs, normalise=normalise)
    _checks.check_positive_int(fn, "num_classes", num_classes, allow_none=True)
    batch = x.shape[0]
    with torch.no_grad():
        out = model_fn(params, x)
    index = _targets.resolve_index(out, target, fn=fn).to(x.device)
    classes = out.shape[1] if num_classes is None else num_classes
    if classes < 2:
        raise _checks.value_error(fn, "num_classes >= 2 (a class other than the target)", _checks.describe(classes))
    if off_target is None:
        device = torch.device("cpu") if generator is None else generator.device
        draw = torch.randint(0, classes - 1, (batch,), generator=generator, device=device).to(x.device)
        off = draw + (draw >= index).long()                  # uniform over the classes other than the target
    else:
        off = _off_target(fn, off_target, index, classes)
    prepare = _prepared(abs, normalise)
    reference = prepare(method(model_fn, params, x, index))
    other = prepare(method(model_fn, params, x, off))
    similarity = ssim if similarity_func is None else similarity_func
    return similarity(reference, other)


def _off_target(fn: str, off_target: Any, index: Tensor, classes: int) -> Tensor:
    if not isinstance(off_target, Tensor) or off_target.is_floating_point() or off_target.shape != index.shape:
        raise _checks.type_error(fn, f"off_target, an integer tensor of shape {list(index.shape)}",
                                 _checks.describe(off_target))
    off = off_target.to(index.device).long()
    _checks.check_values(fn, (off == index) | (off < 0) | (off >= classes),
                         f"off_target in [0, {classes}) and different from each target",
                         "a clash or a class out of range")
    return off


def _prepared(abs: bool, normalise: bool) -> Callable[[Tensor], Tensor]:
    def prepare(m: Tensor) -> Tensor:
        flat = _maps.prepare(_maps.flat("random_logit", "the method's map", m), normalise=normalise, absolute=abs)
        return flat.reshape(m.shape)
    return prepare


# ----------------------------------------------------------------- model parameter randomisation
class Mprt(NamedTuple):
    """Result of :func:`mprt` and :func:`smooth_mprt`.

    Attributes:
      layers: The randomised layers, in the order they were randomised.
      similarity: ``[L, B]`` similarity of each example's original map with its map after randomising
        ``layers[: l + 1]`` (cascading) or ``layers[l]`` alone (``layer_order="independent"``).
      original: ``[B]`` the similarity of the original map with itself, recomputed (1 for Spearman).
      average: ``[B]`` the mean over the layers (Quantus's ``return_average_correlation``).
      last: ``[B]`` the last layer's row (Quantus's ``return_last_correlation``).
    """

    layers: tuple
    similarity: Tensor
    original: Tensor
    average: Tensor
    last: Tensor


_ORDERS = ("top_down", "bottom_up", "independent")


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks ``0 .. N - 1`` of each row of ``[B, N]``, ties given the mean of their ranks (as scipy)."""
    ordered, order = values.sort(dim=1, stable=True)
    ordered = ordered.contiguous()  # under vmap a sorted view may not be (searchsorted would copy it, warning)
    first = torch.searchsorted(ordered, ordered, right=False)
    after = torch.searchsorted(ordered, ordered, right=True)
    mean_rank = (first + after - 1).to(torch.float64) / 2
    return torch.empty_like(mean_rank).scatter(1, order, mean_rank)  # out of place: vmap has its batching rule


def spearman_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of ``[B, ...]`` maps per example, ties ranked by their mean rank
    (``scipy.stats.spearmanr``, Quantus's ``correlation_spearman``). ``[B]`` float64; NaN for a constant map."""
    ra, rb = _average_ranks(a.reshape(a.shape[0], -1)), _average_ranks(b.reshape(b.shape[0], -1))
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _randomisable(fn: str, model_fn: Any, params: Params,
                  layers: Optional[Sequence[str]]) -> List[Tuple[str, List[str]]]:
    """``(layer, [its weight / bias keys])`` in the model's order (input side first)."""
    if layers is None:
        module = module_of(model_fn)
        if module is None:
            raise _checks.type_error(fn, "layers (parameter-name prefixes, input side first) for a model_fn "
                                     "not built by functionalize", "None")
        names = [name for name, child in module.named_modules()
                 if any(k in ("weight", "bias") for k, _ in child.named_parameters(recurse=False))]
    else:
        if isinstance(layers, str) or not isinstance(layers, Sequence):
            raise _checks.type_error(fn, "layers, a list of parameter-name prefixes", _checks.describe(layers))
        names = list(layers)
    found = []
    for prefix in names:
        keys = [k for k in params if isinstance(prefix, str) and (k.startswith(prefix + ".") if prefix else True)
                and k[len(prefix) + 1 if prefix else 0:] in ("weight", "bias")]
        if not keys:
            raise _checks.unknown_name(fn, "layer (no weight or bias directly under it)", str(prefix),
                                       sorted({k.rsplit(".", 1)[0] for k in params if "." in k}))
        found.append((prefix, keys))
    return found


def randomised_params(params: Params, keys: Sequence[str], generator: Optional[torch.Generator] = None) -> dict:
    """A new params dict with the tensors ``keys`` replaced by ``N(0, s^2)`` noise, ``s`` the tensor's own
    standard deviation (1 for a single element or a constant tensor); the others are the same objects.

    Drawn in the order of ``keys`` from ``generator`` (on its device, CPU without one), in each tensor's dtype.
    With the draw fixed (the same seed), the result is differentiable in ``params``, through ``s`` too.
    """
    out = dict(params)
    for key in keys:
        w = params[key]
        std = w.std() if w.numel() > 1 else torch.ones((), dtype=w.dtype, device=w.device)
        std = torch.where(std > 0, std, torch.ones_like(std))
        noise = torch.randn(w.shape, generator=generator, dtype=w.dtype,
                            device="cpu" if generator is None else generator.device).to(w.device)
        out[key] = noise * std
    return out


def _cascade(fn: str, model_fn: Any, params: Params, layers: Optional[Sequence[str]], layer_order: str,
             generator: Optional[torch.Generator]):
    """Yields ``(layer, params)`` with the layers randomised in ``layer_order``."""
    if layer_order not in _ORDERS:
        raise _checks.value_error(fn, f"layer_order, one of {list(_ORDERS)}", repr(layer_order))
    found = _randomisable(fn, model_fn, params, layers)
    if layer_order == "top_down":
        found = found[::-1]
    current = dict(params)
    for name, keys in found:
        current = randomised_params(params if layer_order == "independent" else current, keys, generator)
        yield name, current


def _mprt_result(names: List[str], rows: List[Tensor], original: Tensor) -> Mprt:
    similarity = torch.stack(rows)
    return Mprt(tuple(names), similarity, original, similarity.mean(dim=0), similarity[-1])


def _check_mprt(fn: str, method: Any, model_fn: Any, params: Any, x: Any, similarity_func: Any, generator: Any,
                **flags: Any) -> None:
    _maps.check_method(fn, method)
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _checks.check_input(fn, x, min_ndim=2)
    _checks.check_optional_callable(fn, "similarity_func", similarity_func)
    _checks.check_generator(fn, generator)
    _maps.check_flags(fn, **flags)


@_docs.fill
def mprt(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
         layers: Optional[Sequence[str]] = None, layer_order: str = "top_down",
         similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None, skip_layers: bool = False,
         abs: bool = True, normalise: bool = True, generator: Optional[torch.Generator] = None) -> Mprt:
    """Model parameter randomisation test: does the map change when the model's weights are randomised?

    The weights and biases of the layers are replaced by Gaussian noise one layer more at a time (a pure
    operation on the ``params`` dict, see :func:`randomised_params`), and each example's map of the
    randomised model is compared with its original map by ``similarity_func`` (Spearman rank correlation,
    as Quantus's ``MPRT``), both maps prepared per example (each divided by its own largest magnitude,
    then ``abs``). A map that depends on the model decorrelates; lower is better. Quantus re-initialises
    the layers with their modules' ``reset_parameters`` under a fixed seed; here the noise keeps each
    tensor's scale and comes from ``generator``. With a smooth ``similarity_func`` (e.g. a cosine similarity)
    and the noise fixed (a generator seeded the same), the scores are differentiable in ``params``; the default
    Spearman correlation ranks, so its value carries no gradient.

    Args:
      method: ``(model_fn, params, x, target) -> map``, e.g. ``tx.saliency``.
      {model_fn}
      {params}
      {x.batch}
      target: ``None`` (the original model's prediction, kept), an int or ``[B]`` ints.
      layers: Parameter-name prefixes of the layers, input side first. Default: None (every module of
        ``functionalize``'s model that holds a weight or bias itself).
      layer_order: ``"top_down"`` (output side first, cascading), ``"bottom_up"`` (cascading) or
        ``"independent"`` (one layer at a time, the others original). Default: ``"top_down"``.
      similarity_func: ``(map_a, map_b) -> [B]``. Default: None (:func:`spearman_correlation`).
      skip_layers: Compute only the last step (all layers randomised). Default: False.
      abs: Compare magnitudes. Default: True.
      normalise: Divide each map by its own largest magnitude first. Default: True.
      generator: Source of the random weights. Default: None (the global generator).

    Returns:
      :class:`Mprt` ``(layers, similarity [L, B], original [B], average [B], last [B])``.

    Raises:
      ValueError: an unknown layer prefix or ``layer_order``.
      TypeError: a non-callable ``method`` / ``similarity_func``, no ``layers`` for a model_fn not built by
        ``functionalize``, a bad generator.

    Example:
      >>> mprt(tx.saliency, fn, params, x, y, generator=torch.Generator().manual_seed(0)).last     # -> [B]

    Cost: ``L + 1`` calls of ``method`` (2 with ``skip_layers``).
    References: Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
    """
    fn = "mprt"
    _check_mprt(fn, method, model_fn, params, x, similarity_func, generator, skip_layers=skip_layers, abs=abs,
                normalise=normalise)
    similarity = spearman_correlation if similarity_func is None else similarity_func
    prepare = _prepared(abs, normalise)
    with torch.no_grad():
        index = _targets.resolve_index(model_fn(params, x), target, fn=fn)
    reference = prepare(method(model_fn, params, x, index))
    steps = list(_cascade(fn, model_fn, params, layers, layer_order, generator))
    chosen = steps[-1:] if skip_layers else steps
    rows = [similarity(reference, prepare(method(model_fn, p, x, index))) for _, p in chosen]
    return _mprt_result([name for name, _ in chosen], rows, similarity(reference, reference))


def _rms_normalised(m: Tensor) -> Tensor:
    flat = m.reshape(m.shape[0], -1)
    rms = flat.pow(2).mean(dim=1, keepdim=True).sqrt()
    return (flat / torch.where(rms == 0, torch.ones_like(rms), rms)).reshape(m.shape)


@_docs.fill
def smooth_mprt(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor, target: Target = None,
                *, layers: Optional[Sequence[str]] = None, layer_order: str = "bottom_up", nr_samples: int = 50,
                noise_magnitude: float = 0.1, similarity_func: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                skip_layers: bool = False, abs: bool = True, normalise: bool = True, batch_size: int = 64,
                generator: Optional[torch.Generator] = None) -> Mprt:
    """Smooth MPRT: :func:`mprt` on maps averaged over noisy copies of the input (Hedstroem et al., 2023).

    Each map (original model and every randomised one) is the mean of ``method`` over ``nr_samples``
    inputs ``x + N(0, s^2)``, ``s = noise_magnitude * (max(x_i) - min(x_i))`` per example, which removes the
    noise that makes plain MPRT unreliable; with ``normalise`` each map is divided by its root mean square
    (Quantus's ``normalise_by_average_second_moment_estimate``, per example). The same noise serves every
    model. Quantus compares the smoothed maps of the randomised models with the *unsmoothed* map given to
    it; here both sides are smoothed, as the paper does.

    Args:
      method: ``(model_fn, params, x, target) -> map``; called on stacks of noisy batches.
      {model_fn}
      {params}
      {x.batch}
      target: ``None`` (the original model's prediction, kept), an int or ``[B]`` ints.
      layers: Parameter-name prefixes, input side first. Default: None (as :func:`mprt`).
      layer_order: ``"bottom_up"``, ``"top_down"`` or ``"independent"``. Default: ``"bottom_up"``.
      nr_samples: Noisy copies per map. Default: 50.
      noise_magnitude: Noise scale relative to each example's value range. Default: 0.1.
      similarity_func: ``(map_a, map_b) -> [B]``. Default: None (:func:`spearman_correlation`).
      skip_layers: Compute only the last step. Default: False.
      abs: Compare magnitudes. Default: True.
      normalise: Divide each map by its root mean square. Default: True.
      batch_size: Noisy inputs per call of ``method``. Default: 64.
      generator: Source of the noise and of the random weights. Default: None (the global generator).

    Returns:
      :class:`Mprt` ``(layers, similarity [L, B], original [B], average [B], last [B])``.

    Raises:
      ValueError: an unknown layer prefix or ``layer_order``, a bad count or magnitude.
      TypeError: as :func:`mprt`.

    Example:
      >>> smooth_mprt(tx.saliency, fn, params, x, y, nr_samples=10).average          # -> [B]

    Cost: ``(L + 1) * nr_samples`` maps of the batch (``2 * nr_samples`` with ``skip_layers``).
    References: Hedstroem et al., "Sanity Checks Revisited: An Exploration to Repair the Model Parameter
      Randomisation Test", XAI in Action workshop, NeurIPS 2023.
    """
    fn = "smooth_mprt"
    _check_mprt(fn, method, model_fn, params, x, similarity_func, generator, skip_layers=skip_layers, abs=abs,
                normalise=normalise)
    _checks.check_positive_int(fn, "nr_samples", nr_samples)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    if isinstance(noise_magnitude, bool) or not isinstance(noise_magnitude, (int, float)) or noise_magnitude < 0:
        raise _checks.value_error(fn, "noise_magnitude >= 0", _checks.describe(noise_magnitude))
    similarity = spearman_correlation if similarity_func is None else similarity_func
    batch = x.shape[0]
    with torch.no_grad():
        index = _targets.resolve_index(model_fn(params, x), target, fn=fn)
    flat = x.reshape(batch, -1)
    scale = (noise_magnitude * (flat.amax(dim=1) - flat.amin(dim=1))).view(1, -1, *([1] * (x.ndim - 1)))
    device = torch.device("cpu") if generator is None else generator.device
    noisy = x[None] + scale * torch.randn((nr_samples, *x.shape), generator=generator, dtype=x.dtype,
                                          device=device).to(x.device)
    per_call = max(1, batch_size // batch)

    def smoothed(p: Params) -> Tensor:
        total: Optional[Tensor] = None
        for first in range(0, nr_samples, per_call):
            part = noisy[first:first + per_call]
            maps = method(model_fn, p, part.reshape(-1, *x.shape[1:]), index.repeat(part.shape[0]))
            summed = maps.reshape(part.shape[0], batch, *maps.shape[1:]).sum(dim=0)
            total = summed if total is None else total + summed
        assert total is not None
        mean = total / nr_samples
        mean = _rms_normalised(mean) if normalise else mean
        return mean.abs() if abs else mean

    reference = smoothed(params)
    steps = list(_cascade(fn, model_fn, params, layers, layer_order, generator))
    chosen = steps[-1:] if skip_layers else steps
    rows = [similarity(reference, smoothed(p)) for _, p in chosen]
    return _mprt_result([name for name, _ in chosen], rows, similarity(reference, reference))


def discrete_entropy(attribution: Tensor, *, n_bins: int = 100) -> Tensor:
    """Entropy (nats) of the histogram of each example's values in ``n_bins`` equal bins between its minimum
    and maximum, ``[B, ...] -> [B]`` (``numpy.histogram`` then ``scipy.stats.entropy``; a constant map: 0)."""
    flat = attribution.reshape(attribution.shape[0], -1).to(torch.float64)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    bins = ((flat - low) / span * n_bins).floor().clamp(0, n_bins - 1).long()
    counts = torch.zeros(flat.shape[0], n_bins, dtype=torch.float64, device=flat.device).scatter_add(
        1, bins, torch.ones_like(flat))  # out of place: under vmap the zeros are not batched, the bins are
    share = counts / counts.sum(dim=1, keepdim=True)
    return -(share * torch.log(torch.where(share > 0, share, torch.ones_like(share)))).sum(dim=1)


@_docs.fill
def efficient_mprt(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                   target: Target = None, *, layers: Optional[Sequence[str]] = None, layer_order: str = "bottom_up",
                   complexity_func: Optional[Callable[[Tensor], Tensor]] = None, n_bins: int = 100,
                   abs: bool = False, normalise: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """Efficient MPRT: the relative rise of the map's complexity when the whole model is randomised.

    ``(H(E_random) - H(E)) / H(E)`` per example, ``H`` the discrete entropy of the map's histogram
    (:func:`discrete_entropy`, ``n_bins`` bins) and ``E_random`` the map after randomising every layer
    (Quantus's ``EfficientMPRT``, its defaults: no normalisation, signed maps). Higher is better: a map
    that depends on the model becomes noisier. ``normalise`` divides each map by its root mean square.

    Args:
      method: ``(model_fn, params, x, target) -> map``.
      {model_fn}
      {params}
      {x.batch}
      target: ``None`` (the original model's prediction, kept), an int or ``[B]`` ints.
      layers: Parameter-name prefixes, input side first. Default: None (as :func:`mprt`).
      layer_order: The order the cascade randomises in (all of them in the end). Default: ``"bottom_up"``.
      complexity_func: ``[B, ...] -> [B]``. Default: None (:func:`discrete_entropy` with ``n_bins``).
      n_bins: Histogram bins of the default complexity. Default: 100 (Quantus's without a bin rule).
      abs: Take magnitudes first. Default: False.
      normalise: Divide each map by its root mean square first. Default: False.
      generator: Source of the random weights. Default: None (the global generator).

    Returns:
      ``[B]`` relative rises, float64 with the default complexity.

    Raises:
      ValueError: an unknown layer prefix or ``layer_order``, a bad ``n_bins``, ``"independent"`` order.
      TypeError: as :func:`mprt`.

    Example:
      >>> efficient_mprt(tx.saliency, fn, params, x, y, generator=torch.Generator().manual_seed(0))  # -> [B]

    Cost: two calls of ``method``.
    References: Hedstroem et al., "Sanity Checks Revisited: An Exploration to Repair the Model Parameter
      Randomisation Test", XAI in Action workshop, NeurIPS 2023.
    """
    fn = "efficient_mprt"
    _check_mprt(fn, method, model_fn, params, x, complexity_func, generator, abs=abs, normalise=normalise)
    _checks.check_positive_int(fn, "n_bins", n_bins)
    if layer_order == "independent":
        raise _checks.value_error(fn, "layer_order 'bottom_up' or 'top_down' (all layers randomised at the end)",
                                  repr(layer_order))
    with torch.no_grad():
        index = _targets.resolve_index(model_fn(params, x), target, fn=fn)

    def complexity(m: Tensor) -> Tensor:
        m = _rms_normalised(m) if normalise else m
        m = m.abs() if abs else m
        return discrete_entropy(m, n_bins=n_bins) if complexity_func is None else complexity_func(m)

    before = complexity(method(model_fn, params, x, index))
    *_, (_, randomised) = _cascade(fn, model_fn, params, layers, layer_order, generator)
    after = complexity(method(model_fn, randomised, x, index))
    return (after - before) / before
