"""tx.evaluate: the table holds each metric's own numbers per method, its mean and spread; the random metrics
see the same draws for every method; rows are plain dicts; bad requests are named."""
import functools

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    fn, params = tx.functionalize(net)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    return fn, params, x, mask


def test_scores_are_the_metrics_own_and_the_table_summarises_them():
    fn, params, x, mask = setup()
    table = tx.evaluate({"grad": tx.saliency, "ixg": tx.input_x_gradient}, fn, params, x,
                        metrics=["sparseness", "deletion", "pointing_game"], mask=mask)
    y = fn(params, x).argmax(1)
    for name, method in (("grad", tx.saliency), ("ixg", tx.input_x_gradient)):
        a = method(fn, params, x, y).sum(1, keepdim=True)
        torch.testing.assert_close(table.scores[(name, "sparseness")], metrics.sparseness(a).double())
        torch.testing.assert_close(table.scores[(name, "deletion")], metrics.deletion(fn, params, x, a, y).auc.double())
        assert torch.equal(table.scores[(name, "pointing_game")],
                           metrics.pointing_game(a, mask, tolerance=0).hit.double())
    rows = table.rows()
    assert [(r["method"], r["metric"]) for r in rows][:3] == [("grad", "sparseness"), ("grad", "deletion"),
                                                              ("grad", "pointing_game")]
    s = table.scores[("ixg", "sparseness")]
    row = rows[3]
    assert row["n"] == 4 and row["better"] == "higher"
    assert row["mean"] == pytest.approx(float(s.mean()), rel=1e-12)
    assert row["std"] == pytest.approx(float(s.std()), rel=1e-12)
    assert row["sem"] == pytest.approx(float(s.std()) / 2, rel=1e-12)
    text = str(table)
    assert text.splitlines()[0].split() == ["method", "sparseness", "↑", "deletion", "↓", "pointing_game", "↑"]
    assert f"{row['mean']:.4g} ± {row['std']:.2g}" in text.splitlines()[3]


def test_random_metrics_see_the_same_draws_for_every_method_and_the_seed_repeats():
    fn, params, x, _ = setup()
    same = {"a": tx.saliency, "b": functools.partial(tx.saliency)}
    table = tx.evaluate(same, fn, params, x, metrics=["max_sensitivity", "random_logit"])
    for metric in ("max_sensitivity", "random_logit"):
        assert torch.equal(table.scores[("a", metric)], table.scores[("b", metric)])
    again = tx.evaluate(same, fn, params, x, metrics=["max_sensitivity"])
    assert torch.equal(again.scores[("a", "max_sensitivity")], table.scores[("a", "max_sensitivity")])
    other = tx.evaluate(same, fn, params, x, metrics=["max_sensitivity"], seed=1)
    assert not torch.equal(other.scores[("a", "max_sensitivity")], table.scores[("a", "max_sensitivity")])


def test_custom_metric_gets_the_case_and_a_list_of_methods_is_named_after_functions():
    fn, params, x, _ = setup()
    seen = []

    def mean_map(case):
        seen.append(case)
        return case.attribution.flatten(1).mean(1)
    table = tx.evaluate([tx.saliency, functools.partial(tx.input_x_gradient)], fn, params, x,
                        target=2, metrics={"mean": mean_map})
    assert table.methods == ("saliency", "input_x_gradient") and table.metrics == ("mean",)
    assert torch.equal(seen[0].target, torch.full((4,), 2))
    torch.testing.assert_close(table.scores[("saliency", "mean")],
                               tx.saliency(fn, params, x, 2).flatten(1).mean(1).double())


def test_default_metrics():
    fn, params, x, mask = setup()
    assert tx.evaluate([tx.saliency], fn, params, x).metrics == (
        "sparseness", "complexity", "max_sensitivity", "deletion", "insertion")
    assert tx.evaluate([tx.saliency], fn, params, x, metrics=None, mask=mask).metrics[-2:] == (
        "pointing_game", "relevance_mass_accuracy")


def test_bad_requests_are_named():
    fn, params, x, _ = setup()
    with pytest.raises(ValueError, match="evaluate.*metric.*'nope'"):
        tx.evaluate([tx.saliency], fn, params, x, metrics=["nope"])
    with pytest.raises(ValueError, match="evaluate.*mask"):
        tx.evaluate([tx.saliency], fn, params, x, metrics=["pointing_game"])
    with pytest.raises(TypeError, match="evaluate.*method"):
        tx.evaluate({"a": 3}, fn, params, x)
    with pytest.raises(ValueError, match="evaluate.*\\[B\\] scores"):
        tx.evaluate([tx.saliency], fn, params, x, metrics={"bad": lambda case: torch.zeros(2)})
