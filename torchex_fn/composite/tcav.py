"""Testing with concept activation vectors (TCAV; Kim et al., ICML 2018), re-exported by ``tx.concepts``.

A *concept* here is a set of example inputs (striped images, say); its *concept activation vector* (CAV)
at a layer is the normal of a linear classifier that separates the layer's activations of the concept's
examples from those of random examples, pointing towards the concept. TCAV then asks how often the
target's score increases when the layer's activation moves along the CAV: the *TCAV score* is the
fraction of examples whose directional derivative ``grad_layer(score) . cav`` is positive.

* :func:`cav` trains one CAV (logistic regression with an L2 penalty, L-BFGS, in float64; the train/test
  split is drawn from ``generator``, so the result is deterministic);
* :func:`tcav` scores several CAVs at once from one forward and one backward pass, and with
  ``random_cavs`` runs the paper's statistical test: a two-sided Student's t-test of the concept's scores
  (CAVs against several random sets) against the scores of random-vs-random CAVs;
* :func:`ttest` is that test on two score vectors (written in torch: it runs under ``vmap`` and on any
  device; equal to ``scipy.stats.ttest_ind``).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core.arguments import check_call
from ..core.capture import capture, layer_gradients, layer_shapes, resolve_layers

__all__ = ["cav", "tcav", "ttest", "CAV", "TCAV", "TTest"]


class CAV(NamedTuple):
    """What :func:`cav` returns."""

    vector: Tensor    # [*layer activation]: unit L2 norm, pointing from the random examples to the concept's
    accuracy: Tensor  # scalar: the classifier's accuracy on the held-out examples (on all of them without)


class TTest(NamedTuple):
    """What :func:`ttest` returns (scalars, float64)."""

    statistic: Tensor  # Student's t: (mean(a) - mean(b)) / pooled standard error
    p_value: Tensor    # two-sided


class TCAV(NamedTuple):
    """What :func:`tcav` returns. ``K`` CAVs, ``R`` random CAVs, ``B`` examples."""

    score: Tensor            # [K]: fraction of examples with a positive directional derivative (TCAV_Q)
    magnitude: Tensor        # [K]: sum of the positive derivatives / sum of their absolute values
    mean_derivative: Tensor  # [K]: the mean directional derivative (what captum's TCAV calls "magnitude")
    derivatives: Tensor      # [B, K]: each example's directional derivative along each CAV
    random_score: Optional[Tensor]  # [R]: the random CAVs' TCAV scores (None without random_cavs)
    t_statistic: Optional[Tensor]   # scalar: Student's t of score against random_score (None without)
    p_value: Optional[Tensor]       # scalar: its two-sided p-value (None without random_cavs)


def _one_layer(fn: str, model_fn: Any, layer: Any) -> str:
    if isinstance(layer, (list, tuple, dict)):
        raise _checks.type_error(fn, "layer, one layer (a dotted name or module)", _checks.describe(layer))
    names, _ = resolve_layers(fn, model_fn, layer)
    return names[0]


def _examples(fn: str, name: str, x: Any) -> None:
    _checks.check_input(fn, x, min_ndim=1, name=name)
    if x.shape[0] < 1:
        raise _checks.value_error(fn, f"{name} with at least one example", _checks.describe(x))


def _fit_logistic(features: Tensor, labels: Tensor, weight_decay: float, steps: int) -> Tuple[Tensor, Tensor]:
    """``(w [F], b)`` minimising ``mean(softplus(-(2y - 1)(f.w + b))) + weight_decay / 2 * |w|^2`` (float64)."""
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    signs = labels * 2.0 - 1.0
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-signs * (features @ w + b)).mean() + 0.5 * weight_decay * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def cav(model_fn: Any, params: Any, concept_x: Tensor, random_x: Tensor, *, layer: Any,
        generator: Optional[torch.Generator] = None, test_fraction: float = 0.33, weight_decay: float = 0.01,
        steps: int = 200) -> CAV:
    """A concept activation vector: the normal of a linear classifier of the layer's activations.

    The layer's outputs for ``concept_x`` (label 1) and ``random_x`` (label 0) are flattened per example;
    a random ``test_fraction`` of them (drawn with ``generator``) is held out, and a logistic regression
    with an L2 penalty (``weight_decay / 2 * |w|^2``, bias unpenalised) is fitted to the rest with L-BFGS
    from zero in float64: the loss is convex (strictly, for ``weight_decay > 0``), so the answer does not
    depend on anything but the data and the split. The CAV is ``w / |w|``, shaped as one example's
    activation, pointing towards the concept (Kim et al. 2018, section 3.1).

    captum's ``TCAV`` trains scikit-learn's ``SGDClassifier`` (stochastic, seeded by Python's ``random``);
    to compare its scores with :func:`tcav`'s, give it this vector (see :func:`tcav`).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      concept_x: The concept's examples, a batch ``[N_c, *input]``.
      random_x: The random (counter) examples, a batch ``[N_r, *input]``.
      layer: The layer (dotted name or module) whose output the classifier reads.
      generator: Draws the train/test split (``torch.randperm``); None: torch's global generator.
      test_fraction: The fraction of all examples held out to measure the accuracy (rounded down), in
        ``[0, 1)``; with 0 the accuracy is measured on the training examples. Default: 0.33 (captum's).
      weight_decay: The L2 penalty's coefficient, ``>= 0``. Default: 0.01 (captum's ``alpha``).
      steps: The most L-BFGS iterations. Default: 200.

    Returns:
      :class:`CAV` ``(vector [*layer activation], accuracy [])`` in the activation's dtype, on its device.

    Raises:
      TypeError: non-float examples, bad option types.
      ValueError: an unknown layer, ``test_fraction`` outside ``[0, 1)``, a negative ``weight_decay``,
        a split that leaves no training example of one class.

    Example:
      >>> g = torch.Generator().manual_seed(0)
      >>> stripes = tx.concepts.cav(fn, params, striped, noise, layer="layer3", generator=g)
      >>> stripes.vector.shape, stripes.accuracy          # ([256, 14, 14], tensor(0.98))
    """
    fn = "concepts.cav"
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _examples(fn, "concept_x", concept_x)
    _examples(fn, "random_x", random_x)
    if concept_x.shape[1:] != random_x.shape[1:]:
        raise _checks.value_error(fn, f"random_x of the concept's example shape {tuple(concept_x.shape[1:])}",
                                  _checks.describe(random_x))
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise _checks.type_error(fn, "test_fraction, a float in [0, 1)", _checks.describe(test_fraction))
    if not 0.0 <= test_fraction < 1.0:
        raise _checks.value_error(fn, "test_fraction in [0, 1)", _checks.describe(test_fraction))
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise _checks.type_error(fn, "weight_decay, a float >= 0", _checks.describe(weight_decay))
    if not weight_decay >= 0.0:
        raise _checks.value_error(fn, "weight_decay >= 0", _checks.describe(weight_decay))
    _checks.check_positive_int(fn, "steps", steps)
    _checks.check_generator(fn, generator)
    name = _one_layer(fn, model_fn, layer)
    with torch.no_grad():
        _, concept_acts = capture(model_fn, params, concept_x, name)
        _, random_acts = capture(model_fn, params, random_x, name)
    shape, dtype, device = concept_acts.shape[1:], concept_acts.dtype, concept_acts.device
    features = torch.cat([concept_acts.reshape(concept_acts.shape[0], -1),
                          random_acts.reshape(random_acts.shape[0], -1)]).to("cpu", torch.float64)
    labels = torch.cat([torch.ones(concept_acts.shape[0]), torch.zeros(random_acts.shape[0])]).to(torch.float64)
    n = features.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    order = order.to("cpu")
    n_test = int(test_fraction * n)
    test, train = (order[:n_test], order[n_test:]) if n_test else (order, order)
    if not (bool((labels[train] == 1).any()) and bool((labels[train] == 0).any())):
        raise _checks.value_error(fn, "training examples of both the concept and the random set after the split",
                                  f"{int(labels[train].sum())} concept and {int((1 - labels[train]).sum())} random",
                                  "Give more examples or a smaller test_fraction.")
    w, b = _fit_logistic(features[train], labels[train], float(weight_decay), steps)
    accuracy = (((features[test] @ w + b) > 0).to(torch.float64) == labels[test]).to(torch.float64).mean()
    norm = w.norm()
    if not bool(norm > 0):
        raise _checks.value_error(fn, "activations that differ between the concept and the random examples",
                                  "a classifier with zero weights", "The layer does not tell the two sets apart.")
    return CAV((w / norm).reshape(shape).to(device, dtype), accuracy.to(device, dtype))


def _stack(fn: str, name: str, cavs: Any) -> Tensor:
    if isinstance(cavs, CAV):
        return cavs.vector[None]
    if isinstance(cavs, Tensor):
        if not cavs.is_floating_point():
            raise _checks.type_error(fn, f"{name}, a float tensor [K, *layer activation]", _checks.describe(cavs))
        return cavs
    if isinstance(cavs, (list, tuple)) and cavs and all(isinstance(c, (CAV, Tensor)) for c in cavs):
        vectors = [c.vector if isinstance(c, CAV) else c for c in cavs]
        if any(not v.is_floating_point() for v in vectors):
            raise _checks.type_error(fn, f"{name}, float vectors", "a non-float one")
        if len({tuple(v.shape) for v in vectors}) != 1:
            raise _checks.value_error(fn, f"{name} of one shape", str(sorted({tuple(v.shape) for v in vectors})))
        return torch.stack(vectors)
    raise _checks.type_error(fn, f"{name}, a tensor [K, *layer activation], a CAV or a non-empty list of them",
                             _checks.describe(cavs))


def _fit_shape(fn: str, name: str, vectors: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``[K, F]``: the CAVs flattened, after checking they have the layer's activation shape."""
    if tuple(vectors.shape) == shape:
        vectors = vectors[None]
    if tuple(vectors.shape[1:]) != shape:
        raise _checks.value_error(fn, f"{name} of the layer's activation shape [K, {', '.join(map(str, shape))}]",
                                  _checks.describe(vectors))
    return vectors.reshape(vectors.shape[0], -1)


def tcav(model_fn: Any, params: Any, x: Any, target: Any = None, *, layer: Any, cavs: Any,
         random_cavs: Any = None) -> TCAV:
    """TCAV scores of several CAVs at once, and the paper's test against random CAVs.

    Each example's directional derivative along a CAV ``v`` is ``S = grad_layer(score) . v`` (the CAV is
    used as given: :func:`cav`'s have unit norm). Per CAV:

    * ``score``: the fraction of examples with ``S > 0`` (Kim et al.'s ``TCAV_Q``; captum's ``sign_count``);
    * ``magnitude``: ``sum(max(S, 0)) / sum(|S|)`` (the TCAV reference code's magnitude score, and the
      formula captum's ``TCAV`` documents; NaN when every ``S`` is 0);
    * ``mean_derivative``: ``mean(S)``, which is what captum's ``TCAV`` returns under the name
      ``magnitude``.

    With ``random_cavs`` (CAVs of random sets against other random sets), the scores of ``cavs``
    (typically one concept against ``K`` different random sets) are compared with those of
    ``random_cavs`` by a two-sided Student's t-test (:func:`ttest`); a concept is meaningful at level
    ``alpha`` when ``p_value < alpha`` (Kim et al. apply a Bonferroni correction over the concepts
    tested).

    Cost: one forward and one backward pass to the layer for all CAVs (captum's layer gradient).

    Args:
      model_fn: Pure ``(params, x) -> out``, e.g. from ``functionalize(net)``.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      x: A batch ``[B, *input]``, floating point (or token ids / a dict of named inputs, as ``layer=`` allows).
      target: ``None`` (predicted class), int, ``[B]`` ints, or a callable ``out -> [B]``.
      layer: The layer (dotted name or module) whose output the CAVs live in.
      cavs: ``[K, *layer activation]`` (or one ``[*layer activation]``), a :class:`CAV` or a list of them.
      random_cavs: The same for random-vs-random CAVs (at least 2, and at least 2 ``cavs``), or None.

    Returns:
      :class:`TCAV` ``(score [K], magnitude [K], mean_derivative [K], derivatives [B, K], random_score [R],
      t_statistic [], p_value [])``; the last three are None without ``random_cavs``.

    Raises:
      TypeError: bad ``x``, ``target``, ``cavs`` types.
      ValueError: an unknown layer, CAVs not of the layer's activation shape, fewer than 2 CAVs or
        random CAVs for the test.

    Example:
      >>> result = tx.concepts.tcav(fn, params, zebras, 340, layer="layer3", cavs=stripes, random_cavs=rands)
      >>> result.score, result.p_value                 # (tensor([0.81, 0.78, ...]), tensor(2.1e-05))
    """
    fn = "concepts.tcav"
    target = check_call(fn, model_fn, params, x, target, min_ndim=1, layer=layer)
    name = _one_layer(fn, model_fn, layer)
    vectors = _stack(fn, "cavs", cavs)
    randoms = None if random_cavs is None else _stack(fn, "random_cavs", random_cavs)
    shape = tuple(layer_shapes(model_fn, params, x, (name,), fn)[name][0][1:])
    flat = _fit_shape(fn, "cavs", vectors, shape)
    flat_random = None if randoms is None else _fit_shape(fn, "random_cavs", randoms, shape)
    if flat_random is not None and (flat.shape[0] < 2 or flat_random.shape[0] < 2):
        raise _checks.value_error(fn, "at least 2 cavs and 2 random_cavs for the t-test",
                                  f"{flat.shape[0]} cavs and {flat_random.shape[0]} random_cavs")
    grads = layer_gradients(model_fn, params, x, target, layers=(name,), fn=fn).grads[name]
    grads = grads.reshape(grads.shape[0], -1)
    derivatives = grads @ flat.to(grads.dtype).T                                        # [B, K]
    score = (derivatives > 0).to(grads.dtype).mean(0)
    magnitude = derivatives.clamp_min(0).sum(0) / derivatives.abs().sum(0)
    random_score = t_statistic = p_value = None
    if flat_random is not None:
        random_score = ((grads @ flat_random.to(grads.dtype).T) > 0).to(grads.dtype).mean(0)
        t_statistic, p_value = ttest(score, random_score)
    return TCAV(score, magnitude, derivatives.mean(0), derivatives, random_score, t_statistic, p_value)


def _betainc(a: Tensor, b: Tensor, x: Tensor, terms: int = 400) -> Tensor:
    """The regularised incomplete beta function ``I_x(a, b)`` (float64), by its continued fraction.

    ``I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) / (1 + d_1 / (1 + d_2 / (1 + ...)))`` with
    ``d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))`` and
    ``d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))``, evaluated from the front (modified
    Lentz) with a fixed number of terms so that it runs under ``vmap``. It converges fast for
    ``x < (a + 1) / (a + b + 2)``; above, ``I_x(a, b) = 1 - I_{1-x}(b, a)``.
    """
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, 1 - x, x)
    tiny = torch.finfo(torch.float64).tiny * 1e10
    log_front = (torch.xlogy(a, x) + torch.xlogy(b, 1 - x)
                 - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)) - torch.log(a))
    value = torch.ones_like(x)
    c = torch.ones_like(x)
    d = torch.zeros_like(x)
    for j in range(1, terms + 1):
        m = j // 2
        if j % 2 == 0:
            coefficient = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            coefficient = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + coefficient * d
        d = 1 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = 1 + coefficient / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        value = value * c * d
    result = torch.exp(log_front) / value
    return torch.where(flip, 1 - result, result)


def ttest(a: Tensor, b: Tensor) -> TTest:
    """Two-sided Student's t-test (pooled variance) of two samples: TCAV's test of a concept.

    ``t = (mean(a) - mean(b)) / sqrt(s^2 (1/n_a + 1/n_b))`` with the pooled variance ``s^2`` over
    ``n_a + n_b - 2`` degrees of freedom; the p-value is ``I_{df / (df + t^2)}(df / 2, 1 / 2)``, the
    t distribution's two tails, computed in float64 with torch (no scipy needed; it runs under
    ``vmap``). Equal to ``scipy.stats.ttest_ind(a, b)`` (its default ``equal_var=True``, what the TCAV
    reference code calls). Two constant samples give ``t = +-inf, p = 0`` (different means) or NaN
    (equal means), as scipy does.

    Args:
      a: ``[n_a]`` float values (the concept's TCAV scores), ``n_a >= 2``.
      b: ``[n_b]`` float values (the random CAVs' scores), ``n_b >= 2``.

    Returns:
      :class:`TTest` ``(statistic, p_value)``, float64 scalars on ``a``'s device.

    Raises:
      TypeError: non-float or non-tensor samples.
      ValueError: a sample that is not 1-D or has fewer than 2 values.

    Example:
      >>> tx.concepts.ttest(torch.tensor([0.9, 0.8, 0.85]), torch.tensor([0.5, 0.4, 0.55])).p_value
    """
    fn = "concepts.ttest"
    for name, sample in (("a", a), ("b", b)):
        if not isinstance(sample, Tensor) or not sample.is_floating_point():
            raise _checks.type_error(fn, f"{name}, a 1-D float tensor", _checks.describe(sample))
        if sample.ndim != 1 or sample.shape[0] < 2:
            raise _checks.value_error(fn, f"{name}, a 1-D tensor of at least 2 values", _checks.describe(sample))
    a, b = a.to(torch.float64), b.to(torch.float64)
    na, nb = a.shape[0], b.shape[0]
    df = na + nb - 2
    pooled = ((na - 1) * a.var() + (nb - 1) * b.var()) / df
    statistic = (a.mean() - b.mean()) / torch.sqrt(pooled * (1.0 / na + 1.0 / nb))
    dfs = torch.full_like(statistic, float(df))
    p_value = _betainc(dfs / 2, torch.full_like(statistic, 0.5), dfs / (dfs + statistic * statistic))
    p_value = torch.where(torch.isnan(statistic), statistic, p_value)
    return TTest(statistic, p_value)

