"""LRP for transformers: the AttnLRP and CP-LRP composites (``tx.lrp(..., composite="attnlrp" | "cp_lrp")``).

Closed forms of each rule on hand-built models (identity, uniform, softmax, norms, a two-token
attention), conservation of CP-LRP on the zoo's transformers, derivatives w.r.t. the parameters,
``vmap``, threads, and a model left as it was. Parity with LXT 2.1 is in ``test_lrp_lxt.py``.
"""
import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx

from support import zoo as _zoo
from support.state import Snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

COMPOSITES = ["attnlrp", "cp_lrp"]


def _half(t):
    """``t`` whose gradient is halved (first order only): the uniform rule of a reference written by hand."""
    return 0.5 * t + 0.5 * t.detach()


# --------------------------------------------------------------------------------------------
# Closed forms on hand-built models.

class _Act(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc(self.act(x))


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("act", ["silu", "gelu_new"])
def test_identity_rule_passes_relevance_through_an_activation(composite, act):
    """``R_i = W[t, i] * act(x_i)``: the activation's output relevance, unchanged (paper, eq. 9)."""
    if act == "gelu_new":  # HuggingFace's activation module written as several operations
        activations = pytest.importorskip("transformers.activations")
        module = activations.NewGELUActivation()
        f = module.forward
    else:
        module, f = nn.SiLU(), F.silu
    torch.manual_seed(0)
    model = _Act(module).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 1, 0])
    r = tx.lrp(fn, params, x, target, composite=composite)
    expected = model.fc.weight[target] * f(x)
    torch.testing.assert_close(r, expected.detach(), rtol=1e-12, atol=1e-12)


class _Product(nn.Module):
    """``out_c = sum_d U[c, d] a_d b_d`` with ``a, b`` the two tokens of ``x [B, 2, D]``."""

    def __init__(self):
        super().__init__()
        self.u = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.u(x[:, 0] * x[:, 1])


@pytest.mark.parametrize("composite", COMPOSITES)
def test_uniform_rule_splits_a_product_in_halves(composite):
    torch.manual_seed(0)
    model = _Product().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 0, 1, 1])
    r = tx.lrp(fn, params, x, target, composite=composite)
    half = (model.u.weight[target] * x[:, 0] * x[:, 1] / 2).detach()
    torch.testing.assert_close(r, torch.stack([half, half], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.sum((1, 2)), fn(params, x).gather(1, target[:, None])[:, 0].detach())


class _Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("v", torch.tensor([[1.0, -2.0], [0.5, 3.0], [2.0, 0.0], [-1.0, 1.0]]))

    def forward(self, x):
        return torch.softmax(x, -1) @ self.v.to(x.dtype)


def test_softmax_rule_closed_form():
    """AttnLRP: ``R_i = x_i s_i (v_i - sum_j s_j v_j)`` (the rule's Taylor form, bias absorbed); CP-LRP: none."""
    model = _Softmax().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 1])
    s = torch.softmax(x, -1)
    v = model.v.double()[:, target].T
    expected = x * s * (v - (s * v).sum(-1, keepdim=True))
    torch.testing.assert_close(tx.lrp(fn, params, x, target, composite="attnlrp"), expected, rtol=1e-12, atol=1e-12)
    assert tx.lrp(fn, params, x, target, composite="cp_lrp").abs().max() == 0


class _Norm(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(4, elementwise_affine=True, bias=False)
        self.weight = nn.Parameter(torch.tensor([0.5, 1.5, -1.0, 2.0]))
        self.u = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        if self.kind == "layer_norm":
            h = self.norm(x)
        else:  # RMSNorm written as HuggingFace's Llama writes it
            h = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.u(h)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms_hold_their_scale_constant(composite, kind):
    """``R = x * J^T(r w g)`` with the scale ``r`` constant: conservative, and equal to the closed form."""
    torch.manual_seed(0)
    model = _Norm(kind).double().eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.25]))
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 4, dtype=torch.float64) * 2 + 0.3
    target = torch.tensor([1, 0, 1])
    r = tx.lrp(fn, params, x, target, composite=composite)
    u = model.u.weight[target].detach()
    if kind == "layer_norm":
        scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + model.norm.eps)
        wu = model.norm.weight.detach() * u
        expected = x * scale * (wu - wu.mean(-1, keepdim=True))
    else:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        expected = x * scale * model.weight.detach() * u
    torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.sum(1), fn(params, x).gather(1, target[:, None])[:, 0].detach())


class _TwoTokens(nn.Module):
    """One attention head over two tokens; the last token's output is read by a linear head."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.q, self.k, self.v = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
        return self.head(o[:, -1])


def _two_token_reference(model, x, target, composite):
    """Relevance by hand in input x gradient form: products' gradients halved (AttnLRP), or the
    probabilities detached (CP-LRP), then ``x * grad``."""
    x = x.clone().requires_grad_(True)
    q, k, v = model.q(x), model.k(x), model.v(x)
    if composite == "attnlrp":
        p = torch.softmax(_half(q @ k.transpose(-1, -2)) / 2.0, -1)
        o = _half(p @ v)
    else:
        p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1).detach()
        o = p @ v
    score = model.head(o[:, -1]).gather(1, target[:, None]).sum()
    (g,) = torch.autograd.grad(score, x)
    return (x * g).detach()


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("fused", [False, True])
def test_two_token_attention_equals_the_rules_by_hand(composite, fused):
    torch.manual_seed(0)
    model = _TwoTokens(fused).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    r = tx.lrp(fn, params, x, target, composite=composite)
    torch.testing.assert_close(r, _two_token_reference(model, x, target, composite), rtol=1e-12, atol=1e-12)
    if composite == "cp_lrp":  # conservative: no bias, the probabilities held constant
        torch.testing.assert_close(r.sum((1, 2)), fn(params, x).gather(1, target[:, None])[:, 0].detach())


def test_epsilon_rule_on_linear_layers():
    """``epsilon > 0``: each linear layer's output gradient is scaled by ``z / (z + eps sign z)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, dtype=torch.float64)
    target = torch.tensor([0, 1])
    eps = 0.5
    z1 = model[0](x)
    z2 = model[1](z1)
    w1, w2 = model[0].weight, model[1].weight
    stab = lambda z: z + eps * torch.where(z >= 0, 1.0, -1.0)  # noqa: E731
    g2 = torch.zeros_like(z2).scatter_(1, target[:, None], 1.0) * z2 / stab(z2)
    g1 = (g2 @ w2) * z1 / stab(z1)
    expected = (x * (g1 @ w1)).detach()
    torch.testing.assert_close(tx.lrp(fn, params, x, target, composite="attnlrp", epsilon=eps), expected,
                               rtol=1e-12, atol=1e-12)
    # epsilon 0 (the default of these composites, LXT's): input x gradient
    plain = tx.input_x_gradient(fn, params, x, target)
    torch.testing.assert_close(tx.lrp(fn, params, x, target, composite="attnlrp"), plain, rtol=1e-12, atol=1e-12)
    # a rule per layer: "zero" on the second layer only
    g2 = torch.zeros_like(z2).scatter_(1, target[:, None], 1.0)
    g1 = (g2 @ w2) * z1 / stab(z1)
    mixed = tx.lrp(fn, params, x, target, composite="attnlrp", epsilon=eps, rules={"1": "zero"})
    torch.testing.assert_close(mixed, (x * (g1 @ w1)).detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Conservation of CP-LRP on the zoo's transformers, and AttnLRP on every zoo model.

_TRANSFORMERS = ["tv/vit_b_16", "tv/swin_t", "tv/maxvit_t", "tv/convnext_tiny", "timm/vit_tiny", "timm/deit_tiny",
                 "timm/swin_tiny", "timm/levit_128s", "timm/convnext_atto", "timm/edgenext_xx_small",
                 "timm/mobilevit_xxs", "timm/poolformer_s12", "hf/bert", "hf/distilbert", "hf/gpt2", "hf/vit"]
_ADDITIVE = ("bias", "pos_embed", "position_embedding", "position_embeddings", "cls_token", "class_token",
             "dist_token", "running_mean", "wpe.weight", "token_type_embeddings")


def _zoo_case(name, dtype=torch.float32, zero_additive=False):
    arch = _zoo.BY_NAME[name]
    pytest.importorskip(arch.package)
    model = _zoo.build(arch).to(dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for _, t in model.named_parameters():  # heads initialised to zero (ViTs) give zero logits
            if t.ndim >= 2 and not t.any():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5)
        if zero_additive:  # every constant that is added: biases, position embeddings, class tokens, means
            for n, t in list(model.named_parameters()) + list(model.named_buffers()):
                if t.is_floating_point() and any(k in n for k in _ADDITIVE):
                    t.zero_()
    fn, params = _zoo.functionalize(arch, model)
    x = _zoo.inputs(arch, batch=2, dtype=dtype)
    layer = None if arch.kind == "image" else arch.embeddings
    return arch, fn, params, x, layer


def _logits(arch, fn, params, x):
    out = fn(params, x)
    out = out if isinstance(out, torch.Tensor) else out.logits
    return (out[:, -1] if arch.kind == "causal" else out).detach()


@pytest.mark.parametrize("name", _TRANSFORMERS)
def test_cp_lrp_conserves_on_zoo_transformers(name):
    """Zero biases (every added constant): the map sums to the target logit, 1e-5 relative in float64."""
    arch, fn, params, x, layer = _zoo_case(name, torch.float64, zero_additive=True)
    r = tx.lrp(fn, params, x, None, composite="cp_lrp", layer=layer)
    logit = _logits(arch, fn, params, x).max(-1).values
    gap = ((r.flatten(1).sum(1) - logit).abs() / logit.abs()).max().item()
    print(f"{name}: cp_lrp conservation gap {gap:.1e}")
    assert gap <= 1e-5


@pytest.mark.parametrize("name", [a.name for a in _zoo.ARCHS])
def test_attnlrp_runs_on_every_zoo_model(name):
    arch, fn, params, x, layer = _zoo_case(name)
    r = tx.lrp(fn, params, x, None, composite="attnlrp", layer=layer)
    expected = x.shape if layer is None else (*x["input_ids"].shape, r.shape[-1])
    assert tuple(r.shape) == tuple(expected)
    assert torch.isfinite(r).all() and r.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Derivatives, vmap, threads, an untouched model.

class _Block(nn.Module):
    """A pre-norm transformer block with a gated MLP and a classifier on the mean token."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, -1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        h = self.norm2(x)
        x = x + self.down(F.gelu(self.gate(h)) * self.up(h))
        return self.head(x.mean(1))


def _block(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = _Block().to(dtype).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return model, fn, params, x


@pytest.mark.parametrize("composite", COMPOSITES)
def test_gradcheck_wrt_params(composite):
    _, fn, params, x, = _block()
    target = torch.tensor([0, 2])
    names = ["qkv.weight", "up.weight", "norm1.weight"]

    def f(*ws):
        return tx.lrp(fn, {**params, **dict(zip(names, ws))}, x, target, composite=composite)

    ws = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(f, ws, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_a_loss_on_the_map_trains():
    """Push the relevance of the first token down: the loss falls within 20 steps of gradient descent."""
    model, fn, params, x = _block(torch.float32)
    target = torch.tensor([0, 2])
    floats = {k: v.detach().clone() for k, v in params.items()}

    def loss(p):
        r = tx.lrp(fn, p, x, target, composite="attnlrp")
        return r[:, 0].sum().square()

    losses = []
    for _ in range(20):
        grads, value = torch.func.grad_and_value(loss)(floats)
        losses.append(float(value))
        floats = {k: v - 0.5 * grads[k] for k, v in floats.items()}
    print("losses", losses[0], losses[-1])
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("composite", COMPOSITES)
def test_vmap_over_an_ensemble_equals_the_loop(composite):
    _, fn, params, x = _block()
    target = torch.tensor([1, 0])
    stacked = {k: torch.stack([v, v * 1.1, v * 0.9]) for k, v in params.items()}
    maps = torch.func.vmap(lambda p: tx.lrp(fn, p, x, target, composite=composite))(stacked)
    loop = torch.stack([tx.lrp(fn, {k: v[i] for k, v in stacked.items()}, x, target, composite=composite)
                        for i in range(3)])
    torch.testing.assert_close(maps, loop, rtol=1e-10, atol=1e-12)


def test_two_threads_two_composites_one_module():
    model, fn, params, x = _block()
    target = torch.tensor([1, 2])
    expected = {c: tx.lrp(fn, params, x, target, composite=c) for c in COMPOSITES}
    results, errors = {c: [] for c in COMPOSITES}, []

    def work(c):
        try:
            for _ in range(5):
                results[c].append(tx.lrp(fn, params, x, target, composite=c))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(c,)) for c in COMPOSITES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not torch.equal(expected["attnlrp"], expected["cp_lrp"])
    for c in COMPOSITES:
        for r in results[c]:
            torch.testing.assert_close(r, expected[c], rtol=0, atol=0)


def test_a_copy_keeps_its_plain_gradient_while_lrp_runs():
    """Nothing is patched, even for the length of a call: a copy of the model in another thread
    gets its true gradient while lrp runs on the original."""
    model, fn, params, x = _block()
    twin = copy.deepcopy(model)
    xx = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(twin(xx)[:, 1].sum(), xx)
    stop, seen, errors = threading.Event(), [], []

    def explain():
        try:
            while not stop.is_set():
                tx.lrp(fn, params, x, 1, composite="attnlrp")
        except Exception as err:  # pragma: no cover
            errors.append(err)

    t = threading.Thread(target=explain)
    t.start()
    try:
        for _ in range(30):
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(twin(xx)[:, 1].sum(), xx)
            seen.append(g)
    finally:
        stop.set()
        t.join()
    assert not errors
    for g in seen:
        torch.testing.assert_close(g, plain, rtol=0, atol=0)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_model_left_as_it_was(composite):
    pytest.importorskip("transformers")
    arch, fn, params, x, layer = _zoo_case("hf/gpt2")
    model = fn.module
    snap = Snapshot(model, params)
    tx.lrp(fn, params, x, None, composite=composite, layer=layer)
    snap.check()


def test_errors():
    _, fn, params, x = _block()
    with pytest.raises(ValueError, match="lrp.*rule in rules for composite 'attnlrp'"):
        tx.lrp(fn, params, x, 0, composite="attnlrp", rules={"up": "flat"})
    with pytest.raises(ValueError, match="lrp.*layer="):
        tx.lrp(fn, params, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, 0, composite="attnlrp")
    with pytest.raises(ValueError, match="lrp.*composite one of .*'attnlrp', 'cp_lrp'"):
        tx.lrp(fn, params, x, 0, composite="attn_lrp")
    with pytest.raises(ValueError, match="unknown|not a layer|lrp"):
        tx.lrp(fn, params, x, 0, composite="cp_lrp", layer="nope")
    assert math.isfinite(float(tx.lrp(fn, params, x, 0, composite="cp_lrp", layer="norm2").sum()))


@pytest.mark.parametrize("rule", ["gamma", "zplus", "alpha2_beta1"])
def test_zennit_rules_in_gradient_form_equal_the_zennit_path(rule):
    """zennit's layer rules combine with the transformer composites (LXT recommends gamma on a ViT's
    linear layers): on a network of convolutions, ReLU, max pooling and linear layers, where both paths
    apply, ``attnlrp`` with ``rules=`` equals the zennit composite with the same rules."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 2])
    rules = {nn.Conv2d: rule, "6": rule, "8": "epsilon"}
    zennit_path = tx.lrp(fn, params, x, target, composite="epsilon_plus", rules=rules, canonize=False)
    ours = tx.lrp(fn, params, x, target, composite="attnlrp", rules=rules, epsilon=1e-6)
    torch.testing.assert_close(ours, zennit_path, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours, tx.lrp(fn, params, x, target, composite="attnlrp", epsilon=1e-6))


def test_the_zennit_composites_point_a_transformer_to_attnlrp_and_the_hint_works():
    """Issue 22, item 4: an error that suggests a fix names one that works."""
    arch, fn, params, x, layer = _zoo_case("tv/vit_b_16")
    with pytest.raises(NotImplementedError, match="composite='attnlrp'") as info:
        tx.lrp(fn, params, x, 1)
    assert "encoder" in str(info.value) or "ln" in str(info.value)   # the modules without a rule are named
    assert torch.isfinite(tx.lrp(fn, params, x, 1, composite="attnlrp")).all()
