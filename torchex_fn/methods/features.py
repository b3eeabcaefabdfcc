"""Feature family: attribution by switching groups of input elements between the input and a baseline.

Every method here is a cooperative game over the ``K`` features that ``feature_mask`` defines: a
coalition ``z`` (a 0/1 vector over features) stands for the input whose elements of present features
(``z_k = 1``) are ``x`` and whose other elements are ``baseline``, and its value is the model's score
of that input. The methods differ in which coalitions they evaluate and how they combine the values:

* :func:`feature_ablation`: every feature removed alone, ``v(all) - v(all but k)``;
* :func:`feature_permutation`: every feature alone taken from another example of the batch;
* :func:`shapley_values`: all ``2^K`` coalitions, the exact Shapley values;
* :func:`shapley_value_sampling`: random permutations (Castro et al.), an unbiased estimate of them;
* :func:`kernel_shap`: random coalitions and a weighted linear regression (Lundberg and Lee);
* :func:`lime`: random coalitions weighted by the perturbed input's closeness to ``x`` (Ribeiro et al.).

The conventions are captum's (``FeatureAblation``, ``ShapleyValues``, ``ShapleyValueSampling``,
``KernelShap``, ``Lime``, ``FeaturePermutation``), and so are the draws from ``generator``:
:func:`shapley_value_sampling` shares each permutation with every example of the batch (as captum),
:func:`kernel_shap` and :func:`lime` draw each example's coalitions after the previous example's (as
captum, which fits one example at a time), and :func:`feature_permutation` draws one permutation of
the batch per feature. Under ``torch.func.vmap`` the draws of a ``generator`` are made outside the
vmapped computation (``core.checks.draws``): every member gets the draws of one call.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple, cast

import torch
from torch import Tensor

from ..core import checks as _checks, inputs as _inputs
from ..core import targets as _targets
from ..core import docs as _docs
from ..core.types import ModelFn, Params, Target
from ..core.arguments import check_call
from ..core.capture import intermediates, resolve_layers

__all__ = ["feature_ablation", "feature_permutation", "shapley_values", "shapley_value_sampling", "kernel_shap",
           "lime"]

MAX_EXACT_FEATURES = 20          # shapley_values: 2^20 coalitions per example at most
MAX_REGRESSION_FEATURES = 10000  # kernel_shap / lime: the size of the linear model (captum warns there)
_INF_WEIGHT = 1e6                # captum KernelShap's weight of the empty and the full coalition
_DRAW_BLOCK = 64                 # LIME's coalitions are drawn in blocks of this many


def _acc_dtype(value: Tensor) -> torch.dtype:
    """Float64 for the sums and the regressions (tiny tensors), except where the device has none."""
    return torch.float32 if value.device.type == "mps" else torch.float64


def _feature_ids(fn: str, feature_mask: Any, value: Tensor) -> Tuple[Tensor, int]:
    """Feature indices ``0 .. K-1`` per element, ``[1 or B, *input]`` (an expanded view), and ``K``."""
    shape = tuple(value.shape)
    if feature_mask is None:
        count = math.prod(shape[1:])
        return torch.arange(count, device=value.device).reshape(1, *shape[1:]), count
    if not isinstance(feature_mask, Tensor):
        raise _checks.type_error(fn, "feature_mask, an integer tensor of feature ids broadcastable to x, or None",
                                 _checks.describe(feature_mask), "Build one with e.g. `tx.masks.grid((H, W), 8)`.")
    if feature_mask.dtype == torch.bool or feature_mask.is_floating_point() or feature_mask.is_complex():
        raise _checks.type_error(fn, "feature_mask of an integer dtype (one feature id per element)",
                                 _checks.describe(feature_mask), "Convert it, e.g. `mask.long()`.")
    try:
        ok = feature_mask.ndim <= len(shape) and torch.broadcast_shapes(feature_mask.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise _checks.value_error(fn, f"feature_mask broadcastable to x's shape {list(shape)}",
                                  _checks.describe(feature_mask),
                                  "Pass one mask for the batch ([*input] or broadcastable, e.g. [H, W] for images "
                                  "[B, C, H, W]) or one per example ([B, *input] or e.g. [B, 1, H, W]).")
    # The one value read per call: the number of features sizes the computation. It is read on the
    # mask's own device, so a mask built on the host (tx.masks) costs no device synchronisation.
    ids, inverse = torch.unique(feature_mask, sorted=True, return_inverse=True)
    inverse = inverse.to(value.device, non_blocking=True)
    inverse = inverse.reshape((1,) * (len(shape) - feature_mask.ndim) + tuple(feature_mask.shape))
    return inverse.expand(inverse.shape[0], *shape[1:]), int(ids.numel())


def _to_elements(phi: Tensor, fid: Tensor, value: Tensor) -> Tensor:
    """Per-feature values ``[B, K]`` spread over the elements: ``[B, *input]`` of ``value``'s dtype."""
    batch = value.shape[0]
    index = fid.expand(batch, *value.shape[1:]).reshape(batch, -1)
    return phi.gather(1, index).reshape(value.shape).to(value.dtype)


class _Game:
    """The value of coalitions: ``game(z)`` with ``z`` ``[n, K]`` (bool) gives scores ``[B, n]``.

    A coalition's input keeps ``x`` where its features are present and takes ``baseline`` elsewhere.
    Forwards hold ``max(1, batch_size // B)`` coalitions times all ``B`` examples, or one coalition
    times ``batch_size`` examples when ``B > batch_size`` (as :func:`torchex_fn.occlusion`).
    """

    def __init__(self, fn: str, model_fn: ModelFn, params: Params, x: Any, target: Any, *, feature_mask: Any,
                 baseline: Any, batch_size: int, generator: Any = None, layer: Any = None) -> None:
        self.layer: Optional[str] = None
        if layer is None:
            target = check_call(fn, model_fn, params, x, target, layer_option=False)
            key, value = _inputs.perturbed_entry(fn, x)
        else:
            # captum's LayerFeatureAblation / LayerFeaturePermutation: the features are elements of the
            # layer's output on x, and each coalition's forward runs x with that output replaced
            target = check_call(fn, model_fn, params, x, target, layer=layer)
            names, _ = resolve_layers(fn, model_fn, layer)
            if len(set(names)) != 1:
                raise _checks.value_error(fn, "one layer (a name or a module)", _checks.describe(layer))
            self.layer = names[0]
            _, acts = intermediates(model_fn, layers=[self.layer], fn=fn)(params, x)
            key, value = None, acts[self.layer]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise _checks.type_error(fn, f"layer {self.layer!r} with a floating-point tensor output",
                                         _checks.describe(value))
        if value.is_complex():
            raise _checks.type_error(fn, "x of a real floating-point dtype", _checks.describe(value))
        self.base = cast(Tensor, _inputs.baseline_input(fn, baseline, value))    # [B, *input]
        _checks.check_positive_int(fn, "batch_size", batch_size)
        _checks.check_generator(fn, generator)
        _checks.check_generator_device(fn, generator, value)
        fid, self.count = _feature_ids(fn, feature_mask, value)
        self.fid = fid.contiguous()                                             # [1 or B, *input]
        self.fid_flat = self.fid.reshape(-1)
        self.fn, self.model_fn, self.params, self.x, self.key, self.value = fn, model_fn, params, x, key, value
        self.target = target
        self.batch = batch = value.shape[0]
        self.acc = _acc_dtype(value)
        self.output = _targets.selector(model_fn)
        self.by_index = not _targets.is_callable(target)
        self.per_forward = max(1, batch_size // batch)
        self.groups = [(start, min(start + batch_size, batch)) for start in range(0, batch, batch_size)]
        self.index: List[Optional[Tensor]] = [None] * len(self.groups)
        self.reference: Optional[Tensor] = None

    def begin(self, reference: bool = False) -> Optional[Tensor]:
        """The first forward, after every check: the scores of ``x`` itself (``self.reference``, ``[B]``),
        when asked for or when ``target=None`` needs the predicted class."""
        if reference or self.target is None:
            parts = []
            for gi, (g0, g1) in enumerate(self.groups):
                out = self._forward(_inputs.take(self.x, g0, g1), None)
                parts.append(self._scores(out, gi, 1, g1 - g0))
            self.reference = torch.cat(parts)                                     # [B]
        return self.reference

    def _scores(self, out: Any, gi: int, m: int, size: int) -> Tensor:
        """Scores ``[m * size]`` of an output of ``m`` blocks of the examples of group ``gi``."""
        if not self.by_index:
            return _targets.resolve(out, _targets.for_blocks(self.target, m, size), fn=self.fn)
        chosen = _targets.select_output(out, self.output, fn=self.fn)
        index = self.index[gi]
        if index is None:  # the first output of the group: check the target against it
            g0, g1 = self.groups[gi]
            rows_target = _targets.for_rows(self.target, self.batch, g0, g1)
            index = _targets.resolve_index(chosen[:size], rows_target, fn=self.fn)
            self.index[gi] = index
        return chosen.gather(1, index.repeat(m)[:, None]).squeeze(1)

    def __call__(self, z: Tensor) -> Tensor:
        return self.rows(z.shape[0], lambda first, last: z[first:last])

    def _forward(self, xs: Any, layer_value: Optional[Tensor]) -> Any:
        """The model's output on ``xs``; with a layer, its output replaced by ``layer_value`` (if any)."""
        if self.layer is None or layer_value is None:
            return self.model_fn(self.params, xs)
        return intermediates(self.model_fn, layers=[self.layer], fn=self.fn,
                             replace={self.layer: layer_value})(self.params, xs)[0]

    def _present(self, z: Tensor) -> Tensor:
        """Which elements are present, ``[m, 1 or B, *input]``, for coalitions ``[m, K]`` shared by the
        examples or ``[m, B, K]`` of each example."""
        if z.ndim == 2:
            return z.index_select(1, self.fid_flat).reshape(z.shape[0], *self.fid.shape)
        fid = self.fid.reshape(self.fid.shape[0], -1).expand(self.batch, -1)     # [B, E]
        picked = z.gather(2, fid.expand(z.shape[0], -1, -1))                    # [m, B, E]
        return picked.reshape(z.shape[0], self.batch, *self.fid.shape[1:])

    def rows(self, count: int, make: Callable[[int, int], Any]) -> Tensor:
        """Scores ``[B, count]`` of coalitions built a forward's worth at a time by ``make(first, last)``
        (``[m, K]`` bool shared by the examples, ``[m, B, K]`` per example, or a pair of those and
        ``[m, B, *input]`` inputs that absent features take instead of the baseline), so that
        ``count x K`` coalitions are never held at once."""
        if count == 0:
            return self.value.new_zeros(self.batch, 0)
        parts: List[List[Tensor]] = [[] for _ in self.groups]
        for first in range(0, count, self.per_forward):
            made = make(first, min(first + self.per_forward, count))
            z, base = made if isinstance(made, tuple) else (made, None)
            present = self._present(z)                                           # [m, 1|B, *input]
            m = present.shape[0]
            for gi, (g0, g1) in enumerate(self.groups):
                size = g1 - g0
                keep = present if present.shape[1] == 1 else present[:, g0:g1]
                absent = self.base[g0:g1][None] if base is None else base[:, g0:g1]
                inputs = torch.where(keep, self.value[g0:g1][None], absent).flatten(0, 1)
                if self.layer is None:
                    out = self.model_fn(self.params, _inputs.rows_with(self.x, self.key, g0, g1, m, inputs))
                else:   # x's rows, block after block, with the layer's output replaced
                    out = self._forward(_inputs.repeat(_inputs.take(self.x, g0, g1), m), inputs)
                parts[gi].append(self._scores(out, gi, m, size).reshape(m, size).T)
        return torch.cat([torch.cat(p, dim=1) for p in parts])                    # [B, count]

    def per_feature(self, values: Tensor) -> Tensor:
        """Sums ``[B, K]`` of ``values`` ``[B, *input]`` over the elements of each feature.

        Deterministic on every device (a cumulative sum over the elements sorted by feature, where a
        scatter-add would use atomics on a GPU); the sort depends only on the mask."""
        batch = values.shape[0]
        fid = self.fid.reshape(self.fid.shape[0], -1)                            # [1 or B, E]
        ordered, order = fid.sort(dim=1, stable=True)
        ids = torch.arange(self.count, device=fid.device).expand(fid.shape[0], -1).contiguous()
        starts = torch.searchsorted(ordered, ids)                                # [1 or B, K]
        ends = torch.searchsorted(ordered, ids, right=True)
        flat = values.reshape(batch, -1)
        sums = flat.gather(1, order.expand(batch, -1)).cumsum(1)
        sums = torch.cat([torch.zeros_like(sums[:, :1]), sums], dim=1)           # [B, E + 1]
        return sums.gather(1, ends.expand(batch, -1)) - sums.gather(1, starts.expand(batch, -1))


def _check_samples(fn: str, samples: Any, least: int = 1) -> None:
    _checks.check_positive_int(fn, "samples", samples)
    if samples < least:
        raise _checks.value_error(fn, f"samples >= {least}", _checks.describe(samples),
                                  "The empty and the full coalition come first; add random ones.")


def _check_regression_size(fn: str, count: int, default_mask: bool) -> None:
    if count > MAX_REGRESSION_FEATURES:
        raise _checks.value_error(
            fn, f"at most {MAX_REGRESSION_FEATURES} features for the linear model",
            f"{count} features" + (" (feature_mask=None makes every element a feature)" if default_mask else ""),
            "Group elements with feature_mask=, e.g. `tx.masks.grid((H, W), 16)` or `tx.masks.superpixels(x)`.")


def _linear_fit(z: Tensor, y: Tensor, w: Tensor, alpha: Optional[float]) -> Tensor:
    """Coefficients ``[B, K]`` of weighted least squares with an intercept, one regression per example.

    ``z`` ``[n, K]`` (shared) or ``[B, n, K]`` (per example), ``y`` ``[B, n]``, ``w`` ``[B or 1, n]``. Like
    scikit-learn's ``LinearRegression`` (``Ridge`` for a float ``alpha``): centre by the weighted means,
    scale rows by ``sqrt(w)``, then the minimum-norm least-squares solution (a pseudo-inverse, so fewer
    samples than features still give an answer) or the ridge normal equations.
    """
    w = w.expand(y.shape)
    z = z if z.ndim == 3 else z[None]                                           # [1 or B, n, K]
    total = w.sum(1, keepdim=True)
    z_mean = (w[:, None] @ z).squeeze(1) / total                                # [B, K]
    y_mean = (w * y).sum(1, keepdim=True) / total                               # [B, 1]
    root = w.sqrt()
    design = root[..., None] * (z - z_mean[:, None])                            # [B, n, K]
    rhs = (root * (y - y_mean))[..., None]                                      # [B, n, 1]
    if alpha is None:
        return (torch.linalg.pinv(design) @ rhs).squeeze(-1)
    gram = design.transpose(1, 2) @ design
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return torch.linalg.solve(gram + alpha * eye, design.transpose(1, 2) @ rhs).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Feature ablation.

@_docs.fill
def feature_ablation(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, feature_mask: Any = None,
                     baseline: Any = 0.0, batch_size: int = 64, layer: Any = None) -> Tensor:
    """Feature ablation: the drop of the score when one feature is set to the baseline.

    For every feature ``k`` the elements with that id are replaced by the baseline and every element of
    the feature gets ``score(x) - score(x with feature k ablated)``. This is captum's
    ``FeatureAblation`` (its difference, original minus ablated, and its per-example masks). With
    ``layer``, the features are elements of that layer's output on ``x`` (``feature_mask`` and
    ``baseline`` in its shape) and each ablation runs ``x`` with the layer's output replaced: captum's
    ``LayerFeatureAblation`` (``layer_mask=``, ``layer_baselines=``).

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask}
      {baseline.features}
      {batch_size.features}
      {layer.features}

    {text.features_layer_returns}

    Raises:
      ValueError: ``feature_ablation: expected feature_mask broadcastable to x's shape [2, 3, 8, 8], got
        ...``; ``batch_size`` below 1; NaN in ``x`` or ``baseline``; a target out of range (after the
        first forward pass).
      TypeError: a float or bool ``feature_mask``; integer ``x``; a bad target or baseline type.

    Example:
      >>> fn, params = functionalize(resnet.eval())
      >>> mask = tx.masks.grid(images.shape[-2:], 56)                       # 16 cells
      >>> tx.feature_ablation(fn, params, images, labels, feature_mask=mask).shape   # [8, 3, 224, 224]
      >>> torch.func.vmap(lambda p: tx.feature_ablation(fn, p, images, labels, feature_mask=mask))(stacked)

    Cost: ``K`` perturbed forwards per example plus one of ``x``, in ``ceil(K / max(1, batch_size // B))``
    forward passes (for ``B <= batch_size``); no backward. Memory: one forward batch and ``B K`` scores.

    References:
      Zeiler and Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014; captum's
      ``FeatureAblation``.
    """
    game = _Game("feature_ablation", model_fn, params, x, target, feature_mask=feature_mask, baseline=baseline,
                 batch_size=batch_size, layer=layer)
    reference = game.begin(reference=True)
    assert reference is not None
    features = torch.arange(game.count, device=game.value.device)

    def all_but(first: int, last: int) -> Tensor:                               # row k: every feature but k
        return features[None] != features[first:last, None]
    drops = reference[:, None] - game.rows(game.count, all_but)            # [B, K], the model's dtype
    return _to_elements(drops.to(game.acc), game.fid, game.value)


def _permutation(batch: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """``torch.randperm(B)`` drawn again while it is the identity (captum's ``_permute_feature``), on the
    generator's device (the CPU without one, as captum draws), so the identity check reads no value off an
    accelerator; the result is moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    identity = torch.arange(batch, device=where)
    while True:
        perm = torch.randperm(batch, generator=generator, device=where)
        if not bool((perm == identity).all()):
            return perm.to(device)


@_docs.fill
def feature_permutation(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *,
                        feature_mask: Any = None, batch_size: int = 64,
                        generator: Optional[torch.Generator] = None, layer: Any = None) -> Tensor:
    """Permutation feature importance: the drop of the score when a feature is shuffled across the batch.

    For every feature ``k`` a permutation ``pi_k`` of the ``B`` examples is drawn (not the identity), the
    elements of feature ``k`` of example ``b`` are replaced by those of example ``pi_k(b)`` (at example
    ``b``'s own positions of feature ``k``, with a per-example mask), and every element of the feature gets
    ``score_b(x) - score_b(x with feature k permuted)``. This is captum's ``FeaturePermutation`` with its
    default ``perm_func``, draw for draw: one ``torch.randperm(B, generator=generator)`` per feature, in
    the order of the sorted feature ids, drawn again while it is the identity; with ``generator`` seeded
    as captum's global seed the two agree to float rounding (on the CPU, where captum draws). ``batch_size``
    never changes the draws (all ``K`` permutations are drawn before the first perturbed forward). The
    map of an example depends on the other examples of the batch (their values replace its own): it
    needs ``B >= 2``. With ``layer``, the features are elements of that layer's output on ``x``
    (``feature_mask`` in its shape), permuted across the batch, each forward running ``x`` with the
    layer's output replaced: captum's ``LayerFeaturePermutation``, which with a ``target`` selects it
    twice and fails (captum 0.9); ours equals it called with the target applied once (in its
    ``forward_func``).

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask}
      {batch_size.features}
      {generator.permutations}
      {layer.features}

    {text.features_layer_returns}

    Raises:
      ValueError: ``feature_permutation: expected a batch of at least 2 examples ..., got a batch of 1``;
        ``batch_size`` below 1; a mask that does not broadcast to ``x``; a generator on another device;
        NaN in ``x``; a target out of range.
      TypeError: a float or bool ``feature_mask``; a non-``torch.Generator`` generator; a bad target.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> tx.feature_permutation(fn, params, table, labels, generator=g).shape      # [64, 10]: 10 columns
      >>> tx.feature_permutation(fn, params, images, labels, feature_mask=tx.masks.grid((224, 224), 56),
      ...                        generator=g)

    Cost: ``K`` perturbed forwards per example plus one of ``x``, in ``ceil(K / max(1, batch_size // B))``
    forward passes (for ``B <= batch_size``); no backward. Memory: one forward batch and ``B K`` scores.

    References:
      Breiman, "Random Forests", Machine Learning, 2001; Fisher, Rudin and Dominici, "All Models are
      Wrong, but Many are Useful", JMLR 2019; captum's ``FeaturePermutation``.
    """
    fn = "feature_permutation"
    game = _Game(fn, model_fn, params, x, target, feature_mask=feature_mask, baseline=0.0, batch_size=batch_size,
                 generator=generator, layer=layer)
    if game.batch < 2:
        raise _checks.value_error(fn, "a batch of at least 2 examples (each feature is permuted across the batch)",
                                  f"a batch of {game.batch}", "Attribute a batch of examples together, e.g. "
                                  "a validation batch; for one example use feature_ablation or shapley_value_sampling.")
    reference = game.begin(reference=True)
    assert reference is not None
    device = game.value.device
    with _checks.draws(fn, generator):
        perms = torch.stack([_permutation(game.batch, generator, device) for _ in range(game.count)])   # [K, B]
    features = torch.arange(game.count, device=device)

    def permuted(first: int, last: int) -> Tuple[Tensor, Tensor]:   # row k: feature k from example pi_k(b)
        return features[None] != features[first:last, None], game.value[perms[first:last]]
    drops = reference[:, None] - game.rows(game.count, permuted)                # [B, K]
    return _to_elements(drops.to(game.acc), game.fid, game.value)


# --------------------------------------------------------------------------------------------
# Shapley values: exact, and by permutation sampling.

@_docs.fill
def shapley_values(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, feature_mask: Any = None,
                   baseline: Any = 0.0, batch_size: int = 64) -> Tensor:
    """Exact Shapley values of the features, from all ``2^K`` coalitions.

    ``phi_k = sum_{S not containing k} |S|! (K - |S| - 1)! / K! (v(S + k) - v(S))``, where ``v(S)`` is
    the score of the input whose features in ``S`` are ``x`` and whose others are the baseline. The
    values add up to ``v(all) - v(none) = score(x) - score(baseline)``. This equals captum's
    ``ShapleyValues`` (which averages over all ``K!`` orderings, ``K K!`` forwards) with ``2^K`` forwards.

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask.exact}
      {baseline.features}
      {batch_size.features}

    Returns:
      ``[B, *input]`` attributions of ``x``'s device and dtype (every element its feature's value).

    Raises:
      ValueError: ``shapley_values: expected at most 20 features for exact Shapley values ..., got 192
        features (feature_mask=None makes every element a feature). ...``; a mask that does not
        broadcast to ``x``; ``batch_size`` below 1; NaN in ``x`` or ``baseline``; a target out of range.
      TypeError: a float or bool ``feature_mask``; integer ``x``; a bad target or baseline type.

    Example:
      >>> mask = tx.masks.grid(images.shape[-2:], 56)                       # 16 features
      >>> tx.shapley_values(fn, params, images, labels, feature_mask=mask, batch_size=256)
      >>> tx.shapley_values(fn, params, table, 0)                           # [B, 6]: 6 columns, 64 forwards

    Cost: ``2^K`` perturbed forwards per example (plus one of ``x`` for ``target=None``) in
    ``ceil(2^K / max(1, batch_size // B))`` forward passes; no backward. Memory: one forward batch.

    References:
      Shapley, "A Value for n-Person Games", 1953; Strumbelj and Kononenko, "Explaining prediction
      models and individual predictions with feature contributions", KAIS 2014.
    """
    fn = "shapley_values"
    game = _Game(fn, model_fn, params, x, target, feature_mask=feature_mask, baseline=baseline,
                 batch_size=batch_size)
    count = game.count
    if count > MAX_EXACT_FEATURES:
        raise _checks.value_error(
            fn, f"at most {MAX_EXACT_FEATURES} features for exact Shapley values (2^K model evaluations per example)",
            f"{count} features" + (" (feature_mask=None makes every element a feature)" if feature_mask is None
                                   else ""),
            "Group elements with feature_mask= (e.g. `tx.masks.grid((H, W), 56)`), or estimate them with "
            "shapley_value_sampling or kernel_shap.")
    game.begin()
    device = game.value.device
    # phi_i = sum_S v(S) c_i(S): c_i(S) = w(|S| - 1) if i in S else -w(|S|), w(s) = s! (K - 1 - s)! / K!
    weight = torch.tensor([1.0 / (count * math.comb(count - 1, s)) for s in range(count)] + [0.0],
                          dtype=game.acc, device=device)
    bits = torch.arange(count, device=device)
    phi: Optional[Tensor] = None
    total = 2 ** count
    block = max(game.per_forward, 1) * 4
    for first in range(0, total, block):
        index = torch.arange(first, min(first + block, total), device=device)
        z = ((index[:, None] >> bits) & 1).bool()                                # [n, K]
        size = z.sum(1, keepdim=True)
        coef = torch.where(z, weight[(size - 1).clamp_min(0)], -weight[size])    # [n, K]
        part = game(z).to(game.acc) @ coef
        phi = part if phi is None else phi + part
    assert phi is not None
    return _to_elements(phi, game.fid, game.value)


@_docs.fill
def shapley_value_sampling(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *,
                           feature_mask: Any = None, baseline: Any = 0.0, samples: int = 25, batch_size: int = 64,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """Shapley values estimated from random orderings of the features.

    For each of ``samples`` random permutations the features are added to the baseline one after the
    other, and each feature is credited with the change of the score it caused; the estimate is the
    mean over permutations (unbiased; exact in the limit). This is captum's ``ShapleyValueSampling``,
    draw for draw: the permutations are ``torch.randperm(K, generator=generator)`` one after the other,
    so with ``generator`` seeded as captum's global seed and contiguous ids ``0 .. K-1`` the two agree
    to float rounding. Every ordering ends at the full input ``x``, which is evaluated once instead of
    once per ordering (``samples (K - 1) + 2`` forwards per example against captum's ``samples K + 1``).

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask}
      {baseline.features}
      samples: The number of permutations (captum's ``n_samples``). Default: 25.
      {batch_size.features}
      {generator.permutations}

    Returns:
      ``[B, *input]`` attributions of ``x``'s device and dtype (every element its feature's value).

    Raises:
      ValueError: ``samples`` or ``batch_size`` below 1; a mask that does not broadcast to ``x``; a
        generator on another device; NaN in ``x`` or ``baseline``; a target out of range.
      TypeError: a float or bool ``feature_mask``; a non-``torch.Generator`` generator; a bad target.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> tx.shapley_value_sampling(fn, params, images, labels, feature_mask=mask, samples=50, generator=g)
      >>> torch.func.vmap(lambda p: tx.shapley_value_sampling(fn, p, images, labels, feature_mask=mask,
      ...     generator=torch.Generator().manual_seed(0)))(stacked)     # every member: the generator's draws

    Cost: ``2 + samples (K - 1)`` forwards per example (``x``, the baseline and the orderings), in
    forward passes of ``max(1, batch_size // B)`` coalitions times ``B`` examples; no backward.
    Memory: one forward batch and the scores of a few permutations.

    References:
      Castro, Gomez and Tejada, "Polynomial calculation of the Shapley value based on sampling",
      Computers & Operations Research, 2009; captum's ``ShapleyValueSampling``.
    """
    fn = "shapley_value_sampling"
    _check_samples(fn, samples)
    game = _Game(fn, model_fn, params, x, target, feature_mask=feature_mask, baseline=baseline,
                 batch_size=batch_size, generator=generator)
    reference = game.begin(reference=True)
    assert reference is not None
    count, device, batch = game.count, game.value.device, game.batch
    start = game(torch.zeros(1, count, dtype=torch.bool, device=device))       # v(none), [B, 1]
    end = reference[:, None, None]                                         # v(all) ends every ordering
    # permutations per block: whole forwards of per_forward coalitions where K allows
    steps = max(count - 1, 1)
    per_block = game.per_forward // math.gcd(game.per_forward, steps)
    phi: Optional[Tensor] = None
    done = 0
    while done < samples:
        p = min(per_block, samples - done)
        with _checks.draws(fn, generator):
            order = torch.stack([torch.randperm(count, generator=generator, device=device) for _ in range(p)])
        rank = order.argsort(1)                                                 # [p, K] position of feature i

        def prefixes(first: int, last: int, rank: Tensor = rank) -> Tensor:     # proper prefixes, row q (K-1) + j
            row = torch.arange(first, last, device=device)
            return rank[row // steps] <= (row % steps)[:, None]
        values = game.rows(p * (count - 1), prefixes).reshape(batch, p, count - 1)
        values = torch.cat([values, end.expand(batch, p, 1)], dim=2)            # [B, p, K] in order
        before = torch.cat([start[:, None].expand(batch, p, 1), values[:, :, :-1]], dim=2)
        gains = (values - before).to(game.acc)                                  # [B, p, K] step j adds order[q, j]
        part = gains.gather(2, rank.expand(batch, p, count)).sum(1)             # [B, K] by feature
        phi = part if phi is None else phi + part
        done += p
    assert phi is not None
    return _to_elements(phi / samples, game.fid, game.value)


# --------------------------------------------------------------------------------------------
# Kernel SHAP and LIME.

def _kernel_shap_coalitions(count: int, samples: int, generator: Optional[torch.Generator],
                            device: torch.device) -> Tensor:
    """``[n, K]`` coalitions: the full one, the empty one, then captum's draws (a size ``s`` with
    probability proportional to ``(K - 1) / (s (K - s))``, then the ``s`` features with the largest of
    ``K`` normal draws). ``K = 1`` has no sizes to draw: the two fixed coalitions alone."""
    full = torch.ones(1, count, dtype=torch.bool, device=device)
    rows = [full, ~full][:samples]
    if count > 1 and samples > 2:
        sizes = torch.arange(count, dtype=torch.float32, device=device)
        probs = torch.tensor(count - 1, device=device) / (sizes * (count - sizes))
        probs = torch.where(sizes == 0, torch.zeros_like(probs), probs)
        probs = (probs / probs.sum()).reshape(1, -1)
        for _ in range(samples - 2):
            size = torch.multinomial(probs, 1, True, generator=generator)         # [1, 1]
            noise = torch.randn(1, count, generator=generator, device=device)
            rows.append(noise.argsort(1).argsort(1) >= count - size)             # the `size` largest draws
    return torch.cat(rows)


def _skip_fit_draws(count: int, generator: Optional[torch.Generator], device: torch.device) -> None:
    """Advance ``generator`` past what captum's regression of one example draws from the global generator
    between two examples: the seed of its ``DataLoader`` (one int64) and the initial weights and bias of
    its ``nn.Linear(K, 1)`` (``K + 1`` uniform numbers). Without it a batch's second example would start
    from other draws than captum's."""
    torch.empty((), dtype=torch.int64, device=device).random_(generator=generator)
    torch.empty(count, device=device).uniform_(generator=generator)
    torch.empty(1, device=device).uniform_(generator=generator)


def _each_example(batch: int, draw: Callable[[], Tensor], count: int, generator: Optional[torch.Generator],
                  device: torch.device) -> Tensor:
    """``[B, n, K]``: ``draw()`` for each example after the previous one's, with captum's regression
    draws skipped in between (:func:`_skip_fit_draws`)."""
    rows = []
    for b in range(batch):
        if b:
            _skip_fit_draws(count, generator, device)
        rows.append(draw())
    return torch.stack(rows)


@_docs.fill
def kernel_shap(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, feature_mask: Any = None,
                baseline: Any = 0.0, samples: int = 25, batch_size: int = 64,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Kernel SHAP: Shapley values as the coefficients of a weighted linear regression.

    Coalitions ``z`` are drawn with the Shapley kernel's distribution of sizes (size ``s`` with
    probability proportional to ``(K - 1) / (s (K - s))``, then ``s`` features uniformly), their scores
    ``v(z)`` are regressed on ``z`` (with an intercept, equal weights), and the coefficients estimate the
    Shapley values. The full and the empty coalition come first with weight ``1e6``, which pins the
    intercept to ``v(none)`` and the sum of the coefficients to ``v(all) - v(none)``. These are captum's
    ``KernelShap`` conventions draw for draw (``torch.multinomial`` for the size, ``torch.randn`` for
    the features, alternating, from ``generator``; each example of a batch draws its own ``samples - 2``
    coalitions after the previous example's, as captum's one example per call, and skips what captum's
    regression draws in between, ``K + 2`` numbers), with its ``SkLearnLinearRegression`` solved in
    closed form (a minimum-norm weighted least-squares solve in float64). The draws cannot be
    vectorised without changing them, so they cost a few small tensor operations each.
    With a single feature there is no size to draw: only the two fixed coalitions are evaluated
    (captum fails there), which gives ``score(x) - score(baseline)`` exactly.

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask.regression}
      {baseline.features}
      samples: The number of coalitions, the two fixed ones included (captum's ``n_samples``); more
        than ``K + 1`` for a determined regression (a minimum-norm solution otherwise). Default: 25.
      {batch_size.features}
      {generator.coalitions}

    Returns:
      ``[B, *input]`` attributions of ``x``'s device and dtype (every element its feature's value).

    Raises:
      ValueError: ``samples`` below 2; ``batch_size`` below 1; more than 10000 features; a mask that
        does not broadcast to ``x``; a generator on another device; NaN in ``x`` or ``baseline``; a
        target out of range.
      TypeError: a float or bool ``feature_mask``; a non-``torch.Generator`` generator; a bad target.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> tx.kernel_shap(fn, params, images, labels, feature_mask=mask, samples=200, generator=g)

    Cost: ``samples`` perturbed forwards per example (plus one of ``x`` for ``target=None``), in
    ``ceil(samples / max(1, batch_size // B))`` forward passes; a ``[samples, K]`` pseudo-inverse per
    example; no backward. Memory: one forward batch, ``samples K`` coalitions and ``B samples`` scores.

    References:
      Lundberg and Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017; captum's
      ``KernelShap``.
    """
    fn = "kernel_shap"
    _check_samples(fn, samples, least=2)
    game = _Game(fn, model_fn, params, x, target, feature_mask=feature_mask, baseline=baseline,
                 batch_size=batch_size, generator=generator)
    _check_regression_size(fn, game.count, feature_mask is None)
    game.begin()
    device = game.value.device
    with _checks.draws(fn, generator):    # example after example, as captum (one example per call)
        z = _each_example(game.batch, lambda: _kernel_shap_coalitions(game.count, samples, generator, device),
                          game.count, generator, device)                        # [B, n, K]
    size = z.sum(2)
    weight = torch.where((size == 0) | (size == game.count), _INF_WEIGHT, 1.0).to(game.acc)   # [B, n]
    values = game.rows(samples, lambda first, last: z[:, first:last].transpose(0, 1)).to(game.acc)  # [B, n]
    phi = _linear_fit(z.to(game.acc), values, weight, None)
    return _to_elements(phi, game.fid, game.value)


def _per_row(per_feature: Tensor, z: Tensor) -> Tensor:
    """``[B, n]``: for each example and coalition, the sum of ``per_feature`` ``[B, K]`` over ``z`` ``[B, n, K]``."""
    return (z @ per_feature[..., None]).squeeze(-1)


_DISTANCES = ("cosine", "euclidean")
_REGRESSIONS = ("linear", "ridge")


@_docs.fill
def lime(model_fn: ModelFn, params: Params, x: Any, target: Target = None, *, feature_mask: Any = None,
         baseline: Any = 0.0, samples: int = 25, batch_size: int = 64, generator: Optional[torch.Generator] = None,
         kernel_width: float = 1.0, distance: str = "cosine", regression: str = "linear",
         alpha: float = 1.0) -> Tensor:
    """LIME: the coefficients of a linear model fitted to the scores of nearby perturbed inputs.

    Coalitions ``z`` keep every feature with probability 1/2 (``torch.bernoulli``, as captum's default
    ``perturb_func``; each example of a batch draws its own after the previous example's and the
    ``K + 2`` numbers captum's regression draws, as captum);
    each perturbed input ``x_z`` is weighted by its closeness to ``x``,
    ``exp(-d(x, x_z)^2 / (2 kernel_width^2))`` with ``d`` the cosine distance ``1 - cos(x, x_z)`` of the
    flattened example (captum's ``get_exp_kernel_similarity_function()``) or the Euclidean one, and a
    weighted linear regression of the scores on ``z`` (with an intercept) gives one coefficient per
    feature. captum's ``Lime`` does the same with its default ``interpretable_model=SkLearnLasso(0.01)``;
    a lasso needs an iterative solver and is refused here: ``regression="linear"`` equals captum's
    ``Lime(..., interpretable_model=SkLearnLinearRegression())`` (a minimum-norm solve), and
    ``regression="ridge"`` its ``SkLearnRidge(alpha=alpha)``, both in closed form in float64.

    {text.features_autograd}

    Args:
      {args.features}
      {feature_mask.regression}
      {baseline.features}
      samples: The number of perturbed inputs (captum's ``n_samples``); more than ``K + 1`` for a
        determined linear regression. Default: 25.
      {batch_size.features}
      {generator.coalitions}
      kernel_width: The width of the exponential similarity kernel. Default: 1.0.
      distance: ``"cosine"`` or ``"euclidean"``. Default: ``"cosine"``.
      regression: ``"linear"`` (weighted least squares) or ``"ridge"``. ``"lasso"`` is refused.
        Default: ``"linear"``.
      alpha: The ridge penalty (``regression="ridge"`` only). Default: 1.0.

    Returns:
      ``[B, *input]`` attributions of ``x``'s device and dtype (every element its feature's
      coefficient; the intercept is dropped, as captum does).

    Raises:
      ValueError: ``lime: expected regression in ('linear', 'ridge'), got 'lasso'. ...``; ``samples``
        or ``batch_size`` below 1; ``kernel_width`` not positive; an unknown ``distance``; more than
        10000 features; a mask that does not broadcast to ``x``; a generator on another device; NaN
        in ``x`` or ``baseline``; a target out of range.
      TypeError: a float or bool ``feature_mask``; a non-``torch.Generator`` generator; a bad target.

    Example:
      >>> mask = tx.masks.superpixels(images, 50)                            # [8, 1, 224, 224]
      >>> tx.lime(fn, params, images, labels, feature_mask=mask, samples=500,
      ...         generator=torch.Generator().manual_seed(0))

    Cost: ``samples`` perturbed forwards per example (plus one of ``x`` for ``target=None``), in
    ``ceil(samples / max(1, batch_size // B))`` forward passes; one ``[samples, K]`` pseudo-inverse per
    example; no backward. Memory: one forward batch, ``samples K`` coalitions and ``B samples`` scores.

    References:
      Ribeiro, Singh and Guestrin, "Why Should I Trust You?: Explaining the Predictions of Any
      Classifier", KDD 2016; captum's ``Lime``.
    """
    fn = "lime"
    _check_samples(fn, samples)
    if isinstance(kernel_width, bool) or not isinstance(kernel_width, (int, float)):
        raise _checks.type_error(fn, "kernel_width, a float > 0", _checks.describe(kernel_width))
    if not kernel_width > 0:
        raise _checks.value_error(fn, "kernel_width > 0", _checks.describe(kernel_width))
    if distance not in _DISTANCES:
        raise _checks.value_error(fn, f"distance in {_DISTANCES}", _checks.describe(distance))
    if regression == "lasso":
        raise _checks.value_error(fn, f"regression in {_REGRESSIONS}", "'lasso'",
                                  "Lasso (captum Lime's default, alpha=0.01) needs an iterative solver and is not in "
                                  "the core: use 'ridge' or 'linear', or captum's Lime for lasso.")
    if regression not in _REGRESSIONS:
        raise _checks.value_error(fn, f"regression in {_REGRESSIONS}", _checks.describe(regression))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise _checks.value_error(fn, "alpha, a float >= 0 (the ridge penalty)", _checks.describe(alpha))
    game = _Game(fn, model_fn, params, x, target, feature_mask=feature_mask, baseline=baseline,
                 batch_size=batch_size, generator=generator)
    count, device, acc = game.count, game.value.device, game.acc
    _check_regression_size(fn, count, feature_mask is None)
    game.begin()
    # coalitions: every feature present with probability 1/2, drawn in fixed blocks (captum draws one
    # row at a time; the stream of a block is the same as that of its rows one after the other)
    # row one after the other), example after example as captum (one example per call)
    with _checks.draws(fn, generator):
        z = _each_example(game.batch, lambda: torch.cat([
            torch.bernoulli(torch.full((min(_DRAW_BLOCK, samples - first), count), 0.5, device=device),
                            generator=generator) for first in range(0, samples, _DRAW_BLOCK)]),
            count, generator, device).to(acc)                                   # [B, n, K]
    present = z.bool()
    values = game.rows(samples, lambda first, last: present[:, first:last].transpose(0, 1)).to(acc)  # [B, n]
    # distance of each perturbed input to x, from per-feature sums (no perturbed input is kept)
    xv, bv = game.value.to(acc), game.base.to(acc)
    per_feature = game.per_feature
    if distance == "cosine":
        xx, xb, bb = per_feature(xv * xv), per_feature(xv * bv), per_feature(bv * bv)
        dot = _per_row(xx, z) + _per_row(xb, 1 - z)                              # [B, n]
        norms = xx.sum(1, keepdim=True) * (_per_row(xx, z) + _per_row(bb, 1 - z))
        eps = 1e-8  # torch.nn.CosineSimilarity's
        dist = 1 - dot / norms.clamp_min(eps * eps).sqrt()
    else:
        dist = _per_row(per_feature((xv - bv) ** 2), 1 - z).clamp_min(0).sqrt()
    weight = torch.exp(-dist ** 2 / (2 * kernel_width ** 2))
    phi = _linear_fit(z, values, weight, float(alpha) if regression == "ridge" else None)
    return _to_elements(phi, game.fid, game.value)


