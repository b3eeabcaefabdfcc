"""Each documented Raises: a clear error naming the function and argument, before any forward."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.models import TinyCNN


class Counting(TinyCNN):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


@pytest.fixture
def setup():
    Counting.calls = 0
    model = Counting().eval()
    fn, params = tx.functionalize(model)
    return model, fn, params


def _layer_opts(name):
    return {"layer": "features"} if name in ("cam", "grad_cam") else {}


METHODS = {"saliency": tx.saliency, "input_x_gradient": tx.input_x_gradient, "cam": tx.cam, "grad_cam": tx.grad_cam}
GOOD = torch.randn(2, 3, 8, 8)
NAN = GOOD.clone()
NAN[1, 0, 2, 2] = float("nan")


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("x, target, error, match", [
    (GOOD.to(torch.uint8), None, TypeError, "expected x of a floating-point dtype, got a torch.uint8 tensor"),
    (NAN, None, ValueError, "expected x without NaN, got 1 NaN values"),
    (GOOD, torch.tensor([1, 2, 3]), ValueError, r"expected target of shape \[B\] = \[2\]"),
    (GOOD, torch.tensor([1.0, 2.0]), TypeError, "expected target of an integer dtype"),
    (GOOD, "dog", TypeError, "expected target: None, an int"),
    ([[1.0]], None, TypeError, "expected x, a floating-point tensor"),
])
def test_bad_inputs_fail_before_any_forward(setup, name, x, target, error, match):
    model, fn, params = setup
    with pytest.raises(error, match=f"^{name}: {match}"):
        METHODS[name](fn, params, x, target, **_layer_opts(name))
    assert Counting.calls == 0


@pytest.mark.parametrize("name", METHODS)
def test_target_out_of_range_fails_before_backward(setup, name):
    _, fn, params = setup
    with pytest.raises(ValueError, match=rf"^{name}: expected target in \[0, 5\), got int 5"):
        METHODS[name](fn, params, GOOD, 5, **_layer_opts(name))
    with pytest.raises(ValueError, match=rf"^{name}: expected target values in \[0, 5\), got \[9\]"):
        METHODS[name](fn, params, GOOD, torch.tensor([0, 9]), **_layer_opts(name))


@pytest.mark.parametrize("name", ["cam", "grad_cam"])
def test_layer_errors(setup, name):
    model, fn, params = setup
    with pytest.raises(ValueError, match=rf"^{name}: unknown layer 'featuers'. Did you mean 'features'"):
        METHODS[name](fn, params, GOOD, layer="featuers")
    with pytest.raises(ValueError, match=rf"^{name}: expected layer to be a submodule"):
        METHODS[name](fn, params, GOOD, layer=nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match=rf"^{name}: expected layer"):
        METHODS[name](fn, params, GOOD, layer=3)
    with pytest.raises(ValueError, match=rf"^{name}: expected x of rank >= 3"):
        METHODS[name](fn, params, torch.randn(2, 3), layer="features")
    assert Counting.calls == 0
    with pytest.raises(ValueError, match=rf"^{name}: expected layer 'fc' to output \[B, K, \*spatial\]"):
        METHODS[name](fn, params, GOOD, layer="fc")
    assert all(not m._forward_hooks for m in model.modules())


def test_option_errors(setup):
    _, fn, params = setup
    with pytest.raises(TypeError, match="^saliency: expected model_fn, a pure"):
        tx.saliency(TinyCNN(), params, GOOD)
    with pytest.raises(TypeError, match="^saliency: expected params, a mapping"):
        tx.saliency(fn, [1, 2], GOOD)
    with pytest.raises(TypeError, match="^saliency: expected abs, a bool"):
        tx.saliency(fn, params, GOOD, abs="yes")
    with pytest.raises(TypeError, match="^saliency: expected post_process, a callable"):
        tx.saliency(fn, params, GOOD, post_process=3)
    with pytest.raises(ValueError, match=r"^saliency: expected x of rank >= 2 .* A single example is `x\[None\]`"):
        tx.saliency(fn, params, torch.randn(3))
    with pytest.raises(TypeError, match="^cam: expected target: None, an int or \\[B\\] ints"):
        tx.cam(fn, params, GOOD, lambda o: o[:, 0], layer="features")
    with pytest.raises(ValueError, match="^cam: unknown fc parameter 'feature.weight'"):
        tx.cam(fn, params, GOOD, layer="features", fc="feature")
    with pytest.raises(ValueError, match="^cam: expected layer channels K equal to the fc weight's 6, got K = 4"):
        tx.cam(fn, params, GOOD, layer="conv1")
    with pytest.raises(TypeError, match="^grad_cam: expected relu, a bool"):
        tx.grad_cam(fn, params, GOOD, layer="features", relu=1)
