"""Patching single query and key heads, and AtP*'s QK fix (issue 18): activation patching equals patched
forwards written here with hooks on the projections; AtP* equals activation patching exactly where the
metric is linear in the attention probabilities (a one-attention model without residual), where plain AtP,
linear through a saturated softmax, is far off."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn import patching

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T, B, HEADS, WIDTH = 40, 6, 2, 2, 16


def _gpt2(attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=HEADS,
                                  attn_implementation=attn, bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    return transformers.GPT2LMHeadModel(cfg).eval().double()


def _inputs():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (clean[:, 1] + 7) % VOCAB
    corrupt[:, 3] = (clean[:, 3] + 11) % VOCAB
    return clean, corrupt, torch.tensor([3, 5]), torch.tensor([8, 1])


def _gpt2_case():
    model = _gpt2()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    return model, fn, params, clean, corrupt, answer, wrong, patching.logit_difference(answer, wrong)


def _metric_ref(logits, answer, wrong):
    last = logits[:, -1]
    return last[torch.arange(last.shape[0]), answer] - last[torch.arange(last.shape[0]), wrong]


def _c_attn_out(model, layer, ids):
    seen = {}
    h = model.transformer.h[layer].attn.c_attn.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen["o"]


def _gpt2_patched(model, layer, ids, source_qkv, part, t, head):
    """GPT-2's c_attn output is [q | k | v]; replace one head's query or key slice at position t."""
    d = WIDTH // HEADS
    lo = (0 if part == "queries" else WIDTH) + head * d

    def hook(m, a, o):
        o = o.clone()
        o[:, t, lo:lo + d] = source_qkv[:, t, lo:lo + d]
        return o
    h = model.transformer.h[layer].attn.c_attn.register_forward_hook(hook)
    with torch.no_grad():
        out = model(ids).logits
    h.remove()
    return out


@pytest.mark.parametrize("node", ["queries", "keys"])
def test_activation_patching_of_heads_equals_hooked_projections(node):
    model, fn, params, clean, corrupt, answer, wrong, metric = _gpt2_case()
    layers = ["transformer.h.0.attn", "transformer.h.1.attn"]
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers=layers, node=node, batch_size=5)
    assert table.shape == (B, 2, T, HEADS)
    for li in range(2):
        source = _c_attn_out(model, li, corrupt)
        for t in range(T):
            for h in range(HEADS):
                ref = _metric_ref(_gpt2_patched(model, li, clean, source, node, t, h), answer, wrong)
                torch.testing.assert_close(table[:, li, t, h], ref, rtol=1e-9, atol=1e-9)
    base = _metric_ref(model(clean).logits, answer, wrong)
    assert not torch.allclose(table[:, :, 3], base[:, None, None].expand(B, 2, HEADS))   # the patch matters
    # the chunking changes nothing
    whole = tx.activation_patching(fn, params, clean, corrupt, metric, layers=layers, node=node)
    torch.testing.assert_close(whole, table, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("node", ["queries", "keys"])
def test_plain_atp_of_heads_is_the_first_order_term(node):
    model, fn, params, clean, corrupt, answer, wrong, metric = _gpt2_case()
    atp = tx.attribution_patching(fn, params, clean, corrupt, metric, layers=["transformer.h.1.attn"], node=node,
                                  qk_fix=False)
    d = WIDTH // HEADS
    off = 0 if node == "queries" else WIDTH
    delta = torch.zeros(B, T, 3 * WIDTH, dtype=torch.float64, requires_grad=True)
    h = model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: o + delta)
    _metric_ref(model(clean).logits, answer, wrong).sum().backward()
    h.remove()
    diff = _c_attn_out(model, 1, corrupt) - _c_attn_out(model, 1, clean)
    term = (diff * delta.grad)[..., off:off + WIDTH].reshape(B, T, HEADS, d).sum(-1)
    torch.testing.assert_close(atp[:, 0], term, rtol=1e-9, atol=1e-12)


class _Attention(nn.Module):
    def __init__(self, heads, kv_heads, d, gqa):
        super().__init__()
        self.heads, self.kv_heads, self.d, self.gqa = heads, kv_heads, d, gqa
        self.q_proj = nn.Linear(heads * d, heads * d, bias=False)
        self.k_proj = nn.Linear(heads * d, kv_heads * d, bias=False)
        self.v_proj = nn.Linear(heads * d, kv_heads * d, bias=False)
        self.o_proj = nn.Linear(heads * d, heads * d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        if not self.gqa:     # the model repeats its keys itself
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class _OneAttention(nn.Module):
    """Embedding, one attention, a linear read-out: the logits are linear in the attention probabilities."""

    def __init__(self, heads=2, kv_heads=2, d=4, gqa=False, sharp=6.0):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(VOCAB, heads * d)
        self.attn = _Attention(heads, kv_heads, d, gqa)
        self.out = nn.Linear(heads * d, VOCAB)
        with torch.no_grad():
            self.attn.q_proj.weight.mul_(sharp)       # large scores: a saturated softmax
            self.attn.k_proj.weight.mul_(sharp)

    def forward(self, ids):
        return self.out(self.attn(self.emb(ids)))


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("node", ["queries", "keys"])
def test_atp_star_is_exact_where_the_metric_is_linear_in_the_probabilities(node, gqa):
    model = _OneAttention(heads=4, kv_heads=2, gqa=gqa).double().eval()
    fn, params = tx.functionalize(model)
    clean, corrupt, _, _ = _inputs()

    def metric(out):   # every position's logit difference: linear in the probabilities of every query
        return (out[..., 3] - out[..., 8]).sum(-1)
    exact = tx.activation_patching(fn, params, clean, corrupt, metric, layers="attn", node=node)
    base = metric(model(clean))
    star = tx.attribution_patching(fn, params, clean, corrupt, metric, layers="attn", node=node)
    plain = tx.attribution_patching(fn, params, clean, corrupt, metric, layers="attn", node=node, qk_fix=False)
    heads = 2 if (gqa and node == "keys") else 4
    assert star.shape == plain.shape == exact.shape == (B, 1, T, heads)
    change = exact - base[:, None, None, None]
    torch.testing.assert_close(star, change, rtol=1e-9, atol=1e-9)
    assert change.abs().max() > 0.2                                             # patches that matter
    assert (plain - change).abs().max() > change.abs().max()                    # linear AtP misses them (measured: 1.1-4.1x)


def test_gqa_key_heads_equal_patching_the_key_projection():
    model = _OneAttention(heads=4, kv_heads=2, gqa=True).double().eval()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    table = tx.activation_patching(fn, params, clean, corrupt, metric, layers="attn", node="keys", batch_size=2)
    seen = {}
    h = model.attn.k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", o))
    with torch.no_grad():
        model(corrupt)
    h.remove()
    for t in range(T):
        for kh in range(2):
            def patch(m, a, o, t=t, kh=kh):
                o = o.clone()
                o[:, t, kh * 4:(kh + 1) * 4] = seen["k"][:, t, kh * 4:(kh + 1) * 4]
                return o
            h = model.attn.k_proj.register_forward_hook(patch)
            with torch.no_grad():
                ref = _metric_ref(model(clean), answer, wrong)
            h.remove()
            torch.testing.assert_close(table[:, 0, t, kh], ref, rtol=1e-10, atol=1e-10)


def test_one_example_and_denoising():
    model = _OneAttention().double().eval()
    fn, params = tx.functionalize(model)
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(int(answer[0]), int(wrong[0]))
    one = tx.attribution_patching(fn, params, clean[0], corrupt[0], metric, layers="attn", node="keys",
                                  direction="denoising")
    both = tx.attribution_patching(fn, params, clean, corrupt, patching.logit_difference(answer, wrong),
                                   layers="attn", node="keys", direction="denoising")
    assert one.shape == (1, T, 2)   # [L, P, H]
    torch.testing.assert_close(one, both[0], rtol=1e-10, atol=1e-12)
    exact = tx.activation_patching(fn, params, clean[0], corrupt[0], metric, layers="attn", node="keys",
                                   direction="denoising")
    base = _metric_ref(model(corrupt[:1]), answer[:1], wrong[:1])
    torch.testing.assert_close(one, exact - base, rtol=1e-9, atol=1e-9)   # exact: linear in the probabilities


def test_errors():
    clean, corrupt, answer, wrong = _inputs()
    metric = patching.logit_difference(answer, wrong)
    fn, params = tx.functionalize(_gpt2("eager"))
    with pytest.raises(ValueError, match="attn_implementation"):
        tx.attribution_patching(fn, params, clean, corrupt, metric, layers="transformer.h.0.attn", node="keys")
    with pytest.raises(ValueError, match="node in"):
        tx.activation_patching(fn, params, clean, corrupt, metric, layers="transformer.h.0.attn", node="values")
    with pytest.raises(ValueError, match="heads=None"):
        tx.attribution_patching(fn, params, clean, corrupt, metric, layers="transformer.h.0.attn", node="keys",
                                heads=2)
    with pytest.raises(TypeError, match="qk_fix"):
        tx.attribution_patching(fn, params, clean, corrupt, metric, layers="transformer.h.0.attn", node="keys",
                                qk_fix="yes")
    fn, params = tx.functionalize(_gpt2())
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):   # a module that is not an attention
        tx.activation_patching(fn, params, clean, corrupt, metric, layers="transformer.h.0.mlp", node="queries")
