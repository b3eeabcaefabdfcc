"""The task targets on more model families, each map equal to torch.autograd's gradient of the same
score taken by hand: torchvision's SSDlite (a detector without ``roi_align``: torch.func runs it) with
``box_score``, and HuggingFace SegFormer (quarter-size ``logits`` in a ``ModelOutput``) with ``segmentation``."""
import pytest
import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

import torchex_fn as tx

transformers = pytest.importorskip("transformers")


def _close(got, want):
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_ssdlite_box_score_saliency():
    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4, score_thresh=0.0,
                                          detections_per_img=8, topk_candidates=20).eval()
    model.transform.fixed_size = (96, 96)      # run at 96 px, not 320 (speed; anchors follow the feature maps)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model(x)[0]
    target = tx.targets.box_score(found["boxes"][:2], found["labels"][:2])
    fn, params = tx.functionalize(model)
    got = tx.saliency(fn, params, x, target)
    leaf = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(target(model(leaf)).sum(), leaf)
    assert target(model(x)).item() > 1
    _close(got, want)


def test_segformer_segmentation_on_its_logits():
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                          hidden_sizes=[8, 16], num_attention_heads=[1, 2], patch_sizes=[7, 3],
                                          strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=x).logits                          # [2, 3, 8, 8]: a quarter of the input
    mask = (logits.argmax(1) == 1).float()
    target = tx.targets.segmentation(1, mask)
    fn, params = tx.functionalize(model)
    got = tx.saliency(fn, params, x, target)
    leaf = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((model(pixel_values=leaf).logits[:, 1] * mask).sum(), leaf)
    _close(got, want)
    # at the input's size through output=: the logits upsampled to the mask
    full = torch.ones(32, 32)
    up = tx.targets.segmentation(1, full, output=lambda o: torch.nn.functional.interpolate(
        o.logits, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(up(model(pixel_values=x)), 16 * logits[:, 1].sum((1, 2)), rtol=1e-5, atol=1e-4)
