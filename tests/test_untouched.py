"""The user's model is left exactly as it was, by every method, on every model of the contract suite.

Three small models: the contract suite's CNN (``_model()``: batch norm with non-trivial running
statistics), a transformer-like model (patch features, layer norm, ``nn.MultiheadAttention``, and a
``Linear`` registered under two names, ``mlp.0`` and ``shared``), and a CNN with input-normalisation
buffers (one of them non-persistent) and an integer buffer. Each is put in a mixed mode (the root in
training mode, batch norm in eval mode: a training-mode forward that equals the eval one, so no
warning), with one parameter frozen and one carrying a ``.grad``. After every method of ``METHODS``,
after ``torch.func.grad`` of a scalar of a differentiable method w.r.t. the parameters, and after a
method that raises in the middle of its call (a target out of range, found once the output exists),
the parameters are the same ``nn.Parameter`` objects with the same values, ``requires_grad`` and
``.grad``; buffers, modes and attributes are unchanged; no hook of any kind is left; the caller's
``params`` dict is untouched; global state is as before (``tests/support/state.py``); and the model still
deep-copies.
"""
import copy

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.contracts import DIFFERENTIABLE, METHODS, contract_model as _model
from support.models import TinyAttention, TinyCNN
from support.state import Snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class Normalised(TinyCNN):
    """``TinyCNN`` on ``(x - mean) * inv_std`` (buffers; ``inv_std`` non-persistent), with an integer buffer."""

    def __init__(self):
        super().__init__(nn.ReLU)
        self.register_buffer("mean", torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("inv_std", torch.tensor([1.5, 0.8, 1.2]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("version", torch.tensor(3))

    def forward(self, x):
        return super().forward((x - self.mean) * self.inv_std)


def _attention():
    torch.manual_seed(1)
    return TinyAttention().eval()


def _normalised():
    torch.manual_seed(2)
    return Normalised().eval()


MODELS = {"cnn": _model, "attention": _attention, "buffers": _normalised}

# (method, model) pairs where the method refuses the model with NotImplementedError (checked: state intact).
UNSUPPORTED = {("lrp", "attention"): "LRP has no rule for LayerNorm and attention"}


def _prepared(build):
    """The model in a mixed mode, with a frozen parameter and one that carries a gradient."""
    model = build().train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    model.conv1.bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    return model


def _call(name, fn, params, x, target):
    method, options, _ = METHODS[name]
    return method(fn, params, x, target, **options)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_model_left_exactly_as_it_was(name, model_name):
    model = _prepared(MODELS[model_name])
    reference = copy.deepcopy(model)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 7, 6)
    before = Snapshot(model, params)
    if (name, model_name) in UNSUPPORTED:
        with pytest.raises(NotImplementedError, match=rf"^{name}: "):
            _call(name, fn, params, x, torch.tensor([1, 3]))
        before.check()
        return

    out = _call(name, fn, params, x, torch.tensor([1, 3]))
    assert out.shape == METHODS[name][2](x.shape) and torch.isfinite(out).all()
    before.check()

    if name in DIFFERENTIABLE:   # a meta-learning step: d (loss on the map) / d params
        trainable = {k: v for k, v in params.items() if v.is_floating_point() and k not in dict(model.named_buffers())}

        def loss(p):
            return _call(name, fn, {**params, **p}, x, torch.tensor([1, 3])).square().mean()
        grads = torch.func.grad(loss)(trainable)
        assert set(grads) == set(trainable) and all(torch.isfinite(g).all() for g in grads.values())
        assert any(g.abs().sum() > 0 for g in grads.values())
        before.check()

    with pytest.raises(ValueError, match=r"target values in \[0, 5\)"):   # raised once the output exists
        _call(name, fn, params, x, torch.tensor([1, 7]))
    before.check()

    clone = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), reference.state_dict().values()))
    assert [m.training for m in clone.modules()] == [m.training for m in reference.modules()]
    torch.testing.assert_close(fn(params, x), reference(x))


def test_aliased_linear_is_still_one_parameter():
    """``shared`` and ``mlp.0`` stay the same module with the same ``Parameter`` after calls and grads."""
    model = _prepared(_attention)
    fn, params = tx.functionalize(model)
    weight = model.shared.weight
    tx.grad_cam(fn, params, torch.randn(2, 3, 5, 5), 0, layer="features")
    torch.func.grad(lambda p: tx.saliency(fn, {**params, **p}, torch.randn(1, 3, 5, 5), 0).sum())(
        {"mlp.0.weight": params["mlp.0.weight"]})
    assert model.shared is model.mlp[0] and model.shared.weight is weight and model.mlp[0].weight is weight
    assert type(weight) is nn.Parameter
