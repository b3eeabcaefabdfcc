"""Attribution of a generated continuation to its prompt, for causal language models.

A causal language model scores a continuation ``c_1 .. c_n`` of a prompt ``p_1 .. p_m`` in one
teacher-forced forward pass of ``[p; c]``: the logits at position ``t - 1`` predict token ``t``, so
``log p(c_j | p, c_<j) = log_softmax(logits[:, m - 1 + j])[c_j]``. This module turns that into

* a target, :func:`continuation_logprob` (``out -> [B]``, the summed log-probability), usable with
  every method of the package, and the per-token log-probabilities :func:`token_logprobs`;
* the per-output-token matrix ``[B, T_out, T_in]`` of gradient methods at the token-embedding layer
  (layer integrated gradients, saliency, input x gradient), :func:`continuation_attribution`;
* the same matrix by token ablation (each prompt token replaced by a reference token),
  :func:`continuation_ablation`.

The gradient matrix takes one call: the methods of :mod:`torchex_fn.methods.gradient` and
:mod:`torchex_fn.methods.path` run once, under ``torch.func.vmap`` over one-hot weights of the output tokens,
so the forward passes are shared by all output tokens and only the backward passes are batched over
them (captum's ``LLMGradientAttribution`` runs one attribution, with its own forwards, per output token).

Conventions are captum's ``LLMGradientAttribution`` / ``LLMAttribution`` (``TextTokenInput``): the
attributed score of output token ``j`` is its log-probability given the prompt and the previous output
tokens; the reference of a prompt token is a baseline token id (default ``0``); only prompt tokens are
perturbed (the continuation stays as it is); gradient maps are summed over the embedding dimension.
Prompts share one length ``T_in`` (no prompt padding); continuations of different lengths are
right-padded and marked by ``mask``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core import autodiff as _autodiff
from ..core import checks as _checks
from ..core import docs as _docs
from ..core import inputs as _inputs
from ..core import targets as _targets
from ..core.model import Wrapped, forwards_replaced
from ..core.types import ModelFn, Params, layer_names_of, lock_of, module_of
from ..core.capture import intermediates, resolve_layers
from ..methods.path import METHODS as QUADRATURES, quadrature as _quadrature
from ..methods.lrp import lrp
from ..methods.propagation import deeplift

__all__ = ["ContinuationAttribution", "continuation_logprob", "token_logprobs", "token_scores", "continuation_score",
           "next_token_kl", "continuation_attribution", "continuation_ablation", "ATTRIBUTION_METHODS",
           "GRADIENT_METHODS", "SCORES", "AGGREGATIONS"]

# The methods whose backward passes share one forward (torch.func.vjp, or autograd with checkpoint=).
GRADIENT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "gradient_shap")
# Methods with backward rules of their own run once per chunk of output tokens, vmapped over it. AttnLRP
# (methods/lrp.py, lrp(..., composite="attnlrp", layer=)) goes here once it exists.
def _lrp(composite: str) -> Callable[..., Any]:
    def method(model_fn: Any, params: Any, x: Any, target: Any, *, layer: str, baseline: Any) -> Tensor:
        return lrp(model_fn, params, x, target, composite=composite, layer=layer)   # LRP has no baseline
    return method


_PER_CHUNK: Dict[str, Callable[..., Any]] = {"deeplift": deeplift, "attnlrp": _lrp("attnlrp"),
                                             "cp_lrp": _lrp("cp_lrp")}
ATTRIBUTION_METHODS = GRADIENT_METHODS + tuple(_PER_CHUNK)
REDUCTIONS = ("sum", "norm")


class ContinuationAttribution(NamedTuple):
    """What :func:`continuation_attribution` and :func:`continuation_ablation` return.

    ``token_attr`` ``[B, T_out, T_in]``: row ``j`` attributes output token ``j``'s log-probability to
    the prompt tokens (zero where ``mask`` is 0). ``seq_attr`` ``[B, T_in]``: the same for the summed
    log-probability of the continuation (captum's ``seq_attr``; for gradient methods the sum of the rows).
    """

    token_attr: Tensor
    seq_attr: Tensor


# --------------------------------------------------------------------------------------------
# Logits and targets.

def _logits(fn: str, out: Any, output: Any = None) -> Tensor:
    """The ``[B, T, vocab]`` logits of a causal LM's output (a tensor, a ModelOutput or dict with logits)."""
    if output is not None:
        chosen = _targets.select_output(out, output, fn=fn)
    elif isinstance(out, Tensor):
        chosen = out
    elif isinstance(out, Mapping) and "logits" in out:
        chosen = out["logits"]
    elif not isinstance(out, (Mapping, tuple, list)) and isinstance(getattr(out, "logits", None), Tensor):
        chosen = out.logits
    else:
        raise _checks.value_error(
            fn, "a model output with logits [B, T, vocab]: a tensor, or a ModelOutput / dict with a 'logits' entry",
            _checks.describe(out), "Choose the tensor with `functionalize(model, output=...)` (a key, attribute, "
            "tuple index or callable).")
    if not isinstance(chosen, Tensor) or chosen.ndim != 3:
        raise _checks.value_error(fn, "logits of shape [B, T, vocab] from a causal language model",
                                  _checks.describe(chosen))
    return chosen


def _check_ids(fn: str, name: str, ids: Any, ranks: tuple, shape: str) -> None:
    if not isinstance(ids, Tensor):
        raise _checks.type_error(fn, f"{name}, an integer tensor of token ids {shape}", _checks.describe(ids))
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise _checks.type_error(fn, f"{name} of an integer dtype (token ids)", _checks.describe(ids),
                                 "Pass token ids, e.g. `tokenizer(text, return_tensors='pt').input_ids`.")
    if ids.ndim not in ranks:
        raise _checks.value_error(fn, f"{name} of shape {shape}", _checks.describe(ids),
                                  "A single sequence is `ids[None]`." if ids.ndim == min(ranks) - 1 else "")
    if ids.shape[-1] < 1:
        raise _checks.value_error(fn, f"{name} with at least one token", _checks.describe(ids))
    _checks.check_values(fn, ids < 0, f"{name} >= 0 (token ids)", lambda: f"{int((ids < 0).sum())} negative ids")


def _check_mask(fn: str, mask: Any, batch: Optional[int], length: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.is_complex():
        raise _checks.type_error(fn, "mask, a bool or 0/1 tensor [B, T_out] (1 for real continuation tokens)",
                                 _checks.describe(mask))
    shapes = [[length]] + ([[batch, length]] if batch is not None else [])
    if list(mask.shape) not in shapes and not (batch is None and mask.ndim == 2 and mask.shape[1] == length):
        raise _checks.value_error(fn, f"mask of shape [B, T_out] = [{batch if batch is not None else 'B'}, {length}] "
                                  f"or [T_out] = [{length}] like the continuation", _checks.describe(mask))


@_docs.fill
def token_logprobs(out: Any, continuation_ids: Tensor, *, prompt_length: Optional[int] = None) -> Tensor:
    """Log-probabilities of the continuation tokens, teacher-forced: ``[B, T_out]``.

    ``log_softmax(logits[:, t - 1])[c_t]`` for every continuation position ``t``.

    Args:
      out: The output of the model on ``[prompt; continuation]``: logits ``[B, L, vocab]`` or a
        ``ModelOutput`` / dict with ``logits``.
      {continuation_ids}
      prompt_length: The position of the first continuation token (``T_in``). ``None`` (default): the
        continuation is the last ``T_out`` tokens of the sequence (also right for models that return
        logits of the last positions only, e.g. HuggingFace's ``logits_to_keep >= T_out + 1``).

    Returns:
      ``[B, T_out]`` log-probabilities.

    Raises:
      TypeError: non-integer ``continuation_ids``.
      ValueError: an output without logits ``[B, L, vocab]``; a continuation that does not fit in
        ``L`` positions after ``prompt_length``; a batch size unlike the output's; ids >= vocab.

    Example:
      >>> out = model(torch.cat([prompt, continuation], 1))                    # [2, 12] tokens
      >>> token_logprobs(out, continuation, prompt_length=8).shape              # [2, 4]

    Cost: a log-softmax over ``T_out`` positions.
    """
    return _token_logprobs("token_logprobs", out, continuation_ids, prompt_length, check=True)


def _check_prompt_length(fn: str, prompt_length: Any) -> None:
    if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)):
        raise _checks.type_error(fn, "prompt_length, an int >= 1 or None", _checks.describe(prompt_length))
    if prompt_length is not None and prompt_length < 1:
        raise _checks.value_error(fn, "prompt_length >= 1 (the continuation is predicted from the prompt)",
                                  _checks.describe(prompt_length))


def _picked(fn: str, out: Any, ids: Tensor, prompt_length: Optional[int], *, check: bool,
            output: Any = None) -> Tuple[Tensor, Tensor]:
    """The logits that score the continuation ``[B, T_out, vocab]`` and its ids ``[B, T_out]``."""
    if check:
        _check_ids(fn, "continuation_ids", ids, (1, 2), "[B, T_out] or [T_out]")
        _check_prompt_length(fn, prompt_length)
    logits = _logits(fn, out, output)
    batch, positions, vocab = logits.shape
    length = ids.shape[-1]
    if ids.ndim == 2 and ids.shape[0] != batch:
        raise _checks.value_error(fn, f"continuation_ids of batch size {batch} like the model output",
                                  _checks.describe(ids))
    start = positions - length - 1 if prompt_length is None else prompt_length - 1
    if start < 0 or start + length > positions:
        where = (f"prompt_length + T_out - 1 = {prompt_length + length - 1} <= {positions}" if prompt_length is not None
                 else f"at least T_out + 1 = {length + 1} positions")
        raise _checks.value_error(fn, f"logits over the prompt and the continuation ({where})",
                                  f"logits of shape {tuple(logits.shape)} for {length} continuation tokens",
                                  "Run the model on `torch.cat([prompt, continuation], 1)`.")
    ids = ids.to(logits.device).expand(batch, length)
    if check:
        _checks.check_values(fn, ids >= vocab, f"continuation_ids in [0, {vocab}) (the vocabulary)",
                             lambda: f"ids up to {int(ids.max())}")
    return logits[:, start:start + length], ids                                 # [B, T_out, vocab], [B, T_out]


def _token_logprobs(fn: str, out: Any, ids: Tensor, prompt_length: Optional[int], *, check: bool,
                    output: Any = None) -> Tensor:
    picked, ids = _picked(fn, out, ids, prompt_length, check=check, output=output)
    return picked.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(picked, dim=-1)


@_docs.fill
def continuation_logprob(continuation_ids: Tensor, *, prompt_length: Optional[int] = None,
                         mask: Optional[Tensor] = None) -> Callable[[Any], Tensor]:
    """A target: the summed log-probability of a continuation, ``out -> [B]``.

    ``sum_t mask_t * log p(c_t | prefix)``, teacher-forced: the model runs once on
    ``[prompt; continuation]`` and the logits at position ``t - 1`` score token ``t``. Use it as the
    ``target`` of any method (with ``layer=`` at the embeddings for token ids).

    Args:
      {continuation_ids}
      prompt_length: Where the continuation starts (``T_in``); ``None`` (default): it ends the sequence.
      {mask.continuation}

    Returns:
      A callable ``out -> [B]`` taking logits ``[B, L, vocab]`` or a ``ModelOutput`` / dict with ``logits``.

    Raises:
      TypeError: non-integer ``continuation_ids``, a bad ``mask`` or ``prompt_length`` type (at once).
      ValueError: a ``mask`` unlike the continuation (at once); an output without logits, a continuation
        that does not fit after ``prompt_length``, a batch size unlike the output's (when called).

    Example:
      >>> ids = torch.cat([prompt, continuation], 1)                        # [2, 8] + [2, 4] -> [2, 12]
      >>> score = continuation_logprob(continuation, prompt_length=8)
      >>> score(model(ids)).shape                                              # [2]
      >>> tx.integrated_gradients(fn, params, {"input_ids": ids, "use_cache": False}, score,
      ...                         layer="transformer.wte", baseline={"input_ids": reference_ids})

    Cost: a log-softmax over ``T_out`` positions per call.
    """
    fn = "continuation_logprob"
    _check_ids(fn, "continuation_ids", continuation_ids, (1, 2), "[B, T_out] or [T_out]")
    if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)):
        raise _checks.type_error(fn, "prompt_length, an int >= 1 or None", _checks.describe(prompt_length))
    if prompt_length is not None and prompt_length < 1:
        raise _checks.value_error(fn, "prompt_length >= 1", _checks.describe(prompt_length))
    batch = continuation_ids.shape[0] if continuation_ids.ndim == 2 else None
    _check_mask(fn, mask, batch, continuation_ids.shape[-1])
    weights = None if mask is None else mask.to(torch.float32)

    def score(out: Any) -> Tensor:
        logp = _token_logprobs(fn, out, continuation_ids, prompt_length, check=False)
        if weights is not None:
            logp = logp * weights.to(device=logp.device, dtype=logp.dtype)
        return logp.sum(-1)

    return score


# --------------------------------------------------------------------------------------------
# The targets of the field (inseq's step functions): scores of continuation tokens, their contrast,
# their aggregation over tokens, and the divergence of two inputs' next-token distributions.

SCORES = ("logprob", "prob", "logit")
AGGREGATIONS = ("sum", "mean", "max", "l2")


def _check_score(fn: str, score: Any) -> None:
    if callable(score):
        return
    if not isinstance(score, str):
        raise _checks.type_error(fn, f"score, one of {SCORES} or a callable (logits [N, T_out, vocab], ids "
                                 "[N, T_out]) -> [N, T_out]", _checks.describe(score))
    if score not in SCORES:
        raise _checks.unknown_name(fn, "score", score, SCORES)


def _check_contrast(fn: str, contrast_ids: Any, cont: Tensor, vocab: Optional[int]) -> Tensor:
    """``contrast_ids`` as ``[B, T_out]`` like the continuation ``cont``."""
    _check_ids(fn, "contrast_ids", contrast_ids, (1, 2), "[B, T_out] or [T_out]")
    if contrast_ids.shape[-1] != cont.shape[-1] or (contrast_ids.ndim == 2 and contrast_ids.shape[0] != cont.shape[0]):
        raise _checks.value_error(fn, f"contrast_ids of the continuation's shape {list(cont.shape)} (or [T_out])",
                                  _checks.describe(contrast_ids), "One contrast token per continuation token.")
    if vocab is not None:
        _checks.check_values(fn, contrast_ids >= vocab, f"contrast_ids in [0, {vocab}) (the vocabulary)",
                             lambda: f"ids up to {int(contrast_ids.max())}")
    return contrast_ids.to(device=cont.device, dtype=cont.dtype).expand(cont.shape)


def _one_score(picked: Tensor, ids: Tensor, score: Any) -> Tensor:
    """``[N, T_out]`` scores of ``ids`` under ``picked`` logits ``[N, T_out, vocab]``."""
    if callable(score):
        return score(picked, ids)
    chosen = picked.gather(-1, ids[..., None]).squeeze(-1)
    if score == "logit":
        return chosen
    logp = chosen - torch.logsumexp(picked, dim=-1)
    return logp if score == "logprob" else logp.exp()


def _scores(fn: str, logits: Tensor, ids: Tensor, contrast: Optional[Tensor], score: Any,
            prompt_length: Optional[int]) -> Tensor:
    picked, ids = _picked(fn, logits, ids, prompt_length, check=False)
    s = _one_score(picked, ids, score)
    if contrast is not None:
        s = s - _one_score(picked, contrast.to(ids.device).expand(ids.shape), score)
    return s


def _aggregate(fn: str, s: Tensor, weights: Optional[Tensor], aggregate: str) -> Tensor:
    """``[B, T_out] -> [B]`` over the tokens whose weight is non-zero."""
    w = torch.ones_like(s) if weights is None else weights.to(device=s.device, dtype=s.dtype).expand(s.shape)
    if aggregate == "sum":
        return (s * w).sum(-1)
    if aggregate == "mean":
        return (s * w).sum(-1) / w.sum(-1).clamp_min(1)
    if aggregate == "l2":
        return torch.linalg.vector_norm(s * w, dim=-1)
    return torch.where(w > 0, s, torch.full_like(s, -torch.inf)).amax(-1)


def _span_weights(fn: str, length: int, mask: Optional[Tensor], span: Any, batch: Optional[int]) -> Optional[Tensor]:
    """The mask times the span's indicator ``[T_out]``; None when neither is given."""
    _check_mask(fn, mask, batch, length)
    weights = None if mask is None else mask.to(torch.float32)
    if span is None:
        return weights
    if not (isinstance(span, tuple) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in span)):
        raise _checks.type_error(fn, "span, a pair (start, stop) of continuation positions", _checks.describe(span))
    start, stop = span
    if not 0 <= start < stop <= length:
        raise _checks.value_error(fn, f"span (start, stop) with 0 <= start < stop <= T_out = {length}",
                                  _checks.describe(span))
    inside = torch.zeros(length)
    inside[start:stop] = 1.0
    return inside if weights is None else weights * inside


def _check_choice(fn: str, name: str, value: Any, known: tuple) -> None:
    if not isinstance(value, str):
        raise _checks.type_error(fn, f"{name}, one of {known}", _checks.describe(value))
    if value not in known:
        raise _checks.unknown_name(fn, name, value, known)


@_docs.fill
def token_scores(out: Any, continuation_ids: Tensor, *, score: Any = "logprob", contrast_ids: Optional[Tensor] = None,
                 prompt_length: Optional[int] = None) -> Tensor:
    """Per-token scores of a continuation, teacher-forced: ``[B, T_out]`` (inseq's step functions).

    At every continuation position ``t`` the logits ``z = logits[:, t - 1]`` score token ``c_t``:

    * ``"logprob"``: ``log softmax(z)[c_t]`` (:func:`token_logprobs`);
    * ``"prob"``: ``softmax(z)[c_t]``;
    * ``"logit"``: ``z[c_t]``;
    * a callable ``(logits [B, T_out, vocab], ids [B, T_out]) -> [B, T_out]``: any function of the
      continuation positions' logits (e.g. entropy, a margin).

    With ``contrast_ids`` each score becomes ``score(c_t) - score(contrast_t)`` at the same position
    (contrastive attribution, Yin & Neubig 2022): ``"logprob"`` gives ``log p(c_t) - log p(contrast_t)``,
    ``"prob"`` the probability difference.

    Args:
      out: The output of the model on ``[prompt; continuation]``: logits ``[B, L, vocab]`` or a
        ``ModelOutput`` / dict with ``logits``.
      {continuation_ids}
      score: ``"logprob"`` (default), ``"prob"``, ``"logit"`` or a callable (see above).
      contrast_ids: ``[B, T_out]`` or ``[T_out]`` ids of the contrast tokens. Default: None.
      prompt_length: The position of the first continuation token (``T_in``). ``None`` (default): the
        continuation is the last ``T_out`` tokens of the sequence.

    Returns:
      ``[B, T_out]`` scores.

    Raises:
      TypeError: non-integer ids; a ``score`` neither a name nor a callable.
      ValueError: an unknown ``score``; ``contrast_ids`` unlike the continuation; an output without
        logits ``[B, L, vocab]``; a continuation that does not fit; ids >= vocab.

    Example:
      >>> out = model(torch.cat([prompt, continuation], 1))
      >>> token_scores(out, continuation, score="prob", contrast_ids=other).shape          # [B, T_out]

    Cost: a log-softmax over ``T_out`` positions (two gathers with ``contrast_ids``).
    """
    fn = "token_scores"
    _check_ids(fn, "continuation_ids", continuation_ids, (1, 2), "[B, T_out] or [T_out]")
    _check_score(fn, score)
    _check_prompt_length(fn, prompt_length)
    contrast = None
    if contrast_ids is not None:
        contrast = _check_contrast(fn, contrast_ids, continuation_ids, None)
    picked, ids = _picked(fn, out, continuation_ids, prompt_length, check=True)
    s = _one_score(picked, ids, score)
    if contrast is not None:
        _checks.check_values(fn, contrast >= picked.shape[-1], f"contrast_ids in [0, {picked.shape[-1]})",
                             lambda: f"ids up to {int(contrast.max())}")
        s = s - _one_score(picked, contrast.to(ids.device).expand(ids.shape), score)
    return s


@_docs.fill
def continuation_score(continuation_ids: Tensor, *, score: Any = "logprob", contrast_ids: Optional[Tensor] = None,
                       aggregate: str = "sum", span: Optional[Tuple[int, int]] = None,
                       prompt_length: Optional[int] = None, mask: Optional[Tensor] = None) -> Callable[[Any], Tensor]:
    """A target: the per-token scores of :func:`token_scores`, aggregated over tokens, ``out -> [B]``.

    ``aggregate`` over the continuation tokens that ``mask`` and ``span`` keep: ``"sum"`` (default; the
    sequence's log-probability with ``score="logprob"``, as :func:`continuation_logprob`), ``"mean"``,
    ``"max"`` or ``"l2"`` (the norm of the kept scores). Use it as the ``target`` of any method, with
    ``layer=`` at the embeddings for token ids.

    Args:
      {continuation_ids}
      score: ``"logprob"`` (default), ``"prob"``, ``"logit"`` or a callable ``(logits [B, T_out, vocab],
        ids [B, T_out]) -> [B, T_out]``.
      contrast_ids: Contrast tokens ``[B, T_out]`` or ``[T_out]``: scores become ``score(c) - score(contrast)``
        per position. Default: None.
      aggregate: ``"sum"`` (default), ``"mean"``, ``"max"`` or ``"l2"``.
      span: ``(start, stop)``: only continuation tokens ``start <= j < stop`` count. Default: all.
      prompt_length: Where the continuation starts (``T_in``); ``None`` (default): it ends the sequence.
      {mask.continuation}

    Returns:
      A callable ``out -> [B]`` taking logits ``[B, L, vocab]`` or a ``ModelOutput`` / dict with ``logits``.

    Raises:
      TypeError: non-integer ids, a bad ``score``, ``span`` or ``aggregate`` type (at once).
      ValueError: an unknown ``score`` or ``aggregate``; a ``span`` outside the continuation; ``mask`` or
        ``contrast_ids`` unlike the continuation (at once); an output without logits (when called).

    Example:
      >>> target = continuation_score(cont, contrast_ids=other, aggregate="mean", prompt_length=8)
      >>> tx.saliency(fn, params, {"input_ids": ids}, target, layer="transformer.wte")

    Cost: a log-softmax over ``T_out`` positions per call.
    """
    fn = "continuation_score"
    _check_ids(fn, "continuation_ids", continuation_ids, (1, 2), "[B, T_out] or [T_out]")
    _check_score(fn, score)
    _check_choice(fn, "aggregate", aggregate, AGGREGATIONS)
    _check_prompt_length(fn, prompt_length)
    contrast = None if contrast_ids is None else _check_contrast(fn, contrast_ids, continuation_ids, None)
    batch = continuation_ids.shape[0] if continuation_ids.ndim == 2 else None
    weights = _span_weights(fn, continuation_ids.shape[-1], mask, span, batch)

    def target(out: Any) -> Tensor:
        return _aggregate(fn, _scores(fn, _logits(fn, out), continuation_ids, contrast, score, prompt_length),
                          weights, aggregate)

    return target


@_docs.fill
def next_token_kl(reference: Any, *, aggregate: str = "sum", mask: Optional[Tensor] = None) -> Callable[[Any], Tensor]:
    """A target: the KL divergence between the model's next-token distributions and a reference's, ``out -> [B]``.

    ``reference`` holds the logits ``[B, P, vocab]`` of the model on another input (a corrupted or
    contrastive prompt: inseq's ``kl_divergence``), at ``P`` positions aligned with the last ``P``
    positions of ``out``. Per position ``t``, with ``p = softmax(out[:, t])`` and ``q = softmax(ref[:, t])``::

        KL(p || q) = sum_v p_v (log p_v - log q_v)

    aggregated over the positions ``mask`` keeps (``"sum"``, ``"mean"``, ``"max"``, ``"l2"``). Its
    gradient flows through ``p`` only (the reference is a constant).

    Args:
      reference: Logits ``[B, P, vocab]`` (or ``[P, vocab]``, one for all examples), or a model output
        with ``logits``; computed by the caller, e.g. ``model(corrupt_ids).logits[:, -P:]``.
      aggregate: ``"sum"`` (default), ``"mean"``, ``"max"`` or ``"l2"`` over the positions.
      mask: ``[B, P]`` or ``[P]`` bool or 0/1, the positions that count. Default: all.

    Returns:
      A callable ``out -> [B]``.

    Raises:
      TypeError: a reference that is not logits.
      ValueError: an unknown ``aggregate``; a ``mask`` unlike the positions (at once); an output with
        fewer than ``P`` positions or another vocabulary (when called).

    Example:
      >>> ref = model(corrupt).logits[:, -4:].detach()
      >>> tx.integrated_gradients(fn, params, {"input_ids": clean}, next_token_kl(ref), layer="transformer.wte",
      ...                         baseline={"input_ids": corrupt})

    Cost: two log-softmaxes over ``P`` positions per call.
    """
    fn = "next_token_kl"
    ref = reference if isinstance(reference, Tensor) else _logits(fn, reference)
    if not isinstance(ref, Tensor) or not ref.is_floating_point() or ref.ndim not in (2, 3):
        raise _checks.type_error(fn, "reference logits [B, P, vocab] or [P, vocab]", _checks.describe(reference))
    _check_choice(fn, "aggregate", aggregate, AGGREGATIONS)
    positions = ref.shape[-2]
    _check_mask(fn, mask, ref.shape[0] if ref.ndim == 3 else None, positions)
    log_q = torch.log_softmax(ref.detach(), dim=-1)
    weights = None if mask is None else mask.to(torch.float32)

    def target(out: Any) -> Tensor:
        logits = _logits(fn, out)
        if logits.shape[1] < positions or logits.shape[-1] != log_q.shape[-1]:
            raise _checks.value_error(fn, f"logits with at least {positions} positions and a vocabulary of "
                                      f"{log_q.shape[-1]} like the reference", _checks.describe(logits))
        log_p = torch.log_softmax(logits[:, logits.shape[1] - positions:], dim=-1)
        kl = (log_p.exp() * (log_p - log_q.to(device=log_p.device, dtype=log_p.dtype))).sum(-1)   # [B, P]
        return _aggregate(fn, kl, weights, aggregate)

    return target


# --------------------------------------------------------------------------------------------
# The model seen as a logits function.

def _logits_model(model_fn: ModelFn, fn: str) -> Wrapped:
    """``model_fn`` returning only its logits ``[B, T, vocab]``; names layers like ``model_fn``.

    Methods then see a tensor output (a ModelOutput's cache and extra fields never enter a transform);
    its ``output`` is ``None``, since targets index the logits tensor it returns.
    """
    output = _targets.selector(model_fn)
    return Wrapped(model_fn, after=lambda x, out: _logits(fn, out, output), output=None)


def _lm_input(model_fn: Any, ids: Tensor, keep: int) -> Any:
    """``ids``, or for a HuggingFace causal LM ``{"input_ids": ids, "logits_to_keep": keep, "use_cache": False}``.

    The continuation ends the sequence, so only the last ``T_out + 1`` positions' logits are needed:
    a forward that takes ``logits_to_keep`` computes the vocabulary projection (and its backward)
    there only, and ``use_cache=False`` builds no key/value cache.
    """
    forward = getattr(module_of(model_fn), "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        names = {}
    if "input_ids" not in names:
        return ids
    x: Dict[str, Any] = {"input_ids": ids}
    if "logits_to_keep" in names:
        x["logits_to_keep"] = keep
    if "use_cache" in names:
        x["use_cache"] = False
    return x


def _check_common(fn: str, model_fn: Any, params: Any, prompt_ids: Any, continuation_ids: Any, mask: Any,
                  batch_size: Any, cap_name: str = "batch_size"):
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _check_ids(fn, "prompt_ids", prompt_ids, (2,), "[B, T_in]")
    _check_ids(fn, "continuation_ids", continuation_ids, (1, 2), "[B, T_out] or [T_out]")
    batch = prompt_ids.shape[0]
    if continuation_ids.ndim == 2 and continuation_ids.shape[0] != batch:
        raise _checks.value_error(fn, f"continuation_ids of shape [B, T_out] with B = {batch} like prompt_ids "
                                  f"{list(prompt_ids.shape)}", _checks.describe(continuation_ids),
                                  "Pass one continuation per prompt, or one [T_out] for all.")
    if continuation_ids.device != prompt_ids.device:
        raise _checks.value_error(fn, f"continuation_ids on the prompt's device {prompt_ids.device}",
                                  f"device {continuation_ids.device}")
    _check_mask(fn, mask, batch, continuation_ids.shape[-1])
    _checks.check_positive_int(fn, cap_name, batch_size, allow_none=True)
    vocab = _vocab_size(model_fn)
    if vocab is not None:  # the embedding would fail with an IndexError inside the model
        for name, ids in (("prompt_ids", prompt_ids), ("continuation_ids", continuation_ids)):
            _checks.check_values(fn, ids >= vocab, f"{name} in [0, {vocab}) (the vocabulary)",
                                 lambda ids=ids: f"ids up to {int(ids.max())}")
    cont = continuation_ids.to(prompt_ids.dtype).expand(batch, continuation_ids.shape[-1])
    weights = (torch.ones(cont.shape, device=prompt_ids.device) if mask is None
               else mask.to(device=prompt_ids.device, dtype=torch.float32).expand(cont.shape))
    return cont, weights


def _vocab_size(model_fn: Any) -> Optional[int]:
    """The vocabulary size of a ``functionalize``-d HuggingFace model (its input embeddings), else None."""
    getter = getattr(module_of(model_fn), "get_input_embeddings", None)
    size = getattr(getter(), "num_embeddings", None) if callable(getter) else None
    return size if isinstance(size, int) else None


def _reference_ids(fn: str, baseline: Any, prompt_ids: Tensor, vocab: Optional[int] = None) -> Tensor:
    """The baseline prompt ``[B, T_in]``: a token id for every position (or one for all)."""
    reference = _reference_ids_unchecked(fn, baseline, prompt_ids)
    bad = reference < 0 if vocab is None else (reference < 0) | (reference >= vocab)
    _checks.check_values(fn, bad, "baseline token ids in [0, vocab)" if vocab is None
                         else f"baseline token ids in [0, {vocab}) (the vocabulary)",
                         lambda: _checks.describe(baseline))
    return reference


def _reference_ids_unchecked(fn: str, baseline: Any, prompt_ids: Tensor) -> Tensor:
    if isinstance(baseline, bool) or not isinstance(baseline, (int, Tensor)):
        raise _checks.type_error(fn, "baseline, a token id (int) or integer ids broadcastable to [B, T_in]",
                                 _checks.describe(baseline))
    if isinstance(baseline, int):
        return torch.full_like(prompt_ids, baseline)
    if baseline.is_floating_point() or baseline.is_complex() or baseline.dtype == torch.bool:
        raise _checks.type_error(fn, "baseline of an integer dtype (reference token ids)", _checks.describe(baseline),
                                 "Pass a token id such as the pad or unknown token's.")
    try:
        return torch.broadcast_to(baseline.to(device=prompt_ids.device, dtype=prompt_ids.dtype), prompt_ids.shape)
    except RuntimeError:
        raise _checks.value_error(fn, f"baseline broadcastable to the prompt {list(prompt_ids.shape)}",
                                  _checks.describe(baseline)) from None


# --------------------------------------------------------------------------------------------
# Gradient methods at the embedding layer.

@_docs.fill
def continuation_attribution(model_fn: ModelFn, params: Params, prompt_ids: Tensor, continuation_ids: Tensor, *,
                             method: str = "integrated_gradients", layer: Any = None, baseline: Any = 0,
                             steps: int = 50, quadrature: str = "gausslegendre", samples: int = 5,
                             stdev: float = 0.0, generator: Optional[torch.Generator] = None,
                             score: Any = "logprob", contrast_ids: Optional[Tensor] = None,
                             reduce: str = "sum", mask: Optional[Tensor] = None,
                             batch_size: Optional[int] = None, internal_batch_size: Optional[int] = None,
                             checkpoint: Any = False) -> ContinuationAttribution:
    """Attribute every continuation token's log-probability to the prompt tokens, in one call.

    The model runs on ``[prompt; continuation]`` (teacher forcing). For output token ``j`` the score is
    ``log p(c_j | prompt, c_<j)`` (or another ``score``); ``method`` attributes it to the output of
    ``layer`` (the token embeddings) at the prompt positions, and the map is summed over the embedding
    dimension. The ``T_out`` scores share every forward pass: the forward runs once (per group of
    ``internal_batch_size`` path points), and its backward passes run for ``batch_size`` output tokens at
    a time, batched by ``torch.func.vmap`` over one-hot weights of the scores.

    * ``"integrated_gradients"``: :func:`torchex_fn.integrated_gradients` with ``layer`` (captum's
      ``LayerIntegratedGradients``): the path runs from the embeddings of the reference prompt (every
      prompt token replaced by ``baseline``; continuation embeddings unchanged) to those of the prompt.
      ``token_attr[b, j].sum()`` equals ``log p(c_j)`` minus its value on the reference prompt up to the
      quadrature error. Equal to captum's ``LLMGradientAttribution(LayerIntegratedGradients(model,
      model.transformer.wte), tokenizer)`` with ``TextTokenInput(..., baselines=baseline)``.
    * ``"saliency"``: the gradient at the layer (captum's ``LayerGradientXActivation(...,
      multiply_by_inputs=False)``); take its norm over the embedding dimension (``reduce="norm"``).
    * ``"input_x_gradient"``: embedding times gradient (captum's ``LayerGradientXActivation``).
    * ``"gradient_shap"``: :func:`torchex_fn.gradient_shap` with ``layer`` and the reference prompt as
      its one baseline: ``samples`` random points on the path (and noise of ``stdev`` on the embeddings),
      drawn from ``generator`` in the order of :func:`torchex_fn.gradient_shap`, so the same seed gives
      its maps.
    * ``"deeplift"``: :func:`torchex_fn.deeplift` with ``layer`` and the reference prompt as baseline.
      Its multipliers need its own passes: it runs once per ``batch_size`` output tokens (vmapped over
      them), not under one shared forward, and without ``checkpoint``.

    * ``"attnlrp"`` / ``"cp_lrp"``: :func:`torchex_fn.lrp` with that composite and ``layer`` (AttnLRP,
      CP-LRP; no baseline). Like ``"deeplift"``, a method with its own backward rules runs once per chunk
      of ``batch_size`` output tokens.

    Args:
      {model_fn.lm}
      {params}
      {prompt_ids}
      {continuation_ids}
      method: ``"integrated_gradients"`` (default), ``"saliency"``, ``"input_x_gradient"``,
        ``"gradient_shap"``, ``"deeplift"``, ``"attnlrp"`` or ``"cp_lrp"``.
      layer: The token-embedding layer (a dotted name or module). ``None`` (default): the module's
        ``get_input_embeddings()`` (HuggingFace models: ``transformer.wte`` for GPT-2), captum's choice.
      baseline: Reference token id for every prompt position (int) or ids broadcastable to
        ``[B, T_in]``; integrated gradients, gradient SHAP and DeepLIFT. Default: 0 (captum's
        ``TextTokenInput`` default).
      steps: Integrated gradients' path points (captum's ``n_steps``). Default: 50.
      quadrature: Integrated gradients' rule (captum's ``method``). Default: ``"gausslegendre"``.
      samples: Gradient SHAP's draws (captum's ``n_samples``). Default: 5.
      stdev: Gradient SHAP's noise on the embeddings (absolute, in the embedding's units). Default: 0.
      generator: Gradient SHAP's source of randomness. Default: None (the global generator).
      score: What each output token contributes: ``"logprob"`` (default), ``"prob"``, ``"logit"``, or a
        callable ``(logits [N, T_out, vocab], ids [N, T_out]) -> [N, T_out]`` (see :func:`token_scores`).
      contrast_ids: Ids ``[B, T_out]`` (or ``[T_out]``) of a contrast continuation: each token's score is
        then ``score(c_j) - score(contrast_j)`` at the same position (inseq's contrastive attribution;
        the model still runs on the continuation). Default: None.
      reduce: How a token's ``[D]`` embedding map becomes one number: ``"sum"`` (default; captum's, and
        the one that keeps integrated gradients' completeness) or ``"norm"`` (its L2 norm; ``seq_attr``
        is then the norm of the summed maps). Summed *gradients* of a model that normalises its
        embeddings first (a pre-LayerNorm transformer such as GPT-2) are ~0, since LayerNorm is
        invariant to adding a constant to every dimension: use ``"norm"`` with ``"saliency"``.
      {mask.continuation}
        Rows of masked tokens are 0 and do not enter ``seq_attr``.
      batch_size: Memory cap on the backward: the most output tokens whose backward passes run at
        once (vmapped), all of them sharing one forward. ``None`` (default): all ``T_out`` at once.
        Peak memory grows with it (a backward's transient gradients times ``batch_size``; with
        ``checkpoint``, only the gradients between blocks: each checkpointed block takes the batch one
        output token at a time). Time falls with it where one token's backward does not fill the device (a
        GPU; with ``checkpoint``, also by ``ceil(T_out / batch_size)`` recomputations); on a CPU a backward at
        a long prompt is already a large matrix product, and ``batch_size=1`` and ``4`` took the same time
        within 3 % (GPT-2-small shape, 1,024 tokens).
      internal_batch_size: Memory cap on the forward (captum's name): the most sequences in one forward
        pass. Integrated gradients and gradient SHAP put ``internal_batch_size // B`` path points of
        all ``B`` examples in a forward (one point of ``internal_batch_size`` examples when
        ``B > internal_batch_size``). ``None`` (default): all points of all examples in one forward.
      checkpoint: Recompute activations instead of keeping them: ``True`` checkpoints every block of the
        model's longest ``nn.ModuleList`` (``transformer.h`` in GPT-2, ``model.layers`` in Llama), a
        name or list of names checkpoints those modules. Only the blocks' differentiable inputs stay from
        the forward; each backward call runs each block again (its random draws replayed, as
        ``torch.utils.checkpoint`` does) and takes the product through it for the ``batch_size`` output
        tokens one token at a time, so a block's transient gradients are those of one backward. It runs on
        ``torch.autograd`` (``torch.func`` transforms cannot keep a recomputed graph), so the result
        cannot be differentiated by an enclosing ``torch.func`` transform. Default: False.

    Returns:
      ``ContinuationAttribution(token_attr [B, T_out, T_in], seq_attr [B, T_in])``; ``seq_attr``
      attributes the continuation's summed score (with ``reduce="sum"``, the sum of the rows).

    Raises:
      TypeError: non-integer ``prompt_ids`` / ``continuation_ids`` / ``baseline``; a model without a
        named embedding layer and no ``layer``; ``checkpoint`` neither a bool nor module names.
      ValueError: ``continuation_attribution: expected continuation_ids of shape [B, T_out] with B = 2
        like prompt_ids [2, 8], ...``; an unknown ``method``, ``layer`` or ``score``; a ``mask`` unlike the
        continuation; ``checkpoint`` with ``"deeplift"`` or a model without blocks; a model output
        without ``logits`` (after its first forward); ids >= vocab.

    Example:
      >>> fn, params = tx.functionalize(gpt2.eval())
      >>> res = tx.continuation_attribution(fn, params, prompt, generated, steps=32)
      >>> res.token_attr.shape, res.seq_attr.shape                          # [2, 4, 8], [2, 8]
      >>> tx.continuation_attribution(fn, params, prompt, generated, method="input_x_gradient",
      ...                             batch_size=4, checkpoint=True)        # 4 backward passes at once

    Cost: the method's forward passes once (integrated gradients: ``steps`` path points) and its
      backward passes, to ``layer`` only, ``batch_size`` output tokens at a time (captum runs ``T_out``
      whole attributions, forward and backward each). With ``checkpoint`` every backward call also
      recomputes the checkpointed blocks' forward: ``ceil(T_out / batch_size)`` extra forwards. A model
      whose ``forward`` takes ``input_ids`` and ``logits_to_keep`` (HuggingFace causal LMs) is called
      with ``logits_to_keep=T_out + 1`` and ``use_cache=False``: the vocabulary projection and its
      backward run at the scored positions only. Memory: the activations of one forward of
      ``min(B * steps, internal_batch_size)`` sequences and a backward ``batch_size`` times as wide
      (with ``checkpoint``: the blocks' inputs, one block's activations and one output token's backward
      through it, plus the ``batch_size`` gradients between blocks). Without ``checkpoint``, models whose
      attention has no ``vmap`` batching rule for its backward (``scaled_dot_product_attention`` on CPU)
      run its backward in a loop with a PyTorch performance warning.
    References: Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017; captum's
      ``LLMGradientAttribution`` (Miglani et al., "Using Captum to Explain Generative Language Models", 2023);
      Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016 (checkpointing).
    """
    fn = "continuation_attribution"
    cont, weights = _check_common(fn, model_fn, params, prompt_ids, continuation_ids, mask, internal_batch_size,
                                  "internal_batch_size")
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    if not isinstance(method, str):
        raise _checks.type_error(fn, f"method, one of {ATTRIBUTION_METHODS}", _checks.describe(method))
    if method not in ATTRIBUTION_METHODS:
        raise _checks.unknown_name(fn, "method", method, ATTRIBUTION_METHODS)
    _checks.check_positive_int(fn, "steps", steps)
    _checks.check_positive_int(fn, "samples", samples)
    _checks.check_generator(fn, generator)
    if isinstance(stdev, bool) or not isinstance(stdev, (int, float)) or not stdev >= 0.0:
        raise _checks.value_error(fn, "stdev, a float >= 0", _checks.describe(stdev))
    for option, value, known in (("reduce", reduce, REDUCTIONS), ("quadrature", quadrature, QUADRATURES)):
        if not isinstance(value, str):
            raise _checks.type_error(fn, f"{option}, one of {known}", _checks.describe(value))
        if value not in known:
            raise _checks.unknown_name(fn, option, value, known)
    _check_score(fn, score)
    contrast = None if contrast_ids is None else _check_contrast(fn, contrast_ids, cont, _vocab_size(model_fn))
    reference = _reference_ids(fn, baseline, prompt_ids, _vocab_size(model_fn))
    layer = _embedding_layer(fn, model_fn, layer)
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(names) != 1:
        raise _checks.value_error(fn, "one layer (the token embeddings)", f"{len(names)} layers")
    blocks = _checkpointed_blocks(fn, model_fn, checkpoint)
    if blocks and any(_autodiff.tracked(t) for t in _autodiff.leaves(params)):
        raise _checks.value_error(fn, "checkpoint=False when params carry derivatives", _checks.describe(checkpoint),
                                  "A checkpointed block's recomputation passes no derivative to the parameters; "
                                  "differentiate the maps without checkpointing (lower batch_size to bound memory).")
    if blocks and method in _PER_CHUNK:
        raise _checks.value_error(fn, f"checkpoint=False with method={method!r}", _checks.describe(checkpoint),
                                  f"{method} runs its own backward rules through torch.func, which cannot "
                                  "recompute checkpointed activations; lower batch_size to bound memory instead.")
    logits_fn = _logits_model(model_fn, fn)
    n_in, n_out = prompt_ids.shape[1], cont.shape[1]
    ids = torch.cat([prompt_ids, cont], dim=1)                                   # [B, T_in + T_out]
    reference = torch.cat([reference, cont], dim=1)
    chunk = n_out if batch_size is None else min(batch_size, n_out)
    batch = ids.shape[0]
    x = _lm_input(model_fn, ids, n_out + 1)
    ref_x = reference if isinstance(x, Tensor) else {"input_ids": reference}

    def scores(logits: Tensor) -> Tensor:      # [k * B, T, vocab] -> [k * B, T_out], weighted by the mask
        k = logits.shape[0] // batch
        s = _scores(fn, logits, cont.repeat(k, 1), None if contrast is None else contrast.repeat(k, 1), score,
                    None)
        return s * weights.repeat(k, 1).to(s.dtype)

    folded = _Folded(fn, n_in, reduce)
    with _Checkpointing(module_of(model_fn), blocks, lock_of(model_fn)):
        if method in _PER_CHUNK:
            _per_chunk(fn, method, logits_fn, params, x, ref_x, names[0], scores, n_out, chunk, folded)
        else:
            _shared_forward(fn, method, logits_fn, params, x, ref_x, names[0], scores, n_out, chunk,
                            internal_batch_size, steps, quadrature, samples, float(stdev), generator, bool(blocks),
                            folded)
    return folded.result()


class _Folded:
    """The per-token maps of chunks of output tokens, reduced over the embedding as each chunk arrives: the
    ``[T_out, B, T, D]`` vectors of a long prompt (100 MB at 1,024 tokens x 768 x 32 outputs) are never held."""

    def __init__(self, fn: str, n_in: int, reduce: str):
        self.fn, self.n_in, self.reduce = fn, n_in, reduce
        self.rows: List[Tensor] = []
        self.total: Optional[Tensor] = None          # the sum of the vectors over output tokens ("norm")

    def add(self, vectors: Tensor) -> None:
        """``vectors`` ``[k, B, T, ...]``: the next ``k`` output tokens' maps at the layer."""
        if vectors.ndim < 4:
            raise _checks.value_error(self.fn, "a layer output [B, T, ...] (one vector per token)",
                                      f"a layer output of shape {tuple(vectors.shape[1:])}")
        vectors = vectors[:, :, :self.n_in].flatten(3)                           # [k, B, T_in, D]
        if self.reduce == "sum":
            self.rows.append(vectors.sum(-1))                                    # [k, B, T_in]
            return
        self.rows.append(torch.linalg.vector_norm(vectors, dim=-1))
        part = vectors.sum(0)
        self.total = part if self.total is None else self.total + part

    def result(self) -> ContinuationAttribution:
        token_maps = torch.cat(self.rows)                                        # [T_out, B, T_in]
        if self.reduce == "sum":
            seq = token_maps.sum(0)
        else:
            assert self.total is not None
            seq = torch.linalg.vector_norm(self.total, dim=-1)
        return ContinuationAttribution(token_maps.movedim(0, 1), seq)


class _Stop(Exception):
    """Internal: the layer's output is known; the rest of the forward is not needed."""


def _layer_output(fn: str, logits_fn: Any, params: Params, x: Any, name: str) -> Tensor:
    """The output of layer ``name`` on ``x``; a module's forward stops right after it (the embeddings
    are its first layer: the shared forward is then the only full one)."""
    if module_of(logits_fn) is None or name not in (layer_names_of(logits_fn) or {}):
        return intermediates(logits_fn, layers=[name], fn=fn)(params, x)[1][name]
    seen: List[Tensor] = []

    def stop(module: nn.Module, args: Any, output: Any) -> Any:
        seen.append(output)
        raise _Stop

    try:
        Wrapped(logits_fn, hook=(name, stop))(params, x)
    except _Stop:
        pass
    if not seen or not isinstance(seen[0], Tensor):
        return intermediates(logits_fn, layers=[name], fn=fn)(params, x)[1][name]
    return seen[0]


class _Backward:
    """One forward of ``f`` at ``values`` and its backward passes for chunks of one-hot score weights.

    ``f(values) -> [N, T_out]``. Without checkpointing, ``torch.func.vjp`` and ``vmap`` over its pull-back
    (composable with enclosing ``torch.func`` transforms); with it, ``torch.autograd.grad`` batched over
    the chunk (what ``is_grads_batched=True`` does, with the level and size the checkpointed blocks read),
    keeping the graph for the next chunk.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], values: Tensor, autograd: bool):
        self.autograd = autograd
        if autograd:
            self.leaf = values.detach().requires_grad_()
            with torch.enable_grad():
                self.out = f(self.leaf)
        else:
            self.out, self.pull = torch.func.vjp(f, values)[:2]

    def grads(self, start: int, stop: int, last: bool) -> Tensor:
        """``d out[:, j] / d values`` for ``j`` in ``[start, stop)``: ``[stop - start, N, ...]``."""
        eye = torch.eye(self.out.shape[1], dtype=self.out.dtype, device=self.out.device)[start:stop]
        cot = eye[:, None].expand(stop - start, *self.out.shape)
        if self.autograd:
            if stop - start == 1:
                (g,) = torch.autograd.grad(self.out, self.leaf, cot[0], retain_graph=not last)
                return g[None]
            # autograd.grad(..., is_grads_batched=True), written out so that the checkpointed blocks
            # (_Recomputed) know the batch's vmap level and size and can take it one token at a time.
            level = torch._C._vmapmode_increment_nesting()
            try:
                _BATCHED.now = (level, stop - start)
                (g,) = torch.autograd.grad(self.out, self.leaf, torch._add_batch_dim(cot, 0, level),
                                           retain_graph=not last)
                return torch._remove_batch_dim(g, level, stop - start, 0)
            finally:
                _BATCHED.now = None
                torch._C._vmapmode_decrement_nesting()
        if stop - start == 1:
            return self.pull(cot[0])[0][None]
        return torch.func.vmap(self.pull)(cot)[0]


def _shared_forward(fn, method, logits_fn, params, x, ref_x, name, scores, n_out, chunk, cap, steps, quadrature,
                    samples, stdev, generator, autograd, folded: _Folded) -> None:
    """The ``[T_out, B, T, D]`` maps of the gradient methods, handed to ``folded`` chunk by chunk of output
    tokens: per forward, ``ceil(T_out / chunk)`` backwards."""
    batch = _inputs.batch_of(x)
    emb = _layer_output(fn, logits_fn, params, x, name)
    emb = emb.detach() if autograd else emb
    spans = [(s, min(s + chunk, n_out)) for s in range(0, n_out, chunk)]

    def backward(values: Tensor, k: int) -> _Backward:
        xs = _inputs.repeat(x, k)

        def f(v: Tensor) -> Tensor:
            out, _ = intermediates(logits_fn, layers=[name], fn=fn, replace={name: v})(params, xs)
            return scores(out)
        return _Backward(f, values, autograd)

    if method in ("saliency", "input_x_gradient"):
        pass_ = backward(emb, 1)
        for s, e in spans:
            grads = pass_.grads(s, e, e == n_out)                                # [e - s, B, T, D]
            folded.add(grads if method == "saliency" else grads * emb)
        return
    start = _layer_output(fn, logits_fn, params, ref_x, name)
    start = start.detach() if autograd else start
    if method == "integrated_gradients":
        nodes, node_weights = _quadrature(quadrature, steps)
        alphas = torch.tensor(nodes, dtype=emb.dtype, device=emb.device)
        point_weights = torch.tensor(node_weights, dtype=emb.dtype, device=emb.device)
        ends = [emb] * steps
    else:   # gradient SHAP, draws in gradient_shap's order: baseline index, path point, noise
        draws = []
        shape, dtype, device = emb.shape[1:], emb.dtype, emb.device     # read before the draws
        with _checks.draws(fn, generator):     # under vmap: every member gets the generator's draws
            for _ in range(samples):
                torch.randint(1, (), generator=generator, device=device)
                a = torch.rand((), generator=generator, dtype=dtype, device=device)
                noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
                draws.append((a, noise))
        alphas = torch.stack([a for a, _ in draws])
        point_weights = torch.full((samples,), 1.0 / samples, dtype=emb.dtype, device=emb.device)
        ends = [emb + stdev * noise for _, noise in draws]
    per_forward = len(ends) if cap is None else max(1, cap // batch)
    totals: List[Optional[Tensor]] = [None] * len(spans)
    for p0 in range(0, len(ends), per_forward):
        p1 = min(p0 + per_forward, len(ends))
        k = p1 - p0
        end = torch.cat(ends[p0:p1])                                             # [k * B, T, D]
        diff = end - start.repeat(k, *([1] * (start.ndim - 1)))
        a = alphas[p0:p1].repeat_interleave(batch).view(-1, *([1] * (diff.ndim - 1)))
        w = point_weights[p0:p1].repeat_interleave(batch).view(-1, *([1] * (diff.ndim - 1)))
        pass_ = backward(start.repeat(k, *([1] * (start.ndim - 1))) + a * diff, k)
        for i, (s, e) in enumerate(spans):
            part = (pass_.grads(s, e, e == n_out) * (w * diff)).view(e - s, k, batch, *diff.shape[1:]).sum(1)
            previous = totals[i]
            totals[i] = part if previous is None else previous + part
    for t in totals:
        assert t is not None
        folded.add(t)


def _per_chunk(fn, method, logits_fn, params, x, ref_x, name, scores, n_out, chunk, folded: _Folded) -> None:
    """``[T_out, B, T, D]`` of a method with its own backward rules, handed to ``folded``: one call per chunk,
    vmapped over it."""
    chosen = _PER_CHUNK[method]

    def attribute(w: Tensor) -> Tensor:
        def target(logits: Tensor) -> Tensor:
            return (scores(logits) * w.to(logits.dtype)).sum(-1)
        return chosen(logits_fn, params, x, target, layer=name, baseline=ref_x)

    eye = torch.eye(n_out, device=_inputs.device_of(x))
    for s in range(0, n_out, chunk):
        folded.add(torch.func.vmap(attribute)(eye[s:s + chunk]))


class _Checkpointing:
    """A context that checkpoints ``blocks`` of ``module`` for the length of one attribution call.

    Under the model's lock, each block's ``forward`` is replaced by one that runs the block through
    :class:`_Recomputed` with the block's tensors of that moment (the ``params`` of the call, which
    ``functional_call`` has put in place), so the recomputation in a backward pass, after the forward has
    left ``functional_call``, uses the same tensors. The block's arguments that require grad are its
    differentiable inputs; the others (masks, position embeddings, options) are kept as they are. On exit
    every ``forward`` is put back (nothing outlives the call). No blocks: nothing is touched.
    """

    def __init__(self, module: Optional[nn.Module], blocks: List[str], lock: Any):
        self.module, self.blocks, self.lock = module, blocks, lock
        self.stack = contextlib.ExitStack()
        self.inside = threading.local()

    def __enter__(self) -> _Checkpointing:
        if not self.blocks or self.module is None:
            return self
        if self.lock is not None:
            self.stack.enter_context(self.lock)
        blocks = [self.module.get_submodule(name) for name in self.blocks]
        self.stack.enter_context(forwards_replaced([(block, self._forward(block)) for block in blocks]))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()   # the forwards put back, then the lock released

    def _forward(self, block: nn.Module) -> Callable[..., Any]:
        original = type(block).forward.__get__(block)
        names = [n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()]
        inside = self.inside

        def forward(*args: Any, **kwargs: Any) -> Any:
            if getattr(inside, "on", False) or not torch.is_grad_enabled():
                return original(*args, **kwargs)   # a recomputation, or no graph to keep activations for
            leaves, spec = tree_flatten((args, kwargs))
            slots = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.requires_grad]
            if not slots:
                return original(*args, **kwargs)
            tensors: Dict[str, Tensor] = {n: functools.reduce(getattr, n.split("."), block)   # type: ignore[misc]
                                          for n in names}
            inputs = [leaves[i] for i in slots]
            for i in slots:           # passed to _Recomputed (saved for its backward), not kept here
                leaves[i] = None

            def run(inputs: Tuple[Tensor, ...], again: bool) -> Any:
                values = list(leaves)
                for i, t in zip(slots, inputs):
                    values[i] = t
                a, kw = tree_unflatten(values, spec)
                if not again:         # the tensors are in place: the block's own forward, its hooks run once
                    return original(*a, **kw)
                inside.on = True      # a recomputation in a backward pass: put the call's tensors back
                try:
                    return torch.func.functional_call(block, tensors, a, kw)
                finally:
                    inside.on = False
            shape: List[Any] = []
            outs = _Recomputed.apply(run, shape, *inputs)
            out_leaves, out_spec = shape
            it = iter(outs)
            return tree_unflatten([next(it) if v is _TENSOR else v for v in out_leaves], out_spec)
        return forward


_TENSOR = object()
_BATCHED = threading.local()   # (vmap level, size) of the batched backward running in this thread, if any


class _Recomputed(torch.autograd.Function):
    """A checkpointed block: its forward keeps only the block's differentiable inputs; its backward runs the
    block again and takes the vector-Jacobian product through it.

    When the incoming gradients are batched over ``k`` output tokens (``_Backward.grads``, a ``vmap`` of the
    backward), the product through the block runs one output token at a time on the one recomputation: the
    block's transient gradients (an MLP's ``[T, 4D]`` intermediates, several at once in an unfused GELU's
    backward) then stay those of one backward instead of ``k`` times as wide, while the recomputation and
    the rest of the backward are shared by the ``k`` tokens.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], shape: List[Any], *inputs: Tensor) -> Any:
        ctx.run = run
        ctx.devices = sorted({t.device.index or 0 for t in inputs if t.is_cuda})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        out_leaves, out_spec = tree_flatten(run(inputs, False))
        tensors = [v for v in out_leaves if isinstance(v, Tensor)]
        shape[:] = [[_TENSOR if isinstance(v, Tensor) else v for v in out_leaves], out_spec]
        ctx.mark_non_differentiable(*[t for t in tensors if not (t.is_floating_point() or t.is_complex())])
        return tuple(tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> Any:
        inputs = tuple(t.detach().requires_grad_() for t in ctx.saved_tensors)
        batched = getattr(_BATCHED, "now", None)
        if batched is not None:   # the block runs on plain tensors: outside the vmap, which refuses random ops
            torch._C._vmapmode_decrement_nesting()
        try:
            with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():   # the forward's draws
                torch.set_rng_state(ctx.rng[0])
                for d, state in zip(ctx.devices, ctx.rng[1]):
                    torch.cuda.set_rng_state(state, d)
                out = ctx.run(inputs, True)
        finally:
            if batched is not None:
                torch._C._vmapmode_increment_nesting()
        outs = [v for v in tree_flatten(out)[0] if isinstance(v, Tensor)]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        none = (None, None)
        if not pairs:
            return none + (None,) * len(inputs)
        ys, gs = [o for o, _ in pairs], [g for _, g in pairs]
        if batched is None or not any(torch._C._functorch.is_legacy_batchedtensor(g) for g in gs):
            return none + torch.autograd.grad(ys, inputs, gs, allow_unused=True)
        level, size = batched
        flat = [torch._remove_batch_dim(g, level, size, 0) if torch._C._functorch.is_legacy_batchedtensor(g)
                else g.expand(size, *g.shape) for g in gs]                       # [k, ...] each
        rows = [torch.autograd.grad(ys, inputs, [g[i] for g in flat], retain_graph=i < size - 1, allow_unused=True)
                for i in range(size)]
        result = tuple(None if rows[0][j] is None else
                       torch._add_batch_dim(torch.stack([r[j] for r in rows]), 0, level)
                       for j in range(len(inputs)))
        return none + result




def _checkpointed_blocks(fn: str, model_fn: Any, checkpoint: Any) -> List[str]:
    """The module names ``checkpoint=`` asks for: none, the longest ``nn.ModuleList``'s children, or given."""
    if checkpoint is False or checkpoint is None:
        return []
    module = module_of(model_fn)
    if module is None:
        raise _checks.type_error(fn, "a model_fn from functionalize(model) for checkpoint=",
                                 _checks.describe(model_fn), "Checkpointing wraps the model's blocks (modules).")
    if checkpoint is True:
        lists = [(len(m), n) for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise _checks.value_error(fn, "a model with an nn.ModuleList of blocks for checkpoint=True",
                                      f"{type(module).__name__} without one",
                                      "Name the modules to checkpoint: checkpoint=['encoder.block1', ...].")
        size, owner = max(lists, key=lambda t: t[0])   # the first of the longest
        return [f"{owner}.{i}" if owner else str(i) for i in range(size)]
    names = [checkpoint] if isinstance(checkpoint, str) else checkpoint
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) or not names:
        raise _checks.type_error(fn, "checkpoint, a bool, a module name or a list of module names",
                                 _checks.describe(checkpoint))
    known = dict(module.named_modules())
    for n in names:
        if n not in known:
            raise _checks.unknown_name(fn, "checkpoint module", n, [k for k in known if k][:20])
    return list(names)


def _embedding_layer(fn: str, model_fn: Any, layer: Any) -> Any:
    if layer is not None:
        return layer
    getter = getattr(module_of(model_fn), "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if embeddings is None:
        raise _checks.type_error(fn, "layer=, the token-embedding layer (a dotted name or module)",
                                 "None for a model without get_input_embeddings()",
                                 "Name it, e.g. `layer='transformer.wte'` (see `model.named_modules()`).")
    return embeddings


# --------------------------------------------------------------------------------------------
# Token ablation.

@_docs.fill
def continuation_ablation(model_fn: ModelFn, params: Params, prompt_ids: Tensor, continuation_ids: Tensor, *,
                          baseline: Any = 0, mask: Optional[Tensor] = None,
                          batch_size: Optional[int] = None, cache: bool = False) -> ContinuationAttribution:
    """Token ablation: how much each prompt token raises each continuation token's log-probability.

    ``token_attr[b, j, i] = log p(c_j | p, c_<j) - log p(c_j | p with p_i := baseline_i, c_<j)``, one
    teacher-forced forward per ablated prompt token, and ``seq_attr[b, i]`` the same difference of
    the summed log-probability. Equal to captum's ``LLMAttribution(FeatureAblation(model), tokenizer)``
    with ``TextTokenInput(..., baselines=baseline)`` and ``forward_in_tokens=False`` (teacher forcing), or
    ``use_cached_outputs=False`` (token-by-token decoding). captum's default, token-by-token decoding
    with its cache, gave other numbers with transformers 5.24 (30-60 % apart on a tiny GPT-2, whose
    own cached decoding agrees with teacher forcing to float rounding).

    Args:
      {model_fn.lm}
      {params}
      {prompt_ids}
      {continuation_ids}
      baseline: The token id that replaces a prompt token (int), or ids broadcastable to ``[B, T_in]``.
        Default: 0 (captum's ``TextTokenInput`` default).
      {mask.continuation}
      batch_size: The most sequences in one forward pass. ``None`` (default): ``B``, one ablated
        position of every example per forward (captum's ``perturbations_per_eval=1``). Without
        ``cache`` only.
      cache: Reuse the clean run's keys and values: ablating prompt token ``i`` leaves the tokens before
        it unchanged, so their key/value cache (HuggingFace ``past_key_values`` / ``cache``, a
        ``DynamicCache``) is taken from one clean forward and only tokens ``i ..`` run again, one forward
        of ``B`` rows per ablated position: ``sum_i (T - i)`` tokens instead of ``T_in * T``, about half the
        FLOPs for a short continuation, the same numbers up to rounding. Needs a model whose ``forward``
        takes ``past_key_values`` (or ``cache``) and ``use_cache`` and returns its cache. Default: False
        (full forwards, batched ``batch_size`` sequences at a time: faster for short prompts on a CPU).

    Returns:
      ``ContinuationAttribution(token_attr [B, T_out, T_in], seq_attr [B, T_in])``.

    Raises:
      TypeError: non-integer ids or ``baseline``.
      ValueError: a continuation whose batch differs from the prompt's; a ``mask`` unlike the
        continuation; a model output without logits (after the first forward); ids >= vocab.

    Example:
      >>> res = tx.continuation_ablation(fn, params, prompt, generated, batch_size=64)
      >>> res.token_attr.shape                                               # [2, 4, 8]

    Cost: ``B * (T_in + 1)`` sequences forward, ``batch_size`` at a time; no backward pass (a
      HuggingFace causal LM projects the last ``T_out + 1`` positions to the vocabulary only, as above).
    References: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014
      (occlusion); captum's ``LLMAttribution``.
    """
    fn = "continuation_ablation"
    cont, weights = _check_common(fn, model_fn, params, prompt_ids, continuation_ids, mask, batch_size)
    reference = _reference_ids(fn, baseline, prompt_ids, _vocab_size(model_fn))
    logits_fn = _logits_model(model_fn, fn)
    batch, n_in = prompt_ids.shape
    n_out = cont.shape[1]
    ids = torch.cat([prompt_ids, cont], dim=1)                                   # [B, T]
    # Row 0: the prompt itself; row 1 + i: prompt token i replaced by its reference.
    eye = torch.eye(n_in, dtype=torch.bool, device=ids.device)
    ablated = torch.where(eye[:, None, :], reference[None], prompt_ids[None])    # [T_in, B, T_in]
    variants = torch.cat([prompt_ids[None], ablated])                            # [1 + T_in, B, T_in]
    full = torch.cat([variants, cont[None].expand(1 + n_in, batch, n_out)], dim=2).flatten(0, 1)
    labels = cont.repeat(1 + n_in, 1)                                            # [(1 + T_in) B, T_out]
    if cache:
        cached = _cached_ablation(fn, model_fn, params, prompt_ids, reference, cont)
        return _ablation_result(cached * weights.to(cached.dtype))              # [1 + T_in, B, T_out]
    cap = batch if batch_size is None else batch_size
    first = True
    logp = []
    for start in range(0, full.shape[0], cap):
        logits = logits_fn(params, _lm_input(model_fn, full[start:start + cap], n_out + 1))
        logp.append(_token_logprobs(fn, logits, labels[start:start + cap], None, check=first))
        first = False
    logp = torch.cat(logp).view(1 + n_in, batch, n_out) * weights.to(logits.dtype)  # [1 + T_in, B, T_out]
    return _ablation_result(logp)


def _ablation_result(logp: Tensor) -> ContinuationAttribution:
    """``[1 + T_in, B, T_out]`` log-probabilities (clean first) -> the differences."""
    diff = logp[:1] - logp[1:]                                                   # [T_in, B, T_out]
    seq = logp[:1].sum(-1) - logp[1:].sum(-1)                                    # [T_in, B]
    return ContinuationAttribution(diff.permute(1, 2, 0), seq.transpose(0, 1))


def _cached_ablation(fn: str, model_fn: Any, params: Params, prompt_ids: Tensor, reference: Tensor,
                     cont: Tensor) -> Tensor:
    """``[1 + T_in, B, T_out]`` log-probabilities: the clean run, then each ablated prompt token ``i`` run
    from position ``i`` on, over the clean run's keys and values of positions ``< i``."""
    forward = getattr(module_of(model_fn), "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        names = {}
    key = "cache" if "cache" in names else "past_key_values"    # transformers 5.25 renamed past_key_values
    if key not in names or "use_cache" not in names or "input_ids" not in names:
        raise _checks.value_error(fn, "a model whose forward takes input_ids, past_key_values (or cache) and "
                                  "use_cache (a HuggingFace causal LM) for cache=True", _checks.describe(model_fn),
                                  "Use cache=False (full forwards).")
    n_in, n_out = prompt_ids.shape[1], cont.shape[1]
    ids = torch.cat([prompt_ids, cont], dim=1)
    extra = {"logits_to_keep": n_out + 1} if "logits_to_keep" in names else {}
    output = _targets.selector(model_fn)
    clean_out = model_fn(params, {"input_ids": ids, "use_cache": True, **extra})
    past = None
    for field in (key, "past_key_values"):
        past = past if past is not None else (clean_out.get(field) if isinstance(clean_out, Mapping)
                                              else getattr(clean_out, field, None))
    layers = getattr(past, "layers", None)
    if past is None or layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise _checks.value_error(fn, "past_key_values with per-layer keys and values (a DynamicCache) for "
                                  "cache=True", _checks.describe(past), "Use cache=False (full forwards).")
    logp = [_token_logprobs(fn, clean_out, cont, None, check=True, output=output)]
    for i in range(n_in):
        prefix = type(past)()
        for index, layer in enumerate(layers):
            if i:
                prefix.update(layer.keys[:, :, :i], layer.values[:, :, :i], index)
        suffix = torch.cat([reference[:, i:i + 1], ids[:, i + 1:]], dim=1)       # [B, T - i]
        x = {"input_ids": suffix, "use_cache": True, **extra}
        if i:
            x[key] = prefix
        logp.append(_token_logprobs(fn, model_fn(params, x), cont, None, check=False, output=output))
    return torch.stack(logp)
