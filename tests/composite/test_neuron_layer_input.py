"""``tx.neuron`` at a layer's input (``layer="<module>:input"``, captum's ``attribute_to_neuron_input=True``)."""
import pytest
import torch
from torch import nn

import torchex_fn as tx


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    fn, params = tx.functionalize(model)
    return model, fn, params, torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_the_input_of_a_layer_is_the_neuron():
    """The neuron ``tanh(W1 x + b1)[3]``, read at the input of layer 2: its gradient and its integrated
    gradients (completeness: they sum to the neuron's change from the zero baseline)."""
    model, fn, params, x = _mlp()
    neuron = lambda v: torch.tanh(model[0](v))[:, 3]  # noqa: E731
    xx = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(neuron(xx).sum(), xx)
    for _ in range(2):  # the second call may take a shortcut the first learns
        got = tx.neuron(tx.saliency, layer="2:input", index=(3,))(fn, params, x, abs=False)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        ig = tx.neuron(tx.integrated_gradients, layer="2:input", index=(3,))(fn, params, x, steps=64)
        torch.testing.assert_close(ig.sum(1), neuron(x) - neuron(torch.zeros_like(x)), rtol=1e-9, atol=1e-9)
    assert not model[2]._forward_pre_hooks and not model[2]._forward_hooks


def test_equals_captum_attribute_to_neuron_input():
    captum = pytest.importorskip("captum.attr")
    model, fn, params, x = _mlp()
    ours = tx.neuron(tx.saliency, layer="2:input", index=(3,))(fn, params, x, abs=False)
    theirs = captum.NeuronGradient(model, model[2]).attribute(x.clone().requires_grad_(True), neuron_selector=(3,),
                                                              attribute_to_neuron_input=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
