"""mprt, smooth_mprt and efficient_mprt against the randomised models built by hand (randomising is a pure
operation on the params dict), the Spearman correlation with scipy's tie rule, the histogram entropy."""
import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    fn, params = tx.functionalize(net)
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    return fn, params, x


def prepared(m):
    flat = m.reshape(m.shape[0], -1)
    return (flat / flat.abs().amax(1, keepdim=True)).abs()


def test_spearman_ranks_ties_as_scipy():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 5, (4, 30), generator=gen).double()          # many ties
    b = torch.randn(4, 30, generator=gen, dtype=torch.float64).round(decimals=1)
    ours = metrics.spearman_correlation(a, b)
    theirs = torch.tensor([scipy.stats.spearmanr(a[i].numpy(), b[i].numpy())[0] for i in range(4)])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_randomised_params_is_pure_and_scaled():
    fn, params, _ = setup()
    before = {k: v.clone() for k, v in params.items()}
    out = metrics.randomised_params(params, ["3.weight"], torch.Generator().manual_seed(3))
    assert all(torch.equal(params[k], before[k]) for k in params)           # the caller's dict is untouched
    assert out["0.weight"] is params["0.weight"] and out["3.bias"] is params["3.bias"]
    expected = torch.randn(params["3.weight"].shape, generator=torch.Generator().manual_seed(3)) \
        * params["3.weight"].std()
    torch.testing.assert_close(out["3.weight"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["top_down", "bottom_up", "independent"])
def test_mprt_equals_the_cascade_built_by_hand(order):
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    ref = prepared(tx.saliency(fn, params, x, y))
    layers = {"0": ["0.weight", "0.bias"], "3": ["3.weight", "3.bias"]}
    sequence = ["3", "0"] if order == "top_down" else ["0", "3"]
    gen = torch.Generator().manual_seed(4)
    current, rows = dict(params), []
    for name in sequence:
        current = metrics.randomised_params(params if order == "independent" else current, layers[name], gen)
        rows.append(metrics.spearman_correlation(ref, prepared(tx.saliency(fn, current, x, y))))
    result = metrics.mprt(tx.saliency, fn, params, x, layer_order=order, generator=torch.Generator().manual_seed(4))
    assert result.layers == tuple(sequence)
    torch.testing.assert_close(result.similarity, torch.stack(rows), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.original, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.average, torch.stack(rows).mean(0))
    assert torch.equal(result.last, result.similarity[-1]) and (result.similarity.abs() < 0.9).all()
    skipped = metrics.mprt(tx.saliency, fn, params, x, layer_order=order, skip_layers=True,
                           generator=torch.Generator().manual_seed(4))
    assert skipped.layers == (sequence[-1],) and torch.equal(skipped.last, result.last)


def test_smooth_mprt_without_noise_is_mprt():
    # no noise: each smoothed map is the map; the root-mean-square scaling does not change the ranks. The
    # (zero) noise is still drawn first from the generator: mprt gets a generator past that draw.
    fn, params, x = setup()
    smooth = metrics.smooth_mprt(tx.saliency, fn, params, x, nr_samples=3, noise_magnitude=0.0,
                                 generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    torch.randn((3, *x.shape), generator=gen)
    plain = metrics.mprt(tx.saliency, fn, params, x, layer_order="bottom_up", generator=gen)
    torch.testing.assert_close(smooth.similarity, plain.similarity, rtol=1e-10, atol=1e-12)


def test_smooth_mprt_averages_noisy_maps():
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    gen = torch.Generator().manual_seed(6)
    flat = x.flatten(1)
    scale = (0.1 * (flat.amax(1) - flat.amin(1))).view(1, -1, 1, 1, 1)
    noisy = x[None] + scale * torch.randn((4, *x.shape), generator=gen)
    current = metrics.randomised_params(params, ["0.weight", "0.bias"], gen)

    def smoothed(p):
        m = torch.stack([tx.saliency(fn, p, n, y) for n in noisy]).mean(0).flatten(1)
        return (m / m.pow(2).mean(1, keepdim=True).sqrt()).abs()
    expected = metrics.spearman_correlation(smoothed(params), smoothed(current))
    ours = metrics.smooth_mprt(tx.saliency, fn, params, x, layers=["0"], nr_samples=4, batch_size=6,
                               generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours.similarity[0], expected, rtol=1e-6, atol=1e-8)


def test_discrete_entropy_is_numpys_histogram_and_scipys_entropy():
    a = torch.randn(3, 200, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    theirs = [scipy.stats.entropy(np.histogram(a[i].numpy(), bins=20)[0]) for i in range(3)]
    torch.testing.assert_close(metrics.discrete_entropy(a, n_bins=20), torch.tensor(theirs), rtol=1e-12, atol=1e-12)
    assert metrics.discrete_entropy(torch.ones(1, 5))[0] == 0


def test_efficient_mprt_is_the_relative_rise_of_entropy():
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    gen = torch.Generator().manual_seed(8)
    p = metrics.randomised_params(params, ["0.weight", "0.bias"], gen)
    p = metrics.randomised_params(p, ["3.weight", "3.bias"], gen)
    before = metrics.discrete_entropy(tx.saliency(fn, params, x, y))
    after = metrics.discrete_entropy(tx.saliency(fn, p, x, y))
    ours = metrics.efficient_mprt(tx.saliency, fn, params, x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours, (after - before) / before, rtol=1e-12, atol=1e-12)


def test_bad_arguments_are_named():
    fn, params, x = setup()
    with pytest.raises(ValueError, match="mprt.*layer_order"):
        metrics.mprt(tx.saliency, fn, params, x, layer_order="sideways")
    with pytest.raises(ValueError, match="mprt.*layer"):
        metrics.mprt(tx.saliency, fn, params, x, layers=["nope"])
    with pytest.raises(ValueError, match="efficient_mprt.*layer_order"):
        metrics.efficient_mprt(tx.saliency, fn, params, x, layer_order="independent")
    with pytest.raises(TypeError, match="smooth_mprt.*method"):
        metrics.smooth_mprt(None, fn, params, x)
