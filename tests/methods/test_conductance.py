"""Conductance (layer and neuron) and internal influence: closed forms on a hand-weighted model, and
parity with captum 0.9's ``LayerConductance``, ``NeuronConductance`` and ``InternalInfluence`` on a
small MLP (every quadrature rule) and on a randomly initialised resnet18."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.methods.path import quadrature
from support.parity import assert_no_hooks, assert_parity, peer_input, peer_model

pytestmark = pytest.mark.usefixtures("one_thread")

captum_attr = pytest.importorskip("captum.attr")
RULES = ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_middle", "riemann_right"]


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return model.to(dtype).eval()


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype)
    return x, (0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)).to(dtype), torch.tensor([0, 1, 2, 1])


# --------------------------------------------------------------------------------------------
# Closed forms: a tanh layer followed by a linear head, f = w . tanh(W x + b) + c.

def _head_model():
    """``f_k = sum_j V[k, j] tanh(W x + b)_j + c_k`` in float64: linear in the layer ``act``."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(20, dtype=torch.float64).view(4, 5).sin())
        model[0].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]]))
        model[2].bias.copy_(torch.tensor([0.7, -0.3]))
    return model


def test_layer_conductance_of_a_layer_under_a_linear_head_is_weight_times_change_and_complete():
    # f is linear in a = tanh(W x + b): the Riemann sum telescopes exactly, whatever the nodes.
    model = _head_model()
    fn, params = tx.functionalize(model)
    x = torch.linspace(-1, 1, 15, dtype=torch.float64).view(3, 5)
    x0 = torch.full((3, 5), 0.2, dtype=torch.float64)
    target = torch.tensor([0, 1, 0])
    a = torch.tanh(model[0](x))
    a0 = torch.tanh(model[0](x0))
    expected = model[2].weight[target] * (a - a0)
    got = tx.layer_conductance(fn, params, x, target, layer="1", baseline=x0, steps=7, method="riemann_trapezoid")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    gap = (model(x) - model(x0)).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(got.sum(1), gap, rtol=1e-12, atol=1e-12)    # completeness, float64


def test_internal_influence_under_a_linear_head_is_the_head_weight_times_the_weights_sum():
    model = _head_model()
    fn, params = tx.functionalize(model)
    x = torch.linspace(-1, 1, 15, dtype=torch.float64).view(3, 5)
    target = torch.tensor([1, 0, 1])
    for method, total in [("riemann_trapezoid", 1 - 1 / 6), ("gausslegendre", 1.0), ("riemann_left", 1.0)]:
        got = tx.internal_influence(fn, params, x, target, layer="1", steps=6, method=method)
        torch.testing.assert_close(got, total * model[2].weight[target], rtol=1e-12, atol=1e-12)


def test_neuron_conductance_of_a_linear_layer_has_a_closed_form():
    # n_j = W[j] . x + b_j, so d n_j / d x = W[j] and A = (x - x0) * W[j] * sum_k w_k d f / d n_j (x(t_k)),
    # with d f / d n = V[target] * (1 - tanh(n)^2): written out here, with the Gauss-Legendre nodes.
    model = _head_model()
    fn, params = tx.functionalize(model)
    x = torch.linspace(-1, 1, 15, dtype=torch.float64).view(3, 5)
    target = torch.tensor([0, 1, 0])
    nodes, weights = quadrature("gausslegendre", 12)
    W, V = model[0].weight, model[2].weight
    for j in range(4):
        integral = sum(w * V[target, j] * (1 - torch.tanh(model[0](a * x)[:, j]) ** 2) for a, w in zip(nodes, weights))
        expected = x * W[j] * integral[:, None]
        got = tx.neuron_conductance(fn, params, x, target, layer="0", index=(j,), steps=12, method="gausslegendre")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # a callable neuron: the same as the index
    pick = tx.neuron_conductance(fn, params, x, target, layer="0", index=lambda a: a[:, 2], steps=9)
    torch.testing.assert_close(pick, tx.neuron_conductance(fn, params, x, target, layer="0", index=(2,), steps=9),
                               rtol=0, atol=0)


def test_chunking_and_batch_size_do_not_change_the_maps():
    model = _mlp(torch.float64)
    fn, params = tx.functionalize(model)
    x, b, t = _data(torch.float64)
    for function, extra in [(tx.layer_conductance, {}), (tx.internal_influence, {}),
                            (tx.neuron_conductance, {"index": (5,)})]:
        whole = function(fn, params, x, t, layer="1", baseline=b, steps=9, **extra)
        for cap in (1, 3, 8, 13):
            torch.testing.assert_close(function(fn, params, x, t, layer="1", baseline=b, steps=9, batch_size=cap,
                                                **extra), whole, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Parity with captum.

@pytest.mark.parametrize("method", RULES)
def test_mlp_parity_with_captum_every_rule(method):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, b, t = _data()
    ref = captum_attr.LayerConductance(model, model[1]).attribute(x, baselines=b, target=t, n_steps=7, method=method)
    assert_parity(tx.layer_conductance(fn, params, x, t, layer="1", baseline=b, steps=7, method=method), ref)
    ref = captum_attr.InternalInfluence(model, model[3]).attribute(x, baselines=b, target=t, n_steps=7, method=method)
    assert_parity(tx.internal_influence(fn, params, x, t, layer="3", baseline=b, steps=7, method=method), ref)
    for selector in [3, (slice(2, 6),)]:
        ref = captum_attr.NeuronConductance(model, model[1]).attribute(
            x, neuron_selector=selector, baselines=b, target=t, n_steps=7, method=method)
        index = (selector,) if isinstance(selector, int) else selector
        assert_parity(tx.neuron_conductance(fn, params, x, t, layer="1", index=index, baseline=b, steps=7,
                                            method=method), ref)
    assert_no_hooks(model)


def test_defaults_are_captums():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, _, t = _data()
    assert_parity(tx.layer_conductance(fn, params, x, t, layer="2"),
                  captum_attr.LayerConductance(model, model[2]).attribute(x, target=t))
    assert_parity(tx.internal_influence(fn, params, x, t, layer="2"),
                  captum_attr.InternalInfluence(model, model[2]).attribute(x, target=t))
    assert_parity(tx.neuron_conductance(fn, params, x, t, layer="2", index=(1,)),
                  captum_attr.NeuronConductance(model, model[2]).attribute(x, neuron_selector=1, target=t))


def test_resnet18_parity_with_captum():
    model, fn, params = peer_model("resnet18")
    x = peer_input()
    target = torch.tensor([3, 17, 512])
    baseline = 0.1 * torch.ones_like(x)
    for layer, module in [("layer2", model.layer2), ("layer3.0.conv1", model.layer3[0].conv1)]:
        ours = tx.layer_conductance(fn, params, x, target, layer=layer, baseline=baseline, steps=4,
                                    method="riemann_trapezoid")
        ref = captum_attr.LayerConductance(model, module).attribute(x, baselines=baseline, target=target, n_steps=4,
                                                                    method="riemann_trapezoid")
        assert_parity(ours, ref)
    ours = tx.internal_influence(fn, params, x, target, layer="layer3", steps=4)
    assert_parity(ours, captum_attr.InternalInfluence(model, model.layer3).attribute(x, target=target, n_steps=4))
    ours = tx.neuron_conductance(fn, params, x, target, layer="layer2", index=(7, 3, 2), steps=4,
                                 method="gausslegendre")
    ref = captum_attr.NeuronConductance(model, model.layer2).attribute(x, neuron_selector=(7, 3, 2), target=target,
                                                                       n_steps=4, method="gausslegendre")
    assert_parity(ours, ref)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# Bad input.

def test_bad_options_raise_before_any_work():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, _, t = _data()
    with pytest.raises(ValueError, match=r"^layer_conductance: expected steps >= 1, got int 0"):
        tx.layer_conductance(fn, params, x, t, layer="1", steps=0)
    with pytest.raises(ValueError, match=r"^internal_influence: .*method"):
        tx.internal_influence(fn, params, x, t, layer="1", method="simpson")
    with pytest.raises(ValueError, match=r"^neuron_conductance: expected steps >= 2 for method 'riemann_trapezoid'"):
        tx.neuron_conductance(fn, params, x, t, layer="1", index=(0,), steps=1)
    with pytest.raises(TypeError, match=r"^neuron_conductance: expected index, a tuple of ints"):
        tx.neuron_conductance(fn, params, x, t, layer="1", index=[0])
    with pytest.raises(ValueError, match=r"^neuron_conductance: expected one layer"):
        tx.neuron_conductance(fn, params, x, t, layer=["1", "3"], index=(0,))
    with pytest.raises(TypeError, match=r"^layer_conductance: "):
        tx.layer_conductance(fn, params, torch.ones(2, 6, dtype=torch.long), None, layer="1")
