"""neuron_conductance takes one forward per batch of path points in a plain call (both gradients from its graph,
as captum), and two (torch.func, differentiable) when a caller differentiates the result: both give the same map,
equal to captum's NeuronConductance also for a callable selector, and the differentiable one has the right
derivative."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core.model import Wrapped
from support.parity import assert_no_hooks, assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Softplus(), nn.Linear(8, 3)).to(dtype).eval()


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dtype)
    return x, (0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)).to(dtype), torch.tensor([0, 1, 2, 1])


def _count_forwards(model):
    calls = []
    return calls, model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))


@pytest.mark.parametrize("batch_size, forwards", [(None, 1), (8, 4), (4, 7)])
def test_a_plain_call_runs_one_forward_per_batch_of_path_points(batch_size, forwards):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, b, t = _data()
    calls, handle = _count_forwards(model)
    try:
        tx.neuron_conductance(fn, params, x, t, layer="1", index=(5,), baseline=b, steps=7, batch_size=batch_size)
        assert len(calls) == forwards and sum(calls) == 7 * 4
        for _ in range(2):  # a tracked x: the differentiable way, two forwards per batch of path points (the
            calls.clear()   # first call also learns the layer's shape, by a forward without autograd)
            tx.neuron_conductance(fn, params, x.clone().requires_grad_(), t, layer="1", index=(5,), baseline=b,
                                  steps=7, batch_size=batch_size)
        assert len(calls) == 2 * forwards and sum(calls) == 2 * 7 * 4
    finally:
        handle.remove()


@pytest.mark.parametrize("index", [(5,), (slice(2, 9),), lambda a: a[:, 3] - 2.0 * a[:, 7]])
def test_the_one_forward_map_equals_the_differentiable_one(index):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, b, t = _data()
    plain = tx.neuron_conductance(fn, params, x, t, layer="1", index=index, baseline=b, steps=9, batch_size=8)
    tracked = tx.neuron_conductance(fn, params, x.clone().requires_grad_(), t, layer="1", index=index, baseline=b,
                                    steps=9, batch_size=8)
    assert not plain.requires_grad and tracked.requires_grad
    torch.testing.assert_close(plain, tracked.detach(), rtol=1e-12, atol=1e-14)
    assert plain.abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:The neuron_selector provided is a callable:UserWarning")
def test_a_callable_selector_equals_captums():
    captum_attr = pytest.importorskip("captum.attr")
    model = _mlp(torch.float32)
    fn, params = tx.functionalize(model)
    x, b, t = _data(torch.float32)

    def select(a):
        return a[:, 2:6].sum(1)
    ref = captum_attr.NeuronConductance(model, model[1]).attribute(x, neuron_selector=select, baselines=b, target=t,
                                                                   n_steps=7)
    assert_parity(tx.neuron_conductance(fn, params, x, t, layer="1", index=select, baseline=b, steps=7), ref)
    assert_no_hooks(model)


def test_a_model_fn_closing_over_a_tracked_tensor_is_differentiated_exactly():
    # f_s = s * f: d f_s / d n = s * d f / d n, so the map is s * map(1) and d sum(map) / d s = sum(map(1)).
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, b, t = _data()
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    scaled = Wrapped(fn, after=lambda v, out: out * s)
    got = tx.neuron_conductance(scaled, params, x, t, layer="1", index=(5,), baseline=b, steps=7)
    one = tx.neuron_conductance(fn, params, x, t, layer="1", index=(5,), baseline=b, steps=7)
    torch.testing.assert_close(got.detach(), 1.7 * one, rtol=1e-12, atol=1e-14)
    (ds,) = torch.autograd.grad(got.sum(), s)
    torch.testing.assert_close(ds, one.sum(), rtol=1e-12, atol=1e-14)
