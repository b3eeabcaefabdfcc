"""guided_backprop: parity with captum, reused / in-place / functional ReLUs, derivatives, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn.methods.propagation import guided_backprop
from support.models import TinyCNN


class PoolNet(nn.Module):
    """conv -> ReLU -> maxpool -> conv -> ReLU -> linear on 10x10 inputs; each ReLU module called once (captum's case)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1, self.pool = nn.Conv2d(3, 5, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.fc = nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Linear(4 * 2 * 2, 6)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x))))).flatten(1))


class FunctionalNet(PoolNet):
    """The same network with one ReLU as ``F.relu`` and one as an in-place module reused twice."""

    def __init__(self):
        super().__init__()
        self.relu1 = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.pool(F.relu(self.conv1(x)))
        h = self.relu1(self.conv2(h))
        return self.fc(self.relu1(h - 0.1).flatten(1))


def _hook_reference(model, x, target):
    """Guided backprop by tensor hooks: the gradient arriving at each ReLU output is clamped at 0.

    A hook on the output runs before the ReLU's own backward (which multiplies by ``z > 0``), so
    every call of every ``nn.ReLU`` module gets ``max(g, 0) * (z > 0)``, in place or not.
    """
    def forward_hook(module, inputs, output):
        output.register_hook(lambda g: g.clamp(min=0))
    handles = [m.register_forward_hook(forward_hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        xr = x.clone().requires_grad_()
        model(xr).gather(1, target[:, None]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return xr.grad


def _captum(model, x, target):
    captum_attr = pytest.importorskip("captum.attr")
    with warnings.catch_warnings():  # captum warns that it sets requires_grad and hooks ReLUs
        warnings.simplefilter("ignore", UserWarning)
        return captum_attr.GuidedBackprop(model).attribute(x, target=target)


@pytest.mark.parametrize("make", [lambda: TinyCNN(nn.ReLU), PoolNet])
def test_parity_with_captum(make):
    torch.manual_seed(1)
    model = make().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(4, 3, 10, 10)
    target = torch.tensor([0, 1, 2, 3])
    ours = guided_backprop(fn, params, x, target)
    torch.testing.assert_close(ours, _captum(model, x, target), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(ours, tx.saliency(fn, params, x, target))


def test_functional_inplace_and_reused_relus_match_the_module_network():
    torch.manual_seed(2)
    plain, functional = PoolNet().eval(), FunctionalNet().eval()
    functional.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 10, 10)
    target = torch.tensor([5, 0, 2])

    class Reference(PoolNet):  # FunctionalNet's forward with three distinct, out-of-place ReLU modules
        def __init__(self):
            super().__init__()
            self.relu3 = nn.ReLU()

        def forward(self, x):
            h = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
            return self.fc(self.relu3(h - 0.1).flatten(1))
    reference = Reference().eval()
    reference.load_state_dict(plain.state_dict(), strict=False)
    ours = guided_backprop(*tx.functionalize(functional), x, target)
    torch.testing.assert_close(ours, _captum(reference, x, target), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours, _hook_reference(reference, x, target), rtol=1e-6, atol=1e-9)


def test_resnet18_reused_inplace_relus():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([3, 7])
    ours = guided_backprop(fn, params, x, target)
    torch.testing.assert_close(ours, _hook_reference(model, x, target), rtol=1e-6, atol=1e-9)
    saliency = tx.saliency(fn, params, x, target)
    assert (ours - saliency).abs().max() > 0.1 * saliency.abs().max()
    assert all(not m._forward_hooks for m in model.modules())


def test_without_relu_it_is_the_gradient():
    torch.manual_seed(0)
    fn, params = tx.functionalize(TinyCNN(nn.Tanh).eval())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(guided_backprop(fn, params, x, 1), tx.saliency(fn, params, x, 1))


def test_derivatives_wrt_params_and_input():
    """The map's own derivatives are those of the rule's formula (float64, away from kinks)."""
    torch.manual_seed(3)
    fn, params = tx.functionalize(TinyCNN(nn.ReLU).double().eval())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target = torch.tensor([1, 3])
    w = params["conv1.weight"].clone().requires_grad_()

    def of_weight(w):
        return guided_backprop(fn, {**params, "conv1.weight": w}, x, target)
    assert torch.autograd.gradcheck(of_weight, (w,))
    b = params["conv1.bias"].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda b: guided_backprop(fn, {**params, "conv1.bias": b}, x, target), (b,))
    assert torch.autograd.gradcheck(lambda xi: guided_backprop(fn, params, xi, target), (x.clone().requires_grad_(),))
    # an ensemble under vmap equals the loop, and grad through params runs
    stacked = {k: torch.stack([v, v * 1.1]) for k, v in params.items()}
    batched = torch.func.vmap(lambda p: guided_backprop(fn, p, x, target))(stacked)
    loop = torch.stack([guided_backprop(fn, {k: v[i] for k, v in stacked.items()}, x, target) for i in range(2)])
    torch.testing.assert_close(batched, loop)


def test_errors():
    fn, params = tx.functionalize(TinyCNN(nn.ReLU).eval())
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match=r"^guided_backprop: expected target in \[0, 5\)"):
        guided_backprop(fn, params, x, 9)
    with pytest.raises(TypeError, match="^guided_backprop: "):
        guided_backprop(fn, params, x.long(), 0)
    with pytest.raises(TypeError, match="^guided_backprop: "):
        guided_backprop(TinyCNN(), params, x, 0)
    with pytest.raises(ValueError, match="^guided_backprop: "):
        guided_backprop(fn, params, torch.full((2, 3, 6, 6), float("nan")), 0)
    with pytest.raises(ValueError, match="^guided_backprop: "):
        guided_backprop(fn, params, x, torch.tensor([0, 1, 2]))
