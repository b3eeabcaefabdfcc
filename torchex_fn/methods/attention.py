"""Transformer methods: attention rollout, gradient-weighted rollout and LeGrad.

Attention probabilities are not module outputs: torchvision's ``nn.MultiheadAttention`` is called
with ``need_weights=False``, and timm and HuggingFace models call ``F.scaled_dot_product_attention``,
whose fused kernels never form them. So the *operation* is intercepted for the length of one call,
by the interceptor that DeepLIFT and LRP use (:func:`torchex_fn.core.intercept.run` with
``attention=True``, a :class:`torch.overrides.TorchFunctionMode`, entered and left in
``try/finally``). It computes every call of

* ``F.scaled_dot_product_attention`` (timm with fused attention, HuggingFace's ``"sdpa"``
  implementation, ``F.multi_head_attention_forward`` with ``need_weights=False``), and
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: while a mode is active,
  ``has_torch_function`` is true, so neither it nor ``nn.TransformerEncoderLayer`` takes its fused
  fast path, ``torch._native_multi_head_attention`` / ``torch._transformer_encoder_layer_fwd``)

by the one decomposition of :mod:`torchex_fn.core.attention`, ``softmax(Q K^T / sqrt(d) + mask) V``
with dropout off, and hands over the probabilities; this module records them ``[B, heads, N, N]``
in call order (call ``k`` is "layer" ``k``). For the gradient
methods, each selected layer's probabilities ``A`` are replaced by ``A + delta`` with ``delta = 0``:
the gradient w.r.t. ``delta`` is the gradient w.r.t. ``A`` (the idea of :mod:`torchex_fn.core.capture`),
computed by :mod:`torchex_fn.core.autodiff`. Because attention is computed from ordinary operations,
all three methods can be differentiated again (``torch.func.grad`` w.r.t. ``params``) and composed
with ``vmap``.

Attention written out by hand in a model (``(q @ k.transpose(-2, -1)).softmax(-1) @ v``: timm with
``fused_attn=False``, HuggingFace's ``"eager"`` implementation) makes no call that can be
intercepted; such a model gets the error "no attention call in the forward". Choose the fused /
``"sdpa"`` implementation (the default of both libraries) instead.

Modes are thread-local; the mode never outlives the call, also when the model raises.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core import checks as _checks
from ..core import docs as _docs
from ..core import intercept as _intercept
from ..core import grid as _grid
from ..core import targets as _targets
from ..core.autodiff import grad_of_sum, grads_of_sums
from ..core.types import ModelFn, Params, Target, memo_owner_of, view_of
from ..core.capture import active as _active_capture, intermediates as _intermediates, resolve_layers as _resolve_layers
from ..core.arguments import check_call

__all__ = ["attention_rollout", "grad_rollout", "legrad", "attention_probabilities", "AttentionCall"]

HEAD_FUSIONS = ("mean", "max", "min")


class AttentionCall(NamedTuple):
    """One intercepted attention call: its probabilities and where it sat relative to captured layers."""

    probs: Tensor        # [B, heads, N_query, N_key], post-softmax (plus the zero perturbation, if any)
    after_layers: int    # how many captured layers had produced their output before this call


class _Mismatch(Exception):
    """Internal: a memoised perturbation shape no longer matches; recompute and retry."""


def _run(model_fn, params, x, perturb: Optional[Mapping[int, Tensor]] = None,
         fn: str = "attention_probabilities") -> Tuple[Any, List[AttentionCall]]:
    """``model_fn(params, x)`` and its attention calls (call ``k``'s probabilities plus ``perturb[k]``)."""
    return _intercepted(fn, model_fn, perturb, params, x)


def _intercepted(fn: str, call: Callable[..., Any], perturb: Optional[Mapping[int, Tensor]],
                 *args: Any) -> Tuple[Any, List[AttentionCall]]:
    """``call(*args)`` under the shared interceptor (attention only): the attention calls in order."""
    perturb = dict(perturb or {})
    calls: List[AttentionCall] = []

    def record(c: _intercept.Call) -> Tensor:
        probs = c.input
        delta = perturb.get(c.index)
        if delta is not None:
            if tuple(delta.shape) != tuple(probs.shape) or delta.dtype != probs.dtype:
                raise _Mismatch()
            probs = probs + delta
        session = _active_capture()
        calls.append(AttentionCall(probs, 0 if session is None else len(session.acts)))
        return probs

    try:
        out, _ = _intercept.run(call, record, *args, attention=True)
    except _intercept.NoRule:  # the only attention-only refusal: nn.MultiheadAttention adding key tokens
        raise _checks.value_error(fn, "nn.MultiheadAttention without bias_k/bias_v/add_zero_attn/static_k",
                                  "one that uses them", "These add key tokens; they are not supported.") from None
    return out, calls


def attention_probabilities(model_fn: ModelFn, params: Params, x: Tensor) -> Tuple[Any, List[Tensor]]:
    """Run the model once and return ``(out, [probs_0, probs_1, ...])``, one ``[B, heads, N, N]`` per attention call.

    Example:
      >>> out, probs = attention_probabilities(model_fn, params, images)
      >>> len(probs), probs[0].shape     # (12, [8, 12, 197, 197]) for a ViT-B/16
    """
    _checks.check_model_fn("attention_probabilities", model_fn)
    _checks.check_params("attention_probabilities", params, model_fn)
    out, calls = _run(model_fn, params, x)
    return out, [c.probs for c in calls]


# --------------------------------------------------------------------------------------------
# Shared checks and helpers.

def _check_options(fn: str, model_fn, params, x, target, *, layers, token, prefix_tokens, grid, upsample) -> Any:
    target = check_call(fn, model_fn, params, x, target, min_ndim=2, layer_option=False)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)) or \
                (isinstance(layers, (list, tuple)) and not all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in layers)):
            raise _checks.type_error(fn, "layers, None, an int or a list of ints (attention call indices)",
                                     _checks.describe(layers))
        if isinstance(layers, (list, tuple)) and not layers:
            raise _checks.value_error(fn, "at least one attention call index in layers", "an empty list")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise _checks.type_error(fn, "token, an int (the query token's row) or None (mean over rows)",
                                 _checks.describe(token))
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise _checks.value_error(fn, "prefix_tokens, an int >= 0 (class/register tokens before the patches)",
                                  _checks.describe(prefix_tokens))
    if grid is not None and not (isinstance(grid, (tuple, list)) and len(grid) == 2 and
                                 all(isinstance(g, int) and g > 0 for g in grid)):
        raise _checks.type_error(fn, "grid, None or a pair of positive ints (h, w)", _checks.describe(grid))
    _checks.check_bool(fn, "upsample", upsample)
    return target


def _select(fn: str, count: int, layers: Any) -> List[int]:
    if count == 0:
        raise _checks.value_error(fn, "at least one attention call in the forward",
                                  "no attention call in the forward",
                                  "The model must call F.scaled_dot_product_attention or nn.MultiheadAttention "
                                  "(timm: fused_attn=True; HuggingFace: attn_implementation='sdpa').")
    if layers is None:
        return list(range(count))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in chosen if not -count <= i < count]
    if bad:
        raise _checks.value_error(fn, f"layers in [-{count}, {count}) (the forward made {count} attention calls)",
                                  f"{bad}")
    return [i % count for i in chosen]


def _to_map(fn: str, rows: Tensor, x: Tensor, prefix_tokens: int, grid, upsample: bool) -> Tensor:
    """``[B, N]`` key relevances -> ``[B, 1, h, w]`` on the patch grid (optionally upsampled to ``x``)."""
    patches = rows[:, prefix_tokens:]
    count = patches.shape[1]
    if grid is None:
        side = math.isqrt(count)
        if count == 0 or side * side != count:
            raise _checks.value_error(fn, "a square number of patch tokens to infer the grid",
                                      f"{count} tokens after {prefix_tokens} prefix token(s)",
                                      "Pass grid=(h, w) or the right prefix_tokens.")
        grid = (side, side)
    if grid[0] * grid[1] != count:
        raise _checks.value_error(fn, f"grid (h, w) with h * w = {count} patch tokens", f"{tuple(grid)}")
    maps = patches.reshape(patches.shape[0], 1, *grid)
    if not upsample:
        return maps
    if x.ndim != 4:
        raise _checks.value_error(fn, "x of shape [B, C, H, W] to upsample the map to", _checks.describe(x),
                                  "Pass upsample=False.")
    return _grid.resize(maps, x.shape[2:])


def _query_rows(matrix: Tensor, token: Optional[int]) -> Tensor:
    """``[B, N, N]`` -> ``[B, N]``: the row of ``token``, or the mean of all rows."""
    return matrix.mean(dim=1) if token is None else matrix[:, token]


def _check_square(fn: str, probs: Sequence[Tensor]) -> None:
    for i, p in enumerate(probs):
        if p.ndim != 4 or p.shape[-1] != p.shape[-2] or p.shape[-1] != probs[0].shape[-1]:
            raise _checks.value_error(fn, "self-attention with the same tokens in every selected layer",
                                      f"probabilities of shape {tuple(p.shape)} at selected layer {i}")


# Memo of attention probability shapes (to build the zero perturbations without an extra forward).
_SHAPES: weakref.WeakKeyDictionary[Any, Dict[tuple, List[Tuple[torch.Size, torch.dtype]]]] = \
    weakref.WeakKeyDictionary()


# legrad's memo: (blocks in output order, after_layers of each attention call, their shapes).
_LAYOUTS: weakref.WeakKeyDictionary[Any, Dict[tuple, tuple]] = weakref.WeakKeyDictionary()


def _probe(fn: str, model_fn, params, x, refresh: bool) -> List[Tuple[torch.Size, torch.dtype]]:
    owner = memo_owner_of(model_fn)
    key = (tuple(x.shape), x.dtype, x.device)
    try:
        memo = _SHAPES.setdefault(owner, {})
    except TypeError:
        memo = {}
    if refresh or key not in memo:
        with torch.no_grad():
            _, calls = _run(model_fn, params, x, fn=fn)
        memo[key] = [(c.probs.shape, c.probs.dtype) for c in calls]
    return memo[key]


def _perturbed(fn: str, model_fn, params, x, layers, run: Callable[[Dict[int, Tensor]], Any]) -> Any:
    """Build zero perturbations for the selected calls and call ``run(deltas) -> (result, count)``.

    The perturbations' shapes come from a memo (a forward without autograd on a miss); a stale memo
    (other shapes, or another number of attention calls) is refreshed once.
    """
    for attempt in range(2):
        shapes = _probe(fn, model_fn, params, x, refresh=attempt > 0)
        chosen = _select(fn, len(shapes), layers)
        deltas = {i: torch.zeros(shapes[i][0], dtype=shapes[i][1], device=x.device) for i in chosen}
        try:
            result, count = run(deltas)
            if count != len(shapes):
                raise _Mismatch()
            return chosen, result
        except _Mismatch:
            if attempt:
                raise RuntimeError(f"{fn}: the attention shapes change between calls with the same input shape; "
                                   "cannot perturb them") from None
    raise AssertionError("unreachable")


def _fuse_heads(probs: Tensor, how: str) -> Tensor:
    if how == "mean":
        return probs.mean(dim=1)
    if how == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


# --------------------------------------------------------------------------------------------
# Methods.

@_docs.fill
def attention_rollout(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
                      layers: Any = None, head_fusion: str = "mean", token: Optional[int] = 0,
                      prefix_tokens: int = 1, grid: Optional[Tuple[int, int]] = None,
                      upsample: bool = True) -> Tensor:
    """Attention rollout: attention (plus identity, row-normalised) multiplied through the layers.

    For each selected layer ``l``, ``A_l = fuse_heads(P_l)`` (``P_l`` the post-softmax probabilities
    ``[B, heads, N, N]``), ``Â_l = (A_l + I) / rowsum(A_l + I)``; the rollout is
    ``R = Â_L ... Â_2 Â_1`` and the map is ``R``'s row of the query ``token`` (the class token)
    over the patch tokens, on the patch grid. The target is not used (rollout is class-agnostic).

    Args:
      {model_fn}
      {params}
      {x.attention}
      target: Ignored (kept for the common signature).
      {layers.attention}
      head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads. Default: ``"mean"``.
      {token.attention}
      {args.attention_map}

    Returns:
      Maps ``[B, 1, H, W]`` (``[B, 1, h, w]`` with ``upsample=False``).

    Raises:
      ValueError: ``attention_rollout: expected at least one attention call in the forward, got no
        attention call in the forward.``; bad ``layers``, ``grid`` or ``head_fusion``.

    Example:
      >>> fn, params = functionalize(vit.eval())
      >>> attention_rollout(fn, params, images).shape                   # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> torch.func.vmap(lambda p: attention_rollout(fn, p, images))(stacked)   # an ensemble

    Cost: one forward pass with attention computed explicitly (no backward).
    References: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
    """
    fn = "attention_rollout"
    target = _check_options(fn, model_fn, params, x, target, layers=layers, token=token, prefix_tokens=prefix_tokens,
                   grid=grid, upsample=upsample)
    if head_fusion not in HEAD_FUSIONS:
        raise _checks.value_error(fn, f"head_fusion in {HEAD_FUSIONS}", _checks.describe(head_fusion))
    del target
    _, calls = _run(model_fn, params, x, fn=fn)
    chosen = _select(fn, len(calls), layers)
    probs = [calls[i].probs for i in chosen]
    _check_square(fn, probs)
    eye = torch.eye(probs[0].shape[-1], dtype=probs[0].dtype, device=probs[0].device)
    rollout: Any = None
    for p in probs:
        a = _fuse_heads(p, head_fusion) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else torch.matmul(a, rollout)
    return _to_map(fn, _query_rows(rollout, token), x, prefix_tokens, grid, upsample)


@_docs.fill
def grad_rollout(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
                 layers: Any = None, token: Optional[int] = 0, prefix_tokens: int = 1,
                 grid: Optional[Tuple[int, int]] = None, upsample: bool = True) -> Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, self-attention rule).

    ``R = I``; for each selected layer in call order, ``Ā = mean_heads(relu(dS/dA * A))`` and
    ``R = R + Ā R``, where ``A`` are the layer's post-softmax probabilities and ``S`` the target
    score. The map is ``R``'s row of the query ``token`` over the patch tokens.

    Args:
      {model_fn}
      {params}
      {x.attention}
      {target}
      {layers.attention}
      {token.attention}
      {args.attention_map}

    Returns:
      Maps ``[B, 1, H, W]`` (``[B, 1, h, w]`` with ``upsample=False``).

    Raises:
      ValueError: no attention call in the forward; bad ``layers``, ``grid``, ``target``.

    Example:
      >>> grad_rollout(fn, params, images, labels).shape            # [8, 3, 224, 224] -> [8, 1, 224, 224]
      >>> torch.func.grad(lambda p: grad_rollout(fn, p, images, labels).square().mean())(params)

    Cost: one probing forward without autograd (memoised per input shape), one forward, one backward
    from the output to the first selected attention layer.
    References: Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal
    and Encoder-Decoder Transformers", ICCV 2021.
    """
    fn = "grad_rollout"
    target = _check_options(fn, model_fn, params, x, target, layers=layers, token=token, prefix_tokens=prefix_tokens,
                   grid=grid, upsample=upsample)

    def run(deltas):
        def total(deltas):
            out, calls = _run(model_fn, params, x, deltas, fn=fn)
            scores = _targets.resolve(out, target, fn=fn, output=_targets.selector(model_fn))
            return scores.sum(), [c.probs for c in calls]
        grads, probs = grad_of_sum(total, deltas, has_aux=True)
        return (grads, probs), len(probs)

    chosen, (grads, all_probs) = _perturbed(fn, model_fn, params, x, layers, run)
    probs = [all_probs[i] for i in chosen]
    _check_square(fn, probs)
    n = probs[0].shape[-1]
    relevance = torch.eye(n, dtype=probs[0].dtype, device=probs[0].device).expand(probs[0].shape[0], n, n)
    for i, p in zip(chosen, probs):
        weighted = torch.relu(grads[i] * p).mean(dim=1)
        relevance = relevance + torch.matmul(weighted, relevance)
    return _to_map(fn, _query_rows(relevance, token), x, prefix_tokens, grid, upsample)


def _submodule_call(fn: str, model_fn, params, name: str) -> Callable[[Tensor], Tensor]:
    module = model_fn.layer_names()[name]
    prefix = f"{name}."
    sub = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    return lambda t: torch.func.functional_call(module, sub, (t,))


def _default_head(model_fn) -> Optional[List[str]]:
    names = model_fn.layer_names()
    if "encoder.ln" in names and "heads" in names:  # torchvision VisionTransformer (torchcam's default)
        return ["encoder.ln", "heads"]
    return None


@_docs.fill
def legrad(model_fn: ModelFn, params: Params, x: Tensor, target: Target = None, *,
           blocks: Sequence[Any], head: Any = None, pool: str = "mean", prefix_tokens: int = 1,
           grid: Optional[Tuple[int, int]] = None, upsample: bool = True) -> Tensor:
    """LeGrad: positive gradients of each block's class score w.r.t. that block's attention.

    For each selected block ``l`` with output tokens ``z_l`` ``[B, N, D]``, the block's score is
    ``s_l = head(pool(z_l))[target]``. LeGrad differentiates ``s_l`` w.r.t. the block's own
    post-softmax attention ``A_l`` ``[B, heads, N, N]``, keeps the positive part, averages over heads
    and query tokens, drops the ``prefix_tokens`` keys, and averages the maps over blocks. This is
    torchcam 0.5's ``LeGrad`` (``normalized=False``): ``pool="mean"`` and ``head=["encoder.ln",
    "heads"]`` for torchvision's ``VisionTransformer``, its default.

    Args:
      model_fn: A ``model_fn`` built by ``functionalize`` (blocks and head are named submodules).
      {params}
      {x.attention}
      target: ``None`` (the class the model predicts), int, ``[B]`` ints, or a callable
        ``logits -> [B]`` applied to every block's logits.
      blocks: Transformer blocks (dotted names or modules) returning tokens ``[B, N, D]``. A block's
        attention is the last attention call made before the block returns (its self-attention).
      head: The projection from pooled tokens to logits: a dotted name or a list of names applied in
        order (e.g. ``["norm", "head"]`` for timm), or a callable ``(params, pooled) -> logits``.
        Default: ``["encoder.ln", "heads"]`` when the model has them (torchvision).
      pool: ``"mean"`` over all tokens (torchcam) or ``"token"`` (the first, class token).
      {args.attention_map}

    Returns:
      Maps ``[B, 1, H, W]`` (``[B, 1, h, w]`` with ``upsample=False``).

    Raises:
      TypeError: ``model_fn`` not built by ``functionalize``; bad ``head``.
      ValueError: unknown block; no attention call before a block returns; bad ``pool``.

    Example:
      >>> blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(8, 12)]
      >>> legrad(fn, params, images, labels, blocks=blocks).shape    # [8, 3, 224, 224] -> [8, 1, 224, 224]

    Cost: one forward, and one backward per block from the blocks' scores to the first selected
    block's attention; a forward without autograd on the first call per input shape (memoised).
    References: Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via
    Feature Formation Sensitivity", 2024.
    """
    fn = "legrad"
    target = _check_options(fn, model_fn, params, x, target, layers=None, token=0, prefix_tokens=prefix_tokens,
                   grid=grid, upsample=upsample)
    if view_of(model_fn) is None:
        raise _checks.type_error(fn, "model_fn built by functionalize (blocks are named submodules)",
                                 type(model_fn).__name__, "Use `model_fn, params = torchex_fn.functionalize(model)`.")
    if pool not in ("mean", "token"):
        raise _checks.value_error(fn, "pool in ('mean', 'token')", _checks.describe(pool))
    if isinstance(blocks, (str, torch.nn.Module)):
        blocks = [blocks]
    names, _ = _resolve_layers(fn, model_fn, list(blocks))
    head = _default_head(model_fn) if head is None else head
    if head is None:
        raise _checks.value_error(fn, "head=, the projection from pooled tokens to logits", "None",
                                  "Name it, e.g. head=['norm', 'head'] for timm, or pass (params, pooled) -> logits.")
    if callable(head) and not isinstance(head, (str, torch.nn.Module)):
        project = lambda t: head(params, t)  # noqa: E731
    else:
        head_names, _ = _resolve_layers(fn, model_fn, [head] if isinstance(head, (str, torch.nn.Module))
                                                       else list(head))
        calls_ = [_submodule_call(fn, model_fn, params, n) for n in head_names]

        def project(t: Tensor) -> Tensor:
            for c in calls_:
                t = c(t)
            return t

    def pooled(tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise _checks.value_error(fn, "blocks returning tokens [B, N, D]", _checks.describe(tokens))
        return tokens.mean(dim=1) if pool == "mean" else tokens[:, 0]

    order: List[str] = []
    positions: List[int] = []    # after_layers of each attention call of the perturbed pass
    order_seen: List[str] = []   # blocks in the order the perturbed pass produced them

    def run(deltas):
        def totals(deltas):
            out, acts, calls = _blocks_run(fn, model_fn, params, x, names, deltas)
            index = None if callable(target) and not isinstance(target, Tensor) else \
                _targets.resolve_index(out, target, fn=fn, output=_targets.selector(model_fn))
            scores = []
            for name in order:
                logits = project(pooled(acts[name]))
                chosen_target = target if index is None else index
                scores.append(_targets.resolve(logits, chosen_target, fn=fn).sum())
            positions[:] = [c.after_layers for c in calls]
            order_seen[:] = list(acts)
            return tuple(scores), [c.probs for c in calls]
        return grads_of_sums(totals, deltas, has_aux=True)

    def pair(after: List[int]) -> List[int]:
        found = []
        for j, name in enumerate(order):
            inside = [i for i, a in enumerate(after) if a == j]
            if not inside:
                raise _checks.value_error(fn, f"an attention call before block {name!r} returns",
                                          "none since the previous block",
                                          "Name transformer blocks (each with a self-attention).")
            found.append(inside[-1])
        return found

    # Which attention call belongs to which block: a forward without autograd learns the order of
    # the blocks' outputs and of the attention calls, and the probabilities' shapes. It is memoised
    # per (model, blocks, input shape) and checked against the perturbed pass on every use.
    owner = memo_owner_of(model_fn)
    key = (tuple(names), tuple(x.shape), x.dtype, x.device)
    try:
        memo = _LAYOUTS.setdefault(owner, {})
    except TypeError:
        memo = {}
    for attempt in range(2):
        if attempt or key not in memo:
            with torch.no_grad():
                _, acts, probe = _blocks_run(fn, model_fn, params, x, names, None)
            memo[key] = (list(acts), [c.after_layers for c in probe], [(c.probs.shape, c.probs.dtype) for c in probe])
        order[:], after, shapes = memo[key][0], memo[key][1], memo[key][2]
        _select(fn, len(shapes), None)
        selected = pair(after)
        deltas = {i: torch.zeros(shapes[i][0], dtype=shapes[i][1], device=x.device) for i in selected}
        try:
            grads, _ = run(deltas)
        except _Mismatch:
            if attempt:
                raise RuntimeError(f"{fn}: the attention shapes change between calls with the same input") from None
            continue
        if order_seen == order and positions == after:
            break
        if attempt:
            raise _checks.value_error(fn, "the same blocks and attention calls in every forward", "a different order",
                                      "The model must not branch on its input's values.")
    maps = []
    for j, i in enumerate(selected):
        g = grads[j][i]
        maps.append(torch.relu(g).mean(dim=(1, 2)))
    relevance = torch.stack(maps).mean(dim=0)
    return _to_map(fn, relevance, x, prefix_tokens, grid, upsample)


def _blocks_run(fn, model_fn, params, x, names, deltas):
    wrapped = _intermediates(model_fn, layers=names, fn=fn)
    (out, acts), calls = _intercepted(fn, wrapped, deltas, params, x)
    return out, acts, calls
