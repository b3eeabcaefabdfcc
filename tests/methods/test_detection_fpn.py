"""CAMs at a torchvision detector's FPN backbone, whose output is an ``OrderedDict`` of levels, against
pytorch-grad-cam 1.5.7 set up as its Faster R-CNN tutorial sets it up.

The tutorial names ``model.backbone`` as the target layer with ``fasterrcnn_reshape_transform`` (each
level's absolute value resized bilinearly to the ``pool`` level's grid, the channels concatenated:
``[B, 3 * 256, h, w]`` for ``fasterrcnn_mobilenet_v3_large_fpn``) and ``FasterRCNNBoxScoreTarget``; ours is
``layer="backbone"`` with the same callable as ``reshape=`` (it receives the dict) and
``tx.targets.box_score``. Random weights, BatchNorm calibrated on a random batch, 128 x 160 images, a
zero score threshold so that boxes exist. Raw maps (before ReLU and scaling) to 1e-5 of the max:

* Eigen-CAM: ``EigenCAM.get_cam_image`` on the recorded (reshaped) activations, up to LAPACK's sign;
* Ablation-CAM: ``AblationCAM`` with the tutorial's ``AblationLayerFasterRCNN`` rule (channel ``k`` of the
  grid is channel ``k % 256`` of level ``k // 256``, set to -1000), whose key table is written for the
  five levels of the ResNet-50 FPN; the mobilenet FPN has three ('0', '1', 'pool'), so the reference
  reads the keys from the dict in order. Ours: ``value=-1000.0``;
* Grad-CAM: pytorch-grad-cam records no gradient at a dict-valued layer (its hook returns early for an
  output without ``requires_grad``), so the reference is ``GradCAM.get_cam_image`` on what it records
  for a tensor layer, ``reshape_transform`` of the activations and of the gradients, the gradients of
  the levels taken here by torch.autograd.
"""
import numpy as np
import pytest
import torch
from pytorch_grad_cam import AblationCAM, EigenCAM, GradCAM
from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity, assert_same_state, calibrate_batchnorm, state_of

H, W = 128, 160


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=H,
                                              max_size=W, box_score_thresh=0.0, box_detections_per_img=5,
                                              rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=6)
    calibrate_batchnorm(model.backbone, torch.randn(4, 3, H, W))
    model.eval()
    with torch.no_grad():
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        found = model(x)
    boxes, labels = [f["boxes"][:3] for f in found], [f["labels"][:3] for f in found]
    assert all(len(b) == 3 for b in boxes)
    fn, params = tx.functionalize(model)
    return model, fn, params, x, boxes, labels


def _pgc_targets(boxes, labels):
    return [FasterRCNNBoxScoreTarget(lab, b) for lab, b in zip(labels, boxes)]


def _recorded(cam, x):
    """The reshaped activations pytorch-grad-cam's hooks record at the target layer, [B, 768, h, w]."""
    with torch.no_grad():
        cam.activations_and_grads(x)
    (acts,) = cam.activations_and_grads.activations
    return acts


def test_eigen_cam_at_the_fpn_levels(detector):
    model, fn, params, x, boxes, labels = detector
    before = state_of(model)
    with torch.no_grad():
        ours = tx.eigen_cam(fn, params, x, tx.targets.box_score(boxes, labels), layer="backbone",
                            reshape=fasterrcnn_reshape_transform, relu=False, upsample=False)[:, 0]
    assert_same_state(model, before)
    with EigenCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform) as cam:
        acts = _recorded(cam, x)
        raw = torch.from_numpy(cam.get_cam_image(x, model.backbone, None, acts.numpy(), None, False))
    assert acts.shape == (2, 768, 2, 3) and ours.shape == (2, 2, 3)
    sign = torch.sign((ours * raw).flatten(1).sum(1))[:, None, None]   # LAPACK's sign against ours (see eigen_cam)
    assert (sign != 0).all()
    assert_parity(ours * sign, raw)
    assert_no_hooks(model)


class _AblateLevels(AblationLayerFasterRCNN):
    """The tutorial's ablation layer with the levels' keys read from the dict (its table assumes five)."""

    def __call__(self, x):
        result = self.activations
        keys = list(result)
        for i in range(result[keys[0]].size(0)):
            result[keys[int(self.indices[i]) // 256]][i, int(self.indices[i]) % 256] = -1000
        return result


def test_ablation_cam_at_the_fpn_levels(detector):
    model, fn, params, x, boxes, labels = detector
    x, boxes, labels = x[:1], boxes[:1], labels[:1]
    before = state_of(model)
    with torch.no_grad():
        ours = tx.ablation_cam(fn, params, x, tx.targets.box_score(boxes, labels), layer="backbone",
                               reshape=fasterrcnn_reshape_transform, value=-1000.0, batch_size=64,
                               relu=False, upsample=False)[:, 0]
    assert_same_state(model, before)
    with AblationCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform,
                     ablation_layer=_AblateLevels(), batch_size=64, ratio_channels_to_ablate=1.0) as cam:
        acts = _recorded(cam, x)
        raw = torch.from_numpy(np.asarray(cam.get_cam_image(x, model.backbone, _pgc_targets(boxes, labels),
                                                            acts.numpy(), None, False)))
    assert isinstance(model.backbone, nn.Module) and not isinstance(model.backbone, _AblateLevels)
    assert_parity(ours, raw)
    assert_no_hooks(model)


def _levels_and_gradients(model, x, boxes, labels):
    """The backbone's levels and the gradient of the summed box scores w.r.t. each, by torch.autograd."""
    found = {}

    def keep(module, args, output):
        found["acts"] = output
        for value in output.values():
            value.retain_grad()
    handle = model.backbone.register_forward_hook(keep)
    try:
        outputs = model(x)
    finally:
        handle.remove()
    total = sum(t(o) for t, o in zip(_pgc_targets(boxes, labels), outputs))
    levels = list(found["acts"].values())
    grads = torch.autograd.grad(total, levels, allow_unused=True)   # the RPN detaches its proposals: 'pool' is unused
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(levels, grads)]
    model.zero_grad(set_to_none=True)
    acts = {k: v.detach() for k, v in found["acts"].items()}
    return type(found["acts"])(acts), type(found["acts"])(zip(acts, grads))


def test_grad_cam_at_the_fpn_levels(detector):
    model, fn, params, x, boxes, labels = detector
    before = state_of(model)
    ours = tx.grad_cam(fn, params, x, tx.targets.box_score(boxes, labels), layer="backbone",
                       reshape=fasterrcnn_reshape_transform, relu=False, upsample=False)[:, 0]
    assert_same_state(model, before)
    acts, grads = _levels_and_gradients(model, x, boxes, labels)
    assert grads["0"].abs().max() > 0   # RoIAlign reads small boxes from level "0" only
    with GradCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform) as cam:
        raw = cam.get_cam_image(x, model.backbone, None, fasterrcnn_reshape_transform(acts).numpy(),
                                fasterrcnn_reshape_transform(grads).numpy(), False)
    assert_parity(ours, torch.from_numpy(raw))
    assert_no_hooks(model)


def test_a_dict_layer_without_reshape_is_refused_by_name(detector):
    model, fn, params, x, boxes, labels = detector
    target = tx.targets.box_score(boxes, labels)
    for method in (tx.grad_cam, tx.eigen_cam, tx.ablation_cam):
        with pytest.raises(ValueError, match=rf"^{method.__name__}: expected layer 'backbone' to output a tensor "
                                             r"\[B, K, \*grid\], or reshape= .*got OrderedDict of tensors of shapes "
                                             r"\{'0': \(2, 256, 4, 5\).*'pool': \(2, 256, 2, 3\)\}.*Pass reshape="):
            method(fn, params, x, target, layer="backbone")
    assert_no_hooks(model)


def test_ablation_levels_must_add_up_to_the_grid_channels(detector):
    model, fn, params, x, boxes, labels = detector
    with pytest.raises(ValueError, match=r"^ablation_cam: expected layer 'backbone'.s tensors \[B, K_l, \.\.\.\] to "
                                         r"have as many channels in all as reshape's output \(256;"):
        tx.ablation_cam(fn, params, x[:1], tx.targets.box_score(boxes[:1], labels[:1]), layer="backbone",
                        reshape=lambda levels: levels["pool"])
    with pytest.raises(TypeError, match=r"^ablation_cam: expected value, a float, got str"):
        tx.ablation_cam(fn, params, x[:1], tx.targets.box_score(boxes[:1], labels[:1]), layer="backbone",
                        reshape=fasterrcnn_reshape_transform, value="-1000")
    # other layer methods name the layer too
    with pytest.raises(TypeError, match=r"^input_x_gradient: expected layer 'backbone' to output a tensor"):
        tx.input_x_gradient(fn, params, x, tx.targets.box_score(boxes, labels), layer="backbone")
