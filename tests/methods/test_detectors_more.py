"""Grad-CAM on torchvision's RetinaNet, FCOS and SSDlite with ``tx.targets.box_score``, against pytorch-grad-cam
1.5.7's ``GradCAM`` with ``FasterRCNNBoxScoreTarget`` (it reads any detector returning a list of dicts of
boxes, labels and scores): raw maps (``get_cam_image`` on what its hooks recorded) to 1e-5 of the max.

Random weights (SSDlite's BatchNorm calibrated and its classification head redrawn wider, so that its scores
differ), 64 x 96 or 96 x 128 images (SSDlite resizes to 320 x 320 itself), a zero score threshold so that boxes exist,
the first three detections explained. Every model is left as it was (state, hooks, training flag, no
parameter gradient)."""
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from torch import nn
from torchvision.models import detection

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity, calibrate_batchnorm


def _retinanet():
    model = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=64,
                                             max_size=96, score_thresh=0.0, detections_per_img=5)
    return model, None, "backbone.body.layer3", (64, 96), None


def _fcos():
    # at 64 x 96 its random regression gives zero-area boxes, which match nothing (IoU 0)
    model = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=96,
                                        max_size=128, score_thresh=0.0, detections_per_img=5)
    return model, None, "backbone.body.layer3", (96, 128), None


def _ssdlite():
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4,
                                                    score_thresh=0.0, detections_per_img=5)
    # SSDlite resizes every image to 320 x 320 itself: its 20 x 20 grid is not x's grid down-sampled, so the
    # layout is accepted as it is (reshape=lambda a: a)
    return (model, model.head.classification_head.module_list[0][1], "backbone.features.0.12", (64, 96),
            lambda a: a)


@pytest.mark.parametrize("build", [_retinanet, _fcos, _ssdlite], ids=["retinanet", "fcos", "ssdlite"])
def test_grad_cam_with_box_score_equals_pytorch_grad_cam(build):
    torch.manual_seed(0)
    model, head, layer, size, reshape = build()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    if head is not None:
        # SSDlite: BatchNorm calibrated on a random batch at its 320 x 320 (the initial statistics shrink the
        # signal ~10x per stage), and its initial class scores, all but uniform, drawn wider
        calibrate_batchnorm(model.backbone, torch.randn(4, 3, 320, 320))
        with torch.no_grad():
            nn.init.normal_(head.weight, std=0.5)
    model.eval()
    with torch.no_grad():
        found = model(x)
    boxes, labels = [f["boxes"][:3] for f in found], [f["labels"][:3] for f in found]
    assert all(len(b) == 3 for b in boxes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn, params = tx.functionalize(model)
    target = tx.targets.box_score(boxes, labels)
    assert (target(found) > 1).all()          # each example's detections match themselves: IoU 1 + score
    ours = tx.grad_cam(fn, params, x, target, layer=layer, relu=False, upsample=False, reshape=reshape)[:, 0]
    assert not model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)
    module = model.get_submodule(layer)
    with GradCAM(model=model, target_layers=[module]) as cam:
        cam(input_tensor=x, targets=[FasterRCNNBoxScoreTarget(lab, b) for lab, b in zip(labels, boxes)])
        got = cam.activations_and_grads
        raw = cam.get_cam_image(x, module, None, got.activations[0].numpy(), got.gradients[0].numpy(), False)
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    assert_parity(ours, torch.from_numpy(np.asarray(raw)))
