"""Metrics for token attributions of text classifiers (ERASER, DeYoung et al., 2020).

Faithfulness, by removing tokens (replacing them by a reference token, e.g. ``[MASK]`` or the pad
token, so the sequence keeps its length and a closure over an attention mask stays aligned):

* :func:`aopc_comprehensiveness`: the score drop when the top tokens are removed (higher is better).
* :func:`aopc_sufficiency`: the score drop when only the top tokens are kept (lower is better).

Plausibility, against human rationales (``[B, T]`` bool, the tokens a person marked):

* :func:`token_f1` / :func:`token_iou`: the overlap of the top-``k`` tokens with the rationale.
* :func:`auprc`: the area under the precision-recall curve of the scores as a detector of the
  rationale (average precision, as ``sklearn.metrics.average_precision_score``).

Maps are ``[B, T]`` token scores (sum an embedding-layer map over its last axis first); ``mask``
(``[B, T]``, the attention mask) marks the real tokens, and padding never counts.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import targets as _targets
from ..core.types import ModelFn, Params, Target

__all__ = ["Aopc", "aopc_comprehensiveness", "aopc_sufficiency", "token_f1", "token_iou", "auprc"]

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


class Aopc(NamedTuple):
    """Result of :func:`aopc_comprehensiveness` and :func:`aopc_sufficiency`.

    Attributes:
      aopc: ``[B]`` the mean of ``drop`` over the fractions.
      drop: ``[B, F]`` ``score(x) - score(x perturbed)`` for every fraction.
      fraction: ``[F]`` the fractions of each example's tokens taken as the rationale.
    """

    aopc: Tensor
    drop: Tensor
    fraction: Tensor


# --------------------------------------------------------------------------------------- helpers
def _scores(fn: str, attribution: Any, batch: Optional[int] = None, length: Optional[int] = None) -> Tensor:
    if not isinstance(attribution, Tensor) or not attribution.is_floating_point():
        raise _checks.type_error(fn, "attribution, a floating-point tensor [B, T] of token scores",
                                 _checks.describe(attribution))
    if attribution.ndim != 2 or (batch is not None and tuple(attribution.shape) != (batch, length)):
        shape = "[B, T]" if batch is None else f"[{batch}, {length}]"
        raise _checks.value_error(fn, f"attribution of shape {shape} (one score per token)",
                                  _checks.describe(attribution),
                                  "Sum an embedding map over its last axis first: `attr.sum(-1)`.")
    return attribution


def _tokens(fn: str, name: str, value: Any, shape: Tuple[int, ...], device: torch.device) -> Tensor:
    """A ``[B, T]`` bool (from bool or 0 / 1) of ``shape``."""
    if not isinstance(value, Tensor):
        raise _checks.type_error(fn, f"{name}, a bool tensor of shape {list(shape)}", _checks.describe(value))
    if tuple(value.shape) != tuple(shape):
        raise _checks.value_error(fn, f"{name} of shape {list(shape)}", _checks.describe(value))
    return (value if value.dtype == torch.bool else value != 0).to(device)


def _ranks(scores: Tensor, real: Tensor) -> Tensor:
    """``[B, T]``: 0 for the highest-scoring real token, ties in token order, padding last."""
    keyed = torch.where(real, scores, torch.full_like(scores, -math.inf))
    order = torch.argsort(keyed, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)
    return torch.where(real, rank, torch.full_like(rank, scores.shape[1]))


def _top(fn: str, attribution: Tensor, rationale: Tensor, k: Optional[int], mask: Optional[Tensor],
         abs: bool) -> Tuple[Tensor, Tensor]:
    """``(predicted, rationale)``, both ``[B, T]`` bool over the real tokens."""
    scores = _scores(fn, attribution)
    _checks.check_bool(fn, "abs", abs)
    _checks.check_positive_int(fn, "k", k, allow_none=True)
    truth = _tokens(fn, "rationale", rationale, tuple(scores.shape), scores.device)
    real = torch.ones_like(truth) if mask is None else _tokens(fn, "mask", mask, tuple(scores.shape), scores.device)
    truth = truth & real
    count = truth.sum(dim=1, keepdim=True) if k is None else torch.full_like(truth[:, :1], k, dtype=torch.long)
    predicted = _ranks(scores.abs() if abs else scores, real) < count
    return predicted, truth


# ------------------------------------------------------------------------------------ plausibility
def token_f1(attribution: Tensor, rationale: Tensor, *, k: Optional[int] = None, mask: Optional[Tensor] = None,
             abs: bool = False) -> Tensor:
    """Token F1: the overlap of the ``k`` top-scoring tokens with the human rationale.

    The predicted rationale is each example's ``k`` highest-scoring real tokens (ties in token
    order); ``F1 = 2 |P and R| / (|P| + |R|)``. With ``k=None``, ``k`` is each example's rationale
    length (then precision = recall = F1, ERASER's setting for continuous scores).

    Args:
      attribution: ``[B, T]`` token scores, floating point.
      rationale: ``[B, T]`` bool (or 0 / 1), the tokens a person marked.
      k: How many tokens to predict. Default: None (the rationale's length, per example).
      mask: ``[B, T]`` bool (or 0 / 1) of the real tokens (the attention mask); padding is never
        predicted nor counted. Default: None (every token is real).
      abs: Rank by magnitude. Default: False.

    Returns:
      ``[B]`` F1 in ``[0, 1]``, in the map's dtype; 0 where both sets are empty. Not differentiable.

    Raises:
      ValueError: shapes that differ, a ``k`` below 1.
      TypeError: a non-float map, a non-tensor rationale or mask.

    Example:
      >>> token_f1(saliency_of_tokens, rationales, mask=attention_mask)   # [8, 32] -> [8]

    References: DeYoung et al., "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL 2020.
    """
    predicted, truth = _top("token_f1", attribution, rationale, k, mask, abs)
    both = (predicted & truth).sum(dim=1).to(attribution.dtype)
    total = (predicted.sum(dim=1) + truth.sum(dim=1)).to(attribution.dtype)
    return 2 * both / total.clamp_min(1)


def token_iou(attribution: Tensor, rationale: Tensor, *, k: Optional[int] = None, mask: Optional[Tensor] = None,
              abs: bool = False) -> Tensor:
    """Token IoU: ``|P and R| / |P or R|`` of the ``k`` top-scoring tokens ``P`` and the rationale ``R``.

    Arguments as :func:`token_f1` (``k=None``: the rationale's length). 0 where both sets are empty.

    Example:
      >>> token_iou(scores, rationales, k=5)                             # [8, 32] -> [8]

    References: DeYoung et al., "ERASER", ACL 2020 (here per token, not per span).
    """
    predicted, truth = _top("token_iou", attribution, rationale, k, mask, abs)
    both = (predicted & truth).sum(dim=1).to(attribution.dtype)
    either = (predicted | truth).sum(dim=1).to(attribution.dtype)
    return both / either.clamp_min(1)


def auprc(attribution: Tensor, rationale: Tensor, *, mask: Optional[Tensor] = None, abs: bool = False) -> Tensor:
    """AUPRC: the average precision of the token scores as a detector of the rationale.

    ``sum_n (R_n - R_(n-1)) P_n`` over the distinct score values taken as thresholds, highest first
    (tied tokens enter together), as ``sklearn.metrics.average_precision_score``; batched, without a
    loop over examples. 1 when every rationale token outscores every other token.

    Args:
      attribution: ``[B, T]`` token scores, floating point.
      rationale: ``[B, T]`` bool (or 0 / 1), the tokens a person marked.
      mask: ``[B, T]`` bool (or 0 / 1) of the real tokens; padding is left out. Default: None.
      abs: Score by magnitude. Default: False.

    Returns:
      ``[B]`` average precisions in the map's dtype; ``nan`` where the rationale is empty. Not
      differentiable.

    Raises:
      ValueError / TypeError: as :func:`token_f1`.

    Example:
      >>> auprc(scores, rationales, mask=attention_mask).nanmean()

    References: DeYoung et al., "ERASER", ACL 2020.
    """
    fn = "auprc"
    scores = _scores(fn, attribution)
    _checks.check_bool(fn, "abs", abs)
    truth = _tokens(fn, "rationale", rationale, tuple(scores.shape), scores.device)
    real = torch.ones_like(truth) if mask is None else _tokens(fn, "mask", mask, tuple(scores.shape), scores.device)
    truth = truth & real
    values = scores.abs() if abs else scores
    keyed = torch.where(real, values, torch.full_like(values, -math.inf)).to(torch.float64)
    ordered, order = torch.sort(keyed, dim=1, descending=True, stable=True)
    hits = truth.gather(1, order).to(torch.float64)
    found = hits.cumsum(dim=1)                                                  # true positives at each cut
    seen = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=torch.float64)
    last = torch.ones_like(truth)
    last[:, :-1] = ordered[:, 1:] != ordered[:, :-1]                            # the last token of a tie group
    last = last & real.gather(1, order)                                         # padding is no threshold
    at_cut = torch.where(last, found, torch.zeros_like(found))
    before = torch.zeros_like(found)
    before[:, 1:] = at_cut.cummax(dim=1).values[:, :-1]                         # positives at the previous cut
    positives = truth.sum(dim=1).to(torch.float64)
    area = (last * (found - before) * found / seen).sum(dim=1) / positives
    return torch.where(positives > 0, area, torch.full_like(area, math.nan)).to(attribution.dtype)


# ------------------------------------------------------------------------------------ faithfulness
def _aopc(fn: str, keep_top: bool, model_fn: ModelFn, params: Params, input_ids: Tensor, attribution: Tensor,
          target: Target, reference_token_id: int, fractions: Sequence[float], mask: Optional[Tensor],
          probabilities: bool, abs: bool) -> Aopc:
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params)
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
            or input_ids.dtype == torch.bool or input_ids.ndim != 2:
        raise _checks.type_error(fn, "input_ids, an integer tensor [B, T] of token ids", _checks.describe(input_ids))
    batch, length = input_ids.shape
    scores = _scores(fn, attribution, batch, length)
    if isinstance(reference_token_id, bool) or not isinstance(reference_token_id, int) or reference_token_id < 0:
        raise _checks.type_error(fn, "reference_token_id, an int >= 0 (e.g. the [MASK] or pad token's id)",
                                 _checks.describe(reference_token_id))
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions or not all(
            not isinstance(f, bool) and isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
        raise _checks.value_error(fn, "fractions, a non-empty sequence of numbers in (0, 1]",
                                  _checks.describe(fractions))
    _checks.check_bool(fn, "probabilities", probabilities)
    _checks.check_bool(fn, "abs", abs)
    _targets.check(fn, target, batch)
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else _tokens(
        fn, "mask", mask, (batch, length), input_ids.device)
    rank = _ranks((scores.abs() if abs else scores).to(input_ids.device), real)
    counts = real.sum(dim=1)                                                  # [B] real tokens

    def score(ids: Tensor, index: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        out = model_fn(params, ids)
        if probabilities:
            out = torch.softmax(out, dim=1)
        index = _targets.resolve_index(out, target, fn=fn) if index is None else index
        return _targets.resolve(out, index, fn=fn), index

    original, index = score(input_ids, None)
    reference = torch.full_like(input_ids, reference_token_id)
    drops = []
    for f in fractions:
        k = (counts.to(torch.float64) * f).floor().clamp_min(1).to(torch.long)   # at least one token
        top = rank < k[:, None]
        if keep_top:  # sufficiency: only the top tokens (and padding) stay
            ids = torch.where(top | ~real, input_ids, reference)
        else:         # comprehensiveness: the top tokens go
            ids = torch.where(top, reference, input_ids)
        drops.append(original - score(ids, index)[0])
    drop = torch.stack(drops, dim=1)
    return Aopc(drop.mean(dim=1), drop, torch.tensor([float(f) for f in fractions], dtype=drop.dtype,
                                                      device=drop.device))


def aopc_comprehensiveness(model_fn: ModelFn, params: Params, input_ids: Tensor, attribution: Tensor,
                           target: Target = None, *, reference_token_id: int,
                           fractions: Sequence[float] = FRACTIONS, mask: Optional[Tensor] = None,
                           probabilities: bool = True, abs: bool = False) -> Aopc:
    """AOPC comprehensiveness: how much the score falls when the top tokens are removed.

    For each fraction ``f``, the ``k = max(1, floor(f * n))`` highest-scoring of an example's ``n``
    real tokens are replaced by ``reference_token_id``; the drop is ``p_y(x) - p_y(x without them)``
    and the AOPC is the mean drop over the fractions (ERASER's bins 1, 5, 10, 20, 50 %). Higher means
    the tokens the map ranks first matter to the model.

    Args:
      model_fn: Pure ``(params, input_ids) -> logits [B, classes]``. Always called with ``[B, T]``
        ids (example ``i`` stays at row ``i``, the length does not change), so a closure over an
        attention mask stays aligned.
      params: Name -> tensor mapping accepted by ``torch.func.functional_call``.
      input_ids: ``[B, T]`` integer token ids.
      attribution: ``[B, T]`` token scores, floating point.
      target: ``None`` (the class predicted for ``input_ids``, kept for the perturbed ones), an int or
        ``[B]`` ints.
      reference_token_id: What removed tokens become (``[MASK]``, ``[UNK]`` or the pad token's id).
      fractions: Shares of each example's real tokens removed, each in ``(0, 1]``. Default:
        ``(0.01, 0.05, 0.1, 0.2, 0.5)``.
      mask: ``[B, T]`` bool (or 0 / 1) of the real tokens (the attention mask): padding is never
        removed and not counted in ``n``. Default: None (every token is real).
      probabilities: Score the softmax (as ERASER) rather than the logits. Default: True.
      abs: Rank by magnitude. Default: False.

    Returns:
      :class:`Aopc` ``(aopc [B], drop [B, F], fraction [F])``. Differentiable w.r.t. ``params``.

    Raises:
      ValueError: a map not of ``input_ids``'s shape, fractions outside ``(0, 1]``, a target out of range.
      TypeError: float ids, a bad ``reference_token_id``, a non-float map.

    Example:
      >>> ids, am = batch["input_ids"], batch["attention_mask"]
      >>> fn = lambda p, i: model_fn(p, {"input_ids": i, "attention_mask": am})
      >>> aopc_comprehensiveness(fn, params, ids, scores, y, reference_token_id=tok.mask_token_id, mask=am)

    Cost: ``1 + F`` forward passes of the batch.
    References: DeYoung et al., "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL 2020.
    """
    return _aopc("aopc_comprehensiveness", False, model_fn, params, input_ids, attribution, target,
                 reference_token_id, fractions, mask, probabilities, abs)


def aopc_sufficiency(model_fn: ModelFn, params: Params, input_ids: Tensor, attribution: Tensor,
                     target: Target = None, *, reference_token_id: int, fractions: Sequence[float] = FRACTIONS,
                     mask: Optional[Tensor] = None, probabilities: bool = True, abs: bool = False) -> Aopc:
    """AOPC sufficiency: how much the score falls when only the top tokens are kept.

    As :func:`aopc_comprehensiveness`, but every real token *outside* the top ``k`` is replaced by
    ``reference_token_id`` (padding stays as it is): the drop is ``p_y(x) - p_y(top tokens only)``.
    Lower means the tokens the map ranks first suffice for the prediction (it can be negative).
    Arguments, result and cost as :func:`aopc_comprehensiveness`.

    Example:
      >>> aopc_sufficiency(fn, params, ids, scores, y, reference_token_id=0).aopc    # [8, 32] -> [8]

    References: DeYoung et al., "ERASER", ACL 2020.
    """
    return _aopc("aopc_sufficiency", True, model_fn, params, input_ids, attribution, target,
                 reference_token_id, fractions, mask, probabilities, abs)
