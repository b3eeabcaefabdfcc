"""``tx.neuron`` with the method's own ``layer=`` at the neuron's layer: the neuron is read from what the method
put in place of the layer's output (before, it was read from the model's own output, and the maps were 0)."""
import torch
from torch import nn

import torchex_fn as tx


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    fn, params = tx.functionalize(model)
    return model, fn, params, torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _hidden(model, x):
    """The neuron layer's output on ``x`` and on the zero baseline."""
    with torch.no_grad():
        return torch.tanh(model[0](x)), torch.tanh(model[0](torch.zeros_like(x)))


def _one_hot(values: torch.Tensor, index: int) -> torch.Tensor:
    out = torch.zeros_like(values)
    out[:, index] = values[:, index]
    return out


def test_layer_integrated_gradients_of_a_neuron_at_its_own_layer():
    """The neuron is linear in its layer's output, so layer integrated gradients there are exactly the
    neuron's change ``h(x)[i] - h(x0)[i]`` at index ``i`` and 0 elsewhere, at any number of steps; the
    gradient is the one-hot vector. First call (whole forward) and later calls (the forward ends at the layer)."""
    model, fn, params, x = _mlp()
    h, h0 = _hidden(model, x)
    for _ in range(3):
        ig = tx.neuron(tx.integrated_gradients, layer="1", index=(2,))(fn, params, x, layer="1", steps=3)
        torch.testing.assert_close(ig, _one_hot(h - h0, 2), rtol=1e-12, atol=1e-12)
        sal = tx.neuron(tx.saliency, layer="1", index=(2,))(fn, params, x, layer="1", abs=False)
        torch.testing.assert_close(sal, _one_hot(torch.ones_like(h), 2), rtol=0, atol=0)
    assert not model[1]._forward_pre_hooks and not model[1]._forward_hooks


def test_at_a_layer_input():
    """The same at ``"2:input"`` (the input the method replaces is the one the neuron reads)."""
    model, fn, params, x = _mlp()
    h, h0 = _hidden(model, x)
    for _ in range(2):
        ig = tx.neuron(tx.integrated_gradients, layer="2:input", index=(4,))(fn, params, x, layer="2:input",
                                                                              steps=3)
        torch.testing.assert_close(ig, _one_hot(h - h0, 4), rtol=1e-12, atol=1e-12)
    assert not model[2]._forward_pre_hooks and not model[2]._forward_hooks


def test_a_method_layer_before_the_neuron_still_meets_completeness():
    """``layer=`` upstream of the neuron: integrated gradients at layer 0 sum to the neuron's change."""
    model, fn, params, x = _mlp()
    h, h0 = _hidden(model, x)
    for _ in range(2):
        ig = tx.neuron(tx.integrated_gradients, layer="1", index=(2,))(fn, params, x, layer="0", steps=128)
        torch.testing.assert_close(ig.sum(1), h[:, 2] - h0[:, 2], rtol=1e-6, atol=1e-6)
