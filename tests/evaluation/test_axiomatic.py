"""tx.metrics completeness and non_sensitivity: closed forms on hand-weighted linear models, Quantus 0.6.0
parity (tests/references/quantus), and the Quantus behaviours they do not follow, by hand."""
import pathlib

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics

WEIGHTS = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)


def linear(params, x):
    """Two classes: class 0 scores x @ WEIGHTS, class 1 scores -x.sum()."""
    flat = x.reshape(x.shape[0], -1)
    return torch.stack([flat @ params["w"], -flat.sum(1)], dim=1)


PARAMS = {"w": WEIGHTS}


def test_completeness_of_an_exact_map():
    x = torch.tensor([[1.0, 3.0, -2.0, 5.0], [0.5, 1.0, 4.0, 2.0]], dtype=torch.float64)
    exact = x * WEIGHTS                                         # input x gradient of a linear score, baseline 0
    result = metrics.completeness(linear, PARAMS, x, exact, 0, baseline=0.0)
    assert result.holds.all()
    torch.testing.assert_close(result.gap, torch.zeros(2, dtype=torch.float64))
    doubled = metrics.completeness(linear, PARAMS, x, 2 * exact, 0, baseline=0.0)
    torch.testing.assert_close(doubled.gap, x @ WEIGHTS)        # sum(2 a) - f(x) = f(x)
    assert not doubled.holds.any()
    # the tolerance: |gap| = |f(x)| passes with rtol = 1 and fails with rtol = 0.9
    assert metrics.completeness(linear, PARAMS, x, 2 * exact, 0, baseline=0.0, rtol=1.0, atol=0.0).holds.all()
    assert not metrics.completeness(linear, PARAMS, x, 2 * exact, 0, baseline=0.0, rtol=0.9, atol=0.0).holds.any()
    # "black": each example's minimum; the exact map is then (x - min) * w
    low = x.min(dim=1, keepdim=True).values
    black = metrics.completeness(linear, PARAMS, x, (x - low) * WEIGHTS, 0)
    assert black.holds.all() and black.gap.abs().max() < 1e-12
    # output_func acts on the score difference: doubling it doubles what the map must sum to
    twice = metrics.completeness(linear, PARAMS, x, 2 * exact, 0, baseline=0.0, output_func=lambda d: 2 * d)
    assert twice.holds.all()


def test_completeness_is_not_a_float_equality():
    # f(x) = 0.3 x_0 at x = (1, 0): f(x) - f(0) = 0.3; the map (0.1, 0.2) is complete, but in floating point
    # 0.1 + 0.2 != 0.3, so Quantus's `a.sum() == f(x) - f(x')` calls it incomplete.
    def model(params, x):
        return (0.3 * x[:, :1]).to(torch.float64)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    assert a.sum().item() != 0.3                                  # Quantus's rule, by hand: False
    result = metrics.completeness(model, {}, x, a, 0, baseline=0.0)
    assert result.holds.tolist() == [True] and 0 < result.gap.abs().item() < 1e-15


def test_completeness_normalising_by_the_maximum_breaks_the_sum():
    # Quantus's default normalise=True divides the map by its largest magnitude: the sum is no longer f(x) - f(x').
    x = torch.tensor([[1.0, 3.0, -2.0, 5.0]], dtype=torch.float64)
    exact = x * WEIGHTS                                         # (2, 3, 0, 0): max 3
    normalised = metrics.completeness(linear, PARAMS, x, exact, 0, baseline=0.0, normalise=True)
    torch.testing.assert_close(normalised.gap, torch.tensor([5 / 3 - 5], dtype=torch.float64))
    assert not normalised.holds.any()


def test_completeness_gap_gradcheck():
    x = torch.tensor([[1.0, 3.0, -2.0, 5.0]], dtype=torch.float64)
    a = torch.rand(1, 4, dtype=torch.float64, requires_grad=True)
    w = WEIGHTS.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, w: metrics.completeness(linear, {"w": w}, x, a, 0, baseline=0.0).gap, (a, w))


def test_non_sensitivity_closed_forms():
    x = torch.ones(1, 4, dtype=torch.float64)                   # removing feature 0 moves the score by 2, 1 by 1,
    consistent = torch.tensor([[2.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # 2 and 3 by nothing
    wrong = torch.tensor([[2.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    ns = metrics.non_sensitivity
    assert ns(linear, PARAMS, x, consistent, 0, baseline=0.0).tolist() == [0]
    assert ns(linear, PARAMS, x, wrong, 0, baseline=0.0).tolist() == [2]      # 1: unattributed, moves; 3: inert
    # groups {0, 1} (moves, attributed) and {2, 3} (inert, attributed: 1 > eps)
    assert ns(linear, PARAMS, x, wrong, 0, baseline=0.0, features_in_step=2).tolist() == [1]
    # groups {0, 1, 2} and {3}: the short last group is inert and attributed
    assert ns(linear, PARAMS, x, wrong, 0, baseline=0.0, features_in_step=3).tolist() == [1]
    # class 1 (-sum) moves for every feature: the two zeros of `consistent` are wrong there
    assert ns(linear, PARAMS, x, consistent, 1, baseline=0.0).tolist() == [2]
    # batch_size only groups the work
    xs = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (xs > 0.5)
    assert torch.equal(ns(linear, PARAMS, xs, maps, 0, batch_size=3), ns(linear, PARAMS, xs, maps, 0, batch_size=64))


REFERENCE = torch.load(pathlib.Path(__file__).resolve().parents[1] / "references" / "quantus" / "reference.pt",
                       weights_only=True)


def reference_model():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()
    net.load_state_dict(REFERENCE["state_dict"])
    return tx.functionalize(net)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_non_sensitivity_equals_quantus_per_example(method):
    fn, params = reference_model()
    x, y, a = REFERENCE["x"], REFERENCE["y"], REFERENCE["maps"][method]
    ours = metrics.non_sensitivity(fn, params, x, a, y, batch_size=1024)
    assert torch.equal(ours.double(), REFERENCE["per_example"][(method, "non_sensitivity")])
    white = metrics.non_sensitivity(fn, params, x, a, y, baseline="white", eps=1e-3, batch_size=1024)
    assert torch.equal(white.double(), REFERENCE["per_example"][(method, "non_sensitivity_white")])
    if method == "integrated_gradients":
        # Quantus on the batch of 8 normalises by the batch's maximum: other counts; ours does not move
        per_batch = REFERENCE["per_batch"][(method, "non_sensitivity_white")]
        assert (per_batch != white.double()).sum() >= 4
        alone = metrics.non_sensitivity(fn, params, x[:1], a[:1], y[:1], baseline="white", eps=1e-3,
                                        batch_size=1024)
        assert alone.item() == white[0].item()


def test_quantus_non_sensitivity_raises_for_groups():
    assert REFERENCE["bugs"]["non_sensitivity_features_in_step_raises"].startswith("ValueError")


def test_bad_arguments():
    x = torch.ones(2, 4, dtype=torch.float64)
    a = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="completeness: expected baseline, one of"):
        metrics.completeness(linear, PARAMS, x, a, 0, baseline="grey")
    with pytest.raises(ValueError, match="completeness: expected rtol, a number >= 0"):
        metrics.completeness(linear, PARAMS, x, a, 0, rtol=-1.0)
    with pytest.raises(ValueError, match="completeness: expected attribution with batch 2"):
        metrics.completeness(linear, PARAMS, x, a[:1], 0)
    with pytest.raises(TypeError, match="completeness: expected output_func"):
        metrics.completeness(linear, PARAMS, x, a, 0, output_func=3)
    with pytest.raises(ValueError, match="non_sensitivity: expected attribution broadcastable"):
        metrics.non_sensitivity(linear, PARAMS, x, torch.ones(2, 3, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="non_sensitivity: expected features_in_step >= 1"):
        metrics.non_sensitivity(linear, PARAMS, x, a, 0, features_in_step=0)
    with pytest.raises(ValueError, match="non_sensitivity: expected eps, a number >= 0"):
        metrics.non_sensitivity(linear, PARAMS, x, a, 0, eps=-1)
