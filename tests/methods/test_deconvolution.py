"""deconvolution: parity with captum's Deconvolution and NeuronDeconvolution, a closed form, resnet18
(reused in-place ReLUs) against an explicit reference, derivatives and errors."""
import copy

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity, peer_input, peer_model

# captum warns that it set requires_grad on the inputs and that it hooks the ReLUs: its own notes
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]

captum_attr = pytest.importorskip("captum.attr")


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).to(dtype).eval()


def test_one_hidden_relu_layer_closed_form():
    # f = V relu(W x + b): the deconvolution map is W^T relu(V[c]), whatever x (the forward mask is not used)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    expected = torch.relu(model[2].weight[target]) @ model[0].weight
    torch.testing.assert_close(tx.deconvolution(fn, params, x, target), expected.detach(), rtol=1e-14, atol=1e-15)
    # guided back-propagation differs: it keeps the mask (z > 0)
    assert not torch.allclose(tx.guided_backprop(fn, params, x, target), expected)


def test_cnn_parity_with_captum_and_the_neuron_version():
    model = _cnn()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([4, 0, 2])
    assert_parity(tx.deconvolution(fn, params, x, target), captum_attr.Deconvolution(model).attribute(x, target))
    ref = captum_attr.NeuronDeconvolution(model, model[3]).attribute(x, (2, 1, 3))
    assert_parity(tx.neuron(tx.deconvolution, layer="3", index=(2, 1, 3))(fn, params, x), ref)
    assert_no_hooks(model)


class _Deconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _DeconvReLU(nn.Module):
    def forward(self, z):
        return _Deconv.apply(z)


def test_resnet18_equals_a_reference_with_every_relu_module_replaced():
    # captum hooks ReLU modules, and resnet18's blocks call one in-place ReLU twice; the reference here
    # replaces every nn.ReLU by a module with the deconvolution backward, in a copy of the model.
    model, fn, params = peer_model("resnet18")
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, nn.ReLU):
                setattr(module, child, _DeconvReLU())
    x = peer_input()
    target = torch.tensor([3, 17, 512])
    xr = x.clone().requires_grad_()
    reference(xr).gather(1, target[:, None]).sum().backward()
    assert_parity(tx.deconvolution(fn, params, x, target), xr.grad)
    assert_no_hooks(model)


def test_gradcheck_in_params_float64():
    # the map is V-dependent only through relu(V[c]) and linear in W: a smooth function of the params
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 4, dtype=torch.float64)
    names = list(params)

    def of(*values):
        return tx.deconvolution(fn, dict(zip(names, values)), x, torch.tensor([0, 2]))
    assert torch.autograd.gradcheck(of, tuple(v.detach().clone().requires_grad_() for v in params.values()))


def test_errors():
    model = _cnn()
    fn, params = tx.functionalize(model)
    with pytest.raises(ValueError, match=r"^deconvolution: expected target in \[0, 5\)"):
        tx.deconvolution(fn, params, torch.randn(2, 3, 8, 8), 7)
    with pytest.raises(TypeError, match=r"^deconvolution: "):
        tx.deconvolution(fn, params, torch.ones(2, 3, 8, 8, dtype=torch.long), 0)
