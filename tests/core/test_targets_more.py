"""Targets for outputs that are not class logits (core/tasks.py, ``tx.targets.*``): closed forms on
hand-made outputs, equality with pytorch-grad-cam 1.5.7's target classes applied example by example,
gradcheck in float64 of the detection target on a tiny detector-like head, and the errors."""
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import (BinaryClassifierOutputTarget, ClassifierOutputReST,
                                                  ClassifierOutputSoftmaxTarget, FasterRCNNBoxScoreTarget,
                                                  SemanticSegmentationTarget)

import torchex_fn as tx

T = tx.targets


def _dets(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_box_iou_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 4, generator=g) * 50
    b = torch.rand(7, 4, generator=g) * 50
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    torch.testing.assert_close(T.box_score.__globals__["box_iou"](a, b), torchvision.ops.box_iou(a, b))


def test_box_score_closed_form():
    out = [_dets([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 12]], [1, 2, 1], [0.9, 0.8, 0.7])]
    # box 1 matches the first prediction exactly: 1 + 0.9; box 2 overlaps the second by IoU 25/175 < 0.5: 0;
    # box 3 has label 3 where the best box is labelled 1: 0
    target = T.box_score(torch.tensor([[0., 0, 10, 10], [25, 25, 35, 35], [0, 0, 10, 10]]), torch.tensor([1, 2, 3]))
    torch.testing.assert_close(target(out), torch.tensor([1.9]))
    # the third prediction (IoU 100/120) is not the best one for box 1; with the first removed it matches
    out2 = [{k: v[1:] for k, v in out[0].items()}]
    torch.testing.assert_close(T.box_score(torch.tensor([[0., 0, 10, 10]]), torch.tensor([1]))(out2),
                               torch.tensor([100 / 120 + 0.7]))
    # iou_threshold: IoU 25/175 passes 0.1
    low = T.box_score(torch.tensor([[25., 25, 35, 35]]), torch.tensor([2]), iou_threshold=0.1)
    torch.testing.assert_close(low(out), torch.tensor([25 / 175 + 0.8]))


def test_box_score_equals_pytorch_grad_cam_per_image():
    g = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(3):
        boxes = torch.rand(12, 4, generator=g) * 40
        boxes[:, 2:] += boxes[:, :2] + 5
        outs.append({"boxes": boxes, "labels": torch.randint(0, 3, (12,), generator=g),
                     "scores": torch.rand(12, generator=g)})
    given = [o["boxes"][:4] + torch.rand(4, 4, generator=g) * 3 for o in outs]
    labels = [torch.tensor([o["labels"][0], o["labels"][1], 2, 0]) for o in outs]
    ours = T.box_score(given, labels)(outs)
    ref = torch.cat([FasterRCNNBoxScoreTarget(lab, b)(o) for lab, b, o in zip(labels, given, outs)])
    assert (ref > 0).all()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # [B, K, 4] given boxes and [K, 4] shared ones
    torch.testing.assert_close(T.box_score(torch.stack(given), torch.stack(labels))(outs), ref)
    shared = T.box_score(given[0], labels[0])(outs)
    torch.testing.assert_close(shared, torch.cat([FasterRCNNBoxScoreTarget(labels[0], given[0])(o) for o in outs]))


def test_box_score_raw_yolo_output():
    # [B, N, 4 + classes] with centre/size boxes: the class score at the label is the score
    raw = torch.tensor([[[5., 5, 10, 10, 0.1, 0.7, 0.2], [30, 30, 10, 10, 0.6, 0.3, 0.1]]])
    target = T.box_score(torch.tensor([[5., 5, 10, 10], [30, 31, 10, 10]]), torch.tensor([1, 0]), box_format="cxcywh")
    torch.testing.assert_close(target(raw), torch.tensor([1 + 0.7 + 90 / 110 + 0.6]))
    # the same boxes given as xyxy against xyxy predictions
    xyxy = raw.clone()
    xyxy[..., :4] = torch.tensor([[0., 0, 10, 10], [25, 25, 35, 35]])
    torch.testing.assert_close(T.box_score(torch.tensor([[0., 0, 10, 10]]), torch.tensor([1]))(xyxy),
                               torch.tensor([1.7]))
    # a wrong label (argmax is class 1): nothing
    assert T.box_score(torch.tensor([[0., 0, 10, 10]]), torch.tensor([2]))(xyxy).item() == 0


class TinyDetectorHead(torch.nn.Module):
    """Features -> per-anchor box offsets and class probabilities, in the shape torchvision returns."""

    def __init__(self):
        super().__init__()
        self.anchors = torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30], [5, 5, 15, 15]], dtype=torch.float64)
        self.box = torch.nn.Linear(6, 12).double()
        self.cls = torch.nn.Linear(6, 9).double()

    def forward(self, x):
        out = []
        for f in x:
            boxes = self.anchors + self.box(f).view(3, 4)
            probs = torch.softmax(self.cls(f).view(3, 3), dim=1)
            scores, labels = probs.max(1)
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


def test_box_score_is_differentiable_where_the_matches_hold():
    torch.manual_seed(0)
    head = TinyDetectorHead()
    x = torch.randn(2, 6, dtype=torch.float64) * 0.1
    found = head(x)
    target = T.box_score([f["boxes"][:2].detach() + 0.5 for f in found], [f["labels"][:2] for f in found])
    assert (target(found) > 1).all()
    assert torch.autograd.gradcheck(lambda v: target(head(v)), (x.requires_grad_(True),))
    # and through a method: saliency is that gradient
    fn, params = tx.functionalize(head)
    sal = tx.saliency(fn, params, x.detach(), target)
    (want,) = torch.autograd.grad(target(head(x)).sum(), x)
    torch.testing.assert_close(sal, want)


def test_segmentation_equals_pytorch_grad_cam_and_closed_form():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.5).numpy().astype(np.float32)
    ref = torch.stack([SemanticSegmentationTarget(2, mask)(o) for o in logits])
    for out in (logits, {"out": logits, "aux": logits * 0}, {"logits": logits}):
        torch.testing.assert_close(T.segmentation(2, mask)(out), ref)
    per = torch.stack([torch.as_tensor(mask), 1 - torch.as_tensor(mask)])
    torch.testing.assert_close(T.segmentation(torch.tensor([1, 3]), per)(logits),
                               torch.stack([(logits[0, 1] * per[0]).sum(), (logits[1, 3] * per[1]).sum()]))
    up = T.segmentation(0, torch.ones(12, 10), output=lambda o: torch.nn.functional.interpolate(o, scale_factor=2))
    torch.testing.assert_close(up(logits), 4 * logits[:, 0].sum((1, 2)))
    with pytest.raises(ValueError, match=r"^targets\.segmentation: expected mask of the output's spatial size \[6, 5"):
        T.segmentation(0, torch.ones(12, 10))(logits)


def test_similarity_is_the_cosine():
    g = torch.Generator().manual_seed(3)
    emb, ref = torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    want = torch.stack([torch.nn.CosineSimilarity(dim=0)(e, ref) for e in emb])   # the tutorial's target
    torch.testing.assert_close(T.similarity(ref)(emb), want)
    torch.testing.assert_close(T.similarity(ref)({"image_embeds": emb, "last_hidden_state": emb[:, None]}), want)
    torch.testing.assert_close(T.similarity(ref, output="text_embeds")({"image_embeds": emb * 0, "text_embeds": emb}),
                               want)
    torch.testing.assert_close(T.similarity(emb)(emb), torch.ones(3))
    with pytest.raises(ValueError, match=r"^targets\.similarity: expected an embedding output .*output="):
        T.similarity(ref)({"image_embeds": emb, "text_embeds": emb})
    with pytest.raises(ValueError, match=r"^targets\.similarity: expected reference of the embedding's size \[8\]"):
        T.similarity(torch.ones(5))(emb)


def test_regression_softmax_binary_rest():
    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(T.regression(2)(out), out[:, 2])
    torch.testing.assert_close(T.regression()(out[:, :1]), out[:, 0])
    torch.testing.assert_close(T.regression((1, 0))(out.view(3, 5, 1)), out[:, 1])
    torch.testing.assert_close(T.softmax(3)(out), torch.stack([ClassifierOutputSoftmaxTarget(3)(o) for o in out]))
    torch.testing.assert_close(T.rest(1)(out), torch.stack([ClassifierOutputReST(1)(o) for o in out]))
    torch.testing.assert_close(T.rest(torch.tensor([0, 1, 4]))(out),
                               torch.stack([ClassifierOutputReST(c)(o) for c, o in zip([0, 1, 4], out)]))
    for c in (0, 1):
        torch.testing.assert_close(T.binary(c)(out[:, 0]), BinaryClassifierOutputTarget(c)(out[:, 0]))
    with pytest.raises(ValueError, match=r"^targets\.regression: expected an output of one value per example"):
        T.regression()(out)


@pytest.mark.parametrize("make, match", [
    (lambda: T.box_score(torch.ones(3, 5), torch.ones(3, dtype=torch.long)), r"^targets\.box_score: expected boxes"),
    (lambda: T.box_score(torch.ones(3, 4), torch.ones(2, dtype=torch.long)), r"^targets\.box_score: expected labels"),
    (lambda: T.box_score(torch.ones(3, 4), torch.ones(3, dtype=torch.long), iou_threshold=1.5), "iou_threshold"),
    (lambda: T.box_score(torch.ones(3, 4), torch.ones(3, dtype=torch.long), box_format="xywh"), "box_format"),
    (lambda: T.segmentation(0, torch.ones(3)), r"^targets\.segmentation: expected mask of shape"),
    (lambda: T.similarity(torch.ones(2, 3, 4)), r"^targets\.similarity: expected reference"),
    (lambda: T.binary(2), r"^targets\.binary: expected category 0 or 1"),
])
def test_construction_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_training_mode_detector_output_is_named():
    with pytest.raises(ValueError, match=r"^targets\.box_score: expected a detector output.*model\.eval\(\)"):
        T.box_score(torch.ones(1, 4), torch.ones(1, dtype=torch.long))({"loss_classifier": torch.tensor(1.0)})
