"""Complexity and localisation metrics equal Quantus 0.6.0 on the values it produced
(tests/references/quantus_reference.py: a random CNN, 8 images, tx.saliency and tx.integrated_gradients), and
where tx.metrics differs on purpose, the difference is shown by a hand computation."""
import pathlib

import pytest
import torch

from torchex_fn import metrics

REFERENCE = torch.load(pathlib.Path(__file__).resolve().parents[1] / "references" / "quantus" / "reference.pt",
                       weights_only=True)
MASKS = REFERENCE["masks"]
METHODS = ["saliency", "integrated_gradients"]

OURS = {
    "complexity": lambda a: metrics.complexity(a),
    "effective_complexity": lambda a: metrics.effective_complexity(a),
    "effective_complexity_eps": lambda a: metrics.effective_complexity(a, eps=1e-2),
    "sparseness": lambda a: metrics.sparseness(a),
    "attribution_localisation": lambda a: metrics.attribution_localisation(a, MASKS),
    "attribution_localisation_positive": lambda a: metrics.attribution_localisation(
        a, MASKS, abs=False, positive_attributions=True),
    "relevance_mass_accuracy": lambda a: metrics.relevance_mass_accuracy(a, MASKS, abs=True),
    "relevance_rank_accuracy": lambda a: metrics.relevance_rank_accuracy(a, MASKS),
    "top_k_intersection": lambda a: metrics.top_k_intersection(a, MASKS, k=50),
    "top_k_intersection_influence": lambda a: metrics.top_k_intersection(a, MASKS, k=50, concept_influence=True),
    "auc": lambda a: metrics.auc(a, MASKS),
    "pointing_game": lambda a: metrics.pointing_game(a, MASKS, tolerance=0).hit,
    "focus": lambda a: metrics.focus(a, REFERENCE["quadrants"]),
}


def test_reference_was_made_with_quantus_0_6_0():
    assert REFERENCE["versions"]["quantus"] == "0.6.0"
    assert {name for _, name in REFERENCE["per_example"]} >= set(OURS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(OURS))
def test_equal_to_quantus_normalised_per_example(method, name):
    # float32 maps as the library returns them; Quantus computed in float64 on the same numbers
    ours = OURS[name](REFERENCE["maps"][method]).to(torch.float64)
    theirs = REFERENCE["per_example"][(method, name)]
    assert theirs.shape == (8,) and not theirs.isnan().any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_the_maps_discriminate():
    # not a parity of constants: the scores differ between examples and between the two methods
    for name in ("complexity", "sparseness", "auc", "relevance_rank_accuracy", "attribution_localisation"):
        a, b = (REFERENCE["per_example"][(m, name)] for m in METHODS)
        assert a.std() > 0 and not torch.allclose(a, b)


def test_quantus_normalises_over_the_batch_and_ours_per_example():
    # Quantus's default (one batch of 8) divides all maps by the batch's largest magnitude: an example's
    # effective complexity then depends on its neighbours. Ours equals Quantus run one example at a time,
    # and does not change when the example is evaluated alone.
    a = REFERENCE["maps"]["saliency"]
    per_batch = REFERENCE["per_batch"][("saliency", "effective_complexity_eps")]
    per_example = REFERENCE["per_example"][("saliency", "effective_complexity_eps")]
    assert (per_batch != per_example).any()
    ours = metrics.effective_complexity(a, eps=1e-2)
    alone = torch.cat([metrics.effective_complexity(a[i:i + 1], eps=1e-2) for i in range(8)])
    assert torch.equal(ours, alone) and torch.equal(ours.double(), per_example)
    batch_wide = (a.abs() / a.abs().max() > 1e-2).flatten(1).sum(1)            # Quantus's rule, by hand
    assert torch.equal(batch_wide.double(), per_batch)


def test_quantus_pointing_game_counts_an_empty_mask_as_a_hit():
    # Quantus stores nan in a bool array: True. An empty mask has no pixel to point at: a miss here.
    quantus = REFERENCE["bugs"]["pointing_game_empty_mask"]
    masks = MASKS.clone()
    masks[0] = False
    ours = metrics.pointing_game(REFERENCE["maps"]["saliency"], masks, tolerance=0).hit
    assert quantus[0] == 1 and not ours[0]
    torch.testing.assert_close(ours[1:].double(), quantus[1:])


def test_quantus_weighted_pointing_game_raises():
    assert REFERENCE["bugs"]["pointing_game_weighted_raises"].startswith("TypeError")


def test_quantus_weighted_attribution_localisation_depends_on_the_batch_size():
    # Quantus weighs by |mask| / x_batch[2:].size: the elements of the batch less two examples.
    bugs = REFERENCE["bugs"]
    b8, b4 = bugs["attribution_localisation_weighted_batch8"], bugs["attribution_localisation_weighted_batch4"]
    torch.testing.assert_close(b4 / b8, torch.full((8,), 3.0, dtype=torch.float64))     # (8 - 2) / (4 - 2)
    # the paper's weight, |mask| / (H * W), by hand, and ours
    a = REFERENCE["maps"]["saliency"]
    unweighted = REFERENCE["per_example"][("saliency", "attribution_localisation")]
    expected = unweighted * MASKS.flatten(1).sum(1).double() / 256
    torch.testing.assert_close(metrics.attribution_localisation(a, MASKS, weighted=True).double(), expected,
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(b8, unweighted * MASKS.flatten(1).sum(1).double() / (6 * 3 * 256), rtol=1e-5, atol=0)


def test_quantus_sparseness_writes_into_the_callers_array_and_ours_does_not():
    assert REFERENCE["bugs"]["sparseness_writes_into_the_callers_array"] == pytest.approx(1e-7)
    a = REFERENCE["maps"]["saliency"].clone()
    metrics.sparseness(a, abs=False, normalise=False)
    assert torch.equal(a, REFERENCE["maps"]["saliency"])
