"""``tx.evaluate``: several explanation methods judged by several metrics, as one table.

Each method explains the batch once; each metric scores every example of every method; the table holds the
mean and the spread over the examples. Built on ``tx.metrics`` (the metrics that call the method again, such
as the sensitivities, get the method itself).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.arguments import check_call
from ..core.types import ModelFn, Params, Target
from ..evaluation import metrics as _metrics

__all__ = ["Case", "Evaluation", "evaluate", "METRICS"]


class Case(NamedTuple):
    """What a metric of :func:`evaluate` is given: one method on the batch.

    Attributes:
      method: ``(model_fn, params, x, target) -> map``.
      model_fn, params, x: As given to :func:`evaluate`.
      target: ``[B]`` class indices (the predicted classes when :func:`evaluate` got ``None``).
      attribution: The method's map of ``x``, as the method returns it.
      mask: The object masks given to :func:`evaluate`, or None.
      generator: A generator seeded for this metric (the same draws for every method), or None.
    """

    method: Callable[..., Tensor]
    model_fn: ModelFn
    params: Params
    x: Tensor
    target: Tensor
    attribution: Tensor
    mask: Optional[Tensor]
    generator: Optional[torch.Generator]


def _map(case: Case) -> Tensor:
    """Image maps with their channels summed (``[B, 1, H, W]``), others as they are."""
    a = case.attribution
    return a.sum(dim=1, keepdim=True) if a.ndim == 4 else a


def _mask(case: Case) -> Tensor:
    assert case.mask is not None  # evaluate refuses a localisation metric without one
    return case.mask


def _summed(method: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def summed(model_fn: ModelFn, params: Params, x: Tensor, target: Any) -> Tensor:
        a = method(model_fn, params, x, target)
        return a.sum(dim=1, keepdim=True) if a.ndim == 4 else a
    return summed


# name -> (metric, which way is better)
METRICS: Dict[str, Tuple[Callable[[Case], Tensor], str]] = {
    "sparseness": (lambda c: _metrics.sparseness(_map(c)), "higher"),
    "complexity": (lambda c: _metrics.complexity(_map(c)), "lower"),
    "deletion": (lambda c: _metrics.deletion(c.model_fn, c.params, c.x, _map(c), c.target).auc, "lower"),
    "insertion": (lambda c: _metrics.insertion(c.model_fn, c.params, c.x, _map(c), c.target).auc, "higher"),
    "max_sensitivity": (lambda c: _metrics.max_sensitivity(_summed(c.method), c.model_fn, c.params, c.x, c.target,
                                                           nr_samples=10, generator=c.generator), "lower"),
    "avg_sensitivity": (lambda c: _metrics.avg_sensitivity(_summed(c.method), c.model_fn, c.params, c.x, c.target,
                                                           nr_samples=10, generator=c.generator), "lower"),
    "local_lipschitz_estimate": (lambda c: _metrics.local_lipschitz_estimate(
        _summed(c.method), c.model_fn, c.params, c.x, c.target, nr_samples=10, generator=c.generator), "lower"),
    "random_logit": (lambda c: _metrics.random_logit(_summed(c.method), c.model_fn, c.params, c.x, c.target,
                                                     generator=c.generator), "lower"),
    "mprt": (lambda c: _metrics.mprt(_summed(c.method), c.model_fn, c.params, c.x, c.target, skip_layers=True,
                                     generator=c.generator).last, "lower"),
    "pointing_game": (lambda c: _metrics.pointing_game(_map(c), _mask(c), tolerance=0).hit.to(c.x.dtype), "higher"),
    "energy_pointing_game": (lambda c: _metrics.energy_pointing_game(_map(c), _mask(c)), "higher"),
    "relevance_mass_accuracy": (lambda c: _metrics.relevance_mass_accuracy(_map(c), _mask(c)), "higher"),
    "relevance_rank_accuracy": (lambda c: _metrics.relevance_rank_accuracy(_map(c), _mask(c)), "higher"),
}
_NEEDS_MASK = ("pointing_game", "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy")
_NEEDS_IMAGES = ("deletion", "insertion")


class Evaluation:
    """The result of :func:`evaluate`: per-example scores of methods x metrics.

    Attributes:
      methods: The method names, in order (the table's rows).
      metrics: The metric names, in order (the table's columns).
      scores: ``{(method, metric): [B] tensor}``, float64 on the CPU.
      better: ``{metric: "higher" | "lower" | ""}``.
    """

    def __init__(self, methods: Sequence[str], metrics: Sequence[str], scores: Dict[Tuple[str, str], Tensor],
                 better: Dict[str, str]) -> None:
        self.methods, self.metrics, self.scores, self.better = tuple(methods), tuple(metrics), scores, better

    def mean(self, method: str, metric: str) -> float:
        """The mean over the examples, NaN scores left out (NaN if all are)."""
        values = self.scores[(method, metric)]
        kept = values[~values.isnan()]
        return float(kept.mean()) if kept.numel() else math.nan

    def std(self, method: str, metric: str) -> float:
        """The standard deviation over the examples (``n - 1`` in the divisor; 0 for one), NaN left out."""
        values = self.scores[(method, metric)]
        kept = values[~values.isnan()]
        return float(kept.std()) if kept.numel() > 1 else (0.0 if kept.numel() else math.nan)

    def rows(self) -> List[Dict[str, Any]]:
        """One dict per (method, metric): ``method, metric, mean, std, sem, n, better`` (``n``: the non-NaN
        examples; ``sem = std / sqrt(n)``), e.g. for ``csv.DictWriter`` or ``pandas.DataFrame``."""
        out = []
        for method in self.methods:
            for metric in self.metrics:
                values = self.scores[(method, metric)]
                n = int((~values.isnan()).sum())
                std = self.std(method, metric)
                out.append({"method": method, "metric": metric, "mean": self.mean(method, metric), "std": std,
                            "sem": std / math.sqrt(n) if n else math.nan, "n": n,
                            "better": self.better.get(metric, "")})
        return out

    def __str__(self) -> str:
        arrows = {"higher": " ↑", "lower": " ↓", "": ""}
        header = ["method"] + [metric + arrows[self.better.get(metric, "")] for metric in self.metrics]
        body = [[method] + [f"{self.mean(method, metric):.4g} ± {self.std(method, metric):.2g}"
                            for metric in self.metrics] for method in self.methods]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Evaluation(methods={list(self.methods)}, metrics={list(self.metrics)})\n{self}"


def _name_of(method: Callable[..., Any]) -> str:
    inner = method
    while isinstance(inner, functools.partial):
        inner = inner.func
    return getattr(inner, "__name__", type(inner).__name__)


@_docs.fill
def evaluate(methods: Union[Mapping[str, Callable[..., Tensor]], Sequence[Callable[..., Tensor]]], model_fn: ModelFn,
             params: Params, x: Tensor, target: Target = None, *,
             metrics: Union[None, Sequence[str], Mapping[str, Any]] = None, mask: Optional[Tensor] = None,
             seed: int = 0) -> Evaluation:
    """A table of explanation methods x evaluation metrics: the mean and spread of each metric over the batch.

    Each method explains ``x`` once (for ``target``, the predicted classes when ``None``); each metric then
    scores every example. The metrics that draw at random get a generator seeded with ``seed`` (the same
    draws for every method, so the methods are compared on the same perturbations).

    Built-in metrics (``METRICS``; image maps have their channels summed first): ``"sparseness"`` ↑,
    ``"complexity"`` ↓, ``"deletion"`` ↓ and ``"insertion"`` ↑ (AUC; images), ``"max_sensitivity"`` ↓,
    ``"avg_sensitivity"`` ↓ and ``"local_lipschitz_estimate"`` ↓ (10 draws each), ``"random_logit"`` ↓,
    ``"mprt"`` ↓ (all layers randomised), and with a mask ``"pointing_game"`` ↑,
    ``"energy_pointing_game"`` ↑, ``"relevance_mass_accuracy"`` ↑, ``"relevance_rank_accuracy"`` ↑.
    The default set is the cheap ones: sparseness, complexity, max sensitivity, deletion and insertion
    for images, and the pointing game and relevance mass accuracy with a mask.

    Args:
      methods: ``{{name: method}}`` or a list of methods (named after their function), each
        ``(model_fn, params, x, target) -> map``, e.g. ``{{"gradcam": partial(tx.grad_cam, layer="features")}}``.
      {model_fn}
        ``out`` has shape ``[B, classes]``.
      {params}
      {x.batch}
      target: ``None`` (the predicted class), an int or ``[B]`` ints.
      metrics: Names of built-in metrics, or ``{{name: name or callable}}`` where a callable gets a
        :class:`Case` and returns ``[B]`` scores. Default: None (the cheap set above).
      mask: ``[B, 1, H, W]`` or ``[B, H, W]`` object masks, for the localisation metrics. Default: None.
      seed: Seed of the generators of the random metrics. Default: 0.

    Returns:
      :class:`Evaluation`: ``print`` it for the table, ``.rows()`` for a list of dicts to save,
      ``.scores[(method, metric)]`` for the ``[B]`` scores.

    Raises:
      ValueError: an unknown metric name, a localisation metric without ``mask``, an empty method set, a
        metric that does not return ``[B]`` scores.
      TypeError: a non-callable method or metric, non-float ``x``.

    Example:
      >>> table = evaluate({{"saliency": tx.saliency, "ig": tx.integrated_gradients}}, fn, params, x)
      >>> print(table)                          # rows: methods, columns: metrics, "mean ± std"
      >>> table.rows()[0]                       # {{'method': 'saliency', 'metric': 'sparseness', 'mean': ...}}

    Cost: one call of each method, plus each metric's own cost per method.
    """
    fn = "evaluate"
    target = check_call(fn, model_fn, params, x, target, min_ndim=2)
    if isinstance(methods, Mapping):
        named = dict(methods)
    elif isinstance(methods, Sequence) and not isinstance(methods, str):
        named = {}
        for method in methods:
            name = _name_of(method)
            named[name if name not in named else f"{name}_{len(named)}"] = method
    else:
        raise _checks.type_error(fn, "methods, a dict name -> method or a list of methods", _checks.describe(methods))
    if not named:
        raise _checks.value_error(fn, "at least one method", "none")
    for name, method in named.items():
        if not callable(method):
            raise _checks.type_error(fn, f"method {name!r}, a callable (model_fn, params, x, target) -> map",
                                     _checks.describe(method))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _checks.type_error(fn, "seed, an int", _checks.describe(seed))
    if metrics is None:
        chosen = ["sparseness", "complexity", "max_sensitivity"]
        if x.ndim == 4:
            chosen += ["deletion", "insertion"]
        if mask is not None:
            chosen += ["pointing_game", "relevance_mass_accuracy"]
        metrics = chosen
    if isinstance(metrics, Mapping):
        table = dict(metrics)
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        table = {name: name for name in metrics}
    else:
        raise _checks.type_error(fn, "metrics, a list of names or a dict name -> name or callable",
                                 _checks.describe(metrics))
    resolved: Dict[str, Callable[[Case], Tensor]] = {}
    better: Dict[str, str] = {}
    for name, spec in table.items():
        if isinstance(spec, str):
            if spec not in METRICS:
                raise _checks.unknown_name(fn, "metric", spec, sorted(METRICS))
            if spec in _NEEDS_MASK and mask is None:
                raise _checks.value_error(fn, f"mask= for the localisation metric {spec!r}", "mask=None")
            if spec in _NEEDS_IMAGES and x.ndim != 4:
                raise _checks.value_error(fn, f"images x [B, C, H, W] for {spec!r}", _checks.describe(x))
            resolved[name], better[name] = METRICS[spec]
        elif callable(spec):
            resolved[name], better[name] = spec, ""
        else:
            raise _checks.type_error(fn, f"metric {name!r}, a built-in name or a callable Case -> [B]",
                                     _checks.describe(spec))
    with torch.no_grad():
        index = _targets.resolve_index(model_fn(params, x), target, fn=fn).to(x.device)
    device = x.device if x.device.type != "mps" else torch.device("cpu")
    scores: Dict[Tuple[str, str], Tensor] = {}
    for method_name, method in named.items():
        attribution = method(model_fn, params, x, index).detach()
        for offset, (metric_name, metric) in enumerate(resolved.items()):
            generator = torch.Generator(device=device).manual_seed(seed + offset)
            case = Case(method, model_fn, params, x, index, attribution, mask, generator)
            values = metric(case)
            if not isinstance(values, Tensor) or values.shape != (x.shape[0],):
                raise _checks.value_error(fn, f"metric {metric_name!r} to return [B] scores with B = {x.shape[0]}",
                                          _checks.describe(values))
            scores[(method_name, metric_name)] = values.detach().to("cpu", torch.float64)
    return Evaluation(list(named), list(resolved), scores, better)
