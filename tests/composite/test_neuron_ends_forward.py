"""tx.neuron ends the forward at the neuron's layer (the layers after it never run, once a first call has shown
that the layer runs once per forward), for every method it wraps, with the same maps as the model cut at that
layer; a layer that runs twice gives its last call's neuron (captum's) from whole forwards; a method that reads
a later layer of its own still gets the whole forward; Wrapped(end=True) catches only its own end, and no hook
outlives a call."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.core.model import Wrapped
from support.parity import assert_no_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


def _x():
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


METHODS = [
    (tx.saliency, {}),
    (tx.input_x_gradient, {}),
    (tx.integrated_gradients, {"baseline": 0.2, "steps": 7}),
    (tx.deeplift, {"baseline": 0.2}),
    (tx.guided_backprop, {}),
    (tx.deconvolution, {}),
    (tx.feature_ablation, {"baseline": 0.2}),
]


@pytest.mark.parametrize("method, options", METHODS, ids=lambda v: getattr(v, "__name__", ""))
def test_the_layers_after_the_neuron_never_run_and_the_map_is_the_cut_models(method, options):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _x()
    later = []
    handles = [model[i].register_forward_hook(lambda m, a, o, i=i: later.append(i)) for i in (3, 4)]
    try:
        first = tx.neuron(method, layer="2", index=(5,))(fn, params, x, **options)
        assert later   # the first call runs whole forwards: it learns that layer "2" runs once in one
        later.clear()
        got = tx.neuron(method, layer="2", index=(5,))(fn, params, x, **options)
    finally:
        for h in handles:
            h.remove()
    assert later == []
    torch.testing.assert_close(got, first, rtol=0, atol=0)
    # the reference: the model cut after layer "2", explained for output 5
    cut_fn, cut_params = tx.functionalize(nn.Sequential(*model[:3]))
    expected = method(cut_fn, cut_params, x, 5, **options)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert expected.abs().max() > 1e-3
    assert_no_hooks(model)


def test_a_method_reading_a_layer_after_the_neuron_gets_the_whole_forward_and_one_before_it_does_not():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _x()
    tx.neuron(tx.saliency, layer="2", index=(5,))(fn, params, x)   # learns that layer "2" runs once
    later = []
    handle = model[4].register_forward_hook(lambda m, a, o: later.append(4))
    try:
        # integrated gradients at layer "4", after the neuron's: the capture waits for it, the forward goes on
        # (the neuron does not depend on that layer: zero)
        after = tx.neuron(tx.integrated_gradients, layer="2", index=(5,))(fn, params, x, layer="4", steps=5)
        assert later and after.shape == (4, 3) and not after.any()
        later.clear()
        # at the input of layer "2" (read by a pre-hook before the neuron's layer runs): the forward ends at "2";
        # the neuron is W[5] . h + b there, so the map is W[5] * (h - h0) exactly
        got = tx.neuron(tx.integrated_gradients, layer="2", index=(5,))(fn, params, x, layer="2:input", baseline=0.3,
                                                                         steps=5)
    finally:
        handle.remove()
    assert later == []
    h, h0 = model[:2](x), model[:2](torch.full_like(x, 0.3))
    torch.testing.assert_close(got, (model[2].weight[5] * (h - h0)).detach(), rtol=1e-12, atol=1e-14)
    assert got.abs().max() > 1e-3
    assert_no_hooks(model)


class Shared(nn.Module):
    """One ReLU module called twice (as torchvision's BasicBlock does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.l3(self.relu(self.l2(self.relu(self.l1(x)))))


def test_a_layer_called_twice_gives_its_last_calls_neuron_from_whole_forwards():
    model = Shared().double().eval()
    fn, params = tx.functionalize(model)
    x = _x()
    with torch.no_grad():   # the unit of the second ReLU call that is active for most examples
        k = int(torch.relu(model.l2(torch.relu(model.l1(x)))).gt(0).sum(0).argmax())
    later = []
    handle = model.l3.register_forward_hook(lambda m, a, o: later.append(3))
    try:
        maps = [tx.neuron(tx.saliency, layer="relu", index=(k,))(fn, params, x) for _ in range(2)]
    finally:
        handle.remove()
    assert len(later) == 2   # both calls ran the whole forward: the second call of the ReLU is the neuron's
    xx = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.relu(model.l2(torch.relu(model.l1(xx))))[:, k].sum(), xx)
    for got in maps:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert expected.abs().max() > 1e-3
    assert_no_hooks(model)


def test_wrapped_end_catches_only_its_own_end():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _x()
    seen = []
    inner = Wrapped(fn, hook=("2", lambda m, a, o: seen.append("inner hook")), end=True,
                    after=lambda v, out: seen.append("inner after") or out)
    outer = Wrapped(inner, hook=("0", lambda m, a, o: seen.append("outer hook")), end=True,
                    after=lambda v, out: seen.append(("outer after", out)) or "ended")
    assert outer(params, x) == "ended"
    assert seen == ["outer hook", ("outer after", None)]   # the outer one ended it at "0", the inner never finished
    seen.clear()
    inner = Wrapped(fn, hook=("0", lambda m, a, o: seen.append("inner hook")), end=True,
                    after=lambda v, out: seen.append(("inner after", out)) or "inner value")
    outer = Wrapped(inner, hook=("2", lambda m, a, o: seen.append("outer hook")), end=True,
                    after=lambda v, out: seen.append(("outer after", out)) or out)
    assert outer(params, x) == "inner value"
    assert seen == ["inner hook", ("inner after", None), ("outer after", "inner value")]
    assert_no_hooks(model)


def test_bad_end_and_no_hook_after_a_failing_call():
    model = _mlp()
    fn, params = tx.functionalize(model)
    with pytest.raises(ValueError, match=r"^Wrapped: expected hook= with end=True"):
        Wrapped(fn, end=True)
    with pytest.raises(TypeError, match=r"^Wrapped: expected end"):
        Wrapped(fn, hook=("0", lambda m, a, o: None), end=1)
    with pytest.raises(ValueError, match=r"^neuron: expected index within the layer's output shape"):
        tx.neuron(tx.saliency, layer="2", index=(8,))(fn, params, _x())
    assert_no_hooks(model)
