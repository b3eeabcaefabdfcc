"""``tx.concepts``: per-channel relevance and concept heatmaps equal zennit-crp 0.6.0's; reference samples.

The zennit-crp references are stored in tests/references/crp/ (tests/references/crp_reference.py made
them in a separate venv: zennit-crp 0.6.0 needs zennit <= 0.4.6, the project pins 0.5.1). The models
are rebuilt here from the same seed; the stored logits check that they are the same models.
"""
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchex_fn as tx

from support.models import torchvision_lrp_model

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCES = Path(__file__).resolve().parents[1] / "references" / "crp"


def _build(arch):
    """As tests/references/crp_reference.py builds it."""
    return torchvision_lrp_model(arch)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ["vgg11_bn", "resnet18"])
def test_equals_zennit_crp(arch):
    """Per-channel relevance (ChannelConcept().attribute, abs_norm False and True), the relevance at the
    layer, and the conditional heatmaps of single channels and of a channel group, EpsilonPlusFlat with
    zennit-crp's canonizers: <= 1e-5 of the largest value (measured <= 2e-6)."""
    ref = torch.load(REFERENCES / f"{arch}.pt")
    fn, params = tx.functionalize(_build(arch))
    x, target = ref["x"], ref["target"]
    torch.testing.assert_close(fn(params, x), ref["logits"], rtol=0, atol=0)  # the same model
    assert _rel(tx.lrp(fn, params, x, target), ref["heatmap"]) <= 1e-5
    layers = [key.split("/", 1)[1] for key in ref if key.startswith("concepts/")]
    assert len(layers) == 2
    for layer in layers:
        channels = tx.concepts.relevance(fn, params, x, target, layer=layer)
        assert channels.shape == ref[f"channels/{layer}"].shape
        assert _rel(channels, ref[f"channels/{layer}"]) <= 1e-5, layer
        normalised = tx.concepts.relevance(fn, params, x, target, layer=layer, normalize=True)
        expected = ref[f"channels/{layer}"] / (ref[f"channels/{layer}"].abs().sum(1, keepdim=True) + 1e-10)
        assert _rel(normalised, expected) <= 1e-5, layer
        assert _rel(tx.lrp(fn, params, x, target, layer=layer), ref[f"relevance/{layer}"]) <= 1e-5, layer
        concepts = ref[f"concepts/{layer}"]
        heatmaps = tx.lrp(fn, params, x, target, condition={layer: concepts})   # one group per concept
        assert heatmaps.shape == ref[f"heatmaps/{layer}"].shape
        for k in range(len(concepts)):  # each concept to its own scale (some are 100x smaller than others)
            assert _rel(heatmaps[:, k], ref[f"heatmaps/{layer}"][:, k]) <= 1e-5, (layer, concepts[k])


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 4)).double().eval()


def _data(n=23):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def test_reference_samples_by_relevance_equal_a_ranking_of_all_examples():
    """Chunks of 5 with a running top 4 == the top 4 of every example's value computed in one call."""
    fn, params = tx.functionalize(_small_cnn())
    x, y = _data()
    y[[3, 11]] = -1  # the predicted class
    predicted = fn(params, x).argmax(1)
    resolved = torch.where(y < 0, predicted, y)
    every = tx.concepts.relevance(fn, params, x, resolved, layer="3", normalize=True)      # [23, 5]
    best = tx.concepts.reference_samples(fn, params, TensorDataset(x, y), layer="3", channels=[4, 0, 2], k=4,
                                         batch_size=5)
    top = every[:, [4, 0, 2]].T.topk(4, dim=1)
    torch.testing.assert_close(best.values, top.values, rtol=1e-12, atol=0)
    assert torch.equal(best.indices, top.indices)
    assert torch.equal(best.channels, torch.tensor([4, 0, 2]))
    # a DataLoader gives the same; a tensor of inputs ranks by the predicted class; sum vs not normalised
    loader = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True)
    again = tx.concepts.reference_samples(fn, params, loader, layer="3", channels=[4, 0, 2], k=4, batch_size=7)
    assert torch.equal(again.indices, best.indices)
    raw = tx.concepts.reference_samples(fn, params, x, layer="3", k=30, batch_size=6, normalize=False)
    expected = tx.concepts.relevance(fn, params, x, predicted, layer="3").T.sort(1, descending=True)
    assert raw.values.shape == (5, 23)   # k larger than the data set: every example, ranked
    torch.testing.assert_close(raw.values, expected.values, rtol=1e-12, atol=0)


def test_reference_samples_by_activation_take_the_max_over_positions():
    fn, params = tx.functionalize(_small_cnn())
    x, y = _data()
    _, act = tx.capture(fn, params, x, "1")                                                 # [23, 6, 8, 8]
    peak = act.flatten(2).amax(2)
    for normalize in (True, False):
        values = peak / (peak.abs().sum(1, keepdim=True) + 1e-10) if normalize else peak
        top = values.T.topk(3, dim=1)
        best = tx.concepts.reference_samples(fn, params, TensorDataset(x, y), layer="1", mode="activation", k=3,
                                             batch_size=4, normalize=normalize)
        assert torch.equal(best.indices, top.indices)
        torch.testing.assert_close(best.values, top.values, rtol=1e-12, atol=0)
    summed = tx.concepts.reference_samples(fn, params, x, layer="1", mode="activation", k=3, reduce="sum",
                                           normalize=False)
    torch.testing.assert_close(summed.values, act.flatten(2).sum(2).T.topk(3, dim=1).values, rtol=1e-12, atol=0)


def test_errors():
    fn, params = tx.functionalize(_small_cnn())
    x, y = _data(4)
    with pytest.raises(ValueError, match="concepts.reference_samples: expected mode one of"):
        tx.concepts.reference_samples(fn, params, x, layer="3", mode="gradient")
    with pytest.raises(ValueError, match="reduce one of"):
        tx.concepts.reference_samples(fn, params, x, layer="3", reduce="mean")
    with pytest.raises(ValueError, match=r"channels in \[0, 5\)"):
        tx.concepts.reference_samples(fn, params, x, layer="3", channels=[5])
    with pytest.raises(TypeError, match="channels, an int"):
        tx.concepts.reference_samples(fn, params, x, layer="3", channels=[1.0])
    with pytest.raises(TypeError, match="data, a tensor"):
        tx.concepts.reference_samples(fn, params, 42, layer="3")
    with pytest.raises(TypeError, match=r"\(input, target\) pairs"):
        tx.concepts.reference_samples(fn, params, [x], layer="3")
    with pytest.raises(TypeError, match="integer class targets"):
        tx.concepts.reference_samples(fn, params, TensorDataset(x, y.double()), layer="3")
    with pytest.raises(ValueError, match="layer"):
        tx.concepts.reference_samples(fn, params, x, layer="nope")
    with pytest.raises(ValueError, match="k"):
        tx.concepts.reference_samples(fn, params, x, layer="3", k=0)
    with pytest.raises(TypeError, match="without condition"):
        tx.concepts.relevance(fn, params, x, 0, layer="3", condition={"3": 0})
