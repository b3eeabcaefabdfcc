"""Parity of the faithfulness metrics of ``tx.metrics`` with Quantus 0.6.0 (issue 19).

The references are made by ``tests/references/quantus_faithfulness_reference.py`` (Quantus is not imported
here): the CNN with random weights, 8 images 3 x 16 x 16 of ``quantus/reference.pt``, per-channel maps of
``tx.saliency`` and ``tx.integrated_gradients``. Deterministic metrics agree to 1e-5 relative; faithfulness
correlation gets the subsets Quantus drew; infidelity gets Quantus's patch perturbations through a
``perturb_fn``. Quantus's bugs (monotonicity never puts a feature back; sensitivity-n is computed across the
batch; IROF and ROAD raise on 3-channel images) are shown against hand computations.
"""
import pathlib

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.evaluation import faithfulness as faith

REFERENCES = pathlib.Path(__file__).resolve().parents[1] / "references" / "quantus"
METHODS = ("saliency", "integrated_gradients")


@pytest.fixture(scope="module")
def ref():
    base = torch.load(REFERENCES / "reference.pt", weights_only=True)
    saved = torch.load(REFERENCES / "faithfulness.pt", weights_only=True)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()
    net.load_state_dict(base["state_dict"])
    fn, params = tx.functionalize(net)
    return {"fn": fn, "params": params, "x": base["x"], "y": base["y"], **saved}


def _close(ours, theirs, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(ours.to(torch.float64), theirs.to(torch.float64), rtol=rtol, atol=atol)


def _call(ref, metric, method, **options):
    return metric(ref["fn"], ref["params"], ref["x"], ref["maps"][method], ref["y"], **options)


@pytest.mark.parametrize("method", METHODS)
def test_pixel_flipping_curves_equal_quantus(ref, method):
    m, steps = tx.metrics, ref["steps"]
    _close(_call(ref, m.pixel_flipping, method, features_in_step=64).curve, ref["values"][(method, "pixel_flipping")])
    _close(_call(ref, m.pixel_flipping, method, features_in_step=steps).curve,
           ref["values"][(method, "pixel_flipping_step")])
    white = _call(ref, m.pixel_flipping, method, features_in_step=steps, perturb_baseline="white")
    _close(white.curve, ref["values"][(method, "pixel_flipping_white")])
    assert white.curve.shape == (8, 768 // steps)


@pytest.mark.parametrize("method", METHODS)
def test_region_perturbation_and_selectivity_equal_quantus(ref, method):
    m, v = tx.metrics, ref["values"]
    _close(_call(ref, m.region_perturbation, method, patch_size=4).curve, v[(method, "region_perturbation")])
    _close(_call(ref, m.region_perturbation, method, patch_size=4, order="lerf").curve,
           v[(method, "region_perturbation_lerf")])
    padded = _call(ref, m.region_perturbation, method, patch_size=6, regions_evaluation=5).curve
    assert padded.shape == (8, 5)  # 16 = 6 + 6 + 4: a grid of 3 x 3 patches, centred (one pixel of padding a side)
    _close(padded, v[(method, "region_perturbation_pad")])
    _close(_call(ref, m.selectivity, method, patch_size=4).curve, v[(method, "selectivity")])
    _close(_call(ref, m.selectivity, method, patch_size=6).curve, v[(method, "selectivity_pad")])


@pytest.mark.parametrize("method", METHODS)
def test_correlation_metrics_equal_quantus(ref, method):
    m, v, steps = tx.metrics, ref["values"], ref["steps"]
    _close(_call(ref, m.faithfulness_estimate, method, features_in_step=64), v[(method, "faithfulness_estimate")])
    _close(_call(ref, m.faithfulness_estimate, method, features_in_step=steps, abs=True),
           v[(method, "faithfulness_estimate_step")])
    _close(_call(ref, m.monotonicity_correlation, method, features_in_step=steps, nr_samples=2,
                 perturb_baseline="black"), v[(method, "monotonicity_correlation")])


@pytest.mark.parametrize("method", METHODS)
def test_faithfulness_correlation_equals_quantus_on_its_subsets(ref, method):
    x, a = ref["x"], ref["maps"][method]
    subsets = ref["extra"][(method, "faithfulness_correlation_subsets")]  # [8, 30, 64], drawn by Quantus
    s = faith._setup("faithfulness_correlation", ref["fn"], ref["params"], x, a, ref["y"], abs=False,
                     normalise=True, batch_size=64)
    drop, relevance = faith._subset_scores(ref["fn"], ref["params"], x, s, subsets, "black", None, 64)
    _close(faith._pearson(relevance, drop), ref["values"][(method, "faithfulness_correlation")])
    # the public function draws its own subsets: same distribution, so close on average (30 runs each)
    ours = tx.metrics.faithfulness_correlation(ref["fn"], ref["params"], x, a, ref["y"], nr_runs=30, subset_size=64,
                                               generator=torch.Generator().manual_seed(0))
    assert ours.shape == (8,) and (ours - ref["values"][(method, "faithfulness_correlation")]).mean().abs() < 0.15


@pytest.mark.parametrize("method", METHODS)
def test_monotonicity_follows_the_paper_quantus_never_puts_features_back(ref, method):
    v = ref["values"]
    quantus_default = v[(method, "monotonicity_quantus")]
    assert quantus_default.bool().all()  # Quantus: True for every map (its curve never moves)
    ours = _call(ref, tx.metrics.monotonicity, method, features_in_step=ref["steps"])
    assert torch.equal(ours, v[(method, "monotonicity_restored")].bool())  # Quantus with a perturb_func that restores
    # by hand: restore x's features into the black image, least relevant (|a|) first, and check the scores rise
    x, fn, params, y = ref["x"], ref["fn"], ref["params"], ref["y"]
    order = ref["maps"][method].abs().reshape(8, -1).argsort(dim=1, stable=True)
    image = x.reshape(8, -1).amin(1, keepdim=True).expand(8, 768).clone()
    scores = []
    for step in range(768 // ref["steps"]):
        chosen = order[:, step * ref["steps"]:(step + 1) * ref["steps"]]
        image.scatter_(1, chosen, x.reshape(8, -1).gather(1, chosen))
        scores.append(fn(params, image.view(8, 3, 16, 16)).gather(1, y[:, None]).squeeze(1))
    hand = (torch.stack(scores, 1).diff(dim=1) >= 0).all(1)
    assert torch.equal(ours, hand) and not hand.all()


@pytest.mark.parametrize("method", METHODS)
def test_infidelity_equals_quantus_with_its_patches(ref, method):
    """Quantus's Infidelity blacks out the patches one more at a time (raster order) and averages
    ``(f(x) - f(x') - sum(a * (x - x')))^2``: tx.metrics.infidelity with that perturb_fn gives its values."""
    x, a = ref["x"], ref["maps"][method]
    for patch, key in ((4, "infidelity"), (8, "infidelity_patch8")):
        count = [0]
        per_side = 16 // patch

        def blackout(inputs, generator, patch=patch, per_side=per_side, count=count):
            k = count[0] % (per_side * per_side)
            count[0] += 1
            mask = torch.zeros(16, 16, dtype=torch.bool)
            for j in range(k + 1):
                r, c = divmod(j, per_side)
                mask[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
            floor = inputs.reshape(8, -1).amin(1).view(8, 1, 1, 1)
            perturbed = torch.where(mask, floor, inputs)
            return inputs - perturbed, perturbed
        ours = tx.metrics.infidelity(ref["fn"], ref["params"], x, a, ref["y"], perturb_fn=blackout,
                                     n_perturb_samples=per_side * per_side)
        _close(ours, ref["values"][(method, key)], rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sufficiency_equals_quantus(ref, method):
    """Quantus divides the maps by the batch's maximum, which the standardised distance ignores: ours with
    ``normalise=False`` (a per-example division would change the distances)."""
    v = ref["values"]
    _close(_call(ref, tx.metrics.sufficiency, method, normalise=False), v[(method, "sufficiency")])
    _close(_call(ref, tx.metrics.sufficiency, method, threshold=0.95, normalise=False),
           v[(method, "sufficiency_095")])


@pytest.mark.parametrize("method", METHODS)
def test_sensitivity_n_quantus_correlates_across_the_batch(ref, method):
    """Quantus: remove the ranked features cumulatively, 16 at a time, and correlate, for each n, the 8
    examples' score drops with the relevance of *the last group only*: one value per n, none per example."""
    x, a, fn, params, y = ref["x"], ref["maps"][method], ref["fn"], ref["params"], ref["y"]
    steps = ref["steps"]
    curve = tx.metrics.pixel_flipping(fn, params, x, a, y, features_in_step=steps).curve  # [8, 48]
    drops = fn(params, x).gather(1, y[:, None]) - curve
    ordered = a.reshape(8, -1).sort(dim=1, descending=True, stable=True).values
    groups = ordered.view(8, -1, steps).sum(2)  # [8, 48]
    n_max = int(0.8 * 256 // steps)
    hand = faith._pearson(drops[:, :n_max].T, groups[:, :n_max].T)  # across the examples
    quantus = ref["values"][(method, "sensitivity_n_quantus")]
    assert quantus.shape == (n_max,)
    _close(hand, quantus, rtol=1e-4, atol=1e-5)
    # ours follows the paper: per example and n, over random subsets
    ours = tx.metrics.sensitivity_n(fn, params, x, a, y, features_in_step=64, nr_samples=8,
                                    generator=torch.Generator().manual_seed(0))
    assert ours.correlation.shape == (8, 9) and ours.n.tolist() == list(range(64, 640, 64))


def test_irof_and_road_raise_in_quantus_on_three_channels_and_work_here(ref):
    assert ref["bugs"]["irof_3_channels"] and ref["bugs"]["road_3_channels"]
    a = ref["maps"]["saliency"]
    assert tx.metrics.irof(ref["fn"], ref["params"], ref["x"], a, ref["y"], patch_size=4).isfinite().all()
    out = tx.metrics.road(ref["fn"], ref["params"], ref["x"], a, ref["y"], percentages=[10, 90],
                          generator=torch.Generator().manual_seed(0))
    assert out.correct.shape == (8, 2) and out.accuracy.shape == (2,)
