"""Models holding an ``autograd.Function`` without ``setup_context`` (torchvision's ``roi_align`` in
detectors, legacy custom Functions): torch.func refuses them, so the gradient of a plain call is
taken with torch.autograd (``core/autodiff.py``); under an enclosing torch.func transform a clear
error says that it cannot be done.

Each model is compared with its twin written in ordinary operations (the same function): the maps
must be equal, and so must derivatives of the maps taken by the caller's autograd."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core import autodiff


class Cube(torch.autograd.Function):
    """``x ** 3`` in the legacy style (``forward(ctx, ...)``, no ``setup_context``); counts its forwards."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        Cube.calls += 1
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g     # ordinary operations: differentiable again


class Net(nn.Module):
    def __init__(self, legacy: bool):
        super().__init__()
        self.legacy = legacy
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Tanh())
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.conv(x)
        h = Cube.apply(h) if self.legacy else h ** 3
        h = self.features(0.3 * h)
        return self.fc(h.mean((2, 3)))


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    legacy, plain = Net(True).eval(), Net(False).eval()
    plain.load_state_dict(legacy.state_dict())
    x = torch.randn(2, 3, 6, 6)
    return tx.functionalize(legacy), tx.functionalize(plain), x, legacy


def test_the_legacy_function_is_refused_by_torch_func():
    # the premise: without the fallback, torch.func.vjp fails on such a model
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vjp(lambda x: Cube.apply(x).sum(), torch.ones(3))


@pytest.mark.parametrize("method, kwargs", [
    (tx.saliency, {}), (tx.input_x_gradient, {}), (tx.grad_cam, {"layer": "features"}),
    (tx.layer_cam, {"layer": "features"}), (tx.integrated_gradients, {"steps": 8}),
    (tx.saliency, {"layer": "features"}),
])
def test_maps_equal_the_twin_in_ordinary_operations(pair, method, kwargs):
    (fn, p), (fn2, p2), x, _ = pair
    got = method(fn, p, x, torch.tensor([0, 2]), **kwargs)
    want = method(fn2, p2, x, torch.tensor([0, 2]), **kwargs)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_second_call_skips_the_torch_func_attempt(pair):
    (fn, p), _, x, module = pair
    tx.saliency(fn, p, x, 0)            # learns that the module needs torch.autograd
    assert module in autodiff._LEGACY_MODULES
    Cube.calls = 0
    tx.saliency(fn, p, x, 0)
    assert Cube.calls == 1              # one forward: no partial torch.func forward before it


def test_the_callers_autograd_differentiates_the_map(pair):
    (fn, p), (fn2, p2), x, _ = pair
    grads = []
    for f, params in ((fn, p), (fn2, p2)):
        xx = x.clone().requires_grad_(True)
        w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = tx.saliency(f, w, xx, 1).square().sum()
        grads.append(torch.autograd.grad(loss, [xx, w["fc.weight"]]))
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_aux_values_come_back_detached(pair):
    (fn, p), _, x, _ = pair
    out = tx.layer_gradients(fn, p, x, 0, layers=["features"])
    assert not out.acts["features"].requires_grad and not out.scores.requires_grad
    assert not out.grads["features"].requires_grad


def test_grads_of_sums_falls_back_too():
    x = torch.randn(4, dtype=torch.float64)

    def f(v):
        c = Cube.apply(v)
        return (c[:2].sum(), (c * v).sum()), c
    grads, aux = autodiff.grads_of_sums(f, x, has_aux=True)
    torch.testing.assert_close(grads[0], torch.cat([3 * x[:2] ** 2, torch.zeros(2, dtype=x.dtype)]))
    torch.testing.assert_close(grads[1], 4 * x ** 3)
    torch.testing.assert_close(aux, x ** 3)


def test_under_vmap_a_clear_error(pair):
    (fn, p), _, x, _ = pair
    stacked = {k: torch.stack([v, v]) for k, v in p.items()}
    with pytest.raises(RuntimeError, match=r"torch\.func transforms .*setup_context.*Loop over the batch"):
        torch.func.vmap(lambda q: tx.saliency(fn, q, x, 0))(stacked)


def test_under_grad_a_clear_error(pair):
    (fn, p), _, x, _ = pair
    with pytest.raises(RuntimeError, match="roi_align"):
        torch.func.grad(lambda w: tx.saliency(fn, {**p, "fc.weight": w}, x, 0).sum())(p["fc.weight"])


def test_module_left_as_it_was(pair):
    (fn, p), _, x, module = pair
    before = {k: v.clone() for k, v in module.state_dict().items()}
    tx.grad_cam(fn, p, x, 0, layer="features")
    assert not module._forward_hooks and not module.features._forward_hooks and not module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
