"""lrp on a model_fn that wraps the model (issue 22, item 3): a normalisation in front of a functionalized model,
a ``torch.func.functional_call`` closure, a ``functools.partial``, a global the function names. The rules apply to
the model's modules; the normalisation outside passes the gradient, so the map equals lrp on
``nn.Sequential(Normalize, model)`` (the normalisation inside the model, where it is an elementwise affine
operation that passes relevance as its gradient times its input: the same product)."""
import functools

import pytest
import torch
from torch import nn

import torchex_fn as tx

MEAN = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
STD = torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)


class Normalize(nn.Module):
    def forward(self, x):
        return (x - MEAN) / STD


def cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 5))
    with torch.no_grad():  # batch norm statistics that are not the identity, so that canonizing matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5)).eval()


def reference(net, x, **options):
    """lrp with the normalisation inside the model."""
    fn, params = tx.functionalize(nn.Sequential(Normalize(), net))
    return tx.lrp(fn, params, x, torch.tensor([1, 3]), **options)


GLOBAL_FN = None  # a script's model_fn at module level, named (not closed over) by the wrapper below


def by_global(p, x):
    return GLOBAL_FN(p, (x - MEAN) / STD)


def wrappers(net):
    """name -> (wrapped model_fn, params) for ``net`` with the normalisation outside it."""
    global GLOBAL_FN
    fn, params = tx.functionalize(net)
    GLOBAL_FN = fn
    plain = {k: v for k, v in params.items()}

    def call(model_fn, p, x, scale):
        return model_fn(p, (x - MEAN) / scale)

    return {
        "lambda": (lambda p, x: fn(p, (x - MEAN) / STD), params),
        "global": (by_global, params),
        "partial": (functools.partial(call, fn, scale=STD), params),
        "functional_call": (lambda p, x: torch.func.functional_call(net, p, ((x - MEAN) / STD,)), plain),
    }


X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["lambda", "global", "partial", "functional_call"])
@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1_flat"])
def test_a_wrapped_cnn_equals_the_normalisation_inside_the_model(name, composite):
    net = cnn()
    want = reference(net, X, composite=composite)
    fn, params = wrappers(net)[name]
    got = tx.lrp(fn, params, X, torch.tensor([1, 3]), composite=composite)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lambda", "global", "partial"])
@pytest.mark.parametrize("composite, net", [("attnlrp", mlp), ("cp_lrp", mlp), ("attnlrp", cnn)])
def test_a_wrapped_model_under_the_transformer_composites(name, composite, net):
    net = net()
    want = reference(net, X, composite=composite)
    fn, params = wrappers(net)[name]
    got = tx.lrp(fn, params, X, torch.tensor([1, 3]), composite=composite)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_functional_call_closure_under_attnlrp():
    # torch's activations are operations that the composite sees wherever they run: the closure works
    net = mlp()
    fn, params = wrappers(net)["functional_call"]
    got = tx.lrp(fn, params, X, torch.tensor([1, 3]), composite="attnlrp")
    torch.testing.assert_close(got, reference(net, X, composite="attnlrp"), rtol=1e-6, atol=1e-6)
    # HuggingFace's activation modules (several operations) get their rule through functionalize's hooks,
    # which functional_call does not run: an error that says how, and the way it names works
    activations = pytest.importorskip("transformers.activations")
    net[3] = activations.NewGELUActivation()
    fn, params = wrappers(net)["functional_call"]
    with pytest.raises(TypeError, match=r"lrp: expected for composite='attnlrp', a model_fn that runs the model "
                                        r"through functionalize.*calls Sequential directly.*"
                                        r"lambda p, x: model_fn\(p, \(x - mean\) / std\)"):
        tx.lrp(fn, params, X, 1, composite="attnlrp")
    inner, params = tx.functionalize(net)
    got = tx.lrp(lambda p, x: inner(p, (x - MEAN) / STD), params, X, torch.tensor([1, 3]), composite="attnlrp")
    torch.testing.assert_close(got, reference(net, X, composite="attnlrp"), rtol=1e-6, atol=1e-6)


def test_a_function_without_one_model_says_how():
    a, pa = tx.functionalize(cnn())
    b, _ = tx.functionalize(mlp())
    with pytest.raises(TypeError, match=r"reaches 2 models \(Sequential, Sequential\).*nn.Sequential\(Normalize"):
        tx.lrp(lambda p, x: a(p, x) + b(p, x), pa, X, 1)
    weight = torch.randn(3 * 8 * 8, 5)
    with pytest.raises(TypeError, match=r"reaches no model.*tx.functionalize\(model\)"):
        tx.lrp(lambda p, x: x.flatten(1) @ p["w"], {"w": weight}, X, 1)


def test_params_that_are_not_the_called_models_are_refused():
    net = cnn()
    fn, params = wrappers(net)["functional_call"]
    wrong = {("x" + k if k == "0.weight" else k): v for k, v in params.items()}
    with pytest.raises(ValueError, match=r"params named as the parameters of the Sequential that model_fn calls, "
                                         r"got a key 'x0.weight'"):
        tx.lrp(fn, wrong, X, 1)
