"""tx.neuron(method, layer=, index=): any method explaining one neuron of a layer. Parity with captum 0.9's
NeuronGradient, NeuronIntegratedGradients, NeuronGradientShap (same draws), NeuronDeepLift,
NeuronGuidedBackprop and NeuronFeatureAblation on a small MLP, a small CNN and resnet18 (random init, eval);
completeness of integrated gradients for the neuron; vmap over an ensemble; the model left untouched."""
import numpy as np
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.methods import path
from support.parity import assert_no_hooks, assert_parity, peer_input, peer_model

# captum warns that it set requires_grad on the inputs and that DeepLift registers hooks: its own notes.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]

captum_attr = pytest.importorskip("captum.attr")


def _mlp(dtype=torch.float32, seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), act(), nn.Linear(16, 8), act(), nn.Linear(8, 3))
    return model.to(dtype).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


MLP_CASES = [  # (ours, captum class, our options, captum's options)
    ("saliency", "NeuronGradient", {}, {}),
    ("integrated_gradients", "NeuronIntegratedGradients", {"baseline": 0.2, "steps": 9, "method": "riemann_middle"},
     {"baselines": 0.2, "n_steps": 9, "method": "riemann_middle"}),
    ("deeplift", "NeuronDeepLift", {"baseline": 0.2}, {"baselines": 0.2}),
    ("guided_backprop", "NeuronGuidedBackprop", {}, {}),
    ("feature_ablation", "NeuronFeatureAblation", {"baseline": 0.3, "feature_mask": torch.tensor([0, 0, 1, 2, 2, 1])},
     {"baselines": 0.3, "feature_mask": torch.tensor([[0, 0, 1, 2, 2, 1]])}),
]


@pytest.mark.parametrize("ours, theirs, options, captum_options", MLP_CASES, ids=[c[0] for c in MLP_CASES])
@pytest.mark.parametrize("layer, index", [("2", (5,)), ("3", (1,)), ("1", (slice(3, 9),))])
def test_mlp_parity_with_captum(ours, theirs, options, captum_options, layer, index):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _x(4, 6)
    module = dict(model.named_modules())[layer]
    selector = index[0] if isinstance(index[0], int) else index
    ref = getattr(captum_attr, theirs)(model, module).attribute(x, selector, **captum_options)
    got = tx.neuron(getattr(tx, ours), layer=layer, index=index)(fn, params, x, **options)
    assert_parity(got, ref)
    assert_no_hooks(model)


@pytest.mark.parametrize("ours, theirs, options, captum_options", MLP_CASES, ids=[c[0] for c in MLP_CASES])
def test_cnn_parity_with_captum(ours, theirs, options, captum_options):
    model = _cnn()
    fn, params = tx.functionalize(model)
    x = _x(3, 3, 8, 8)
    if "feature_mask" in options:
        mask = tx.masks.grid((8, 8), (4, 4))
        options = {**options, "feature_mask": mask}
        captum_options = {**captum_options, "feature_mask": mask[None, None]}
    ref = getattr(captum_attr, theirs)(model, model[2]).attribute(x, (4, 1, 2), **captum_options)
    assert_parity(tx.neuron(getattr(tx, ours), layer="2", index=(4, 1, 2))(fn, params, x, **options), ref)


def _captum_draws(seed, batch, samples, count, shape, stdev):
    """GradientShap's draws in captum 0.9 for one call: baseline rows (numpy ``choice``), noise
    (``torch.normal``), path points (numpy ``uniform``), example-major; returned draw-major ``[S, B, ...]``."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    rows = torch.tensor(np.random.choice(count, samples * batch).tolist())
    noise = torch.normal(0, torch.tensor(stdev).repeat((batch * samples, *shape)))
    alpha = torch.tensor(np.random.uniform(0.0, 1.0, batch * samples), dtype=torch.float32)

    def grid(t):
        return t.view(batch, samples, *t.shape[1:]).transpose(0, 1)
    return grid(rows), grid(alpha), grid(noise)


def test_gradient_shap_equals_captums_neuron_gradient_shap_with_the_same_draws():
    # captum draws per example (numpy and torch's global generators); tx.gradient_shap draws per sample
    # for the whole batch from its generator. Fed captum's draws, the estimator is the same.
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, baselines = _x(3, 6), torch.randn(4, 6)
    samples, stdev = 5, 0.2
    rows, alpha, noise = _captum_draws(11, 3, samples, 4, (6,), stdev)
    np.random.seed(11)
    torch.manual_seed(11)
    ref = captum_attr.NeuronGradientShap(model, model[2]).attribute(x, 5, baselines, n_samples=samples, stdevs=stdev)

    def with_captums_draws(model_fn, params, x, target):
        at = {"s": 0}

        def draw(k, batch):
            s, at["s"] = at["s"], at["s"] + k
            return rows[s:s + k], alpha[s:s + k], {"input": noise[s:s + k]}
        return path._gradient_shap("gradient_shap", model_fn, params, x, target, {None: baselines}, None, x, None,
                                   None, samples, 1.0, None, draw, {"input": ((6,), x.dtype)})  # noise drawn at stdev
    assert_parity(tx.neuron(with_captums_draws, layer="2", index=(5,))(fn, params, x), ref)
    # and tx.gradient_shap itself runs under tx.neuron (seeded, its own draws)
    g = tx.neuron(tx.gradient_shap, layer="2", index=(5,))
    a = g(fn, params, x, baselines=baselines, samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, g(fn, params, x, baselines=baselines, samples=3, generator=torch.Generator().manual_seed(0)))


def test_resnet18_parity_with_captum():
    model, fn, params = peer_model("resnet18")
    x = peer_input()
    index = (9, 2, 3)
    cases = [(tx.saliency, captum_attr.NeuronGradient, {}, {}),
             (tx.integrated_gradients, captum_attr.NeuronIntegratedGradients, {"steps": 4}, {"n_steps": 4}),
             (tx.guided_backprop, captum_attr.NeuronGuidedBackprop, {}, {})]
    for ours, theirs, options, captum_options in cases:
        ref = theirs(model, model.layer2[1].conv1).attribute(x, index, **captum_options)
        assert_parity(tx.neuron(ours, layer="layer2.1.conv1", index=index)(fn, params, x, **options), ref)
    mask = tx.masks.grid((64, 64), (16, 16))
    ref = captum_attr.NeuronFeatureAblation(model, model.layer2).attribute(x, index, feature_mask=mask[None, None])
    assert_parity(tx.neuron(tx.feature_ablation, layer="layer2", index=index)(fn, params, x, feature_mask=mask), ref)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------
# What holds for the method holds for the neuron.

def test_integrated_gradients_of_a_neuron_sum_to_its_change_float64():
    # smooth (tanh): 64 Gauss-Legendre nodes integrate to rounding; DeepLIFT's Rescale is exact for any model
    model = _mlp(torch.float64, act=nn.Tanh)
    fn, params = tx.functionalize(model)
    x = _x(4, 6).double()
    got = tx.neuron(tx.integrated_gradients, layer="2", index=(3,))(fn, params, x, baseline=0.5, steps=64)
    change = model[:3](x)[:, 3] - model[:3](torch.full_like(x, 0.5))[:, 3]
    torch.testing.assert_close(got.sum(1), change.detach(), rtol=1e-10, atol=1e-12)
    got = tx.neuron(tx.deeplift, layer="3", index=(3,))(fn, params, x, baseline=0.5)   # exact
    change = model[:4](x)[:, 3] - model[:4](torch.full_like(x, 0.5))[:, 3]
    torch.testing.assert_close(got.sum(1), change.detach(), rtol=1e-12, atol=1e-12)


def test_a_callable_index_and_a_linear_layer_closed_form():
    # the neuron W[j] . x + b_j of the first Linear: its gradient is the row W[j], for every x
    model = _mlp(torch.float64)
    fn, params = tx.functionalize(model)
    x = _x(4, 6).double()
    got = tx.neuron(tx.saliency, layer="0", index=(7,))(fn, params, x)
    torch.testing.assert_close(got, model[0].weight[7].detach().expand(4, 6), rtol=0, atol=0)
    pair = tx.neuron(tx.saliency, layer="0", index=lambda a: a[:, 7] - 2 * a[:, 2])(fn, params, x)
    expected = (model[0].weight[7] - 2 * model[0].weight[2]).detach().expand(4, 6)
    torch.testing.assert_close(pair, expected, rtol=1e-15, atol=1e-15)


def test_vmap_over_an_ensemble_equals_the_loop():
    models = [_mlp(seed=s) for s in range(3)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x = _x(4, 6)
    method = tx.neuron(tx.integrated_gradients, layer="2", index=(5,))
    stacked = torch.func.vmap(lambda p: method(fn, p, x, steps=5))({**params, **buffers})
    loop = torch.stack([method(*tx.functionalize(m), x, steps=5) for m in models])
    torch.testing.assert_close(stacked, loop, rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _x(2, 6)
    with pytest.raises(TypeError, match=r"^neuron: expected method, an attribution method"):
        tx.neuron("saliency", layer="2", index=(1,))
    with pytest.raises(TypeError, match=r"^neuron: expected index, a tuple of ints"):
        tx.neuron(tx.saliency, layer="2", index=[1])
    method = tx.neuron(tx.saliency, layer="2", index=(8,))
    with pytest.raises(ValueError, match=r"^neuron: expected index within the layer's output shape \[8\]"):
        method(fn, params, x)
    with pytest.raises(TypeError, match=r"^neuron: expected no target="):
        tx.neuron(tx.saliency, layer="2", index=(1,))(fn, params, x, target=0)
    with pytest.raises(TypeError, match=r"^neuron: expected a model_fn from torchex_fn.functionalize"):
        tx.neuron(tx.saliency, layer="2", index=(1,))(lambda p, v: v, {}, x)
    with pytest.raises(ValueError, match=r"^neuron: .*layer"):
        tx.neuron(tx.saliency, layer="twelve", index=(1,))(fn, params, x)
    assert_no_hooks(model)
