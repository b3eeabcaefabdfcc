"""SESS (``tx.sess``) against pytorch-grad-cam 1.5.7's ``SESS`` on randomly initialised resnet18 (BatchNorm
calibrated, tests/support/parity.py) at 32 x 32 (defaults) and 64 x 64 (options): the whole pipeline (scales,
sliding windows, softmax patch scores, per-patch CAMs scaled and pasted back, the mean or max fusion, the
Gaussian blur and the final scaling), to 1e-5 of the map's max, with the defaults and with every option
changed; and the option errors."""
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, SESS
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity, peer_input, peer_model


def _pgc(model, layers, x, labels, **options):
    with SESS(model, layers, **options) as sess:
        out = sess(x, None if labels is None else [ClassifierOutputTarget(int(c)) for c in labels])
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    return torch.from_numpy(np.asarray(out))[:, None]


def test_defaults_equal_pytorch_grad_cam():
    # 32 x 32: a window of 32, twelve scales 32, 41, ..., 131, 151 patches
    model, fn, params = peer_model("resnet18")
    x = torch.nn.functional.avg_pool2d(peer_input()[:1], 2)
    labels = torch.tensor([517])
    ours = tx.sess(fn, params, x, labels, layer="layer3")
    ref = _pgc(model, [model.layer3], x, labels)
    assert ours.shape == (1, 1, 32, 32)
    assert_parity(ours, ref)
    assert float(ours.min()) == 0.0 and abs(float(ours.max()) - 1.0) < 1e-6


@pytest.mark.parametrize("case", ["two_layers_max", "windows_mean"])
def test_options_equal_pytorch_grad_cam(case):
    model, fn, params = peer_model("resnet18")
    x = peer_input()[:2]
    if case == "two_layers_max":
        # Grad-CAM++ on two layers, overlapping windows, half the patches dropped, max fusion, raw logits
        ours = tx.sess(fn, params, x, None, layer=["layer3", "layer4"], method=tx.grad_cam_pp, num_scales=2,
                       scale_step_ratio=0.5, step_size=24, pre_filter_ratio=0.5, pool="max", softmax_scores=False,
                       batch_size=5)
        ref = _pgc(model, [model.layer3, model.layer4], x, None, base_method=GradCAMPlusPlus, num_scales=2,
                   scale_step_ratio=0.5, step_size=24, pre_filter_ratio=0.5, pool="max", use_softmax_scores=False,
                   batch_size=5)
    else:
        # a window smaller than the image, given scales, a threshold, no blur
        labels = torch.tensor([7, 7])
        ours = tx.sess(fn, params, x, labels, layer="layer3", window_size=40, scales=[40, 56, 70], theta=0.2,
                       smooth=False)
        ref = _pgc(model, [model.layer3], x, labels, base_method=GradCAM, window_size=40, scales=[40, 56, 70],
                   theta=0.2, smooth=False)
    assert_parity(ours, ref)


def test_errors():
    model, fn, params = peer_model("resnet18")
    x = peer_input()[:1]
    with pytest.raises(ValueError, match=r"^sess: expected every scale at least the window size 64, "
                                         r"got scales \[48, 64\]"):
        tx.sess(fn, params, x, 1, layer="layer4", scales=[48, 64])
    with pytest.raises(ValueError, match=r"^sess: expected pool, one of \('mean', 'max'\), got str 'median'"):
        tx.sess(fn, params, x, 1, layer="layer4", pool="median")
    with pytest.raises(ValueError, match=r"^sess: expected pre_filter_ratio in \[0, 1\), got float 1.0"):
        tx.sess(fn, params, x, 1, layer="layer4", pre_filter_ratio=1.0)
    with pytest.raises(TypeError, match=r"^sess: expected target: None, an int or \[B\] ints"):
        tx.sess(fn, params, x, lambda out: out[:, 0], layer="layer4")
    with pytest.raises(ValueError, match=r"^sess: expected images x of shape \[B, C, H, W\]"):
        tx.sess(fn, params, torch.randn(1, 3, 8, 8, 8), 1, layer="layer4")
    with pytest.raises(TypeError, match=r"^sess: expected method, a callable or None, got int 3"):
        tx.sess(fn, params, x, 1, layer="layer4", method=3)
    with pytest.raises(ValueError, match=r"^sess: unknown layer 'layer9'"):
        tx.sess(fn, params, x, 1, layer="layer9")
