"""Activation patching and attribution patching (AtP): which layer, at which position, carries the behaviour.

Two inputs of one shape, ``clean`` and ``corrupt`` (the same prompt with one part changed, e.g. a name
swapped), and a ``metric`` of the model's output (``out -> [B]``, e.g. the logit difference of the clean
and the corrupt answer) give, for every layer ``l`` of ``layers`` and every position ``t``:

* :func:`activation_patching` (exact): ``metric`` of the model run on one input with layer ``l``'s output
  at position ``t`` replaced by its value on the other input. One patched forward per layer and
  position; the patched variants of a layer are stacked along the batch, ``batch_size`` sequences a forward.
* :func:`attribution_patching` (AtP; Nanda 2023, Kramár et al. 2024): the first-order Taylor estimate of
  the same quantity's change, ``(a_source - a_base) . d metric / d a`` at the base run, for every layer
  and position from two forwards and one backward.

Direction (``direction=``). ``"noising"`` (default): run the CLEAN input and patch in the CORRUPT
activation. It asks which activations the clean behaviour *needs* (Heimersheim & Nanda 2024 "How to
use and interpret activation patching": noising finds necessary components; the IOI circuit of
Wang et al. 2022 was found this way), and it is the direction AtP linearises (at the clean run), so
the two functions estimate the same numbers. ``"denoising"``: run the CORRUPT input and restore the
CLEAN activation, Meng et al. 2022's causal tracing, which finds activations *sufficient* to restore
the behaviour; AtP then linearises at the corrupt run.

Layers are named as everywhere in the package (``layer=``-style dotted module names, or names passed
to :func:`torchex_fn.tap`); a layer's output must be one tensor ``[B, T, ...]`` with the positions second:
for a HuggingFace GPT-2, ``transformer.h.3`` (the residual stream after block 3), ``transformer.h.3.mlp``
(the MLP's output), ``transformer.h.3.attn.c_proj`` (the attention's output; the attention module itself
returns a tuple). ``heads=H`` patches single heads: the layers are then the attention's output
projections (``attn.c_proj`` of GPT-2, ``self_attn.o_proj`` of Llama), whose INPUT is the heads' outputs
concatenated, ``[B, T, H * d]``; head ``h`` is its slice ``h * d : (h + 1) * d``. The patched run
replaces that slice and evaluates the projection on the result (a forward hook on the projection for
the length of the call); AtP differentiates w.r.t. that input.

Queries and keys (``node="queries"`` / ``"keys"``): the layers are then attention modules (GPT-2's
``transformer.h.3.attn``, Llama's ``model.layers.3.self_attn``) that compute attention with
``F.scaled_dot_product_attention`` (HuggingFace's default ``attn_implementation="sdpa"``; tested on GPT-2
and hand-written modules); inside them, for the length of the call, that call runs as its math, and a cell
is one head's query (or key) at one position, as the attention receives it (after rotary embeddings). The
heads are those the call receives: with grouped-query attention passed as ``enable_gqa=True`` a key cell
is one key head (serving its group of query heads); a model that repeats its keys before the call has
as many key heads as query heads. AtP through a query or key linearises the softmax, which misses
saturated attention: ``attribution_patching`` applies AtP*'s fix (Kramár et al. 2024, "QK fix") by default,
``sum (A' - A) . d metric / d A`` with the patched probabilities ``A'`` computed exactly.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core import attention as _attention
from ..core import checks as _checks
from ..core import docs as _docs
from ..core import inputs as _inputs
from ..core import targets as _targets
from ..core.autodiff import grad_of_sum
from ..core.capture import intermediates, resolve_layers
from ..core.model import Wrapped
from ..core.types import ModelFn, Params, module_of

__all__ = ["activation_patching", "attribution_patching", "logit_difference", "token_probability", "DIRECTIONS",
           "NODES"]

DIRECTIONS = ("noising", "denoising")
NODES = ("output", "queries", "keys")


# ------------------------------------------------------------------------------------ metrics
def _logits_at(fn: str, out: Any, position: int) -> Tensor:
    logits = _targets.select_output(out, fn=fn)
    if logits.ndim != 3:
        raise _checks.value_error(fn, "logits of shape [B, T, vocab]", _checks.describe(logits))
    return logits[:, position]


def _token_column(fn: str, name: str, token: Any, logits: Tensor) -> Tensor:
    if isinstance(token, int) and not isinstance(token, bool):
        return logits[:, token]
    if isinstance(token, Tensor) and not token.is_floating_point() and token.shape == logits.shape[:1]:
        return logits.gather(1, token.to(logits.device)[:, None])[:, 0]
    raise _checks.type_error(fn, f"{name}, an int token id or [B] integer ids", _checks.describe(token))


def _check_token(fn: str, name: str, token: Any) -> None:
    if isinstance(token, bool) or not isinstance(token, (int, Tensor)):
        raise _checks.type_error(fn, f"{name}, an int token id or [B] integer ids", _checks.describe(token))
    if isinstance(token, Tensor) and (token.is_floating_point() or token.ndim != 1):
        raise _checks.type_error(fn, f"{name}, an int token id or [B] integer ids", _checks.describe(token))


def logit_difference(answer: Any, wrong: Any, *, position: int = -1) -> Callable[[Any], Tensor]:
    """The metric ``out -> logits[:, position, answer] - logits[:, position, wrong]``, ``[B]``.

    Args:
      answer: The token id of the clean answer: an int, or ``[B]`` ids (one per example).
      wrong: The token id it is compared with (the corrupt answer): an int or ``[B]`` ids.
      position: The position whose logits are read (default: the last, the next-token prediction).

    Returns:
      A callable on the model's output (a tensor of logits ``[B, T, vocab]``, or a HuggingFace output
      with ``logits``); it repeats ``[B]`` ids for a batch of stacked patched variants ``[k * B]``.
    """
    fn = "logit_difference"
    _check_token(fn, "answer", answer)
    _check_token(fn, "wrong", wrong)

    def metric(out: Any) -> Tensor:
        logits = _logits_at(fn, out, position)
        a, w = (_stacked(t, logits.shape[0]) for t in (answer, wrong))
        return _token_column(fn, "answer", a, logits) - _token_column(fn, "wrong", w, logits)

    return metric


def token_probability(token: Any, *, position: int = -1) -> Callable[[Any], Tensor]:
    """The metric ``out -> softmax(logits[:, position])[token]``, ``[B]``.

    Args:
      token: A token id (int) or ``[B]`` ids.
      position: The position whose next-token distribution is read (default: the last).

    Returns:
      A callable on the model's output, as :func:`logit_difference`.
    """
    fn = "token_probability"
    _check_token(fn, "token", token)

    def metric(out: Any) -> Tensor:
        probs = torch.softmax(_logits_at(fn, out, position), dim=-1)
        return _token_column(fn, "token", _stacked(token, probs.shape[0]), probs)

    return metric


def _stacked(token: Any, rows: int) -> Any:
    """``[B]`` ids repeated for ``rows = k * B`` stacked rows (an int as it is)."""
    if isinstance(token, Tensor) and token.shape[0] != rows and rows % token.shape[0] == 0:
        return token.repeat(rows // token.shape[0])
    return token


# ------------------------------------------------------------------------------------ arguments
def _batched(x: Any) -> Tuple[Any, bool]:
    """``x`` with a batch dimension, and whether one was added (token ids ``[T]`` are one example)."""
    if isinstance(x, Tensor):
        return (x[None], True) if x.ndim == 1 else (x, False)
    first = next(_inputs.entries(x))
    if first.ndim == 1:
        return _inputs.map_batch(x, lambda v: v[None]), True
    return x, False


def _check_inputs(fn: str, clean: Any, corrupt: Any) -> None:
    for name, x in (("clean", clean), ("corrupt", corrupt)):
        if isinstance(x, Mapping):
            _inputs.check_mapping(fn, x, name)
        elif not isinstance(x, Tensor):
            raise _checks.type_error(fn, f"{name}, token ids [B, T] / [T] or a dict of inputs", _checks.describe(x))
        if next(_inputs.entries(x)).ndim < 1:
            raise _checks.value_error(fn, f"{name} of rank >= 1 ([B, T] or [T])", _checks.describe(x))
    if isinstance(clean, Mapping) != isinstance(corrupt, Mapping):
        raise _checks.type_error(fn, "corrupt of clean's kind (both tensors or both dicts)",
                                 f"clean: {_checks.describe(clean)}, corrupt: {_checks.describe(corrupt)}")
    if isinstance(clean, Mapping):
        if set(clean) != set(corrupt):
            raise _checks.value_error(fn, f"corrupt with clean's keys {sorted(clean)}", f"keys {sorted(corrupt)}")
        pairs = [(k, clean[k], corrupt[k]) for k in clean if isinstance(clean[k], Tensor)]
    else:
        pairs = [("", clean, corrupt)]
    for key, a, b in pairs:
        if not isinstance(b, Tensor) or a.shape != b.shape:
            where = f"[{key!r}]" if key else ""
            raise _checks.value_error(fn, f"corrupt{where} of clean{where}'s shape {tuple(a.shape)}",
                                      _checks.describe(b),
                                      "Patching needs the two inputs position by position: the same length, "
                                      "one corrupt input per clean one.")


def _check_common(fn: str, model_fn: Any, params: Any, clean: Any, corrupt: Any, metric: Any, layers: Any,
                  positions: Any, heads: Any, direction: Any) -> Tuple[List[str], Optional[List[int]]]:
    _checks.check_model_fn(fn, model_fn)
    _checks.check_params(fn, params, model_fn)
    _check_inputs(fn, clean, corrupt)
    if not callable(metric):
        raise _checks.type_error(fn, "metric, a callable out -> [B] (e.g. tx.patching.logit_difference(a, b))",
                                 _checks.describe(metric))
    if direction not in DIRECTIONS:
        raise _checks.value_error(fn, f"direction in {DIRECTIONS}", _checks.describe(direction))
    _checks.check_positive_int(fn, "heads", heads, allow_none=True)
    if heads is not None and module_of(model_fn) is None:
        raise _checks.type_error(fn, "a model_fn from functionalize for heads= (the projections are hooked)",
                                 _checks.describe(model_fn))
    if isinstance(layers, Mapping):
        raise _checks.type_error(fn, "layers, a name or module, or a list of them", "a dict")
    names, _ = resolve_layers(fn, model_fn, layers)
    if len(set(names)) != len(names):
        raise _checks.value_error(fn, "layers without repetitions", f"{names}")
    if positions is None:
        return names, None
    if isinstance(positions, Tensor):
        positions = positions.tolist()
    if (not isinstance(positions, (list, tuple, range)) or not positions
            or any(isinstance(p, bool) or not isinstance(p, int) for p in positions)):
        raise _checks.type_error(fn, "positions, None or a non-empty sequence of int positions",
                                 _checks.describe(positions))
    return names, list(positions)


def _check_positions(fn: str, positions: Optional[List[int]], length: int) -> List[int]:
    if positions is None:
        return list(range(length))
    bad = [p for p in positions if not -length <= p < length]
    if bad:
        raise _checks.value_error(fn, f"positions in [-{length}, {length}) (the sequence length is {length})",
                                  f"{bad[0]}")
    return [p % length for p in positions]


# ------------------------------------------------------------------------------------ one forward
class _Heads:
    """Forward hooks on attention output projections for one call: read the projection's input
    ``[B, T, H * d]``, and evaluate the projection on a replacement (or on input + delta) instead."""

    def __init__(self, fn: str, names: Sequence[str], replace: Optional[Mapping[str, Tensor]],
                 perturb: Optional[Mapping[str, Tensor]]):
        self.fn, self.names = fn, tuple(names)
        self.replace, self.perturb = dict(replace or {}), dict(perturb or {})
        self.acts: Dict[str, Tensor] = {}

    def hook(self, name: str) -> Callable:
        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            if name in self.acts:
                raise _checks.value_error(self.fn, f"layer {name!r} to run once in a forward pass",
                                          "a layer called more than once")
            if not args or not isinstance(args[0], Tensor):
                raise _checks.type_error(self.fn, f"layer {name!r} called with one tensor (the heads' outputs)",
                                         _checks.describe(args[0] if args else None))
            z = args[0]
            self.acts[name] = z
            new, delta = self.replace.get(name), self.perturb.get(name)
            if new is not None:
                return module.forward(new)         # forward, not __call__: no hook runs again
            if delta is not None:
                return module.forward(z + delta)
            return output
        return forward_hook


def _forward(fn: str, model_fn: Any, params: Params, x: Any, names: Sequence[str], heads: Optional[int], *,
             replace: Optional[Mapping[str, Tensor]] = None,
             perturb: Optional[Mapping[str, Tensor]] = None) -> Tuple[Any, Dict[str, Tensor]]:
    """``(out, {name: activation})`` of one forward; activations are layer outputs, or with ``heads`` the
    projections' inputs."""
    if heads is None:
        return intermediates(model_fn, layers=names, replace=replace, perturb=perturb, fn=fn)(params, x)
    session = _Heads(fn, names, replace, perturb)
    hooked = model_fn
    for name in names:
        hooked = Wrapped(hooked, hook=(name, session.hook(name)))
    out = hooked(params, x)
    missing = [n for n in names if n not in session.acts]
    if missing:
        raise _checks.value_error(fn, f"layer {missing[0]!r} to be called in the forward pass",
                                  "a forward pass that never called it")
    return out, session.acts


def _check_acts(fn: str, acts: Dict[str, Tensor], names: Sequence[str], batch: int, length: int,
                heads: Optional[int]) -> None:
    for name in names:
        a = acts[name]
        if a.ndim < 3 or a.shape[0] != batch or a.shape[1] != length:
            raise _checks.value_error(fn, f"layer {name!r} to output [B, T, ...] = [{batch}, {length}, ...] "
                                      "(positions second)", _checks.describe(a),
                                      "Name a layer whose output has the input's positions on dimension 1.")
        if heads is not None and (a.ndim != 3 or a.shape[-1] % heads):
            raise _checks.value_error(fn, f"the input of {name!r} to be [B, T, H * d] with H = heads = {heads}",
                                      _checks.describe(a),
                                      "Name the attention's output projection (GPT-2: `attn.c_proj`, Llama: "
                                      "`self_attn.o_proj`) and pass the model's number of heads.")


def _metric_values(fn: str, metric: Callable, out: Any, rows: int) -> Tensor:
    value = metric(out)
    if not isinstance(value, Tensor) or value.shape != (rows,):
        raise _checks.value_error(fn, f"metric(out) of shape [B] = [{rows}] (one number per example)",
                                  _checks.describe(value),
                                  "Reduce over everything but the batch, e.g. logits[:, -1, a] - logits[:, -1, b].")
    return value


def _prepare(fn: str, model_fn: Any, params: Params, clean: Any, corrupt: Any, metric: Any, layers: Any,
             positions: Any, heads: Any, direction: Any):
    names, wanted = _check_common(fn, model_fn, params, clean, corrupt, metric, layers, positions, heads, direction)
    clean, single = _batched(clean)
    corrupt, _ = _batched(corrupt)
    base, source = (clean, corrupt) if direction == "noising" else (corrupt, clean)
    first = next(_inputs.entries(base))
    if first.ndim < 2:
        raise _checks.value_error(fn, "clean of rank 1 or 2 ([T] or [B, T])", _checks.describe(first))
    batch, length = first.shape[0], first.shape[1]
    return names, _check_positions(fn, wanted, length), base, source, single, batch, length


def _cells(a: Tensor, heads: Optional[int]) -> Tensor:
    """``[B, T, ...]`` -> ``[B, T, cells, features]``: one cell a position (or a head at a position)."""
    if heads is None:
        return a.reshape(a.shape[0], a.shape[1], 1, -1)
    return a.reshape(a.shape[0], a.shape[1], heads, -1)


# ------------------------------------------------------------------------------------ queries and keys
_SDPA = inspect.signature(_attention.sdpa)


class _Attention(TorchFunctionMode):
    """For one forward: inside the named attention modules, ``F.scaled_dot_product_attention`` runs as its
    math (:mod:`torchex_fn.core.attention`), so that its queries, keys and probabilities are seen, and the
    queries and keys may be edited (``edit[name][node](live) -> tensor``) and the probabilities perturbed
    (``dprobs[name]`` added)."""

    def __init__(self, fn: str, names: Sequence[str], edit: Optional[Mapping[str, Mapping[str, Callable]]] = None,
                 dprobs: Optional[Mapping[str, Tensor]] = None):
        super().__init__()
        self.fn, self.names = fn, tuple(names)
        self.edit, self.dprobs = dict(edit or {}), dict(dprobs or {})
        self.inside: List[Optional[str]] = [None]
        self.seen: Dict[str, Dict[str, Any]] = {}

    def enter(self, name: str) -> Callable[[Any], None]:
        def f(args: Any) -> None:
            self.inside.append(name)
        return f

    def leave(self, name: str) -> Callable[[Any, Any], Any]:
        def f(args: Any, output: Any) -> Any:
            self.inside.pop()
            return output
        return f

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self.inside[-1]
        if func is not F.scaled_dot_product_attention or name is None:
            return func(*args, **kwargs)
        if name in self.seen:
            raise _checks.value_error(self.fn, f"layer {name!r} to compute attention once in a forward pass",
                                      "a module calling scaled_dot_product_attention twice",
                                      "Name the attention module of one layer.")
        a = _SDPA.bind(*args, **kwargs).arguments
        q, k, v = a["query"], a["key"], a["value"]
        if q.ndim != 4 or k.ndim != 4:
            raise _checks.value_error(self.fn, f"the attention of {name!r} on queries and keys [B, heads, T, d]",
                                      f"query {_checks.describe(q)}, key {_checks.describe(k)}")
        if a.get("dropout_p", 0.0) > 0:
            raise _checks.value_error(self.fn, f"the attention of {name!r} without dropout",
                                      f"dropout_p={a['dropout_p']}", "Put the model in eval mode.")
        edits = self.edit.get(name, {})
        q = edits["queries"](q) if "queries" in edits else q
        k = edits["keys"](k) if "keys" in edits else k
        k_all, v = _attention.repeat_heads(q, k, v) if a.get("enable_gqa") else (k, v)
        scale = a.get("scale")
        scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        scores = _attention.scores(q, k_all, a.get("attn_mask"), a.get("is_causal", False), scale)
        probs = torch.softmax(scores, dim=-1)
        if name in self.dprobs:
            probs = probs + self.dprobs[name]
        self.seen[name] = {"queries": q, "keys": k, "keys_all": k_all, "scores": scores, "probs": probs,
                           "scale": torch.as_tensor(scale, dtype=scores.dtype)}   # tensors only: an aux output
        return torch.matmul(probs, v)


def _qk_forward(fn: str, model_fn: Any, params: Params, x: Any, names: Sequence[str], *,
                edit: Optional[Mapping[str, Mapping[str, Callable]]] = None,
                dprobs: Optional[Mapping[str, Tensor]] = None) -> Tuple[Any, Dict[str, Dict[str, Any]]]:
    """``(out, {name: what its attention saw})`` of one forward through :class:`_Attention`."""
    mode = _Attention(fn, names, edit, dprobs)
    run = intermediates(model_fn, layers=(), fn=fn, enter={n: mode.enter(n) for n in names},
                        transform={n: mode.leave(n) for n in names})
    with mode:
        out, _ = run(params, x)
    missing = [n for n in names if n not in mode.seen]
    if missing:
        raise _checks.value_error(
            fn, f"layer {missing[0]!r} to be an attention module that calls F.scaled_dot_product_attention",
            "a forward pass in which it never did",
            "Name the attention module of a layer (GPT-2: `transformer.h.0.attn`, Llama: "
            "`model.layers.0.self_attn`) of a model_fn from `tx.functionalize`; a HuggingFace model computes "
            "attention with it when loaded with attn_implementation=\"sdpa\" (its default), not \"eager\".")
    return out, mode.seen


def _check_node(fn: str, node: Any, heads: Any) -> None:
    if node not in NODES:
        raise _checks.value_error(fn, f"node in {NODES}", _checks.describe(node))
    if node != "output" and heads is not None:
        raise _checks.value_error(fn, f"heads=None with node={node!r} (the heads are the attention's own)",
                                  f"heads={heads}")


def _check_qk(fn: str, seen: Dict[str, Dict[str, Any]], other: Dict[str, Dict[str, Any]], names: Sequence[str],
              node: str, length: int) -> int:
    """The number of heads of ``node`` (the same in every layer), after checking both runs' shapes."""
    heads = None
    for name in names:
        t, u = seen[name][node], other[name][node]
        if t.shape != u.shape or t.shape[-2] != length:
            raise _checks.value_error(fn, f"the {node} of {name!r} of shape [B, heads, T = {length}, d] in both runs",
                                      f"{_checks.describe(t)} and {_checks.describe(u)}")
        if heads is not None and t.shape[1] != heads:
            raise _checks.value_error(fn, f"layers with the same number of {node} heads", f"{heads} and {t.shape[1]}")
        heads = t.shape[1]
    assert heads is not None
    return heads


def _patched_rows(source: Tensor, cells: Sequence[Tuple[int, int]], batch: int) -> Callable[[Tensor], Tensor]:
    """``live -> live`` with, in the ``j``-th block of ``batch`` rows, head ``h`` at position ``t`` of cell
    ``cells[j]`` taken from ``source`` ``[B, H, T, d]``."""
    def edit(live: Tensor) -> Tensor:
        new = live.clone()
        for j, (t, h) in enumerate(cells):
            new[j * batch:(j + 1) * batch, h, t] = source[:, h, t].to(new.dtype)
        return new
    return edit


def _exact_key_effect(seen: Dict[str, Any], keys_source: Tensor, grad: Tensor) -> Tensor:
    """AtP*'s key fix: ``sum_(i, j) (A'_ij - A_ij) dM/dA_ij`` for each key head and position ``[B, Hk, T]``,
    ``A'`` the probabilities with that one key replaced, computed exactly (only its column's score changes)."""
    q, scale = seen["queries"], seen["scale"]
    a, g = seen["probs"].detach(), grad
    dk = keys_source - seen["keys"]
    group = q.shape[1] // dk.shape[1]
    delta = torch.matmul(q, dk.repeat_interleave(group, 1).transpose(-2, -1)) * scale      # [B, H, Tq, Tk]
    log_a = torch.log_softmax(seen["scores"].detach(), dim=-1)      # log A from the scores: exact where A underflows
    log_z = torch.logaddexp(torch.log1p(-a.clamp(max=1.0)), log_a + delta)  # the row's new normaliser / old one
    ag = a * g
    total = ag.sum(-1, keepdim=True)
    effect = (total - ag) * torch.exp(-log_z) + torch.exp(log_a + delta - log_z) * g - total
    effect = torch.where(log_a > float("-inf"), effect, torch.zeros_like(effect))   # a masked key stays masked
    per_head = effect.sum(-2)                                                                # [B, H, Tk]
    return per_head.reshape(per_head.shape[0], -1, group, per_head.shape[-1]).sum(2)


def _exact_query_effect(seen: Dict[str, Any], queries_source: Tensor, grad: Tensor) -> Tensor:
    """AtP*'s query fix: ``sum_j (A'_tj - A_tj) dM/dA_tj`` for each head and query position ``[B, H, T]``,
    the row ``A'_t`` recomputed exactly with the source query (the keys and the mask as they were)."""
    a = seen["probs"].detach()
    dq = queries_source - seen["queries"]
    scores = seen["scores"].detach() + torch.matmul(dq, seen["keys_all"].detach().transpose(-2, -1)) * seen["scale"]
    return ((torch.softmax(scores, dim=-1) - a) * grad).sum(-1)


# ------------------------------------------------------------------------------------ public
@_docs.fill
def activation_patching(model_fn: ModelFn, params: Params, clean: Any, corrupt: Any, metric: Callable[[Any], Tensor],
                        *, layers: Any, positions: Optional[Sequence[int]] = None, heads: Optional[int] = None,
                        direction: str = "noising", batch_size: Optional[int] = None, node: str = "output") -> Tensor:
    """Activation patching: the metric of the model with one layer's output at one position patched.

    For every layer ``l`` and position ``t`` (and head ``h`` with ``heads``): ``metric`` of the model run
    on the base input with layer ``l``'s output at position ``t`` replaced by its value on the source
    input. With ``direction="noising"`` (default) the base is ``clean`` and the source ``corrupt``
    (which activations does the clean behaviour need; the direction AtP estimates); with
    ``"denoising"`` the reverse (Meng et al.'s causal tracing: which clean activations restore it).
    See :mod:`torchex_fn.composite.patching` for the naming of layers and heads.

    Args:
      {model_fn}
      {params}
      clean: Token ids ``[B, T]`` (or ``[T]``, one example), or a dict of inputs such as
        ``{"input_ids": ..., "attention_mask": ...}``.
      corrupt: The corrupted input, of ``clean``'s kind and shape (the same prompt with a part changed).
      metric: A callable ``out -> [B]`` on the model's output (it must treat rows independently:
        patched variants are stacked along the batch), e.g. :func:`logit_difference`.
      layers: A layer name or module, or a list of them; each output ``[B, T, ...]``.
      positions: The positions to patch (default: all ``T``); negative positions count from the end.
      heads: Patch single heads: the number of heads ``H``; ``layers`` are then attention output
        projections, whose input ``[B, T, H * d]`` is split into ``H`` slices.
      direction: ``"noising"`` (default) or ``"denoising"`` (see above).
      batch_size: The most sequences in one forward: ``max(1, batch_size // B)`` patched variants of
        the ``B`` examples. Default: all positions (and heads) of one layer in one forward.
      node: ``"output"`` (default: the layers' outputs), or ``"queries"`` / ``"keys"``: single heads of
        the queries or keys of attention modules (see :mod:`torchex_fn.composite.patching`).

    Returns:
      ``[B, len(layers), P]`` metric values (``P`` = number of positions), ``[B, L, P, H]`` with
      ``heads`` or a ``node`` of queries or keys; ``[L, P]`` / ``[L, P, H]`` for one example given as
      ``[T]``. A cell whose source activation equals the base activation is ``metric`` of the base run
      (no forward is spent on it).

    Cost: two forwards (base and source), then one forward per layer and patched cell, stacked along
    the batch (``L * ceil(P * H * B / batch_size)`` forwards).

    Raises:
      ValueError / TypeError: an unknown layer, ``corrupt`` of another shape than ``clean``, a metric
        that is not callable or not ``[B]``, a layer output without the positions second, bad options;
        all before the patched forwards.

    Example:
      >>> fn, params = tx.functionalize(gpt2.eval())
      >>> metric = tx.patching.logit_difference(answer_id, wrong_id)
      >>> table = tx.activation_patching(fn, params, clean_ids, corrupt_ids, metric,
      ...                                layers=[f"transformer.h.{i}" for i in range(4)])   # [B, 4, T]
    """
    fn = "activation_patching"
    _checks.check_positive_int(fn, "batch_size", batch_size, allow_none=True)
    _check_node(fn, node, heads)
    names, cols, base, source, single, batch, length = _prepare(fn, model_fn, params, clean, corrupt, metric,
                                                                layers, positions, heads, direction)
    if node != "output":
        table = _patch_qk(fn, model_fn, params, base, source, metric, names, cols, node, batch, length, batch_size)
        return table[0] if single else table
    out, acts_base = _forward(fn, model_fn, params, base, names, heads)
    _check_acts(fn, acts_base, names, batch, length, heads)
    base_metric = _metric_values(fn, metric, out, batch)
    _, acts_source = _forward(fn, model_fn, params, source, names, heads)
    _check_acts(fn, acts_source, names, batch, length, heads)

    n_heads = heads or 1
    cells = [(t, h) for t in cols for h in range(n_heads)]
    per_forward = len(cells) if batch_size is None else max(1, batch_size // batch)
    table = base_metric[:, None, None].repeat(1, len(names), len(cells))          # [B, L, cells]
    for li, name in enumerate(names):
        a_base, a_source = _cells(acts_base[name], heads), _cells(acts_source[name], heads)
        same = (a_base == a_source).flatten(3).all(-1).all(0)                      # [T, H]: nothing to patch
        todo = [i for i, (t, h) in enumerate(cells) if not bool(same[t, h])]
        for start in range(0, len(todo), per_forward):
            chunk = todo[start:start + per_forward]
            k = len(chunk)
            patched = a_base.repeat(k, 1, 1, 1)                                     # [k * B, T, H, d]
            for j, i in enumerate(chunk):
                t, h = cells[i]
                patched[j * batch:(j + 1) * batch, t, h] = a_source[:, t, h]
            value = patched.reshape(k * batch, *acts_base[name].shape[1:])
            out_k, _ = _forward(fn, model_fn, params, _inputs.repeat(base, k), [name], heads, replace={name: value})
            values = _metric_values(fn, metric, out_k, k * batch).reshape(k, batch)
            table[:, li, chunk] = values.T.to(table.dtype)
        if todo:   # examples whose own cell was unchanged: their metric is the base run's, exactly
            unchanged = (a_base == a_source).flatten(3).all(-1)                    # [B, T, H]
            for i in todo:
                t, h = cells[i]
                rows = unchanged[:, t, h]
                table[rows, li, i] = base_metric[rows].to(table.dtype)
    table = table.reshape(batch, len(names), len(cols), n_heads)
    if heads is None:
        table = table[..., 0]
    return table[0] if single else table


@_docs.fill
def attribution_patching(model_fn: ModelFn, params: Params, clean: Any, corrupt: Any,
                         metric: Callable[[Any], Tensor], *, layers: Any, positions: Optional[Sequence[int]] = None,
                         heads: Optional[int] = None, direction: str = "noising", node: str = "output",
                         qk_fix: bool = True) -> Tensor:
    """Attribution patching (AtP): the first-order estimate of activation patching's change of the metric.

    ``(a_source - a_base) . d metric / d a`` at the base run, summed over the features of each cell
    (a position of a layer's output, or a head's slice of it with ``heads``); with the default
    ``direction="noising"`` that is ``(a_corrupt - a_clean) . grad`` at the clean run, the estimate of
    ``activation_patching(...) - metric(clean)`` (Nanda 2023; Kramár et al. 2024). Exact where the
    metric is linear in the activation; it misjudges saturated nonlinearities (attention softmax,
    a saturated probability). For single query and key heads (``node=``) AtP*'s fix recomputes the
    attention softmax exactly (``qk_fix=True``, default; Kramár et al. 2024): the estimate is then
    ``sum (A' - A) . d metric / d A``, exact where the metric is linear in that layer's probabilities.
    AtP*'s second fix (GradDrop, against cancellation across layers) is not implemented.

    Args:
      {model_fn}
      {params}
      clean: Token ids ``[B, T]`` (or ``[T]``), or a dict of inputs.
      corrupt: The corrupted input, of ``clean``'s kind and shape.
      metric: A differentiable callable ``out -> [B]`` on the model's output, e.g. :func:`logit_difference`.
      layers: A layer name or module, or a list of them; each output ``[B, T, ...]``.
      positions: The positions reported (default: all ``T``); negative positions count from the end.
      heads: Split each layer (an attention output projection) into ``heads`` slices of its input.
      direction: ``"noising"`` (default; linearised at the clean run) or ``"denoising"`` (at the corrupt run).
      node: ``"output"`` (default), ``"queries"`` or ``"keys"``, as :func:`activation_patching`.
      qk_fix: With a ``node`` of queries or keys: AtP*'s exact softmax (default ``True``), or ``False``
        for plain AtP, ``(q' - q) . d metric / d q``.

    Returns:
      ``[B, L, P]`` estimates (``[B, L, P, H]`` with ``heads`` or a ``node`` of queries or keys;
      ``[L, P]`` / ``[L, P, H]`` for one example given as ``[T]``); a cell whose two activations are
      equal is exactly 0.

    Cost: one forward of the source input, one forward and one backward of the base input (from the
    metric down to the deepest of ``layers``), whatever the number of layers and positions; the QK fix
    adds ``O(H T^2 d)`` per layer (one matrix product of the attention's size).

    Raises:
      ValueError / TypeError: as :func:`activation_patching`, before the backward pass.

    Example:
      >>> atp = tx.attribution_patching(fn, params, clean_ids, corrupt_ids, metric,
      ...                               layers=[f"transformer.h.{i}" for i in range(4)])   # [B, 4, T]
    """
    fn = "attribution_patching"
    _check_node(fn, node, heads)
    if not isinstance(qk_fix, bool):
        raise _checks.type_error(fn, "qk_fix, a bool", _checks.describe(qk_fix))
    names, cols, base, source, single, batch, length = _prepare(fn, model_fn, params, clean, corrupt, metric,
                                                                layers, positions, heads, direction)
    if node != "output":
        table = _atp_qk(fn, model_fn, params, base, source, metric, names, cols, node, batch, length, qk_fix)
        return table[0] if single else table
    _, acts_source = _forward(fn, model_fn, params, source, names, heads)
    _check_acts(fn, acts_source, names, batch, length, heads)
    deltas = {name: torch.zeros_like(acts_source[name]) for name in names}

    def total(deltas: Dict[str, Tensor]):
        out, acts = _forward(fn, model_fn, params, base, names, heads, perturb=deltas)
        _check_acts(fn, acts, names, batch, length, heads)
        return _metric_values(fn, metric, out, batch).sum(), acts

    grads, acts_base = grad_of_sum(total, deltas, has_aux=True)
    rows = []
    for name in names:
        diff = _cells(acts_source[name] - acts_base[name], heads)
        rows.append((diff * _cells(grads[name], heads)).sum(-1)[:, cols])     # [B, P, H]
    table = torch.stack(rows, 1)
    if heads is None:
        table = table[..., 0]
    return table[0] if single else table


def _patch_qk(fn: str, model_fn: Any, params: Params, base: Any, source: Any, metric: Callable, names: Sequence[str],
              cols: List[int], node: str, batch: int, length: int, batch_size: Optional[int]) -> Tensor:
    """:func:`activation_patching` of single query or key heads: ``[B, L, P, H]``."""
    out, seen_base = _qk_forward(fn, model_fn, params, base, names)
    base_metric = _metric_values(fn, metric, out, batch)
    _, seen_source = _qk_forward(fn, model_fn, params, source, names)
    heads = _check_qk(fn, seen_base, seen_source, names, node, length)
    cells = [(t, h) for t in cols for h in range(heads)]
    per_forward = len(cells) if batch_size is None else max(1, batch_size // batch)
    table = base_metric[:, None, None].repeat(1, len(names), len(cells))          # [B, L, cells]
    for li, name in enumerate(names):
        a_base, a_source = seen_base[name][node], seen_source[name][node]          # [B, H, T, d]
        unchanged = (a_base == a_source).all(-1)                                   # [B, H, T]
        todo = [i for i, (t, h) in enumerate(cells) if not bool(unchanged[:, h, t].all())]
        for start in range(0, len(todo), per_forward):
            chunk = todo[start:start + per_forward]
            edit = {name: {node: _patched_rows(a_source, [cells[i] for i in chunk], batch)}}
            out_k, _ = _qk_forward(fn, model_fn, params, _inputs.repeat(base, len(chunk)), [name], edit=edit)
            values = _metric_values(fn, metric, out_k, len(chunk) * batch).reshape(len(chunk), batch)
            table[:, li, chunk] = values.T.to(table.dtype)
        for i in todo:  # examples whose own cell was unchanged: their metric is the base run's, exactly
            t, h = cells[i]
            rows = unchanged[:, h, t]
            table[rows, li, i] = base_metric[rows].to(table.dtype)
    return table.reshape(batch, len(names), len(cols), heads)


def _atp_qk(fn: str, model_fn: Any, params: Params, base: Any, source: Any, metric: Callable, names: Sequence[str],
            cols: List[int], node: str, batch: int, length: int, qk_fix: bool) -> Tensor:
    """:func:`attribution_patching` of single query or key heads, with AtP*'s fix or linear: ``[B, L, P, H]``."""
    _, seen_source = _qk_forward(fn, model_fn, params, source, names)
    if qk_fix:   # the gradient w.r.t. the attention probabilities
        zeros = {name: torch.zeros_like(seen_source[name]["probs"]) for name in names}

        def total(d: Dict[str, Tensor]):
            out, seen = _qk_forward(fn, model_fn, params, base, names, dprobs=d)
            return _metric_values(fn, metric, out, batch).sum(), seen
    else:        # the gradient w.r.t. the queries or keys themselves
        zeros = {name: torch.zeros_like(seen_source[name][node]) for name in names}

        def total(d: Dict[str, Tensor]):
            edit = {name: {node: (lambda live, delta=d[name]: live + delta)} for name in names}
            out, seen = _qk_forward(fn, model_fn, params, base, names, edit=edit)
            return _metric_values(fn, metric, out, batch).sum(), seen

    grads, seen_base = grad_of_sum(total, zeros, has_aux=True)
    _check_qk(fn, seen_base, seen_source, names, node, length)
    rows = []
    for name in names:
        source_t = seen_source[name][node]
        if not qk_fix:
            effect = ((source_t - seen_base[name][node]) * grads[name]).sum(-1)            # [B, H, T]
        elif node == "keys":
            effect = _exact_key_effect(seen_base[name], source_t, grads[name])
        else:
            effect = _exact_query_effect(seen_base[name], source_t, grads[name])
        rows.append(effect.transpose(1, 2)[:, cols])                                      # [B, P, H]
    return torch.stack(rows, 1)
