"""Evaluation metrics for attribution maps: deletion / insertion, pointing games, a sanity check.

All functions are batched, run on ``x``'s device, and return tensors (a NamedTuple where there
is more than one result). Maps may be ``[B, H, W]``, ``[B, 1, H, W]`` or ``[B, C, H, W]`` (channels
are summed; pass ``attr.abs()`` first to rank by magnitude); maps of another spatial size than the
image or mask are resized bilinearly.

* :func:`deletion` / :func:`insertion`: the causal metrics of RISE (Petsiuk et al., 2018).
* :func:`pointing_game`: is the map's maximum on (or near) the object? (Zhang et al., 2016,
  with TorchRay's tolerance).
* :func:`energy_pointing_game`: the share of the map's positive mass on the object (Score-CAM).
* :func:`randomization_check`: the cascading parameter randomisation test (Adebayo et al., 2018).
* :func:`infidelity` / :func:`sensitivity_max`: fidelity to the model's local behaviour and
  robustness of the map to small input noise (Yeh et al., 2019), with captum's conventions.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target, module_of
from ..core.arguments import check_call
from .maps import as_map as _as_map
from .maps import as_mask as _as_mask
from .maps import broadcast_attribution as _broadcast_attribution
from .maps import check_method as _check_method
from .axiomatic import Completeness, completeness, input_invariance, non_sensitivity
from .complexity import complexity, effective_complexity, sparseness
from .faithfulness import (FaithfulnessCurve, Road, SensitivityN, faithfulness_correlation, faithfulness_estimate, irof,
                           monotonicity, monotonicity_correlation, pixel_flipping, region_perturbation, road,
                           selectivity, sensitivity_n, sufficiency)
from .localisation import (attribution_localisation, auc, focus, relevance_mass_accuracy, relevance_rank_accuracy,
                           top_k_intersection)
from . import robustness as _robustness
from .randomisation import (Mprt, discrete_entropy, efficient_mprt, mprt, random_logit, randomised_params,
                            smooth_mprt, spearman_correlation, ssim)
from .robustness import (avg_sensitivity, consistency, continuity, local_lipschitz_estimate, max_sensitivity,
                         relative_input_stability, relative_output_stability, relative_representation_stability)
from .text_metrics import Aopc, aopc_comprehensiveness, aopc_sufficiency, auprc, token_f1, token_iou

__all__ = [
    "Curve", "deletion", "insertion", "gaussian_blur",
    "PointingGame", "pointing_game", "energy_pointing_game",
    "Randomization", "randomization_check", "spearman",
    "infidelity", "sensitivity_max", "uniform_perturbation",
    "complexity", "effective_complexity", "sparseness",
    "attribution_localisation", "auc", "focus", "relevance_mass_accuracy", "relevance_rank_accuracy",
    "top_k_intersection",
    "Completeness", "completeness", "non_sensitivity", "input_invariance",
    "random_logit", "ssim",
    "FaithfulnessCurve", "SensitivityN", "Road", "pixel_flipping", "region_perturbation", "selectivity",
    "monotonicity", "monotonicity_correlation", "faithfulness_estimate", "faithfulness_correlation",
    "sensitivity_n", "irof", "road", "sufficiency",
    "random_logit", "ssim", "Mprt", "mprt", "smooth_mprt", "efficient_mprt", "spearman_correlation",
    "randomised_params", "discrete_entropy",
    "avg_sensitivity", "max_sensitivity", "local_lipschitz_estimate", "continuity", "consistency",
    "relative_input_stability", "relative_output_stability", "relative_representation_stability",
    "Aopc", "aopc_comprehensiveness", "aopc_sufficiency", "token_f1", "token_iou", "auprc",
]


class Curve(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
      curve: ``[B, steps + 1]`` scores, from 0 pixels changed to all pixels changed.
      auc: ``[B]`` area under the curve, with the fraction of changed pixels on the x axis (0 to 1).
      fraction: ``[steps + 1]`` that fraction for every point of the curve.
    """

    curve: Tensor
    auc: Tensor
    fraction: Tensor


class PointingGame(NamedTuple):
    """Result of :func:`pointing_game`.

    Attributes:
      hit: ``[B]`` bool, True where the map's maximum lies within the tolerance of the mask.
      point: ``[B, 2]`` int64 ``(row, col)`` of each map's maximum (the first one on ties).
    """

    hit: Tensor
    point: Tensor


class Randomization(NamedTuple):
    """Result of :func:`randomization_check`.

    Attributes:
      layers: The randomised layers, in the order they were randomised (output side first).
      correlation: ``[L, B]`` Spearman rank correlation between the original map and the map after
        randomising ``layers[: l + 1]``.
    """

    layers: tuple
    correlation: Tensor


# --------------------------------------------------------------------------------------- helpers
def gaussian_blur(x: Tensor, *, sigma: float = 5.0, kernel_size: int = 11) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` images with reflected borders.

    The insertion metric's default substrate (RISE blurs with a kernel of size 11 and sigma 5).

    Args:
      x: ``[B, C, H, W]`` images.
      sigma: Standard deviation in pixels. Default: 5.
      kernel_size: Odd kernel width, clipped to the image size. Default: 11.

    Returns:
      ``[B, C, H, W]``, same dtype and device as ``x``; differentiable in ``x``.
    """
    fn = "gaussian_blur"
    _checks.check_input(fn, x, ndim=4)
    _checks.check_positive_int(fn, "kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise _checks.value_error(fn, "an odd kernel_size", _checks.describe(kernel_size))
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise _checks.value_error(fn, "sigma > 0", _checks.describe(sigma))
    half = min(kernel_size // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    flat = x.reshape(-1, 1, *x.shape[2:])
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.view(-1, channels, *x.shape[2:])


def _substrate(fn: str, substrate: Any, x: Tensor, default: Callable[[Tensor], Tensor]) -> Tensor:
    if substrate is None:
        return default(x)
    if isinstance(substrate, Tensor):
        if substrate.shape != x.shape and substrate.ndim > x.ndim:
            raise _checks.value_error(fn, f"substrate broadcastable to x's shape {tuple(x.shape)}",
                                      _checks.describe(substrate))
        try:
            return substrate.to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError:
            raise _checks.value_error(fn, f"substrate broadcastable to x's shape {tuple(x.shape)}",
                                      _checks.describe(substrate)) from None
    if callable(substrate):
        result = substrate(x)
        if not isinstance(result, Tensor) or result.shape != x.shape:
            raise _checks.value_error(fn, f"the substrate callable to return x's shape {tuple(x.shape)}",
                                      _checks.describe(result))
        return result
    raise _checks.type_error(fn, "substrate: None, a tensor, or a callable x -> tensor", _checks.describe(substrate))


def _curve(fn: str, model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target,
           start: Tensor, finish: Tensor, step: Optional[int], batch_size: int, probabilities: bool,
           progress: bool) -> Curve:
    """Replace ``start`` by ``finish`` pixel by pixel, most attributed first, and score each image."""
    batch, channels, height, width = x.shape
    pixels = height * width
    step = width if step is None else step
    num_steps = -(-pixels // step)
    counts = (torch.arange(num_steps + 1, device=x.device) * step).clamp(max=pixels)  # [S + 1]

    saliency = attribution.reshape(batch, pixels)
    order = torch.argsort(saliency, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)  # rank[b, p]: when pixel p changes

    def score(out: Tensor) -> Tensor:
        return torch.softmax(out, dim=1) if probabilities else out

    fixed_class = target is None or isinstance(target, (int, Tensor))
    index: Optional[Tensor] = None
    if target is None:  # the class predicted for the unperturbed image, kept along the curve
        with torch.no_grad():
            index = _targets.resolve_index(model_fn(params, x), None, fn=fn)

    per_forward = max(1, batch_size // batch)
    chunks = range(0, num_steps + 1, per_forward)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=fn, leave=False, unit="chunk")
    scores: List[Tensor] = []
    for first in chunks:
        ks = counts[first:first + per_forward]  # [s]
        changed = (rank[:, None, :] < ks[None, :, None]).view(batch, -1, 1, height, width)  # [B, s, 1, H, W]
        images = torch.where(changed, finish[:, None], start[:, None]).reshape(-1, channels, height, width)
        out = score(model_fn(params, images))
        if not fixed_class:  # a callable target sees the flattened [B * s] batch
            values = _targets.resolve(out, target, fn=fn)
        else:
            if index is None:  # checks the range against the output before going on
                index = _targets.resolve_index(out.view(batch, ks.shape[0], *out.shape[1:])[:, 0], target, fn=fn)
            values = _targets.resolve(out, index.repeat_interleave(ks.shape[0]), fn=fn)
        scores.append(values.view(batch, -1))
    curve = torch.cat(scores, dim=1)
    fraction = counts.to(curve.dtype) / pixels
    return Curve(curve, torch.trapezoid(curve, fraction, dim=1), fraction)


def _check_curve_args(fn, model_fn, params, x, attribution, target, step, batch_size) -> Tensor:
    check_call(fn, model_fn, params, x, target, ndim=4)
    _checks.check_positive_int(fn, "step", step, allow_none=True)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    return _as_map(fn, "attribution", attribution, x.shape[0], x.shape[2:])


# --------------------------------------------------------------------------- deletion / insertion
@_docs.fill
def deletion(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
             step: Optional[int] = None, substrate: Union[None, Tensor, Callable[[Tensor], Tensor]] = None,
             batch_size: int = 64, probabilities: bool = True, progress: bool = False) -> Curve:
    """Deletion curve: the class score while the most attributed pixels are removed first.

    Pixels are ranked by ``attribution`` (largest first; ties in pixel order) and replaced by the
    substrate (zeros by default) ``step`` at a time; point ``k`` of the curve scores the image with
    the top ``k * step`` pixels removed. A good map makes the score drop fast: lower AUC is better.

    Args:
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      x: Images ``[B, C, H, W]``.
      {attribution.map}
      target: ``None`` (the class predicted for the unperturbed image, kept fixed along the curve),
        an int, ``[B]`` ints, or a callable ``out -> [N]`` (called on the flattened perturbed batch).
      step: Pixels changed per step. Default: ``W`` (one image row's worth, as RISE's 224 on 224 x 224).
      substrate: What removed pixels become: a tensor broadcastable to ``x``, or ``x -> tensor``.
        Default: zeros.
      batch_size: Images per forward pass, a memory cap (at least one step of the whole batch).
        Default: 64.
      probabilities: Score the softmax of the output (as RISE) rather than the raw output; a
        callable target then receives probabilities. Default: True.
      progress: Show a tqdm bar over the forward passes. Default: False.

    Returns:
      :class:`Curve` ``(curve [B, steps + 1], auc [B], fraction [steps + 1])`` with
      ``steps = ceil(H * W / step)``. Differentiable w.r.t. ``x`` and ``params`` (not w.r.t. the
      ranking, i.e. ``attribution``).

    Raises:
      ValueError: a map with another batch size, a target out of range, bad ``step`` or ``batch_size``.
      TypeError: non-float ``x`` or ``attribution``, a bad target type.

    Example:
      >>> maps = grad_cam(fn, params, x, y, layer="features")          # [16, 1, 64, 64]
      >>> deletion(fn, params, x, maps, y, step=64).auc.shape            # -> [16]

    Cost: ``steps + 1`` forward passes of the whole batch (``B * (steps + 1) / batch_size`` calls),
    plus one for a ``None`` target; memory of ``batch_size`` images.
    References: Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of Black-box
      Models", BMVC 2018.
    """
    fn = "deletion"
    maps = _check_curve_args(fn, model_fn, params, x, attribution, target, step, batch_size)
    finish = _substrate(fn, substrate, x, torch.zeros_like)
    return _curve(fn, model_fn, params, x, maps, target, x, finish, step, batch_size, probabilities, progress)


def insertion(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
              step: Optional[int] = None, substrate: Union[None, Tensor, Callable[[Tensor], Tensor]] = None,
              batch_size: int = 64, probabilities: bool = True, progress: bool = False) -> Curve:
    """Insertion curve: the class score while the most attributed pixels are put back first.

    Starts from the substrate (a Gaussian blur of ``x``, sigma 5, by default) and restores
    ``x``'s pixels ``step`` at a time, largest attribution first. A good map makes the score rise
    fast: higher AUC is better. Arguments, result and cost as :func:`deletion`.

    Example:
      >>> insertion(fn, params, x, maps, y, step=64).curve.shape          # [16, 3, 64, 64] -> [16, 65]

    References: Petsiuk et al., "RISE", BMVC 2018.
    """
    fn = "insertion"
    maps = _check_curve_args(fn, model_fn, params, x, attribution, target, step, batch_size)
    start = _substrate(fn, substrate, x, gaussian_blur)
    return _curve(fn, model_fn, params, x, maps, target, start, x, step, batch_size, probabilities, progress)


# --------------------------------------------------------------------------------- pointing games
@_docs.fill
def pointing_game(attribution: Tensor, mask: Tensor, *, tolerance: float = 15) -> PointingGame:
    """Pointing game: a hit when the map's maximum lies within ``tolerance`` pixels of the object.

    As in TorchRay, the point is the (first) maximum of the map, resized to the mask's size, and
    it hits when some mask pixel is within Euclidean distance ``tolerance`` of it
    (``tolerance=0``: the point itself must be on the mask). An empty mask is a miss.

    Args:
      {attribution.map}
      {mask.object}
      tolerance: In pixels of the mask. Default: 15 (TorchRay's, meant for ~224-pixel images;
        scale it with the image size).

    Returns:
      :class:`PointingGame` ``(hit [B] bool, point [B, 2] (row, col))``. The accuracy is
      ``hit.float().mean()``.

    Raises:
      ValueError: shapes that do not match, a negative tolerance.
      TypeError: a non-tensor or integer map.

    Example:
      >>> pointing_game(grad_cam(fn, params, x, y, layer="features"), masks).hit.float().mean()

    Cost: one argmax and one ``[B, H, W]`` distance test.
    References: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016;
      Fong et al., TorchRay (``torchray.benchmark.pointing_game``).
    """
    fn = "pointing_game"
    masks = _as_mask(fn, mask)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise _checks.value_error(fn, "tolerance >= 0 (pixels)", _checks.describe(tolerance))
    maps = _as_map(fn, "attribution", attribution, masks.shape[0], masks.shape[1:])[:, 0]
    height, width = masks.shape[1:]
    flat = maps.reshape(maps.shape[0], -1).argmax(dim=1)
    row, col = flat // width, flat % width
    rows = torch.arange(height, device=masks.device).view(1, -1, 1)
    cols = torch.arange(width, device=masks.device).view(1, 1, -1)
    near = (rows - row.view(-1, 1, 1).to(masks.device)) ** 2 + (cols - col.view(-1, 1, 1).to(masks.device)) ** 2
    hit = (masks & (near <= tolerance ** 2)).flatten(1).any(dim=1)
    return PointingGame(hit, torch.stack([row, col], dim=1))


@_docs.fill
def energy_pointing_game(attribution: Tensor, mask: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Energy-based pointing game: the share of the map's positive mass inside the mask.

    ``sum(relu(a) * mask) / sum(relu(a))`` per example (Score-CAM's "proportion"), in [0, 1];
    a map with no positive value scores 0. Differentiable in ``attribution``.

    Args:
      {attribution.map}
      {mask.object}
        A bounding-box mask as in the paper, or the object's own mask.
      eps: Floor of the denominator. Default: 1e-12.

    Returns:
      ``[B]`` proportions, in the map's dtype.

    Raises:
      ValueError / TypeError: as :func:`pointing_game`.

    Example:
      >>> energy_pointing_game(maps, masks).mean()         # [16, 1, 64, 64], [16, 1, 64, 64] -> []

    References: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
      Networks", CVPR workshops 2020.
    """
    fn = "energy_pointing_game"
    masks = _as_mask(fn, mask)
    maps = torch.relu(_as_map(fn, "attribution", attribution, masks.shape[0], masks.shape[1:])[:, 0])
    inside = (maps * masks.to(maps.dtype)).flatten(1).sum(dim=1)
    return inside / maps.flatten(1).sum(dim=1).clamp_min(eps)


# ------------------------------------------------------------------------------------ sanity check
def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of ``[B, ...]`` tensors per example, ``[B]`` (ties ranked by position)."""
    def ranks(t: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1)
        return torch.argsort(torch.argsort(flat, dim=1, stable=True), dim=1).to(torch.float64)
    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    corr = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return corr.to(a.dtype if a.is_floating_point() else torch.float32)


def _default_layers(fn: str, model_fn: Any, params: Params) -> List[str]:
    module = module_of(model_fn)
    if module is None:
        raise _checks.type_error(fn, "layers (parameter-name prefixes, output side first) for a model_fn "
                                 "not built by functionalize", "None")
    names = [name for name, child in module.named_children() if any(True for _ in child.parameters())]
    return names[::-1]


@_docs.fill
def randomization_check(method: Callable[..., Tensor], model_fn: ModelFn, params: Params, x: Tensor,
                        target: Target = None, *, layers: Optional[Sequence[str]] = None,
                        generator: Optional[torch.Generator] = None, absolute: bool = True) -> Randomization:
    """Cascading model-parameter randomisation (Adebayo et al., 2018).

    Randomises the weights and biases of ``layers`` one more at a time, from the output side
    towards the input, recomputes the map and reports its Spearman rank correlation with the map
    of the trained model. A map that *depends on the model* decorrelates quickly; one that stays
    correlated behaves like an edge detector. Each replaced tensor ``w`` becomes
    ``N(0, std(w)^2)`` noise (``N(0, 1)`` for a single element); buffers (e.g. BatchNorm
    statistics) are kept. ``target`` is fixed to the trained model's prediction when ``None``.

    Args:
      method: ``(model_fn, params, x, target) -> map``, e.g. ``functools.partial(grad_cam, layer="features")``.
      {model_fn}
      {params}
      {x.batch}
      target: ``None``, int, ``[B]`` ints or a callable, as for the method.
      layers: Parameter-name prefixes to randomise, in order (output side first). Default: the
        top-level children of ``functionalize``'s module that hold parameters, last first.
      generator: Source of the random weights. Default: the global RNG.
      absolute: Correlate ``|map|`` (as the paper's main figures). Default: True.

    Returns:
      :class:`Randomization` ``(layers, correlation [L, B])``.

    Raises:
      ValueError: a prefix that matches no weight or bias.
      TypeError: a non-callable ``method``, a bad generator.

    Example:
      >>> check = randomization_check(partial(grad_cam, layer="features"), fn, params, x, y)
      >>> check.correlation.mean(1)      # [L]: should fall towards 0

    Cost: ``L + 1`` calls of ``method``.
    References: Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
    """
    fn = "randomization_check"
    _check_method(fn, method)
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _checks.check_input(fn, x, min_ndim=2)
    _checks.check_generator(fn, generator)
    _checks.check_bool(fn, "absolute", absolute)
    names = list(_default_layers(fn, model_fn, params) if layers is None else layers)

    def weights_of(prefix: str) -> List[str]:
        return [k for k in params if (k.startswith(prefix + ".") or k == prefix)
                and k.rsplit(".", 1)[-1] in ("weight", "bias")]

    for prefix in names:
        if not isinstance(prefix, str) or not weights_of(prefix):
            raise _checks.unknown_name(fn, "layer prefix (no weight or bias under it)", str(prefix),
                                       sorted({k.rsplit(".", 1)[0] for k in params}))
    if target is None:
        with torch.no_grad():
            target = model_fn(params, x).argmax(dim=1)

    def prepared(m: Tensor) -> Tensor:
        return m.abs() if absolute else m

    reference = prepared(method(model_fn, params, x, target))
    current = dict(params)
    rows = []
    for prefix in names:
        for key in weights_of(prefix):
            w = params[key]
            std = w.std() if w.numel() > 1 else torch.ones((), dtype=w.dtype, device=w.device)
            noise = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu" if generator is None
                                else generator.device).to(w.device)
            current[key] = noise * std
        rows.append(spearman(reference, prepared(method(model_fn, current, x, target))))
    return Randomization(tuple(names), torch.stack(rows))


# --------------------------------------------------------------------- infidelity / sensitivity
def _sample_counts(total: int, per_chunk: int) -> List[int]:
    return [min(per_chunk, total - first) for first in range(0, total, per_chunk)]


@_docs.fill
def infidelity(model_fn: ModelFn, params: Params, x: Tensor, attribution: Tensor, target: Target = None, *,
               perturb_fn: Callable[[Tensor, Optional[torch.Generator]], Any], n_perturb_samples: int = 10,
               normalize: bool = False, batch_size: int = 64,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Explanation infidelity: how badly ``I . attribution`` predicts the score change ``f(x) - f(x')``.

    For each example and each of ``n`` perturbations ``(I, x')`` drawn by ``perturb_fn``
    (typically ``x' = x - I``), compare the attribution's linear prediction ``a = sum(I * attr)``
    with the change of the target score ``b = f(x) - f(x')``, and average the squared error:
    ``infidelity = mean_n (a - b)^2`` (Yeh et al., 2019). With ``normalize=True`` the attribution
    is first rescaled by the least-squares factor ``beta = sum_n(a b) / sum_n(a^2)`` (1 in the
    denominator's place when it is 0), so the score does not depend on the map's scale:
    ``mean_n (beta a - b)^2``. Lower is better. The convention is captum's
    (``captum.metrics.infidelity``): the same perturbations give the same numbers.

    Args:
      {model_fn}
      {params}
      {x.batch}
      attribution: ``[B, ...]`` map broadcastable to ``x``'s shape (e.g. ``[B, 1, H, W]`` for
        ``[B, C, H, W]`` images: the same value for every channel of a pixel).
      target: ``None`` (the class predicted for ``x``, kept for the perturbed inputs), an int,
        ``[B]`` ints, or a callable ``out -> [N]`` (called on the flattened perturbed batch too).
      perturb_fn: ``(x, generator) -> (perturbation, perturbed_x)``, both of ``x``'s shape
        ``[B, ...]``; called once per sample, in order, with this call's ``generator``. Draw
        every random number from ``generator`` to make the score reproducible.
      {n_perturb_samples}
      normalize: Rescale the attribution by the optimal ``beta`` first. Default: False.
      batch_size: Perturbed inputs per forward pass, a memory cap (at least one sample of the
        whole batch per pass). Default: 64.
      generator: Passed to ``perturb_fn``. Default: None.

    Returns:
      ``[B]`` infidelity per example, in ``x``'s dtype. Differentiable w.r.t. ``params``, ``x``
      and ``attribution`` (usable as a training loss).

    Raises:
      ValueError: a map that does not broadcast to ``x``, a perturbation of the wrong shape, a
        target out of range, bad ``n_perturb_samples`` / ``batch_size``.
      TypeError: a non-callable ``perturb_fn``, a ``perturb_fn`` that does not return a pair of
        tensors, non-float inputs, a bad generator.

    Example:
      >>> def gaussian(x, gen):
      ...     noise = 0.01 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
      ...     return noise, x - noise
      >>> attr = saliency(fn, params, x, y)                                 # [16, 3, 32, 32]
      >>> infidelity(fn, params, x, attr, y, perturb_fn=gaussian)           # -> [16]

    Cost: one forward of ``x`` plus ``n_perturb_samples`` forwards of the batch, grouped into
    passes of at most ``batch_size`` inputs; memory of ``batch_size`` inputs (and the autograd
    graph of every pass when differentiated).
    References: Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.
    """
    fn = "infidelity"
    target = check_call(fn, model_fn, params, x, target, min_ndim=1)
    if not callable(perturb_fn):
        raise _checks.type_error(fn, "perturb_fn, a callable (x, generator) -> (perturbation, perturbed_x)",
                                 _checks.describe(perturb_fn))
    _checks.check_positive_int(fn, "n_perturb_samples", n_perturb_samples)
    _checks.check_positive_int(fn, "batch_size", batch_size)
    _checks.check_bool(fn, "normalize", normalize)
    _checks.check_generator(fn, generator)
    batch = x.shape[0]
    attr = _broadcast_attribution(fn, attribution, x)

    out = model_fn(params, x)
    if target is None or isinstance(target, (int, Tensor)):
        target = _targets.resolve_index(out, target, fn=fn)
    reference = _targets.resolve(out, target, fn=fn)  # [B]

    def perturbation() -> tuple:
        result = perturb_fn(x, generator)
        if (not isinstance(result, (tuple, list)) or len(result) != 2
                or not all(isinstance(t, Tensor) for t in result)):
            raise _checks.type_error(fn, "perturb_fn to return a pair (perturbation, perturbed_x) of tensors",
                                     _checks.describe(result))
        for name, t in zip(("perturbation", "perturbed_x"), result):
            if t.shape != x.shape:
                raise _checks.value_error(fn, f"perturb_fn's {name} of x's shape {tuple(x.shape)}",
                                          _checks.describe(t))
        return result[0], result[1]

    per_forward = max(1, batch_size // batch)
    predicted, change = [], []  # a = sum(I * attr), b = f(x) - f(x'), each [s, B] per chunk
    for count in _sample_counts(n_perturb_samples, per_forward):
        pairs = [perturbation() for _ in range(count)]
        noise = torch.stack([p[0] for p in pairs])  # [s, B, ...]
        inputs = torch.cat([p[1] for p in pairs])  # [s * B, ...]
        out = model_fn(params, inputs)
        if isinstance(target, Tensor):
            scores = _targets.resolve(out, target.repeat(count), fn=fn)
        else:  # a callable sees the flattened perturbed batch
            scores = _targets.resolve(out, target, fn=fn)
        change.append(reference[None] - scores.view(count, batch))
        predicted.append((noise * attr[None]).reshape(count, batch, -1).sum(dim=2))
    a, b = torch.cat(predicted), torch.cat(change)  # [n, B]
    if normalize:
        aa, ab = (a * a).sum(0), (a * b).sum(0)
        beta = ab / torch.where(aa == 0, torch.ones_like(aa), aa)
        errors = beta * beta * aa - 2 * beta * ab + (b * b).sum(0)
    else:
        errors = ((a - b) ** 2).sum(0)
    return (errors / n_perturb_samples).to(x.dtype)


def uniform_perturbation(x: Tensor, radius: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """``x + delta`` with ``delta`` uniform in the L-infinity ball of ``radius`` (``[B, ...]`` -> same).

    The draw of :func:`sensitivity_max`: ``delta = radius * (2 u - 1)``, ``u = torch.rand(x.shape,
    generator=generator)`` drawn on the generator's device (CPU without one) in ``x``'s dtype.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return x + radius * (2 * u - 1)


@_docs.fill
def sensitivity_max(explain_fn: Callable[[Tensor], Tensor], x: Tensor, *, perturb_radius: float = 0.02,
                    n_perturb_samples: int = 10, generator: Optional[torch.Generator] = None) -> Tensor:
    """Max-sensitivity: the largest relative change of the map under a small input perturbation.

    ``max_k ||E(x + delta_k) - E(x)|| / ||E(x)||`` per example, with ``delta_k`` uniform in the
    L-infinity ball of radius ``perturb_radius`` (see :func:`uniform_perturbation`), Frobenius
    norms over each example's map (a zero ``||E(x)||`` counts as 1). Lower is more robust. The
    convention is captum's (``captum.metrics.sensitivity_max``): the same perturbations give the
    same numbers. The computation is :func:`max_sensitivity`'s (Quantus's convention, an explanation
    ``method`` first, 200 draws of radius 0.2 by default), called with ``explain_fn`` on one draw at a time.

    Args:
      explain_fn: ``x -> map``, e.g. ``lambda x: saliency(fn, params, x, y)``. Always called
        with a batch of ``x``'s shape ``[B, ...]`` (example ``i`` stays at row ``i``), so a
        ``[B]`` target bound into the closure stays aligned.
      {x.batch}
      perturb_radius: Half-width of the uniform noise. Default: 0.02.
      {n_perturb_samples}
      generator: Source of the noise. Default: the global RNG.

    Returns:
      ``[B]`` max-sensitivity per example, in the map's dtype. Differentiable wherever
      ``explain_fn`` is.

    Raises:
      ValueError: bad ``perturb_radius`` or ``n_perturb_samples``, a map whose batch is not ``B``
        or whose shape changes between calls.
      TypeError: a non-callable ``explain_fn``, a map that is not a floating-point tensor.

    Example:
      >>> explain = lambda xx: grad_cam(fn, params, xx, y, layer="features")
      >>> sensitivity_max(explain, x, generator=gen)                       # [16, 3, 64, 64] -> [16]

    Cost: ``n_perturb_samples + 1`` calls of ``explain_fn`` on the batch.
    References: Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.
    """
    fn = "sensitivity_max"
    if not callable(explain_fn):
        raise _checks.type_error(fn, "explain_fn, a callable x -> map", _checks.describe(explain_fn))
    _checks.check_input(fn, x, min_ndim=1)
    if isinstance(perturb_radius, bool) or not isinstance(perturb_radius, (int, float)) or not perturb_radius >= 0:
        raise _checks.value_error(fn, "perturb_radius >= 0", _checks.describe(perturb_radius))
    _checks.check_positive_int(fn, "n_perturb_samples", n_perturb_samples)
    _checks.check_generator(fn, generator)
    batch = x.shape[0]

    def explain(inputs: Tensor) -> Tensor:
        result = explain_fn(inputs)
        if not isinstance(result, Tensor) or not result.is_floating_point():
            raise _checks.type_error(fn, "explain_fn to return a floating-point tensor", _checks.describe(result))
        if result.ndim == 0 or result.shape[0] != batch:
            raise _checks.value_error(fn, f"explain_fn to return a map of batch {batch}", _checks.describe(result))
        return result.reshape(batch, -1)

    reference = explain(x)
    return _robustness._sensitivity(
        fn, lambda inputs: explain(inputs[0])[None], reference, x,
        lambda count: uniform_perturbation(x, perturb_radius, generator)[None], [1] * n_perturb_samples,
        lambda a, b: b - a, lambda d: d.norm(dim=-1), lambda r: r.norm(dim=-1), None, "max")
