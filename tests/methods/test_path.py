"""integrated_gradients: captum parity, completeness, chunking, targets, differentiability, errors."""
import pytest
import torch
from torch import nn
from captum.attr import IntegratedGradients

from torchex_fn.methods.path import integrated_gradients, quadrature
from support.models import smooth_double


def _setup(seed=0):
    torch.manual_seed(seed)
    model, fn, params = smooth_double(nn.Tanh)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    baseline = 0.3 * torch.randn(1, 3, 8, 8, dtype=torch.float64)
    return model, fn, params, x, baseline


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_parity_with_captum(method):
    model, fn, params, x, baseline = _setup()
    target = torch.tensor([0, 3, 1])
    ours = integrated_gradients(fn, params, x, target, baseline=baseline, steps=16, method=method)
    ref = IntegratedGradients(model).attribute(x, baseline, target=target, n_steps=16, method=method)
    # captum rounds its weights (and Riemann nodes) through float32: atol covers the near-zero entries.
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right"])
def test_quadrature_integrates_low_degree_polynomials(method):
    alphas, weights = quadrature(method, 8)
    assert all(0.0 <= a <= 1.0 for a in alphas)
    if method == "gausslegendre":  # exact up to degree 15
        assert sum(w * a ** 5 for a, w in zip(alphas, weights)) == pytest.approx(1 / 6, rel=1e-12)
    else:
        assert sum(weights) == pytest.approx(1.0 if method != "riemann_trapezoid" else 1 - 1 / 8)


def test_completeness():
    _, fn, params, x, baseline = _setup(1)
    target = torch.tensor([2, 0, 4])
    attr = integrated_gradients(fn, params, x, target, baseline=baseline, steps=64)
    pick = lambda out: out.gather(1, target[:, None]).squeeze(1)  # noqa: E731
    expected = pick(fn(params, x)) - pick(fn(params, baseline.expand_as(x)))
    torch.testing.assert_close(attr.flatten(1).sum(1), expected, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 12, 1000])
def test_batch_size_chunking_gives_same_result(batch_size):
    _, fn, params, x, baseline = _setup()
    whole = integrated_gradients(fn, params, x, None, baseline=baseline, steps=10)
    chunked = integrated_gradients(fn, params, x, None, baseline=baseline, steps=10, batch_size=batch_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_cpu_cap_on_copies_per_forward(monkeypatch):
    """On a CPU a forward holds at most _inputs.CPU_ELEMENTS input elements of path points (batch_size is a
    cap, never a demand); the layout changes the map only by summation order."""
    from torchex_fn.core import inputs as _inputs
    _, fn, params, x, baseline = _setup()
    rows = []

    def counting(p, v):
        rows.append(v.shape[0])
        return fn(p, v)
    whole = integrated_gradients(fn, params, x, 1, baseline=baseline, steps=10)
    monkeypatch.setattr(_inputs, "CPU_ELEMENTS", 2 * x.numel())          # two path points of x per forward
    capped = integrated_gradients(counting, params, x, 1, baseline=baseline, steps=10, batch_size=1000)
    assert rows == [2 * x.shape[0]] * 5
    torch.testing.assert_close(capped, whole, rtol=1e-12, atol=1e-14)
    assert _inputs.copies_per_forward(1000, 3, x) == 2 and _inputs.copies_per_forward(3, 3, x) == 1
    assert _inputs.copies_per_forward(1000, 3, x.to("meta")) == 333                 # not a CPU: no cap


def test_per_example_targets_and_callable_target():
    _, fn, params, x, baseline = _setup()
    target = torch.tensor([4, 0, 2])
    batched = integrated_gradients(fn, params, x, target, baseline=baseline, steps=8, batch_size=6)
    single = torch.cat([integrated_gradients(fn, params, x[i:i + 1], int(target[i]), baseline=baseline, steps=8)
                        for i in range(3)])
    torch.testing.assert_close(batched, single)
    by_callable = integrated_gradients(fn, params, x, lambda out: out.gather(1, target[:, None]).squeeze(1),
                                       baseline=baseline, steps=8, batch_size=6)
    torch.testing.assert_close(by_callable, batched)
    predicted = fn(params, x).argmax(1)
    torch.testing.assert_close(integrated_gradients(fn, params, x, None, baseline=baseline, steps=8),
                               integrated_gradients(fn, params, x, predicted, baseline=baseline, steps=8))


def test_gradcheck_wrt_parameter_and_func_grad():
    _, fn, params, x, baseline = _setup()
    x, target = x[:2, :, :4, :4], torch.tensor([1, 3])

    def of_weight(w):
        return integrated_gradients(fn, {**params, "fc.weight": w}, x, target, baseline=0.1, steps=3)
    w = params["fc.weight"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(of_weight, (w,))
    grads = torch.func.grad(lambda p: integrated_gradients(fn, p, x, target, steps=3).pow(2).sum())(params)
    assert grads["conv1.weight"].abs().sum() > 0


def test_vmap_over_inputs_equals_loop():
    _, fn, params, x, baseline = _setup()
    xs = torch.stack([x, x.flip(0)])
    batched = torch.func.vmap(lambda xi: integrated_gradients(fn, params, xi, 1, steps=4))(xs)
    torch.testing.assert_close(batched, torch.stack([integrated_gradients(fn, params, xi, 1, steps=4) for xi in xs]))


def test_errors():
    _, fn, params, x, _ = _setup()
    with pytest.raises(ValueError, match="^integrated_gradients: expected steps >= 1"):
        integrated_gradients(fn, params, x, steps=0)
    with pytest.raises(TypeError, match="^integrated_gradients: "):
        integrated_gradients(fn, params, x, steps=2.5)
    with pytest.raises(ValueError, match="^integrated_gradients: unknown method 'gauss'"):
        integrated_gradients(fn, params, x, method="gauss")
    with pytest.raises(ValueError, match="^integrated_gradients: "):
        integrated_gradients(fn, params, x, method="riemann_trapezoid", steps=1)
    with pytest.raises(ValueError, match="^integrated_gradients: expected baseline broadcastable"):
        integrated_gradients(fn, params, x, baseline=torch.zeros(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="^integrated_gradients: "):
        integrated_gradients(fn, params, x, baseline="zero")
    with pytest.raises(ValueError, match="^integrated_gradients: "):
        integrated_gradients(fn, params, x, batch_size=0)
    with pytest.raises(ValueError, match="^integrated_gradients: expected target values in"):
        integrated_gradients(fn, params, x, torch.tensor([0, 1, 9]))
