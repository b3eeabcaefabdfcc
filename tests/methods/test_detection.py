"""D-RISE (``tx.drise``): equal to a hand-written loop over the same masks, on a tiny YOLO-style model
(raw ``[B, N, 4 + classes]`` output) and on torchvision's Faster R-CNN; its masks are RISE's; the
grouping of the work (``batch_size``) does not change the maps; the errors; the model left as it was."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

import torchex_fn as tx
from torchex_fn.core import random_masks


class TinyYolo(nn.Module):
    """conv (stride 4) -> 1x1 head: per cell a box (cx, cy, w, h) around the cell centre and 3 class probabilities."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Tanh())
        self.head = nn.Conv2d(8, 7, 1)

    def forward(self, x):
        h = self.head(self.body(x))                                   # [B, 7, H/4, W/4]
        b, _, gh, gw = h.shape
        ys, xs = torch.meshgrid(torch.arange(gh) * 4 + 2.0, torch.arange(gw) * 4 + 2.0, indexing="ij")
        centre = torch.stack([xs, ys]).to(h)[None] + 2 * torch.tanh(h[:, :2])
        size = 6 + 4 * torch.sigmoid(h[:, 2:4])
        probs = torch.softmax(h[:, 4:], dim=1)
        return torch.cat([centre, size, probs], dim=1).flatten(2).transpose(1, 2)   # [B, N, 4 + 3]


def _cxcywh_to_xyxy(b):
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _masks(n, cells, p, size, seed):
    """The masks drise draws for a seed: blocks of 64 from core/random_masks.py."""
    make = random_masks.sampler(cells, p, size, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(seed))
    out, left = [], n
    while left:
        out.append(make(min(64, left)))
        left -= out[-1].shape[0]
    return torch.cat(out)


def _loop_raw(model, x, boxes, labels, masks, p):
    """D-RISE by hand for a raw output: w_k = max_j IoU(box_k, box_j) * P_j[label_k] / |P_j|, one mask at a time."""
    maps = torch.zeros(x.shape[0], boxes.shape[0], *x.shape[2:])
    for mask in masks:
        with torch.no_grad():
            out = model(x * mask)
        for b in range(x.shape[0]):
            pred = _cxcywh_to_xyxy(out[b, :, :4])
            for k in range(boxes.shape[0]):
                iou = torchvision.ops.box_iou(_cxcywh_to_xyxy(boxes[k:k + 1]), pred)[0]          # [N]
                cos = out[b, :, 4 + labels[k]] / out[b, :, 4:].norm(dim=1)                      # one-hot . P_j
                maps[b, k] += (iou * cos).max() * mask
    return maps / (len(masks) * p)


def test_drise_equals_a_loop_over_the_same_masks_raw_output():
    torch.manual_seed(0)
    model = TinyYolo().eval()
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[6., 6, 8, 8], [14, 10, 7, 9]])          # cx, cy, w, h
    labels = torch.tensor([0, 2])
    fn, params = tx.functionalize(model)
    got = tx.drise(fn, params, x, boxes, labels, num_masks=70, cell_size=4, probability=0.5, batch_size=7,
                   box_format="cxcywh", generator=torch.Generator().manual_seed(5))
    want = _loop_raw(model, x, boxes, labels, _masks(70, 4, 0.5, (16, 20), 5), 0.5)
    assert got.shape == (2, 2, 16, 20) and want.abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # batch_size changes the grouping of the work only
    again = tx.drise(fn, params, x, boxes, labels, num_masks=70, cell_size=4, batch_size=64, box_format="cxcywh",
                     generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-6)
    # per-example boxes: the second image explains other boxes
    per = tx.drise(fn, params, x, torch.stack([boxes, boxes.flip(0)]), torch.stack([labels, labels.flip(0)]),
                   num_masks=70, cell_size=4, batch_size=7, box_format="cxcywh",
                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(per[0], got[0])
    torch.testing.assert_close(per[1], got[1].flip(0))


def test_the_masks_are_rises():
    # a constant score of 1 makes rise's map the sum of its masks over N p: here drise's masks for the same seed
    size, cells, n, p = (16, 20), 4, 100, 0.5
    x = torch.rand(1, 3, *size)
    sal = tx.rise(lambda params, v: torch.ones(v.shape[0], 2), {}, x, 0, num_masks=n, cell_size=cells,
                  probability=p, batch_size=16, score=lambda out: out, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sal[0, 0], _masks(n, cells, p, size, 3).sum(0) / (n * p), rtol=1e-6, atol=1e-6)
    # one mask: the map is that mask over p, exactly
    one = tx.rise(lambda params, v: torch.ones(v.shape[0], 2), {}, x, 0, num_masks=1, cell_size=cells,
                  probability=p, score=lambda out: out, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one[0, 0], _masks(1, cells, p, size, 3)[0] / p)


def _faster_rcnn():
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=64,
                                              max_size=80, box_score_thresh=0.0, box_detections_per_img=8,
                                              rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20)
    with torch.no_grad():
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    return model.eval()


def test_drise_equals_a_loop_on_faster_rcnn_and_leaves_it_as_it_was():
    model = _faster_rcnn()
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        found = model(x)[0]
    boxes, labels = found["boxes"][:2], found["labels"][:2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn, params = tx.functionalize(model)
    got = tx.drise(fn, params, x, boxes, labels, num_masks=8, cell_size=8, batch_size=5,
                   generator=torch.Generator().manual_seed(0))
    want = torch.zeros(1, 2, 64, 80)
    masks = _masks(8, 8, 0.5, (64, 80), 0)
    for mask in masks:
        with torch.no_grad():
            out = model(x * mask)[0]
        for k in range(2):
            sims = [float(torchvision.ops.box_iou(boxes[k:k + 1], out["boxes"][j:j + 1])[0, 0]
                          * (out["labels"][j] == labels[k]) * out["scores"][j]) for j in range(len(out["boxes"]))]
            want[0, k] += max(sims, default=0.0) * mask
    want /= 8 * 0.5
    assert want.abs().max() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_masks": 0}, ValueError, r"^drise: expected num_masks"),
    ({"probability": 0.0}, ValueError, r"^drise: expected probability"),
    ({"box_format": "xywh"}, ValueError, r"^drise: expected box_format"),
    ({"generator": 3}, TypeError, r"^drise: expected generator"),
])
def test_option_errors(kwargs, error, match):
    fn, params = tx.functionalize(TinyYolo().eval())
    with pytest.raises(error, match=match):
        tx.drise(fn, params, torch.rand(1, 3, 8, 8), torch.ones(1, 4), torch.zeros(1, dtype=torch.long), **kwargs)


def test_input_and_box_errors():
    fn, params = tx.functionalize(TinyYolo().eval())
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^drise: expected x of rank 4"):
        tx.drise(fn, params, x[0], torch.ones(1, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^drise: expected boxes"):
        tx.drise(fn, params, x, torch.ones(1, 5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^drise: expected boxes for the 2 examples, the same number K"):
        tx.drise(fn, params, x, [torch.ones(1, 4), torch.ones(2, 4)],
                 [torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long)])
    fn2, params2 = tx.functionalize(nn.Conv2d(3, 2, 1).eval())
    with pytest.raises(ValueError, match=r"^drise: expected a detector output"):
        tx.drise(fn2, params2, x, torch.ones(1, 4), torch.zeros(1, dtype=torch.long), num_masks=2)
