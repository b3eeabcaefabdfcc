"""The robustness metrics equal Quantus 0.6.0 when both are fed the same draws
(tests/references/quantus_robustness_reference.py: the random CNN and 8 images of quantus/reference.pt, noise
drawn once and handed to Quantus through its perturb_func, one draw per call, and to tx.metrics the same way);
where tx.metrics departs from Quantus on purpose, the test shows the difference."""
import functools
import pathlib

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics

from support.perturbations import Feed

HERE = pathlib.Path(__file__).resolve().parents[1] / "references"


def model():
    """The CNN of tests/references/quantus_reference.py (its weights come from reference.pt)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()


BASE = torch.load(HERE / "quantus" / "reference.pt", weights_only=True)
FILES = {name: HERE / "quantus" / f"robustness_{name}.pt" for name in ("saliency", "integrated_gradients")}
REFERENCE = {name: torch.load(path, weights_only=True) for name, path in FILES.items() if path.exists()}
METHODS = {"saliency": tx.saliency, "integrated_gradients": functools.partial(tx.integrated_gradients, steps=8)}

NOISE_OF = {"avg_sensitivity": "uniform", "max_sensitivity": "uniform", "local_lipschitz_estimate": "gaussian",
            "relative_input_stability": "positive", "relative_output_stability": "positive",
            "relative_representation_stability": "positive"}


def recorded(saved, method, key, kind="per_example"):
    """Quantus's record (a missing one names the script that writes it)."""
    assert (method, key) in saved[kind], f"{key} for {method}: run tests/references/quantus_robustness_reference.py"
    return saved[kind][(method, key)]


def setup(method):
    net = model()
    net.load_state_dict(BASE["state_dict"])
    fn, params = tx.functionalize(net)
    summed = METHODS[method]

    def explain(model_fn, p, x, target):
        return summed(model_fn, p, x, target).sum(1, keepdim=True)
    return fn, params, explain


def test_reference_was_made_with_quantus_0_6_0():
    assert set(REFERENCE) == set(METHODS), "run tests/references/quantus_robustness_reference.py"
    for saved in REFERENCE.values():
        assert saved["versions"]["quantus"] == "0.6.0"


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("name", list(NOISE_OF))
def test_equal_to_quantus_on_the_same_draws(method, name):
    saved = REFERENCE[method]
    fn, params, explain = setup(method)
    x, y = BASE["x"], BASE["y"]
    noise = saved["noise"][NOISE_OF[name]]
    ours = getattr(metrics, name)(explain, fn, params, x, y, nr_samples=saved["samples"], perturb_func=Feed(noise),
                                  batch_size=32)
    theirs = recorded(saved, method, name)
    assert theirs.shape == (8,) and not theirs.isnan().any() and theirs.std() > 0
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_continuity_equals_quantus_per_example_and_shows_its_two_departures(method):
    saved = REFERENCE[method]
    fn, params, explain = setup(method)
    x, y = BASE["x"], BASE["y"]
    recorded(saved, method, "continuity_white")
    ours = metrics.continuity(explain, fn, params, x, y)
    torch.testing.assert_close(ours.double(), saved["per_example"][(method, "continuity")], rtol=1e-5, atol=0)
    # 1. Quantus pads with the example's minimum whatever perturb_baseline says: its 'white' is its 'black'
    theirs_white = saved["per_example"][(method, "continuity_white")]
    assert torch.equal(theirs_white, saved["per_example"][(method, "continuity")])
    ours_white = metrics.continuity(explain, fn, params, x, y, perturb_baseline="white")
    assert ((ours_white.double() - theirs_white).abs() / theirs_white).max() > 1e-2
    # 2. on the batch of 8, Quantus divides every map by the batch's largest magnitude: values change
    per_batch = saved["per_batch"][(method, "continuity")]
    change = ((per_batch - saved["per_example"][(method, "continuity")]).abs() / per_batch).max()
    assert change > 0.05
    alone = torch.cat([metrics.continuity(explain, fn, params, x[i:i + 1], y[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(alone, ours, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_consistency_with_quantus_label_equals_quantus(method):
    saved = REFERENCE[method]
    theirs = recorded(saved, method, "consistency", "per_batch")
    fn, params, explain = setup(method)
    x, y = BASE["x"], BASE["y"]
    maps = explain(fn, params, x, y)
    first_five = metrics.consistency(fn, params, x, maps, discretise_func=lambda a: a[:, :5].sign())
    torch.testing.assert_close(first_five.double(), theirs, rtol=1e-6, atol=1e-8)
