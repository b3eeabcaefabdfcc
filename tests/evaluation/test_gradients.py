"""The smooth metrics of tx.metrics are differentiable w.r.t. the model's params where their perturbations are fixed
(issue 19: "so they can be losses"): ``torch.autograd.gradcheck`` in float64 of each model-based one against two
bias tensors of a small CNN, with every draw fixed (a seeded generator made inside the scored function, or fixed
noise fed through ``perturb_func``); and of the energy pointing game (a localisation mass) w.r.t. the map.

Left out, as not smooth in params: the ones that count or rank (monotonicity, monotonicity_correlation, ROAD,
sufficiency, consistency, non_sensitivity, effective_complexity, pointing game, relevance rank accuracy,
top-k intersection); their value is piecewise constant. Covered elsewhere: complexity and sparseness
(test_complexity.py), the localisation masses (test_localisation.py), the completeness gap (test_axiomatic.py),
avg_sensitivity (test_robustness.py), AOPC comprehensiveness (test_text_metrics.py; sufficiency here), MPRT
(test_mprt_gradients.py).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics

from support.perturbations import Feed

NAMES = ("0.bias", "3.bias")  # 4 + 3 elements: gradcheck differentiates once per element


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    fn, params = tx.functionalize(net.double().eval())
    x = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 2])
    a = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = 0.05 * torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return fn, params, x, y, a, noise


def gen():
    return torch.Generator().manual_seed(5)


def cosine(u, v):
    return F.cosine_similarity(u.flatten(1), v.flatten(1), dim=1)


def blackout(x, generator):
    """infidelity's perturbation, fixed: the left half of every image set to 0."""
    perturbed = x.clone()
    perturbed[..., :2] = 0
    return x - perturbed, perturbed


# name -> (fn, params, x, y, a, noise) -> the score
CASES = {
    "deletion": lambda fn, p, x, y, a, n: metrics.deletion(fn, p, x, a, y, step=4).auc,
    "insertion": lambda fn, p, x, y, a, n: metrics.insertion(fn, p, x, a, y, step=4).auc,
    "pixel_flipping": lambda fn, p, x, y, a, n: metrics.pixel_flipping(fn, p, x, a, y, features_in_step=8).curve,
    "region_perturbation": lambda fn, p, x, y, a, n: metrics.region_perturbation(
        fn, p, x, a, y, patch_size=2, regions_evaluation=3).curve,
    "selectivity": lambda fn, p, x, y, a, n: metrics.selectivity(fn, p, x, a, y, patch_size=2).auc,
    "faithfulness_estimate": lambda fn, p, x, y, a, n: metrics.faithfulness_estimate(
        fn, p, x, a, y, features_in_step=4),
    "faithfulness_correlation": lambda fn, p, x, y, a, n: metrics.faithfulness_correlation(
        fn, p, x, a, y, nr_runs=6, subset_size=5, generator=gen()),
    "sensitivity_n": lambda fn, p, x, y, a, n: metrics.sensitivity_n(
        fn, p, x, a, y, features_in_step=8, nr_samples=4, generator=gen()).correlation,
    "irof": lambda fn, p, x, y, a, n: metrics.irof(fn, p, x, a, y, patch_size=2),
    "infidelity": lambda fn, p, x, y, a, n: metrics.infidelity(fn, p, x, a, y, perturb_fn=blackout,
                                                               n_perturb_samples=2),
    "max_sensitivity": lambda fn, p, x, y, a, n: metrics.max_sensitivity(
        tx.saliency, fn, p, x, y, nr_samples=3, perturb_func=Feed(n)),
    "local_lipschitz_estimate": lambda fn, p, x, y, a, n: metrics.local_lipschitz_estimate(
        tx.saliency, fn, p, x, y, nr_samples=3, perturb_func=Feed(n)),
    "relative_input_stability": lambda fn, p, x, y, a, n: metrics.relative_input_stability(
        tx.saliency, fn, p, x, y, nr_samples=3, perturb_func=Feed(n), return_nan_when_prediction_changes=False),
    "relative_output_stability": lambda fn, p, x, y, a, n: metrics.relative_output_stability(
        tx.saliency, fn, p, x, y, nr_samples=3, perturb_func=Feed(n), return_nan_when_prediction_changes=False),
    "relative_representation_stability": lambda fn, p, x, y, a, n: metrics.relative_representation_stability(
        tx.saliency, fn, p, x, y, layer="1", nr_samples=3, perturb_func=Feed(n),
        return_nan_when_prediction_changes=False),
    "continuity": lambda fn, p, x, y, a, n: metrics.continuity(tx.saliency, fn, p, x, y, nr_steps=3),
    "random_logit": lambda fn, p, x, y, a, n: metrics.random_logit(
        tx.saliency, fn, p, x, y, similarity_func=cosine, generator=gen()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_wrt_params(name):
    fn, params, x, y, a, noise = setup()
    score = CASES[name]

    def scored(*tensors):
        return score(fn, {**params, **dict(zip(NAMES, tensors))}, x, y, a, noise)

    inputs = tuple(params[k].detach().clone().requires_grad_(True) for k in NAMES)
    out = scored(*inputs)
    assert out.requires_grad and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)   # a gradient that is not zero everywhere
    assert torch.autograd.gradcheck(scored, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_energy_pointing_game_wrt_the_map():
    gen_ = torch.Generator().manual_seed(6)
    a = (torch.rand(2, 1, 4, 4, generator=gen_, dtype=torch.float64) + 0.1).requires_grad_()
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, :2, :2] = True
    mask[1, :, 1:, 1:] = True
    assert torch.autograd.gradcheck(lambda t: metrics.energy_pointing_game(t, mask), (a,))


def test_gradcheck_aopc_sufficiency_wrt_params():
    # a bag of words: the logit of class 1 is the sum of its tokens' weights (comprehensiveness: test_text_metrics)
    def bag(params, ids):
        logit = params["w"][ids].sum(dim=1)
        return torch.stack([torch.zeros_like(logit), logit], dim=1)

    ids = torch.tensor([[1, 4, 2, 3, 4, 4], [2, 2, 5, 1, 3, 4]])
    w = torch.tensor([0.0, 0.7, -0.4, 0.3, 0.5, -0.2], dtype=torch.float64, requires_grad=True)
    scores = torch.rand(2, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w: metrics.aopc_sufficiency(bag, {"w": w}, ids, scores, 1, reference_token_id=0).aopc, (w,))
