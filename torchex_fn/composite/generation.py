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

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import targets as _targets
from ..core.model import Wrapped
from ..core.types import ModelFn, Params, module_of
from ..core.capture import resolve_layers
from ..methods.gradient import input_x_gradient, saliency
from ..methods.path import METHODS as QUADRATURES, integrated_gradients

__all__ = ["ContinuationAttribution", "continuation_logprob", "token_logprobs", "continuation_attribution",
           "continuation_ablation", "GRADIENT_METHODS"]

GRADIENT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient")
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


def _token_logprobs(fn: str, out: Any, ids: Tensor, prompt_length: Optional[int], *, check: bool,
                    output: Any = None) -> Tensor:
    if check:
        _check_ids(fn, "continuation_ids", ids, (1, 2), "[B, T_out] or [T_out]")
        if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)):
            raise _checks.type_error(fn, "prompt_length, an int >= 1 or None", _checks.describe(prompt_length))
        if prompt_length is not None and prompt_length < 1:
            raise _checks.value_error(fn, "prompt_length >= 1 (the continuation is predicted from the prompt)",
                                      _checks.describe(prompt_length))
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
    picked = logits[:, start:start + length]                                    # [B, T_out, vocab]
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
                  batch_size: Any):
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
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
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


def _groups(batch: int, cap: Optional[int]):
    size = batch if cap is None else min(batch, cap)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


# --------------------------------------------------------------------------------------------
# Gradient methods at the embedding layer.

@_docs.fill
def continuation_attribution(model_fn: ModelFn, params: Params, prompt_ids: Tensor, continuation_ids: Tensor, *,
                             method: str = "integrated_gradients", layer: Any = None, baseline: Any = 0,
                             steps: int = 50, quadrature: str = "gausslegendre", reduce: str = "sum",
                             mask: Optional[Tensor] = None,
                             batch_size: Optional[int] = None) -> ContinuationAttribution:
    """Attribute every continuation token's log-probability to the prompt tokens, in one call.

    The model runs on ``[prompt; continuation]`` (teacher forcing). For output token ``j`` the score is
    ``log p(c_j | prompt, c_<j)``; ``method`` attributes it to the output of ``layer`` (the token
    embeddings) at the prompt positions, and the map is summed over the embedding dimension. The
    ``T_out`` scores share every forward pass: the method runs once under ``torch.func.vmap`` over
    one-hot weights of the output tokens, which batches only the backward passes over them.

    * ``"integrated_gradients"``: :func:`torchex_fn.integrated_gradients` with ``layer`` (captum's
      ``LayerIntegratedGradients``): the path runs from the embeddings of the reference prompt (every
      prompt token replaced by ``baseline``; continuation embeddings unchanged) to those of the prompt.
      ``token_attr[b, j].sum()`` equals ``log p(c_j)`` minus its value on the reference prompt up to the
      quadrature error. Equal to captum's ``LLMGradientAttribution(LayerIntegratedGradients(model,
      model.transformer.wte), tokenizer)`` with ``TextTokenInput(..., baselines=baseline)``.
    * ``"saliency"``: the gradient at the layer (captum's ``LayerGradientXActivation(...,
      multiply_by_inputs=False)``); take its norm over the embedding dimension (``reduce="norm"``).
    * ``"input_x_gradient"``: embedding times gradient (captum's ``LayerGradientXActivation``).

    Args:
      {model_fn.lm}
      {params}
      {prompt_ids}
      {continuation_ids}
      method: ``"integrated_gradients"`` (default), ``"saliency"`` or ``"input_x_gradient"``.
      layer: The token-embedding layer (a dotted name or module). ``None`` (default): the module's
        ``get_input_embeddings()`` (HuggingFace models: ``transformer.wte`` for GPT-2), captum's choice.
      baseline: Reference token id for every prompt position (int) or ids broadcastable to
        ``[B, T_in]``; integrated gradients only. Default: 0 (captum's ``TextTokenInput`` default).
      steps: Integrated gradients' path points (captum's ``n_steps``). Default: 50.
      quadrature: Integrated gradients' rule (captum's ``method``). Default: ``"gausslegendre"``.
      reduce: How a token's ``[D]`` embedding map becomes one number: ``"sum"`` (default; captum's, and
        the one that keeps integrated gradients' completeness) or ``"norm"`` (its L2 norm; ``seq_attr``
        is then the norm of the summed maps). Summed *gradients* of a model that normalises its
        embeddings first (a pre-LayerNorm transformer such as GPT-2) are ~0, since LayerNorm is
        invariant to adding a constant to every dimension: use ``"norm"`` with ``"saliency"``.
      {mask.continuation}
        Rows of masked tokens are 0 and do not enter ``seq_attr``.
      batch_size: Memory cap: the most sequences in one forward pass. Integrated gradients puts
        ``batch_size // B`` path points of all ``B`` examples in a forward (one point of ``batch_size``
        examples when ``B > batch_size``). ``None`` (default): all ``steps`` points of all examples in one
        forward, ``B * steps`` sequences, as captum's default ``internal_batch_size``.

    Returns:
      ``ContinuationAttribution(token_attr [B, T_out, T_in], seq_attr [B, T_in])``; ``seq_attr``
      attributes the continuation's summed log-probability (with ``reduce="sum"``, the sum of the rows).

    Raises:
      TypeError: non-integer ``prompt_ids`` / ``continuation_ids`` / ``baseline``; a model without a
        named embedding layer and no ``layer``.
      ValueError: ``continuation_attribution: expected continuation_ids of shape [B, T_out] with B = 2
        like prompt_ids [2, 8], ...``; an unknown ``method`` or ``layer``; a ``mask`` unlike the
        continuation; a model output without ``logits`` (after its first forward); ids >= vocab.

    Example:
      >>> fn, params = tx.functionalize(gpt2.eval())
      >>> res = tx.continuation_attribution(fn, params, prompt, generated, steps=32)
      >>> res.token_attr.shape, res.seq_attr.shape                          # [2, 4, 8], [2, 8]
      >>> tx.continuation_attribution(fn, params, prompt, generated, method="saliency", reduce="norm").token_attr

    Cost: the method's forward passes once (integrated gradients: ``steps`` path points and two
      forwards for the path's ends) and its backward passes, to ``layer`` only, batched over the
      ``T_out`` output tokens (each backward ``T_out`` times as large; captum runs ``T_out`` whole
      attributions). A model whose ``forward`` takes ``input_ids`` and ``logits_to_keep`` (HuggingFace
      causal LMs) is called with ``logits_to_keep=T_out + 1`` and ``use_cache=False``: the vocabulary
      projection and its backward run at the scored positions only. Memory: one forward of
      ``min(B * steps, batch_size)`` sequences and its backward ``T_out`` times at once. Models whose
      attention has no ``vmap`` batching rule for its backward (``scaled_dot_product_attention`` on
      CPU) run its backward in a loop with a PyTorch performance warning: build them with
      ``attn_implementation="eager"``.
    References: Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML 2017; captum's
      ``LLMGradientAttribution`` (Miglani et al., "Using Captum to Explain Generative Language Models", 2023).
    """
    fn = "continuation_attribution"
    cont, weights = _check_common(fn, model_fn, params, prompt_ids, continuation_ids, mask, batch_size)
    if not isinstance(method, str):
        raise _checks.type_error(fn, f"method, one of {GRADIENT_METHODS}", _checks.describe(method))
    if method not in GRADIENT_METHODS:
        raise _checks.unknown_name(fn, "method", method, GRADIENT_METHODS)
    _checks.check_positive_int(fn, "steps", steps)
    for option, value, known in (("reduce", reduce, REDUCTIONS), ("quadrature", quadrature, QUADRATURES)):
        if not isinstance(value, str):
            raise _checks.type_error(fn, f"{option}, one of {known}", _checks.describe(value))
        if value not in known:
            raise _checks.unknown_name(fn, option, value, known)
    reference = _reference_ids(fn, baseline, prompt_ids, _vocab_size(model_fn))
    layer = _embedding_layer(fn, model_fn, layer)
    names, _ = resolve_layers(fn, model_fn, layer)
    if len(names) != 1:
        raise _checks.value_error(fn, "one layer (the token embeddings)", f"{len(names)} layers")
    logits_fn = _logits_model(model_fn, fn)
    n_in, n_out = prompt_ids.shape[1], cont.shape[1]
    ids = torch.cat([prompt_ids, cont], dim=1)                                   # [B, T_in + T_out]
    reference = torch.cat([reference, cont], dim=1)
    one_hot = torch.eye(n_out, device=ids.device)                                # [T_out, T_out]

    # All path points of the batch in one forward unless capped: on a 2-core CPU one point per forward
    # ran 7x slower (benchmarks/bench_generation.py), as captum's default internal_batch_size does.
    path_cap = ids.shape[0] * steps if batch_size is None else batch_size
    rows, seqs = [], []
    for g0, g1 in _groups(ids.shape[0], batch_size):
        g_ids, g_cont, g_weights = ids[g0:g1], cont[g0:g1], weights[g0:g1]

        g_x = _lm_input(model_fn, g_ids, n_out + 1)
        g_ref = reference[g0:g1] if isinstance(g_x, Tensor) else {"input_ids": reference[g0:g1]}

        def attribute(w: Tensor, g_x=g_x, g_ref=g_ref, g_cont=g_cont, g_weights=g_weights) -> Tensor:
            def target(logits: Tensor) -> Tensor:   # [k * size, T, vocab], blocks of this group's examples
                logp = _token_logprobs(fn, logits, g_cont, None, check=False)   # the continuation ends x
                return (logp * (g_weights * w).to(logp.dtype)).sum(-1)
            if method == "integrated_gradients":
                return integrated_gradients(logits_fn, params, g_x, target, layer=names[0], baseline=g_ref,
                                            steps=steps, method=quadrature, batch_size=path_cap)
            chosen = saliency if method == "saliency" else input_x_gradient
            return chosen(logits_fn, params, g_x, target, layer=names[0])

        maps = torch.func.vmap(attribute)(one_hot)                               # [T_out, size, T, D]
        if maps.ndim < 4:
            raise _checks.value_error(fn, "a layer output [B, T, ...] (one vector per token)",
                                      f"a layer output of shape {tuple(maps.shape[1:])}")
        vectors = maps[:, :, :n_in].flatten(3)                                   # [T_out, size, T_in, D]
        if reduce == "sum":
            token_maps = vectors.sum(-1)                                         # [T_out, size, T_in]
            seqs.append(token_maps.sum(0))
        else:
            token_maps = torch.linalg.vector_norm(vectors, dim=-1)
            seqs.append(torch.linalg.vector_norm(vectors.sum(0), dim=-1))
        rows.append(token_maps.movedim(0, 1))
    return ContinuationAttribution(torch.cat(rows), torch.cat(seqs))


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
                          batch_size: Optional[int] = None) -> ContinuationAttribution:
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
        position of every example per forward (captum's ``perturbations_per_eval=1``).

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
    cap = batch if batch_size is None else batch_size
    first = True
    logp = []
    for start in range(0, full.shape[0], cap):
        logits = logits_fn(params, _lm_input(model_fn, full[start:start + cap], n_out + 1))
        logp.append(_token_logprobs(fn, logits, labels[start:start + cap], None, check=first))
        first = False
    logp = torch.cat(logp).view(1 + n_in, batch, n_out) * weights.to(logits.dtype)  # [1 + T_in, B, T_out]
    diff = logp[:1] - logp[1:]                                                   # [T_in, B, T_out]
    seq = logp[:1].sum(-1) - logp[1:].sum(-1)                                    # [T_in, B]
    return ContinuationAttribution(diff.permute(1, 2, 0), seq.transpose(0, 1))
