"""Derivatives of mprt, smooth_mprt and efficient_mprt w.r.t. the model's params with the randomisation fixed (a
seeded generator made inside the scored function: the same noise on every call), and vmap over an ensemble of
models equal to a loop.

Smooth: each with a smooth comparison (``similarity_func`` a cosine similarity, ``complexity_func``
``tx.metrics.complexity``); the randomised weights are ``noise * std(w)``, so the gradient also reaches the
randomised tensors through their scale. Not smooth: the defaults. Spearman's rank correlation (mprt,
smooth_mprt) and the histogram entropy (efficient_mprt) are piecewise constant in the maps, so their value has no
useful derivative; it does not require grad.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics

NAMES = ("0.bias", "3.bias")  # 4 + 3 elements; "3" is randomised first (top_down), "0" last


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()


def setup():
    fn, params = tx.functionalize(net().double())
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return fn, params, x, torch.tensor([0, 2])


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def gen():
    return torch.Generator().manual_seed(4)


SMOOTH = {
    "mprt": lambda fn, p, x, y: metrics.mprt(tx.saliency, fn, p, x, y, similarity_func=cosine,
                                             generator=gen()).similarity,
    "mprt_independent": lambda fn, p, x, y: metrics.mprt(tx.saliency, fn, p, x, y, similarity_func=cosine,
                                                         layer_order="independent", generator=gen()).similarity,
    "smooth_mprt": lambda fn, p, x, y: metrics.smooth_mprt(tx.saliency, fn, p, x, y, similarity_func=cosine,
                                                           nr_samples=2, generator=gen()).similarity,
    "efficient_mprt": lambda fn, p, x, y: metrics.efficient_mprt(tx.saliency, fn, p, x, y,
                                                                 complexity_func=metrics.complexity, generator=gen()),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_gradcheck_wrt_params_with_the_noise_fixed(name):
    fn, params, x, y = setup()

    def scored(*tensors):
        return SMOOTH[name](fn, {**params, **dict(zip(NAMES, tensors))}, x, y)

    inputs = tuple(params[k].detach().clone().requires_grad_(True) for k in NAMES)
    assert torch.autograd.gradcheck(scored, inputs, eps=1e-6, atol=1e-6)


def test_the_randomised_weights_carry_the_scale_of_the_original():
    # d(noise * std(w)) / dw = noise * d std(w) / dw, written out: std = sqrt(sum (w - mean)^2 / (n - 1))
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = metrics.randomised_params({"w": w}, ["w"], gen())["w"]
    noise = torch.randn(3, generator=gen(), dtype=torch.float64)
    std = w.detach().std()
    torch.testing.assert_close(out.detach(), noise * std, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), w)
    by_hand = noise.sum() * (w.detach() - w.detach().mean()) / (2 * std)
    torch.testing.assert_close(grad, by_hand, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["mprt", "smooth_mprt", "efficient_mprt"])
def test_the_default_comparisons_are_rank_and_histogram_based_and_carry_no_gradient(name):
    fn, params, x, y = setup()
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    function = getattr(metrics, name)
    options = {"nr_samples": 2} if name == "smooth_mprt" else {}
    out = function(tx.saliency, fn, p, x, y, generator=gen(), **options)
    value = out if name == "efficient_mprt" else out.similarity
    assert torch.isfinite(value).all() and not value.requires_grad


CALLS = {
    "mprt": lambda fn, p, x, y: metrics.mprt(tx.saliency, fn, p, x, y, generator=gen()).similarity,
    "mprt_cosine": SMOOTH["mprt"],
    "smooth_mprt": lambda fn, p, x, y: metrics.smooth_mprt(tx.saliency, fn, p, x, y, nr_samples=3,
                                                           generator=gen()).similarity,
    "efficient_mprt": lambda fn, p, x, y: metrics.efficient_mprt(tx.saliency, fn, p, x, y, generator=gen()),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_vmap_over_an_ensemble_equals_a_loop(name):
    models = [net(seed) for seed in (0, 1, 2)]
    fn, params = tx.functionalize(models[0])
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in params}
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    call = CALLS[name]
    loop = torch.stack([call(fn, {k: v[i] for k, v in stacked.items()}, x, y) for i in range(3)])
    # randomness="same": every model gets the same noise, as every call of the loop does (one seed)
    mapped = torch.func.vmap(lambda p: call(fn, p, x, y), randomness="same")(stacked)
    assert not torch.equal(loop[0], loop[1])                     # the models differ
    torch.testing.assert_close(mapped, loop, rtol=1e-5, atol=1e-6)
