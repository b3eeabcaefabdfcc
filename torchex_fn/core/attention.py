"""The one decomposition of attention: ``softmax(Q K^T * scale + mask) V`` in ordinary operations.

``F.scaled_dot_product_attention``'s fused kernels never form the attention probabilities, and
``nn.MultiheadAttention`` calls it (or its own fast path) through ``F.multi_head_attention_forward``.
The operation interceptor (:mod:`torchex_fn.core.intercept`) replaces both calls by the functions
here, for two uses that must see the same numbers:

* the modified back-propagation rules (DeepLIFT, LRP): every piece (the products ``Q K^T`` and
  ``P V``, the softmax, the masks) is an ordinary operation that gets its rule;
* the attention methods (rollout, gradient rollout, LeGrad): the probabilities pass through
  :func:`probabilities`, an identity the interceptor sees, where they are recorded and perturbed.

Outside an interceptor these functions are plain torch code: :func:`sdpa` computes what
``F.scaled_dot_product_attention`` computes, :func:`multi_head_attention` what
``F.multi_head_attention_forward`` computes, up to rounding, always with dropout off (attribution
explains the inference behaviour; callers that must refuse dropout check it before calling).

Conventions, torch's:

* ``sdpa``: a boolean ``attn_mask`` is True where a query *may* attend, a float one is added to
  the scores; ``is_causal`` keeps the lower triangle aligned top-left; ``scale`` defaults to
  ``1 / sqrt(E)``; a query of 3 dimensions ``[B, L, E]`` is one head (computed as ``[B, 1, L, E]``,
  so the probabilities always have a head dimension).
* grouped-query attention (``enable_gqa=True``), :func:`repeat_heads`: heads are dimension -3; a
  key or value with fewer heads than the query has each head repeated (``repeat_interleave``) to
  the query's head count, so that key head ``j`` serves query heads ``j g, ..., j g + g - 1``
  (``g`` = query heads / key heads). This is the rule of torch's own reference implementation.
* ``multi_head_attention``: boolean masks are True where a key is *masked out*; ``attn_mask`` is
  ``[L, S]`` or ``[B * heads, L, S]`` and ``key_padding_mask`` ``[B, S]``; both become additive
  float masks (``-inf`` where masked) and are summed into one mask, as torch merges them;
  ``is_causal`` applies only without ``attn_mask``. Added key tokens (``bias_k``, ``bias_v``,
  ``add_zero_attn``, ``static_k``, ``static_v``) are not supported (:func:`adds_keys`).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks as _checks

__all__ = ["probabilities", "repeat_heads", "attend", "scores", "sdpa", "mha_arguments", "adds_keys", "ADDED_KEYS",
           "multi_head_attention"]


def probabilities(p: Tensor) -> Tensor:
    """The attention probabilities ``p``, unchanged: the point where an interceptor sees (and may replace) them.

    Like :func:`torchex_fn.core.intercept.scale`, a function that torch's function modes see: under
    ``intercept.run(..., attention=True)`` the call is handed over as a ``Call`` of kind ``"attention"``.
    """
    if torch.overrides.has_torch_function((p,)):
        return torch.overrides.handle_torch_function(probabilities, (p,), p)
    return p


def repeat_heads(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
    """Grouped-query attention: ``key`` and ``value`` with their heads (dim -3) repeated to ``query``'s.

    Each key / value head is repeated ``query heads / its heads`` times in place
    (``repeat_interleave``), torch's rule for ``enable_gqa=True``; a tensor with as many heads as
    the query is returned as it is.
    """
    heads = query.size(-3)
    out = []
    for name, t in (("key", key), ("value", value)):
        if t.size(-3) != heads:
            if heads % t.size(-3):
                raise _checks.value_error("scaled_dot_product_attention",
                                          f"{name} heads dividing the query heads ({heads}) with enable_gqa=True",
                                          f"{t.size(-3)} {name} heads")
            t = t.repeat_interleave(heads // t.size(-3), -3)
        out.append(t)
    return out[0], out[1]


def attend(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
           scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``(softmax(query key^T * scale + mask) value, probabilities)`` over the last two dimensions.

    ``mask`` follows sdpa's conventions; the causal mask (if any) is applied before it. The
    probabilities pass through :func:`probabilities`, and what that returns is used and returned.
    """
    probs = probabilities(torch.softmax(scores(query, key, mask, is_causal, scale), dim=-1))
    return torch.matmul(probs, value), probs


def scores(query: Tensor, key: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
           scale: Optional[float] = None) -> Tensor:
    """The attention scores ``query key^T * scale`` with the causal mask and then ``mask`` applied (sdpa's
    conventions; ``-inf`` where a query may not attend): what the softmax of :func:`attend` is taken of."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    s = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(s.size(-2), s.size(-1), dtype=torch.bool, device=query.device).tril()
        s = s.masked_fill(keep.logical_not(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool else s + mask
    return s


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` written out (same arguments; dropout off)."""
    del dropout_p  # dropout off: attribution explains the inference behaviour
    if enable_gqa and query.ndim >= 3:
        key, value = repeat_heads(query, key, value)
    single = query.ndim == 3  # [B, L, E]: one head
    if single:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask.unsqueeze(1)
    out, _ = attend(query, key, value, attn_mask, is_causal, scale)
    return out.squeeze(1) if single else out


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention's functional forward.

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

ADDED_KEYS = "bias_k / bias_v / add_zero_attn / static_k / static_v"
"""The ``F.multi_head_attention_forward`` options that add key tokens (not supported)."""


def mha_arguments(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """The arguments of one ``F.multi_head_attention_forward(*args, **kwargs)`` call by name, defaults filled in."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def adds_keys(a: Mapping[str, Any]) -> bool:
    """Whether the call (:func:`mha_arguments`) adds key tokens (``bias_k``, ``add_zero_attn``, ``static_k``, ...)."""
    return (a["bias_k"] is not None or a["bias_v"] is not None or bool(a["add_zero_attn"])
            or a["static_k"] is not None or a["static_v"] is not None)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as a float mask to add: a boolean one (True = masked out) becomes ``-inf`` / 0."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def multi_head_attention(a: Mapping[str, Any]) -> Tuple[Tensor, Optional[Tensor]]:
    """``F.multi_head_attention_forward`` written out, on its arguments by name (:func:`mha_arguments`; dropout off).

    Returns ``(output, weights)`` as torch does: ``weights`` ``None`` unless ``need_weights``, averaged
    over heads when ``average_attn_weights``.
    """
    if adds_keys(a):
        raise _checks.value_error("multi_head_attention_forward", f"nn.MultiheadAttention without {ADDED_KEYS}",
                                  "one that uses them", "These add key tokens; they are not supported.")
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.ndim == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    length, batch, embed = query.shape
    source = key.shape[0]
    heads = a["num_heads"]
    head_dim = embed // heads
    if a["use_separate_proj_weight"]:
        ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        ws = a["in_proj_weight"].chunk(3)
    b = a["in_proj_bias"]
    bs = (None, None, None) if b is None else b.chunk(3)
    q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((query, key, value), ws, bs))

    def split(t: Tensor, n: int) -> Tensor:  # [n, B, E] -> [B, heads, n, head_dim]
        return t.reshape(n, batch, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = split(q, length), split(k, source), split(v, source)
    mask = None
    attn_mask, padding = a["attn_mask"], a["key_padding_mask"]
    if attn_mask is not None:  # [L, S] or [B * heads, L, S]
        mask = _additive(attn_mask if attn_mask.ndim == 2 else attn_mask.reshape(batch, heads, length, source),
                         q.dtype)
    if padding is not None:  # [B, S]
        p = _additive(padding.reshape(batch, 1, 1, source), q.dtype)
        mask = p if mask is None else mask + p
    out, probs = attend(q, k, v, mask, bool(a["is_causal"]) and attn_mask is None)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"])
    weights = None
    if a["need_weights"]:
        weights = probs.mean(dim=1) if a["average_attn_weights"] else probs
        weights = weights.squeeze(0) if unbatched else weights
    return (out.squeeze(1) if unbatched else out), weights
