"""The faithfulness metrics of ``tx.metrics`` (issue 19) on hand-weighted models: closed forms, the papers'
definitions where Quantus 0.6.0 departs from them, vmap over an ensemble, per-example independence, errors.

A linear model ``f(x) = W x`` with the map ``a = W[y] * x`` (gradient times input, exact for a linear model) and
the baseline 0: removing a set ``S`` drops the score by exactly ``sum_S a``, so every correlation metric is 1 and
the curves are partial sums.
"""
import pytest
import torch

import torchex_fn as tx
from torchex_fn.evaluation import faithfulness as faith

m = tx.metrics
B, C, H, W = 3, 2, 4, 4
N = C * H * W


def linear(classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, N, generator=gen, dtype=torch.float64)

    def fn(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"].T
    return fn, {"w": weight}


def data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, H, W, generator=gen, dtype=torch.float64) + 0.1


def setup():
    fn, params = linear()
    x = data()
    y = torch.tensor([0, 1, 2])
    a = (params["w"][y] * x.reshape(B, -1)).view(B, C, H, W)
    return fn, params, x, y, a


def test_pixel_flipping_is_the_partial_sums_of_the_sorted_map():
    fn, params, x, y, a = setup()
    out = m.pixel_flipping(fn, params, x, a, y, features_in_step=4, perturb_baseline=0.0)
    score = fn(params, x).gather(1, y[:, None])
    ordered = a.reshape(B, -1).sort(dim=1, descending=True).values
    expected = score - ordered.view(B, -1, 4).sum(2).cumsum(1)  # the score after each group is removed
    torch.testing.assert_close(out.curve, expected)
    torch.testing.assert_close(out.auc, torch.trapezoid(expected, dim=1))
    # black: the removed features become the example's minimum
    black = m.pixel_flipping(fn, params, x, a, y, features_in_step=4)
    order = a.reshape(B, -1).argsort(dim=1, descending=True)
    weights = params["w"][y].gather(1, order).view(B, -1, 4).sum(2).cumsum(1)
    floor = x.reshape(B, -1).amin(1, keepdim=True)
    torch.testing.assert_close(black.curve, expected + floor * weights)


def test_correlation_metrics_are_one_on_a_linear_model():
    fn, params, x, y, a = setup()
    gen = torch.Generator().manual_seed(0)
    one = torch.ones(B, dtype=torch.float64)
    torch.testing.assert_close(m.faithfulness_estimate(fn, params, x, a, y, features_in_step=4,
                                                       perturb_baseline=0.0), one)
    torch.testing.assert_close(m.faithfulness_correlation(fn, params, x, a, y, nr_runs=20, subset_size=7,
                                                          perturb_baseline=0.0, generator=gen), one)
    sens = m.sensitivity_n(fn, params, x, a, y, features_in_step=5, nr_samples=12, perturb_baseline=0.0,
                           generator=gen)
    assert sens.n.tolist() == [5, 10, 15, 20, 25]  # up to 0.8 * 32
    torch.testing.assert_close(sens.correlation, torch.ones(B, 5, dtype=torch.float64))


def test_monotonicity_correlation_by_hand():
    """Effect of group k: ((a_k)^2 / f(x)^2) with a single draw of a deterministic baseline 0, ranks by Spearman."""
    fn, params, x, y, a = setup()
    out = m.monotonicity_correlation(fn, params, x, a, y, features_in_step=8, perturb_baseline=0.0, abs=False)
    score = fn(params, x).gather(1, y[:, None])
    ordered = a.reshape(B, -1).sort(dim=1).values.view(B, -1, 8).sum(2)  # ascending groups
    effect = ordered ** 2 / score ** 2
    ranks = lambda v: v.argsort(1).argsort(1).double()  # noqa: E731 - no ties here
    torch.testing.assert_close(out, faith._pearson(ranks(ordered), ranks(effect)))


def test_monotonicity_follows_the_paper():
    """Put features back into the black image, least relevant first: True iff every group adds a non-negative
    ``sum w_i (x_i - floor)``. Quantus's version never changes its image (it writes the baseline again) and says
    True for every map; with a map that disagrees with the model, this says False."""
    fn, params, x, y, a = setup()
    floor = x.reshape(B, -1).amin(1, keepdim=True)
    gain = params["w"][y] * (x.reshape(B, -1) - floor)  # what restoring each feature adds
    order = a.abs().reshape(B, -1).argsort(dim=1, stable=True)
    hand = (gain.gather(1, order).view(B, -1, 4).sum(2) >= 0).all(1)
    assert torch.equal(m.monotonicity(fn, params, x, a, y, features_in_step=4), hand)
    good = gain.abs().view(B, C, H, W)  # a map of only positive contributions: a positive model
    positive = {"w": params["w"].abs()}
    assert m.monotonicity(fn, positive, x, good, y, features_in_step=4).all()
    assert not hand.all()


def test_region_perturbation_and_selectivity_by_hand():
    fn, params, x, y, a = setup()
    per_pixel = a.sum(1)  # [B, 4, 4]
    patches = per_pixel.view(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, 4, 4).sum(2)  # 2 x 2 patches
    order = patches.argsort(dim=1, descending=True)
    score = fn(params, x).gather(1, y[:, None])
    contribution = (params["w"][y].view(B, C, H, W) * x).sum(1).view(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4)
    drop = contribution.reshape(B, 4, 4).sum(2).gather(1, order).cumsum(1)  # baseline 0
    out = m.region_perturbation(fn, params, x, a, y, patch_size=2, perturb_baseline=0.0)
    torch.testing.assert_close(out.curve, drop)
    sel = m.selectivity(fn, params, x, a, y, patch_size=2, perturb_baseline=0.0)
    torch.testing.assert_close(sel.curve, score - drop)
    lerf = m.region_perturbation(fn, params, x, a, y, patch_size=2, order="lerf", regions_evaluation=2,
                                 perturb_baseline=0.0)
    torch.testing.assert_close(lerf.curve, contribution.reshape(B, 4, 4).sum(2).gather(
        1, patches.argsort(1))[:, :2].cumsum(1))


def test_irof_by_hand_on_three_channels():
    """Segments = the four 2 x 2 quadrants; removing segment k replaces it by the image's mean; the curve is
    f(x_k) / f(x) and the score K - trapezoid(curve)."""
    fn, params, x, y, a = setup()
    out = m.irof(fn, params, x, a, y, patch_size=2)
    segments = torch.arange(4).view(2, 2).repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(m.irof(fn, params, x, a, y, segments=segments * 7 + 3), out)  # ids are free
    mean = x.reshape(B, -1).mean(1)
    for b in range(B):
        relevance = torch.stack([a[b][:, segments == k].mean() for k in range(4)])
        image, curve = x[b].clone(), []
        for k in relevance.argsort(descending=True):
            image[:, segments == k] = mean[b]
            curve.append(fn(params, image[None])[0, y[b]] / fn(params, x[b:b + 1])[0, y[b]])
        torch.testing.assert_close(out[b], 4 - torch.trapezoid(torch.stack(curve)))


def test_irof_segments_of_different_counts_per_example():
    fn, params, x, y, a = setup()
    segments = torch.zeros(B, H, W, dtype=torch.long)
    segments[0, :, 2:] = 1  # two segments in example 0, one in the others
    out = m.irof(fn, params, x, a, y, segments=segments)
    alone = m.irof(fn, params, x[1:2], a[1:2], y[1:2], segments=segments[1:2])
    torch.testing.assert_close(out[1:2], alone)
    torch.testing.assert_close(out[1], torch.ones((), dtype=torch.float64))  # K = 1, one point: no area


def test_road_imputation_solves_the_neighbour_system():
    """Each removed pixel equals the weighted mean (1/6 side, 1/12 corner) of its in-image neighbours."""
    gen = torch.Generator().manual_seed(3)
    plane = torch.rand(1, 1, 5, 5, generator=gen, dtype=torch.float64)
    removed = torch.rand(1, 1, 5, 5, generator=gen) < 0.5
    imputed = faith._impute(plane, removed, tol=1e-12)
    kernel = torch.tensor(faith._IMPUTE_KERNEL, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            if not removed[0, 0, i, j]:
                assert imputed[0, 0, i, j] == plane[0, 0, i, j]
                continue
            total, weight = 0.0, 0.0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    r, c = i + di, j + dj
                    if 0 <= r < 5 and 0 <= c < 5:
                        total += kernel[di + 1, dj + 1] * imputed[0, 0, r, c]
                        weight += kernel[di + 1, dj + 1]
            torch.testing.assert_close(imputed[0, 0, i, j], total / weight, rtol=1e-8, atol=1e-8)


def test_road_by_hand_without_noise():
    fn, params, x, y, a = setup()
    out = m.road(fn, params, x, a, y, percentages=[0, 25, 50], noise=0.0)
    torch.testing.assert_close(out.percentages, torch.tensor([0.0, 25.0, 50.0], dtype=torch.float64))
    order = a.reshape(B, -1).argsort(dim=1, descending=True, stable=True)
    for p_ix, k in enumerate([0, 8, 16]):
        removed = torch.zeros(B, N, dtype=torch.bool).scatter_(1, order[:, :k], True).view(B, C, H, W)
        imputed = faith._impute(x.reshape(-1, 1, H, W), removed.reshape(-1, 1, H, W)).view(B, C, H, W)
        hand = (fn(params, imputed).argmax(1) == y).double()
        torch.testing.assert_close(out.correct[:, p_ix], hand)
    torch.testing.assert_close(out.accuracy, out.correct.mean(0))


def test_sufficiency_by_hand():
    """Distances between the |normalised| maps, divided by the largest; close at <= threshold; the share of the
    close others with the same predicted class."""
    fn, params, x, y, a = setup()
    maps = a.reshape(B, -1)
    maps = (maps / maps.abs().amax(1, keepdim=True)).abs()
    d = torch.cdist(maps, maps)
    d = d / d.max()
    classes = fn(params, x).argmax(1)
    for threshold in (0.3, 0.8, 1.0):
        close = (d <= threshold) & ~torch.eye(B, dtype=torch.bool)
        same = classes[None] == classes[:, None]
        hand = (close & same).sum(1).double() / close.sum(1).clamp(min=1)
        ours = m.sufficiency(fn, params, x, a, threshold=threshold, distance_func="euclidean")
        torch.testing.assert_close(ours, hand)


def test_vmap_over_an_ensemble_equals_a_loop():
    fn, params, x, y, a = setup()
    ensemble = {"w": torch.stack([params["w"], params["w"] * 2 - 0.3, params["w"].flip(0)])}
    for metric, options in ((m.pixel_flipping, {"features_in_step": 8}),
                            (m.faithfulness_estimate, {"features_in_step": 4}),
                            (m.region_perturbation, {"patch_size": 2})):
        def one(p, metric=metric, options=options):
            result = metric(fn, p, x, a, None, **options)
            return result.auc if isinstance(result, faith.FaithfulnessCurve) else result
        batched = torch.func.vmap(one)(ensemble)
        looped = torch.stack([one({"w": w}) for w in ensemble["w"]])
        torch.testing.assert_close(batched, looped)


def test_one_example_does_not_depend_on_the_others():
    fn, params, x, y, a = setup()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for metric, options in ((m.pixel_flipping, {"features_in_step": 4}), (m.selectivity, {"patch_size": 2}),
                            (m.faithfulness_estimate, {"features_in_step": 4}),
                            (m.monotonicity, {"features_in_step": 4}), (m.irof, {"patch_size": 2}),
                            (m.region_perturbation, {"patch_size": 2}),
                            (m.monotonicity_correlation, {"features_in_step": 8, "perturb_baseline": "mean"})):
        whole = metric(fn, params, x, a * torch.tensor([1.0, 1e3, 1e-3]).view(B, 1, 1, 1), y, **options)
        alone = metric(fn, params, x[1:2], a[1:2], y[1:2], **options)
        first = whole[0] if isinstance(whole, tuple) else whole
        second = alone[0] if isinstance(alone, tuple) else alone
        torch.testing.assert_close(first[1:2], second)
    for batch_size in (1, 4, 100):  # chunking does not change values
        out = m.faithfulness_correlation(fn, params, x, a, y, nr_runs=6, subset_size=5, generator=gen(),
                                         batch_size=batch_size)
        torch.testing.assert_close(out, m.faithfulness_correlation(fn, params, x, a, y, nr_runs=6, subset_size=5,
                                                                   generator=gen()))


def test_uniform_baseline_draws_from_the_generator():
    fn, params, x, y, a = setup()
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    one = m.monotonicity_correlation(fn, params, x, a, y, features_in_step=8, nr_samples=3, generator=gen())
    two = m.monotonicity_correlation(fn, params, x, a, y, features_in_step=8, nr_samples=3, generator=gen())
    torch.testing.assert_close(one, two)
    curve = m.pixel_flipping(fn, params, x, a, y, features_in_step=32, perturb_baseline="uniform", generator=gen())
    drawn = torch.rand(B, 1, C, H, W, generator=gen(), dtype=torch.float64)[:, 0]
    torch.testing.assert_close(curve.curve[:, 0], fn(params, drawn).gather(1, y[:, None]).squeeze(1))


@pytest.mark.parametrize("call, error", [
    (lambda f, p, x, a: m.pixel_flipping(f, p, x, a[:, :, :2]), ValueError),
    (lambda f, p, x, a: m.pixel_flipping(f, p, x, a, features_in_step=0), ValueError),
    (lambda f, p, x, a: m.pixel_flipping(f, p, x, a, perturb_baseline="grey"), ValueError),
    (lambda f, p, x, a: m.pixel_flipping(f, p, x, a, perturb_baseline=[0.0]), TypeError),
    (lambda f, p, x, a: m.region_perturbation(f, p, x, a, order="best"), ValueError),
    (lambda f, p, x, a: m.region_perturbation(f, p, x, a, patch_size=5), ValueError),
    (lambda f, p, x, a: m.faithfulness_correlation(f, p, x, a, subset_size=33), ValueError),
    (lambda f, p, x, a: m.sensitivity_n(f, p, x, a, n_max_percentage=1.5), ValueError),
    (lambda f, p, x, a: m.irof(f, p, x, a, segments=torch.zeros(3, 3, dtype=torch.long)), ValueError),
    (lambda f, p, x, a: m.irof(f, p, x, a, segments=torch.zeros(4, 4)), TypeError),
    (lambda f, p, x, a: m.road(f, p, x, a, percentages=[100]), ValueError),
    (lambda f, p, x, a: m.sufficiency(f, p, x, a, distance_func="chebyshev"), ValueError),
    (lambda f, p, x, a: m.sufficiency(f, p, x[:1], a[:1]), ValueError),
])
def test_bad_arguments_are_refused_with_the_function_named(call, error):
    fn, params, x, y, a = setup()
    with pytest.raises(error) as info:
        call(fn, params, x, a)
    assert info.value.args[0].split(":")[0] in ("pixel_flipping", "region_perturbation", "faithfulness_correlation",
                                                "sensitivity_n", "irof", "road", "sufficiency")
