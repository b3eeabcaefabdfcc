"""tx.metrics random_logit and ssim: Quantus 0.6.0 parity with the same off-target classes, skimage's SSIM
definition written out, closed forms."""
import pathlib

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics

REFERENCE = torch.load(pathlib.Path(__file__).resolve().parents[1] / "references" / "quantus" / "reference.pt",
                       weights_only=True)


def reference_model():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()
    net.load_state_dict(REFERENCE["state_dict"])
    return tx.functionalize(net)


def summed_saliency(model_fn, params, x, target):
    return tx.saliency(model_fn, params, x, target).sum(1, keepdim=True)


def test_random_logit_equals_quantus_with_the_same_classes():
    fn, params = reference_model()
    ours = metrics.random_logit(summed_saliency, fn, params, REFERENCE["x"], REFERENCE["y"],
                                off_target=REFERENCE["random_logit_off_target"])
    theirs = REFERENCE["per_example"][("saliency", "random_logit")]
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    assert theirs.std() > 0.01


def test_ssim_written_out():
    # skimage's definition on 1-D signals: 7-wide windows inside the signal, sample (co)variances
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 30, generator=gen, dtype=torch.float64), torch.randn(2, 30, generator=gen, dtype=torch.float64)
    got = metrics.ssim(a, b)
    for i in range(2):
        span = torch.cat([a[i], b[i]]).max() - torch.cat([a[i], b[i]]).min()
        c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
        values = []
        for start in range(30 - 6):
            wa, wb = a[i, start:start + 7], b[i, start:start + 7]
            ma, mb = wa.mean(), wb.mean()
            va, vb = wa.var(unbiased=True), wb.var(unbiased=True)
            cov = ((wa - ma) * (wb - mb)).sum() / 6
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        torch.testing.assert_close(got[i], torch.stack(values).mean())
    torch.testing.assert_close(metrics.ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: metrics.ssim(t, b), (a.clone().requires_grad_(),))


def test_random_logit_of_a_class_blind_method_is_one():
    fn, params = reference_model()
    x = REFERENCE["x"][:4]

    def blind(model_fn, params, x, target):          # ignores the class: the two maps are equal
        return x.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(metrics.random_logit(blind, fn, params, x, 0, generator=gen), torch.ones(4))


def test_the_drawn_class_is_never_the_target():
    fn, params = reference_model()
    x = REFERENCE["x"][:1].expand(200, -1, -1, -1)
    seen = []

    def record(model_fn, params, x, target):
        seen.append(target)
        return x.sum(1)
    metrics.random_logit(record, fn, params, x, 3, generator=torch.Generator().manual_seed(1))
    off = seen[1]
    assert not (off == 3).any() and set(off.tolist()) == set(range(10)) - {3}


def test_bad_arguments():
    fn, params = reference_model()
    x = REFERENCE["x"][:2]
    with pytest.raises(ValueError, match="random_logit: expected off_target in"):
        metrics.random_logit(summed_saliency, fn, params, x, torch.tensor([1, 2]), off_target=torch.tensor([1, 3]))
    with pytest.raises(TypeError, match="random_logit: expected method"):
        metrics.random_logit(3, fn, params, x, 0)
    with pytest.raises(ValueError, match="ssim: expected an odd win_size"):
        metrics.ssim(torch.rand(2, 10), torch.rand(2, 10), win_size=4)
