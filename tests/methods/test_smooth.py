"""smooth: SmoothGrad / SmoothGrad-squared / VarGrad as a transform of any method."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.methods.gradient import smooth
from torchex_fn.methods.path import integrated_gradients
from support.models import smooth_double


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def _linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    return tx.functionalize(model)


def _noise_loop(method, fn, params, x, target, samples, stdev, seed, spread=True, **options):
    """The maps of ``method`` on x + noise, drawing one [*input] noise tensor per sample (shared by the batch)."""
    gen = _gen(seed)
    sigma = stdev * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *(1,) * (x.ndim - 1)) if spread else stdev
    return torch.stack([method(fn, params, x + sigma * torch.randn(x.shape[1:], generator=gen, dtype=x.dtype),
                               target, **options) for _ in range(samples)])


def test_linear_model_smoothgrad_equals_saliency_and_vargrad_is_zero():
    fn, params = _linear()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 4])
    plain = tx.saliency(fn, params, x, target)
    torch.testing.assert_close(smooth(tx.saliency, samples=8, generator=_gen())(fn, params, x, target), plain)
    var = smooth(tx.saliency, samples=8, kind="vargrad", generator=_gen())(fn, params, x, target)
    assert torch.equal(var, torch.zeros_like(plain))
    sq = smooth(tx.saliency, samples=8, kind="smoothgrad_sq", generator=_gen())(fn, params, x, target)
    torch.testing.assert_close(sq, plain.square())


@pytest.mark.parametrize("spread", [True, False])
def test_smoothgrad_sq_and_vargrad_equal_an_explicit_loop(spread):
    _, fn, params = smooth_double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([1, 3])
    maps = _noise_loop(tx.saliency, fn, params, x, target, 6, 0.2, seed=5, spread=spread)
    for kind, expected in [("smoothgrad", maps.mean(0)), ("smoothgrad_sq", maps.square().mean(0)),
                           ("vargrad", maps.var(0, unbiased=False))]:
        got = smooth(tx.saliency, samples=6, stdev=0.2, kind=kind, stdev_spread=spread,
                     generator=_gen(5))(fn, params, x, target)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_input_x_gradient_equals_loop_and_options_pass_through():
    _, fn, params = smooth_double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    expected = _noise_loop(tx.input_x_gradient, fn, params, x, target, 5, 0.15, seed=1).mean(0)
    got = smooth(tx.input_x_gradient, samples=5, generator=_gen(1), batch_size=9)(fn, params, x, target)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    ig = _noise_loop(integrated_gradients, fn, params, x, target, 3, 0.1, seed=2, baseline=0.2, steps=4).mean(0)
    got = smooth(integrated_gradients, samples=3, stdev=0.1, generator=_gen(2))(fn, params, x, target,
                                                                                 baseline=0.2, steps=4)
    torch.testing.assert_close(got, ig, rtol=1e-9, atol=1e-12)


def test_deterministic_with_seeded_generator_and_none_target_is_clean_prediction():
    _, fn, params = smooth_double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    first = smooth(tx.saliency, samples=4, generator=_gen(9))(fn, params, x)
    assert torch.equal(first, smooth(tx.saliency, samples=4, generator=_gen(9))(fn, params, x))
    assert not torch.equal(first, smooth(tx.saliency, samples=4, generator=_gen(10))(fn, params, x))
    predicted = fn(params, x).argmax(1)
    assert torch.equal(first, smooth(tx.saliency, samples=4, generator=_gen(9))(fn, params, x, predicted))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
def test_chunking_does_not_change_the_result(batch_size):
    _, fn, params = smooth_double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = lambda out: out[:, 1]  # noqa: E731  (a callable target sees B rows at a time)
    whole = smooth(tx.saliency, samples=5, kind="vargrad", generator=_gen())(fn, params, x, target)
    chunked = smooth(tx.saliency, samples=5, kind="vargrad", generator=_gen(), batch_size=batch_size)(
        fn, params, x, target)
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-14)


def test_grad_cam_layer_option_and_grad_through_params():
    model, fn, params = smooth_double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    smoothed = smooth(tx.grad_cam, samples=3, generator=_gen())
    out = smoothed(fn, params, x, torch.tensor([1, 2]), layer="features")
    assert out.shape == (2, 1, 8, 8) and out.dtype == x.dtype
    grads = torch.func.grad(lambda p: smooth(tx.saliency, samples=2, generator=_gen())(
        fn, p, x, torch.tensor([1, 2])).pow(2).sum())(params)
    assert grads["fc.weight"].abs().sum() > 0


def test_errors():
    _, fn, params = smooth_double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="^smooth: "):
        smooth("saliency")
    with pytest.raises(ValueError, match="^smooth: expected samples >= 1"):
        smooth(tx.saliency, samples=0)
    with pytest.raises(ValueError, match="^smooth: expected stdev >= 0"):
        smooth(tx.saliency, stdev=-0.1)
    with pytest.raises(ValueError, match="^smooth: unknown kind 'smoothgrad_sqr'"):
        smooth(tx.saliency, kind="smoothgrad_sqr")
    with pytest.raises(TypeError, match="^smooth: "):
        smooth(tx.saliency, generator=0)
    with pytest.raises(TypeError, match="^smooth: "):
        smooth(tx.saliency, stdev_spread="yes")
    with pytest.raises(ValueError, match="^smooth: "):
        smooth(tx.saliency, batch_size=0)
    with pytest.raises(TypeError, match="^smooth: "):
        smooth(tx.saliency)(fn, params, x.long())
    with pytest.raises(ValueError, match="^saliency: expected target values in"):  # the wrapped method's check
        smooth(tx.saliency)(fn, params, x, torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="^smooth: expected method to return one tensor"):
        smooth(lambda *a, **k: [tx.saliency(*a, **k)], samples=1)(fn, params, x, 0)


def test_batch_equals_one_example_at_a_time():
    _, fn, params = smooth_double()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    smoothed = lambda xi, ti: smooth(tx.saliency, samples=3, generator=_gen())(fn, params, xi, ti)  # noqa: E731
    torch.testing.assert_close(smoothed(x, target),
                               torch.cat([smoothed(x[i:i + 1], target[i:i + 1]) for i in range(3)]))
