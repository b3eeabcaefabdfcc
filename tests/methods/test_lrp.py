"""Layer-wise relevance propagation: parity with zennit, closed forms, conservation, derivatives, errors."""
import pytest
import torch
from torch import nn

import torchex_fn as tx

from support.models import torchvision_lrp_model

COMPOSITES = ["epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat"]


# --------------------------------------------------------------------------------------------
# Parity with zennit 0.5.1 (same composite, zennit's canonizers).

def _torchvision_model(arch, dtype=torch.float32):
    return torchvision_lrp_model(arch, dtype)


def _zennit(model, x, target, composite, **options):
    composites = pytest.importorskip("zennit.composites")
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizer = ResNetCanonizer() if hasattr(model, "layer1") else VGGCanonizer()
    comp = composites.COMPOSITES[composite](canonizers=[canonizer], **options)
    xx = x.clone().requires_grad_(True)
    with comp.context(model) as m:
        out = m(xx)
        seed = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
        (relevance,) = torch.autograd.grad(out, xx, grad_outputs=seed)
    return relevance


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg11", "resnet18"])
def test_equals_zennit_on_torchvision_models(arch, one_thread):
    model = _torchvision_model(arch)
    fn, params = tx.functionalize(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    target = torch.tensor([1, 3])
    low = torch.tensor([-2.5, -3.0, -2.0]).view(1, 3, 1, 1)  # per-channel bounds, as for normalised images
    high = torch.tensor([2.5, 3.0, 3.5]).view(1, 3, 1, 1)
    composites = COMPOSITES if arch != "vgg11" else ["epsilon_plus_flat", "epsilon_gamma_box"]
    for composite in composites:
        box = {"low": low, "high": high} if composite == "epsilon_gamma_box" else {}
        ours = tx.lrp(fn, params, x, target, composite=composite, **box)
        ref = _zennit(model, x, target, composite, **box)
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, (composite, err)  # measured: <= 3.2e-6 (vgg11_bn), <= 1.1e-6 (resnet18)


def test_equals_zennit_in_float64_to_rounding(one_thread):
    model = _torchvision_model("resnet18", torch.float64)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.tensor([4, 0])
    ours = tx.lrp(fn, params, x, target, composite="epsilon_gamma_box", low=-3.0, high=3.0)
    ref = _zennit(model, x, target, "epsilon_gamma_box", low=torch.full_like(x, -3.0), high=torch.full_like(x, 3.0))
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-12  # measured 8e-15


@pytest.mark.parametrize("rule", ["wsquare", "gamma", "flat", "zbox", "alpha1_beta0", "epsilon"])
def test_rules_by_name_equal_zennit(rule):
    """A rule given to chosen modules with ``rules=``, against zennit's NameLayerMapComposite."""
    composites = pytest.importorskip("zennit.composites")
    from zennit import rules as zr
    from zennit.types import Convolution

    model = _cnn(bias=True)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = torch.tensor([2, 0])
    zennit_rule = {"wsquare": zr.WSquare(), "gamma": zr.Gamma(gamma=0.5), "flat": zr.Flat(),
                   "zbox": zr.ZBox(low=-4.0, high=4.0), "alpha1_beta0": zr.AlphaBeta(alpha=1, beta=0),
                   "epsilon": zr.Epsilon(epsilon=0.25)}[rule]
    layer_map = composites.layer_map_base() + [(Convolution, zr.ZPlus()), (nn.Linear, zr.Epsilon())]
    comp = composites.NameLayerMapComposite(name_map=[(("0", "6", "10"), zennit_rule)], layer_map=layer_map)
    xx = x.clone().requires_grad_(True)
    with comp.context(model) as m:
        out = m(xx)
        seed = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
        (ref,) = torch.autograd.grad(out, xx, grad_outputs=seed)
    ours = tx.lrp(fn, params, x, target, composite="epsilon_plus", rules={"0": rule, "6": rule, "10": rule},
                  gamma=0.5, epsilon=0.25, low=-4.0, high=4.0)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-12


# --------------------------------------------------------------------------------------------
# Closed forms and conservation on hand-weighted models.

def _two_layer(dtype=torch.float64):
    """x (2) -> linear (no bias) -> ReLU -> linear (no bias) -> 2 logits."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [3.0, -1.0]]))
        model[2].weight.copy_(torch.tensor([[3.0, 0.5], [-1.0, 2.0]]))
    return model.eval()


def test_epsilon_closed_form():
    # x = [1, 2]: z1 = [-1, 1], a1 = [0, 1], z2 = [0.5, 2]; target 1, score 2.
    # layer 2: R_a1 = a1 * w2[1] * 2 / (2 + e) = [0, 4 / (2 + e)]
    # layer 1: R_x = x * w1[1] * R_a1[1] / (1 + e) = [3, -2] * 4 / ((2 + e)(1 + e))
    fn, params = tx.functionalize(_two_layer())
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    for e in (0.5, 1e-9):
        got = tx.lrp(fn, params, x, 1, composite="epsilon_plus", epsilon=e)
        want = torch.tensor([[3.0, -2.0]], dtype=torch.float64) * 4 / ((2 + e) * (1 + e))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert abs(got.sum().item() - 2.0) <= 1e-8  # epsilon -> 0 without biases conserves the score


def test_zplus_closed_form():
    # z-plus, layer 2: z+ = a1 . w2[1]+ = 2, R_a1 = [0, 2]; layer 1 (x >= 0): z+ = x . w1[1]+ = 3,
    # R_x = [1 * 3, 2 * 0] * 2 / 3 = [2, 0] (epsilon gives [6, -4]: the negative weight's share).
    fn, params = tx.functionalize(_two_layer())
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    got = tx.lrp(fn, params, x, 1, rules={nn.Linear: "zplus"}, stabilizer=1e-12)
    torch.testing.assert_close(got, torch.tensor([[2.0, 0.0]], dtype=torch.float64), rtol=1e-10, atol=1e-10)


def _cnn(bias=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5, bias=bias)).to(dtype).eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_plus_flat"])
def test_conservation_without_biases(composite):
    """z-plus / alpha-beta on non-negative inputs, epsilon -> 0, norm pooling, flat: sum R = score."""
    fn, params = tx.functionalize(_cnn())
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # x >= 0
    out = fn(params, x)
    target = out.argmax(1)
    rel = tx.lrp(fn, params, x, composite=composite, epsilon=1e-12, stabilizer=1e-12)
    score = out.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(rel.flatten(1).sum(1), score, rtol=1e-9, atol=1e-12)  # measured ~1e-15


def test_residual_sum_conserves(one_thread):
    """resnet18 with zero biases and no batch norm shifts: every rule and the residual split conserve."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    with torch.no_grad():
        model.fc.bias.zero_()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    fn, params = tx.functionalize(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rel = tx.lrp(fn, params, x, 2, composite="epsilon_plus", epsilon=1e-12, stabilizer=1e-12)
    score = fn(params, x)[:, 2]
    torch.testing.assert_close(rel.flatten(1).sum(1), score, rtol=1e-8, atol=1e-12)
    # without the residual rule (canonize=False) both branches receive the whole relevance: not conserved
    plain = tx.lrp(fn, params, x, 2, composite="epsilon_plus", epsilon=1e-12, stabilizer=1e-12, canonize=False)
    assert (plain.flatten(1).sum(1) - score).abs().min() > 1e-3 * score.abs().max()


def test_output_relevance_is_the_target_score_and_lrp_is_linear_in_it():
    fn, params = tx.functionalize(_cnn(bias=True))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    by_int = tx.lrp(fn, params, x, 1)
    by_callable = tx.lrp(fn, params, x, lambda out: out[:, 1])
    by_tensor = tx.lrp(fn, params, x, torch.tensor([1, 1]))
    torch.testing.assert_close(by_int, by_callable, rtol=0, atol=0)
    torch.testing.assert_close(by_int, by_tensor, rtol=0, atol=0)
    scaled = tx.lrp(fn, params, x, lambda out: 3 * out[:, 1])  # relevance s * ds/dout = 9 * out_1 * onehot
    torch.testing.assert_close(scaled, 9 * by_int, rtol=1e-12, atol=1e-14)
    predicted = fn(params, x).argmax(1)
    torch.testing.assert_close(tx.lrp(fn, params, x), tx.lrp(fn, params, x, predicted), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Derivatives, vmap, purity.

def _smooth_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(),
                          nn.Conv2d(3, 2, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("composite", COMPOSITES)
def test_gradcheck_wrt_params(composite):
    model = _smooth_model()
    fn, params = tx.functionalize(model)
    names = [n for n, _ in model.named_parameters()]
    buffers = {n: v for n, v in params.items() if n not in names}
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)
    box = {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}

    def loss(*values):
        p = dict(zip(names, values), **buffers)
        return (tx.lrp(fn, p, x, torch.tensor([1, 2]), composite=composite, **box) * weights).sum()
    values = tuple(params[n].clone().requires_grad_(True) for n in names)
    # fast mode: one random direction per parameter tensor (the slow mode's 2 x 140 calls take minutes)
    assert torch.autograd.gradcheck(loss, values, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # torch.func.grad agrees with autograd
    by_func = torch.func.grad(lambda p: loss(*(p[n] for n in names)))({n: params[n] for n in names})
    by_autograd = torch.autograd.grad(loss(*values), values)
    for n, g in zip(names, by_autograd):
        torch.testing.assert_close(by_func[n], g, rtol=1e-10, atol=1e-12)


def test_relevance_penalty_in_a_training_loss():
    """Right-for-the-right-reasons with LRP: penalise relevance on the left half of the image.

    captum's LRP cannot do this (its map is not differentiable, captum issue #652); here the map is an
    ordinary function of the parameters and torch.func.grad trains through it.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    fn, params = tx.functionalize(model.eval())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    mask = torch.zeros_like(x)
    mask[..., :3] = 1.0

    def penalty(p):
        return (tx.lrp(fn, p, x, y, composite="epsilon_plus") * mask).pow(2).sum()

    def loss(p):
        return nn.functional.cross_entropy(fn(p, x), y) + 10.0 * penalty(p)
    start = penalty(params).item()
    for _ in range(20):
        grads = torch.func.grad(loss)(params)
        params = {k: v - 0.05 * grads[k] for k, v in params.items()}
    assert penalty(params).item() < 0.5 * start


def test_vmap_over_examples_equals_batch_and_loop():
    fn, params = tx.functionalize(_cnn(bias=True))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    batch = tx.lrp(fn, params, x, target, composite="epsilon_alpha2_beta1_flat")
    loop = torch.cat([tx.lrp(fn, params, x[i:i + 1], int(target[i]), composite="epsilon_alpha2_beta1_flat")
                      for i in range(3)])
    mapped = torch.func.vmap(lambda xi, ti: tx.lrp(fn, params, xi[None], ti[None],
                                                   composite="epsilon_alpha2_beta1_flat")[0])(x, target)
    torch.testing.assert_close(batch, loop, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mapped, loop, rtol=1e-12, atol=1e-14)
    # per-example independence: changing example 1 changes only row 1
    x2 = x.clone()
    x2[1] += 1.0
    other = tx.lrp(fn, params, x2, target, composite="epsilon_alpha2_beta1_flat")
    assert torch.equal(other[0], batch[0]) and torch.equal(other[2], batch[2])


def test_no_hooks_left_and_model_untouched():
    model = _torchvision_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = [type(m).forward for m in model.modules()]
    fn, params = tx.functionalize(model)
    tx.lrp(fn, params, torch.randn(1, 3, 32, 32), 0)
    with pytest.raises(ValueError):
        tx.lrp(fn, params, torch.randn(1, 3, 32, 32), 10)  # target out of range, after the forward
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert "forward" not in vars(m)
    assert [type(m).forward for m in model.modules()] == forwards
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


# --------------------------------------------------------------------------------------------
# Errors.

def test_errors():
    fn, params = tx.functionalize(_cnn(bias=True))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="lrp: expected composite one of 'epsilon_plus'.*got str 'epsilon_pls'"):
        tx.lrp(fn, params, x, composite="epsilon_pls")
    with pytest.raises(TypeError, match="lrp: expected model_fn from functionalize.*reaches no model"):
        tx.lrp(lambda p, v: v.flatten(1)[:, :5], params, x)  # a wrapper of fn is accepted (test_lrp_wrapped.py)
    with pytest.raises(ValueError, match="lrp: expected low= and high="):
        tx.lrp(fn, params, x, composite="epsilon_gamma_box")
    with pytest.raises(ValueError, match="lrp: expected low broadcastable to x's shape"):
        tx.lrp(fn, params, x, composite="epsilon_gamma_box", low=torch.zeros(5), high=1.0)
    with pytest.raises(ValueError, match="lrp: expected a rule in rules, one of 'epsilon'"):
        tx.lrp(fn, params, x, rules={"0": "epsilon_rule"})
    with pytest.raises(ValueError, match="lrp: unknown layer in rules '00'"):
        tx.lrp(fn, params, x, rules={"00": "epsilon"})
    with pytest.raises(ValueError, match="lrp: expected epsilon, a finite float >= 0"):
        tx.lrp(fn, params, x, epsilon=-1.0)
    with pytest.raises(TypeError, match="lrp: expected canonize, a bool"):
        tx.lrp(fn, params, x, canonize=1)
    with pytest.raises(ValueError, match=r"lrp: expected target in \[0, 5\)"):
        tx.lrp(fn, params, x, 5)
    with pytest.raises(TypeError, match="lrp: expected x of a floating-point dtype"):
        tx.lrp(fn, params, x.long())
    with pytest.raises(TypeError, match="lrp: expected x, a floating-point tensor"):
        tx.lrp(fn, params, {"pixel_values": x})


def test_layers_without_a_rule_raise_before_any_forward():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).eval()
    fn, params = tx.functionalize(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(NotImplementedError, match=r"lrp: .*without a rule: 1 \(LayerNorm\)"):
        tx.lrp(fn, params, torch.randn(2, 4))
    assert not calls


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return torch.softmax(h, dim=1) * h  # a product of two input-dependent tensors


class _Exp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).exp()


def test_operations_without_a_rule_raise():
    x = torch.randn(2, 4)
    fn, params = tx.functionalize(_Gated().eval())
    with pytest.raises(NotImplementedError, match="lrp: expected operations with an LRP rule.*'softmax'"):
        tx.lrp(fn, params, x)
    fn, params = tx.functionalize(_Exp().eval())
    with pytest.raises(NotImplementedError, match="'exp'"):
        tx.lrp(fn, params, x)
