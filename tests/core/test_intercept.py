"""Issue 16: one operation interceptor and one attention decomposition (core/intercept.py, core/attention.py).

The decomposition equals torch's attention (float64, 1e-12), with one grouped-query rule; DeepLIFT
and the attention methods go through the same interceptor and see the same probabilities.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn.core import attention as att
from torchex_fn.core import intercept

TOL = dict(rtol=1e-12, atol=1e-12)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=_g(seed))


# --------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention

_L, _S = 4, 6


@pytest.mark.parametrize("options", [
    {}, {"is_causal": True}, {"scale": 0.3}, {"is_causal": True, "scale": 1.7},
    {"attn_mask": torch.rand(_L, _S, generator=_g(1)) > 0.3},                    # bool, True = attend
    {"attn_mask": torch.randn(_L, _S, dtype=torch.float64, generator=_g(2))},    # float, added
    {"attn_mask": torch.randn(2, 1, _L, _S, dtype=torch.float64, generator=_g(3))},  # broadcast over heads
], ids=["plain", "causal", "scale", "causal_scale", "bool_mask", "float_mask", "float_mask_4d"])
def test_sdpa_equals_torch(options):
    mask = options.get("attn_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = True  # no fully masked row (torch and softmax disagree on those)
    q, k, v = _randn(2, 3, _L, 5, seed=4), _randn(2, 3, _S, 5, seed=5), _randn(2, 3, _S, 7, seed=6)
    torch.testing.assert_close(att.sdpa(q, k, v, **options), F.scaled_dot_product_attention(q, k, v, **options),
                               **TOL)


@pytest.mark.parametrize("heads", [(4, 2, 2), (6, 3, 2), (4, 1, 1), (4, 4, 2), (3, 3, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_grouped_query_equals_torch(heads, causal):
    hq, hk, hv = heads
    q, k, v = _randn(2, hq, _L, 5, seed=7), _randn(2, hk, _S, 5, seed=8), _randn(2, hv, _S, 3, seed=9)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(att.sdpa(q, k, v, is_causal=causal, enable_gqa=True), want, **TOL)


def test_grouped_query_rule_is_what_both_former_engines_did():
    """Key head j serves query heads j*g .. j*g+g-1 (repeat_interleave), bit for bit the former rules' tensors."""
    q, k, v = _randn(2, 6, _L, 5, seed=10), _randn(2, 2, _S, 5, seed=11), _randn(2, 2, _S, 5, seed=12)
    key, value = att.repeat_heads(q, k, v)
    # the former interceptor: repeat_interleave(q_heads // heads, -3), key and value each
    assert torch.equal(key, k.repeat_interleave(3, -3)) and torch.equal(value, v.repeat_interleave(3, -3))
    # the former attention methods: the same repeat for both, taken from the key heads
    assert torch.equal(key[:, 3:6], k[:, 1:2].expand(2, 3, _S, 5))
    same_k, same_v = att.repeat_heads(q, q, q)
    assert same_k is q and same_v is q  # nothing to repeat
    with pytest.raises(ValueError, match="dividing the query heads"):
        att.repeat_heads(q, _randn(2, 4, _S, 5), v)


def test_grouped_query_heads_reach_the_attention_methods():
    """The probabilities of query head h come from key head h // g (a tiled repeat would pair them otherwise)."""
    q, k = _randn(1, 4, 3, 2, seed=13), _randn(1, 2, 3, 2, seed=14)
    _, probs = tx.attention_probabilities(lambda p, x: F.scaled_dot_product_attention(x, k, k, enable_gqa=True),
                                          {}, q)
    for h in range(4):
        want = torch.softmax(q[:, h] @ k[:, h // 2].transpose(-2, -1) / 2 ** 0.5, -1)
        torch.testing.assert_close(probs[0][:, h], want, **TOL)


def test_sdpa_one_head_of_three_dimensions():
    q, k, v = _randn(2, _L, 5, seed=15), _randn(2, _S, 5, seed=16), _randn(2, _S, 3, seed=17)
    mask = _randn(2, _L, _S, seed=18)
    torch.testing.assert_close(att.sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, mask),
                               **TOL)
    _, probs = tx.attention_probabilities(lambda p, x: F.scaled_dot_product_attention(x, k, v, mask), {}, q)
    assert probs[0].shape == (2, 1, _L, _S)  # one head, and the probabilities keep a head dimension


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention (F.multi_head_attention_forward)

class _MHA(nn.Module):
    def __init__(self, batch_first, kdim=None, bias=True, call=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.call = call or {}

    def forward(self, q, kv):
        return self.mha(q, kv, kv, **self.call)


def _mha_cases():
    n, s = 5, 6
    bool_mask = torch.rand(n, s, generator=_g(20)) > 0.6
    bool_mask[:, 0] = False  # MHA: True = masked out; keep one key per row
    padding = torch.zeros(2, s, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "plain": {},
        "weights_averaged": {"need_weights": True},
        "weights_per_head": {"need_weights": True, "average_attn_weights": False},
        "no_weights": {"need_weights": False},
        "bool_mask": {"attn_mask": bool_mask, "need_weights": True, "average_attn_weights": False},
        "float_mask": {"attn_mask": _randn(n, s, seed=21)},
        "mask_per_head": {"attn_mask": _randn(4, n, s, seed=22), "need_weights": True, "average_attn_weights": False},
        "padding": {"key_padding_mask": padding, "need_weights": True, "average_attn_weights": False},
        "float_padding": {"key_padding_mask": _randn(2, s, seed=23), "need_weights": False},
        "padding_and_mask": {"key_padding_mask": padding, "attn_mask": bool_mask},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", sorted(_mha_cases()))
@pytest.mark.parametrize("module_options", [{}, {"kdim": 3}, {"bias": False}], ids=["packed", "separate", "no_bias"])
def test_multi_head_attention_equals_torch(batch_first, case, module_options):
    call = _mha_cases()[case]
    torch.manual_seed(0)
    module = _MHA(batch_first, call=call, **module_options).double().eval()
    kdim = module_options.get("kdim", 8)
    q, kv = _randn(2, 5, 8, seed=24), _randn(2, 6, kdim, seed=25)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    seen = []
    (out, weights), count = intercept.run(module, lambda c: seen.append(c.input) or c.input, q, kv, attention=True)
    with torch.no_grad():
        want, want_weights = module(q, kv)
    assert count == 1 and seen[0].shape == (2, 2, 5, 6)
    torch.testing.assert_close(out, want, **TOL)
    if want_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, want_weights, **TOL)


def test_multi_head_attention_unbatched():
    torch.manual_seed(0)
    module = _MHA(True, call={"need_weights": True}).double().eval()
    q, kv = _randn(5, 8, seed=26), _randn(6, 8, seed=27)
    a = att.mha_arguments(q, kv, kv, 8, 2, module.mha.in_proj_weight, module.mha.in_proj_bias, None, None, False,
                          0.0, module.mha.out_proj.weight, module.mha.out_proj.bias, training=False)
    out, weights = att.multi_head_attention(a)
    with torch.no_grad():
        want, want_weights = module(q, kv)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(weights, want_weights, **TOL)


# --------------------------------------------------------------------------------------------
# One interceptor: DeepLIFT and the attention methods see the same probabilities.

class _Encoder(nn.Module):
    """Two blocks: nn.MultiheadAttention with a padding mask, then grouped-query SDPA with a causal mask."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 4)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        h, _ = self.mha(x, x, x, key_padding_mask=pad, need_weights=False)
        h = h + x  # (no layer norm: DeepLIFT decomposes it, which rounds differently from F.layer_norm)
        q = self.q(h).unflatten(-1, (4, 2)).transpose(1, 2)    # 4 query heads
        kv = self.kv(h).unflatten(-1, (2, 2)).transpose(1, 2)  # 2 key / value heads
        a = F.scaled_dot_product_attention(q, kv, kv * 0.5, is_causal=True, enable_gqa=True)
        return self.out(torch.tanh(h + a.transpose(1, 2).flatten(2)).mean(1))


def _spy(monkeypatch):
    runs = []
    real = intercept.run

    def run(fn, handler, *args, **kwargs):
        calls = []

        def watch(c):
            out = handler(c)
            calls.append((c.kind, c.index, c.input, out))
            return out
        runs.append((kwargs, calls))
        return real(fn, watch, *args, **kwargs)
    monkeypatch.setattr(intercept, "run", run)
    return runs


def test_deeplift_and_attention_methods_see_the_same_probabilities(monkeypatch):
    torch.manual_seed(1)
    fn, params = tx.functionalize(_Encoder().eval())
    x, base = torch.randn(2, 5, 8, generator=_g(30)), torch.randn(2, 5, 8, generator=_g(31))
    runs = _spy(monkeypatch)
    tx.deeplift(fn, params, x, 0, baseline=base)
    _, probs = tx.attention_probabilities(fn, params, base)
    tracking = [calls for kwargs, calls in runs if kwargs.get("tainted") is not None]
    attending = [calls for kwargs, calls in runs if kwargs.get("attention")]
    assert tracking and len(attending) == 1  # both went through intercept.run
    # DeepLIFT's first pass runs on the baseline and returns every operation's own value
    softmax = [out for kind, _, _, out in tracking[0] if kind == "softmax"]
    recorded = [out for kind, _, _, out in attending[0]]
    assert len(probs) == len(softmax) == len(recorded) == 2
    for p, s, r in zip(probs, softmax, recorded):
        assert torch.equal(p, s) and torch.equal(p, r)


def test_tracking_with_attention_hands_the_probabilities_after_their_softmax():
    torch.manual_seed(1)
    model = _Encoder().eval()
    x = torch.randn(2, 5, 8, generator=_g(32))
    calls = []
    out, count = intercept.run(model, lambda c: calls.append(c) or c.apply(*c.inputs), x, tainted=[x],
                               attention=True)
    kinds = [c.kind for c in calls]
    assert kinds.count("attention") == 2 and count == len(calls)
    for i, kind in enumerate(kinds):
        if kind == "attention":
            assert kinds[i - 1] == "softmax" and calls[i].name == "probabilities"
            assert torch.equal(calls[i].input, calls[i - 1].apply(calls[i - 1].input))
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
    # without attention=True the same pass numbers its calls as before (DeepLIFT's pairing)
    plain = []
    intercept.run(model, lambda c: plain.append(c.kind) or c.apply(*c.inputs), x, tainted=[x])
    assert plain == [k for k in kinds if k != "attention"]


def test_attention_only_hands_nothing_else():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Softmax(-1))
    x = torch.randn(2, 4)
    calls = []
    out, count = intercept.run(model, calls.append, x, attention=True)
    assert count == 0 and not calls
    torch.testing.assert_close(out, model(x))


def test_refusals_keep_each_side_its_error():
    class Keys(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]
    model_fn, params = tx.functionalize(Keys().eval())
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="attention_probabilities: expected nn.MultiheadAttention without bias_k"):
        tx.attention_probabilities(model_fn, params, x)
    with pytest.raises(intercept.NoRule, match="bias_k"):
        intercept.run(model_fn, lambda c: c.apply(*c.inputs), params, x, tainted=[x])

    def dropped(p, q):
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    q = torch.randn(1, 2, 3, 4)
    _, probs = tx.attention_probabilities(dropped, {}, q)  # the attention methods: dropout off
    torch.testing.assert_close(probs[0], torch.softmax(q @ q.transpose(-2, -1) / 2, -1))
    with pytest.raises(intercept.NoRule, match="dropout_p > 0"):
        intercept.run(dropped, lambda c: c.apply(*c.inputs), {}, q, tainted=[q])
