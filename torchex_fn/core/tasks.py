"""Targets for outputs that are not class logits: detectors, segmenters, embeddings, regressors.

Each function returns a callable target ``out -> [B]`` that every method accepts (a callable target
receives the model's raw output, see :mod:`torchex_fn.core.targets`, which re-exports these as
``tx.targets.box_score`` and so on). They follow pytorch-grad-cam's model targets
(``FasterRCNNBoxScoreTarget``, ``SemanticSegmentationTarget``, ``BinaryClassifierOutputTarget``,
``ClassifierOutputSoftmaxTarget``, ``ClassifierOutputReST``, and the ``SimilarityToConceptTarget`` of its
embeddings tutorial), batched: one score per example, computed without host synchronisation.

Boxes are ``(x1, y1, x2, y2)`` in pixels unless ``box_format="cxcywh"`` says ``(cx, cy, w, h)``.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks as _checks

__all__ = ["box_score", "segmentation", "similarity", "regression", "softmax", "binary", "rest", "box_iou",
           "detections", "given_boxes", "best_match", "to_xyxy", "check_box_format"]

_BOX_FORMATS = ("xyxy", "cxcywh")


# --------------------------------------------------------------------------------------------
# Boxes.

def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union ``[K, N]`` of boxes ``a`` ``[K, 4]`` and ``b`` ``[N, 4]``, ``(x1, y1, x2, y2)``.

    Differentiable in both (where the boxes overlap); a pair of empty boxes gives NaN, as torchvision's.
    """
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    size = (high - low).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def to_xyxy(boxes: Tensor, box_format: str) -> Tensor:
    if box_format == "xyxy":
        return boxes
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def check_box_format(fn: str, box_format: Any) -> None:
    if box_format not in _BOX_FORMATS:
        raise _checks.value_error(fn, f"box_format in {_BOX_FORMATS}", _checks.describe(box_format))


def _as_tensor(value: Any) -> Any:
    if isinstance(value, Tensor) or value is None:
        return value
    if type(value).__module__ == "numpy" or isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def given_boxes(fn: str, boxes: Any, labels: Any) -> Tuple[Union[Tensor, List[Tensor]], Union[Tensor, List[Tensor]]]:
    """``boxes``/``labels`` as ``[K, 4]``/``[K]`` shared by every example, ``[B, K, 4]``/``[B, K]``, or lists
    of ``B`` such tensors (a number of boxes per example)."""
    if isinstance(boxes, (list, tuple)) and boxes and all(isinstance(b, Tensor) for b in boxes):
        if not isinstance(labels, (list, tuple)) or len(labels) != len(boxes):
            raise _checks.value_error(fn, f"labels as a list of {len(boxes)} tensors, one per example like boxes",
                                      _checks.describe(labels))
        pairs = [given_boxes(fn, b, lab) for b, lab in zip(boxes, labels)]
        if any(isinstance(b, list) or b.ndim != 2 for b, _ in pairs):
            raise _checks.value_error(fn, "each example's boxes of shape [K, 4]", _checks.describe(boxes))
        return [b for b, _ in pairs], [lab for _, lab in pairs]  # type: ignore[misc]
    boxes, labels = _as_tensor(boxes), _as_tensor(labels)
    if not isinstance(boxes, Tensor) or boxes.ndim not in (2, 3) or boxes.shape[-1] != 4 \
            or not boxes.is_floating_point():
        raise _checks.value_error(fn, "boxes, floating point, of shape [K, 4] (shared by every example), [B, K, 4] "
                                  "or a list of B tensors [K_b, 4]", _checks.describe(boxes))
    if isinstance(labels, numbers.Integral) and boxes.shape[-2] == 1:
        labels = torch.tensor([int(labels)])
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool \
            or labels.shape != boxes.shape[:-1]:
        raise _checks.value_error(fn, f"labels, integer, of shape {list(boxes.shape[:-1])} (one per box)",
                                  _checks.describe(labels))
    return boxes, labels


def _for_example(given: Union[Tensor, List[Tensor]], b: int, batch: int, fn: str, per_example: bool) -> Tensor:
    if per_example:
        if len(given) != batch:
            raise _checks.value_error(fn, f"boxes for {len(given)} examples to match the output's batch",
                                      f"an output of {batch} examples")
        return given[b]
    assert isinstance(given, Tensor)
    return given


def detections(out: Any, *, fn: str, box_format: str = "xyxy") -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """The predictions of a detector's output, per example: ``(boxes [N, 4] xyxy, labels [N], scores)``.

    ``out`` is torchvision's list of dicts (``boxes``, ``labels``, ``scores``: ``scores`` ``[N]``), or a raw
    YOLO-style tensor ``[B, N, 4 + classes]`` (``scores`` is then the class scores ``[N, classes]`` and
    ``labels`` their argmax).
    """
    if isinstance(out, Tensor):
        if out.ndim != 3 or out.shape[-1] < 5:
            raise _checks.value_error(fn, "a detector output: torchvision's list of dicts or a raw tensor "
                                      "[B, N, 4 + classes]", _checks.describe(out))
        classes = out[..., 4:]
        return [(to_xyxy(out[b, :, :4], box_format), classes[b].argmax(-1), classes[b]) for b in range(out.shape[0])]
    if isinstance(out, Mapping) and "boxes" in out:
        out = [out]
    if not isinstance(out, (list, tuple)) or not all(
            isinstance(d, Mapping) and {"boxes", "labels", "scores"} <= set(d) for d in out):
        raise _checks.value_error(fn, "a detector output: torchvision's list of dicts with 'boxes', 'labels' and "
                                  "'scores' (Faster R-CNN, RetinaNet, FCOS, SSD in eval mode) or a raw tensor "
                                  "[B, N, 4 + classes]", _checks.describe(out),
                                  "A detector in training mode returns losses: call `model.eval()` first.")
    return [(to_xyxy(d["boxes"], box_format), d["labels"], d["scores"]) for d in out]


def box_score(boxes: Any, labels: Any, *, iou_threshold: float = 0.5,
              box_format: str = "xyxy") -> Callable[[Any], Tensor]:
    """The summed scores of predicted boxes that match given ones (pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``).

    For every given box, the predicted box of largest IoU with it is found; if that IoU exceeds
    ``iou_threshold`` and its predicted label is the given label, ``IoU + score`` is added, else
    nothing. The target of an example is the sum over its given boxes (0 when none match). The
    score is differentiable in the predicted boxes and scores wherever the matches do not change.

    Args:
      boxes: The boxes to explain, ``(x1, y1, x2, y2)`` in pixels of the model's input (what the
        detector returned for the clean image, typically): ``[K, 4]`` for every example, ``[B, K, 4]``,
        or a list of ``B`` tensors ``[K_b, 4]``.
      labels: Their classes, integer, ``[K]``, ``[B, K]`` or a list like ``boxes``.
      iou_threshold: A predicted box matches when its IoU with the given box is larger. Default: 0.5.
      box_format: ``"xyxy"`` or ``"cxcywh"`` (YOLO's centre and size), for the given boxes and the
        predicted boxes of a raw output alike. Default: ``"xyxy"``.

    Returns:
      A target ``out -> [B]`` for torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD in eval
      mode: a list of dicts with ``boxes``, ``labels`` and ``scores``) and for raw YOLO-style tensors
      ``[B, N, 4 + classes]`` (the predicted label is the argmax of the class scores, the score its value).

    Example:
      >>> model_fn, params = tx.functionalize(fasterrcnn.eval())
      >>> top = {k: v[:3] for k, v in fasterrcnn(images)[0].items()}
      >>> target = tx.targets.box_score(top["boxes"], top["labels"])
      >>> tx.grad_cam(model_fn, params, images, target, layer="backbone.body.layer4")   # a ResNet-50 FPN
    """
    fn = "targets.box_score"
    given, classes = given_boxes(fn, boxes, labels)
    per_example = isinstance(given, list) or given.ndim == 3
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real) or not 0 <= iou_threshold < 1:
        raise _checks.value_error(fn, "iou_threshold in [0, 1)", _checks.describe(iou_threshold))
    check_box_format(fn, box_format)

    def score(out: Any) -> Tensor:
        found = detections(out, fn=fn, box_format=box_format)
        totals = []
        for b, (pred, pred_labels, pred_scores) in enumerate(found):
            mine = to_xyxy(_for_example(given, b, len(found), fn, per_example).to(pred), box_format)
            wanted = _for_example(classes, b, len(found), fn, per_example).to(pred_labels.device)
            if pred.shape[0] == 0 or mine.shape[0] == 0:
                totals.append(pred.sum() * 0)  # no box: 0 (still attached to the graph)
                continue
            assert pred_scores is not None
            iou = box_iou(mine, pred)                                       # [K, N]
            best, index = iou.max(dim=1)                                    # pytorch-grad-cam's argmax
            picked = pred_scores[index]
            if picked.ndim == 2:                                            # raw: the class score at the label
                picked = picked.gather(1, wanted[:, None].clamp(0, picked.shape[1] - 1)).squeeze(1)
            hit = (best > iou_threshold) & (pred_labels[index] == wanted)
            totals.append(torch.where(hit, best + picked, torch.zeros_like(best)).sum())
        return torch.stack(totals)
    return score


def best_match(found: Tuple[Tensor, Tensor, Optional[Tensor]], boxes: Tensor, labels: Tensor) -> Tensor:
    """D-RISE's similarity of each given detection to its best predicted one, ``[K]``.

    ``max_j IoU(box_k, box_j) * cos(P_k, P_j) * O_j`` (Petsiuk et al. 2021) for ``found`` from
    :func:`detections`. With class scores per prediction (a raw output) ``P_k`` is the one-hot vector of
    ``labels[k]`` and ``P_j`` the prediction's class scores, ``O_j = 1``; with torchvision's output
    (a label and a score per box) ``P_j`` is one-hot too, so the cosine is ``[label_j = label_k]`` and
    ``O_j`` is the score. ``boxes`` ``[K, 4]`` are ``(x1, y1, x2, y2)``; 0 when nothing was predicted.
    """
    pred, pred_labels, pred_scores = found
    if pred.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    iou = box_iou(boxes.to(pred), pred).nan_to_num(0.0)                     # [K, N] (empty pairs: 0)
    wanted = labels.to(pred_labels.device)
    assert pred_scores is not None
    if pred_scores.ndim == 2:
        norm = pred_scores.norm(dim=1).clamp_min(torch.finfo(pred_scores.dtype).tiny)
        cosine = pred_scores[:, wanted].T / norm                            # [K, N]
        return (iou * cosine).max(dim=1).values
    same = (pred_labels[None, :] == wanted[:, None]).to(iou.dtype)
    return (iou * same * pred_scores[None, :]).max(dim=1).values


# --------------------------------------------------------------------------------------------
# Dense and embedding outputs.

def _chosen(out: Any, output: Any, fn: str, keys: Sequence[str], what: str) -> Tensor:
    """The tensor of ``out`` that a target reads: ``output`` (a key, attribute, tuple index or callable),
    else ``out`` itself if it is a tensor, else the first of ``keys`` that a mapping output has."""
    if output is not None:
        if callable(output):
            chosen = output(out)
        elif isinstance(output, str):
            chosen = out[output] if isinstance(out, Mapping) and output in out else getattr(out, output, None)
        elif isinstance(output, int) and isinstance(out, (tuple, list)) and -len(out) <= output < len(out):
            chosen = out[output]
        else:
            chosen = None
        if not isinstance(chosen, Tensor):
            raise _checks.value_error(fn, f"output={output!r} to choose a tensor of the model's output",
                                      _checks.describe(out))
        return chosen
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        present = [k for k in keys if k in out and isinstance(out[k], Tensor)]
        if len(present) == 1 or (present and fn != "targets.similarity"):
            return out[present[0]]
    raise _checks.value_error(fn, f"{what} (a tensor, or a mapping with one of {list(keys)})", _checks.describe(out),
                              "Choose the tensor with output= (a key, an attribute, a tuple index or a callable "
                              "out -> tensor).")


def _class_scores(out: Any, output: Any, fn: str) -> Tensor:
    """The ``[B, classes]`` scores of ``out`` that :func:`softmax` and :func:`rest` read (its ``"logits"``
    entry for a mapping), refused at any other rank."""
    values = _chosen(out, output, fn, ("logits",), "class scores [B, classes]")
    if values.ndim != 2:
        raise _checks.value_error(fn, "class scores of shape [B, classes]", _checks.describe(values))
    return values


def _check_output(fn: str, output: Any) -> None:
    if output is not None and not callable(output) and not isinstance(output, (str, int)):
        raise _checks.type_error(fn, "output: None, a key, a tuple index or a callable out -> tensor",
                                 _checks.describe(output))


def _check_category(fn: str, category: Any, name: str = "category") -> Any:
    category = _as_tensor(category)
    if isinstance(category, numbers.Integral) and not isinstance(category, bool) and int(category) >= 0:
        return int(category)
    if isinstance(category, Tensor) and category.ndim <= 1 and not category.is_floating_point() \
            and category.dtype != torch.bool:
        return category
    raise _checks.type_error(fn, f"{name}: an int >= 0 or an integer tensor [B]", _checks.describe(category))


def _pick(values: Tensor, category: Any) -> Tensor:
    """``values[b, category_b]`` for ``values`` ``[B, C, ...]``: ``[B, ...]``."""
    if isinstance(category, int):
        return values[:, category]
    index = category.to(values.device).expand(values.shape[0]).reshape(-1, 1, *([1] * (values.ndim - 2)))
    return values.gather(1, index.expand(-1, 1, *values.shape[2:])).squeeze(1)


def segmentation(category: Any, mask: Any, *, output: Any = None) -> Callable[[Any], Tensor]:
    """A category's logits summed over a region (pytorch-grad-cam's ``SemanticSegmentationTarget``).

    ``score_b = sum_{h, w} out[b, category, h, w] * mask[h, w]``.

    Args:
      category: The class, an int, or ``[B]`` ints (one per example).
      mask: The region, ``[H, W]`` (every example) or ``[B, H, W]``, boolean or real (weights), of the
        output's spatial size (a NumPy array is taken as it is).
      output: Which tensor of the output: ``None`` (the output if it is a tensor, else its ``"out"``
        entry, torchvision's DeepLabV3 / FCN / LR-ASPP, else its ``"logits"``, HuggingFace SegFormer and
        friends), a key, an attribute, a tuple index, or a callable ``out -> [B, C, H, W]`` (e.g. to
        upsample SegFormer's quarter-size logits to the mask). Default: None.

    Returns:
      A target ``out -> [B]``.

    Example:
      >>> model_fn, params = tx.functionalize(deeplabv3.eval())
      >>> mask = deeplabv3(image)["out"].argmax(1)[0] == 15                      # the "person" pixels
      >>> tx.grad_cam(model_fn, params, image, tx.targets.segmentation(15, mask), layer="backbone.layer4")
    """
    fn = "targets.segmentation"
    category = _check_category(fn, category)
    region = _as_tensor(mask)
    if not isinstance(region, Tensor) or region.ndim not in (2, 3) or region.is_complex():
        raise _checks.value_error(fn, "mask of shape [H, W] or [B, H, W] (boolean or real)", _checks.describe(mask))
    _check_output(fn, output)

    def score(out: Any) -> Tensor:
        logits = _chosen(out, output, fn, ("out", "logits"), "a segmentation output [B, C, H, W]")
        if logits.ndim != 4:
            raise _checks.value_error(fn, "a segmentation output of shape [B, C, H, W]", _checks.describe(logits))
        if tuple(region.shape[-2:]) != tuple(logits.shape[-2:]) or (
                region.ndim == 3 and region.shape[0] != logits.shape[0]):
            raise _checks.value_error(
                fn, f"mask of the output's spatial size {list(logits.shape[-2:])} ([H, W] or [B, H, W])",
                _checks.describe(region), "Resize the mask, or upsample the logits with output=, e.g. "
                "`output=lambda o: F.interpolate(o.logits, size=mask.shape[-2:], mode='bilinear')`.")
        picked = _pick(logits, category)                                     # [B, H, W]
        return (picked * region.to(device=picked.device, dtype=picked.dtype)).sum((1, 2))
    return score


def similarity(reference: Any, *, output: Any = None) -> Callable[[Any], Tensor]:
    """Cosine similarity of the output embedding to a reference embedding (``SimilarityToConceptTarget``).

    ``score_b = cos(embedding_b, reference)`` (``F.cosine_similarity``, each embedding flattened), for
    metric-learning backbones, face or re-identification models, and image–text models: explain an
    image by its similarity to a text's embedding (CLIP's ``image_embeds`` against ``text_embeds``), or
    a text's tokens by their similarity to an image (``layer=`` at the token embeddings).

    Args:
      reference: The concept, ``[D]`` (every example) or ``[B, D]``. It is a constant: no gradient
        flows into it (detach it if it came from the same model).
      output: Which tensor of the output is the embedding: ``None`` (the output if it is a tensor,
        else the one of ``image_embeds``, ``text_embeds``, ``embeds``, ``pooler_output`` that a mapping
        output has; HuggingFace ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``), a
        key, an attribute, a tuple index, or a callable ``out -> [B, D]``. Default: None.

    Returns:
      A target ``out -> [B]`` in ``[-1, 1]``.

    Example:
      >>> text = clip_text(**tokens).text_embeds.detach()                  # [1, D]
      >>> fn, params = tx.functionalize(clip_vision)
      >>> tx.saliency(fn, params, pixels, tx.targets.similarity(text[0]))
    """
    fn = "targets.similarity"
    ref = _as_tensor(reference)
    if not isinstance(ref, Tensor) or ref.ndim not in (1, 2) or not ref.is_floating_point():
        raise _checks.value_error(fn, "reference, a floating-point embedding [D] or [B, D]",
                                  _checks.describe(reference))
    _check_output(fn, output)

    def score(out: Any) -> Tensor:
        embedding = _chosen(out, output, fn, ("image_embeds", "text_embeds", "embeds", "pooler_output"),
                            "an embedding output [B, D]")
        flat = embedding.reshape(embedding.shape[0], -1)
        concept = ref.to(device=flat.device, dtype=flat.dtype).detach()
        if concept.shape[-1] != flat.shape[1] or (concept.ndim == 2 and concept.shape[0] not in (1, flat.shape[0])):
            raise _checks.value_error(fn, f"reference of the embedding's size [{flat.shape[1]}] or "
                                      f"[{flat.shape[0]}, {flat.shape[1]}]", _checks.describe(concept))
        return F.cosine_similarity(flat, concept.expand_as(flat), dim=1)
    return score


def regression(index: Any = None, *, output: Any = None) -> Callable[[Any], Tensor]:
    """A real-valued output as the score: ``out[b]`` for ``[B]`` or ``[B, 1]``, ``out[b, index]`` for ``[B, K]``.

    Args:
      index: ``None`` (the output has one value per example), an int, or a tuple of ints into the
        output without its batch axis (``[B, K, M]`` with ``index=(k, m)``). Default: None.
      output: Which tensor of the output (see :func:`segmentation`; ``None``: the tensor itself, or
        its ``"logits"``). Default: None.

    Returns:
      A target ``out -> [B]``.
    """
    fn = "targets.regression"
    if index is not None:
        picked_index = index if isinstance(index, tuple) else (index,)
        if not picked_index or not all(isinstance(i, int) and not isinstance(i, bool) for i in picked_index):
            raise _checks.type_error(fn, "index: None, an int or a tuple of ints", _checks.describe(index))
    _check_output(fn, output)

    def score(out: Any) -> Tensor:
        values = _chosen(out, output, fn, ("logits", "predictions", "prediction"), "a real-valued output")
        if index is None:
            if values.ndim == 1 or values[0].numel() == 1:
                return values.reshape(values.shape[0])
            raise _checks.value_error(fn, "an output of one value per example ([B] or [B, 1]) for index=None",
                                      _checks.describe(values), "Pass index= (an int or a tuple of ints).")
        shape = tuple(values.shape[1:])
        if len(picked_index) != len(shape) or any(not -n <= i < n for i, n in zip(picked_index, shape)):
            raise _checks.value_error(fn, f"index within the output's shape {list(shape)} (without the batch axis)",
                                      repr(index))
        return values[(slice(None), *picked_index)]
    return score


def softmax(category: Any, *, output: Any = None) -> Callable[[Any], Tensor]:
    """``softmax(out, dim=-1)[b, category]`` (pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``).

    ``category``: an int or ``[B]`` ints; ``output``: as for :func:`regression` (``"logits"`` of a mapping).
    """
    fn = "targets.softmax"
    category = _check_category(fn, category)
    _check_output(fn, output)

    def score(out: Any) -> Tensor:
        values = _class_scores(out, output, fn)
        return _pick(torch.softmax(values, dim=-1), category)
    return score


def binary(category: int, *, output: Any = None) -> Callable[[Any], Tensor]:
    """A binary classifier's one logit, signed for the class (``BinaryClassifierOutputTarget``).

    ``out[b]`` for ``category=1`` and ``-out[b]`` for ``category=0``, on an output ``[B]`` or ``[B, 1]``.
    """
    fn = "targets.binary"
    if category not in (0, 1) or isinstance(category, bool):
        raise _checks.value_error(fn, "category 0 or 1", _checks.describe(category))
    sign = 1.0 if category == 1 else -1.0
    values = regression(output=output)

    def score(out: Any) -> Tensor:
        return sign * values(out)
    return score


def rest(category: Any, *, output: Any = None) -> Callable[[Any], Tensor]:
    """The logit minus the cross-entropy, ``out[b, c] - CE(out[b], c)`` (pytorch-grad-cam's ``ClassifierOutputReST``).

    ``category``: an int or ``[B]`` ints; ``output``: as for :func:`softmax`.
    """
    fn = "targets.rest"
    category = _check_category(fn, category)
    _check_output(fn, output)

    def score(out: Any) -> Tensor:
        values = _class_scores(out, output, fn)
        index = torch.full((values.shape[0],), category, device=values.device) if isinstance(category, int) \
            else category.to(values.device).expand(values.shape[0])
        return _pick(values, index) - F.cross_entropy(values, index, reduction="none")
    return score
