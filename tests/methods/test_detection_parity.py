"""Grad-CAM on detectors, segmenters and embeddings, against pytorch-grad-cam 1.5.7 with its targets.

pytorch-grad-cam's raw map (``get_cam_image`` on what its hooks recorded, before its ReLU and min-max
scaling) against ``tx.grad_cam(..., relu=False, upsample=False)`` with the matching ``tx.targets`` target,
to 1e-5 of the map's max: ``FasterRCNNBoxScoreTarget`` on torchvision's fasterrcnn_mobilenet_v3_large_fpn
(through ``roi_align``, which torch.func refuses: the gradient is torch.autograd's), ``SemanticSegmentationTarget``
on deeplabv3_mobilenet_v3_large and fcn_resnet50, the embeddings tutorial's ``SimilarityToConceptTarget`` on
resnet18 without its classifier. Random weights, BatchNorm calibrated on a random batch (see
tests/support/parity.py); every model is left as it was (state, hooks, training flag).
"""
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget
from torch import nn
from torchvision.models import segmentation
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity, assert_same_state, calibrate_batchnorm, state_of


def _pgc_raw(model, layer, x, targets):
    with GradCAM(model=model, target_layers=[layer]) as cam:
        cam(input_tensor=x, targets=targets)
        got = cam.activations_and_grads
        raw = cam.get_cam_image(x, layer, targets, got.activations[0].numpy(), got.gradients[0].numpy(), False)
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    return torch.from_numpy(np.asarray(raw))


def test_faster_rcnn_box_score():
    layer = "backbone.body.16"
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=96,
                                              max_size=128, box_score_thresh=0.0, box_detections_per_img=10,
                                              rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50)
    calibrate_batchnorm(model.backbone, torch.randn(4, 3, 96, 128))
    model.eval()
    with torch.no_grad():
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model(x)
    boxes, labels = [f["boxes"][:3] for f in found], [f["labels"][:3] for f in found]
    before = state_of(model)
    fn, params = tx.functionalize(model)
    ours = tx.grad_cam(fn, params, x, tx.targets.box_score(boxes, labels), layer=layer, relu=False,
                       upsample=False)[:, 0]
    assert_same_state(model, before)
    ref = _pgc_raw(model, dict(model.named_modules())[layer], x,
                   [FasterRCNNBoxScoreTarget(lab, b) for lab, b in zip(labels, boxes)])
    assert_parity(ours, ref)


@pytest.mark.parametrize("name, layer", [("deeplabv3_mobilenet_v3_large", "backbone.16"),
                                         ("fcn_resnet50", "backbone.layer4")])
def test_segmentation(name, layer):
    torch.manual_seed(0)
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=4, aux_loss=False)
    calibrate_batchnorm(model, torch.randn(4, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = model(x)["out"].argmax(1)                       # [2, 64, 64]
    category = int(predicted[0].flatten().mode().values)
    masks = (predicted == category).float()
    before = state_of(model)
    fn, params = tx.functionalize(model)
    ours = tx.grad_cam(fn, params, x, tx.targets.segmentation(category, masks), layer=layer, relu=False,
                       upsample=False)[:, 0]
    assert_same_state(model, before)

    class Out(nn.Module):   # pytorch-grad-cam's tutorial wrapper: the "out" tensor of the dict
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, v):
            return self.model(v)["out"]
    ref = _pgc_raw(Out(), dict(model.named_modules())[layer], x,
                   [SemanticSegmentationTarget(category, m.numpy()) for m in masks])
    assert_parity(ours, ref)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's embeddings tutorial target (not in the package): cosine similarity to a concept."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_resnet18_embedding_similarity():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    calibrate_batchnorm(model, torch.randn(8, 3, 64, 64))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        concept = model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)))[0]
    before = state_of(model)
    fn, params = tx.functionalize(model)
    ours = tx.grad_cam(fn, params, x, tx.targets.similarity(concept), layer="layer3", relu=False, upsample=False)[:, 0]
    assert_same_state(model, before)
    ref = _pgc_raw(model, model.layer3, x, [SimilarityToConceptTarget(concept)] * 3)
    assert_parity(ours, ref)
