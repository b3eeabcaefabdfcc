"""tx.metrics localisation family: closed forms on a one-hot map, a constant map and a map equal to the
mask; an explicit reference for AUC; gradcheck and vmap of the mass metrics."""
import math

import pytest
import torch

from torchex_fn import metrics

H = W = 6
N = H * W


def square_mask(batch=1):
    m = torch.zeros(batch, 1, H, W, dtype=torch.bool)
    m[:, 0, 1:4, 2:5] = True  # 9 pixels
    return m


def one_hot(row, col, batch=1):
    a = torch.zeros(batch, 1, H, W, dtype=torch.float64)
    a[:, 0, row, col] = 2.0
    return a


def test_map_equal_to_the_mask_scores_perfectly():
    mask = square_mask(2)
    a = mask.to(torch.float64) * 0.7
    ones = torch.ones(2, dtype=torch.float64)
    for metric in (metrics.attribution_localisation, metrics.relevance_mass_accuracy,
                   metrics.relevance_rank_accuracy, metrics.auc):
        torch.testing.assert_close(metric(a, mask), ones)
    torch.testing.assert_close(metrics.top_k_intersection(a, mask, k=9), ones)
    torch.testing.assert_close(metrics.top_k_intersection(a, mask, k=12), ones * 9 / 12)
    torch.testing.assert_close(metrics.top_k_intersection(a, mask, k=9, concept_influence=True), ones * N / 9)
    torch.testing.assert_close(metrics.attribution_localisation(a, mask, weighted=True), ones * 9 / N)


def test_constant_map_scores_the_mask_share():
    mask, a = square_mask(), torch.full((1, 1, H, W), 0.3, dtype=torch.float64)
    share = torch.full((1,), 9 / N, dtype=torch.float64)
    torch.testing.assert_close(metrics.attribution_localisation(a, mask), share)
    torch.testing.assert_close(metrics.relevance_mass_accuracy(a, mask), share)
    torch.testing.assert_close(metrics.auc(a, mask), torch.full((1,), 0.5, dtype=torch.float64))
    # all tied: the ranks follow pixel order, the first 9 pixels are row 0 and three of row 1 (cols 0-2):
    # only (1, 2) is in the mask.
    torch.testing.assert_close(metrics.relevance_rank_accuracy(a, mask), torch.full((1,), 1 / 9, dtype=torch.float64))


def test_one_hot_map_inside_and_outside():
    mask = square_mask()
    inside, outside = one_hot(2, 3), one_hot(5, 0)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(metrics.attribution_localisation(inside, mask), one)
    torch.testing.assert_close(metrics.attribution_localisation(outside, mask), zero)
    torch.testing.assert_close(metrics.relevance_mass_accuracy(inside, mask), one)
    torch.testing.assert_close(metrics.top_k_intersection(inside, mask, k=1), one)
    torch.testing.assert_close(metrics.top_k_intersection(outside, mask, k=1), zero)
    # AUC: the hot pixel beats all 27 negatives, the 8 other positives tie with them: (1 + 8 / 2) / 9
    torch.testing.assert_close(metrics.auc(inside, mask), torch.full((1,), 5 / 9, dtype=torch.float64))
    # outside: the 9 positives tie with 26 negatives and lose to one: (26 / 2) / 27 per positive
    torch.testing.assert_close(metrics.auc(outside, mask), torch.full((1,), 13 / 27, dtype=torch.float64))
    assert metrics.pointing_game(inside, mask, tolerance=0).hit.tolist() == [True]
    assert metrics.pointing_game(outside, mask, tolerance=0).hit.tolist() == [False]


def test_auc_equals_the_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 1, H, W), generator=gen).to(torch.float64)  # many ties
    mask = torch.rand(4, 1, H, W, generator=gen) > 0.6
    got = metrics.auc(a, mask)
    for i in range(4):
        pos, neg = a[i][mask[i]], a[i][~mask[i]]
        diff = pos[:, None] - neg[None, :]
        expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
        assert math.isclose(got[i].item(), expected.item(), rel_tol=1e-12)


def test_rank_accuracy_equals_a_sort():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, 1, H, W, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 1, H, W, generator=gen) > 0.5
    got = metrics.relevance_rank_accuracy(a, mask, abs=True)
    for i in range(3):
        k = int(mask[i].sum())
        top = a[i].abs().flatten().argsort(descending=True)[:k]
        assert math.isclose(got[i].item(), mask[i].flatten()[top].double().mean().item(), rel_tol=1e-12)


def test_signed_maps_and_options():
    mask = square_mask()
    a = one_hot(2, 3) - one_hot(0, 0) * 0.5       # +2 inside, -1 outside
    # abs: 2 / 3 inside; signed: 2 / 1 > 1 -> nan (as Quantus); positive only: 1
    torch.testing.assert_close(metrics.attribution_localisation(a, mask), torch.full((1,), 2 / 3, dtype=torch.float64))
    assert metrics.attribution_localisation(a, mask, abs=False).isnan().all()
    torch.testing.assert_close(metrics.attribution_localisation(a, mask, abs=False, positive_attributions=True),
                               torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(metrics.relevance_mass_accuracy(a, mask), torch.full((1,), 2.0, dtype=torch.float64))


def test_empty_mask_is_nan():
    a = torch.rand(2, 1, H, W, dtype=torch.float64)
    mask = square_mask(2)
    mask[1] = False
    for metric in (metrics.attribution_localisation, metrics.relevance_mass_accuracy,
                   metrics.relevance_rank_accuracy, metrics.top_k_intersection, metrics.auc):
        values = metric(a, mask)
        assert not values[0].isnan() and values[1].isnan(), metric.__name__
    assert metrics.auc(a, torch.ones(2, H, W, dtype=torch.bool)).isnan().all()   # no negatives


def test_focus_closed_forms():
    quadrants = torch.tensor([[True, False, False, True], [False, True, True, True]])
    constant = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(metrics.focus(constant, quadrants), torch.tensor([0.5, 0.75], dtype=torch.float64))
    a = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    a[:, 0, 0, 3] = 1.0     # top right
    a[:, 0, 3, 3] = 3.0     # bottom right
    a[:, 0, 0, 0] = -5.0    # top left, negative: not counted
    torch.testing.assert_close(metrics.focus(a, quadrants), torch.tensor([0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(metrics.focus(a, quadrants, abs=True), torch.tensor([8 / 9, 4 / 9], dtype=torch.float64))


def test_large_masks_warn():
    with pytest.warns(UserWarning, match="max_size"):
        metrics.attribution_localisation(torch.rand(1, 1, H, W), square_mask(), max_size=0.1)


@pytest.mark.parametrize("name", ["attribution_localisation", "relevance_mass_accuracy", "focus"])
def test_gradcheck(name):
    gen = torch.Generator().manual_seed(4)
    a = (torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    second = square_mask(2)[:, :, :4, :4] if name != "focus" else torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]])
    assert torch.autograd.gradcheck(lambda t: getattr(metrics, name)(t, second), (a,))


@pytest.mark.parametrize("name", ["relevance_mass_accuracy", "relevance_rank_accuracy", "top_k_intersection",
                                  "auc"])
def test_vmap_over_an_ensemble_equals_a_loop(name):
    metric = getattr(metrics, name)
    maps = torch.randn(3, 2, 1, H, W, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = square_mask(2)
    torch.testing.assert_close(torch.func.vmap(lambda m: metric(m, mask))(maps),
                               torch.stack([metric(m, mask) for m in maps]))


def test_bad_arguments():
    a, mask = torch.rand(2, 1, H, W), square_mask(2)
    with pytest.raises(ValueError, match="top_k_intersection: expected k"):
        metrics.top_k_intersection(a, mask, k=0)
    with pytest.raises(TypeError, match="auc: expected attribution of a floating-point dtype"):
        metrics.auc(a.long(), mask)
    with pytest.raises(ValueError, match=r"relevance_rank_accuracy: expected attribution of shape .* with B = 2"):
        metrics.relevance_rank_accuracy(a[:1], mask)
    with pytest.raises(ValueError, match="attribution_localisation: expected max_size"):
        metrics.attribution_localisation(a, mask, max_size=2.0)
    with pytest.raises(ValueError, match=r"focus: expected quadrants of shape \[B, 4\]"):
        metrics.focus(a, torch.ones(2, 3))
    with pytest.raises(TypeError, match="relevance_mass_accuracy: expected abs"):
        metrics.relevance_mass_accuracy(a, mask, abs="yes")
